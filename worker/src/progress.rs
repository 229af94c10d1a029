//! Progress reports: one JSON object per Unix datagram to the socket named by
//! `WATT_PROGRESS_SOCKET`, which the agent reads and forwards. Datagrams keep each report whole,
//! need no connection, and never block training: when the agent is not listening, or is behind,
//! a report is dropped, not queued. From Python it is three lines (`examples/watt_progress.py`):
//!
//! ```python
//! import json, os, socket
//! s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
//! s.sendto(json.dumps({"step": 10, "samples": 2560, "loss": 0.31}).encode(), os.environ["WATT_PROGRESS_SOCKET"])
//! ```
//!
//! `step` (steps completed) is required; `samples` and `loss` are understood; any other numeric
//! keys are passed along as they are.

use std::os::unix::net::UnixDatagram;
use std::path::PathBuf;

#[derive(Debug)]
pub struct Progress {
    socket: Option<(UnixDatagram, PathBuf)>,
}

impl Progress {
    /// Reports go to `path`, or nowhere when it is `None`.
    pub fn new(path: Option<PathBuf>) -> Self {
        let socket = path.and_then(|p| {
            let s = UnixDatagram::unbound().ok()?;
            s.set_nonblocking(true).ok()?;
            Some((s, p))
        });
        Progress { socket }
    }

    /// Send one report; `extra` are further numeric key/values.
    pub fn report(&self, step: u64, samples: u64, loss: f64, extra: &[(&str, f64)]) {
        let Some((socket, path)) = &self.socket else { return };
        let mut line = format!("{{\"step\":{step},\"samples\":{samples},\"loss\":{}", number(loss));
        for (k, v) in extra {
            line.push_str(&format!(",\"{k}\":{}", number(*v)));
        }
        line.push('}');
        // Dropped when the agent is away or behind: progress is advisory, training is not.
        let _ = socket.send_to(line.as_bytes(), path);
    }
}

/// JSON has no NaN or infinity.
fn number(v: f64) -> String {
    if v.is_finite() {
        format!("{v}")
    } else {
        "null".into()
    }
}
