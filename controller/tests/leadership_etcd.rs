//! Leader election on a real etcd (Debian's `etcd-server`): one leader at a time, terms that
//! grow, a deposed leader's writes refused in the same transaction, and a leader cut off from
//! etcd stepping down before its lease can end (ARCHITECTURE.md, invariant 9).
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;
use watt_controller::leadership::{Election, Role, Standing, ELECTION_KEY};
use watt_controller::store::etcd::{EtcdStore, KEY_PREFIX};
use watt_controller::store::{Expect, StoreError, Write};
use watt_system_tests::Etcd;

const LEASE: Duration = Duration::from_secs(2);

async fn election(etcd: &Etcd) -> Election {
    let store = EtcdStore::connect(vec![format!("http://{}", etcd.endpoint())], KEY_PREFIX).await.unwrap();
    Election::Etcd { store: Box::new(store), lease: LEASE }
}

fn follower() -> watch::Sender<Role> {
    watch::channel(Role::Follower { leader: None }).0
}

#[tokio::test]
async fn one_leads_a_deposed_leader_cannot_write_and_the_next_term_is_higher() {
    let etcd = Etcd::start();
    let (a, b) = (election(&etcd).await, election(&etcd).await);
    let (role_a, role_b) = (follower(), follower());
    let first = a.campaign("https://a:7070", &role_a).await.unwrap();
    first.store.commit(vec![Write::put("jobs/x", Expect::Absent, b"1".to_vec())]).await.unwrap();

    // The second campaigns while the first leads: it waits, knowing whom to send clients to.
    let mut watch_b = role_b.subscribe();
    let second = tokio::spawn(async move { b.campaign("https://b:7070", &role_b).await });
    tokio::time::timeout(Duration::from_secs(5), watch_b.wait_for(|r| *r != Role::Follower { leader: None }))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(*watch_b.borrow(), Role::Follower { leader: Some("https://a:7070".into()) });
    tokio::time::sleep(LEASE * 2).await;
    assert!(!second.is_finished(), "a second controller led while the first kept its lease");
    assert!(!first.is_lost());

    // Someone deletes the election key (an operator, or etcd ending the lease): the first
    // notices, and its writes are refused even before it does.
    let raw = EtcdStore::connect(vec![format!("http://{}", etcd.endpoint())], "").await.unwrap();
    raw.client().delete(ELECTION_KEY, None).await.unwrap();
    let second = tokio::time::timeout(Duration::from_secs(5), second).await.unwrap().unwrap().unwrap();
    let refused = first.store.commit(vec![Write::put("jobs/x", Expect::Any, b"2".to_vec())]).await.unwrap_err();
    assert!(matches!(refused, StoreError::Deposed { .. }), "{refused}");
    tokio::time::timeout(Duration::from_secs(2), first.lost()).await.expect("the first saw it was deposed");
    assert!(second.term > first.term, "terms grow: {} then {}", first.term, second.term);
    second.store.commit(vec![Write::put("jobs/x", Expect::Any, b"3".to_vec())]).await.unwrap();
    assert_eq!(second.store.get("jobs/x").await.unwrap().unwrap().value, b"3");
}

#[tokio::test]
async fn a_leader_that_resigns_is_followed_at_once() {
    let etcd = Etcd::start();
    let (a, b) = (election(&etcd).await, election(&etcd).await);
    let first = a.campaign("https://a:7070", &follower()).await.unwrap();
    let second = tokio::spawn(async move { b.campaign("https://b:7070", &follower()).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let resigned = Instant::now();
    first.resign().await;
    let second = tokio::time::timeout(Duration::from_secs(5), second).await.unwrap().unwrap().unwrap();
    assert!(resigned.elapsed() < LEASE, "took {:?}: the follower waited out the lease", resigned.elapsed());
    assert!(!second.is_lost());
}

#[tokio::test]
async fn a_leader_cut_off_from_etcd_steps_down_before_its_lease_can_end() {
    let etcd = Etcd::start();
    let a = election(&etcd).await;
    let lead = a.campaign("https://a:7070", &follower()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!lead.is_lost());
    // etcd hangs. The last keep-alive etcd answered was sent before this moment, and etcd counts
    // the lease from when it received it, so the lease ends no earlier than LEASE from a moment
    // before `cut`: the leader must have stopped by `cut + LEASE`.
    let cut = Instant::now();
    etcd.pause();
    let stepped_down = tokio::time::timeout(LEASE * 3, lead.stepped_down()).await;
    let took = cut.elapsed();
    etcd.resume();
    stepped_down.expect("the leader never stepped down");
    assert!(took < LEASE, "stepped down {took:?} after etcd hung; the lease may have ended at {LEASE:?}");
    // Unreachable, not deposed: it caretakes (invariant 11), and etcd answering before the
    // lease ended, it leads again in the same term.
    assert_eq!(lead.standing(), Standing::Caretaking);
    let again = tokio::time::timeout(LEASE * 2, lead.changed(Standing::Caretaking)).await;
    assert_eq!(again.expect("still caretaking with etcd back"), Standing::Leading);
}
