//! Cuts a caretaker could not store, handed to whoever leads next (ARCHITECTURE.md, invariant
//! 11). A caretaker applies a cut from memory; if it then loses its term without having stored
//! it (etcd came back after its lease ended), the cut is written — unfenced, as a request, never
//! as the power table itself — under `power/carried/<term>`, and the leader (it, or another)
//! applies every part of it that still lowers the budget, then deletes the record. A part that
//! would raise the budget (a later change went lower) is dropped: a carried cut only ever tightens.

use serde::{Deserialize, Serialize};

use super::domains::Domain;
use super::table::{PowerChange, PowerTable, SiteUpdate, SourceUpdate};
use super::{Site, Source};
use crate::store::StoreError;

pub const CARRIED_PREFIX: &str = "power/carried/";

pub fn carried_key(term: u64) -> String {
    format!("{CARRIED_PREFIX}{term:020}")
}

/// The sources, site and power domains as a caretaker had them in force, unstored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CarriedCut {
    pub term: u64,
    pub sources: Vec<Source>,
    pub site: Site,
    #[serde(default)]
    pub domains: Vec<Domain>,
}

impl CarriedCut {
    pub fn of(term: u64, table: &PowerTable) -> CarriedCut {
        CarriedCut {
            term,
            sources: table.sources().cloned().collect(),
            site: table.site(),
            domains: table.domains().cloned().collect(),
        }
    }

    pub fn encode(&self) -> Result<Vec<u8>, StoreError> {
        crate::store::encode_json(&carried_key(self.term), self)
    }

    pub fn decode(key: &str, bytes: &[u8]) -> Result<CarriedCut, StoreError> {
        crate::store::decode_json(key, bytes)
    }

    /// The changes that bring `table` down to this cut where it is lower, at `now`: each
    /// source it names that `table` supplies more of, and the site's settings where it is
    /// stricter. Sources it lacks are left alone (removing one may raise nothing, or lift the
    /// limit altogether when it is the last).
    pub fn changes_to(&self, table: &PowerTable, now_unix_ms: i64) -> Vec<PowerChange> {
        let mut changes = Vec::new();
        for carried in &self.sources {
            // The source as the table has it now (its domain included), only lower.
            let current = table.sources().find(|s| s.name == carried.name);
            if let Some(current) = current.filter(|c| carried.available_watts < c.effective_watts(now_unix_ms)) {
                changes.push(PowerChange::SetSource(SourceUpdate {
                    name: carried.name.clone(),
                    kind: carried.kind,
                    available_watts: carried.available_watts,
                    ramp_watts_per_second: carried.ramp_watts_per_second,
                    domain: current.domain.clone(),
                }));
            }
        }
        let (now, then) = (table.site(), self.site);
        let stricter = |carried: f64, current: f64| (carried > current).then_some(carried);
        let site = SiteUpdate {
            reserve_ratio: stricter(then.reserve_ratio, now.reserve_ratio),
            pue: stricter(then.pue, now.pue),
            node_overhead_watts: stricter(then.node_overhead_watts, now.node_overhead_watts),
            idle_gpu_watts: stricter(then.idle_gpu_watts, now.idle_gpu_watts),
            // Not a limit on the budget: a ramp moves nothing a cut must carry.
            ramp_up_watts_per_second: None,
            ramp_down_watts_per_second: None,
        };
        if site != SiteUpdate::default() {
            changes.push(PowerChange::SetSite(site));
        }
        // A domain's lower limit over the same nodes, and a domain the table lacks whose parent
        // it has: each only adds or lowers a limit.
        for carried in &self.domains {
            let tighter = match table.domains().find(|d| d.name == carried.name) {
                Some(current) => {
                    carried.limit_watts < current.limit_watts
                        && carried.parent == current.parent
                        && carried.selector == current.selector
                }
                None => carried.parent.as_ref().is_none_or(|p| table.domains().any(|d| &d.name == p)),
            };
            if tighter {
                changes.push(PowerChange::SetDomain(carried.clone()));
            }
        }
        changes
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::power::table::Direction;
    use crate::power::SourceKind;

    fn set(name: &str, watts: f64) -> PowerChange {
        PowerChange::SetSource(SourceUpdate {
            name: name.into(),
            kind: SourceKind::Grid,
            available_watts: watts,
            ramp_watts_per_second: None,
            domain: None,
        })
    }

    #[tokio::test]
    async fn a_carried_cut_only_lowers_and_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::store::file::FileStore::open(dir.path().join("w.redb")).unwrap();
        let mut leader = PowerTable::load(&store).await.unwrap();
        leader.apply(&set("grid", 4000.0), 0).unwrap();
        leader.apply(&set("solar", 1000.0), 0).unwrap();
        // The caretaker cut the grid and raised the reserve...
        let mut caretaker = leader.clone();
        caretaker.apply(&set("grid", 3000.0), 0).unwrap();
        caretaker
            .apply(&PowerChange::SetSite(SiteUpdate { reserve_ratio: Some(0.2), ..Default::default() }), 0)
            .unwrap();
        let cut = CarriedCut::of(7, &caretaker);
        let back = CarriedCut::decode(&carried_key(7), &cut.encode().unwrap()).unwrap();
        assert_eq!(back, cut);
        // ...and the leader meanwhile cut solar further: that stays.
        leader.apply(&set("solar", 500.0), 0).unwrap();
        let changes = back.changes_to(&leader, 0);
        assert_eq!(changes.len(), 2, "{changes:?}");
        for change in &changes {
            assert!(matches!(leader.check(change, 0).unwrap(), Direction::Tightens), "{change:?}");
            leader.apply(change, 0).unwrap();
        }
        assert_eq!(leader.available_watts(0), 3500.0);
        assert_eq!(leader.site().reserve_ratio, 0.2);
        assert!(back.changes_to(&leader, 0).is_empty(), "applied once, nothing more to carry");
    }
}
