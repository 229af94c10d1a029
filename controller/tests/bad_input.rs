//! Bad input on every RPC, in job specs, and from agents: `InvalidArgument` naming the field, and
//! nothing changes — the job list is the same after every refusal.
#![allow(clippy::unwrap_used)]

use tonic::Code;
use watt_common::client::AuthedChannel;
use watt_proto::v1 as pb;
use watt_proto::v1::agent_service_client::AgentServiceClient;
use watt_proto::v1::control_service_client::ControlServiceClient;
use watt_proto::v1::submit_job_request::Source;
use watt_system_tests::*;

const GOOD: &str =
    "name: keep\npriority: 1\nshards: {min: 1, max: 1}\ngpus_per_shard: 2\ncommand: [python, train.py]\n";

type Client = ControlServiceClient<AuthedChannel>;

async fn client(url: &str) -> Client {
    let channel = credentials(Some(&TestPki::get().admin())).connect(url, |e| e).await.unwrap();
    ControlServiceClient::new(channel).max_encoding_message_size(64 << 20)
}

fn manifest(text: String) -> pb::SubmitJobRequest {
    pb::SubmitJobRequest { source: Some(Source::Manifest(text)) }
}

/// (name, sequence, priority) of every job.
async fn job_names(c: &mut Client) -> Vec<(String, u64, i64)> {
    let jobs = c.list_jobs(pb::ListJobsRequest {}).await.unwrap().into_inner().jobs;
    jobs.into_iter()
        .map(|j| {
            let spec = j.spec.unwrap();
            (spec.name, j.sequence, spec.priority)
        })
        .collect()
}

#[tokio::test]
async fn bad_requests_are_refused_by_field_and_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let controller = ControllerProc::start(&format!("file:{}", dir.path().join("w.redb").display()), 0, &[]);
    let _agent = agent(&controller.url, "only-node", 8);
    let mut c = client(&controller.url).await;
    wait_for(std::time::Duration::from_secs(20), "the node to register", || {
        let nodes = wattctl_json(&controller.url, &["nodes"]);
        (nodes.as_array().unwrap().len() == 1).then_some(())
    });
    c.submit_job(manifest(GOOD.into())).await.unwrap();
    let baseline = job_names(&mut c).await;

    let base =
        |extra: &str| format!("name: other\nshards: {{min: 1, max: 1}}\ngpus_per_shard: 1\ncommand: [x]\n{extra}");
    let cases: Vec<(String, &str)> = vec![
        ("shards: {min: 1, max: 1}\ngpus_per_shard: 1\ncommand: [x]\n".into(), "name is required"),
        ("name: other\ngpus_per_shard: 1\ncommand: [x]\n".into(), "shards is required"),
        ("name: other\nshards: {min: 1, max: 1}\ncommand: [x]\n".into(), "gpus_per_shard is required"),
        ("name: other\nshards: {min: 1, max: 1}\ngpus_per_shard: 1\n".into(), "command is required"),
        ("name: other\nshards: {min: -2, max: 1}\ngpus_per_shard: 1\ncommand: [x]\n".into(), "shards.min"),
        ("name: other\nshards: {min: 1, max: 1}\ngpus_per_shard: -1\ncommand: [x]\n".into(), "gpus_per_shard"),
        (
            "name: other\nshards: {min: 1, max: 1}\ngpus_per_shard: 16\ncommand: [x]\n".into(),
            "gpus_per_shard is 16 but the largest node has 8",
        ),
        (base("priority: -5000000\n"), "priority"),
        (base("flex: 0.9\n"), "flex"),
        (base("max_restarts: -3\n"), "max_restarts"),
        (base("env: {CUDA_VISIBLE_DEVICES: '0'}\n"), "env.CUDA_VISIBLE_DEVICES"),
        (base("gpu_type: h100\n"), "gpu_type is not a job spec field"),
        (base(&format!("# {}\n", "x".repeat(10 << 20))), "manifest is"),
        (GOOD.into(), "name \"keep\" is taken"),
        ("{not yaml: [".into(), "manifest is invalid"),
    ];
    for (text, want) in cases {
        let status = c.submit_job(manifest(text.clone())).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{want}: {status:?}");
        assert!(
            status.message().starts_with(want) || status.message().contains(want),
            "want {want:?}, got {:?}",
            status.message()
        );
    }

    // The structured form is validated the same way.
    let spec = pb::JobSpec {
        name: "other".into(),
        shards: Some(pb::ShardRange { min: 3, max: 2 }),
        gpus_per_shard: 1,
        command: vec!["x".into()],
        ..Default::default()
    };
    let status = c.submit_job(pb::SubmitJobRequest { source: Some(Source::Spec(spec)) }).await.unwrap_err();
    assert_eq!(
        (status.code(), status.message()),
        (Code::InvalidArgument, "shards.min must be ≥ 1 and ≤ shards.max (got 3)")
    );
    let status = c.submit_job(pb::SubmitJobRequest { source: None }).await.unwrap_err();
    assert!(status.code() == Code::InvalidArgument && status.message().starts_with("source"), "{status:?}");

    // Names on the other RPCs.
    for status in [
        c.get_job(pb::GetJobRequest { name: String::new() }).await.unwrap_err(),
        c.cancel_job(pb::CancelJobRequest { name: "Not_A_Name".into() }).await.unwrap_err(),
    ] {
        assert!(status.code() == Code::InvalidArgument && status.message().starts_with("name"), "{status:?}");
    }
    assert_eq!(c.get_job(pb::GetJobRequest { name: "absent".into() }).await.unwrap_err().code(), Code::NotFound);

    assert_eq!(job_names(&mut c).await, baseline, "no refused request changed the job list");
}

/// Open a session as node `n1` (or with no certificate) and send `first`; the status it ends with.
async fn open_session(url: &str, cert: Option<&CertFiles>, first: pb::AgentMessage) -> tonic::Status {
    let mut agent = AgentServiceClient::new(credentials(cert).connect(url, |e| e).await.unwrap());
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(first).await.unwrap();
    let result = agent.session(tokio_stream::wrappers::ReceiverStream::new(rx)).await;
    match result {
        Err(status) => status,
        Ok(response) => {
            let mut stream = response.into_inner();
            loop {
                match stream.message().await {
                    Err(status) => return status,
                    Ok(None) => panic!("session ended without an error"),
                    Ok(Some(_)) => {}
                }
            }
        }
    }
}

fn register(name: &str, gpus: Vec<pb::GpuInventory>) -> pb::AgentMessage {
    pb::AgentMessage {
        body: Some(pb::agent_message::Body::Register(pb::Register {
            node_name: name.into(),
            gpus,
            ..Default::default()
        })),
    }
}

fn gpu(index: u32, min: f64, max: f64) -> pb::GpuInventory {
    pb::GpuInventory {
        index,
        power_limit: Some(pb::PowerLimitRange { min_watts: min, max_watts: max, default_watts: max }),
        ..Default::default()
    }
}

#[tokio::test]
async fn bad_agent_messages_end_the_session_by_field_and_register_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let controller = ControllerProc::start(&format!("file:{}", dir.path().join("w.redb").display()), 0, &[]);
    let cases = vec![
        (register("bad name!", vec![]), "register.node_name"),
        (register("n1", vec![gpu(0, 200.0, 700.0), gpu(0, 200.0, 700.0)]), "register.gpus[1].index"),
        (register("n1", vec![gpu(0, 700.0, 200.0)]), "register.gpus[0].power_limit"),
        (
            register("n1", vec![pb::GpuInventory { index: 0, ..Default::default() }]),
            "register.gpus[0].power_limit is required",
        ),
        (
            {
                let mut m = register("n1", vec![gpu(0, 200.0, 700.0)]);
                if let Some(pb::agent_message::Body::Register(r)) = &mut m.body {
                    r.labels.insert("rack".into(), "not a value".into());
                }
                m
            },
            "register.labels",
        ),
        (
            pb::AgentMessage { body: Some(pb::agent_message::Body::Telemetry(pb::Telemetry::default())) },
            "body of the first message of a session must be register",
        ),
    ];
    let n1 = TestPki::get().client("n1", "node");
    for (first, want) in cases {
        let status = open_session(&controller.url, Some(&n1), first).await;
        assert_eq!(status.code(), Code::InvalidArgument, "{want}: {status:?}");
        assert!(status.message().starts_with(want), "want {want:?}, got {:?}", status.message());
    }
    // A good registration under another node's name, or with no credentials, or with a
    // person's certificate, is refused before anything of it is used.
    let hijack = open_session(&controller.url, Some(&n1), register("n2", vec![gpu(0, 200.0, 700.0)])).await;
    assert_eq!(hijack.code(), Code::PermissionDenied, "{hijack:?}");
    assert!(hijack.message().contains("may not register node \"n2\""), "{hijack:?}");
    let anonymous = open_session(&controller.url, None, register("n1", vec![gpu(0, 200.0, 700.0)])).await;
    assert_eq!(anonymous.code(), Code::Unauthenticated, "{anonymous:?}");
    let admin = open_session(&controller.url, Some(&TestPki::get().admin()), register("n1", vec![])).await;
    assert_eq!(admin.code(), Code::PermissionDenied, "{admin:?}");
    let nodes = wattctl_json(&controller.url, &["nodes"]);
    assert!(nodes.as_array().unwrap().is_empty(), "no bad registration was kept: {nodes}");
}

#[test]
fn wattctl_exit_codes_tell_usage_from_server_errors() {
    let dir = tempfile::tempdir().unwrap();
    let controller = ControllerProc::start(&format!("file:{}", dir.path().join("w.redb").display()), 0, &[]);
    let bad = submit(&controller.url, "name: x\nshards: {min: 0, max: 1}\ngpus_per_shard: 1\ncommand: [x]\n");
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert_eq!(bad.status.code(), Some(1), "{stderr}");
    assert_eq!(stderr.trim(), "wattctl: error: shards.min must be ≥ 1 and ≤ shards.max (got 0)");
    let missing = wattctl(&controller.url, &["submit", "-f", "/nonexistent/job.yaml"]);
    assert_eq!(missing.status.code(), Some(2));
    assert_eq!(wattctl(&controller.url, &["frobnicate"]).status.code(), Some(2));
    let unreachable = wattctl(&format!("http://127.0.0.1:{}", free_port()), &["jobs"]);
    assert_eq!(unreachable.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&unreachable.stderr).contains("cannot reach the controller"));
    let completions = wattctl(&controller.url, &["completions", "bash"]);
    assert!(completions.status.success() && String::from_utf8_lossy(&completions.stdout).contains("wattctl"));
}
