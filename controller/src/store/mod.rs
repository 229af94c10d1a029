//! The `Store` trait: durable keys and values with compare-and-swap, and watches.
//!
//! Jobs (with their last run), power sources, the site settings and the cap-epoch mark live here,
//! so a controller restart loses none of them.
//! Two implementations pass the same [`conformance`] suite: [`file::FileStore`], a single-file
//! embedded database (redb) for one controller, and [`etcd::EtcdStore`] for a replicated one.
//!
//! Every write is a [`Write`] with an expectation about the key's current version, and a
//! commit applies all of its writes or none: state changes are compare-and-swap, so two writers
//! can never silently overwrite each other.

pub mod conformance;

/// `value` as the JSON stored under `key`; an encoding failure is an error, never an empty value.
pub fn encode_json<T: serde::Serialize>(key: &str, value: &T) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(value).map_err(|e| StoreError::Encode { key: key.to_owned(), message: e.to_string() })
}

/// The JSON stored under `key`, read back; what does not read is corrupt, naming the key.
pub fn decode_json<T: serde::de::DeserializeOwned>(key: &str, bytes: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::Corrupt(format!("{key}: {e}")))
}
pub mod etcd;
pub mod file;
pub mod observed;
pub mod replica;

use std::fmt;
use std::sync::Arc;

use futures::stream::BoxStream;

/// A key's version: the store revision at which it was last written. 0 means absent.
pub type Version = u64;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub key: String,
    pub value: Vec<u8>,
    pub version: Version,
}

/// What a write expects of the key's current state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    /// Whatever is there.
    Any,
    /// The key does not exist.
    Absent,
    /// The key exists at exactly this version.
    Version(Version),
}

/// One write of a commit: put `value`, or delete the key when `value` is `None`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Write {
    pub key: String,
    pub expect: Expect,
    pub value: Option<Vec<u8>>,
}

impl Write {
    pub fn put(key: impl Into<String>, expect: Expect, value: Vec<u8>) -> Self {
        Write { key: key.into(), expect, value: Some(value) }
    }

    pub fn delete(key: impl Into<String>, expect: Expect) -> Self {
        Write { key: key.into(), expect, value: None }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WatchEvent {
    Put(Entry),
    Delete { key: String, version: Version },
}

impl WatchEvent {
    pub fn key(&self) -> &str {
        match self {
            WatchEvent::Put(e) => &e.key,
            WatchEvent::Delete { key, .. } => key,
        }
    }
}

pub type WatchStream = BoxStream<'static, Result<WatchEvent, StoreError>>;

#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// A write's expectation did not hold; nothing was written.
    #[error("conflict on {key}: it changed since it was read")]
    Conflict { key: String },
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// A watch fell too far behind to say what it missed; re-list, then watch again.
    #[error("watch fell behind: {0}")]
    WatchLost(String),
    #[error("store data is corrupt: {0}")]
    Corrupt(String),
    /// A record could not be encoded: nothing was written.
    #[error("cannot encode {key}: {message}")]
    Encode { key: String, message: String },
    /// This controller's leadership no longer holds: another may lead, and nothing was written.
    #[error("not the leader any more: the election key {fence} is gone or belongs to a newer leader")]
    Deposed { fence: String },
    #[error("bad store address {0:?}: use file:PATH or etcd://HOST:PORT[,HOST:PORT...]")]
    BadAddress(String),
}

impl StoreError {
    /// Exhaustive on purpose: a new variant must decide.
    pub fn is_retryable(&self) -> bool {
        match self {
            StoreError::Conflict { .. } | StoreError::Unavailable(_) | StoreError::WatchLost(_) => true,
            StoreError::Corrupt(_)
            | StoreError::BadAddress(_)
            | StoreError::Encode { .. }
            | StoreError::Deposed { .. } => false,
        }
    }
}

/// Durable keys and values.
#[async_trait::async_trait]
pub trait Store: Send + Sync + fmt::Debug {
    async fn get(&self, key: &str) -> Result<Option<Entry>, StoreError>;

    /// Every key under `prefix`, in key order.
    async fn list(&self, prefix: &str) -> Result<Vec<Entry>, StoreError>;

    /// Apply every write or none. Returns the revision of the commit; each written key's version
    /// becomes that revision.
    async fn commit(&self, writes: Vec<Write>) -> Result<Version, StoreError>;

    /// Changes under `prefix` from now on, in commit order.
    async fn watch(&self, prefix: &str) -> Result<WatchStream, StoreError>;
}

/// Open the store an address names: `file:PATH` or `etcd://HOST:PORT[,HOST:PORT...]`.
pub async fn open(address: &str) -> Result<Arc<dyn Store>, StoreError> {
    open_with(address, None).await
}

/// TLS to etcd: the CA that signed its certificate, and the controller's client certificate and
/// key (PEM), for an etcd started with `--client-cert-auth`.
#[derive(Debug, Clone)]
pub struct EtcdTls {
    pub ca_pem: String,
    pub client: Option<(String, String)>,
}

/// A store as opened, before it is shared: the election needs to know which kind it is.
#[derive(Debug, Clone)]
pub enum Opened {
    File(Arc<dyn Store>),
    Etcd(Box<etcd::EtcdStore>),
}

impl Opened {
    pub fn store(&self) -> Arc<dyn Store> {
        match self {
            Opened::File(store) => store.clone(),
            Opened::Etcd(store) => Arc::new(store.as_ref().clone()),
        }
    }
}

/// [`open`], with TLS to etcd when `etcd_tls` is given (`https://` endpoints).
pub async fn open_with(address: &str, etcd_tls: Option<EtcdTls>) -> Result<Arc<dyn Store>, StoreError> {
    Ok(open_kind(address, etcd_tls).await?.store())
}

/// [`open_with`], saying which kind of store it is.
pub async fn open_kind(address: &str, etcd_tls: Option<EtcdTls>) -> Result<Opened, StoreError> {
    if let Some(path) = address.strip_prefix("file:") {
        if path.is_empty() {
            return Err(StoreError::BadAddress(address.into()));
        }
        let path = path.to_string();
        let store = tokio::task::spawn_blocking(move || file::FileStore::open(path))
            .await
            .map_err(|e| StoreError::Unavailable(e.to_string()))??;
        Ok(Opened::File(Arc::new(store)))
    } else if let Some(hosts) = address.strip_prefix("etcd://") {
        let scheme = if etcd_tls.is_some() { "https" } else { "http" };
        let endpoints: Vec<String> =
            hosts.split(',').filter(|h| !h.is_empty()).map(|h| format!("{scheme}://{h}")).collect();
        if endpoints.is_empty() || hosts.contains('/') {
            return Err(StoreError::BadAddress(address.into()));
        }
        let tls = etcd_tls.map(|t| {
            let options = etcd_client::TlsOptions::new().ca_certificate(etcd_client::Certificate::from_pem(t.ca_pem));
            match t.client {
                Some((cert, key)) => options.identity(etcd_client::Identity::from_pem(cert, key)),
                None => options,
            }
        });
        Ok(Opened::Etcd(Box::new(etcd::EtcdStore::connect_with(endpoints, etcd::KEY_PREFIX, tls).await?)))
    } else {
        Err(StoreError::BadAddress(address.into()))
    }
}
