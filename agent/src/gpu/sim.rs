//! Simulated GPUs: a node without NVIDIA hardware that behaves like one, for laptops, CI and the
//! local cluster.
//!
//! The physics is a small, deterministic model stepped in the driver's own 100 ms update period:
//! draw follows utilization up to a per-model peak demand and is cut at the power limit (setting
//! the "SW power cap" reason when the limit binds, as a real H100/H200 does under a bf16 matmul);
//! utilization follows the work placed on the GPU ([`SimLoad`]): none — it idles at the model's
//! measured idle draw, far below any cap; a Watt shard — a training step's compute phase near the
//! cap and its communication phase well below it, so power swings at 0.5–2 Hz as real training
//! does, with a stall now and then (data loading, a checkpoint); someone else's process — a
//! steady heavy load;
//! the energy counter is the exact integral of that draw; temperature lags power with a thermal
//! time constant; SM clocks fall when the cap binds. Cap ranges and memory sizes are the real
//! boards'. Given a seed, every reading is a pure function of elapsed ticks and the limits set,
//! however often it is read.
//!
//! [`SimBackend`] can also fail on purpose (a GPU that stops answering, a refused set call, XID
//! events, ECC errors) and counts calls, so tests can assert what the agent did.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::Duration;

use tokio::time::Instant;
use watt_common::curve::Curve;

use super::{
    Detail, EccCounts, GpuActivity, GpuBackend, GpuError, GpuEvent, GpuInfo, GpuProcess, GpuSample, PcieThroughput,
    PowerLimitConstraints, ThrottleReasons,
};

/// What a simulated training step is bound by: it sets the step's true speed curve (what the
/// agent paces `watt-worker` by), what the performance monitor counts, and how much the GPU would
/// draw uncapped. Chosen per job by its environment, `WATT_SIM_WORKLOAD` (simulated GPUs only),
/// so the local cluster can run jobs whose curves differ, as real ones do: on an A40, 200 W of
/// 300 W cost a compute-bound job 7–11% of its speed, while memory-bound phases barely notice.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SimWorkload {
    /// The shared curve (speed 0.9 at 70% of the maximum cap); tensor pipes and memory about
    /// equally busy.
    #[default]
    Balanced,
    /// Dense math: speed goes with the SM clock (0.82 at 70% of the maximum cap, 0.68 at 50%);
    /// tensor pipes busy, memory mostly idle (an H200 under a bf16 matmul: SM 97%, tensor 94%,
    /// DRAM 16%).
    ComputeBound,
    /// Bandwidth-bound: speed barely moves with the cap (0.95 at 50%); memory busy, tensor pipes
    /// mostly waiting; draws less than a dense step uncapped.
    MemoryBound,
}

impl SimWorkload {
    /// The job environment variable that chooses it.
    pub const ENV: &'static str = "WATT_SIM_WORKLOAD";

    /// From the variable's value: `balanced`, `compute-bound` or `memory-bound`.
    pub fn parse(value: &str) -> Option<Self> {
        match value {
            "balanced" => Some(SimWorkload::Balanced),
            "compute-bound" => Some(SimWorkload::ComputeBound),
            "memory-bound" => Some(SimWorkload::MemoryBound),
            _ => None,
        }
    }

    /// The true speed of a step against the cap.
    pub fn curve(self) -> Curve {
        match self {
            SimWorkload::Balanced => Curve::default(),
            SimWorkload::ComputeBound => Curve { exponent: 0.55 },
            SimWorkload::MemoryBound => Curve { exponent: 0.08 },
        }
    }

    /// The share of a dense step's dynamic power it would draw uncapped.
    fn demand_share(self) -> f64 {
        match self {
            SimWorkload::Balanced | SimWorkload::ComputeBound => 1.0,
            SimWorkload::MemoryBound => 0.75,
        }
    }

    /// What a GPU's performance monitor would count over a tick at `utilization`, in a step's
    /// compute phase (`computing`) or its all-reduce (memory and links busier than the tensor
    /// pipes, whatever the workload).
    fn activity(self, utilization: f64, computing: bool) -> GpuActivity {
        let u = utilization.clamp(0.0, 1.0);
        let (tensor, dram) = match (computing, self) {
            (false, _) => (0.05 * u, 1.1 * u),
            (true, SimWorkload::ComputeBound) => (0.97 * u, 0.17 * u),
            (true, SimWorkload::Balanced) => (0.55 * u, 0.5 * u),
            (true, SimWorkload::MemoryBound) => (0.25 * u, 0.85 * u),
        };
        GpuActivity {
            sm_active: u,
            sm_occupancy: 0.45 * u,
            tensor_active: tensor.clamp(0.0, 1.0),
            dram_active: dram.clamp(0.0, 1.0),
            fp16_active: 0.02 * u,
            fp32_active: 0.08 * u,
            fp64_active: 0.0,
        }
    }
}

/// The driver's update period: power and energy change every 100 ms, not faster.
pub const TICK: Duration = Duration::from_millis(100);
const TICK_SECONDS: f64 = 0.1;
const MIB: u64 = 1 << 20;

/// A GPU model's fixed characteristics.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SimModel {
    /// Short name used on the command line.
    pub key: &'static str,
    /// Name as NVML reports it.
    pub name: &'static str,
    pub power_limit: PowerLimitConstraints,
    /// Draw with no process, persistence mode on (measured: H200 about 80 W, H100 about 70 W).
    pub idle_watts: f64,
    /// What a dense matmul would draw with no cap: above the maximum limit, so the cap binds at
    /// full load as on real boards.
    pub peak_demand_watts: f64,
    pub memory_total_bytes: u64,
    pub sm_clock_max_hertz: f64,
    pub sm_clock_idle_hertz: f64,
    pub memory_clock_hertz: f64,
    /// Steady-state temperature is `ambient + per_watt * power`.
    pub ambient_celsius: f64,
    pub celsius_per_watt: f64,
    /// It has a performance monitor (GPM): Hopper and newer.
    pub gpm: bool,
}

impl SimModel {
    /// H100 SXM5 80 GB: 200–700 W, default 700 W.
    pub const H100: SimModel = SimModel {
        key: "h100",
        name: "NVIDIA H100 80GB HBM3",
        power_limit: PowerLimitConstraints { min_watts: 200.0, max_watts: 700.0, default_watts: 700.0 },
        idle_watts: 70.0,
        peak_demand_watts: 760.0,
        memory_total_bytes: 81_559 * MIB,
        sm_clock_max_hertz: 1_980e6,
        sm_clock_idle_hertz: 345e6,
        memory_clock_hertz: 2_619e6,
        ambient_celsius: 28.0,
        celsius_per_watt: 0.055,
        gpm: true,
    };
    /// H200 SXM 141 GB: 200–700 W, default 700 W.
    pub const H200: SimModel = SimModel {
        key: "h200",
        name: "NVIDIA H200",
        power_limit: PowerLimitConstraints { min_watts: 200.0, max_watts: 700.0, default_watts: 700.0 },
        idle_watts: 80.0,
        peak_demand_watts: 760.0,
        memory_total_bytes: 143_771 * MIB,
        sm_clock_max_hertz: 1_980e6,
        sm_clock_idle_hertz: 345e6,
        memory_clock_hertz: 3_201e6,
        ambient_celsius: 28.0,
        celsius_per_watt: 0.052,
        gpm: true,
    };
    /// A100 SXM4 80 GB: 100–400 W, default 400 W.
    pub const A100: SimModel = SimModel {
        key: "a100",
        name: "NVIDIA A100-SXM4-80GB",
        power_limit: PowerLimitConstraints { min_watts: 100.0, max_watts: 400.0, default_watts: 400.0 },
        idle_watts: 50.0,
        peak_demand_watts: 430.0,
        memory_total_bytes: 81_920 * MIB,
        sm_clock_max_hertz: 1_410e6,
        sm_clock_idle_hertz: 210e6,
        memory_clock_hertz: 1_593e6,
        ambient_celsius: 30.0,
        celsius_per_watt: 0.085,
        gpm: false,
    };

    pub const ALL: [SimModel; 3] = [Self::H100, Self::H200, Self::A100];

    pub fn by_key(key: &str) -> Option<SimModel> {
        Self::ALL.into_iter().find(|m| m.key == key)
    }
}

/// SplitMix64: tiny, fast, and good enough for simulated noise; seeded per GPU.
#[derive(Debug, Clone)]
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    fn between(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * self.unit()
    }
}

/// What runs on a simulated GPU. The agent sets it from the shards it places on each GPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SimLoad {
    /// Nothing: the GPU idles at its model's idle draw.
    #[default]
    Idle,
    /// A Watt shard's training steps.
    Training(SimWorkload),
    /// A process Watt did not start, running flat out.
    Foreign,
}

/// The long-timescale shape of training: busy most of the time, with short stalls (data
/// loading, checkpoints, evaluation). Runs whatever the load, so readings depend only on the
/// seed, the tick count and what was set when.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Phase {
    Busy { ticks_left: u32, level: f64 },
    Stall { ticks_left: u32 },
}

/// One simulated GPU's state, advanced tick by tick. Pure: no clock, no locks.
#[derive(Debug, Clone)]
pub struct SimGpu {
    model: SimModel,
    rng: Rng,
    tick: u64,
    phase: Phase,
    /// `Some(u)` pins utilization to `u` (tests).
    utilization_override: Option<f64>,
    load: SimLoad,
    /// Tick at which the current load started: training steps count from it.
    load_since: u64,
    /// One training step, in ticks, and how many of them compute (the rest communicate).
    step_ticks: u32,
    compute_ticks: u32,
    /// Its own step, drawn from the seed, for when no job sets one.
    own_step: (u32, u32),
    power_limit_watts: f64,
    // What the driver reports, updated once per tick.
    utilization: f64,
    /// This tick's work is dense math (a training step's compute phase, someone's heavy load):
    /// tensor pipes busy; otherwise the links and memory are (an all-reduce) or nothing is.
    dense_math: bool,
    demand_watts: f64,
    power_watts: f64,
    recent_power: VecDeque<f64>,
    energy_joules: f64,
    temperature_celsius: f64,
    job_memory_bytes: u64,
    pid: u32,
    ecc: EccCounts,
}

impl SimGpu {
    pub fn new(model: SimModel, seed: u64, index: u32) -> Self {
        let mut rng = Rng(seed ^ (u64::from(index) + 1).wrapping_mul(0xD134_2543_DE82_EF95));
        let job_memory_bytes = (model.memory_total_bytes as f64 * rng.between(0.55, 0.9)) as u64;
        let pid = 10_000 + (rng.next_u64() % 50_000) as u32;
        let first_busy = (rng.between(50.0, 600.0)) as u32;
        // A step of 0.5–2 s, 60–80% of it compute: power swings at 0.5–2 Hz.
        let step_ticks = rng.between(5.0, 20.99) as u32;
        let compute_ticks = ((f64::from(step_ticks) * rng.between(0.6, 0.8)).round() as u32).clamp(1, step_ticks - 1);
        let mut gpu = SimGpu {
            model,
            rng,
            tick: 0,
            phase: Phase::Busy { ticks_left: first_busy, level: 0.97 },
            utilization_override: None,
            load: SimLoad::Idle,
            load_since: 0,
            step_ticks,
            compute_ticks,
            own_step: (step_ticks, compute_ticks),
            power_limit_watts: model.power_limit.default_watts,
            utilization: 0.0,
            dense_math: false,
            demand_watts: model.idle_watts,
            power_watts: model.idle_watts,
            recent_power: VecDeque::with_capacity(10),
            energy_joules: 0.0,
            temperature_celsius: model.ambient_celsius + model.celsius_per_watt * model.idle_watts,
            job_memory_bytes,
            pid,
            ecc: EccCounts::default(),
        };
        gpu.recent_power.push_back(gpu.power_watts);
        gpu
    }

    pub fn model(&self) -> &SimModel {
        &self.model
    }

    /// Ticks stepped so far.
    pub fn tick(&self) -> u64 {
        self.tick
    }

    /// Step the driver forward until `tick` ticks have passed. Never goes back.
    pub fn advance_to(&mut self, tick: u64) {
        while self.tick < tick {
            self.step();
        }
    }

    /// One 100 ms driver update. Each step draws the same number of random values whatever
    /// the state, so the readings depend on the seed and the tick count only.
    fn step(&mut self) {
        let phase_draw = self.rng.unit();
        let length_draw = self.rng.unit();
        let jitter = self.rng.between(-1.0, 1.0);
        let regulation = self.rng.unit();

        self.phase = match self.phase {
            Phase::Busy { ticks_left: 0, .. } => Phase::Stall { ticks_left: 20 + (length_draw * 80.0) as u32 },
            Phase::Stall { ticks_left: 0 } => {
                Phase::Busy { ticks_left: 200 + (length_draw * 1_000.0) as u32, level: 0.9 + 0.1 * phase_draw }
            }
            Phase::Busy { ticks_left, level } => Phase::Busy { ticks_left: ticks_left - 1, level },
            Phase::Stall { ticks_left } => Phase::Stall { ticks_left: ticks_left - 1 },
        };
        let in_step = (self.tick - self.load_since) % u64::from(self.step_ticks);
        let computing = in_step < u64::from(self.compute_ticks);
        let utilization = match (self.utilization_override, self.load, self.phase) {
            (Some(u), _, _) => u,
            (None, SimLoad::Idle, _) => 0.0,
            (None, SimLoad::Foreign, _) => (0.95 + 0.02 * jitter).clamp(0.0, 1.0),
            (None, SimLoad::Training(_), Phase::Stall { .. }) => (0.04 + 0.04 * jitter).clamp(0.0, 1.0),
            (None, SimLoad::Training(_), Phase::Busy { level, .. }) if computing => {
                (level + 0.02 * jitter).clamp(0.0, 1.0)
            }
            // The step's all-reduce: links busy, tensor cores mostly waiting.
            (None, SimLoad::Training(_), Phase::Busy { .. }) => (0.3 + 0.03 * jitter).clamp(0.0, 1.0),
        };

        self.dense_math = match (self.utilization_override, self.load, self.phase) {
            (Some(u), _, _) => u >= 0.5,
            (None, SimLoad::Foreign, _) => true,
            (None, SimLoad::Training(_), Phase::Busy { .. }) => computing,
            _ => false,
        };
        let m = &self.model;
        let share = match self.load {
            SimLoad::Training(workload) => workload.demand_share(),
            SimLoad::Idle | SimLoad::Foreign => 1.0,
        };
        let dynamic = (m.peak_demand_watts - m.idle_watts) * share * utilization.powf(0.9);
        self.utilization = utilization;
        self.demand_watts = (m.idle_watts * (1.0 + 0.01 * jitter) + dynamic * (1.0 + 0.015 * jitter)).max(0.0);
        // The driver's power controller holds draw at or just under the limit when it binds.
        self.power_watts = if self.demand_watts > self.power_limit_watts {
            self.power_limit_watts * (1.0 - 0.012 * regulation)
        } else {
            self.demand_watts
        };
        self.energy_joules += self.power_watts * TICK_SECONDS;
        if self.recent_power.len() == 10 {
            self.recent_power.pop_front();
        }
        self.recent_power.push_back(self.power_watts);

        // First-order thermal lag toward the steady state for this draw (time constant 30 s).
        let target = m.ambient_celsius + m.celsius_per_watt * self.power_watts;
        let alpha = 1.0 - (-TICK_SECONDS / 30.0f64).exp();
        self.temperature_celsius += (target - self.temperature_celsius) * alpha;
        self.tick += 1;
    }

    pub fn set_power_limit(&mut self, watts: f64) {
        self.power_limit_watts = watts;
    }

    pub fn power_limit_watts(&self) -> f64 {
        self.power_limit_watts
    }

    /// Pin utilization to `u` in [0, 1], or give control back to the load.
    pub fn set_utilization(&mut self, u: Option<f64>) {
        self.utilization_override = u.map(|u| u.clamp(0.0, 1.0));
    }

    /// The training step's length in ticks, as a synchronous job sets it for all its GPUs (70%
    /// of it compute); `None`: the GPU's own.
    pub fn set_step_ticks(&mut self, ticks: Option<u32>) {
        (self.step_ticks, self.compute_ticks) = match ticks {
            Some(t) => {
                let t = t.clamp(2, 600);
                (t, ((f64::from(t) * 0.7).round() as u32).clamp(1, t - 1))
            }
            None => self.own_step,
        };
    }

    /// What runs on the GPU from the next tick on.
    pub fn set_load(&mut self, load: SimLoad) {
        if load != self.load {
            self.load = load;
            self.load_since = self.tick;
        }
    }

    pub fn load(&self) -> SimLoad {
        self.load
    }

    pub fn add_ecc_errors(&mut self, corrected: u64, uncorrected: u64) {
        self.ecc.corrected += corrected;
        self.ecc.uncorrected += uncorrected;
    }

    pub fn energy_joules(&self) -> f64 {
        self.energy_joules
    }

    pub fn power_watts(&self) -> f64 {
        self.power_watts
    }

    /// What the driver would report now.
    pub fn read(&self, detail: Detail) -> GpuSample {
        let m = &self.model;
        let busy = self.utilization > 0.05;
        let cap_binds = self.demand_watts > self.power_limit_watts;
        let mut reasons = ThrottleReasons::default();
        if cap_binds {
            reasons = reasons.with(ThrottleReasons::SW_POWER_CAP);
        }
        if !busy {
            reasons = reasons.with(ThrottleReasons::GPU_IDLE);
        }
        // Dynamic power goes roughly with f·V², and V with f: clocks fall as the cube root of the
        // share of dynamic power the cap leaves.
        let sm_clock = if !busy {
            m.sm_clock_idle_hertz
        } else if cap_binds {
            let share = (self.power_watts - m.idle_watts) / (self.demand_watts - m.idle_watts);
            m.sm_clock_max_hertz * share.clamp(0.0, 1.0).cbrt()
        } else {
            m.sm_clock_max_hertz
        };
        let has_job = match self.utilization_override {
            Some(u) => u > 0.0,
            None => self.load != SimLoad::Idle,
        };
        // The driver and context reserve ~0.5 GiB even with no process.
        let memory_used = if has_job { self.job_memory_bytes } else { 512 * MIB };
        let average = self.recent_power.iter().sum::<f64>() / self.recent_power.len() as f64;

        let mut sample = GpuSample {
            power_watts: self.power_watts,
            power_average_watts: Some(average),
            utilization_ratio: self.utilization,
            memory_utilization_ratio: (self.utilization * 0.62).clamp(0.0, 1.0),
            memory_used_bytes: memory_used,
            memory_total_bytes: m.memory_total_bytes,
            temperature_celsius: self.temperature_celsius.round(),
            memory_temperature_celsius: Some((self.temperature_celsius + 6.0).round()),
            sm_clock_hertz: (sm_clock / 1e6).round() * 1e6,
            memory_clock_hertz: m.memory_clock_hertz,
            throttle_reasons: reasons,
            ..GpuSample::default()
        };
        if detail == Detail::Full {
            sample.energy_joules = Some(self.energy_joules);
            sample.power_limit_watts = Some(self.power_limit_watts);
            sample.enforced_power_limit_watts = Some(self.power_limit_watts);
            sample.pcie = Some(PcieThroughput {
                tx_bytes_per_second: self.utilization * 1.8e9,
                rx_bytes_per_second: self.utilization * 2.4e9,
            });
            sample.ecc = Some(self.ecc);
            let workload = match self.load {
                SimLoad::Training(workload) => workload,
                SimLoad::Idle | SimLoad::Foreign => SimWorkload::ComputeBound,
            };
            sample.activity = self.model.gpm.then(|| workload.activity(self.utilization, self.dense_math));
            sample.processes = Some(if has_job {
                vec![GpuProcess { pid: self.pid, used_memory_bytes: Some(self.job_memory_bytes - 512 * MIB) }]
            } else {
                Vec::new()
            });
        }
        sample
    }
}

/// Faults a test can switch on for one GPU.
#[derive(Debug, Default)]
pub struct SimFaults {
    /// Every call on this GPU fails with [`GpuError::Lost`].
    pub lost: AtomicBool,
    /// `set_power_limit` fails with [`GpuError::Refused`].
    pub refuse_set: AtomicBool,
    /// Someone else's process runs here (see [`SimBackend::set_foreign`]).
    foreign: AtomicBool,
}

/// How often each method was called, for tests that assert what the agent did.
#[derive(Debug, Default)]
pub struct SimCallCounts {
    pub sample_fast: AtomicU64,
    pub sample_full: AtomicU64,
    pub set_power_limit: AtomicU64,
}

#[derive(Debug)]
struct SimSlot {
    gpu: Mutex<SimGpu>,
    faults: SimFaults,
}

/// A node of simulated GPUs on a clock that starts when the backend is built.
#[derive(Debug)]
pub struct SimBackend {
    started: Instant,
    infos: Vec<GpuInfo>,
    slots: Vec<SimSlot>,
    events: Mutex<VecDeque<GpuEvent>>,
    event_ready: Condvar,
    calls: SimCallCounts,
}

impl SimBackend {
    /// `count` GPUs of `model`, their noise and workload drawn from `seed`.
    pub fn new(model: SimModel, count: u32, seed: u64) -> Self {
        let infos = (0..count)
            .map(|index| GpuInfo {
                index,
                uuid: sim_uuid(seed, index),
                model: model.name.to_string(),
                pci_bus_id: format!("00000000:{:02X}:00.0", 0x18 + index * 0x10 % 0xe0),
                device: format!("nvidia{index}"),
                memory_total_bytes: model.memory_total_bytes,
                power_limit: model.power_limit,
            })
            .collect();
        let slots = (0..count)
            .map(|index| SimSlot { gpu: Mutex::new(SimGpu::new(model, seed, index)), faults: SimFaults::default() })
            .collect();
        SimBackend {
            started: Instant::now(),
            infos,
            slots,
            events: Mutex::new(VecDeque::new()),
            event_ready: Condvar::new(),
            calls: SimCallCounts::default(),
        }
    }

    pub fn faults(&self, index: u32) -> &SimFaults {
        &self.slots[index as usize].faults
    }

    pub fn calls(&self) -> &SimCallCounts {
        &self.calls
    }

    /// Pin a GPU's utilization, or hand it back to its load with `None`.
    pub fn set_utilization(&self, index: u32, utilization: Option<f64>) {
        if let Some(slot) = self.slots.get(index as usize) {
            lock(&slot.gpu).set_utilization(utilization);
        }
    }

    /// Set what runs on a GPU: from now on, its readings follow that load. A GPU marked as
    /// running someone else's process ([`SimBackend::set_foreign`]) keeps it while no Watt shard
    /// is on it.
    pub fn set_training(&self, index: u32, training: Option<SimWorkload>) {
        self.set_training_steps(index, training, None);
    }

    /// The same, with the job's step length in ticks (`None`: the GPU's own): the GPUs of a
    /// synchronous job step together, so its power swings at its step rate.
    pub fn set_training_steps(&self, index: u32, training: Option<SimWorkload>, step_ticks: Option<u32>) {
        if let Some(slot) = self.slots.get(index as usize) {
            let ticks = self.ticks_now();
            let mut gpu = lock(&slot.gpu);
            gpu.advance_to(ticks);
            gpu.set_step_ticks(step_ticks);
            let foreign = slot.faults.foreign.load(Ordering::Relaxed);
            gpu.set_load(match (training, foreign) {
                (Some(workload), _) => SimLoad::Training(workload),
                (None, true) => SimLoad::Foreign,
                (None, false) => SimLoad::Idle,
            });
        }
    }

    /// A process Watt did not start runs on this GPU (or no longer does).
    pub fn set_foreign(&self, index: u32, foreign: bool) {
        if let Some(slot) = self.slots.get(index as usize) {
            slot.faults.foreign.store(foreign, Ordering::Relaxed);
            let training = match lock(&slot.gpu).load() {
                SimLoad::Training(workload) => Some(workload),
                SimLoad::Idle | SimLoad::Foreign => None,
            };
            self.set_training(index, training);
        }
    }

    /// Raise an XID error on a GPU, as the driver would.
    pub fn inject_xid(&self, index: u32, code: u64) {
        lock(&self.events).push_back(GpuEvent::Xid { index, code });
        self.event_ready.notify_all();
    }

    pub fn inject_ecc_errors(&self, index: u32, corrected: u64, uncorrected: u64) {
        if let Some(slot) = self.slots.get(index as usize) {
            lock(&slot.gpu).add_ecc_errors(corrected, uncorrected);
        }
    }

    fn ticks_now(&self) -> u64 {
        (self.started.elapsed().as_millis() / TICK.as_millis()) as u64
    }

    /// The GPU, stepped to now, or the error a real driver would give.
    fn gpu(&self, index: u32) -> Result<MutexGuard<'_, SimGpu>, GpuError> {
        let slot = self.slots.get(index as usize).ok_or(GpuError::NoSuchGpu { index })?;
        if slot.faults.lost.load(Ordering::Relaxed) {
            return Err(GpuError::Lost { index });
        }
        let mut gpu = lock(&slot.gpu);
        gpu.advance_to(self.ticks_now());
        Ok(gpu)
    }
}

impl GpuBackend for SimBackend {
    fn kind(&self) -> &'static str {
        "sim"
    }

    fn gpus(&self) -> &[GpuInfo] {
        &self.infos
    }

    fn sample(&self, index: u32, detail: Detail) -> Result<GpuSample, GpuError> {
        let counter = match detail {
            Detail::Fast => &self.calls.sample_fast,
            Detail::Full => &self.calls.sample_full,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        Ok(self.gpu(index)?.read(detail))
    }

    fn power_limit_constraints(&self, index: u32) -> Result<PowerLimitConstraints, GpuError> {
        Ok(self.gpu(index)?.model().power_limit)
    }

    fn power_limit(&self, index: u32) -> Result<f64, GpuError> {
        Ok(self.gpu(index)?.power_limit_watts())
    }

    fn set_power_limit(&self, index: u32, watts: f64) -> Result<(), GpuError> {
        self.calls.set_power_limit.fetch_add(1, Ordering::Relaxed);
        let mut gpu = self.gpu(index)?;
        gpu.model().power_limit.check(index, watts)?;
        if self.slots[index as usize].faults.refuse_set.load(Ordering::Relaxed) {
            return Err(GpuError::Refused { index, reason: "Insufficient Permissions (simulated)".into() });
        }
        gpu.set_power_limit(watts);
        Ok(())
    }

    fn wait_event(&self, timeout: Duration) -> Result<Option<GpuEvent>, GpuError> {
        let queue = lock(&self.events);
        let (mut queue, _) = self
            .event_ready
            .wait_timeout_while(queue, timeout, |q| q.is_empty())
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        Ok(queue.pop_front())
    }
}

/// A stable, UUID-shaped identifier per (seed, index), prefixed like NVML's.
fn sim_uuid(seed: u64, index: u32) -> String {
    let mut rng = Rng(seed.wrapping_mul(31).wrapping_add(u64::from(index)));
    let (a, b) = (rng.next_u64(), rng.next_u64());
    format!(
        "GPU-{:08x}-{:04x}-{:04x}-{:04x}-{:012x}",
        a >> 32,
        (a >> 16) & 0xffff,
        a & 0xffff,
        b >> 48,
        b & 0xffff_ffff_ffff
    )
}

/// A poisoned lock here only means another thread panicked mid-read of plain numbers; the data
/// is still usable, so recover instead of spreading the panic.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn models_have_the_real_cap_ranges() {
        for (key, min, max) in [("h100", 200.0, 700.0), ("h200", 200.0, 700.0), ("a100", 100.0, 400.0)] {
            let m = SimModel::by_key(key).unwrap();
            assert_eq!((m.power_limit.min_watts, m.power_limit.max_watts), (min, max), "{key}");
            assert_eq!(m.power_limit.default_watts, max, "{key}");
        }
        assert!(SimModel::by_key("v100").is_none());
    }

    #[test]
    fn full_load_binds_the_cap_and_sets_the_sw_power_cap_reason() {
        let mut gpu = SimGpu::new(SimModel::H100, 7, 0);
        gpu.set_utilization(Some(1.0));
        gpu.set_power_limit(450.0);
        gpu.advance_to(50);
        let s = gpu.read(Detail::Full);
        assert!(s.power_watts <= 450.0 && s.power_watts > 440.0, "{}", s.power_watts);
        assert!(s.throttle_reasons.contains(ThrottleReasons::SW_POWER_CAP));
        assert!(s.sm_clock_hertz < SimModel::H100.sm_clock_max_hertz);
        assert_eq!(s.power_limit_watts, Some(450.0));
    }

    #[test]
    fn idle_gpu_draws_idle_power_and_says_so() {
        let mut gpu = SimGpu::new(SimModel::A100, 7, 0);
        gpu.set_utilization(Some(0.0));
        gpu.advance_to(20);
        let s = gpu.read(Detail::Full);
        assert!((s.power_watts - SimModel::A100.idle_watts).abs() < 2.0, "{}", s.power_watts);
        assert!(s.throttle_reasons.contains(ThrottleReasons::GPU_IDLE));
        assert!(!s.throttle_reasons.contains(ThrottleReasons::SW_POWER_CAP));
        assert_eq!(s.processes, Some(vec![]));
        assert_eq!(s.sm_clock_hertz, SimModel::A100.sm_clock_idle_hertz);
    }

    #[test]
    fn a_gpu_without_work_idles_far_below_any_cap() {
        for model in SimModel::ALL {
            let mut gpu = SimGpu::new(model, 11, 2);
            gpu.advance_to(600);
            let s = gpu.read(Detail::Full);
            assert!((s.power_watts - model.idle_watts).abs() < 2.0, "{}: {}", model.key, s.power_watts);
            assert!(s.power_watts < model.power_limit.min_watts * 0.6, "{}", model.key);
            assert!(s.utilization_ratio < 0.01 && s.processes == Some(vec![]), "{s:?}");
        }
        assert_eq!(
            (SimModel::H100.idle_watts, SimModel::H200.idle_watts, SimModel::A100.idle_watts),
            (70.0, 80.0, 50.0)
        );
    }

    /// Power swings of a training GPU: the number of rises through the midpoint per second.
    fn training_trace(seed: u64, index: u32, cap: f64, ticks: u64) -> Vec<f64> {
        let mut gpu = SimGpu::new(SimModel::H100, seed, index);
        gpu.set_power_limit(cap);
        gpu.advance_to(5);
        gpu.set_load(SimLoad::Training(SimWorkload::Balanced));
        (0..ticks)
            .map(|_| {
                gpu.advance_to(gpu.tick() + 1);
                gpu.power_watts()
            })
            .collect()
    }

    /// Mean tensor and DRAM activity of a GPU running `workload` over 60 s of steps, and its
    /// highest draw uncapped.
    fn profile(workload: SimWorkload) -> (f64, f64, f64) {
        let mut gpu = SimGpu::new(SimModel::H200, 3, 0);
        gpu.advance_to(20);
        gpu.set_load(SimLoad::Training(workload));
        let (mut tensor, mut dram, mut top) = (0.0, 0.0, 0.0f64);
        for tick in 21..621 {
            gpu.advance_to(tick);
            let s = gpu.read(Detail::Full);
            let a = s.activity.unwrap();
            for share in [a.sm_active, a.sm_occupancy, a.tensor_active, a.dram_active, a.fp16_active, a.fp32_active] {
                assert!((0.0..=1.0).contains(&share), "{a:?}");
            }
            tensor += a.tensor_active / 600.0;
            dram += a.dram_active / 600.0;
            top = top.max(s.power_watts);
        }
        (tensor, dram, top)
    }

    #[test]
    fn the_activity_counters_follow_the_load_and_exist_only_with_gpm() {
        let mut gpu = SimGpu::new(SimModel::H200, 3, 0);
        gpu.advance_to(20);
        let idle = gpu.read(Detail::Full).activity.expect("an H200 has GPM");
        assert!(idle.sm_active < 0.01 && idle.tensor_active < 0.01, "{idle:?}");
        assert_eq!(gpu.read(Detail::Fast).activity, None, "read on full samples only");
        gpu.set_load(SimLoad::Training(SimWorkload::ComputeBound));
        // Over a few steps: compute phases keep the tensor pipes busy, all-reduces the memory.
        let (mut dense, mut reduce) = (0.0f64, 0.0f64);
        for tick in 21..200 {
            gpu.advance_to(tick);
            let a = gpu.read(Detail::Full).activity.unwrap();
            if a.tensor_active > 0.8 {
                dense = dense.max(a.tensor_active);
                assert!(a.dram_active < 0.2, "{a:?}");
            } else if a.sm_active > 0.2 {
                reduce = reduce.max(a.dram_active);
                assert!(a.tensor_active < 0.05, "{a:?}");
            }
        }
        assert!(dense > 0.85 && reduce > 0.25, "tensor {dense}, memory in all-reduces {reduce}");
        let mut old = SimGpu::new(SimModel::A100, 3, 0);
        old.advance_to(5);
        assert_eq!(old.read(Detail::Full).activity, None, "an A100 has no GPM");
    }

    #[test]
    fn each_workload_shows_its_bound_in_the_counters_and_its_curve() {
        let (compute, balanced, memory) =
            (profile(SimWorkload::ComputeBound), profile(SimWorkload::Balanced), profile(SimWorkload::MemoryBound));
        let boundness = |(tensor, dram, _): (f64, f64, f64)| tensor / (tensor + dram);
        assert!(boundness(compute) > 0.65, "{compute:?}");
        assert!((0.35..0.6).contains(&boundness(balanced)), "{balanced:?}");
        assert!(boundness(memory) < 0.3, "{memory:?}");
        assert!(compute.2 > 690.0 && memory.2 < 600.0, "a memory-bound step draws less uncapped: {memory:?}");
        // The true curves: at 70% of the maximum cap, 0.82 / 0.90 / 0.97 of full speed.
        let at = |w: SimWorkload| w.curve().speed(490.0, 700.0);
        assert!((at(SimWorkload::ComputeBound) - 0.822).abs() < 0.005);
        assert!((at(SimWorkload::Balanced) - 0.9).abs() < 1e-9);
        assert!(at(SimWorkload::MemoryBound) > 0.97);
        assert_eq!(SimWorkload::parse("memory-bound"), Some(SimWorkload::MemoryBound));
        assert_eq!(SimWorkload::parse("compute-bound"), Some(SimWorkload::ComputeBound));
        assert_eq!(SimWorkload::parse("balanced"), Some(SimWorkload::Balanced));
        assert_eq!(SimWorkload::parse("fast"), None);
    }

    #[test]
    fn a_training_shard_swings_between_its_cap_and_its_communication_phase_at_half_to_two_hertz() {
        for (seed, index) in [(1, 0), (7, 3), (42, 5), (1234, 7)] {
            let trace = training_trace(seed, index, 700.0, 3_000);
            let top = trace.iter().copied().fold(f64::MIN, f64::max);
            assert!(top > 680.0 && top <= 700.0, "compute reaches the cap: {top}");
            // Outside stalls: a phase near the cap and one well below it, every step.
            let busy: Vec<f64> = trace.iter().copied().filter(|&w| w > 200.0).collect();
            let low = busy.iter().copied().fold(f64::MAX, f64::min);
            assert!(low < 400.0, "communication well below the cap: {low}");
            let mid = 0.5 * (top + low);
            let rises = trace.windows(2).filter(|w| w[0] < mid && w[1] >= mid).count();
            let hertz = rises as f64 / (trace.len() as f64 / 10.0);
            assert!((0.4..=2.1).contains(&hertz), "seed {seed}: {hertz} Hz");
        }
        assert_eq!(training_trace(9, 1, 500.0, 400), training_trace(9, 1, 500.0, 400), "deterministic by seed");
        assert_ne!(training_trace(9, 1, 500.0, 400), training_trace(10, 1, 500.0, 400));
        assert!(training_trace(9, 1, 450.0, 400).iter().all(|&w| w <= 450.0), "never above its cap");
    }

    #[test]
    fn the_backend_follows_the_work_placed_on_each_gpu() {
        let backend = SimBackend::new(SimModel::H200, 4, 5);
        backend.set_training(1, Some(SimWorkload::MemoryBound));
        backend.set_foreign(2, true);
        let gpu = |i: u32| lock(&backend.slots[i as usize].gpu).load();
        assert_eq!(
            [gpu(0), gpu(1), gpu(2), gpu(3)],
            [SimLoad::Idle, SimLoad::Training(SimWorkload::MemoryBound), SimLoad::Foreign, SimLoad::Idle]
        );
        backend.set_training(2, Some(SimWorkload::Balanced));
        assert_eq!(gpu(2), SimLoad::Training(SimWorkload::Balanced), "a Watt shard placed there runs");
        backend.set_training(2, None);
        assert_eq!(gpu(2), SimLoad::Foreign, "the other process is still there");
        backend.set_training(1, None);
        assert_eq!(gpu(1), SimLoad::Idle);
    }

    #[test]
    fn temperature_follows_power() {
        let mut hot = SimGpu::new(SimModel::H200, 1, 0);
        let mut cold = SimGpu::new(SimModel::H200, 1, 0);
        hot.set_utilization(Some(1.0));
        cold.set_utilization(Some(0.0));
        hot.advance_to(3_000);
        cold.advance_to(3_000);
        let (h, c) = (hot.read(Detail::Fast), cold.read(Detail::Fast));
        assert!(h.temperature_celsius > c.temperature_celsius + 20.0, "{h:?} vs {c:?}");
    }

    #[test]
    fn backend_rejects_out_of_range_limits_without_clamping() {
        let backend = SimBackend::new(SimModel::H100, 2, 3);
        let err = backend.set_power_limit(1, 800.0).unwrap_err();
        assert!(matches!(err, GpuError::LimitOutOfRange { index: 1, .. }), "{err}");
        let full = backend.sample(1, Detail::Full).unwrap();
        assert_eq!(full.power_limit_watts, Some(700.0), "an out-of-range order must change nothing");
        backend.set_power_limit(1, 300.0).unwrap();
        assert_eq!(backend.sample(1, Detail::Full).unwrap().power_limit_watts, Some(300.0));
        assert_eq!(backend.calls().set_power_limit.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn injected_faults_surface_as_driver_errors() {
        let backend = SimBackend::new(SimModel::H100, 2, 3);
        backend.faults(0).lost.store(true, Ordering::Relaxed);
        assert!(matches!(backend.sample(0, Detail::Fast), Err(GpuError::Lost { index: 0 })));
        assert!(backend.sample(1, Detail::Fast).is_ok(), "the other GPU keeps answering");
        backend.faults(1).refuse_set.store(true, Ordering::Relaxed);
        assert!(matches!(backend.set_power_limit(1, 500.0), Err(GpuError::Refused { index: 1, .. })));
        assert!(matches!(backend.sample(9, Detail::Fast), Err(GpuError::NoSuchGpu { index: 9 })));
        backend.inject_xid(1, 79);
        assert_eq!(backend.wait_event(Duration::from_millis(10)).unwrap(), Some(GpuEvent::Xid { index: 1, code: 79 }));
        assert_eq!(backend.wait_event(Duration::from_millis(10)).unwrap(), None);
    }

    #[test]
    fn uuids_are_distinct_and_nvml_shaped() {
        let backend = SimBackend::new(SimModel::H100, 8, 42);
        let mut uuids: Vec<_> = backend.gpus().iter().map(|g| g.uuid.clone()).collect();
        assert!(uuids.iter().all(|u| u.starts_with("GPU-") && u.len() == 40), "{uuids:?}");
        uuids.dedup();
        assert_eq!(uuids.len(), 8);
    }

    /// One step of a random schedule: ticks to advance, a new limit, a new utilization override.
    type Step = (u64, Option<f64>, Option<Option<f64>>);

    fn schedule() -> impl Strategy<Value = Vec<Step>> {
        prop::collection::vec(
            (1u64..400, prop::option::of(200.0f64..=700.0), prop::option::of(prop::option::of(0.0f64..=1.0))),
            1..30,
        )
    }

    fn run(seed: u64, plan: &[Step]) -> Vec<(f64, f64, f64)> {
        let mut gpu = SimGpu::new(SimModel::H100, seed, 0);
        let mut readings = Vec::new();
        for &(ticks, limit, util) in plan {
            if let Some(limit) = limit {
                gpu.set_power_limit(limit);
            }
            if let Some(util) = util {
                gpu.set_utilization(util);
            }
            for _ in 0..ticks {
                gpu.advance_to(gpu.tick() + 1);
                readings.push((gpu.power_watts(), gpu.power_limit_watts(), gpu.energy_joules()));
            }
        }
        readings
    }

    proptest! {
        #[test]
        fn power_never_exceeds_the_cap(seed in any::<u64>(), plan in schedule()) {
            for (power, cap, _) in run(seed, &plan) {
                prop_assert!(power <= cap, "power {power} W above cap {cap} W");
                prop_assert!(power >= 0.0);
            }
        }

        #[test]
        fn energy_is_monotone_and_the_integral_of_power(seed in any::<u64>(), plan in schedule()) {
            let readings = run(seed, &plan);
            let mut integral = 0.0;
            let mut last_energy = 0.0;
            for (power, _, energy) in readings {
                integral += power * TICK_SECONDS;
                prop_assert!(energy >= last_energy, "energy went back: {last_energy} -> {energy}");
                last_energy = energy;
            }
            prop_assert!((last_energy - integral).abs() <= 0.01 * integral, "energy {last_energy} J vs integral {integral} J");
        }

        #[test]
        fn readings_depend_on_seed_and_ticks_only(seed in any::<u64>(), plan in schedule(), stride in 1u64..50) {
            // Read the same GPU every tick and every `stride` ticks: the end state is identical.
            let total: u64 = plan.iter().map(|p| p.0).sum();
            let mut every = SimGpu::new(SimModel::H100, seed, 3);
            let mut sparse = SimGpu::new(SimModel::H100, seed, 3);
            for t in 1..=total {
                every.advance_to(t);
                if t % stride == 0 { sparse.advance_to(t); }
            }
            sparse.advance_to(total);
            prop_assert_eq!(every.read(Detail::Full), sparse.read(Detail::Full));
            prop_assert_eq!(run(seed, &plan), run(seed, &plan));
        }
    }

    #[test]
    fn different_seeds_give_different_nodes() {
        let mut a = SimGpu::new(SimModel::H100, 1, 0);
        let mut b = SimGpu::new(SimModel::H100, 2, 0);
        a.advance_to(100);
        b.advance_to(100);
        assert_ne!(a.read(Detail::Full), b.read(Detail::Full));
    }
}
