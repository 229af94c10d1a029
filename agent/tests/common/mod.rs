//! Helpers for tests that run the real `watt-agent` binary and real Prometheus tools.
#![allow(dead_code, clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

pub const AGENT: &str = env!("CARGO_BIN_EXE_watt-agent");

/// A running agent, stopped with SIGTERM when dropped.
pub struct Agent {
    pub child: Child,
    pub addr: SocketAddr,
    /// Every stderr line, as it comes.
    pub logs: mpsc::Receiver<String>,
}

impl Agent {
    /// Start `watt-agent` on a free loopback port with `args`, and wait until it serves.
    pub fn start(args: &[&str]) -> Agent {
        let mut child = Command::new(AGENT)
            .args(["--metrics-addr", "127.0.0.1:0", "--logs-addr", "127.0.0.1:0", "--node-name", "test-node"])
            .args(args)
            .env("WATT_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start watt-agent");
        let stderr = child.stderr.take().unwrap();
        let (tx, logs) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("[agent] {line}");
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let addr = loop {
            let line =
                logs.recv_timeout(Duration::from_secs(30)).expect("watt-agent did not report its address within 30 s");
            if let Some(rest) = line.split("Serving metrics.").nth(1) {
                let addr = rest.split_whitespace().find_map(|kv| kv.strip_prefix("addr=")).expect("addr= in log line");
                break addr.parse().expect("socket address");
            }
        };
        let agent = Agent { child, addr, logs };
        // The first sampling round runs right after start; wait until it is visible.
        for _ in 0..100 {
            if agent.get("/healthz").0 == 200 {
                return agent;
            }
            std::thread::park_timeout(Duration::from_millis(50));
        }
        panic!("watt-agent never became healthy");
    }

    /// (status, body) of a GET.
    pub fn get(&self, path: &str) -> (u16, String) {
        let url = format!("http://{}{path}", self.addr);
        let agent = ureq::Agent::config_builder().http_status_as_error(false).build().new_agent();
        let mut response = agent.get(&url).call().expect("HTTP GET");
        let status = response.status().as_u16();
        (status, response.body_mut().read_to_string().expect("body"))
    }

    pub fn scrape(&self) -> Exposition {
        let (status, body) = self.get("/metrics");
        assert_eq!(status, 200, "{body}");
        Exposition::parse(&body)
    }

    /// SIGTERM, then wait; returns the exit code.
    pub fn terminate(&mut self) -> Option<i32> {
        signal(self.child.id(), "TERM");
        for _ in 0..200 {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code();
            }
            std::thread::park_timeout(Duration::from_millis(25));
        }
        panic!("watt-agent did not exit within 5 s of SIGTERM");
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

pub fn signal(pid: u32, name: &str) {
    let status = Command::new("kill").arg(format!("-{name}")).arg(pid.to_string()).status().expect("kill");
    assert!(status.success());
}

/// One sample line of the text format.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// A parsed `/metrics` body: the sample lines and the raw text.
#[derive(Debug, Clone)]
pub struct Exposition {
    pub text: String,
    pub samples: Vec<Sample>,
}

impl Exposition {
    /// A small parser for the text format as the agent writes it (no escapes in values beyond \").
    pub fn parse(text: &str) -> Exposition {
        let mut samples = Vec::new();
        for line in text.lines().filter(|l| !l.starts_with('#') && !l.trim().is_empty()) {
            let (series, value) = line.rsplit_once(' ').expect("sample line");
            let (name, labels) = match series.split_once('{') {
                Some((name, rest)) => (name, parse_labels(rest.strip_suffix('}').expect("closing brace"))),
                None => (series, BTreeMap::new()),
            };
            let value = match value {
                "+Inf" => f64::INFINITY,
                "-Inf" => f64::NEG_INFINITY,
                v => v.parse().unwrap_or_else(|_| panic!("value in {line}")),
            };
            samples.push(Sample { name: name.to_string(), labels, value });
        }
        Exposition { text: text.to_string(), samples }
    }

    pub fn named<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a Sample> + 'a {
        self.samples.iter().filter(move |s| s.name == name)
    }

    /// The value of `name` for the GPU with label `gpu_label` = `gpu`.
    pub fn gpu_value(&self, name: &str, gpu_label: &str, gpu: u32) -> Option<f64> {
        let gpu = gpu.to_string();
        self.named(name).find(|s| s.labels.get(gpu_label) == Some(&gpu)).map(|s| s.value)
    }
}

fn parse_labels(text: &str) -> BTreeMap<String, String> {
    let mut labels = BTreeMap::new();
    let mut rest = text;
    while !rest.is_empty() {
        let (key, after) = rest.split_once("=\"").expect("label");
        let mut value = String::new();
        let mut chars = after.char_indices();
        let end = loop {
            match chars.next().expect("closing quote") {
                (_, '\\') => value.push(chars.next().expect("escape").1),
                (i, '"') => break i,
                (_, c) => value.push(c),
            }
        };
        labels.insert(key.to_string(), value);
        rest = after[end + 1..].trim_start_matches(',');
    }
    labels
}

/// The path of a required external tool, or a failure that says how to install it.
pub fn require_tool(tool: &str, package: &str) -> String {
    let found = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|paths| std::env::split_paths(&paths).collect::<Vec<_>>())
        .map(|dir| dir.join(tool))
        .find(|path| path.is_file());
    match found {
        Some(path) => path.to_string_lossy().into_owned(),
        None => panic!("`{tool}` is not installed: run `apt-get install -y {package}` (scripts/test does this)"),
    }
}

/// A loopback port for a process a test starts (see [`watt_common::ports`]).
pub fn free_port() -> u16 {
    watt_common::ports::free_loopback_port().unwrap()
}
