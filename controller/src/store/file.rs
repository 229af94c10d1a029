//! `file:PATH`: the embedded store, one redb file. Every commit is one redb write transaction,
//! made durable (fsync) before it returns, so what a caller was told is written survives
//! `kill -9` and power loss. Watches are in-process: this store serves one controller.
//!
//! An I/O error (a full disk) leaves redb refusing every later transaction until the database is
//! opened again, so the store lets go of it and opens it afresh on the next call: once the disk
//! has room, writes succeed again, with no restart. A restart would do the same and lose more —
//! every agent's session and any power change not stored yet — so the store heals in place.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

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
    path: PathBuf,
    /// The open database; `None` after an I/O error, until the next call opens it again.
    db: Arc<Mutex<Option<Arc<Database>>>>,
    events: broadcast::Sender<Arc<Vec<WatchEvent>>>,
}

fn unavailable(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

/// A redb error as the store's: I/O (a full disk, a failed device) is the store being
/// unavailable, and heals; anything else is corruption.
fn classify(e: impl Into<redb::Error>) -> StoreError {
    match e.into() {
        e @ (redb::Error::Io(_) | redb::Error::PreviousIo | redb::Error::DatabaseAlreadyOpen) => unavailable(e),
        e => StoreError::Corrupt(e.to_string()),
    }
}

impl FileStore {
    /// Open or create the database at `path`. Blocking.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, StoreError> {
        let path = path.as_ref();
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| unavailable(format!("{}: {e}", dir.display())))?;
        }
        let db = open_database(path)?;
        let (events, _) = broadcast::channel(4096);
        Ok(FileStore { path: path.to_path_buf(), db: Arc::new(Mutex::new(Some(Arc::new(db)))), events })
    }

    /// The open database, opened again if an I/O error let go of it.
    fn database(&self) -> Result<Arc<Database>, StoreError> {
        let mut db = self.db.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(open) = db.as_ref() {
            return Ok(open.clone());
        }
        let reopened = Arc::new(open_database(&self.path)?);
        tracing::info!(path = %self.path.display(), "Opened the store again after an I/O error.");
        *db = Some(reopened.clone());
        Ok(reopened)
    }

    /// Run `op` on the database; after an I/O error, let go of it (the next call opens it again).
    fn with_database<T>(&self, op: impl FnOnce(&Database) -> Result<T, StoreError>) -> Result<T, StoreError> {
        let db = self.database()?;
        let outcome = op(&db);
        if let Err(StoreError::Unavailable(_)) = &outcome {
            let mut current = self.db.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            if current.as_ref().is_some_and(|open| Arc::ptr_eq(open, &db)) {
                *current = None;
            }
        }
        outcome
    }

    fn get_blocking(&self, key: &str) -> Result<Option<Entry>, StoreError> {
        self.with_database(|db| get_in(db, key))
    }

    fn list_blocking(&self, prefix: &str) -> Result<Vec<Entry>, StoreError> {
        self.with_database(|db| list_in(db, prefix))
    }

    fn commit_blocking(&self, writes: Vec<Write>) -> Result<Version, StoreError> {
        let (revision, events) = self.with_database(|db| commit_in(db, writes))?;
        // Nobody watching is fine.
        let _ = self.events.send(Arc::new(events));
        Ok(revision)
    }
}

/// Open (or create) the database at `path`, with its tables, so that reads never meet a
/// missing table.
fn open_database(path: &Path) -> Result<Database, StoreError> {
    let db = Database::create(path).map_err(|e| unavailable(format!("{}: {e}", path.display())))?;
    let tx = db.begin_write().map_err(classify)?;
    tx.open_table(KV).map_err(classify)?;
    tx.open_table(META).map_err(classify)?;
    tx.commit().map_err(classify)?;
    Ok(db)
}

fn get_in(db: &Database, key: &str) -> Result<Option<Entry>, StoreError> {
    let tx = db.begin_read().map_err(classify)?;
    let table = tx.open_table(KV).map_err(classify)?;
    let entry = table.get(key).map_err(classify)?.map(|v| {
        let (version, value) = v.value();
        Entry { key: key.to_string(), value: value.to_vec(), version }
    });
    Ok(entry)
}

fn list_in(db: &Database, prefix: &str) -> Result<Vec<Entry>, StoreError> {
    let tx = db.begin_read().map_err(classify)?;
    let table = tx.open_table(KV).map_err(classify)?;
    let mut out = Vec::new();
    for item in table.range(prefix..).map_err(classify)? {
        let (k, v) = item.map_err(classify)?;
        let key = k.value();
        if !key.starts_with(prefix) {
            break;
        }
        let (version, value) = v.value();
        out.push(Entry { key: key.to_string(), value: value.to_vec(), version });
    }
    Ok(out)
}

/// One commit: the revision it made and its watch events.
fn commit_in(db: &Database, writes: Vec<Write>) -> Result<(Version, Vec<WatchEvent>), StoreError> {
    let tx = db.begin_write().map_err(classify)?;
    let (revision, events) = {
        let mut table = tx.open_table(KV).map_err(classify)?;
        for w in &writes {
            let current = table.get(w.key.as_str()).map_err(classify)?.map(|v| v.value().0).unwrap_or(0);
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
        let mut meta = tx.open_table(META).map_err(classify)?;
        let revision = meta.get("revision").map_err(classify)?.map(|v| v.value()).unwrap_or(0) + 1;
        meta.insert("revision", revision).map_err(classify)?;
        let mut events = Vec::with_capacity(writes.len());
        for w in writes {
            match w.value {
                Some(value) => {
                    table.insert(w.key.as_str(), (revision, value.as_slice())).map_err(classify)?;
                    events.push(WatchEvent::Put(Entry { key: w.key, value, version: revision }));
                }
                None => {
                    if table.remove(w.key.as_str()).map_err(classify)?.is_some() {
                        events.push(WatchEvent::Delete { key: w.key, version: revision });
                    }
                }
            }
        }
        (revision, events)
    };
    tx.commit().map_err(classify)?;
    Ok((revision, events))
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
