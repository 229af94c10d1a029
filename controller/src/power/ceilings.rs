//! Cap ceilings, written ahead (ARCHITECTURE.md, invariant 9): for every node, the highest cap
//! each of its GPUs may be running under, in the store under `caps/<node>` before any order
//! above it is sent. A controller that takes over loads them and counts every node that has not
//! registered with it yet at its ceiling until its failsafe deadline — the old leader may have
//! raised it a moment before dying — so the new leader's first increases cannot take the cluster
//! over its limit. A ceiling only rises: lowering one would need a write after every decrease,
//! and counting a returning node high for a few seconds costs only increases that wait.
//! Pure: the record, its key, and what a node needs recorded.

use serde::{Deserialize, Serialize};

use crate::power::planner::{GpuCap, GpuWork, InFlight, NodeCaps};

use crate::store::StoreError;

pub const CEILINGS_PREFIX: &str = "caps/";

pub fn ceiling_key(node: &str) -> String {
    format!("{CEILINGS_PREFIX}{node}")
}

/// One node's ceilings as stored, with what a controller needs to count the node before it
/// registers: each GPU's range and failsafe cap, and how long its agent waits before going to
/// its failsafe caps.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CeilingRecord {
    pub node: String,
    pub gpus: Vec<GpuCeiling>,
    pub failsafe_after_ms: i64,
    pub enforcing: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct GpuCeiling {
    pub index: u32,
    pub min_watts: f64,
    pub max_watts: f64,
    pub failsafe_watts: f64,
    /// The highest cap it may be running under.
    pub ceiling_watts: f64,
}

impl CeilingRecord {
    pub fn decode(key: &str, bytes: &[u8]) -> Result<Self, StoreError> {
        crate::store::decode_json(key, bytes)
    }

    pub fn encode(&self) -> Result<Vec<u8>, StoreError> {
        crate::store::encode_json(&ceiling_key(&self.node), self)
    }

    /// The record that covers `caps` (each GPU at the larger of `recorded` and the highest cap
    /// it may run under now, in force or ordered); `None` when `recorded` covers it already.
    pub fn covering(caps: &NodeCaps, recorded: &[f64], failsafe_after_ms: i64) -> Option<CeilingRecord> {
        let covered = recorded.len() == caps.gpus.len() && caps.gpus.iter().zip(recorded).all(|(g, &r)| g.upper() <= r);
        if covered {
            return None;
        }
        let gpus = caps
            .gpus
            .iter()
            .enumerate()
            .map(|(k, g)| GpuCeiling {
                index: g.index,
                min_watts: g.min_watts,
                max_watts: g.max_watts,
                failsafe_watts: g.failsafe_watts,
                ceiling_watts: g.upper().max(recorded.get(k).copied().unwrap_or(0.0)),
            })
            .collect();
        Some(CeilingRecord { node: caps.name.clone(), gpus, failsafe_after_ms, enforcing: caps.enforcing })
    }

    /// Whether an order of `caps` ((index, watts) pairs) stays at or under `recorded`.
    pub fn allows(recorded: &[f64], node: &NodeCaps, caps: &[(u32, f64)]) -> bool {
        caps.iter().all(|&(index, watts)| {
            node.gpus.iter().position(|g| g.index == index).and_then(|k| recorded.get(k)).is_some_and(|&r| watts <= r)
        })
    }

    /// The node as a controller that has not heard from it counts it: unreachable, every GPU
    /// at its ceiling with a decrease to its failsafe cap outstanding since `now_ms`, so it counts
    /// at the ceiling until `now_ms + failsafe_after_ms` and at its failsafe cap after.
    pub fn unheard_node(&self, now_ms: i64) -> NodeCaps {
        let gpus = self
            .gpus
            .iter()
            .map(|g| {
                let mut cap =
                    GpuCap::new(g.index, g.min_watts, g.max_watts, g.failsafe_watts, g.ceiling_watts, GpuWork::Watt);
                cap.in_flight =
                    Some(InFlight { target: g.failsafe_watts, upper: g.ceiling_watts, epoch: 0, sent_ms: now_ms });
                cap
            })
            .collect();
        NodeCaps {
            reachable: false,
            failsafe_at_ms: now_ms.saturating_add(self.failsafe_after_ms),
            enforcing: self.enforcing,
            ..NodeCaps::new(self.node.clone(), gpus, 0.0)
        }
    }

    pub fn ceilings(&self) -> Vec<f64> {
        self.gpus.iter().map(|g| g.ceiling_watts).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(caps: &[(f64, Option<f64>)]) -> NodeCaps {
        let gpus = caps
            .iter()
            .enumerate()
            .map(|(i, &(acked, flying))| {
                let mut g = GpuCap::new(i as u32, 200.0, 700.0, 200.0, acked, GpuWork::Watt);
                g.in_flight = flying.map(|target| InFlight { target, upper: target.max(acked), epoch: 1, sent_ms: 0 });
                g
            })
            .collect();
        NodeCaps::new("n1".into(), gpus, 0.0)
    }

    #[test]
    fn a_ceiling_covers_what_is_in_force_and_in_flight_and_never_falls() {
        let n = node(&[(300.0, None), (300.0, Some(500.0))]);
        assert!(CeilingRecord::covering(&n, &[300.0, 500.0], 10_000).is_none());
        let record = CeilingRecord::covering(&n, &[], 10_000).expect("nothing recorded yet");
        assert_eq!(record.ceilings(), vec![300.0, 500.0]);
        // A GPU lowered since keeps its recorded ceiling.
        let lowered = node(&[(250.0, None), (600.0, None)]);
        let record = CeilingRecord::covering(&lowered, &[300.0, 500.0], 10_000).unwrap();
        assert_eq!(record.ceilings(), vec![300.0, 600.0]);
        assert!(CeilingRecord::allows(&[300.0, 600.0], &lowered, &[(0, 300.0), (1, 550.0)]));
        assert!(!CeilingRecord::allows(&[300.0, 600.0], &lowered, &[(0, 301.0)]));
        assert!(!CeilingRecord::allows(&[], &lowered, &[(0, 100.0)]), "nothing recorded allows nothing");
    }

    #[test]
    fn a_node_not_heard_from_counts_at_its_ceiling_until_its_failsafe_deadline() {
        let record = CeilingRecord::covering(&node(&[(650.0, None), (400.0, None)]), &[], 10_000).unwrap();
        let unheard = record.unheard_node(5_000);
        assert!(!unheard.reachable);
        assert_eq!(unheard.counted_watts(5_000, 60.0), 1_050.0);
        assert_eq!(unheard.counted_watts(14_999, 60.0), 1_050.0);
        assert!(unheard.decrease_outstanding(14_999), "not a violation while it may still be lowering");
        assert_eq!(unheard.counted_watts(15_000, 60.0), 400.0, "both at their failsafe caps");
    }
}
