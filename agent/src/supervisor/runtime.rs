//! Where a shard runs, and finding its command there before it starts.
//!
//! - [`ShardExec::Agent`]: in the agent's own namespaces — in a container, its image (the
//!   chart's `agent.image`, built on a site's training image: `docker/watt-agent.Dockerfile`).
//! - [`ShardExec::Host`]: in the host's: the agent runs in the host's PID namespace (the chart's
//!   `hostPID`), and each shard's first process enters the mount namespace of the host's init
//!   before the job's command runs, so the command sees the host's files — a shared file system,
//!   environment modules, conda — with the same process group, cgroup, user, environment, logs
//!   and stop path as any shard.
//!
//! Either way the command is looked up in that file system before the shard starts: a command
//! the runtime does not have fails the shard at once, naming the runtime and the command, rather
//! than after its restarts.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// Where shards run (`--shard-exec`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ShardExec {
    #[default]
    Agent,
    /// In the host's mount namespace: that of process `pid` (the host's init, 1, with hostPID).
    Host { pid: u32 },
}

/// Where commands are looked for when the job's environment sets no PATH: the usual one.
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

impl ShardExec {
    /// The root of the file system shards see, as the agent reaches it.
    pub fn root(self) -> PathBuf {
        match self {
            ShardExec::Agent => PathBuf::from("/"),
            ShardExec::Host { pid } => PathBuf::from(format!("/proc/{pid}/root")),
        }
    }

    /// "the host's" or "the agent's", for messages.
    pub fn describe(self) -> &'static str {
        match self {
            ShardExec::Agent => "the agent's own file system",
            ShardExec::Host { .. } => "the host's file system",
        }
    }

    /// The mount namespace a shard's first process enters, if any.
    pub fn mount_namespace_of(self) -> Option<u32> {
        match self {
            ShardExec::Agent => None,
            ShardExec::Host { pid } => Some(pid),
        }
    }

    /// At start, for host execution: the host's mount namespace can be entered from here.
    pub fn check(self) -> Result<(), String> {
        let ShardExec::Host { pid } = self else { return Ok(()) };
        let ns = format!("/proc/{pid}/ns/mnt");
        std::fs::File::open(&ns).map(drop).map_err(|e| {
            format!(
                "--shard-exec host: cannot open {ns} ({e}): the agent must run as root in the host's PID namespace (the chart's agent.shardExec: host sets hostPID and the privileges it needs)"
            )
        })
    }
}

/// Why a shard's command cannot run in its runtime.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Missing {
    pub program: String,
    /// Where it was looked for.
    pub looked_in: String,
}

/// Finds `program` as the shard will: a path (relative ones from `workdir`), or a name on `path`,
/// in the file system under `root`. A symbolic link counts as found: its target may be absolute,
/// which only the shard itself resolves in its own namespace.
pub fn find_command(root: &Path, program: &str, path: &str, workdir: &str) -> Result<(), Missing> {
    let under_root = |p: &Path| root.join(p.strip_prefix("/").unwrap_or(p));
    let runnable = |p: &Path| match std::fs::symlink_metadata(p) {
        Ok(m) if m.file_type().is_symlink() => true,
        Ok(m) => m.is_file() && m.permissions().mode() & 0o111 != 0,
        Err(_) => false,
    };
    if program.contains('/') {
        let full = if program.starts_with('/') { PathBuf::from(program) } else { Path::new(workdir).join(program) };
        return if runnable(&under_root(&full)) {
            Ok(())
        } else {
            Err(Missing { program: program.into(), looked_in: full.display().to_string() })
        };
    }
    let found =
        path.split(':').filter(|d| !d.is_empty()).any(|dir| runnable(&under_root(&Path::new(dir).join(program))));
    if found {
        Ok(())
    } else {
        Err(Missing { program: program.into(), looked_in: format!("PATH {path}") })
    }
}

/// Enter the mount namespace of process `pid` (a shard's first process, single-threaded, before
/// it becomes the job's command), then the working directory `workdir` there.
pub fn enter_mount_namespace(pid: u32, workdir: &Path) -> Result<(), String> {
    let ns = format!("/proc/{pid}/ns/mnt");
    let file = std::fs::File::open(&ns).map_err(|e| format!("cannot open {ns}: {e}"))?;
    nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNS)
        .map_err(|e| format!("cannot enter the host's mount namespace ({ns}): {e}"))?;
    // Entering it moved this process to that namespace's root: back to the shard's directory.
    std::env::set_current_dir(workdir)
        .map_err(|e| format!("cannot enter the working directory {} on the host: {e}", workdir.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_are_found_on_path_by_path_and_from_the_working_directory_under_the_runtimes_root() {
        let root = tempfile::tempdir().unwrap();
        let bin = root.path().join("opt/conda/bin");
        std::fs::create_dir_all(&bin).unwrap();
        std::fs::write(bin.join("torchrun"), "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(bin.join("torchrun"), std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::write(bin.join("notes.txt"), "not a program").unwrap();
        std::os::unix::fs::symlink("/elsewhere/python3.11", bin.join("python")).unwrap();
        let path = "/usr/bin:/opt/conda/bin";
        assert_eq!(find_command(root.path(), "torchrun", path, "/"), Ok(()));
        assert_eq!(find_command(root.path(), "python", path, "/"), Ok(()), "a link counts");
        assert_eq!(find_command(root.path(), "/opt/conda/bin/torchrun", "", "/"), Ok(()));
        assert_eq!(find_command(root.path(), "./torchrun", "", "/opt/conda/bin"), Ok(()));
        let missing = find_command(root.path(), "notes.txt", path, "/").unwrap_err();
        assert_eq!(missing, Missing { program: "notes.txt".into(), looked_in: format!("PATH {path}") });
        let missing = find_command(root.path(), "/usr/bin/torchrun", path, "/").unwrap_err();
        assert_eq!(missing.looked_in, "/usr/bin/torchrun");
        // The agent's own file system is not where a host runtime's commands are looked for.
        assert!(find_command(Path::new("/"), "torchrun", "/opt/conda/bin", "/").is_err());
    }

    #[test]
    fn host_execution_needs_the_hosts_namespace_to_be_reachable() {
        assert_eq!(ShardExec::Agent.check(), Ok(()));
        let err = ShardExec::Host { pid: u32::MAX }.check().unwrap_err();
        assert!(err.contains("--shard-exec host") && err.contains("hostPID"), "{err}");
        assert_eq!(ShardExec::Host { pid: 7 }.root(), PathBuf::from("/proc/7/root"));
    }
}
