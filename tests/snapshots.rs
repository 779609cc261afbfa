//! Snapshots and log compaction across a restart of the process. (A follower
//! that misses more than two thresholds of writes and catches up by snapshot
//! is tested on the in-process cluster, tests/in_process.rs.)

mod support;

use std::time::Duration;

use support::Cluster;

const T: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_node_recovers_from_its_snapshot_and_log() {
    let mut cluster = Cluster::start_static(1, &["--snapshot-threshold", "30"]);
    cluster.wait_for_leader(&[1], T).await;
    let client = cluster.client(&[1]);
    for i in 0..100 {
        support::put(&client, format!("k{i:03}"), format!("{i}")).await;
    }
    client.delete("k000").await.unwrap();
    // The store is made durable every 30 entries and every second.
    let before = cluster
        .wait_info(1, T, "the store durable past index 90", |i| i.snapshot_index >= 90)
        .await;
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

/// A follower killed (-9) while a snapshot streams to it never installs a
/// part: after the restart it gets the snapshot again, whole, and serves
/// every write acknowledged before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_killed_mid_stream_gets_the_whole_snapshot_again_and_loses_nothing() {
    let mut cluster = Cluster::start_static(3, &["--snapshot-threshold", "100"]);
    let leader = cluster.wait_for_leader(&[1, 2, 3], T).await;
    let follower = [1, 2, 3].into_iter().find(|id| *id != leader).unwrap();
    let others: Vec<u64> = [1, 2, 3].into_iter().filter(|id| *id != follower).collect();
    cluster.kill(follower);
    let client = cluster.client(&others);
    // Enough state that the stream takes a while (several chunks), written
    // past the catch-up tail so only a snapshot can bring the follower back.
    let value = "x".repeat(1000);
    let mut acked = Vec::new();
    for i in 0..4000 {
        support::put(&client, format!("k{i:05}"), &value).await;
        acked.push((format!("k{i:05}"), value.clone()));
    }
    let incoming = cluster.node(follower).data_dir.join("snapshot-incoming");
    cluster.start(follower);
    // Kill it as soon as a stream is being staged.
    let deadline = std::time::Instant::now() + T;
    loop {
        let staging = std::fs::read_dir(&incoming)
            .map(|d| {
                d.flatten()
                    .any(|e| e.path().extension().is_some_and(|x| x == "partial"))
            })
            .unwrap_or(false);
        if staging {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "no snapshot stream began");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    cluster.kill(follower);
    cluster.start(follower);
    let leader_info = cluster.info(leader).await.unwrap();
    let caught_up = cluster
        .wait_info(follower, T, "the follower caught up by a whole snapshot", |i| {
            i.applied_index >= leader_info.commit_index
        })
        .await;
    assert_eq!(caught_up.keys, 4000, "{caught_up:?}");
    let log = cluster.node_log(follower);
    assert!(log.contains("installed snapshot from the leader"), "{log}");
    // Read the follower's own copy: it holds every acknowledged write.
    let local = cluster.client_with(&[follower], T, true);
    support::assert_all_readable(&local, &acked).await;
}
