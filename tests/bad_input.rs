//! Bad input gets a clear error and changes nothing: malformed and oversized
//! frames, empty and over-limit keys and values, bad flags, and data dirs that
//! belong to another node or cluster.

mod support;

use std::time::Duration;

use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use kvraft::proto::{request, response, ErrorCode, PingRequest, Request, Response};
use kvraft::Error;
use prost::Message;
use support::{kvraftd_once, stderr, Cluster};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

const T: Duration = Duration::from_secs(20);

fn error_of(response: &Response) -> (ErrorCode, String) {
    match &response.result {
        Some(response::Result::Error(e)) => (ErrorCode::try_from(e.code).unwrap(), e.message.clone()),
        other => panic!("expected an error, got {other:?}"),
    }
}

async fn read_response<S>(frames: &mut S) -> Response
where
    S: futures::Stream<Item = std::io::Result<bytes::BytesMut>> + Unpin,
{
    let frame = tokio::time::timeout(T, frames.next()).await.unwrap().unwrap().unwrap();
    Response::decode(frame).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_protobuf_gets_an_error_and_the_connection_survives() {
    let cluster = Cluster::start_static(1, &[]);
    cluster.wait_for_leader(&[1], T).await;
    let stream = TcpStream::connect(&cluster.nodes[0].client_addr).await.unwrap();
    let mut frames = kvraft::codec::framed(stream, kvraft::codec::CLIENT_MAX_FRAME);

    frames
        .send(Bytes::from_static(b"\xff\xff\xff\xff not protobuf"))
        .await
        .unwrap();
    let (code, message) = error_of(&read_response(&mut frames).await);
    assert_eq!(code, ErrorCode::MalformedRequest);
    assert!(message.contains("kvraft.Request"), "{message}");

    // A well-formed request with no command.
    frames
        .send(kvraft::codec::encode(&Request {
            id: 7,
            command: None,
            ..Default::default()
        }))
        .await
        .unwrap();
    let response = read_response(&mut frames).await;
    assert_eq!(response.id, 7);
    assert_eq!(error_of(&response).0, ErrorCode::MalformedRequest);

    // Framing is intact, so the same connection still works.
    let ping = Request {
        id: 8,
        command: Some(request::Command::Ping(PingRequest {})),
        ..Default::default()
    };
    frames.send(kvraft::codec::encode(&ping)).await.unwrap();
    let response = read_response(&mut frames).await;
    assert_eq!(response.id, 8);
    assert!(matches!(response.result, Some(response::Result::Ping(p)) if p.node_id == 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_frame_is_refused_before_it_is_read() {
    let cluster = Cluster::start_static(
        1,
        &[
            "--max-frame-size",
            "65536",
            "--max-value-size",
            "1024",
            "--max-key-size",
            "64",
        ],
    );
    cluster.wait_for_leader(&[1], T).await;
    let mut stream = TcpStream::connect(&cluster.nodes[0].client_addr).await.unwrap();
    // Announce 100 MiB; send only the header.
    stream.write_all(&(100u32 << 20).to_be_bytes()).await.unwrap();
    let mut frames = kvraft::codec::framed(stream, kvraft::codec::CLIENT_MAX_FRAME);
    let (code, message) = error_of(&read_response(&mut frames).await);
    assert_eq!(code, ErrorCode::FrameTooLarge);
    assert!(message.contains("65536"), "{message}");
    let closed = tokio::time::timeout(T, frames.next()).await.unwrap();
    assert!(
        closed.is_none() || closed.unwrap().is_err(),
        "the connection is closed after"
    );

    // Through the client library, a too-large request is a caller error too.
    let client = cluster.client(&[1]);
    let err = client.set("big", vec![b'x'; 100_000]).await.unwrap_err();
    assert!(
        matches!(&err, Error::InvalidArgument(m) if m.contains("--max-frame-size")),
        "{err}"
    );
    assert_eq!(client.get("big").await.unwrap(), None, "nothing was written");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn empty_and_over_limit_keys_and_values_are_rejected_and_change_nothing() {
    let cluster = Cluster::start_static(3, &["--max-value-size", "1024", "--max-key-size", "64"]);
    cluster.wait_for_leader(&[1, 2, 3], T).await;
    let client = cluster.client(&[1, 2, 3]);
    support::put(&client, "present", "1").await;
    let before = cluster.info(1).await.unwrap();

    let cases: Vec<(Vec<u8>, Vec<u8>, &str)> = vec![
        (vec![], b"v".to_vec(), "empty"),
        (vec![b'k'; 65], b"v".to_vec(), "--max-key-size"),
        (b"k".to_vec(), vec![b'v'; 1025], "--max-value-size"),
    ];
    for (key, value, expect) in cases {
        let err = client.set(key.clone(), value).await.unwrap_err();
        assert!(matches!(&err, Error::InvalidArgument(m) if m.contains(expect)), "{err}");
        assert_eq!(err.exit_code(), 2);
    }
    assert!(matches!(client.get(Vec::new()).await, Err(Error::InvalidArgument(_))));
    assert!(matches!(
        client.delete(vec![b'k'; 65]).await,
        Err(Error::InvalidArgument(_))
    ));
    // Exactly at the limits is fine.
    support::put(&client, vec![b'k'; 64], vec![b'v'; 1024]).await;
    client.delete(vec![b'k'; 64]).await.unwrap();

    let after = cluster.info(1).await.unwrap();
    assert_eq!(after.keys, before.keys, "no rejected request changed the map");
    let out = cluster.cli(&[1, 2, 3], &["set", "", "v"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("key is empty"), "{}", stderr(&out));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_cli_usage_exits_2_with_a_reason() {
    for (args, expect) in [
        (vec!["frobnicate"], "unrecognized subcommand"),
        (vec!["--timeout", "5parsecs", "get", "k"], "unknown unit"),
        (vec!["--output", "yaml", "get", "k"], "invalid value"),
        (vec!["set", "only-a-key"], "VALUE"),
        (vec!["--endpoints", "nohostport", "get", "k"], "HOST:PORT"),
        (vec!["bench", "put", "--clients", "0"], "at least 1"),
    ] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_kvraft"))
            .args(&args)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", stderr(&out));
        assert!(stderr(&out).contains(expect), "{args:?}: {}", stderr(&out));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_daemon_flags_name_what_is_wrong() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("d");
    let data = data.to_str().unwrap();
    let cases: Vec<(Vec<&str>, i32, &str)> = vec![
        (
            vec!["--id", "0"],
            78,
            "id (from command-line flag) must be a positive integer",
        ),
        (vec!["--id", "x"], 2, "invalid value"),
        (
            vec!["--initial-cluster", "1=nohost"],
            78,
            "initial_cluster (from command-line flag) entry \"1=nohost\"",
        ),
        (vec!["--initial-cluster", "1=a:1,1=b:2"], 78, "twice"),
        (vec!["--client-addr", "127.0.0.1"], 78, "client_addr"),
        (vec!["--election-ticks", "1"], 78, "election_ticks"),
        (vec!["--join", "--initial-cluster", "1=a:1"], 78, "exclude each other"),
        (vec!["--no-such-flag"], 2, "unexpected argument"),
        (
            vec!["--client-addr", "0.0.0.0:7379"],
            78,
            "client_addr (from command-line flag) \"0.0.0.0:7379\" listens on every interface, so it needs advertise_client_addr",
        ),
        (
            vec!["--peer-addr", "[::]:7380", "--advertise-client-addr", "h:1"],
            78,
            "peer_addr (from command-line flag) \"[::]:7380\" listens on every interface, so it needs advertise_peer_addr",
        ),
        (
            vec![
                "--peer-addr",
                "127.0.0.1:7380",
                "--initial-cluster",
                "1=127.0.0.2:7380,2=127.0.0.1:7381",
            ],
            78,
            "gives node 1 the peer address 127.0.0.2:7380, but this node advertises 127.0.0.1:7380",
        ),
        (
            vec![
                "--advertise-peer-addr",
                "node1:7380",
                "--initial-cluster",
                "1=node1:7381",
            ],
            78,
            "gives node 1 the peer address node1:7381, but this node advertises node1:7380",
        ),
        (vec!["--initial-cluster", ""], 78, "is empty"),
        (vec!["--config", "/nonexistent/kvraft.toml"], 78, "no such file"),
        (
            vec![
                "--data-dir",
                data,
                "--client-addr",
                "127.0.0.1:0",
                "--peer-addr",
                "127.0.0.1:0",
                "--id",
                "5",
                "--initial-cluster",
                "1=127.0.0.1:1,2=127.0.0.1:2",
            ],
            78,
            "initial_cluster (from command-line flag) does not list this node (id 5)",
        ),
    ];
    for (args, code, expect) in cases {
        let out = kvraftd_once(&args, T);
        assert_eq!(out.status.code(), Some(code), "{args:?}: {}", stderr(&out));
        assert!(stderr(&out).contains(expect), "{args:?}: {}", stderr(&out));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_data_dir_of_another_node_is_refused() {
    let mut cluster = Cluster::start_static(1, &[]);
    cluster.wait_for_leader(&[1], T).await;
    support::put(&cluster.client(&[1]), "kept", "yes").await;
    cluster.kill(1);
    let data = cluster.node(1).data_dir.clone();
    let out = kvraftd_once(
        &[
            "--id",
            "2",
            "--data-dir",
            data.to_str().unwrap(),
            "--client-addr",
            "127.0.0.1:0",
            "--peer-addr",
            "127.0.0.1:0",
        ],
        T,
    );
    assert_eq!(
        out.status.code(),
        Some(78),
        "a data dir of another node is a configuration error"
    );
    assert!(stderr(&out).contains("belongs to node 1"), "{}", stderr(&out));
    // Nothing was lost: node 1 starts on it again with its data.
    cluster.start(1);
    cluster.wait_for_leader(&[1], T).await;
    assert_eq!(
        cluster.client(&[1]).get("kept").await.unwrap().as_deref(),
        Some(&b"yes"[..])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_from_another_cluster_is_refused_by_its_peers() {
    // Node 3's data dir is bootstrapped as a cluster of its own.
    let mut cluster = Cluster::empty();
    let peer3 = format!("127.0.0.1:{}", support::free_port());
    cluster.add_node(3, Some(peer3.clone()), vec![]);
    cluster.start(3);
    cluster.wait_for_leader(&[3], T).await;
    cluster.kill(3);

    // Nodes 1 and 2 form a new cluster that lists node 3 at the same address.
    let peer1 = format!("127.0.0.1:{}", support::free_port());
    let peer2 = format!("127.0.0.1:{}", support::free_port());
    let spec = format!("1={peer1},2={peer2},3={peer3}");
    cluster.add_node(1, Some(peer1), vec!["--initial-cluster".into(), spec.clone()]);
    cluster.add_node(2, Some(peer2), vec!["--initial-cluster".into(), spec]);
    cluster.start(1);
    cluster.start(2);
    cluster.start(3);
    cluster.wait_for_leader(&[1, 2], T).await;
    support::put(&cluster.client(&[1, 2]), "k", "v").await;
    support::eventually(T, "node 3 refuses the other cluster, and they hear why", || {
        let refusing = cluster.node_log(3).contains("refusing a peer");
        let told = [1, 2]
            .iter()
            .any(|id| cluster.node_log(*id).contains("a peer refused this node"));
        async move { refusing && told }
    })
    .await;
    let info3 = cluster.info(3).await.unwrap();
    assert_ne!(info3.leader_id, 1, "node 3 never joined the other cluster");
    assert_ne!(info3.leader_id, 2);
    assert_eq!(cluster.client_with(&[3], T, true).get("k").await.unwrap(), None);
}

/// Runs kvraftd on `data_dir` as the unprivileged user `nobody` (through
/// setpriv) when this test runs as root, or as ourselves otherwise.
fn kvraftd_unprivileged(data_dir: &std::path::Path) -> std::process::Output {
    let root = unsafe { libc::geteuid() } == 0;
    let mut command = if root {
        let mut c = std::process::Command::new("setpriv");
        c.args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
            .arg(env!("CARGO_BIN_EXE_kvraftd"));
        c
    } else {
        std::process::Command::new(env!("CARGO_BIN_EXE_kvraftd"))
    };
    command
        .arg("--data-dir")
        .arg(data_dir)
        .args([
            "--client-addr",
            "127.0.0.1:0",
            "--peer-addr",
            "127.0.0.1:0",
            "--metrics-addr",
            "",
        ])
        .env("NO_COLOR", "1")
        .output()
        .expect("run kvraftd (setpriv is util-linux's)")
}

#[test]
fn a_data_dir_the_user_may_not_write_is_refused_naming_the_user_the_path_and_the_setting() {
    use std::os::unix::fs::PermissionsExt;
    let root = unsafe { libc::geteuid() } == 0;
    let dir = tempfile::tempdir().unwrap();
    // The unprivileged user may reach the data dir, not necessarily use it.
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    let user = if root {
        "user nobody (uid 65534)".to_string()
    } else {
        format!("(uid {})", unsafe { libc::geteuid() })
    };
    if !root {
        std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o500)).unwrap();
    } else {
        std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o700)).unwrap();
    }
    // The data dir itself: ours (root's), 0700.
    let out = kvraftd_unprivileged(&data);
    assert_eq!(out.status.code(), Some(78), "{}", stderr(&out));
    let err = stderr(&out);
    for expect in [
        user.as_str(),
        "may not read and write",
        "data_dir, --data-dir, KVRAFT_DATA_DIR",
        "chown -R",
    ] {
        assert!(err.contains(expect), "{expect:?} missing: {err}");
    }
    assert!(err.contains(&format!("{}", data.display())), "{err}");

    if root {
        // The dir is nobody's now, but a file in it (from a run as root) is not.
        let chown = std::process::Command::new("chown")
            .args(["65534:65534"])
            .arg(&data)
            .status()
            .unwrap();
        assert!(chown.success());
        std::fs::create_dir(data.join("raft-log")).unwrap();
        std::fs::set_permissions(data.join("raft-log"), std::fs::Permissions::from_mode(0o755)).unwrap();
        let chown = std::process::Command::new("chown")
            .args(["65534:65534"])
            .arg(data.join("raft-log"))
            .status()
            .unwrap();
        assert!(chown.success());
        std::fs::write(data.join("raft-log/0000000000000001.raftlog"), b"root's").unwrap();
        std::fs::set_permissions(
            data.join("raft-log/0000000000000001.raftlog"),
            std::fs::Permissions::from_mode(0o600),
        )
        .unwrap();
        let out = kvraftd_unprivileged(&data);
        assert_eq!(out.status.code(), Some(78), "{}", stderr(&out));
        assert!(stderr(&out).contains("0000000000000001.raftlog"), "{}", stderr(&out));
        assert!(stderr(&out).contains(&user), "{}", stderr(&out));
    }
}
