//! A shard started inside its cgroup: the supervisor starts it through `watt-agent __shard-exec`,
//! which joins the group, takes the shard's user and execs the job's command — with the job's
//! environment, output and exit code as if started directly. These machines have no cgroup v2
//! memory controller (cgroup v1 or hybrid), so the group is a directory laid out as the kernel
//! lays one out: what is checked is what the agent writes there and that the shard runs whole.
#![allow(clippy::unwrap_used)]

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use watt_agent::supervisor::cgroup::{MemoryPolicy, ShardCgroups, ShardLimits};
use watt_agent::supervisor::{identity, log_file, logs_dir, LastExit, Launch, Report, Supervisor};
use watt_proto::v1 as pb;

#[derive(Debug, Default)]
struct Reports(Mutex<Vec<(pb::ShardState, String)>>);

impl watt_agent::progress::ProgressSink for Reports {
    fn progress(&self, _: &str, _: u32, _: u64, _: watt_agent::progress::WorkerProgress) {}
}

impl Report for Reports {
    fn report(&self, _: &str, _: u32, _: u64, state: pb::ShardState, message: String, _: LastExit) {
        self.0.lock().unwrap().push((state, message));
    }
}

impl Reports {
    async fn until(&self, state: pb::ShardState) -> String {
        for _ in 0..200 {
            if let Some((_, m)) = self.0.lock().unwrap().iter().rev().find(|(s, _)| *s == state) {
                return m.clone();
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("no {state:?} report; saw {:?}", self.0.lock().unwrap());
    }
}

fn order(job: &str, command: &[&str]) -> pb::ShardOrder {
    pb::ShardOrder {
        epoch: 3,
        job: job.into(),
        shard: 0,
        action: pb::ShardAction::Start as i32,
        world_size: 1,
        gpu_indices: vec![0, 1],
        master_addr: "127.0.0.1".into(),
        master_port: 29_500,
        command: command.iter().map(|s| s.to_string()).collect(),
        env: [("MY_VAR".to_string(), "mine".to_string())].into(),
        ..Default::default()
    }
}

/// The agent's group as the kernel shows it, set up for shards.
fn groups(root: &std::path::Path) -> (PathBuf, Arc<ShardCgroups>) {
    let own = root.join("cgroup/watt-agent.service");
    std::fs::create_dir_all(&own).unwrap();
    std::fs::write(own.join("cgroup.controllers"), "cpu io memory pids").unwrap();
    (own.clone(), Arc::new(ShardCgroups::set_up(&own).unwrap()))
}

#[tokio::test]
async fn a_shard_joins_its_group_with_its_limits_as_its_user_and_runs_whole() {
    let dir = tempfile::tempdir().unwrap();
    let (own, groups) = groups(dir.path());
    let limits =
        ShardLimits { memory: MemoryPolicy::GpuShare, pids: Some(512), node_gpus: 8, node_memory_bytes: 64 << 30 };
    let user = identity::resolve(None, false).unwrap();
    let state = dir.path().join("state");
    let supervisor = Arc::new(
        Supervisor::new(state.clone())
            .with_shard_user(user.clone())
            .with_cgroups(Some((groups, limits)))
            .with_agent_exe(env!("CARGO_BIN_EXE_watt-agent").into()),
    );
    let reports = Arc::new(Reports::default());
    let launch = |o| Launch { order: o, grace: Duration::from_secs(5), node_cpus: 4, simulated: false };
    supervisor
        .start(launch(order("fits", &["/bin/sh", "-c", "echo uid=$(id -u) MY_VAR=$MY_VAR; exit 0"])), reports.clone());
    reports.until(pb::ShardState::Succeeded).await;

    let group = own.join("shard.fits.0.3");
    // The shard's first process wrote itself into the group before the command ran.
    assert_eq!(std::fs::read_to_string(group.join("cgroup.procs")).unwrap(), "0");
    // 2 of 8 GPUs: a quarter of the node's 64 GiB; and the pids limit.
    assert_eq!(std::fs::read_to_string(group.join("memory.max")).unwrap(), (16u64 << 30).to_string());
    assert_eq!(std::fs::read_to_string(group.join("pids.max")).unwrap(), "512");
    assert_eq!(std::fs::read_to_string(group.join("memory.swap.max")).unwrap(), "0");
    assert_eq!(std::fs::read_to_string(own.join("cgroup.subtree_control")).unwrap(), "+memory +pids");
    let log = std::fs::read_to_string(log_file(&logs_dir(&state), "fits", 0)).unwrap();
    let uid = user.map_or(nix::unistd::Uid::effective().as_raw(), |u| u.uid);
    assert!(log.contains(&format!("uid={uid} MY_VAR=mine")), "{log}");

    // A command that seems there but cannot start — a link whose target is missing, which only
    // the shard resolves, in its own namespace — fails the shard like a shell would (127), and
    // says why in its log.
    let bad = dir.path().join("dangling");
    std::os::unix::fs::symlink("/no/such/program", &bad).unwrap();
    supervisor.start(launch(order("broken", &[bad.to_str().unwrap()])), reports.clone());
    let failed = reports.until(pb::ShardState::Failed).await;
    assert!(failed.contains("code 127"), "{failed}");
    let log = std::fs::read_to_string(log_file(&logs_dir(&state), "broken", 0)).unwrap();
    assert!(log.contains("cannot start"), "{log}");
}
