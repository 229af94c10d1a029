//! Power state goes to the store without the power path waiting on it (ARCHITECTURE.md,
//! invariant 10). A change to the power table that can only lower the budget — a source cut, a
//! reserve raised — is applied from memory at once and stored after, retried until the store
//! takes it; one that may raise the budget is stored first and applied once stored. New blocks
//! of cap-order epochs are reserved here too, ahead of need, so a pass never waits for one. No
//! lock the power path takes (the power state, the jobs) is held across a store write: each
//! write takes a snapshot under the lock, lets go, and writes. Cap ceilings go through here too
//! (invariant 9): an increase above what the store records for its node waits for the record.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{watch, Mutex, Notify};

use crate::power::ceilings::ceiling_key;
use crate::power::table::{Applied, Direction, PowerChange, PowerError};
use crate::reconcile::{unix_ms, Controller};
use crate::store::{Expect, StoreError, Write};

/// etcd refuses transactions of more than 128 operations by default.
const CEILINGS_PER_COMMIT: usize = 100;

/// Between tries while the store refuses power state.
const RETRY_START: Duration = Duration::from_millis(200);
const RETRY_MAX: Duration = Duration::from_secs(5);

#[derive(Debug)]
pub struct PowerWriter {
    /// Held across every write of power state, so writes reach the store in the order taken.
    writing: Mutex<()>,
    wake: Notify,
    /// The power table's generation the store holds.
    stored: watch::Sender<u64>,
    /// Whether a change in force is not stored yet.
    behind: AtomicBool,
    /// Some node may want a cap ceiling recorded (it registered, or an increase waits for one):
    /// the registry is walked for them only then, not every round.
    ceilings_due: AtomicBool,
}

impl Default for PowerWriter {
    fn default() -> Self {
        PowerWriter {
            writing: Mutex::new(()),
            wake: Notify::new(),
            stored: watch::channel(0).0,
            behind: false.into(),
            ceilings_due: false.into(),
        }
    }
}

impl PowerWriter {
    /// Whether a power change in force is not in the store yet.
    pub fn behind(&self) -> bool {
        self.behind.load(Ordering::Relaxed)
    }

    /// Ask for a write of what is not stored (epochs running low included).
    pub fn nudge(&self) {
        self.wake.notify_one();
    }

    /// A node registered: its caps in force may need recording, on the next round (a
    /// registration storm does not run a round per registration).
    pub fn node_registered(&self) {
        self.ceilings_due.store(true, Ordering::Relaxed);
    }

    /// Increases wait for their ceilings: record them now.
    pub fn ceilings_wanted(&self) {
        self.ceilings_due.store(true, Ordering::Relaxed);
        self.wake.notify_one();
    }

    /// Whether the store holds the power table as of `generation`, waiting at most `within`.
    pub async fn stored_by(&self, generation: u64, within: Duration) -> bool {
        let mut stored = self.stored.subscribe();
        tokio::time::timeout(within, stored.wait_for(|&g| g >= generation)).await.is_ok_and(|r| r.is_ok())
    }
}

impl Controller {
    /// Change the power table: a tightening in memory at once (stored after), a loosening stored
    /// first. Returns what changed and the table's generation that includes it.
    pub async fn change_power(&self, change: &PowerChange) -> Result<(Applied, u64), PowerError> {
        let writer = &self.power_writer;
        let now = unix_ms();
        // A loosening: the table as it will be, stored before it is in force.
        let ahead = {
            let power = self.power.lock().await;
            match power.table.check(change, now)? {
                Direction::Tightens => None,
                Direction::Loosens if self.caretaking() => return Err(PowerError::Caretaking { term: self.term }),
                Direction::Loosens => {
                    let mut next = power.table.clone();
                    next.apply(change, now)?;
                    Some((power.table.generation(), next.snapshot()?))
                }
            }
        };
        if let Some((_, snapshot)) = &ahead {
            let _writing = writer.writing.lock().await;
            self.store.commit(snapshot.writes.clone()).await?;
        }
        let mut power = self.power.lock().await;
        let applied = match power.table.apply(change, now) {
            Ok(applied) => applied,
            Err(e) => {
                // Another change came first and this one no longer applies; the store took it
                // already: write the table as it is over it.
                if ahead.is_some() {
                    power.table.store_diverged();
                    writer.behind.store(true, Ordering::Relaxed);
                    writer.nudge();
                }
                return Err(e);
            }
        };
        let generation = power.table.generation();
        match ahead {
            // Stored as it now stands only if nothing changed between the snapshot and now.
            Some((base, snapshot)) if base + 1 == generation => {
                power.table.stored_as(&snapshot);
                writer.stored.send_replace(generation);
            }
            _ => {
                writer.behind.store(true, Ordering::Relaxed);
                writer.nudge();
            }
        }
        Ok((applied, generation))
    }

    /// Apply every cut a caretaker handed over (see [`crate::power::carried`]) where it still
    /// lowers the budget; the records' keys, to delete once the table is stored.
    async fn take_carried_cuts(&self) -> Result<Vec<String>, StoreError> {
        use crate::power::carried::{CarriedCut, CARRIED_PREFIX};
        let records = self.store.list(CARRIED_PREFIX).await?;
        let mut keys = Vec::with_capacity(records.len());
        for record in records {
            let cut = CarriedCut::decode(&record.key, &record.value)?;
            let changes = cut.changes_to(&self.power.lock().await.table, unix_ms());
            for change in &changes {
                match self.change_power(change).await {
                    Ok((applied, _)) => {
                        let (subject, now) = match applied {
                            Applied::Source(s) => (s.name.clone(), format!("{:.0} W available", s.available_watts)),
                            Applied::Site(_) => ("site".to_string(), "site settings raised".to_string()),
                            Applied::Removed(name) => (name, "removed".to_string()),
                            Applied::Domain(d) => (d.name.clone(), format!("domain limit {:.0} W", d.limit_watts)),
                            Applied::DomainRemoved(name) => (name, "domain removed".to_string()),
                            Applied::GridSchedule { windows } => {
                                ("grid".to_string(), format!("{windows} grid windows"))
                            }
                        };
                        let text = format!("{now}: a cut made by the caretaker of term {}, not stored then", cut.term);
                        self.emit("power", &subject, "carried-cut-applied", text);
                    }
                    Err(e) => tracing::warn!(error = %e, term = cut.term, "A carried cut does not apply; dropped."),
                }
            }
            if !changes.is_empty() {
                self.power_writer.behind.store(true, Ordering::Relaxed);
                self.wake();
            }
            keys.push(record.key);
        }
        Ok(keys)
    }

    /// Write what is not stored — the power table, epochs below half a block — until `stop`.
    pub async fn run_power_writer(self: Arc<Self>, stop: impl std::future::Future<Output = ()>) {
        tokio::pin!(stop);
        let mut retry = RETRY_START;
        let mut failing = false;
        loop {
            let pause = if failing { retry } else { Duration::from_secs(1) };
            tokio::select! {
                () = self.power_writer.wake.notified() => {}
                () = tokio::time::sleep(pause) => {}
                () = &mut stop => return,
            }
            match self.write_power_state().await {
                Ok(()) => {
                    if failing {
                        tracing::info!("Power state stored again.");
                    }
                    failing = false;
                    retry = RETRY_START;
                }
                Err(e) => {
                    if !failing {
                        tracing::warn!(error = %e, "Cannot store power state; it is in force, and stored as soon as the store takes it.");
                    }
                    failing = true;
                    retry = (retry * 2).min(RETRY_MAX);
                }
            }
        }
    }

    /// One round: cuts a caretaker handed over (applied, then their records deleted once the
    /// table holding them is stored), the power table if it is ahead of the store, a new block
    /// of epochs if fewer than half a block remain.
    async fn write_power_state(&self) -> Result<(), StoreError> {
        let writer = &self.power_writer;
        let _writing = writer.writing.lock().await;
        let carried = self.take_carried_cuts().await?;
        let snapshot = {
            let power = self.power.lock().await;
            if power.table.unstored() {
                Some(power.table.snapshot()?)
            } else {
                None
            }
        };
        if let Some(snapshot) = snapshot {
            self.store.commit(snapshot.writes.clone()).await?;
            let mut power = self.power.lock().await;
            power.table.stored_as(&snapshot);
            writer.behind.store(power.table.unstored(), Ordering::Relaxed);
            writer.stored.send_replace(power.table.stored_generation());
        }
        if !carried.is_empty() {
            let writes = carried.into_iter().map(|key| Write::delete(key, Expect::Any)).collect();
            self.store.commit(writes).await?;
        }
        // Cap ceilings before the increases that wait for them (invariant 9); a pass then sends them.
        if writer.ceilings_due.swap(false, Ordering::Relaxed) {
            let ceilings = self.registry.lock().ceilings_to_record();
            for chunk in ceilings.chunks(CEILINGS_PER_COMMIT) {
                let writes: Result<Vec<Write>, StoreError> =
                    chunk.iter().map(|r| Ok(Write::put(ceiling_key(&r.node), Expect::Any, r.encode()?))).collect();
                if let Err(e) = async { self.store.commit(writes?).await }.await {
                    writer.ceilings_due.store(true, Ordering::Relaxed);
                    return Err(e);
                }
                self.registry.lock().ceilings_recorded(chunk);
            }
            if !ceilings.is_empty() {
                self.wake();
            }
        }
        let wanted = self.registry.lock().len() as u64 + crate::power::epochs::BLOCK / 2;
        let reservation = self.power.lock().await.epochs.reservation(wanted);
        if let Some(reservation) = reservation {
            let version = self.store.commit(vec![reservation.write.clone()]).await?;
            self.power.lock().await.epochs.reserved(&reservation, version);
        }
        Ok(())
    }
}
