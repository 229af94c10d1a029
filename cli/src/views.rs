//! What `wattctl` prints: stable, documented shapes for `-o json|yaml`, and human tables.

use std::fmt::Write as _;

use serde::Serialize;
use watt_proto::v1 as pb;

/// Columns padded to their widest cell.
pub fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            widths[i] = widths[i].max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let line = |out: &mut String, cells: &mut dyn Iterator<Item = &str>| {
        let mut text = String::new();
        for (i, cell) in cells.enumerate() {
            let pad = widths[i].saturating_sub(cell.chars().count());
            let _ = write!(text, "{cell}{}  ", " ".repeat(pad));
        }
        out.push_str(text.trim_end());
        out.push('\n');
    };
    line(&mut out, &mut headers.iter().copied());
    for row in rows {
        line(&mut out, &mut row.iter().map(String::as_str));
    }
    out
}

pub fn job_state(state: i32) -> String {
    match pb::JobState::try_from(state).unwrap_or_default() {
        pb::JobState::Pending => "pending",
        pb::JobState::Starting => "starting",
        pb::JobState::Running => "running",
        pb::JobState::Succeeded => "succeeded",
        pb::JobState::Failed => "failed",
        pb::JobState::Cancelled => "cancelled",
        pb::JobState::Unspecified => "unknown",
    }
    .into()
}

fn shard_state(state: i32) -> String {
    match pb::ShardState::try_from(state).unwrap_or_default() {
        pb::ShardState::Starting => "starting",
        pb::ShardState::Running => "running",
        pb::ShardState::Stopping => "stopping",
        pb::ShardState::Stopped => "stopped",
        pb::ShardState::Succeeded => "succeeded",
        pb::ShardState::Failed => "failed",
        pb::ShardState::Unspecified => "ordered",
    }
    .into()
}

fn node_state(state: i32) -> String {
    match pb::NodeState::try_from(state).unwrap_or_default() {
        pb::NodeState::Ready => "ready",
        pb::NodeState::Disconnected => "disconnected",
        pb::NodeState::Lost => "lost",
        pb::NodeState::Unspecified => "unknown",
    }
    .into()
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ShardView {
    pub shard: u32,
    pub node: String,
    pub gpus: Vec<u32>,
    pub state: String,
    /// Its agent's latest words: the process, and the runtime it runs in.
    pub message: String,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct JobView {
    pub name: String,
    pub state: String,
    pub priority: i64,
    pub shards_min: i64,
    pub shards_max: i64,
    pub gpus_per_shard: i64,
    pub command: Vec<String>,
    /// The training runtime it needs (empty: any node's).
    pub runtime: String,
    pub flex: f64,
    pub max_restarts: i64,
    pub sequence: u64,
    pub submitted_unix_ms: i64,
    pub submitted_by: String,
    pub epoch: u64,
    pub placement: Vec<ShardView>,
    pub message: String,
    pub preemptions: u32,
    pub progress: Option<ProgressView>,
    /// How fast it runs against its cap, as the controller learned it.
    pub speed_curve: Option<SpeedCurveView>,
    /// Where it last ran and how each shard ended (kept once it is off its GPUs).
    pub last_run: Vec<ShardEndView>,
    /// The end of each failed shard's log, read from its node (describe only).
    pub failed_log_tails: Vec<LogTail>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ProgressView {
    pub step: u64,
    pub samples: u64,
    pub loss: Option<f64>,
    pub steps_per_second: f64,
    pub samples_per_second: f64,
    pub energy_per_step_joules: f64,
    pub updated_unix_ms: i64,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SpeedCurveView {
    /// speed(cap) = (cap / max)^exponent.
    pub exponent: f64,
    pub exponent_sd: f64,
    pub speed_at_60_percent: f64,
    pub speed_at_80_percent: f64,
    pub observations: u32,
    pub distinct_caps: u32,
    /// "shared", "activity" or "measured".
    pub source: String,
    pub in_use: bool,
    /// A probe is under way (see the proto's `SpeedCurve.probing`).
    pub probing: bool,
}

impl From<pb::SpeedCurve> for SpeedCurveView {
    fn from(c: pb::SpeedCurve) -> Self {
        let source = match c.source() {
            pb::SpeedCurveSource::Shared => "shared",
            pb::SpeedCurveSource::Activity => "activity",
            pb::SpeedCurveSource::Measured => "measured",
            pb::SpeedCurveSource::Unspecified => "unknown",
        };
        SpeedCurveView {
            exponent: c.exponent,
            exponent_sd: c.exponent_sd,
            speed_at_60_percent: c.speed_at_60_percent,
            speed_at_80_percent: c.speed_at_80_percent,
            observations: c.observations,
            distinct_caps: c.distinct_caps,
            source: source.into(),
            in_use: c.in_use,
            probing: c.probing,
        }
    }
}

impl SpeedCurveView {
    /// "speed at 60/80/100% of max cap: 0.83/0.95/1.00, from 14 observations at 3 caps".
    pub fn sentence(&self) -> String {
        let whence = match self.source.as_str() {
            "measured" => format!("from {} observations at {} caps", self.observations, self.distinct_caps),
            "activity" => "from its GPU activity, not yet measured at two caps".into(),
            _ => "the shared curve, nothing measured yet".into(),
        };
        format!(
            "speed at 60/80/100% of max cap: {:.2}/{:.2}/1.00, {whence} (exponent {:.2} ± {:.2}){}",
            self.speed_at_60_percent,
            self.speed_at_80_percent,
            self.exponent,
            self.exponent_sd,
            if !self.in_use {
                "; not used: the controller shares power by one curve"
            } else if self.probing {
                "; measuring it: where power is short its cap is lowered within its flex for a window"
            } else {
                ""
            }
        )
    }
}

impl From<pb::JobProgress> for ProgressView {
    fn from(p: pb::JobProgress) -> Self {
        ProgressView {
            step: p.step,
            samples: p.samples,
            loss: p.loss,
            steps_per_second: p.steps_per_second,
            samples_per_second: p.samples_per_second,
            energy_per_step_joules: p.energy_per_step_joules,
            updated_unix_ms: p.updated_unix_ms,
        }
    }
}

impl From<pb::Job> for JobView {
    fn from(job: pb::Job) -> Self {
        let spec = job.spec.unwrap_or_default();
        let shards = spec.shards.unwrap_or_default();
        JobView {
            name: spec.name,
            state: job_state(job.state),
            priority: spec.priority,
            shards_min: shards.min,
            shards_max: shards.max,
            gpus_per_shard: spec.gpus_per_shard,
            command: spec.command,
            runtime: spec.runtime,
            flex: spec.flex,
            max_restarts: spec.max_restarts.unwrap_or_default(),
            sequence: job.sequence,
            submitted_unix_ms: job.submitted_unix_ms,
            submitted_by: job.submitted_by.clone(),
            epoch: job.epoch,
            placement: job
                .shards
                .into_iter()
                .map(|s| ShardView {
                    shard: s.shard,
                    node: s.node,
                    gpus: s.gpu_indices,
                    state: shard_state(s.state),
                    message: s.message,
                })
                .collect(),
            message: job.message,
            preemptions: job.preemptions,
            progress: job.progress.map(ProgressView::from),
            speed_curve: job.speed_curve.map(SpeedCurveView::from),
            last_run: job
                .last_run
                .into_iter()
                .map(|s| ShardEndView {
                    shard: s.shard,
                    node: s.node,
                    gpus: s.gpu_indices,
                    state: shard_state(s.state),
                    exit_code: s.exit_code,
                    signal: s.signal,
                    restarts: s.restarts,
                    message: s.message,
                    ended_unix_ms: s.ended_unix_ms,
                })
                .collect(),
            failed_log_tails: Vec::new(),
        }
    }
}

/// How one shard of a job's last run ended.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ShardEndView {
    pub shard: u32,
    pub node: String,
    pub gpus: Vec<u32>,
    pub state: String,
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    pub restarts: u32,
    pub message: String,
    pub ended_unix_ms: i64,
}

impl ShardEndView {
    /// "shard 0 on node-2 exited 3 after 1 restart".
    pub fn sentence(&self) -> String {
        let what = watt_common::shard_end::describe(self.exit_code, self.signal, self.restarts).unwrap_or_else(|| {
            if self.state.is_empty() || self.state == "-" {
                "ended; its agent did not say how".into()
            } else {
                self.state.clone()
            }
        });
        format!("shard {} on {} {what}", self.shard, self.node)
    }
}

/// The end of a failed shard's log.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LogTail {
    pub shard: u32,
    pub tail: String,
}

impl JobView {
    pub fn table(jobs: &[JobView]) -> String {
        let rows: Vec<Vec<String>> = jobs
            .iter()
            .map(|j| {
                let mut nodes: Vec<&str> = j.placement.iter().map(|s| s.node.as_str()).collect();
                nodes.dedup();
                vec![
                    j.name.clone(),
                    j.state.clone(),
                    j.priority.to_string(),
                    format!("{}/{}..{}", j.placement.len(), j.shards_min, j.shards_max),
                    j.gpus_per_shard.to_string(),
                    if nodes.is_empty() { "-".into() } else { nodes.join(",") },
                    j.message.clone(),
                ]
            })
            .collect();
        table(&["NAME", "STATE", "PRIORITY", "SHARDS", "GPUS/SHARD", "NODES", "MESSAGE"], &rows)
    }

    pub fn describe(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "Name:           {}", self.name);
        let _ = writeln!(out, "State:          {}", self.state);
        let _ = writeln!(out, "Message:        {}", self.message);
        let _ = writeln!(out, "Priority:       {}", self.priority);
        if !self.submitted_by.is_empty() {
            let _ = writeln!(out, "Submitted by:   {}", self.submitted_by);
        }
        let _ = writeln!(
            out,
            "Shards:         {} running of {}..{}",
            self.placement.len(),
            self.shards_min,
            self.shards_max
        );
        let _ = writeln!(out, "GPUs per shard: {}", self.gpus_per_shard);
        let _ = writeln!(out, "Command:        {}", self.command.join(" "));
        if !self.runtime.is_empty() {
            let _ = writeln!(out, "Runtime:        {} (only nodes whose agent offers it)", self.runtime);
        }
        let _ = writeln!(out, "Flex:           {}", self.flex);
        let _ = writeln!(out, "Max restarts:   {}", self.max_restarts);
        let _ = writeln!(out, "Sequence:       {}", self.sequence);
        let _ = writeln!(out, "Epoch:          {}", self.epoch);
        let _ = writeln!(out, "Preemptions:    {}", self.preemptions);
        if let Some(p) = &self.progress {
            let loss = p.loss.map_or_else(|| "-".to_string(), |l| format!("{l:.6}"));
            let _ = writeln!(out, "Progress:       step {}, {} samples, loss {loss}", p.step, p.samples);
            let _ = writeln!(
                out,
                "Throughput:     {:.2} steps/s, {:.0} samples/s (last 30 s)",
                p.steps_per_second, p.samples_per_second
            );
            let _ = writeln!(out, "Energy:         {:.1} J/step (the job's GPUs, last 30 s)", p.energy_per_step_joules);
        }
        if let Some(c) = &self.speed_curve {
            let _ = writeln!(out, "Speed curve:    {}", c.sentence());
        }
        if self.placement.is_empty() && !self.last_run.is_empty() {
            out.push_str("Last run:\n");
            for s in &self.last_run {
                let _ = writeln!(out, "  {}", s.sentence());
            }
            for t in &self.failed_log_tails {
                let _ = writeln!(
                    out,
                    "Log of shard {} (last lines; all of it: wattctl logs {} --shard {}):",
                    t.shard, self.name, t.shard
                );
                for line in t.tail.lines() {
                    let _ = writeln!(out, "  | {line}");
                }
            }
        }
        if !self.placement.is_empty() {
            out.push_str("Placement:\n");
            let rows: Vec<Vec<String>> = self
                .placement
                .iter()
                .map(|s| {
                    let gpus: Vec<String> = s.gpus.iter().map(u32::to_string).collect();
                    vec![format!("  {}", s.shard), s.node.clone(), gpus.join(","), s.state.clone(), s.message.clone()]
                })
                .collect();
            out.push_str(&table(&["  SHARD", "NODE", "GPUS", "STATE", "AGENT SAYS"], &rows));
        }
        out
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct NodeView {
    pub name: String,
    pub state: String,
    pub gpus: usize,
    pub allocated_gpus: Vec<u32>,
    pub model: String,
    pub power_watts: f64,
    pub last_seen_unix_ms: i64,
    pub agent_version: String,
    /// on, dry-run or off: what the node's agent does with cap orders.
    pub enforce: String,
    pub non_gpu_watts: f64,
    /// Where its agent serves shards' logs (to holders of a grant).
    pub logs_url: String,
    /// Its labels (the agent's `--labels`).
    pub labels: std::collections::BTreeMap<String, String>,
    /// The power domains it is in, from the site down.
    pub domains: Vec<String>,
    /// The training runtimes its agent offers, and where its shards run (agent or host).
    pub runtimes: Vec<String>,
    pub shard_exec: String,
}

/// The `--enforce` mode as its flag spells it.
pub fn enforce_mode(mode: i32) -> String {
    match pb::EnforceMode::try_from(mode).unwrap_or_default() {
        pb::EnforceMode::On | pb::EnforceMode::Unspecified => "on",
        pb::EnforceMode::DryRun => "dry-run",
        pb::EnforceMode::Off => "off",
    }
    .into()
}

fn gpu_work(work: i32) -> String {
    match pb::GpuWork::try_from(work).unwrap_or_default() {
        pb::GpuWork::Watt => "watt",
        pb::GpuWork::Foreign => "foreign",
        pb::GpuWork::Idle | pb::GpuWork::Unspecified => "idle",
    }
    .into()
}

impl From<pb::Node> for NodeView {
    fn from(n: pb::Node) -> Self {
        let power = n.telemetry.as_ref().map(|t| t.gpus.iter().map(|g| g.power_watts).sum()).unwrap_or(0.0);
        NodeView {
            model: n.gpus.first().map(|g| g.model.clone()).unwrap_or_default(),
            name: n.name,
            state: node_state(n.state),
            gpus: n.gpus.len(),
            allocated_gpus: n.allocated_gpus,
            power_watts: power,
            last_seen_unix_ms: n.last_seen_unix_ms,
            agent_version: n.agent_version,
            enforce: enforce_mode(n.enforce_mode),
            non_gpu_watts: n.non_gpu_power_watts,
            logs_url: n.logs_url,
            labels: n.labels.into_iter().collect(),
            domains: n.domains,
            runtimes: n.runtimes,
            shard_exec: match pb::ShardExec::try_from(n.shard_exec).unwrap_or_default() {
                pb::ShardExec::Host => "host",
                pb::ShardExec::Agent | pb::ShardExec::Unspecified => "agent",
            }
            .into(),
        }
    }
}

impl NodeView {
    pub fn table(nodes: &[NodeView]) -> String {
        let rows: Vec<Vec<String>> = nodes
            .iter()
            .map(|n| {
                vec![
                    n.name.clone(),
                    n.state.clone(),
                    n.gpus.to_string(),
                    n.allocated_gpus.len().to_string(),
                    n.model.clone(),
                    format!("{:.0}", n.power_watts),
                    format!("{:.0}", n.non_gpu_watts),
                    n.enforce.clone(),
                    if n.runtimes.is_empty() { "-".into() } else { n.runtimes.join(",") },
                ]
            })
            .collect();
        table(&["NAME", "STATE", "GPUS", "ALLOCATED", "MODEL", "POWER(W)", "NON-GPU(W)", "ENFORCE", "RUNTIMES"], &rows)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GpuRow {
    pub node: String,
    pub gpu: u32,
    pub uuid: String,
    pub model: String,
    pub allocated: bool,
    pub up: bool,
    pub power_watts: f64,
    pub power_limit_watts: f64,
    pub power_limit_min_watts: f64,
    pub power_limit_max_watts: f64,
    pub utilization_ratio: f64,
    pub temperature_celsius: f64,
    /// idle, watt (a Watt shard), or foreign (a process Watt did not start).
    pub work: String,
    /// What budget safety counts for it.
    pub counted_watts: f64,
}

impl GpuRow {
    pub fn for_node(node: &pb::Node) -> Vec<GpuRow> {
        node.gpus
            .iter()
            .map(|g| {
                let t = node.telemetry.as_ref().and_then(|t| t.gpus.iter().find(|x| x.index == g.index));
                let range = g.power_limit.unwrap_or_default();
                let account = node.accounting.iter().find(|a| a.index == g.index);
                GpuRow {
                    work: account.map(|a| gpu_work(a.work)).unwrap_or_else(|| "idle".into()),
                    counted_watts: account.map_or(0.0, |a| a.counted_watts),
                    node: node.name.clone(),
                    gpu: g.index,
                    uuid: g.uuid.clone(),
                    model: g.model.clone(),
                    allocated: node.allocated_gpus.contains(&g.index),
                    up: t.is_some_and(|t| t.up),
                    power_watts: t.map(|t| t.power_watts).unwrap_or(0.0),
                    power_limit_watts: t.map(|t| t.power_limit_watts).unwrap_or(0.0),
                    power_limit_min_watts: range.min_watts,
                    power_limit_max_watts: range.max_watts,
                    utilization_ratio: t.map(|t| t.utilization_ratio).unwrap_or(0.0),
                    temperature_celsius: t.map(|t| t.temperature_celsius).unwrap_or(0.0),
                }
            })
            .collect()
    }

    pub fn table(gpus: &[GpuRow]) -> String {
        let rows: Vec<Vec<String>> = gpus
            .iter()
            .map(|g| {
                vec![
                    g.node.clone(),
                    g.gpu.to_string(),
                    g.model.clone(),
                    if g.allocated { "yes".into() } else { "-".into() },
                    if g.up { format!("{:.0}", g.power_watts) } else { "down".into() },
                    format!("{:.0}", g.power_limit_watts),
                    format!("{:.0}-{:.0}", g.power_limit_min_watts, g.power_limit_max_watts),
                    format!("{:.0}%", g.utilization_ratio * 100.0),
                    format!("{:.0}", g.temperature_celsius),
                    g.work.clone(),
                    format!("{:.0}", g.counted_watts),
                ]
            })
            .collect();
        table(
            &[
                "NODE",
                "GPU",
                "MODEL",
                "ALLOCATED",
                "POWER(W)",
                "CAP(W)",
                "RANGE(W)",
                "UTIL",
                "TEMP(C)",
                "WORK",
                "COUNTED(W)",
            ],
            &rows,
        )
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EventView {
    pub unix_ms: i64,
    pub kind: String,
    pub name: String,
    pub reason: String,
    pub message: String,
    /// Who asked for the change, "name (role)"; empty for the controller's own decisions.
    pub by: String,
}

impl From<pb::Event> for EventView {
    fn from(e: pb::Event) -> Self {
        EventView { unix_ms: e.unix_ms, kind: e.kind, name: e.name, reason: e.reason, message: e.message, by: e.by }
    }
}

impl EventView {
    pub fn line(&self) -> String {
        let secs = self.unix_ms / 1000;
        let (h, m, s) = ((secs / 3600) % 24, (secs / 60) % 60, secs % 60);
        format!(
            "{h:02}:{m:02}:{s:02}.{:03}Z  {:<4}  {:<20}  {:<12}  {}{}\n",
            self.unix_ms % 1000,
            self.kind,
            self.name,
            self.reason,
            self.message,
            if self.by.is_empty() { String::new() } else { format!(" — by {}", self.by) }
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_pad_columns_to_the_widest_cell() {
        let t = table(&["A", "LONG"], &[vec!["xyz".into(), "1".into()]]);
        assert_eq!(t, "A    LONG\nxyz  1\n");
    }
}
