//! Inbound peer connections: decode envelopes, check the sender belongs to
//! our cluster and was not removed, and hand raft messages to the raft loop.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::Arc;

use futures::{SinkExt, StreamExt};
use prost::Message as _;
use protobuf::Message as _;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tracing::{debug, warn};

use crate::codec;
use crate::metrics;
use crate::node::{Inbox, NodeHandle};
use crate::proto::{peer_rejection::Reason, PeerEnvelope, PeerRejection};
use ::metrics::counter;

/// What a peer connection needs.
#[derive(Clone)]
pub struct PeerContext {
    /// This node.
    pub node_id: u64,
    /// The raft loop's inbox.
    pub inbox: mpsc::Sender<Inbox>,
    /// For the removed-member check.
    pub handle: NodeHandle,
    /// Our cluster (0 while a joining node waits).
    pub cluster_id: Arc<AtomicU64>,
}

/// Accepts peer connections until `stop` turns true.
pub async fn serve(listener: TcpListener, context: PeerContext, mut stop: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            _ = stop.wait_for(|s| *s) => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let _ = stream.set_nodelay(true);
                    tokio::spawn(connection(stream, context.clone()));
                }
                Err(e) => warn!(error = %e, "peer accept failed"),
            }
        }
    }
}

async fn connection(stream: TcpStream, context: PeerContext) {
    let remote = stream.peer_addr().ok();
    let mut frames = codec::framed(stream, codec::PEER_MAX_FRAME);
    while let Some(frame) = frames.next().await {
        let frame = match frame {
            Ok(f) => f,
            Err(e) => {
                debug!(?remote, error = %e, "peer connection closed");
                return;
            }
        };
        let frame_len = frame.len() as u64 + 4;
        let envelope = match PeerEnvelope::decode(frame) {
            Ok(e) => e,
            Err(e) => {
                warn!(?remote, error = %e, "undecodable peer frame; closing the connection");
                return;
            }
        };
        let ours = context.cluster_id.load(Ordering::Acquire);
        if ours != 0 && envelope.cluster_id != ours {
            let message = format!(
                "node {} is in cluster {:016x} but node {} is in cluster {ours:016x}: it was bootstrapped with another --initial-cluster or its data dir belongs to another cluster",
                envelope.from_id, envelope.cluster_id, context.node_id
            );
            warn!(%message, "refusing a peer");
            let _ = frames
                .send(codec::encode(&PeerRejection {
                    reason: Reason::ClusterMismatch as i32,
                    message,
                }))
                .await;
            return;
        }
        if context.handle.read(|sm| sm.is_removed(envelope.from_id)) {
            let message = format!("node {} was removed from the cluster", envelope.from_id);
            let _ = frames
                .send(codec::encode(&PeerRejection {
                    reason: Reason::Removed as i32,
                    message,
                }))
                .await;
            return;
        }
        counter!(metrics::PEER_RECEIVED_BYTES, "peer" => envelope.from_id.to_string()).increment(frame_len);
        let message = match raft::prelude::Message::parse_from_bytes(&envelope.raft_message) {
            Ok(m) => m,
            Err(e) => {
                warn!(from = envelope.from_id, error = %e, "undecodable raft message; dropped");
                continue;
            }
        };
        if message.to != context.node_id {
            debug!(to = message.to, "raft message for another node; dropped");
            continue;
        }
        let inbox = Inbox::Raft {
            message: Box::new(message),
            from_peer_addr: envelope.from_peer_addr,
            cluster_id: envelope.cluster_id,
        };
        if context.inbox.send(inbox).is_err() {
            return;
        }
    }
}
