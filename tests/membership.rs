//! Membership: joining an empty node to a single-node cluster, adding a fourth
//! node and removing members (the leader included) under traffic, and the
//! errors a wrong change gets.

mod support;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kvraft::proto::MemberRole;
use support::{stderr, stdout, Cluster};

const T: Duration = Duration::from_secs(30);

async fn wait_voter(cluster: &Cluster, ask: u64, id: u64) {
    cluster
        .wait_info(ask, T, &format!("node {id} is a voter"), |i| {
            i.members
                .iter()
                .any(|m| m.id == id && m.role == MemberRole::Voter as i32)
        })
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn join_nodes_to_a_single_node_cluster_with_add_node() {
    let mut cluster = Cluster::empty();
    cluster.add_node(1, None, vec![]);
    cluster.start(1);
    cluster.wait_for_leader(&[1], T).await;
    let client = cluster.client(&[1]);
    for i in 0..30 {
        support::put(&client, format!("k{i}"), format!("v{i}")).await;
    }

    for id in [2u64, 3] {
        let node = cluster.add_node(id, None, vec!["--join".into()]);
        let (peer, client_addr) = (node.peer_addr.clone(), node.client_addr.clone());
        cluster.start(id);
        // A joining node serves nothing that needs a leader until it is added.
        let info = cluster.wait_info(id, T, "listening", |_| true).await;
        assert_eq!((info.leader_id, info.members.len()), (0, 0), "{info:?}");

        let out = cluster.cli(
            &[1],
            &["add-node", &id.to_string(), &peer, "--client-addr", &client_addr],
        );
        assert!(out.status.success(), "{}", stderr(&out));
        assert!(stdout(&out).contains(&format!("added node {id}")), "{}", stdout(&out));
        wait_voter(&cluster, 1, id).await;
        cluster
            .wait_info(id, T, "has the data", |i| i.keys >= 30 && i.role == "follower")
            .await;
    }
    let leader = cluster.wait_for_leader(&[1, 2, 3], T).await;
    assert_eq!(leader, 1, "adding members does not move leadership");
    // The joined nodes serve linearizable reads and writes.
    let via3 = cluster.client(&[3]);
    support::put(&via3, "written-via-3", "ok").await;
    assert_eq!(
        cluster.client(&[2]).get("written-via-3").await.unwrap().as_deref(),
        Some(&b"ok"[..])
    );
    assert_eq!(via3.get("k7").await.unwrap().as_deref(), Some(&b"v7"[..]));
    // With three voters the cluster survives losing the original node.
    cluster.kill(1);
    cluster.wait_for_leader(&[2, 3], T).await;
    support::put(&cluster.client(&[2, 3]), "after-node-1-died", "ok").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn add_a_fourth_node_and_remove_members_under_traffic() {
    let mut cluster = Cluster::start_static(3, &[]);
    cluster.wait_for_leader(&[1, 2, 3], T).await;

    // Traffic for the whole test: unique keys, acknowledged ones recorded.
    let stop = Arc::new(AtomicBool::new(false));
    let acked: Arc<Mutex<Vec<(String, String)>>> = Arc::default();
    let node4 = cluster.add_node(4, None, vec!["--join".into()]);
    let (peer4, client4) = (node4.peer_addr.clone(), node4.client_addr.clone());
    let writer = {
        let endpoints = format!("{},{}", cluster.endpoints(&[1, 2, 3]), client4);
        let client = kvraft::Client::new(kvraft::ClientOptions {
            endpoints: endpoints.split(',').map(String::from).collect(),
            timeout: Duration::from_secs(5),
            serializable: false,
            tls: Default::default(),
        })
        .unwrap();
        let (stop, acked) = (stop.clone(), acked.clone());
        tokio::spawn(async move {
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) {
                let (k, v) = (format!("t/{i}"), format!("{i}"));
                if client.set(k.clone(), v.clone()).await.is_ok() {
                    acked.lock().unwrap().push((k, v));
                }
                i += 1;
            }
        })
    };

    cluster.start(4);
    let added = cluster.client(&[1, 2, 3]).add_node(4, &peer4, &client4).await.unwrap();
    assert!(
        added.iter().any(|m| m.id == 4 && m.role == MemberRole::Learner as i32),
        "{added:?}"
    );
    wait_voter(&cluster, 1, 4).await;

    // Remove a follower: it stops by itself.
    let leader = cluster.wait_for_leader(&[1, 2, 3, 4], T).await;
    let follower = [1, 2, 3].into_iter().find(|id| *id != leader).unwrap();
    let out = cluster.cli(&[1, 2, 3, 4], &["remove-node", &follower.to_string()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let exit = cluster.wait_exit(follower, T).expect("a removed node stops");
    assert!(exit.success(), "a removed node exits cleanly: {exit:?}");
    let remaining: Vec<u64> = [1, 2, 3, 4].into_iter().filter(|id| *id != follower).collect();

    // Remove the leader (with the seed's spelling): it hands leadership over first.
    let out = cluster.cli(&remaining, &["remove_node", &leader.to_string()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let exit = cluster.wait_exit(leader, T).expect("the removed leader stops");
    assert!(exit.success(), "a removed leader exits cleanly: {exit:?}");
    // It handed leadership over before the change was made: the removal was
    // proposed by its successor, not by a leader removing itself.
    let log = cluster.node(leader).log();
    assert!(
        log.contains("asked to remove myself: handing leadership over first"),
        "{log}"
    );
    let after = &log[log.find("handing leadership over first").unwrap()..];
    let stepped_down = after.find("role=Follower");
    let removed = after.find("membership changed");
    assert!(
        matches!((stepped_down, removed), (Some(d), Some(r)) if d < r),
        "the leader should follow another before the change removing it is applied:\n{log}"
    );
    let remaining: Vec<u64> = remaining.into_iter().filter(|id| *id != leader).collect();
    let new_leader = cluster.wait_for_leader(&remaining, T).await;
    assert!(remaining.contains(&new_leader));

    let (members, _) = cluster.client(&remaining).members().await.unwrap();
    let mut ids: Vec<u64> = members.iter().map(|m| m.id).collect();
    ids.sort();
    assert_eq!(ids, remaining);

    // A removed node refuses to start again on its old data dir.
    cluster.start(follower);
    let exit = cluster.wait_exit(follower, T).expect("refused at start");
    assert_eq!(
        exit.code(),
        Some(78),
        "a configuration error: the data dir can't serve again"
    );
    assert!(
        cluster.node(follower).log().contains("was removed"),
        "{}",
        cluster.node(follower).log()
    );

    stop.store(true, Ordering::Relaxed);
    writer.await.unwrap();
    let acked = acked.lock().unwrap().clone();
    assert!(
        acked.len() > 10,
        "traffic ran during the changes ({} writes)",
        acked.len()
    );
    let client = cluster.client(&remaining);
    support::assert_all_readable(&client, &acked).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_membership_changes_are_refused_with_a_reason() {
    let cluster = Cluster::start_static(3, &[]);
    cluster.wait_for_leader(&[1, 2, 3], T).await;
    let all = [1, 2, 3];
    let peer2 = cluster.nodes[1].peer_addr.clone();

    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["add-node", "2", "127.0.0.1:1"], "already a member"),
        (vec!["add-node", "9", "not-an-address"], "HOST:PORT"),
        (vec!["add-node", "9", "127.0.0.1:99999"], "65535"),
        (vec!["add-node", "0", "127.0.0.1:1"], "positive"),
        (vec!["add-node", "9", &peer2], "already belongs to node 2"),
        (
            vec!["add-node", "9", "127.0.0.1:1", "--client-addr", "nope"],
            "client address",
        ),
        (vec!["remove-node", "42"], "not a member"),
    ];
    for (args, expect) in cases {
        let out = cluster.cli(&all, &args);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", stderr(&out));
        assert!(stderr(&out).contains(expect), "{args:?}: {}", stderr(&out));
    }
    let out = cluster.cli(&all, &["add-node", "x", "127.0.0.1:1"]);
    assert_eq!(out.status.code(), Some(2), "clap rejects a non-numeric id");
    let (members, _) = cluster.client(&all).members().await.unwrap();
    assert_eq!(members.len(), 3, "nothing changed: {members:?}");
}

/// A member whose data dir was wiped (a replaced disk) and that starts again
/// under its old id refuses to run, saying what happened and what to do; the
/// README's "Replacing a failed node" then brings the cluster back to three
/// voters with every write, the replacement on the old node's peer address.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wiped_member_refuses_its_old_id_and_is_replaced_as_the_readme_says() {
    let mut cluster = Cluster::start_static(3, &[]);
    // The wiped member is a follower here (the next test wipes a leader).
    if cluster.wait_for_leader(&[1, 2, 3], T).await == 3 {
        cluster.kill(3);
        cluster.wait_for_leader(&[1, 2], T).await;
        cluster.start(3);
    }
    let client = cluster.client(&[1, 2]);
    for i in 0..50 {
        support::put(&client, format!("k{i}"), format!("v{i}")).await;
    }
    // Node 3 has published its record (client address and data dir
    // incarnation travel in the same update) and has every write.
    cluster
        .wait_info(1, T, "node 3 published itself", |i| {
            i.members.iter().any(|m| m.id == 3 && !m.client_addr.is_empty())
        })
        .await;
    cluster
        .wait_info(3, T, "node 3 has every write", |i| i.keys >= 50)
        .await;

    cluster.kill(3);
    std::fs::remove_dir_all(&cluster.node(3).data_dir).unwrap();
    cluster.start(3);
    let status = cluster.wait_exit(3, T).expect("the wiped node stops by itself");
    assert_eq!(status.code(), Some(78), "exit 78: the data dir must change first");
    let log = cluster.node_log(3);
    assert!(!log.contains("panicked"), "{log}");
    // Its peers refuse its new data dir. (The leader's heartbeat past its
    // log is believed only over peer TLS; tests/tls.rs covers that.)
    assert!(log.contains("data dir is not the one it ran on before"), "{log}");
    for expect in ["kvraft remove-node 3", "Replacing a failed node"] {
        assert!(log.contains(expect), "{expect:?} missing from:\n{log}");
    }
    // The two others kept serving throughout.
    support::put(&client, "while-3-was-refused", "ok").await;

    // README: remove the old id, then add the replacement under a new one.
    let out = cluster.cli(&[1, 2], &["remove-node", "3"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let old_peer = cluster.node(3).peer_addr.clone();
    let node4 = cluster.add_node(4, Some(old_peer.clone()), vec!["--join".into()]);
    let client4 = node4.client_addr.clone();
    cluster.start(4);
    let out = cluster.cli(&[1, 2], &["add-node", "4", &old_peer, "--client-addr", &client4]);
    assert!(out.status.success(), "{}", stderr(&out));
    wait_voter(&cluster, 1, 4).await;
    let info = cluster
        .wait_info(4, T, "node 4 has every write", |i| i.keys >= 51)
        .await;
    let voters: Vec<u64> = info.members.iter().map(|m| m.id).collect();
    assert_eq!(voters, [1, 2, 4], "{info:?}");
    let via4 = cluster.client(&[4]);
    assert_eq!(via4.get("k49").await.unwrap().as_deref(), Some(&b"v49"[..]));
    assert_eq!(
        via4.get("while-3-was-refused").await.unwrap().as_deref(),
        Some(&b"ok"[..])
    );
    // And the cluster survives losing an original member again.
    cluster.kill(1);
    cluster.wait_for_leader(&[2, 4], T).await;
    support::put(&cluster.client(&[2, 4]), "after-node-1-died", "ok").await;
}

/// A wiped former leader: the new leader never saw its acknowledgements, so
/// nothing in raft's messages gives it away (and with an empty log it would
/// vote for anyone). Its peers refuse it because its data dir's incarnation
/// is not the one its member record was published from, and it stops.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wiped_former_leader_is_refused_by_its_data_dir_incarnation() {
    let mut cluster = Cluster::start_static(3, &[]);
    let leader = cluster.wait_for_leader(&[1, 2, 3], T).await;
    cluster.wait_all_published(leader, T).await;
    let others: Vec<u64> = [1, 2, 3].into_iter().filter(|id| *id != leader).collect();
    let client = cluster.client(&others);
    for i in 0..20 {
        support::put(&client, format!("k{i}"), format!("v{i}")).await;
    }

    cluster.kill(leader);
    cluster.wait_for_leader(&others, T).await;
    std::fs::remove_dir_all(&cluster.node(leader).data_dir).unwrap();
    cluster.start(leader);
    let status = cluster.wait_exit(leader, T).expect("the wiped node stops by itself");
    assert_eq!(status.code(), Some(78));
    let log = cluster.node_log(leader);
    for expect in [
        "data dir is not the one it ran on before",
        &format!("kvraft remove-node {leader}"),
    ] {
        assert!(log.contains(expect), "{expect:?} missing from:\n{log}");
    }
    assert!(
        cluster.metric(
            others[0],
            "kvraft_peer_connections_refused_total",
            &[("reason", "replaced_data_dir")]
        ) >= 1.0
            || cluster.metric(
                others[1],
                "kvraft_peer_connections_refused_total",
                &[("reason", "replaced_data_dir")]
            ) >= 1.0,
        "the refusal is counted"
    );
    // The others never counted it as a voter again, and go on.
    support::put(&client, "after", "ok").await;
    assert_eq!(client.get("k19").await.unwrap().as_deref(), Some(&b"v19"[..]));
}
