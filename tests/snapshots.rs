//! Snapshots and log compaction: a follower that misses more than two
//! snapshot thresholds of writes is caught up with a snapshot.

mod support;

use std::time::Duration;

use support::Cluster;

const T: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_that_missed_two_thresholds_catches_up_by_snapshot() {
    let threshold = 100u64;
    let mut cluster = Cluster::start_static(3, &["--snapshot-threshold", "100"]);
    let leader = cluster.wait_for_leader(&[1, 2, 3], T).await;
    let lagging = [1, 2, 3].into_iter().find(|id| *id != leader).unwrap();
    let others: Vec<u64> = [1, 2, 3].into_iter().filter(|id| *id != lagging).collect();
    let client = cluster.client(&others);
    for i in 0..20 {
        support::put(&client, format!("early/{i}"), "x").await;
    }
    cluster
        .wait_info(lagging, T, "applied the early writes", |i| i.keys >= 20)
        .await;
    let stopped_at = cluster.info(lagging).await.unwrap().last_index;
    cluster.kill(lagging);

    for i in 0..(threshold * 3 + 50) {
        support::put(&client, format!("late/{i:04}"), format!("v{i}")).await;
    }
    let leader_info = cluster.info(leader).await.unwrap();
    assert!(
        leader_info.snapshot_index >= stopped_at + 2 * threshold,
        "the leader snapshotted past the lagging node: {leader_info:?}"
    );
    assert!(
        leader_info.first_index > stopped_at + 1,
        "the leader compacted the entries the lagging node needs: {leader_info:?}"
    );

    cluster.start(lagging);
    let commit = leader_info.commit_index;
    let caught_up = cluster
        .wait_info(lagging, T, "caught up", |i| i.applied_index >= commit)
        .await;
    assert!(caught_up.snapshot_index > stopped_at, "{caught_up:?}");
    assert!(
        cluster
            .node(lagging)
            .log()
            .contains("installed snapshot from the leader"),
        "node {lagging} caught up without a snapshot"
    );
    let local = cluster.client_with(&[lagging], Duration::from_secs(5), true);
    assert_eq!(local.get("late/0000").await.unwrap().as_deref(), Some(&b"v0"[..]));
    assert_eq!(local.get("early/0").await.unwrap().as_deref(), Some(&b"x"[..]));
    assert_eq!(
        cluster.info(lagging).await.unwrap().keys,
        cluster.info(leader).await.unwrap().keys
    );

    // And it keeps up with new writes through the log.
    support::put(&cluster.client(&[lagging]), "after-catch-up", "yes").await;
    assert_eq!(local.get("after-catch-up").await.unwrap().as_deref(), Some(&b"yes"[..]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_node_recovers_from_its_snapshot_and_log() {
    let mut cluster = Cluster::start_static(1, &["--snapshot-threshold", "30"]);
    cluster.wait_for_leader(&[1], T).await;
    let client = cluster.client(&[1]);
    for i in 0..100 {
        support::put(&client, format!("k{i:03}"), format!("{i}")).await;
    }
    client.delete("k000").await.unwrap();
    let before = cluster.info(1).await.unwrap();
    assert!(before.snapshot_index >= 90, "{before:?}");
    assert!(before.first_index > 1, "log compacted: {before:?}");

    cluster.kill(1);
    cluster.start(1);
    cluster.wait_for_leader(&[1], T).await;
    let after = cluster.info(1).await.unwrap();
    assert_eq!(after.keys, 99);
    assert!(after.applied_index >= before.applied_index);
    let client = cluster.client(&[1]);
    assert_eq!(client.get("k000").await.unwrap(), None);
    assert_eq!(client.get("k099").await.unwrap().as_deref(), Some(&b"99"[..]));
}
