//! The store as the operator sees it: every call's outcome, so a full disk or an unreachable
//! etcd shows in `/healthz` (503, saying why) and in `watt_store_errors_total` and
//! `watt_store_up`, and clears by itself — no restart: a failed write with the next write
//! that succeeds, a failed read with the next call that succeeds (a read that succeeds says
//! nothing about a full disk). A compare-and-swap conflict, or a write refused because this
//! controller no longer leads, is the store working as meant, not a failure.

use std::sync::{Arc, Mutex};

use prometheus::{IntCounter, IntGauge};

use super::{Entry, Store, StoreError, Version, WatchStream, Write};

/// Whether the last write succeeded, and why not.
#[derive(Debug, Clone)]
pub struct StoreHealth {
    last_failure: Arc<Mutex<Option<(Call, String)>>>,
    failures: IntCounter,
    writable: IntGauge,
}

impl StoreHealth {
    pub fn new(failures: IntCounter, writable: IntGauge) -> Self {
        writable.set(1);
        StoreHealth { last_failure: Arc::new(Mutex::new(None)), failures, writable }
    }

    /// Why the last write failed; `None` while writes succeed.
    pub fn failure(&self) -> Option<String> {
        self.last_failure.lock().unwrap_or_else(|p| p.into_inner()).as_ref().map(|(_, why)| why.clone())
    }

    fn record<T>(&self, call: Call, outcome: &Result<T, StoreError>) {
        let mut last = self.last_failure.lock().unwrap_or_else(|p| p.into_inner());
        match outcome {
            Ok(_) | Err(StoreError::Conflict { .. } | StoreError::Deposed { .. }) => {
                // A read that succeeds clears only a failed read.
                if last.as_ref().is_some_and(|(failed, _)| call == Call::Write || *failed == Call::Read) {
                    *last = None;
                    tracing::info!("The store answers again.");
                    self.writable.set(1);
                }
            }
            Err(e) => {
                if last.is_none() {
                    tracing::error!(error = %e, "A store call failed; /healthz reports it until one succeeds.");
                }
                *last = Some((call, e.to_string()));
                if call == Call::Write {
                    self.failures.inc();
                }
                self.writable.set(0);
            }
        }
    }
}

/// What kind of store call an outcome is of.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Call {
    Read,
    Write,
}

/// `inner`, with every commit's outcome recorded in `health`.
#[derive(Debug)]
pub struct Observed {
    inner: Arc<dyn Store>,
    health: StoreHealth,
}

impl Observed {
    pub fn new(inner: Arc<dyn Store>, health: StoreHealth) -> Self {
        Observed { inner, health }
    }
}

#[async_trait::async_trait]
impl Store for Observed {
    async fn get(&self, key: &str) -> Result<Option<Entry>, StoreError> {
        let outcome = self.inner.get(key).await;
        self.health.record(Call::Read, &outcome);
        outcome
    }

    async fn list(&self, prefix: &str) -> Result<Vec<Entry>, StoreError> {
        let outcome = self.inner.list(prefix).await;
        self.health.record(Call::Read, &outcome);
        outcome
    }

    async fn commit(&self, writes: Vec<Write>) -> Result<Version, StoreError> {
        let outcome = self.inner.commit(writes).await;
        self.health.record(Call::Write, &outcome);
        outcome
    }

    async fn watch(&self, prefix: &str) -> Result<WatchStream, StoreError> {
        self.inner.watch(prefix).await
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};

    use super::*;
    use crate::store::Expect;

    /// A store whose disk can be "full": a fault the real file store produces only on a full
    /// disk, which a test cannot make here.
    #[derive(Debug)]
    struct DiskFull {
        inner: Arc<dyn Store>,
        full: AtomicBool,
    }

    #[async_trait::async_trait]
    impl Store for DiskFull {
        async fn get(&self, key: &str) -> Result<Option<Entry>, StoreError> {
            self.inner.get(key).await
        }
        async fn list(&self, prefix: &str) -> Result<Vec<Entry>, StoreError> {
            self.inner.list(prefix).await
        }
        async fn commit(&self, writes: Vec<Write>) -> Result<Version, StoreError> {
            if self.full.load(Ordering::Relaxed) {
                return Err(StoreError::Unavailable("No space left on device (os error 28)".into()));
            }
            self.inner.commit(writes).await
        }
        async fn watch(&self, prefix: &str) -> Result<WatchStream, StoreError> {
            self.inner.watch(prefix).await
        }
    }

    #[tokio::test]
    async fn a_full_disk_is_reported_and_clears_with_the_next_write() {
        let dir = tempfile::tempdir().unwrap();
        let file = crate::store::open(&format!("file:{}", dir.path().join("s.redb").display())).await.unwrap();
        let disk = Arc::new(DiskFull { inner: file, full: AtomicBool::new(false) });
        let (failures, writable) = (IntCounter::new("f", "f").unwrap(), IntGauge::new("w", "w").unwrap());
        let health = StoreHealth::new(failures.clone(), writable.clone());
        let store = Observed::new(disk.clone(), health.clone());

        store.commit(vec![Write::put("k", Expect::Absent, b"1".to_vec())]).await.unwrap();
        assert_eq!((health.failure(), writable.get()), (None, 1));
        // A conflict is no failure.
        assert!(store.commit(vec![Write::put("k", Expect::Absent, b"2".to_vec())]).await.is_err());
        assert_eq!(health.failure(), None);

        disk.full.store(true, Ordering::Relaxed);
        assert!(store.commit(vec![Write::put("j", Expect::Any, b"1".to_vec())]).await.is_err());
        assert!(health.failure().unwrap().contains("No space left"), "{:?}", health.failure());
        assert_eq!((failures.get(), writable.get()), (1, 0));

        // Reads still work on a full disk, and say nothing about it.
        store.get("k").await.unwrap();
        assert!(health.failure().is_some());

        disk.full.store(false, Ordering::Relaxed);
        store.commit(vec![Write::put("j", Expect::Any, b"1".to_vec())]).await.unwrap();
        assert_eq!((health.failure(), writable.get(), failures.get()), (None, 1, 1));
    }
}
