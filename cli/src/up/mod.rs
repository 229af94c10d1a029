//! `wattctl up`: a whole Watt cluster on this machine, no GPU and no setup needed — a controller
//! on the embedded store, agents with simulated GPUs, `watt-worker` jobs of different priorities
//! and flexibility, and optionally a timeline of power events (`--scenario`) and a Prometheus
//! scraping everything (`--prometheus`). It shows a live view, and at the end (the scenario's
//! end, Ctrl-C or SIGTERM) stops everything it started and prints a summary.
//!
//! The binaries are found next to `wattctl` (as `cargo build` leaves them), else on the PATH.

mod scenario;
mod view;

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::process::{Child, Command};
use tokio::signal::unix::{signal, Signal, SignalKind};
use tokio::time::Instant;
use watt_proto::v1 as pb;

pub use scenario::Scenario;
use view::{Sample, Summary};

use crate::Failure;

#[derive(Debug, Clone, clap::Args)]
pub struct UpArgs {
    /// Simulated GPU nodes.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub nodes: u32,
    /// GPUs per node.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..=16))]
    pub gpus_per_node: u32,
    /// Simulated GPU model: h100, h200 or a100.
    #[arg(long, default_value = "h100")]
    pub model: String,
    /// A timeline of power events (examples/scenarios/generator-trip.yaml); without one, the
    /// cluster runs on an ample grid source until Ctrl-C.
    #[arg(long, value_name = "FILE")]
    pub scenario: Option<PathBuf>,
    /// Play the scenario this many times faster (its times ÷ N, its ramps × N).
    #[arg(long, default_value_t = 1.0)]
    pub speed: f64,
    /// Also start a Prometheus (Debian's `prometheus`) scraping the controller and every agent.
    #[arg(long)]
    pub prometheus: bool,
    /// Where that Prometheus listens.
    #[arg(long, default_value = "127.0.0.1:9090")]
    pub prometheus_addr: String,
    /// Don't submit the demo jobs.
    #[arg(long)]
    pub no_jobs: bool,
    /// Keep the working directory (store, agents' state and logs) instead of removing it.
    #[arg(long)]
    pub keep: bool,
}

/// A process `up` started, stopped with SIGTERM when it ends.
struct Proc {
    name: String,
    child: Child,
}

impl Proc {
    fn spawn(name: &str, program: &Path, args: &[String], log: &Path) -> Result<Proc, Failure> {
        let file =
            std::fs::File::create(log).map_err(|e| Failure::Server(format!("cannot create {}: {e}", log.display())))?;
        let err = file.try_clone().map_err(|e| Failure::Server(e.to_string()))?;
        let mut command = Command::new(program);
        // Everything `up` starts is configured by its flags alone: none of this shell's WATT_*
        // variables (wattctl's WATT_CONFIG names a YAML file the daemons would read as TOML;
        // a WATT_CONTROLLER would point an agent elsewhere).
        for (name, _) in std::env::vars_os() {
            if name.to_string_lossy().starts_with("WATT_") && name != "WATT_LOG" {
                command.env_remove(name);
            }
        }
        let child = command
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::from(file))
            .stderr(Stdio::from(err))
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| Failure::Server(format!("cannot start {}: {e}", program.display())))?;
        Ok(Proc { name: name.into(), child })
    }

    fn terminate(&self) {
        if let Some(pid) = self.child.id() {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::Signal::SIGTERM);
        }
    }

    async fn wait(&mut self, limit: Duration) {
        if tokio::time::timeout(limit, self.child.wait()).await.is_err() {
            eprintln_now(&format!("{} did not stop within {}s; killing it", self.name, limit.as_secs()));
            let _ = self.child.kill().await;
        }
    }
}

fn eprintln_now(line: &str) {
    #[allow(clippy::print_stderr)]
    {
        eprintln!("wattctl up: {line}");
    }
}

/// `name` next to this executable, else on the PATH.
fn binary(name: &str) -> Result<PathBuf, Failure> {
    let sibling = std::env::current_exe().ok().and_then(|p| p.parent().map(|d| d.join(name))).filter(|p| p.exists());
    let on_path =
        || std::env::var_os("PATH").and_then(|p| std::env::split_paths(&p).map(|d| d.join(name)).find(|p| p.exists()));
    sibling.or_else(on_path).ok_or_else(|| {
        Failure::Usage(format!(
            "cannot find {name} next to wattctl or on the PATH (cargo build --release --workspace --bins)"
        ))
    })
}

fn free_port() -> Result<u16, Failure> {
    watt_common::ports::free_loopback_port().map_err(|e| Failure::Server(format!("no free port: {e}")))
}

/// The demo jobs: three `watt-worker` jobs sized to the cluster, a priority and a flexibility
/// each, and each its own true speed curve on the simulated GPUs (`WATT_SIM_WORKLOAD`): the
/// pretraining job compute-bound, the fine-tune balanced, the sweep memory-bound — what the
/// controller learns and shares power by.
fn demo_jobs(args: &UpArgs, worker: &Path, dir: &Path) -> Vec<serde_json::Value> {
    let per_shard = (args.gpus_per_node / 2).max(1);
    let n = args.nodes;
    [
        ("pretrain", 10, 0.1, (n / 2).max(1), n, "compute-bound"),
        ("finetune", 5, 0.3, 1, (n / 2).max(1), "balanced"),
        ("sweep", 1, 0.5, 1, n, "memory-bound"),
    ]
    .into_iter()
    .map(|(name, priority, flex, min, max, workload)| {
        serde_json::json!({
            "name": name, "priority": priority, "flex": flex,
            "env": {"WATT_SIM_WORKLOAD": workload},
            "shards": {"min": min, "max": max}, "gpus_per_shard": per_shard,
            "checkpoint_dir": dir.join("checkpoints").join(name).display().to_string(),
            "stop_grace": "10s",
            "command": [worker.display().to_string(), "--steps", "100000000", "--step-time", "100ms",
                        "--model", "mlp", "--checkpoint-every", "20", "--log-every", "100"],
        })
    })
    .collect()
}

async fn set_domain(power: &mut crate::PowerClient, d: &scenario::Domain, limit_watts: f64) -> Result<(), Failure> {
    let domain = pb::PowerDomain {
        name: d.name.clone(),
        parent: d.parent.clone().unwrap_or_default(),
        limit_watts,
        selector: d.selector.iter().cloned().collect(),
    };
    power.set_domain(pb::SetDomainRequest { domain: Some(domain) }).await?;
    Ok(())
}

async fn set_source(power: &mut crate::PowerClient, s: &scenario::Source) -> Result<(), Failure> {
    let source = pb::PowerSource {
        name: s.name.clone(),
        kind: s.kind as i32,
        available_watts: s.available_watts,
        ramp_watts_per_second: s.ramp_watts_per_second,
        effective_watts: 0.0,
        domain: s.domain.clone().unwrap_or_default(),
    };
    power.set_source(pb::SetSourceRequest { source: Some(source) }).await?;
    Ok(())
}

pub async fn run(args: UpArgs) -> Result<(), Failure> {
    if !(args.speed.is_finite() && (0.1..=1000.0).contains(&args.speed)) {
        return Err(Failure::Usage(format!("--speed must be between 0.1 and 1000 (got {})", args.speed)));
    }
    let scenario = match &args.scenario {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .map_err(|e| Failure::Usage(format!("--scenario {}: {e}", path.display())))?;
            Some(
                Scenario::parse(&text)
                    .map_err(|e| Failure::Usage(format!("--scenario {}: {e}", path.display())))?
                    .faster(args.speed),
            )
        }
        None => None,
    };
    let (controller_bin, agent_bin, worker_bin) =
        (binary("watt-controller")?, binary("watt-agent")?, binary("watt-worker")?);
    let dir = std::env::temp_dir().join(format!("watt-up-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| Failure::Server(format!("cannot create {}: {e}", dir.display())))?;

    // Listen for SIGINT and SIGTERM before the first process starts: a signal at any moment from
    // here on stops the cluster and removes what it started, never leaves it running orphaned.
    let mut stop = Stop::install()?;
    let mut procs: Vec<Proc> = Vec::new();
    let running = tokio::select! {
        r = start(&args, scenario.as_ref(), &dir, &controller_bin, &agent_bin, &mut procs) => r.map(Some),
        () = stop.requested() => {
            eprintln_now("stopping (signal) before the cluster was ready");
            Ok(None)
        }
    };
    let result = match running {
        Ok(Some(running)) => play(&args, scenario, &dir, &worker_bin, running, &mut stop).await.map(Some),
        Ok(None) => Ok(None),
        Err(e) => Err(e),
    };

    // Agents first (each stops its workers, SIGTERM then the jobs' grace), then the rest.
    for p in procs.iter().filter(|p| p.name.starts_with("agent")) {
        p.terminate();
    }
    for p in procs.iter_mut().filter(|p| p.name.starts_with("agent")) {
        p.wait(Duration::from_secs(20)).await;
    }
    for p in procs.iter().filter(|p| !p.name.starts_with("agent")) {
        p.terminate();
    }
    for p in procs.iter_mut().filter(|p| !p.name.starts_with("agent")) {
        p.wait(Duration::from_secs(10)).await;
    }
    if args.keep {
        eprintln_now(&format!("kept {}", dir.display()));
    } else {
        forget_context(&dir.join("pki").join("ca.pem"));
        let _ = std::fs::remove_dir_all(&dir);
    }
    if let Some(summary) = result? {
        #[allow(clippy::print_stdout)]
        {
            println!("{}", summary.render());
        }
    }
    Ok(())
}

/// SIGINT and SIGTERM, listened for from the moment this is made: one that arrives while nothing
/// is waiting for it is kept and seen by the next [`Stop::requested`].
struct Stop {
    interrupt: Signal,
    terminate: Signal,
}

impl Stop {
    fn install() -> Result<Stop, Failure> {
        let listen =
            |kind: SignalKind| signal(kind).map_err(|e| Failure::Server(format!("cannot listen for signals: {e}")));
        Ok(Stop { interrupt: listen(SignalKind::interrupt())?, terminate: listen(SignalKind::terminate())? })
    }

    async fn requested(&mut self) {
        tokio::select! {
            _ = self.interrupt.recv() => {}
            _ = self.terminate.recv() => {}
        }
    }
}

/// What [`start`] leaves for [`play`]: the controller's clients and the sources set.
struct Running {
    control: crate::Control,
    power: crate::PowerClient,
    sources: Vec<scenario::Source>,
}

/// Starts the controller and the agents, waits until every agent is ready, and sets the sources.
async fn start(
    args: &UpArgs,
    scenario: Option<&Scenario>,
    dir: &Path,
    controller_bin: &Path,
    agent_bin: &Path,
    procs: &mut Vec<Proc>,
) -> Result<Running, Failure> {
    let (grpc, metrics) = (free_port()?, free_port()?);
    let pki = dir.join("pki");
    let target = local_credentials(&pki, args.nodes, grpc)?;
    let controller_args: Vec<String> = [
        format!("--listen=127.0.0.1:{grpc}"),
        format!("--tls-cert={}", pki.join("controller.pem").display()),
        format!("--tls-key={}", pki.join("controller-key.pem").display()),
        format!("--client-ca={}", pki.join("ca.pem").display()),
        format!("--metrics-addr=127.0.0.1:{metrics}"),
        format!("--store=file:{}", dir.join("controller.redb").display()),
        "--reconcile-interval=200ms".into(),
        "--node-lease=5s".into(),
        "--regrow-after=5s".into(),
    ]
    .into();
    procs.push(Proc::spawn("controller", controller_bin, &controller_args, &dir.join("controller.log"))?);
    let mut control = connect_with_retry(&target).await?;
    let mut power = target.power().await?;
    remember_context(&target);

    let mut agent_ports = Vec::new();
    for i in 1..=args.nodes {
        let port = free_port()?;
        agent_ports.push(port);
        let state = dir.join(format!("agent-{i}"));
        let agent_args: Vec<String> = vec![
            "--backend=sim".into(),
            format!("--sim-gpus={}", args.gpus_per_node),
            format!("--sim-model={}", args.model),
            format!("--sim-seed={i}"),
            format!("--node-name=node-{i}"),
            // Two nodes to a rack: what a scenario's power domains select.
            format!("--labels=rack=r{}", i.div_ceil(2)),
            format!("--metrics-addr=127.0.0.1:{port}"),
            // Several agents on one machine: each its own logs port, which it tells the controller.
            "--logs-addr=127.0.0.1:0".into(),
            // The driver's 10 Hz: what power-swing monitoring needs.
            "--sample-interval=100ms".into(),
            format!("--controller={}", target.url),
            format!("--ca={}", pki.join("ca.pem").display()),
            format!("--tls-cert={}", pki.join(format!("node-{i}.pem")).display()),
            format!("--tls-key={}", pki.join(format!("node-{i}-key.pem")).display()),
            "--failsafe-after=5s".into(),
            "--stop-grace=10s".into(),
            format!("--state-dir={}", state.display()),
        ];
        procs.push(Proc::spawn(
            &format!("agent node-{i}"),
            agent_bin,
            &agent_args,
            &dir.join(format!("agent-{i}.log")),
        )?);
    }
    if args.prometheus {
        match start_prometheus(args, dir, metrics, &agent_ports) {
            Ok(p) => {
                eprintln_now(&format!("Prometheus at http://{}", args.prometheus_addr));
                procs.push(p);
            }
            Err(e) => eprintln_now(&format!("no Prometheus: {e}")),
        }
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let nodes = control.list_nodes(pb::ListNodesRequest {}).await?.into_inner().nodes;
        if nodes.iter().filter(|n| n.state == pb::NodeState::Ready as i32).count() == args.nodes as usize {
            break;
        }
        if Instant::now() > deadline {
            // The directory goes when `up` ends: say here what the agents last said.
            let said: Vec<String> = (1..=args.nodes)
                .map(|i| {
                    let log = std::fs::read_to_string(dir.join(format!("agent-{i}.log"))).unwrap_or_default();
                    let last: Vec<&str> = log.lines().rev().take(3).collect();
                    format!("node-{i}: {}", last.into_iter().rev().collect::<Vec<_>>().join(" | "))
                })
                .collect();
            return Err(Failure::Server(format!(
                "the agents did not all register within 30 s (logs in {}); last said:\n{}",
                dir.display(),
                said.join("\n")
            )));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let sources = match scenario {
        Some(s) => s.sources.clone(),
        None => {
            let ample = f64::from(args.nodes * args.gpus_per_node) * 1_000.0 * 1.5;
            vec![scenario::Source {
                name: "grid".into(),
                kind: pb::SourceKind::Grid,
                available_watts: ample,
                ramp_watts_per_second: None,
                domain: None,
            }]
        }
    };
    if let Some(ramp) = scenario.and_then(|s| s.ramp_up_watts_per_second) {
        let site = pb::SetSiteRequest { ramp_up_watts_per_second: Some(ramp), ..Default::default() };
        power.set_site(site).await?;
    }
    // Domains first: a source may feed one.
    for d in scenario.map(|s| s.domains.as_slice()).unwrap_or_default() {
        set_domain(&mut power, d, d.limit_watts).await?;
    }
    for s in &sources {
        set_source(&mut power, s).await?;
    }
    Ok(Running { control, power, sources })
}

/// Submits the demo jobs, plays the scenario's timeline and shows the cluster until the scenario
/// ends or a signal comes; returns the summary.
async fn play(
    args: &UpArgs,
    scenario: Option<Scenario>,
    dir: &Path,
    worker_bin: &Path,
    running: Running,
    stop: &mut Stop,
) -> Result<Summary, Failure> {
    let Running { mut control, mut power, sources } = running;
    if !args.no_jobs {
        for job in demo_jobs(args, worker_bin, dir) {
            let request =
                pb::SubmitJobRequest { source: Some(pb::submit_job_request::Source::Manifest(job.to_string())) };
            control.submit_job(request).await?;
        }
    }

    // The timeline, the view, and the books for the summary.
    let interactive = std::io::stdout().is_terminal();
    let started = Instant::now();
    let end = scenario.as_ref().map(|s| started + s.duration);
    let mut events = scenario.as_ref().map(|s| s.events.clone()).unwrap_or_default().into_iter().peekable();
    let mut log: Vec<String> = vec![format!("{} source(s) set; {} node(s) ready", sources.len(), args.nodes)];
    let mut summary = Summary::new(scenario.as_ref().map(|s| s.name.clone()));
    let mut waiting_ack: Option<(Instant, String)> = None;
    let mut last_frame = started - Duration::from_secs(1);
    let mut last_sample = started;
    let mut last_change = started;
    loop {
        tokio::select! {
            () = stop.requested() => {
                log.push("stopping (signal)".into());
                break;
            }
            () = tokio::time::sleep(Duration::from_millis(100)) => {}
        }
        let now = Instant::now();
        if end.is_some_and(|e| now >= e) {
            break;
        }
        while let Some(e) = events.next_if(|e| started + e.at <= now) {
            let changed = match &e.target {
                scenario::Target::Source(name) => match sources.iter().find(|s| &s.name == name).cloned() {
                    Some(mut s) => {
                        s.available_watts = e.watts;
                        set_source(&mut power, &s).await?;
                        Some(name)
                    }
                    None => None,
                },
                scenario::Target::Domain(name) => {
                    let domain = scenario.as_ref().and_then(|s| s.domains.iter().find(|d| &d.name == name));
                    match domain {
                        Some(d) => {
                            set_domain(&mut power, d, e.watts).await?;
                            Some(name)
                        }
                        None => None,
                    }
                }
            };
            if let Some(name) = changed {
                let line = format!(
                    "{:>6.1}s  {} ({name} → {})",
                    now.duration_since(started).as_secs_f64(),
                    e.note,
                    crate::power::show_watts(e.watts)
                );
                log.push(line);
                waiting_ack = Some((now, e.note.clone()));
                last_change = now;
                summary.events += 1;
            }
        }
        let status = power.get_power_status(pb::GetPowerStatusRequest {}).await?.into_inner();
        if let Some((at, note)) = &waiting_ack {
            if status.unacknowledged_nodes == 0 {
                let took = now.duration_since(*at);
                summary.worst_ack = summary.worst_ack.max(took);
                log.push(format!(
                    "         every cap acknowledged {:.0} ms after \"{note}\"",
                    took.as_secs_f64() * 1e3
                ));
                waiting_ack = None;
            }
        }
        let dt = now.duration_since(last_sample).as_secs_f64();
        last_sample = now;
        let jobs = control.list_jobs(pb::ListJobsRequest {}).await?.into_inner().jobs;
        // The controller's settle time (2 s) after the start and after each event.
        let settled = waiting_ack.is_none()
            && status.unacknowledged_nodes == 0
            && now.duration_since(last_change) >= Duration::from_secs(2);
        summary.record(&Sample { status: &status, jobs: &jobs, dt, before_first_event: summary.events == 0, settled });
        if now.duration_since(last_frame) >= Duration::from_secs(1) {
            last_frame = now;
            let frame =
                view::frame(now.duration_since(started), end.map(|e| e.duration_since(started)), &status, &jobs, &log);
            #[allow(clippy::print_stdout)]
            if interactive {
                print!("\x1b[2J\x1b[H{frame}");
            } else {
                println!("{}", view::line(now.duration_since(started), &status, &jobs));
            }
        }
    }
    let last = power.get_power_status(pb::GetPowerStatusRequest {}).await?.into_inner();
    summary.violations = last.budget_violations;
    summary.measured_violations = last.measured_violations;
    summary.overdraw_seconds = last.overdraw_seconds;
    summary.elapsed = started.elapsed();
    Ok(summary)
}

/// A certificate authority of this cluster's own in `pki` (`wattctl certs init`): the
/// controller's certificate, one per node and an admin's, which `up` itself calls the controller
/// with.
fn local_credentials(pki: &Path, nodes: u32, grpc: u16) -> Result<crate::Target, Failure> {
    use watt_common::auth::Role;
    crate::certs::init(pki, &["127.0.0.1".to_string(), "localhost".to_string()])?;
    for i in 1..=nodes {
        crate::certs::issue(pki, &format!("node-{i}"), Role::Node)?;
    }
    Ok(crate::Target {
        url: format!("https://127.0.0.1:{grpc}"),
        credentials: watt_common::client::Credentials {
            ca: Some(pki.join("ca.pem")),
            cert: Some(pki.join("admin.pem")),
            key: Some(pki.join("admin-key.pem")),
            token: None,
        },
    })
}

/// The context other `wattctl` commands reach this cluster with: `wattctl --context up …`
/// (written to the configuration file; a failure to write it only loses the convenience).
const UP_CONTEXT: &str = "up";

fn remember_context(target: &crate::Target) {
    use crate::contexts::{path, ConfigFile, Context};
    let context = Context {
        name: UP_CONTEXT.into(),
        controller: target.url.clone(),
        ca: target.credentials.ca.clone(),
        cert: target.credentials.cert.clone(),
        key: target.credentials.key.clone(),
        token_file: None,
    };
    let saved = path().ok_or_else(|| "no HOME or WATT_CONFIG".to_string()).and_then(|path| {
        let mut file = ConfigFile::load(&path).map_err(|_| format!("cannot read {}", path.display()))?;
        file.set(context);
        file.save(&path).map_err(|_| format!("cannot write {}", path.display()))
    });
    match saved {
        Ok(()) => eprintln_now(&format!(
            "controller at {}; from another shell: wattctl --context {UP_CONTEXT} jobs",
            target.url
        )),
        Err(why) => eprintln_now(&format!("controller at {} ({why}: no wattctl context)", target.url)),
    }
}

/// Remove the `up` context if it is this run's (its CA is about to be deleted).
fn forget_context(ca: &Path) {
    use crate::contexts::{path, ConfigFile};
    let Some(path) = path() else { return };
    let Ok(mut file) = ConfigFile::load(&path) else { return };
    let before = file.contexts.len();
    file.contexts.retain(|c| !(c.name == UP_CONTEXT && c.ca.as_deref() == Some(ca)));
    if file.contexts.len() != before {
        if file.current_context.as_deref() == Some(UP_CONTEXT) {
            file.current_context = None;
        }
        let _ = file.save(&path);
    }
}

/// The controller, once it answers as the leader (it leads once it has loaded its store): the
/// agents started after this find it serving, rather than backing off from its first refusals.
async fn connect_with_retry(target: &crate::Target) -> Result<crate::Control, Failure> {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let answered = match target.control().await {
            Ok(mut c) => c.list_nodes(pb::ListNodesRequest {}).await.map(|_| c).map_err(Failure::from),
            Err(e) => Err(e),
        };
        match answered {
            Ok(c) => return Ok(c),
            Err(e) if Instant::now() > deadline => return Err(e),
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

fn start_prometheus(args: &UpArgs, dir: &Path, controller_metrics: u16, agents: &[u16]) -> Result<Proc, String> {
    let binary = binary("prometheus")
        .map_err(|_| "prometheus is not installed (Debian: apt-get install prometheus)".to_string())?;
    let targets: Vec<String> = agents.iter().map(|p| format!("'127.0.0.1:{p}'")).collect();
    let config = format!(
        "global: {{scrape_interval: 2s, evaluation_interval: 2s}}\n\
         rule_files: ['{rules}']\n\
         scrape_configs:\n\
         \x20 - job_name: watt-controller\n    static_configs: [{{targets: ['127.0.0.1:{controller_metrics}']}}]\n\
         \x20 - job_name: watt-agent\n    static_configs: [{{targets: [{}]}}]\n",
        targets.join(", "),
        rules = dir.join("watt-alerts.yaml").display(),
    );
    std::fs::write(dir.join("watt-alerts.yaml"), ALERTS).map_err(|e| e.to_string())?;
    let path = dir.join("prometheus.yml");
    std::fs::write(&path, config).map_err(|e| e.to_string())?;
    let prom_args = vec![
        format!("--config.file={}", path.display()),
        format!("--storage.tsdb.path={}", dir.join("prometheus").display()),
        format!("--web.listen-address={}", args.prometheus_addr),
    ];
    Proc::spawn("prometheus", &binary, &prom_args, &dir.join("prometheus.log")).map_err(|e| match e {
        Failure::Server(m) | Failure::Usage(m) => m,
    })
}

/// The chart's alert rules, evaluated by `--prometheus` too.
const ALERTS: &str = include_str!("../../../helm/watt/files/watt-alerts.yaml");
