//! The supervisor: runs each shard's `command` as a process group with the environment a
//! `torchrun` worker expects, captures its output, restarts it by exit code, and stops it —
//! SIGTERM to the whole group, a grace period, then SIGKILL — leaving no process behind.
//!
//! - **Start**: argv without a shell, its own process group (so a signal reaches the workers'
//!   own children: data loaders, compilers), stdout and stderr appended to
//!   `<state>/logs/<job>/shard-<n>.log`. A pid file in `<state>/run/` names the group, so an
//!   agent that restarts finds the shards it left running.
//! - **Exit**: 0 is done; 1–127 is the job failing, restarted with backoff up to its
//!   `max_restarts`, then failed; 128 and up (killed by a signal: OOM killer, a node drain) is not
//!   the job's fault and is restarted without counting. After the main process exits, whatever
//!   is left of its group is killed.
//! - **Stop**: SIGTERM to the group (a worker checkpoints on it), then SIGKILL to the group after
//!   the grace period; the shard is reported stopped only once its main process is reaped.
//! - **Logs** rotate by copy-and-truncate once over `LOG_MAX_BYTES`, keeping `LOG_KEEP` old
//!   files: the process keeps appending to the same descriptor, and an agent restart does not
//!   cut a worker's output off.
//! - **Leftovers**: on start the agent stops every group its pid files name that still exists
//!   and still carries the shard's identity in its environment; the controller then orders them
//!   again and they resume from their checkpoints.
//!
//! Process-group lifecycle is here; the state directory's layout and log rotation are in
//! [`state_dir`], the torchrun environment in [`torchrun`].

use std::collections::HashMap;
use std::fs;
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use tokio::sync::watch;
use watt_proto::v1 as pb;

pub mod cgroup;
pub mod identity;
pub mod runtime;
mod state_dir;
mod torchrun;

pub use cgroup::{ShardCgroups, ShardLimits};
pub use identity::ShardUser;
pub use runtime::ShardExec;
pub use state_dir::{log_file, log_file_name, logs_dir, rotate_if_large, StateDir, LOG_KEEP, LOG_MAX_BYTES};
pub use torchrun::worker_env;

use state_dir::rotate_while_running;

const BACKOFF_START: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(30);

/// Everything needed to run one shard at one epoch.
#[derive(Debug, Clone)]
pub struct Launch {
    pub order: pb::ShardOrder,
    /// The default when the order names none.
    pub grace: Duration,
    pub node_cpus: usize,
    /// Simulated GPUs: tell the worker their speed at the cap through a file it reads each step.
    pub simulated: bool,
}

/// What the supervisor tells the shard table: states, and the workers' progress reports.
pub trait Report: crate::progress::ProgressSink {
    fn report(&self, job: &str, shard: u32, epoch: u64, state: pb::ShardState, message: String, last: LastExit);
}

/// How a shard's last process ended (nothing yet: all `None`), and its restarts this epoch.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LastExit {
    pub code: Option<i32>,
    pub signal: Option<i32>,
    pub restarts: u32,
}

impl LastExit {
    fn ended(&mut self, status: ExitStatus) {
        use std::os::unix::process::ExitStatusExt;
        (self.code, self.signal) = (status.code(), status.signal());
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Exit {
    Done,
    Failed(i32),
    Signalled(i32),
}

fn classify(status: ExitStatus) -> Exit {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(0), _) => Exit::Done,
        (Some(c), _) if c >= 128 => Exit::Signalled(c - 128),
        (Some(c), _) => Exit::Failed(c),
        (None, Some(s)) => Exit::Signalled(s),
        (None, None) => Exit::Failed(-1),
    }
}

/// A shard under supervision: its epoch, the switch that stops it, and its task.
type Running = HashMap<(String, u32), (u64, watch::Sender<bool>, tokio::task::JoinHandle<()>)>;

#[derive(Debug)]
pub struct Supervisor {
    state_dir: StateDir,
    running: Mutex<Running>,
    /// Who shards run as; `None`: the agent's own user (see [`identity`]).
    shard_user: Option<ShardUser>,
    /// Each shard's cgroup and its limits, where cgroup v2 can be used (see [`cgroup`]).
    cgroups: Option<(Arc<ShardCgroups>, ShardLimits)>,
    /// The agent's own program, which starts a shard inside its cgroup.
    agent_exe: PathBuf,
    /// Where shards run (see [`runtime`]), and the runtimes this node offers, for messages.
    exec: ShardExec,
    runtimes: Vec<String>,
}

impl Supervisor {
    pub fn new(state_dir: PathBuf) -> Self {
        Supervisor {
            state_dir: StateDir::new(state_dir),
            running: Mutex::new(HashMap::new()),
            shard_user: None,
            cgroups: None,
            agent_exe: PathBuf::from("/proc/self/exe"),
            exec: ShardExec::Agent,
            runtimes: Vec::new(),
        }
    }

    /// Run shards where `exec` says, this node offering `runtimes`.
    pub fn with_exec(mut self, exec: ShardExec, runtimes: Vec<String>) -> Self {
        self.exec = exec;
        self.runtimes = runtimes;
        self
    }

    /// "runtime pytorch-24.10 (the agent's own file system)": what runs `order`'s shard.
    fn runtime_name(&self, order: &pb::ShardOrder) -> String {
        let name = if !order.runtime.is_empty() {
            order.runtime.clone()
        } else if self.runtimes.is_empty() {
            "default".to_string()
        } else {
            self.runtimes.join("/")
        };
        format!("runtime {name} ({})", self.exec.describe())
    }

    /// Start shards in their cgroups through `exe` (a `watt-agent`), not this process's own
    /// program: for tests, whose program is a test harness.
    pub fn with_agent_exe(mut self, exe: PathBuf) -> Self {
        self.agent_exe = exe;
        self
    }

    /// Run each shard in a cgroup of its own under `groups`, with `limits`.
    pub fn with_cgroups(mut self, groups: Option<(Arc<ShardCgroups>, ShardLimits)>) -> Self {
        self.cgroups = groups;
        self
    }

    /// Run shards as `user` (the agent must be root to switch to it).
    pub fn with_shard_user(mut self, user: Option<ShardUser>) -> Self {
        self.shard_user = user;
        self
    }

    /// Where this supervisor keeps its shards' files.
    pub fn dirs(&self) -> &StateDir {
        &self.state_dir
    }

    /// Start supervising `launch`; an earlier epoch of the same shard is stopped first (its
    /// process group gone before the new one starts: same GPUs, same port).
    pub fn start(self: &Arc<Self>, launch: Launch, report: Arc<dyn Report>) {
        let key = (launch.order.job.clone(), launch.order.shard);
        let previous = self.lock().remove(&key);
        let (tx, rx) = watch::channel(false);
        let epoch = launch.order.epoch;
        let me = self.clone();
        let task = tokio::spawn(async move {
            if let Some((_, stop, task)) = previous {
                let _ = stop.send(true);
                let _ = task.await;
            }
            me.supervise(launch, report, rx).await;
        });
        self.lock().insert(key, (epoch, tx, task));
    }

    /// Ask the shard's epoch `epoch` to stop; true if it was running.
    pub fn stop(&self, job: &str, shard: u32, epoch: u64) -> bool {
        let running = self.lock();
        match running.get(&(job.to_owned(), shard)) {
            Some((e, stop, _)) if *e == epoch => stop.send(true).is_ok(),
            _ => false,
        }
    }

    /// Stop every shard and wait for each group to be gone (agent shutdown).
    pub async fn stop_all(&self) {
        let tasks: Vec<_> = self.lock().drain().map(|(_, (_, stop, task))| (stop, task)).collect();
        for (stop, _) in &tasks {
            let _ = stop.send(true);
        }
        for (_, task) in tasks {
            let _ = task.await;
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Running> {
        self.running.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    async fn supervise(&self, launch: Launch, report: Arc<dyn Report>, mut stop: watch::Receiver<bool>) {
        let o = &launch.order;
        let (job, shard, epoch) = (o.job.as_str(), o.shard, o.epoch);
        let say = |state: pb::ShardState, message: String, last: LastExit| {
            report.report(job, shard, epoch, state, message, last)
        };
        let mut last = LastExit::default();
        let grace = if o.grace_period_ms > 0 { Duration::from_millis(o.grace_period_ms) } else { launch.grace };
        let mut restarts = 0u32;
        let mut backoff = BACKOFF_START;
        let _ = fs::create_dir_all(self.state_dir.run_dir());
        let progress_path = self.state_dir.progress_path(job, shard);
        let listener = {
            let (path, job, sink) = (progress_path.clone(), job.to_owned(), report.clone());
            tokio::spawn(async move { crate::progress::listen(&path, job, shard, epoch, sink).await })
        };
        let group = match self.cgroup(&launch) {
            Ok(group) => group,
            Err(e) => {
                tracing::warn!(job, shard, epoch, error = %e, "Cannot make the shard's cgroup.");
                say(pb::ShardState::Failed, e, last);
                return;
            }
        };
        // Stop listening, and leave nothing in the shard's group, whichever way this run ends.
        struct Cleanup(tokio::task::JoinHandle<()>, PathBuf, Option<PathBuf>);
        impl Drop for Cleanup {
            fn drop(&mut self) {
                self.0.abort();
                let _ = fs::remove_file(&self.1);
                if let Some(group) = self.2.take() {
                    tokio::spawn(ShardCgroups::kill_and_remove(group));
                }
            }
        }
        let _cleanup = Cleanup(listener, progress_path, group.clone());
        loop {
            let oom_kills_before = group.as_deref().map_or(0, ShardCgroups::oom_kills);
            let mut child = match self.spawn(&launch, restarts, group.as_deref()) {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(job, shard, epoch, error = %e, "Cannot start shard.");
                    say(pb::ShardState::Failed, e, last);
                    return;
                }
            };
            let pgid = child.id().map(|p| Pid::from_raw(p as i32));
            let runtime = self.runtime_name(o);
            tracing::info!(job, shard, epoch, pid = ?child.id(), restarts, runtime, "Shard process started.");
            say(pb::ShardState::Running, format!("pid {} in {runtime}", child.id().unwrap_or(0)), last);
            let rotation = tokio::spawn(rotate_while_running(self.state_dir.log_path(job, shard)));
            let exited = tokio::select! {
                status = child.wait() => Some(status),
                _ = stop.wait_for(|s| *s) => None,
            };
            let status = match exited {
                Some(status) => status,
                None => {
                    say(
                        pb::ShardState::Stopping,
                        format!("SIGTERM, then SIGKILL after {}", humantime::format_duration(grace)),
                        last,
                    );
                    let status = terminate(&mut child, pgid, grace).await;
                    if let Some(status) = status {
                        last.ended(status);
                    }
                    rotation.abort();
                    let _ = fs::remove_file(self.state_dir.pid_path(job, shard));
                    let _ = fs::remove_file(self.state_dir.speed_path(job, shard));
                    tracing::info!(job, shard, epoch, ?status, "Shard stopped.");
                    say(pb::ShardState::Stopped, "stopped".into(), last);
                    return;
                }
            };
            rotation.abort();
            // The main process is gone; nothing of its group outlives it, nor of its cgroup.
            if let Some(pgid) = pgid {
                let _ = killpg(pgid, Signal::SIGKILL);
            }
            if let Some(group) = &group {
                ShardCgroups::kill_all(group);
            }
            let _ = fs::remove_file(self.state_dir.pid_path(job, shard));
            let status = match status {
                Ok(s) => s,
                Err(e) => {
                    say(pb::ShardState::Failed, format!("cannot wait for the process: {e}"), last);
                    return;
                }
            };
            last.ended(status);
            let why = match classify(status) {
                Exit::Done => {
                    tracing::info!(job, shard, epoch, "Shard finished.");
                    say(pb::ShardState::Succeeded, "exited with code 0".into(), last);
                    return;
                }
                Exit::Failed(code) => {
                    if restarts >= o.max_restarts {
                        let message = format!("exited with code {code}; {} restart(s) used", o.max_restarts);
                        tracing::warn!(job, shard, epoch, code, "Shard failed.");
                        say(pb::ShardState::Failed, message, last);
                        return;
                    }
                    restarts += 1;
                    last.restarts = restarts;
                    format!("exited with code {code}; restart {restarts} of {}", o.max_restarts)
                }
                Exit::Signalled(signal) if group.as_deref().map_or(0, ShardCgroups::oom_kills) > oom_kills_before => {
                    let limit = self.cgroups.as_ref().and_then(|(_, l)| l.for_gpus(o.gpu_indices.len()).memory_bytes);
                    let limit = limit
                        .map_or_else(|| "none".to_string(), |b| format!("{:.1} GiB", b as f64 / f64::from(1 << 30)));
                    format!("killed by signal {signal}: out of memory in its cgroup (limit {limit}); restarting (not counted)")
                }
                Exit::Signalled(signal) => format!("killed by signal {signal}; restarting (not counted)"),
            };
            tracing::warn!(job, shard, epoch, why = %why, "Shard process exited; restarting.");
            say(pb::ShardState::Starting, format!("{why}, in {}", humantime::format_duration(backoff)), last);
            tokio::select! {
                () = tokio::time::sleep(backoff) => {}
                _ = stop.wait_for(|s| *s) => {
                    say(pb::ShardState::Stopped, "stopped".into(), last);
                    return;
                }
            }
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }

    /// The shard's cgroup with its limits written, when shards get one.
    fn cgroup(&self, launch: &Launch) -> Result<Option<PathBuf>, String> {
        let Some((groups, limits)) = &self.cgroups else { return Ok(None) };
        let o = &launch.order;
        groups
            .prepare(&o.job, o.shard, o.epoch, limits.for_gpus(o.gpu_indices.len()))
            .map(Some)
            .map_err(|e| format!("cannot make the shard's cgroup: {e}"))
    }

    fn spawn(
        &self,
        launch: &Launch,
        restarts: u32,
        group: Option<&std::path::Path>,
    ) -> Result<tokio::process::Child, String> {
        let o = &launch.order;
        let Some((program, args)) = o.command.split_first() else {
            return Err("the job has no command".into());
        };
        // Found where it will run, or the shard fails now: no restart would find it either.
        let path = match (o.env.get("PATH"), self.exec) {
            (Some(path), _) => path.clone(),
            // The shard inherits the agent's PATH in its own namespaces; on the host, the usual.
            (None, ShardExec::Agent) => std::env::var("PATH").unwrap_or_else(|_| runtime::DEFAULT_PATH.into()),
            (None, ShardExec::Host { .. }) => runtime::DEFAULT_PATH.into(),
        };
        // Where a relative command is found from: the job's directory, else where the shard
        // starts — the agent's own directory here, the root on the host.
        let workdir = match (o.workdir.is_empty(), self.exec) {
            (false, _) => PathBuf::from(&o.workdir),
            (true, ShardExec::Agent) => std::env::current_dir().unwrap_or_else(|_| PathBuf::from("/")),
            (true, ShardExec::Host { .. }) => PathBuf::from("/"),
        };
        if let Err(missing) = runtime::find_command(&self.exec.root(), program, &path, &workdir.to_string_lossy()) {
            return Err(format!(
                "{}: command {:?} not found (looked in {})",
                self.runtime_name(o),
                missing.program,
                missing.looked_in
            ));
        }
        let log = self.state_dir.log_path(&o.job, o.shard);
        let checkpoints = self.state_dir.checkpoint_dir(o);
        let run = self.state_dir.run_dir();
        let new_checkpoints = !checkpoints.exists();
        for dir in [log.parent().unwrap_or(self.state_dir.root()), &checkpoints, &run] {
            fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        }
        if let Some(user) = &self.shard_user {
            // The shard writes its checkpoints: the agent hands over the directory it made for
            // them (a directory the job names and that exists is the job's to make writable).
            if new_checkpoints || checkpoints.starts_with(self.state_dir.root()) {
                nix::unistd::chown(&checkpoints, Some(user.uid.into()), Some(user.gid.into()))
                    .map_err(|e| format!("cannot give {} to {}: {e}", checkpoints.display(), user.name))?;
            }
        }
        let out = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .map_err(|e| format!("cannot open the log {}: {e}", log.display()))?;
        let err = out.try_clone().map_err(|e| format!("cannot open the log {}: {e}", log.display()))?;
        let host = self.exec.mount_namespace_of();
        let mut cmd = match (group, host) {
            // The agent starts the shard through itself, which joins the group, enters the
            // host's mount namespace and takes the shard's user before the command runs (see
            // `cgroup`).
            (Some(_), _) | (_, Some(_)) => {
                let mut cmd = tokio::process::Command::new(&self.agent_exe);
                let entry = cgroup::ShardEntry {
                    group,
                    user: self.shard_user.as_ref().map(|u| (u.uid, u.gid)),
                    mount_namespace_of: host,
                    workdir: (!o.workdir.is_empty()).then_some(o.workdir.as_str()),
                };
                cmd.args(cgroup::exec_args(&entry, program, args));
                cmd
            }
            (None, None) => {
                let mut cmd = tokio::process::Command::new(program);
                cmd.args(args);
                if let Some(user) = &self.shard_user {
                    // Set in the child before exec; dropping from root also drops its
                    // supplementary groups.
                    cmd.uid(user.uid).gid(user.gid);
                }
                cmd
            }
        };
        cmd.envs(worker_env(o, restarts, &checkpoints, launch.node_cpus))
            .env("WATT_PROGRESS_SOCKET", self.state_dir.progress_path(&o.job, o.shard))
            .env("PATH", &path)
            .stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err))
            .process_group(0)
            .kill_on_drop(false);
        // On the host, the working directory is entered there (it may not exist here).
        if !o.workdir.is_empty() && host.is_none() {
            cmd.current_dir(&o.workdir);
        }
        if launch.simulated {
            let speed = self.state_dir.speed_path(&o.job, o.shard);
            if !speed.exists() {
                let _ = fs::write(&speed, "1\n");
            }
            cmd.env("WATT_SIM_SPEED_FILE", speed);
        }
        let child = cmd.spawn().map_err(|e| format!("cannot start {program:?}: {e}"))?;
        let pid = child.id().unwrap_or(0);
        let _ = fs::write(self.state_dir.pid_path(&o.job, o.shard), format!("{pid} {}\n", o.epoch));
        Ok(child)
    }

    /// Stop every shard an earlier run of the agent left running (see the module header).
    /// Returns the (job, shard) of each one stopped.
    pub async fn stop_leftovers(&self, grace: Duration) -> Vec<(String, u32)> {
        let stopped = self.stop_leftover_groups(grace).await;
        // What left its process group but not its cgroup goes too: no shard runs yet, so every
        // shard's group there is an earlier run's.
        if let Some((groups, _)) = &self.cgroups {
            groups.clear_leftovers().await;
        }
        stopped
    }

    async fn stop_leftover_groups(&self, grace: Duration) -> Vec<(String, u32)> {
        let Ok(entries) = fs::read_dir(self.state_dir.run_dir()) else { return Vec::new() };
        let mut stopped = Vec::new();
        for entry in entries.filter_map(Result::ok) {
            let path = entry.path();
            let Some((job, shard)) = path
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_suffix(".pid"))
                .and_then(|n| n.rsplit_once('.'))
                .and_then(|(j, s)| Some((j.to_owned(), s.parse::<u32>().ok()?)))
            else {
                continue;
            };
            let pid = fs::read_to_string(&path).ok().and_then(|s| s.split_whitespace().next()?.parse::<i32>().ok());
            let _ = fs::remove_file(&path);
            let Some(pid) = pid else { continue };
            // Ours only if the process still carries this shard's identity.
            let identity = format!("WATT_SHARD={job}/{shard}");
            let environ = fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
            if !environ.split(|b| *b == 0).any(|v| v == identity.as_bytes()) {
                continue;
            }
            tracing::warn!(job, shard, pid, "Stopping a shard left running by an earlier run of the agent.");
            let pgid = Pid::from_raw(pid);
            let _ = killpg(pgid, Signal::SIGTERM);
            let deadline = tokio::time::Instant::now() + grace;
            while killpg(pgid, None).is_ok() && tokio::time::Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            let _ = killpg(pgid, Signal::SIGKILL);
            stopped.push((job, shard));
        }
        stopped
    }
}

/// SIGTERM to the group, SIGKILL after `grace`, then reap the main process.
async fn terminate(child: &mut tokio::process::Child, pgid: Option<Pid>, grace: Duration) -> Option<ExitStatus> {
    let Some(pgid) = pgid else { return child.wait().await.ok() };
    let _ = killpg(pgid, Signal::SIGTERM);
    let status = match tokio::time::timeout(grace, child.wait()).await {
        Ok(status) => status.ok(),
        Err(_) => {
            tracing::warn!(pgid = pgid.as_raw(), "Grace period over; killing the process group.");
            let _ = killpg(pgid, Signal::SIGKILL);
            child.wait().await.ok()
        }
    };
    // Children that outlived the main process, or ignored SIGTERM.
    let _ = killpg(pgid, Signal::SIGKILL);
    status
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    /// Collects what the supervisor reports.
    #[derive(Debug, Default)]
    struct Log {
        seen: Mutex<Vec<(pb::ShardState, String)>>,
        changed: tokio::sync::Notify,
    }

    impl crate::progress::ProgressSink for Log {
        fn progress(&self, _: &str, _: u32, _: u64, _: crate::progress::WorkerProgress) {}
    }

    impl Report for Log {
        fn report(&self, _: &str, _: u32, _: u64, state: pb::ShardState, message: String, _: LastExit) {
            self.seen.lock().unwrap_or_else(std::sync::PoisonError::into_inner).push((state, message));
            self.changed.notify_waiters();
        }
    }

    impl Log {
        fn all(&self) -> Vec<(pb::ShardState, String)> {
            self.seen.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
        }

        /// Wait (real time) until a report in `state` arrives; its message.
        async fn until(&self, state: pb::ShardState) -> String {
            let wait = async {
                loop {
                    let notified = self.changed.notified();
                    if let Some((_, m)) = self.all().into_iter().rev().find(|(s, _)| *s == state) {
                        return m;
                    }
                    notified.await;
                }
            };
            match tokio::time::timeout(Duration::from_secs(20), wait).await {
                Ok(m) => m,
                Err(_) => panic!("no {state:?} report; saw {:?}", self.all()),
            }
        }
    }

    fn order(command: &[&str], max_restarts: u32) -> pb::ShardOrder {
        pb::ShardOrder {
            epoch: 7,
            job: "train".into(),
            shard: 1,
            action: pb::ShardAction::Start as i32,
            rank: 1,
            world_size: 4,
            gpu_indices: vec![2, 3],
            master_addr: "node-a".into(),
            master_port: 29_501,
            command: command.iter().map(|s| s.to_string()).collect(),
            env: [("MY_VAR".to_string(), "mine".to_string())].into(),
            max_restarts,
            ..Default::default()
        }
    }

    fn start(state: &Path, order: pb::ShardOrder, grace: Duration) -> (Arc<Supervisor>, Arc<Log>) {
        let supervisor = Arc::new(Supervisor::new(state.to_owned()));
        let log = Arc::new(Log::default());
        supervisor.start(Launch { order, grace, node_cpus: 8, simulated: false }, log.clone());
        (supervisor, log)
    }

    /// Killed processes are reaped by init, a moment later: wait for the group to be gone.
    async fn gone(pgid: Pid) -> bool {
        for _ in 0..100 {
            if killpg(pgid, None).is_err() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        false
    }

    /// The pid in "pid 4711 in runtime …".
    fn pid_of(running_message: &str) -> Pid {
        let pid = running_message.trim_start_matches("pid ").split(' ').next().unwrap_or_default();
        Pid::from_raw(pid.parse().unwrap_or(0))
    }

    #[tokio::test]
    async fn a_stop_leaves_no_process_of_the_group_behind_grandchildren_included() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let script = "sleep 300 & sleep 300 & echo started; wait";
        let (supervisor, log) = start(dir.path(), order(&["sh", "-c", script], 0), Duration::from_secs(5));
        let pgid = pid_of(&log.until(pb::ShardState::Running).await);
        assert!(killpg(pgid, None).is_ok(), "the group runs");
        assert!(supervisor.stop("train", 1, 7));
        log.until(pb::ShardState::Stopped).await;
        assert!(gone(pgid).await, "no process of the group is left");
        assert!(!supervisor.dirs().pid_path("train", 1).exists());
    }

    #[tokio::test]
    async fn a_worker_that_ignores_sigterm_is_killed_after_the_grace_period() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let script = "trap '' TERM; echo ready; while true; do sleep 0.05; done";
        let (supervisor, log) = start(dir.path(), order(&["sh", "-c", script], 0), Duration::from_millis(700));
        let pgid = pid_of(&log.until(pb::ShardState::Running).await);
        // Only once the trap is set does the worker ignore SIGTERM.
        while !fs::read_to_string(supervisor.dirs().log_path("train", 1)).unwrap_or_default().contains("ready") {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let asked = tokio::time::Instant::now();
        supervisor.stop("train", 1, 7);
        log.until(pb::ShardState::Stopped).await;
        let took = asked.elapsed();
        assert!(took >= Duration::from_millis(650), "SIGKILL only after the grace period: {took:?}");
        assert!(took < Duration::from_secs(5), "{took:?}");
        assert!(gone(pgid).await);
    }

    #[tokio::test]
    async fn output_is_captured_and_the_torchrun_environment_is_set() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let (supervisor, log) =
            start(dir.path(), order(&["sh", "-c", "env; echo to-stderr >&2"], 0), Duration::from_secs(1));
        assert_eq!(log.until(pb::ShardState::Succeeded).await, "exited with code 0");
        let text = fs::read_to_string(supervisor.dirs().log_path("train", 1)).unwrap_or_default();
        for want in [
            "RANK=1\n",
            "LOCAL_RANK=0\n",
            "WORLD_SIZE=4\n",
            "LOCAL_WORLD_SIZE=1\n",
            "GROUP_RANK=1\n",
            "ROLE_RANK=1\n",
            "MASTER_ADDR=node-a\n",
            "MASTER_PORT=29501\n",
            "TORCHELASTIC_RESTART_COUNT=0\n",
            "TORCHELASTIC_MAX_RESTARTS=0\n",
            "TORCHELASTIC_RUN_ID=train-7\n",
            "CUDA_VISIBLE_DEVICES=2,3\n",
            "OMP_NUM_THREADS=4\n",
            "WATT_SHARD=train/1\n",
            "WATT_PROGRESS_SOCKET=",
            "MY_VAR=mine\n",
            "to-stderr\n",
        ] {
            assert!(text.contains(want), "{want:?} in {text}");
        }
        let checkpoints = format!("WATT_CHECKPOINT_DIR={}\n", dir.path().join("checkpoints/train").display());
        assert!(text.contains(&checkpoints), "{text}");
    }

    #[tokio::test]
    async fn failures_restart_up_to_max_restarts_and_signals_do_not_count() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let (_s, log) = start(dir.path(), order(&["sh", "-c", "echo try; exit 3"], 1), Duration::from_secs(1));
        let failed = log.until(pb::ShardState::Failed).await;
        assert_eq!(failed, "exited with code 3; 1 restart(s) used");
        let starts = log.all().iter().filter(|(s, _)| *s == pb::ShardState::Running).count();
        assert_eq!(starts, 2, "the first run and one restart: {:?}", log.all());
        assert!(log.all().iter().any(|(s, m)| *s == pb::ShardState::Starting && m.contains("restart 1 of 1")));

        // Killed by a signal: not the job's fault, restarted even with no restarts allowed.
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let (supervisor, log) = start(dir.path(), order(&["sh", "-c", "kill -9 $$"], 0), Duration::from_secs(1));
        let restarting = log.until(pb::ShardState::Starting).await;
        assert!(restarting.contains("killed by signal 9"), "{restarting}");
        supervisor.stop_all().await;
        assert!(log.all().iter().all(|(s, _)| *s != pb::ShardState::Failed), "{:?}", log.all());
    }

    #[tokio::test]
    async fn a_command_that_does_not_exist_fails_with_its_name() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let (_s, log) = start(dir.path(), order(&["/no/such/trainer", "--x"], 3), Duration::from_secs(1));
        let failed = log.until(pb::ShardState::Failed).await;
        assert!(failed.contains("runtime default") && failed.contains("\"/no/such/trainer\" not found"), "{failed}");
        // At once: no restart for a command the runtime does not have.
        assert!(log.all().iter().all(|(s, _)| *s != pb::ShardState::Running), "{:?}", log.all());
        // A name looked up on the PATH the shard gets: the agent's own here.
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let (_s, log) = start(dir.path(), order(&["no-such-trainer"], 3), Duration::from_secs(1));
        let failed = log.until(pb::ShardState::Failed).await;
        assert!(failed.contains("looked in PATH"), "{failed}");
    }

    #[tokio::test]
    async fn shards_left_running_by_an_earlier_agent_are_found_and_stopped() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let (first, log) = start(dir.path(), order(&["sh", "-c", "sleep 300 & wait"], 0), Duration::from_secs(1));
        let pgid = pid_of(&log.until(pb::ShardState::Running).await);
        // The agent "crashes": its supervision is gone, the group is not.
        for (_, (_, _, task)) in first.lock().drain() {
            task.abort();
        }
        let again = Supervisor::new(dir.path().to_owned());
        assert_eq!(again.stop_leftovers(Duration::from_secs(2)).await, vec![("train".to_string(), 1)]);
        assert!(gone(pgid).await, "the leftover group is gone");
        assert!(again.stop_leftovers(Duration::from_secs(2)).await.is_empty());
    }
}
