//! `wattctl logs JOB [--shard N] [--follow]`: a shard's output, read from the agent that runs it
//! — or, for a job off its GPUs (finished, failed, paused), from the agent that ran it last, for
//! as long as that node keeps the log.
//!
//! The controller (a viewer's call) says which node has the log and where its agent serves it,
//! and signs a grant for this shard on that node, good for a few minutes; the log itself comes
//! straight from the agent over HTTPS (`GET /logs/<job>/<shard>`, the grant as bearer token,
//! the agent's certificate checked against the cluster's CA for that node's name), so training
//! output never flows through the controller. `--follow` asks for what follows the last byte
//! seen, once a second, starting over when the agent rotated the log, with a fresh grant before
//! the last one ends, until the job stops running.

use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

use watt_common::fetch::{self, Answer};
use watt_proto::v1 as pb;

use crate::{Control, Failure};

/// The most of a log one answer may carry (the agent sends at most 1 MiB).
const MAX_ANSWER: usize = 2 * 1024 * 1024;

/// Ask for a new grant this long before the current one ends.
const RENEW_BEFORE_MS: i64 = 60_000;

/// How to reach agents when a grant does not say which CA signs node certificates: trusting
/// the CA wattctl trusts the controller with.
#[derive(Debug, Clone, Default)]
pub struct AgentTls(Option<Arc<rustls::ClientConfig>>);

impl AgentTls {
    pub fn new(ca: Option<&std::path::Path>) -> Result<AgentTls, Failure> {
        ca.map(|ca| watt_common::tls::client_config(ca).map(Arc::new))
            .transpose()
            .map(AgentTls)
            .map_err(|e| Failure::Usage(format!("ca: {e}")))
    }

    /// What to trust for the agent `grant` names: the node CA it carries (the controller's word,
    /// over its authenticated connection), else wattctl's own CA.
    fn for_grant(&self, grant: &pb::LogGrant) -> Result<Option<Arc<rustls::ClientConfig>>, Failure> {
        if grant.node_ca_pem.is_empty() {
            return Ok(self.0.clone());
        }
        watt_common::tls::client_config_pem(&grant.node_ca_pem)
            .map(|c| Some(Arc::new(c)))
            .map_err(|e| Failure::Server(format!("the controller's node CA: {e}")))
    }
}

async fn grant(client: &mut Control, job: &str, shard: u32) -> Result<pb::LogGrant, Failure> {
    Ok(client.grant_logs(pb::GrantLogsRequest { job: job.to_string(), shard }).await?.into_inner())
}

/// The last `lines` lines of each failed shard's log in `job`'s last run, for `describe job`.
/// A log that cannot be read says why instead.
pub async fn failed_tails(client: &mut Control, tls: &AgentTls, job: &pb::Job, lines: usize) -> Vec<(u32, String)> {
    let name = job.spec.as_ref().map(|s| s.name.clone()).unwrap_or_default();
    let mut out = Vec::new();
    for shard in job.last_run.iter().filter(|s| s.state == pb::ShardState::Failed as i32) {
        let tail = match grant(client, &name, shard.shard).await {
            Ok(g) => match fetch_log(tls, &g, &name, shard.shard, None).await {
                Ok(log) => {
                    let text = String::from_utf8_lossy(&log.body);
                    let all: Vec<&str> = text.lines().collect();
                    all[all.len().saturating_sub(lines)..].join("\n")
                }
                Err(e) => format!("(log not available: {})", why(e)),
            },
            Err(e) => format!("(log not available: {})", why(e)),
        };
        out.push((shard.shard, tail));
    }
    out
}

fn why(e: Failure) -> String {
    match e {
        Failure::Server(m) | Failure::Usage(m) => m,
    }
}

/// One read of a log: its bytes, its size, whether it was rotated since the offset asked for.
#[derive(Debug)]
struct LogRead {
    body: Vec<u8>,
    size: u64,
    rotated: bool,
}

async fn fetch_log(
    tls: &AgentTls,
    grant: &pb::LogGrant,
    job: &str,
    shard: u32,
    offset: Option<u64>,
) -> Result<LogRead, Failure> {
    let mut url = format!("{}/logs/{job}/{shard}", grant.url);
    if let Some(o) = offset {
        url.push_str(&format!("?offset={o}"));
    }
    let agent = format!("the agent of node {} ({})", grant.node, grant.url);
    let Answer { status, headers, body } =
        fetch::get(&url, tls.for_grant(grant)?, &grant.node, &grant.token, MAX_ANSWER).await.map_err(|e| match e {
            fetch::FetchError::NoCa => Failure::Usage(format!("ca: {agent} serves HTTPS; {e}")),
            e => Failure::Server(format!("cannot read the log from {agent}: {}", watt_common::client::chain(&e))),
        })?;
    match status {
        200 => {}
        404 => return Err(Failure::Server(format!("{agent} has no log for shard {shard} of {job}"))),
        _ => {
            let text = String::from_utf8_lossy(&body);
            return Err(Failure::Server(format!("{agent} refused the log ({status}): {}", text.trim())));
        }
    }
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).map(str::to_owned);
    let size = header("x-watt-log-size").and_then(|v| v.parse().ok()).unwrap_or(0);
    Ok(LogRead { body, size, rotated: header("x-watt-log-rotated").is_some() })
}

pub async fn run(client: &mut Control, tls: &AgentTls, job: &str, shard: u32, follow: bool) -> Result<(), Failure> {
    let mut current = grant(client, job, shard).await?;
    let first = fetch_log(tls, &current, job, shard, None).await?;
    let mut out = std::io::stdout();
    let write = |out: &mut std::io::Stdout, bytes: &[u8]| {
        out.write_all(bytes).and_then(|()| out.flush()).map_err(|e| Failure::Server(format!("cannot write: {e}")))
    };
    write(&mut out, &first.body)?;
    if !follow {
        return Ok(());
    }
    // The tail ended at the size the first answer reported.
    let mut offset = first.size;
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        if current.expires_unix_ms - unix_ms() < RENEW_BEFORE_MS {
            current = grant(client, job, shard).await?;
        }
        let next = fetch_log(tls, &current, job, shard, Some(offset)).await?;
        write(&mut out, &next.body)?;
        offset = if next.rotated { next.body.len() as u64 } else { offset + next.body.len() as u64 };
        let state = client.get_job(pb::GetJobRequest { name: job.to_string() }).await?.into_inner().state;
        let active = matches!(pb::JobState::try_from(state), Ok(pb::JobState::Starting | pb::JobState::Running));
        if !active {
            return Ok(());
        }
    }
}

fn unix_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}
