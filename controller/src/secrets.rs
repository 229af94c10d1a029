//! Keys every controller of a cluster shares, kept in the store: made once, by whichever
//! controller starts first, and read by every later one, so what they sign or derive survives a
//! restart and is the same on a standby. Each is 32 random bytes under `meta/`.

use rand::RngCore;

use crate::store::{Expect, Store, StoreError, Write};

const KEY_BYTES: usize = 32;

/// The key stored at `name`, made now if no controller has made it yet.
pub async fn load_or_make(store: &dyn Store, name: &str) -> Result<Vec<u8>, StoreError> {
    loop {
        if let Some(entry) = store.get(name).await? {
            if entry.value.len() < KEY_BYTES {
                return Err(StoreError::Corrupt(format!("{name}: {} bytes, expected {KEY_BYTES}", entry.value.len())));
            }
            return Ok(entry.value);
        }
        let mut key = vec![0u8; KEY_BYTES];
        rand::rng().fill_bytes(&mut key);
        match store.commit(vec![Write::put(name, Expect::Absent, key.clone())]).await {
            Ok(_) => return Ok(key),
            // Another controller made it first: use theirs.
            Err(StoreError::Conflict { .. }) => continue,
            Err(e) => return Err(e),
        }
    }
}
