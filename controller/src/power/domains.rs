//! Power domains: how power reaches the GPUs inside the site. A transformer feeds rows, a row's
//! PDU feeds racks, each behind a breaker; a budget that fits the site can still trip a rack's
//! breaker if that rack's GPUs all run at their maximum. Each domain has a limit (breaker rating ×
//! derating, in W) that its nodes' counted power must stay under, as the site's does under the
//! sources (ARCHITECTURE.md invariant 13), and selects its nodes by their labels (`--labels
//! rack=r12,row=r3` on the agent) among its parent's nodes. The site is the root; a domain with
//! no parent is directly under it.
//!
//! Stored as `power/domains/<name>` (JSON) with the sources ([`super::table`]); [`DomainTree`] is
//! the form decisions use: parents before children, by position, and the path of domains a
//! node's labels put it in.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::spec::FieldError;

pub const DOMAINS_PREFIX: &str = "power/domains/";
/// Deeper than this is a mistake (site → feed → row → rack → PDU is four below the site).
pub const MAX_DEPTH: usize = 8;
/// More than this is a mistake too (3,125 racks, 250 rows and 10 feeds fit ten times over).
pub const MAX_DOMAINS: usize = 50_000;

/// Node labels: `rack=r12`.
pub type Labels = BTreeMap<String, String>;

/// One domain as stored and as requested.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Domain {
    pub name: String,
    /// The domain it is part of; `None`: directly under the site.
    #[serde(default)]
    pub parent: Option<String>,
    /// What its nodes' counted power must stay under: the breaker's rating × its derating.
    pub limit_watts: f64,
    /// The labels that put a node in it, every one matching, among its parent's nodes.
    pub selector: Labels,
}

impl Domain {
    /// The domain on its own: its name, limit and selector, naming the field at fault.
    pub fn validate(&self) -> Result<(), FieldError> {
        watt_common::names::check(&self.name).map_err(|m| FieldError::new("domain.name", m))?;
        if let Some(parent) = &self.parent {
            watt_common::names::check(parent).map_err(|m| FieldError::new("domain.parent", m))?;
            if parent == &self.name {
                return Err(FieldError::new("domain.parent", "a domain cannot be its own parent"));
            }
        }
        let w = self.limit_watts;
        if !(w.is_finite() && w > 0.0 && w <= super::table::MAX_SOURCE_WATTS) {
            return Err(FieldError::new(
                "domain.limit_watts",
                format!("must be above 0 W and at most {:.0} GW (got {w} W)", super::table::MAX_SOURCE_WATTS / 1e9),
            ));
        }
        if self.selector.is_empty() {
            return Err(FieldError::new(
                "domain.selector",
                "must name at least one node label (rack=r12): a domain of every node is the site",
            ));
        }
        for (key, value) in &self.selector {
            watt_common::names::check_label(key, value).map_err(|m| FieldError::new("domain.selector", m))?;
        }
        Ok(())
    }

    pub fn selects(&self, labels: &Labels) -> bool {
        self.selector.iter().all(|(k, v)| labels.get(k) == Some(v))
    }
}

/// Whether `domains` with `next` set in them still form a tree under the site: its parent
/// exists, it does not end up under itself, and no branch grows deeper than [`MAX_DEPTH`].
pub fn check_tree(domains: &BTreeMap<String, Domain>, next: &Domain) -> Result<(), FieldError> {
    if !domains.contains_key(&next.name) && domains.len() >= MAX_DOMAINS {
        return Err(FieldError::new("domain.name", format!("at most {MAX_DOMAINS} domains")));
    }
    let parent_of = |name: &str| -> Option<&str> {
        if name == next.name {
            next.parent.as_deref()
        } else {
            domains.get(name).and_then(|d| d.parent.as_deref())
        }
    };
    if let Some(parent) = &next.parent {
        if !domains.contains_key(parent) {
            return Err(FieldError::new("domain.parent", format!("no domain named {parent:?}")));
        }
    }
    // Every domain must reach the site, within MAX_DEPTH levels, without passing itself.
    for name in domains.keys().map(String::as_str).chain([next.name.as_str()]) {
        let (mut at, mut depth) = (name, 1);
        while let Some(parent) = parent_of(at) {
            depth += 1;
            if parent == name || depth > MAX_DEPTH {
                let what = if parent == name { "it would be under itself" } else { "the tree would be too deep" };
                return Err(FieldError::new(
                    "domain.parent",
                    format!("{what}: at most {MAX_DEPTH} levels below the site, and no domain under itself"),
                ));
            }
            at = parent;
        }
    }
    Ok(())
}

/// One domain as decisions use it.
#[derive(Debug, Clone, PartialEq)]
pub struct TreeDomain {
    pub name: String,
    /// Its parent's position (always before its own); `None`: under the site.
    pub parent: Option<usize>,
    pub limit_watts: f64,
    selector: Vec<(String, String)>,
}

/// The domains, parents before children (by depth, then name), each with its position.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DomainTree {
    pub domains: Vec<TreeDomain>,
    /// Distinct for every tree built in this process (0: the empty default): a node's path,
    /// worked out once, holds while the tree it was worked out in is the one in force.
    pub id: u64,
}

static TREES_BUILT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

impl DomainTree {
    /// The tree of `domains`, which [`check_tree`] kept a tree.
    pub fn new(domains: &BTreeMap<String, Domain>) -> DomainTree {
        let depth = |d: &Domain| {
            let mut depth = 0;
            let mut at = d;
            while let Some(parent) = at.parent.as_ref().and_then(|p| domains.get(p)) {
                depth += 1;
                at = parent;
                if depth > MAX_DEPTH {
                    break;
                }
            }
            depth
        };
        let mut order: Vec<(usize, &Domain)> = domains.values().map(|d| (depth(d), d)).collect();
        order.sort_by(|a, b| a.0.cmp(&b.0).then_with(|| a.1.name.cmp(&b.1.name)));
        let position: BTreeMap<&str, usize> =
            order.iter().enumerate().map(|(i, (_, d))| (d.name.as_str(), i)).collect();
        DomainTree {
            id: TREES_BUILT.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1,
            domains: order
                .iter()
                .map(|(_, d)| TreeDomain {
                    name: d.name.clone(),
                    parent: d.parent.as_deref().and_then(|p| position.get(p).copied()),
                    limit_watts: d.limit_watts,
                    selector: d.selector.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
                })
                .collect(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.domains.is_empty()
    }

    pub fn len(&self) -> usize {
        self.domains.len()
    }

    /// The positions of the domains a node with `labels` is in, parents first: each selects it,
    /// and so does each one's parent.
    pub fn path(&self, labels: &Labels) -> Vec<u32> {
        let mut inside = vec![false; self.domains.len()];
        let mut path = Vec::new();
        for (i, d) in self.domains.iter().enumerate() {
            let selected = d.selector.iter().all(|(k, v)| labels.get(k) == Some(v));
            if selected && d.parent.is_none_or(|p| inside[p]) {
                inside[i] = true;
                path.push(i as u32);
            }
        }
        path
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn domain(name: &str, parent: Option<&str>, limit_watts: f64, selector: &[(&str, &str)]) -> Domain {
        Domain {
            name: name.into(),
            parent: parent.map(Into::into),
            limit_watts,
            selector: selector.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        }
    }

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn a_node_is_in_each_domain_that_selects_it_within_its_parent() {
        let mut all = BTreeMap::new();
        for d in [
            domain("feed-a", None, 1e6, &[("feed", "a")]),
            domain("row-1", Some("feed-a"), 2e5, &[("row", "1")]),
            domain("rack-1", Some("row-1"), 4e4, &[("rack", "1")]),
            domain("rack-2", Some("row-1"), 4e4, &[("rack", "2")]),
        ] {
            check_tree(&all, &d).unwrap();
            all.insert(d.name.clone(), d);
        }
        let tree = DomainTree::new(&all);
        let names =
            |path: Vec<u32>| -> Vec<&str> { path.iter().map(|&i| tree.domains[i as usize].name.as_str()).collect() };
        assert_eq!(
            names(tree.path(&labels(&[("feed", "a"), ("row", "1"), ("rack", "2")]))),
            ["feed-a", "row-1", "rack-2"]
        );
        // Rack 1's labels on a node of another feed: not in row 1, so not in its racks.
        assert_eq!(names(tree.path(&labels(&[("feed", "b"), ("row", "1"), ("rack", "1")]))), Vec::<&str>::new());
        assert_eq!(names(tree.path(&labels(&[("feed", "a")]))), ["feed-a"]);
        for (i, d) in tree.domains.iter().enumerate() {
            assert!(d.parent.is_none_or(|p| p < i), "parents first: {tree:?}");
        }
    }

    #[test]
    fn a_domain_that_breaks_the_tree_or_its_own_rules_is_named_by_field() {
        let mut all = BTreeMap::new();
        let row = domain("row-1", None, 2e5, &[("row", "1")]);
        all.insert(row.name.clone(), row);
        let rack = domain("rack-1", Some("row-1"), 4e4, &[("rack", "1")]);
        all.insert(rack.name.clone(), rack);
        for (bad, field) in [
            (domain("Rack", None, 1.0, &[("rack", "1")]), "domain.name"),
            (domain("r", None, 0.0, &[("rack", "1")]), "domain.limit_watts"),
            (domain("r", None, f64::NAN, &[("rack", "1")]), "domain.limit_watts"),
            (domain("r", None, 1.0, &[]), "domain.selector"),
            (domain("r", None, 1.0, &[("rack", "a b")]), "domain.selector"),
            (domain("r", Some("r"), 1.0, &[("rack", "1")]), "domain.parent"),
        ] {
            assert_eq!(bad.validate().unwrap_err().field, field, "{bad:?}");
        }
        let orphan = domain("r", Some("nowhere"), 1.0, &[("rack", "1")]);
        assert_eq!(check_tree(&all, &orphan).unwrap_err().field, "domain.parent");
        // row-1 moved under its own rack: a cycle.
        let cycle = domain("row-1", Some("rack-1"), 2e5, &[("row", "1")]);
        let e = check_tree(&all, &cycle).unwrap_err();
        assert!(e.field == "domain.parent" && e.message.contains("under itself"), "{e:?}");
        // Nine levels below the site.
        let mut deep = BTreeMap::new();
        for i in 0..MAX_DEPTH {
            let d = domain(&format!("d{i}"), (i > 0).then(|| format!("d{}", i - 1)).as_deref(), 1.0, &[("l", "x")]);
            check_tree(&deep, &d).unwrap();
            deep.insert(d.name.clone(), d);
        }
        let too_deep = domain("d-extra", Some(&format!("d{}", MAX_DEPTH - 1)), 1.0, &[("l", "x")]);
        assert!(check_tree(&deep, &too_deep).unwrap_err().message.contains("too deep"));
    }
}
