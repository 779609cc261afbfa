//! A static three-node cluster: one leader, reads and writes through every
//! node, and the CLI against it.

mod support;

use std::time::Duration;

use kvraft::client::ScanOptions;
use support::{stderr, stdout, Cluster};

const T: Duration = Duration::from_secs(20);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_static_members_elect_exactly_one_leader() {
    let cluster = Cluster::start_static(3, &[]);
    let leader = cluster.wait_for_leader(&[1, 2, 3], T).await;
    let mut leaders = Vec::new();
    let mut terms = Vec::new();
    for id in 1..=3 {
        let info = cluster.info(id).await.unwrap();
        if info.role == "leader" {
            leaders.push(id);
        }
        terms.push(info.term);
        assert_eq!(info.members.len(), 3, "node {id} lists every member");
    }
    assert_eq!(leaders, vec![leader]);
    // One election with pre-vote: the bootstrap term is 1, the first leader's 2.
    // A little slack for an unlucky split vote on a loaded machine.
    assert!(terms.iter().all(|t| *t == terms[0] && *t <= 3), "terms {terms:?}");
    // Every member publishes its client address through raft.
    cluster.wait_all_published(leader, T).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn set_get_delete_scan_through_every_node() {
    let cluster = Cluster::start_static(3, &[]);
    cluster.wait_for_leader(&[1, 2, 3], T).await;
    for writer in 1..=3u64 {
        let client = cluster.client(&[writer]);
        support::put(&client, format!("k{writer}"), format!("from{writer}")).await;
        // A linearizable read on every node sees the acknowledged write.
        for reader in 1..=3u64 {
            let value = cluster.client(&[reader]).get(format!("k{writer}")).await.unwrap();
            assert_eq!(
                value.as_deref(),
                Some(format!("from{writer}").as_bytes()),
                "write via {writer}, read via {reader}"
            );
        }
    }
    // Through node 2, whatever its role (forwarding proper is tested below,
    // on a raw connection to a node known to follow).
    let node2 = cluster.client(&[2]);
    for i in 0..20 {
        node2.set(format!("scan/{i:02}"), format!("v{i}")).await.unwrap();
    }
    for reader in 1..=3u64 {
        let client = cluster.client(&[reader]);
        let all = client
            .scan(ScanOptions {
                prefix: b"scan/".to_vec(),
                ..Default::default()
            })
            .await
            .unwrap();
        assert_eq!(all.len(), 20, "node {reader}");
        assert_eq!(all[0].key, b"scan/00");
        assert_eq!(all[19].value, b"v19");
        let range = client
            .scan(ScanOptions {
                prefix: b"scan/".to_vec(),
                from: b"scan/05".to_vec(),
                to: b"scan/08".to_vec(),
                limit: 0,
            })
            .await
            .unwrap();
        let keys: Vec<&[u8]> = range.iter().map(|kv| kv.key.as_slice()).collect();
        assert_eq!(keys, [b"scan/05", b"scan/06", b"scan/07"]);
        let limited = client
            .scan(ScanOptions {
                prefix: b"scan/".to_vec(),
                limit: 3,
                ..Default::default()
            })
            .await
            .unwrap();
        assert_eq!(limited.len(), 3);
    }
    assert!(cluster.client(&[3]).delete("k1").await.unwrap());
    assert!(!cluster.client(&[1]).delete("k1").await.unwrap(), "already gone");
    for reader in 1..=3u64 {
        assert_eq!(cluster.client(&[reader]).get("k1").await.unwrap(), None);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_speaks_text_and_json_with_the_documented_exit_codes() {
    let cluster = Cluster::start_static(3, &[]);
    cluster.wait_for_leader(&[1, 2, 3], T).await;
    let all = [1, 2, 3];

    let out = cluster.cli(&all, &["set", "greeting", "hello world"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = cluster.cli(&[2], &["get", "greeting"]);
    assert_eq!((out.status.code(), stdout(&out)), (Some(0), "hello world".to_string()));
    let out = cluster.cli(&[3], &["get", "missing"]);
    assert_eq!(out.status.code(), Some(1), "a missing key exits 1");
    assert!(stderr(&out).contains("not found"));
    let out = cluster.cli(&all, &["--output", "json", "get", "missing"]);
    assert_eq!(out.status.code(), Some(1));
    let json: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(json["found"], false);

    for (k, v) in [("a/1", "x"), ("a/2", "y"), ("b/1", "z")] {
        assert!(cluster.cli(&all, &["set", k, v]).status.success());
    }
    let out = cluster.cli(&all, &["scan", "--prefix", "a/"]);
    assert_eq!(stdout(&out), "a/1\tx\na/2\ty");
    let out = cluster.cli(&all, &["scan", "--from", "a/2", "--to", "b/2", "--limit", "5"]);
    assert_eq!(stdout(&out), "a/2\ty\nb/1\tz");
    let out = cluster.cli(&all, &["--serializable", "get", "a/1"]);
    assert_eq!(stdout(&out), "x");

    let out = cluster.cli(&[1], &["--output", "json", "info"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let info: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    for field in [
        "id",
        "role",
        "term",
        "leader_id",
        "commit_index",
        "applied_index",
        "snapshot_index",
        "last_index",
        "members",
    ] {
        assert!(!info[field].is_null(), "info lacks {field}: {info}");
    }
    assert_eq!(info["id"], 1);
    assert!(["leader", "follower"].contains(&info["role"].as_str().unwrap()));
    let members = info["members"].as_array().unwrap();
    assert_eq!(members.len(), 3);
    for m in members {
        for field in ["id", "peer_addr", "client_addr", "role"] {
            assert!(!m[field].is_null(), "member lacks {field}: {m}");
        }
        assert_eq!(m["role"], "voter");
    }

    let out = cluster.cli(&all, &["members"]);
    assert!(stdout(&out).contains("leader"), "{}", stdout(&out));
    let out = cluster.cli(&all, &["--output", "json", "members"]);
    let json: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert!(json["leader_id"].as_u64().unwrap() >= 1);

    let out = cluster.cli(&[2], &["ping"]);
    assert!(stdout(&out).starts_with("pong from node 2 in "), "{}", stdout(&out));
    let out = cluster.cli(&all, &["delete", "a/1"]);
    assert_eq!(stdout(&out), "deleted");
    let out = cluster.cli(&all, &["get", "a/1"]);
    assert_eq!(out.status.code(), Some(1));

    let out = cluster.cli(
        &all,
        &[
            "--output",
            "json",
            "bench",
            "put",
            "--clients",
            "4",
            "--conns",
            "2",
            "--total",
            "200",
            "--key-space",
            "50",
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let json: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(json["errors"], 0);
    assert_eq!(json["completed"], 200);
    for field in ["ops_per_s", "p50_ms", "p99_ms", "p999_ms"] {
        assert!(json[field].as_f64().unwrap() > 0.0, "{field} in {json}");
    }
    let out = cluster.cli(&all, &["bench", "get", "--clients", "2", "--total", "100"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("p99.9"), "{}", stdout(&out));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_one_mib_binary_value_round_trips_through_stdin_a_file_and_get_raw() {
    let cluster = Cluster::start_static(3, &[]);
    cluster.wait_for_leader(&[1, 2, 3], T).await;
    let all = [1, 2, 3];
    // Every byte value, NULs and newlines included, in no simple pattern.
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    let value: Vec<u8> = (0..1 << 20)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();

    let out = cluster.cli_with_stdin(&[1, 2, 3], &["set", "blob", "-"], &value);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = cluster.cli(&all, &["get", "blob", "--raw"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(
        out.stdout == value,
        "get --raw gives back the exact bytes set from stdin"
    );

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("value.bin");
    let reversed: Vec<u8> = value.iter().rev().copied().collect();
    std::fs::write(&file, &reversed).unwrap();
    let out = cluster.cli(&all, &["set", "blob", "--value-file", file.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(cluster.cli(&[2], &["get", "--raw", "blob"]).stdout == reversed);

    // One byte over the server's limit: refused by the server, nothing changed.
    let over = vec![b'v'; (1 << 20) + 1];
    let out = cluster.cli_with_stdin(&[1, 2, 3], &["set", "blob", "-"], &over);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("max-value-size"), "{}", stderr(&out));
    assert!(cluster.cli(&all, &["get", "--raw", "blob"]).stdout == reversed);

    let missing = dir.path().join("missing.bin");
    let out = cluster.cli(&all, &["set", "k", "--value-file", missing.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("can't read the value file") && stderr(&out).contains("missing.bin"),
        "{}",
        stderr(&out)
    );
    let out = cluster.cli(&all, &["set", "k", "v", "--value-file", file.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("cannot be used with"), "{}", stderr(&out));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn env_endpoints_and_failover_to_a_live_endpoint() {
    let cluster = Cluster::start_static(3, &[]);
    cluster.wait_for_leader(&[1, 2, 3], T).await;
    // The first endpoint is dead; the client moves on.
    let dead = format!("127.0.0.1:{}", support::free_port());
    let endpoints = format!("{dead},{}", cluster.endpoints(&[2]));
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_kvraft"))
        .env("KVRAFT_ENDPOINTS", &endpoints)
        .args(["set", "via-env", "1"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&cluster.cli(&[3], &["get", "via-env"])), "1");

    // Nothing listening at all: a network error (exit 3) that says what to check.
    let out = support::kvraft_cli(&dead, &["--timeout", "300ms", "get", "x"]);
    assert_eq!(out.status.code(), Some(3));
    assert!(
        stderr(&out).contains("nothing is listening at") && stderr(&out).contains("start the nodes"),
        "{}",
        stderr(&out)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_answers_writes_and_linearizable_reads_itself_by_forwarding_through_raft() {
    use kvraft::proto::{request::Command as C, response::Result as R, DeleteRequest, GetRequest, SetRequest};
    let cluster = Cluster::start_static(3, &[]);
    let leader = cluster.wait_for_leader(&[1, 2, 3], T).await;
    let follower = [1, 2, 3].into_iter().find(|id| *id != leader).unwrap();
    let addr = cluster
        .nodes
        .iter()
        .find(|n| n.id == follower)
        .unwrap()
        .client_addr
        .clone();

    // Each answer comes from the follower itself: a redirect would be a
    // NOT_LEADER error on this raw connection.
    let set = C::Set(SetRequest {
        key: b"fwd".to_vec(),
        value: b"1".to_vec(),
        lease: 0,
    });
    assert!(
        matches!(support::raw_request(&addr, set).await, R::Set(_)),
        "set via follower {follower}"
    );
    let get = C::Get(GetRequest {
        key: b"fwd".to_vec(),
        serializable: false,
    });
    match support::raw_request(&addr, get.clone()).await {
        R::Get(got) => assert_eq!((got.found, got.value.as_slice()), (true, &b"1"[..])),
        other => panic!("linearizable get via follower {follower}: {other:?}"),
    }
    let delete = C::Delete(DeleteRequest {
        key: b"fwd".to_vec(),
        range: None,
    });
    assert!(matches!(support::raw_request(&addr, delete).await, R::Delete(d) if d.existed));
    // Through raft, not a local copy: the leader saw both writes.
    assert_eq!(cluster.client(&[leader]).get("fwd").await.unwrap(), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_quorum_serializable_reads_still_answer_and_linearizable_ones_fail() {
    let mut cluster = Cluster::start_static(3, &[]);
    cluster.wait_for_leader(&[1, 2, 3], T).await;
    support::put(&cluster.client(&[1, 2, 3]), "k", "v").await;
    // Every node has applied it (serializable reads are local).
    for id in 1..=3u64 {
        let local = cluster.client_with(&[id], T, true);
        let deadline = std::time::Instant::now() + T;
        while local.get("k").await.ok().flatten().as_deref() != Some(&b"v"[..]) {
            assert!(std::time::Instant::now() < deadline, "node {id} never applied k");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    cluster.kill(1);
    cluster.kill(2);
    // Node 3 alone: its own copy is served, a read that needs a quorum is not.
    let serializable = cluster.client_with(&[3], Duration::from_secs(5), true);
    assert_eq!(serializable.get("k").await.unwrap().as_deref(), Some(&b"v"[..]));
    let linearizable = cluster.client_with(&[3], Duration::from_secs(3), false);
    let err = linearizable.get("k").await.unwrap_err();
    // No leader to confirm it: until the client's deadline the node refuses
    // (no leader, a read-index round that can't complete) or holds the read
    // waiting for one (no reply); it never answers from its own copy.
    match &err {
        kvraft::Error::NoLeader { answered } => assert_eq!(answered, &cluster.endpoints(&[3]), "{err}"),
        kvraft::Error::Unavailable { last, .. } => {
            assert!(["read index", "no reply"].iter().any(|why| last.contains(why)), "{err}")
        }
        other => panic!("expected the read to be unavailable, got {other:?}"),
    }
}

/// The error shown is the most informative one seen at any endpoint, a write
/// that was never proposed is not "outcome unknown", nothing listening is
/// said at once, and a leader hint that can't be reached falls back to the
/// endpoints given.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_say_no_leader_or_nothing_listening_and_bad_leader_hints_fall_back() {
    // Every node advertises a client address that does not resolve here,
    // as the compose cluster's names do from the host.
    let mut cluster = Cluster::start_static_each(3, |id| {
        vec!["--advertise-client-addr".into(), format!("kvraft{id}.invalid:7379")]
    });
    cluster.wait_for_leader(&[1, 2, 3], T).await;
    cluster
        .wait_info(1, T, "every member published its address", |i| {
            i.members.iter().all(|m| m.client_addr.ends_with(".invalid:7379"))
        })
        .await;
    // Membership changes go to the leader: the followers' hints name an
    // address that does not resolve, and the client goes on with the
    // endpoints it was given until it reaches the leader.
    let all = [1, 2, 3];
    let out = cluster.cli(&all, &["--timeout", "20s", "remove-node", "3"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("removed node 3"), "{}", stdout(&out));
    assert_eq!(cluster.wait_exit(3, T).and_then(|s| s.code()), Some(0), "node 3 left");

    // Node 2 alone: it answers, but knows no leader.
    let leader = cluster.wait_for_leader(&[1, 2], T).await;
    let survivor = if leader == 1 { 2 } else { 1 };
    cluster.kill(leader);
    cluster
        .wait_info(survivor, T, "no leader known", |i| i.leader_id == 0)
        .await;
    let endpoints = cluster.endpoints(&all);
    let out = support::kvraft_cli(&endpoints, &["--timeout", "3s", "set", "k", "v"]);
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains("the cluster has no leader"),
        "{err}\nsurvivor {survivor} at {}:\n{}",
        cluster.endpoints(&[survivor]),
        cluster.node_log(survivor)
    );
    assert!(err.contains("nothing was done"), "{err}");
    assert!(
        !err.contains("outcome unknown"),
        "never proposed, so not unknown: {err}"
    );
    assert!(
        !err.contains("Connection refused"),
        "no leader says more than a dead node: {err}"
    );
    assert_eq!(err.matches("no leader").count(), 1, "said once: {err}");

    // Nothing listening anywhere: said at once, not after the whole timeout.
    cluster.kill(survivor);
    let dead = cluster.endpoints(&[1, 2]);
    let started = std::time::Instant::now();
    let out = support::kvraft_cli(&dead, &["--timeout", "60s", "get", "k"]);
    assert_eq!(out.status.code(), Some(3));
    assert!(
        stderr(&out).contains(&format!("nothing is listening at {dead}")),
        "{}",
        stderr(&out)
    );
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "gave up after {:?}, not at the 60 s deadline",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scan_larger_than_a_page_comes_back_whole_and_in_order_through_the_client() {
    // Frames of 4 KiB make pages of 2 KiB: 60 pairs of ~110 bytes take 4 pages.
    let cluster = Cluster::start_static(
        1,
        &[
            "--max-frame-size",
            "4096",
            "--max-key-size",
            "64",
            "--max-value-size",
            "1024",
        ],
    );
    cluster.wait_for_leader(&[1], T).await;
    let client = cluster.client(&[1]);
    for i in 0..60 {
        support::put(&client, format!("page/{i:03}"), "v".repeat(100)).await;
    }
    support::put(&client, "pagf", "outside the prefix").await;
    let all = client
        .scan(ScanOptions {
            prefix: b"page/".to_vec(),
            ..Default::default()
        })
        .await
        .unwrap();
    let keys: Vec<String> = all
        .iter()
        .map(|kv| String::from_utf8(kv.key.clone()).unwrap())
        .collect();
    let expected: Vec<String> = (0..60).map(|i| format!("page/{i:03}")).collect();
    assert_eq!(keys, expected);
    // It really took several pages: one page holds at most 2 KiB of pairs.
    let bytes: usize = all.iter().map(|kv| kv.key.len() + kv.value.len()).sum();
    assert!(bytes > 3 * 2048, "{bytes} bytes fit in fewer than four pages");
}

/// `endpoint health`, `endpoint status` and the health column of `members`
/// on a healthy cluster, with one node down, and without a leader.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoint_health_and_status_on_a_healthy_a_partly_dead_and_a_leaderless_cluster() {
    let mut cluster = Cluster::start_static(3, &[]);
    let all = [1, 2, 3];
    let leader = cluster.wait_for_leader(&all, T).await;
    cluster.wait_all_published(leader, T).await;
    let json_of = |out: &std::process::Output| -> serde_json::Value {
        serde_json::from_str(&stdout(out)).unwrap_or_else(|e| panic!("{e}: {}", stdout(out)))
    };

    let out = cluster.cli(&all, &["endpoint", "health"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(
        stdout(&out).matches("is healthy: a linearizable read took").count(),
        3,
        "{}",
        stdout(&out)
    );
    let out = cluster.cli(&all, &["--output", "json", "endpoint", "status"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let status = json_of(&out);
    let rows = status.as_array().unwrap();
    assert_eq!(rows.len(), 3);
    for row in rows {
        assert_eq!(row["reachable"], true, "{row}");
        assert_eq!(row["has_leader"], true, "{row}");
        assert_eq!(row["leader_id"], leader, "{row}");
        assert_eq!(row["term"], rows[0]["term"], "one term: {status}");
        assert!(row["applied_index"].as_u64().unwrap() >= 1, "{row}");
        assert!(row["rtt_ms"].as_f64().unwrap() > 0.0, "{row}");
    }
    let out = cluster.cli(&all, &["members"]);
    assert!(stdout(&out).contains("HEALTH"), "{}", stdout(&out));
    assert_eq!(stdout(&out).matches(" healthy").count(), 3, "{}", stdout(&out));

    // One follower down: it is named, the others are healthy, exit 3.
    let down = if leader == 3 { 2 } else { 3 };
    cluster.kill(down);
    let out = cluster.cli(&all, &["endpoint", "health"]);
    assert_eq!(out.status.code(), Some(3), "{}", stdout(&out));
    let text = stdout(&out);
    assert_eq!(text.matches("is healthy").count(), 2, "{text}");
    assert!(
        text.contains(&format!(
            "{} is unhealthy: nothing is listening",
            cluster.endpoints(&[down])
        )),
        "{text}"
    );
    let out = cluster.cli(&all, &["--output", "json", "endpoint", "status"]);
    assert_eq!(out.status.code(), Some(3));
    let status = json_of(&out);
    let unreachable: Vec<&serde_json::Value> = status
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["reachable"] == false)
        .collect();
    assert_eq!(unreachable.len(), 1, "{status}");
    assert_eq!(unreachable[0]["endpoint"], cluster.endpoints(&[down]).as_str());
    let out = cluster.cli(&all, &["--output", "json", "members"]);
    let members = json_of(&out);
    for m in members["members"].as_array().unwrap() {
        assert_eq!(m["healthy"], m["id"] != down, "{members}");
    }

    // Leaderless: the last two cannot agree on anything; the survivor
    // answers its status but is not healthy.
    let survivor = all.into_iter().find(|id| *id != down && *id != leader).unwrap();
    cluster.kill(leader);
    cluster
        .wait_info(survivor, T, "no leader known", |i| i.leader_id == 0)
        .await;
    let out = cluster.cli(&[survivor], &["--timeout", "2s", "endpoint", "health"]);
    assert_eq!(out.status.code(), Some(3));
    assert!(
        stdout(&out).contains("is unhealthy: the cluster has no leader"),
        "{}",
        stdout(&out)
    );
    let out = cluster.cli(&[survivor], &["--output", "json", "endpoint", "status"]);
    assert_eq!(out.status.code(), Some(0), "it answers: {}", stderr(&out));
    let status = json_of(&out);
    assert_eq!(status[0]["has_leader"], false, "{status}");
}

/// `get` and `scan` report each key's history with etcd's names:
/// create_revision (since it last did not exist), mod_revision, version.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_and_scan_report_create_and_mod_revision_and_version_as_etcd_does() {
    let cluster = Cluster::start_static(3, &[]);
    cluster.wait_for_leader(&[1, 2, 3], T).await;
    let all = [1, 2, 3];
    let json_of = |args: &[&str]| -> serde_json::Value {
        let mut full = vec!["--output", "json"];
        full.extend_from_slice(args);
        let out = cluster.cli(&all, &full);
        assert!(out.status.success(), "{args:?}: {}", stderr(&out));
        serde_json::from_str(&stdout(&out)).unwrap()
    };
    let history = |v: &serde_json::Value| {
        (
            v["create_revision"].as_u64().unwrap(),
            v["mod_revision"].as_u64().unwrap(),
            v["version"].as_u64().unwrap(),
            v["lease"].as_u64().unwrap(),
        )
    };

    let r1 = json_of(&["set", "h/a", "1"])["revision"].as_u64().unwrap();
    let got = json_of(&["get", "h/a"]);
    assert_eq!((got["key"].as_str(), got["value"].as_str()), (Some("h/a"), Some("1")));
    assert_eq!(history(&got), (r1, r1, 1, 0));

    let r2 = json_of(&["set", "h/a", "2"])["revision"].as_u64().unwrap();
    assert!(r2 > r1);
    assert_eq!(history(&json_of(&["get", "h/a"])), (r1, r2, 2, 0));

    // Deleted and created again: a new life, counted from 1.
    json_of(&["delete", "h/a"]);
    let r4 = json_of(&["set", "h/a", "3"])["revision"].as_u64().unwrap();
    let r5 = json_of(&["set", "h/b", "x"])["revision"].as_u64().unwrap();
    assert_eq!(history(&json_of(&["get", "h/a"])), (r4, r4, 1, 0));

    let scanned = json_of(&["scan", "--prefix", "h/"]);
    let pairs = scanned.as_array().unwrap();
    assert_eq!(pairs.len(), 2, "{scanned}");
    assert_eq!(history(&pairs[0]), (r4, r4, 1, 0));
    assert_eq!(
        (pairs[1]["key"].as_str(), history(&pairs[1])),
        (Some("h/b"), (r5, r5, 1, 0))
    );

    // The library gives the same record, through a follower too.
    let record = cluster.client(&[2]).get_record("h/a").await.unwrap().unwrap();
    assert_eq!(
        (
            record.value.as_slice(),
            record.create_revision,
            record.mod_revision,
            record.version
        ),
        (&b"3"[..], r4, r4, 1)
    );
}
