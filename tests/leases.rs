//! Leases on real clusters: expiry deletes the attached keys (and watchers
//! see it), keepalive keeps them, revoke ends them, a leader change never
//! ends one early, and bad input gets a clear error.

mod support;

use std::time::{Duration, Instant};

use kvraft::proto::{watch_event, KeyRange};
use kvraft::{Client, LeaseState, WatchOptions, WatchUpdate};
use support::{eventually, stderr, stdout, Cluster};

const T: Duration = Duration::from_secs(30);

fn json(out: &std::process::Output) -> serde_json::Value {
    assert!(out.status.success(), "{}", stderr(out));
    serde_json::from_str(stdout(out).trim()).unwrap_or_else(|e| panic!("{e}: {}", stdout(out)))
}

/// Whether `key` exists, read linearizably (`None`: the cluster did not
/// answer, as during an election).
async fn exists(client: &Client, key: &str) -> Option<bool> {
    client.get(key).await.ok().map(|v| v.is_some())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_lease_deletes_its_keys_in_one_revision_and_watchers_see_it() {
    let cluster = Cluster::start_static(3, &[]);
    let ids = [1, 2, 3];
    let leader = cluster.wait_for_leader(&ids, T).await;
    let follower = ids.into_iter().find(|id| *id != leader).unwrap();
    let client = cluster.client(&ids);
    // A follower serves the watch: it learns of the expiry from the log.
    let mut watcher = cluster
        .client(&[follower])
        .watch(WatchOptions {
            range: Some(KeyRange::prefix("svc/")),
            ..Default::default()
        })
        .await
        .unwrap();

    let sent = Instant::now();
    // Below the minimum (twice the longest election timeout: 1 s with the
    // tests' timing, 2 s with the defaults), so raised to it.
    let lease = client.lease_grant(0).await.err().map(|e| e.to_string());
    assert!(lease.unwrap().contains("1 to 31536000 seconds"));
    let lease = client.lease_grant(1).await.unwrap();
    assert_eq!(lease.ttl, 1);
    client.set_with_lease("svc/a", "1", lease.id).await.unwrap();
    client.set_with_lease("svc/b", "1", lease.id).await.unwrap();
    client.set("svc/plain", "1").await.unwrap();
    let record = client.get_record("svc/a").await.unwrap().unwrap();
    assert_eq!(record.lease, lease.id);

    // Two puts with the lease, one without, then both leased keys deleted
    // at one revision, no earlier than the lease's time to live.
    let mut deletes = Vec::new();
    let deadline = Instant::now() + T;
    while deletes.len() < 2 {
        let left = deadline.saturating_duration_since(Instant::now());
        let update = tokio::time::timeout(left, watcher.next())
            .await
            .expect("the leased keys were never deleted")
            .expect("the watch ended")
            .expect("the watch failed");
        if let WatchUpdate::Events { events, .. } = update {
            for e in events.iter().filter(|e| e.r#type == watch_event::Type::Delete as i32) {
                let kv = e.kv.clone().unwrap();
                deletes.push((String::from_utf8(kv.key).unwrap(), kv.mod_revision));
            }
        }
    }
    let deleted_at = sent.elapsed();
    assert!(
        deleted_at >= Duration::from_secs(lease.ttl),
        "deleted {deleted_at:?} after the grant was sent, before its TTL of {}s",
        lease.ttl
    );
    assert_eq!(deletes[0].0, "svc/a");
    assert_eq!(deletes[1].0, "svc/b");
    assert_eq!(deletes[0].1, deletes[1].1, "one revision: {deletes:?}");
    assert_eq!(client.get("svc/a").await.unwrap(), None);
    assert_eq!(client.get("svc/plain").await.unwrap().unwrap(), b"1");

    let out = cluster.cli(&ids, &["lease", "ttl", &lease.id.to_string()]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("not found"), "{}", stderr(&out));
    let out = cluster.cli(&ids, &["set", "svc/late", "x", "--lease", &lease.id.to_string()]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("expired or was revoked"), "{}", stderr(&out));
    assert_eq!(client.get("svc/late").await.unwrap(), None, "nothing applied");
    // Applied once on each node.
    eventually(T, "each node to count the expiry", || async {
        ids.iter()
            .map(|id| cluster.metric(*id, "kvraft_leases_expired_total", &[]))
            .sum::<f64>()
            == 3.0
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keepalive_keeps_a_lease_and_revoke_ends_it_from_the_cli() {
    let cluster = Cluster::start_static(3, &[]);
    let ids = [1, 2, 3];
    cluster.wait_for_leader(&ids, T).await;
    let client = cluster.client(&ids);

    let granted = json(&cluster.cli(&ids, &["--output", "json", "lease", "grant", "2"]));
    let id = granted["id"].as_u64().unwrap();
    assert_eq!(granted["ttl"].as_u64(), Some(2));
    let text = stdout(&cluster.cli(&ids, &["lease", "grant", "30"]));
    assert!(
        text.starts_with("lease ") && text.contains("granted with TTL 30s"),
        "{text}"
    );
    let other: u64 = text.split(' ').nth(1).unwrap().parse().unwrap();
    let out = cluster.cli(&ids, &["set", "held", "v", "--lease", &id.to_string()]);
    assert!(out.status.success(), "{}", stderr(&out));
    cluster.cli(&ids, &["set", "held/2", "v", "--lease", &id.to_string()]);

    // Kept alive by a keeper task for three times its TTL: this test's
    // subject is time passing, so it waits (and checks all along).
    let mut keeper = client.keep_alive(kvraft::Lease { id, ttl: 2 });
    let until = Instant::now() + Duration::from_secs(6);
    while Instant::now() < until {
        assert_eq!(client.get("held").await.unwrap().unwrap(), b"v");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(
        matches!(keeper.state(), LeaseState::Alive { ttl: 2, .. }),
        "{:?}",
        keeper.state()
    );

    let once = json(&cluster.cli(
        &ids,
        &["--output", "json", "lease", "keepalive", &id.to_string(), "--once"],
    ));
    assert_eq!((once["id"].as_u64(), once["ttl"].as_u64()), (Some(id), Some(2)));
    let ttl = json(&cluster.cli(&ids, &["--output", "json", "lease", "ttl", &id.to_string(), "--keys"]));
    assert_eq!(ttl["granted_ttl"].as_u64(), Some(2));
    assert!(ttl["ttl"].as_u64().unwrap() <= 2, "{ttl}");
    assert_eq!(ttl["keys"], serde_json::json!(["held", "held/2"]));
    assert_eq!(ttl["key_count"].as_u64(), Some(2));
    let text = stdout(&cluster.cli(&ids, &["lease", "ttl", &id.to_string(), "--keys"]));
    assert!(text.contains("2 keys attached: held, held/2"), "{text}");
    let list = json(&cluster.cli(&ids, &["--output", "json", "lease", "list"]));
    assert_eq!(list["ids"], serde_json::json!([id, other]));

    // Revoked: its keys go at once, and the keeper learns it.
    let revoked = json(&cluster.cli(&ids, &["--output", "json", "lease", "revoke", &id.to_string()]));
    assert_eq!(revoked["deleted"].as_u64(), Some(2));
    assert_eq!(client.get("held").await.unwrap(), None);
    let why = tokio::time::timeout(T, keeper.lost())
        .await
        .expect("the keeper never noticed");
    assert!(why.contains("not found"), "{why}");
    let out = cluster.cli(&ids, &["lease", "revoke", &id.to_string()]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let out = cluster.cli(&ids, &["lease", "keepalive", &id.to_string()]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "keepalive ends once the lease is gone: {}",
        stderr(&out)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_never_ends_early_across_leader_kills() {
    let mut cluster = Cluster::start_static(3, &[]);
    let ids = [1, 2, 3];
    cluster.wait_for_leader(&ids, T).await;
    let client = cluster.client(&ids);
    let lease = client.lease_grant(6).await.unwrap();
    client.set_with_lease("leader-key", "v", lease.id).await.unwrap();

    for round in 0..2 {
        // Renewed; then the leader that renewed it dies. Whoever leads next
        // must give the lease its whole TTL again, so the key outlives the
        // renewal by at least that, whatever the failover costs.
        let renewed_at = Instant::now();
        let ttl = client.lease_keep_alive_once(lease.id).await.unwrap();
        assert_eq!(ttl, 6);
        let leader = cluster.wait_for_leader(&ids, T).await;
        cluster.kill(leader);
        let promised = renewed_at + Duration::from_secs(ttl);
        let mut checked = 0;
        while Instant::now() + Duration::from_secs(1) < promised {
            if let Some(present) = exists(&client, "leader-key").await {
                assert!(
                    present,
                    "round {round}: the key went before its lease's TTL from the last renewal"
                );
                checked += 1;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        assert!(checked > 0, "round {round}: the cluster never answered during the TTL");
        cluster.start(leader);
    }
    // Left alone, it does end.
    eventually(T, "the lease to expire", || async {
        exists(&client, "leader-key").await == Some(false)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_lease_input_gets_a_clear_error() {
    let cluster = Cluster::start_static(1, &[]);
    cluster.wait_for_leader(&[1], T).await;
    let cases: &[(&[&str], i32, &str)] = &[
        (&["lease", "grant", "0"], 2, "1 to 31536000 seconds"),
        (&["lease", "grant", "99999999999"], 2, "1 to 31536000 seconds"),
        (&["lease", "grant", "ten"], 2, "invalid digit"),
        (&["lease", "keepalive", "0"], 2, "lease id 0 means no lease"),
        (&["lease", "revoke", "424242"], 1, "lease 424242 not found"),
        (&["lease", "ttl", "424242"], 1, "lease 424242 not found"),
        (&["set", "k", "v", "--lease", "424242"], 1, "lease 424242 not found"),
        (
            &["cas", "k", "v", "--expect-absent", "--lease", "424242"],
            1,
            "lease 424242 not found",
        ),
    ];
    for (args, code, says) in cases {
        let out = cluster.cli(&[1], args);
        assert_eq!(out.status.code(), Some(*code), "{args:?}: {}", stderr(&out));
        assert!(stderr(&out).contains(says), "{args:?}: {}", stderr(&out));
    }
    let txn = br#"{"success": [{"put": {"key": "k", "value": "v", "lease": 424242}}]}"#;
    let out = cluster.cli_with_stdin(&[1], &["txn"], txn);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert_eq!(
        cluster.client(&[1]).get("k").await.unwrap(),
        None,
        "nothing was applied"
    );
}
