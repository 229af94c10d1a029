//! Progress reports from a worker to the agent: the shipped Python helper
//! (`examples/watt_progress.py`) sends them, the agent's listener takes the good ones and drops
//! garbage without stopping.
#![allow(clippy::unwrap_used)]

use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use watt_agent::progress::{listen, ProgressSink, WorkerProgress};

#[derive(Debug, Default)]
struct Seen(Mutex<Vec<WorkerProgress>>);

impl ProgressSink for Seen {
    fn progress(&self, job: &str, shard: u32, epoch: u64, progress: WorkerProgress) {
        assert_eq!((job, shard, epoch), ("train", 2, 9));
        self.0.lock().unwrap().push(progress);
    }
}

#[tokio::test]
async fn the_python_helper_reports_and_garbage_is_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("train.2.sock");
    let seen = Arc::new(Seen::default());
    let task = {
        let (socket, seen) = (socket.clone(), seen.clone());
        tokio::spawn(async move { listen(&socket, "train".into(), 2, 9, seen).await })
    };
    while !socket.exists() {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let garbage = UnixDatagram::unbound().unwrap();
    garbage.send_to(b"loss went down, trust me", &socket).unwrap();
    garbage.send_to(br#"{"samples": 10}"#, &socket).unwrap();

    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
    let script = "import sys; sys.path.insert(0, sys.argv[1]); from watt_progress import report; \
                  report(step=3, samples=768, loss=0.25, lr=0.1); report(step=4)";
    let out =
        match Command::new("python3").args(["-c", script]).arg(&examples).env("WATT_PROGRESS_SOCKET", &socket).output()
        {
            Ok(out) => out,
            Err(e) => panic!("python3 is needed for this test (Debian: apt-get install python3): {e}"),
        };
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    for _ in 0..200 {
        if seen.0.lock().unwrap().len() >= 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    task.abort();
    let seen = seen.0.lock().unwrap().clone();
    assert_eq!(seen.len(), 2, "two good reports, the garbage dropped: {seen:?}");
    assert_eq!((seen[0].step, seen[0].samples, seen[0].loss), (3, 768, Some(0.25)));
    assert_eq!(seen[0].extra.get("lr"), Some(&0.1));
    assert_eq!((seen[1].step, seen[1].samples, seen[1].loss), (4, 0, None));
}
