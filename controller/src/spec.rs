//! Job specs: parsing a manifest (YAML or JSON) or a `watt.v1.JobSpec`, and validating it into a
//! [`JobSpec`] the rest of the controller can trust.
//!
//! Both sources go through the same [`JobSpec::validate`], so a bad value gets the same message
//! however it arrived, and every message starts with the field's path (`shards.min must be ≥ 1
//! and ≤ shards.max (got 0)`).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use watt_proto::v1 as pb;

/// The largest manifest the controller reads.
pub const MAX_MANIFEST_BYTES: usize = 1 << 20;
pub const MAX_SHARDS: u32 = 10_000;
/// No node has more GPUs than this; a tighter bound comes from the nodes registered.
pub const MAX_GPUS_PER_SHARD: u32 = 64;
pub const MAX_PRIORITY: i64 = 1_000_000;
pub const MAX_ENV: usize = 256;
pub const MAX_ARGS: usize = 1_024;
pub const MAX_FLEX: f64 = 0.5;
pub const DEFAULT_MAX_RESTARTS: u32 = 3;

/// Environment variables Watt sets for every worker; a job may not set them itself.
pub const RESERVED_ENV: &[&str] = &[
    "RANK",
    "LOCAL_RANK",
    "WORLD_SIZE",
    "LOCAL_WORLD_SIZE",
    "GROUP_RANK",
    "ROLE_RANK",
    "MASTER_ADDR",
    "MASTER_PORT",
    "TORCHELASTIC_RESTART_COUNT",
    "TORCHELASTIC_MAX_RESTARTS",
    "TORCHELASTIC_RUN_ID",
    "ROLE_WORLD_SIZE",
    "CUDA_VISIBLE_DEVICES",
    "WATT_CHECKPOINT_DIR",
    "WATT_JOB",
    "WATT_SHARD",
    "WATT_EPOCH",
    "WATT_PROGRESS_SOCKET",
    "WATT_SIM_SPEED_FILE",
];
pub const DEFAULT_STOP_GRACE_MS: u64 = 30_000;
pub const MAX_STOP_GRACE_MS: u64 = 3_600_000;

/// A bad field: `Display` is `"<path> <what is wrong>"`.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{field} {message}")]
pub struct FieldError {
    pub field: String,
    pub message: String,
}

impl FieldError {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        FieldError { field: field.into(), message: message.into() }
    }
}

/// A validated job spec.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobSpec {
    pub name: String,
    pub priority: i64,
    pub shards: ShardRange,
    pub gpus_per_shard: u32,
    pub command: Vec<String>,
    pub env: BTreeMap<String, String>,
    pub workdir: Option<String>,
    pub checkpoint_dir: Option<String>,
    pub flex: f64,
    pub max_restarts: u32,
    /// Between SIGTERM and SIGKILL when a shard is stopped.
    #[serde(default = "default_stop_grace_ms")]
    pub stop_grace_ms: u64,
    /// The training runtime its shards need: only nodes whose agent offers it run them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runtime: Option<String>,
}

fn default_stop_grace_ms() -> u64 {
    DEFAULT_STOP_GRACE_MS
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardRange {
    pub min: u32,
    pub max: u32,
}

/// A manifest as written: every field optional so that a missing one is reported by name, and
/// numbers signed so that a negative one is too.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Manifest {
    name: Option<String>,
    priority: Option<i64>,
    shards: Option<ManifestShards>,
    gpus_per_shard: Option<i64>,
    command: Option<Vec<String>>,
    #[serde(default)]
    env: BTreeMap<String, String>,
    workdir: Option<String>,
    checkpoint_dir: Option<String>,
    flex: Option<f64>,
    max_restarts: Option<i64>,
    /// A duration ("30s", "2m"), or milliseconds from the proto's `stop_grace_ms`.
    stop_grace: Option<String>,
    runtime: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ManifestShards {
    min: Option<i64>,
    max: Option<i64>,
}

impl JobSpec {
    /// Parse a YAML or JSON manifest (JSON is YAML) and validate it.
    pub fn from_manifest(text: &str) -> Result<JobSpec, FieldError> {
        if text.len() > MAX_MANIFEST_BYTES {
            return Err(FieldError::new(
                "manifest",
                format!("is {} bytes; the limit is {} bytes (1 MiB)", text.len(), MAX_MANIFEST_BYTES),
            ));
        }
        // Syntax first, so a broken document is reported as such rather than by the first key
        // the streaming parser happened to read before the break.
        let document: serde_yaml::Value = serde_yaml::from_str(text)
            .map_err(|e| FieldError::new("manifest", format!("is invalid: not YAML or JSON: {e}")))?;
        let manifest: Manifest = serde_path_to_error::deserialize(document).map_err(|e| {
            let path = e.path().to_string();
            let inner = e.into_inner().to_string();
            // serde names unknown fields itself ("unknown field `x`, expected ..."); put the
            // offending key first.
            // serde's path already ends at an unknown key; fall back to the key it names.
            if let Some((_, rest)) = inner.split_once("unknown field `") {
                let key = rest.split('`').next().unwrap_or_default();
                let field = if path == "." { key.to_string() } else { path };
                return FieldError::new(field, "is not a job spec field");
            }
            let field = if path == "." { "manifest".to_string() } else { path };
            FieldError::new(field, format!("is invalid: {inner}"))
        })?;
        Self::validate(manifest)
    }

    /// Validate a `watt.v1.JobSpec` (an absent field arrives as its zero value).
    pub fn from_proto(spec: &pb::JobSpec) -> Result<JobSpec, FieldError> {
        let text_len = spec.name.len()
            + spec.command.iter().map(String::len).sum::<usize>()
            + spec.env.iter().map(|(k, v)| k.len() + v.len()).sum::<usize>()
            + spec.workdir.len()
            + spec.checkpoint_dir.len();
        if text_len > MAX_MANIFEST_BYTES {
            return Err(FieldError::new(
                "spec",
                format!("is {text_len} bytes; the limit is {MAX_MANIFEST_BYTES} bytes (1 MiB)"),
            ));
        }
        let non_empty = |s: &str| (!s.is_empty()).then(|| s.to_string());
        Self::validate(Manifest {
            name: non_empty(&spec.name),
            priority: Some(spec.priority),
            shards: spec.shards.map(|s| ManifestShards { min: Some(s.min), max: Some(s.max) }),
            gpus_per_shard: (spec.gpus_per_shard != 0).then_some(spec.gpus_per_shard),
            command: (!spec.command.is_empty()).then(|| spec.command.clone()),
            env: spec.env.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
            workdir: non_empty(&spec.workdir),
            checkpoint_dir: non_empty(&spec.checkpoint_dir),
            flex: Some(spec.flex),
            max_restarts: spec.max_restarts,
            stop_grace: spec.stop_grace_ms.map(|ms| format!("{ms}ms")),
            runtime: non_empty(&spec.runtime),
        })
    }

    fn validate(m: Manifest) -> Result<JobSpec, FieldError> {
        let name = m.name.ok_or_else(|| FieldError::new("name", "is required"))?;
        validate_name(&name)?;
        let priority = m.priority.unwrap_or(0);
        // A range, not `abs()`: i64::MIN has no absolute value (it wraps in a release build).
        if !(-MAX_PRIORITY..=MAX_PRIORITY).contains(&priority) {
            return Err(FieldError::new(
                "priority",
                format!("must be between -{MAX_PRIORITY} and {MAX_PRIORITY} (got {priority})"),
            ));
        }
        let shards = m.shards.ok_or_else(|| FieldError::new("shards", "is required: {min, max}"))?;
        let max = shards.max.ok_or_else(|| FieldError::new("shards.max", "is required"))?;
        let min = shards.min.ok_or_else(|| FieldError::new("shards.min", "is required"))?;
        if max < 1 || max > i64::from(MAX_SHARDS) {
            return Err(FieldError::new("shards.max", format!("must be between 1 and {MAX_SHARDS} (got {max})")));
        }
        if min < 1 || min > max {
            return Err(FieldError::new("shards.min", format!("must be ≥ 1 and ≤ shards.max (got {min})")));
        }
        let gpus = m.gpus_per_shard.ok_or_else(|| FieldError::new("gpus_per_shard", "is required"))?;
        if gpus < 1 || gpus > i64::from(MAX_GPUS_PER_SHARD) {
            return Err(FieldError::new(
                "gpus_per_shard",
                format!("must be between 1 and {MAX_GPUS_PER_SHARD} (got {gpus})"),
            ));
        }
        let command = m.command.filter(|c| !c.is_empty()).ok_or_else(|| {
            FieldError::new("command", "is required: the program and its arguments as a list, e.g. [python, train.py]")
        })?;
        if command.len() > MAX_ARGS {
            return Err(FieldError::new(
                "command",
                format!("has {} arguments; the limit is {MAX_ARGS}", command.len()),
            ));
        }
        if command[0].trim().is_empty() {
            return Err(FieldError::new("command[0]", "must name a program"));
        }
        if let Some(i) = command.iter().position(|a| a.contains('\0')) {
            return Err(FieldError::new(format!("command[{i}]"), "must not contain a NUL byte"));
        }
        if m.env.len() > MAX_ENV {
            return Err(FieldError::new("env", format!("has {} variables; the limit is {MAX_ENV}", m.env.len())));
        }
        for (key, value) in &m.env {
            let valid = key.chars().next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
                && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
            if !valid {
                return Err(FieldError::new(
                    format!("env.{key}"),
                    "is not a valid variable name ([A-Za-z_][A-Za-z0-9_]*)",
                ));
            }
            if RESERVED_ENV.contains(&key.as_str()) {
                return Err(FieldError::new(
                    format!("env.{key}"),
                    "is set by Watt for every worker and cannot be overridden",
                ));
            }
            if value.contains('\0') {
                return Err(FieldError::new(format!("env.{key}"), "must not contain a NUL byte"));
            }
        }
        for (field, path) in [("workdir", &m.workdir), ("checkpoint_dir", &m.checkpoint_dir)] {
            if let Some(path) = path {
                if !path.starts_with('/') || path.contains('\0') {
                    return Err(FieldError::new(field, format!("must be an absolute path (got {path:?})")));
                }
            }
        }
        let flex = m.flex.unwrap_or(0.0);
        if !(0.0..=MAX_FLEX).contains(&flex) {
            return Err(FieldError::new("flex", format!("must be between 0.0 and {MAX_FLEX} (got {flex})")));
        }
        let max_restarts = m.max_restarts.unwrap_or(i64::from(DEFAULT_MAX_RESTARTS));
        if !(0..=1_000).contains(&max_restarts) {
            return Err(FieldError::new("max_restarts", format!("must be between 0 and 1000 (got {max_restarts})")));
        }
        let stop_grace_ms = match &m.stop_grace {
            None => DEFAULT_STOP_GRACE_MS,
            Some(text) => watt_common::duration::parse(text)
                .ok()
                .map(|d| d.as_millis() as u64)
                .filter(|ms| *ms <= MAX_STOP_GRACE_MS)
                .ok_or_else(|| {
                    FieldError::new("stop_grace", format!("must be a duration up to 1h, like 30s (got {text:?})"))
                })?,
        };
        if let Some(runtime) = &m.runtime {
            watt_common::names::check_runtime(runtime).map_err(|message| FieldError::new("runtime", message))?;
        }
        Ok(JobSpec {
            name,
            priority,
            shards: ShardRange { min: min as u32, max: max as u32 },
            gpus_per_shard: gpus as u32,
            command,
            env: m.env,
            workdir: m.workdir,
            checkpoint_dir: m.checkpoint_dir,
            flex,
            max_restarts: max_restarts as u32,
            stop_grace_ms,
            runtime: m.runtime,
        })
    }

    pub fn to_proto(&self) -> pb::JobSpec {
        pb::JobSpec {
            name: self.name.clone(),
            priority: self.priority,
            shards: Some(pb::ShardRange { min: i64::from(self.shards.min), max: i64::from(self.shards.max) }),
            gpus_per_shard: i64::from(self.gpus_per_shard),
            command: self.command.clone(),
            env: self.env.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
            workdir: self.workdir.clone().unwrap_or_default(),
            checkpoint_dir: self.checkpoint_dir.clone().unwrap_or_default(),
            flex: self.flex,
            max_restarts: Some(i64::from(self.max_restarts)),
            stop_grace_ms: Some(self.stop_grace_ms as i64),
            runtime: self.runtime.clone().unwrap_or_default(),
        }
    }
}

/// Job names are keys in the store and labels in metrics: DNS-label shaped.
pub fn validate_name(name: &str) -> Result<(), FieldError> {
    watt_common::names::check(name).map_err(|message| FieldError::new("name", message))
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str =
        "name: llama-70b\npriority: 10\nshards: {min: 2, max: 4}\ngpus_per_shard: 8\ncommand: [python, train.py]\n";

    fn err(text: &str) -> String {
        JobSpec::from_manifest(text).unwrap_err().to_string()
    }

    #[test]
    fn every_example_job_is_a_valid_spec() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/jobs");
        let mut seen = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let spec = JobSpec::from_manifest(&std::fs::read_to_string(&path).unwrap());
            assert!(spec.is_ok(), "{}: {spec:?}", path.display());
            seen += 1;
        }
        assert!(seen >= 4, "{seen} examples in {}", dir.display());
    }

    #[test]
    fn a_runtime_is_a_name_kept_through_the_proto_and_checked_by_field() {
        let spec = JobSpec::from_manifest(&format!("{GOOD}runtime: pytorch-25.01\n")).unwrap();
        assert_eq!(spec.runtime.as_deref(), Some("pytorch-25.01"));
        assert_eq!(JobSpec::from_proto(&spec.to_proto()).unwrap(), spec);
        assert_eq!(JobSpec::from_manifest(GOOD).unwrap().runtime, None, "none: any node");
        let e = err(&format!("{GOOD}runtime: PyTorch 25\n"));
        assert!(e.starts_with("runtime") && e.contains("PyTorch 25"), "{e}");
    }

    #[test]
    fn a_good_manifest_parses_in_yaml_and_json() {
        let spec = JobSpec::from_manifest(GOOD).unwrap();
        assert_eq!(spec.shards, ShardRange { min: 2, max: 4 });
        assert_eq!(spec.max_restarts, DEFAULT_MAX_RESTARTS);
        let json = r#"{"name":"a","shards":{"min":1,"max":1},"gpus_per_shard":1,"command":["x"],"flex":0.2}"#;
        assert_eq!(JobSpec::from_manifest(json).unwrap().flex, 0.2);
    }

    #[test]
    fn proto_and_manifest_validate_alike() {
        let spec = JobSpec::from_manifest(GOOD).unwrap();
        assert_eq!(JobSpec::from_proto(&spec.to_proto()).unwrap(), spec);
        let mut bad = spec.to_proto();
        bad.shards = Some(pb::ShardRange { min: 0, max: 4 });
        assert_eq!(
            JobSpec::from_proto(&bad).unwrap_err().to_string(),
            "shards.min must be ≥ 1 and ≤ shards.max (got 0)"
        );
        bad.name.clear();
        assert_eq!(JobSpec::from_proto(&bad).unwrap_err().field, "name");
    }

    #[test]
    fn every_error_names_its_field() {
        let cases: &[(&str, &str)] = &[
            ("priority: 1\n", "name is required"),
            ("name: Big_Job\n", "name must be"),
            (
                "name: a\nshards: {min: 0, max: 4}\ngpus_per_shard: 1\ncommand: [x]\n",
                "shards.min must be ≥ 1 and ≤ shards.max (got 0)",
            ),
            ("name: a\nshards: {min: 5, max: 4}\ngpus_per_shard: 1\ncommand: [x]\n", "shards.min must be ≥ 1"),
            ("name: a\nshards: {min: 1}\ngpus_per_shard: 1\ncommand: [x]\n", "shards.max is required"),
            (
                "name: a\nshards: {min: 1, max: 1}\ngpus_per_shard: -8\ncommand: [x]\n",
                "gpus_per_shard must be between 1 and 64 (got -8)",
            ),
            ("name: a\nshards: {min: 1, max: 1}\ngpus_per_shard: 1\n", "command is required"),
            ("name: a\nshards: {min: 1, max: 1}\ngpus_per_shard: 1\ncommand: python train.py\n", "command is invalid"),
            (
                "name: a\nshards: {min: 1, max: 1}\ngpus_per_shard: 1\ncommand: [x]\nflex: 0.9\n",
                "flex must be between 0.0 and 0.5",
            ),
            (
                "name: a\nshards: {min: 1, max: 1}\ngpus_per_shard: 1\ncommand: [x]\nenv: {RANK: '3'}\n",
                "env.RANK is set by Watt",
            ),
            (
                "name: a\nshards: {min: 1, max: 1}\ngpus_per_shard: 1\ncommand: [x]\nenv: {1X: y}\n",
                "env.1X is not a valid",
            ),
            (
                "name: a\nshards: {min: 1, max: 1}\ngpus_per_shard: 1\ncommand: [x]\nworkdir: rel/dir\n",
                "workdir must be an absolute path",
            ),
            (
                "name: a\nshards: {min: 1, max: 1}\ngpus_per_shard: 1\ncommand: [x]\nmax_restarts: -1\n",
                "max_restarts must be between 0 and 1000 (got -1)",
            ),
            (
                "name: a\nshards: {min: 1, max: 1}\ngpus_per_shard: 1\ncommand: [x]\ngpu: 3\n",
                "gpu is not a job spec field",
            ),
            (
                "name: a\nshards: {min: 1, max: 1, step: 2}\ngpus_per_shard: 1\ncommand: [x]\n",
                "shards.step is not a job spec field",
            ),
            ("name: a\npriority: high\n", "priority is invalid"),
            (
                "name: a\npriority: -9223372036854775808\nshards: {min: 1, max: 1}\ngpus_per_shard: 1\ncommand: [x]\n",
                "priority must be between",
            ),
            ("[1, 2]", "manifest is invalid"),
        ];
        for (text, want) in cases {
            let got = err(text);
            assert!(got.starts_with(want), "for {text:?}: want {want:?}, got {got:?}");
        }
    }

    #[test]
    fn the_shipped_examples_are_valid() {
        for text in [
            include_str!("../../examples/jobs/llama-pretrain.yaml"),
            include_str!("../../examples/jobs/sweep-elastic.yaml"),
        ] {
            JobSpec::from_manifest(text).unwrap();
        }
    }

    #[test]
    fn a_huge_manifest_is_refused_before_parsing() {
        let text = format!("{GOOD}# {}\n", "x".repeat(10 << 20));
        let e = JobSpec::from_manifest(&text).unwrap_err();
        assert_eq!(e.field, "manifest");
        assert!(e.message.contains("1 MiB"), "{e}");
    }
}
