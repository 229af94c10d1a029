//! Progress reports from workers: one JSON object per Unix datagram on the shard's socket
//! (`WATT_PROGRESS_SOCKET`), e.g. `{"step": 120, "samples": 30720, "loss": 0.31}`.
//!
//! `step` (steps completed, a whole number) is required; `samples` (a whole number) and `loss`
//! (a number, or null) are understood; up to 16 more numeric keys are passed along as they are.
//! A report that is not that — garbage, a missing step, a negative count — is logged (the first
//! few, then every hundredth) and dropped: a worker's bad line never stops the shard, and
//! nothing already recorded is lost. `examples/watt_progress.py` is the Python side.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use serde_json::Value;

/// What a worker last reported.
#[derive(Debug, Clone, PartialEq)]
pub struct WorkerProgress {
    pub step: u64,
    pub samples: u64,
    pub loss: Option<f64>,
    pub extra: BTreeMap<String, f64>,
    pub unix_ms: i64,
}

const MAX_EXTRA: usize = 16;
const MAX_KEY: usize = 64;

/// Parse one datagram.
pub fn parse(datagram: &[u8], unix_ms: i64) -> Result<WorkerProgress, String> {
    let value: Value = serde_json::from_slice(datagram).map_err(|e| format!("not JSON: {e}"))?;
    let Value::Object(fields) = value else { return Err("not a JSON object".into()) };
    let count = |key: &str| -> Result<Option<u64>, String> {
        match fields.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v.as_u64().map(Some).ok_or_else(|| format!("{key} must be a whole number ≥ 0, got {v}")),
        }
    };
    let step = count("step")?.ok_or("step is required")?;
    let samples = count("samples")?.unwrap_or(0);
    let loss = match fields.get("loss") {
        None | Some(Value::Null) => None,
        Some(v) => Some(v.as_f64().filter(|l| l.is_finite()).ok_or_else(|| format!("loss must be a number, got {v}"))?),
    };
    let mut extra = BTreeMap::new();
    for (key, v) in &fields {
        if matches!(key.as_str(), "step" | "samples" | "loss") {
            continue;
        }
        let ok_key = key.len() <= MAX_KEY
            && !key.is_empty()
            && key.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
        let number = v.as_f64().filter(|x| x.is_finite());
        if let (true, Some(x)) = (ok_key, number) {
            if extra.len() == MAX_EXTRA {
                return Err(format!("more than {MAX_EXTRA} extra keys"));
            }
            extra.insert(key.clone(), x);
        }
    }
    Ok(WorkerProgress { step, samples, loss, extra, unix_ms })
}

/// Where progress goes.
pub trait ProgressSink: Send + Sync + 'static {
    fn progress(&self, job: &str, shard: u32, epoch: u64, progress: WorkerProgress);
}

/// Receive reports on `path` for one shard run until the task is aborted.
pub async fn listen(path: &Path, job: String, shard: u32, epoch: u64, sink: Arc<dyn ProgressSink>) {
    let _ = std::fs::remove_file(path);
    let socket = match tokio::net::UnixDatagram::bind(path) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(job, shard, path = %path.display(), error = %e, "Cannot listen for progress reports.");
            return;
        }
    };
    // The shard may run as another user than the agent (see `supervisor::identity`); it must be
    // able to write here. A datagram carries only a progress report, and the state directory's
    // own permissions decide who can reach the socket at all.
    {
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666));
    }
    let mut buffer = vec![0u8; 64 * 1024];
    let mut bad = 0u64;
    loop {
        let Ok(n) = socket.recv(&mut buffer).await else { return };
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or(0);
        match parse(&buffer[..n], now) {
            Ok(p) => sink.progress(&job, shard, epoch, p),
            Err(e) => {
                bad += 1;
                if bad <= 5 || bad % 100 == 0 {
                    tracing::warn!(job, shard, bad, error = %e, "Dropped a progress report.");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_parse_and_garbage_is_refused_with_a_reason() {
        let p = parse(br#"{"step": 12, "samples": 3072, "loss": 0.5, "lr": 0.1, "note": "x"}"#, 7).unwrap();
        assert_eq!((p.step, p.samples, p.loss, p.unix_ms), (12, 3072, Some(0.5), 7));
        assert_eq!(p.extra, BTreeMap::from([("lr".to_string(), 0.1)]));
        assert_eq!(parse(br#"{"step": 1, "loss": null}"#, 0).unwrap().loss, None);
        for (bad, why) in [
            (&b"garbage"[..], "not JSON"),
            (b"[1, 2]", "not a JSON object"),
            (b"{\"samples\": 5}", "step is required"),
            (b"{\"step\": -3}", "step must be a whole number"),
            (b"{\"step\": 2.5}", "step must be a whole number"),
            (b"{\"step\": 1, \"loss\": \"low\"}", "loss must be a number"),
        ] {
            let e = parse(bad, 0).unwrap_err();
            assert!(e.contains(why), "{bad:?}: {e}");
        }
    }
}
