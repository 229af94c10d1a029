//! The controller's configuration: flags, `WATT_*` variables and a TOML file, merged in that order
//! of precedence and validated in one place, as in the agent.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Parser;
use serde::Deserialize;
use watt_common::duration::{parse as parse_duration, show};
pub use watt_common::logging::LogFormat;

use crate::reconcile::Settings;
use crate::retention::{JobLimits, Retention};
use crate::speed_curves::CurvePolicy;

/// Watt's controller: agent sessions, the durable job store, the gang scheduler.
#[derive(Debug, Parser)]
#[command(name = "watt-controller", version, about, long_about = None)]
pub struct Args {
    /// TOML config file. Flags and WATT_* variables override its values; unknown keys are errors.
    #[arg(long, env = "WATT_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// Validate the configuration, print it, and exit.
    #[arg(long)]
    pub check_config: bool,

    /// gRPC address for agents and clients [default: 0.0.0.0:7070 with TLS, 127.0.0.1:7070 without].
    #[arg(long, env = "WATT_LISTEN", value_name = "ADDR")]
    pub listen: Option<SocketAddr>,

    /// The controller's TLS certificate (PEM), for its gRPC port. With --tls-key.
    #[arg(long, env = "WATT_TLS_CERT", value_name = "FILE")]
    pub tls_cert: Option<PathBuf>,

    /// The private key of --tls-cert (PEM).
    #[arg(long, env = "WATT_TLS_KEY", value_name = "FILE")]
    pub tls_key: Option<PathBuf>,

    /// The CA (PEM) that signs agents' and people's client certificates: a certificate's CN
    /// names its principal and its O (watt:<role>) the role.
    #[arg(long, env = "WATT_CLIENT_CA", value_name = "FILE")]
    pub client_ca: Option<PathBuf>,

    /// The client CA's private key (PEM). With it the controller signs node certificates for
    /// agents that bootstrap with a bootstrap token (as kubelets do).
    #[arg(long, env = "WATT_CLIENT_CA_KEY", value_name = "FILE")]
    pub client_ca_key: Option<PathBuf>,

    /// Bearer tokens: lines of sha256:<digest>,<name>,<role> (`wattctl certs token` makes
    /// them); read again when it changes.
    #[arg(long, env = "WATT_TOKEN_FILE", value_name = "FILE")]
    pub token_file: Option<PathBuf>,

    /// Allow listening off loopback without TLS. Tokens and job secrets then cross the
    /// network in plain text; logged every minute and shown in metrics. Also allows an http://
    /// OpenADR VTN off this machine (the VEN's secret in the clear).
    #[arg(long, env = "WATT_INSECURE")]
    pub insecure: bool,

    /// Where jobs are stored: file:PATH (embedded, one controller) or
    /// etcd://HOST:PORT[,HOST:PORT...] [default: file:watt-controller.redb].
    #[arg(long, env = "WATT_STORE", value_name = "ADDRESS")]
    pub store: Option<String>,

    /// TLS to etcd: the CA that signed etcd's certificate (the endpoints become https://).
    #[arg(long, env = "WATT_ETCD_CA", value_name = "FILE")]
    pub etcd_ca: Option<PathBuf>,

    /// The controller's client certificate and key for etcd (PEM), for an etcd started with
    /// --client-cert-auth.
    #[arg(long, env = "WATT_ETCD_CERT", value_name = "FILE")]
    pub etcd_cert: Option<PathBuf>,

    #[arg(long, env = "WATT_ETCD_KEY", value_name = "FILE")]
    pub etcd_key: Option<PathBuf>,

    /// Address of the Prometheus endpoint (/metrics, /healthz) [default: 127.0.0.1:9401: plain
    /// text stays on this machine unless asked; Prometheus elsewhere needs 0.0.0.0:9401].
    #[arg(long, env = "WATT_METRICS_ADDR", value_name = "ADDR")]
    pub metrics_addr: Option<SocketAddr>,

    /// A node not heard from for this long is lost and its jobs are rescheduled [default: 15s].
    #[arg(long, env = "WATT_NODE_LEASE", value_name = "DURATION", value_parser = parse_duration)]
    pub node_lease: Option<Duration>,

    /// With an etcd store: how long the leader's lease lasts without renewal. A leader that
    /// cannot renew steps down a third of it before it ends; a killed leader's successor starts
    /// within it. Whole seconds, 2s to 60s [default: 3s].
    #[arg(long, env = "WATT_LEADER_LEASE", value_name = "DURATION", value_parser = parse_duration)]
    pub leader_lease: Option<Duration>,

    /// The URL at which agents and wattctl reach this controller, which followers name when they
    /// send clients to the leader [default: the listen address, with the hostname for 0.0.0.0].
    #[arg(long, env = "WATT_ADVERTISE_URL", value_name = "URL")]
    pub advertise_url: Option<String>,

    /// How often the reconcile loop runs when nothing wakes it [default: 1s].
    #[arg(long, env = "WATT_RECONCILE_INTERVAL", value_name = "DURATION", value_parser = parse_duration)]
    pub reconcile_interval: Option<Duration>,

    /// An elastic job is resized at most once this often: growing back costs it a checkpoint and
    /// a restart [default: 30s].
    #[arg(long, env = "WATT_REGROW_AFTER", value_name = "DURATION", value_parser = parse_duration)]
    pub regrow_after: Option<Duration>,

    /// After a power event the cluster has this long to bring its measured draw under the new
    /// limit; measured draw above the limit for longer is a violation [default: 2s].
    #[arg(long, env = "WATT_SETTLE_TIME", value_name = "DURATION", value_parser = parse_duration)]
    pub settle_time: Option<Duration>,

    /// Ended jobs are kept this long, then removed [default: 7d].
    #[arg(long, env = "WATT_KEEP_ENDED", value_name = "DURATION", value_parser = parse_duration)]
    pub keep_ended: Option<Duration>,

    /// At most this many ended jobs are kept, the newest [default: 10000].
    #[arg(long, env = "WATT_KEEP_ENDED_JOBS", value_name = "N")]
    pub keep_ended_jobs: Option<usize>,

    /// Jobs stored in all, ended ones included; a submit beyond is refused [default: 100000].
    #[arg(long, env = "WATT_MAX_JOBS", value_name = "N")]
    pub max_jobs: Option<usize>,

    /// Jobs not ended yet that one principal may have [default: 1000].
    #[arg(long, env = "WATT_MAX_JOBS_PER_PRINCIPAL", value_name = "N")]
    pub max_jobs_per_principal: Option<usize>,

    /// Which speed curves power is shared by: each job's, learned from its progress at the caps
    /// it ran under, or one shared curve for every job [default: learned].
    #[arg(long, env = "WATT_SPEED_CURVES", value_enum)]
    pub speed_curves: Option<CurvePolicy>,

    /// The share of the site's power variation in one frequency band (0.1–1 Hz, 1–5 Hz) above
    /// which the WattPowerSwing alert fires, 0–1 [default: 0.5].
    #[arg(long, env = "WATT_SWING_ALERT_SHARE", value_name = "SHARE")]
    pub swing_alert_share: Option<f64>,

    /// Log format [default: text].
    #[arg(long, env = "WATT_LOG_FORMAT", value_enum)]
    pub log_format: Option<LogFormat>,

    /// An OpenADR 3 VTN whose events limit the site's grid import or a power domain (the
    /// controller is its VEN): its base URL, such as https://vtn.example.com/openadr3/3.1.0/.
    #[arg(long, env = "WATT_OPENADR_VTN", value_name = "URL")]
    pub openadr_vtn: Option<String>,

    /// The VEN's OAuth client id at the VTN. With --openadr-secret-file.
    #[arg(long, env = "WATT_OPENADR_CLIENT_ID", value_name = "ID")]
    pub openadr_client_id: Option<String>,

    /// A file holding the VEN's OAuth client secret (one line).
    #[arg(long, env = "WATT_OPENADR_SECRET_FILE", value_name = "FILE")]
    pub openadr_secret_file: Option<PathBuf>,

    /// The OAuth token endpoint [default: the VTN's auth/token].
    #[arg(long, env = "WATT_OPENADR_TOKEN_URL", value_name = "URL")]
    pub openadr_token_url: Option<String>,

    /// The CA (PEM) that signed the VTN's certificate, when not a public one.
    #[arg(long, env = "WATT_OPENADR_CA", value_name = "FILE")]
    pub openadr_ca: Option<PathBuf>,

    /// The VEN's name at the VTN [default: watt].
    #[arg(long, env = "WATT_OPENADR_VEN_NAME", value_name = "NAME")]
    pub openadr_ven_name: Option<String>,

    /// The programs the site is enrolled in, by name, comma-separated: only their events count.
    #[arg(long, env = "WATT_OPENADR_PROGRAMS", value_name = "NAMES", value_delimiter = ',')]
    pub openadr_programs: Option<Vec<String>>,

    /// How often the VTN is read [default: 10s].
    #[arg(long, env = "WATT_OPENADR_POLL", value_name = "DURATION", value_parser = parse_duration)]
    pub openadr_poll: Option<Duration>,

    /// The share of the grid's supply, in percent, that SIMPLE levels 0, 1, 2 and 3 leave
    /// [default: 100,75,50,25].
    #[arg(long, env = "WATT_OPENADR_SIMPLE_LEVELS", value_name = "PERCENTS", value_delimiter = ',')]
    pub openadr_simple_levels: Option<Vec<f64>>,

    /// The VTN's notifications over MQTT, read at once when they come (polling stays the
    /// fallback): `auto`, the broker the VTN names; `off`; or a broker URL (mqtts://HOST:PORT,
    /// or mqtt:// on this machine) [default: auto].
    #[arg(long, env = "WATT_OPENADR_MQTT", value_name = "auto|off|URL")]
    pub openadr_mqtt: Option<String>,

    /// The VEN's user name at the MQTT broker [default: as the VTN says: its OAuth client id,
    /// with its bearer token as the password]. With --openadr-mqtt-password-file.
    #[arg(long, env = "WATT_OPENADR_MQTT_USERNAME", value_name = "NAME")]
    pub openadr_mqtt_username: Option<String>,

    /// A file holding the VEN's password at the MQTT broker (one line).
    #[arg(long, env = "WATT_OPENADR_MQTT_PASSWORD_FILE", value_name = "FILE")]
    pub openadr_mqtt_password_file: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub listen: Option<SocketAddr>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub client_ca: Option<PathBuf>,
    pub client_ca_key: Option<PathBuf>,
    pub token_file: Option<PathBuf>,
    pub insecure: Option<bool>,
    pub store: Option<String>,
    pub etcd_ca: Option<PathBuf>,
    pub etcd_cert: Option<PathBuf>,
    pub etcd_key: Option<PathBuf>,
    pub metrics_addr: Option<SocketAddr>,
    #[serde(default, with = "watt_common::duration::option")]
    pub node_lease: Option<Duration>,
    #[serde(default, with = "watt_common::duration::option")]
    pub leader_lease: Option<Duration>,
    pub advertise_url: Option<String>,
    #[serde(default, with = "watt_common::duration::option")]
    pub reconcile_interval: Option<Duration>,
    #[serde(default, with = "watt_common::duration::option")]
    pub regrow_after: Option<Duration>,
    #[serde(default, with = "watt_common::duration::option")]
    pub settle_time: Option<Duration>,
    #[serde(default, with = "watt_common::duration::option")]
    pub keep_ended: Option<Duration>,
    pub keep_ended_jobs: Option<usize>,
    pub max_jobs: Option<usize>,
    pub max_jobs_per_principal: Option<usize>,
    pub speed_curves: Option<CurvePolicy>,
    pub swing_alert_share: Option<f64>,
    pub log_format: Option<LogFormat>,
    pub openadr_vtn: Option<String>,
    pub openadr_client_id: Option<String>,
    pub openadr_secret_file: Option<PathBuf>,
    pub openadr_token_url: Option<String>,
    pub openadr_ca: Option<PathBuf>,
    pub openadr_ven_name: Option<String>,
    pub openadr_programs: Option<Vec<String>>,
    #[serde(default, with = "watt_common::duration::option")]
    pub openadr_poll: Option<Duration>,
    pub openadr_simple_levels: Option<Vec<f64>>,
    pub openadr_mqtt: Option<String>,
    pub openadr_mqtt_username: Option<String>,
    pub openadr_mqtt_password_file: Option<PathBuf>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ControllerConfig {
    pub listen: SocketAddr,
    /// TLS to etcd: its CA, and the controller's client certificate (see [`EtcdTlsFiles`]).
    pub etcd_tls: Option<EtcdTlsFiles>,
    pub tls: Option<TlsFiles>,
    pub client_ca: Option<PathBuf>,
    pub client_ca_key: Option<PathBuf>,
    pub token_file: Option<PathBuf>,
    pub insecure: bool,
    pub store: String,
    pub metrics_addr: SocketAddr,
    pub node_lease: Duration,
    /// The leader's lease in etcd (see [`crate::leadership`]).
    pub leader_lease: Duration,
    /// Where clients reach this controller; followers send them to the leader's.
    pub advertise_url: String,
    pub reconcile_interval: Duration,
    pub regrow_after: Duration,
    pub settle_time: Duration,
    pub retention: Retention,
    pub limits: JobLimits,
    pub speed_curves: CurvePolicy,
    pub swing_alert_share: f64,
    pub log_format: LogFormat,
    /// The VTN this controller is a VEN of, if any.
    pub openadr: Option<OpenAdrConfig>,
}

/// The controller as an OpenADR 3 VEN (see [`crate::openadr`]).
#[derive(Debug, Clone, PartialEq)]
pub struct OpenAdrConfig {
    pub vtn: url::Url,
    pub token_url: url::Url,
    pub client_id: String,
    pub secret_file: PathBuf,
    pub ca: Option<PathBuf>,
    pub ven_name: String,
    pub programs: Vec<String>,
    pub poll: Duration,
    /// SIMPLE levels 0–3 as shares (0–1) of the grid's supply.
    pub simple_levels: [f64; 4],
    /// Where notifications come from (see [`crate::openadr::notify`]).
    pub mqtt: MqttBroker,
    /// The VEN's own login at the broker; `None`: as the VTN's notifier says.
    pub mqtt_login: Option<MqttLogin>,
    /// Plain text off this machine was allowed (`--insecure`): a broker the VTN names is held
    /// to the same rule as one given here.
    pub insecure: bool,
}

/// Which MQTT broker the VEN subscribes at.
#[derive(Debug, Clone, PartialEq)]
pub enum MqttBroker {
    /// The one the VTN names (`GET /notifiers`), if it names one.
    Auto,
    Off,
    Url(url::Url),
}

/// A user name and the file holding its password.
#[derive(Debug, Clone, PartialEq)]
pub struct MqttLogin {
    pub username: String,
    pub password_file: PathBuf,
}

/// An MQTT broker URL Watt connects to: `mqtt://`/`tcp://` (plain) or `mqtts://`/`ssl://`
/// (TLS), the names the reference VTN's MQTT library gives them too.
pub fn mqtt_url(text: &str) -> Result<url::Url, String> {
    let url = url::Url::parse(text).map_err(|e| format!("{text:?} is not a URL: {e}"))?;
    if !matches!(url.scheme(), "mqtt" | "tcp" | "mqtts" | "ssl") || url.host().is_none() {
        return Err(format!("must be mqtts://HOST:PORT or mqtt://HOST:PORT; got {text:?}"));
    }
    Ok(url)
}

/// Whether `url` carries its traffic in the clear.
pub fn plain_text(url: &url::Url) -> bool {
    matches!(url.scheme(), "http" | "mqtt" | "tcp")
}

/// Whether `url` names this machine.
pub fn on_loopback(url: &url::Url) -> bool {
    match url.host() {
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        // Non-special schemes (mqtt://) keep an address as an opaque name.
        Some(url::Host::Domain(name)) => {
            name == "localhost"
                || name.trim_matches(['[', ']']).parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
        }
        None => false,
    }
}

/// TLS to etcd, as files: the CA, and a client certificate and key.
#[derive(Debug, Clone, PartialEq)]
pub struct EtcdTlsFiles {
    pub ca: PathBuf,
    pub client: Option<TlsFiles>,
}

/// A certificate and its key, both PEM files.
#[derive(Debug, Clone, PartialEq)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(transparent)]
    File(#[from] watt_common::config_file::FileError),
    #[error("invalid --{flag} (config key {key}): {message}")]
    Invalid { flag: &'static str, key: &'static str, message: String },
}

impl Args {
    pub fn resolve(&self) -> Result<ControllerConfig, ConfigError> {
        let file = match &self.config {
            Some(path) => load(path)?,
            None => FileConfig::default(),
        };
        let openadr = self.openadr(&file)?;
        let tls = match (self.tls_cert.clone().or(file.tls_cert), self.tls_key.clone().or(file.tls_key)) {
            (Some(cert), Some(key)) => Some(TlsFiles { cert, key }),
            (None, None) => None,
            (Some(_), None) => return Err(invalid("tls-key", "tls_key", "is required with --tls-cert".into())),
            (None, Some(_)) => return Err(invalid("tls-cert", "tls_cert", "is required with --tls-key".into())),
        };
        let etcd_tls = match (
            self.etcd_ca.clone().or(file.etcd_ca),
            self.etcd_cert.clone().or(file.etcd_cert),
            self.etcd_key.clone().or(file.etcd_key),
        ) {
            (None, None, None) => None,
            (Some(ca), Some(cert), Some(key)) => Some(EtcdTlsFiles { ca, client: Some(TlsFiles { cert, key }) }),
            (Some(ca), None, None) => Some(EtcdTlsFiles { ca, client: None }),
            (None, _, _) => {
                return Err(invalid("etcd-ca", "etcd_ca", "is required with --etcd-cert and --etcd-key".into()))
            }
            (Some(_), Some(_), None) => {
                return Err(invalid("etcd-key", "etcd_key", "is required with --etcd-cert".into()))
            }
            (Some(_), None, Some(_)) => {
                return Err(invalid("etcd-cert", "etcd_cert", "is required with --etcd-key".into()))
            }
        };
        // Plain text stays on this machine unless asked otherwise.
        let default_listen = if tls.is_some() { [0, 0, 0, 0] } else { [127, 0, 0, 1] };
        let listen = self.listen.or(file.listen).unwrap_or(SocketAddr::from((default_listen, 7070)));
        let advertise_url = self
            .advertise_url
            .clone()
            .or(file.advertise_url)
            .unwrap_or_else(|| default_advertise(listen, tls.is_some()));
        let config = ControllerConfig {
            etcd_tls,
            listen,
            advertise_url,
            leader_lease: self.leader_lease.or(file.leader_lease).unwrap_or(crate::leadership::DEFAULT_LEASE),
            tls,
            client_ca: self.client_ca.clone().or(file.client_ca),
            client_ca_key: self.client_ca_key.clone().or(file.client_ca_key),
            token_file: self.token_file.clone().or(file.token_file),
            insecure: self.insecure || file.insecure.unwrap_or(false),
            store: self.store.clone().or(file.store).unwrap_or_else(|| "file:watt-controller.redb".into()),
            metrics_addr: self.metrics_addr.or(file.metrics_addr).unwrap_or(SocketAddr::from(([127, 0, 0, 1], 9401))),
            node_lease: self.node_lease.or(file.node_lease).unwrap_or(Duration::from_secs(15)),
            reconcile_interval: self.reconcile_interval.or(file.reconcile_interval).unwrap_or(Duration::from_secs(1)),
            regrow_after: self.regrow_after.or(file.regrow_after).unwrap_or(Duration::from_secs(30)),
            settle_time: self.settle_time.or(file.settle_time).unwrap_or(Duration::from_secs(2)),
            retention: Retention {
                keep_for: self.keep_ended.or(file.keep_ended).unwrap_or(Duration::from_secs(7 * 86_400)),
                keep_count: self.keep_ended_jobs.or(file.keep_ended_jobs).unwrap_or(10_000),
            },
            limits: JobLimits {
                per_principal: self.max_jobs_per_principal.or(file.max_jobs_per_principal).unwrap_or(1_000),
                total: self.max_jobs.or(file.max_jobs).unwrap_or(100_000),
            },
            speed_curves: self.speed_curves.or(file.speed_curves).unwrap_or_default(),
            swing_alert_share: self.swing_alert_share.or(file.swing_alert_share).unwrap_or(0.5),
            log_format: self.log_format.or(file.log_format).unwrap_or(LogFormat::Text),
            openadr,
        };
        config.validate()?;
        Ok(config)
    }
}

impl Args {
    fn openadr(&self, file: &FileConfig) -> Result<Option<OpenAdrConfig>, ConfigError> {
        let Some(vtn) = self.openadr_vtn.clone().or(file.openadr_vtn.clone()) else {
            let stray = self.openadr_client_id.is_some() || file.openadr_client_id.is_some();
            let stray = stray || self.openadr_programs.is_some() || file.openadr_programs.is_some();
            let stray = stray || self.openadr_mqtt.is_some() || file.openadr_mqtt.is_some();
            let stray = stray || self.openadr_mqtt_username.is_some() || file.openadr_mqtt_username.is_some();
            if stray {
                return Err(invalid(
                    "openadr-vtn",
                    "openadr_vtn",
                    "is required with the other --openadr-* settings".into(),
                ));
            }
            return Ok(None);
        };
        // A base URL: the client joins paths to it, which drops a last segment without its slash.
        let with_slash = if vtn.ends_with('/') { vtn } else { format!("{vtn}/") };
        let vtn =
            url::Url::parse(&with_slash).ok().filter(|u| matches!(u.scheme(), "http" | "https")).ok_or_else(|| {
                invalid("openadr-vtn", "openadr_vtn", format!("must be an http:// or https:// URL; got {with_slash:?}"))
            })?;
        let token_url = match self.openadr_token_url.clone().or(file.openadr_token_url.clone()) {
            Some(t) => {
                url::Url::parse(&t).ok().filter(|u| matches!(u.scheme(), "http" | "https")).ok_or_else(|| {
                    invalid(
                        "openadr-token-url",
                        "openadr_token_url",
                        format!("must be an http:// or https:// URL; got {t:?}"),
                    )
                })?
            }
            None => vtn.join("auth/token").map_err(|e| invalid("openadr-vtn", "openadr_vtn", e.to_string()))?,
        };
        // The VEN's client secret crosses to the token endpoint: plain text stays on this machine
        // unless asked (--insecure), as for the gRPC port.
        let insecure = self.insecure || file.insecure.unwrap_or(false);
        let mqtt = match self.openadr_mqtt.clone().or(file.openadr_mqtt.clone()).as_deref() {
            None | Some("auto") => MqttBroker::Auto,
            Some("off") => MqttBroker::Off,
            Some(text) => MqttBroker::Url(mqtt_url(text).map_err(|e| invalid("openadr-mqtt", "openadr_mqtt", e))?),
        };
        let mut plain =
            vec![("openadr-vtn", "openadr_vtn", &vtn), ("openadr-token-url", "openadr_token_url", &token_url)];
        if let MqttBroker::Url(url) = &mqtt {
            plain.push(("openadr-mqtt", "openadr_mqtt", url));
        }
        for (flag, key, url) in plain {
            if plain_text(url) && !on_loopback(url) && !insecure {
                return Err(invalid(
                    flag,
                    key,
                    format!("{url} is plain text off this machine: use TLS, or --insecure to send the VEN's secrets in the clear"),
                ));
            }
        }
        let username = self.openadr_mqtt_username.clone().or(file.openadr_mqtt_username.clone());
        let password_file = self.openadr_mqtt_password_file.clone().or(file.openadr_mqtt_password_file.clone());
        let mqtt_login = match (username, password_file) {
            (None, None) => None,
            (Some(username), Some(password_file)) if !username.is_empty() => {
                Some(MqttLogin { username, password_file })
            }
            (Some(_), Some(_)) => {
                return Err(invalid("openadr-mqtt-username", "openadr_mqtt_username", "must not be empty".into()))
            }
            (Some(_), None) => {
                return Err(invalid(
                    "openadr-mqtt-password-file",
                    "openadr_mqtt_password_file",
                    "is required with --openadr-mqtt-username".into(),
                ))
            }
            (None, Some(_)) => {
                return Err(invalid(
                    "openadr-mqtt-username",
                    "openadr_mqtt_username",
                    "is required with --openadr-mqtt-password-file".into(),
                ))
            }
        };
        let client_id = self.openadr_client_id.clone().or(file.openadr_client_id.clone()).ok_or_else(|| {
            invalid("openadr-client-id", "openadr_client_id", "is required with --openadr-vtn".into())
        })?;
        let secret_file = self.openadr_secret_file.clone().or(file.openadr_secret_file.clone()).ok_or_else(|| {
            invalid("openadr-secret-file", "openadr_secret_file", "is required with --openadr-vtn".into())
        })?;
        let programs: Vec<String> = self
            .openadr_programs
            .clone()
            .or(file.openadr_programs.clone())
            .unwrap_or_default()
            .into_iter()
            .map(|p| p.trim().to_string())
            .filter(|p| !p.is_empty())
            .collect();
        if programs.is_empty() {
            return Err(invalid(
                "openadr-programs",
                "openadr_programs",
                "must name at least one program the site is enrolled in".into(),
            ));
        }
        let poll = self.openadr_poll.or(file.openadr_poll).unwrap_or(Duration::from_secs(10));
        if poll < Duration::from_millis(200) || poll > Duration::from_secs(600) {
            return Err(invalid(
                "openadr-poll",
                "openadr_poll",
                format!("must be between 200ms and 10m; got {}", show(poll)),
            ));
        }
        let levels = self.openadr_simple_levels.clone().or(file.openadr_simple_levels.clone());
        let levels = levels.unwrap_or_else(|| vec![100.0, 75.0, 50.0, 25.0]);
        let simple_levels: [f64; 4] = levels
            .iter()
            .map(|p| p / 100.0)
            .collect::<Vec<f64>>()
            .try_into()
            .ok()
            .filter(|l: &[f64; 4]| l.iter().all(|s| s.is_finite() && (0.0..=1.0).contains(s)))
            .ok_or_else(|| {
                invalid(
                    "openadr-simple-levels",
                    "openadr_simple_levels",
                    format!("must be four percentages between 0 and 100, for levels 0 to 3; got {levels:?}"),
                )
            })?;
        let ven_name = self.openadr_ven_name.clone().or(file.openadr_ven_name.clone()).unwrap_or_else(|| "watt".into());
        if ven_name.is_empty() || ven_name.len() > 128 {
            return Err(invalid("openadr-ven-name", "openadr_ven_name", "must be 1 to 128 characters".into()));
        }
        Ok(Some(OpenAdrConfig {
            vtn,
            token_url,
            client_id,
            secret_file,
            ca: self.openadr_ca.clone().or(file.openadr_ca.clone()),
            ven_name,
            programs,
            poll,
            simple_levels,
            mqtt,
            mqtt_login,
            insecure,
        }))
    }
}

/// This controller's URL as seen from elsewhere: the listen address, or the hostname when it
/// listens on every interface.
fn default_advertise(listen: SocketAddr, tls: bool) -> String {
    let scheme = if tls { "https" } else { "http" };
    if listen.ip().is_unspecified() {
        let host =
            nix::unistd::gethostname().ok().and_then(|h| h.into_string().ok()).unwrap_or_else(|| "localhost".into());
        format!("{scheme}://{host}:{}", listen.port())
    } else {
        format!("{scheme}://{listen}")
    }
}

fn invalid(flag: &'static str, key: &'static str, message: String) -> ConfigError {
    ConfigError::Invalid { flag, key, message }
}

fn load(path: &Path) -> Result<FileConfig, ConfigError> {
    Ok(watt_common::config_file::load(path)?)
}

impl ControllerConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        let store_ok = self.store.strip_prefix("file:").is_some_and(|p| !p.is_empty())
            || self.store.strip_prefix("etcd://").is_some_and(|h| !h.is_empty() && !h.contains('/'));
        if !store_ok {
            return Err(ConfigError::Invalid {
                flag: "store",
                key: "store",
                message: format!("use file:PATH or etcd://HOST:PORT[,HOST:PORT...]; got {:?}", self.store),
            });
        }
        if self.node_lease < Duration::from_secs(1) || self.node_lease > Duration::from_secs(3600) {
            return Err(ConfigError::Invalid {
                flag: "node-lease",
                key: "node_lease",
                message: format!("must be between 1s and 1h; got {}", show(self.node_lease)),
            });
        }
        let lease = self.leader_lease;
        if lease < Duration::from_secs(2) || lease > Duration::from_secs(60) || lease.subsec_nanos() != 0 {
            return Err(ConfigError::Invalid {
                flag: "leader-lease",
                key: "leader_lease",
                message: format!("must be whole seconds between 2s and 1m; got {}", show(lease)),
            });
        }
        let share = self.swing_alert_share;
        if !(share.is_finite() && (0.0..=1.0).contains(&share)) {
            return Err(ConfigError::Invalid {
                flag: "swing-alert-share",
                key: "swing_alert_share",
                message: format!("must be a share between 0 and 1; got {share}"),
            });
        }
        let url = &self.advertise_url;
        if !(url.starts_with("http://") || url.starts_with("https://")) || url.contains(',') {
            return Err(ConfigError::Invalid {
                flag: "advertise-url",
                key: "advertise_url",
                message: format!("must be one http:// or https:// URL; got {url:?}"),
            });
        }
        if self.reconcile_interval < Duration::from_millis(10) || self.reconcile_interval > Duration::from_secs(60) {
            return Err(ConfigError::Invalid {
                flag: "reconcile-interval",
                key: "reconcile_interval",
                message: format!("must be between 10ms and 1m; got {}", show(self.reconcile_interval)),
            });
        }
        if self.regrow_after > Duration::from_secs(24 * 3600) {
            return Err(ConfigError::Invalid {
                flag: "regrow-after",
                key: "regrow_after",
                message: format!("must be at most 24h; got {}", show(self.regrow_after)),
            });
        }
        if self.settle_time < Duration::from_millis(100) || self.settle_time > Duration::from_secs(600) {
            return Err(ConfigError::Invalid {
                flag: "settle-time",
                key: "settle_time",
                message: format!("must be between 100ms and 10m; got {}", show(self.settle_time)),
            });
        }
        if self.client_ca.is_some() && self.tls.is_none() {
            return Err(invalid(
                "client-ca",
                "client_ca",
                "needs --tls-cert and --tls-key: client certificates are checked in the TLS handshake".into(),
            ));
        }
        if self.etcd_tls.is_some() && !self.store.starts_with("etcd://") {
            return Err(invalid(
                "etcd-ca",
                "etcd_ca",
                format!("applies to an etcd:// store; the store is {:?}", self.store),
            ));
        }
        if self.limits.total == 0 || self.limits.per_principal == 0 {
            let (flag, key) = if self.limits.total == 0 {
                ("max-jobs", "max_jobs")
            } else {
                ("max-jobs-per-principal", "max_jobs_per_principal")
            };
            return Err(invalid(flag, key, "must be at least 1".into()));
        }
        if self.retention.keep_count > self.limits.total {
            return Err(invalid(
                "keep-ended-jobs",
                "keep_ended_jobs",
                format!(
                    "is {} but --max-jobs is {}: the ended jobs kept would leave no room",
                    self.retention.keep_count, self.limits.total
                ),
            ));
        }
        if self.client_ca_key.is_some() && self.client_ca.is_none() {
            return Err(invalid(
                "client-ca-key",
                "client_ca_key",
                "needs --client-ca: the certificate of the key".into(),
            ));
        }
        if self.client_ca.is_none() && self.token_file.is_none() {
            return Err(invalid(
                "client-ca",
                "client_ca",
                "or --token-file is required: without either, no agent and no person could authenticate".into(),
            ));
        }
        if self.tls.is_none() && !self.listen.ip().is_loopback() && !self.insecure {
            return Err(invalid(
                "listen",
                "listen",
                format!(
                    "{} is off loopback and TLS is off: give --tls-cert and --tls-key, or --insecure to send tokens and job secrets in plain text",
                    self.listen
                ),
            ));
        }
        Ok(())
    }

    /// Whether the gRPC port listens off loopback in plain text (allowed only by `--insecure`).
    pub fn plain_text_off_loopback(&self) -> bool {
        self.tls.is_none() && !self.listen.ip().is_loopback()
    }

    pub fn settings(&self) -> Settings {
        Settings {
            node_lease: self.node_lease,
            reconcile_interval: self.reconcile_interval,
            regrow_after: self.regrow_after,
            settle_time: self.settle_time,
            retention: self.retention,
            limits: self.limits,
            speed_curves: self.speed_curves,
            swing_alert_share: self.swing_alert_share,
            // Several telemetry messages per lease, at most one a second.
            telemetry_interval: (self.node_lease / 5).clamp(Duration::from_millis(200), Duration::from_secs(1)),
        }
    }
}
