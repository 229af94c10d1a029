//! `wattctl`: the operator's and user's command line for Watt.
//!
//! Human tables by default; `-o json` and `-o yaml` print stable documents for scripts (the
//! `views` module's shapes, not raw protobuf). A server error is one readable line and exit
//! code 1; a usage error (bad flags, an unreadable file) is exit code 2.

mod certs;
mod contexts;
mod logs;
mod power;
mod up;
mod views;

use std::io::Read;
use std::process::ExitCode;
use std::time::Duration;

use clap::{CommandFactory, Parser, Subcommand, ValueEnum};
use watt_common::client::{AuthedChannel, ClientError, Credentials, FindLeaderError};
use watt_proto::v1 as pb;
use watt_proto::v1::control_service_client::ControlServiceClient;
use watt_proto::v1::power_service_client::PowerServiceClient;

use views::{EventView, GpuRow, JobView, LogTail, NodeView};

#[derive(Debug, Parser)]
#[command(name = "wattctl", version, about = "Drive a Watt cluster: nodes, GPUs, jobs, events.")]
struct Cli {
    /// The controller's gRPC address, or its replicas' separated by commas (wattctl finds the
    /// leader) [default: the context's, else http://127.0.0.1:7070].
    #[arg(long, global = true, env = "WATT_CONTROLLER")]
    controller: Option<String>,

    /// The context (controller and credentials) from the configuration file to use, instead of
    /// its current one (`wattctl config`).
    #[arg(long, global = true, env = "WATT_CONTEXT")]
    context: Option<String>,

    /// The CA (PEM) that signed the controller's certificate (for an https:// controller).
    #[arg(long, global = true, env = "WATT_CA", value_name = "FILE")]
    ca: Option<std::path::PathBuf>,

    /// Your client certificate (PEM: CN = your name, O = watt:<role>), with --key.
    #[arg(long, global = true, env = "WATT_CERT", value_name = "FILE")]
    cert: Option<std::path::PathBuf>,

    /// The private key of --cert (PEM).
    #[arg(long, global = true, env = "WATT_KEY", value_name = "FILE")]
    key: Option<std::path::PathBuf>,

    /// A bearer token, instead of a client certificate.
    #[arg(long, global = true, env = "WATT_TOKEN", value_name = "TOKEN", hide_env_values = true)]
    token: Option<String>,

    /// Output format.
    #[arg(short, long, global = true, value_enum, default_value_t = Output::Table)]
    output: Output,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Output {
    Table,
    Json,
    Yaml,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// List nodes: state, GPUs, allocation.
    Nodes,
    /// List every GPU of every node with its latest readings.
    Gpus,
    /// Submit a job from a YAML or JSON file ("-" reads standard input).
    Submit {
        #[arg(short = 'f', long = "file", value_name = "FILE")]
        file: String,
    },
    /// List jobs.
    Jobs,
    /// Show one object in detail.
    Describe {
        #[command(subcommand)]
        what: Describe,
    },
    /// Cancel a job: its shards are stopped and it will not be scheduled again.
    Cancel { name: String },
    /// Refuse every certificate of a node from now on and end its session; its bootstrap token
    /// may then claim the name once more (a re-imaged or stolen machine). Admin only.
    ResetIdentity { node: String },
    /// Print a shard's output, from the agent that runs it; with --follow, keep printing it
    /// while the job runs.
    Logs {
        job: String,
        #[arg(long, default_value_t = 0)]
        shard: u32,
        #[arg(short, long)]
        follow: bool,
    },
    /// Show recent events; with --follow, keep printing new ones.
    Events {
        #[arg(short, long)]
        follow: bool,
    },
    /// Power: sources, reserve, status.
    Power {
        #[command(subcommand)]
        what: Power,
    },
    /// Run a whole Watt cluster on this machine: a controller, agents with simulated GPUs,
    /// demo training jobs, and optionally a timeline of power events; Ctrl-C stops it.
    Up(up::UpArgs),
    /// Contexts: which controller to call and with what credentials (WATT_CONFIG, default
    /// ~/.config/watt/config.yaml).
    Config {
        #[command(subcommand)]
        what: contexts::ConfigCommand,
    },
    /// Make credentials: a certificate authority, certificates it signs, bearer tokens.
    Certs {
        #[command(subcommand)]
        what: certs::Certs,
    },
    /// Print a shell completion script.
    Completions { shell: clap_complete::Shell },
}

#[derive(Debug, Subcommand)]
enum Power {
    /// Available, reserve, budget, allocated, counted and measured power; per source and per job.
    Status,
    /// Create or update a power source.
    SetSource {
        name: String,
        /// grid, generator, battery or manual.
        #[arg(long, value_parser = power::parse_kind)]
        kind: pb::SourceKind,
        /// What it can supply, e.g. 40MW.
        #[arg(long, value_parser = power::parse_watts)]
        available: f64,
        /// How fast it takes up load, e.g. 2MW/s; leave out for at once.
        #[arg(long, value_parser = power::parse_ramp)]
        ramp: Option<f64>,
        /// The power domain (a feed) it supplies: that domain's nodes draw no more than it gives
        /// [default: the site as a whole].
        #[arg(long)]
        domain: Option<String>,
    },
    /// Remove a power source.
    RemoveSource { name: String },
    /// Set the reserve margin: the share of available power never allocated, e.g. 10%.
    SetReserve {
        #[arg(value_parser = power::parse_ratio)]
        reserve: f64,
    },
    /// Change site settings; each left out stays as it is.
    SetSite {
        /// The share of available power never allocated, e.g. 10%.
        #[arg(long, value_parser = power::parse_ratio)]
        reserve: Option<f64>,
        /// Facility power per watt of IT power, e.g. 1.2.
        #[arg(long)]
        pue: Option<f64>,
        /// What a node draws besides its GPUs when its agent does not say, e.g. 800W.
        #[arg(long, value_parser = power::parse_watts)]
        node_overhead: Option<f64>,
        /// What a GPU with no work may draw, e.g. 100W.
        #[arg(long, value_parser = power::parse_watts)]
        idle_gpu: Option<f64>,
        /// The fastest counted power may rise, over any second and any minute, e.g. 5MW/min or
        /// 80kW/s; 0 removes the limit. Cuts are never slowed.
        #[arg(long, value_parser = power::parse_ramp)]
        ramp_up: Option<f64>,
        /// How fast a cancelled job's caps come down before its shards are stopped, e.g.
        /// 5MW/min; 0: at once. Cuts are never slowed.
        #[arg(long, value_parser = power::parse_ramp)]
        ramp_down: Option<f64>,
    },
    /// Print the power status on every change.
    Watch,
    /// The power domains (feeds, rows, racks): each one's limit, counted and measured power.
    Domains,
    /// Create or update a power domain: a part of the site behind a breaker.
    SetDomain {
        name: String,
        /// Its breaker's rating × derating, e.g. 40kW: its nodes' counted power stays under it.
        #[arg(long, value_parser = power::parse_watts)]
        limit: f64,
        /// The node labels that put a node in it, e.g. rack=r12 (agents' --labels); several are
        /// all required.
        #[arg(long = "select", value_name = "KEY=VALUE", required = true)]
        select: Vec<String>,
        /// The domain it is part of, e.g. row-3 [default: directly under the site].
        #[arg(long)]
        parent: Option<String>,
    },
    /// Remove a power domain with none under it.
    RemoveDomain { name: String },
}

#[derive(Debug, Subcommand)]
enum Describe {
    /// A job: spec, state, placement of every shard.
    Job { name: String },
}

/// What went wrong, and the exit code that goes with it.
#[derive(Debug)]
enum Failure {
    /// The server said no, or could not be reached: exit 1.
    Server(String),
    /// The command line or a local file is wrong: exit 2.
    Usage(String),
}

impl From<tonic::Status> for Failure {
    fn from(status: tonic::Status) -> Self {
        let message = status.message().trim();
        let message = if message.is_empty() { format!("{:?}", status.code()) } else { message.to_string() };
        Failure::Server(message)
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => return report(Failure::Server(format!("cannot start the async runtime: {e}"))),
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => report(failure),
    }
}

fn report(failure: Failure) -> ExitCode {
    let (message, code) = match failure {
        Failure::Server(m) => (m, 1),
        Failure::Usage(m) => (m, 2),
    };
    #[allow(clippy::print_stderr)]
    {
        eprintln!("wattctl: error: {message}");
    }
    ExitCode::from(code)
}

/// The controller and credentials a command uses: each flag (or its variable) over the chosen
/// context's value, over the default (a plain-text controller on this machine).
fn target(cli: &Cli) -> Result<Target, Failure> {
    let file = match contexts::path() {
        Some(path) => contexts::ConfigFile::load(&path)?,
        None => contexts::ConfigFile::default(),
    };
    let context = file.context(cli.context.as_deref())?;
    let mut credentials = match context {
        Some(c) => contexts::credentials_of(c, cli.token.clone())?,
        None => Credentials { token: cli.token.clone(), ..Credentials::default() },
    };
    credentials.ca = cli.ca.clone().or(credentials.ca);
    if cli.cert.is_some() || cli.key.is_some() {
        (credentials.cert, credentials.key) = (cli.cert.clone(), cli.key.clone());
    }
    let url = cli
        .controller
        .clone()
        .or_else(|| context.map(|c| c.controller.clone()))
        .unwrap_or_else(|| "http://127.0.0.1:7070".to_string());
    Ok(Target { url, credentials })
}

/// The client API as wattctl calls it: every call carries its credentials.
type Control = ControlServiceClient<AuthedChannel>;
type PowerClient = PowerServiceClient<AuthedChannel>;

/// A controller and the credentials to call it with.
#[derive(Debug, Clone)]
struct Target {
    url: String,
    credentials: Credentials,
}

impl Target {
    /// A channel to the controller that serves `service`: with several URLs (a controller's
    /// replicas), the one that leads — or, `or_caretaker`, when none does, one that caretakes
    /// (it takes power cuts while etcd is away).
    async fn channel(&self, service: &str, or_caretaker: bool) -> Result<AuthedChannel, Failure> {
        let urls = watt_common::client::controller_urls(&self.url);
        let tune = |endpoint: tonic::transport::Endpoint| endpoint.connect_timeout(Duration::from_secs(5));
        let found = if or_caretaker {
            self.credentials.connect_leader_or_caretaker(&urls, service, tune).await
        } else {
            self.credentials.connect_leader(&urls, service, tune).await
        };
        match found {
            Ok((_, channel)) => Ok(channel),
            Err(FindLeaderError::Client(e)) => Err(match e {
                ClientError::Invalid { setting, message } => Failure::Usage(format!("--{setting} {message}")),
                ClientError::Read { .. } => Failure::Usage(e.to_string()),
                ClientError::Connect(message) => Failure::Server(message),
            }),
            Err(e @ FindLeaderError::NoLeader { .. }) => Err(Failure::Server(e.to_string())),
        }
    }

    async fn control(&self) -> Result<Control, Failure> {
        // Allow large answers (thousands of jobs or nodes) and large manifests on the way up.
        Ok(ControlServiceClient::new(self.channel(watt_proto::v1::control_service_server::SERVICE_NAME, false).await?)
            .max_decoding_message_size(64 << 20)
            .max_encoding_message_size(64 << 20))
    }

    async fn power(&self) -> Result<PowerClient, Failure> {
        Ok(PowerServiceClient::new(self.channel(watt_proto::v1::power_service_server::SERVICE_NAME, true).await?)
            .max_decoding_message_size(64 << 20))
    }
}

async fn run(cli: Cli) -> Result<(), Failure> {
    let output = cli.output;
    let target = match &cli.command {
        // These call no controller (`up` makes its own), so need no context.
        Command::Config { .. } | Command::Certs { .. } | Command::Completions { .. } | Command::Up(_) => {
            Target { url: String::new(), credentials: Credentials::default() }
        }
        _ => target(&cli)?,
    };
    match cli.command {
        Command::Completions { shell } => {
            clap_complete::generate(shell, &mut Cli::command(), "wattctl", &mut std::io::stdout());
            Ok(())
        }
        Command::Submit { file } => {
            let manifest = read_manifest(&file)?;
            let mut client = target.control().await?;
            let request = pb::SubmitJobRequest { source: Some(pb::submit_job_request::Source::Manifest(manifest)) };
            let job = JobView::from(client.submit_job(request).await?.into_inner());
            emit(output, &job, || format!("job {} submitted (sequence {}, {})\n", job.name, job.sequence, job.state))
        }
        Command::Jobs => {
            let mut client = target.control().await?;
            let jobs: Vec<JobView> = client
                .list_jobs(pb::ListJobsRequest {})
                .await?
                .into_inner()
                .jobs
                .into_iter()
                .map(JobView::from)
                .collect();
            emit(output, &jobs, || JobView::table(&jobs))
        }
        Command::Describe { what: Describe::Job { name } } => {
            let mut client = target.control().await?;
            let record = client.get_job(pb::GetJobRequest { name }).await?.into_inner();
            let tls = logs::AgentTls::new(target.credentials.ca.as_deref())?;
            let tails = logs::failed_tails(&mut client, &tls, &record, 10).await;
            let mut job = JobView::from(record);
            job.failed_log_tails = tails.into_iter().map(|(shard, tail)| LogTail { shard, tail }).collect();
            emit(output, &job, || job.describe())
        }
        Command::Cancel { name } => {
            let mut client = target.control().await?;
            let job = JobView::from(client.cancel_job(pb::CancelJobRequest { name }).await?.into_inner());
            emit(output, &job, || format!("job {} {}\n", job.name, job.state))
        }
        Command::ResetIdentity { node } => {
            let mut client = target.control().await?;
            client.reset_node_identity(pb::ResetNodeIdentityRequest { node: node.clone() }).await?;
            let view = serde_json::json!({ "node": node, "identity": "reset" });
            emit(output, &view, || {
                format!("node {node}: every certificate refused from now on; it may bootstrap again\n")
            })
        }
        Command::Nodes => {
            let mut client = target.control().await?;
            let nodes: Vec<NodeView> = client
                .list_nodes(pb::ListNodesRequest {})
                .await?
                .into_inner()
                .nodes
                .into_iter()
                .map(NodeView::from)
                .collect();
            emit(output, &nodes, || NodeView::table(&nodes))
        }
        Command::Gpus => {
            let mut client = target.control().await?;
            let nodes = client.list_nodes(pb::ListNodesRequest {}).await?.into_inner().nodes;
            let gpus: Vec<GpuRow> = nodes.iter().flat_map(GpuRow::for_node).collect();
            emit(output, &gpus, || GpuRow::table(&gpus))
        }
        Command::Power { what } => run_power(&target, output, what).await,
        Command::Certs { what } => certs::run(what, output),
        Command::Config { what } => contexts::run(what, output),
        Command::Up(args) => up::run(args).await,
        Command::Logs { job, shard, follow } => {
            let mut client = target.control().await?;
            let tls = logs::AgentTls::new(target.credentials.ca.as_deref())?;
            logs::run(&mut client, &tls, &job, shard, follow).await
        }
        Command::Events { follow } => {
            let mut client = target.control().await?;
            // Subscribe first so nothing falls between the history and the live stream.
            let live =
                if follow { Some(client.watch_events(pb::WatchEventsRequest {}).await?.into_inner()) } else { None };
            let recent: Vec<EventView> = client
                .list_events(pb::ListEventsRequest {})
                .await?
                .into_inner()
                .events
                .into_iter()
                .map(EventView::from)
                .collect();
            let last = recent.last().cloned();
            for event in &recent {
                print_event(output, event)?;
            }
            if let Some(mut live) = live {
                while let Some(event) = live.message().await? {
                    let event = EventView::from(event);
                    // Skip what the history already showed.
                    if last.as_ref().is_some_and(|l| event.unix_ms < l.unix_ms || event == *l) {
                        continue;
                    }
                    print_event(output, &event)?;
                }
            }
            Ok(())
        }
    }
}

async fn run_power(target: &Target, output: Output, what: Power) -> Result<(), Failure> {
    let mut client = target.power().await?;
    let status = match what {
        Power::Status => client.get_power_status(pb::GetPowerStatusRequest {}).await?,
        Power::SetSource { name, kind, available, ramp, domain } => {
            let source = pb::PowerSource {
                name,
                kind: kind as i32,
                available_watts: available,
                ramp_watts_per_second: ramp,
                effective_watts: 0.0,
                domain: domain.unwrap_or_default(),
            };
            client.set_source(pb::SetSourceRequest { source: Some(source) }).await?
        }
        Power::RemoveSource { name } => client.remove_source(pb::RemoveSourceRequest { name }).await?,
        Power::SetReserve { reserve } => {
            client.set_site(pb::SetSiteRequest { reserve_ratio: Some(reserve), ..Default::default() }).await?
        }
        Power::SetSite { reserve, pue, node_overhead, idle_gpu, ramp_up, ramp_down } => {
            let request = pb::SetSiteRequest {
                reserve_ratio: reserve,
                pue,
                node_overhead_watts: node_overhead,
                idle_gpu_watts: idle_gpu,
                ramp_up_watts_per_second: ramp_up,
                ramp_down_watts_per_second: ramp_down,
            };
            if request == pb::SetSiteRequest::default() {
                return Err(Failure::Usage(
                    "set-site: give at least one of --reserve, --pue, --node-overhead, --idle-gpu, --ramp-up, --ramp-down"
                        .into(),
                ));
            }
            client.set_site(request).await?
        }
        Power::Domains => {
            let status = client.get_power_status(pb::GetPowerStatusRequest {}).await?.into_inner();
            let view = power::PowerView::from(status);
            return emit(output, &view.domains, || power::DomainView::tree(&view.domains));
        }
        Power::SetDomain { name, limit, select, parent } => {
            let mut selector = std::collections::HashMap::new();
            for pair in &select {
                let (key, value) = pair
                    .split_once('=')
                    .ok_or_else(|| Failure::Usage(format!("--select {pair:?}: write KEY=VALUE, e.g. rack=r12")))?;
                selector.insert(key.trim().to_string(), value.trim().to_string());
            }
            let domain = pb::PowerDomain { name, parent: parent.unwrap_or_default(), limit_watts: limit, selector };
            client.set_domain(pb::SetDomainRequest { domain: Some(domain) }).await?
        }
        Power::RemoveDomain { name } => client.remove_domain(pb::RemoveDomainRequest { name }).await?,
        Power::Watch => {
            let mut stream = client.watch_power(pb::WatchPowerRequest {}).await?.into_inner();
            while let Some(status) = stream.message().await? {
                let view = power::PowerView::from(status);
                match output {
                    Output::Json => write_stdout(&format!("{}\n", serde_json::to_string(&view).unwrap_or_default()))?,
                    Output::Yaml => {
                        write_stdout(&format!("---\n{}", serde_yaml::to_string(&view).unwrap_or_default()))?
                    }
                    Output::Table => write_stdout(&view.line())?,
                }
            }
            return Ok(());
        }
    };
    let view = power::PowerView::from(status.into_inner());
    emit(output, &view, || view.human())
}

fn read_manifest(file: &str) -> Result<String, Failure> {
    let mut text = String::new();
    if file == "-" {
        std::io::stdin()
            .read_to_string(&mut text)
            .map_err(|e| Failure::Usage(format!("cannot read standard input: {e}")))?;
    } else {
        text = std::fs::read_to_string(file).map_err(|e| Failure::Usage(format!("cannot read {file}: {e}")))?;
    }
    Ok(text)
}

fn print_event(output: Output, event: &EventView) -> Result<(), Failure> {
    match output {
        // One JSON document per line, for `jq` on a stream.
        Output::Json => write_stdout(&format!("{}\n", serde_json::to_string(event).unwrap_or_default())),
        Output::Yaml => write_stdout(&format!("---\n{}", serde_yaml::to_string(event).unwrap_or_default())),
        Output::Table => write_stdout(&event.line()),
    }
}

/// Print `value` as JSON or YAML, or the human text `human` makes.
fn emit<T: serde::Serialize>(output: Output, value: &T, human: impl FnOnce() -> String) -> Result<(), Failure> {
    let text = match output {
        Output::Json => format!("{}\n", serde_json::to_string_pretty(value).unwrap_or_default()),
        Output::Yaml => serde_yaml::to_string(value).unwrap_or_default(),
        Output::Table => human(),
    };
    write_stdout(&text)
}

fn write_stdout(text: &str) -> Result<(), Failure> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Ok(()) => Ok(()),
        // `wattctl jobs | head` closes the pipe early: not an error.
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        Err(e) => Err(Failure::Server(format!("cannot write output: {e}"))),
    }
}
