//! `watt-system-tests`: Watt end to end. The tests in `tests/` run the real binaries — a
//! controller, agents with simulated GPUs, `watt-worker` shards, `wattctl` — on loopback, with a
//! real etcd where a store is needed; this library is their helpers (and the controller's own
//! binary-level tests use them too). `scripts/test` builds every binary first.
// Real processes run on the real clock, so these helpers use std's Instant.
#![allow(clippy::unwrap_used, clippy::disallowed_types, missing_debug_implementations)]

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant as StdInstant};

pub mod vtn;

/// A workspace binary, beside the test binary's own directory (`target/<profile>/`).
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().and_then(|deps| deps.parent()).unwrap().to_path_buf();
    let path = dir.join(name);
    assert!(path.is_file(), "{} is not built: run `cargo build --workspace` (scripts/test does)", path.display());
    path
}

/// A loopback port for a process a test starts (see [`watt_common::ports`]).
pub fn free_port() -> u16 {
    watt_common::ports::free_loopback_port().unwrap()
}

/// Poll `check` until it returns Some, or panic after `timeout` with `what`.
pub fn wait_for<T>(timeout: Duration, what: &str, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = StdInstant::now() + timeout;
    loop {
        if let Some(v) = check() {
            return v;
        }
        assert!(StdInstant::now() < deadline, "timed out after {timeout:?} waiting for {what}");
        std::thread::park_timeout(Duration::from_millis(100));
    }
}

/// A child process killed (SIGKILL) when dropped, with its stderr lines on a channel.
/// A small tmpfs mounted over `path` for the test's life (needs root, as scripts/test runs):
/// a disk that can be filled to the brim and freed again.
pub struct Tmpfs {
    path: PathBuf,
}

impl Tmpfs {
    pub fn mount(path: &std::path::Path, size: &str) -> Tmpfs {
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(path)
            .output()
            .unwrap_or_else(|e| panic!("cannot run mount: {e}"));
        assert!(
            out.status.success(),
            "cannot mount a tmpfs at {} (this test needs root, as scripts/test runs): {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        Tmpfs { path: path.to_path_buf() }
    }

    /// Write a file at `name` until the disk is full; its size.
    pub fn fill(&self, name: &str) -> u64 {
        use std::io::Write as _;
        let mut file = std::fs::File::create(self.path.join(name)).unwrap();
        let chunk = vec![0u8; 16 << 10];
        let mut written = 0;
        while file.write_all(&chunk).is_ok() {
            written += chunk.len() as u64;
        }
        let _ = file.sync_all();
        written
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.path).status();
    }
}

pub struct Proc {
    pub child: Child,
    pub lines: mpsc::Receiver<String>,
    pub name: String,
}

impl Proc {
    pub fn spawn(name: &str, mut cmd: Command) -> Proc {
        cmd.stdout(Stdio::null()).stderr(Stdio::piped()).env("WATT_LOG", "info");
        let mut child = cmd.spawn().unwrap_or_else(|e| panic!("start {name}: {e}"));
        let stderr = child.stderr.take().unwrap();
        let (tx, lines) = mpsc::channel();
        let tag = name.to_string();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("[{tag}] {line}");
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Proc { child, lines, name: name.into() }
    }

    /// Wait for a log line containing `needle`; returns it.
    pub fn wait_line(&self, needle: &str, timeout: Duration) -> String {
        self.try_wait_line(needle, timeout)
            .unwrap_or_else(|ended| panic!("{} did not log {needle:?} within {timeout:?}: {ended}", self.name))
    }

    /// Wait for a log line containing `needle`; `Err` says whether the process ended first.
    pub fn try_wait_line(&self, needle: &str, timeout: Duration) -> Result<String, String> {
        loop {
            match self.lines.recv_timeout(timeout) {
                Ok(line) if line.contains(needle) => return Ok(line),
                Ok(_) => {}
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => return Err("its output ended".into()),
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => return Err("timed out".into()),
            }
        }
    }

    /// Every line logged since the last look, without waiting.
    pub fn drain(&self) -> Vec<String> {
        self.lines.try_iter().collect()
    }

    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Proc {
    /// SIGTERM first, so an agent stops its shards' processes; SIGKILL if it takes over 10 s.
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status();
            let deadline = StdInstant::now() + Duration::from_secs(10);
            while StdInstant::now() < deadline && matches!(self.child.try_wait(), Ok(None)) {
                std::thread::park_timeout(Duration::from_millis(20));
            }
        }
        self.kill9();
    }
}

/// A real etcd on free loopback ports with its own data directory.
pub struct Etcd {
    pub proc: Option<Proc>,
    pub dir: tempfile::TempDir,
    pub client_port: u16,
    pub peer_port: u16,
    /// Clients over TLS with a certificate from the tests' authority (`--client-cert-auth`).
    pub tls: bool,
}

impl Etcd {
    pub fn start() -> Etcd {
        Etcd::start_with(false)
    }

    /// An etcd that takes clients only over TLS with a client certificate the tests' authority
    /// signed (its own certificate is the tests' server certificate).
    pub fn start_tls() -> Etcd {
        Etcd::start_with(true)
    }

    fn start_with(tls: bool) -> Etcd {
        let etcd = which("etcd").unwrap_or_else(|| {
            panic!("`etcd` is not installed: run `apt-get install -y etcd-server` (scripts/test does this)")
        });
        let dir = tempfile::tempdir().unwrap();
        let mut e = Etcd { proc: None, dir, client_port: free_port(), peer_port: free_port(), tls };
        e.proc = Some(e.launch(&etcd));
        e
    }

    fn launch(&self, etcd: &PathBuf) -> Proc {
        let scheme = if self.tls { "https" } else { "http" };
        let client = format!("{scheme}://127.0.0.1:{}", self.client_port);
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let mut cmd = Command::new(etcd);
        cmd.arg("--name=watt-test")
            .arg(format!("--data-dir={}", self.dir.path().join("data").display()))
            .arg(format!("--listen-client-urls={client}"))
            .arg(format!("--advertise-client-urls={client}"))
            .arg(format!("--listen-peer-urls={peer}"))
            .arg(format!("--initial-advertise-peer-urls={peer}"))
            .arg(format!("--initial-cluster=watt-test={peer}"))
            .arg("--log-level=warn");
        if self.tls {
            let pki = TestPki::get();
            let server = pki.server();
            cmd.arg("--client-cert-auth")
                .arg(format!("--trusted-ca-file={}", pki.ca().display()))
                .arg(format!("--cert-file={}", server.cert.display()))
                .arg(format!("--key-file={}", server.key.display()));
        }
        let proc = Proc::spawn("etcd", cmd);
        wait_for(Duration::from_secs(30), "etcd to answer", || {
            std::net::TcpStream::connect(("127.0.0.1", self.client_port)).ok().map(|_| ())
        });
        proc
    }

    pub fn endpoint(&self) -> String {
        format!("127.0.0.1:{}", self.client_port)
    }

    pub fn kill(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.kill9();
        }
    }

    /// SIGSTOP: etcd stops answering, its connections stay open (a hung machine, not a dead one).
    pub fn pause(&self) {
        self.signal("-STOP");
    }

    /// SIGCONT after [`Etcd::pause`].
    pub fn resume(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, signal: &str) {
        let pid = self.proc.as_ref().expect("etcd runs").pid().to_string();
        assert!(Command::new("kill").args([signal, &pid]).status().unwrap().success(), "kill {signal} {pid}");
    }

    /// Start again on the same ports and data.
    pub fn restart(&mut self) {
        self.kill();
        let etcd = which("etcd").unwrap();
        self.proc = Some(self.launch(&etcd));
    }
}

/// A real three-member etcd cluster on loopback, each member with its own data directory, for
/// the chaos scenarios: members are killed and started again on the same ports and data.
pub struct EtcdCluster {
    pub members: Vec<EtcdMember>,
    dir: tempfile::TempDir,
    initial_cluster: String,
    /// Another address each member takes clients on (besides loopback), if any.
    also_on: Option<String>,
}

pub struct EtcdMember {
    pub name: String,
    pub client_port: u16,
    pub peer_port: u16,
    pub proc: Option<Proc>,
}

impl EtcdCluster {
    pub fn start(size: usize) -> EtcdCluster {
        EtcdCluster::start_also_on(size, None)
    }

    /// [`EtcdCluster::start`], each member also taking clients on `also_on` (an address of this
    /// namespace: a [`Partition`]'s link to etcd).
    pub fn start_also_on(size: usize, also_on: Option<&str>) -> EtcdCluster {
        let members: Vec<EtcdMember> = (0..size)
            .map(|i| EtcdMember { name: format!("m{i}"), client_port: free_port(), peer_port: free_port(), proc: None })
            .collect();
        let initial_cluster = members
            .iter()
            .map(|m| format!("{}=http://127.0.0.1:{}", m.name, m.peer_port))
            .collect::<Vec<_>>()
            .join(",");
        let also_on = also_on.map(str::to_string);
        let mut cluster = EtcdCluster { members, dir: tempfile::tempdir().unwrap(), initial_cluster, also_on };
        for i in 0..size {
            cluster.start_member(i);
        }
        cluster.wait_healthy(&(0..size).collect::<Vec<_>>());
        cluster
    }

    /// `HOST:PORT,HOST:PORT,...` for `etcd://`.
    pub fn endpoints(&self) -> String {
        self.endpoints_on("127.0.0.1")
    }

    /// The same on another address the members take clients on.
    pub fn endpoints_on(&self, host: &str) -> String {
        self.members.iter().map(|m| format!("{host}:{}", m.client_port)).collect::<Vec<_>>().join(",")
    }

    /// Start member `i` (again: same ports, same data; the data directory decides that it
    /// rejoins rather than forms a cluster).
    pub fn start_member(&mut self, i: usize) {
        let etcd = which("etcd").unwrap_or_else(|| {
            panic!("`etcd` is not installed: run `apt-get install -y etcd-server` (scripts/test does this)")
        });
        let m = &self.members[i];
        let client = format!("http://127.0.0.1:{}", m.client_port);
        let listen = match &self.also_on {
            Some(host) => format!("{client},http://{host}:{}", m.client_port),
            None => client.clone(),
        };
        let peer = format!("http://127.0.0.1:{}", m.peer_port);
        let mut cmd = Command::new(etcd);
        cmd.arg(format!("--name={}", m.name))
            .arg(format!("--data-dir={}", self.dir.path().join(&m.name).display()))
            .arg(format!("--listen-client-urls={listen}"))
            .arg(format!("--advertise-client-urls={client}"))
            .arg(format!("--listen-peer-urls={peer}"))
            .arg(format!("--initial-advertise-peer-urls={peer}"))
            .arg(format!("--initial-cluster={}", self.initial_cluster))
            .arg("--initial-cluster-token=watt-chaos")
            .arg("--log-level=warn");
        let proc = Proc::spawn(&format!("etcd-{}", m.name), cmd);
        self.members[i].proc = Some(proc);
    }

    pub fn kill_member(&mut self, i: usize) {
        if let Some(mut p) = self.members[i].proc.take() {
            p.kill9();
        }
    }

    /// Until each of `members` says it is healthy (it has a leader and serves).
    pub fn wait_healthy(&self, members: &[usize]) {
        for &i in members {
            let port = self.members[i].client_port;
            wait_for(Duration::from_secs(30), &format!("etcd member {i} healthy"), || {
                http_get(port, "/health").filter(|body| body.contains("\"health\":\"true\"")).map(|_| ())
            });
        }
    }
}

/// The address a partitioned controller listens on (see [`Partition`]); the tests' server
/// certificate names it.
pub const PARTITIONED_HOST: &str = "10.201.0.2";
/// The address etcd takes the partitioned controller's calls on.
pub const ETCD_FOR_PARTITIONED: &str = "10.202.0.1";

/// A network namespace for one controller, with two links to this one: one to the agents and
/// clients (`10.201.0.1` ↔ [`PARTITIONED_HOST`]), one to etcd ([`ETCD_FOR_PARTITIONED`] ↔
/// `10.202.0.2`), so that the controller can be cut off from etcd and from nothing else. Needs
/// root and `ip` (Debian's `iproute2`).
pub struct Partition {
    pub netns: String,
    etcd_link: String,
}

impl Partition {
    const NETNS: &'static str = "watt-partition";

    pub fn create() -> Partition {
        which("ip").unwrap_or_else(|| {
            panic!("`ip` is not installed: run `apt-get install -y iproute2` (scripts/test does this)")
        });
        // A namespace left by a test that was killed: its links go with it.
        let _ = Command::new("ip").args(["netns", "del", Self::NETNS]).output();
        let ns = Self::NETNS;
        let run = |args: &[&str]| {
            let out = Command::new("ip").args(args).output().unwrap();
            assert!(
                out.status.success(),
                "ip {}: {} (the partition tests need root)",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr)
            );
        };
        let in_ns = |args: &[&str]| {
            let mut all = vec!["netns", "exec", ns, "ip"];
            all.extend_from_slice(args);
            run(&all);
        };
        run(&["netns", "add", ns]);
        in_ns(&["link", "set", "lo", "up"]);
        for (outside, inside, outer, inner) in [
            ("wattpa", "wattpb", "10.201.0.1/30", "10.201.0.2/30"),
            ("wattea", "watteb", "10.202.0.1/30", "10.202.0.2/30"),
        ] {
            run(&["link", "add", outside, "type", "veth", "peer", "name", inside]);
            run(&["link", "set", inside, "netns", ns]);
            run(&["addr", "add", outer, "dev", outside]);
            run(&["link", "set", outside, "up"]);
            in_ns(&["addr", "add", inner, "dev", inside]);
            in_ns(&["link", "set", inside, "up"]);
        }
        Partition { netns: ns.to_string(), etcd_link: "wattea".to_string() }
    }

    /// Cut the namespace off from etcd (its link down): packets go nowhere, as in a partition.
    pub fn cut_etcd(&self) {
        self.link(&["down"]);
    }

    pub fn heal_etcd(&self) {
        self.link(&["up"]);
    }

    fn link(&self, state: &[&str]) {
        let mut args = vec!["link", "set", self.etcd_link.as_str()];
        args.extend_from_slice(state);
        assert!(Command::new("ip").args(&args).status().unwrap().success(), "ip {}", args.join(" "));
    }
}

impl Drop for Partition {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.netns]).output();
    }
}

/// The body of `GET path` on `127.0.0.1:port` over plain HTTP, or `None` if nothing answers.
pub fn http_get(port: u16, path: &str) -> Option<String> {
    http_get_at("127.0.0.1", port, path)
}

/// The same on `host`.
pub fn http_get_at(host: &str, port: u16, path: &str) -> Option<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect((host, port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").as_bytes()).ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    text.split_once("\r\n\r\n").map(|(_, body)| body.to_string())
}

/// Every sample of metric `name` in a Prometheus text body: (its labels as written, value).
pub fn samples(body: &str, name: &str) -> Vec<(String, f64)> {
    body.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (metric, labels) = match series.split_once('{') {
                Some((m, rest)) => (m, rest.trim_end_matches('}')),
                None => (series, ""),
            };
            (metric == name).then(|| Some((labels.to_string(), value.parse().ok()?)))?
        })
        .collect()
}

/// Let `how_long` pass (a scenario's own timing: an outage held for a while).
pub fn idle(how_long: Duration) {
    let until = StdInstant::now() + how_long;
    while let Some(left) = until.checked_duration_since(StdInstant::now()).filter(|d| !d.is_zero()) {
        std::thread::park_timeout(left);
    }
}

pub fn which(tool: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|paths| std::env::split_paths(&paths).collect::<Vec<_>>())
        .map(|dir| dir.join(tool))
        .find(|path| path.is_file())
}

/// The tests' certificate authority, made once per test process as an operator would with
/// `wattctl certs`: the controller's certificate, an admin's, and one per node or person asked
/// for. Every controller the helpers start serves TLS with it; every agent and wattctl call
/// presents one of its certificates.
pub struct TestPki {
    pub dir: PathBuf,
    authority: watt_common::pki::Authority,
    issued: std::sync::Mutex<std::collections::BTreeSet<String>>,
}

/// A certificate and key as files.
#[derive(Debug, Clone)]
pub struct CertFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl TestPki {
    /// The process's authority (made on first use).
    pub fn get() -> &'static TestPki {
        static PKI: std::sync::OnceLock<TestPki> = std::sync::OnceLock::new();
        PKI.get_or_init(|| {
            use watt_common::pki::{Authority, AUTHORITY_VALIDITY};
            let dir = std::env::temp_dir().join(format!("watt-test-pki-{}", std::process::id()));
            std::fs::create_dir_all(&dir).unwrap();
            let authority = Authority::generate("watt test CA", AUTHORITY_VALIDITY).unwrap();
            std::fs::write(dir.join("ca.pem"), authority.cert_pem()).unwrap();
            watt_common::pki::write_private(&dir.join("ca-key.pem"), authority.key_pem()).unwrap();
            let pki = TestPki { dir, authority, issued: Default::default() };
            let server = pki
                .authority
                .issue_server(
                    &["127.0.0.1".into(), "localhost".into(), PARTITIONED_HOST.into()],
                    Duration::from_secs(86400),
                )
                .unwrap();
            pki.write("controller", &server);
            pki
        })
    }

    pub fn ca(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    /// The authority's key: a controller given it signs node certificates (bootstrap).
    pub fn ca_key(&self) -> PathBuf {
        self.dir.join("ca-key.pem")
    }

    /// The controller's serving certificate.
    pub fn server(&self) -> CertFiles {
        self.files("controller")
    }

    /// A client certificate for `name` with `role` (one of watt's role names), made once.
    pub fn client(&self, name: &str, role: &str) -> CertFiles {
        let stem = format!("{role}-{name}");
        let mut issued = self.issued.lock().unwrap();
        if issued.insert(stem.clone()) {
            let role = role.parse().unwrap();
            let cert = self.authority.issue_client(name, role, Duration::from_secs(86400)).unwrap();
            self.write(&stem, &cert);
        }
        self.files(&stem)
    }

    pub fn admin(&self) -> CertFiles {
        self.client("admin", "admin")
    }

    fn files(&self, stem: &str) -> CertFiles {
        CertFiles { cert: self.dir.join(format!("{stem}.pem")), key: self.dir.join(format!("{stem}-key.pem")) }
    }

    fn write(&self, stem: &str, issued: &watt_common::pki::Issued) {
        let files = self.files(stem);
        watt_common::pki::write_private(&files.key, &issued.key_pem).unwrap();
        std::fs::write(&files.cert, &issued.cert_pem).unwrap();
    }
}

/// The credentials a test client presents to an https:// controller: the tests' CA and `cert`.
pub fn credentials(cert: Option<&CertFiles>) -> watt_common::client::Credentials {
    watt_common::client::Credentials {
        ca: Some(TestPki::get().ca()),
        cert: cert.map(|c| c.cert.clone()),
        key: cert.map(|c| c.key.clone()),
        token: None,
    }
}

/// A running controller and its gRPC URL.
pub struct ControllerProc {
    pub proc: Proc,
    pub url: String,
    pub port: u16,
    pub metrics_port: u16,
    /// The address it listens on (its gRPC and metrics ports).
    pub host: String,
    /// Whether it said it leads (else it said it follows).
    pub leading: bool,
}

impl ControllerProc {
    /// Start on `port` (0: a free one) with `store` (`file:...` or `etcd://...`), serving TLS
    /// with the tests' authority (unless `extra` sets its own `--tls-cert`, or `--insecure`).
    /// Ports it picks itself may be taken by another test between the pick and the bind: it then
    /// tries again with new ones.
    pub fn start(store: &str, port: u16, extra: &[&str]) -> ControllerProc {
        ControllerProc::start_in(None, "127.0.0.1", store, port, extra)
    }

    /// [`ControllerProc::start`] inside network namespace `netns` (when given), listening on
    /// `host` (an address of that namespace, in the tests' server certificate).
    pub fn start_in(netns: Option<&str>, host: &str, store: &str, port: u16, extra: &[&str]) -> ControllerProc {
        for attempt in 1.. {
            let port = if port == 0 { free_port() } else { port };
            let metrics_port = free_port();
            let mut cmd = match netns {
                Some(ns) => {
                    let mut cmd = Command::new("ip");
                    cmd.args(["netns", "exec", ns]).arg(bin("watt-controller"));
                    cmd
                }
                None => Command::new(bin("watt-controller")),
            };
            cmd.args(["--listen", &format!("{host}:{port}"), "--metrics-addr", &format!("{host}:{metrics_port}")])
                .args(["--store", store])
                .args(extra);
            let tls = !extra.iter().any(|a| a.starts_with("--tls-cert") || *a == "--insecure");
            if tls {
                let pki = TestPki::get();
                let server = pki.server();
                cmd.arg("--tls-cert")
                    .arg(server.cert)
                    .arg("--tls-key")
                    .arg(server.key)
                    .arg("--client-ca")
                    .arg(pki.ca());
            }
            let scheme = if tls || extra.iter().any(|a| a.starts_with("--tls-cert")) { "https" } else { "http" };
            let proc = Proc::spawn("controller", cmd);
            // Serving, and then leading or following (a follower refuses Watt's calls).
            let up = proc.try_wait_line("Serving gRPC.", Duration::from_secs(30));
            match up.and_then(|_| proc.try_wait_line("role=", Duration::from_secs(30))) {
                Ok(line) => {
                    let url = format!("{scheme}://{host}:{port}");
                    let leading = line.contains("Leading");
                    return ControllerProc { proc, url, port, metrics_port, host: host.to_string(), leading };
                }
                Err(why) if attempt < 3 => eprintln!("controller did not start ({why}); trying other ports"),
                Err(why) => panic!("controller did not log \"Serving gRPC.\" in 3 attempts: {why}"),
            }
        }
        unreachable!("the loop returns or panics")
    }

    /// Wait until it leads (a restarted controller on etcd follows its dead predecessor until
    /// that one's lease ends).
    pub fn wait_leading(&mut self, timeout: Duration) {
        if !self.leading {
            self.proc.wait_line("Leading", timeout);
            self.leading = true;
        }
    }

    /// The controller's /metrics body.
    pub fn metrics(&self) -> String {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect((self.host.as_str(), self.metrics_port)).unwrap();
        s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").unwrap();
        let mut text = String::new();
        s.read_to_string(&mut text).unwrap();
        text.split_once("\r\n\r\n").map(|(_, body)| body.to_string()).unwrap_or_default()
    }
}

/// An agent with simulated GPUs in a session with `controller`.
pub fn agent(controller: &str, node: &str, gpus: u32) -> Proc {
    agent_with(controller, node, gpus, &[])
}

/// The same, with more flags (`--enforce dry-run`, `--node-overhead 150`, …). Against an
/// https:// controller it presents the node's own certificate, unless `extra` brings credentials.
pub fn agent_with(controller: &str, node: &str, gpus: u32, extra: &[&str]) -> Proc {
    Proc::spawn(node, agent_command(controller, node, gpus, extra))
}

/// The command [`agent_with`] runs, for a test that sets more on it (its environment).
pub fn agent_command(controller: &str, node: &str, gpus: u32, extra: &[&str]) -> Command {
    let mut cmd = Command::new(bin("watt-agent"));
    cmd.args(extra);
    let own_credentials =
        extra.iter().any(|a| ["--ca", "--tls-cert", "--token-file", "--bootstrap-token-file"].contains(a));
    if controller.starts_with("https://") && !own_credentials {
        let pki = TestPki::get();
        let cert = pki.client(node, "node");
        cmd.arg("--ca").arg(pki.ca()).arg("--tls-cert").arg(cert.cert).arg("--tls-key").arg(cert.key);
    }
    if !extra.contains(&"--metrics-addr") {
        cmd.args(["--metrics-addr", "127.0.0.1:0"]);
    }
    if !extra.contains(&"--logs-addr") {
        cmd.args(["--logs-addr", "127.0.0.1:0"]);
    }
    cmd.args(["--backend", "sim", "--sim-gpus", &gpus.to_string(), "--node-name", node])
        .args(["--controller", controller]);
    if !extra.contains(&"--sample-interval") {
        cmd.args(["--sample-interval", "200ms"]);
    }
    if !extra.contains(&"--state-dir") {
        cmd.arg("--state-dir").arg(state_dir(node));
    }
    cmd
}

/// A controller on a fresh file store in `dir` and `nodes` agents (`node-1`…) of `gpus`
/// simulated GPUs each, returned once every node is ready.
pub fn local_cluster(
    dir: &std::path::Path,
    nodes: u32,
    gpus: u32,
    controller_args: &[&str],
) -> (ControllerProc, Vec<Proc>) {
    let controller = ControllerProc::start(&format!("file:{}", dir.join("w.redb").display()), 0, controller_args);
    let agents: Vec<Proc> = (1..=nodes).map(|i| agent(&controller.url, &format!("node-{i}"), gpus)).collect();
    wait_for(Duration::from_secs(30), &format!("{nodes} nodes ready"), || {
        let listed = wattctl_json(&controller.url, &["nodes"]);
        (listed.as_array().unwrap().iter().filter(|n| n["state"] == "ready").count() == nodes as usize).then_some(())
    });
    (controller, agents)
}

/// `wattctl power set-source grid --kind grid --available AVAILABLE [--ramp RAMP]`, its answer.
pub fn set_grid(controller: &str, available: &str, ramp: Option<&str>) -> serde_json::Value {
    let mut args = vec!["power", "set-source", "grid", "--kind", "grid", "--available", available];
    if let Some(r) = ramp {
        args.extend(["--ramp", r]);
    }
    wattctl_json(controller, &args)
}

/// Where a test agent keeps shard logs and pid files: per test process and node.
pub fn state_dir(node: &str) -> std::path::PathBuf {
    std::env::temp_dir().join(format!("watt-test-agent-{}-{node}", std::process::id()))
}

/// A job's command that runs until it is stopped, for tests about placement and power.
pub const IDLE_COMMAND: &str = "[sleep, '3600']";

/// Run wattctl against `controller`, as an admin when it serves TLS.
pub fn wattctl(controller: &str, args: &[&str]) -> Output {
    let pki = TestPki::get();
    wattctl_as(controller, controller.starts_with("https://").then(|| pki.admin()).as_ref(), args)
}

/// Run wattctl against `controller` with a client certificate (or none).
pub fn wattctl_as(controller: &str, cert: Option<&CertFiles>, args: &[&str]) -> Output {
    wattctl_command(controller, cert, args).output().unwrap()
}

/// The wattctl command [`wattctl_as`] runs, for a test that streams its output.
pub fn wattctl_command(controller: &str, cert: Option<&CertFiles>, args: &[&str]) -> Command {
    let mut cmd = Command::new(bin("wattctl"));
    cmd.arg("--controller").arg(controller).args(args);
    for var in ["WATT_CA", "WATT_CERT", "WATT_KEY", "WATT_TOKEN", "WATT_CONTROLLER"] {
        cmd.env_remove(var);
    }
    if controller.starts_with("https://") {
        cmd.arg("--ca").arg(TestPki::get().ca());
    }
    if let Some(cert) = cert {
        cmd.arg("--cert").arg(&cert.cert).arg("--key").arg(&cert.key);
    }
    cmd
}

/// `wattctl -o json ARGS`, parsed.
pub fn wattctl_json(controller: &str, args: &[&str]) -> serde_json::Value {
    let mut full = vec!["-o", "json"];
    full.extend_from_slice(args);
    let out = wattctl(controller, &full);
    assert!(out.status.success(), "wattctl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Submit a job manifest through wattctl; returns the output.
pub fn submit(controller: &str, manifest: &str) -> Output {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("job.yaml");
    std::fs::write(&path, manifest).unwrap();
    wattctl(controller, &["submit", "-f", path.to_str().unwrap()])
}

pub fn job_manifest(name: &str, priority: i64, min: u32, max: u32, gpus: u32) -> String {
    format!(
        "name: {name}\npriority: {priority}\nshards: {{min: {min}, max: {max}}}\ngpus_per_shard: {gpus}\ncommand: {IDLE_COMMAND}\n"
    )
}

/// Jobs by name, from `wattctl -o json jobs`.
pub fn jobs(controller: &str) -> std::collections::BTreeMap<String, serde_json::Value> {
    let list = wattctl_json(controller, &["jobs"]);
    list.as_array().unwrap().iter().map(|j| (j["name"].as_str().unwrap().to_string(), j.clone())).collect()
}
