//! The power allocator: a pure function from (running jobs, what every other GPU draws, budget)
//! to one cap per job, how many shards each keeps, and which are paused.
//!
//! All GPUs of a job share one cap: a synchronous step runs at the pace of its slowest GPU. The
//! objective is priority-weighted throughput, `Σ weight × shards × speed(cap)`, under each GPU
//! model's concave speed curve ([`Curve`]). When the budget falls, in this order:
//!
//! 1. caps come down **within each job's flex** (the slowdown it tolerates), where a watt costs
//!    the least weighted throughput (water-filling on the curves' slopes — equal jobs get equal
//!    caps);
//! 2. then below flex, down to the GPUs' minimum caps, the same way;
//! 3. then elastic jobs **shrink** toward their minimum shard count, lowest priority first
//!    (newest first among equals);
//! 4. then whole jobs **pause**, in the same order, only as many as needed; shrunk jobs that the
//!    pauses leave room for grow back, and the caps of what runs are raised again with whatever
//!    is left.
//!
//! Every GPU counts. GPUs outside these jobs come in as one number, `others_watts`: idle ones at
//! the larger of the idle allowance and their measured draw, ones busy with someone else's
//! process at their cap. GPUs a job gives up (shrunk or paused) count at `idle_gpu_watts`, what
//! such a GPU can draw with no process on it — unless the caller says what a shard's GPUs count
//! given up (`JobLoad::given_up_watts`): a shard proposed on GPUs the job does not run on yet
//! counts, left out, what those GPUs count now, exactly as they would among the others. So a job
//! weighs the same proposed as started, and one paused for power is not started again on the same
//! figures. When even every job paused does not fit, the allocation says so (`fits: false`): the
//! limit is infeasible.
//!
//! Where power is short and a job's curve is to be measured (`JobLoad::probe`), its cap is then
//! lowered by [`PROBE_STEP`] — never below its flex floor, so its promised slowdown holds, and
//! never raised, so the budget holds: the watts it leaves are left unspent for the probe's span.
//! The speed at two caps is what teaches its curve.
//!
//! Weights: each distinct priority among the running jobs is a level; the lowest level weighs 1,
//! the next 2, and so on. Levels rather than raw priorities keep weights bounded whatever numbers
//! users pick.

use super::curve::Curve;

/// A probe lowers a job's cap by this share of it, down to its flex floor at most.
pub const PROBE_STEP: f64 = 0.15;
/// A probe that would move the cap by less than this share teaches too little: none.
const PROBE_LEAST_STEP: f64 = 0.05;

/// A running job as the allocator sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct JobLoad {
    pub name: String,
    pub priority: i64,
    pub sequence: u64,
    /// The slowdown the job tolerates, 0.0–0.5.
    pub flex: f64,
    pub gpus_per_shard: u32,
    /// Shards placed now.
    pub shards: u32,
    /// The fewest shards it may run with (its spec's `shards.min`).
    pub min_shards: u32,
    /// The cap range every one of its GPUs accepts: [highest minimum, lowest maximum].
    pub cap_min: f64,
    pub cap_max: f64,
    /// Its speed against the cap: what power is shared by.
    pub curve: Curve,
    /// The curve its flex is kept on: where the curve is learned, the steepest its fit finds
    /// likely, so the slowdown promised holds where the estimate is off; else the same curve.
    pub flex_curve: Curve,
    /// Its curve is to be measured: where power is short, its cap is lowered within its flex
    /// (see [`PROBE_STEP`]).
    pub probe: bool,
    /// Per shard placed, what its GPUs count together once the job gives it up (shrunk or
    /// paused); a shard not listed counts its GPUs at the idle allowance.
    pub given_up_watts: Vec<f64>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct JobAllocation {
    pub name: String,
    /// One cap for every GPU of the job (meaningless when paused).
    pub cap_watts: f64,
    /// Shards to keep (≤ the shards placed; ≥ `min_shards` unless paused).
    pub shards: u32,
    pub paused: bool,
    /// Whether the cap keeps the job within its flex (false when paused).
    pub within_flex: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Allocation {
    pub jobs: Vec<JobAllocation>,
    /// What the allocation counts: job GPUs at their caps, GPUs they gave up at idle, and every
    /// other GPU as it came in.
    pub total_watts: f64,
    /// Whether `total_watts` fits the budget (false only when even pausing everything cannot).
    pub fits: bool,
    /// What an operator should know: pauses, shrinks, an impossible budget.
    pub notes: Vec<String>,
    /// The budget holds less than every running job at its maximum cap: power is short, and
    /// the curves decide who gets it.
    pub short: bool,
}

#[derive(Debug, Clone)]
struct Work {
    load: JobLoad,
    weight: f64,
    shards: u32,
    paused: bool,
    cap: f64,
}

impl Work {
    fn gpus(&self) -> f64 {
        if self.paused {
            0.0
        } else {
            f64::from(self.shards * self.load.gpus_per_shard)
        }
    }

    /// What shard `i`'s GPUs count once given up.
    fn shard_given_up(&self, i: u32, idle: f64) -> f64 {
        let default = f64::from(self.load.gpus_per_shard) * idle;
        self.load.given_up_watts.get(i as usize).copied().unwrap_or(default)
    }

    /// What the GPUs placed for the job that it does not use now (shrunk or paused) count.
    fn given_up(&self, idle: f64) -> f64 {
        let kept = if self.paused { 0 } else { self.shards };
        (kept..self.load.shards).map(|i| self.shard_given_up(i, idle)).sum()
    }

    fn flex_floor(&self) -> f64 {
        self.load
            .flex_curve
            .cap_for_speed(1.0 - self.load.flex, self.load.cap_max)
            .clamp(self.load.cap_min, self.load.cap_max)
    }

    /// Power saved by giving up shard `i` at the minimum cap.
    fn saving_of_shard(&self, i: u32, idle: f64) -> f64 {
        f64::from(self.load.gpus_per_shard) * self.load.cap_min - self.shard_given_up(i, idle)
    }
}

/// Share `budget_watts` among `jobs`; every GPU outside them counts `others_watts` together.
pub fn allocate(budget_watts: f64, jobs: &[JobLoad], others_watts: f64, idle_gpu_watts: f64) -> Allocation {
    let mut levels: Vec<i64> = jobs.iter().map(|j| j.priority).collect();
    levels.sort_unstable();
    levels.dedup();
    let mut work: Vec<Work> = jobs
        .iter()
        .map(|j| Work {
            weight: 1.0 + levels.partition_point(|&p| p < j.priority) as f64,
            shards: j.shards,
            paused: false,
            cap: j.cap_max,
            load: j.clone(),
        })
        .collect();
    let mut notes = Vec::new();
    let idle_watts = |work: &[Work]| others_watts + work.iter().map(|w| w.given_up(idle_gpu_watts)).sum::<f64>();
    let at_min = |work: &[Work]| work.iter().map(|w| w.gpus() * w.load.cap_min).sum::<f64>() + idle_watts(work);

    // Shedding order: lowest priority first, newest first among equals.
    let mut order: Vec<usize> = (0..work.len()).collect();
    order.sort_by(|&a, &b| {
        let (x, y) = (&work[a].load, &work[b].load);
        x.priority.cmp(&y.priority).then(y.sequence.cmp(&x.sequence))
    });

    if at_min(&work) > budget_watts {
        // A running deficit, so each step below costs one shard's figures.
        let mut deficit = at_min(&work) - budget_watts;
        // 3. Shrink elastic jobs toward their minimum, last shard first.
        for &i in &order {
            let w = &mut work[i];
            let least = w.load.min_shards.min(w.shards);
            while deficit > 0.0 && w.shards > least {
                let saving = w.saving_of_shard(w.shards - 1, idle_gpu_watts);
                if saving <= 0.0 {
                    break;
                }
                w.shards -= 1;
                deficit -= saving;
            }
        }
        // 4. Pause whole jobs, as few as needed.
        for &i in &order {
            if deficit <= 0.0 {
                break;
            }
            let w = &work[i];
            let saving: f64 = (0..w.shards).map(|k| w.saving_of_shard(k, idle_gpu_watts)).sum();
            if saving > 0.0 {
                work[i].paused = true;
                deficit -= saving;
            }
        }
        // Shrunk jobs grow back into what the pauses freed, highest priority first.
        for &i in order.iter().rev() {
            let w = &mut work[i];
            if w.paused {
                continue;
            }
            while w.shards < w.load.shards {
                let cost = w.saving_of_shard(w.shards, idle_gpu_watts);
                if cost <= 0.0 || -deficit < cost {
                    break;
                }
                w.shards += 1;
                deficit += cost;
            }
        }
        for w in &work {
            if w.paused {
                notes.push(format!("paused {}: the budget cannot hold it at its minimum cap", w.load.name));
            } else if w.shards < w.load.shards {
                notes.push(format!("shrank {} from {} to {} shards", w.load.name, w.load.shards, w.shards));
            }
        }
    }

    // 1–2. Caps: within flex first, then below it.
    let for_jobs = budget_watts - idle_watts(&work);
    let running: Vec<usize> = (0..work.len()).filter(|&i| !work[i].paused).collect();
    let power = |work: &[Work], caps: &dyn Fn(&Work) -> f64| {
        running.iter().map(|&i| work[i].gpus() * caps(&work[i])).sum::<f64>()
    };
    if power(&work, &|w| w.load.cap_max) <= for_jobs {
        for &i in &running {
            work[i].cap = work[i].load.cap_max;
        }
    } else if power(&work, &Work::flex_floor) <= for_jobs {
        water_fill(&mut work, &running, for_jobs, &Work::flex_floor, &|w| w.load.cap_max);
    } else if power(&work, &|w| w.load.cap_min) <= for_jobs {
        water_fill(&mut work, &running, for_jobs, &|w| w.load.cap_min, &Work::flex_floor);
    } else {
        for &i in &running {
            work[i].cap = work[i].load.cap_min;
        }
    }
    let short = power(&work, &|w| w.load.cap_max) > for_jobs;
    for &i in &running {
        let w = &mut work[i];
        let lowered = (w.cap * (1.0 - PROBE_STEP)).max(w.flex_floor());
        if short && w.load.probe && lowered <= w.cap * (1.0 - PROBE_LEAST_STEP) {
            w.cap = lowered;
        }
    }

    let total_watts = power(&work, &|w| w.cap) + idle_watts(&work);
    // Not fitting with every job paused is the caller's to say: it knows the whole floor.
    let fits = total_watts <= budget_watts * (1.0 + 1e-9) + 1e-6;
    Allocation {
        jobs: work
            .into_iter()
            .map(|w| JobAllocation {
                within_flex: !w.paused && w.cap >= w.flex_floor() - 1e-6,
                name: w.load.name,
                cap_watts: w.cap,
                shards: w.shards,
                paused: w.paused,
            })
            .collect(),
        total_watts,
        fits,
        notes,
        short,
    }
}

/// Set caps in [floor, ceiling] so that job power sums to `power`, equalizing each job's
/// weighted marginal speed per watt (bisection on the common slope, in log space).
fn water_fill(
    work: &mut [Work],
    running: &[usize],
    power: f64,
    floor: &dyn Fn(&Work) -> f64,
    ceiling: &dyn Fn(&Work) -> f64,
) {
    // At slope λ a job wants the cap where weight × speed'(cap) = λ × gpus_per_shard... per GPU:
    // weight × speed'(c) / g = λ, so c = cap_for_slope(λ g / weight), clamped.
    let cap_at = |w: &Work, lambda: f64| {
        let g = f64::from(w.load.gpus_per_shard);
        w.load.curve.cap_for_slope(lambda * g / w.weight, w.load.cap_max).clamp(floor(w), ceiling(w))
    };
    let total =
        |work: &[Work], lambda: f64| running.iter().map(|&i| work[i].gpus() * cap_at(&work[i], lambda)).sum::<f64>();
    // Larger λ, lower caps.
    let (mut lo, mut hi) = (-40.0f64, 40.0f64); // ln λ
                                                // 64 halvings of an 80-wide log range: far below a milliwatt.
    for _ in 0..64 {
        let mid = 0.5 * (lo + hi);
        if total(work, mid.exp()) > power {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    let lambda = hi.exp();
    for &i in running {
        work[i].cap = cap_at(&work[i], lambda);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(name: &str, priority: i64, sequence: u64, flex: f64, shards: u32, min_shards: u32) -> JobLoad {
        JobLoad {
            name: name.into(),
            priority,
            sequence,
            flex,
            gpus_per_shard: 8,
            shards,
            min_shards,
            cap_min: 200.0,
            cap_max: 700.0,
            curve: Curve::default(),
            flex_curve: Curve::default(),
            probe: false,
            given_up_watts: Vec::new(),
        }
    }

    fn get<'a>(a: &'a Allocation, name: &str) -> &'a JobAllocation {
        a.jobs.iter().find(|j| j.name == name).unwrap()
    }

    #[test]
    fn a_probe_lowers_a_jobs_cap_within_its_flex_and_only_where_power_is_short() {
        let probed = |flex| JobLoad { probe: true, ..job("probed", 1, 1, flex, 4, 4) };
        let other = job("other", 1, 2, 0.3, 4, 4);
        // 64 GPUs under 80% of their full power: 560 W each.
        let budget = 0.8 * 64.0 * 700.0;
        let without = allocate(budget, &[job("probed", 1, 1, 0.3, 4, 4), other.clone()], 0.0, 100.0);
        let with = allocate(budget, &[probed(0.3), other.clone()], 0.0, 100.0);
        let (before, after) = (get(&without, "probed").cap_watts, get(&with, "probed").cap_watts);
        assert!(
            (before - 560.0).abs() < 1e-6 && (after - before * (1.0 - PROBE_STEP)).abs() < 1e-6,
            "{before} → {after}"
        );
        assert!(get(&with, "probed").within_flex, "within its flex");
        assert_eq!(get(&with, "other").cap_watts, get(&without, "other").cap_watts, "no other cap moves");
        assert!(with.total_watts < without.total_watts && with.fits, "the watts it leaves go unspent");

        // No flex: its floor is its full cap, no room to learn in. A 5% flex: a smaller step.
        let rigid = allocate(budget, &[probed(0.0), other.clone()], 0.0, 100.0);
        assert_eq!(get(&rigid, "probed").cap_watts, 700.0, "{rigid:?}");
        let budget = 0.9 * 64.0 * 700.0;
        let tight = allocate(budget, &[probed(0.05), other.clone()], 0.0, 100.0);
        let floor = Curve::default().cap_for_speed(0.95, 700.0);
        let cap = get(&tight, "probed").cap_watts;
        assert!((cap - floor).abs() < 1e-6 && cap <= 630.0 * (1.0 - PROBE_LEAST_STEP), "{cap} W, floor {floor} W");

        // Power to spare: nothing to learn for, nothing lowered.
        let plenty = allocate(1e9, &[probed(0.3), other], 0.0, 100.0);
        assert_eq!(get(&plenty, "probed").cap_watts, 700.0);
    }

    #[test]
    fn with_enough_power_every_job_runs_at_its_maximum() {
        let jobs = [job("a", 1, 1, 0.0, 4, 4), job("b", 1, 2, 0.2, 2, 1)];
        let a = allocate(1e9, &jobs, 16.0 * 100.0, 100.0);
        assert!(a.jobs.iter().all(|j| j.cap_watts == 700.0 && !j.paused));
        assert!(a.fits && a.notes.is_empty());
    }

    #[test]
    fn a_25_percent_cut_is_met_by_the_flexible_job_first() {
        let jobs = [job("rigid", 1, 1, 0.0, 4, 4), job("flexible", 1, 2, 0.3, 4, 4)];
        let full = 64.0 * 700.0;
        let a = allocate(full * 0.75, &jobs, 0.0, 100.0);
        assert!(a.fits);
        assert_eq!(get(&a, "rigid").cap_watts, 700.0, "the rigid job keeps full power: {a:?}");
        let flexible = get(&a, "flexible").cap_watts;
        assert!((flexible - 350.0).abs() < 1.0, "the flexible job absorbs all of it: {flexible}");
        let speed = Curve::default().speed(flexible, 700.0);
        assert!(speed >= 0.7 - 1e-9, "and stays within its flex: speed {speed}");
        assert!(a.jobs.iter().all(|j| j.within_flex), "{a:?}");
        assert!((a.total_watts - full * 0.75).abs() < 1.0);
    }

    #[test]
    fn beyond_flex_both_jobs_give_and_equal_jobs_get_equal_caps() {
        let jobs = [job("a", 1, 1, 0.1, 4, 4), job("b", 1, 2, 0.1, 4, 4)];
        let a = allocate(64.0 * 400.0, &jobs, 0.0, 100.0);
        let (x, y) = (get(&a, "a").cap_watts, get(&a, "b").cap_watts);
        assert!((x - y).abs() < 1e-6 && (x - 400.0).abs() < 1.0, "{x} {y}");
        assert!(a.jobs.iter().all(|j| !j.within_flex), "400 W is below a 10% flex: {a:?}");
    }

    #[test]
    fn higher_priority_keeps_more_power() {
        let jobs = [job("low", 1, 1, 0.0, 4, 4), job("high", 5, 2, 0.0, 4, 4)];
        let a = allocate(64.0 * 450.0, &jobs, 0.0, 100.0);
        assert!(get(&a, "high").cap_watts > get(&a, "low").cap_watts, "{a:?}");
        assert!(a.fits);
    }

    #[test]
    fn a_deep_cut_shrinks_elastic_jobs_then_pauses_the_lowest_priority_job_and_no_other() {
        // 64 GPUs: three jobs of 2×8; idle GPUs (16) count 100 W each.
        let jobs = [job("top", 9, 1, 0.0, 2, 2), job("mid", 5, 2, 0.0, 2, 2), job("bottom", 1, 3, 0.0, 2, 2)];
        // At minimum caps: 48 × 200 + 16 × 100 = 11,200 W. Give 9,700 W: pausing one job saves
        // 16 × (200 − 100) = 1,600 W.
        let a = allocate(9_700.0, &jobs, 16.0 * 100.0, 100.0);
        assert!(a.fits, "{a:?}");
        assert!(get(&a, "bottom").paused);
        assert!(!get(&a, "mid").paused && !get(&a, "top").paused, "only the lowest-priority job pauses: {a:?}");
        assert!(a.notes.iter().any(|n| n.contains("paused bottom")));
        // Elastic first: the same cut with an elastic bottom job shrinks it instead.
        let jobs = [job("top", 9, 1, 0.0, 2, 2), job("mid", 5, 2, 0.0, 2, 2), job("bottom", 1, 3, 0.0, 2, 1)];
        let a = allocate(10_500.0, &jobs, 16.0 * 100.0, 100.0);
        assert_eq!((get(&a, "bottom").shards, get(&a, "bottom").paused), (1, false), "{a:?}");
        assert!(a.jobs.iter().all(|j| !j.paused));
    }

    #[test]
    fn newest_goes_first_among_equal_priorities() {
        let jobs = [job("older", 1, 1, 0.0, 2, 2), job("newer", 1, 2, 0.0, 2, 2)];
        let a = allocate(5_000.0, &jobs, 0.0, 100.0);
        assert!(get(&a, "newer").paused && !get(&a, "older").paused, "{a:?}");
    }

    #[test]
    fn an_impossible_budget_pauses_everything_and_says_so() {
        let a = allocate(1_000.0, &[job("a", 1, 1, 0.0, 2, 2)], 48.0 * 100.0, 100.0);
        assert!(!a.fits && get(&a, "a").paused);
        assert!(a.notes.iter().any(|n| n.contains("paused a")), "{:?}", a.notes);
    }

    #[test]
    fn a_gpu_busy_with_someone_elses_process_takes_its_power_from_the_jobs() {
        // 16 GPUs in one job; 16 more outside it: 8 idle (100 W), 8 foreign at a 700 W cap.
        let jobs = [job("a", 1, 1, 0.2, 2, 2)];
        let others = 8.0 * 100.0 + 8.0 * 700.0;
        let room = allocate(16.0 * 700.0 + others, &jobs, others, 100.0);
        assert_eq!(get(&room, "a").cap_watts, 700.0);
        let tight = allocate(16.0 * 700.0, &jobs, others, 100.0);
        assert!(get(&tight, "a").cap_watts < 400.0 + 1e-6, "{tight:?}");
        assert!((tight.total_watts - 16.0 * 700.0).abs() < 1.0, "{tight:?}");
    }
}
