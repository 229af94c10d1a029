//! Bad flags and config files for the controller binary: one line naming the problem, exit 2.
#![allow(clippy::unwrap_used)]

use std::process::{Command, Output};

fn controller(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_watt-controller"))
        .args(args)
        .env_remove("WATT_CONFIG")
        .env_remove("WATT_TOKEN_FILE")
        .env_remove("WATT_CLIENT_CA")
        .output()
        .unwrap()
}

fn usage_error(out: &Output, needles: &[&str]) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    for n in needles {
        assert!(stderr.contains(n), "stderr should name {n:?}: {stderr}");
    }
}

#[test]
fn bad_flags_and_files_are_refused_by_name() {
    usage_error(&controller(&["--store", "redis://db:6379"]), &["--store", "redis://db:6379"]);
    usage_error(&controller(&["--node-lease", "0s"]), &["--node-lease"]);
    usage_error(&controller(&["--reconcile-interval", "soon"]), &["--reconcile-interval"]);
    usage_error(&controller(&["--listen", "nowhere"]), &["--listen"]);
    // Nobody could authenticate; plain text off loopback; half a TLS pair.
    usage_error(&controller(&["--check-config"]), &["--client-ca", "--token-file"]);
    let tokens = ["--token-file", "/etc/watt/tokens"];
    usage_error(
        &controller(&[&tokens[..], &["--listen", "0.0.0.0:7070", "--check-config"]].concat()),
        &["--listen", "--insecure"],
    );
    usage_error(&controller(&[&tokens[..], &["--tls-cert", "c.pem", "--check-config"]].concat()), &["--tls-key"]);
    usage_error(&controller(&["--client-ca", "ca.pem", "--check-config"]), &["--client-ca", "--tls-cert"]);
    let insecure = controller(&[&tokens[..], &["--listen", "0.0.0.0:7070", "--insecure", "--check-config"]].concat());
    assert_eq!(insecure.status.code(), Some(0), "{}", String::from_utf8_lossy(&insecure.stderr));
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("controller.toml");
    std::fs::write(&path, "listen = \"127.0.0.1:7070\"\nstorage = \"file:x\"\n").unwrap();
    usage_error(&controller(&["--config", path.to_str().unwrap()]), &["storage", "unknown field"]);
}

#[test]
fn check_config_validates_and_exits_zero() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("controller.toml");
    std::fs::write(
        &path,
        "store = \"etcd://10.0.0.1:2379,10.0.0.2:2379\"\nnode_lease = \"20s\"\ntoken_file = \"/etc/watt/tokens\"\n",
    )
    .unwrap();
    let out = controller(&["--config", path.to_str().unwrap(), "--check-config"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        stdout.contains("configuration OK")
            && stdout.contains("etcd://10.0.0.1:2379,10.0.0.2:2379")
            && stdout.contains("20s"),
        "{stdout}"
    );
}

#[test]
fn limits_that_leave_no_room_are_refused_by_name() {
    let base = ["--token-file", "/etc/watt/tokens", "--check-config"];
    usage_error(&controller(&[&base[..], &["--max-jobs", "0"]].concat()), &["--max-jobs"]);
    usage_error(&controller(&[&base[..], &["--max-jobs-per-principal", "0"]].concat()), &["--max-jobs-per-principal"]);
    usage_error(
        &controller(&[&base[..], &["--max-jobs", "100", "--keep-ended-jobs", "500"]].concat()),
        &["--keep-ended-jobs"],
    );
}

#[test]
fn etcd_tls_needs_its_ca_a_whole_pair_and_an_etcd_store() {
    let etcd = ["--store", "etcd://10.0.0.1:2379", "--token-file", "/etc/watt/tokens", "--check-config"];
    usage_error(&controller(&[&etcd[..], &["--etcd-cert", "c.pem", "--etcd-key", "k.pem"]].concat()), &["--etcd-ca"]);
    usage_error(&controller(&[&etcd[..], &["--etcd-ca", "ca.pem", "--etcd-cert", "c.pem"]].concat()), &["--etcd-key"]);
    let file = ["--store", "file:w.redb", "--token-file", "/etc/watt/tokens", "--check-config", "--etcd-ca", "ca.pem"];
    usage_error(&controller(&file), &["--etcd-ca", "etcd://"]);
    let ok = controller(&[&etcd[..], &["--etcd-ca", "ca.pem", "--etcd-cert", "c.pem", "--etcd-key", "k.pem"]].concat());
    assert_eq!(ok.status.code(), Some(0), "{}", String::from_utf8_lossy(&ok.stderr));
}

#[test]
fn an_openadr_vtn_needs_a_url_credentials_programs_and_sane_levels() {
    let base = ["--token-file", "/etc/watt/tokens", "--check-config"];
    let vtn = [&base[..], &["--openadr-vtn", "https://vtn.example/openadr3/3.1.0"]].concat();
    let full = [
        &vtn[..],
        &["--openadr-client-id", "watt-site-7", "--openadr-secret-file", "/etc/watt/vtn", "--openadr-programs", "dr"],
    ]
    .concat();
    usage_error(&controller(&[&base[..], &["--openadr-vtn", "ftp://vtn"]].concat()), &["--openadr-vtn", "http"]);
    usage_error(&controller(&vtn), &["--openadr-client-id"]);
    usage_error(&controller(&[&base[..], &["--openadr-programs", "dr"]].concat()), &["--openadr-vtn", "required"]);
    usage_error(&controller(&[&full[..], &["--openadr-poll", "50ms"]].concat()), &["--openadr-poll"]);
    usage_error(
        &controller(&[&full[..], &["--openadr-simple-levels", "100,75,50"]].concat()),
        &["--openadr-simple-levels", "four percentages"],
    );
    usage_error(
        &controller(&[&full[..], &["--openadr-simple-levels", "100,75,50,250"]].concat()),
        &["--openadr-simple-levels"],
    );
    let ok = controller(&full);
    assert_eq!(ok.status.code(), Some(0), "{}", String::from_utf8_lossy(&ok.stderr));
    // The VEN's secret in plain text only on this machine, unless asked.
    let plain = [
        &base[..],
        &["--openadr-vtn", "http://vtn.example/", "--openadr-client-id", "c", "--openadr-secret-file", "s"],
        &["--openadr-programs", "dr"],
    ]
    .concat();
    usage_error(&controller(&plain), &["--openadr-vtn", "plain text", "--insecure"]);
    let local = [&base[..], &["--openadr-vtn", "http://127.0.0.1:8080/", "--openadr-client-id", "c"]].concat();
    let local = [&local[..], &["--openadr-secret-file", "s", "--openadr-programs", "dr"]].concat();
    assert_eq!(controller(&local).status.code(), Some(0));
    assert_eq!(controller(&[&plain[..], &["--insecure"]].concat()).status.code(), Some(0));
    // Notifications: a broker URL, TLS off this machine, and a whole login or none.
    let mqtt = |extra: &[&str]| controller(&[&full[..], extra].concat());
    usage_error(&mqtt(&["--openadr-mqtt", "http://broker:1883"]), &["--openadr-mqtt", "mqtts://"]);
    usage_error(&mqtt(&["--openadr-mqtt", "mqtt://broker.example:1883"]), &["--openadr-mqtt", "plain text"]);
    usage_error(&mqtt(&["--openadr-mqtt-username", "ven"]), &["--openadr-mqtt-password-file", "required"]);
    usage_error(&mqtt(&["--openadr-mqtt-password-file", "/etc/watt/mqtt"]), &["--openadr-mqtt-username", "required"]);
    usage_error(&controller(&[&base[..], &["--openadr-mqtt", "off"]].concat()), &["--openadr-vtn", "required"]);
    let login = ["--openadr-mqtt-username", "ven", "--openadr-mqtt-password-file", "/etc/watt/mqtt"];
    for ok in [
        &["--openadr-mqtt", "off"][..],
        &["--openadr-mqtt", "auto"],
        &["--openadr-mqtt", "mqtts://broker.example:8883"],
        &[&["--openadr-mqtt", "mqtt://127.0.0.1:1883"][..], &login].concat(),
    ] {
        let out = mqtt(ok);
        assert_eq!(out.status.code(), Some(0), "{ok:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
}
