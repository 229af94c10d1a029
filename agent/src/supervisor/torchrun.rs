//! The environment a shard's process gets: what a `torchrun` worker expects (`RANK`,
//! `WORLD_SIZE`, `MASTER_ADDR`, …, `TORCHELASTIC_*`, `CUDA_VISIBLE_DEVICES`, `OMP_NUM_THREADS`),
//! plus Watt's own, over the job's `env`.

use std::path::Path;

use watt_proto::v1 as pb;

/// The torchrun contract, plus Watt's own variables, over the job's environment.
pub fn worker_env(o: &pb::ShardOrder, restarts: u32, checkpoints: &Path, node_cpus: usize) -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = o.env.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    let gpus: Vec<String> = o.gpu_indices.iter().map(u32::to_string).collect();
    let shards_here = 1; // one process per shard
    env.extend(
        [
            ("RANK", o.rank.to_string()),
            ("LOCAL_RANK", "0".into()),
            ("WORLD_SIZE", o.world_size.to_string()),
            ("LOCAL_WORLD_SIZE", shards_here.to_string()),
            ("GROUP_RANK", o.rank.to_string()),
            ("ROLE_RANK", o.rank.to_string()),
            ("ROLE_WORLD_SIZE", o.world_size.to_string()),
            ("MASTER_ADDR", o.master_addr.clone()),
            ("MASTER_PORT", o.master_port.to_string()),
            ("TORCHELASTIC_RESTART_COUNT", restarts.to_string()),
            ("TORCHELASTIC_MAX_RESTARTS", o.max_restarts.to_string()),
            // A new placement is a new run: ranks of the old one are refused at rendezvous.
            ("TORCHELASTIC_RUN_ID", format!("{}-{}", o.job, o.epoch)),
            ("CUDA_VISIBLE_DEVICES", gpus.join(",")),
            ("OMP_NUM_THREADS", (node_cpus / gpus.len().max(1)).max(1).to_string()),
            ("WATT_CHECKPOINT_DIR", checkpoints.display().to_string()),
            ("WATT_JOB", o.job.clone()),
            ("WATT_SHARD", format!("{}/{}", o.job, o.shard)),
            ("WATT_EPOCH", o.epoch.to_string()),
            // The run's secret: its ranks prove it to each other at the rendezvous.
            ("WATT_RUN_TOKEN", o.run_token.clone()),
        ]
        .map(|(k, v)| (k.to_owned(), v)),
    );
    env
}
