//! A data dir in the layout before the state store (snapshot files, then the
//! raft log after them), written with the same code that wrote it then, is
//! converted on first start with nothing lost: the snapshot's keys and the
//! keys of the log entries after it are all served.

// raft's protobuf-2 messages are built field by field.
#![allow(clippy::field_reassign_with_default)]

use std::time::Duration;

use kvraft::client::{Client, ClientOptions};
use kvraft::config::NodeConfig;
use kvraft::proto::{command, Command, KeyValue, Member, NodeIdentity, SetRequest, SnapshotData};
use kvraft::server::{start, Listeners};
use kvraft::storage::{NodeIdentityFile, RaftStorage, SnapshotFiles};
use prost::Message as _;
use raft::prelude::{Entry, HardState, Snapshot};
use tokio::net::TcpListener;

const T: Duration = Duration::from_secs(10);
const CLUSTER: u64 = 0x1234_5678;

fn set_entry(index: u64, key: String) -> Entry {
    let mut e = Entry::default();
    e.index = index;
    e.term = 2;
    e.data = Command {
        op: Some(command::Op::Set(SetRequest {
            key: key.into_bytes(),
            value: format!("v{index}").into_bytes(),
            lease: 0,
        })),
        ..Default::default()
    }
    .encode_to_vec()
    .into();
    e
}

/// Node 1 of a one-node cluster as the old layout left it: a snapshot at
/// index 50 holding `old0..old99`, the log compacted to 30, entries 31..=60
/// (those after 50 set `tail51..tail60`).
fn write_legacy_data_dir(dir: &std::path::Path, peer_addr: &str) {
    NodeIdentityFile::in_dir(dir)
        .store(&NodeIdentity {
            node_id: 1,
            cluster_id: CLUSTER,
            removed: false,
            // The previous release had none; the first start makes one.
            incarnation: 0,
        })
        .unwrap();
    let data = SnapshotData {
        pairs: (0..100)
            .map(|i| KeyValue {
                key: format!("old{i}").into_bytes(),
                value: format!("value{i}").into_bytes(),
                ..Default::default()
            })
            .collect(),
        members: vec![Member {
            id: 1,
            peer_addr: peer_addr.to_string(),
            client_addr: String::new(),
            role: 0,
            incarnation: 0,
        }],
        removed: vec![7],
        cluster_id: CLUSTER,
    };
    let mut snapshot = Snapshot::default();
    snapshot.data = data.encode_to_vec().into();
    snapshot.mut_metadata().index = 50;
    snapshot.mut_metadata().term = 2;
    snapshot.mut_metadata().mut_conf_state().voters = vec![1];
    SnapshotFiles::open(&dir.join("snapshots"))
        .unwrap()
        .save(&snapshot)
        .unwrap();

    let log = RaftStorage::open(dir).unwrap();
    log.start_at(30, 2).unwrap();
    let entries: Vec<Entry> = (31..=60)
        .map(|i| {
            set_entry(
                i,
                if i > 50 {
                    format!("tail{i}")
                } else {
                    format!("old{}", i - 31)
                },
            )
        })
        .collect();
    let mut hs = HardState::default();
    hs.term = 2;
    hs.vote = 1;
    hs.commit = 60;
    log.append(&entries, Some(&hs), true).unwrap();
}

async fn start_node(config: &NodeConfig, peer: TcpListener) -> (kvraft::server::RunningNode, Client) {
    let client_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let client_addr = client_listener.local_addr().unwrap().to_string();
    let listeners = Listeners {
        client: client_listener,
        peer,
        metrics: None,
    };
    let node = start(config.clone(), listeners).await.expect("the old data dir starts");
    let client = Client::new(ClientOptions {
        endpoints: vec![client_addr],
        timeout: T,
        serializable: false,
        tls: Default::default(),
    })
    .unwrap();
    (node, client)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_old_data_dir_is_converted_on_first_start_and_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    std::fs::create_dir_all(&data_dir).unwrap();
    let peer = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let peer_addr = peer.local_addr().unwrap().to_string();
    write_legacy_data_dir(&data_dir, &peer_addr);
    let config = NodeConfig {
        data_dir: data_dir.clone(),
        peer_addr: peer_addr.clone(),
        client_addr: "127.0.0.1:0".into(),
        tick_ms: 25,
        election_ticks: 20,
        heartbeat_ticks: 2,
        ..NodeConfig::default()
    };

    let (node, client) = start_node(&config, peer).await;
    assert!(data_dir.join("state.redb").exists());
    assert!(
        !data_dir.join("snapshots").exists(),
        "the old snapshot files go once converted"
    );
    assert_everything_served(&client).await;
    assert_eq!(node.handle.status().cluster_id, CLUSTER);
    assert!(node.handle.is_removed(7), "removed ids carried over");
    client.set("new", "x").await.unwrap();
    node.shutdown(T).await.unwrap();

    // And again after a restart on the converted data dir.
    let peer = TcpListener::bind(&peer_addr).await.unwrap();
    let (node, client) = start_node(&config, peer).await;
    assert_everything_served(&client).await;
    assert_eq!(client.get("new").await.unwrap().as_deref(), Some(&b"x"[..]));
    node.shutdown(T).await.unwrap();
}

async fn assert_everything_served(client: &Client) {
    for i in 0..100 {
        let value = client.get(format!("old{i}")).await.unwrap();
        assert_eq!(value.as_deref(), Some(format!("value{i}").as_bytes()), "old{i}");
    }
    for i in 51..=60 {
        let value = client.get(format!("tail{i}")).await.unwrap();
        assert_eq!(value.as_deref(), Some(format!("v{i}").as_bytes()), "tail{i}");
    }
}
