//! Each job epoch's rendezvous secret (`WATT_RUN_TOKEN` in its shards' environment): the ranks of
//! one run prove it to each other when they meet, so no stranger can join a training job's ring
//! (see `watt-worker`'s `rendezvous`). A secret is the HMAC-SHA256 of `<job>/<epoch>` under a key
//! the store keeps (`meta/run-token-key`, made once by whichever controller starts first): it is
//! the same after a controller restart — orders resent to running shards carry the one they were
//! started with — and no one who has seen one run's secret can work out another's.

use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::store::{Store, StoreError};

const KEY: &str = "meta/run-token-key";

pub struct RunTokens {
    key: Vec<u8>,
}

impl std::fmt::Debug for RunTokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RunTokens(..)")
    }
}

impl RunTokens {
    /// The store's key, made now if no controller has made it yet.
    pub async fn load(store: &dyn Store) -> Result<RunTokens, StoreError> {
        Ok(RunTokens { key: crate::secrets::load_or_make(store, KEY).await? })
    }

    /// The secret of `job`'s run at `epoch`, hex.
    pub fn token(&self, job: &str, epoch: u64) -> String {
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&self.key).expect("HMAC takes keys of any length");
        mac.update(format!("{job}/{epoch}").as_bytes());
        watt_common::hex::encode(&mac.finalize().into_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn secrets_differ_by_run_and_survive_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::store::open(&format!("file:{}", dir.path().join("s.redb").display())).await.unwrap();
        let first = RunTokens::load(store.as_ref()).await.unwrap();
        let again = RunTokens::load(store.as_ref()).await.unwrap();
        assert_eq!(first.token("llama", 3), again.token("llama", 3), "a restart keeps each run's secret");
        assert_ne!(first.token("llama", 3), first.token("llama", 4));
        assert_ne!(first.token("llama", 3), first.token("llama-", 3));
        assert_eq!(first.token("llama", 3).len(), 64);
        let other = tempfile::tempdir().unwrap();
        let elsewhere = crate::store::open(&format!("file:{}", other.path().join("s.redb").display())).await.unwrap();
        assert_ne!(RunTokens::load(elsewhere.as_ref()).await.unwrap().token("llama", 3), first.token("llama", 3));
    }
}
