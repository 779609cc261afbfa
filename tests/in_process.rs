//! Cluster behaviour under network faults, on the in-process cluster
//! (tests/support/memnet.rs): three nodes in this process with real storage,
//! joined by an in-memory network that the tests partition, cut one way and
//! delay.

#[path = "support/memnet.rs"]
mod memnet;

use std::time::Duration;

use kvraft::node::Error;
use memnet::MemCluster;

const T: Duration = Duration::from_secs(20);

fn others(all: &[u64], but: u64) -> Vec<u64> {
    all.iter().copied().filter(|id| *id != but).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partitioned_leader_acknowledges_nothing_the_majority_serves_and_healing_converges() {
    let cluster = MemCluster::start(3);
    let all = [1, 2, 3];
    let old = cluster.wait_for_leader(&all, T).await;
    cluster.put(old, "before", "1").await.unwrap();
    let majority = others(&all, old);
    cluster.net.partition(&[old], &majority);

    // The minority side: its write is never acknowledged and its
    // linearizable read fails, whether it still thinks it leads or has
    // stepped down (check_quorum).
    let started = std::time::Instant::now();
    let write = cluster.put(old, "minority", "x").await;
    // Appended but never committed: after request_timeout_ms (2 s here) its
    // outcome is unknown to the caller.
    assert!(
        matches!(write, Err(Error::OutcomeUnknown(_))),
        "the cut-off leader's write: {write:?}"
    );
    assert!(
        started.elapsed() >= Duration::from_millis(1900),
        "{:?}",
        started.elapsed()
    );
    let read = cluster.get(old, "before").await;
    assert!(read.is_err(), "the cut-off leader served a linearizable read: {read:?}");

    // The majority elects a leader of its own and serves reads and writes.
    let new = cluster.wait_for_leader(&majority, T).await;
    assert_ne!(new, old);
    cluster.put(new, "majority", "y").await.unwrap();
    let follower = others(&majority, new)[0];
    assert_eq!(cluster.get(follower, "majority").await.unwrap().as_deref(), Some("y"));
    assert_eq!(cluster.get(follower, "before").await.unwrap().as_deref(), Some("1"));

    // Healed: the old leader follows the new one and holds the majority's
    // write; the minority's write is applied nowhere.
    cluster.net.heal();
    let leader = cluster.wait_for_leader(&all, T).await;
    assert!(
        majority.contains(&leader),
        "a node that missed writes won leadership: {leader}"
    );
    cluster
        .wait_until(T, "the old leader applied the majority's write", |c| {
            c.local_get(old, "majority").as_deref() == Some("y")
        })
        .await;
    for id in all {
        assert_eq!(
            cluster.local_get(id, "minority"),
            None,
            "node {id} applied the minority's write"
        );
        assert_eq!(cluster.local_get(id, "before").as_deref(), Some("1"), "node {id}");
    }
    assert_eq!(cluster.get(old, "majority").await.unwrap().as_deref(), Some("y"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_way_link_loss_to_a_follower_keeps_the_cluster_serving_and_it_catches_up() {
    let cluster = MemCluster::start(3);
    let all = [1, 2, 3];
    let leader = cluster.wait_for_leader(&all, T).await;
    let deaf = others(&all, leader)[0];
    // The leader's messages to `deaf` are lost; `deaf` still reaches everyone.
    cluster.net.cut(leader, deaf);
    let sent_before = cluster.net.delivered(deaf, leader);

    for i in 0..20 {
        cluster.put(leader, "k", &i.to_string()).await.unwrap();
    }
    assert_eq!(cluster.get(leader, "k").await.unwrap().as_deref(), Some("19"));
    // The deaf follower can't finish a read-index round: the answer is lost.
    let read = cluster.get(deaf, "k").await;
    assert!(
        read.is_err(),
        "a follower that hears nothing served a linearizable read: {read:?}"
    );
    assert!(
        cluster.net.delivered(deaf, leader) > sent_before,
        "the follower's own messages should still get through"
    );
    // Its pre-votes can't unseat a leader the others still hear from.
    assert_eq!(cluster.wait_for_leader(&others(&all, deaf), T).await, leader);

    cluster.net.heal();
    cluster
        .wait_until(T, "the deaf follower caught up", |c| {
            c.local_get(deaf, "k").as_deref() == Some("19")
        })
        .await;
    assert_eq!(cluster.get(deaf, "k").await.unwrap().as_deref(), Some("19"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delayed_messages_slow_the_cluster_but_every_answer_is_right() {
    let cluster = MemCluster::start(3);
    let all = [1, 2, 3];
    cluster.wait_for_leader(&all, T).await;
    // 40 ms each way on every link: below the 500 ms election timeout, close
    // to the 50 ms heartbeat.
    for from in all {
        for to in others(&all, from) {
            cluster.net.delay(from, to, Duration::from_millis(40));
        }
    }
    // The delay is real: a follower's read-index round crosses two delayed
    // links (to the leader and back), so it can't take less than 80 ms.
    let leader = cluster.handle(1).status().leader_id;
    let follower = others(&all, leader)[0];
    let started = std::time::Instant::now();
    cluster.get(follower, "nothing").await.unwrap();
    assert!(
        started.elapsed() >= Duration::from_millis(80),
        "{:?}",
        started.elapsed()
    );
    for i in 0..10 {
        let through = all[i % 3];
        let key = format!("key{i}");
        // A follower forwards to the leader through the delayed links.
        retry_unknown(|| cluster.put(through, &key, "v")).await;
        let reader = all[(i + 1) % 3];
        assert_eq!(
            cluster.get(reader, &key).await.unwrap().as_deref(),
            Some("v"),
            "{key} via {reader}"
        );
    }
    cluster.delete(all[0], "key0").await.unwrap();
    for id in all {
        assert_eq!(
            cluster.get(id, "key0").await.unwrap(),
            None,
            "node {id} still sees key0"
        );
    }
}

/// Retries a write that was dropped before it was appended (never applied);
/// any other error fails the test.
async fn retry_unknown<F, Fut>(mut write: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<(), Error>>,
{
    for _ in 0..10 {
        match write().await {
            Ok(()) => return,
            Err(Error::Dropped { .. } | Error::NoLeader(_)) => tokio::time::sleep(Duration::from_millis(100)).await,
            Err(e) => panic!("write failed: {e:?}"),
        }
    }
    panic!("write dropped ten times");
}

/// `server::run` is the whole server in a task: listeners bound by the
/// caller (here on port 0), any future as the shutdown signal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_runs_in_process_on_listeners_it_is_given_until_its_shutdown_future() {
    use kvraft::client::{Client, ClientOptions};
    use kvraft::config::NodeConfig;
    use kvraft::server::{run, Listeners};
    use tokio::net::TcpListener;

    let dir = tempfile::tempdir().unwrap();
    let listeners = Listeners {
        client: TcpListener::bind("127.0.0.1:0").await.unwrap(),
        peer: TcpListener::bind("127.0.0.1:0").await.unwrap(),
        metrics: None,
    };
    let client_addr = listeners.client.local_addr().unwrap().to_string();
    let config = NodeConfig {
        data_dir: dir.path().join("data"),
        tick_ms: 25,
        election_ticks: 20,
        heartbeat_ticks: 2,
        ..NodeConfig::default()
    };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(run(config.clone(), listeners, async {
        let _ = stopped.await;
    }));

    let client = Client::new(ClientOptions {
        endpoints: vec![client_addr],
        timeout: T,
        serializable: false,
        tls: Default::default(),
    })
    .unwrap();
    client.set("greeting", "hello").await.unwrap();
    assert_eq!(client.get("greeting").await.unwrap().as_deref(), Some(&b"hello"[..]));
    assert!(
        !server.is_finished(),
        "run returned before its shutdown future resolved"
    );

    stop.send(()).unwrap();
    tokio::time::timeout(T, server)
        .await
        .expect("run did not return after the shutdown future resolved")
        .unwrap()
        .unwrap();
    // Stopped cleanly: the data dir is free again and holds the write.
    let listeners = Listeners {
        client: TcpListener::bind("127.0.0.1:0").await.unwrap(),
        peer: TcpListener::bind("127.0.0.1:0").await.unwrap(),
        metrics: None,
    };
    let node = kvraft::server::start(config, listeners).await.unwrap();
    let handle = node.handle.clone();
    let deadline = std::time::Instant::now() + T;
    while handle.read(|sm| sm.get(b"greeting").unwrap()).is_none() {
        assert!(
            std::time::Instant::now() < deadline,
            "the write is gone after a restart"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    node.shutdown(T).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopping_leader_refuses_new_writes_as_shutting_down_and_the_rest_carry_on() {
    let mut cluster = MemCluster::start(3);
    let all = [1, 2, 3];
    let leader = cluster.wait_for_leader(&all, T).await;
    cluster.put(leader, "before", "1").await.unwrap();
    let handle = cluster.handle(leader).clone();
    handle.request_shutdown(std::time::Instant::now() + Duration::from_secs(3));
    // Whether it is still draining or already gone: nothing new is taken.
    let refused = cluster.put(leader, "after", "x").await;
    assert!(matches!(refused, Err(Error::ShuttingDown(_))), "{refused:?}");
    cluster.stop(leader);
    let rest = others(&all, leader);
    let successor = cluster.wait_for_leader(&rest, T).await;
    cluster.put(successor, "after", "y").await.unwrap();
    let follower = others(&rest, successor)[0];
    assert_eq!(cluster.get(follower, "before").await.unwrap().as_deref(), Some("1"));
    assert_eq!(cluster.get(follower, "after").await.unwrap().as_deref(), Some("y"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_cut_off_past_two_snapshot_thresholds_catches_up_by_snapshot() {
    let threshold = 100u64;
    let cluster = MemCluster::start_with(3, |config| config.snapshot_threshold = threshold);
    let all = [1, 2, 3];
    let leader = cluster.wait_for_leader(&all, T).await;
    let lagging = others(&all, leader)[0];
    for i in 0..20 {
        cluster.put(leader, &format!("early/{i}"), "x").await.unwrap();
    }
    cluster
        .wait_until(T, "the lagging node applied the early writes", |c| {
            c.local_get(lagging, "early/19").is_some()
        })
        .await;
    let stopped_at = cluster.handle(lagging).status().last_index;
    cluster.net.partition(&[lagging], &others(&all, lagging));

    for i in 0..(threshold * 3 + 50) {
        cluster
            .put(leader, &format!("late/{i:04}"), &format!("v{i}"))
            .await
            .unwrap();
    }
    let at_leader = cluster.handle(leader).status();
    assert!(
        at_leader.snapshot_index >= stopped_at + 2 * threshold,
        "the leader snapshotted past the lagging node: {at_leader:?}"
    );
    assert!(
        at_leader.first_index > stopped_at + 1,
        "the leader compacted the entries the lagging node needs: {at_leader:?}"
    );
    assert_eq!(cluster.local_get(lagging, "late/0000"), None, "the partition held");

    cluster.net.heal();
    let commit = at_leader.commit_index;
    cluster
        .wait_until(T, "the lagging node caught up", |c| {
            c.handle(lagging).status().applied_index >= commit
        })
        .await;
    // The leader no longer had the entries after `stopped_at` (compacted, as
    // asserted above), so only a snapshot could bring the node this far.
    let caught_up = cluster.handle(lagging).status();
    assert!(caught_up.snapshot_index >= at_leader.snapshot_index, "{caught_up:?}");
    assert_eq!(cluster.local_get(lagging, "late/0000").as_deref(), Some("v0"));
    assert_eq!(cluster.local_get(lagging, "early/0").as_deref(), Some("x"));
    let keys = |id: u64| cluster.handle(id).read(|sm| sm.store().len().unwrap());
    assert_eq!(keys(lagging), keys(leader));

    // And it keeps up through the log afterwards.
    cluster.put(lagging, "after-catch-up", "yes").await.unwrap();
    assert_eq!(
        cluster.get(lagging, "after-catch-up").await.unwrap().as_deref(),
        Some("yes")
    );
}
