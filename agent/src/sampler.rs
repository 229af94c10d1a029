//! The sampler: reads every GPU (and the host) on a fixed interval and publishes one immutable
//! [`NodeSnapshot`] per round for the exporter and, later, the controller session.
//!
//! GPU calls block, so each round runs on tokio's blocking pool; the async side only keeps time.
//! Cheap fields are read every round, costly ones every `full_every` rounds (see
//! [`Detail`]); between two energy-counter reads the counter is carried forward by integrating
//! power, so `watt_gpu_energy_joules_total` moves every round without paying ~4 ms per GPU.
//! A GPU whose read fails is published as down, with no values: never a frozen last reading.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime};

use prometheus::Histogram;
use tokio::sync::watch;
use tokio::time::{Instant, MissedTickBehavior};

use crate::gpu::{Detail, GpuBackend, GpuEvent, GpuInfo, GpuSample};
use crate::host::{HostReading, HostSampler};
use crate::powercap::{NodePower, Powercap};

/// Everything read in one round.
#[derive(Debug, Clone)]
pub struct NodeSnapshot {
    /// When the round started, on tokio's clock (pausable in tests).
    pub taken_at: Instant,
    /// The same instant as Unix milliseconds, for the wire.
    pub unix_ms: i64,
    pub inventory: Arc<[GpuInfo]>,
    /// One entry per GPU in `inventory`, same order.
    pub gpus: Vec<GpuReading>,
    pub host: Option<HostReading>,
    /// The node's non-GPU draw, when anything of it is known (read with the host).
    pub node_power: Option<NodePower>,
    /// Rounds completed since start, this one included.
    pub round: u64,
}

impl NodeSnapshot {
    /// The snapshot published before the first round: every GPU unknown, hence down.
    pub fn empty(inventory: Arc<[GpuInfo]>) -> Self {
        let gpus = inventory.iter().map(|_| GpuReading::default()).collect();
        NodeSnapshot {
            taken_at: Instant::now(),
            unix_ms: unix_ms_now(),
            inventory,
            gpus,
            host: None,
            node_power: None,
            round: 0,
        }
    }
}

/// One GPU in one round.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GpuReading {
    /// `Some` when the GPU answered this round. The `Full` fields carry the last full read.
    pub sample: Option<GpuSample>,
    /// Why the GPU did not answer, when it did not.
    pub error: Option<String>,
    /// Monotone energy counter: the driver's last reading plus power integrated since.
    pub energy_joules_total: Option<f64>,
    pub read_errors_total: u64,
    pub xid_errors_total: u64,
    pub last_xid: Option<u64>,
}

/// Carries the driver's energy counter forward between its (costly) reads.
///
/// Reported = max(previous reported, last driver reading + ∫ power since it). Between reads it
/// rises with power; at a read it snaps to the driver's value unless that would go backwards,
/// in which case it holds until the driver catches up. A driver counter that goes back (driver
/// reload) is followed, and Prometheus sees an ordinary counter reset.
#[derive(Debug, Clone, Default)]
pub struct EnergyCounter {
    driver_joules: Option<f64>,
    since_joules: f64,
    reported_joules: f64,
    last_power: Option<(Instant, f64)>,
}

impl EnergyCounter {
    pub fn observe(&mut self, at: Instant, power_watts: f64, driver_joules: Option<f64>) -> Option<f64> {
        if let Some((t0, p0)) = self.last_power {
            let dt = at.saturating_duration_since(t0).as_secs_f64();
            self.since_joules += 0.5 * (p0 + power_watts) * dt;
        }
        self.last_power = Some((at, power_watts));
        if let Some(driver) = driver_joules {
            if self.driver_joules.is_some_and(|prev| driver < prev) {
                self.reported_joules = driver;
            }
            self.driver_joules = Some(driver);
            self.since_joules = 0.0;
        }
        let base = self.driver_joules?;
        self.reported_joules = self.reported_joules.max(base + self.since_joules);
        Some(self.reported_joules)
    }

    /// Forget the power history (after a gap in readings, integrating across it would guess).
    pub fn interrupt(&mut self) {
        self.last_power = None;
    }
}

#[derive(Debug, Default)]
struct GpuTrack {
    /// Last `Full` read, whose costly fields ride along with the next fast reads.
    last_full: Option<GpuSample>,
    energy: EnergyCounter,
    read_errors: u64,
    /// Read in full next round (first round, and after a failure).
    needs_full: bool,
    /// The last read failed; log transitions only, not every failed round.
    down: bool,
}

/// XID errors seen by the event thread, per GPU.
#[derive(Debug, Default)]
pub struct XidLog {
    per_gpu: Mutex<Vec<(u64, Option<u64>)>>,
}

impl XidLog {
    pub fn new(gpus: usize) -> Self {
        XidLog { per_gpu: Mutex::new(vec![(0, None); gpus]) }
    }

    pub fn record(&self, index: u32, code: u64) {
        let mut per_gpu = self.per_gpu.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(slot) = per_gpu.get_mut(index as usize) {
            slot.0 += 1;
            slot.1 = Some(code);
        }
    }

    /// (count, last code) for a GPU.
    pub fn get(&self, index: u32) -> (u64, Option<u64>) {
        let per_gpu = self.per_gpu.lock().unwrap_or_else(|p| p.into_inner());
        per_gpu.get(index as usize).copied().unwrap_or_default()
    }
}

/// Reads a node. Owned by one round at a time.
#[derive(Debug)]
pub struct Sampler {
    backend: Arc<dyn GpuBackend>,
    inventory: Arc<[GpuInfo]>,
    tracks: Vec<GpuTrack>,
    full_every: u64,
    host_every: u64,
    round: u64,
    host: HostSampler,
    last_host: Option<HostReading>,
    powercap: Option<Powercap>,
    last_node_power: Option<NodePower>,
    xids: Arc<XidLog>,
    duration: Option<Histogram>,
    /// Set by the enforcer after it changes limits: read everything in full next round.
    limits_changed: Arc<AtomicBool>,
}

impl Sampler {
    /// `full_every`: rounds between costly reads; `host_every`: rounds between host reads.
    pub fn new(backend: Arc<dyn GpuBackend>, full_every: u64, host_every: u64, xids: Arc<XidLog>) -> Self {
        let inventory: Arc<[GpuInfo]> = backend.gpus().to_vec().into();
        let tracks = inventory.iter().map(|_| GpuTrack { needs_full: true, ..GpuTrack::default() }).collect();
        Sampler {
            backend,
            inventory,
            tracks,
            full_every: full_every.max(1),
            host_every: host_every.max(1),
            round: 0,
            host: HostSampler::new(),
            last_host: None,
            powercap: None,
            last_node_power: None,
            xids,
            duration: None,
            limits_changed: Arc::default(),
        }
    }

    /// Read in full on the round after `flag` is set (the enforcer sets it on every change).
    pub fn with_limits_changed(mut self, flag: Arc<AtomicBool>) -> Self {
        self.limits_changed = flag;
        self
    }

    /// Read the node's non-GPU draw with the host.
    pub fn with_powercap(mut self, powercap: Powercap) -> Self {
        self.powercap = Some(powercap);
        self
    }

    /// Observe each round's duration into `histogram`.
    pub fn with_duration_histogram(mut self, histogram: Histogram) -> Self {
        self.duration = Some(histogram);
        self
    }

    pub fn inventory(&self) -> Arc<[GpuInfo]> {
        self.inventory.clone()
    }

    /// One round: every GPU, and the host when due. Blocking.
    pub fn sample_once(&mut self) -> NodeSnapshot {
        let started = Instant::now();
        let scheduled_full = self.round % self.full_every == 0 || self.limits_changed.swap(false, Ordering::Relaxed);
        let mut gpus = Vec::with_capacity(self.inventory.len());
        for (info, track) in self.inventory.iter().zip(self.tracks.iter_mut()) {
            let detail = if scheduled_full || track.needs_full { Detail::Full } else { Detail::Fast };
            let (xid_errors_total, last_xid) = self.xids.get(info.index);
            let mut reading = GpuReading { xid_errors_total, last_xid, ..GpuReading::default() };
            match self.backend.sample(info.index, detail) {
                Ok(mut sample) => {
                    let at = Instant::now();
                    reading.energy_joules_total = track.energy.observe(at, sample.power_watts, sample.energy_joules);
                    if detail == Detail::Full {
                        track.last_full = Some(sample.clone());
                        track.needs_full = false;
                    } else if let Some(full) = &track.last_full {
                        carry_full_fields(&mut sample, full);
                    }
                    reading.sample = Some(sample);
                    if std::mem::take(&mut track.down) {
                        tracing::info!(gpu = info.index, uuid = %info.uuid, "GPU answers again.");
                    }
                }
                Err(e) => {
                    track.read_errors += 1;
                    track.needs_full = true;
                    track.energy.interrupt();
                    if !std::mem::replace(&mut track.down, true) {
                        tracing::warn!(gpu = info.index, uuid = %info.uuid, error = %e, "GPU read failed; exporting it as down.");
                    }
                    reading.error = Some(e.to_string());
                }
            }
            reading.read_errors_total = track.read_errors;
            gpus.push(reading);
        }
        if self.round % self.host_every == 0 {
            self.last_host = Some(self.host.read());
            if let Some(powercap) = &mut self.powercap {
                self.last_node_power = powercap.read(Instant::now());
            }
        }
        self.round += 1;
        if let Some(h) = &self.duration {
            h.observe(started.elapsed().as_secs_f64());
        }
        NodeSnapshot {
            taken_at: started,
            unix_ms: unix_ms_now(),
            inventory: self.inventory.clone(),
            gpus,
            host: self.last_host,
            node_power: self.last_node_power,
            round: self.round,
        }
    }
}

fn carry_full_fields(sample: &mut GpuSample, full: &GpuSample) {
    sample.power_limit_watts = full.power_limit_watts;
    sample.enforced_power_limit_watts = full.enforced_power_limit_watts;
    sample.pcie = full.pcie;
    sample.ecc = full.ecc;
    sample.processes.clone_from(&full.processes);
    sample.activity = full.activity;
}

/// Sample every `interval` until `shutdown` resolves, publishing each round on `tx`.
/// A round that overruns the interval delays the next one rather than bunching them up.
pub async fn run(
    mut sampler: Sampler,
    interval: Duration,
    tx: watch::Sender<Arc<NodeSnapshot>>,
    shutdown: impl Future<Output = ()>,
) {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            () = &mut shutdown => break,
        }
        let round = tokio::task::spawn_blocking(move || {
            let snapshot = sampler.sample_once();
            (sampler, snapshot)
        });
        match round.await {
            Ok((back, snapshot)) => {
                sampler = back;
                tx.send_replace(Arc::new(snapshot));
            }
            Err(e) => {
                // A panic inside a backend: nothing sane to sample with any more.
                tracing::error!(error = %e, "Sampler crashed; GPU metrics will go stale.");
                return;
            }
        }
    }
}

/// Watch driver events (XID errors) on a thread of their own until `stop` is set.
pub fn spawn_event_thread(
    backend: Arc<dyn GpuBackend>,
    xids: Arc<XidLog>,
    stop: Arc<AtomicBool>,
) -> std::io::Result<JoinHandle<()>> {
    std::thread::Builder::new().name("watt-gpu-events".into()).spawn(move || {
        while !stop.load(Ordering::Relaxed) {
            match backend.wait_event(Duration::from_millis(250)) {
                Ok(Some(GpuEvent::Xid { index, code })) => {
                    tracing::error!(gpu = index, xid = code, "GPU reported a critical XID error.");
                    xids.record(index, code);
                }
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "Waiting for GPU events failed; retrying in 1s.");
                    std::thread::park_timeout(Duration::from_secs(1));
                }
            }
        }
    })
}

fn unix_ms_now() -> i64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::sim::{SimBackend, SimModel};

    #[test]
    fn energy_counter_integrates_between_driver_reads_and_never_goes_back() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let mut e = EnergyCounter::default();
        assert_eq!(e.observe(at(0), 100.0, None), None, "no driver counter yet: nothing to carry");
        assert_eq!(e.observe(at(1_000), 100.0, Some(5_000.0)), Some(5_000.0));
        assert_eq!(e.observe(at(2_000), 300.0, None), Some(5_200.0), "trapezoid of 100 W and 300 W over 1 s");
        // The driver says less than we estimated: hold, do not go back.
        assert_eq!(e.observe(at(3_000), 300.0, Some(5_150.0)), Some(5_200.0));
        assert_eq!(e.observe(at(4_000), 300.0, None), Some(5_450.0));
        // The driver counter restarted (driver reload): follow it down, a counter reset.
        assert_eq!(e.observe(at(5_000), 300.0, Some(10.0)), Some(10.0));
    }

    #[test]
    fn fast_rounds_carry_the_last_full_read_and_full_reads_are_rationed() {
        let backend = Arc::new(SimBackend::new(SimModel::H100, 2, 5));
        let mut sampler = Sampler::new(backend.clone(), 5, 1, Arc::new(XidLog::new(2)));
        for _ in 0..10 {
            let snap = sampler.sample_once();
            let s = snap.gpus[0].sample.as_ref().unwrap();
            assert_eq!(s.power_limit_watts, Some(700.0), "carried on fast rounds");
            assert!(snap.gpus[0].energy_joules_total.is_some());
        }
        assert_eq!(backend.calls().sample_full.load(Ordering::Relaxed), 2 * 2, "rounds 0 and 5, two GPUs");
        assert_eq!(backend.calls().sample_fast.load(Ordering::Relaxed), 8 * 2);
    }

    #[test]
    fn a_failing_gpu_is_down_with_no_values_and_is_read_in_full_when_back() {
        let backend = Arc::new(SimBackend::new(SimModel::H100, 2, 5));
        let mut sampler = Sampler::new(backend.clone(), 100, 1, Arc::new(XidLog::new(2)));
        sampler.sample_once();
        backend.faults(1).lost.store(true, Ordering::Relaxed);
        let snap = sampler.sample_once();
        assert!(snap.gpus[1].sample.is_none() && snap.gpus[1].energy_joules_total.is_none());
        assert!(snap.gpus[1].error.as_deref().unwrap().contains("lost"));
        assert_eq!(snap.gpus[1].read_errors_total, 1);
        assert!(snap.gpus[0].sample.is_some(), "one bad GPU does not take the node down");
        backend.faults(1).lost.store(false, Ordering::Relaxed);
        let full_before = backend.calls().sample_full.load(Ordering::Relaxed);
        let snap = sampler.sample_once();
        assert!(snap.gpus[1].sample.is_some());
        assert_eq!(snap.gpus[1].read_errors_total, 1, "the error count is a counter: it stays");
        assert_eq!(
            backend.calls().sample_full.load(Ordering::Relaxed),
            full_before + 1,
            "re-read in full after recovery"
        );
    }

    #[test]
    fn xid_events_reach_the_snapshot() {
        let backend = Arc::new(SimBackend::new(SimModel::H100, 2, 5));
        let xids = Arc::new(XidLog::new(2));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = spawn_event_thread(backend.clone(), xids.clone(), stop.clone()).unwrap();
        backend.inject_xid(1, 79);
        backend.inject_xid(1, 48);
        let mut sampler = Sampler::new(backend.clone(), 1, 1, xids.clone());
        let mut seen = (0, None);
        for _ in 0..200 {
            seen = xids.get(1);
            if seen.0 == 2 {
                break;
            }
            std::thread::park_timeout(Duration::from_millis(10));
        }
        assert_eq!(seen, (2, Some(48)));
        let snap = sampler.sample_once();
        assert_eq!((snap.gpus[1].xid_errors_total, snap.gpus[1].last_xid), (2, Some(48)));
        assert_eq!(snap.gpus[0].xid_errors_total, 0);
        stop.store(true, Ordering::Relaxed);
        thread.join().unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn run_publishes_one_snapshot_per_interval_until_shutdown() {
        let backend = Arc::new(SimBackend::new(SimModel::A100, 1, 5));
        let sampler = Sampler::new(backend, 10, 10, Arc::new(XidLog::new(1)));
        let (tx, mut rx) = watch::channel(Arc::new(NodeSnapshot::empty(sampler.inventory())));
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(run(sampler, Duration::from_millis(500), tx, async {
            let _ = stop_rx.await;
        }));
        let mut rounds = Vec::new();
        for _ in 0..4 {
            rx.changed().await.unwrap();
            rounds.push(rx.borrow().round);
        }
        assert_eq!(rounds, vec![1, 2, 3, 4]);
        stop_tx.send(()).unwrap();
        task.await.unwrap();
    }
}
