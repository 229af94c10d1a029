//! The allocator under power domains (invariant 13): every domain's counted power within its
//! limit, as well as the site's. Pure, around [`allocate`]: the site's allocation first; then,
//! for each domain it leaves over its limit (deepest first), the jobs with GPUs in it share the
//! domain's own budget (the same water-filling, over their GPUs there, each no higher than the
//! site gave it) and each takes the lower cap as its ceiling; a job the domain cannot hold at
//! its minimum cap is paused. Then the site's allocation again, under those ceilings (the watts
//! a tight rack leaves go to jobs elsewhere), until no domain is over. Caps only come down from
//! round to round, and each round lowers one or pauses one, so it ends; a job spanning racks
//! still has one cap.
//!
//! Before the first round, each domain whose jobs would be over its limit at their ceilings is
//! held at those ceilings, the most over first (pausing nobody): the rounds that follow are then
//! few, and a job across a tight rack and a loose one takes its lower cap to the loose one.
//!
//! A domain is not shrunk into: a job its domain cannot hold pauses whole (the shards a shrink
//! drops are the job's last ones, wherever they run).

use super::allocator::{allocate, Allocation, JobAllocation, JobLoad};

/// A domain as the allocator sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct DomainLoad {
    pub limit_watts: f64,
    /// What it counts besides the jobs' GPUs: its nodes' other GPUs parked, and their draw
    /// besides GPUs.
    pub others_watts: f64,
}

/// Where a job's shards are: per shard, the domains its node is in.
pub type Spread = Vec<Vec<u32>>;

/// After this many rounds a domain still over its limit pauses its lowest-priority job each
/// round: a guarantee of an end, not a path the allocator expects to take.
const ROUNDS_BEFORE_PAUSING: usize = 32;

/// A domain held is shared up to this much under its limit: the planner raises caps within
/// each domain's headroom, and a share that filled it exactly could, by a rounding, leave its
/// last node's increase a hair too large to fit — the caps then never reach their targets.
const SLACK_WATTS: f64 = 1.0;

/// What each domain counts under `allocation`.
pub fn domain_watts(
    allocation: &Allocation,
    jobs: &[JobLoad],
    spreads: &[Spread],
    domains: &[DomainLoad],
    idle_gpu_watts: f64,
) -> Vec<f64> {
    let mut used: Vec<f64> = domains.iter().map(|d| d.others_watts).collect();
    for (a, (job, spread)) in allocation.jobs.iter().zip(jobs.iter().zip(spreads)) {
        debug_assert_eq!(a.name, job.name);
        for (i, in_domains) in spread.iter().enumerate() {
            let kept = !a.paused && (i as u32) < a.shards;
            let watts = if kept {
                f64::from(job.gpus_per_shard) * a.cap_watts
            } else {
                job.given_up_watts.get(i).copied().unwrap_or(f64::from(job.gpus_per_shard) * idle_gpu_watts)
            };
            for &d in in_domains {
                used[d as usize] += watts;
            }
        }
    }
    used
}

/// [`allocate`], with every domain in `domains` (parents before children) held to its limit.
/// `spreads[j]` says where `jobs[j]`'s shards are.
pub fn allocate_within_domains(
    budget_watts: f64,
    jobs: &[JobLoad],
    spreads: &[Spread],
    others_watts: f64,
    idle_gpu_watts: f64,
    domains: &[DomainLoad],
) -> Allocation {
    let mut loads = jobs.to_vec();
    let mut paused = vec![false; jobs.len()];
    // Per domain, its jobs' shards (job, shard), job by job: a round looks only at those.
    let mut members: Vec<Vec<(usize, usize)>> = vec![Vec::new(); domains.len()];
    for (j, spread) in spreads.iter().enumerate() {
        for (i, in_domains) in spread.iter().enumerate() {
            for &d in in_domains {
                members[d as usize].push((j, i));
            }
        }
    }
    hold_at_ceilings(&mut loads, &members, domains, idle_gpu_watts);
    let mut round = 0;
    loop {
        round += 1;
        let allocation = allocate_with_paused(budget_watts, &loads, &paused, others_watts, idle_gpu_watts);
        let used = domain_watts(&allocation, &loads, spreads, domains, idle_gpu_watts);
        let over: Vec<usize> =
            (0..domains.len()).rev().filter(|&d| used[d] > domains[d].limit_watts * (1.0 + 1e-9) + 1e-6).collect();
        if over.is_empty() {
            return allocation;
        }
        let mut progress = false;
        for &d in &over {
            progress |=
                hold_domain(&domains[d], &members[d], &allocation, &mut loads, &mut paused, idle_gpu_watts, true);
        }
        if round >= ROUNDS_BEFORE_PAUSING || !progress {
            // Pause the lowest-priority job (newest first) still running in each domain over.
            let mut paused_one = false;
            for &d in &over {
                let lowest = members[d].iter().map(|&(j, _)| j).filter(|&j| !paused[j]).min_by(|&a, &b| {
                    let (x, y) = (&loads[a], &loads[b]);
                    x.priority.cmp(&y.priority).then(y.sequence.cmp(&x.sequence))
                });
                if let Some(j) = lowest {
                    paused[j] = true;
                    paused_one = true;
                }
            }
            if !paused_one {
                // Over with every job in it paused: what it counts besides jobs is above its
                // limit. Nothing the allocator can do; the status says so.
                let mut allocation = allocation;
                allocation.fits = false;
                allocation.notes.push("a power domain is over its limit with every job in it paused".into());
                return allocation;
            }
        }
    }
}

/// The site's allocation with the jobs in `paused` paused whatever the budget.
fn allocate_with_paused(
    budget_watts: f64,
    loads: &[JobLoad],
    paused: &[bool],
    others_watts: f64,
    idle_gpu_watts: f64,
) -> Allocation {
    if !paused.contains(&true) {
        return allocate(budget_watts, loads, others_watts, idle_gpu_watts);
    }
    let given_up = |l: &JobLoad| -> f64 {
        (0..l.shards as usize)
            .map(|i| l.given_up_watts.get(i).copied().unwrap_or(f64::from(l.gpus_per_shard) * idle_gpu_watts))
            .sum()
    };
    let running: Vec<JobLoad> = loads.iter().zip(paused).filter(|(_, &p)| !p).map(|(l, _)| l.clone()).collect();
    let held: f64 = loads.iter().zip(paused).filter(|(_, &p)| p).map(|(l, _)| given_up(l)).sum();
    let mut allocation = allocate(budget_watts, &running, others_watts + held, idle_gpu_watts);
    let mut by_name: std::collections::HashMap<String, JobAllocation> =
        allocation.jobs.drain(..).map(|a| (a.name.clone(), a)).collect();
    allocation.jobs = loads
        .iter()
        .zip(paused)
        .map(|(l, &p)| match by_name.remove(&l.name).filter(|_| !p) {
            Some(a) => a,
            None => {
                allocation.notes.push(format!("paused {}: a power domain cannot hold it at its minimum cap", l.name));
                JobAllocation {
                    name: l.name.clone(),
                    cap_watts: l.cap_min,
                    shards: l.shards,
                    paused: true,
                    within_flex: false,
                }
            }
        })
        .collect();
    allocation
}

/// Before the rounds: each domain whose jobs, every one at its ceiling, would be over its limit
/// shares its budget among them at those ceilings — the most over first, so that a job across a
/// tight rack and a loose one brings its lower ceiling to the loose one — pausing nobody. The
/// site's allocation then seldom takes a domain over, and the rounds are few.
fn hold_at_ceilings(loads: &mut [JobLoad], members: &[Vec<(usize, usize)>], domains: &[DomainLoad], idle: f64) {
    let at_ceilings = |loads: &[JobLoad], d: usize| -> f64 {
        domains[d].others_watts
            + members[d].iter().map(|&(j, _)| f64::from(loads[j].gpus_per_shard) * loads[j].cap_max).sum::<f64>()
    };
    let mut over: Vec<(f64, usize)> = (0..domains.len())
        .map(|d| (at_ceilings(loads, d) / domains[d].limit_watts, d))
        .filter(|(ratio, _)| *ratio > 1.0)
        .collect();
    over.sort_by(|a, b| b.0.total_cmp(&a.0));
    let everything = Allocation {
        jobs: loads
            .iter()
            .map(|l| JobAllocation {
                name: l.name.clone(),
                cap_watts: l.cap_max,
                shards: l.shards,
                paused: false,
                within_flex: true,
            })
            .collect(),
        total_watts: 0.0,
        fits: true,
        notes: Vec::new(),
        short: false,
    };
    let mut never = vec![false; loads.len()];
    for (_, d) in over {
        if at_ceilings(loads, d) > domains[d].limit_watts {
            hold_domain(&domains[d], &members[d], &everything, loads, &mut never, idle, false);
        }
    }
}

/// Share `domain`'s budget among the jobs running in it (`members`: its shards, job by job),
/// each no higher than `allocation` gave it; lower their ceilings to what it gives, and pause
/// those it cannot hold (`may_pause`; otherwise they go to their minimum). Whether anything
/// changed.
fn hold_domain(
    domain: &DomainLoad,
    members: &[(usize, usize)],
    allocation: &Allocation,
    loads: &mut [JobLoad],
    paused: &mut [bool],
    idle_gpu_watts: f64,
    may_pause: bool,
) -> bool {
    let mut budget = domain.limit_watts - domain.others_watts - SLACK_WATTS;
    let mut jobs_here: Vec<usize> = Vec::new();
    let mut sub: Vec<JobLoad> = Vec::new();
    for &(j, i) in members {
        let (a, load) = (&allocation.jobs[j], &loads[j]);
        if a.paused || i as u32 >= a.shards {
            budget -= load.given_up_watts.get(i).copied().unwrap_or(f64::from(load.gpus_per_shard) * idle_gpu_watts);
            continue;
        }
        if jobs_here.last() == Some(&j) {
            let last = sub.last_mut().expect("a job's entry");
            last.shards += 1;
            last.min_shards += 1;
            last.given_up_watts.push(f64::from(load.gpus_per_shard) * idle_gpu_watts);
            continue;
        }
        jobs_here.push(j);
        sub.push(JobLoad {
            shards: 1,
            min_shards: 1,
            cap_max: a.cap_watts.min(load.cap_max).max(load.cap_min),
            probe: false,
            given_up_watts: vec![f64::from(load.gpus_per_shard) * idle_gpu_watts],
            ..load.clone()
        });
    }
    let held = allocate(budget, &sub, 0.0, idle_gpu_watts);
    let mut changed = false;
    for (k, &j) in jobs_here.iter().enumerate() {
        let a = &held.jobs[k];
        if a.paused && may_pause {
            paused[j] = true;
            changed = true;
        } else if a.paused {
            loads[j].cap_max = loads[j].cap_min;
            changed = true;
        } else if a.cap_watts < loads[j].cap_max - 1e-6 {
            loads[j].cap_max = a.cap_watts.max(loads[j].cap_min);
            changed = true;
        }
    }
    changed
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::power::curve::Curve;

    // Caps come within SLACK_WATTS of a domain's limit: a fifth of a watt a GPU here.
    fn job(name: &str, priority: i64, shards: u32) -> JobLoad {
        JobLoad {
            name: name.into(),
            priority,
            sequence: 1,
            flex: 0.3,
            gpus_per_shard: 8,
            shards,
            min_shards: shards,
            cap_min: 200.0,
            cap_max: 700.0,
            curve: Curve::default(),
            flex_curve: Curve::default(),
            probe: false,
            given_up_watts: Vec::new(),
        }
    }

    #[test]
    fn a_tight_rack_slows_only_its_own_jobs_and_the_watts_it_leaves_go_elsewhere() {
        // Rack 0 holds job a's shard; rack 1 job b's. The site could give both 600 W (9.6 kW
        // of 16 GPUs); rack 0's breaker holds 8 × 400 W.
        let jobs = [job("a", 1, 1), job("b", 1, 1)];
        let spreads = vec![vec![vec![0]], vec![vec![1]]];
        let domains = [
            DomainLoad { limit_watts: 3_200.0, others_watts: 0.0 },
            DomainLoad { limit_watts: 1e9, others_watts: 0.0 },
        ];
        let site = allocate(9_600.0, &jobs, 0.0, 100.0);
        assert!(site.jobs.iter().all(|j| (j.cap_watts - 600.0).abs() < 1e-6));
        let held = allocate_within_domains(9_600.0, &jobs, &spreads, 0.0, 100.0, &domains);
        let cap = |n: &str| held.jobs.iter().find(|j| j.name == n).unwrap().cap_watts;
        assert!((cap("a") - 400.0).abs() < 0.2, "{held:?}");
        assert!((cap("b") - 700.0).abs() < 1e-6, "b takes what a could not: {held:?}");
        let used = domain_watts(&held, &jobs, &spreads, &domains, 100.0);
        assert!(used[0] <= 3_200.0 + 1e-6 && held.total_watts <= 9_600.0 + 1e-6, "{used:?}");
    }

    #[test]
    fn a_job_spanning_racks_has_one_cap_the_tighter_rack_sets() {
        let jobs = [job("wide", 1, 2)];
        let spreads = vec![vec![vec![0], vec![1]]];
        let domains = [
            DomainLoad { limit_watts: 2_400.0, others_watts: 0.0 },
            DomainLoad { limit_watts: 4_000.0, others_watts: 800.0 },
        ];
        let held = allocate_within_domains(1e9, &jobs, &spreads, 0.0, 100.0, &domains);
        assert!((held.jobs[0].cap_watts - 300.0).abs() < 0.2, "{held:?}");
    }

    #[test]
    fn the_watts_a_spanning_job_cannot_use_in_a_loose_rack_go_to_its_neighbour() {
        // wide: shard 0 in rack 0 (2,400 W: 300 W a GPU), shard 1 in rack 1 beside b. Rack 1
        // holds wide at 300 W and b at 700 W (8,000 W); shared evenly there, b would get 500 W.
        let jobs = [job("wide", 1, 2), job("b", 1, 1)];
        let spreads = vec![vec![vec![0], vec![1]], vec![vec![1]]];
        let domains = [
            DomainLoad { limit_watts: 2_400.0, others_watts: 0.0 },
            DomainLoad { limit_watts: 8_000.0, others_watts: 0.0 },
        ];
        let held = allocate_within_domains(1e9, &jobs, &spreads, 0.0, 100.0, &domains);
        let cap = |n: &str| held.jobs.iter().find(|j| j.name == n).unwrap().cap_watts;
        assert!((cap("wide") - 300.0).abs() < 0.2 && (cap("b") - 700.0).abs() < 1e-6, "{held:?}");
    }

    #[test]
    fn a_domain_that_cannot_hold_a_job_at_its_minimum_pauses_the_lowest_priority_one_there() {
        // Two jobs in one rack of 2,000 W: 8 GPUs at 200 W is 1,600 W; both is 3,200 W. The
        // paused one's GPUs count idle (800 W): 2,400 W still over, so... the rack holds one job
        // only if its idle GPUs fit: 1,600 + 800 = 2,400 W > 2,000 W. With a 2,500 W rack it does.
        let jobs = [job("low", 0, 1), job("high", 5, 1)];
        let spreads = vec![vec![vec![0]], vec![vec![0]]];
        let domains = [DomainLoad { limit_watts: 2_500.0, others_watts: 0.0 }];
        let held = allocate_within_domains(1e9, &jobs, &spreads, 0.0, 100.0, &domains);
        let low = held.jobs.iter().find(|j| j.name == "low").unwrap();
        let high = held.jobs.iter().find(|j| j.name == "high").unwrap();
        assert!(low.paused && !high.paused, "{held:?}");
        assert!((high.cap_watts - 212.5).abs() < 0.2, "(2,500 − 800) / 8: {held:?}");
        assert!(held.fits);
        // Over with every job paused: said, not hidden.
        let domains = [DomainLoad { limit_watts: 1_000.0, others_watts: 0.0 }];
        let held = allocate_within_domains(1e9, &jobs, &spreads, 0.0, 100.0, &domains);
        assert!(!held.fits && held.jobs.iter().all(|j| j.paused), "{held:?}");
    }
}
