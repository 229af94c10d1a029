//! `watt-controller`: the cluster's one point of decision.
//!
//! Agents hold a session with it ([`session`]); users submit jobs through the client API
//! ([`api`]); jobs live in a durable [`store`]. Every job decision is one pure function,
//! [`decide`] (with the [`scheduler`], power admission and growth inside it); the [`reconcile`]
//! loop is the shell that gathers its view, stores its decisions and sends them as shard orders
//! to agents, and, through [`power_control`], keeps the cluster inside its [`power`] budget with
//! cap orders.

pub mod api;
pub mod app;
pub mod auth;
pub mod clock;
pub mod config;
pub mod decide;
pub mod error;
pub mod jobs;
pub mod leader_gate;
pub mod leadership;
pub mod log_grants;
pub mod metrics;
pub mod openadr;
pub mod power;
pub mod power_control;
pub mod power_writer;
pub mod progress;
pub mod reconcile;
pub mod registry;
pub mod regrow;
pub mod retention;
pub mod run_tokens;
pub mod scheduler;
pub mod secrets;
pub mod session;
pub mod spec;
pub mod speed_curves;
pub mod store;
pub mod swings;
pub mod tls;

pub use error::ControllerError;

/// A map keyed by node or job names, rebuilt or probed hundreds of thousands of times a pass on a
/// large cluster: foldhash, several times faster than SipHash on short keys. Its seed is random
/// per process, which its authors call minimally DoS-resistant — not proof against a caller who
/// studies the running controller to pick colliding names; only those who may register a node
/// or submit a job choose names.
pub type NameMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;

/// A set of node or job names (see [`NameMap`]).
pub type NameSet<K> = std::collections::HashSet<K, foldhash::fast::RandomState>;
