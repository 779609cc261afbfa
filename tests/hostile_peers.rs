//! The peer port of a plaintext cluster under attack, replaying what a
//! hand-built sender did to earlier versions: impossible terms and commit
//! indexes (which panicked every node for good), heartbeats from a
//! non-member (which kept the cluster leaderless), strangers from other
//! addresses, and frames declaring a gigabyte. None of it may change a term,
//! a leader, a value or liveness, or cost more than a small bound of memory.

mod support;

use std::time::{Duration, Instant};

use kvraft::proto::InfoResponse;
use raft::prelude::MessageType;
use support::peer_probe::{connect, declare_frame, memory, raft_message, Probe};
use support::Cluster;

const T: Duration = Duration::from_secs(30);
/// These tests check that attacks move no term or leader, so give the
/// cluster 2-4 s election timeouts: a loaded CI machine must not hold an
/// election of its own meanwhile.
const STEADY: &[&str] = &["--election-ticks", "80"];

async fn infos(cluster: &Cluster) -> Vec<InfoResponse> {
    let mut all = Vec::new();
    for id in cluster.ids() {
        all.push(cluster.info(id).await.expect("node answers"));
    }
    all
}

fn peer_addr(cluster: &Cluster, id: u64) -> String {
    cluster.nodes.iter().find(|n| n.id == id).unwrap().peer_addr.clone()
}

async fn probe(cluster: &Cluster, target: u64, source_ip: &str, from_id: u64, cluster_id: u64) -> Probe {
    let stream = connect(&peer_addr(cluster, target), source_ip, None).await.unwrap();
    Probe {
        stream,
        cluster_id,
        from_id,
    }
}

/// Term, leader and values are what they were, and the cluster still writes.
async fn assert_undisturbed(cluster: &mut Cluster, before: &[InfoResponse]) {
    for id in cluster.ids() {
        assert!(cluster.node(id).is_running(), "node {id} is still running");
    }
    let after = infos(cluster).await;
    for (b, a) in before.iter().zip(&after) {
        assert_eq!(
            (a.id, a.term, a.leader_id),
            (b.id, b.term, b.leader_id),
            "node {}",
            a.id
        );
    }
    let client = cluster.client(&cluster.ids());
    client.set("after", "still writes").await.unwrap();
    for id in cluster.ids() {
        let local = cluster.client_with(&[id], T, false);
        assert_eq!(local.get("k").await.unwrap().as_deref(), Some(&b"v"[..]), "node {id}");
        assert_eq!(local.get("injected").await.unwrap(), None, "node {id}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn impossible_terms_and_commits_and_non_members_change_nothing() {
    let mut cluster = Cluster::start_static(3, STEADY);
    let leader = cluster.wait_for_leader(&[1, 2, 3], T).await;
    support::put(&cluster.client(&[1, 2, 3]), "k", "v").await;
    let before = infos(&cluster).await;
    let (term, cluster_id) = (before[0].term, before[0].cluster_id);

    for target in cluster.ids() {
        // Speak as a member the target knows, from its address (loopback):
        // without peer TLS nothing more is needed to get past the door.
        let claimed = if target == leader {
            cluster.ids()[(target as usize) % 3]
        } else {
            leader
        };
        let mut p = probe(&cluster, target, "127.0.0.1", claimed, cluster_id).await;
        p.hello().await.unwrap();
        // The heartbeat that panicked every node, at every restart.
        p.send(&raft_message(MessageType::MsgHeartbeat, claimed, target, u64::MAX))
            .await
            .unwrap();
        // A term far beyond ours.
        p.send(&raft_message(
            MessageType::MsgHeartbeat,
            claimed,
            target,
            term + 2_000_000,
        ))
        .await
        .unwrap();
        // "to_commit 1000000000 is out of range".
        let mut commit = raft_message(MessageType::MsgHeartbeat, claimed, target, term);
        commit.commit = 1_000_000_000;
        p.send(&commit).await.unwrap();
        // Term 0 is "local" to raft; a vote request without a term panicked.
        p.send(&raft_message(MessageType::MsgRequestVote, claimed, target, 0))
            .await
            .unwrap();
        // Local-only types.
        p.send(&raft_message(MessageType::MsgHup, claimed, target, term))
            .await
            .unwrap();
        // The message says it is from someone else than the envelope.
        p.send(&raft_message(MessageType::MsgHeartbeat, 99, target, term + 1))
            .await
            .unwrap();
    }

    // A non-member with a higher term, every 200 ms for 3 s, at every node.
    let started = Instant::now();
    let mut non_member_rounds = 0;
    while started.elapsed() < Duration::from_secs(3) {
        for target in cluster.ids() {
            let mut p = probe(&cluster, target, "127.0.0.1", 99, cluster_id).await;
            p.hello().await.unwrap();
            let _ = p
                .send(&raft_message(MessageType::MsgHeartbeat, 99, target, term + 1))
                .await;
            assert_eq!(p.reply(T).await, Ok(None), "a non-member is dropped without a reply");
        }
        support::put(&cluster.client(&[1, 2, 3]), format!("during/{non_member_rounds}"), "ok").await;
        non_member_rounds += 1;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    assert_undisturbed(&mut cluster, &before).await;
    let refused = |reason: &str| -> f64 {
        cluster
            .ids()
            .iter()
            .map(|id| cluster.metric(*id, "kvraft_peer_messages_refused_total", &[("reason", reason)]))
            .sum()
    };
    assert!(
        refused("impossible_value") >= 6.0,
        "u64::MAX and term-0 messages, twice per node"
    );
    assert!(refused("term_too_high") >= 3.0);
    assert!(refused("not_a_peer_message") >= 3.0);
    assert!(refused("sender_mismatch") >= 3.0);
    assert!(refused("commit_beyond_log") + refused("not_from_leader") >= 3.0);
    for id in cluster.ids() {
        let not_member = cluster.metric(id, "kvraft_peer_connections_refused_total", &[("reason", "not_member")]);
        assert!(not_member >= non_member_rounds as f64, "node {id}: {not_member}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strangers_get_no_reply_and_no_slot_for_long() {
    let mut cluster = Cluster::start_static(3, STEADY);
    cluster.wait_for_leader(&[1, 2, 3], T).await;
    support::put(&cluster.client(&[1, 2, 3]), "k", "v").await;
    let before = infos(&cluster).await;
    let cluster_id = before[0].cluster_id;
    let target = 1;

    // A member's id from an address that is not the member's.
    let mut p = probe(&cluster, target, "127.0.0.2", 2, cluster_id).await;
    p.hello().await.unwrap();
    assert_eq!(p.reply(T).await, Ok(None));

    // Not an envelope at all.
    let mut p = probe(&cluster, target, "127.0.0.1", 2, cluster_id).await;
    p.send_frame(b"GET / HTTP/1.1\r\n\r\n".to_vec()).await.unwrap();
    assert_eq!(p.reply(T).await, Ok(None));

    // Silence: the slot is given back after the hello timeout.
    let mut silent = probe(&cluster, target, "127.0.0.3", 2, cluster_id).await;
    let started = Instant::now();
    assert_eq!(silent.reply(T).await, Ok(None));
    assert!(started.elapsed() < Duration::from_secs(10), "{:?}", started.elapsed());

    // A crowd from one address: past the per-address cap of pending
    // connections, closed at once.
    let mut crowd = Vec::new();
    for _ in 0..40 {
        crowd.push(probe(&cluster, target, "127.0.0.4", 2, cluster_id).await);
    }
    let mut closed_at_once = 0;
    for p in crowd.iter_mut() {
        if p.reply(Duration::from_millis(300)).await.is_ok() {
            closed_at_once += 1;
        }
    }
    assert!(closed_at_once >= 20, "only {closed_at_once} of 40 closed at once");
    drop(crowd);

    assert_undisturbed(&mut cluster, &before).await;
    for reason in ["address_mismatch", "no_hello", "too_many_connections"] {
        let n = cluster.metric(target, "kvraft_peer_connections_refused_total", &[("reason", reason)]);
        assert!(n >= 1.0, "{reason}: {n}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frames_declaring_a_gigabyte_cost_only_what_arrives() {
    let mut cluster = Cluster::start_static(3, STEADY);
    let leader = cluster.wait_for_leader(&[1, 2, 3], T).await;
    support::put(&cluster.client(&[1, 2, 3]), "k", "v").await;
    let before = infos(&cluster).await;
    let cluster_id = before[0].cluster_id;
    let target = cluster.ids().into_iter().find(|id| *id != leader).unwrap();
    let pid = cluster.node(target).pid().unwrap();
    let (rss_before, virt_before) = memory(pid);

    // Before a hello: refused at the header, nothing reserved.
    for _ in 0..4 {
        let mut p = probe(&cluster, target, "127.0.0.1", leader, cluster_id).await;
        declare_frame(&mut p.stream, 1 << 30, &[7u8; 4096]).await.unwrap();
        assert_eq!(p.reply(T).await, Ok(None));
    }
    // After a valid hello, as each member the target knows (from a member's
    // address): 1 GiB declared, 1 MiB sent. A node keeps one session per
    // peer, so a member's real reconnect may close a probe early; what was
    // read meanwhile is what counts, so take the peak over a second.
    let mut open = Vec::new();
    for member in cluster.ids().into_iter().filter(|id| *id != target) {
        let mut p = probe(&cluster, target, "127.0.0.1", member, cluster_id).await;
        p.hello().await.unwrap();
        let _ = declare_frame(&mut p.stream, 1 << 30, &vec![7u8; 1 << 20]).await;
        open.push(p);
    }
    let (mut rss_growth, mut virt_growth) = (0, 0);
    let until = Instant::now() + Duration::from_secs(1);
    while Instant::now() < until {
        let (rss, virt) = memory(pid);
        rss_growth = rss_growth.max(rss.saturating_sub(rss_before));
        virt_growth = virt_growth.max(virt.saturating_sub(virt_before));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    eprintln!(
        "frames declaring 1 GiB (4 before a hello, 2 after with 1 MiB sent): RSS peak +{} KiB, virtual +{} KiB",
        rss_growth >> 10,
        virt_growth >> 10
    );
    // A frame holds at most twice what arrived: 2 x 2 MiB, not 2 GiB.
    assert!(rss_growth < 24 << 20, "RSS grew {rss_growth} bytes");
    // Not the 4 GiB a declared-length reservation took (allocator arenas
    // account for some virtual growth).
    assert!(virt_growth < 512 << 20, "virtual memory grew {virt_growth} bytes");
    drop(open);
    assert_undisturbed(&mut cluster, &before).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_let_in_while_waiting_to_join_is_checked_again_once_joined() {
    let mut cluster = Cluster::empty();
    cluster.add_node(1, None, STEADY.iter().map(|s| s.to_string()).collect());
    let mut join: Vec<String> = vec!["--join".into()];
    join.extend(STEADY.iter().map(|s| s.to_string()));
    cluster.add_node(2, None, join);
    cluster.start(1);
    cluster.start(2);
    cluster.wait_for_leader(&[1], T).await;
    let one = cluster.info(1).await.unwrap();

    // While node 2 knows no members it can't tell anyone from a stranger: a
    // connection from a foreign address claiming to be node 3 is let in.
    let mut p = probe(&cluster, 2, "127.0.0.9", 3, one.cluster_id).await;
    p.hello().await.unwrap();

    let (peer2, client2) = {
        let node = cluster.node(2);
        (node.peer_addr.clone(), node.client_addr.clone())
    };
    cluster.client(&[1]).add_node(2, &peer2, &client2).await.unwrap();
    // Joined: it follows node 1 and knows the members from its snapshot.
    let two = cluster
        .wait_info(2, T, "node 2 knows its members", |i| {
            i.leader_id == 1 && i.members.len() == 2
        })
        .await;

    // Now it knows its members: the same connection is checked again and
    // dropped before its higher-term heartbeat reaches raft.
    let _ = p
        .send(&raft_message(MessageType::MsgHeartbeat, 3, 2, two.term + 1))
        .await;
    assert_eq!(p.reply(T).await, Ok(None));
    let refused = cluster.metric(2, "kvraft_peer_connections_refused_total", &[("reason", "not_member")]);
    assert!(refused >= 1.0, "{refused}");
    support::put(&cluster.client(&[1, 2]), "after", "join").await;
    let after = cluster.info(2).await.unwrap();
    assert_eq!((after.term, after.leader_id), (two.term, 1));
}
