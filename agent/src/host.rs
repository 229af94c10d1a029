//! The host around the GPUs: CPU, memory and load, read through `sysinfo`.
//!
//! Non-GPU draw matters to the power budget (CPU, NIC and fans can be a fifth of a node), and a
//! saturated host explains slow training steps that GPU metrics alone do not.

use sysinfo::{CpuRefreshKind, MemoryRefreshKind, RefreshKind, System};

/// One reading of the host.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct HostReading {
    /// Average busy share of all CPUs since the previous reading, 0..1.
    pub cpu_utilization_ratio: f64,
    pub cpus: usize,
    pub memory_used_bytes: u64,
    pub memory_total_bytes: u64,
    pub load1: f64,
    pub load5: f64,
    pub load15: f64,
}

/// Keeps the `sysinfo` state between readings (CPU usage is a difference of two readings).
#[derive(Debug)]
pub struct HostSampler {
    system: System,
}

impl Default for HostSampler {
    fn default() -> Self {
        Self::new()
    }
}

impl HostSampler {
    pub fn new() -> Self {
        let system = System::new_with_specifics(
            RefreshKind::nothing()
                .with_cpu(CpuRefreshKind::nothing().with_cpu_usage())
                .with_memory(MemoryRefreshKind::nothing().with_ram()),
        );
        HostSampler { system }
    }

    pub fn read(&mut self) -> HostReading {
        self.system.refresh_cpu_usage();
        self.system.refresh_memory_specifics(MemoryRefreshKind::nothing().with_ram());
        let load = System::load_average();
        HostReading {
            cpu_utilization_ratio: f64::from(self.system.global_cpu_usage()) / 100.0,
            cpus: self.system.cpus().len(),
            memory_used_bytes: self.system.used_memory(),
            memory_total_bytes: self.system.total_memory(),
            load1: load.one,
            load5: load.five,
            load15: load.fifteen,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_plausible_host_values() {
        let mut host = HostSampler::new();
        let r = host.read();
        assert!(r.cpus >= 1);
        assert!(r.memory_total_bytes > 0 && r.memory_used_bytes <= r.memory_total_bytes, "{r:?}");
        assert!((0.0..=1.0).contains(&r.cpu_utilization_ratio), "{r:?}");
        assert!(r.load1 >= 0.0);
    }
}
