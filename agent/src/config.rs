//! The agent's configuration: command-line flags, `WATT_*` environment variables and a TOML
//! file, merged in that order of precedence and validated in one place.
//!
//! Every value, whatever its source, goes through [`Args::resolve`], so a bad value is reported
//! the same way — naming the flag and the config key — and nothing starts with it.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Parser, ValueEnum};
use serde::Deserialize;

use crate::bootstrap::NodeCertFiles;
use crate::enforcer::EnforceMode;
use crate::gpu::nvml::DEFAULT_LIBRARY;
use crate::gpu::sim::{SimModel, TICK};
use crate::supervisor::cgroup::{MemoryPolicy, DEFAULT_PIDS};
use crate::supervisor::identity::{self, ShardUser};
use crate::supervisor::ShardExec;
use watt_common::client::{read_token, ClientError, Credentials};
use watt_common::duration::{parse as parse_duration, show};
pub use watt_common::logging::LogFormat;

/// The NVML driver updates power and energy every 100 ms: sampling faster reads the same value.
pub const MIN_SAMPLE_INTERVAL: Duration = TICK;
pub const MAX_SAMPLE_INTERVAL: Duration = Duration::from_secs(3600);
pub const MAX_SIM_GPUS: u32 = 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    /// Real NVIDIA GPUs through NVML (`libnvidia-ml.so.1`).
    Nvml,
    /// Simulated GPUs, for machines without NVIDIA hardware.
    Sim,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SimModelKey {
    /// NVIDIA H100 SXM 80 GB (200–700 W)
    H100,
    /// NVIDIA H200 SXM 141 GB (200–700 W)
    H200,
    /// NVIDIA A100 SXM4 80 GB (100–400 W)
    A100,
}

impl SimModelKey {
    pub fn model(self) -> SimModel {
        match self {
            SimModelKey::H100 => SimModel::H100,
            SimModelKey::H200 => SimModel::H200,
            SimModelKey::A100 => SimModel::A100,
        }
    }
}

/// Watt's node agent: reads every GPU on this node and exports what it reads to Prometheus.
#[derive(Debug, Parser)]
#[command(name = "watt-agent", version, about, long_about = None)]
pub struct Args {
    /// TOML config file. Flags and WATT_* variables override its values; unknown keys are errors.
    #[arg(long, env = "WATT_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// Validate the configuration, print it, and exit.
    #[arg(long)]
    pub check_config: bool,

    /// Where GPU readings come from [default: nvml].
    #[arg(long, env = "WATT_BACKEND", value_enum)]
    pub backend: Option<BackendKind>,

    /// The NVML library to load [default: libnvidia-ml.so.1].
    #[arg(long, env = "WATT_NVML_LIBRARY", value_name = "PATH")]
    pub nvml_library: Option<String>,

    /// Number of simulated GPUs, with --backend sim [default: 8].
    #[arg(long, env = "WATT_SIM_GPUS", value_name = "N")]
    pub sim_gpus: Option<u32>,

    /// Model of the simulated GPUs [default: h100].
    #[arg(long, env = "WATT_SIM_MODEL", value_enum)]
    pub sim_model: Option<SimModelKey>,

    /// Seed of the simulated workload and noise; the same seed gives the same readings [default: 1].
    #[arg(long, env = "WATT_SIM_SEED", value_name = "SEED")]
    pub sim_seed: Option<u64>,

    /// This node's name in metrics and at the controller [default: the hostname].
    #[arg(long, env = "WATT_NODE_NAME", value_name = "NAME")]
    pub node_name: Option<String>,

    /// Address of the plain HTTP endpoint (/metrics, /healthz) [default: 127.0.0.1:9400: plain
    /// text stays on this machine unless asked; Prometheus elsewhere needs 0.0.0.0:9400].
    #[arg(long, env = "WATT_METRICS_ADDR", value_name = "ADDR")]
    pub metrics_addr: Option<SocketAddr>,

    /// Address of the shards' logs endpoint, read by `wattctl logs` with a grant from the
    /// controller: HTTPS with this node's certificate when it has one, else plain on loopback
    /// only [default: 127.0.0.1:9402].
    #[arg(long, env = "WATT_LOGS_ADDR", value_name = "ADDR")]
    pub logs_addr: Option<SocketAddr>,

    /// How often every GPU is read, e.g. 1s or 250ms; at least 100ms, the driver's update period
    /// [default: 1s].
    #[arg(long, env = "WATT_SAMPLE_INTERVAL", value_name = "DURATION", value_parser = parse_duration)]
    pub sample_interval: Option<Duration>,

    /// How often the costly readings are refreshed: energy counter, power limits, PCIe, ECC,
    /// processes. Between refreshes energy is integrated from power [default: 10s].
    #[arg(long, env = "WATT_DETAIL_INTERVAL", value_name = "DURATION", value_parser = parse_duration)]
    pub detail_interval: Option<Duration>,

    /// Also export dcgm-exporter's metric names, units and labels (DCGM_FI_DEV_*), so dashboards
    /// built for dcgm-exporter work unchanged.
    #[arg(long, env = "WATT_DCGM_COMPAT")]
    pub dcgm_compat: bool,

    /// Log format [default: text].
    #[arg(long, env = "WATT_LOG_FORMAT", value_enum)]
    pub log_format: Option<LogFormat>,

    /// The controller to hold a session with, e.g. https://controller:7070, or its replicas'
    /// URLs separated by commas (the session goes to the one that leads). Without it the agent
    /// only exports metrics.
    #[arg(long, env = "WATT_CONTROLLER", value_name = "URL[,URL...]")]
    pub controller: Option<String>,

    /// The CA (PEM) that signed the controller's certificate; required for an https:// controller.
    #[arg(long, env = "WATT_CA", value_name = "FILE")]
    pub ca: Option<PathBuf>,

    /// This node's certificate (PEM, CN = the node's name, O = watt:node) and its key: the
    /// controller gives a session only to the node its certificate names.
    #[arg(long, env = "WATT_TLS_CERT", value_name = "FILE")]
    pub tls_cert: Option<PathBuf>,

    #[arg(long, env = "WATT_TLS_KEY", value_name = "FILE")]
    pub tls_key: Option<PathBuf>,

    /// A file holding this node's bearer token, instead of a certificate.
    #[arg(long, env = "WATT_TOKEN_FILE", value_name = "FILE")]
    pub token_file: Option<PathBuf>,

    /// Run jobs' shards as USER[:GROUP] (a name or a number). An agent running as root runs them
    /// as `nobody` unless told otherwise [default: nobody when root, else the agent's user].
    #[arg(long, env = "WATT_RUN_AS", value_name = "USER[:GROUP]")]
    pub run_as: Option<String>,

    /// Allow `--run-as root`: jobs' commands then run as root on this node.
    #[arg(long, env = "WATT_ALLOW_ROOT_SHARDS")]
    pub allow_root_shards: bool,

    /// Each shard's memory limit in its cgroup: auto (the node's memory in proportion to the
    /// shard's GPUs), none, or a size such as 256GiB [default: auto].
    #[arg(long, env = "WATT_SHARD_MEMORY_MAX", value_name = "auto|none|SIZE")]
    pub shard_memory_max: Option<String>,

    /// Each shard's limit on processes and threads in its cgroup, or none [default: 32768].
    #[arg(long, env = "WATT_SHARD_PIDS_MAX", value_name = "N|none")]
    pub shard_pids_max: Option<String>,

    /// The cgroup v2 directory shards' groups go under; the agent moves itself into its `agent`
    /// child [default: the agent's own group; where cgroup v2 cannot be used there, shards run
    /// without limits and the agent says why].
    #[arg(long, env = "WATT_SHARD_CGROUP", value_name = "DIR")]
    pub shard_cgroup: Option<PathBuf>,

    /// A file holding a bootstrap token: with no --tls-cert, the agent gets this node's
    /// certificate from the controller on first start and keeps it under --state-dir/pki.
    #[arg(long, env = "WATT_BOOTSTRAP_TOKEN_FILE", value_name = "FILE")]
    pub bootstrap_token_file: Option<PathBuf>,

    /// Power-cap enforcement: on, dry-run (log and export, change no GPU setting), or off
    /// [default: on].
    #[arg(long, env = "WATT_ENFORCE", value_enum)]
    pub enforce: Option<EnforceMode>,

    /// With no word from the controller for this long, every GPU goes to its failsafe cap
    /// [default: 10s].
    #[arg(long, env = "WATT_FAILSAFE_AFTER", value_name = "DURATION", value_parser = parse_duration)]
    pub failsafe_after: Option<Duration>,

    /// The failsafe cap in watts, for every GPU [default: each GPU's minimum].
    #[arg(long, env = "WATT_FAILSAFE_CAP", value_name = "WATTS")]
    pub failsafe_cap: Option<f64>,

    /// Where shards' logs, pid files and default checkpoints live [default: /var/lib/watt-agent].
    #[arg(long, env = "WATT_STATE_DIR", value_name = "DIR")]
    pub state_dir: Option<PathBuf>,

    /// Between SIGTERM and SIGKILL when stopping a shard whose job sets no `stop_grace`
    /// [default: 30s].
    #[arg(long, env = "WATT_STOP_GRACE", value_name = "DURATION", value_parser = parse_duration)]
    pub stop_grace: Option<Duration>,

    /// Static non-GPU draw of this node in watts that no counter measures (fans, NICs, PSU
    /// losses); added to the CPU power read from RAPL [default: 0].
    #[arg(long, env = "WATT_NODE_OVERHEAD", value_name = "WATTS")]
    pub node_overhead: Option<f64>,

    /// The Linux powercap tree to read CPU (RAPL) power from [default: /sys/class/powercap].
    #[arg(long, env = "WATT_POWERCAP_ROOT", value_name = "DIR")]
    pub powercap_root: Option<PathBuf>,

    /// Simulated GPUs (indices, comma-separated) that run a process Watt did not start, to try
    /// out how the controller counts and reports them.
    #[arg(long, env = "WATT_SIM_FOREIGN_GPUS", value_name = "LIST", value_delimiter = ',')]
    pub sim_foreign_gpus: Option<Vec<u32>>,

    /// This node's labels, `rack=r12,row=r3`: the controller's power domains (feeds, rows,
    /// racks) select their nodes by them.
    #[arg(long, env = "WATT_LABELS", value_name = "KEY=VALUE[,KEY=VALUE...]")]
    pub labels: Option<String>,

    /// Inside Kubernetes: copy these labels of this node's Node object (`example.com/rack,…`),
    /// read once at start with the pod's service account; --labels given as well win.
    #[arg(long, env = "WATT_LABELS_FROM_NODE", value_name = "KEY[,KEY...]", value_delimiter = ',')]
    pub labels_from_node: Option<Vec<String>>,

    /// Where the pod's service account is mounted, for --labels-from-node.
    #[arg(long, env = "WATT_SERVICE_ACCOUNT_DIR", value_name = "DIR")]
    pub service_account_dir: Option<PathBuf>,

    /// Where shards run: `agent`, in the agent's own namespaces (in a container, its image);
    /// `host`, in the host's PID and mount namespaces (needs root and the host's PID namespace)
    /// [default: agent].
    #[arg(long, env = "WATT_SHARD_EXEC", value_name = "agent|host")]
    pub shard_exec: Option<String>,

    /// With --shard-exec host: the process whose mount namespace shards enter [default: 1, the
    /// host's init]. Another only for nested setups and tests.
    #[arg(long, env = "WATT_HOST_NAMESPACE_PID", value_name = "PID")]
    pub host_namespace_pid: Option<u32>,

    /// The training runtimes this node offers shards, by name (`pytorch-24.10,…`): a job naming
    /// one (`runtime:`) runs only on nodes that offer it [default: none; `host` with
    /// --shard-exec host].
    #[arg(long, env = "WATT_RUNTIMES", value_name = "NAME[,NAME...]", value_delimiter = ',')]
    pub runtimes: Option<Vec<String>>,
}

/// The config file: the same settings as the flags, in snake_case.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub backend: Option<BackendKind>,
    pub nvml_library: Option<String>,
    pub sim_gpus: Option<u32>,
    pub sim_model: Option<SimModelKey>,
    pub sim_seed: Option<u64>,
    pub node_name: Option<String>,
    pub metrics_addr: Option<SocketAddr>,
    pub logs_addr: Option<SocketAddr>,
    #[serde(default, with = "watt_common::duration::option")]
    pub sample_interval: Option<Duration>,
    #[serde(default, with = "watt_common::duration::option")]
    pub detail_interval: Option<Duration>,
    pub dcgm_compat: Option<bool>,
    pub log_format: Option<LogFormat>,
    pub controller: Option<String>,
    pub ca: Option<PathBuf>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub token_file: Option<PathBuf>,
    pub bootstrap_token_file: Option<PathBuf>,
    pub run_as: Option<String>,
    pub allow_root_shards: Option<bool>,
    pub shard_memory_max: Option<String>,
    pub shard_pids_max: Option<String>,
    pub shard_cgroup: Option<PathBuf>,
    pub enforce: Option<EnforceMode>,
    #[serde(default, with = "watt_common::duration::option")]
    pub failsafe_after: Option<Duration>,
    pub failsafe_cap: Option<f64>,
    pub state_dir: Option<PathBuf>,
    #[serde(default, with = "watt_common::duration::option")]
    pub stop_grace: Option<Duration>,
    pub node_overhead: Option<f64>,
    pub powercap_root: Option<PathBuf>,
    pub sim_foreign_gpus: Option<Vec<u32>>,
    pub labels: Option<String>,
    pub labels_from_node: Option<Vec<String>>,
    pub shard_exec: Option<String>,
    pub host_namespace_pid: Option<u32>,
    pub runtimes: Option<Vec<String>>,
    pub service_account_dir: Option<PathBuf>,
}

/// The configuration the agent runs with: every value present and valid.
#[derive(Debug, Clone, PartialEq)]
pub struct AgentConfig {
    pub backend: BackendKind,
    pub nvml_library: String,
    pub sim_gpus: u32,
    pub sim_model: SimModelKey,
    pub sim_seed: u64,
    pub node_name: String,
    pub metrics_addr: SocketAddr,
    pub logs_addr: SocketAddr,
    pub sample_interval: Duration,
    pub detail_interval: Duration,
    pub dcgm_compat: bool,
    pub log_format: LogFormat,
    pub controller: Option<String>,
    /// How the session proves the node's identity, and what it trusts.
    pub credentials: ControllerCredentials,
    /// Who shards run as (`None`: the agent's own user); see `supervisor::identity`.
    pub shard_user: Option<ShardUser>,
    /// Each shard's memory and pids limits, and where their cgroups go (`None`: the agent's own
    /// group); see `supervisor::cgroup`.
    pub shard_memory: MemoryPolicy,
    pub shard_pids: Option<u64>,
    pub shard_cgroup: Option<PathBuf>,
    pub enforce: EnforceMode,
    pub failsafe_after: Duration,
    pub failsafe_cap: Option<f64>,
    pub state_dir: PathBuf,
    pub stop_grace: Duration,
    pub node_overhead_watts: f64,
    pub powercap_root: PathBuf,
    pub sim_foreign_gpus: Vec<u32>,
    pub labels: std::collections::BTreeMap<String, String>,
    /// Label keys to copy from the node's Kubernetes Node object (see [`crate::node_labels`]).
    pub labels_from_node: Vec<String>,
    pub service_account_dir: PathBuf,
    /// Where shards run (see `supervisor::runtime`), and the runtimes this node offers.
    pub shard_exec: ShardExec,
    pub runtimes: Vec<String>,
}

/// The agent's credentials for its controller session, as files.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ControllerCredentials {
    pub ca: Option<PathBuf>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub token_file: Option<PathBuf>,
    pub bootstrap_token_file: Option<PathBuf>,
}

impl ControllerCredentials {
    /// The client credentials, with the token read from its file.
    pub fn load(&self) -> Result<Credentials, ClientError> {
        Ok(Credentials {
            ca: self.ca.clone(),
            cert: self.tls_cert.clone(),
            key: self.tls_key.clone(),
            token: self.token_file.as_deref().map(read_token).transpose()?,
        })
    }
}

/// A configuration problem. `Display` is the one line the operator sees.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(transparent)]
    File(#[from] watt_common::config_file::FileError),
    #[error("invalid --{flag} (config key {key}): {message}")]
    Invalid { flag: &'static str, key: &'static str, message: String },
}

impl ConfigError {
    fn invalid(key: &'static str, message: String) -> Self {
        // Flags are the keys in kebab-case; keep the table implicit by construction.
        let flag = match key {
            "sample_interval" => "sample-interval",
            "detail_interval" => "detail-interval",
            "sim_gpus" => "sim-gpus",
            "node_name" => "node-name",
            "logs_addr" => "logs-addr",
            "shard_memory_max" => "shard-memory-max",
            "shard_pids_max" => "shard-pids-max",
            "nvml_library" => "nvml-library",
            "failsafe_after" => "failsafe-after",
            "failsafe_cap" => "failsafe-cap",
            "state_dir" => "state-dir",
            "stop_grace" => "stop-grace",
            "node_overhead" => "node-overhead",
            "powercap_root" => "powercap-root",
            "sim_foreign_gpus" => "sim-foreign-gpus",
            "tls_cert" => "tls-cert",
            "tls_key" => "tls-key",
            "token_file" => "token-file",
            "bootstrap_token_file" => "bootstrap-token-file",
            "run_as" => "run-as",
            "labels_from_node" => "labels-from-node",
            "shard_exec" => "shard-exec",
            other => other,
        };
        ConfigError::Invalid { flag, key, message }
    }
}

impl Args {
    /// Merge flags (and their environment variables) over the config file over the defaults,
    /// then validate.
    pub fn resolve(&self) -> Result<AgentConfig, ConfigError> {
        let file = match &self.config {
            Some(path) => FileConfig::load(path)?,
            None => FileConfig::default(),
        };
        let mut config = AgentConfig {
            backend: self.backend.or(file.backend).unwrap_or(BackendKind::Nvml),
            nvml_library: self.nvml_library.clone().or(file.nvml_library).unwrap_or_else(|| DEFAULT_LIBRARY.into()),
            sim_gpus: self.sim_gpus.or(file.sim_gpus).unwrap_or(8),
            sim_model: self.sim_model.or(file.sim_model).unwrap_or(SimModelKey::H100),
            sim_seed: self.sim_seed.or(file.sim_seed).unwrap_or(1),
            node_name: match self.node_name.clone().or(file.node_name) {
                Some(name) => name,
                None => sysinfo::System::host_name().unwrap_or_else(|| "localhost".into()),
            },
            metrics_addr: self.metrics_addr.or(file.metrics_addr).unwrap_or(SocketAddr::from(([127, 0, 0, 1], 9400))),
            logs_addr: self.logs_addr.or(file.logs_addr).unwrap_or(SocketAddr::from(([127, 0, 0, 1], 9402))),
            sample_interval: self.sample_interval.or(file.sample_interval).unwrap_or(Duration::from_secs(1)),
            detail_interval: self.detail_interval.or(file.detail_interval).unwrap_or(Duration::from_secs(10)),
            dcgm_compat: self.dcgm_compat || file.dcgm_compat.unwrap_or(false),
            log_format: self.log_format.or(file.log_format).unwrap_or(LogFormat::Text),
            controller: self.controller.clone().or(file.controller),
            credentials: ControllerCredentials {
                ca: self.ca.clone().or(file.ca),
                tls_cert: self.tls_cert.clone().or(file.tls_cert),
                tls_key: self.tls_key.clone().or(file.tls_key),
                token_file: self.token_file.clone().or(file.token_file),
                bootstrap_token_file: self.bootstrap_token_file.clone().or(file.bootstrap_token_file),
            },
            shard_user: identity::resolve(
                self.run_as.as_deref().or(file.run_as.as_deref()),
                self.allow_root_shards || file.allow_root_shards.unwrap_or(false),
            )
            .map_err(|e| ConfigError::invalid("run_as", e.to_string()))?,
            shard_memory: MemoryPolicy::parse(
                self.shard_memory_max.as_deref().or(file.shard_memory_max.as_deref()).unwrap_or("auto"),
            )
            .map_err(|e| ConfigError::invalid("shard_memory_max", e))?,
            shard_pids: match self.shard_pids_max.as_deref().or(file.shard_pids_max.as_deref()) {
                None => Some(DEFAULT_PIDS),
                Some("none") => None,
                Some(n) => Some(n.trim().parse::<u64>().ok().filter(|&n| n >= 16).ok_or_else(|| {
                    ConfigError::invalid(
                        "shard_pids_max",
                        format!("must be a number of at least 16, or none; got {n:?}"),
                    )
                })?),
            },
            shard_cgroup: self.shard_cgroup.clone().or(file.shard_cgroup),
            enforce: self.enforce.or(file.enforce).unwrap_or(EnforceMode::On),
            failsafe_after: self.failsafe_after.or(file.failsafe_after).unwrap_or(Duration::from_secs(10)),
            failsafe_cap: self.failsafe_cap.or(file.failsafe_cap),
            state_dir: self
                .state_dir
                .clone()
                .or(file.state_dir)
                .unwrap_or_else(|| PathBuf::from("/var/lib/watt-agent")),
            stop_grace: self.stop_grace.or(file.stop_grace).unwrap_or(Duration::from_secs(30)),
            node_overhead_watts: self.node_overhead.or(file.node_overhead).unwrap_or(0.0),
            powercap_root: self
                .powercap_root
                .clone()
                .or(file.powercap_root)
                .unwrap_or_else(|| PathBuf::from("/sys/class/powercap")),
            sim_foreign_gpus: self.sim_foreign_gpus.clone().or(file.sim_foreign_gpus).unwrap_or_default(),
            labels: parse_labels(self.labels.as_deref().or(file.labels.as_deref()).unwrap_or(""))
                .map_err(|e| ConfigError::invalid("labels", e))?,
            labels_from_node: self
                .labels_from_node
                .clone()
                .or(file.labels_from_node)
                .unwrap_or_default()
                .into_iter()
                .map(|k| k.trim().to_string())
                .filter(|k| !k.is_empty())
                .map(|k| {
                    watt_common::names::check_label(&k, "x")
                        .map(|()| k)
                        .map_err(|e| ConfigError::invalid("labels_from_node", e))
                })
                .collect::<Result<Vec<String>, ConfigError>>()?,
            service_account_dir: self
                .service_account_dir
                .clone()
                .or(file.service_account_dir)
                .unwrap_or_else(|| PathBuf::from(crate::node_labels::SERVICE_ACCOUNT_DIR)),
            shard_exec: match self.shard_exec.as_deref().or(file.shard_exec.as_deref()) {
                None | Some("agent") => ShardExec::Agent,
                Some("host") => {
                    ShardExec::Host { pid: self.host_namespace_pid.or(file.host_namespace_pid).unwrap_or(1) }
                }
                Some(other) => {
                    return Err(ConfigError::invalid("shard_exec", format!("must be agent or host; got {other:?}")))
                }
            },
            runtimes: Vec::new(),
        };
        // An image built with no RUNTIME sets WATT_RUNTIMES empty: the default then.
        let given: Vec<String> = self.runtimes.clone().or(file.runtimes).unwrap_or_default();
        let mut runtimes: Vec<String> = given.iter().map(|r| r.trim().to_string()).filter(|r| !r.is_empty()).collect();
        if runtimes.is_empty() && matches!(config.shard_exec, ShardExec::Host { .. }) {
            runtimes.push("host".into());
        }
        for runtime in &runtimes {
            watt_common::names::check_runtime(runtime).map_err(|e| ConfigError::invalid("runtimes", e))?;
            if !config.runtimes.iter().any(|r| r == runtime) {
                config.runtimes.push(runtime.to_string());
            }
        }
        config.validate()?;
        Ok(config)
    }
}

/// `rack=r12,row=r3` (spaces around each pair allowed; empty: none), each pair by Kubernetes'
/// rules for labels.
pub fn parse_labels(text: &str) -> Result<std::collections::BTreeMap<String, String>, String> {
    let mut labels = std::collections::BTreeMap::new();
    for pair in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').ok_or_else(|| format!("{pair:?} is not KEY=VALUE"))?;
        let (key, value) = (key.trim(), value.trim());
        watt_common::names::check_label(key, value)?;
        if labels.insert(key.to_string(), value.to_string()).is_some() {
            return Err(format!("label {key} is given twice"));
        }
    }
    Ok(labels)
}

impl FileConfig {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        Ok(watt_common::config_file::load(path)?)
    }
}

impl AgentConfig {
    /// This node's certificate and key, when it has one: given (`--tls-cert`), or got from the
    /// controller into the state directory (`--bootstrap-token-file`; present once it bootstrapped).
    pub fn node_cert_files(&self) -> Option<NodeCertFiles> {
        let c = &self.credentials;
        match (&c.tls_cert, &c.tls_key, &c.bootstrap_token_file) {
            (Some(cert), Some(key), _) => Some(NodeCertFiles { cert: cert.clone(), key: key.clone() }),
            (_, _, Some(_)) => Some(NodeCertFiles::in_dir(&self.state_dir.join("pki"))),
            _ => None,
        }
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.sample_interval < MIN_SAMPLE_INTERVAL || self.sample_interval > MAX_SAMPLE_INTERVAL {
            return Err(ConfigError::invalid(
                "sample_interval",
                format!(
                    "must be between {} (the driver's update period) and {}; got {}",
                    show(MIN_SAMPLE_INTERVAL),
                    show(MAX_SAMPLE_INTERVAL),
                    show(self.sample_interval)
                ),
            ));
        }
        if self.detail_interval < self.sample_interval || self.detail_interval > MAX_SAMPLE_INTERVAL {
            return Err(ConfigError::invalid(
                "detail_interval",
                format!(
                    "must be at least the sample interval ({}) and at most {}; got {}",
                    show(self.sample_interval),
                    show(MAX_SAMPLE_INTERVAL),
                    show(self.detail_interval)
                ),
            ));
        }
        if self.sim_gpus == 0 || self.sim_gpus > MAX_SIM_GPUS {
            return Err(ConfigError::invalid(
                "sim_gpus",
                format!("must be between 1 and {MAX_SIM_GPUS}; got {}", self.sim_gpus),
            ));
        }
        if self.node_name.trim().is_empty() || self.node_name.len() > 253 {
            return Err(ConfigError::invalid(
                "node_name",
                format!("must be 1 to 253 characters and not blank; got {:?}", self.node_name),
            ));
        }
        if let Some(spec) = &self.controller {
            let urls = watt_common::client::controller_urls(spec);
            let is_url = |url: &String| {
                (url.starts_with("http://") || url.starts_with("https://")) && url.len() > "http://".len()
            };
            if urls.is_empty() || !urls.iter().all(is_url) {
                return Err(ConfigError::invalid(
                    "controller",
                    format!("must be an http:// or https:// URL, or several separated by commas; got {spec:?}"),
                ));
            }
            if !urls.iter().all(|url| url.starts_with("https://")) && !urls.iter().all(|url| url.starts_with("http://"))
            {
                return Err(ConfigError::invalid("controller", format!("mixes http:// and https:// URLs: {spec:?}")));
            }
        }
        if let Some(url) =
            self.controller.as_ref().and_then(|spec| watt_common::client::controller_urls(spec).into_iter().next())
        {
            let url = &url;
            let files = &self.credentials;
            // The token file is read when the session starts; here only its presence counts.
            let shape = Credentials {
                ca: files.ca.clone(),
                cert: files.tls_cert.clone(),
                key: files.tls_key.clone(),
                token: files.token_file.as_ref().map(|_| "present".to_string()),
            };
            if let Err(ClientError::Invalid { setting, message }) = shape.check(url) {
                let key = match setting {
                    "cert" => "tls_cert",
                    "key" => "tls_key",
                    "token" => "token_file",
                    _ => "ca",
                };
                return Err(ConfigError::invalid(key, message));
            }
            if files.tls_cert.is_none() && files.token_file.is_none() && files.bootstrap_token_file.is_none() {
                return Err(ConfigError::invalid(
                    "tls_cert",
                    "or --token-file or --bootstrap-token-file is required with --controller: the controller admits only nodes with credentials"
                        .into(),
                ));
            }
            if files.bootstrap_token_file.is_some() && files.ca.is_none() {
                return Err(ConfigError::invalid(
                    "bootstrap_token_file",
                    "needs an https:// controller and --ca: the node's key and certificate travel only over TLS".into(),
                ));
            }
        }
        if !self.logs_addr.ip().is_loopback() && self.node_cert_files().is_none() {
            return Err(ConfigError::invalid(
                "logs_addr",
                format!(
                    "{} is off loopback: shards' logs are served there only over HTTPS, with this node's certificate (--tls-cert and --tls-key, or --bootstrap-token-file)",
                    self.logs_addr
                ),
            ));
        }
        if self.failsafe_after < Duration::from_secs(1) || self.failsafe_after > MAX_SAMPLE_INTERVAL {
            return Err(ConfigError::invalid(
                "failsafe_after",
                format!("must be between 1s and {}; got {}", show(MAX_SAMPLE_INTERVAL), show(self.failsafe_after)),
            ));
        }
        if let Some(cap) = self.failsafe_cap {
            if !(cap.is_finite() && cap > 0.0) {
                return Err(ConfigError::invalid(
                    "failsafe_cap",
                    format!("must be a positive number of watts; got {cap}"),
                ));
            }
        }
        if self.stop_grace > Duration::from_secs(3600) {
            return Err(ConfigError::invalid(
                "stop_grace",
                format!("must be at most 1h; got {}", show(self.stop_grace)),
            ));
        }
        if self.state_dir.as_os_str().is_empty() {
            return Err(ConfigError::invalid("state_dir", "must not be empty".into()));
        }
        if self.nvml_library.is_empty() {
            return Err(ConfigError::invalid("nvml_library", "must not be empty".into()));
        }
        if !(self.node_overhead_watts.is_finite() && (0.0..=100_000.0).contains(&self.node_overhead_watts)) {
            return Err(ConfigError::invalid(
                "node_overhead",
                format!("must be between 0 and 100000 watts; got {}", self.node_overhead_watts),
            ));
        }
        if let Some(&gpu) = self.sim_foreign_gpus.iter().find(|&&g| g >= self.sim_gpus) {
            return Err(ConfigError::invalid(
                "sim_foreign_gpus",
                format!("names GPU {gpu}, but there are {} simulated GPUs (0 to {})", self.sim_gpus, self.sim_gpus - 1),
            ));
        }
        Ok(())
    }

    /// How many samples go by between two `Full` reads.
    pub fn full_sample_every(&self) -> u64 {
        (self.detail_interval.as_nanos() / self.sample_interval.as_nanos()).max(1) as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(argv: &[&str]) -> Args {
        Args::try_parse_from(std::iter::once("watt-agent").chain(argv.iter().copied())).unwrap()
    }

    #[test]
    fn defaults_are_the_documented_ones() {
        let c = args(&["--node-name", "n1"]).resolve().unwrap();
        assert_eq!(c.backend, BackendKind::Nvml);
        assert_eq!(c.metrics_addr, SocketAddr::from(([127, 0, 0, 1], 9400)), "plain text on loopback unless asked");
        assert_eq!(c.sample_interval, Duration::from_secs(1));
        assert_eq!(c.full_sample_every(), 10);
        assert!(!c.dcgm_compat);
    }

    #[test]
    fn flags_override_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.toml");
        std::fs::write(&path, "backend = \"sim\"\nsim_gpus = 4\nsample_interval = \"500ms\"\ndcgm_compat = true\n")
            .unwrap();
        let c = args(&["--config", path.to_str().unwrap(), "--sim-gpus", "2"]).resolve().unwrap();
        assert_eq!((c.backend, c.sim_gpus, c.sample_interval), (BackendKind::Sim, 2, Duration::from_millis(500)));
        assert!(c.dcgm_compat);
    }

    #[test]
    fn errors_name_the_flag_and_the_key() {
        let err = args(&["--sample-interval", "1ms"]).resolve().unwrap_err().to_string();
        assert!(err.contains("--sample-interval") && err.contains("sample_interval") && err.contains("1ms"), "{err}");
        let err = args(&["--sim-gpus", "0"]).resolve().unwrap_err().to_string();
        assert!(err.contains("--sim-gpus") && err.contains("got 0"), "{err}");
        let err = args(&["--sample-interval", "2s", "--detail-interval", "1s"]).resolve().unwrap_err().to_string();
        assert!(err.contains("--detail-interval"), "{err}");
        let err = args(&["--node-overhead=-5"]).resolve().unwrap_err().to_string();
        assert!(err.contains("--node-overhead") && err.contains("node_overhead") && err.contains("-5"), "{err}");
        let err = args(&["--sim-gpus", "4", "--sim-foreign-gpus", "1,4"]).resolve().unwrap_err().to_string();
        assert!(err.contains("--sim-foreign-gpus") && err.contains("GPU 4"), "{err}");
        let ok = args(&["--sim-gpus", "4", "--sim-foreign-gpus", "1,3", "--node-overhead", "250"]).resolve().unwrap();
        assert_eq!((ok.sim_foreign_gpus, ok.node_overhead_watts), (vec![1, 3], 250.0));
        for bad in ["rack", "rack=r1,rack=r2", "rack=a b", "=x"] {
            let err = args(&["--labels", bad]).resolve().unwrap_err().to_string();
            assert!(err.starts_with("invalid --labels (config key labels)"), "{bad}: {err}");
        }
        let ok = args(&["--labels", "rack=r12, row=r3,topology.kubernetes.io/zone=z1"]).resolve().unwrap();
        let pairs: Vec<(&str, &str)> = ok.labels.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        assert_eq!(pairs, [("rack", "r12"), ("row", "r3"), ("topology.kubernetes.io/zone", "z1")]);
    }

    #[test]
    fn unknown_file_keys_are_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.toml");
        std::fs::write(&path, "sim_gpu = 4\n").unwrap();
        let err = args(&["--config", path.to_str().unwrap()]).resolve().unwrap_err().to_string();
        assert!(err.contains("sim_gpu") && err.contains("unknown field"), "{err}");
        assert!(!err.contains('\n'), "one line: {err}");
    }
}
