//! Each shard in a cgroup v2 group of its own with a memory and a pids limit, so that a job that
//! leaks memory or forks without end is stopped by the kernel before it takes the node — and
//! the agent, which keeps the node inside its power budget — down with it.
//!
//! Layout, under the group the agent was started in (`<own>`, from `/proc/self/cgroup`):
//!
//! - `<own>/agent`: the agent itself. A group that holds processes cannot hand controllers down
//!   to its children, so the agent moves into a leaf first.
//! - `<own>/shard.<job>.<n>.<epoch>`: one per shard and epoch (the group of an epoch that
//!   ended is emptied and removed while the next may already run), with `memory.max`, `pids.max`, no swap, and
//!   `memory.oom.group` set, so an out-of-memory kill takes the whole shard (a half-killed
//!   training job is worse than a failed one).
//!
//! A shard's first process joins its group before the job's command runs: the agent starts it
//! through itself (`watt-agent __shard-exec`), which writes its own pid into the group, takes the
//! shard's user and execs the command, so nothing the job starts runs outside the group.
//!
//! Where cgroup v2 is not mounted, its memory or pids controller is not available, or the tree
//! cannot be written (a container without a writable cgroup mount, a systemd unit without
//! `Delegate=`), shards run without these limits and the agent says why once, at start.

use std::ffi::OsString;
use std::io;
use std::path::{Path, PathBuf};

/// The hidden first argument that makes `watt-agent` the shard's first process (see the module
/// header).
pub const EXEC_ARG: &str = "__shard-exec";

/// Where cgroup v2 is mounted.
pub const MOUNT: &str = "/sys/fs/cgroup";

/// Default `pids.max` per shard: room for data-loader workers and their threads, not for a
/// fork bomb.
pub const DEFAULT_PIDS: u64 = 32_768;

/// The limits of one shard's group; `None` is no limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub memory_bytes: Option<u64>,
    pub pids: Option<u64>,
}

/// What each shard's group is given on this node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShardLimits {
    pub memory: MemoryPolicy,
    pub pids: Option<u64>,
    pub node_gpus: usize,
    pub node_memory_bytes: u64,
}

impl ShardLimits {
    /// The limits of a shard on `gpus` of the node's GPUs.
    pub fn for_gpus(&self, gpus: usize) -> Limits {
        Limits { memory_bytes: self.memory.for_shard(gpus, self.node_gpus, self.node_memory_bytes), pids: self.pids }
    }
}

/// How much memory each shard may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemoryPolicy {
    /// The node's memory in proportion to the GPUs the shard holds (4 of 8 GPUs: half).
    GpuShare,
    Bytes(u64),
    Unlimited,
}

impl MemoryPolicy {
    /// `auto`, `none`, or a size: bytes, or with a unit (`64GiB`, `512MiB`, `1TiB`, `80GB`).
    pub fn parse(text: &str) -> Result<MemoryPolicy, String> {
        match text.trim() {
            "auto" => Ok(MemoryPolicy::GpuShare),
            "none" => Ok(MemoryPolicy::Unlimited),
            size => parse_size(size).map(MemoryPolicy::Bytes),
        }
    }

    /// The limit for a shard on `shard_gpus` of the node's `node_gpus`, on a node with
    /// `node_bytes` of memory.
    pub fn for_shard(self, shard_gpus: usize, node_gpus: usize, node_bytes: u64) -> Option<u64> {
        match self {
            MemoryPolicy::GpuShare if node_gpus > 0 && node_bytes > 0 => {
                let share = (node_bytes as u128 * shard_gpus.min(node_gpus) as u128 / node_gpus as u128) as u64;
                Some(share.max(1 << 30))
            }
            MemoryPolicy::GpuShare | MemoryPolicy::Unlimited => None,
            MemoryPolicy::Bytes(bytes) => Some(bytes),
        }
    }
}

fn parse_size(text: &str) -> Result<u64, String> {
    let digits = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
    let (number, unit) = text.split_at(digits);
    let number: u64 = number.parse().map_err(|_| format!("{text:?} is not auto, none or a size such as 64GiB"))?;
    let scale: u64 = match unit.trim() {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "TiB" => 1 << 40,
        "KB" | "kB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        "TB" => 1_000_000_000_000,
        other => {
            return Err(format!("unknown unit {other:?} in {text:?}: use B, KiB, MiB, GiB, TiB, KB, MB, GB or TB"))
        }
    };
    let bytes = number.checked_mul(scale).ok_or_else(|| format!("{text:?} is too large"))?;
    if bytes < 1 << 20 {
        return Err(format!("{text:?} is under 1 MiB: no training process starts in that"));
    }
    Ok(bytes)
}

/// Why shards run without limits here.
#[derive(Debug, thiserror::Error)]
pub enum Unavailable {
    #[error("this process is not in a cgroup v2 hierarchy (cgroup v1 or hybrid)")]
    NotV2,
    #[error("the {0} controller is not available in {1}")]
    NoController(&'static str, String),
    #[error("cannot write {path}: {error} (a container needs a writable cgroup mount; a systemd unit, Delegate=memory pids)")]
    NotWritable { path: String, error: io::Error },
}

/// The agent's own group, set up to hold shards' groups.
#[derive(Debug)]
pub struct ShardCgroups {
    own: PathBuf,
}

/// The directory of the agent's own group: `mount` is where cgroup v2 is mounted,
/// `self_cgroup` what `/proc/self/cgroup` says.
pub fn own_group(mount: &Path, self_cgroup: &str) -> Result<PathBuf, Unavailable> {
    // cgroup v2 is the one line "0::<path>"; under v1 or hybrid there are others, and the
    // controllers are not on the v2 hierarchy.
    if self_cgroup.lines().any(|l| !l.starts_with("0::")) {
        return Err(Unavailable::NotV2);
    }
    let path = self_cgroup.lines().find_map(|l| l.strip_prefix("0::")).ok_or(Unavailable::NotV2)?;
    Ok(mount.join(path.trim().trim_start_matches('/')))
}

impl ShardCgroups {
    /// Move the agent into `<own>/agent` and hand the memory and pids controllers down to the
    /// children of `own`.
    pub fn set_up(own: &Path) -> Result<ShardCgroups, Unavailable> {
        let own = own.to_path_buf();
        let controllers = std::fs::read_to_string(own.join("cgroup.controllers")).unwrap_or_default();
        for wanted in ["memory", "pids"] {
            if !controllers.split_whitespace().any(|c| c == wanted) {
                return Err(Unavailable::NoController(wanted, own.display().to_string()));
            }
        }
        let write = |path: PathBuf, text: &str| {
            std::fs::write(&path, text)
                .map_err(|error| Unavailable::NotWritable { path: path.display().to_string(), error })
        };
        let leaf = own.join("agent");
        if let Err(error) = std::fs::create_dir(&leaf) {
            if error.kind() != io::ErrorKind::AlreadyExists {
                return Err(Unavailable::NotWritable { path: leaf.display().to_string(), error });
            }
        }
        write(leaf.join("cgroup.procs"), &std::process::id().to_string())?;
        write(own.join("cgroup.subtree_control"), "+memory +pids")?;
        Ok(ShardCgroups { own })
    }

    /// The group shards' groups go under.
    pub fn dir(&self) -> &Path {
        &self.own
    }

    /// The group of shard `shard` of `job` at `epoch`, made (or reused) with `limits` in force.
    pub fn prepare(&self, job: &str, shard: u32, epoch: u64, limits: Limits) -> io::Result<PathBuf> {
        let dir = self.own.join(format!("shard.{job}.{shard}.{epoch}"));
        if let Err(e) = std::fs::create_dir(&dir) {
            if e.kind() != io::ErrorKind::AlreadyExists {
                return Err(e);
            }
        }
        let limit = |value: Option<u64>| value.map_or_else(|| "max".to_string(), |v| v.to_string());
        std::fs::write(dir.join("memory.max"), limit(limits.memory_bytes))?;
        std::fs::write(dir.join("pids.max"), limit(limits.pids))?;
        // Not every kernel has these; the limits above are what matters.
        let _ = std::fs::write(dir.join("memory.swap.max"), "0");
        let _ = std::fs::write(dir.join("memory.oom.group"), "1");
        Ok(dir)
    }

    /// How many times the kernel's OOM killer struck in the group at `dir`.
    pub fn oom_kills(dir: &Path) -> u64 {
        let events = std::fs::read_to_string(dir.join("memory.events")).unwrap_or_default();
        events.lines().find_map(|l| l.strip_prefix("oom_kill ")).and_then(|n| n.trim().parse().ok()).unwrap_or(0)
    }

    /// Empty and remove every shard's group under this one: at start, they are an earlier run's.
    pub async fn clear_leftovers(&self) {
        let Ok(entries) = std::fs::read_dir(&self.own) else { return };
        for entry in entries.filter_map(Result::ok) {
            if entry.file_name().to_string_lossy().starts_with("shard.") && entry.path().is_dir() {
                tracing::warn!(group = %entry.path().display(), "Emptying a shard's cgroup left by an earlier run of the agent.");
                Self::kill_and_remove(entry.path()).await;
            }
        }
    }

    /// Kill whatever is left in a shard's group, between two runs of its command.
    pub fn kill_all(dir: &Path) {
        let _ = kill(dir);
    }

    /// Kill whatever is left in a shard's group — processes that left its process group
    /// included — and remove the group. Kernels before 5.14 have no `cgroup.kill`: there the
    /// process-group kill is all, and a group still in use stays.
    pub async fn kill_and_remove(dir: PathBuf) {
        let _ = kill(&dir);
        // The kill is asynchronous; the group can be removed once it is empty.
        for _ in 0..50 {
            match std::fs::remove_dir(&dir) {
                Ok(()) => return,
                Err(e) if e.kind() == io::ErrorKind::NotFound => return,
                Err(_) => tokio::time::sleep(std::time::Duration::from_millis(10)).await,
            }
        }
    }
}

/// `cgroup.kill` (Linux 5.14+): every process in the group, SIGKILL. Opened, never created: an
/// older kernel has no such file.
fn kill(dir: &Path) -> io::Result<()> {
    use std::io::Write;
    std::fs::OpenOptions::new().write(true).open(dir.join("cgroup.kill"))?.write_all(b"1")
}

/// Where a shard's first process goes before it becomes the job's command (see
/// [`exec_in_group`]); `None`s are left as they are.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ShardEntry<'a> {
    /// Its cgroup.
    pub group: Option<&'a Path>,
    /// Its user and group (uid, gid).
    pub user: Option<(u32, u32)>,
    /// The mount namespace of this process (host execution), and the working directory there.
    pub mount_namespace_of: Option<u32>,
    pub workdir: Option<&'a str>,
}

/// The command line that starts `program args` as a shard's first process, entering `entry`:
/// `<agent> __shard-exec GROUP UID GID NS WORKDIR -- PROGRAM ARGS...` ("-" for none).
pub fn exec_args(entry: &ShardEntry<'_>, program: &str, args: &[String]) -> Vec<OsString> {
    let id = |v: Option<u32>| v.map_or_else(|| "-".to_string(), |v| v.to_string());
    let mut out: Vec<OsString> = vec![
        EXEC_ARG.into(),
        entry.group.map_or_else(|| OsString::from("-"), OsString::from),
        id(entry.user.map(|u| u.0)).into(),
        id(entry.user.map(|u| u.1)).into(),
        id(entry.mount_namespace_of).into(),
        entry.workdir.unwrap_or("-").into(),
        "--".into(),
        program.into(),
    ];
    out.extend(args.iter().map(OsString::from));
    out
}

/// The shard's first process (the arguments after `__shard-exec`, see [`exec_args`]): join the
/// group, enter the host's mount namespace and the working directory there, take the user,
/// exec the job's command. Returns only on failure, with the reason; the caller exits with 127,
/// as a shell does for a command it cannot run.
pub fn exec_in_group(args: &[OsString]) -> String {
    use std::os::unix::process::CommandExt;
    let [group, uid, gid, ns, workdir, dashes, program, rest @ ..] = args else {
        return format!("{EXEC_ARG}: expected GROUP UID GID NS WORKDIR -- PROGRAM [ARGS...]");
    };
    if dashes != "--" {
        return format!("{EXEC_ARG}: expected -- before the program");
    }
    // Writing 0 moves the process that writes it: this one, and whatever it will start. Before
    // entering the host's mount namespace: the group's path is the agent's view of cgroupfs.
    if group != "-" {
        if let Err(e) = std::fs::write(Path::new(group).join("cgroup.procs"), "0") {
            return format!("cannot join the shard's cgroup {}: {e}", Path::new(group).display());
        }
    }
    let id = |v: &OsString| v.to_str().filter(|s| *s != "-").map(str::parse::<u32>);
    if let Some(pid) = id(ns) {
        let Ok(pid) = pid else { return format!("{EXEC_ARG}: bad namespace pid {ns:?}") };
        let workdir = if workdir == "-" { Path::new("/") } else { Path::new(workdir) };
        if let Err(e) = super::runtime::enter_mount_namespace(pid, workdir) {
            return e;
        }
    }
    let mut command = std::process::Command::new(program);
    command.args(rest);
    match (id(uid), id(gid)) {
        // Dropping from root also drops its supplementary groups (std clears them).
        (Some(Ok(uid)), Some(Ok(gid))) => {
            command.uid(uid).gid(gid);
        }
        (None, None) => {}
        _ => return format!("{EXEC_ARG}: bad user {uid:?}:{gid:?}"),
    }
    let error = command.exec();
    format!("cannot start {program:?}: {error}")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A cgroup v2 tree as the kernel shows it, in a directory: the agent's group and its
    /// controllers.
    fn tree(controllers: &str) -> (tempfile::TempDir, PathBuf) {
        let root = tempfile::tempdir().unwrap();
        let own = root.path().join("system.slice/watt-agent.service");
        std::fs::create_dir_all(&own).unwrap();
        std::fs::write(own.join("cgroup.controllers"), controllers).unwrap();
        (root, own)
    }

    #[test]
    fn the_agent_moves_into_a_leaf_and_hands_memory_and_pids_down() {
        let (root, own) = tree("cpuset cpu io memory hugetlb pids rdma misc");
        let own_dir = own_group(root.path(), "0::/system.slice/watt-agent.service\n").unwrap();
        assert_eq!(own_dir, own);
        let groups = ShardCgroups::set_up(&own_dir).unwrap();
        assert_eq!(std::fs::read_to_string(own.join("agent/cgroup.procs")).unwrap(), std::process::id().to_string());
        assert_eq!(std::fs::read_to_string(own.join("cgroup.subtree_control")).unwrap(), "+memory +pids");
        let limits = Limits { memory_bytes: Some(64 << 30), pids: None };
        let dir = groups.prepare("llama", 3, 7, limits).unwrap();
        assert_eq!(dir, own.join("shard.llama.3.7"));
        assert_eq!(std::fs::read_to_string(dir.join("memory.max")).unwrap(), (64u64 << 30).to_string());
        assert_eq!(std::fs::read_to_string(dir.join("pids.max")).unwrap(), "max");
        assert_eq!(std::fs::read_to_string(dir.join("memory.oom.group")).unwrap(), "1");
        // Prepared again (a restart of the shard): the same group, the limits written again.
        assert_eq!(groups.prepare("llama", 3, 7, Limits { memory_bytes: None, pids: Some(100) }).unwrap(), dir);
        assert_eq!(std::fs::read_to_string(dir.join("pids.max")).unwrap(), "100");
        std::fs::write(dir.join("memory.events"), "low 0\nhigh 0\nmax 4\noom 1\noom_kill 2\n").unwrap();
        assert_eq!(ShardCgroups::oom_kills(&dir), 2);
    }

    #[tokio::test]
    async fn an_earlier_runs_shard_groups_are_emptied_and_removed_at_start() {
        let (_root, own) = tree("memory pids");
        let groups = ShardCgroups::set_up(&own).unwrap();
        // As the kernel shows an empty group after cgroup.kill: removable.
        std::fs::create_dir(own.join("shard.old.0.4")).unwrap();
        groups.clear_leftovers().await;
        assert!(!own.join("shard.old.0.4").exists());
        assert!(own.join("agent").exists(), "the agent's own group stays");
    }

    #[test]
    fn without_v2_or_its_controllers_shards_run_unlimited_and_the_reason_is_named() {
        let (root, own) = tree("cpu io");
        let v1 = "12:memory:/x\n0::/system.slice/watt-agent.service\n";
        assert!(matches!(own_group(root.path(), v1), Err(Unavailable::NotV2)));
        let e = ShardCgroups::set_up(&own).unwrap_err();
        assert!(matches!(e, Unavailable::NoController("memory", _)), "{e}");
        let (_root, own) = tree("memory");
        let e = ShardCgroups::set_up(&own).unwrap_err();
        assert!(matches!(e, Unavailable::NoController("pids", _)), "{e}");
    }

    #[test]
    fn memory_is_a_share_of_the_node_by_gpus_or_a_size() {
        let node = 2u64 << 40;
        assert_eq!(MemoryPolicy::parse("auto").unwrap().for_shard(2, 8, node), Some(512 << 30));
        assert_eq!(MemoryPolicy::parse("auto").unwrap().for_shard(8, 8, node), Some(node));
        assert_eq!(MemoryPolicy::parse("auto").unwrap().for_shard(1, 8, 0), None, "unknown node memory");
        assert_eq!(MemoryPolicy::parse("none").unwrap().for_shard(1, 8, node), None);
        assert_eq!(MemoryPolicy::parse("64GiB").unwrap(), MemoryPolicy::Bytes(64 << 30));
        assert_eq!(MemoryPolicy::parse("80GB").unwrap(), MemoryPolicy::Bytes(80_000_000_000));
        assert_eq!(MemoryPolicy::parse("1073741824").unwrap(), MemoryPolicy::Bytes(1 << 30));
        assert_eq!(MemoryPolicy::parse(" 64 GiB ").unwrap(), MemoryPolicy::Bytes(64 << 30));
        for bad in ["lots", "12XB", "100", "99999999999TiB", "-1GiB"] {
            assert!(MemoryPolicy::parse(bad).is_err(), "{bad}");
        }
    }
}
