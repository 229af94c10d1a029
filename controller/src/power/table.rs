//! Power sources and site settings as stored: `power/sources/<name>` and `power/site`, JSON,
//! written compare-and-swap and durable before a change is acknowledged. Validation names the
//! field and changes nothing.

use std::collections::BTreeMap;
use std::sync::Arc;

use super::{Site, Source, SourceKind};
use crate::spec::FieldError;
use crate::store::{Expect, Store, StoreError, Version, Write};

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
}

/// Site settings as requested: only the given ones change.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct SiteUpdate {
    pub reserve_ratio: Option<f64>,
    pub pue: Option<f64>,
    pub node_overhead_watts: Option<f64>,
    pub idle_gpu_watts: Option<f64>,
}

#[derive(Debug, thiserror::Error)]
pub enum PowerError {
    #[error(transparent)]
    Invalid(#[from] FieldError),
    #[error("no power source named {0:?}")]
    UnknownSource(String),
    #[error(transparent)]
    Store(#[from] StoreError),
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
        Ok(Site {
            reserve_ratio: self.reserve_ratio.unwrap_or(site.reserve_ratio),
            pue: self.pue.unwrap_or(site.pue),
            node_overhead_watts: self.node_overhead_watts.unwrap_or(site.node_overhead_watts),
            idle_gpu_watts: self.idle_gpu_watts.unwrap_or(site.idle_gpu_watts),
        })
    }
}

/// The controller's copy of sources and site, with store versions.
#[derive(Debug)]
pub struct PowerTable {
    store: Arc<dyn Store>,
    sources: BTreeMap<String, (Source, Version)>,
    site: (Site, Version),
}

impl PowerTable {
    pub async fn load(store: Arc<dyn Store>) -> Result<Self, StoreError> {
        let mut sources = BTreeMap::new();
        for e in store.list(SOURCES_PREFIX).await? {
            let s: Source = crate::store::decode_json(&e.key, &e.value)?;
            sources.insert(s.name.clone(), (s, e.version));
        }
        let site = match store.get(SITE_KEY).await? {
            Some(e) => (crate::store::decode_json(&e.key, &e.value)?, e.version),
            None => (Site::default(), 0),
        };
        Ok(PowerTable { store, sources, site })
    }

    pub fn sources(&self) -> impl Iterator<Item = &Source> {
        self.sources.values().map(|(s, _)| s)
    }

    pub fn site(&self) -> Site {
        self.site.0
    }

    /// Σ what every source supplies at `now`.
    pub fn available_watts(&self, now_unix_ms: i64) -> f64 {
        self.sources().map(|s| s.effective_watts(now_unix_ms)).sum()
    }

    pub async fn set_source(&mut self, update: SourceUpdate, now_unix_ms: i64) -> Result<Source, PowerError> {
        update.validate()?;
        let (source, expect) = match self.sources.get(&update.name) {
            Some((old, version)) => (
                old.updated(update.kind, update.available_watts, update.ramp_watts_per_second, now_unix_ms),
                Expect::Version(*version),
            ),
            None => (
                Source::new(
                    &update.name,
                    update.kind,
                    update.available_watts,
                    update.ramp_watts_per_second,
                    now_unix_ms,
                ),
                Expect::Absent,
            ),
        };
        let key = format!("{SOURCES_PREFIX}{}", source.name);
        let bytes = crate::store::encode_json(&key, &source)?;
        let version = self.store.commit(vec![Write::put(key, expect, bytes)]).await?;
        self.sources.insert(source.name.clone(), (source.clone(), version));
        Ok(source)
    }

    pub async fn remove_source(&mut self, name: &str) -> Result<(), PowerError> {
        let (_, version) = self.sources.get(name).ok_or_else(|| PowerError::UnknownSource(name.into()))?;
        self.store.commit(vec![Write::delete(format!("{SOURCES_PREFIX}{name}"), Expect::Version(*version))]).await?;
        self.sources.remove(name);
        Ok(())
    }

    pub async fn set_site(&mut self, update: SiteUpdate) -> Result<Site, PowerError> {
        let site = update.apply(&self.site.0)?;
        let expect = if self.site.1 == 0 { Expect::Absent } else { Expect::Version(self.site.1) };
        let bytes = crate::store::encode_json(SITE_KEY, &site)?;
        let version = self.store.commit(vec![Write::put(SITE_KEY, expect, bytes)]).await?;
        self.site = (site, version);
        Ok(site)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::file::FileStore;

    fn update(name: &str, watts: f64, ramp: Option<f64>) -> SourceUpdate {
        SourceUpdate { name: name.into(), kind: SourceKind::Grid, available_watts: watts, ramp_watts_per_second: ramp }
    }

    #[tokio::test]
    async fn sources_and_site_are_durable_and_validated_by_field() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(FileStore::open(dir.path().join("w.redb")).unwrap());
        let mut table = PowerTable::load(store.clone()).await.unwrap();
        table.set_source(update("grid", 30e6, None), 0).await.unwrap();
        table.set_site(SiteUpdate { reserve_ratio: Some(0.1), ..Default::default() }).await.unwrap();
        for (bad, field) in [
            (update("grid", -5.0, None), "source.available_watts"),
            (update("grid", 1e15, None), "source.available_watts"),
            (update("grid", f64::NAN, None), "source.available_watts"),
            (update("grid", 1e6, Some(0.0)), "source.ramp_watts_per_second"),
            (update("Bad Name", 1e6, None), "source.name"),
        ] {
            match table.set_source(bad, 0).await {
                Err(PowerError::Invalid(e)) => assert_eq!(e.field, field),
                other => panic!("{field}: {other:?}"),
            }
        }
        assert!(matches!(table.remove_source("nope").await, Err(PowerError::UnknownSource(_))));
        let bad_site = table.set_site(SiteUpdate { pue: Some(0.5), ..Default::default() }).await;
        assert!(matches!(bad_site, Err(PowerError::Invalid(e)) if e.field == "site.pue"));

        let reloaded = PowerTable::load(store).await.unwrap();
        assert_eq!(reloaded.available_watts(0), 30e6, "bad updates changed nothing; good ones survived");
        assert_eq!(reloaded.site().reserve_ratio, 0.1);
    }
}
