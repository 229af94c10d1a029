//! Notifications from the VTN: the VEN subscribes, over MQTT, to the topics the VTN names for the
//! events of its programs (and of itself), and reads the VTN the moment one comes — an event that
//! starts "now" is in force within a read, not a poll. A notification is only a reason to read:
//! what it carries is not trusted over what the VEN reads with its own credentials, and nothing
//! is lost when one is missed, because the poll ([`super::ven`]) goes on as the fallback.
//!
//! The broker is the one the VTN names (`GET /notifiers`), or `--openadr-mqtt URL`. The login
//! is what the VTN's notifier says (OAuth: the VEN's client id, its bearer token as the
//! password), or `--openadr-mqtt-username` with `--openadr-mqtt-password-file`. Plain text off
//! this machine is refused unless `--insecure`, as for the VTN itself. A session that fails —
//! broker down, login refused, the VTN unreadable — is tried again with backoff, and a fresh
//! token and topics each time; every (re)subscription is followed by a read, so nothing sent
//! while unsubscribed waits for the poll.

use std::sync::Arc;
use std::time::Duration;

use openleadr_client::{Client, Filter, VirtualEndNode};
use openleadr_wire::subscription::{MqttNotifierAuthentication, NotifierTopicsResponse, NotifiersResponse};
use rumqttc::{AsyncClient, Event, Incoming, MqttOptions, QoS, TlsConfiguration, Transport};
use tokio::sync::mpsc;
use watt_proto::v1 as pb;

use crate::config::{on_loopback, plain_text, MqttBroker, OpenAdrConfig};
use crate::reconcile::Controller;

/// Waits between failed sessions: from the first to the last, doubling.
const FIRST_RETRY: Duration = Duration::from_secs(1);
const LAST_RETRY: Duration = Duration::from_secs(60);
/// How often a VTN that names no broker is asked again.
const ASK_AGAIN: Duration = Duration::from_secs(300);
/// Notifications carry whole events: room for large ones.
const MAX_PACKET_BYTES: usize = 1 << 20;

/// Why a session ended.
#[derive(Debug)]
enum Ended {
    /// The VTN names no MQTT broker (and none was given).
    NotOffered,
    Failed(String),
}

/// Subscribe for as long as the term lasts (the caller aborts it), sending on `notified` each
/// time the VTN should be read now.
pub async fn run(
    controller: Arc<Controller>,
    config: OpenAdrConfig,
    client: Client<VirtualEndNode>,
    http: reqwest::Client,
    notified: mpsc::Sender<()>,
) {
    if config.mqtt == MqttBroker::Off {
        show(&controller, &config, pb::NotifierState::Off, "", "");
        return;
    }
    let mut retry = FIRST_RETRY;
    let mut failing = false;
    loop {
        let ended = session(&controller, &config, &client, &http, &notified).await;
        controller.metrics.grid.notifier_up.set(0);
        match ended {
            Ended::NotOffered => {
                show(&controller, &config, pb::NotifierState::NotOffered, "", "");
                tracing::info!(vtn = %config.vtn, "The VTN names no MQTT broker; reading it every poll only.");
                tokio::time::sleep(ASK_AGAIN).await;
            }
            Ended::Failed(why) => {
                let url = shown_url(&controller);
                show(&controller, &config, pb::NotifierState::Failed, &url, &why);
                if !failing {
                    tracing::warn!(vtn = %config.vtn, broker = %url, error = %why, "The VTN's notifications cannot be received; reading it every poll until they can.");
                }
                failing = true;
                tokio::time::sleep(retry).await;
                retry = (retry * 2).min(LAST_RETRY);
            }
        }
    }
}

/// One MQTT session: the broker, login and topics, then notifications until it fails.
async fn session(
    controller: &Controller,
    config: &OpenAdrConfig,
    client: &Client<VirtualEndNode>,
    http: &reqwest::Client,
    notified: &mpsc::Sender<()>,
) -> Ended {
    let token = match token(http, config).await {
        Ok(token) => token,
        Err(e) => return Ended::Failed(e),
    };
    let offered = match get::<NotifiersResponse>(http, config, "notifiers", &token).await {
        Ok(n) => n.mqtt,
        Err(e) => return Ended::Failed(e),
    };
    let broker = match (&config.mqtt, &offered) {
        (MqttBroker::Url(url), _) => url.clone(),
        (_, Some(binding)) => match binding.uris.first().map(|u| crate::config::mqtt_url(u)) {
            Some(Ok(url)) => url,
            Some(Err(e)) => return Ended::Failed(format!("the VTN names a broker Watt cannot use: {e}")),
            None => return Ended::NotOffered,
        },
        (_, None) => return Ended::NotOffered,
    };
    show(controller, config, pb::NotifierState::Connecting, broker.as_str(), "");
    if plain_text(&broker) && !on_loopback(&broker) && !config.insecure {
        return Ended::Failed(format!(
            "{broker} is plain text off this machine: give an mqtts:// broker (--openadr-mqtt), or --insecure"
        ));
    }
    let login = match (&config.mqtt_login, offered.map(|b| b.authentication)) {
        (Some(login), _) => match std::fs::read_to_string(&login.password_file) {
            Ok(password) => Some((login.username.clone(), password.trim().to_string())),
            Err(e) => {
                return Ended::Failed(format!(
                    "cannot read --openadr-mqtt-password-file {}: {e}",
                    login.password_file.display()
                ))
            }
        },
        (None, Some(MqttNotifierAuthentication::Oauth2BearerToken { username })) => {
            Some((username.replace("{clientID}", &config.client_id), token.clone()))
        }
        (None, _) => None,
    };
    let topics = match topics(client, http, config, &token).await {
        Ok(topics) if topics.is_empty() => {
            return Ended::Failed("the VTN names no topics for the enrolled programs".into())
        }
        Ok(topics) => topics,
        Err(e) => return Ended::Failed(e),
    };
    let options = match options(config, &broker, login) {
        Ok(options) => options,
        Err(e) => return Ended::Failed(e),
    };
    let (mqtt, mut events) = AsyncClient::new(options, 16);
    loop {
        match events.poll().await {
            Ok(Event::Incoming(Incoming::ConnAck(_))) => {
                let wanted = topics.iter().map(|t| rumqttc::SubscribeFilter::new(t.clone(), QoS::AtLeastOnce));
                if let Err(e) = mqtt.subscribe_many(wanted).await {
                    return Ended::Failed(format!("subscribing: {e}"));
                }
            }
            Ok(Event::Incoming(Incoming::SubAck(ack))) => {
                if ack.return_codes.iter().any(|c| matches!(c, rumqttc::SubscribeReasonCode::Failure)) {
                    return Ended::Failed(format!("the broker refused a subscription to {topics:?}"));
                }
                controller.metrics.grid.notifier_up.set(1);
                show(controller, config, pb::NotifierState::Subscribed, broker.as_str(), "");
                tracing::info!(broker = %broker, ?topics, "Subscribed to the VTN's notifications.");
                // Whatever came while not subscribed is read now.
                let _ = notified.try_send(());
            }
            Ok(Event::Incoming(Incoming::Publish(message))) => {
                controller.metrics.grid.notifications.inc();
                tracing::debug!(topic = %message.topic, "A notification from the VTN: reading it now.");
                let _ = notified.try_send(());
            }
            Ok(_) => {}
            Err(e) => return Ended::Failed(e.to_string()),
        }
    }
}

/// The topics the VTN names for the events of the enrolled programs, and of this VEN.
async fn topics(
    client: &Client<VirtualEndNode>,
    http: &reqwest::Client,
    config: &OpenAdrConfig,
    token: &str,
) -> Result<Vec<String>, String> {
    let programs = client.get_program_list(Filter::none()).await.map_err(|e| format!("programs: {e}"))?;
    let mut paths: Vec<String> = programs
        .iter()
        .filter(|p| config.programs.contains(&p.content().program_name))
        .map(|p| format!("notifiers/mqtt/topics/programs/{}/events", p.id()))
        .collect();
    // Before the VEN is registered it has no id: its own topic comes with the next session.
    if let Ok(ven) = client.get_ven_by_name(&config.ven_name).await {
        paths.push(format!("notifiers/mqtt/topics/vens/{}/events", ven.id()));
    }
    let mut topics = Vec::new();
    for path in paths {
        let named = get::<NotifierTopicsResponse>(http, config, &path, token).await?.topics;
        let all = match named.all {
            Some(all) => vec![all],
            None => [named.create, Some(named.update), Some(named.delete)].into_iter().flatten().collect(),
        };
        for topic in all {
            if !topics.contains(&topic) {
                topics.push(topic);
            }
        }
    }
    Ok(topics)
}

fn options(config: &OpenAdrConfig, broker: &url::Url, login: Option<(String, String)>) -> Result<MqttOptions, String> {
    let tls = matches!(broker.scheme(), "mqtts" | "ssl");
    let host = broker.host_str().ok_or_else(|| format!("{broker} names no host"))?;
    let port = broker.port().unwrap_or(if tls { 8883 } else { 1883 });
    // One session per VEN and process: a new leader's VEN does not log out the old one's.
    let id = format!("{}-{}", config.ven_name, std::process::id());
    let mut options = MqttOptions::new(id, host.trim_matches(['[', ']']), port);
    options.set_keep_alive(Duration::from_secs(15));
    options.set_max_packet_size(MAX_PACKET_BYTES, MAX_PACKET_BYTES);
    if let Some((username, password)) = login {
        options.set_credentials(username, password);
    }
    if tls {
        options.set_transport(Transport::Tls(TlsConfiguration::Rustls(Arc::new(tls_config(config)?))));
    }
    Ok(options)
}

/// TLS to the broker: the CA given for the VTN (`--openadr-ca`), else the system's roots.
fn tls_config(config: &OpenAdrConfig) -> Result<rustls::ClientConfig, String> {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    match &config.ca {
        Some(ca) => {
            for cert in rustls::pki_types::CertificateDer::pem_file_iter(ca)
                .map_err(|e| format!("--openadr-ca {}: {e}", ca.display()))?
            {
                let cert = cert.map_err(|e| format!("--openadr-ca {}: {e}", ca.display()))?;
                roots.add(cert).map_err(|e| format!("--openadr-ca {}: {e}", ca.display()))?;
            }
        }
        None => {
            roots.add_parsable_certificates(rustls_native_certs::load_native_certs().certs);
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

/// A bearer token for the VEN (OAuth client credentials), as the OpenADR client gets its own.
async fn token(http: &reqwest::Client, config: &OpenAdrConfig) -> Result<String, String> {
    #[derive(serde::Deserialize)]
    struct Token {
        access_token: String,
    }
    let secret = std::fs::read_to_string(&config.secret_file)
        .map_err(|e| format!("cannot read --openadr-secret-file {}: {e}", config.secret_file.display()))?;
    let response = http
        .post(config.token_url.clone())
        .basic_auth(&config.client_id, Some(secret.trim()))
        .form(&[("grant_type", "client_credentials")])
        .send()
        .await
        .map_err(|e| format!("token: {e}"))?;
    if !response.status().is_success() {
        return Err(format!("token: the VTN's OAuth endpoint answered {}", response.status()));
    }
    Ok(response.json::<Token>().await.map_err(|e| format!("token: {e}"))?.access_token)
}

async fn get<T: serde::de::DeserializeOwned>(
    http: &reqwest::Client,
    config: &OpenAdrConfig,
    path: &str,
    token: &str,
) -> Result<T, String> {
    let url = config.vtn.join(path).map_err(|e| format!("{path}: {e}"))?;
    let response = http.get(url).bearer_auth(token).send().await.map_err(|e| format!("{path}: {e}"))?;
    if response.status() == reqwest::StatusCode::NOT_FOUND && path.starts_with("notifiers/mqtt") {
        return Err("the VTN has no MQTT notifier (its topics are not found)".into());
    }
    if !response.status().is_success() {
        return Err(format!("{path}: the VTN answered {}", response.status()));
    }
    response.json::<T>().await.map_err(|e| format!("{path}: {e}"))
}

/// The broker the power status shows, if any.
fn shown_url(controller: &Controller) -> String {
    let link = controller.grid_link.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    link.as_ref().map(|l| l.notifier_url.clone()).unwrap_or_default()
}

/// What the power status shows of the notifier.
fn show(controller: &Controller, config: &OpenAdrConfig, state: pb::NotifierState, url: &str, error: &str) {
    let mut link = controller.grid_link.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let link = link.get_or_insert_with(|| pb::GridLink {
        vtn: config.vtn.to_string(),
        ven_name: config.ven_name.clone(),
        ..pb::GridLink::default()
    });
    link.notifier = state as i32;
    link.notifier_url = url.to_string();
    link.notifier_error = error.to_string();
}
