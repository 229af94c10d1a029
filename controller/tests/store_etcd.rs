//! The etcd store against a real etcd (Debian's `etcd-server`): the same conformance suite as the
//! file store, keys under `/watt/v1/`, and a watch that carries on across an etcd restart.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use futures::StreamExt;
use watt_controller::store::etcd::{EtcdStore, KEY_PREFIX};
use watt_controller::store::{self, conformance, Expect, Store, WatchEvent, Write};
use watt_system_tests::Etcd;

async fn connect(etcd: &Etcd) -> EtcdStore {
    EtcdStore::connect(vec![format!("http://{}", etcd.endpoint())], KEY_PREFIX).await.unwrap()
}

#[tokio::test]
async fn the_etcd_store_conforms() {
    let etcd = Etcd::start();
    let store = connect(&etcd).await;
    conformance::run_all(&store, "conformance/").await;
    // Opened by address, as the controller does, it sees the same keys under /watt/v1/.
    let by_address = store::open(&format!("etcd://{}", etcd.endpoint())).await.unwrap();
    assert!(!by_address.list("conformance/").await.unwrap().is_empty());
    let raw = EtcdStore::connect(vec![format!("http://{}", etcd.endpoint())], "").await.unwrap();
    let keys: Vec<String> = raw.list("/watt/v1/conformance/basic/").await.unwrap().into_iter().map(|e| e.key).collect();
    assert_eq!(keys, vec!["/watt/v1/conformance/basic/k".to_string()]);
}

/// A cluster with one member down still takes every call: the client spreads calls over the
/// endpoints it was given, and one sent to the member that is down is sent again to another.
#[tokio::test]
async fn one_endpoint_down_fails_no_call() {
    let etcd = Etcd::start();
    let down = format!("http://127.0.0.1:{}", watt_system_tests::free_port());
    let endpoints = vec![down.clone(), format!("http://{}", etcd.endpoint()), down];
    let store = EtcdStore::connect(endpoints, KEY_PREFIX).await.expect("connecting failed with one endpoint down");
    for i in 0..40 {
        store.commit(vec![Write::put(format!("spread/{i}"), Expect::Absent, b"v".to_vec())]).await.unwrap();
        assert!(store.get(&format!("spread/{i}")).await.unwrap().is_some());
    }
    assert_eq!(store.list("spread/").await.unwrap().len(), 40);
}

/// A list larger than one gRPC answer may carry (4 MiB) comes back whole, in key order.
#[tokio::test]
async fn a_list_larger_than_one_answer_comes_back_whole() {
    let etcd = Etcd::start();
    let store = connect(&etcd).await;
    let value = vec![b'x'; 10_000];
    for chunk in (0..600).collect::<Vec<u32>>().chunks(100) {
        let writes = chunk.iter().map(|i| Write::put(format!("big/{i:04}"), Expect::Absent, value.clone())).collect();
        store.commit(writes).await.unwrap();
    }
    store.commit(vec![Write::put("big0", Expect::Absent, b"outside".to_vec())]).await.unwrap();
    let listed = store.list("big/").await.unwrap();
    assert_eq!(listed.len(), 600, "6 MB under one prefix");
    assert!(listed.windows(2).all(|w| w[0].key < w[1].key));
    assert_eq!(listed[599].key, "big/0599");
}

#[tokio::test]
async fn a_watch_resumes_after_etcd_restarts() {
    let mut etcd = Etcd::start();
    let store = connect(&etcd).await;
    let mut watch = store.watch("jobs/").await.unwrap();
    let v1 = store.commit(vec![Write::put("jobs/a", Expect::Absent, b"1".to_vec())]).await.unwrap();
    let first = tokio::time::timeout(Duration::from_secs(10), watch.next()).await.unwrap().unwrap().unwrap();
    assert!(matches!(&first, WatchEvent::Put(e) if e.version == v1), "{first:?}");

    etcd.restart();
    // The client reconnects on its own; retry until etcd takes writes again.
    let mut v2 = None;
    for _ in 0..100 {
        match store.commit(vec![Write::put("jobs/a", Expect::Version(v1), b"2".to_vec())]).await {
            Ok(v) => {
                v2 = Some(v);
                break;
            }
            Err(e) => {
                assert!(e.is_retryable(), "{e}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
    let v2 = v2.expect("etcd took a write within 20 s of its restart");
    let next = tokio::time::timeout(Duration::from_secs(20), watch.next())
        .await
        .expect("the watch delivered the write made after the restart")
        .unwrap()
        .unwrap();
    assert!(matches!(&next, WatchEvent::Put(e) if e.version == v2 && e.value == b"2"), "{next:?}");
}

#[tokio::test]
async fn a_bad_store_address_is_refused() {
    for address in ["etcd://", "redis://x", "file:", "etcd://host:1/path"] {
        let e = store::open(address).await.unwrap_err();
        assert!(e.to_string().contains("file:PATH or etcd://"), "{address}: {e}");
    }
}

/// A follower's warm copy: it holds what was there before it started and every write since,
/// deletes included; a snapshot through a revision has every write up to it; after etcd
/// compacts past the copy's watch it lists again and is whole.
#[tokio::test]
async fn a_warm_copy_follows_every_write() {
    use watt_controller::store::replica::Replica;
    let mut etcd = Etcd::start();
    let store = connect(&etcd).await;
    store.commit(vec![Write::put("jobs/before", Expect::Absent, b"0".to_vec())]).await.unwrap();
    let replica = Replica::new();
    let (stop_tx, stop) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(replica.clone().follow(store.clone(), async move {
        let _ = stop.await;
    }));
    let mut last = 0;
    for i in 0..50 {
        last = store.commit(vec![Write::put(format!("jobs/j{i:02}"), Expect::Absent, vec![b'x'; 100])]).await.unwrap();
    }
    let gone = store.get("jobs/j07").await.unwrap().unwrap();
    last = last.max(store.commit(vec![Write::delete("jobs/j07", Expect::Version(gone.version))]).await.unwrap());
    let copy = replica.snapshot_through(last as i64, Duration::from_secs(5)).await.expect("the copy caught up");
    let keys: Vec<String> = copy.list("jobs/").await.unwrap().into_iter().map(|e| e.key).collect();
    assert_eq!(keys.len(), 50, "{keys:?}");
    assert!(keys.contains(&"jobs/before".to_string()) && !keys.contains(&"jobs/j07".to_string()));
    assert_eq!(copy.get("jobs/j08").await.unwrap(), store.get("jobs/j08").await.unwrap(), "same value, same version");
    assert!(replica.in_sync(tokio::time::Instant::now()));

    // etcd restarts and compacts past the copy while it is away: it lists again.
    etcd.restart();
    let mut client = etcd_client::Client::connect([format!("http://{}", etcd.endpoint())], None).await.unwrap();
    let mut after = 0;
    for i in 0..5 {
        // The first calls after the restart may meet the old connection, broken.
        for attempt in 1.. {
            match store.commit(vec![Write::put(format!("jobs/k{i}"), Expect::Absent, b"y".to_vec())]).await {
                Ok(revision) => {
                    after = revision;
                    break;
                }
                Err(e) if attempt < 20 => {
                    eprintln!("after the restart: {e}");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(e) => panic!("{e}"),
            }
        }
    }
    client.compact(after as i64, None).await.unwrap();
    let copy = replica.snapshot_through(after as i64, Duration::from_secs(15)).await.expect("the copy caught up again");
    assert_eq!(copy.list("jobs/").await.unwrap().len(), 55);
    let _ = stop_tx.send(());
}
