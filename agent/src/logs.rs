//! Shards' logs over the agent's HTTP port, for `wattctl logs`:
//! `GET /logs/<job>/<shard>` returns the last 64 KiB of the shard's current log;
//! `?offset=N` returns what follows byte N (at most 1 MiB), so a client can follow the log.
//! Every answer carries `x-watt-log-size` (the file's size now); an offset past it means the log
//! was rotated, and the answer starts over from byte 0 with `x-watt-log-rotated: 1`.
//!
//! The logs are the workers' own output and are served to whoever can reach the agent's port,
//! like its metrics: keep that port inside the cluster.
//!
//! Only a regular file in a job's own directory is served: neither the log nor its job's
//! directory may be a symbolic link (a link placed there would serve any file the agent can
//! read — as root, `/etc/shadow`). Both are opened with `O_NOFOLLOW`, the log relative to the
//! directory already opened, so nothing can be swapped in between the check and the read.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path as FsPath, PathBuf};

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;

const TAIL_BYTES: u64 = 64 * 1024;
const MAX_BYTES: u64 = 1024 * 1024;

#[derive(Debug, serde::Deserialize)]
struct Params {
    offset: Option<u64>,
}

/// The `/logs` routes over the supervisor's `logs` directory.
pub fn router(logs_dir: PathBuf) -> Router {
    Router::new().route("/logs/{job}/{shard}", get(read)).with_state(logs_dir)
}

async fn read(
    State(dir): State<PathBuf>,
    Path((job, shard)): Path<(String, String)>,
    Query(q): Query<Params>,
) -> Response {
    // A job name cannot step out of the logs directory: no '/', no '.'.
    if let Err(why) = watt_common::names::check(&job) {
        return (StatusCode::BAD_REQUEST, format!("job {why}\n")).into_response();
    }
    let Ok(shard) = shard.parse::<u32>() else {
        return (StatusCode::BAD_REQUEST, "shard must be a shard number\n").into_response();
    };
    let job_name = job.clone();
    let result = tokio::task::spawn_blocking(move || -> std::io::Result<(Vec<u8>, u64, bool)> {
        let mut file = open_log(&dir, &job_name, shard)?;
        let size = file.metadata()?.len();
        let (start, rotated) = match q.offset {
            Some(o) if o > size => (0, true),
            Some(o) => (o, false),
            None => (size.saturating_sub(TAIL_BYTES), false),
        };
        file.seek(SeekFrom::Start(start))?;
        let mut body = Vec::new();
        file.take(MAX_BYTES).read_to_end(&mut body)?;
        Ok((body, size, rotated))
    })
    .await;
    match result {
        Ok(Ok((body, size, rotated))) => {
            let mut response = body.into_response();
            let headers = response.headers_mut();
            headers.insert("x-watt-log-size", size.into());
            if rotated {
                headers.insert("x-watt-log-rotated", 1.into());
            }
            response
        }
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::NotFound => {
            (StatusCode::NOT_FOUND, format!("no log for shard {shard} of job {job} on this node\n")).into_response()
        }
        Ok(Err(e)) if is_link_refused(&e) => (
            StatusCode::FORBIDDEN,
            format!("the log of shard {shard} of job {job} is not a regular file in its job's directory: not served\n"),
        )
            .into_response(),
        Ok(Err(e)) => (StatusCode::INTERNAL_SERVER_ERROR, format!("cannot read the log: {e}\n")).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")).into_response(),
    }
}

/// Open shard `shard`'s log of `job` under `dir` for reading, following no symbolic link in the
/// job's directory or the log (see the module's header).
fn open_log(dir: &FsPath, job: &str, shard: u32) -> std::io::Result<File> {
    use nix::fcntl::{open, openat, OFlag};
    use nix::sys::stat::Mode;
    let no_follow = OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
    let job_dir = open(&dir.join(job), no_follow | OFlag::O_DIRECTORY, Mode::empty())?;
    let name = crate::supervisor::log_file_name(shard);
    let log = openat(&job_dir, name.as_str(), no_follow | OFlag::O_NONBLOCK, Mode::empty())?;
    let file = File::from(log);
    if !file.metadata()?.is_file() {
        return Err(std::io::Error::other(NotARegularFile));
    }
    Ok(file)
}

/// A log path that names a FIFO, a device or a directory.
#[derive(Debug, thiserror::Error)]
#[error("not a regular file")]
struct NotARegularFile;

/// The errors `open_log` gives for what it will not serve: a symbolic link (ELOOP), a link where
/// the job's directory should be (ENOTDIR), something other than a regular file.
fn is_link_refused(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(nix::libc::ELOOP | nix::libc::ENOTDIR))
        || e.get_ref().is_some_and(|inner| inner.is::<NotARegularFile>())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A logs directory with job `j`'s shard 0 log, and a secret beside it.
    fn logs() -> (tempfile::TempDir, PathBuf, PathBuf) {
        let root = tempfile::tempdir().unwrap();
        let logs = root.path().join("logs");
        std::fs::create_dir_all(logs.join("j")).unwrap();
        std::fs::write(crate::supervisor::log_file(&logs, "j", 0), "step 1\n").unwrap();
        let secret = root.path().join("shadow");
        std::fs::write(&secret, "root:secret").unwrap();
        (root, logs, secret)
    }

    #[test]
    fn a_log_is_read_from_its_jobs_directory() {
        let (_root, logs, _) = logs();
        let mut text = String::new();
        open_log(&logs, "j", 0).unwrap().read_to_string(&mut text).unwrap();
        assert_eq!(text, "step 1\n");
        assert_eq!(open_log(&logs, "j", 1).unwrap_err().kind(), std::io::ErrorKind::NotFound);
    }

    #[test]
    fn a_log_that_is_a_symbolic_link_is_refused() {
        let (_root, logs, secret) = logs();
        std::os::unix::fs::symlink(&secret, crate::supervisor::log_file(&logs, "j", 1)).unwrap();
        let e = open_log(&logs, "j", 1).unwrap_err();
        assert!(is_link_refused(&e), "{e}");
    }

    #[test]
    fn a_jobs_directory_that_is_a_symbolic_link_is_refused() {
        let (root, logs, _) = logs();
        // Elsewhere, a directory with a file named as a log; the job's directory links to it.
        let elsewhere = root.path().join("elsewhere");
        std::fs::create_dir_all(&elsewhere).unwrap();
        std::fs::write(elsewhere.join(crate::supervisor::log_file_name(0)), "root:secret").unwrap();
        std::os::unix::fs::symlink(&elsewhere, logs.join("k")).unwrap();
        let e = open_log(&logs, "k", 0).unwrap_err();
        assert!(is_link_refused(&e), "{e}");
    }

    /// Over HTTP, as `wattctl logs` asks: the log is served, a link beside it is not.
    #[tokio::test]
    async fn the_agent_serves_a_log_and_refuses_a_link_to_a_secret() {
        let (_root, logs, secret) = logs();
        std::os::unix::fs::symlink(&secret, crate::supervisor::log_file(&logs, "j", 1)).unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, router(logs)).await });
        let get = |path: &'static str| async move {
            tokio::task::spawn_blocking(move || {
                use std::io::Write as _;
                let mut s = std::net::TcpStream::connect(addr).unwrap();
                write!(s, "GET {path} HTTP/1.0\r\n\r\n").unwrap();
                let mut answer = String::new();
                s.read_to_string(&mut answer).unwrap();
                answer
            })
            .await
            .unwrap()
        };
        let log = get("/logs/j/0").await;
        assert!(log.starts_with("HTTP/1.0 200") && log.ends_with("step 1\n"), "{log}");
        let link = get("/logs/j/1").await;
        assert!(link.starts_with("HTTP/1.0 403"), "{link}");
        assert!(!link.contains("secret"), "{link}");
    }

    #[test]
    fn something_other_than_a_file_is_refused() {
        let (_root, logs, _) = logs();
        let fifo = crate::supervisor::log_file(&logs, "j", 2);
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let e = open_log(&logs, "j", 2).unwrap_err();
        assert!(is_link_refused(&e), "{e}");
    }
}
