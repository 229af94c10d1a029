//! `wattctl logs JOB [--shard N] [--follow]`: a shard's output, read from the agent that runs it
//! — or, for a job off its GPUs (finished, failed, paused), from the agent that ran it last, for
//! as long as that node keeps the log.
//!
//! The controller says where the shard runs (or last ran) and at which HTTP address that node's
//! agent serves its logs; the log itself comes straight from the agent (`GET /logs/<job>/<shard>`), so
//! training output never flows through the controller. `--follow` asks for what follows the
//! last byte seen, once a second, starting over when the agent rotated the log, until the job
//! stops running.

use std::io::Write;
use std::time::Duration;

use watt_proto::v1 as pb;

use crate::{Control, Failure};

/// Where shard `shard` of `job` runs, or last ran: the agent's HTTP address.
async fn locate(client: &mut Control, job: &str, shard: u32) -> Result<(String, pb::Job), Failure> {
    let record = client.get_job(pb::GetJobRequest { name: job.to_string() }).await?.into_inner();
    let node = match record.shards.iter().find(|s| s.shard == shard) {
        Some(placement) => placement.node.clone(),
        None if record.shards.is_empty() => match record.last_run.iter().find(|s| s.shard == shard) {
            Some(last) => last.node.clone(),
            None if record.last_run.is_empty() => {
                return Err(Failure::Server(format!("job {job} has not run yet: it has no logs")));
            }
            None => {
                return Err(Failure::Server(format!(
                    "job {job} last ran shards 0..{}; there is no shard {shard}",
                    record.last_run.len() - 1
                )));
            }
        },
        None => {
            return Err(Failure::Server(format!(
                "job {job} runs shards 0..{}; there is no shard {shard}",
                record.shards.len() - 1
            )));
        }
    };
    let address = agent_address(client, &node).await?;
    Ok((address, record))
}

/// The HTTP address of `node`'s agent.
async fn agent_address(client: &mut Control, node: &str) -> Result<String, Failure> {
    let nodes = client.list_nodes(pb::ListNodesRequest {}).await?.into_inner().nodes;
    nodes
        .iter()
        .find(|n| n.name == node)
        .map(|n| n.http_address.clone())
        .filter(|a| !a.is_empty())
        .ok_or_else(|| Failure::Server(format!("node {node} has not said where it serves logs")))
}

/// The last `lines` lines of each failed shard's log in `job`'s last run, for `describe job`.
/// A log that cannot be read says why instead.
pub async fn failed_tails(client: &mut Control, job: &pb::Job, lines: usize) -> Vec<(u32, String)> {
    let name = job.spec.as_ref().map(|s| s.name.clone()).unwrap_or_default();
    let mut out = Vec::new();
    for shard in job.last_run.iter().filter(|s| s.state == pb::ShardState::Failed as i32) {
        let tail = match agent_address(client, &shard.node).await {
            Ok(address) => {
                let (n, s) = (name.clone(), shard.shard);
                match tokio::task::spawn_blocking(move || fetch(&address, &n, s, None)).await {
                    Ok(Ok((body, _, _))) => {
                        let text = String::from_utf8_lossy(&body);
                        let all: Vec<&str> = text.lines().collect();
                        all[all.len().saturating_sub(lines)..].join("\n")
                    }
                    Ok(Err(e)) => format!("(log not available: {})", why(e)),
                    Err(e) => format!("(log not available: {e})"),
                }
            }
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

/// One read: the bytes, the log's size, whether it was rotated since `offset`.
fn fetch(address: &str, job: &str, shard: u32, offset: Option<u64>) -> Result<(Vec<u8>, u64, bool), Failure> {
    let mut url = format!("http://{address}/logs/{job}/{shard}");
    if let Some(o) = offset {
        url.push_str(&format!("?offset={o}"));
    }
    let mut response = ureq::get(&url).call().map_err(|e| match e {
        ureq::Error::StatusCode(404) => {
            Failure::Server(format!("the agent at {address} has no log for shard {shard} of {job}"))
        }
        e => Failure::Server(format!("cannot read the log from the agent at {address}: {e}")),
    })?;
    let header = |name: &str| response.headers().get(name).and_then(|v| v.to_str().ok()).map(str::to_owned);
    let size = header("x-watt-log-size").and_then(|v| v.parse().ok()).unwrap_or(0);
    let rotated = header("x-watt-log-rotated").is_some();
    let body = response
        .body_mut()
        .with_config()
        .limit(2 * 1024 * 1024)
        .read_to_vec()
        .map_err(|e| Failure::Server(format!("cannot read the log from the agent at {address}: {e}")))?;
    Ok((body, size, rotated))
}

pub async fn run(client: &mut Control, job: &str, shard: u32, follow: bool) -> Result<(), Failure> {
    let (address, _) = locate(client, job, shard).await?;
    let (a, j) = (address.clone(), job.to_string());
    let (body, size, _) = tokio::task::spawn_blocking(move || fetch(&a, &j, shard, None))
        .await
        .map_err(|e| Failure::Server(e.to_string()))??;
    let mut out = std::io::stdout();
    let write = |out: &mut std::io::Stdout, bytes: &[u8]| {
        out.write_all(bytes).and_then(|()| out.flush()).map_err(|e| Failure::Server(format!("cannot write: {e}")))
    };
    write(&mut out, &body)?;
    if !follow {
        return Ok(());
    }
    // The tail ended at the size the first answer reported.
    let mut offset = size;
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let (a, j) = (address.clone(), job.to_string());
        let (body, _, rotated) = tokio::task::spawn_blocking(move || fetch(&a, &j, shard, Some(offset)))
            .await
            .map_err(|e| Failure::Server(e.to_string()))??;
        write(&mut out, &body)?;
        offset = if rotated { body.len() as u64 } else { offset + body.len() as u64 };
        let state = client.get_job(pb::GetJobRequest { name: job.to_string() }).await?.into_inner().state;
        let active = matches!(pb::JobState::try_from(state), Ok(pb::JobState::Starting | pb::JobState::Running));
        if !active {
            return Ok(());
        }
    }
}
