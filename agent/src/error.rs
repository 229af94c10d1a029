//! The agent library's one error type, and what each kind means for the process.

use crate::config::ConfigError;
use crate::gpu::GpuError;

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Gpu(#[from] GpuError),
    #[error("cannot listen on {addr}: {source}")]
    Listen { addr: std::net::SocketAddr, source: std::io::Error },
    #[error("{context}: {source}")]
    Io { context: &'static str, source: std::io::Error },
    #[error("cannot set up metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    #[error(transparent)]
    Failsafe(#[from] crate::enforcer::FailsafeCapError),
    /// `--labels-from-node`: the node's labels could not be read.
    #[error("cannot read this node's labels from Kubernetes (--labels-from-node): {0}")]
    NodeLabels(String),
    /// `--shard-exec host` where the host's namespaces cannot be reached.
    #[error("{0}")]
    HostExec(String),
}

impl AgentError {
    /// The process exit code: 2 when the operator must change how the agent is started (a bad
    /// flag or file, no NVIDIA driver for `--backend nvml`), 1 for anything else.
    pub fn exit_code(&self) -> u8 {
        match self {
            AgentError::Config(_) | AgentError::Failsafe(_) | AgentError::HostExec(_) => 2,
            AgentError::Gpu(GpuError::LibraryMissing { .. }) => 2,
            AgentError::Gpu(_)
            | AgentError::Listen { .. }
            | AgentError::Io { .. }
            | AgentError::Metrics(_)
            | AgentError::NodeLabels(_) => 1,
        }
    }
}
