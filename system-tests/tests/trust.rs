//! Trust end to end: who may call what, and which agent may be which node. A controller serving
//! TLS with the tests' authority, agents presenting node certificates (or bootstrapping one),
//! and `wattctl` with people's certificates and tokens — each refusal with the code and the words
//! an operator needs.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use watt_common::auth::{token_digest, Role};
use watt_system_tests::*;

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn store(dir: &tempfile::TempDir) -> String {
    format!("file:{}", dir.path().join("w.redb").display())
}

#[test]
fn each_role_does_its_job_and_nothing_more() {
    let dir = tempfile::tempdir().unwrap();
    let viewer_token = watt_common::auth::new_token();
    let tokens = dir.path().join("tokens");
    std::fs::write(&tokens, format!("{},tess,{}\n", token_digest(&viewer_token), Role::Viewer)).unwrap();
    let controller = ControllerProc::start(&store(&dir), 0, &["--token-file", tokens.to_str().unwrap()]);
    let _agent = agent(&controller.url, "node-1", 8);
    let url = &controller.url;
    let pki = TestPki::get();
    let (viewer, submitter, operator) =
        (pki.client("vic", "viewer"), pki.client("sam", "submitter"), pki.client("pat", "power-operator"));
    let job = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(job.path(), job_manifest("mine", 1, 1, 1, 1)).unwrap();
    let job = job.path().to_str().unwrap();

    // No credentials at all: refused, saying what is missing.
    let anonymous = wattctl_as(url, None, &["jobs"]);
    assert_eq!(anonymous.status.code(), Some(1), "{}", stderr(&anonymous));
    assert!(stderr(&anonymous).contains("no credentials"), "{}", stderr(&anonymous));

    // A viewer reads, and may not submit or touch power.
    assert!(wattctl_as(url, Some(&viewer), &["jobs"]).status.success());
    let submit = wattctl_as(url, Some(&viewer), &["submit", "-f", job]);
    assert_eq!(submit.status.code(), Some(1));
    assert!(
        stderr(&submit).contains("vic (viewer) may not call /watt.v1.ControlService/SubmitJob"),
        "{}",
        stderr(&submit)
    );
    let cut = wattctl_as(url, Some(&viewer), &["power", "set-source", "grid", "--kind", "grid", "--available", "0"]);
    assert!(stderr(&cut).contains("needs the power-operator role"), "{}", stderr(&cut));

    // A submitter submits and may not touch power; a power operator the other way round.
    assert!(wattctl_as(url, Some(&submitter), &["submit", "-f", job]).status.success());
    let cut = wattctl_as(url, Some(&submitter), &["power", "set-source", "grid", "--kind", "grid", "--available", "0"]);
    assert_eq!(cut.status.code(), Some(1));
    assert!(stderr(&cut).contains("sam (submitter) may not call"), "{}", stderr(&cut));
    let set =
        wattctl_as(url, Some(&operator), &["power", "set-source", "grid", "--kind", "grid", "--available", "50kW"]);
    assert!(set.status.success(), "{}", stderr(&set));
    let cancel = wattctl_as(url, Some(&operator), &["cancel", "mine"]);
    assert!(stderr(&cancel).contains("needs the submitter role"), "{}", stderr(&cancel));
    // A submitter cancels its own jobs only; an admin anyone's.
    let other = pki.client("sue", "submitter");
    let cancel = wattctl_as(url, Some(&other), &["cancel", "mine"]);
    assert_eq!(cancel.status.code(), Some(1));
    assert!(stderr(&cancel).contains("sue (submitter) may cancel only its own jobs"), "{}", stderr(&cancel));
    assert_eq!(jobs(url)["mine"]["submitted_by"], "sam");

    // A node's certificate is for its session only.
    let node = pki.client("node-1", "node");
    assert!(stderr(&wattctl_as(url, Some(&node), &["jobs"])).contains("node-1 (node) may not call"));

    // A bearer token from the token file, and one that is not in it.
    let mut with_token = std::process::Command::new(bin("wattctl"));
    with_token.args(["--controller", url, "--ca"]).arg(pki.ca()).args(["--token", &viewer_token, "jobs"]);
    let out = with_token.output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let mut forged = std::process::Command::new(bin("wattctl"));
    forged.args(["--controller", url, "--ca"]).arg(pki.ca()).args(["--token", "watt_forged", "jobs"]);
    let out = forged.output().unwrap();
    assert!(stderr(&out).contains("not in the controller's token file"), "{}", stderr(&out));

    // Refusals are counted by code.
    let metrics = controller.metrics();
    for code in ["unauthenticated", "permission_denied"] {
        let counted = metrics
            .lines()
            .find(|l| l.starts_with(&format!("watt_controller_refused_calls_total{{code=\"{code}\"}}")))
            .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .unwrap_or(0.0);
        assert!(counted >= 1.0, "{code}: {metrics}");
    }
    // Only the submitter's job exists, still pending or running: no refused call changed anything.
    let listed = jobs(url);
    assert_eq!(listed.keys().collect::<Vec<_>>(), vec!["mine"]);
    assert_ne!(listed["mine"]["state"], "cancelled");
    assert!(wattctl_as(url, Some(&submitter), &["cancel", "mine"]).status.success());

    // The audit trail: every change names who made it; the controller's own decisions name no one.
    // `-o json events` prints one document per event, a line each.
    let out = wattctl(url, &["-o", "json", "events"]);
    let events: Vec<serde_json::Value> =
        String::from_utf8_lossy(&out.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let by = |reason: &str| -> Vec<String> {
        events.iter().filter(|e| e["reason"] == reason).map(|e| e["by"].as_str().unwrap().to_string()).collect()
    };
    assert_eq!(by("submitted"), ["sam (submitter)"]);
    assert_eq!(by("source-set"), ["pat (power-operator)"]);
    assert_eq!(by("cancelled"), ["sam (submitter)"]);
    assert_eq!(by("registered"), [""]);
    let text = String::from_utf8_lossy(&wattctl(url, &["events"]).stdout).into_owned();
    assert!(text.contains("— by pat (power-operator)"), "{text}");
}

#[test]
fn an_agent_with_another_nodes_certificate_is_refused_and_gets_no_shard() {
    let dir = tempfile::tempdir().unwrap();
    let (controller, _agents) = local_cluster(dir.path(), 2, 8, &[]);
    let url = &controller.url;
    let secret_job = format!(
        "name: secret\npriority: 1\nshards: {{min: 1, max: 1}}\ngpus_per_shard: 8\nenv: {{API_KEY: hunter2}}\ncommand: {IDLE_COMMAND}\n"
    );
    assert!(submit(url, &secret_job).status.success());
    let placed = wait_for(Duration::from_secs(20), "the job to run", || {
        let job = jobs(url).remove("secret")?;
        (job["state"] == "running").then_some(job)
    });
    let victim = placed["placement"][0]["node"].as_str().unwrap().to_string();
    let thief_cert = TestPki::get().client("node-thief", "node");
    // The thief holds a real node certificate — for another name — and claims the victim's.
    let thief = agent_with(
        url,
        &victim,
        8,
        &[
            "--ca",
            TestPki::get().ca().to_str().unwrap(),
            "--tls-cert",
            thief_cert.cert.to_str().unwrap(),
            "--tls-key",
            thief_cert.key.to_str().unwrap(),
            "--state-dir",
            dir.path().join("thief").to_str().unwrap(),
        ],
    );
    let refused = thief.wait_line("session failed", Duration::from_secs(20));
    assert!(refused.contains("may not register node"), "{refused}");
    std::thread::park_timeout(Duration::from_secs(2));
    // The victim keeps its session and its shard; the thief ran nothing.
    let nodes = wattctl_json(url, &["nodes"]);
    let victim_row = nodes.as_array().unwrap().iter().find(|n| n["name"] == victim.as_str()).unwrap();
    assert_eq!(victim_row["state"], "ready", "{nodes}");
    let job = jobs(url).remove("secret").unwrap();
    assert_eq!((job["state"].as_str(), job["placement"][0]["node"].as_str()), (Some("running"), Some(victim.as_str())));
    assert!(!dir.path().join("thief").join("jobs").exists(), "the thief's state directory holds no job");
    let events = wattctl(url, &["events"]);
    assert!(!String::from_utf8_lossy(&events.stdout).contains("node-thief"));
}

#[test]
fn a_node_bootstraps_its_certificate_once_a_second_claim_is_refused_and_an_admin_reset_lets_it_again() {
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::get();
    let bootstrap_token = watt_common::auth::new_token();
    let tokens = dir.path().join("tokens");
    std::fs::write(&tokens, format!("{},bootstrap,bootstrap\n", token_digest(&bootstrap_token))).unwrap();
    let token_file = dir.path().join("bootstrap-token");
    std::fs::write(&token_file, &bootstrap_token).unwrap();
    let controller = ControllerProc::start(
        &store(&dir),
        0,
        &["--token-file", tokens.to_str().unwrap(), "--client-ca-key", pki.ca_key().to_str().unwrap()],
    );
    let url = &controller.url;
    let bootstrapping = |state: &str| {
        agent_with(
            url,
            "fresh-node",
            4,
            &[
                "--ca",
                pki.ca().to_str().unwrap(),
                "--bootstrap-token-file",
                token_file.to_str().unwrap(),
                "--state-dir",
                dir.path().join(state).to_str().unwrap(),
            ],
        )
    };
    let mut first = bootstrapping("first");
    first.wait_line("Registered with the controller.", Duration::from_secs(20));
    let key = dir.path().join("first/pki/node-key.pem");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(&key).unwrap().permissions().mode() & 0o777, 0o600);

    // Another holder of the bootstrap token cannot get the same name.
    let second = bootstrapping("second");
    let refused = second.wait_line("session failed", Duration::from_secs(20));
    assert!(refused.contains("already has a certificate"), "{refused}");
    assert!(!dir.path().join("second/pki/node.pem").exists());
    drop(second);

    // The first agent restarts: it keeps its certificate and needs no new one.
    first.kill9();
    let restarted = bootstrapping("first");
    restarted.wait_line("Registered with the controller.", Duration::from_secs(30));
    let events = String::from_utf8_lossy(&wattctl(url, &["events"]).stdout).into_owned();
    assert_eq!(events.matches("certificate-issued").count(), 1, "{events}");

    // The machine is re-imaged (or stolen): only an admin resets the node's identity.
    let viewer = wattctl_as(url, Some(&pki.client("vic", "viewer")), &["reset-identity", "fresh-node"]);
    assert_eq!(viewer.status.code(), Some(1));
    assert!(stderr(&viewer).contains("ResetNodeIdentity: it needs the admin role"), "{}", stderr(&viewer));
    let reset = wattctl(url, &["reset-identity", "fresh-node"]);
    assert!(reset.status.success(), "{}", stderr(&reset));
    // The old certificate's session ends and it opens no other.
    let ended = restarted.wait_line("was reset by admin", Duration::from_secs(20));
    assert!(ended.contains("session failed"), "{ended}");
    let again = restarted.wait_line("was reset by an admin: its agent must bootstrap again", Duration::from_secs(20));
    assert!(again.contains("session failed"), "{again}");
    drop(restarted);
    // The re-imaged machine bootstraps the name again, once, with a key of its own.
    let reimaged = bootstrapping("reimaged");
    reimaged.wait_line("Registered with the controller.", Duration::from_secs(30));
    let events = String::from_utf8_lossy(&wattctl(url, &["events"]).stdout).into_owned();
    assert!(events.contains("identity-reset") && events.contains("admin (admin)"), "{events}");
    assert_eq!(events.matches("certificate-issued").count(), 2, "{events}");
}

#[test]
fn shards_run_unprivileged_and_their_logs_are_read_with_a_viewers_grant_over_https() {
    let dir = tempfile::tempdir().unwrap();
    let (controller, agents) = local_cluster(dir.path(), 1, 8, &[]);
    let url = &controller.url;
    let job = "name: whoami\npriority: 1\nshards: {min: 1, max: 1}\ngpus_per_shard: 1\n\
               command: [/bin/sh, -c, 'echo uid=$(id -u) gid=$(id -g) groups=$(id -G) token=${#WATT_RUN_TOKEN}; grep NoNewPrivs /proc/self/status; exec sleep 3600']\n";
    assert!(submit(url, job).status.success());
    let log = wait_for(Duration::from_secs(20), "the shard to say who it is", || {
        let out = wattctl(url, &["logs", "whoami"]);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        text.contains("NoNewPrivs").then_some(text)
    });
    // A root agent runs jobs as nobody, with none of root's groups; a non-root agent as itself.
    let agent_uid = nix::unistd::Uid::effective().as_raw();
    let want =
        if agent_uid == 0 { "uid=65534 gid=65534 groups=65534".to_string() } else { format!("uid={agent_uid} ") };
    assert!(log.contains(&want), "want {want:?} in {log}");
    assert!(log.contains("NoNewPrivs:\t1"), "{log}");
    // Its rendezvous secret came with it (64 hex digits).
    assert!(log.contains("token=64"), "{log}");

    // The log is read with a grant for a viewer, from the agent's HTTPS port; without a role
    // there is no grant, and in plain text there is no log.
    let pki = TestPki::get();
    let viewer = wattctl_as(url, Some(&pki.client("vic", "viewer")), &["logs", "whoami"]);
    assert!(String::from_utf8_lossy(&viewer.stdout).contains("NoNewPrivs"), "{}", stderr(&viewer));
    let served = agents[0].wait_line("by=vic (viewer)", Duration::from_secs(5));
    assert!(served.contains("Serving a shard's log."), "the agent logs who read what: {served}");
    let node_role = wattctl_as(url, Some(&pki.client("node-9", "node")), &["logs", "whoami"]);
    assert_eq!(node_role.status.code(), Some(1));
    assert!(stderr(&node_role).contains("GrantLogs: it needs the viewer role"), "{}", stderr(&node_role));
    let anonymous = wattctl_as(url, None, &["logs", "whoami"]);
    assert_eq!(anonymous.status.code(), Some(1), "{}", stderr(&anonymous));
    let nodes = wattctl_json(url, &["nodes"]);
    let logs_url = nodes[0]["logs_url"].as_str().unwrap().to_string();
    assert!(logs_url.starts_with("https://127.0.0.1:"), "{nodes}");
    let mut plain = std::net::TcpStream::connect(logs_url.trim_start_matches("https://")).unwrap();
    plain.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    use std::io::{Read, Write};
    plain.write_all(b"GET /logs/whoami/0 HTTP/1.0\r\n\r\n").unwrap();
    let mut answer = Vec::new();
    let _ = plain.read_to_end(&mut answer);
    assert!(!String::from_utf8_lossy(&answer).contains("NoNewPrivs"), "plain text got the log");
}

#[test]
fn no_client_can_fill_the_store_and_ended_jobs_go_after_their_retention() {
    let dir = tempfile::tempdir().unwrap();
    let controller = ControllerProc::start(
        &store(&dir),
        0,
        &["--max-jobs-per-principal", "2", "--max-jobs", "4", "--keep-ended", "2s", "--keep-ended-jobs", "4"],
    );
    let url = &controller.url;
    let pki = TestPki::get();
    let (sam, sue) = (pki.client("sam", "submitter"), pki.client("sue", "submitter"));
    let submit_as = |who: &CertFiles, name: &str| {
        let file = dir.path().join(format!("{name}.yaml"));
        std::fs::write(&file, job_manifest(name, 1, 1, 1, 1)).unwrap();
        wattctl_as(url, Some(who), &["submit", "-f", file.to_str().unwrap()])
    };
    assert!(submit_as(&sam, "a").status.success());
    assert!(submit_as(&sam, "b").status.success());
    // A third job not ended: over sam's limit, and said so; sue is not held back by sam.
    let third = submit_as(&sam, "c");
    assert_eq!(third.status.code(), Some(1));
    assert!(
        stderr(&third).contains("sam (submitter) has 2 jobs not ended")
            && stderr(&third).contains("--max-jobs-per-principal"),
        "{}",
        stderr(&third)
    );
    assert!(submit_as(&sue, "d").status.success());
    assert!(submit_as(&sue, "e").status.success());
    // Four stored in all: the controller's own limit.
    assert!(wattctl_as(url, Some(&sam), &["cancel", "a"]).status.success());
    let full = submit_as(&sam, "f");
    assert!(stderr(&full).contains("holds 4 jobs") && stderr(&full).contains("--max-jobs"), "{}", stderr(&full));
    // The cancelled job ends, is kept 2 s, then removed: room again.
    wait_for(Duration::from_secs(15), "the ended job to be removed", || (!jobs(url).contains_key("a")).then_some(()));
    assert!(jobs(url).contains_key("b"), "jobs not ended stay");
    assert!(submit_as(&sam, "f").status.success());
    let events = String::from_utf8_lossy(&wattctl(url, &["events"]).stdout).into_owned();
    assert!(events.contains("jobs-removed"), "{events}");
}

/// The controller's `/healthz`: status code and body.
fn healthz(controller: &ControllerProc) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", controller.metrics_port)).unwrap();
    s.write_all(b"GET /healthz HTTP/1.0\r\n\r\n").unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let code = text.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    (code, text.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default())
}

#[test]
fn a_store_that_cannot_be_written_shows_in_healthz_and_clears_without_a_restart() {
    let mut etcd = Etcd::start();
    // A lease longer than the outage: this test is about the store's health, not the election
    // (a leader cut off from etcd for longer steps down: tests/leadership.rs).
    let controller = ControllerProc::start(&format!("etcd://{}", etcd.endpoint()), 0, &["--leader-lease", "30s"]);
    let url = &controller.url;
    assert_eq!(healthz(&controller).0, 200);
    etcd.kill();
    // A write while the store is gone fails, and says so; /healthz and the metrics say why.
    let refused = submit(url, &job_manifest("during-outage", 1, 1, 1, 1));
    assert!(!refused.status.success());
    let (code, body) = healthz(&controller);
    assert_eq!(code, 503, "{body}");
    assert!(body.starts_with("store: "), "{body}");
    assert!(controller.metrics().lines().any(|l| l == "watt_store_up 0"));
    // The store is back: the next write succeeds and clears it, with the same controller.
    etcd.restart();
    wait_for(Duration::from_secs(30), "a write to succeed again", || {
        submit(url, &job_manifest("after-outage", 1, 1, 1, 1)).status.success().then_some(())
    });
    let (code, body) = healthz(&controller);
    assert_eq!(code, 200, "{body}");
    assert!(body.starts_with("ok\nleader, term "), "{body}");
    let metrics = controller.metrics();
    assert!(metrics.lines().any(|l| l == "watt_store_up 1"), "{metrics}");
    assert!(metrics.lines().any(|l| l.starts_with("watt_store_errors_total ")), "{metrics}");
}

/// The embedded store on a disk filled to the brim: writes fail and say so (`/healthz`, the
/// metrics), the controller keeps running; once the disk has room again the store opens its file
/// afresh and writes succeed, with no restart and no job lost.
#[test]
fn the_embedded_store_on_a_full_disk_says_so_and_heals_when_there_is_room_again() {
    let dir = tempfile::tempdir().unwrap();
    let disk = Tmpfs::mount(dir.path(), "8m");
    let controller = ControllerProc::start(&format!("file:{}", dir.path().join("w.redb").display()), 0, &[]);
    let url = &controller.url;
    for i in 0..3 {
        assert!(submit(url, &job_manifest(&format!("before-{i}"), 1, 1, 1, 1)).status.success());
    }
    disk.fill("filler");
    // redb may still have room inside its file for a few commits; the disk refuses the next.
    let mut stored = Vec::new();
    let refused = (0..200).find(|i| {
        let name = format!("during-{i}");
        let ok = submit(url, &job_manifest(&name, 1, 1, 1, 1)).status.success();
        if ok {
            stored.push(name);
        }
        !ok
    });
    assert!(refused.is_some(), "200 submits fit on a full disk");
    let (code, body) = healthz(&controller);
    assert_eq!(code, 503, "{body}");
    assert!(body.starts_with("store: "), "{body}");
    assert!(controller.metrics().lines().any(|l| l == "watt_store_up 0"));

    std::fs::remove_file(dir.path().join("filler")).unwrap();
    wait_for(Duration::from_secs(20), "a write to succeed again", || {
        submit(url, &job_manifest("after", 1, 1, 1, 1)).status.success().then_some(())
    });
    let (code, body) = healthz(&controller);
    assert_eq!(code, 200, "{body}");
    let listed = jobs(url);
    for name in (0..3).map(|i| format!("before-{i}")).chain(stored).chain(["after".to_string()]) {
        assert!(listed.contains_key(&name), "{name} lost: {:?}", listed.keys());
    }
}

#[test]
fn the_controller_reaches_an_etcd_that_takes_only_client_certificates() {
    let etcd = Etcd::start_tls();
    let pki = TestPki::get();
    let client = pki.client("watt-controller", "admin");
    let store = format!("etcd://{}", etcd.endpoint());
    let ca = pki.ca();
    let tls = [
        "--etcd-ca",
        ca.to_str().unwrap(),
        "--etcd-cert",
        client.cert.to_str().unwrap(),
        "--etcd-key",
        client.key.to_str().unwrap(),
    ];
    let first = ControllerProc::start(&store, 0, &tls);
    assert!(submit(&first.url, &job_manifest("kept", 1, 1, 1, 1)).status.success());
    drop(first);
    // Its jobs are in that etcd: another controller with the same credentials reads them back.
    let again = ControllerProc::start(&store, 0, &tls);
    assert!(jobs(&again.url).contains_key("kept"));
    drop(again);
    // Without a client certificate etcd refuses the controller, which says so and exits.
    let mut cmd = std::process::Command::new(bin("watt-controller"));
    cmd.args(["--store", &store, "--etcd-ca", ca.to_str().unwrap(), "--token-file", "/dev/null"]);
    let out = cmd.output().unwrap();
    let said = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{said}");
    assert!(said.contains("store unavailable"), "{said}");
}

/// The controller's certificate from another authority than the one that signs node
/// certificates (as under cert-manager): agents and people trust that one for the controller,
/// logs are still read from agents over HTTPS checked against the node CA the grant carries,
/// and a replaced certificate serves new connections without a restart or a session lost.
#[test]
fn a_serving_certificate_from_another_authority_works_and_is_replaced_live() {
    use watt_common::pki::{Authority, LEAF_VALIDITY};
    let dir = tempfile::tempdir().unwrap();
    let issue = |authority: &Authority| {
        let issued = authority.issue_server(&["127.0.0.1".into(), "localhost".into()], LEAF_VALIDITY).unwrap();
        // The key first, then the certificate, each replaced whole (as a Secret volume does).
        for (name, text) in [("tls.key", &issued.key_pem), ("tls.crt", &issued.cert_pem)] {
            let fresh = dir.path().join(format!("{name}.new"));
            std::fs::write(&fresh, text).unwrap();
            std::fs::rename(&fresh, dir.path().join(name)).unwrap();
        }
    };
    let authority_file = |authority: &Authority, name: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, authority.cert_pem()).unwrap();
        path.to_str().unwrap().to_string()
    };
    let site = Authority::generate("site CA", LEAF_VALIDITY).unwrap();
    let site_ca = authority_file(&site, "site-ca.pem");
    issue(&site);
    let pki = TestPki::get();
    let (cert, key) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
    let controller = ControllerProc::start(
        &store(&dir),
        0,
        &[
            "--tls-cert",
            cert.to_str().unwrap(),
            "--tls-key",
            key.to_str().unwrap(),
            "--client-ca",
            pki.ca().to_str().unwrap(),
        ],
    );
    let url = &controller.url;
    let admin = pki.admin();
    let ctl = |ca: &str, args: &[&str]| {
        let mut cmd = std::process::Command::new(bin("wattctl"));
        cmd.args(["--controller", url, "--ca", ca, "--cert"]).arg(&admin.cert).arg("--key").arg(&admin.key).args(args);
        for var in ["WATT_CA", "WATT_CERT", "WATT_KEY", "WATT_TOKEN", "WATT_CONTROLLER", "WATT_CONTEXT"] {
            cmd.env_remove(var);
        }
        cmd.output().unwrap()
    };
    let node = pki.client("node-1", "node");
    let agent = agent_with(
        url,
        "node-1",
        8,
        &["--ca", &site_ca, "--tls-cert", node.cert.to_str().unwrap(), "--tls-key", node.key.to_str().unwrap()],
    );
    agent.wait_line("Registered with the controller.", Duration::from_secs(20));
    // The tests' CA does not vouch for this controller; the site's does.
    assert_eq!(ctl(pki.ca().to_str().unwrap(), &["nodes"]).status.code(), Some(1));
    let job = dir.path().join("hello.yaml");
    std::fs::write(
        &job,
        "name: hello\npriority: 1\nshards: {min: 1, max: 1}\ngpus_per_shard: 1\ncommand: [/bin/sh, -c, 'echo hello from the shard; exec sleep 3600']\n",
    )
    .unwrap();
    let submitted = ctl(&site_ca, &["submit", "-f", job.to_str().unwrap()]);
    assert!(submitted.status.success(), "{}", stderr(&submitted));
    // wattctl trusts the site CA only; the agent's certificate is the node CA's, which the grant
    // names.
    wait_for(Duration::from_secs(20), "the shard's log through a grant", || {
        let out = ctl(&site_ca, &["logs", "hello"]);
        String::from_utf8_lossy(&out.stdout).contains("hello from the shard").then_some(())
    });

    // A new certificate from a new authority: new connections get it within the reload period,
    // with no restart; the agent's session, made before, goes on.
    let next = Authority::generate("next site CA", LEAF_VALIDITY).unwrap();
    let next_ca = authority_file(&next, "next-ca.pem");
    issue(&next);
    wait_for(Duration::from_secs(30), "the controller to serve the replaced certificate", || {
        ctl(&next_ca, &["nodes"]).status.success().then_some(())
    });
    assert_eq!(ctl(&site_ca, &["nodes"]).status.code(), Some(1), "the old certificate is no longer served");
    let nodes: serde_json::Value = serde_json::from_slice(&ctl(&next_ca, &["-o", "json", "nodes"]).stdout).unwrap();
    assert_eq!(nodes[0]["state"], "ready", "{nodes}");
    assert!(controller.proc.lines.try_iter().any(|l| l.contains("Loaded the changed TLS certificate")));
    drop(agent);
}
