//! kvraft: a replicated key-value store on Raft.
//!
//! A few `kvraftd` nodes keep one ordered map in agreement through tikv's `raft`
//! crate; clients talk to any node with length-delimited protobuf frames.
//!
//! # Layout
//!
//! | where | what |
//! |---|---|
//! | `proto/kvraft.proto`, [`proto`] | the wire formats: client request/response, peer envelope, log commands, snapshot payload |
//! | [`codec`] | protobuf messages in length-delimited frames, with a maximum frame size |
//! | [`node`] | the raft loop (`node::raft_loop`, the only code that touches `RawNode`), the handle connections use (with its bounded inbox), proposals and reads in flight, the `Transport` trait and the TCP transport, `node::Error`, membership rules, status |
//! | `address` (crate-private) | `HOST:PORT` and `ID=HOST:PORT,...` parsing |
//! | `peer_guard` (crate-private) | every check peer input passes before raft |
//! | [`storage`] | the durable raft log (raft-engine), snapshot files, the data dir's identity |
//! | [`state_machine`] | the ordered map, membership, apply and snapshot/restore |
//! | [`sessions`], [`leases`] | the client sessions (exactly-once writes) and the leases the state machine keeps |
//! | [`server`] | `server::run`/`start` on listeners the caller binds, the client and peer listeners, the metrics endpoint, the one mapping of node errors to wire errors |
//! | `metrics` (crate-private) | every metric name, the recorder, zero-valued series at start |
//! | [`client`] | [`Client`]: endpoints, failover, retries, deadlines, pipelining |
//! | [`cli`] | the `kvraft` command line, including `bench` |
//! | [`daemon`] | `kvraftd` as a system daemon: config layers, logging, systemd, signals |
//! | `src/bin` | thin mains for `kvraftd` and `kvraft` |
//!
//! The path of a `set`: the client frames a [`proto::Request`]; a connection task
//! in [`server::client`] hands it to the raft loop through a [`node::NodeHandle`];
//! the raft loop proposes it with a [`proto::ProposalContext`] naming this node and
//! a proposal id; once the entry is committed and applied to the
//! [`state_machine`], the waiting connection task gets the result on a oneshot
//! channel and writes the [`proto::Response`].

// raft's protobuf-2 messages are built field by field, as raft-rs's own examples do.
#![allow(clippy::field_reassign_with_default)]
#![warn(missing_docs)]

pub(crate) mod address;
pub mod cli;
pub mod client;
pub mod codec;
pub mod config;
pub mod daemon;
pub mod error;
pub mod leases;
pub(crate) mod metrics;
pub mod node;
pub(crate) mod peer_guard;
pub mod server;
pub mod sessions;
pub mod state_machine;
pub mod storage;
pub mod tls;
mod wire_types;

/// Messages generated from `proto/kvraft.proto` by prost.
pub mod proto {
    #![allow(missing_docs, clippy::all)]
    include!(concat!(env!("OUT_DIR"), "/kvraft.rs"));
}

pub use client::{
    CasOutcome, Client, ClientOptions, CompareOp, Expect, Lease, LeaseKeeper, LeaseState, WatchOptions, WatchUpdate,
    Watcher,
};
pub use config::NodeConfig;
pub use error::Error;
