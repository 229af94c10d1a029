//! `file:PATH`: the embedded store, one redb file. Every commit is one redb write transaction,
//! made durable (fsync) before it returns, so what a caller was told is written survives
//! `kill -9` and power loss. Watches are in-process: this store serves one controller.

use std::path::Path;
use std::sync::Arc;

use futures::StreamExt;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use tokio::sync::broadcast;
use tokio_stream::wrappers::errors::BroadcastStreamRecvError;
use tokio_stream::wrappers::BroadcastStream;

use super::{Entry, Expect, Store, StoreError, Version, WatchEvent, WatchStream, Write};

/// key -> (version, value)
const KV: TableDefinition<&str, (u64, &[u8])> = TableDefinition::new("kv");
/// "revision" -> the last commit's revision
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");

#[derive(Debug, Clone)]
pub struct FileStore {
    db: Arc<Database>,
    events: broadcast::Sender<Arc<Vec<WatchEvent>>>,
}

fn corrupt(e: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(e.to_string())
}

fn unavailable(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

impl FileStore {
    /// Open or create the database at `path`. Blocking.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, StoreError> {
        let path = path.as_ref();
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| unavailable(format!("{}: {e}", dir.display())))?;
        }
        let db = Database::create(path).map_err(|e| unavailable(format!("{}: {e}", path.display())))?;
        // Create the tables once so that reads never meet a missing table.
        let tx = db.begin_write().map_err(unavailable)?;
        tx.open_table(KV).map_err(corrupt)?;
        tx.open_table(META).map_err(corrupt)?;
        tx.commit().map_err(unavailable)?;
        let (events, _) = broadcast::channel(4096);
        Ok(FileStore { db: Arc::new(db), events })
    }

    fn get_blocking(&self, key: &str) -> Result<Option<Entry>, StoreError> {
        let tx = self.db.begin_read().map_err(unavailable)?;
        let table = tx.open_table(KV).map_err(corrupt)?;
        let entry = table.get(key).map_err(corrupt)?.map(|v| {
            let (version, value) = v.value();
            Entry { key: key.to_string(), value: value.to_vec(), version }
        });
        Ok(entry)
    }

    fn list_blocking(&self, prefix: &str) -> Result<Vec<Entry>, StoreError> {
        let tx = self.db.begin_read().map_err(unavailable)?;
        let table = tx.open_table(KV).map_err(corrupt)?;
        let mut out = Vec::new();
        for item in table.range(prefix..).map_err(corrupt)? {
            let (k, v) = item.map_err(corrupt)?;
            let key = k.value();
            if !key.starts_with(prefix) {
                break;
            }
            let (version, value) = v.value();
            out.push(Entry { key: key.to_string(), value: value.to_vec(), version });
        }
        Ok(out)
    }

    fn commit_blocking(&self, writes: Vec<Write>) -> Result<Version, StoreError> {
        let tx = self.db.begin_write().map_err(unavailable)?;
        let (revision, events) = {
            let mut table = tx.open_table(KV).map_err(corrupt)?;
            for w in &writes {
                let current = table.get(w.key.as_str()).map_err(corrupt)?.map(|v| v.value().0).unwrap_or(0);
                let holds = match w.expect {
                    Expect::Any => true,
                    Expect::Absent => current == 0,
                    Expect::Version(v) => current == v && v != 0,
                };
                if !holds {
                    // Dropping `tx` without commit aborts it: nothing is written.
                    return Err(StoreError::Conflict { key: w.key.clone() });
                }
            }
            let mut meta = tx.open_table(META).map_err(corrupt)?;
            let revision = meta.get("revision").map_err(corrupt)?.map(|v| v.value()).unwrap_or(0) + 1;
            meta.insert("revision", revision).map_err(corrupt)?;
            let mut events = Vec::with_capacity(writes.len());
            for w in writes {
                match w.value {
                    Some(value) => {
                        table.insert(w.key.as_str(), (revision, value.as_slice())).map_err(corrupt)?;
                        events.push(WatchEvent::Put(Entry { key: w.key, value, version: revision }));
                    }
                    None => {
                        if table.remove(w.key.as_str()).map_err(corrupt)?.is_some() {
                            events.push(WatchEvent::Delete { key: w.key, version: revision });
                        }
                    }
                }
            }
            (revision, events)
        };
        tx.commit().map_err(unavailable)?;
        // Nobody watching is fine.
        let _ = self.events.send(Arc::new(events));
        Ok(revision)
    }
}

#[async_trait::async_trait]
impl Store for FileStore {
    async fn get(&self, key: &str) -> Result<Option<Entry>, StoreError> {
        let (this, key) = (self.clone(), key.to_string());
        tokio::task::spawn_blocking(move || this.get_blocking(&key)).await.map_err(unavailable)?
    }

    async fn list(&self, prefix: &str) -> Result<Vec<Entry>, StoreError> {
        let (this, prefix) = (self.clone(), prefix.to_string());
        tokio::task::spawn_blocking(move || this.list_blocking(&prefix)).await.map_err(unavailable)?
    }

    async fn commit(&self, writes: Vec<Write>) -> Result<Version, StoreError> {
        let this = self.clone();
        tokio::task::spawn_blocking(move || this.commit_blocking(writes)).await.map_err(unavailable)?
    }

    async fn watch(&self, prefix: &str) -> Result<WatchStream, StoreError> {
        let prefix = prefix.to_string();
        let stream = BroadcastStream::new(self.events.subscribe()).flat_map(move |batch| {
            let items: Vec<Result<WatchEvent, StoreError>> = match batch {
                Ok(events) => events.iter().filter(|e| e.key().starts_with(&prefix)).cloned().map(Ok).collect(),
                Err(BroadcastStreamRecvError::Lagged(n)) => {
                    vec![Err(StoreError::WatchLost(format!("{n} commits were missed")))]
                }
            };
            futures::stream::iter(items)
        });
        Ok(stream.boxed())
    }
}
