//! Which controller leads: one leader issues every order (invariant 9 in ARCHITECTURE.md).
//!
//! On etcd, the leader is the controller whose key [`ELECTION_KEY`] exists, written with a lease
//! that it keeps alive; its **term** is the revision that created the key, which only grows. Every
//! store write the leader makes carries a compare on that key's creation revision
//! ([`crate::store::etcd::Fence`]), so a deposed leader's writes fail. A leader steps down at
//! [`step_down_at`]: a margin before the lease could expire, counted from the moment it sent the
//! last keep-alive etcd answered — etcd counts the lease from when it received that keep-alive,
//! which is later — so it stops before any other controller can start. Followers wait for the key
//! to go (a watch, and a look every second) and then campaign.
//!
//! A leader that steps down because etcd does not answer (not because it was deposed) becomes
//! the **caretaker** of its term ([`Standing::Caretaking`], invariant 11): while its lease may
//! still be alive no other controller can lead, and when etcd has lost its quorum no one can, so
//! it keeps its agents' sessions and only lowers caps. It keeps trying to renew: if etcd answers
//! that the lease lives and the key is still its own (etcd extends every lease when its quorum
//! returns), no one led meanwhile and it leads again in the same term; if etcd says the lease
//! ended, it has lost the term.
//!
//! The embedded file store admits one controller (the file is locked), which always leads; its
//! term is a counter in the store that each start raises.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{Client, Compare, CompareOp, EventType, PutOptions, Txn, TxnOp, WatchOptions};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::store::etcd::{EtcdStore, Fence};
use crate::store::{Expect, Store, StoreError, Write};

/// The election's key in etcd: outside the store's `/watt/v1/` prefix, so no listing of Watt's
/// records sees it.
pub const ELECTION_KEY: &str = "/watt/leader/v1";
/// The file store's term counter.
pub const TERM_KEY: &str = "meta/term";
/// How long a leader's lease lasts without a keep-alive, by default. A killed leader's
/// successor starts within this (plus a watch event), so it bounds failover.
pub const DEFAULT_LEASE: Duration = Duration::from_secs(3);

/// What this controller is now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Role {
    /// Waiting to lead; `leader` is the address the current leader advertises, when one leads.
    Follower {
        leader: Option<String>,
    },
    Leader {
        term: u64,
    },
    /// Led `term` and lost touch with the store: only lowers caps until it leads again or loses
    /// the term (invariant 11).
    Caretaker {
        term: u64,
    },
}

impl Role {
    pub fn is_leader(&self) -> bool {
        matches!(self, Role::Leader { .. })
    }
}

/// Where a won leadership stands (see the module's header).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Standing {
    Leading,
    /// The lease could not be renewed in time: no order but a cap decrease until it is.
    Caretaking,
    /// For good: the lease ended, the key is another's, or the keeper is gone.
    Lost,
}

/// When a leader whose last answered keep-alive was sent at `sent` must have stopped issuing
/// orders, for a lease of `ttl`: a third of the lease before it could expire, which leaves room
/// for the orders already on their way and for the clocks' rates.
pub fn step_down_at(sent: Instant, ttl: Duration) -> Instant {
    sent + ttl - ttl / 3
}

/// How often a leader renews its lease: six times a lease, so that a keep-alive or two lost to a
/// slow etcd still leaves it leading.
fn renew_every(ttl: Duration) -> Duration {
    ttl / 6
}

/// The leadership a campaign won, for as long as it holds.
pub struct Lead {
    pub term: u64,
    /// The store, with every commit fenced by this leadership.
    pub store: Arc<dyn Store>,
    /// Leading, caretaking (back and forth), then lost for good. Its sender dropped (the keeper
    /// gone) counts as lost too.
    standing: watch::Receiver<Standing>,
    /// The sole leader's sender, kept so its leadership is never seen as lost.
    _sole: Option<watch::Sender<Standing>>,
    /// The lease to revoke when the leader resigns (etcd only).
    lease: Option<(Client, i64)>,
    /// Stops the keep-alive (its thread ends when this is dropped or sent).
    keeper: Option<watch::Sender<bool>>,
}

impl std::fmt::Debug for Lead {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lead").field("term", &self.term).field("standing", &self.standing()).finish_non_exhaustive()
    }
}

impl Lead {
    /// Where this leadership stands now.
    pub fn standing(&self) -> Standing {
        if self.standing.has_changed().is_err() {
            return Standing::Lost;
        }
        *self.standing.borrow()
    }

    /// Resolves at the next change of [`Self::standing`] (at once if lost), with the new one.
    pub async fn changed(&self, from: Standing) -> Standing {
        let mut standing = self.standing.clone();
        let now = match standing.wait_for(|s| *s != from).await {
            Ok(now) => *now,
            Err(_) => Standing::Lost,
        };
        now
    }

    /// Resolves when this leadership is lost for good (at once, if it already is).
    pub async fn lost(&self) {
        let mut standing = self.standing.clone();
        let _ = standing.wait_for(|s| *s == Standing::Lost).await;
    }

    /// Resolves when this controller stops leading: caretaking or lost.
    pub async fn stepped_down(&self) {
        let mut standing = self.standing.clone();
        let _ = standing.wait_for(|s| *s != Standing::Leading).await;
    }

    pub fn is_lost(&self) -> bool {
        self.standing() == Standing::Lost
    }

    /// Give the leadership up at once (a controller that shuts down), so a follower need not
    /// wait out the lease.
    pub async fn resign(mut self) {
        if let Some(keeper) = self.keeper.take() {
            keeper.send_replace(true);
        }
        if let Some((mut client, lease)) = self.lease.take() {
            if let Err(e) = client.lease_revoke(lease).await {
                tracing::warn!(error = %e, "Cannot resign the leadership; a follower takes over when the lease ends.");
            }
        }
    }
}

impl Drop for Lead {
    fn drop(&mut self) {
        if let Some(keeper) = self.keeper.take() {
            keeper.send_replace(true);
        }
    }
}

/// How this controller becomes leader: by the store it runs on.
#[derive(Debug, Clone)]
pub enum Election {
    /// The embedded file store: one controller, always the leader.
    Sole(Arc<dyn Store>),
    Etcd {
        store: Box<EtcdStore>,
        lease: Duration,
    },
}

impl Election {
    /// Wait until this controller leads, telling `role` who leads meanwhile; `advertise` is the
    /// address followers give clients for it.
    pub async fn campaign(&self, advertise: &str, role: &watch::Sender<Role>) -> Result<Lead, StoreError> {
        match self {
            Election::Sole(store) => {
                let term = raise_term(store.as_ref()).await?;
                let (sole, standing) = watch::channel(Standing::Leading);
                Ok(Lead { term, store: store.clone(), standing, _sole: Some(sole), lease: None, keeper: None })
            }
            Election::Etcd { store, lease } => campaign_etcd(store, *lease, advertise, role).await,
        }
    }
}

/// The file store's next term, stored before it is used.
async fn raise_term(store: &dyn Store) -> Result<u64, StoreError> {
    loop {
        let (term, expect) = match store.get(TERM_KEY).await? {
            Some(e) => {
                let term = std::str::from_utf8(&e.value).ok().and_then(|s| s.parse::<u64>().ok()).ok_or_else(|| {
                    StoreError::Corrupt(format!("{TERM_KEY}: {:?} is not a term", String::from_utf8_lossy(&e.value)))
                })?;
                (term + 1, Expect::Version(e.version))
            }
            None => (1, Expect::Absent),
        };
        match store.commit(vec![Write::put(TERM_KEY, expect, term.to_string().into_bytes())]).await {
            Ok(_) => return Ok(term),
            Err(StoreError::Conflict { .. }) => continue,
            Err(e) => return Err(e),
        }
    }
}

fn unavailable(e: etcd_client::Error) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

async fn campaign_etcd(
    store: &EtcdStore,
    ttl: Duration,
    advertise: &str,
    role: &watch::Sender<Role>,
) -> Result<Lead, StoreError> {
    let mut client = store.client();
    loop {
        let sent = Instant::now();
        let seconds = ttl.as_secs() as i64;
        let granted = store
            .call(|mut client| async move { client.lease_grant(seconds, None).await })
            .await
            .map_err(unavailable)?;
        let lease = granted.id();
        let ttl = Duration::from_secs(granted.ttl().max(1) as u64).min(ttl);
        let (valid_tx, _) = watch::channel(step_down_at(sent, ttl));
        let (standing_tx, standing) = watch::channel(Standing::Leading);
        let leading = Arc::new(AtomicBool::new(false));
        let keeper = LeaseKeeper {
            store: store.clone(),
            lease,
            ttl,
            leading: leading.clone(),
            valid: valid_tx,
            standing: standing_tx,
        };
        let mut keeper = Some(keeper.spawn()?);
        // Campaign with this lease until it leads or the lease is lost (while campaigning, the
        // keeper never caretakes: a lease it cannot renew is lost).
        while *standing.borrow() == Standing::Leading {
            let txn = Txn::new()
                .when([Compare::version(ELECTION_KEY, CompareOp::Equal, 0)])
                .and_then([TxnOp::put(ELECTION_KEY, advertise, Some(PutOptions::new().with_lease(lease)))])
                .or_else([TxnOp::get(ELECTION_KEY, None)]);
            let response = store
                .call(|mut client| {
                    let txn = txn.clone();
                    async move { client.txn(txn).await }
                })
                .await
                .map_err(unavailable)?;
            let revision = response.header().map(|h| h.revision()).unwrap_or(0);
            if response.succeeded() {
                leading.store(true, Ordering::Release);
                let term = revision as u64;
                let fence = Fence { key: ELECTION_KEY.to_string(), create_revision: revision };
                return Ok(Lead {
                    term,
                    store: Arc::new(store.fenced(fence)),
                    standing,
                    _sole: None,
                    lease: Some((client, lease)),
                    keeper: keeper.take(),
                });
            }
            let leader = response.op_responses().into_iter().find_map(|op| match op {
                etcd_client::TxnOpResponse::Get(get) => {
                    get.kvs().first().map(|kv| String::from_utf8_lossy(kv.value()).into_owned())
                }
                _ => None,
            });
            let following = Role::Follower { leader };
            if *role.borrow() != following {
                if let Role::Follower { leader: Some(at) } = &following {
                    tracing::info!(role = "follower", leader = %at, "Following: another controller leads.");
                }
                role.send_replace(following);
            }
            wait_for_vacancy(&mut client, revision + 1, &standing).await;
        }
        // The lease ran out while campaigning (etcd slow or away): start over with a new one.
        if let Some(keeper) = keeper.take() {
            keeper.send_replace(true);
        }
        tokio::time::sleep(renew_every(ttl)).await;
    }
}

/// Until the election key is deleted after `from` (the leader's lease ended or it resigned), a
/// second passes (a watch can miss what happens while it starts), or our own lease is lost.
async fn wait_for_vacancy(client: &mut Client, from: i64, standing: &watch::Receiver<Standing>) {
    let mut standing = standing.clone();
    let watch_delete = async {
        let options = WatchOptions::new().with_start_revision(from);
        let Ok(mut stream) = client.watch(ELECTION_KEY, Some(options)).await else {
            return std::future::pending().await;
        };
        while let Ok(Some(response)) = stream.message().await {
            if response.events().iter().any(|e| e.event_type() == EventType::Delete) {
                return;
            }
        }
        std::future::pending::<()>().await
    };
    tokio::select! {
        () = watch_delete => {}
        () = tokio::time::sleep(Duration::from_secs(1)) => {}
        _ = standing.wait_for(|s| *s != Standing::Leading) => {}
    }
}

/// What keeps one lease alive (see [`LeaseKeeper::run`]).
struct LeaseKeeper {
    store: EtcdStore,
    lease: i64,
    ttl: Duration,
    /// Set once the campaign won: from then on the election key must stay ours.
    leading: Arc<AtomicBool>,
    /// When to stop leading, moved forward by each answered keep-alive.
    valid: watch::Sender<Instant>,
    standing: watch::Sender<Standing>,
}

impl LeaseKeeper {
    /// Run on a thread and runtime of its own, with a client of its own: a controller busy with a
    /// registration storm of 25,000 agents on two cores must not keep its lease's keep-alives
    /// waiting (and step down for nothing). Sending `true` on the returned sender, or dropping
    /// it, ends the thread.
    fn spawn(self) -> Result<watch::Sender<bool>, StoreError> {
        let (cancel, mut cancelled) = watch::channel(false);
        std::thread::Builder::new()
            .name("watt-lease".into())
            .spawn(move || {
                let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                    Ok(runtime) => runtime,
                    Err(e) => {
                        tracing::error!(error = %e, "Cannot start the lease's keep-alive; giving the leadership up.");
                        self.standing.send_replace(Standing::Lost);
                        return;
                    }
                };
                runtime.block_on(async move {
                    tokio::select! {
                        () = self.run() => {}
                        _ = cancelled.wait_for(|stop| *stop) => {}
                    }
                });
            })
            .map_err(|e| StoreError::Unavailable(format!("cannot start the lease's keep-alive thread: {e}")))?;
        Ok(cancel)
    }
}

impl LeaseKeeper {
    /// Keep the lease alive, moving `valid` (when to stop leading) forward with each answered
    /// keep-alive. When that moment passes: while campaigning, the lease is lost; once leading,
    /// the leader caretakes ([`Standing::Caretaking`]) and keeps trying, and leads again once
    /// etcd answers that the lease lives and the key is still its own. Lost for good when etcd
    /// says the lease is gone, or, once leading, that the election key is no longer ours (an
    /// operator deleted it).
    async fn run(&self) {
        let LeaseKeeper { store, lease, ttl, leading, valid, standing } = self;
        let (lease, ttl) = (*lease, *ttl);
        let mut client: Option<Client> = None;
        let mut renewal = None;
        // Calls refused in a row by members that are down.
        let mut refused = 0;
        loop {
            let caretaking = *standing.borrow() == Standing::Caretaking;
            // A caretaker's tries each get a renewal period: etcd may come back at any moment.
            let deadline = if caretaking { Instant::now() + renew_every(ttl) * 2 } else { *valid.borrow() };
            let sent = Instant::now();
            let renewed = tokio::time::timeout_at(deadline, async {
                let client = match client.as_mut() {
                    Some(client) => client,
                    None => client
                        .insert(store.reconnect().await.map_err(|e| etcd_client::Error::InvalidArgs(e.to_string()))?),
                };
                let (keeper, stream) = match renewal.as_mut() {
                    Some(open) => open,
                    None => renewal.insert(client.lease_keep_alive(lease).await?),
                };
                keeper.keep_alive().await?;
                let answer = stream.message().await?;
                Ok::<_, etcd_client::Error>(answer.map(|a| a.ttl()))
            })
            .await;
            match renewed {
                Err(_) if !leading.load(Ordering::Acquire) => {
                    tracing::warn!("Cannot renew the campaign's lease in time: campaigning anew.");
                    standing.send_replace(Standing::Lost);
                    return;
                }
                Err(_) => {
                    if !caretaking {
                        tracing::error!(
                            "Cannot renew the election lease in time: stepping down to caretaker (cap decreases only)."
                        );
                        standing.send_replace(Standing::Caretaking);
                    }
                    // The connection may be what hangs (a partition): the next try opens a new one.
                    tracing::debug!("A caretaker's keep-alive went unanswered.");
                    renewal = None;
                    client = None;
                }
                Ok(Ok(Some(remaining))) if remaining > 0 => {
                    refused = 0;
                    let granted = Duration::from_secs(remaining as u64).min(ttl);
                    valid.send_replace(step_down_at(sent, granted));
                    // While campaigning the key is another's, as expected.
                    let ours = match client.as_mut() {
                        Some(client) if leading.load(Ordering::Acquire) => still_ours(client, lease).await,
                        _ => Ok(true),
                    };
                    match ours {
                        Ok(false) => {
                            tracing::error!("The election key is no longer this controller's: stepping down.");
                            standing.send_replace(Standing::Lost);
                            return;
                        }
                        // The lease lived all along with the key on it: no one else led.
                        Ok(true) if caretaking && Instant::now() < *valid.borrow() => {
                            tracing::info!("etcd answers again and the lease lives: leading again in the same term.");
                            standing.send_replace(Standing::Leading);
                        }
                        _ => {}
                    }
                }
                Ok(Ok(Some(_))) => {
                    tracing::error!("etcd says the election lease has ended: stepping down (or campaigning anew).");
                    standing.send_replace(Standing::Lost);
                    return;
                }
                Ok(Err(e)) if crate::store::etcd::never_sent(&e) && refused < 4 => {
                    // A member is down and the call went to it: try another at once (a few
                    // times: with every member down, each call is refused at once).
                    refused += 1;
                    renewal = None;
                    continue;
                }
                Ok(Err(etcd_client::Error::LeaseKeepAliveError(_))) if lease_gone(client.as_mut(), lease).await => {
                    // etcd answers an opening keep-alive for a lease it ended with this error.
                    tracing::error!("etcd says the election lease has ended: stepping down (or campaigning anew).");
                    standing.send_replace(Standing::Lost);
                    return;
                }
                Ok(Ok(None) | Err(_)) => {
                    tracing::debug!(outcome = ?renewed, "The keep-alive stream broke.");
                    // The keep-alive stream broke (etcd restarted, the connection moved): open a new one.
                    renewal = None;
                }
            }
            let next = Instant::now() + renew_every(ttl);
            let next = if *standing.borrow() == Standing::Leading { next.min(*valid.borrow()) } else { next };
            tokio::time::sleep_until(next).await;
        }
    }
}

/// Whether etcd says `lease` no longer exists (it ended, or was revoked); `false` when it cannot
/// tell (no answer in a second).
async fn lease_gone(client: Option<&mut Client>, lease: i64) -> bool {
    let Some(client) = client else { return false };
    let asked = tokio::time::timeout(Duration::from_secs(1), client.lease_time_to_live(lease, None)).await;
    matches!(asked, Ok(Ok(answer)) if answer.ttl() <= 0)
}

/// Whether the election key is still held under `lease`.
async fn still_ours(client: &mut Client, lease: i64) -> Result<bool, StoreError> {
    let response = client.get(ELECTION_KEY, None).await.map_err(unavailable)?;
    Ok(response.kvs().first().is_some_and(|kv| kv.lease() == lease))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_leader_stops_a_third_of_a_lease_before_it_could_end() {
        let sent = Instant::now();
        let ttl = Duration::from_secs(3);
        assert_eq!(step_down_at(sent, ttl), sent + Duration::from_secs(2));
        assert!(renew_every(ttl) * 3 < ttl - ttl / 3, "at least three renewals before stepping down");
    }

    #[tokio::test]
    async fn the_file_store_leads_with_a_higher_term_at_every_start() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(crate::store::file::FileStore::open(dir.path().join("s.redb")).unwrap());
        let (role, _) = watch::channel(Role::Follower { leader: None });
        let election = Election::Sole(store.clone());
        let first = election.campaign("", &role).await.unwrap();
        let second = election.campaign("", &role).await.unwrap();
        assert_eq!((first.term, second.term), (1, 2));
        assert!(!first.is_lost() && !second.is_lost());
        let never = tokio::time::timeout(std::time::Duration::from_millis(100), first.lost()).await;
        assert!(never.is_err(), "the sole leader's leadership is never lost");
        store.commit(vec![Write::put(TERM_KEY, Expect::Any, b"x".to_vec())]).await.unwrap();
        let err = election.campaign("", &role).await.unwrap_err().to_string();
        assert!(err.contains(TERM_KEY), "{err}");
    }
}
