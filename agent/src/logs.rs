//! Shards' logs over the agent's HTTP port, for `wattctl logs`:
//! `GET /logs/<job>/<shard>` returns the last 64 KiB of the shard's current log;
//! `?offset=N` returns what follows byte N (at most 1 MiB), so a client can follow the log.
//! Every answer carries `x-watt-log-size` (the file's size now); an offset past it means the log
//! was rotated, and the answer starts over from byte 0 with `x-watt-log-rotated: 1`.
//!
//! The logs are the workers' own output and are served to whoever can reach the agent's port,
//! like its metrics: keep that port inside the cluster.

use std::io::{Read, Seek, SeekFrom};
use std::path::PathBuf;

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
    let path = crate::supervisor::log_file(&dir, &job, shard);
    let result = tokio::task::spawn_blocking(move || -> std::io::Result<(Vec<u8>, u64, bool)> {
        let mut file = std::fs::File::open(&path)?;
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
        Ok(Err(e)) => (StatusCode::INTERNAL_SERVER_ERROR, format!("cannot read the log: {e}\n")).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")).into_response(),
    }
}
