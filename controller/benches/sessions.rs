//! How many agent sessions one controller holds, and how fast a power event reaches every cap:
//! a load generator opens N simulated agents (8 GPUs each), multiplexed over a few HTTP/2
//! connections; each registers, sends one telemetry message a second, and acknowledges cap
//! orders as a real agent does. The bench measures the controller process's CPU and memory, then
//! fills the cluster with jobs and cuts the power source by 25% (and restores it) `--events`
//! times, reading the controller's own power-event-to-acknowledged histogram.
//!
//!     cargo bench -p watt-controller --bench sessions -- [--agents 25000] [--seconds 30] [--events 5]
//!         [--tls | --connection-per-agent] [--restart] [--store etcd://HOST:PORT [--failover]]
//!         [--domains] [--grid-events]
//!
//! By default the agents share a few HTTP/2 connections and prove their names with bearer
//! tokens. `--tls`: each agent has a TLS connection of its own and presents a node certificate
//! of its own, as real agents do; `--connection-per-agent` is the same in plain text (the
//! baseline for TLS's cost). `--restart` kills the controller (SIGKILL) after the idle
//! measurement, starts it again on the same store, and times until every agent holds a session
//! again; the agents reconnect with the real agent's backoff (200 ms doubling to 10 s, equal
//! jitter). `--store etcd://…`: the controller on that etcd (it then leads by election, every
//! write fenced by its term) instead of a file store in a scratch directory. `--failover` (with
//! an etcd store, shared connections): a second controller runs as a standby once every agent
//! holds a session; the leader is killed (SIGKILL) and the bench times until the standby leads
//! and until every agent holds a session with it. The agents know both controllers and, as the
//! real agent does, try the other when one refuses or fails, pausing at most a second while a
//! controller answers that none leads. `--domains`: the controller holds a tree of power domains
//! (10 feeds, 250 rows, 3,125 racks at 25,000 agents) that the agents' labels place them in.
//! `--grid-events`: each cut is an OpenADR event instead of `set-source`: the controller is the VEN
//! of the real reference VTN (`openleadr-vtn` on PostgreSQL, as `scripts/test` installs them),
//! the bench its utility; an `IMPORT_CAPACITY_LIMIT` event starts 3 s after it is sent and lasts
//! 10 s, and its start and its end are the events timed (the end lifts the limit at once).
//!
//! The controller runs as its own release process (the real binary); the generator shares the
//! machine with it, so the controller's figures are read from /proc for its PID alone. Each
//! simulated agent proves its node's name with a bearer token of its own (a token file of N
//! lines), as the controller admits no session without credentials.
#![allow(clippy::unwrap_used, clippy::print_stdout, clippy::disallowed_types)]

use std::io::{Read, Write as _};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_stream::wrappers::ReceiverStream;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use watt_proto::v1 as pb;
use watt_proto::v1::agent_service_client::AgentServiceClient;

/// hyper's HTTP/2 server allows 200 concurrent streams per connection by default.
const STREAMS_PER_CONNECTION: usize = 190;

fn arg(name: &str, default: u64) -> u64 {
    let args: Vec<String> = std::env::args().collect();
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// `--store ADDRESS`, when given.
fn store_arg() -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter().position(|a| a == "--store").and_then(|i| args.get(i + 1)).cloned()
}

fn free_port() -> u16 {
    watt_common::ports::free_loopback_port().unwrap()
}

fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = stat.rsplit_once(')').unwrap().1.split_whitespace().collect();
    let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
    ticks / 100.0 // USER_HZ
}

fn status_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status.lines().find(|l| l.starts_with(field)).and_then(|l| l.split_whitespace().nth(1)).unwrap().parse().unwrap()
}

/// A series's value (`name`, labels included as the exposition writes them); 0 if absent.
fn metric(metrics_port: u16, name: &str) -> f64 {
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", metrics_port)) else { return 0.0 };
    let _ = s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n");
    let mut body = String::new();
    let _ = s.read_to_string(&mut body);
    let prefix = format!("{name} ");
    body.lines().find(|l| l.starts_with(&prefix)).and_then(|l| l.split(' ').nth(1)?.parse().ok()).unwrap_or(0.0)
}

fn sessions_gauge(metrics_port: u16) -> u64 {
    metric(metrics_port, "watt_controller_sessions") as u64
}

fn register(i: usize) -> pb::AgentMessage {
    let gpus = (0..8)
        .map(|g| pb::GpuInventory {
            index: g,
            uuid: format!("GPU-load-{i:06}-{g}"),
            model: "NVIDIA H100 80GB HBM3".into(),
            memory_total_bytes: 85_520_809_984,
            pci_bus_id: format!("00000000:{:02X}:00.0", 0x18 + g),
            power_limit: Some(pb::PowerLimitRange { min_watts: 200.0, max_watts: 700.0, default_watts: 700.0 }),
            current_limit_watts: 700.0,
            failsafe_watts: 200.0,
        })
        .collect();
    // Its place in the tree `--domains` sets (see `set_domains`).
    let (rack, row) = (i / 8, i / 8 * 2 / 25);
    let labels = [("feed", row / 25), ("row", row), ("rack", rack)]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let register = pb::Register {
        node_name: format!("load-{i:06}"),
        gpus,
        agent_version: "load".into(),
        labels,
        ..Default::default()
    };
    pb::AgentMessage { body: Some(pb::agent_message::Body::Register(register)) }
}

/// Telemetry of a node: the draw stays below the idle allowance, so GPUs waiting for their job's
/// placement are not taken for someone else's load (the bench measures orders, not the meter).
fn telemetry(i: usize) -> pb::AgentMessage {
    let gpus = (0..8)
        .map(|g| pb::GpuTelemetry {
            index: g,
            up: true,
            power_watts: 60.0 + (i % 30) as f64,
            energy_joules_total: 1.0e6,
            power_limit_watts: 700.0,
            enforced_power_limit_watts: 700.0,
            utilization_ratio: 0.97,
            temperature_celsius: 64.0,
            memory_used_bytes: 70 << 30,
            throttle_reasons: 4,
        })
        .collect();
    pb::AgentMessage {
        body: Some(pb::agent_message::Body::Telemetry(pb::Telemetry { unix_ms: 0, gpus, ..Default::default() })),
    }
}

/// The bearer token of simulated agent `i` (and `None`'s: the bench's admin).
fn token_of(i: Option<usize>) -> String {
    match i {
        Some(i) => format!("watt_bench_node_{i}"),
        None => "watt_bench_admin".into(),
    }
}

/// A token file naming every simulated agent, and an admin for the bench's own calls.
fn token_file(dir: &std::path::Path, agents: usize) -> std::path::PathBuf {
    use watt_common::auth::token_digest;
    let mut text = format!("{},bench,admin\n", token_digest(&token_of(None)));
    for i in 0..agents {
        text.push_str(&format!("{},load-{i:06},node\n", token_digest(&token_of(Some(i)))));
    }
    let path = dir.join("tokens");
    std::fs::write(&path, text).unwrap();
    path
}

/// Calls on `channel` that carry `token` (none when it is empty: a TLS agent's certificate speaks).
fn with_token(
    channel: Channel,
    token: String,
) -> InterceptedService<Channel, impl FnMut(tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> + Clone> {
    let value: Option<tonic::metadata::MetadataValue<_>> =
        (!token.is_empty()).then(|| format!("Bearer {token}").parse().unwrap());
    InterceptedService::new(channel, move |mut request: tonic::Request<()>| {
        if let Some(value) = &value {
            request.metadata_mut().insert("authorization", value.clone());
        }
        Ok(request)
    })
}

/// The flags' mode: how agents connect.
#[derive(Clone, Copy, PartialEq)]
enum Mode {
    Shared,
    PlainPerAgent,
    Tls,
}

/// A local authority: the controller's certificate and key files (with its CA), and one
/// identity per agent.
struct Pki {
    ca: Certificate,
    ca_file: std::path::PathBuf,
    cert_file: std::path::PathBuf,
    key_file: std::path::PathBuf,
    agents: Vec<Identity>,
}

fn pki(dir: &std::path::Path, agents: usize) -> Pki {
    use watt_common::auth::Role;
    use watt_common::pki::{Authority, AUTHORITY_VALIDITY, LEAF_VALIDITY};
    let ca = Authority::generate("bench", AUTHORITY_VALIDITY).unwrap();
    let server = ca.issue_server(&["127.0.0.1".into()], LEAF_VALIDITY).unwrap();
    let (ca_file, cert_file, key_file) = (dir.join("ca.pem"), dir.join("tls.pem"), dir.join("tls-key.pem"));
    std::fs::write(&ca_file, ca.cert_pem()).unwrap();
    std::fs::write(&cert_file, &server.cert_pem).unwrap();
    std::fs::write(&key_file, &server.key_pem).unwrap();
    let agents = (0..agents)
        .map(|i| {
            let issued = ca.issue_client(&format!("load-{i:06}"), Role::Node, LEAF_VALIDITY).unwrap();
            Identity::from_pem(issued.cert_pem, issued.key_pem)
        })
        .collect();
    Pki { ca: Certificate::from_pem(ca.cert_pem()), ca_file, cert_file, key_file, agents }
}

/// Start the controller (again, on the same store and ports).
fn start_controller(args: &[String]) -> std::process::Child {
    Command::new(env!("CARGO_BIN_EXE_watt-controller"))
        .args(args)
        .env("WATT_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

/// How a simulated agent reaches the controller.
#[derive(Clone)]
enum Link {
    /// A channel per controller (a replica each), shared with other agents (multiplexed HTTP/2),
    /// proving its name with a token.
    Shared(Vec<Channel>),
    /// A connection of its own: TLS with its node certificate, or plain text with its token.
    Own { endpoint: Box<Endpoint>, token: bool },
}

/// Sessions refused on a first try or lost (the agent tried again, as the real one does).
static RETRIES: AtomicU64 = AtomicU64::new(0);

/// How a session ended.
#[derive(PartialEq)]
enum Ended {
    /// It was registered, then ended.
    Held,
    /// A controller answered that it does not lead.
    NoLeader,
    Failed,
}

async fn agent(link: Link, i: usize, sent: Arc<AtomicU64>) {
    let mut backoff = Duration::from_millis(200);
    // Which controller to try first (of several only with `--failover`).
    let mut replica = 0;
    let replicas = match &link {
        Link::Shared(channels) => channels.len(),
        Link::Own { .. } => 1,
    };
    loop {
        // One attempt asks each controller in turn until one holds the session, as the agent's
        // search for the leader does.
        let (mut held, mut no_leader) = (false, false);
        for _ in 0..replicas {
            match session(&link, replica, i, &sent).await {
                Ended::Held => {
                    held = true;
                    break;
                }
                Ended::NoLeader => no_leader = true,
                Ended::Failed => {}
            }
            replica += 1;
        }
        if held {
            backoff = Duration::from_millis(200);
        }
        RETRIES.fetch_add(1, Ordering::Relaxed);
        // Equal jitter, as the agent: half to all of the backoff.
        let jitter = 0.5 + 0.5 * ((i as u64 * 7_919 + RETRIES.load(Ordering::Relaxed)) % 1_000) as f64 / 1_000.0;
        tokio::time::sleep(backoff.mul_f64(jitter)).await;
        backoff = (backoff * 2).min(Duration::from_secs(10));
        if no_leader {
            // As the agent: an election under way is asked about again within a second.
            backoff = backoff.min(Duration::from_secs(1));
        }
    }
}

/// One session with controller `replica` (modulo how many there are), until it ends.
async fn session(link: &Link, replica: usize, i: usize, sent: &Arc<AtomicU64>) -> Ended {
    let (channel, token) = match link {
        Link::Shared(channels) => (channels[replica % channels.len()].clone(), true),
        Link::Own { endpoint, token } => match endpoint.connect().await {
            Ok(channel) => (channel, *token),
            Err(_) => return Ended::Failed,
        },
    };
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(register(i)).await.unwrap();
    let call = if token {
        AgentServiceClient::new(with_token(channel, token_of(Some(i)))).session(ReceiverStream::new(rx)).await
    } else {
        AgentServiceClient::new(with_token(channel, String::new())).session(ReceiverStream::new(rx)).await
    };
    let response = match call {
        Ok(response) => response,
        Err(status) if status.code() == tonic::Code::Unavailable && status.message().contains("does not lead") => {
            return Ended::NoLeader
        }
        Err(_) => return Ended::Failed,
    };
    let mut inbound = response.into_inner();
    // The first answer is `Registered`.
    if !matches!(inbound.message().await, Ok(Some(_))) {
        return Ended::Failed;
    }
    // Answer cap orders as an agent does: apply, then acknowledge what is in force.
    let acks = tx.clone();
    let answering = tokio::spawn(async move {
        while let Ok(Some(m)) = inbound.message().await {
            if let Some(pb::controller_message::Body::CapOrder(order)) = m.body {
                // An increase steps up a random moment into its wave, as the agent does.
                let delay = if order.spread_ms > 0 { (i as u64 * 7_919) % u64::from(order.spread_ms) } else { 0 };
                let ack = pb::CapAck {
                    epoch: order.epoch,
                    applied: order.caps,
                    error: String::new(),
                    outcome: pb::CapOutcome::Applied as i32,
                    enforce_mode: pb::EnforceMode::On as i32,
                };
                let ack = pb::AgentMessage { body: Some(pb::agent_message::Body::CapAck(ack)) };
                if delay == 0 {
                    // A decrease: at once, as the agent does (no task, no timer: the generator
                    // stands in for 50,000 machines on the controller's two cores).
                    let _ = acks.send(ack).await;
                    continue;
                }
                let acks = acks.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_millis(delay)).await;
                    let _ = acks.send(ack).await;
                });
            }
        }
    });
    // Spread the agents' telemetry evenly over each second.
    tokio::time::sleep(Duration::from_millis((i % 1000) as u64)).await;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tick.tick().await;
        // The session is over when the controller stops answering (its stream ended).
        if answering.is_finished() || tx.send(telemetry(i)).await.is_err() {
            return Ended::Held;
        }
        sent.fetch_add(1, Ordering::Relaxed);
    }
}

fn main() {
    let agents = arg("--agents", 25_000) as usize;
    let seconds = arg("--seconds", 30);
    let flags: Vec<String> = std::env::args().collect();
    let mode = if flags.iter().any(|a| a == "--tls") {
        Mode::Tls
    } else if flags.iter().any(|a| a == "--connection-per-agent") {
        Mode::PlainPerAgent
    } else {
        Mode::Shared
    };
    let dir = tempfile::tempdir().unwrap();
    let (port, metrics_port) = (free_port(), free_port());
    let made = Instant::now();
    let pki = (mode == Mode::Tls).then(|| pki(dir.path(), agents));
    if pki.is_some() {
        println!("{agents} node certificates made in {:.1} s", made.elapsed().as_secs_f64());
    }
    let mut controller_args: Vec<String> = vec![
        "--listen".into(),
        format!("127.0.0.1:{port}"),
        "--metrics-addr".into(),
        format!("127.0.0.1:{metrics_port}"),
        "--store".into(),
        store_arg().unwrap_or_else(|| format!("file:{}", dir.path().join("w.redb").display())),
        "--node-lease".into(),
        "120s".into(),
        // One principal submits every job of the fill (a job per 25 nodes) and the probes.
        "--max-jobs-per-principal".into(),
        "100000".into(),
        "--token-file".into(),
        token_file(dir.path(), agents).display().to_string(),
    ];
    if let Some(p) = &pki {
        for (flag, file) in [("--tls-cert", &p.cert_file), ("--tls-key", &p.key_file), ("--client-ca", &p.ca_file)] {
            controller_args.extend([flag.to_string(), file.display().to_string()]);
        }
    }
    // `--grid-events`: the VTN, and the controller as its VEN polling every second.
    let grid = flags.iter().any(|a| a == "--grid-events").then(|| {
        let vtn = watt_system_tests::vtn::Vtn::start();
        let secret = dir.path().join("ven-secret");
        std::fs::write(&secret, watt_system_tests::vtn::VEN_CLIENT.1).unwrap();
        controller_args.extend(
            [
                "--openadr-vtn",
                &vtn.url,
                "--openadr-client-id",
                watt_system_tests::vtn::VEN_CLIENT.0,
                "--openadr-secret-file",
                secret.to_str().unwrap(),
                "--openadr-programs",
                "bench-dr",
                "--openadr-poll",
                "1s",
            ]
            .map(String::from),
        );
        vtn
    });
    let mut controller = start_controller(&controller_args);
    let pid = controller.id();
    if flags.iter().any(|a| a == "--domains") {
        set_domains(&format!("http://127.0.0.1:{port}"), agents);
    }
    // `--failover`: the standby's ports, known to the agents from the start.
    let failover = flags.iter().any(|a| a == "--failover");
    assert!(
        !failover || (store_arg().is_some() && mode == Mode::Shared),
        "--failover needs --store etcd://… and shared connections"
    );
    let (standby_port, standby_metrics_port) = (free_port(), free_port());
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let sent = Arc::new(AtomicU64::new(0));
    let scheme = if mode == Mode::Tls { "https" } else { "http" };
    let url = format!("{scheme}://127.0.0.1:{port}");
    let connections = if mode == Mode::Shared { agents.div_ceil(STREAMS_PER_CONNECTION) } else { agents };
    let ramp = Instant::now();
    runtime.block_on(async {
        let endpoint = Endpoint::from_shared(url.clone()).unwrap();
        let mut channels = Vec::new();
        if mode == Mode::Shared {
            for _ in 0..connections {
                for attempt in 0.. {
                    match endpoint.connect().await {
                        Ok(c) => {
                            channels.push(c);
                            break;
                        }
                        Err(_) if attempt < 100 => tokio::time::sleep(Duration::from_millis(100)).await,
                        Err(e) => panic!("controller did not start: {e}"),
                    }
                }
            }
        }
        // The standby's channels connect when first used: it starts later.
        let standby = Endpoint::from_shared(format!("http://127.0.0.1:{standby_port}")).unwrap();
        let standby_channels: Vec<Channel> = (0..connections).map(|_| standby.connect_lazy()).collect();
        for i in 0..agents {
            let link = match (mode, &pki) {
                (Mode::Shared, _) if failover => {
                    Link::Shared(vec![channels[i % connections].clone(), standby_channels[i % connections].clone()])
                }
                (Mode::Shared, _) => Link::Shared(vec![channels[i % connections].clone()]),
                (Mode::Tls, Some(p)) => Link::Own {
                    endpoint: Box::new(
                        endpoint
                            .clone()
                            .tls_config(
                                ClientTlsConfig::new().ca_certificate(p.ca.clone()).identity(p.agents[i].clone()),
                            )
                            .unwrap(),
                    ),
                    token: false,
                },
                _ => Link::Own { endpoint: Box::new(endpoint.clone()), token: true },
            };
            tokio::spawn(agent(link, i, sent.clone()));
            if i % 1000 == 999 {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    });
    let held = loop {
        let n = sessions_gauge(metrics_port);
        if n as usize >= agents || ramp.elapsed() > Duration::from_secs(300) {
            break n;
        }
        std::thread::park_timeout(Duration::from_millis(500));
    };
    let ramp_seconds = ramp.elapsed().as_secs_f64();
    println!("sessions tried again after a refusal or failure: {}", RETRIES.load(Ordering::Relaxed));
    // Settle, then measure.
    std::thread::park_timeout(Duration::from_secs(3));
    let (cpu0, sent0, t0) = (cpu_seconds(pid), sent.load(Ordering::Relaxed), Instant::now());
    std::thread::park_timeout(Duration::from_secs(seconds));
    let elapsed = t0.elapsed().as_secs_f64();
    let cpu = (cpu_seconds(pid) - cpu0) / elapsed;
    let rate = (sent.load(Ordering::Relaxed) - sent0) as f64 / elapsed;
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1) as f64;
    println!("| agents (8 GPUs each) | connections | sessions held | ramp (s) | telemetry msgs/s | controller CPU (of one core) | of the machine ({cores} cores) | controller RSS (MiB) | peak RSS (MiB) |");
    println!("|---|---|---|---|---|---|---|---|---|");
    println!(
        "| {agents} | {connections} | {held} | {ramp_seconds:.1} | {rate:.0} | {:.1}% | {:.1}% | {:.0} | {:.0} |",
        cpu * 100.0,
        cpu * 100.0 / cores,
        status_kib(pid, "VmRSS:") as f64 / 1024.0,
        status_kib(pid, "VmHWM:") as f64 / 1024.0
    );
    if flags.iter().any(|a| a == "--restart") {
        // SIGKILL, as a crash or a node failure would, then the same controller again.
        let _ = controller.kill();
        let _ = controller.wait();
        let down = Instant::now();
        controller = start_controller(&controller_args);
        let back = loop {
            let n = sessions_gauge(metrics_port);
            if n as usize >= agents || down.elapsed() > Duration::from_secs(300) {
                break n;
            }
            std::thread::park_timeout(Duration::from_millis(200));
        };
        println!(
            "controller killed and restarted: {back} of {agents} sessions again after {:.1} s",
            down.elapsed().as_secs_f64()
        );
        std::thread::park_timeout(Duration::from_secs(3));
    }
    let (mut url, mut metrics_port) = (url, metrics_port);
    if failover {
        let mut standby_args = controller_args.clone();
        standby_args[1] = format!("127.0.0.1:{standby_port}");
        standby_args[3] = format!("127.0.0.1:{standby_metrics_port}");
        let mut standby = start_controller(&standby_args);
        let synced = Instant::now();
        while metric(standby_metrics_port, "watt_controller_replica_in_sync") < 1.0 {
            assert!(synced.elapsed() < Duration::from_secs(60), "the standby's copy never caught up");
            std::thread::park_timeout(Duration::from_millis(200));
        }
        println!("standby in sync {:.1} s after it started", synced.elapsed().as_secs_f64());
        std::thread::park_timeout(Duration::from_secs(2));
        let _ = controller.kill();
        let _ = controller.wait();
        let killed = Instant::now();
        while metric(standby_metrics_port, "watt_controller_leader") < 1.0 {
            assert!(killed.elapsed() < Duration::from_secs(60), "the standby never led");
            std::thread::park_timeout(Duration::from_millis(50));
        }
        let leads = killed.elapsed().as_secs_f64();
        let back = loop {
            let n = sessions_gauge(standby_metrics_port);
            if n as usize >= agents || killed.elapsed() > Duration::from_secs(300) {
                break n;
            }
            std::thread::park_timeout(Duration::from_millis(200));
        };
        println!(
            "leader killed: the standby leads after {leads:.2} s (its load from its warm copy: {:.3} s); {back} of {agents} sessions with it after {:.1} s",
            metric(standby_metrics_port, "watt_controller_term_load_seconds{from=\"warm_copy\"}"),
            killed.elapsed().as_secs_f64()
        );
        std::mem::swap(&mut controller, &mut standby);
        url = format!("http://127.0.0.1:{standby_port}");
        metrics_port = standby_metrics_port;
        std::thread::park_timeout(Duration::from_secs(3));
    }
    let events = arg("--events", 5);
    if events > 0 {
        power_events(&runtime, &url, pki.as_ref().map(|p| p.ca.clone()), metrics_port, agents, events, grid.as_ref());
    }
    let _ = controller.kill();
    let _ = controller.wait();
    runtime.shutdown_timeout(Duration::from_secs(1));
}

/// `--domains`: the tree the agents' labels place them in, set before they connect — a rack per
/// 8 nodes, a row per 12.5 racks, a feed per 25 rows (3,125, 250 and 10 at 25,000 agents). Every
/// fourth rack is derated to 60% of its GPUs at full power, the others to 85%; rows hold 90% of
/// their nodes at full power, feeds 85.5%.
fn set_domains(url: &str, agents: usize) {
    use watt_proto::v1::power_service_client::PowerServiceClient;
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    runtime.block_on(async {
        let endpoint = Endpoint::from_shared(url.to_string()).unwrap();
        let channel = loop {
            match endpoint.connect().await {
                Ok(c) => break c,
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        };
        let mut power = PowerServiceClient::new(with_token(channel, token_of(None)));
        let node_full = 8.0 * 700.0;
        // Nodes per rack, row and feed, as `register` labels them.
        // rack → (its row, nodes); row → (its feed, nodes); feed → nodes.
        let mut racks: std::collections::BTreeMap<usize, (usize, usize)> = Default::default();
        let mut rows: std::collections::BTreeMap<usize, (usize, usize)> = Default::default();
        let mut feeds: std::collections::BTreeMap<usize, usize> = Default::default();
        for i in 0..agents {
            let (rack, row) = (i / 8, i / 8 * 2 / 25);
            racks.entry(rack).or_insert((row, 0)).1 += 1;
            rows.entry(row).or_insert((row / 25, 0)).1 += 1;
            *feeds.entry(row / 25).or_insert(0) += 1;
        }
        let started = Instant::now();
        let mut requests = Vec::new();
        for (feed, nodes) in &feeds {
            requests.push((format!("feed-{feed}"), String::new(), 0.855, *nodes, ("feed", *feed)));
        }
        for (row, (feed, nodes)) in &rows {
            requests.push((format!("row-{row}"), format!("feed-{feed}"), 0.9, *nodes, ("row", *row)));
        }
        for (rack, (row, nodes)) in &racks {
            let derating = if rack % 4 == 0 { 0.6 } else { 0.85 };
            requests.push((format!("rack-{rack}"), format!("row-{row}"), derating, *nodes, ("rack", *rack)));
        }
        let set = requests.len();
        for (name, parent, derating, nodes, (key, value)) in requests {
            let domain = pb::PowerDomain {
                name,
                parent,
                limit_watts: derating * nodes as f64 * node_full,
                selector: [(key.to_string(), value.to_string())].into_iter().collect(),
            };
            power.set_domain(pb::SetDomainRequest { domain: Some(domain) }).await.unwrap();
        }
        println!("{set} power domains set in {:.1} s", started.elapsed().as_secs_f64());
    });
}

/// Fill the cluster with jobs, then cut the grid by 25% and restore it `events` times; print the
/// controller's event-to-every-cap-acknowledged latency for each.
fn power_events(
    runtime: &tokio::runtime::Runtime,
    url: &str,
    ca: Option<Certificate>,
    metrics_port: u16,
    agents: usize,
    events: u64,
    vtn: Option<&watt_system_tests::vtn::Vtn>,
) {
    use watt_proto::v1::control_service_client::ControlServiceClient;
    use watt_proto::v1::power_service_client::PowerServiceClient;
    let full = agents as f64 * 8.0 * 700.0 * 1.2;
    let (mut control, mut power) = runtime.block_on(async {
        let mut endpoint = Endpoint::from_shared(url.to_string()).unwrap();
        if let Some(ca) = ca {
            endpoint = endpoint.tls_config(ClientTlsConfig::new().ca_certificate(ca)).unwrap();
        }
        let channel = endpoint.connect().await.unwrap();
        (
            ControlServiceClient::new(with_token(channel.clone(), token_of(None))),
            PowerServiceClient::new(with_token(channel, token_of(None))),
        )
    });
    let set = |power: &mut PowerServiceClient<_>, watts: f64| {
        let source = pb::PowerSource {
            name: "grid".into(),
            kind: pb::SourceKind::Grid as i32,
            available_watts: watts,
            ..Default::default()
        };
        runtime.block_on(power.set_source(pb::SetSourceRequest { source: Some(source) })).unwrap();
    };
    set(&mut power, full);
    // Jobs of 25 shards × 8 GPUs fill every node, submitted 100 at a time (as many users would).
    let jobs = agents / 25;
    for batch in (0..jobs).collect::<Vec<_>>().chunks(100) {
        let submits = batch.iter().map(|&i| {
            let spec = pb::JobSpec {
                name: format!("fill-{i:05}"),
                priority: (i % 3) as i64,
                shards: Some(pb::ShardRange { min: 25, max: 25 }),
                gpus_per_shard: 8,
                command: vec!["train".into()],
                flex: 0.1 * (i % 4) as f64,
                ..Default::default()
            };
            let mut control = control.clone();
            async move {
                let request = pb::SubmitJobRequest { source: Some(pb::submit_job_request::Source::Spec(spec)) };
                control.submit_job(request).await.unwrap();
            }
        });
        runtime.block_on(futures::future::join_all(submits));
    }
    let settle = |what: &str| {
        let start = Instant::now();
        loop {
            std::thread::park_timeout(Duration::from_millis(200));
            // Between two waves of increases no node owes an acknowledgement, but the event is
            // still open: a cut then would join it (at 125,000 agents one did, and took 21 s).
            let unacked = metric(metrics_port, "watt_power_unacknowledged_nodes");
            let open = metric(metrics_port, "watt_power_event_open");
            if unacked == 0.0 && open == 0.0 && start.elapsed() > Duration::from_secs(1) {
                return;
            }
            assert!(start.elapsed() < Duration::from_secs(300), "{what} never settled");
        }
    };
    settle("placement");

    // Passes with one change each: a one-GPU job submitted into the full cluster, every second
    // (it waits for room: one stored decision per pass).
    let phases = ["view", "decide", "store", "caps", "orders", "books"];
    let read = || {
        let mut v = vec![
            metric(metrics_port, "watt_reconcile_duration_seconds_sum"),
            metric(metrics_port, "watt_reconcile_duration_seconds_count"),
        ];
        for p in phases {
            v.push(metric(metrics_port, &format!("watt_reconcile_phase_seconds_sum{{phase=\"{p}\"}}")));
        }
        v
    };
    let before = read();
    for k in 0..10 {
        let spec = pb::JobSpec {
            name: format!("probe-{k}"),
            shards: Some(pb::ShardRange { min: 1, max: 1 }),
            gpus_per_shard: 1,
            command: vec!["train".into()],
            ..Default::default()
        };
        runtime
            .block_on(
                control.submit_job(pb::SubmitJobRequest { source: Some(pb::submit_job_request::Source::Spec(spec)) }),
            )
            .unwrap();
        std::thread::park_timeout(Duration::from_secs(1));
    }
    // The passes between two readings: how many, and their mean by phase.
    let passes_between = |before: &[f64], after: &[f64]| {
        let passes = (after[1] - before[1]).max(1.0);
        let per_phase: Vec<String> = phases
            .iter()
            .enumerate()
            .map(|(i, p)| format!("{p} {:.1} ms", (after[i + 2] - before[i + 2]) / passes * 1e3))
            .collect();
        format!("{passes} passes, mean {:.1} ms ({})", (after[0] - before[0]) / passes * 1e3, per_phase.join(", "))
    };
    println!("one change a pass: {}", passes_between(&before, &read()));

    let mut cuts = Vec::new();
    let mut restores = Vec::new();
    // The cut: 25% of the grid; under `--domains`, whose racks already hold the cluster near
    // 79% of its GPUs' full power, a cut to half of the grid (60% of full power) that binds.
    let cut = if std::env::args().any(|a| a == "--domains") { 0.5 } else { 0.75 };
    let program = vtn.map(|vtn| {
        use openleadr_client::{BusinessLogic, Client, ClientCredentials};
        let (id, secret) = watt_system_tests::vtn::BL_CLIENT;
        let utility = Client::<BusinessLogic>::with_url(
            vtn.url.parse().unwrap(),
            Some(ClientCredentials::new(id.into(), secret.into())),
        );
        runtime.block_on(utility.create_program(openleadr_wire::program::ProgramRequest::new("bench-dr"))).unwrap()
    });
    for _ in 0..events {
        for (share, out) in [(cut, &mut cuts), (1.0, &mut restores)] {
            let (sum0, count0) = (
                metric(metrics_port, "watt_power_event_to_ack_seconds_sum"),
                metric(metrics_port, "watt_power_event_to_ack_seconds_count"),
            );
            let before = read();
            match &program {
                None => set(&mut power, full * share),
                // The event's start is the cut; its end, 10 s later, the restore.
                Some(program) if share < 1.0 => grid_event(runtime, program, full * share),
                Some(_) => {}
            }
            let start = Instant::now();
            // The controller times the event itself; polling its metrics (a few thousand series
            // at this size) more often would only take its CPU during the event.
            while metric(metrics_port, "watt_power_event_to_ack_seconds_count") <= count0 {
                std::thread::park_timeout(Duration::from_millis(250));
                assert!(start.elapsed() < Duration::from_secs(300), "event never acknowledged");
            }
            let seconds = metric(metrics_port, "watt_power_event_to_ack_seconds_sum") - sum0;
            out.push(seconds);
            if share < 1.0 {
                // Where a cut's time goes: its passes, and the rest is orders and answers on
                // the wire.
                println!("cut, event to acknowledged in {seconds:.3} s: {}", passes_between(&before, &read()));
            }
            settle("event");
        }
    }
    let passes = metric(metrics_port, "watt_reconcile_duration_seconds_count");
    if program.is_some() {
        println!("grid events: each cut an OpenADR IMPORT_CAPACITY_LIMIT event's start, each restore its end");
    }
    let pass_seconds = metric(metrics_port, "watt_reconcile_duration_seconds_sum") / passes.max(1.0);
    println!("reconcile passes: {passes}, mean {:.1} ms", pass_seconds * 1e3);
    let show = |v: &[f64]| {
        let mut v = v.to_vec();
        v.sort_by(|a, b| a.total_cmp(b));
        format!("median {:.3} s, max {:.3} s", v[v.len() / 2], v[v.len() - 1])
    };
    println!();
    println!("| agents | GPUs | jobs | events | cut → every cap acknowledged | restore → every cap acknowledged | budget violations |");
    println!("|---|---|---|---|---|---|---|");
    println!(
        "| {agents} | {} | {jobs} | {events} | {} | {} | {} |",
        agents * 8,
        show(&cuts),
        show(&restores),
        metric(metrics_port, "watt_budget_violations_total{basis=\"counted\"}")
    );
}

/// Send an `IMPORT_CAPACITY_LIMIT` event of `watts` to the VTN, starting in 3 s for 10 s.
fn grid_event(
    runtime: &tokio::runtime::Runtime,
    program: &openleadr_client::ProgramClient<openleadr_client::BusinessLogic>,
    watts: f64,
) {
    use openleadr_wire::event::{EventInterval, EventPayloadDescriptor, EventType, EventValuesMap};
    let interval = EventInterval {
        id: 0,
        interval_period: None,
        payloads: vec![EventValuesMap {
            value_type: EventType::ImportCapacityLimit,
            values: vec![openleadr_wire::values_map::Value::Number(watts / 1000.0)],
        }],
    };
    let mut event = program.new_event(vec![interval]);
    event.interval_period = Some(openleadr_wire::interval::IntervalPeriod {
        start: chrono::Utc::now() + chrono::Duration::seconds(3),
        duration: serde_json::from_value(serde_json::json!("PT10S")).ok(),
        randomize_start: None,
    });
    event.payload_descriptors = Some(vec![EventPayloadDescriptor {
        units: Some(openleadr_wire::Unit::KW),
        ..EventPayloadDescriptor::new(EventType::ImportCapacityLimit)
    }]);
    runtime.block_on(program.create_event(event)).unwrap();
}
