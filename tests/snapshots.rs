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
