//! TLS on both ports, client identities and roles, and certificates that
//! change under a running node. Certificates come from `kvraft certs init`
//! (the CLI, as a user would run it); a second, foreign CA plays the stranger.

mod support;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kvraft::tls::client::ClientTlsOptions;
use kvraft::{Client, ClientOptions, Error};
use raft::prelude::MessageType;
use support::peer_probe::{connect, forged_append, raft_message, set_command, Probe, ProbeTls};
use support::{certs_init, kvraftd_once, stderr, Cluster};

const T: Duration = Duration::from_secs(30);

struct Pki {
    _dir: tempfile::TempDir,
    ours: PathBuf,
    foreign: PathBuf,
}

impl Pki {
    fn new(nodes: &str) -> Pki {
        let dir = tempfile::tempdir().unwrap();
        let (ours, foreign) = (dir.path().join("ours"), dir.path().join("foreign"));
        certs_init(&ours, nodes, "admin,writer,reader,stranger");
        certs_init(&foreign, nodes, "admin");
        Pki {
            _dir: dir,
            ours,
            foreign,
        }
    }

    fn file(&self, name: &str) -> String {
        self.ours.join(name).display().to_string()
    }

    /// Flags for node `id`: TLS on both ports, client certificates required,
    /// and roles for the client identities.
    fn node_flags(&self, id: u64) -> Vec<String> {
        let mut flags = support::tls_node_flags(&self.ours, id);
        flags.extend(["--client-roles".into(), "admin=admin,writer=write,reader=read".into()]);
        flags
    }

    fn client_tls(&self, identity: Option<&str>) -> ClientTlsOptions {
        ClientTlsOptions {
            ca_file: Some(self.ours.join("ca.pem")),
            cert_file: identity.map(|i| self.ours.join(format!("client-{i}.pem"))),
            key_file: identity.map(|i| self.ours.join(format!("client-{i}.key"))),
            server_name: None,
        }
    }
}

fn client(cluster: &Cluster, ids: &[u64], tls: ClientTlsOptions) -> Client {
    Client::new(ClientOptions {
        endpoints: cluster.endpoints(ids).split(',').map(String::from).collect(),
        timeout: Duration::from_secs(5),
        serializable: false,
        tls,
    })
    .unwrap()
}

fn tls_cluster(pki: &Pki, n: u64) -> Cluster {
    let mut cluster = Cluster::start_static_each(n, |id| {
        let mut flags = pki.node_flags(id);
        // 2-4 s elections: tests that check an attack moved no term must not
        // see an election of the loaded machine's own.
        flags.extend(["--election-ticks".to_string(), "80".to_string()]);
        flags
    });
    cluster.client_tls = pki.client_tls(Some("admin"));
    cluster
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_cluster_forms_serves_and_reforms_after_kill_9_of_every_node() {
    let pki = Pki::new("1=127.0.0.1,2=127.0.0.1,3=127.0.0.1");
    let mut cluster = tls_cluster(&pki, 3);
    cluster.wait_for_leader(&[1, 2, 3], T).await;
    let client = cluster.client(&[1, 2, 3]);
    let mut acked = Vec::new();
    for i in 0..50 {
        let (k, v) = (format!("k{i}"), format!("v{i}"));
        support::put(&client, &k, &v).await;
        acked.push((k, v));
    }
    let out = cluster.cli(&[1, 2, 3], &["members"]);
    assert!(out.status.success(), "{}", stderr(&out));

    for id in [1, 2, 3] {
        cluster.kill(id);
    }
    for id in [1, 2, 3] {
        cluster.start(id);
    }
    cluster.wait_for_leader(&[1, 2, 3], T).await;
    support::assert_all_readable(&cluster.client(&[1, 2, 3]), &acked).await;
    support::put(&cluster.client(&[1, 2, 3]), "after", "restart").await;
    for id in [1, 2, 3] {
        let handshakes = cluster.metric(id, "kvraft_peer_connections_refused_total", &[]);
        assert_eq!(handshakes, 0.0, "node {id}: the members never refused each other");
    }
}

/// A member restarted on an older copy of its own data dir (same
/// incarnation, so its peers let it in) has forgotten entries it
/// acknowledged. The leader's heartbeat commits past its log; over peer TLS
/// the heartbeat provably comes from the leader, so the node stops with
/// exit 78 and the procedure instead of rejoining with holes in its memory.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_restarted_on_an_older_copy_of_its_data_dir_stops_and_says_why() {
    let pki = Pki::new("1=127.0.0.1,2=127.0.0.1,3=127.0.0.1");
    let mut cluster = tls_cluster(&pki, 3);
    let leader = cluster.wait_for_leader(&[1, 2, 3], T).await;
    let victim = if leader == 3 { 2 } else { 3 };
    let client = cluster.client(&[1, 2, 3]);
    for i in 0..10 {
        support::put(&client, format!("early{i}"), "v").await;
    }
    cluster
        .wait_info(victim, T, "the victim has the early writes", |i| i.keys >= 10)
        .await;

    cluster.kill(victim);
    let data_dir = cluster.node(victim).data_dir.clone();
    let old_copy = cluster.dir.path().join("old-copy");
    let copied = std::process::Command::new("cp")
        .arg("-a")
        .arg(&data_dir)
        .arg(&old_copy)
        .status()
        .unwrap();
    assert!(copied.success());
    cluster.start(victim);
    for i in 0..200 {
        support::put(&client, format!("late{i}"), "v").await;
    }
    cluster
        .wait_info(victim, T, "the victim acknowledged the late writes", |i| i.keys >= 210)
        .await;
    assert_eq!(
        cluster.wait_for_leader(&[1, 2, 3], T).await,
        leader,
        "the leader remembers the acknowledgements"
    );

    cluster.kill(victim);
    std::fs::remove_dir_all(&data_dir).unwrap();
    std::fs::rename(&old_copy, &data_dir).unwrap();
    cluster.start(victim);
    let status = cluster
        .wait_exit(victim, T)
        .expect("the rolled-back node stops by itself");
    assert_eq!(status.code(), Some(78));
    let log = cluster.node_log(victim);
    for expect in [
        "has lost raft log entries it had acknowledged",
        &format!("kvraft remove-node {victim}"),
    ] {
        assert!(log.contains(expect), "{expect:?} missing from:\n{log}");
    }
    assert!(!log.contains("panicked"), "{log}");
    support::put(&client, "after", "ok").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_with_the_wrong_credentials_get_errors_that_say_what_to_fix() {
    let pki = Pki::new("1=127.0.0.1");
    let cluster = tls_cluster(&pki, 1);
    cluster.wait_for_leader(&[1], T).await;
    let tls_error = |result: Result<(u64, Duration), Error>| match result {
        Err(Error::Tls(message)) => message,
        other => panic!("expected a TLS error, got {other:?}"),
    };

    let plaintext = tls_error(client(&cluster, &[1], ClientTlsOptions::default()).ping().await);
    assert!(
        plaintext.contains("requires TLS") && plaintext.contains("--cacert"),
        "{plaintext}"
    );

    let no_cert = tls_error(client(&cluster, &[1], pki.client_tls(None)).ping().await);
    assert!(
        no_cert.contains("requires a client certificate") && no_cert.contains("--cert"),
        "{no_cert}"
    );

    let mut foreign_cert = pki.client_tls(None);
    foreign_cert.cert_file = Some(pki.foreign.join("client-admin.pem"));
    foreign_cert.key_file = Some(pki.foreign.join("client-admin.key"));
    let refused = tls_error(client(&cluster, &[1], foreign_cert).ping().await);
    assert!(refused.contains("refused this client's certificate"), "{refused}");

    let mut wrong_ca = pki.client_tls(Some("admin"));
    wrong_ca.ca_file = Some(pki.foreign.join("ca.pem"));
    let unknown = tls_error(client(&cluster, &[1], wrong_ca).ping().await);
    assert!(unknown.contains("not signed by the CA in --cacert"), "{unknown}");

    let mut wrong_name = pki.client_tls(Some("admin"));
    wrong_name.server_name = Some("db.example.com".into());
    let name = tls_error(client(&cluster, &[1], wrong_name).ping().await);
    assert!(
        name.contains("not valid for the name db.example.com") && name.contains("127.0.0.1"),
        "{name}"
    );

    // TLS towards a plaintext port.
    let plain = Cluster::start_static(1, &[]);
    plain.wait_for_leader(&[1], T).await;
    let to_plain = tls_error(client(&plain, &[1], pki.client_tls(Some("admin"))).ping().await);
    assert!(to_plain.contains("did not answer in TLS"), "{to_plain}");

    // The CLI: exit status 2 and the same explanation.
    let out = support::kvraft_cli(&cluster.endpoints(&[1]), &["ping"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("requires TLS"), "{}", stderr(&out));
    let out = cluster.cli(&[1], &["ping"]);
    assert!(out.status.success(), "{}", stderr(&out));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_role_may_do_what_it_should_and_a_refusal_changes_nothing() {
    let pki = Pki::new("1=127.0.0.1");
    let mut cluster = tls_cluster(&pki, 1);
    cluster.wait_for_leader(&[1], T).await;
    let admin = cluster.client(&[1]);
    let reader = client(&cluster, &[1], pki.client_tls(Some("reader")));
    let writer = client(&cluster, &[1], pki.client_tls(Some("writer")));
    let stranger = client(&cluster, &[1], pki.client_tls(Some("stranger")));
    let denied = |result: Result<(), Error>| match result {
        Err(Error::PermissionDenied(message)) => message,
        other => panic!("expected permission denied, got {other:?}"),
    };

    // read: reads and status.
    assert_eq!(reader.get("k").await.unwrap(), None);
    reader.members().await.unwrap();
    reader.info().await.unwrap();
    let message = denied(reader.set("k", "by reader").await.map(|_| ()));
    assert!(
        message.contains("\"reader\" has the role read") && message.contains("needs write"),
        "{message}"
    );
    denied(reader.delete("k").await.map(|_| ()));
    assert_eq!(admin.get("k").await.unwrap(), None, "the refused write changed nothing");

    // write: reads and writes, not membership.
    writer.set("k", "by writer").await.unwrap();
    assert_eq!(reader.get("k").await.unwrap().as_deref(), Some(&b"by writer"[..]));
    denied(writer.add_node(9, "127.0.0.1:1", "").await.map(|_| ()));
    denied(writer.remove_node(1).await.map(|_| ()));
    assert_eq!(admin.members().await.unwrap().0.len(), 1, "membership unchanged");

    // admin: everything.
    let members = admin.add_node(9, "127.0.0.1:1", "").await.unwrap();
    assert_eq!(members.len(), 2);
    assert_eq!(admin.remove_node(9).await.unwrap().len(), 1);

    // A valid certificate whose identity has no role.
    let message = denied(stranger.ping().await.map(|_| ()));
    assert!(
        message.contains("\"stranger\" is not listed in client_roles"),
        "{message}"
    );

    // The CLI exits 5 on a refusal.
    cluster.client_tls = pki.client_tls(Some("reader"));
    let out = cluster.cli(&[1], &["set", "k", "again"]);
    assert_eq!(out.status.code(), Some(5), "{}", stderr(&out));
    assert!(stderr(&out).contains("permission denied"), "{}", stderr(&out));
    assert_eq!(admin.get("k").await.unwrap().as_deref(), Some(&b"by writer"[..]));
    let refused = cluster.metric(1, "kvraft_requests_total", &[("outcome", "permission_denied")]);
    assert!(refused >= 6.0, "{refused}");
}

/// A hand-made peer on `addr`, over TLS with `cert_and_key` (if any),
/// speaking for `from_id`.
async fn tls_probe(
    addr: &str,
    ca: &Path,
    cert_and_key: Option<(&Path, &Path)>,
    cluster_id: u64,
    from_id: u64,
) -> std::io::Result<Probe> {
    let stream = connect(addr, "127.0.0.1", Some(ProbeTls { ca, cert_and_key })).await?;
    Ok(Probe {
        stream,
        cluster_id,
        from_id,
    })
}

/// Says hello and sends the MsgAppend that once made a follower apply
/// `injected=evil`, as `leader` to `follower`; errors are the node's refusal.
async fn try_injecting(p: &mut Probe, leader: u64, follower: u64, term: u64, last_index: u64) {
    let _ = p.hello().await;
    let forged = forged_append(leader, follower, term, last_index, set_command("injected", "evil"));
    let _ = p.send(&forged).await;
}

fn peer_addr(cluster: &Cluster, id: u64) -> String {
    cluster.nodes.iter().find(|n| n.id == id).unwrap().peer_addr.clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peer_attacks_over_tls_are_refused_before_raft_and_a_foreign_node_cannot_join() {
    let pki = Pki::new("1=127.0.0.1,2=127.0.0.1,3=127.0.0.1,4=127.0.0.1,99=127.0.0.1");
    let mut cluster = tls_cluster(&pki, 3);
    let leader = cluster.wait_for_leader(&[1, 2, 3], T).await;
    support::put(&cluster.client(&[1, 2, 3]), "k", "v").await;
    let before = cluster.info(leader).await.unwrap();
    let (term, cluster_id) = (before.term, before.cluster_id);
    let follower = [1, 2, 3].into_iter().find(|id| *id != leader).unwrap();
    let other = [1, 2, 3]
        .into_iter()
        .find(|id| *id != leader && *id != follower)
        .unwrap();
    let addr = peer_addr(&cluster, follower);
    let ca = pki.ours.join("ca.pem");
    let own = |name: &str| pki.ours.join(name);

    // Plaintext on a TLS peer port: told why, nothing else.
    let mut p = Probe {
        stream: connect(&addr, "127.0.0.1", None).await.unwrap(),
        cluster_id,
        from_id: leader,
    };
    p.hello().await.unwrap();
    let rejection = p.reply(T).await.unwrap().expect("a rejection");
    assert!(rejection.message.contains("requires TLS"), "{}", rejection.message);

    // No certificate, a foreign CA's node certificate, a client certificate.
    let node_cert = format!("node-{leader}.pem");
    let node_key = format!("node-{leader}.key");
    let foreign_cert = pki.foreign.join(&node_cert);
    let foreign_key = pki.foreign.join(&node_key);
    let (admin_cert, admin_key) = (own("client-admin.pem"), own("client-admin.key"));
    for cert_and_key in [
        None,
        Some((foreign_cert.as_path(), foreign_key.as_path())),
        Some((admin_cert.as_path(), admin_key.as_path())),
    ] {
        if let Ok(mut p) = tls_probe(&addr, &ca, cert_and_key, cluster_id, leader).await {
            try_injecting(&mut p, leader, follower, term, 100).await;
            assert!(p.reply(T).await.is_ok(), "the node closes the connection");
        }
    }

    // A client certificate from our CA that carries the leader's name.
    let (impostor_cert, impostor_key) = client_certificate_named(&pki, &kvraft::tls::node_common_name(leader));
    let mut p = tls_probe(&addr, &ca, Some((&impostor_cert, &impostor_key)), cluster_id, leader)
        .await
        .unwrap();
    try_injecting(&mut p, leader, follower, term, 100).await;
    assert_eq!(
        p.reply(T).await,
        Ok(None),
        "a client certificate does not speak for a node"
    );

    // A real node's certificate (node `other`) claiming to be the leader, with
    // the MsgAppend that once made a follower apply `injected=evil`.
    let (other_cert, other_key) = (own(&format!("node-{other}.pem")), own(&format!("node-{other}.key")));
    let last = cluster.info(follower).await.unwrap().last_index;
    let mut p = tls_probe(&addr, &ca, Some((&other_cert, &other_key)), cluster_id, leader)
        .await
        .unwrap();
    try_injecting(&mut p, leader, follower, term, last).await;
    assert_eq!(p.reply(T).await, Ok(None), "closed without a word");

    // The same certificate speaking as itself, but the message claims the
    // leader. The follower keeps one session per peer: node `other`'s own
    // connection, closed by this one, reconnects within ~20 ms and closes
    // this one in turn, which on a busy machine can come before these frames
    // are read. So send again, on a new connection, until the follower has
    // counted both refusals.
    let refused_messages =
        |reason: &str| cluster.metric(follower, "kvraft_peer_messages_refused_total", &[("reason", reason)]);
    let deadline = Instant::now() + T;
    while refused_messages("sender_mismatch") < 1.0 || refused_messages("impossible_value") < 1.0 {
        assert!(
            Instant::now() < deadline,
            "the follower never refused the forged messages (sender_mismatch {}, impossible_value {})",
            refused_messages("sender_mismatch"),
            refused_messages("impossible_value")
        );
        let mut p = tls_probe(&addr, &ca, Some((&other_cert, &other_key)), cluster_id, other)
            .await
            .unwrap();
        p.hello().await.unwrap();
        let _ = p
            .send(&forged_append(
                leader,
                follower,
                term,
                last,
                set_command("injected", "evil"),
            ))
            .await;
        let _ = p
            .send(&raft_message(MessageType::MsgHeartbeat, other, follower, u64::MAX))
            .await;
        // Polled, not waited on: the refusals are counted as the frames are read.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // A certificate from our CA for a node that is not a member, heartbeating
    // with a higher term every 200 ms (which once kept a cluster leaderless).
    let (cert99, key99) = (own("node-99.pem"), own("node-99.key"));
    for _ in 0..5 {
        for target in [1, 2, 3] {
            let addr = peer_addr(&cluster, target);
            let mut p = tls_probe(&addr, &ca, Some((&cert99, &key99)), cluster_id, 99)
                .await
                .unwrap();
            p.hello().await.unwrap();
            let _ = p
                .send(&raft_message(MessageType::MsgHeartbeat, 99, target, term + 1))
                .await;
            assert_eq!(p.reply(T).await, Ok(None), "a non-member is dropped without a reply");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // Everyone still agrees, and nothing was injected.
    support::put(&cluster.client(&[1, 2, 3]), "after", "attacks").await;
    let commit = cluster.info(leader).await.unwrap().commit_index;
    for id in [1, 2, 3] {
        let info = cluster
            .wait_info(id, T, "caught up", |i| i.applied_index >= commit)
            .await;
        assert_eq!((info.term, info.leader_id), (term, leader), "node {id}");
        let local = cluster.client_with(&[id], T, true);
        assert_eq!(local.get("injected").await.unwrap(), None, "node {id}");
        assert_eq!(
            local.get("after").await.unwrap().as_deref(),
            Some(&b"attacks"[..]),
            "node {id}"
        );
    }
    let refusals =
        |reason: &str| cluster.metric(follower, "kvraft_peer_connections_refused_total", &[("reason", reason)]);
    assert!(refusals("tls_required") >= 1.0);
    assert!(refusals("tls_handshake") >= 2.0, "no certificate, foreign CA");
    assert!(refusals("not_a_node_certificate") >= 2.0, "a client certificate, twice");
    assert!(refusals("certificate_mismatch") >= 1.0);
    assert!(refusals("not_member") >= 5.0);
    let messages = |reason: &str| cluster.metric(follower, "kvraft_peer_messages_refused_total", &[("reason", reason)]);
    assert!(messages("sender_mismatch") >= 1.0);
    assert!(messages("impossible_value") >= 1.0);

    // A node with certificates from another CA is added but never gets in.
    let foreign = |name: &str| pki.foreign.join(name).display().to_string();
    let node4 = cluster.add_node(
        4,
        None,
        [
            "--join",
            "--cert-file",
            &foreign("node-4.pem"),
            "--key-file",
            &foreign("node-4.key"),
            "--peer-cert-file",
            &foreign("node-4.pem"),
            "--peer-key-file",
            &foreign("node-4.key"),
            "--peer-trusted-ca-file",
            &foreign("ca.pem"),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect(),
    );
    let (peer4, metrics4) = (node4.peer_addr.clone(), node4.metrics_addr.clone());
    cluster.start(4);
    let admin = cluster.client(&[1, 2, 3]);
    admin.add_node(4, &peer4, "").await.unwrap();
    support::eventually(T, "the leader fails to reach node 4", || {
        let failures = cluster.metric(leader, "kvraft_peer_send_failures_total", &[("peer", "4")]);
        async move { failures >= 3.0 }
    })
    .await;
    let (_, metrics) = support::http_get(&metrics4, "/metrics").unwrap();
    assert_eq!(support::metric_sum(&metrics, "kvraft_applied_index", &[]), Some(0.0));
    assert_eq!(support::metric_sum(&metrics, "kvraft_has_leader", &[]), Some(0.0));
    support::put(&admin, "with node 4 added", "still writes").await;
    let members = admin.members().await.unwrap().0;
    assert!(members
        .iter()
        .any(|m| m.id == 4 && m.role == kvraft::proto::MemberRole::Learner as i32));
    admin.remove_node(4).await.unwrap();
    assert_eq!(cluster.wait_for_leader(&[1, 2, 3], T).await, leader);
}

/// The certificate a TLS server presents on `addr`.
async fn presented_certificate(addr: &str, ca: &Path) -> Vec<u8> {
    kvraft::tls::install_crypto_provider();
    let roots = kvraft::tls::files::load_roots(&kvraft::tls::files::Setting::new("ca", ca)).unwrap();
    let config = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let stream = connector
        .connect(kvraft::tls::server_name_of(addr).unwrap(), tcp)
        .await
        .unwrap();
    stream.get_ref().1.peer_certificates().unwrap()[0].to_vec()
}

/// Writes a new certificate and key for node 1 (same CA) over `cert`/`key`.
fn renew(pki: &Pki, cert: &Path, key: &Path) {
    let scratch = tempfile::tempdir().unwrap();
    for name in ["ca.pem", "ca.key"] {
        std::fs::copy(pki.ours.join(name), scratch.path().join(name)).unwrap();
    }
    certs_init(scratch.path(), "1=127.0.0.1", "");
    // Not atomic on purpose: a reload may see the new certificate with the
    // old key for a moment, and must keep the old pair until both are new.
    std::fs::copy(scratch.path().join("node-1.pem"), cert).unwrap();
    std::fs::copy(scratch.path().join("node-1.key"), key).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_are_reloaded_without_a_restart_and_a_bad_file_keeps_the_old_one() {
    let pki = Pki::new("1=127.0.0.1");
    let live = tempfile::tempdir().unwrap();
    let (cert, key) = (live.path().join("node.pem"), live.path().join("node.key"));
    std::fs::copy(pki.ours.join("node-1.pem"), &cert).unwrap();
    std::fs::copy(pki.ours.join("node-1.key"), &key).unwrap();
    let flags: Vec<String> = [
        "--cert-file",
        cert.to_str().unwrap(),
        "--key-file",
        key.to_str().unwrap(),
        "--metrics-tls",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let mut cluster = Cluster::start_static_each(1, |_| flags.clone());
    cluster.client_tls = pki.client_tls(None);
    cluster.wait_for_leader(&[1], T).await;
    let addr = cluster.nodes[0].client_addr.clone();
    let ca = pki.ours.join("ca.pem");
    let first = presented_certificate(&addr, &ca).await;

    // A renewed certificate is picked up by the next connections.
    renew(&pki, &cert, &key);
    let deadline = Instant::now() + T;
    let second = loop {
        let now = presented_certificate(&addr, &ca).await;
        if now != first {
            break now;
        }
        assert!(Instant::now() < deadline, "the new certificate was never served");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };

    // A broken file is refused; the previous certificate stays in use.
    std::fs::write(&cert, "not a certificate").unwrap();
    assert_eq!(presented_certificate(&addr, &ca).await, second);
    cluster.client(&[1]).set("k", "served").await.unwrap();
    let pid = cluster.nodes[0].pid().unwrap();
    assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGHUP) }, 0);
    support::eventually(T, "SIGHUP reports the bad file", || {
        let log = cluster.node_log(1);
        async move { log.contains("SIGHUP: client TLS not reloaded") && log.contains("PEM") }
    })
    .await;
    assert_eq!(presented_certificate(&addr, &ca).await, second);

    // Fixed, and reloaded by SIGHUP.
    renew(&pki, &cert, &key);
    assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGHUP) }, 0);
    support::eventually(T, "the third certificate is served", || {
        let addr = addr.clone();
        let (ca, second) = (ca.clone(), second.clone());
        async move { presented_certificate(&addr, &ca).await != second }
    })
    .await;
    assert_eq!(
        cluster.client(&[1]).get("k").await.unwrap().as_deref(),
        Some(&b"served"[..])
    );

    // /metrics over HTTPS, with the reload failures counted.
    let metrics_addr = cluster.nodes[0].metrics_addr.clone();
    let body = https_get(&metrics_addr, &ca, "/metrics").await;
    let failed = support::metric_sum(&body, "kvraft_tls_reloads_total", &[("outcome", "failed")]).unwrap();
    assert!(failed >= 1.0, "{failed}");
    assert!(cluster.node(1).is_running());
}

async fn https_get(addr: &str, ca: &Path, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    kvraft::tls::install_crypto_provider();
    let roots = kvraft::tls::files::load_roots(&kvraft::tls::files::Setting::new("ca", ca)).unwrap();
    let config = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut stream = connector
        .connect(kvraft::tls::server_name_of(addr).unwrap(), tcp)
        .await
        .unwrap();
    stream
        .write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut response = String::new();
    let _ = stream.read_to_string(&mut response).await;
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    response.split_once("\r\n\r\n").unwrap().1.to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_tls_settings_and_files_are_refused_at_start_with_the_reason() {
    let pki = Pki::new("1=127.0.0.1,2=127.0.0.1");
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("d");
    let base = [
        "--data-dir",
        data.to_str().unwrap(),
        "--client-addr",
        "127.0.0.1:0",
        "--peer-addr",
        "127.0.0.1:0",
    ];
    let expired = expired_certificate(&pki, dir.path());
    let (n1, k1, k2, ca) = (
        pki.file("node-1.pem"),
        pki.file("node-1.key"),
        pki.file("node-2.key"),
        pki.file("ca.pem"),
    );
    let n2 = pki.file("node-2.pem");
    let missing = dir.path().join("missing.pem").display().to_string();
    let cases: Vec<(Vec<&str>, i32, &str)> = vec![
        (
            vec!["--cert-file", &n1],
            78,
            "cert_file (from command-line flag) needs key_file too",
        ),
        (
            vec!["--peer-cert-file", &n1, "--peer-key-file", &k1],
            78,
            "peer_cert_file (from command-line flag) needs peer_trusted_ca_file too",
        ),
        (
            vec!["--client-roles", "a=admin"],
            78,
            "client_roles (from command-line flag) needs client_cert_auth",
        ),
        (
            vec!["--cert-file", &n1, "--key-file", &k1, "--client-cert-auth"],
            78,
            "client_cert_auth (from command-line flag) needs trusted_ca_file",
        ),
        (vec!["--cert-file", &missing, "--key-file", &k1], 78, "cert_file"),
        (
            vec!["--cert-file", &n1, "--key-file", &k2],
            78,
            "does not belong to the private key in key_file",
        ),
        (vec!["--cert-file", &expired, "--key-file", &k1], 78, "expired on"),
        (
            vec![
                "--peer-cert-file",
                &n2,
                "--peer-key-file",
                &k2,
                "--peer-trusted-ca-file",
                &ca,
            ],
            78,
            "but this is node 1",
        ),
        (
            vec![
                "--cert-file",
                &n1,
                "--key-file",
                &k1,
                "--trusted-ca-file",
                &k1,
                "--client-cert-auth",
            ],
            78,
            "trusted_ca_file",
        ),
    ];
    for (flags, code, expect) in cases {
        let mut args: Vec<&str> = base.to_vec();
        args.extend(flags.iter());
        let out = kvraftd_once(&args, T);
        assert_eq!(out.status.code(), Some(code), "{flags:?}: {}", stderr(&out));
        assert!(stderr(&out).contains(expect), "{flags:?}: {}", stderr(&out));
    }
}

/// A client-only certificate (clientAuth) with this common name, signed by
/// our CA, as a careless PKI might issue: written next to the others.
fn client_certificate_named(pki: &Pki, common_name: &str) -> (PathBuf, PathBuf) {
    let ca_key = rcgen::KeyPair::from_pem(&std::fs::read_to_string(pki.ours.join("ca.key")).unwrap()).unwrap();
    let issuer =
        rcgen::Issuer::from_ca_cert_pem(&std::fs::read_to_string(pki.ours.join("ca.pem")).unwrap(), ca_key).unwrap();
    let key_pair = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.distinguished_name.push(rcgen::DnType::CommonName, common_name);
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    let cert = params.signed_by(&key_pair, &issuer).unwrap();
    let (cert_path, key_path) = (pki.ours.join("impostor.pem"), pki.ours.join("impostor.key"));
    std::fs::write(&cert_path, cert.pem()).unwrap();
    std::fs::write(&key_path, key_pair.serialize_pem()).unwrap();
    (cert_path, key_path)
}

/// A certificate for node 1 that expired yesterday, signed by our CA.
fn expired_certificate(pki: &Pki, dir: &Path) -> String {
    let key_pair = rcgen::KeyPair::from_pem(&std::fs::read_to_string(pki.ours.join("node-1.key")).unwrap()).unwrap();
    let ca_key = rcgen::KeyPair::from_pem(&std::fs::read_to_string(pki.ours.join("ca.key")).unwrap()).unwrap();
    let issuer =
        rcgen::Issuer::from_ca_cert_pem(&std::fs::read_to_string(pki.ours.join("ca.pem")).unwrap(), ca_key).unwrap();
    let mut params = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()]).unwrap();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "kvraft-node-1");
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::days(30);
    params.not_after = now - time::Duration::days(1);
    let cert = params.signed_by(&key_pair, &issuer).unwrap();
    let path = dir.join("expired.pem");
    std::fs::write(&path, cert.pem()).unwrap();
    path.display().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_warns_when_its_peer_port_faces_a_network_without_tls() {
    let mut cluster = Cluster::empty();
    let port = support::free_port();
    cluster.add_node(
        1,
        Some(format!("127.0.0.1:{port}")),
        vec![
            "--peer-addr".into(),
            format!("0.0.0.0:{port}"),
            "--advertise-peer-addr".into(),
            format!("127.0.0.1:{port}"),
        ],
    );
    cluster.start(1);
    cluster.wait_for_leader(&[1], T).await;
    let log = cluster.node_log(1);
    assert!(log.contains("peer TLS is off on a non-loopback address"), "{log}");
    assert!(
        log.contains("anyone who can send from a member's address can speak for it"),
        "{log}"
    );

    // On loopback there is nothing to warn about.
    let quiet = Cluster::start_static(1, &[]);
    quiet.wait_for_leader(&[1], T).await;
    assert!(!quiet.node_log(1).contains("peer TLS is off"));
}
