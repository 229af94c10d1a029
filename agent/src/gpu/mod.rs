//! The `GpuBackend` trait: everything the agent asks of a GPU, and the plain data it gets back.
//!
//! This module owns the vocabulary (inventory, samples, errors) and nothing hardware-specific:
//! it must not pull in NVML. The real implementation lives in [`nvml`], a simulated node that
//! can fail on demand lives in [`sim`].

pub mod nvml;
pub mod sim;

use std::fmt;
use std::time::Duration;

/// One GPU as enumerated when the backend opens. Fixed for the life of the process.
#[derive(Debug, Clone, PartialEq)]
pub struct GpuInfo {
    /// NVML's index: the order `nvidia-smi` shows, and the `gpu` label.
    pub index: u32,
    pub uuid: String,
    /// Marketing name as NVML reports it, e.g. `NVIDIA H100 80GB HBM3`.
    pub model: String,
    pub pci_bus_id: String,
    /// The character device, `nvidia<minor>`: dcgm-exporter's `device` label.
    pub device: String,
    pub memory_total_bytes: u64,
    pub power_limit: PowerLimitConstraints,
}

/// The range NVML accepts for `nvmlDeviceSetPowerManagementLimit`, and the board's default.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PowerLimitConstraints {
    pub min_watts: f64,
    pub max_watts: f64,
    pub default_watts: f64,
}

impl PowerLimitConstraints {
    pub fn contains(&self, watts: f64) -> bool {
        watts >= self.min_watts && watts <= self.max_watts
    }

    /// Accept `watts` for GPU `index`, or say which range it missed. NaN is outside every range.
    pub fn check(&self, index: u32, watts: f64) -> Result<(), GpuError> {
        if self.contains(watts) {
            Ok(())
        } else {
            Err(GpuError::LimitOutOfRange { index, watts, min_watts: self.min_watts, max_watts: self.max_watts })
        }
    }
}

/// How much to read in one sample. NVML's calls differ in cost by four orders of magnitude
/// (power: ~1 µs; limits: ~150 µs; the energy counter: ~4 ms on an H200; PCIe throughput blocks
/// for its 20 ms measurement window), so the sampler reads the cheap fields every tick and the
/// costly ones only every few seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Detail {
    /// Power, utilization, memory, temperatures, clocks, throttle reasons.
    Fast,
    /// `Fast` plus the energy counter, power limits, PCIe throughput, ECC counts and processes.
    Full,
}

/// What one read of one GPU returned. Fields that the backend could not provide (not supported
/// on this GPU, or not part of a `Fast` read) are `None`, never a made-up zero.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GpuSample {
    /// Instantaneous board power where the GPU offers it, else the driver's averaged value.
    pub power_watts: f64,
    /// The driver's 1-second average, on GPUs that offer both (Ampere and newer but A100).
    pub power_average_watts: Option<f64>,
    pub utilization_ratio: f64,
    pub memory_utilization_ratio: f64,
    pub memory_used_bytes: u64,
    pub memory_total_bytes: u64,
    pub temperature_celsius: f64,
    pub memory_temperature_celsius: Option<f64>,
    pub sm_clock_hertz: f64,
    pub memory_clock_hertz: f64,
    pub throttle_reasons: ThrottleReasons,
    /// `Full` reads only from here down.
    pub energy_joules: Option<f64>,
    pub power_limit_watts: Option<f64>,
    pub enforced_power_limit_watts: Option<f64>,
    pub pcie: Option<PcieThroughput>,
    pub ecc: Option<EccCounts>,
    pub processes: Option<Vec<GpuProcess>>,
    /// What the GPU's units were busy with since the last `Full` read, from its performance
    /// monitor (GPM: Hopper and newer); `None` on GPUs without one, and on the first read.
    pub activity: Option<GpuActivity>,
}

/// Shares of the last period, each 0–1, as the GPU's performance monitor (GPM) counts them and
/// DCGM's profiling fields report them: SMs with a warp resident (`sm_active`), resident warps
/// of the SMs' maximum (`sm_occupancy`), the tensor pipes busy (`tensor_active`), the memory
/// interface busy (`dram_active`), and the FP16, FP32 and FP64 pipes busy.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct GpuActivity {
    pub sm_active: f64,
    pub sm_occupancy: f64,
    pub tensor_active: f64,
    pub dram_active: f64,
    pub fp16_active: f64,
    pub fp32_active: f64,
    pub fp64_active: f64,
}

#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct PcieThroughput {
    pub tx_bytes_per_second: f64,
    pub rx_bytes_per_second: f64,
}

/// Aggregate (lifetime) ECC error counts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EccCounts {
    pub corrected: u64,
    pub uncorrected: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GpuProcess {
    pub pid: u32,
    pub used_memory_bytes: Option<u64>,
}

/// An event the driver pushes rather than one we poll.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GpuEvent {
    /// A critical XID error (e.g. 79: fallen off the bus; 48: double-bit ECC error).
    Xid { index: u32, code: u64 },
}

/// NVML's clock-event ("throttle") reason bit set, bit for bit, so the raw value can be exported
/// as dcgm-exporter does.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct ThrottleReasons(pub u64);

impl ThrottleReasons {
    pub const GPU_IDLE: Self = Self(0x1);
    pub const APPLICATIONS_CLOCKS_SETTING: Self = Self(0x2);
    pub const SW_POWER_CAP: Self = Self(0x4);
    pub const HW_SLOWDOWN: Self = Self(0x8);
    pub const SYNC_BOOST: Self = Self(0x10);
    pub const SW_THERMAL_SLOWDOWN: Self = Self(0x20);
    pub const HW_THERMAL_SLOWDOWN: Self = Self(0x40);
    pub const HW_POWER_BRAKE_SLOWDOWN: Self = Self(0x80);
    pub const DISPLAY_CLOCK_SETTING: Self = Self(0x100);

    /// Every named reason with the label value it is exported under.
    pub const NAMED: [(Self, &'static str); 9] = [
        (Self::GPU_IDLE, "gpu_idle"),
        (Self::APPLICATIONS_CLOCKS_SETTING, "applications_clocks_setting"),
        (Self::SW_POWER_CAP, "sw_power_cap"),
        (Self::HW_SLOWDOWN, "hw_slowdown"),
        (Self::SYNC_BOOST, "sync_boost"),
        (Self::SW_THERMAL_SLOWDOWN, "sw_thermal_slowdown"),
        (Self::HW_THERMAL_SLOWDOWN, "hw_thermal_slowdown"),
        (Self::HW_POWER_BRAKE_SLOWDOWN, "hw_power_brake_slowdown"),
        (Self::DISPLAY_CLOCK_SETTING, "display_clock_setting"),
    ];

    pub fn contains(self, other: Self) -> bool {
        self.0 & other.0 == other.0
    }

    pub fn with(self, other: Self) -> Self {
        Self(self.0 | other.0)
    }
}

/// Why a GPU call failed. Whether to retry is decided per variant in [`GpuError::is_retryable`].
#[derive(Debug, thiserror::Error)]
pub enum GpuError {
    #[error(
        "cannot load the NVIDIA management library {library}: {reason}. \
         This machine has no NVIDIA driver; to run on simulated GPUs, use --backend sim"
    )]
    LibraryMissing { library: String, reason: String },
    #[error("NVML failed to initialize: {0}")]
    Init(String),
    #[error("GPU {index} is lost: it fell off the bus or stopped answering")]
    Lost { index: u32 },
    #[error("no GPU with index {index}")]
    NoSuchGpu { index: u32 },
    #[error("GPU {index}: power limit {watts} W is outside the range the GPU accepts, [{min_watts}, {max_watts}] W")]
    LimitOutOfRange { index: u32, watts: f64, min_watts: f64, max_watts: f64 },
    #[error("GPU {index}: the driver refused to set the power limit: {reason}")]
    Refused { index: u32, reason: String },
    #[error("GPU {index}: {call} failed: {reason}")]
    Call { index: u32, call: &'static str, reason: String },
}

impl GpuError {
    /// Whether the same call may succeed later. Exhaustive on purpose: a new variant must decide.
    pub fn is_retryable(&self) -> bool {
        match self {
            GpuError::LibraryMissing { .. } | GpuError::Init(_) => false,
            GpuError::NoSuchGpu { .. } | GpuError::LimitOutOfRange { .. } => false,
            GpuError::Refused { .. } => false,
            // A lost GPU sometimes comes back after a driver recovery; a failed call may be transient.
            GpuError::Lost { .. } | GpuError::Call { .. } => true,
        }
    }
}

/// Everything the agent asks of a node's GPUs.
///
/// Every method is a blocking call (NVML is synchronous FFI): call them from a blocking thread,
/// never from an async task.
pub trait GpuBackend: Send + Sync + fmt::Debug {
    /// `"nvml"` or `"sim"`, for logs.
    fn kind(&self) -> &'static str;

    /// The GPUs found when the backend opened, in index order.
    fn gpus(&self) -> &[GpuInfo];

    /// Read one GPU.
    fn sample(&self, index: u32, detail: Detail) -> Result<GpuSample, GpuError>;

    /// Read the range the GPU accepts for its power limit now.
    fn power_limit_constraints(&self, index: u32) -> Result<PowerLimitConstraints, GpuError>;

    /// The power limit in force now (a cheap read: ~150 µs on NVML).
    fn power_limit(&self, index: u32) -> Result<f64, GpuError>;

    /// Set the power limit. A value outside [`Self::power_limit_constraints`] is rejected with
    /// [`GpuError::LimitOutOfRange`], never clamped.
    fn set_power_limit(&self, index: u32, watts: f64) -> Result<(), GpuError>;

    /// Wait up to `timeout` for the next driver event (XID errors). `Ok(None)` on timeout.
    fn wait_event(&self, timeout: Duration) -> Result<Option<GpuEvent>, GpuError>;
}
