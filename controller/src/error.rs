//! The controller library's one error type, and what each kind means for the process.

use crate::store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum ControllerError {
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("cannot listen on {addr}: {source}")]
    Listen { addr: std::net::SocketAddr, source: std::io::Error },
    #[error("{context}: {source}")]
    Io { context: &'static str, source: std::io::Error },
    #[error("cannot set up metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    #[error("gRPC server failed: {0}")]
    Serve(String),
    #[error("cannot read {what} {path}: {source}")]
    Credentials { what: &'static str, path: String, source: std::io::Error },
    #[error("TLS cannot be set up: {0}")]
    Tls(String),
    #[error(transparent)]
    Tokens(#[from] crate::auth::tokens::TokenFileError),
}

impl ControllerError {
    /// 2 when the operator must change how the controller is started, 1 otherwise.
    pub fn exit_code(&self) -> u8 {
        match self {
            ControllerError::Config(_)
            | ControllerError::Store(StoreError::BadAddress(_))
            | ControllerError::Credentials { .. }
            | ControllerError::Tls(_)
            | ControllerError::Tokens(_) => 2,
            ControllerError::Store(_)
            | ControllerError::Listen { .. }
            | ControllerError::Io { .. }
            | ControllerError::Metrics(_)
            | ControllerError::Serve(_) => 1,
        }
    }
}
