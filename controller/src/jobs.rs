//! Jobs as the controller stores them: the validated spec plus what the controller decided
//! (state, placement, epoch), kept in the store under `jobs/<name>` as JSON.
//!
//! [`JobTable`] is the controller's in-memory copy with each record's store version; [`JobStore`]
//! writes changes back, compare-and-swap against the version they were read at, holding no lock
//! on the table while the store works.

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
/// not replace it: it was preempted, its node was lost, the power budget paused it or holds it,
/// the site's ramp limits hold it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Hold {
    Preempted,
    NodeLost,
    PowerPaused,
    PowerWaiting,
    /// Its start would raise counted power faster than the site's ramp limit allows now.
    RampWaiting,
    /// Another job's caps are coming down along the site's ramp-down to make room.
    RampDownWaiting,
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
    /// Its caps coming down along the site's ramp-down before its shards stop: cancelled, or
    /// making room for a decision of the reconcile pass (see [`StopThen`]).
    #[serde(default)]
    pub stopping: Option<Stopping>,
}

/// A decrease Watt chose, shaped by the site's `ramp_down` (ARCHITECTURE.md invariant 12): the
/// job keeps its GPUs (nothing else is placed on them) and its cap falls from `from_cap_watts`
/// to its GPUs' minimum between `since_unix_ms` and `until_unix_ms`; then its shards get
/// SIGTERM. A power cut meanwhile is not slowed: the allocator may give it less, or pause it.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Stopping {
    pub since_unix_ms: i64,
    pub until_unix_ms: i64,
    pub from_cap_watts: f64,
    /// What happens at the end of the ramp.
    #[serde(default)]
    pub then: StopThen,
}

/// What ends a job's ramp-down.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StopThen {
    /// It was cancelled: it ends cancelled, whatever else happens meanwhile.
    #[default]
    Cancel,
    /// A pass chose to preempt, pause or shrink it to make room: the pass that finds the ramp
    /// over and still wants the room does so; one that no longer wants it calls the ramp off.
    MakeRoom,
}

/// A ramp-down under this long is a pass or two: the decrease happens at once.
pub const SHORTEST_RAMP_DOWN_MS: f64 = 200.0;

impl Stopping {
    /// The highest cap the job may have at `now_unix_ms`: from its cap then down to `floor`.
    pub fn cap_at(&self, now_unix_ms: i64, floor: f64) -> f64 {
        let span = (self.until_unix_ms - self.since_unix_ms).max(1) as f64;
        let done = ((now_unix_ms - self.since_unix_ms) as f64 / span).clamp(0.0, 1.0);
        (self.from_cap_watts - (self.from_cap_watts - floor).max(0.0) * done).max(floor)
    }

    /// The ramp that takes `gpus` GPUs from `from_cap_watts` down to `floor_watts` at the site's
    /// `watts_per_second`, starting at `start_unix_ms` — after every other job's ramp-down, so
    /// that together they keep the site's rate. `None` when it would take under
    /// [`SHORTEST_RAMP_DOWN_MS`].
    pub fn along(
        watts_per_second: f64,
        gpus: usize,
        from_cap_watts: f64,
        floor_watts: f64,
        start_unix_ms: i64,
        then: StopThen,
    ) -> Option<Stopping> {
        let ms = (gpus as f64 * (from_cap_watts - floor_watts) / watts_per_second * 1_000.0).ceil();
        if !ms.is_finite() || ms < SHORTEST_RAMP_DOWN_MS {
            return None;
        }
        Some(Stopping { since_unix_ms: start_unix_ms, until_unix_ms: start_unix_ms + ms as i64, from_cap_watts, then })
    }
}

/// When the last ramp-down under way among `jobs` ends (`now` when none): the next one starts
/// then, so that two never add up past the site's rate.
pub fn ramp_downs_end<'a>(jobs: impl IntoIterator<Item = &'a JobRecord>, now_unix_ms: i64) -> i64 {
    jobs.into_iter()
        .filter(|j| j.state.is_active())
        .filter_map(|j| j.stopping.map(|s| s.until_unix_ms))
        .fold(now_unix_ms, i64::max)
}

/// Whether a `pb::ShardState` is one a shard's process ends in.
fn shard_state_ended(state: i32) -> bool {
    matches!(
        pb::ShardState::try_from(state),
        Ok(pb::ShardState::Stopped | pb::ShardState::Succeeded | pb::ShardState::Failed)
    )
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
    /// Whether its process has ended (stopped, succeeded or failed), not only been told to.
    pub fn has_ended(&self) -> bool {
        shard_state_ended(self.state)
    }

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
            stopping: None,
        }
    }

    pub fn request(&self) -> JobRequest {
        JobRequest {
            name: self.spec.name.clone(),
            priority: self.spec.priority,
            sequence: self.sequence,
            shards: self.spec.shards,
            gpus_per_shard: self.spec.gpus_per_shard,
            runtime: self.spec.runtime.clone(),
        }
    }

    /// Folds in how a shard of its last run ended, reported by `node` after the job came off
    /// its GPUs: a cancel, preemption or pause records the run while the shards are still being
    /// stopped, and their SIGTERM ends them a moment later. Returns whether anything changed.
    pub fn fold_late_end(&mut self, node: &str, status: &pb::ShardStatus) -> bool {
        if !self.shards.is_empty() || !shard_state_ended(status.state) {
            return false;
        }
        let outcome = self.last_run.iter_mut().find(|o| o.shard == status.shard && o.node == node);
        let Some(outcome) = outcome.filter(|o| o.epoch == status.epoch && !o.has_ended()) else {
            return false;
        };
        outcome.state = status.state;
        outcome.exit_code = status.exit_code;
        outcome.signal = status.signal;
        outcome.restarts = status.restarts;
        outcome.message.clone_from(&status.message);
        true
    }

    /// Whether a shard of its last run may still report how it ended (see [`Self::fold_late_end`]).
    pub fn awaits_late_end(&self) -> bool {
        self.shards.is_empty() && self.last_run.iter().any(|o| !o.has_ended())
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
                    message: String::new(),
                })
                .collect(),
            message: self.message.clone(),
            preemptions: self.preemptions,
            progress: None,
            speed_curve: None,
            last_run: self.last_run.iter().map(ShardOutcome::to_proto).collect(),
            submitted_by: self.submitted_by.clone(),
        }
    }

    fn encode(&self) -> Result<Vec<u8>, StoreError> {
        crate::store::encode_json(&job_key(&self.spec.name), self)
    }
}

/// The controller's copy of every job, with the store version each was read at. Memory only:
/// [`JobStore`] writes, and changes it once the store took them.
#[derive(Debug, Default)]
pub struct JobTable {
    jobs: BTreeMap<String, (JobRecord, Version)>,
}

impl JobTable {
    /// Load every job from the store.
    pub async fn load(store: &dyn Store) -> Result<Self, StoreError> {
        let mut jobs = BTreeMap::new();
        for entry in store.list(JOBS_PREFIX).await? {
            let record: JobRecord = crate::store::decode_json(&entry.key, &entry.value)?;
            jobs.insert(record.spec.name.clone(), (record, entry.version));
        }
        Ok(JobTable { jobs })
    }

    pub fn get(&self, name: &str) -> Option<&JobRecord> {
        self.jobs.get(name).map(|(r, _)| r)
    }

    /// The store version `name` was read at.
    pub fn version(&self, name: &str) -> Option<Version> {
        self.jobs.get(name).map(|(_, v)| *v)
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

    fn install(&mut self, record: JobRecord, version: Version) {
        self.jobs.insert(record.spec.name.clone(), (record, version));
    }
}

/// The table behind the controller's lock.
pub type SharedJobs = tokio::sync::Mutex<JobTable>;

/// Writes job records to the store. Writers take turns ([`JobStore::writing`]) and hold no lock
/// on the table while the store works: a pass deciding, or a power call moving caps, never waits
/// on the store for it (ARCHITECTURE.md, invariant 10). Every write is compare-and-swap against
/// the version its writer read, so a change made in between (a cancel during a pass) is never
/// overwritten: the write fails, the record is read again, and the next pass decides anew.
#[derive(Debug)]
pub struct JobStore {
    store: Arc<dyn Store>,
    writing: tokio::sync::Mutex<()>,
}

/// A writer's turn: proof that no other job write is under way.
#[derive(Debug)]
pub struct Writing<'a>(#[allow(dead_code)] tokio::sync::MutexGuard<'a, ()>);

impl JobStore {
    pub fn new(store: Arc<dyn Store>) -> Self {
        JobStore { store, writing: tokio::sync::Mutex::new(()) }
    }

    /// Wait for this writer's turn.
    pub async fn writing(&self) -> Writing<'_> {
        Writing(self.writing.lock().await)
    }

    /// Store a new job, durably, with the next sequence number. Fails with `Conflict` on
    /// `jobs/<name>` if a job of that name exists.
    pub async fn create(
        &self,
        _turn: &Writing<'_>,
        table: &SharedJobs,
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
                stopping: None,
            };
            let key = job_key(&spec.name);
            let writes = vec![
                Write::put(SEQUENCE_KEY, expect, (last + 1).to_string().into_bytes()),
                Write::put(&key, Expect::Absent, record.encode()?),
            ];
            match self.store.commit(writes).await {
                Ok(version) => {
                    table.lock().await.install(record.clone(), version);
                    return Ok(record);
                }
                // Another controller took the sequence number first: take the next one.
                Err(StoreError::Conflict { key: k }) if k == SEQUENCE_KEY => continue,
                Err(e) => return Err(e),
            }
        }
    }

    /// Remove ended jobs by name (compare-and-swap: one changed since it was read stays); how
    /// many were removed. A job that has not ended is never removed.
    pub async fn remove_ended(
        &self,
        _turn: &Writing<'_>,
        table: &SharedJobs,
        names: &[String],
    ) -> Result<usize, StoreError> {
        let mut removed = 0;
        for chunk in names.chunks(MAX_WRITES_PER_COMMIT) {
            let writes: Vec<Write> = {
                let jobs = table.lock().await;
                chunk
                    .iter()
                    .filter_map(|n| jobs.jobs.get(n).filter(|(r, _)| r.state.is_terminal()).map(|(_, v)| (n, *v)))
                    .map(|(n, v)| Write::delete(job_key(n), Expect::Version(v)))
                    .collect()
            };
            if writes.is_empty() {
                continue;
            }
            self.store.commit(writes).await?;
            let mut jobs = table.lock().await;
            for n in chunk {
                if jobs.get(n).is_some_and(|r| r.state.is_terminal()) {
                    jobs.jobs.remove(n);
                    removed += 1;
                }
            }
        }
        Ok(removed)
    }

    /// Write changed records back in as few commits as the store allows (compare-and-swap each
    /// against `read`, the version its writer read — absent: a new record — all-or-nothing per
    /// commit), in order, stopping at the first commit that fails: a later change may depend on
    /// an earlier one (a start on the GPUs a preemption freed). `read` follows each write, so a
    /// record changed twice in one pass expects its first write. Returns how many records, from
    /// the front, were stored; the rest are read again from the store.
    pub async fn update_all(
        &self,
        _turn: &Writing<'_>,
        table: &SharedJobs,
        records: Vec<JobRecord>,
        read: &mut crate::NameMap<String, Version>,
    ) -> (usize, Option<StoreError>) {
        let mut stored = 0;
        for chunk in records.chunks(MAX_WRITES_PER_COMMIT) {
            let writes: Result<Vec<Write>, StoreError> = chunk
                .iter()
                .map(|r| {
                    let expect = read.get(&r.spec.name).map(|v| Expect::Version(*v)).unwrap_or(Expect::Absent);
                    Ok(Write::put(job_key(&r.spec.name), expect, r.encode()?))
                })
                .collect();
            let writes = match writes {
                Ok(writes) => writes,
                Err(e) => return (stored, Some(e)),
            };
            match self.store.commit(writes).await {
                Ok(version) => {
                    let mut jobs = table.lock().await;
                    for r in chunk {
                        read.insert(r.spec.name.clone(), version);
                        jobs.install(r.clone(), version);
                    }
                    stored += chunk.len();
                }
                Err(e) => {
                    for r in &records[stored..] {
                        if let Err(reload) = self.reload(table, &r.spec.name).await {
                            return (stored, Some(reload));
                        }
                    }
                    return (stored, Some(e));
                }
            }
        }
        (stored, None)
    }

    /// One record written back against the version it was read at.
    pub async fn update(&self, turn: &Writing<'_>, table: &SharedJobs, record: JobRecord) -> Result<(), StoreError> {
        let mut read = crate::NameMap::default();
        if let Some(version) = table.lock().await.version(&record.spec.name) {
            read.insert(record.spec.name.clone(), version);
        }
        match self.update_all(turn, table, vec![record], &mut read).await {
            (_, Some(e)) => Err(e),
            (_, None) => Ok(()),
        }
    }

    async fn reload(&self, table: &SharedJobs, name: &str) -> Result<(), StoreError> {
        let entry = self.store.get(&job_key(name)).await?;
        let mut jobs = table.lock().await;
        match entry {
            Some(entry) => {
                let record: JobRecord = crate::store::decode_json(&entry.key, &entry.value)?;
                jobs.install(record, entry.version);
            }
            None => {
                jobs.jobs.remove(name);
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
        let jobs = SharedJobs::new(JobTable::load(store.as_ref()).await.unwrap());
        let writer = JobStore::new(store.clone());
        let turn = writer.writing().await;
        assert_eq!(writer.create(&turn, &jobs, spec("first"), 0, "test").await.unwrap().sequence, 1);
        let current = store.get(SEQUENCE_KEY).await.unwrap().unwrap();
        store.commit(vec![Write::put(SEQUENCE_KEY, Expect::Version(current.version), b"two".to_vec())]).await.unwrap();
        let err = writer.create(&turn, &jobs, spec("second"), 0, "test").await.unwrap_err();
        assert!(matches!(&err, StoreError::Corrupt(m) if m.contains(SEQUENCE_KEY) && m.contains("two")), "{err}");
        assert!(store.get(&job_key("second")).await.unwrap().is_none(), "nothing stored");
    }

    #[tokio::test]
    async fn a_write_decided_on_an_older_version_never_overwrites_a_change_made_since() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(FileStore::open(dir.path().join("s.redb")).unwrap());
        let jobs = SharedJobs::new(JobTable::load(store.as_ref()).await.unwrap());
        let writer = JobStore::new(store.clone());
        let turn = writer.writing().await;
        let record = writer.create(&turn, &jobs, spec("j"), 0, "test").await.unwrap();
        // A pass reads the job...
        let mut read = crate::NameMap::default();
        read.insert("j".to_string(), jobs.lock().await.version("j").unwrap());
        // ...a cancel is stored meanwhile...
        let cancelled = JobRecord { state: JobState::Cancelled, ..record.clone() };
        writer.update(&turn, &jobs, cancelled).await.unwrap();
        // ...and the pass's decision, made before it, is refused and the cancel stands.
        let running = JobRecord { state: JobState::Running, ..record.clone() };
        let (stored, error) = writer.update_all(&turn, &jobs, vec![running.clone(), running], &mut read).await;
        assert_eq!(stored, 0);
        assert!(matches!(error, Some(StoreError::Conflict { .. })), "{error:?}");
        assert_eq!(jobs.lock().await.get("j").unwrap().state, JobState::Cancelled);
        // Two changes of one record in one pass: the second expects the first.
        let mut read = crate::NameMap::default();
        read.insert("j".to_string(), jobs.lock().await.version("j").unwrap());
        let first = JobRecord { message: "one".into(), ..jobs.lock().await.get("j").unwrap().clone() };
        let second = JobRecord { message: "two".into(), ..first.clone() };
        writer.update_all(&turn, &jobs, vec![first], &mut read).await;
        let (stored, error) = writer.update_all(&turn, &jobs, vec![second], &mut read).await;
        assert_eq!((stored, error.is_none()), (1, true));
        assert_eq!(jobs.lock().await.get("j").unwrap().message, "two");
    }
}
