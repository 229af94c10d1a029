//! The Helm chart: `helm lint`, `helm template` with the default values and four other value
//! files, every rendered object valid against the Kubernetes schemas, the shape of what renders
//! (a dry-run first install, privileges only when enforcing, the store), bad values refused by
//! `values.schema.json`, and the install notes on turning enforcement on.
#![allow(clippy::unwrap_used)]

use watt_deploy_tests::*;

const VALUE_FILES: [&str; 7] = [
    "",
    "helm/watt/values-production.yaml",
    "deploy-tests/values/cert-manager.yaml",
    "deploy-tests/values/etcd-3-replicas.yaml",
    "deploy-tests/values/enforcement-off.yaml",
    "deploy-tests/values/enforcement-on.yaml",
    "deploy-tests/values/host-exec.yaml",
];

fn render(values: &str) -> String {
    let args: Vec<&str> = if values.is_empty() { vec![] } else { vec!["-f", values] };
    let (ok, out, err) = helm_template(&args);
    assert!(ok, "helm template {values}: {err}");
    out
}

#[test]
fn the_chart_lints_and_renders_valid_kubernetes_objects_with_every_value_file() {
    let dir = std::env::temp_dir().join(format!("watt-helm-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for values in VALUE_FILES {
        let mut lint = vec!["lint", "helm/watt", "--strict"];
        if !values.is_empty() {
            lint.extend(["-f", values]);
        }
        let out = run("helm", &lint);
        assert!(out.status.success(), "helm lint {values}: {}", String::from_utf8_lossy(&out.stdout));

        let rendered = render(values);
        let file = dir.join(format!("{}.yaml", values.replace('/', "_")));
        std::fs::write(&file, &rendered).unwrap();
        let out = run("kubernetes-validate", &["-k", "1.30.0", "--strict", file.to_str().unwrap()]);
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success() && !text.contains("ERROR"), "kubernetes-validate {values}:\n{text}");
        // Built-in kinds are all checked; only the Prometheus Operator's and cert-manager's CRDs
        // have no schema here.
        for line in text.lines().filter(|l| l.contains("Couldn't find schema")) {
            assert!(
                line.contains("monitoring.coreos.com") || line.contains("cert-manager.io"),
                "unexpected unchecked kind: {line}"
            );
        }
        assert!(text.matches("passed for resource").count() >= 5, "{text}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn privileges_only_when_enforcing_and_the_store_as_configured() {
    let docs = documents(&render(""));
    let agent = find(&docs, "DaemonSet", "watt-agent");
    let pod = &agent["spec"]["template"]["spec"];
    assert_eq!(pod["priorityClassName"], "system-node-critical");
    assert_eq!(pod["hostPID"], false);
    assert_eq!(pod["runtimeClassName"], "nvidia");
    assert_eq!(pod["nodeSelector"]["nvidia.com/gpu.present"], "true");
    // A first install changes no GPU setting, and so needs no privileges.
    let container = &pod["containers"][0];
    assert_eq!(container["securityContext"]["runAsNonRoot"], true, "{container:?}");
    assert!(container["securityContext"]["capabilities"]["add"].is_null());
    let args: Vec<&str> = container["args"].as_sequence().unwrap().iter().filter_map(|a| a.as_str()).collect();
    assert!(
        args.contains(&"--enforce=dry-run") && args.contains(&"--controller=https://watt-controller:7070"),
        "{args:?}"
    );
    assert!(args.contains(&"--node-overhead=0"), "{args:?}");
    let on = documents(&render("deploy-tests/values/enforcement-on.yaml"));
    let container = &find(&on, "DaemonSet", "watt-agent")["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(
        container["securityContext"]["capabilities"]["add"][0], "SYS_ADMIN",
        "enforcing sets limits: {container:?}"
    );
    let args: Vec<&str> = container["args"].as_sequence().unwrap().iter().filter_map(|a| a.as_str()).collect();
    assert!(args.contains(&"--enforce=on") && args.contains(&"--node-overhead=450"), "{args:?}");
    // Node labels for power domains: only then may the agent get nodes, and nothing else.
    assert!(args.contains(&"--labels-from-node=example.com/row,example.com/rack"), "{args:?}");
    let pod = &find(&on, "DaemonSet", "watt-agent")["spec"]["template"]["spec"];
    assert_eq!(pod["serviceAccountName"], "watt-agent");
    assert_eq!(pod["automountServiceAccountToken"], true);
    let role = find(&on, "ClusterRole", "watt-agent-node-reader");
    assert_eq!(
        role["rules"],
        serde_yaml::from_str::<serde_yaml::Value>("[{apiGroups: [''], resources: [nodes], verbs: [get]}]").unwrap()
    );
    let binding = find(&on, "ClusterRoleBinding", "watt-agent-node-reader");
    assert_eq!(binding["subjects"][0]["name"], "watt-agent");
    assert_eq!(
        docs.iter().filter(|d| d["kind"] == "ClusterRole" || d["kind"] == "ServiceAccount").count(),
        0,
        "none by default"
    );
    assert_eq!(agent["spec"]["template"]["spec"]["automountServiceAccountToken"], false, "no API access by default");
    let controller = find(&docs, "StatefulSet", "watt-controller");
    assert_eq!(controller["spec"]["replicas"], 1);
    assert!(controller["spec"]["volumeClaimTemplates"].is_sequence(), "the embedded store is on a volume");
    let rule = find(&docs, "PrometheusRule", "watt");
    let alerts: Vec<&str> =
        rule["spec"]["groups"][0]["rules"].as_sequence().unwrap().iter().filter_map(|r| r["alert"].as_str()).collect();
    assert_eq!(
        alerts,
        [
            "WattBudgetViolation",
            "WattPowerInfeasible",
            "WattAgentNeverConnected",
            "WattNodeLost",
            "WattFailsafeEngaged",
            "WattPowerNearBudget",
            "WattNoLeader",
            "WattStoreUnwritable",
            "WattScrapeFailing",
            "WattRampAboveLimit",
            "WattPowerSwing",
            "WattDomainOverLimit",
            "WattVtnUnreachable"
        ]
    );
    let test = find(&docs, "Pod", "watt-test-controller");
    assert_eq!(test["metadata"]["annotations"]["helm.sh/hook"], "test");
    // TLS and credentials everywhere: the agent bootstraps, the controller holds the CA's key,
    // helm test brings a token; the gRPC port is narrowed by a NetworkPolicy.
    assert!(args.iter().any(|a| a.starts_with("--bootstrap-token-file=")), "{args:?}");
    let controller_args = format!("{:?}", controller["spec"]["template"]["spec"]["containers"][0]["args"]);
    for flag in ["--tls-cert=", "--client-ca=", "--client-ca-key=", "--token-file="] {
        assert!(controller_args.contains(flag), "{flag} in {controller_args}");
    }
    assert_eq!(test["spec"]["containers"][0]["env"][0]["name"], "WATT_TOKEN");
    let policy = find(&docs, "NetworkPolicy", "watt-controller");
    assert_eq!(policy["spec"]["ingress"][0]["ports"][0]["port"], 7070);
    // Shards' logs: HTTPS on the agent's logs port, open to the same clients.
    assert!(args.contains(&"--logs-addr=0.0.0.0:9402"), "{args:?}");
    let agent_policy = find(&docs, "NetworkPolicy", "watt-agent");
    assert_eq!(agent_policy["spec"]["ingress"][0]["ports"][0]["port"], 9402);
    assert!(agent_policy["spec"]["ingress"][0]["from"][0]["podSelector"].is_mapping(), "{agent_policy:?}");

    let off = documents(&render("deploy-tests/values/enforcement-off.yaml"));
    let security =
        &find(&off, "DaemonSet", "watt-agent")["spec"]["template"]["spec"]["containers"][0]["securityContext"];
    assert_eq!(security["runAsNonRoot"], true, "no privileges without enforcement: {security:?}");
    assert!(security["capabilities"]["add"].is_null());
    assert!(off.iter().all(|d| d["kind"] != "ServiceMonitor"));

    // With cert-manager: a Certificate for the controller's names, mounted for the controller;
    // agents and helm test trust the ca.crt beside it; node certificates stay the chart's CA's.
    assert!(docs.iter().all(|d| d["kind"] != "Certificate"), "no cert-manager unless asked");
    let managed = documents(&render("deploy-tests/values/cert-manager.yaml"));
    let certificate = find(&managed, "Certificate", "watt-controller-tls");
    assert_eq!(certificate["spec"]["secretName"], "watt-controller-tls");
    assert_eq!(certificate["spec"]["issuerRef"]["kind"], "ClusterIssuer");
    let names = format!("{:?}", certificate["spec"]["dnsNames"]);
    assert!(names.contains("watt-controller.gpu-power.svc"), "{names}");
    let usages = format!("{:?}", certificate["spec"]["usages"]);
    assert!(usages.contains("server auth") && usages.contains("client auth"), "{usages}");
    let controller = find(&managed, "StatefulSet", "watt-controller");
    let args = format!("{:?}", controller["spec"]["template"]["spec"]["containers"][0]["args"]);
    assert!(
        args.contains("--tls-cert=/etc/watt/tls/tls.crt") && args.contains("--client-ca=/etc/watt/pki/ca.crt"),
        "{args}"
    );
    let volumes = format!("{:?}", controller["spec"]["template"]["spec"]["volumes"]);
    assert!(volumes.contains("watt-controller-tls"), "{volumes}");
    let agent_volumes =
        format!("{:?}", find(&managed, "DaemonSet", "watt-agent")["spec"]["template"]["spec"]["volumes"]);
    assert!(agent_volumes.contains("watt-controller-tls") && !agent_volumes.contains("watt-pki"), "{agent_volumes}");
    let test_volumes = format!("{:?}", find(&managed, "Pod", "watt-test-controller")["spec"]["volumes"]);
    assert!(test_volumes.contains("watt-controller-tls"), "{test_volumes}");

    let etcd = documents(&render("deploy-tests/values/etcd-3-replicas.yaml"));
    let controller = find(&etcd, "StatefulSet", "watt-controller");
    assert_eq!(controller["spec"]["replicas"], 3);
    assert!(controller["spec"]["volumeClaimTemplates"].is_null());
    let args = format!("{:?}", controller["spec"]["template"]["spec"]["containers"][0]["args"]);
    assert!(args.contains("--store=etcd://etcd-0.etcd:2379,etcd-1.etcd:2379,etcd-2.etcd:2379"), "{args}");
    assert!(
        args.contains("--etcd-ca=/etc/watt/etcd/ca.crt") && args.contains("--etcd-key=/etc/watt/etcd/tls.key"),
        "{args}"
    );
    let volumes = format!("{:?}", controller["spec"]["template"]["spec"]["volumes"]);
    assert!(volumes.contains("etcd-client-tls"), "{volumes}");

    // The production values: three replicas that elect a leader, each advertising its own DNS
    // name (which the certificate covers), one at a time through a drain.
    let production = documents(&render("helm/watt/values-production.yaml"));
    let controller = find(&production, "StatefulSet", "watt-controller");
    assert_eq!(controller["spec"]["replicas"], 3);
    assert_eq!(controller["spec"]["serviceName"], "watt-controller-peers");
    let peers = find(&production, "Service", "watt-controller-peers");
    assert_eq!(peers["spec"]["clusterIP"], "None");
    let args = format!("{:?}", controller["spec"]["template"]["spec"]["containers"][0]["args"]);
    assert!(
        args.contains("--advertise-url=https://$(POD_NAME).watt-controller-peers.$(POD_NAMESPACE).svc:7070"),
        "{args}"
    );
    assert_eq!(find(&production, "PodDisruptionBudget", "watt-controller")["spec"]["maxUnavailable"], 1);
    // Ready: leader, caretaker, or a follower in sync; alive whatever the store does.
    let container = &controller["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(container["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert_eq!(container["livenessProbe"]["httpGet"]["path"], "/livez");
    assert!(docs.iter().all(|d| d["kind"] != "PodDisruptionBudget"), "no budget for one replica");
}

/// Where shards run: by default in the agent's container, from the chart's image or the one
/// given, with no host namespace and no privilege; with host execution, the host's PID
/// namespace and exactly the capabilities entering its mount namespace takes.
#[test]
fn shards_run_in_the_agents_image_unless_host_execution_is_chosen_which_alone_gets_its_privileges() {
    let pod = |docs: &[serde_yaml::Value]| find(docs, "DaemonSet", "watt-agent")["spec"]["template"]["spec"].clone();
    let args = |pod: &serde_yaml::Value| -> Vec<String> {
        pod["containers"][0]["args"]
            .as_sequence()
            .unwrap()
            .iter()
            .filter_map(|a| a.as_str().map(String::from))
            .collect()
    };
    let caps = |pod: &serde_yaml::Value| -> Vec<String> {
        let add = &pod["containers"][0]["securityContext"]["capabilities"]["add"];
        add.as_sequence().map(|s| s.iter().filter_map(|c| c.as_str().map(String::from)).collect()).unwrap_or_default()
    };
    let default = pod(&documents(&render("")));
    assert_eq!(default["hostPID"], false);
    assert_eq!(default["containers"][0]["image"], "ghcr.io/watt-power/watt-agent:0.1.0");
    assert!(args(&default).contains(&"--shard-exec=agent".to_string()), "{:?}", args(&default));
    assert!(!args(&default).iter().any(|a| a.starts_with("--runtimes")), "the image's own runtimes");
    assert!(caps(&default).is_empty());
    // Training needs shared memory, and no pod limit capping it.
    let shm = default["volumes"].as_sequence().unwrap().iter().find(|v| v["name"] == "shm").unwrap().clone();
    assert_eq!(
        (shm["emptyDir"]["medium"].clone(), shm["emptyDir"]["sizeLimit"].clone()),
        ("Memory".into(), "16Gi".into())
    );
    assert!(default["containers"][0]["resources"]["limits"].as_mapping().is_none_or(|m| m.is_empty()), "{default:?}");

    // Enforcing: root for the power limits, and what running shards as nobody takes; no more.
    let on = pod(&documents(&render("deploy-tests/values/enforcement-on.yaml")));
    assert_eq!(on["hostPID"], false);
    assert_eq!(caps(&on), ["SYS_ADMIN", "SETUID", "SETGID", "CHOWN", "KILL"]);

    let host = pod(&documents(&render("deploy-tests/values/host-exec.yaml")));
    assert_eq!(host["hostPID"], true);
    assert_eq!(host["containers"][0]["image"], "registry.example.com/ml/watt-agent:pytorch-24.10");
    assert_eq!(host["containers"][0]["securityContext"]["runAsUser"], 0);
    assert_eq!(caps(&host), ["SYS_ADMIN", "SYS_CHROOT", "SYS_PTRACE", "SETUID", "SETGID", "CHOWN", "KILL"]);
    let host_args = args(&host);
    assert!(
        host_args.contains(&"--shard-exec=host".to_string())
            && host_args.contains(&"--runtimes=site-conda".to_string()),
        "{host_args:?}"
    );
    assert!(host_args.contains(&"--enforce=dry-run".to_string()), "still a dry run: {host_args:?}");
}

#[test]
fn bad_values_are_refused_at_install_naming_the_value() {
    for (set, want) in [
        ("controller.replicas=3", "/controller/replicas"),
        ("agent.enforce=maybe", "/agent/enforce"),
        ("controller.store.type=etcd", "/controller/store/etcd/endpoints"),
        ("controller.store.type=etcd,controller.store.etcd.endpoints={e:2379}", "tlsSecret"),
        ("agent.failsafeAfter=soon", "/agent/failsafeAfter"),
        ("agent.httpPort=70000", "/agent/httpPort"),
        ("agent.logsPort=0", "/agent/logsPort"),
        ("certManager.enabled=true", "/certManager/issuerRef"),
        ("agent.stateDir=relative/path", "/agent/stateDir"),
        ("agent.nodeOverhead=-5", "/agent/nodeOverhead"),
        ("agent.shardExec=container", "/agent/shardExec"),
        ("agent.runtimes={PyTorch}", "/agent/runtimes/0"),
        ("agent.shmSize=lots", "/agent/shmSize"),
        ("agent.typo=1", "typo"),
        // What would weaken TLS or node identity needs insecure: true.
        ("controller.extraArgs={--insecure}", "/controller/extraArgs"),
        ("agent.extraArgs={--token-file=/t}", "/agent/extraArgs"),
        ("agent.extraArgs={--allow-root-shards}", "/agent/extraArgs"),
        ("controller.extraTokens={sha256:00,x,node}", "/controller/extraTokens/0"),
    ] {
        let (ok, _, err) = helm_template(&["--set", set]);
        assert!(!ok, "--set {set} was accepted");
        assert!(err.contains(want), "--set {set}: want {want:?} in {err}");
    }
}

/// What `helm install` prints: a first install says it changes no GPU setting and how to turn
/// enforcement on, and what the failsafe then does; an enforcing install does not ask.
#[test]
fn the_install_notes_say_how_to_turn_enforcement_on_and_what_the_failsafe_does() {
    let notes = |values: &[&str]| {
        let mut args = vec!["install", "watt", "helm/watt", "--namespace", "gpu-power", "--dry-run=client"];
        args.extend_from_slice(values);
        let out = run("helm", &args);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
        text[text.find("NOTES:").unwrap_or_else(|| panic!("no NOTES in {text}"))..].to_string()
    };
    let first = notes(&[]);
    assert!(first.contains("dry-run (no GPU setting is changed)"), "{first}");
    assert!(first.contains("--set agent.enforce=on"), "{first}");
    assert!(first.contains("failsafe caps") && first.contains("low, never high"), "{first}");
    let on = notes(&["-f", "deploy-tests/values/enforcement-on.yaml"]);
    assert!(on.contains("enforcing power caps:\non.") && !on.contains("--set agent.enforce=on"), "{on}");
}
