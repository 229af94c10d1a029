//! What the node draws besides its GPUs: CPU packages (and DRAM, where the platform counts it
//! apart) read from the Linux powercap interface, plus a configured static overhead for what no
//! counter sees (fans, NICs, PSU losses: `--node-overhead`).
//!
//! Intel RAPL and, since Linux 5.8, AMD's RAPL both appear under `/sys/class/powercap` through
//! the `intel-rapl` control type. Which zones are added, so that nothing counts twice:
//! - top-level zones (`intel-rapl:0`, `intel-rapl:1`, …) named `package-*`: one per socket;
//! - their subzones named `dram` (`intel-rapl:0:1`): memory, outside the package domain.
//!
//! Core and uncore subzones lie inside their package and are left out, and so is `psys` (the
//! whole platform, where offered), which overlaps all of them.
//!
//! Each zone's `energy_uj` counter wraps at its `max_energy_range_uj`; power is the difference of
//! two reads over the time between them (tokio's clock, pausable in tests). A zone that cannot be
//! read is left out of that round and said once; it counts again when it answers.

use std::fs;
use std::path::{Path, PathBuf};

use tokio::time::Instant;

/// The node's non-GPU draw, by source.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct NodePower {
    /// CPU packages and DRAM from the RAPL counters; `None` without readable zones or before
    /// the second read.
    pub rapl_watts: Option<f64>,
    /// The configured static overhead.
    pub overhead_watts: f64,
}

impl NodePower {
    pub fn total_watts(&self) -> f64 {
        self.rapl_watts.unwrap_or(0.0) + self.overhead_watts
    }
}

#[derive(Debug)]
struct Zone {
    /// `package-0`, `dram`, … with its directory, for logs.
    name: String,
    energy: PathBuf,
    /// The counter wraps to 0 after this value.
    max_range_uj: u64,
    last_uj: Option<u64>,
    failing: bool,
}

/// Reads the powercap counters of one node.
#[derive(Debug)]
pub struct Powercap {
    zones: Vec<Zone>,
    overhead_watts: f64,
    last_read: Option<Instant>,
}

fn read_trimmed(path: &Path) -> Option<String> {
    fs::read_to_string(path).ok().map(|s| s.trim().to_owned())
}

/// `intel-rapl:0` → 1 level, `intel-rapl:0:1` → 2; anything else (`intel-rapl`, the control
/// type directory) → 0.
fn depth(dir_name: &str) -> usize {
    dir_name.split(':').skip(1).take_while(|part| !part.is_empty() && part.bytes().all(|b| b.is_ascii_digit())).count()
}

impl Powercap {
    /// Find the zones under `root` (normally `/sys/class/powercap`). A missing root is a node
    /// without RAPL, not an error.
    pub fn discover(root: &Path, overhead_watts: f64) -> Self {
        let mut zones = Vec::new();
        let mut entries: Vec<PathBuf> = match fs::read_dir(root) {
            Ok(dir) => dir.filter_map(Result::ok).map(|e| e.path()).collect(),
            Err(_) => Vec::new(),
        };
        entries.sort();
        for dir in entries {
            let Some(dir_name) = dir.file_name().and_then(|n| n.to_str()).map(str::to_owned) else { continue };
            let Some(name) = read_trimmed(&dir.join("name")) else { continue };
            let wanted = match depth(&dir_name) {
                1 => name.starts_with("package"),
                2 => name == "dram",
                _ => false,
            };
            if !wanted {
                continue;
            }
            let max_range_uj = read_trimmed(&dir.join("max_energy_range_uj")).and_then(|s| s.parse().ok());
            let Some(max_range_uj) = max_range_uj.filter(|&m: &u64| m > 0) else {
                tracing::warn!(zone = %dir.display(), "A powercap zone has no usable max_energy_range_uj; leaving it out.");
                continue;
            };
            zones.push(Zone {
                name: format!("{name} ({dir_name})"),
                energy: dir.join("energy_uj"),
                max_range_uj,
                last_uj: None,
                failing: false,
            });
        }
        if zones.is_empty() {
            tracing::info!(root = %root.display(), "No RAPL powercap zones: CPU power is not measured on this node.");
        } else {
            let names: Vec<&str> = zones.iter().map(|z| z.name.as_str()).collect();
            tracing::info!(zones = ?names, "Reading CPU power from RAPL powercap zones.");
        }
        Powercap { zones, overhead_watts, last_read: None }
    }

    /// Whether anything is known of the node's non-GPU draw.
    pub fn measures_anything(&self) -> bool {
        !self.zones.is_empty() || self.overhead_watts > 0.0
    }

    /// Read every zone at `now`. `None` when nothing is known (no zones, no overhead). Blocking.
    pub fn read(&mut self, now: Instant) -> Option<NodePower> {
        let seconds = self.last_read.map(|t| now.saturating_duration_since(t).as_secs_f64());
        self.last_read = Some(now);
        let mut joules = 0.0;
        let mut counted = 0;
        for zone in &mut self.zones {
            let reading = read_trimmed(&zone.energy).and_then(|s| s.parse::<u64>().ok());
            let Some(uj) = reading else {
                if !std::mem::replace(&mut zone.failing, true) {
                    tracing::warn!(zone = %zone.name, "Cannot read a RAPL energy counter; leaving the zone out.");
                }
                zone.last_uj = None;
                continue;
            };
            if std::mem::take(&mut zone.failing) {
                tracing::info!(zone = %zone.name, "The RAPL energy counter answers again.");
            }
            if let Some(last) = zone.last_uj {
                // A counter below its last value wrapped once (they wrap every few minutes at most
                // under full load, far longer than a sampling interval).
                let delta = if uj >= last { uj - last } else { zone.max_range_uj - last + uj };
                joules += delta as f64 / 1e6;
                counted += 1;
            }
            zone.last_uj = Some(uj);
        }
        let rapl_watts = match seconds {
            Some(s) if s > 0.0 && counted > 0 => Some(joules / s),
            _ => None,
        };
        self.measures_anything().then_some(NodePower { rapl_watts, overhead_watts: self.overhead_watts })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn zone(root: &Path, dir: &str, name: &str, energy: u64, max: u64) {
        let d = root.join(dir);
        fs::create_dir_all(&d).unwrap();
        fs::write(d.join("name"), format!("{name}\n")).unwrap();
        fs::write(d.join("energy_uj"), format!("{energy}\n")).unwrap();
        fs::write(d.join("max_energy_range_uj"), format!("{max}\n")).unwrap();
    }

    fn set(root: &Path, dir: &str, energy: u64) {
        fs::write(root.join(dir).join("energy_uj"), format!("{energy}\n")).unwrap();
    }

    /// Two sockets with DRAM subzones, core subzones and a psys zone that must not be added.
    fn two_socket_node() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let r = dir.path();
        zone(r, "intel-rapl:0", "package-0", 1_000_000, 262_143_328_850);
        zone(r, "intel-rapl:0:0", "core", 500_000, 262_143_328_850);
        zone(r, "intel-rapl:0:1", "dram", 2_000_000, 65_712_999_613);
        zone(r, "intel-rapl:1", "package-1", 3_000_000, 262_143_328_850);
        zone(r, "intel-rapl:1:1", "dram", 4_000_000, 65_712_999_613);
        zone(r, "intel-rapl:2", "psys", 9_000_000, 262_143_328_850);
        fs::create_dir_all(r.join("intel-rapl")).unwrap();
        dir
    }

    #[tokio::test(start_paused = true)]
    async fn packages_and_dram_are_added_and_nothing_twice() {
        let dir = two_socket_node();
        let r = dir.path();
        let mut p = Powercap::discover(r, 150.0);
        assert_eq!(p.zones.len(), 4, "{:?}", p.zones);
        let first = p.read(Instant::now()).unwrap();
        assert_eq!(first, NodePower { rapl_watts: None, overhead_watts: 150.0 }, "one read is no rate");
        tokio::time::advance(Duration::from_secs(2)).await;
        // Over 2 s: packages 300 J + 200 J, DRAM 40 J + 20 J; core and psys rise too but are not added.
        set(r, "intel-rapl:0", 301_000_000);
        set(r, "intel-rapl:1", 203_000_000);
        set(r, "intel-rapl:0:1", 42_000_000);
        set(r, "intel-rapl:1:1", 24_000_000);
        set(r, "intel-rapl:0:0", 250_000_000);
        set(r, "intel-rapl:2", 999_000_000);
        let second = p.read(Instant::now()).unwrap();
        assert_eq!(second.rapl_watts, Some(280.0));
        assert_eq!(second.total_watts(), 430.0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_wrapped_counter_counts_what_it_measured_across_the_wrap() {
        let dir = tempfile::tempdir().unwrap();
        let r = dir.path();
        zone(r, "intel-rapl:0", "package-0", 999_000_000, 1_000_000_000);
        let mut p = Powercap::discover(r, 0.0);
        p.read(Instant::now());
        tokio::time::advance(Duration::from_secs(1)).await;
        set(r, "intel-rapl:0", 99_000_000); // wrapped: 1 J to the top, 99 J after it
        assert_eq!(p.read(Instant::now()).unwrap().rapl_watts, Some(100.0));
    }

    #[tokio::test(start_paused = true)]
    async fn a_zone_that_disappears_is_left_out_and_counts_again_when_back() {
        let dir = two_socket_node();
        let r = dir.path();
        let mut p = Powercap::discover(r, 0.0);
        p.read(Instant::now());
        fs::remove_dir_all(r.join("intel-rapl:1")).unwrap();
        tokio::time::advance(Duration::from_secs(1)).await;
        set(r, "intel-rapl:0", 101_000_000);
        assert_eq!(p.read(Instant::now()).unwrap().rapl_watts, Some(100.0), "the socket left is still measured");
        zone(r, "intel-rapl:1", "package-1", 3_000_000, 262_143_328_850);
        tokio::time::advance(Duration::from_secs(1)).await;
        set(r, "intel-rapl:0", 201_000_000);
        assert_eq!(p.read(Instant::now()).unwrap().rapl_watts, Some(100.0), "back, but a first read is no rate");
        tokio::time::advance(Duration::from_secs(1)).await;
        set(r, "intel-rapl:0", 301_000_000);
        set(r, "intel-rapl:1", 53_000_000);
        assert_eq!(p.read(Instant::now()).unwrap().rapl_watts, Some(150.0));
    }

    #[tokio::test(start_paused = true)]
    async fn a_node_without_rapl_reports_its_overhead_or_nothing() {
        let missing = Path::new("/nonexistent/powercap");
        assert_eq!(Powercap::discover(missing, 0.0).read(Instant::now()), None);
        let mut p = Powercap::discover(missing, 120.0);
        assert_eq!(p.read(Instant::now()), Some(NodePower { rapl_watts: None, overhead_watts: 120.0 }));
        // Garbage in a counter is a zone that cannot be read.
        let dir = tempfile::tempdir().unwrap();
        zone(dir.path(), "intel-rapl:0", "package-0", 5, 100);
        fs::write(dir.path().join("intel-rapl:0/energy_uj"), "not a number").unwrap();
        let mut p = Powercap::discover(dir.path(), 0.0);
        p.read(Instant::now());
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(p.read(Instant::now()).unwrap().rapl_watts, None);
    }
}
