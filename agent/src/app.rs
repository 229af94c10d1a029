//! Wires the agent together: backend → sampler → snapshots → exporter, with one shutdown path.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::config::{AgentConfig, BackendKind};
use crate::enforcer::{watch_failsafe, Enforcer};
use crate::error::AgentError;
use crate::exporter::{self, AgentMetrics, Renderer};
use crate::gpu::nvml::NvmlBackend;
use crate::gpu::sim::SimBackend;
use crate::gpu::GpuBackend;
use crate::powercap::Powercap;
use crate::sampler::{self, NodeSnapshot, Sampler, XidLog};
use crate::session::{self, SessionConfig};
use crate::shards::ShardTable;
use crate::supervisor::{ShardCgroups, ShardLimits, Supervisor};

/// The GPUs the agent drives. A simulated node is also handed to the shard table, which puts
/// load on the GPUs it places shards on.
#[derive(Debug, Clone)]
pub struct Backend {
    pub gpus: Arc<dyn GpuBackend>,
    pub sim: Option<Arc<SimBackend>>,
}

/// Open the backend the configuration asks for. Blocking (NVML init enumerates the GPUs).
pub fn open_backend(config: &AgentConfig) -> Result<Backend, AgentError> {
    Ok(match config.backend {
        BackendKind::Nvml => {
            let backend = NvmlBackend::open(&config.nvml_library)?;
            tracing::info!(
                gpus = backend.gpus().len(),
                driver = backend.driver_version().as_deref().unwrap_or("?"),
                "Opened NVML."
            );
            Backend { gpus: Arc::new(backend), sim: None }
        }
        BackendKind::Sim => {
            let model = config.sim_model.model();
            tracing::info!(gpus = config.sim_gpus, model = model.name, seed = config.sim_seed, "Simulating GPUs.");
            let sim = Arc::new(SimBackend::new(model, config.sim_gpus, config.sim_seed));
            for &gpu in &config.sim_foreign_gpus {
                sim.set_foreign(gpu, true);
            }
            Backend { gpus: sim.clone(), sim: Some(sim) }
        }
    })
}

/// The agent's two ports, bound before it starts (so a port in use fails the start).
#[derive(Debug)]
pub struct Listeners {
    /// Plain HTTP: /metrics, /healthz.
    pub metrics: TcpListener,
    /// Shards' logs, for grant holders (see [`crate::logs`], [`crate::https`]).
    pub logs: TcpListener,
}

/// Bind the metrics and logs addresses.
pub async fn bind(config: &AgentConfig) -> Result<Listeners, AgentError> {
    let bind =
        |addr| async move { TcpListener::bind(addr).await.map_err(|source| AgentError::Listen { addr, source }) };
    Ok(Listeners { metrics: bind(config.metrics_addr).await?, logs: bind(config.logs_addr).await? })
}

/// Run the agent until `shutdown` resolves.
pub async fn run(
    config: AgentConfig,
    backend: Backend,
    listeners: Listeners,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), AgentError> {
    let Backend { gpus: backend, sim } = backend;
    // Before anything else: a node that cannot say which rack it stands in does not start.
    let labels = labels(&config).await?;
    let Listeners { metrics: listener, logs: logs_listener } = listeners;
    let agent_metrics = AgentMetrics::new()?;
    let session_metrics = match config.controller {
        Some(_) => Some(agent_metrics.session()?),
        None => None,
    };
    let xids = Arc::new(XidLog::new(backend.gpus().len()));
    // Host CPU usage is a difference of two readings: read it about once a second.
    let host_every = (Duration::from_secs(1).as_nanos() / config.sample_interval.as_nanos()).max(1) as u64;
    let limits_changed = Arc::new(AtomicBool::new(false));
    let enforcer = Arc::new(Enforcer::new(
        backend.clone(),
        config.enforce,
        config.failsafe_after,
        config.failsafe_cap,
        limits_changed.clone(),
        tokio::time::Instant::now(),
    )?);
    // Invariant 3: an agent that will take orders from a controller runs at its failsafe caps
    // until it learns the budget. A telemetry-only agent (no --controller) changes no limit.
    if config.controller.is_some() {
        let e = enforcer.clone();
        let _ = tokio::task::spawn_blocking(move || e.engage_failsafe("Starting")).await;
    }
    let sampler = Sampler::new(backend.clone(), config.full_sample_every(), host_every, xids.clone())
        .with_duration_histogram(agent_metrics.sample_duration.clone())
        .with_limits_changed(limits_changed)
        .with_powercap(Powercap::discover(&config.powercap_root, config.node_overhead_watts));
    let inventory = sampler.inventory();
    // Three missed rounds, and at least 5 s, before readings are withheld as stale.
    let stale_after = (config.sample_interval * 3).max(Duration::from_secs(5));
    let renderer = Arc::new(
        Renderer::new(&config.node_name, &inventory, config.dcgm_compat, stale_after, agent_metrics)
            .with_enforcer(enforcer.clone()),
    );
    let (tx, rx) = watch::channel(Arc::new(NodeSnapshot::empty(inventory.clone())));

    let stop_events = Arc::new(AtomicBool::new(false));
    let events = sampler::spawn_event_thread(backend.clone(), xids, stop_events.clone())
        .map_err(|source| AgentError::Io { context: "cannot start the GPU event thread", source })?;

    // One signal fans out to the sampler and the server.
    let (stop_tx, stop_rx) = watch::channel(false);
    let wait_stop = {
        let stop_rx = stop_rx.clone();
        move || {
            let mut rx = stop_rx.clone();
            async move {
                let _ = rx.wait_for(|stop| *stop).await;
            }
        }
    };
    let sampling = tokio::spawn(sampler::run(sampler, config.sample_interval, tx, wait_stop()));
    let addr =
        listener.local_addr().map_err(|source| AgentError::Io { context: "cannot read the bound address", source })?;
    tracing::info!(
        addr = %addr,
        node = %config.node_name,
        backend = backend.kind(),
        gpus = backend.gpus().len(),
        interval = %humantime::format_duration(config.sample_interval),
        dcgm_compat = config.dcgm_compat,
        enforce = config.enforce.as_str(),
        "Serving metrics."
    );
    match &config.shard_user {
        Some(user) => tracing::info!(user = %user.name, uid = user.uid, gid = user.gid, "Shards run as this user."),
        None => tracing::info!(uid = nix::unistd::Uid::effective().as_raw(), "Shards run as the agent's own user."),
    }
    config.shard_exec.check().map_err(AgentError::HostExec)?;
    tracing::info!(exec = config.shard_exec.describe(), runtimes = ?config.runtimes, "Shards run here.");
    let cgroups = shard_cgroups(&config, inventory.len())?;
    let supervisor = Arc::new(
        Supervisor::new(config.state_dir.clone())
            .with_shard_user(config.shard_user.clone())
            .with_cgroups(cgroups)
            .with_exec(config.shard_exec, config.runtimes.clone()),
    );
    if config.controller.is_some() {
        // Shards an earlier run of this agent left behind are stopped; the controller orders
        // them again and they resume from their checkpoints.
        let stopped = supervisor.stop_leftovers(config.stop_grace).await;
        if !stopped.is_empty() {
            tracing::warn!(shards = stopped.len(), "Stopped shards left running by an earlier run of the agent.");
        }
    }
    let shards = ShardTable::new(supervisor.clone(), config.stop_grace, sim);
    let log_access = crate::logs::LogAccess::new(&config.node_name);
    let logs_addr = logs_listener
        .local_addr()
        .map_err(|source| AgentError::Io { context: "cannot read the bound address", source })?;
    let logs_tls = config.node_cert_files();
    tracing::info!(addr = %logs_addr, tls = logs_tls.is_some(), "Serving shards' logs to holders of a grant.");
    let session = config.controller.clone().zip(session_metrics).map(|(controller, metrics)| {
        let power_trace = Arc::new(crate::power_trace::PowerTrace::default());
        // Swings at 1–5 Hz need the driver's own 10 Hz: slower rounds would only mislead.
        if config.sample_interval <= crate::power_trace::FINEST_USEFUL_INTERVAL {
            tokio::spawn(crate::power_trace::collect(rx.clone(), shards.clone(), power_trace.clone(), stop_rx.clone()));
        }
        let session_config = SessionConfig {
            controllers: watt_common::client::controller_urls(&controller),
            credentials: config.credentials.clone(),
            node_cert: crate::bootstrap::NodeCertFiles::in_dir(&config.state_dir.join("pki")),
            node_name: config.node_name.clone(),
            boot_id: boot_id(),
            http_port: addr.port(),
            logs_port: logs_addr.port(),
            logs_tls: logs_tls.is_some(),
            log_access: log_access.clone(),
            metrics,
            power_trace,
            labels,
            runtimes: config.runtimes.clone(),
            shard_exec: config.shard_exec,
        };
        tokio::spawn(session::run(
            session_config,
            inventory.clone(),
            rx.clone(),
            shards.clone(),
            enforcer.clone(),
            stop_rx.clone(),
        ))
    });
    // Without a controller there is nobody to hear from: the failsafe caps set at start stay.
    let failsafe = config.controller.is_some().then(|| tokio::spawn(watch_failsafe(enforcer.clone(), stop_rx.clone())));
    let server = tokio::spawn(exporter::serve(listener, exporter::router(renderer, rx), wait_stop()));
    let logs_server = tokio::spawn(crate::https::serve(
        logs_listener,
        crate::logs::router(crate::supervisor::logs_dir(&config.state_dir), log_access),
        logs_tls,
        wait_stop(),
    ));

    shutdown.await;
    tracing::info!("Shutting down.");
    let _ = stop_tx.send(true);
    let served = server.await;
    let _ = logs_server.await;
    let _ = sampling.await;
    if let Some(session) = session {
        let _ = session.await;
    }
    // Workers get SIGTERM (they checkpoint) and their grace period; none outlives the agent.
    supervisor.stop_all().await;
    if let Some(failsafe) = failsafe {
        let _ = failsafe.await;
    }
    stop_events.store(true, Ordering::Relaxed);
    // The event thread wakes at least every 250 ms; don't hold the exit for it beyond that.
    let _ = tokio::task::spawn_blocking(move || events.join()).await;
    match served {
        Ok(result) => result.map_err(|source| AgentError::Io { context: "metrics server failed", source }),
        Err(e) => Err(AgentError::Io { context: "metrics server panicked", source: std::io::Error::other(e) }),
    }
}

/// Each shard's cgroup and limits (see [`crate::supervisor::cgroup`]): under `--shard-cgroup`
/// (which must work: the operator asked for it), else under the agent's own group where cgroup
/// v2 can be used there; elsewhere shards run without limits, and the log says why.
fn shard_cgroups(
    config: &AgentConfig,
    node_gpus: usize,
) -> Result<Option<(Arc<ShardCgroups>, ShardLimits)>, AgentError> {
    use crate::supervisor::cgroup;
    if config.controller.is_none() {
        return Ok(None);
    }
    let own = match &config.shard_cgroup {
        Some(dir) => Ok(dir.clone()),
        None => {
            let self_cgroup = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
            cgroup::own_group(std::path::Path::new(cgroup::MOUNT), &self_cgroup)
        }
    };
    let groups = own.and_then(|dir| ShardCgroups::set_up(&dir));
    let limits = ShardLimits {
        memory: config.shard_memory,
        pids: config.shard_pids,
        node_gpus,
        node_memory_bytes: crate::host::HostSampler::new().read().memory_total_bytes,
    };
    match groups {
        Ok(groups) => {
            let per_gpu = limits.for_gpus(1).memory_bytes;
            tracing::info!(
                group = %groups.dir().display(),
                memory_per_gpu = per_gpu.map_or_else(|| "none".into(), |b| format!("{:.1} GiB", b as f64 / f64::from(1 << 30))),
                pids = ?limits.pids,
                "Each shard runs in a cgroup of its own with memory and pids limits."
            );
            Ok(Some((Arc::new(groups), limits)))
        }
        Err(e) if config.shard_cgroup.is_some() => {
            Err(AgentError::Io { context: "cannot use --shard-cgroup", source: std::io::Error::other(e.to_string()) })
        }
        Err(e) => {
            tracing::warn!(reason = %e, "Shards run without memory and pids limits.");
            Ok(None)
        }
    }
}

/// A random identity for this run of the agent.
fn boot_id() -> String {
    format!("{:016x}", rand::random::<u64>())
}

/// The node's labels: those `--labels-from-node` names, read from its Node object, then
/// `--labels` over them.
async fn labels(config: &AgentConfig) -> Result<std::collections::BTreeMap<String, String>, AgentError> {
    if config.labels_from_node.is_empty() {
        return Ok(config.labels.clone());
    }
    let cluster =
        crate::node_labels::InCluster::from_env(&config.service_account_dir).map_err(AgentError::NodeLabels)?;
    let mut labels = crate::node_labels::read(&cluster, &config.node_name, &config.labels_from_node)
        .await
        .map_err(AgentError::NodeLabels)?;
    tracing::info!(node = %config.node_name, ?labels, "Labels read from the node's Kubernetes Node object.");
    labels.extend(config.labels.clone());
    Ok(labels)
}
