//! Wires the controller together: store → controller core → gRPC services (agent sessions,
//! client API, health, reflection) + reconcile loop + metrics endpoint, with one shutdown path.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::header;
use axum::routing::get;
use axum::Router;
use prometheus::{Encoder, TextEncoder};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_stream::wrappers::TcpListenerStream;
use watt_proto::v1 as pb;
use watt_proto::v1::agent_service_server::AgentServiceServer;
use watt_proto::v1::control_service_server::ControlServiceServer;
use watt_proto::v1::power_service_server::PowerServiceServer;

use crate::api::{ControlApi, PowerApi, MAX_REQUEST_BYTES};
use crate::auth::bootstrap::NodeSigner;
use crate::auth::layer::AuthLayer;
use crate::auth::tokens::TokenFile;
use crate::auth::Authenticator;
use crate::config::ControllerConfig;
use crate::error::ControllerError;
use crate::leader_gate;
use crate::leadership::{Election, Lead, Role, Standing};
use crate::metrics::Metrics;
use crate::reconcile::Controller;
use crate::session::AgentSessions;
use crate::store;
use crate::store::observed::StoreHealth;
use crate::store::replica::Replica;
use crate::tls::{ReloadingTls, TlsFiles};

/// How long open streams (agent sessions, event watches) may hold the exit after a signal.
const DRAIN: Duration = Duration::from_secs(5);

/// Connections waiting to be accepted. When thousands of agents reconnect at once (a controller
/// restart), a short queue drops their SYNs and each waits out TCP's retransmission backoff
/// (1 s, 3 s, 7 s, … a minute): the kernel caps this at `net.core.somaxconn`.
const LISTEN_BACKLOG: u32 = 16_384;

pub async fn bind(addr: std::net::SocketAddr) -> Result<TcpListener, ControllerError> {
    let listen = || -> std::io::Result<TcpListener> {
        let socket = if addr.is_ipv4() { tokio::net::TcpSocket::new_v4()? } else { tokio::net::TcpSocket::new_v6()? };
        // As TcpListener::bind does: a restarted controller rebinds a port with connections in TIME_WAIT.
        socket.set_reuseaddr(true)?;
        socket.bind(addr)?;
        socket.listen(LISTEN_BACKLOG)
    };
    listen().map_err(|source| ControllerError::Listen { addr, source })
}

/// The services a term's controller answers with, behind the gates (see [`crate::leader_gate`]).
struct Gates {
    agents: watch::Sender<Option<AgentServiceServer<AgentSessions>>>,
    control: watch::Sender<Option<ControlServiceServer<ControlApi>>>,
    power: watch::Sender<Option<PowerServiceServer<PowerApi>>>,
    health: tonic_health::server::HealthReporter,
}

impl Gates {
    async fn open(&self, controller: &Arc<Controller>, signer: Option<Arc<NodeSigner>>, node_ca: &str) {
        self.agents.send_replace(Some(AgentServiceServer::new(AgentSessions::new(controller.clone(), signer.clone()))));
        self.power.send_replace(Some(PowerServiceServer::new(PowerApi::new(controller.clone()))));
        self.control.send_replace(Some(
            ControlServiceServer::new(
                ControlApi::new(controller.clone()).with_node_ca(node_ca.to_string()).with_node_signer(signer),
            )
            .max_decoding_message_size(MAX_REQUEST_BYTES),
        ));
        self.health.set_serving::<AgentServiceServer<AgentSessions>>().await;
        self.health.set_serving::<ControlServiceServer<ControlApi>>().await;
        self.health.set_serving::<PowerServiceServer<PowerApi>>().await;
    }

    /// A caretaker (invariant 11): no new session, no client call but the power service's
    /// (which takes only cuts then); health says NOT_SERVING for all, so no client takes it for
    /// the leader. Sessions already open stay open.
    async fn caretake(&self) {
        self.health.set_not_serving::<AgentServiceServer<AgentSessions>>().await;
        self.health.set_not_serving::<ControlServiceServer<ControlApi>>().await;
        self.health.set_not_serving::<PowerServiceServer<PowerApi>>().await;
        self.agents.send_replace(None);
        self.control.send_replace(None);
    }

    async fn close(&self) {
        self.health.set_not_serving::<AgentServiceServer<AgentSessions>>().await;
        self.health.set_not_serving::<ControlServiceServer<ControlApi>>().await;
        self.health.set_not_serving::<PowerServiceServer<PowerApi>>().await;
        self.agents.send_replace(None);
        self.control.send_replace(None);
        self.power.send_replace(None);
    }
}

/// What does not change from one term to the next.
struct Shared {
    /// The store without any term's fence: for handing a caretaker's unstored cut over
    /// (see [`crate::power::carried`]), which is a request to the next leader, not a decision.
    unfenced: Arc<dyn store::Store>,
    /// A follower's warm copy of etcd, which a won term loads from (see [`store::replica`]).
    replica: Option<Arc<Replica>>,
    config: ControllerConfig,
    metrics: Metrics,
    store_health: StoreHealth,
    role: watch::Sender<Role>,
    gates: Gates,
    node_ca: String,
}

/// How a term ended.
enum TermEnd {
    /// The leadership was lost (or the store refused it): follow, and campaign again.
    Lost,
    Shutdown,
}

/// Run the controller until `shutdown` resolves: serve from the start (a follower answers with
/// the leader's address), campaign for leadership, and lead each term won until it is lost.
pub async fn run(
    config: ControllerConfig,
    listener: TcpListener,
    metrics_listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ControllerError> {
    let metrics = Metrics::new()?;
    let store_health = StoreHealth::new(metrics.store_errors.clone(), metrics.store_up.clone());
    let opened = store::open_kind(&config.store, etcd_tls(&config)?).await?;
    let unfenced = opened.store();
    let election = match opened {
        store::Opened::File(store) => Election::Sole(store),
        store::Opened::Etcd(store) => Election::Etcd { store, lease: config.leader_lease },
    };
    let (role_tx, role) = watch::channel(Role::Follower { leader: None });

    let (health_reporter, health) = tonic_health::server::health_reporter();
    let (agents_gate, agents) = leader_gate::gate(role.clone());
    let (control_gate, control) = leader_gate::gate(role.clone());
    let (power_gate, power) = leader_gate::gate_with_caretaker(role.clone());
    let gates = Gates { agents, control, power, health: health_reporter };
    gates.close().await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| ControllerError::Serve(e.to_string()))?;

    let (stop_tx, stop_rx) = watch::channel(false);
    let wait_stop = move || {
        let mut rx = stop_rx.clone();
        async move {
            let _ = rx.wait_for(|stop| *stop).await;
        }
    };

    let replica = match &election {
        Election::Etcd { store, .. } => {
            let replica = Replica::new();
            tokio::spawn(replica.clone().follow(store.as_ref().clone(), wait_stop()));
            tokio::spawn(watch_replica(replica.clone(), metrics.clone(), wait_stop()));
            Some(replica)
        }
        Election::Sole(_) => None,
    };
    let metrics_app = Router::new()
        .route("/metrics", get(render_metrics))
        .with_state(metrics.clone())
        .route("/healthz", get(healthz).with_state((store_health.clone(), role.clone())))
        .route("/readyz", get(readyz).with_state((replica.clone(), role.clone())))
        .route("/livez", get(|| async { "alive\n" }));
    let metrics_server = tokio::spawn({
        let stop = wait_stop();
        async move { axum::serve(metrics_listener, metrics_app).with_graceful_shutdown(stop).await }
    });

    let addr = listener
        .local_addr()
        .map_err(|source| ControllerError::Io { context: "cannot read the bound address", source })?;
    let tokens = match &config.token_file {
        Some(path) => {
            let tokens = TokenFile::open(path)?;
            tokio::spawn(tokens.clone().watch(wait_stop()));
            Some(tokens)
        }
        None => None,
    };
    let auth = AuthLayer::new(Arc::new(Authenticator::new(tokens)), metrics.refused_calls.clone());
    let node_ca = match &config.client_ca {
        Some(path) => read_credential("the client CA", path)?,
        None => String::new(),
    };
    let tls = match &config.tls {
        Some(files) => {
            let tls = ReloadingTls::open(TlsFiles {
                cert: files.cert.clone(),
                key: files.key.clone(),
                client_ca: config.client_ca.clone(),
            })?;
            tokio::spawn(tls.clone().watch(wait_stop()));
            Some(tls)
        }
        None => None,
    };
    if config.plain_text_off_loopback() {
        metrics.insecure_listener.set(1);
        tokio::spawn(warn_insecure(addr, wait_stop()));
    }
    tracing::info!(
        addr = %addr,
        advertise = %config.advertise_url,
        tls = config.tls.is_some(),
        store = %config.store,
        lease = %watt_common::duration::show(config.node_lease),
        "Serving gRPC."
    );
    let router = tonic::transport::Server::builder()
        .layer(leader_gate::LeaderHintLayer::new(role.clone()))
        .layer(auth)
        .http2_keepalive_interval(Some(Duration::from_secs(10)))
        .http2_keepalive_timeout(Some(Duration::from_secs(5)))
        .add_service(health)
        .add_service(reflection)
        .add_service(agents_gate)
        .add_service(power_gate)
        .add_service(control_gate);
    let grpc = match tls {
        Some(tls) => tokio::spawn(router.serve_with_incoming_shutdown(tls.incoming(listener), wait_stop())),
        None => tokio::spawn(router.serve_with_incoming_shutdown(TcpListenerStream::new(listener), wait_stop())),
    };

    let shared = Shared { unfenced, replica, config, metrics, store_health, role: role_tx, gates, node_ca };
    let led = campaign_and_lead(&shared, &election, shutdown).await;
    tracing::info!("Shutting down.");
    let _ = stop_tx.send(true);
    let served = match tokio::time::timeout(DRAIN, grpc).await {
        Ok(joined) => joined
            .map_err(|e| ControllerError::Serve(e.to_string()))?
            .map_err(|e| ControllerError::Serve(e.to_string())),
        Err(_) => {
            tracing::warn!("Open streams did not close within 5 s; exiting anyway.");
            Ok(())
        }
    };
    let _ = tokio::time::timeout(DRAIN, metrics_server).await;
    led.and(served)
}

/// Campaign, lead the term won until it is lost, and again, until `shutdown`.
async fn campaign_and_lead(
    shared: &Shared,
    election: &Election,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ControllerError> {
    tokio::pin!(shutdown);
    loop {
        let lead = tokio::select! {
            lead = election.campaign(&shared.config.advertise_url, &shared.role) => lead,
            () = &mut shutdown => return Ok(()),
        };
        let lead = match lead {
            Ok(lead) => lead,
            Err(e) if e.is_retryable() => {
                tracing::warn!(error = %e, "Cannot campaign for leadership; trying again.");
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_secs(1)) => continue,
                    () = &mut shutdown => return Ok(()),
                }
            }
            Err(e) => return Err(e.into()),
        };
        match lead_term(shared, &lead, &mut shutdown).await {
            Ok(TermEnd::Lost) => continue,
            Ok(TermEnd::Shutdown) => {
                lead.resign().await;
                return Ok(());
            }
            Err(e) => {
                // The term could not start (the store failed while loading): let another lead.
                lead.resign().await;
                match &e {
                    ControllerError::Store(s) if s.is_retryable() => {
                        tracing::warn!(error = %e, "Cannot start leading; campaigning again in a second.");
                        tokio::select! {
                            () = tokio::time::sleep(Duration::from_secs(1)) => {}
                            () = &mut shutdown => return Ok(()),
                        }
                    }
                    _ => return Err(e),
                }
            }
        }
    }
}

/// Lead one term: load the controller from the store, open the gates, run its loops; while the
/// store is out of reach, care for the term (invariant 11: cap decreases only, sessions kept)
/// and lead again if the lease held; on losing the leadership, stop every order first (close
/// the gates, end the agents' sessions), then the loops (invariant 9).
async fn lead_term(
    shared: &Shared,
    lead: &Lead,
    shutdown: &mut std::pin::Pin<&mut impl Future<Output = ()>>,
) -> Result<TermEnd, ControllerError> {
    let store: Arc<dyn store::Store> =
        Arc::new(store::observed::Observed::new(lead.store.clone(), shared.store_health.clone()));
    // From the warm copy when it has every write of the terms before (they all came before this
    // term's revision); from etcd when it does not within a second.
    let loading = Instant::now();
    let copy = match &shared.replica {
        Some(replica) => replica.snapshot_through(lead.term as i64, Duration::from_secs(1)).await,
        None => None,
    };
    let (settings, metrics) = (shared.config.settings(), shared.metrics.clone());
    let controller = match &copy {
        Some(copy) => Controller::load(copy, store, settings, metrics, lead.term).await?,
        None => Controller::new(store, settings, metrics, lead.term).await?,
    };
    let (from, label) = if copy.is_some() { ("the warm copy", "warm_copy") } else { ("the store", "store") };
    shared.metrics.term_load_seconds.reset();
    shared.metrics.term_load_seconds.with_label_values(&[label]).set(loading.elapsed().as_secs_f64());
    tracing::info!(term = lead.term, from, took = ?loading.elapsed(), "Loaded the term's state.");
    let signer = node_signer(&shared.config, &controller).await?;
    if lead.is_lost() {
        // Lost while loading (etcd slow to answer): open nothing.
        tracing::warn!(term = lead.term, "Lost the leadership while loading; campaigning again.");
        return Ok(TermEnd::Lost);
    }
    let (stop_tx, stop_rx) = watch::channel(false);
    let wait_stop = move || {
        let mut rx = stop_rx.clone();
        async move {
            let _ = rx.wait_for(|stop| *stop).await;
        }
    };
    let reconciling = tokio::spawn(controller.clone().run(wait_stop()));
    let metering = tokio::spawn(controller.clone().run_meter(wait_stop()));
    let writing = tokio::spawn(controller.clone().run_power_writer(wait_stop()));
    tokio::spawn(crate::retention::sweep(controller.clone(), wait_stop()));
    if let Some(openadr) = &shared.config.openadr {
        tokio::spawn(crate::openadr::ven::run(controller.clone(), openadr.clone(), wait_stop()));
    }
    if let Some(signer) = &signer {
        tokio::spawn(signer.clone().follow(wait_stop()));
    }
    shared.gates.open(&controller, signer.clone(), &shared.node_ca).await;
    shared.role.send_replace(Role::Leader { term: lead.term });
    shared.metrics.leader.set(1);
    shared.metrics.term.set(lead.term as i64);
    tracing::info!(role = "leader", term = lead.term, "Leading: this controller issues the orders now.");

    let mut standing = Standing::Leading;
    let end = loop {
        tokio::select! {
            now = lead.changed(standing) => {
                standing = now;
                match now {
                    Standing::Caretaking => {
                        // Decreases only from here on, before anything else (invariant 11).
                        controller.set_caretaking(true);
                        shared.role.send_replace(Role::Caretaker { term: lead.term });
                        shared.metrics.leader.set(0);
                        shared.metrics.caretaker.set(1);
                        shared.gates.caretake().await;
                        tracing::error!(role = "caretaker", term = lead.term, "Out of touch with the store: caring for the term (cap decreases only) until the lease is renewed or lost.");
                    }
                    Standing::Leading => {
                        shared.gates.open(&controller, signer.clone(), &shared.node_ca).await;
                        shared.role.send_replace(Role::Leader { term: lead.term });
                        shared.metrics.caretaker.set(0);
                        shared.metrics.leader.set(1);
                        controller.set_caretaking(false);
                        tracing::info!(role = "leader", term = lead.term, "Leading again: the lease held.");
                    }
                    Standing::Lost => break TermEnd::Lost,
                }
            }
            () = shutdown.as_mut() => break TermEnd::Shutdown,
        }
    };
    // No order after this: refuse new calls, then end every agent's outbound stream.
    controller.stop_ordering();
    if matches!(end, TermEnd::Lost) && controller.power_writer.behind() {
        // A cut in force that this term could not store: the next leader applies it.
        let cut = crate::power::carried::CarriedCut::of(lead.term, &controller.power.lock().await.table);
        tokio::spawn(hand_over(shared.unfenced.clone(), cut));
    }
    shared.role.send_replace(Role::Follower { leader: None });
    shared.metrics.leader.set(0);
    shared.metrics.caretaker.set(0);
    shared.gates.close().await;
    for entry in controller.registry.lock().values_mut() {
        entry.session = None;
    }
    let _ = stop_tx.send(true);
    let _ = reconciling.await;
    let _ = metering.await;
    let _ = writing.await;
    if matches!(end, TermEnd::Lost) {
        tracing::error!(term = lead.term, "Lost the leadership: following; campaigning again.");
    }
    Ok(end)
}

/// Write `cut` for the next leader, retrying until the store takes it (etcd is back, or this
/// would not have been learnt). Idempotent: one key per term.
async fn hand_over(store: Arc<dyn store::Store>, cut: crate::power::carried::CarriedCut) {
    let key = crate::power::carried::carried_key(cut.term);
    let mut retry = Duration::from_millis(200);
    loop {
        let written = match cut.encode() {
            Ok(value) => store.commit(vec![store::Write::put(key.clone(), store::Expect::Any, value)]).await,
            Err(e) => Err(e),
        };
        match written {
            Ok(_) => {
                tracing::warn!(term = cut.term, "Handed an unstored cut to the next leader.");
                return;
            }
            Err(e) if e.is_retryable() => {
                tracing::warn!(error = %e, term = cut.term, "Cannot hand an unstored cut over yet; retrying.");
                tokio::time::sleep(retry).await;
                retry = (retry * 2).min(Duration::from_secs(5));
            }
            Err(e) => {
                tracing::error!(error = %e, term = cut.term, "Cannot hand an unstored cut over: set it again.");
                return;
            }
        }
    }
}

/// The signer of node certificates, when the controller has its client CA's key.
async fn node_signer(
    config: &ControllerConfig,
    controller: &Controller,
) -> Result<Option<Arc<NodeSigner>>, ControllerError> {
    let (Some(ca), Some(key)) = (&config.client_ca, &config.client_ca_key) else { return Ok(None) };
    let read = read_credential;
    let authority = watt_common::pki::Authority::load(&read("the client CA", ca)?, &read("the client CA key", key)?)
        .map_err(|e| ControllerError::Tls(e.to_string()))?;
    Ok(Some(Arc::new(NodeSigner::load(authority, controller.store.clone()).await?)))
}

/// TLS to etcd, read from the files the configuration names.
fn etcd_tls(config: &ControllerConfig) -> Result<Option<store::EtcdTls>, ControllerError> {
    let Some(files) = &config.etcd_tls else { return Ok(None) };
    let client = match &files.client {
        Some(pair) => Some((
            read_credential("the etcd client certificate", &pair.cert)?,
            read_credential("the etcd client key", &pair.key)?,
        )),
        None => None,
    };
    Ok(Some(store::EtcdTls { ca_pem: read_credential("the etcd CA", &files.ca)?, client }))
}

/// A PEM file the controller needs to start, or an error naming what it is.
fn read_credential(what: &'static str, path: &std::path::Path) -> Result<String, ControllerError> {
    std::fs::read_to_string(path).map_err(|source| ControllerError::Credentials {
        what,
        path: path.display().to_string(),
        source,
    })
}

/// An operator who chose plain text off loopback hears about it every minute.
async fn warn_insecure(addr: std::net::SocketAddr, stop: impl Future<Output = ()>) {
    let mut every_minute = tokio::time::interval(Duration::from_secs(60));
    tokio::pin!(stop);
    loop {
        tokio::select! {
            _ = every_minute.tick() => tracing::warn!(
                addr = %addr,
                "Listening off loopback without TLS (--insecure): bearer tokens and job secrets cross the network in plain text."
            ),
            () = &mut stop => return,
        }
    }
}

/// 200 "ok" while the store takes writes; 503 naming the store's failure otherwise (a full disk,
/// an unreachable etcd), until a write succeeds again. The second line says whether this
/// controller leads (and in which term) or follows (and whom).
async fn healthz(
    State((health, role)): State<(StoreHealth, watch::Receiver<Role>)>,
) -> (axum::http::StatusCode, String) {
    let role = match &*role.borrow() {
        Role::Leader { term } => format!("leader, term {term}"),
        Role::Caretaker { term } => {
            format!("caretaker of term {term}: out of touch with the store, cap decreases only")
        }
        Role::Follower { leader: Some(at) } => format!("follower; the leader is at {at}"),
        Role::Follower { leader: None } => "follower; no leader elected yet".to_string(),
    };
    match health.failure() {
        None => (axum::http::StatusCode::OK, format!("ok\n{role}\n")),
        Some(why) => (axum::http::StatusCode::SERVICE_UNAVAILABLE, format!("store: {why}\n{role}\n")),
    }
}

/// 200 when this controller can do its part now: it leads, it caretakes (it takes cuts), or
/// it follows with a warm copy confirmed in sync within the last 5 s (a rolling update waits
/// for that before it moves on); 503 otherwise. Liveness is `/livez`: a store that does not
/// answer must not get the process restarted, least of all a caretaker.
async fn readyz(
    State((replica, role)): State<(Option<Arc<Replica>>, watch::Receiver<Role>)>,
) -> (axum::http::StatusCode, String) {
    use axum::http::StatusCode;
    match &*role.borrow() {
        Role::Leader { term } => (StatusCode::OK, format!("leader, term {term}\n")),
        Role::Caretaker { term } => (StatusCode::OK, format!("caretaker of term {term}\n")),
        Role::Follower { .. } => match &replica {
            Some(r) if r.in_sync(Instant::now()) => {
                (StatusCode::OK, format!("follower, in sync through revision {}\n", r.progress().through))
            }
            _ => (StatusCode::SERVICE_UNAVAILABLE, "follower, its copy of the store not in sync\n".to_string()),
        },
    }
}

/// Publish where the warm copy stands, every second.
async fn watch_replica(replica: Arc<Replica>, metrics: Metrics, stop: impl Future<Output = ()>) {
    let mut every_second = tokio::time::interval(Duration::from_secs(1));
    tokio::pin!(stop);
    loop {
        tokio::select! {
            _ = every_second.tick() => {
                metrics.replica_revision.set(replica.progress().through);
                metrics.replica_in_sync.set(i64::from(replica.in_sync(Instant::now())));
            }
            () = &mut stop => return,
        }
    }
}

async fn render_metrics(State(metrics): State<Metrics>) -> impl axum::response::IntoResponse {
    let mut buf = Vec::new();
    if let Err(e) = TextEncoder::new().encode(&metrics.registry.gather(), &mut buf) {
        tracing::error!(error = %e, "Cannot encode metrics; this is a bug.");
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], buf)
}
