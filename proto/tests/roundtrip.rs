//! The generated messages encode and decode losslessly, and the oneof bodies survive the trip.
#![allow(clippy::unwrap_used)]

use prost::Message;
use watt_proto::v1::{agent_message, AgentMessage, GpuInventory, PowerLimitRange, Register};

#[test]
fn register_round_trips() {
    let sent = AgentMessage {
        body: Some(agent_message::Body::Register(Register {
            node_name: "gpu-node-17".into(),
            agent_version: "0.1.0".into(),
            boot_id: "b0".into(),
            gpus: vec![GpuInventory {
                index: 3,
                uuid: "GPU-0000".into(),
                model: "NVIDIA H100 80GB HBM3".into(),
                memory_total_bytes: 85_520_809_984,
                pci_bus_id: "00000000:19:00.0".into(),
                power_limit: Some(PowerLimitRange { min_watts: 200.0, max_watts: 700.0, default_watts: 700.0 }),
                current_limit_watts: 200.0,
                failsafe_watts: 200.0,
            }],
            non_gpu_power_watts: 1_800.0,
            shards: vec![],
            failsafe_after_ms: 10_000,
            http_port: 9400,
            enforce_mode: watt_proto::v1::EnforceMode::DryRun as i32,
            logs_port: 9402,
            logs_tls: true,
            labels: [("rack".to_string(), "r12".to_string())].into_iter().collect(),
            runtimes: vec!["pytorch-25.01".into()],
            shard_exec: watt_proto::v1::ShardExec::Host as i32,
        })),
    };
    let bytes = sent.encode_to_vec();
    let got = AgentMessage::decode(bytes.as_slice()).unwrap();
    assert_eq!(got, sent);
    let Some(agent_message::Body::Register(r)) = got.body else { panic!("body lost: {got:?}") };
    assert_eq!(r.gpus[0].power_limit.as_ref().unwrap().max_watts, 700.0);
}
