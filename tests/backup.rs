//! Backup and restore: `kvraft snapshot save` from a node under write load,
//! then `kvraft snapshot restore` into a new 3-node cluster, which holds
//! every write acknowledged before the backup started; a damaged backup is
//! refused, and nothing is restored from it.

use std::collections::BTreeMap;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kvraft::client::{Client, ClientOptions};
use kvraft::config::NodeConfig;
use kvraft::server::{start, Listeners, RunningNode};
use tokio::net::TcpListener;

const T: Duration = Duration::from_secs(10);

fn cli(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_kvraft")).args(args).output().unwrap()
}

/// `kvraft --output json snapshot restore BACKUP --data-dir DIR --id ID --initial-cluster SPEC`.
fn restore(backup: &std::path::Path, data_dir: &std::path::Path, id: u64, spec: &str) -> std::process::Output {
    cli(&[
        "--output",
        "json",
        "snapshot",
        "restore",
        backup.to_str().unwrap(),
        "--data-dir",
        data_dir.to_str().unwrap(),
        "--id",
        &id.to_string(),
        "--initial-cluster",
        spec,
    ])
}

fn client(endpoints: Vec<String>) -> Client {
    Client::new(ClientOptions {
        endpoints,
        timeout: T,
        serializable: false,
        tls: Default::default(),
    })
    .unwrap()
}

fn timing(config: NodeConfig) -> NodeConfig {
    NodeConfig {
        tick_ms: 25,
        election_ticks: 20,
        heartbeat_ticks: 2,
        ..config
    }
}

async fn serve(config: NodeConfig, peer: TcpListener) -> (RunningNode, String) {
    let client_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = client_listener.local_addr().unwrap().to_string();
    let listeners = Listeners {
        client: client_listener,
        peer,
        metrics: None,
    };
    (start(config, listeners).await.unwrap(), addr)
}

/// A one-node cluster to take backups from, with its client address.
async fn source_node(dir: &std::path::Path) -> (RunningNode, String) {
    let peer = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let config = timing(NodeConfig {
        data_dir: dir.join("source"),
        peer_addr: peer.local_addr().unwrap().to_string(),
        ..NodeConfig::default()
    });
    serve(config, peer).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_under_load_restores_into_a_new_cluster_with_every_write_acknowledged_before_it() {
    let dir = tempfile::tempdir().unwrap();
    let (source, source_addr) = source_node(dir.path()).await;
    let writer_client = client(vec![source_addr.clone()]);
    // Enough data for several chunks.
    let value = "v".repeat(200);
    for i in 0..6000 {
        writer_client.set(format!("base{i:05}"), value.clone()).await.unwrap();
    }

    // Writes keep coming while the backup runs.
    let acked: Arc<Mutex<BTreeMap<String, u64>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (acked, stop, client) = (acked.clone(), stop.clone(), writer_client.clone());
        tokio::spawn(async move {
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let key = format!("load{}", i % 500);
                if client.set(key.clone(), i.to_string()).await.is_ok() {
                    acked.lock().unwrap().insert(key, i);
                }
                i += 1;
            }
        })
    };
    // Writes acknowledged before the backup starts: it must hold them all.
    let deadline = std::time::Instant::now() + T;
    while acked.lock().unwrap().len() < 50 {
        assert!(
            std::time::Instant::now() < deadline,
            "the writer got no 50 writes acknowledged"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let before_backup = acked.lock().unwrap().clone();
    assert!(!before_backup.is_empty());
    let backup = dir.path().join("backup.kvsnap");
    let out = cli(&[
        "--endpoints",
        &source_addr,
        "--output",
        "json",
        "snapshot",
        "save",
        backup.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "save: {}", String::from_utf8_lossy(&out.stderr));
    let saved: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(saved["keys"].as_u64().unwrap() >= 6000, "{saved}");
    stop.store(true, Ordering::Relaxed);
    writer.await.unwrap();
    source.shutdown(T).await.unwrap();

    let status = cli(&["snapshot", "status", backup.to_str().unwrap()]);
    assert!(status.status.success(), "{}", String::from_utf8_lossy(&status.stderr));

    // A new 3-node cluster from the one file.
    let mut peers = Vec::new();
    for _ in 0..3 {
        peers.push(TcpListener::bind("127.0.0.1:0").await.unwrap());
    }
    let spec: Vec<String> = peers
        .iter()
        .enumerate()
        .map(|(i, p)| format!("{}={}", i + 1, p.local_addr().unwrap()))
        .collect();
    let spec = spec.join(",");
    let mut cluster_ids = Vec::new();
    for id in 1..=3 {
        let data_dir = dir.path().join(format!("restored{id}"));
        let out = restore(&backup, &data_dir, id, &spec);
        assert!(
            out.status.success(),
            "restore: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let restored: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        cluster_ids.push(restored["new_cluster_id"].as_str().unwrap().to_string());
    }
    assert!(cluster_ids.iter().all(|c| *c == cluster_ids[0]), "{cluster_ids:?}");
    assert_ne!(
        cluster_ids[0],
        saved["cluster_id"].as_str().unwrap(),
        "a new cluster id"
    );

    let mut nodes = Vec::new();
    let mut endpoints = Vec::new();
    for (i, peer) in peers.into_iter().enumerate() {
        let id = i as u64 + 1;
        let config = timing(NodeConfig {
            id,
            data_dir: dir.path().join(format!("restored{id}")),
            peer_addr: peer.local_addr().unwrap().to_string(),
            ..NodeConfig::default()
        });
        let (node, addr) = serve(config, peer).await;
        nodes.push(node);
        endpoints.push(addr);
    }
    let restored = client(endpoints);
    for (key, i) in &before_backup {
        let value = restored
            .get(key.clone())
            .await
            .unwrap()
            .expect("an acknowledged write is missing");
        let held: u64 = String::from_utf8(value).unwrap().parse().unwrap();
        assert!(
            held >= *i,
            "{key}: {held} is older than {i}, acknowledged before the backup"
        );
    }
    for i in (0..6000).step_by(97) {
        assert!(restored.get(format!("base{i:05}")).await.unwrap().is_some());
    }
    // The new cluster takes writes, and all three members agree on them.
    restored.set("after-restore", "yes").await.unwrap();
    let (members, _) = restored.members().await.unwrap();
    assert_eq!(members.len(), 3);
    for node in nodes {
        node.shutdown(T).await.unwrap();
    }
}

#[test]
fn a_damaged_backup_is_refused_and_restores_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let backup = dir.path().join("backup.kvsnap");
    runtime.block_on(async {
        let (source, addr) = source_node(dir.path()).await;
        let c = client(vec![addr.clone()]);
        for i in 0..300 {
            c.set(format!("k{i}"), "value").await.unwrap();
        }
        let out = cli(&["--endpoints", &addr, "snapshot", "save", backup.to_str().unwrap()]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        source.shutdown(T).await.unwrap();
    });
    let mut bytes = std::fs::read(&backup).unwrap();
    let at = bytes.len() / 2;
    bytes[at] ^= 0x20;
    std::fs::write(&backup, &bytes).unwrap();

    let status = cli(&["snapshot", "status", backup.to_str().unwrap()]);
    assert_eq!(status.status.code(), Some(2));
    let err = String::from_utf8_lossy(&status.stderr);
    assert!(err.contains("checksum") || err.contains("decode"), "{err}");

    let data_dir = dir.path().join("restored");
    let out = restore(&backup, &data_dir, 1, "1=127.0.0.1:1");
    assert_eq!(out.status.code(), Some(2), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(!data_dir.exists(), "nothing is left to start a node on");

    // A cut-short file is not a backup either.
    std::fs::write(&backup, &bytes[..bytes.len() / 3]).unwrap();
    let status = cli(&["snapshot", "status", backup.to_str().unwrap()]);
    assert_eq!(status.status.code(), Some(2));
}
