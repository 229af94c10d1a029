//! The grid as it speaks: the controller is an OpenADR 3 VEN of a utility's or aggregator's VTN
//! (`--openadr-vtn`). The leader reads the events of the programs the site is enrolled in,
//! turns them into the grid's schedule of windows ([`crate::power::grid`]) that lower the site's
//! import or a domain's limit, and reports back what the site drew over each interval.
//!
//! - [`events`]: what an event means, or why it is ignored (pure).
//! - [`ven`]: the VEN itself: reading the VTN, the schedule into the power table, reports,
//!   opting out of what cannot be met, and what happens when the VTN cannot be reached.
//! - [`notify`]: the VTN's notifications over MQTT, each a reason to read it at once.

pub mod events;
pub mod notify;
pub mod ven;

use prometheus::{GaugeVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry};

/// The VEN's metrics, registered once with the controller's; each term's VEN writes them.
#[derive(Debug, Clone)]
pub struct GridMetrics {
    /// By VTN: 1 while the leader's last read of it succeeded. No series where no VTN is
    /// configured, nor on followers.
    pub vtn_up: IntGaugeVec,
    /// Reads of the VTN, by outcome (`ok`, `unreachable`).
    pub reads: IntCounterVec,
    /// Events ignored, by [`events::Ignored::label`]; each counted once per version.
    pub ignored: IntCounterVec,
    /// Reports sent to the VTN, by kind (`interval`, `opt-out`) and outcome.
    pub reports: IntCounterVec,
    /// The grid's windows in force, and the limit each target is under (`site` or a domain).
    pub windows_in_force: IntGauge,
    pub limit_watts: GaugeVec,
    /// 1 while the leader's VEN is subscribed to the VTN's notifications.
    pub notifier_up: IntGauge,
    /// Notifications received (each a read of the VTN at once).
    pub notifications: IntCounter,
}

impl GridMetrics {
    pub fn register(registry: &Registry) -> prometheus::Result<GridMetrics> {
        let metrics = GridMetrics {
            vtn_up: IntGaugeVec::new(
                Opts::new("watt_openadr_vtn_up", "1 while the leader's last read of its OpenADR VTN succeeded, 0 while it fails."),
                &["vtn"],
            )?,
            reads: IntCounterVec::new(
                Opts::new("watt_openadr_reads_total", "Reads of the OpenADR VTN's programs and events, by outcome."),
                &["outcome"],
            )?,
            ignored: IntCounterVec::new(
                Opts::new(
                    "watt_openadr_ignored_events_total",
                    "OpenADR events that set no limit, by reason (malformed, unsupported, overlapping, ended), once per event version.",
                ),
                &["reason"],
            )?,
            reports: IntCounterVec::new(
                Opts::new("watt_openadr_reports_total", "Reports sent to the OpenADR VTN, by kind and outcome."),
                &["kind", "outcome"],
            )?,
            windows_in_force: IntGauge::new(
                "watt_grid_windows_in_force",
                "Windows of grid events (OpenADR) in force now; the dashboards annotate them.",
            )?,
            limit_watts: GaugeVec::new(
                Opts::new(
                    "watt_grid_limit_watts",
                    "The lowest limit grid events set now, by target (site import or a power domain).",
                ),
                &["target"],
            )?,
            notifier_up: IntGauge::new(
                "watt_openadr_notifier_up",
                "1 while the leader's VEN is subscribed to its VTN's notifications (MQTT); 0: polling only.",
            )?,
            notifications: IntCounter::new(
                "watt_openadr_notifications_total",
                "Notifications from the OpenADR VTN, each read at once.",
            )?,
        };
        registry.register(Box::new(metrics.vtn_up.clone()))?;
        registry.register(Box::new(metrics.reads.clone()))?;
        registry.register(Box::new(metrics.ignored.clone()))?;
        registry.register(Box::new(metrics.reports.clone()))?;
        registry.register(Box::new(metrics.windows_in_force.clone()))?;
        registry.register(Box::new(metrics.limit_watts.clone()))?;
        registry.register(Box::new(metrics.notifier_up.clone()))?;
        registry.register(Box::new(metrics.notifications.clone()))?;
        Ok(metrics)
    }
}
