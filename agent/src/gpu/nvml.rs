//! The NVML backend: real NVIDIA GPUs through `nvml-wrapper`, which opens `libnvidia-ml.so.1`
//! at run time (so the agent builds and runs on machines without the driver, and says so plainly
//! when asked for NVML there).
//!
//! Cost shapes what is read when (see [`Detail`]): on an H200 `nvmlDeviceGetPowerUsage` takes
//! ~1 µs but `nvmlDeviceGetTotalEnergyConsumption` ~4 ms, so the energy counter, the power limits,
//! PCIe throughput (which blocks for its 20 ms window), ECC counts and processes are read only on
//! `Full` samples. So are the performance monitor's activity counters (GPM, Hopper and newer: one
//! sample costs 0.3–0.7 ms on an H200), computed between this `Full` read's GPM sample and the
//! last one; only read, never a setting (GPM streaming is left as the operator set it).

use std::ffi::OsStr;
use std::sync::Mutex;
use std::time::Duration;

use nvml_wrapper::bitmasks::event::EventTypes;
use nvml_wrapper::enum_wrappers::device::{Clock, EccCounter, MemoryError, PcieUtilCounter, TemperatureSensor};
use nvml_wrapper::enums::device::{SampleValue, UsedGpuMemory};
use nvml_wrapper::enums::event::XidError;
use nvml_wrapper::enums::gpm::GpmMetricId;
use nvml_wrapper::error::NvmlError;
use nvml_wrapper::gpm::{gpm_metrics_get, GpmSample};
use nvml_wrapper::struct_wrappers::device::FieldValueSample;
use nvml_wrapper::structs::device::FieldId;
use nvml_wrapper::{Device, EventSet, Nvml};

use super::{
    Detail, EccCounts, GpuActivity, GpuBackend, GpuError, GpuEvent, GpuInfo, GpuProcess, GpuSample, PcieThroughput,
    PowerLimitConstraints, ThrottleReasons,
};

/// The library the NVIDIA driver installs.
pub const DEFAULT_LIBRARY: &str = "libnvidia-ml.so.1";

// Field ids from nvml.h.
const FI_DEV_MEMORY_TEMP: u32 = 82;
const FI_DEV_POWER_AVERAGE: u32 = 185;
const FI_DEV_POWER_INSTANT: u32 = 186;
const FAST_FIELDS: [FieldId; 3] =
    [FieldId(FI_DEV_POWER_INSTANT), FieldId(FI_DEV_POWER_AVERAGE), FieldId(FI_DEV_MEMORY_TEMP)];

/// Real GPUs.
pub struct NvmlBackend {
    nvml: &'static Nvml,
    devices: Vec<Device<'static>>,
    infos: Vec<GpuInfo>,
    /// `None` where the driver offers no events; only the event thread waits on it.
    events: Mutex<Option<EventSet<'static>>>,
    /// Per GPU: `None` without a performance monitor; else its last GPM sample, if any.
    gpm: Vec<Option<Mutex<Option<GpmSample<'static>>>>>,
}

/// The GPM metrics read, in [`GpuActivity`]'s order.
const GPM_METRICS: [GpmMetricId; 7] = [
    GpmMetricId::SmUtil,
    GpmMetricId::SmOccupancy,
    GpmMetricId::AnyTensorUtil,
    GpmMetricId::DramBwUtil,
    GpmMetricId::Fp16Util,
    GpmMetricId::Fp32Util,
    GpmMetricId::Fp64Util,
];

impl std::fmt::Debug for NvmlBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NvmlBackend").field("gpus", &self.infos).finish_non_exhaustive()
    }
}

impl NvmlBackend {
    /// Load NVML from `library` and enumerate every GPU.
    pub fn open(library: &str) -> Result<Self, GpuError> {
        let nvml = Nvml::builder().lib_path(OsStr::new(library)).init().map_err(|e| match e {
            NvmlError::LibloadingError(err) => {
                GpuError::LibraryMissing { library: library.to_string(), reason: err.to_string() }
            }
            NvmlError::DriverNotLoaded => GpuError::LibraryMissing {
                library: library.to_string(),
                reason: "the NVIDIA kernel driver is not loaded".into(),
            },
            other => GpuError::Init(other.to_string()),
        })?;
        // NVML is initialised once per process and lives until exit; leaking it lets device
        // handles and the event set be 'static, so they can be cached and moved to threads.
        let nvml: &'static Nvml = Box::leak(Box::new(nvml));
        let count = nvml.device_count().map_err(|e| GpuError::Init(e.to_string()))?;
        let mut devices = Vec::with_capacity(count as usize);
        let mut infos = Vec::with_capacity(count as usize);
        for index in 0..count {
            let device = nvml.device_by_index(index).map_err(|e| call_error(index, "nvmlDeviceGetHandleByIndex", e))?;
            infos.push(describe(index, &device)?);
            devices.push(device);
        }
        let events = register_xid_events(nvml, &devices);
        let gpm = devices
            .iter()
            .enumerate()
            .map(|(index, device)| match device.gpm_support() {
                Ok(true) => Some(Mutex::new(None)),
                _ => {
                    tracing::info!(
                        gpu = index,
                        "No performance monitor (GPM) on this GPU: its activity counters are not exported."
                    );
                    None
                }
            })
            .collect();
        Ok(NvmlBackend { nvml, devices, infos, events: Mutex::new(events), gpm })
    }

    /// The activity since the last call for GPU `index` (`None` on the first, without GPM, or
    /// when the driver refuses: logged, and tried again next time).
    fn activity(&self, index: u32, device: &Device<'static>) -> Option<GpuActivity> {
        let last = self.gpm.get(index as usize)?.as_ref()?;
        let now = match device.gpm_sample() {
            Ok(sample) => sample,
            Err(e) => {
                tracing::debug!(gpu = index, error = %e, "nvmlGpmSampleGet failed.");
                return None;
            }
        };
        let mut last = last.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let previous = last.replace(now)?;
        let current = last.as_ref()?;
        let values = match gpm_metrics_get(self.nvml, &previous, current, &GPM_METRICS) {
            Ok(values) => values,
            Err(e) => {
                tracing::debug!(gpu = index, error = %e, "nvmlGpmMetricsGet failed.");
                return None;
            }
        };
        // NVML gives percentages; a metric the GPU does not have counts as idle.
        let share =
            |i: usize| values.get(i).and_then(|v| v.as_ref().ok()).map_or(0.0, |v| (v.value / 100.0).clamp(0.0, 1.0));
        Some(GpuActivity {
            sm_active: share(0),
            sm_occupancy: share(1),
            tensor_active: share(2),
            dram_active: share(3),
            fp16_active: share(4),
            fp32_active: share(5),
            fp64_active: share(6),
        })
    }

    fn device(&self, index: u32) -> Result<&Device<'static>, GpuError> {
        self.devices.get(index as usize).ok_or(GpuError::NoSuchGpu { index })
    }

    /// The driver version string, for logs.
    pub fn driver_version(&self) -> Option<String> {
        self.nvml.sys_driver_version().ok()
    }
}

fn describe(index: u32, device: &Device<'static>) -> Result<GpuInfo, GpuError> {
    let err = |call| move |e| call_error(index, call, e);
    let constraints =
        device.power_management_limit_constraints().map_err(err("nvmlDeviceGetPowerManagementLimitConstraints"))?;
    let default = device.power_management_limit_default().map_err(err("nvmlDeviceGetPowerManagementDefaultLimit"))?;
    Ok(GpuInfo {
        index,
        uuid: device.uuid().map_err(err("nvmlDeviceGetUUID"))?,
        model: device.name().map_err(err("nvmlDeviceGetName"))?,
        pci_bus_id: device.pci_info().map(|p| p.bus_id).map_err(err("nvmlDeviceGetPciInfo"))?,
        device: device.minor_number().map(|m| format!("nvidia{m}")).unwrap_or_else(|_| format!("nvidia{index}")),
        memory_total_bytes: device.memory_info().map(|m| m.total).map_err(err("nvmlDeviceGetMemoryInfo"))?,
        power_limit: PowerLimitConstraints {
            min_watts: milliwatts(constraints.min_limit),
            max_watts: milliwatts(constraints.max_limit),
            default_watts: milliwatts(default),
        },
    })
}

/// An event set for critical XID errors on every GPU that supports them; `None` if none does.
fn register_xid_events(nvml: &'static Nvml, devices: &[Device<'static>]) -> Option<EventSet<'static>> {
    let mut set = nvml.create_event_set().ok()?;
    let mut registered = 0;
    for (index, device) in devices.iter().enumerate() {
        let supported = device.supported_event_types().unwrap_or(EventTypes::empty());
        if !supported.contains(EventTypes::CRITICAL_XID_ERROR) {
            continue;
        }
        match device.register_events(EventTypes::CRITICAL_XID_ERROR, set) {
            Ok(s) => {
                set = s;
                registered += 1;
            }
            Err(e) => {
                tracing::warn!(gpu = index, error = %e.error, "Cannot watch XID errors on this GPU.");
                set = nvml.create_event_set().ok()?;
            }
        }
    }
    (registered > 0).then_some(set)
}

impl GpuBackend for NvmlBackend {
    fn kind(&self) -> &'static str {
        "nvml"
    }

    fn gpus(&self) -> &[GpuInfo] {
        &self.infos
    }

    fn sample(&self, index: u32, detail: Detail) -> Result<GpuSample, GpuError> {
        let d = self.device(index)?;
        let err = |call| move |e| call_error(index, call, e);

        // One nvmlDeviceGetFieldValues call for instantaneous and averaged power and memory
        // temperature; fall back to nvmlDeviceGetPowerUsage on drivers without the fields.
        let fields = d.field_values_for(&FAST_FIELDS).ok();
        let field = |i: usize| fields.as_ref().and_then(|f| f.get(i)).and_then(field_f64);
        let instant_mw = field(0);
        let average_mw = field(1);
        let power_watts = match instant_mw.or(average_mw) {
            Some(mw) => mw / 1000.0,
            None => milliwatts(d.power_usage().map_err(err("nvmlDeviceGetPowerUsage"))?),
        };
        let utilization = d.utilization_rates().map_err(err("nvmlDeviceGetUtilizationRates"))?;
        let memory = d.memory_info().map_err(err("nvmlDeviceGetMemoryInfo"))?;
        let mut sample = GpuSample {
            power_watts,
            power_average_watts: instant_mw.and(average_mw).map(|mw| mw / 1000.0),
            utilization_ratio: f64::from(utilization.gpu) / 100.0,
            memory_utilization_ratio: f64::from(utilization.memory) / 100.0,
            memory_used_bytes: memory.used,
            memory_total_bytes: memory.total,
            temperature_celsius: f64::from(
                d.temperature(TemperatureSensor::Gpu).map_err(err("nvmlDeviceGetTemperature"))?,
            ),
            memory_temperature_celsius: field(2),
            sm_clock_hertz: f64::from(d.clock_info(Clock::SM).map_err(err("nvmlDeviceGetClockInfo"))?) * 1e6,
            memory_clock_hertz: f64::from(d.clock_info(Clock::Memory).map_err(err("nvmlDeviceGetClockInfo"))?) * 1e6,
            throttle_reasons: ThrottleReasons(
                d.current_throttle_reasons().map_err(err("nvmlDeviceGetCurrentClocksEventReasons"))?.bits(),
            ),
            ..GpuSample::default()
        };
        if detail == Detail::Full {
            sample.energy_joules = optional(d.total_energy_consumption()).map(|mj| mj as f64 / 1000.0);
            sample.power_limit_watts = optional(d.power_management_limit()).map(milliwatts);
            sample.enforced_power_limit_watts = optional(d.enforced_power_limit()).map(milliwatts);
            sample.pcie = match (d.pcie_throughput(PcieUtilCounter::Send), d.pcie_throughput(PcieUtilCounter::Receive))
            {
                // NVML reports KB/s.
                (Ok(tx), Ok(rx)) => Some(PcieThroughput {
                    tx_bytes_per_second: f64::from(tx) * 1024.0,
                    rx_bytes_per_second: f64::from(rx) * 1024.0,
                }),
                _ => None,
            };
            sample.ecc = match (
                d.total_ecc_errors(MemoryError::Corrected, EccCounter::Aggregate),
                d.total_ecc_errors(MemoryError::Uncorrected, EccCounter::Aggregate),
            ) {
                (Ok(corrected), Ok(uncorrected)) => Some(EccCounts { corrected, uncorrected }),
                _ => None,
            };
            sample.activity = self.activity(index, d);
            sample.processes = optional(d.running_compute_processes()).map(|procs| {
                procs
                    .into_iter()
                    .map(|p| GpuProcess {
                        pid: p.pid,
                        used_memory_bytes: match p.used_gpu_memory {
                            UsedGpuMemory::Used(bytes) => Some(bytes),
                            UsedGpuMemory::Unavailable => None,
                        },
                    })
                    .collect()
            });
        }
        Ok(sample)
    }

    fn power_limit_constraints(&self, index: u32) -> Result<PowerLimitConstraints, GpuError> {
        let d = self.device(index)?;
        let c = d
            .power_management_limit_constraints()
            .map_err(|e| call_error(index, "nvmlDeviceGetPowerManagementLimitConstraints", e))?;
        let default = d
            .power_management_limit_default()
            .map_err(|e| call_error(index, "nvmlDeviceGetPowerManagementDefaultLimit", e))?;
        Ok(PowerLimitConstraints {
            min_watts: milliwatts(c.min_limit),
            max_watts: milliwatts(c.max_limit),
            default_watts: milliwatts(default),
        })
    }

    fn power_limit(&self, index: u32) -> Result<f64, GpuError> {
        let d = self.device(index)?;
        d.power_management_limit()
            .map(milliwatts)
            .map_err(|e| call_error(index, "nvmlDeviceGetPowerManagementLimit", e))
    }

    fn set_power_limit(&self, index: u32, watts: f64) -> Result<(), GpuError> {
        self.power_limit_constraints(index)?.check(index, watts)?;
        // The setter takes `&mut Device`; a fresh handle costs one cheap lookup and keeps the
        // cached handles shareable.
        let mut device =
            self.nvml.device_by_index(index).map_err(|e| call_error(index, "nvmlDeviceGetHandleByIndex", e))?;
        device.set_power_management_limit((watts * 1000.0).round() as u32).map_err(|e| match e {
            NvmlError::NoPermission | NvmlError::NotSupported => GpuError::Refused { index, reason: e.to_string() },
            other => call_error(index, "nvmlDeviceSetPowerManagementLimit", other),
        })
    }

    fn wait_event(&self, timeout: Duration) -> Result<Option<GpuEvent>, GpuError> {
        let guard = self.events.lock().unwrap_or_else(|p| p.into_inner());
        let Some(set) = guard.as_ref() else {
            drop(guard);
            // No events on this node: behave like a wait that timed out.
            std::thread::park_timeout(timeout);
            return Ok(None);
        };
        let timeout_ms = u32::try_from(timeout.as_millis()).unwrap_or(u32::MAX);
        match set.wait(timeout_ms) {
            Ok(data) => {
                let index = data.device.index().unwrap_or(u32::MAX);
                // NVML reports 999 for an XID it cannot decode.
                let code = match data.event_data {
                    Some(XidError::Value(code)) => code,
                    Some(XidError::Unknown) | None => 999,
                };
                Ok(Some(GpuEvent::Xid { index, code }))
            }
            Err(NvmlError::Timeout) => Ok(None),
            Err(e) => Err(call_error(u32::MAX, "nvmlEventSetWait", e)),
        }
    }
}

fn milliwatts(mw: u32) -> f64 {
    f64::from(mw) / 1000.0
}

/// A field that is unsupported on this GPU is absent, not an error of the whole sample.
fn optional<T>(r: Result<T, NvmlError>) -> Option<T> {
    r.ok()
}

fn field_f64(sample: &Result<FieldValueSample, NvmlError>) -> Option<f64> {
    match sample.as_ref().ok()?.value.as_ref().ok()? {
        SampleValue::F64(v) => Some(*v),
        SampleValue::U32(v) => Some(f64::from(*v)),
        SampleValue::U64(v) => Some(*v as f64),
        SampleValue::I64(v) => Some(*v as f64),
    }
}

fn call_error(index: u32, call: &'static str, e: NvmlError) -> GpuError {
    match e {
        NvmlError::GpuLost => GpuError::Lost { index },
        other => GpuError::Call { index, call, reason: other.to_string() },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_library_names_it_and_points_at_the_simulator() {
        let err = NvmlBackend::open("/nonexistent/libnvidia-ml.so.1").unwrap_err();
        let text = err.to_string();
        assert!(matches!(err, GpuError::LibraryMissing { .. }), "{text}");
        assert!(text.contains("libnvidia-ml.so.1") && text.contains("--backend sim"), "{text}");
        assert!(!err.is_retryable());
    }

    // Read-only checks on a real GPU: nothing here changes a GPU setting.
    #[test]
    #[ignore = "needs an NVIDIA GPU"]
    fn reads_every_gpu_within_its_own_constraints() {
        let backend = NvmlBackend::open(DEFAULT_LIBRARY).expect("NVML");
        assert!(!backend.gpus().is_empty());
        for gpu in backend.gpus() {
            let range = backend.power_limit_constraints(gpu.index).unwrap();
            assert_eq!(range, gpu.power_limit);
            assert!(range.min_watts > 0.0 && range.min_watts <= range.max_watts, "{range:?}");
            let s = backend.sample(gpu.index, Detail::Full).unwrap();
            assert!(s.power_watts > 0.0 && s.power_watts < range.max_watts * 1.5, "{s:?}");
            let limit = s.power_limit_watts.expect("power limit");
            assert!(range.contains(limit), "limit {limit} outside {range:?}");
            assert!(s.energy_joules.unwrap_or(0.0) > 0.0, "{s:?}");
            assert!((0.0..=1.0).contains(&s.utilization_ratio));
            assert!(s.memory_used_bytes <= s.memory_total_bytes);
            assert_eq!(s.memory_total_bytes, gpu.memory_total_bytes);
            // Activity between two full reads, where the GPU has a performance monitor.
            if backend.gpm[gpu.index as usize].is_some() {
                assert_eq!(s.activity, None, "no activity before a second GPM sample");
                std::thread::park_timeout(Duration::from_millis(200));
                let a = backend.sample(gpu.index, Detail::Full).unwrap().activity.expect("GPM activity");
                for share in [a.sm_active, a.sm_occupancy, a.tensor_active, a.dram_active, a.fp32_active] {
                    assert!((0.0..=1.0).contains(&share), "{a:?}");
                }
            }
        }
    }
}
