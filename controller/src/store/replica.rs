//! A follower's warm copy of the store (etcd only): every key under Watt's prefix, listed once
//! and kept current by a watch, so a follower that wins the election loads from memory instead
//! of reading etcd. The watch covers the election key too ([`WATCHED`]), and one watch delivers
//! its events in revision order, so the copy knows the revision through which it is complete:
//! that of the list, then of the last event delivered. A new leader whose term began at
//! revision R (its election key's creation) loads from the copy once the copy has seen that
//! event: every write of the previous leaders came before R (each was fenced by its own key,
//! gone by R). A copy that does not get there within a second is not used: the leader reads
//! etcd instead. Progress notices (asked for every second) only tell readiness that the watch
//! is alive; they are not trusted for completeness (etcd before 3.4.24 and 3.5.8 could send
//! one ahead of events it had not delivered).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{EventType, WatchOptions};
use tokio::sync::{watch, Notify};
use tokio::time::Instant;

use super::etcd::EtcdStore;
use super::{Entry, Store, StoreError, Version, WatchStream, Write};

/// What the copy's watch covers: Watt's keys (`/watt/v1/`) and the election key
/// (`/watt/leader/v1`), in one watch so that their events come in one order.
pub const WATCHED: &str = "/watt/";

/// How often the copy asks etcd to confirm it is caught up.
const CONFIRM_EVERY: Duration = Duration::from_secs(1);
/// A copy confirmed longer ago than this is not "in sync" (readiness).
pub const IN_SYNC_WITHIN: Duration = Duration::from_secs(5);

#[cfg(test)]
mod tests {
    #[test]
    fn the_watch_covers_watts_keys_and_the_election_key() {
        assert!(crate::store::etcd::KEY_PREFIX.starts_with(super::WATCHED));
        assert!(crate::leadership::ELECTION_KEY.starts_with(super::WATCHED));
    }
}

#[derive(Debug, Default)]
struct Copy {
    entries: BTreeMap<String, Entry>,
}

/// Where the copy stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    /// The copy holds every write up to this revision (0: not listed yet).
    pub through: i64,
    /// When etcd last said the watch was alive and caught up (a progress notice).
    pub confirmed: Option<Instant>,
}

/// The warm copy and the task that keeps it (see the module's header).
#[derive(Debug)]
pub struct Replica {
    copy: std::sync::Mutex<Copy>,
    progress: watch::Sender<Progress>,
    /// Ask the task for a progress notice now.
    confirm: Notify,
}

impl Replica {
    pub fn new() -> Arc<Replica> {
        Arc::new(Replica {
            copy: std::sync::Mutex::new(Copy::default()),
            progress: watch::channel(Progress { through: 0, confirmed: None }).0,
            confirm: Notify::new(),
        })
    }

    pub fn progress(&self) -> Progress {
        *self.progress.borrow()
    }

    /// Whether the copy was confirmed caught up within [`IN_SYNC_WITHIN`].
    pub fn in_sync(&self, now: Instant) -> bool {
        self.progress().confirmed.is_some_and(|at| now.duration_since(at) <= IN_SYNC_WITHIN)
    }

    /// The copy as a read-only store, once it is complete through `revision`; `None` if it is
    /// not within `wait`.
    pub async fn snapshot_through(&self, revision: i64, wait: Duration) -> Option<Snapshot> {
        self.confirm.notify_one();
        let mut progress = self.progress.subscribe();
        tokio::time::timeout(wait, progress.wait_for(|p| p.through >= revision)).await.ok()?.ok()?;
        let copy = self.copy.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        Some(Snapshot { entries: copy.entries.clone() })
    }

    /// Keep the copy of `store` current until `stop` resolves: list, watch from the list's
    /// revision, ask for a progress notice every [`CONFIRM_EVERY`] (and when a new leader
    /// waits); list again only when etcd compacted past what the watch still needed.
    pub async fn follow(self: Arc<Self>, store: EtcdStore, stop: impl std::future::Future<Output = ()>) {
        tokio::pin!(stop);
        tokio::select! {
            () = self.keep(store) => {}
            () = &mut stop => {}
        }
    }

    async fn keep(&self, store: EtcdStore) {
        let prefix = WATCHED;
        let mut backoff = Duration::from_millis(200);
        let mut listed = false;
        loop {
            if !listed {
                match self.list(&store).await {
                    Ok(()) => listed = true,
                    Err(e) => {
                        tracing::debug!(error = %e, "The warm copy cannot list the store yet.");
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(5));
                        continue;
                    }
                }
            }
            match self.watch(&store, prefix).await {
                Watched::Compacted => listed = false,
                Watched::Broke => {
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
    }

    /// Replace the copy with a list of everything under the store's prefix, at one revision.
    async fn list(&self, store: &EtcdStore) -> Result<(), StoreError> {
        let (entries, revision) = store.list_with_revision("").await?;
        let mut copy = self.copy.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        copy.entries = entries.into_iter().map(|e| (e.key.clone(), e)).collect();
        drop(copy);
        self.progress.send_replace(Progress { through: revision, confirmed: Some(Instant::now()) });
        Ok(())
    }

    /// Watch from the revision after the copy's, applying events, until the watch breaks.
    async fn watch(&self, store: &EtcdStore, prefix: &str) -> Watched {
        let start = self.progress().through + 1;
        let mut client = store.client();
        let options = WatchOptions::new().with_prefix().with_start_revision(start).with_progress_notify();
        let mut stream = match client.watch(prefix, Some(options)).await {
            Ok(stream) => stream,
            Err(e) => {
                tracing::debug!(error = %e, "The warm copy's watch could not start.");
                return Watched::Broke;
            }
        };
        let mut confirm = tokio::time::interval(CONFIRM_EVERY);
        loop {
            let message = tokio::select! {
                m = stream.message() => m,
                _ = confirm.tick() => {
                    if stream.request_progress().await.is_err() {
                        return Watched::Broke;
                    }
                    continue;
                }
                () = self.confirm.notified() => {
                    if stream.request_progress().await.is_err() {
                        return Watched::Broke;
                    }
                    continue;
                }
            };
            let response = match message {
                Ok(Some(response)) => response,
                Ok(None) | Err(_) => return Watched::Broke,
            };
            if response.canceled() {
                return if response.compact_revision() > 0 { Watched::Compacted } else { Watched::Broke };
            }
            if response.created() {
                // Says the watch exists (its header is the store's revision, not the watch's).
                continue;
            }
            let mut through = self.progress().through;
            let mut confirmed = self.progress().confirmed;
            if response.events().is_empty() {
                // A progress notice: the watch is alive (not proof of completeness: see above).
                confirmed = Some(Instant::now());
            } else {
                let mut copy = self.copy.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                for event in response.events() {
                    let Some(kv) = event.kv() else { continue };
                    through = through.max(kv.mod_revision());
                    // The election key advances the copy's revision; only Watt's keys are kept.
                    if !kv.key().starts_with(store.full("").as_bytes()) {
                        continue;
                    }
                    let Ok(entry) = store.entry(kv) else { continue };
                    match event.event_type() {
                        EventType::Put => {
                            copy.entries.insert(entry.key.clone(), entry);
                        }
                        EventType::Delete => {
                            copy.entries.remove(&entry.key);
                        }
                    }
                }
            }
            self.progress.send_replace(Progress { through, confirmed });
        }
    }
}

enum Watched {
    /// etcd compacted past the revision the watch needed: list again.
    Compacted,
    /// The stream ended or failed: watch again from where the copy is.
    Broke,
}

/// The copy at one moment, read as a store by [`crate::reconcile::Controller::load`]: reads
/// only, as a new leader loads.
#[derive(Debug)]
pub struct Snapshot {
    entries: BTreeMap<String, Entry>,
}

#[async_trait::async_trait]
impl Store for Snapshot {
    async fn get(&self, key: &str) -> Result<Option<Entry>, StoreError> {
        Ok(self.entries.get(key).cloned())
    }

    async fn list(&self, prefix: &str) -> Result<Vec<Entry>, StoreError> {
        Ok(self
            .entries
            .range(prefix.to_string()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(_, e)| e.clone())
            .collect())
    }

    async fn commit(&self, _writes: Vec<Write>) -> Result<Version, StoreError> {
        Err(StoreError::Unavailable("a warm copy is read-only".into()))
    }

    async fn watch(&self, _prefix: &str) -> Result<WatchStream, StoreError> {
        Err(StoreError::Unavailable("a warm copy is read-only".into()))
    }
}
