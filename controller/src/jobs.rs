//! Jobs as the controller stores them: the validated spec plus what the controller decided
//! (state, placement, epoch), kept in the store under `jobs/<name>` as JSON.
//!
//! [`JobTable`] is the controller's in-memory copy with each record's store version, so every
//! change is written back with compare-and-swap against the version it was read at.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use watt_proto::v1 as pb;

use crate::scheduler::{JobRequest, ShardAssignment};
use crate::spec::JobSpec;
use crate::store::{Expect, Store, StoreError, Version, Write};

pub const JOBS_PREFIX: &str = "jobs/";
/// The last job sequence number handed out; bumped in the same commit as each new job.
pub const SEQUENCE_KEY: &str = "meta/job-sequence";

/// etcd refuses transactions of more than 128 operations by default.
const MAX_WRITES_PER_COMMIT: usize = 100;

pub fn job_key(name: &str) -> String {
    format!("{JOBS_PREFIX}{name}")
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum JobState {
    Pending,
    Starting,
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

impl JobState {
    /// Placed on GPUs (shards ordered to run).
    pub fn is_active(self) -> bool {
        matches!(self, JobState::Starting | JobState::Running)
    }

    pub fn is_terminal(self) -> bool {
        matches!(self, JobState::Succeeded | JobState::Failed | JobState::Cancelled)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Pending => "pending",
            JobState::Starting => "starting",
            JobState::Running => "running",
            JobState::Succeeded => "succeeded",
            JobState::Failed => "failed",
            JobState::Cancelled => "cancelled",
        }
    }

    pub const ALL: [JobState; 6] = [
        JobState::Pending,
        JobState::Starting,
        JobState::Running,
        JobState::Succeeded,
        JobState::Failed,
        JobState::Cancelled,
    ];

    fn to_proto(self) -> pb::JobState {
        match self {
            JobState::Pending => pb::JobState::Pending,
            JobState::Starting => pb::JobState::Starting,
            JobState::Running => pb::JobState::Running,
            JobState::Succeeded => pb::JobState::Succeeded,
            JobState::Failed => pb::JobState::Failed,
            JobState::Cancelled => pb::JobState::Cancelled,
        }
    }
}

/// Why a job off its GPUs waits, when the scheduler's own reason ("waiting for 16 GPUs") must
/// not replace it: it was preempted, its node was lost, the power budget paused it or holds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Hold {
    Preempted,
    NodeLost,
    PowerPaused,
    PowerWaiting,
}

/// A job as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobRecord {
    pub spec: JobSpec,
    pub state: JobState,
    pub sequence: u64,
    pub submitted_unix_ms: i64,
    /// Placement generation: bumped each time the job is placed.
    pub epoch: u64,
    /// Where each shard runs, by shard number; empty unless active.
    pub shards: Vec<ShardAssignment>,
    /// Rank 0's rendezvous port on `shards[0].node`.
    pub master_port: u16,
    pub message: String,
    pub preemptions: u32,
    /// When its shard count last changed (placed, shrunk, grown): resizes are spaced out.
    #[serde(default)]
    pub resized_unix_ms: i64,
    /// Where it last ran and how each shard ended, kept once it is off its GPUs, so an ended
    /// job's logs can still be read and its end explained.
    #[serde(default)]
    pub last_run: Vec<ShardOutcome>,
    /// Set while it waits for a reason of its own (see [`Hold`]); cleared when it is placed.
    #[serde(default)]
    pub hold: Option<Hold>,
    /// The principal that submitted it (empty for a job stored before principals existed:
    /// only an admin may cancel one).
    #[serde(default)]
    pub submitted_by: String,
}

/// How one shard of a job's last run ended.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ShardOutcome {
    pub shard: u32,
    pub node: String,
    pub gpus: Vec<u32>,
    pub epoch: u64,
    /// The last state its agent reported for that run (`pb::ShardState`; unspecified if none).
    pub state: i32,
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    pub restarts: u32,
    /// The agent's words for it.
    pub message: String,
    pub ended_unix_ms: i64,
}

impl ShardOutcome {
    fn to_proto(&self) -> pb::ShardOutcome {
        pb::ShardOutcome {
            shard: self.shard,
            node: self.node.clone(),
            gpu_indices: self.gpus.clone(),
            state: self.state,
            exit_code: self.exit_code,
            signal: self.signal,
            restarts: self.restarts,
            message: self.message.clone(),
            ended_unix_ms: self.ended_unix_ms,
            epoch: self.epoch,
        }
    }
}

impl JobRecord {
    /// When it ended, as well as the record says: the end of its last run, else its last resize
    /// or its submission (a job cancelled before it ever ran).
    pub fn ended_unix_ms(&self) -> i64 {
        let last_run = self.last_run.iter().map(|o| o.ended_unix_ms).max().unwrap_or(0);
        last_run.max(self.resized_unix_ms).max(self.submitted_unix_ms)
    }

    /// A pending record of `spec`, for tests.
    #[cfg(test)]
    pub fn new_for_tests(spec: JobSpec) -> JobRecord {
        JobRecord {
            spec,
            state: JobState::Pending,
            sequence: 1,
            submitted_unix_ms: 0,
            epoch: 0,
            shards: Vec::new(),
            master_port: 0,
            message: String::new(),
            preemptions: 0,
            resized_unix_ms: 0,
            last_run: Vec::new(),
            hold: None,
            submitted_by: String::new(),
        }
    }

    pub fn request(&self) -> JobRequest {
        JobRequest {
            name: self.spec.name.clone(),
            priority: self.spec.priority,
            sequence: self.sequence,
            shards: self.spec.shards,
            gpus_per_shard: self.spec.gpus_per_shard,
        }
    }

    /// Back to waiting, off its GPUs. Where it ran is kept in `last_run`, each shard with the
    /// last status its agent `reported` for this run.
    pub fn unplace(
        &mut self,
        hold: Option<Hold>,
        ended_unix_ms: i64,
        reported: &dyn Fn(&str, u32) -> Option<pb::ShardStatus>,
    ) {
        self.hold = hold;
        if !self.shards.is_empty() {
            self.last_run = self
                .shards
                .iter()
                .enumerate()
                .map(|(i, s)| {
                    let status = reported(&s.node, i as u32).filter(|st| st.epoch == self.epoch);
                    let status = status.as_ref();
                    ShardOutcome {
                        shard: i as u32,
                        node: s.node.clone(),
                        gpus: s.gpus.clone(),
                        epoch: self.epoch,
                        state: status.map_or(0, |st| st.state),
                        exit_code: status.and_then(|st| st.exit_code),
                        signal: status.and_then(|st| st.signal),
                        restarts: status.map_or(0, |st| st.restarts),
                        message: status.map(|st| st.message.clone()).unwrap_or_default(),
                        ended_unix_ms,
                    }
                })
                .collect();
        }
        self.state = JobState::Pending;
        self.shards.clear();
        self.master_port = 0;
    }

    pub fn to_proto(&self, shard_states: impl Fn(usize) -> pb::ShardState) -> pb::Job {
        pb::Job {
            spec: Some(self.spec.to_proto()),
            state: self.state.to_proto() as i32,
            sequence: self.sequence,
            submitted_unix_ms: self.submitted_unix_ms,
            epoch: self.epoch,
            shards: self
                .shards
                .iter()
                .enumerate()
                .map(|(i, s)| pb::ShardPlacement {
                    shard: i as u32,
                    node: s.node.clone(),
                    gpu_indices: s.gpus.clone(),
                    state: shard_states(i) as i32,
                })
                .collect(),
            message: self.message.clone(),
            preemptions: self.preemptions,
            progress: None,
            last_run: self.last_run.iter().map(ShardOutcome::to_proto).collect(),
            submitted_by: self.submitted_by.clone(),
        }
    }

    fn encode(&self) -> Result<Vec<u8>, StoreError> {
        crate::store::encode_json(&job_key(&self.spec.name), self)
    }
}

/// The controller's copy of every job, with the store version each was read at.
#[derive(Debug)]
pub struct JobTable {
    store: Arc<dyn Store>,
    jobs: BTreeMap<String, (JobRecord, Version)>,
}

impl JobTable {
    /// Load every job from the store.
    pub async fn load(store: Arc<dyn Store>) -> Result<Self, StoreError> {
        let mut jobs = BTreeMap::new();
        for entry in store.list(JOBS_PREFIX).await? {
            let record: JobRecord =
                serde_json::from_slice(&entry.value).map_err(|e| StoreError::Corrupt(format!("{}: {e}", entry.key)))?;
            jobs.insert(record.spec.name.clone(), (record, entry.version));
        }
        Ok(JobTable { store, jobs })
    }

    pub fn get(&self, name: &str) -> Option<&JobRecord> {
        self.jobs.get(name).map(|(r, _)| r)
    }

    pub fn iter(&self) -> impl Iterator<Item = &JobRecord> {
        self.jobs.values().map(|(r, _)| r)
    }

    pub fn len(&self) -> usize {
        self.jobs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.jobs.is_empty()
    }

    /// Store a new job, durably, with the next sequence number. Fails with `Conflict` on
    /// `jobs/<name>` if a job of that name exists.
    pub async fn create(
        &mut self,
        spec: JobSpec,
        now_unix_ms: i64,
        submitted_by: &str,
    ) -> Result<JobRecord, StoreError> {
        loop {
            let counter = self.store.get(SEQUENCE_KEY).await?;
            let (last, expect) = match &counter {
                Some(e) => {
                    let last =
                        std::str::from_utf8(&e.value).ok().and_then(|s| s.parse::<u64>().ok()).ok_or_else(|| {
                            StoreError::Corrupt(format!(
                                "{SEQUENCE_KEY}: {:?} is not a job sequence number",
                                String::from_utf8_lossy(&e.value)
                            ))
                        })?;
                    (last, Expect::Version(e.version))
                }
                None => (0, Expect::Absent),
            };
            let record = JobRecord {
                spec: spec.clone(),
                state: JobState::Pending,
                sequence: last + 1,
                submitted_unix_ms: now_unix_ms,
                epoch: 0,
                shards: Vec::new(),
                master_port: 0,
                message: "waiting to be scheduled".into(),
                preemptions: 0,
                resized_unix_ms: 0,
                last_run: Vec::new(),
                hold: None,
                submitted_by: submitted_by.to_string(),
            };
            let key = job_key(&spec.name);
            let writes = vec![
                Write::put(SEQUENCE_KEY, expect, (last + 1).to_string().into_bytes()),
                Write::put(&key, Expect::Absent, record.encode()?),
            ];
            match self.store.commit(writes).await {
                Ok(version) => {
                    self.jobs.insert(spec.name.clone(), (record.clone(), version));
                    return Ok(record);
                }
                // Another submit took the sequence number first: take the next one.
                Err(StoreError::Conflict { key: k }) if k == SEQUENCE_KEY => continue,
                Err(e) => return Err(e),
            }
        }
    }

    /// Write a changed record back, compare-and-swap against the version it was read at. On a
    /// conflict the cached record is reloaded from the store and the change is dropped.
    /// Remove ended jobs by name (compare-and-swap: one changed since it was read stays); how
    /// many were removed. A job that has not ended is never removed.
    pub async fn remove_ended(&mut self, names: &[String]) -> Result<usize, StoreError> {
        let mut removed = 0;
        for chunk in names.chunks(MAX_WRITES_PER_COMMIT) {
            let writes: Vec<Write> = chunk
                .iter()
                .filter_map(|n| self.jobs.get(n).filter(|(r, _)| r.state.is_terminal()).map(|(_, v)| (n, *v)))
                .map(|(n, v)| Write::delete(job_key(n), Expect::Version(v)))
                .collect();
            if writes.is_empty() {
                continue;
            }
            self.store.commit(writes).await?;
            for n in chunk {
                if self.jobs.get(n).is_some_and(|(r, _)| r.state.is_terminal()) {
                    self.jobs.remove(n);
                    removed += 1;
                }
            }
        }
        Ok(removed)
    }

    pub async fn update(&mut self, record: JobRecord) -> Result<(), StoreError> {
        match self.update_all(vec![record]).await {
            (_, Some(e)) => Err(e),
            (_, None) => Ok(()),
        }
    }

    /// Write changed records back in as few commits as the store allows (compare-and-swap each,
    /// all-or-nothing per commit), in order, stopping at the first commit that fails: a later
    /// change may depend on an earlier one (a start on the GPUs a preemption freed). Returns how
    /// many records, from the front, were stored; the rest are reloaded from the store.
    pub async fn update_all(&mut self, records: Vec<JobRecord>) -> (usize, Option<StoreError>) {
        let mut stored = 0;
        for chunk in records.chunks(MAX_WRITES_PER_COMMIT) {
            let writes: Result<Vec<Write>, StoreError> = chunk
                .iter()
                .map(|r| {
                    let expect =
                        self.jobs.get(&r.spec.name).map(|(_, v)| Expect::Version(*v)).unwrap_or(Expect::Absent);
                    Ok(Write::put(job_key(&r.spec.name), expect, r.encode()?))
                })
                .collect();
            let writes = match writes {
                Ok(writes) => writes,
                Err(e) => return (stored, Some(e)),
            };
            match self.store.commit(writes).await {
                Ok(version) => {
                    for r in chunk {
                        self.jobs.insert(r.spec.name.clone(), (r.clone(), version));
                    }
                    stored += chunk.len();
                }
                Err(e) => {
                    for r in &records[stored..] {
                        if let Err(reload) = self.reload(&r.spec.name).await {
                            return (stored, Some(reload));
                        }
                    }
                    return (stored, Some(e));
                }
            }
        }
        (stored, None)
    }

    async fn reload(&mut self, name: &str) -> Result<(), StoreError> {
        match self.store.get(&job_key(name)).await? {
            Some(entry) => {
                let record: JobRecord = serde_json::from_slice(&entry.value)
                    .map_err(|e| StoreError::Corrupt(format!("{}: {e}", entry.key)))?;
                self.jobs.insert(name.to_string(), (record, entry.version));
            }
            None => {
                self.jobs.remove(name);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::file::FileStore;

    fn spec(name: &str) -> JobSpec {
        JobSpec::from_manifest(&format!(
            "name: {name}\nshards: {{min: 1, max: 1}}\ngpus_per_shard: 1\ncommand: [sleep, '1']\n"
        ))
        .unwrap()
    }

    #[tokio::test]
    async fn a_corrupt_job_sequence_is_an_error_naming_the_key_and_stores_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(FileStore::open(dir.path().join("s.redb")).unwrap());
        let mut jobs = JobTable::load(store.clone()).await.unwrap();
        assert_eq!(jobs.create(spec("first"), 0, "test").await.unwrap().sequence, 1);
        let current = store.get(SEQUENCE_KEY).await.unwrap().unwrap();
        store.commit(vec![Write::put(SEQUENCE_KEY, Expect::Version(current.version), b"two".to_vec())]).await.unwrap();
        let err = jobs.create(spec("second"), 0, "test").await.unwrap_err();
        assert!(matches!(&err, StoreError::Corrupt(m) if m.contains(SEQUENCE_KEY) && m.contains("two")), "{err}");
        assert!(store.get(&job_key("second")).await.unwrap().is_none(), "nothing stored");
    }
}
