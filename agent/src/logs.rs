//! Shards' logs over the agent's logs port (HTTPS, see [`crate::https`]), for `wattctl logs`:
//! `GET /logs/<job>/<shard>` returns the last 64 KiB of the shard's current log;
//! `?offset=N` returns what follows byte N (at most 1 MiB), so a client can follow the log.
//! Every answer carries `x-watt-log-size` (the file's size now); an offset past it means the log
//! was rotated, and the answer starts over from byte 0 with `x-watt-log-rotated: 1`.
//!
//! Every request needs `Authorization: Bearer <grant>`: a grant the controller signed for this
//! node, this job and this shard, not yet expired (see [`watt_common::grant`]). The agent learns
//! the key it checks grants with when the controller accepts its session; until then it serves
//! no log.
//!
//! Only a regular file in a job's own directory is served: neither the log nor its job's
//! directory may be a symbolic link (a link placed there would serve any file the agent can
//! read — as root, `/etc/shadow`). Both are opened with `O_NOFOLLOW`, the log relative to the
//! directory already opened, so nothing can be swapped in between the check and the read.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path as FsPath, PathBuf};

use std::sync::{Arc, PoisonError, RwLock};

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use watt_common::grant::{GrantError, LogGrant};

const TAIL_BYTES: u64 = 64 * 1024;
const MAX_BYTES: u64 = 1024 * 1024;

#[derive(Debug, serde::Deserialize)]
struct Params {
    offset: Option<u64>,
}

/// Who may read which log: this node's name and the key its grants are signed with.
#[derive(Debug)]
pub struct LogAccess {
    node: String,
    key: RwLock<Option<Vec<u8>>>,
}

impl LogAccess {
    pub fn new(node: &str) -> Arc<LogAccess> {
        Arc::new(LogAccess { node: node.to_string(), key: RwLock::new(None) })
    }

    /// The key the controller gave this node (every session's start repeats it).
    pub fn set_key(&self, key: Vec<u8>) {
        *self.key.write().unwrap_or_else(PoisonError::into_inner) = Some(key);
    }

    /// The grant in `headers`, checked for shard `shard` of `job`; or why not.
    fn check(&self, headers: &HeaderMap, job: &str, shard: u32) -> Result<LogGrant, Refusal> {
        let token = headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .ok_or(Refusal::NoGrant)?;
        let key = self.key.read().unwrap_or_else(PoisonError::into_inner).clone().ok_or(Refusal::NoSession)?;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
        LogGrant::verify(token.trim(), &self.node, &key, job, shard, now).map_err(Refusal::Grant)
    }
}

/// Why a request for a log is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Refusal {
    NoGrant,
    /// No session with the controller yet: no key to check grants with.
    NoSession,
    Grant(GrantError),
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        let (status, text) = match self {
            Refusal::NoGrant => (
                StatusCode::UNAUTHORIZED,
                "a log grant is required (Authorization: Bearer): wattctl logs asks the controller for one".to_string(),
            ),
            Refusal::NoSession => {
                (StatusCode::SERVICE_UNAVAILABLE, "this agent has no session with its controller yet".to_string())
            }
            // Valid, but for another shard: the holder may read something, not this.
            Refusal::Grant(e @ GrantError::OtherShard) => (StatusCode::FORBIDDEN, e.to_string()),
            Refusal::Grant(e) => (StatusCode::UNAUTHORIZED, e.to_string()),
        };
        (status, [("www-authenticate", "Bearer")], text + "\n").into_response()
    }
}

#[derive(Debug, Clone)]
struct Logs {
    dir: PathBuf,
    access: Arc<LogAccess>,
}

/// The `/logs` routes over the supervisor's `logs` directory, for holders of grants `access`
/// checks.
pub fn router(logs_dir: PathBuf, access: Arc<LogAccess>) -> Router {
    Router::new().route("/logs/{job}/{shard}", get(read)).with_state(Logs { dir: logs_dir, access })
}

async fn read(
    State(Logs { dir, access }): State<Logs>,
    Path((job, shard)): Path<(String, String)>,
    Query(q): Query<Params>,
    headers: HeaderMap,
) -> Response {
    // A job name cannot step out of the logs directory: no '/', no '.'.
    if let Err(why) = watt_common::names::check(&job) {
        return (StatusCode::BAD_REQUEST, format!("job {why}\n")).into_response();
    }
    let Ok(shard) = shard.parse::<u32>() else {
        return (StatusCode::BAD_REQUEST, "shard must be a shard number\n").into_response();
    };
    let grant = match access.check(&headers, &job, shard) {
        Ok(grant) => grant,
        Err(refused) => return refused.into_response(),
    };
    if q.offset.is_none() {
        tracing::info!(job, shard, by = %grant.principal, "Serving a shard's log.");
    }
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

    /// Over HTTPS, as `wattctl logs` asks: a grant for the shard reads its log; no grant, a
    /// grant for another shard or signed with another node's key, and a link are refused.
    #[tokio::test]
    async fn the_agent_serves_a_log_to_a_grant_holder_over_https_and_refuses_the_rest() {
        use watt_common::auth::Role;
        use watt_common::fetch;
        use watt_common::grant;
        use watt_common::pki::{Authority, LEAF_VALIDITY};

        let (root, logs, secret) = logs();
        std::os::unix::fs::symlink(&secret, crate::supervisor::log_file(&logs, "j", 1)).unwrap();
        let ca = Authority::generate("test", LEAF_VALIDITY).unwrap();
        let issued = ca.issue_client("n1", Role::Node, LEAF_VALIDITY).unwrap();
        let files = crate::bootstrap::NodeCertFiles::in_dir(root.path());
        std::fs::write(&files.cert, &issued.cert_pem).unwrap();
        std::fs::write(&files.key, &issued.key_pem).unwrap();
        let ca_file = root.path().join("ca.pem");
        std::fs::write(&ca_file, ca.cert_pem()).unwrap();

        let access = LogAccess::new("n1");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("https://{}", listener.local_addr().unwrap());
        tokio::spawn(crate::https::serve(listener, router(logs, access.clone()), Some(files), std::future::pending()));
        let tls = Arc::new(watt_common::tls::client_config(&ca_file).unwrap());
        let get = |path: &'static str, name: &'static str, token: String| {
            let (url, tls) = (format!("{url}{path}"), tls.clone());
            async move { fetch::get(&url, Some(tls), name, &token, 1 << 20).await }
        };
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64;
        let signed = |job: &str, shard: u32, key_of: &str| {
            let g = LogGrant {
                node: "n1".into(),
                job: job.into(),
                shard,
                expires_unix_ms: now + 60_000,
                principal: "ana".into(),
            };
            g.sign(&grant::node_key(b"master", key_of))
        };

        // Before its session the agent has no key: nothing is served.
        let early = get("/logs/j/0", "n1", signed("j", 0, "n1")).await.unwrap();
        assert_eq!(early.status, 503);
        access.set_key(grant::node_key(b"master", "n1"));

        let log = get("/logs/j/0", "n1", signed("j", 0, "n1")).await.unwrap();
        assert_eq!((log.status, log.body.as_slice()), (200, b"step 1\n".as_slice()));
        assert_eq!(get("/logs/j/0", "n1", String::new()).await.unwrap().status, 401, "no grant");
        assert_eq!(get("/logs/j/0", "n1", signed("j", 0, "n2")).await.unwrap().status, 401, "another node's key");
        assert_eq!(get("/logs/j/1", "n1", signed("j", 0, "n1")).await.unwrap().status, 403, "another shard's grant");
        let link = get("/logs/j/1", "n1", signed("j", 1, "n1")).await.unwrap();
        assert_eq!(link.status, 403);
        assert!(!String::from_utf8_lossy(&link.body).contains("secret"));
        // The certificate is n1's: a client that expects another node does not talk to it.
        assert!(get("/logs/j/0", "n2", signed("j", 0, "n1")).await.is_err());
        // Plain text gets no log.
        let plain_url = format!("{}/logs/j/0", url.replace("https", "http"));
        let plain = fetch::get(&plain_url, None, "n1", &signed("j", 0, "n1"), 1 << 20).await;
        assert!(plain.is_err() || plain.is_ok_and(|a| a.status != 200));
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
