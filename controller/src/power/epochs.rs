//! Cap-order epochs: strictly increasing across controller restarts and whatever the wall clock
//! does. Agents ignore an order older than the newest they applied, so a controller that starts
//! must start above every epoch an earlier one may have sent — a clock stepped backwards must not
//! make every agent refuse its orders as stale.
//!
//! The store keeps a high-water mark under `meta/cap-epoch`: epochs are reserved in blocks, the
//! block's end written (compare-and-swap) before any epoch of it is handed out, and a controller
//! that starts resumes at the mark. A store without a mark (written before marks existed) starts
//! from the wall clock in microseconds, as controllers before it did, so their agents' epochs lie
//! behind.

use crate::store::{Expect, Store, StoreError, Version, Write};

pub const EPOCH_KEY: &str = "meta/cap-epoch";
/// Epochs reserved per store write: at 25,000 orders an event, one write every 40 events.
pub const BLOCK: u64 = 1_000_000;

/// A new mark, to be written before its epochs are handed out.
#[derive(Debug, Clone)]
pub struct Reservation {
    to: u64,
    pub write: Write,
}

#[derive(Debug)]
pub struct Epochs {
    next: u64,
    /// Epochs below this are reserved in the store.
    reserved_to: u64,
    version: Version,
}

impl Epochs {
    /// Resume from the store's mark, or from `legacy_floor` when there is none; reserve a block.
    pub async fn load(store: &dyn Store, legacy_floor: u64) -> Result<Self, StoreError> {
        let (next, version) = match store.get(EPOCH_KEY).await? {
            Some(e) => {
                let mark = std::str::from_utf8(&e.value).ok().and_then(|s| s.parse::<u64>().ok()).ok_or_else(|| {
                    StoreError::Corrupt(format!("{EPOCH_KEY}: {:?} is not an epoch", String::from_utf8_lossy(&e.value)))
                })?;
                (mark, e.version)
            }
            None => (legacy_floor, 0),
        };
        let mut epochs = Epochs { next, reserved_to: next, version };
        epochs.reserve(store, 1).await?;
        Ok(epochs)
    }

    /// Epochs that can be handed out without a store write.
    pub fn available(&self) -> u64 {
        self.reserved_to - self.next
    }

    /// Make at least `needed` epochs available, writing a new mark when fewer are.
    pub async fn reserve(&mut self, store: &dyn Store, needed: u64) -> Result<(), StoreError> {
        let Some(reservation) = self.reservation(needed) else { return Ok(()) };
        let version = store.commit(vec![reservation.write.clone()]).await?;
        self.reserved(&reservation, version);
        Ok(())
    }

    /// The mark to write for at least `needed` epochs to be available, when fewer are: written
    /// by whoever holds no lock the power path needs (see `crate::power_writer`), then
    /// [`Epochs::reserved`].
    pub fn reservation(&self, needed: u64) -> Option<Reservation> {
        if self.available() >= needed {
            return None;
        }
        let to = self.next + needed + BLOCK;
        let expect = if self.version == 0 { Expect::Absent } else { Expect::Version(self.version) };
        Some(Reservation { to, write: Write::put(EPOCH_KEY, expect, to.to_string().into_bytes()) })
    }

    /// `reservation`'s mark is stored, at `version`.
    pub fn reserved(&mut self, reservation: &Reservation, version: Version) {
        if reservation.to > self.reserved_to {
            self.reserved_to = reservation.to;
            self.version = version;
        }
    }

    /// The next epoch, if one is reserved.
    pub fn take(&mut self) -> Option<u64> {
        (self.next < self.reserved_to).then(|| {
            self.next += 1;
            self.next - 1
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::file::FileStore;

    #[tokio::test]
    async fn epochs_rise_across_restarts_whatever_the_clock_says() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::open(dir.path().join("s.redb")).unwrap();
        // A store from before marks: start from the wall-clock floor.
        let mut first = Epochs::load(&store, 5_000).await.unwrap();
        let used: Vec<u64> = (0..3).map(|_| first.take().unwrap()).collect();
        assert_eq!(used, vec![5_000, 5_001, 5_002]);
        // A restart with the clock stepped far back: the mark wins.
        let mut second = Epochs::load(&store, 1).await.unwrap();
        let next = second.take().unwrap();
        assert!(next > 5_002, "{next}");
        // A block runs out: a new mark is written before the next epoch is handed out.
        second.next = second.reserved_to;
        assert_eq!(second.take(), None);
        second.reserve(&store, 10).await.unwrap();
        let after = second.take().unwrap();
        let third = Epochs::load(&store, 0).await.unwrap();
        assert!(third.next > after, "{} vs {after}", third.next);
        // Two controllers cannot reserve the same block: the stale one's write is refused.
        let mut stale = second;
        stale.next = stale.reserved_to;
        assert!(matches!(stale.reserve(&store, 1).await, Err(StoreError::Conflict { .. })));
    }

    #[tokio::test]
    async fn a_corrupt_mark_is_an_error_naming_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::open(dir.path().join("s.redb")).unwrap();
        store.commit(vec![Write::put(EPOCH_KEY, Expect::Absent, b"soon".to_vec())]).await.unwrap();
        let err = Epochs::load(&store, 0).await.unwrap_err().to_string();
        assert!(err.contains(EPOCH_KEY) && err.contains("soon"), "{err}");
    }
}
