//! Two controllers on one real etcd, as the chart's replicas run: one leads, the other sends
//! clients to it, and when the leader is killed the follower takes over — the agents find it by
//! themselves, the running job is not started again, and the new leader's orders are obeyed
//! (ARCHITECTURE.md, invariant 9).
// Real processes on the real clock: std's Instant.
#![allow(clippy::unwrap_used, clippy::disallowed_types)]

use std::time::{Duration, Instant};

use watt_system_tests::*;

fn ready_nodes(url: &str) -> usize {
    wattctl_json(url, &["nodes"]).as_array().unwrap().iter().filter(|n| n["state"] == "ready").count()
}

fn metric(controller: &ControllerProc, name: &str) -> f64 {
    let text = controller.metrics();
    let line = text.lines().find(|l| l.split(' ').next() == Some(name)).unwrap_or_else(|| panic!("no {name}"));
    line.rsplit(' ').next().unwrap().parse().unwrap()
}

#[test]
fn two_controllers_elect_one_leader_and_the_follower_takes_over_when_it_is_killed() {
    let etcd = Etcd::start();
    let store = format!("etcd://{}", etcd.endpoint());
    let args = ["--leader-lease", "2s", "--node-lease", "10s", "--reconcile-interval", "200ms"];
    let mut first = ControllerProc::start(&store, 0, &args);
    assert!(first.leading, "the only controller leads");
    let mut second = ControllerProc::start(&store, 0, &args);
    assert!(!second.leading, "a second controller led while the first did");
    assert_eq!(metric(&second, "watt_controller_leader"), 0.0);
    let first_term = metric(&first, "watt_controller_term");
    assert!(first_term > 0.0);

    // A follower answers Watt's calls itself: Unavailable, naming the leader.
    let refused = list_jobs_directly(&second.url);
    assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");
    assert_eq!(watt_common::client::leader_hint(&refused).as_deref(), Some(first.url.as_str()));
    assert!(refused.message().contains("does not lead"), "{refused:?}");

    // wattctl and agents find the leader given both URLs, or only the follower's.
    assert!(wattctl(&second.url, &["jobs"]).status.success(), "wattctl did not follow the follower to the leader");
    let both = format!("{},{}", first.url, second.url);
    let agents: Vec<Proc> = vec![agent(&both, "n1", 4), agent(&second.url, "n2", 4)];
    wait_for(Duration::from_secs(30), "both nodes ready", || (ready_nodes(&both) == 2).then_some(()));
    set_grid(&both, "4kW", None);
    assert!(submit(&both, &job_manifest("steady", 1, 1, 1, 4)).status.success());
    let placed = wait_for(Duration::from_secs(30), "the job running", || {
        let job = jobs(&both)["steady"].clone();
        (job["state"] == "running").then_some(job)
    });

    // The follower keeps a warm copy of etcd, in sync: it is ready.
    let ready = http_get(second.metrics_port, "/readyz").unwrap_or_default();
    assert!(ready.starts_with("follower, in sync"), "{ready}");
    assert_eq!(http_get(second.metrics_port, "/livez").as_deref(), Some("alive\n"));

    // The leader dies without a word: its lease ends, the follower leads within it and more,
    // loading the term from its warm copy.
    let killed = Instant::now();
    first.proc.kill9();
    let loaded = second.proc.wait_line("Loaded the term's state.", Duration::from_secs(20));
    assert!(loaded.contains("the warm copy"), "{loaded}");
    second.wait_leading(Duration::from_secs(20));
    let failover = killed.elapsed();
    assert!(failover < Duration::from_secs(8), "the follower took {failover:?} to lead after a 2 s lease");
    let second_term = metric(&second, "watt_controller_term");
    assert!(second_term > first_term, "terms grow: {first_term} then {second_term}");
    for agent in &agents {
        agent.wait_line(&format!("controller={}", second.url), Duration::from_secs(20));
    }
    wait_for(Duration::from_secs(30), "both nodes back", || (ready_nodes(&second.url) == 2).then_some(()));

    // Nothing was lost and nothing started twice: the same job, same run, same node.
    let after = jobs(&both)["steady"].clone();
    assert_eq!(after["state"], "running", "{after}");
    assert_eq!(after["epoch"], placed["epoch"], "the job was started again: {placed} then {after}");
    assert_eq!(after["placement"], placed["placement"]);

    // The new leader's cap orders are obeyed: a cut is acknowledged by every node.
    let cut = set_grid(&both, "2kW", None);
    assert_eq!(cut["sources"][0]["available_watts"], 2000.0, "{cut}");
    wait_for(Duration::from_secs(20), "every node to acknowledge the cut", || {
        let status = wattctl_json(&both, &["power", "status"]);
        let counted = status["counted_watts"].as_f64().unwrap();
        let within = counted > 0.0 && counted <= status["limit_watts"].as_f64().unwrap();
        (status["unacknowledged_nodes"] == 0 && within).then_some(())
    });

    // The killed one comes back as a follower of the new leader.
    let again = ControllerProc::start(&store, first.port, &args);
    assert!(!again.leading, "a restarted controller took the leadership from a live leader");
    let refused = list_jobs_directly(&again.url);
    assert_eq!(watt_common::client::leader_hint(&refused).as_deref(), Some(second.url.as_str()));
}

/// `ListJobs` as an admin straight to `url`, without looking for the leader first: its refusal.
fn list_jobs_directly(url: &str) -> tonic::Status {
    use watt_proto::v1::control_service_client::ControlServiceClient;
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    runtime.block_on(async {
        let channel = credentials(Some(&TestPki::get().admin())).connect(url, |e| e).await.unwrap();
        let answer = ControlServiceClient::new(channel).list_jobs(watt_proto::v1::ListJobsRequest {}).await;
        answer.expect_err("a follower answered a call")
    })
}

/// Invariant 10: a cut while etcd hangs (SIGSTOP) goes out at once — its caps acknowledged
/// before the answer, which says the store does not hold it yet — and is stored once etcd is
/// back: a controller started afterwards loads it.
#[test]
fn a_cut_while_etcd_hangs_is_applied_at_once_and_stored_after() {
    let etcd = Etcd::start();
    let store = format!("etcd://{}", etcd.endpoint());
    // A lease long enough to lead through the hang (it steps down 2/3 of it after etcd stops).
    let args = ["--leader-lease", "12s", "--reconcile-interval", "200ms"];
    let controller = ControllerProc::start(&store, 0, &args);
    let url = controller.url.clone();
    let _agents: Vec<Proc> = ["h1", "h2"].iter().map(|n| agent(&url, n, 4)).collect();
    wait_for(Duration::from_secs(30), "both nodes ready", || (ready_nodes(&url) == 2).then_some(()));
    set_grid(&url, "4kW", None);
    assert!(submit(&url, &job_manifest("busy", 1, 2, 2, 4)).status.success());
    wait_for(Duration::from_secs(30), "the job running, its caps acknowledged", || {
        let status = wattctl_json(&url, &["power", "status"]);
        (jobs(&url)["busy"]["state"] == "running" && status["unacknowledged_nodes"] == 0).then_some(())
    });

    let acks_before = (
        metric(&controller, "watt_power_event_to_ack_seconds_sum"),
        metric(&controller, "watt_power_event_to_ack_seconds_count"),
    );
    etcd.pause();
    let asked = Instant::now();
    let cut = set_grid(&url, "2kW", None);
    let answered = asked.elapsed();
    eprintln!("the cut answered in {answered:?} with etcd hung");
    let status = wattctl_json(&url, &["power", "status"]);
    let acked_in = metric(&controller, "watt_power_event_to_ack_seconds_sum") - acks_before.0;
    let events = metric(&controller, "watt_power_event_to_ack_seconds_count") - acks_before.1;
    etcd.resume();
    assert_eq!(events, 1.0, "one power event, its caps acknowledged");
    assert!(acked_in < 1.0, "the cut's caps took {acked_in} s to be acknowledged with etcd hung");
    assert_eq!(cut["sources"][0]["available_watts"], 2000.0, "{cut}");
    assert_eq!(cut["change_unstored"], true, "the store hung, yet the answer says it holds the cut: {cut}");
    // The answer waits at most a second for the store, after the cut's orders went out.
    assert!(answered < Duration::from_secs(3), "the cut took {answered:?} with etcd hung");
    let counted = status["counted_watts"].as_f64().unwrap();
    assert!(
        status["unacknowledged_nodes"] == 0 && counted <= status["limit_watts"].as_f64().unwrap(),
        "every cap acknowledged under the new limit by the time it answered: {status}"
    );

    wait_for(Duration::from_secs(20), "the cut stored once etcd is back", || {
        (wattctl_json(&url, &["power", "status"])["change_unstored"] == false).then_some(())
    });
    // A controller that starts afterwards (this one resigns on SIGTERM) loads the cut.
    drop(controller);
    let again = ControllerProc::start(&store, 0, &args);
    assert!(again.leading);
    wait_for(Duration::from_secs(10), "the restarted controller to show the stored cut", || {
        let status = wattctl_json(&again.url, &["power", "status"]);
        (status["sources"][0]["available_watts"] == 2000.0).then_some(())
    });
}

/// Invariant 9's write-ahead: a leader records each node's cap ceiling before it raises a cap
/// above it, so a leader that takes over counts a node that has not registered with it yet (its
/// agent hung) at the caps the dead leader may have raised it to — until the node's failsafe
/// deadline, then at its failsafe caps — and not at nothing.
#[test]
fn a_new_leader_counts_a_node_it_has_not_heard_from_at_its_recorded_ceiling() {
    let etcd = Etcd::start();
    let store = format!("etcd://{}", etcd.endpoint());
    let args = ["--leader-lease", "2s", "--node-lease", "30s", "--reconcile-interval", "200ms"];
    let mut first = ControllerProc::start(&store, 0, &args);
    let mut second = ControllerProc::start(&store, 0, &args);
    let both = format!("{},{}", first.url, second.url);
    // The job lands on the only node there is; a second, idle node comes after.
    let quiet = agent_with(&both, "quiet", 4, &["--failsafe-after", "8s"]);
    wait_for(Duration::from_secs(30), "the node ready", || (ready_nodes(&both) == 1).then_some(()));
    set_grid(&both, "20kW", None);
    assert!(submit(&both, &job_manifest("hot", 1, 1, 1, 4)).status.success());
    wait_for(Duration::from_secs(30), "the job running at full caps, acknowledged", || {
        let status = wattctl_json(&both, &["power", "status"]);
        let hot = status["jobs"].as_array().and_then(|j| j.first()).map(|j| j["cap_watts"].clone());
        (hot == Some(700.0.into())
            && status["unacknowledged_nodes"] == 0
            && status["counted_watts"].as_f64() >= Some(2800.0))
        .then_some(())
    });
    let _steady = agent(&both, "steady", 4);
    wait_for(Duration::from_secs(30), "both nodes ready", || (ready_nodes(&both) == 2).then_some(()));

    // The leader dies and the node with the job hangs: it cannot tell the new leader its caps.
    let hung = quiet.pid().to_string();
    assert!(std::process::Command::new("kill").args(["-STOP", &hung]).status().unwrap().success());
    first.proc.kill9();
    second.wait_leading(Duration::from_secs(20));
    let took_over = Instant::now();
    let status = wait_for(Duration::from_secs(5), "the new leader's first power status", || {
        let status = wattctl_json(&second.url, &["power", "status"]);
        (status["unix_ms"].as_i64() > Some(0)).then_some(status)
    });
    let counted = status["counted_watts"].as_f64().unwrap();
    assert!(counted >= 2800.0, "the hung node's 4 GPUs at 700 W must count: {status}");
    // Past its failsafe deadline it counts at its failsafe caps (the minimum, 200 W).
    wait_for(Duration::from_secs(20), "the hung node counted at its failsafe caps", || {
        let status = wattctl_json(&second.url, &["power", "status"]);
        let counted = status["counted_watts"].as_f64().unwrap();
        (counted < 1500.0 && status["failsafe_nodes"] == 1).then_some(())
    });
    assert!(
        took_over.elapsed() >= Duration::from_secs(6),
        "counted down before its deadline: {:?}",
        took_over.elapsed()
    );
    assert!(std::process::Command::new("kill").args(["-CONT", &hung]).status().unwrap().success());
    wait_for(Duration::from_secs(30), "the node back with the new leader", || {
        (ready_nodes(&second.url) == 2).then_some(())
    });
}

/// Invariant 11: a cut the caretaker applied but could not store outlives its term. etcd hangs
/// (SIGSTOP) past the leader's lease: the leader caretakes, takes a cut, then learns its lease
/// ended and hands the cut over; the next leader (here the same process, in a new term) applies
/// it and stores it, so the budget never goes back up.
#[test]
fn a_cut_the_caretaker_could_not_store_is_carried_into_the_next_term() {
    let etcd = Etcd::start();
    let store = format!("etcd://{}", etcd.endpoint());
    let args = ["--leader-lease", "2s", "--reconcile-interval", "200ms"];
    let controller = ControllerProc::start(&store, 0, &args);
    let url = controller.url.clone();
    let _agents: Vec<Proc> = ["c1", "c2"].iter().map(|n| agent(&url, n, 4)).collect();
    wait_for(Duration::from_secs(30), "both nodes ready", || (ready_nodes(&url) == 2).then_some(()));
    set_grid(&url, "4kW", None);
    let term = metric(&controller, "watt_controller_term");

    etcd.pause();
    wait_for(Duration::from_secs(5), "the leader to caretake", || {
        (metric(&controller, "watt_controller_caretaker") == 1.0).then_some(())
    });
    let cut = set_grid(&url, "2kW", None);
    assert_eq!(cut["change_unstored"], true, "{cut}");
    assert_eq!(cut["unacknowledged_nodes"], 0, "{cut}");
    // Past the lease: etcd ends it when it runs again, so the caretaker loses its term.
    idle(Duration::from_secs(4));
    etcd.resume();
    wait_for(Duration::from_secs(30), "a leader in a new term", || {
        let leading = metric(&controller, "watt_controller_leader") == 1.0;
        (leading && metric(&controller, "watt_controller_term") > term).then_some(())
    });
    wait_for(Duration::from_secs(20), "the carried cut in force and stored", || {
        let status = wattctl_json(&url, &["power", "status"]);
        let holds = status["sources"][0]["available_watts"] == 2000.0 && status["change_unstored"] == false;
        holds.then_some(())
    });
    let events = wattctl(&url, &["events"]);
    let events = String::from_utf8_lossy(&events.stdout);
    assert!(events.contains("carried-cut-applied"), "{events}");
}
