//! Power sources, site settings, power domains and the grid's schedule: the controller's copy,
//! and as stored (`power/sources/<name>`, `power/site`, `power/domains/<name>` and
//! `power/grid-schedule`, JSON). A change that can only lower the budget is applied from memory at
//! once and stored after; one that may raise it is stored first (ARCHITECTURE.md, invariant 10):
//! [`PowerTable::check`] says which. Validation names the field and changes nothing.

use std::collections::{BTreeMap, BTreeSet};

use super::domains::{check_tree, Domain, DomainTree, DOMAINS_PREFIX};
use super::grid::{GridLimit, GridSchedule, GridTarget, GRID_SCHEDULE_KEY, MAX_WINDOWS};
use super::{Site, Source, SourceKind};
use crate::spec::FieldError;
use crate::store::{Expect, Store, StoreError, Write};

pub const SOURCES_PREFIX: &str = "power/sources/";
pub const SITE_KEY: &str = "power/site";
/// Above this a number is a typo, not a power plant (the largest sites are a few GW).
pub const MAX_SOURCE_WATTS: f64 = 100e9;

/// A source change as requested.
#[derive(Debug, Clone, PartialEq)]
pub struct SourceUpdate {
    pub name: String,
    pub kind: SourceKind,
    pub available_watts: f64,
    pub ramp_watts_per_second: Option<f64>,
    /// The power domain (a feed) it supplies; `None`: the site.
    pub domain: Option<String>,
}

/// Site settings as requested: only the given ones change.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct SiteUpdate {
    pub reserve_ratio: Option<f64>,
    pub pue: Option<f64>,
    pub node_overhead_watts: Option<f64>,
    pub idle_gpu_watts: Option<f64>,
    /// The site's ramp limits; `Some(0.0)` removes one.
    pub ramp_up_watts_per_second: Option<f64>,
    pub ramp_down_watts_per_second: Option<f64>,
}

#[derive(Debug, thiserror::Error)]
pub enum PowerError {
    #[error(transparent)]
    Invalid(#[from] FieldError),
    #[error("no power source named {0:?}")]
    UnknownSource(String),
    #[error("no power domain named {0:?}")]
    UnknownDomain(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A change that may raise the budget, asked of a caretaker (invariant 11).
    #[error("this controller is the caretaker of term {term}: it cannot reach the store, so it takes only changes that lower the budget; retry once a leader is elected")]
    Caretaking { term: u64 },
}

impl SourceUpdate {
    pub fn validate(&self) -> Result<(), FieldError> {
        watt_common::names::check(&self.name).map_err(|message| FieldError::new("source.name", message))?;
        let w = self.available_watts;
        if !w.is_finite() || !(0.0..=MAX_SOURCE_WATTS).contains(&w) {
            return Err(FieldError::new(
                "source.available_watts",
                format!("must be between 0 W and {:.0} GW (got {w} W)", MAX_SOURCE_WATTS / 1e9),
            ));
        }
        if let Some(r) = self.ramp_watts_per_second {
            if !r.is_finite() || r <= 0.0 || r > MAX_SOURCE_WATTS {
                return Err(FieldError::new(
                    "source.ramp_watts_per_second",
                    format!("must be above 0 W/s (got {r}); leave it out for a source that takes load at once"),
                ));
            }
        }
        Ok(())
    }
}

impl SiteUpdate {
    fn apply(&self, site: &Site) -> Result<Site, FieldError> {
        let check = |field: &str, v: Option<f64>, lo: f64, hi: f64, unit: &str| -> Result<(), FieldError> {
            match v {
                Some(v) if !(v.is_finite() && (lo..=hi).contains(&v)) => Err(FieldError::new(
                    format!("site.{field}"),
                    format!("must be between {lo} and {hi}{unit} (got {v})"),
                )),
                _ => Ok(()),
            }
        };
        check("reserve_ratio", self.reserve_ratio, 0.0, 0.5, "")?;
        check("pue", self.pue, 1.0, 3.0, "")?;
        check("node_overhead_watts", self.node_overhead_watts, 0.0, 100_000.0, " W")?;
        check("idle_gpu_watts", self.idle_gpu_watts, 0.0, 2_000.0, " W")?;
        check("ramp_up_watts_per_second", self.ramp_up_watts_per_second, 0.0, MAX_SOURCE_WATTS, " W/s")?;
        check("ramp_down_watts_per_second", self.ramp_down_watts_per_second, 0.0, MAX_SOURCE_WATTS, " W/s")?;
        Ok(Site {
            reserve_ratio: self.reserve_ratio.unwrap_or(site.reserve_ratio),
            pue: self.pue.unwrap_or(site.pue),
            node_overhead_watts: self.node_overhead_watts.unwrap_or(site.node_overhead_watts),
            idle_gpu_watts: self.idle_gpu_watts.unwrap_or(site.idle_gpu_watts),
            ramp_up_watts_per_second: match self.ramp_up_watts_per_second {
                None => site.ramp_up_watts_per_second,
                Some(r) => (r > 0.0).then_some(r),
            },
            ramp_down_watts_per_second: match self.ramp_down_watts_per_second {
                None => site.ramp_down_watts_per_second,
                Some(r) => (r > 0.0).then_some(r),
            },
        })
    }
}

/// A validated request to change the power table.
#[derive(Debug, Clone, PartialEq)]
pub enum PowerChange {
    SetSource(SourceUpdate),
    RemoveSource(String),
    SetSite(SiteUpdate),
    SetDomain(Domain),
    RemoveDomain(String),
    /// The grid's whole schedule, as the VTN's events say now (see [`crate::openadr`]).
    SetGridSchedule(GridSchedule),
}

/// Which way a change moves the budget (ARCHITECTURE.md, invariant 10).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// It can only lower the budget: applied from memory at once, stored after.
    Tightens,
    /// It may raise it: stored first, applied once stored.
    Loosens,
}

/// What a change did, for its event.
#[derive(Debug, Clone, PartialEq)]
pub enum Applied {
    Source(Source),
    Removed(String),
    Site(Site),
    Domain(Domain),
    DomainRemoved(String),
    GridSchedule { windows: usize },
}

/// The writes that store the table as of `generation`.
#[derive(Debug, Clone)]
pub struct Snapshot {
    pub generation: u64,
    pub writes: Vec<Write>,
    sources: BTreeSet<String>,
    domains: BTreeSet<String>,
}

/// The controller's copy of sources and site. Decisions read it; the store holds it as of the
/// generation `stored` (changes are counted by `generation`). Every write stores the whole table
/// (a few keys), each key whatever its version: only the leader writes them, fenced by its term.
#[derive(Debug, Clone)]
pub struct PowerTable {
    sources: BTreeMap<String, Source>,
    site: Site,
    generation: u64,
    stored: u64,
    /// Source names the store holds, so that a removed one is deleted there.
    stored_sources: BTreeSet<String>,
    domains: BTreeMap<String, Domain>,
    /// The domains as decisions use them, rebuilt on every change to them.
    tree: std::sync::Arc<DomainTree>,
    /// Changes to the domains so far: what a node's path in the tree was worked out for.
    domains_generation: u64,
    stored_domains: BTreeSet<String>,
    grid: GridSchedule,
}

impl PowerTable {
    pub async fn load(store: &dyn Store) -> Result<Self, StoreError> {
        let mut sources = BTreeMap::new();
        for e in store.list(SOURCES_PREFIX).await? {
            let s: Source = crate::store::decode_json(&e.key, &e.value)?;
            sources.insert(s.name.clone(), s);
        }
        let site = match store.get(SITE_KEY).await? {
            Some(e) => crate::store::decode_json(&e.key, &e.value)?,
            None => Site::default(),
        };
        let stored_sources = sources.keys().cloned().collect();
        let mut domains = BTreeMap::new();
        for e in store.list(DOMAINS_PREFIX).await? {
            let d: Domain = crate::store::decode_json(&e.key, &e.value)?;
            domains.insert(d.name.clone(), d);
        }
        let grid = match store.get(GRID_SCHEDULE_KEY).await? {
            Some(e) => crate::store::decode_json(&e.key, &e.value)?,
            None => GridSchedule::default(),
        };
        Ok(PowerTable {
            sources,
            grid,
            site,
            generation: 0,
            stored: 0,
            stored_sources,
            tree: std::sync::Arc::new(DomainTree::new(&domains)),
            stored_domains: domains.keys().cloned().collect(),
            domains,
            domains_generation: 0,
        })
    }

    /// An empty table: no source (power unmanaged), the default site, no domain.
    pub fn empty() -> Self {
        PowerTable {
            sources: BTreeMap::new(),
            site: Site::default(),
            generation: 0,
            stored: 0,
            stored_sources: BTreeSet::new(),
            domains: BTreeMap::new(),
            tree: std::sync::Arc::default(),
            domains_generation: 0,
            stored_domains: BTreeSet::new(),
            grid: GridSchedule::default(),
        }
    }

    pub fn domains(&self) -> impl Iterator<Item = &Domain> {
        self.domains.values()
    }

    /// The domains as decisions use them.
    pub fn tree(&self) -> &std::sync::Arc<DomainTree> {
        &self.tree
    }

    /// Each domain's limit in force at `now` (positions in [`PowerTable::tree`]): its breaker's,
    /// or less where the sources feeding it supply less — what they supply, less the site's
    /// reserve and PUE, as the site's limit is of all sources.
    pub fn domain_limits(&self, now_unix_ms: i64) -> Vec<f64> {
        self.tree
            .domains
            .iter()
            .map(|d| {
                let mut fed = self.sources.values().filter(|s| s.domain.as_deref() == Some(d.name.as_str())).peekable();
                if fed.peek().is_none() {
                    return d.limit_watts;
                }
                let supply: f64 = fed.map(|s| s.effective_watts(now_unix_ms)).sum();
                d.limit_watts.min(super::safe_limit_watts(supply, &self.site))
            })
            .zip(&self.tree.domains)
            .map(|(limit, d)| self.grid.limit(&GridTarget::Domain(d.name.clone()), now_unix_ms, limit, None))
            .collect()
    }

    /// The grid's schedule: its windows on the site's import and on domains.
    pub fn grid(&self) -> &GridSchedule {
        &self.grid
    }

    /// Whether the grid's schedule moves the budget after `after` and up to `now`: a window
    /// starts or ends, or one that ended was lifting at `after`.
    pub fn grid_moves(&self, after_unix_ms: i64, now_unix_ms: i64) -> bool {
        let grid_supply: f64 =
            self.sources.values().filter(|s| s.kind == SourceKind::Grid).map(|s| s.available_watts).sum();
        self.grid.next_change_after(after_unix_ms).is_some_and(|t| t <= now_unix_ms)
            // Only the site's import lifts along a ramp; a domain's window lifts at once.
            || self.grid.restoring(after_unix_ms, self.grid_restore_rate(), |t| match t {
                GridTarget::Site => grid_supply,
                GridTarget::Domain(_) => 0.0,
            })
    }

    /// How fast the site's import limit lifts after a window ends: as the grid sources take up
    /// load after a cut, when every one of them has a ramp; else at once.
    fn grid_restore_rate(&self) -> Option<f64> {
        let mut grid = self.sources.values().filter(|s| s.kind == SourceKind::Grid).peekable();
        grid.peek()?;
        grid.map(|s| s.ramp_watts_per_second).sum()
    }

    /// Changes to the domains so far (0 at load): nodes' paths in the tree hold until it moves.
    pub fn domains_generation(&self) -> u64 {
        self.domains_generation
    }

    pub fn sources(&self) -> impl Iterator<Item = &Source> {
        self.sources.values()
    }

    pub fn site(&self) -> Site {
        self.site
    }

    /// Σ what every source supplies at `now`, the grid sources together no more than the grid's
    /// schedule lets the site import.
    pub fn available_watts(&self, now_unix_ms: i64) -> f64 {
        let (grid, other): (Vec<&Source>, Vec<&Source>) = self.sources().partition(|s| s.kind == SourceKind::Grid);
        let grid: f64 = grid.iter().map(|s| s.effective_watts(now_unix_ms)).sum();
        let other: f64 = other.iter().map(|s| s.effective_watts(now_unix_ms)).sum();
        other + self.grid.limit(&GridTarget::Site, now_unix_ms, grid, self.grid_restore_rate())
    }

    /// Changes applied so far (0 at load).
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Whether the store lags behind the table.
    pub fn unstored(&self) -> bool {
        self.stored < self.generation
    }

    /// The generation the store holds.
    pub fn stored_generation(&self) -> u64 {
        self.stored
    }

    /// Check `change` against the table, naming the field at fault, and say which way it moves
    /// the budget. Nothing changes.
    pub fn check(&self, change: &PowerChange, now_unix_ms: i64) -> Result<Direction, PowerError> {
        let tightens = match change {
            PowerChange::SetSource(update) => {
                update.validate()?;
                if let Some(domain) = update.domain.as_ref().filter(|d| !self.domains.contains_key(*d)) {
                    return Err(PowerError::Invalid(FieldError::new(
                        "source.domain",
                        format!("no power domain named {domain:?} (wattctl power domains)"),
                    )));
                }
                match self.sources.get(&update.name) {
                    // Moved to another domain: what the old one may draw rises.
                    Some(old) if old.domain != update.domain => false,
                    // Never above what the source supplies now (a ramp's step included).
                    Some(old) => update.available_watts <= old.effective_watts(now_unix_ms),
                    // A first source turns an unmanaged (unlimited) budget into a limited one.
                    None => self.sources.is_empty() || update.available_watts == 0.0,
                }
            }
            PowerChange::RemoveSource(name) => {
                if !self.sources.contains_key(name) {
                    return Err(PowerError::UnknownSource(name.clone()));
                }
                // The last source gone leaves power unmanaged: no limit at all.
                self.sources.len() > 1
            }
            PowerChange::SetSite(update) => {
                let next = update.apply(&self.site)?;
                let old = self.site;
                next.reserve_ratio >= old.reserve_ratio
                    && next.pue >= old.pue
                    && next.node_overhead_watts >= old.node_overhead_watts
                    && next.idle_gpu_watts >= old.idle_gpu_watts
            }
            PowerChange::SetDomain(domain) => {
                domain.validate()?;
                check_tree(&self.domains, domain)?;
                match self.domains.get(&domain.name) {
                    // Only a lower limit over the same nodes can only lower what they may draw.
                    Some(old) => {
                        domain.limit_watts <= old.limit_watts
                            && domain.parent == old.parent
                            && domain.selector == old.selector
                    }
                    // A new domain adds a limit.
                    None => true,
                }
            }
            PowerChange::RemoveDomain(name) => {
                if !self.domains.contains_key(name) {
                    return Err(PowerError::UnknownDomain(name.clone()));
                }
                let fed: Vec<&str> = self
                    .sources
                    .values()
                    .filter(|s| s.domain.as_ref() == Some(name))
                    .map(|s| s.name.as_str())
                    .collect();
                if !fed.is_empty() {
                    return Err(PowerError::Invalid(FieldError::new(
                        "name",
                        format!("domain {name} is fed by source(s) {}: move or remove them first", fed.join(", ")),
                    )));
                }
                let children: Vec<&str> = self
                    .domains
                    .values()
                    .filter(|d| d.parent.as_deref() == Some(name.as_str()))
                    .map(|d| d.name.as_str())
                    .collect();
                if let Some(w) = self.grid.windows.iter().find(|w| w.target == GridTarget::Domain(name.clone())) {
                    return Err(PowerError::Invalid(FieldError::new(
                        "name",
                        format!("domain {name} is limited by the grid's event {}: it ends first", w.event),
                    )));
                }
                if !children.is_empty() {
                    return Err(PowerError::Invalid(FieldError::new(
                        "name",
                        format!("domain {name} has domains under it ({}): remove them first", children.join(", ")),
                    )));
                }
                false
            }
            PowerChange::SetGridSchedule(schedule) => {
                self.check_grid(schedule)?;
                self.grid.only_tightens_to(schedule)
            }
        };
        Ok(if tightens { Direction::Tightens } else { Direction::Loosens })
    }

    /// Apply `change` (checked again: it may come after others); the generation rises by one.
    pub fn apply(&mut self, change: &PowerChange, now_unix_ms: i64) -> Result<Applied, PowerError> {
        self.check(change, now_unix_ms)?;
        let applied = match change {
            PowerChange::SetSource(update) => {
                let mut source = match self.sources.get(&update.name) {
                    Some(old) => {
                        old.updated(update.kind, update.available_watts, update.ramp_watts_per_second, now_unix_ms)
                    }
                    None => Source::new(
                        &update.name,
                        update.kind,
                        update.available_watts,
                        update.ramp_watts_per_second,
                        now_unix_ms,
                    ),
                };
                source.domain = update.domain.clone();
                self.sources.insert(source.name.clone(), source.clone());
                Applied::Source(source)
            }
            PowerChange::RemoveSource(name) => {
                self.sources.remove(name);
                Applied::Removed(name.clone())
            }
            PowerChange::SetSite(update) => {
                self.site = update.apply(&self.site)?;
                Applied::Site(self.site)
            }
            PowerChange::SetDomain(domain) => {
                self.domains.insert(domain.name.clone(), domain.clone());
                self.domains_changed();
                Applied::Domain(domain.clone())
            }
            PowerChange::RemoveDomain(name) => {
                self.domains.remove(name);
                self.domains_changed();
                Applied::DomainRemoved(name.clone())
            }
            PowerChange::SetGridSchedule(schedule) => {
                self.grid = schedule.clone();
                Applied::GridSchedule { windows: schedule.windows.len() }
            }
        };
        self.generation += 1;
        Ok(applied)
    }

    /// A schedule's windows each on their own, naming the field at fault.
    fn check_grid(&self, schedule: &GridSchedule) -> Result<(), FieldError> {
        if schedule.windows.len() > MAX_WINDOWS {
            return Err(FieldError::new("grid.windows", format!("at most {MAX_WINDOWS} windows")));
        }
        for (i, w) in schedule.windows.iter().enumerate() {
            let field = |name: &str| format!("grid.windows[{i}].{name}");
            match w.limit {
                GridLimit::Watts(v) if !(v.is_finite() && (0.0..=MAX_SOURCE_WATTS).contains(&v)) => {
                    return Err(FieldError::new(field("limit"), format!("must be between 0 W and 100 GW (got {v} W)")));
                }
                GridLimit::Share(v) if !(v.is_finite() && (0.0..=1.0).contains(&v)) => {
                    return Err(FieldError::new(field("limit"), format!("a share must be between 0 and 1 (got {v})")));
                }
                _ => {}
            }
            if w.start_unix_ms >= w.end_unix_ms {
                return Err(FieldError::new(field("end_unix_ms"), "must come after its start"));
            }
            if let GridTarget::Domain(name) = &w.target {
                if !self.domains.contains_key(name) {
                    return Err(FieldError::new(field("target"), format!("no power domain named {name:?}")));
                }
            }
        }
        Ok(())
    }

    fn domains_changed(&mut self) {
        self.tree = std::sync::Arc::new(DomainTree::new(&self.domains));
        self.domains_generation += 1;
    }

    /// The writes that store the table as it is now.
    pub fn snapshot(&self) -> Result<Snapshot, StoreError> {
        let mut writes = Vec::with_capacity(self.sources.len() + self.domains.len() + 1);
        for (name, source) in &self.sources {
            let key = format!("{SOURCES_PREFIX}{name}");
            let bytes = crate::store::encode_json(&key, source)?;
            writes.push(Write::put(key, Expect::Any, bytes));
        }
        for gone in self.stored_sources.iter().filter(|name| !self.sources.contains_key(*name)) {
            writes.push(Write::delete(format!("{SOURCES_PREFIX}{gone}"), Expect::Any));
        }
        writes.push(Write::put(SITE_KEY, Expect::Any, crate::store::encode_json(SITE_KEY, &self.site)?));
        for (name, domain) in &self.domains {
            let key = format!("{DOMAINS_PREFIX}{name}");
            let bytes = crate::store::encode_json(&key, domain)?;
            writes.push(Write::put(key, Expect::Any, bytes));
        }
        for gone in self.stored_domains.iter().filter(|name| !self.domains.contains_key(*name)) {
            writes.push(Write::delete(format!("{DOMAINS_PREFIX}{gone}"), Expect::Any));
        }
        writes.push(Write::put(
            GRID_SCHEDULE_KEY,
            Expect::Any,
            crate::store::encode_json(GRID_SCHEDULE_KEY, &self.grid)?,
        ));
        Ok(Snapshot {
            generation: self.generation,
            writes,
            sources: self.sources.keys().cloned().collect(),
            domains: self.domains.keys().cloned().collect(),
        })
    }

    /// The store holds something other than any generation of this table (a change stored ahead
    /// that then did not apply): count that as a change, so the table is written over it.
    pub fn store_diverged(&mut self) {
        self.generation += 1;
    }

    /// The store now holds `snapshot`, taken from this table (not from a copy that went ahead).
    pub fn stored_as(&mut self, snapshot: &Snapshot) {
        if snapshot.generation > self.stored {
            self.stored = snapshot.generation;
            self.stored_sources = snapshot.sources.clone();
            self.stored_domains = snapshot.domains.clone();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::file::FileStore;

    fn source(name: &str, watts: f64, ramp: Option<f64>) -> PowerChange {
        PowerChange::SetSource(SourceUpdate {
            name: name.into(),
            kind: SourceKind::Grid,
            available_watts: watts,
            ramp_watts_per_second: ramp,
            domain: None,
        })
    }

    #[tokio::test]
    async fn sources_and_site_are_durable_and_validated_by_field() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::open(dir.path().join("w.redb")).unwrap();
        let mut table = PowerTable::load(&store).await.unwrap();
        table.apply(&source("grid", 30e6, None), 0).unwrap();
        table.apply(&source("solar", 1e6, None), 0).unwrap();
        table.apply(&PowerChange::SetSite(SiteUpdate { reserve_ratio: Some(0.1), ..Default::default() }), 0).unwrap();
        for (bad, field) in [
            (source("grid", -5.0, None), "source.available_watts"),
            (source("grid", 1e15, None), "source.available_watts"),
            (source("grid", f64::NAN, None), "source.available_watts"),
            (source("grid", 1e6, Some(0.0)), "source.ramp_watts_per_second"),
            (source("Bad Name", 1e6, None), "source.name"),
            (PowerChange::SetSite(SiteUpdate { pue: Some(0.5), ..Default::default() }), "site.pue"),
        ] {
            match table.apply(&bad, 0) {
                Err(PowerError::Invalid(e)) => assert_eq!(e.field, field),
                other => panic!("{field}: {other:?}"),
            }
        }
        assert!(matches!(table.apply(&PowerChange::RemoveSource("nope".into()), 0), Err(PowerError::UnknownSource(_))));
        assert_eq!(table.generation(), 3, "bad changes change nothing");
        assert!(table.unstored());
        let snapshot = table.snapshot().unwrap();
        store.commit(snapshot.writes.clone()).await.unwrap();
        table.stored_as(&snapshot);
        assert!(!table.unstored());
        // A removed source is deleted from the store by the next snapshot.
        table.apply(&PowerChange::RemoveSource("solar".into()), 0).unwrap();
        store.commit(table.snapshot().unwrap().writes).await.unwrap();

        let reloaded = PowerTable::load(&store).await.unwrap();
        assert_eq!(reloaded.available_watts(0), 30e6);
        assert_eq!(reloaded.sources().count(), 1);
        assert_eq!(reloaded.site().reserve_ratio, 0.1);
    }

    #[tokio::test]
    async fn domains_are_durable_and_only_a_lower_limit_over_the_same_nodes_tightens() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::open(dir.path().join("w.redb")).unwrap();
        let mut table = PowerTable::load(&store).await.unwrap();
        let domain = |name: &str, parent: Option<&str>, limit: f64, rack: &str| {
            PowerChange::SetDomain(Domain {
                name: name.into(),
                parent: parent.map(Into::into),
                limit_watts: limit,
                selector: [("rack".to_string(), rack.to_string())].into_iter().collect(),
            })
        };
        assert_eq!(table.check(&domain("row-1", None, 4e5, "x"), 0).unwrap(), Direction::Tightens, "a new limit");
        table.apply(&domain("row-1", None, 4e5, "x"), 0).unwrap();
        table.apply(&domain("rack-1", Some("row-1"), 4e4, "r1"), 0).unwrap();
        assert_eq!(table.check(&domain("rack-1", Some("row-1"), 3e4, "r1"), 0).unwrap(), Direction::Tightens);
        assert_eq!(table.check(&domain("rack-1", Some("row-1"), 5e4, "r1"), 0).unwrap(), Direction::Loosens);
        assert_eq!(
            table.check(&domain("rack-1", Some("row-1"), 3e4, "r2"), 0).unwrap(),
            Direction::Loosens,
            "other nodes"
        );
        assert_eq!(table.check(&PowerChange::RemoveDomain("rack-1".into()), 0).unwrap(), Direction::Loosens);
        match table.check(&PowerChange::RemoveDomain("row-1".into()), 0) {
            Err(PowerError::Invalid(e)) => assert!(e.message.contains("rack-1"), "{e:?}"),
            other => panic!("{other:?}"),
        }
        assert!(matches!(table.check(&PowerChange::RemoveDomain("nope".into()), 0), Err(PowerError::UnknownDomain(_))));
        // A source feeding row-1: its limit is what the source gives, less the reserve, when lower.
        let feed = |domain: &str, watts: f64| {
            PowerChange::SetSource(SourceUpdate {
                name: "gen-1".into(),
                kind: SourceKind::Generator,
                available_watts: watts,
                ramp_watts_per_second: None,
                domain: Some(domain.into()),
            })
        };
        match table.apply(&feed("nope", 1e5), 0) {
            Err(PowerError::Invalid(e)) => assert_eq!(e.field, "source.domain"),
            other => panic!("{other:?}"),
        }
        table.apply(&feed("row-1", 1e5), 0).unwrap();
        let row = table.tree().domains.iter().position(|d| d.name == "row-1").unwrap();
        assert_eq!(table.domain_limits(0)[row], 1e5 * 0.95, "the generator gives less than the breaker");
        table.apply(&feed("row-1", 1e6), 0).unwrap();
        assert_eq!(table.domain_limits(0)[row], 4e5, "the breaker binds");
        match table.check(&PowerChange::RemoveDomain("row-1".into()), 0) {
            Err(PowerError::Invalid(e)) => assert!(e.message.contains("gen-1"), "{e:?}"),
            other => panic!("{other:?}"),
        }
        table.apply(&PowerChange::RemoveSource("gen-1".into()), 0).unwrap();
        let tree_before = table.tree().id;
        let snapshot = table.snapshot().unwrap();
        store.commit(snapshot.writes.clone()).await.unwrap();
        table.stored_as(&snapshot);
        table.apply(&PowerChange::RemoveDomain("rack-1".into()), 0).unwrap();
        assert_ne!(table.tree().id, tree_before, "a new tree: nodes' paths are worked out again");
        store.commit(table.snapshot().unwrap().writes).await.unwrap();
        let reloaded = PowerTable::load(&store).await.unwrap();
        let names: Vec<&str> = reloaded.domains().map(|d| d.name.as_str()).collect();
        assert_eq!(names, ["row-1"], "the removed one is deleted from the store");
    }

    #[test]
    fn a_change_tightens_only_when_it_can_only_lower_the_budget() {
        let mut table = PowerTable::empty();
        let site = |update: SiteUpdate| PowerChange::SetSite(update);
        // No source is an unlimited budget: a first source limits it.
        assert_eq!(table.check(&source("grid", 10e6, None), 0).unwrap(), Direction::Tightens);
        table.apply(&source("grid", 10e6, None), 0).unwrap();
        assert_eq!(table.check(&source("grid", 7e6, None), 0).unwrap(), Direction::Tightens);
        assert_eq!(table.check(&source("grid", 10e6, None), 0).unwrap(), Direction::Tightens);
        assert_eq!(table.check(&source("grid", 12e6, None), 0).unwrap(), Direction::Loosens);
        assert_eq!(table.check(&source("gen", 1e6, None), 0).unwrap(), Direction::Loosens);
        assert_eq!(table.check(&source("gen", 0.0, None), 0).unwrap(), Direction::Tightens);
        // The last source removed leaves power unmanaged: that loosens.
        assert_eq!(table.check(&PowerChange::RemoveSource("grid".into()), 0).unwrap(), Direction::Loosens);
        table.apply(&source("gen", 1e6, None), 0).unwrap();
        assert_eq!(table.check(&PowerChange::RemoveSource("gen".into()), 0).unwrap(), Direction::Tightens);
        // A ramping source: back to what it supplies now tightens, above it loosens.
        table.apply(&source("grid", 5e6, None), 0).unwrap();
        table.apply(&source("grid", 10e6, Some(1e6)), 0).unwrap();
        assert_eq!(table.check(&source("grid", 5e6, Some(1e6)), 0).unwrap(), Direction::Tightens);
        assert_eq!(table.check(&source("grid", 6e6, Some(1e6)), 0).unwrap(), Direction::Loosens);
        assert_eq!(table.check(&source("grid", 6e6, Some(1e6)), 2_000).unwrap(), Direction::Tightens);
        // Site: a larger reserve, PUE, overhead or idle allowance tightens; any smaller loosens.
        let more = SiteUpdate { reserve_ratio: Some(0.2), pue: Some(1.3), ..Default::default() };
        assert_eq!(table.check(&site(more), 0).unwrap(), Direction::Tightens);
        let mixed = SiteUpdate { reserve_ratio: Some(0.2), pue: Some(1.0), ..Default::default() };
        table.apply(&site(SiteUpdate { pue: Some(1.2), ..Default::default() }), 0).unwrap();
        assert_eq!(table.check(&site(mixed), 0).unwrap(), Direction::Loosens);
    }

    #[tokio::test]
    async fn the_grid_schedule_caps_the_grid_sources_and_domains_is_durable_and_validated() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::open(dir.path().join("w.redb")).unwrap();
        let mut table = PowerTable::load(&store).await.unwrap();
        table.apply(&source("grid", 8_000.0, Some(1_000.0)), -100_000).unwrap();
        let generator = PowerChange::SetSource(SourceUpdate {
            name: "gen".into(),
            kind: SourceKind::Generator,
            available_watts: 2_000.0,
            ramp_watts_per_second: None,
            domain: None,
        });
        table.apply(&generator, 0).unwrap();
        table
            .apply(
                &PowerChange::SetDomain(Domain {
                    name: "rack-1".into(),
                    parent: None,
                    limit_watts: 3_000.0,
                    selector: [("rack".to_string(), "r1".to_string())].into_iter().collect(),
                }),
                0,
            )
            .unwrap();
        let window = |target, watts, start, end| crate::power::grid::window("e1", target, watts, start, end);
        let schedule = GridSchedule {
            windows: vec![
                window(GridTarget::Site, 6_000.0, 10_000, 40_000),
                window(GridTarget::Domain("rack-1".into()), 1_000.0, 10_000, 40_000),
            ],
        };
        let change = PowerChange::SetGridSchedule(schedule.clone());
        assert_eq!(table.check(&change, 0).unwrap(), Direction::Tightens, "windows added only lower the budget");
        table.apply(&change, 0).unwrap();
        assert_eq!(table.available_watts(0), 10_000.0, "not yet in force");
        assert_eq!(table.available_watts(10_000), 8_000.0, "the grid's import capped, the generator's not");
        assert_eq!(table.domain_limits(10_000), vec![1_000.0]);
        assert_eq!(table.domain_limits(40_000), vec![3_000.0], "a domain's window lifts at once");
        assert_eq!(table.available_watts(41_000), 9_000.0, "the import lifts along the grid's ramp");
        assert!(table.grid_moves(5_000, 10_000) && table.grid_moves(40_500, 41_000) && !table.grid_moves(0, 9_999));
        assert!(table.grid_moves(41_900, 42_500), "lifting at the last pass: one more");
        assert!(!table.grid_moves(42_100, 43_000), "lifted");
        assert_eq!(
            table.check(&PowerChange::SetGridSchedule(GridSchedule::default()), 20_000).unwrap(),
            Direction::Loosens,
            "dropping a window is stored first"
        );
        match table.check(&PowerChange::RemoveDomain("rack-1".into()), 0) {
            Err(PowerError::Invalid(e)) => assert!(e.message.contains("e1"), "{e:?}"),
            other => panic!("{other:?}"),
        }
        let bad = [
            (window(GridTarget::Site, f64::NAN, 0, 1), "grid.windows[0].limit"),
            (window(GridTarget::Site, 1.0, 5, 5), "grid.windows[0].end_unix_ms"),
            (window(GridTarget::Domain("nope".into()), 1.0, 0, 5), "grid.windows[0].target"),
        ];
        for (w, field) in bad {
            match table.check(&PowerChange::SetGridSchedule(GridSchedule { windows: vec![w] }), 0) {
                Err(PowerError::Invalid(e)) => assert_eq!(e.field, field),
                other => panic!("{field}: {other:?}"),
            }
        }
        store.commit(table.snapshot().unwrap().writes).await.unwrap();
        let reloaded = PowerTable::load(&store).await.unwrap();
        assert_eq!(reloaded.grid(), &schedule, "stored with the sources");
    }
}
