//! `etcd://HOST:PORT[,HOST:PORT...]`: the store on an etcd cluster, for controllers that must
//! survive the loss of a machine. Keys live under `/watt/v1/`; every commit is one etcd
//! transaction whose compares carry the writes' expectations; watches resume from the last
//! revision they delivered after etcd (or the connection to it) restarts.

use std::time::Duration;

use etcd_client::{Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, Txn, TxnOp, WatchOptions};
use futures::StreamExt;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use super::{Entry, Expect, Store, StoreError, Version, WatchEvent, WatchStream, Write};

/// Keys a list reads per request: a page of job records, each up to a few KiB, stays well under
/// gRPC's 4 MiB.
const LIST_PAGE: i64 = 200;

/// The end of the key range that `prefix` starts: the prefix with its last byte below 0xff
/// raised by one (etcd's own rule; all 0xff: to the end of the keyspace).
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.last_mut() {
        if *last < 0xff {
            *last += 1;
            return end;
        }
        end.pop();
    }
    vec![0]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_prefix_ends_where_etcd_says() {
        assert_eq!(prefix_end(b"/watt/v1/caps/"), b"/watt/v1/caps0".to_vec());
        assert_eq!(prefix_end(b"a\xff"), b"b".to_vec());
        assert_eq!(prefix_end(b"\xff\xff"), vec![0]);
    }
}

/// Every key Watt writes lives under this prefix.
pub const KEY_PREFIX: &str = "/watt/v1/";

#[derive(Clone)]
pub struct EtcdStore {
    client: Client,
    /// How the client was connected, to connect another on another runtime (see [`Self::reconnect`]).
    endpoints: Vec<String>,
    options: ConnectOptions,
    prefix: String,
    /// Leadership every commit must still hold (invariant 9): see [`EtcdStore::fenced`].
    fence: Option<Fence>,
}

/// A leader's election key and the revision that created it: while the key exists with that
/// creation revision, the leadership it stands for is held. A lease that expired deleted the key,
/// and a later leader's key has a later revision, so a deposed leader's compare fails.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fence {
    /// The key's full name in etcd (not under the store's prefix).
    pub key: String,
    pub create_revision: i64,
}

impl std::fmt::Debug for EtcdStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdStore").field("prefix", &self.prefix).finish_non_exhaustive()
    }
}

fn unavailable(e: etcd_client::Error) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

/// Whether a call failed before it reached etcd: the connection to a member was refused (the
/// member is down or restarting). The client spreads calls over every endpoint and sends one to
/// a member that is down without trying another; such a call is safe to send again.
pub(crate) fn never_sent(e: &etcd_client::Error) -> bool {
    // The client's error names no source: start from the gRPC or transport error inside.
    let mut source: Option<&(dyn std::error::Error + 'static)> = match e {
        etcd_client::Error::GRpcStatus(status) => Some(status),
        etcd_client::Error::TransportError(transport) => Some(transport),
        _ => None,
    };
    while let Some(s) = source {
        if s.downcast_ref::<std::io::Error>().is_some_and(|io| io.kind() == std::io::ErrorKind::ConnectionRefused) {
            return true;
        }
        source = s.source();
    }
    false
}

impl EtcdStore {
    /// Connect to `endpoints` (`http://host:port`) and check that etcd answers.
    pub async fn connect(endpoints: Vec<String>, prefix: &str) -> Result<Self, StoreError> {
        Self::connect_with(endpoints, prefix, None).await
    }

    /// The same over TLS (`https://` endpoints), trusting `tls`'s CA and presenting its client
    /// certificate, as an etcd started with `--client-cert-auth` requires.
    pub async fn connect_with(
        endpoints: Vec<String>,
        prefix: &str,
        tls: Option<etcd_client::TlsOptions>,
    ) -> Result<Self, StoreError> {
        let mut options = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(3))
            .with_timeout(Duration::from_secs(5))
            .with_keep_alive(Duration::from_secs(5), Duration::from_secs(3));
        if let Some(tls) = tls {
            options = options.with_tls(tls);
        }
        let client = Client::connect(&endpoints, Some(options.clone())).await.map_err(unavailable)?;
        let store = EtcdStore { client, endpoints, options, prefix: prefix.to_string(), fence: None };
        store.call(|mut client| async move { client.status().await }).await.map_err(unavailable)?;
        Ok(store)
    }

    /// `call` with a client, sent again (up to twice per endpoint) while it fails before
    /// reaching etcd (see [`never_sent`]): one member down must not fail a call another can take.
    pub(crate) async fn call<T, F, Fut>(&self, mut call: F) -> Result<T, etcd_client::Error>
    where
        F: FnMut(Client) -> Fut,
        Fut: std::future::Future<Output = Result<T, etcd_client::Error>>,
    {
        let attempts = self.endpoints.len() * 2;
        let mut tried = 1;
        loop {
            match call(self.client.clone()).await {
                Err(e) if tried < attempts && never_sent(&e) => tried += 1,
                answer => return answer,
            }
        }
    }

    /// A new client to the same etcd, on the runtime this is called from: a task that must not
    /// wait behind the controller's own work (the leadership's keep-alive) runs on a runtime of
    /// its own, and a client's connection lives on the runtime that made it.
    pub async fn reconnect(&self) -> Result<Client, StoreError> {
        Client::connect(&self.endpoints, Some(self.options.clone())).await.map_err(unavailable)
    }

    /// The same store whose every commit also requires `fence` to hold, in the same transaction:
    /// a leader's writes fail with [`StoreError::Deposed`] once another may lead.
    pub fn fenced(&self, fence: Fence) -> EtcdStore {
        EtcdStore { fence: Some(fence), ..self.clone() }
    }

    /// The etcd client, for the election that shares this connection.
    pub fn client(&self) -> Client {
        self.client.clone()
    }

    /// Whether the fence (if any) still holds, read after a refused transaction.
    async fn fence_holds(&self) -> Result<bool, StoreError> {
        let Some(fence) = &self.fence else { return Ok(true) };
        let key = fence.key.as_str();
        let response = self.call(|mut client| async move { client.get(key, None).await }).await.map_err(unavailable)?;
        Ok(response.kvs().first().is_some_and(|kv| kv.create_revision() == fence.create_revision))
    }

    /// Every key under `prefix`, in key order, and the revision they were all read at.
    pub(crate) async fn list_with_revision(&self, prefix: &str) -> Result<(Vec<Entry>, i64), StoreError> {
        let full = self.full(prefix).into_bytes();
        let end = prefix_end(&full);
        let (mut from, mut revision, mut out) = (full, 0, Vec::new());
        loop {
            let mut options = GetOptions::new().with_range(end.clone()).with_limit(LIST_PAGE);
            if revision > 0 {
                options = options.with_revision(revision);
            }
            let response = self
                .call(|mut client| {
                    let (from, options) = (from.clone(), options.clone());
                    async move { client.get(from, Some(options)).await }
                })
                .await
                .map_err(unavailable)?;
            if revision == 0 {
                revision = response.header().map(|h| h.revision()).unwrap_or(0);
            }
            for kv in response.kvs() {
                out.push(self.entry(kv)?);
            }
            match response.kvs().last() {
                Some(last) if response.more() => {
                    from = last.key().to_vec();
                    from.push(0);
                }
                _ => return Ok((out, revision)),
            }
        }
    }

    pub(crate) fn full(&self, key: &str) -> String {
        format!("{}{key}", self.prefix)
    }

    pub(crate) fn entry(&self, kv: &etcd_client::KeyValue) -> Result<Entry, StoreError> {
        let key = kv.key_str().map_err(|e| StoreError::Corrupt(e.to_string()))?;
        Ok(Entry {
            key: key.strip_prefix(&self.prefix).unwrap_or(key).to_string(),
            value: kv.value().to_vec(),
            version: kv.mod_revision() as Version,
        })
    }

    async fn current_revision(&self) -> Result<i64, StoreError> {
        let key = self.full("");
        let response = self
            .call(|mut client| {
                let key = key.clone();
                async move { client.get(key, Some(GetOptions::new().with_count_only())).await }
            })
            .await
            .map_err(unavailable)?;
        Ok(response.header().map(|h| h.revision()).unwrap_or(0))
    }
}

#[async_trait::async_trait]
impl Store for EtcdStore {
    async fn get(&self, key: &str) -> Result<Option<Entry>, StoreError> {
        let key = self.full(key);
        let response = self
            .call(|mut client| {
                let key = key.clone();
                async move { client.get(key, None).await }
            })
            .await
            .map_err(unavailable)?;
        response.kvs().first().map(|kv| self.entry(kv)).transpose()
    }

    /// In pages of [`LIST_PAGE`] keys, all read at the first page's revision: a gRPC answer is
    /// at most 4 MiB, and 25,000 nodes' records are more.
    async fn list(&self, prefix: &str) -> Result<Vec<Entry>, StoreError> {
        Ok(self.list_with_revision(prefix).await?.0)
    }

    async fn commit(&self, writes: Vec<Write>) -> Result<Version, StoreError> {
        let mut compares = Vec::new();
        let mut ops = Vec::with_capacity(writes.len());
        for w in &writes {
            let key = self.full(&w.key);
            match w.expect {
                Expect::Any => {}
                // etcd's per-key "version" counts writes since creation: 0 means absent.
                Expect::Absent => compares.push(Compare::version(key.clone(), CompareOp::Equal, 0)),
                Expect::Version(v) => compares.push(Compare::mod_revision(key.clone(), CompareOp::Equal, v as i64)),
            }
            ops.push(match &w.value {
                Some(value) => TxnOp::put(key, value.clone(), None),
                None => TxnOp::delete(key, None),
            });
        }
        if let Some(fence) = &self.fence {
            compares.push(Compare::create_revision(fence.key.as_str(), CompareOp::Equal, fence.create_revision));
        }
        let txn = Txn::new().when(compares).and_then(ops);
        let response = self
            .call(|mut client| {
                let txn = txn.clone();
                async move { client.txn(txn).await }
            })
            .await
            .map_err(unavailable)?;
        if response.succeeded() {
            return Ok(response.header().map(|h| h.revision()).unwrap_or(0) as Version);
        }
        if !self.fence_holds().await? {
            let key = self.fence.as_ref().map(|f| f.key.clone()).unwrap_or_default();
            return Err(StoreError::Deposed { fence: key });
        }
        // Name the first key whose expectation failed.
        for w in &writes {
            let version = self.get(&w.key).await?.map(|e| e.version).unwrap_or(0);
            let holds = match w.expect {
                Expect::Any => true,
                Expect::Absent => version == 0,
                Expect::Version(v) => version == v,
            };
            if !holds {
                return Err(StoreError::Conflict { key: w.key.clone() });
            }
        }
        Err(StoreError::Conflict { key: writes.first().map(|w| w.key.clone()).unwrap_or_default() })
    }

    async fn watch(&self, prefix: &str) -> Result<WatchStream, StoreError> {
        let start = self.current_revision().await? + 1;
        let (tx, rx) = mpsc::channel(1024);
        tokio::spawn(pump_watch(self.clone(), self.full(prefix), start, tx));
        Ok(ReceiverStream::new(rx).boxed())
    }
}

/// Forward etcd watch events to `tx`, reconnecting from the next undelivered revision whenever
/// the stream breaks (etcd restarted, connection lost), until the receiver goes away.
async fn pump_watch(store: EtcdStore, key: String, mut next: i64, tx: mpsc::Sender<Result<WatchEvent, StoreError>>) {
    let mut backoff = Duration::from_millis(100);
    loop {
        let mut client = store.client.clone();
        let options = WatchOptions::new().with_prefix().with_start_revision(next);
        match client.watch(key.clone(), Some(options)).await {
            Ok(mut stream) => loop {
                let message = tokio::select! {
                    m = stream.message() => m,
                    () = tx.closed() => return,
                };
                match message {
                    Ok(Some(response)) => {
                        backoff = Duration::from_millis(100);
                        if response.canceled() {
                            if response.compact_revision() > 0 {
                                let lost = format!("etcd compacted past revision {next}");
                                let _ = tx.send(Err(StoreError::WatchLost(lost))).await;
                                return;
                            }
                            break;
                        }
                        for event in response.events() {
                            let Some(kv) = event.kv() else { continue };
                            let Ok(entry) = store.entry(kv) else { continue };
                            next = kv.mod_revision() + 1;
                            let item = match event.event_type() {
                                EventType::Put => WatchEvent::Put(entry),
                                EventType::Delete => WatchEvent::Delete { key: entry.key, version: entry.version },
                            };
                            if tx.send(Ok(item)).await.is_err() {
                                return;
                            }
                        }
                    }
                    Ok(None) => break,
                    Err(e) => {
                        tracing::warn!(error = %e, "etcd watch broke; resuming.");
                        break;
                    }
                }
            },
            Err(e) => tracing::debug!(error = %e, "etcd watch could not start; retrying."),
        }
        tokio::select! {
            () = tokio::time::sleep(backoff) => {}
            () = tx.closed() => return,
        }
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}
