//! The agent's image as the README's "Jobs on a Helm install" builds it: the Dockerfile takes the
//! base image (and the build stage) as build arguments, declares the runtime it offers as the
//! agent's `WATT_RUNTIMES`, carries the example DDP script the example job runs; the README's
//! commands use those arguments, the job names the same runtime, and the chart runs the image
//! it is given.
#![allow(clippy::unwrap_used)]

use watt_deploy_tests::*;

fn read(path: &str) -> String {
    std::fs::read_to_string(root().join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// `--build-arg NAME=VALUE` values in `text`.
fn build_arg(text: &str, name: &str) -> Option<String> {
    let needle = format!("--build-arg {name}=");
    let at = text.find(&needle)? + needle.len();
    Some(text[at..].split_whitespace().next()?.to_string())
}

#[test]
fn the_agent_image_builds_on_a_given_base_declares_its_runtime_and_the_readme_and_chart_agree() {
    let dockerfile = read("docker/watt-agent.Dockerfile");
    let lines: Vec<&str> = dockerfile.lines().map(str::trim).filter(|l| !l.starts_with('#')).collect();
    assert!(lines.contains(&"ARG BASE_IMAGE=debian:bookworm-slim"), "the default base: as before");
    assert!(lines.iter().any(|l| l.starts_with("ARG BUILD_IMAGE=rust:")), "{lines:?}");
    assert!(lines.contains(&"FROM ${BUILD_IMAGE} AS build"));
    let runtime_stage = lines.iter().position(|l| *l == "FROM ${BASE_IMAGE}").expect("the last stage on BASE_IMAGE");
    let stage = &lines[runtime_stage..];
    assert!(stage.contains(&"ARG RUNTIME=\"\"") && stage.contains(&"ENV WATT_RUNTIMES=${RUNTIME}"), "{stage:?}");
    assert!(
        stage.iter().any(|l| l.contains("examples/pytorch_ddp.py") && l.ends_with("/opt/watt/examples/")),
        "{stage:?}"
    );
    assert!(stage.contains(&"USER 65532:65532"), "non-root by default");

    // The README's path: the same arguments, the tag it builds is the image the chart is given,
    // and the example job asks for the runtime the image declares.
    let readme = read("README.md");
    let section = &readme[readme.find("### Jobs on a Helm install").unwrap()..];
    let section = &section[..section.find("\n## ").unwrap_or(section.len())];
    let runtime = build_arg(section, "RUNTIME").expect("--build-arg RUNTIME in the README");
    assert!(build_arg(section, "BASE_IMAGE").is_some_and(|b| b.starts_with("nvcr.io/nvidia/pytorch:")), "{section}");
    let tag = section.split("-t ").nth(1).unwrap().split_whitespace().next().unwrap();
    assert!(section.contains(&format!("--set agent.image={tag}")), "the chart runs the image built: {tag}");
    let job: serde_yaml::Value = serde_yaml::from_str(&read("examples/jobs/pytorch-ddp.yaml")).unwrap();
    assert_eq!(job["runtime"].as_str(), Some(runtime.as_str()));
    assert!(job["command"][1].as_str().unwrap().starts_with("/opt/watt/examples/"), "{job:?}");
    let (ok, rendered, err) = helm_template(&["--set", &format!("agent.image={tag}")]);
    assert!(ok, "{err}");
    let docs = documents(&rendered);
    let agent = find(&docs, "DaemonSet", "watt-agent");
    assert_eq!(agent["spec"]["template"]["spec"]["containers"][0]["image"].as_str(), Some(tag));
}
