//! The behaviour every [`Store`] must have, as a suite both implementations run (the file store
//! in unit tests, etcd against a real etcd in `tests/store_etcd.rs`). Each check works under its
//! own key prefix, so the suite can share one etcd.

// A test suite: an unwrap that fails is a check that fails.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use futures::StreamExt;

use super::{Expect, Store, StoreError, WatchEvent, Write};

/// Run every check under `root` (e.g. `"conformance/<unique>/"`). Panics on the first failure.
pub async fn run_all(store: &dyn Store, root: &str) {
    get_put_and_versions(store, &format!("{root}basic/")).await;
    compare_and_swap(store, &format!("{root}cas/")).await;
    commits_are_all_or_nothing(store, &format!("{root}atomic/")).await;
    deletes(store, &format!("{root}delete/")).await;
    list_is_prefix_scoped_and_ordered(store, &format!("{root}list/")).await;
    watch_delivers_changes_in_order(store, &format!("{root}watch/")).await;
}

async fn get_put_and_versions(store: &dyn Store, p: &str) {
    let key = format!("{p}k");
    assert_eq!(store.get(&key).await.unwrap(), None);
    let v1 = store.commit(vec![Write::put(&key, Expect::Absent, b"one".to_vec())]).await.unwrap();
    assert!(v1 > 0);
    let got = store.get(&key).await.unwrap().unwrap();
    assert_eq!((got.value.as_slice(), got.version), (&b"one"[..], v1));
    let v2 = store.commit(vec![Write::put(&key, Expect::Any, b"two".to_vec())]).await.unwrap();
    assert!(v2 > v1, "versions grow: {v1} then {v2}");
    assert_eq!(store.get(&key).await.unwrap().unwrap().version, v2);
}

async fn compare_and_swap(store: &dyn Store, p: &str) {
    let key = format!("{p}job");
    let v1 = store.commit(vec![Write::put(&key, Expect::Absent, b"a".to_vec())]).await.unwrap();
    let again = store.commit(vec![Write::put(&key, Expect::Absent, b"b".to_vec())]).await;
    assert!(matches!(&again, Err(StoreError::Conflict { key: k }) if *k == key), "{again:?}");
    let v2 = store.commit(vec![Write::put(&key, Expect::Version(v1), b"c".to_vec())]).await.unwrap();
    let stale = store.commit(vec![Write::put(&key, Expect::Version(v1), b"d".to_vec())]).await;
    assert!(matches!(stale, Err(StoreError::Conflict { .. })), "a stale version must not win");
    let now = store.get(&key).await.unwrap().unwrap();
    assert_eq!((now.value.as_slice(), now.version), (&b"c"[..], v2), "failed writes changed nothing");
    let absent = format!("{p}never");
    let missing = store.commit(vec![Write::put(&absent, Expect::Version(v2), b"x".to_vec())]).await;
    assert!(matches!(missing, Err(StoreError::Conflict { .. })), "a version expectation fails on an absent key");
}

async fn commits_are_all_or_nothing(store: &dyn Store, p: &str) {
    let (a, b, c) = (format!("{p}a"), format!("{p}b"), format!("{p}c"));
    store.commit(vec![Write::put(&b, Expect::Absent, b"b0".to_vec())]).await.unwrap();
    let result = store
        .commit(vec![
            Write::put(&a, Expect::Absent, b"a1".to_vec()),
            Write::put(&b, Expect::Absent, b"b1".to_vec()), // fails: b exists
            Write::put(&c, Expect::Any, b"c1".to_vec()),
        ])
        .await;
    assert!(matches!(&result, Err(StoreError::Conflict { key }) if *key == b), "{result:?}");
    assert_eq!(store.get(&a).await.unwrap(), None, "no write of a failed commit lands");
    assert_eq!(store.get(&c).await.unwrap(), None);
    assert_eq!(store.get(&b).await.unwrap().unwrap().value, b"b0");
    let rev = store
        .commit(vec![Write::put(&a, Expect::Absent, b"a1".to_vec()), Write::put(&c, Expect::Absent, b"c1".to_vec())])
        .await
        .unwrap();
    assert_eq!(store.get(&a).await.unwrap().unwrap().version, rev, "one commit, one revision");
    assert_eq!(store.get(&c).await.unwrap().unwrap().version, rev);
}

async fn deletes(store: &dyn Store, p: &str) {
    let key = format!("{p}k");
    let v = store.commit(vec![Write::put(&key, Expect::Absent, b"x".to_vec())]).await.unwrap();
    let wrong = store.commit(vec![Write::delete(&key, Expect::Version(v + 1000))]).await;
    assert!(matches!(wrong, Err(StoreError::Conflict { .. })));
    assert!(store.get(&key).await.unwrap().is_some());
    store.commit(vec![Write::delete(&key, Expect::Version(v))]).await.unwrap();
    assert_eq!(store.get(&key).await.unwrap(), None);
    store.commit(vec![Write::delete(&key, Expect::Any)]).await.expect("deleting an absent key with Any is fine");
    store.commit(vec![Write::put(&key, Expect::Absent, b"again".to_vec())]).await.expect("absent after delete");
}

async fn list_is_prefix_scoped_and_ordered(store: &dyn Store, p: &str) {
    for k in ["jobs/c", "jobs/a", "jobs/b", "jobsx/z", "nodes/a"] {
        store.commit(vec![Write::put(format!("{p}{k}"), Expect::Absent, k.as_bytes().to_vec())]).await.unwrap();
    }
    let keys: Vec<String> = store.list(&format!("{p}jobs/")).await.unwrap().into_iter().map(|e| e.key).collect();
    assert_eq!(keys, vec![format!("{p}jobs/a"), format!("{p}jobs/b"), format!("{p}jobs/c")]);
    assert!(store.list(&format!("{p}none/")).await.unwrap().is_empty());
}

async fn watch_delivers_changes_in_order(store: &dyn Store, p: &str) {
    let mut watch = store.watch(&format!("{p}w/")).await.unwrap();
    let key = format!("{p}w/k");
    let v1 = store.commit(vec![Write::put(&key, Expect::Absent, b"1".to_vec())]).await.unwrap();
    store.commit(vec![Write::put(format!("{p}other"), Expect::Any, b"unrelated".to_vec())]).await.unwrap();
    let v2 = store.commit(vec![Write::put(&key, Expect::Version(v1), b"2".to_vec())]).await.unwrap();
    let v3 = store.commit(vec![Write::delete(&key, Expect::Version(v2))]).await.unwrap();
    let mut seen = Vec::new();
    while seen.len() < 3 {
        let event = tokio::time::timeout(Duration::from_secs(10), watch.next())
            .await
            .expect("watch event within 10 s")
            .expect("watch open")
            .expect("no watch error");
        seen.push(event);
    }
    match &seen[..] {
        [WatchEvent::Put(a), WatchEvent::Put(b), WatchEvent::Delete { key: k, version }] => {
            assert_eq!((a.key.as_str(), a.value.as_slice(), a.version), (key.as_str(), &b"1"[..], v1));
            assert_eq!((b.value.as_slice(), b.version), (&b"2"[..], v2));
            assert_eq!((k.as_str(), *version), (key.as_str(), v3));
        }
        other => panic!("unexpected watch events: {other:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::super::file::FileStore;
    use super::*;

    #[tokio::test]
    async fn the_file_store_conforms() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::open(dir.path().join("watt.redb")).unwrap();
        run_all(&store, "conformance/").await;
    }

    #[tokio::test]
    async fn the_file_store_keeps_everything_across_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state").join("watt.redb");
        let v = {
            let store = FileStore::open(&path).unwrap();
            store.commit(vec![Write::put("jobs/a", Expect::Absent, b"a".to_vec())]).await.unwrap()
        };
        let store = FileStore::open(&path).unwrap();
        let got = store.get("jobs/a").await.unwrap().unwrap();
        assert_eq!((got.value.as_slice(), got.version), (&b"a"[..], v));
        let next = store.commit(vec![Write::put("jobs/b", Expect::Absent, b"b".to_vec())]).await.unwrap();
        assert!(next > v, "revisions continue after a reopen");
    }
}
