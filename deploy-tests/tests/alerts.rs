//! The alert rules the chart ships: `promtool check rules`, and `promtool test rules` with a case
//! for each alert firing and staying quiet (`deploy-tests/alerts.test.yaml`).
#![allow(clippy::unwrap_used)]

use watt_deploy_tests::*;

#[test]
fn the_alert_rules_check_and_every_alert_passes_its_unit_test() {
    let out = run("promtool", &["check", "rules", "helm/watt/files/watt-alerts.yaml"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("SUCCESS: 13 rules found"),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = run("promtool", &["test", "rules", "deploy-tests/alerts.test.yaml"]);
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && text.contains("SUCCESS"), "{text}");
    // Every alert of the file has a test.
    let tests = std::fs::read_to_string(root().join("deploy-tests/alerts.test.yaml")).unwrap();
    let rules = std::fs::read_to_string(root().join("helm/watt/files/watt-alerts.yaml")).unwrap();
    for alert in rules.lines().filter_map(|l| l.trim().strip_prefix("- alert: ")) {
        assert!(tests.contains(&format!("alertname: {alert}")), "no test for {alert}");
    }
}
