//! The agent's state directory (`--state-dir`) and what lives in it, spelled out in one place:
//! shards' logs (`logs/<job>/shard-<n>.log`, rotated), pid files, progress sockets and speed
//! files (`run/`), and default checkpoints (`checkpoints/<job>`). The supervisor writes them,
//! `/logs` and the shard table read them.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use watt_proto::v1 as pb;

/// Rotate a shard's log past this size.
pub const LOG_MAX_BYTES: u64 = 16 * 1024 * 1024;
/// Rotated logs kept per shard (`.1` newest).
pub const LOG_KEEP: usize = 3;

/// Where shards' logs live under the agent's state directory: `<state>/logs`.
pub fn logs_dir(state_dir: &Path) -> PathBuf {
    state_dir.join("logs")
}

/// One shard's log under `logs_dir`: `<job>/shard-<n>.log` (see [`log_file_name`]).
pub fn log_file(logs_dir: &Path, job: &str, shard: u32) -> PathBuf {
    logs_dir.join(job).join(log_file_name(shard))
}

/// A shard's log's name in its job's directory under `logs_dir`.
pub fn log_file_name(shard: u32) -> String {
    format!("shard-{shard}.log")
}

/// One agent's state directory.
#[derive(Debug, Clone)]
pub struct StateDir {
    root: PathBuf,
}

impl StateDir {
    pub fn new(root: PathBuf) -> Self {
        StateDir { root }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Pid files, progress sockets, speed files.
    pub fn run_dir(&self) -> PathBuf {
        self.root.join("run")
    }

    pub fn log_path(&self, job: &str, shard: u32) -> PathBuf {
        log_file(&logs_dir(&self.root), job, shard)
    }

    /// Names the process group of a running shard, and its epoch, so a restarted agent finds it.
    pub fn pid_path(&self, job: &str, shard: u32) -> PathBuf {
        self.run_dir().join(format!("{job}.{shard}.pid"))
    }

    /// The Unix socket a shard's worker sends progress reports to.
    pub fn progress_path(&self, job: &str, shard: u32) -> PathBuf {
        self.run_dir().join(format!("{job}.{shard}.sock"))
    }

    /// On simulated GPUs: the file holding the shard's relative speed at its cap.
    pub fn speed_path(&self, job: &str, shard: u32) -> PathBuf {
        self.run_dir().join(format!("{job}.{shard}.speed"))
    }

    /// The job's own checkpoint directory, else `checkpoints/<job>` here.
    pub fn checkpoint_dir(&self, order: &pb::ShardOrder) -> PathBuf {
        if order.checkpoint_dir.is_empty() {
            self.root.join("checkpoints").join(&order.job)
        } else {
            PathBuf::from(&order.checkpoint_dir)
        }
    }
}

/// Copy-and-truncate `path` whenever it grows past [`LOG_MAX_BYTES`], until aborted.
pub async fn rotate_while_running(path: PathBuf) {
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let p = path.clone();
        let _ = tokio::task::spawn_blocking(move || rotate_if_large(&p, LOG_MAX_BYTES)).await;
    }
}

/// Rotate `path` to `.1` (shifting older ones, keeping [`LOG_KEEP`]) if larger than `max`.
pub fn rotate_if_large(path: &Path, max: u64) -> std::io::Result<bool> {
    if fs::metadata(path)?.len() <= max {
        return Ok(false);
    }
    let numbered = |n: usize| PathBuf::from(format!("{}.{n}", path.display()));
    let _ = fs::remove_file(numbered(LOG_KEEP));
    for n in (1..LOG_KEEP).rev() {
        let _ = fs::rename(numbered(n), numbered(n + 1));
    }
    fs::copy(path, numbered(1))?;
    // The writer appends (O_APPEND): after the truncation it writes at the new end, 0.
    fs::OpenOptions::new().write(true).open(path)?.set_len(0)?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logs_rotate_past_the_cap_keeping_the_newest_few() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let path = dir.path().join("shard-0.log");
        for round in 0..5 {
            fs::write(&path, format!("round {round} {}", "x".repeat(100))).unwrap_or_default();
            assert!(rotate_if_large(&path, 50).unwrap_or(false));
            assert_eq!(fs::metadata(&path).map(|m| m.len()).unwrap_or(1), 0);
        }
        assert!(!rotate_if_large(&path, 50).unwrap_or(true), "an empty log is not rotated");
        let newest = fs::read_to_string(dir.path().join("shard-0.log.1")).unwrap_or_default();
        assert!(newest.starts_with("round 4"), "{newest}");
        assert!(dir.path().join(format!("shard-0.log.{LOG_KEEP}")).exists());
        assert!(!dir.path().join(format!("shard-0.log.{}", LOG_KEEP + 1)).exists());
    }

    #[test]
    fn the_layout_is_the_documented_one() {
        let dir = StateDir::new(PathBuf::from("/var/lib/watt-agent"));
        assert_eq!(dir.log_path("j", 2), PathBuf::from("/var/lib/watt-agent/logs/j/shard-2.log"));
        assert_eq!(
            log_file(&logs_dir(dir.root()), "j", 2),
            dir.log_path("j", 2),
            "/logs reads where the supervisor writes"
        );
        assert_eq!(dir.pid_path("j", 2), PathBuf::from("/var/lib/watt-agent/run/j.2.pid"));
        let order = pb::ShardOrder { job: "j".into(), ..Default::default() };
        assert_eq!(dir.checkpoint_dir(&order), PathBuf::from("/var/lib/watt-agent/checkpoints/j"));
    }
}
