//! Snapshot streams between peers, each on its own connection: the leader
//! opens one per snapshot message, says hello with `snapshot_stream` set,
//! sends the message (metadata only), then the state as `SnapshotFrame`s
//! read from the view raft pinned; the follower stages the state, verifies
//! it, and only then hands the message to its raft loop and acknowledges.
//! Each side holds one chunk at a time, so memory stays flat whatever the
//! state size, and several followers can be served at once without the raft
//! loop waiting on any of them.

use std::sync::Arc;
use std::time::{Duration, Instant};

use ::metrics::{counter, histogram};
use bytes::Bytes;
use futures::SinkExt;
use prost::Message as _;
use protobuf::Message as _;
use raft::prelude::{Message, MessageType};
use tokio::io::{AsyncRead, AsyncWrite, BufReader};
use tracing::{info, warn};

use super::outbound::{ConnectFailure, PeerTask};
use super::{ConnectionRefusal, Refused, Shared};
use crate::codec::{self, FrameReader};
use crate::metrics;
use crate::node::Inbox;
use crate::proto::{snapshot_frame, PeerEnvelope, SnapshotAck, SnapshotFrame};
use crate::storage::snapshot_stream::{SnapshotFrames, SnapshotStager, MAX_FRAME};
use crate::storage::{StateStore, StorageError};

/// Largest frame on a snapshot connection: a stream frame plus its envelope.
const STREAM_MAX_FRAME: usize = MAX_FRAME + 1024;

/// A stream silent this long (either way) is abandoned.
const STALL: Duration = Duration::from_secs(30);
/// How long the follower may take to finish building and fsyncing.
const ACK_WAIT: Duration = Duration::from_secs(120);
/// Frames produced ahead of the socket.
const READ_AHEAD: usize = 2;

/// Streams the state for snapshot `message` to its follower, then reports
/// the outcome to the raft loop (which retries a failed one).
pub(super) async fn send(task: PeerTask, message: Message, store: Arc<StateStore>) {
    let started = Instant::now();
    let (to, index) = (task.to, message.get_snapshot().get_metadata().index);
    let outcome = stream_to(&task, &message, store).await;
    let ok = match outcome {
        Ok(bytes) => {
            info!(to, index, bytes, took = ?started.elapsed(), "snapshot streamed to follower");
            histogram!(metrics::SNAPSHOT_STREAM_DURATION, "peer" => to.to_string(), "direction" => "sent")
                .record(started.elapsed().as_secs_f64());
            true
        }
        Err(why) => {
            warn!(to, index, %why, "snapshot stream to follower failed; raft retries it");
            false
        }
    };
    let _ = task.reports.send(Inbox::SnapshotSent { to, ok });
}

async fn stream_to(task: &PeerTask, message: &Message, store: Arc<StateStore>) -> Result<u64, String> {
    let (to, index) = (task.to, message.get_snapshot().get_metadata().index);
    let view = store
        .take_pinned(to, index)
        .ok_or_else(|| format!("no view pinned for index {index} (expired or replaced)"))?;
    let mut frames = SnapshotFrames::new(view, task.local.id).map_err(|e| e.to_string())?;
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Result<Vec<u8>, StorageError>>(READ_AHEAD);
    // Reading the store blocks: a blocking thread produces frames ahead of
    // the socket, at most READ_AHEAD of them.
    tokio::task::spawn_blocking(move || {
        for frame in frames.by_ref() {
            if tx.blocking_send(frame).is_err() {
                return;
            }
        }
    });
    let stream = task.connect().await.map_err(|failure| match failure {
        ConnectFailure::Network(why) | ConnectFailure::Identity(why) => why,
    })?;
    let (read_half, write_half) = tokio::io::split(stream);
    let mut sink = tokio_util::codec::FramedWrite::new(write_half, codec::codec(STREAM_MAX_FRAME));
    let mut replies = FrameReader::new(BufReader::new(read_half), codec::PEER_PREAUTH_MAX_FRAME);
    write_frame(&mut sink, task.hello_for(true)).await?;
    let mut sent = write_frame(&mut sink, task.envelope(message)).await?;
    let peer = to.to_string();
    while let Some(frame) = rx.recv().await {
        let frame = Bytes::from(frame.map_err(|e| format!("reading the local store: {e}"))?);
        let len = write_frame(&mut sink, frame).await?;
        sent += len;
        counter!(metrics::SNAPSHOT_STREAM_BYTES, "peer" => peer.clone(), "direction" => "sent").increment(len);
    }
    let reply = tokio::time::timeout(ACK_WAIT, replies.next_frame())
        .await
        .map_err(|_| "no acknowledgement in time".to_string())?
        .map_err(|e| e.to_string())?
        .ok_or("the follower closed the stream without an acknowledgement")?;
    match SnapshotFrame::decode(reply).ok().and_then(|f| f.part) {
        Some(snapshot_frame::Part::Ack(SnapshotAck { ok: true, .. })) => Ok(sent),
        Some(snapshot_frame::Part::Ack(SnapshotAck { message, .. })) => {
            Err(format!("the follower refused it: {message}"))
        }
        _ => Err("the follower answered something other than an acknowledgement".into()),
    }
}

/// Writes one frame unless the other end stalls; returns its size on the wire.
async fn write_frame<W: AsyncWrite + Unpin>(
    sink: &mut tokio_util::codec::FramedWrite<W, tokio_util::codec::LengthDelimitedCodec>,
    frame: Bytes,
) -> Result<u64, String> {
    let len = frame.len() as u64 + 4;
    tokio::time::timeout(STALL, sink.send(frame))
        .await
        .map_err(|_| "the follower stopped reading".to_string())?
        .map_err(|e| e.to_string())?;
    Ok(len)
}

/// The next frame of a stream, unless the sender stalls or stops.
async fn next_frame<R: AsyncRead + Unpin>(frames: &mut FrameReader<BufReader<R>>) -> Result<Bytes, String> {
    match tokio::time::timeout(STALL, frames.next_frame()).await {
        Ok(Ok(Some(frame))) => Ok(frame),
        Ok(Ok(None)) => Err("the sender closed the stream early".to_string()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("the sender stalled".to_string()),
    }
}

/// Receives one snapshot stream on an admitted connection from `sender`.
pub(super) async fn receive<R, W>(
    frames: &mut FrameReader<BufReader<R>>,
    replies: &mut tokio_util::codec::FramedWrite<W, tokio_util::codec::LengthDelimitedCodec>,
    sender: u64,
    shared: &Shared,
) -> Result<(), Refused>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let started = Instant::now();
    let refuse = |why: String| {
        (
            ConnectionRefusal::BadSnapshotStream,
            format!("snapshot stream from node {sender}: {why}"),
        )
    };
    frames.set_max_frame(STREAM_MAX_FRAME);
    // The snapshot message itself comes first.
    let first = next_frame(frames).await.map_err(refuse)?;
    let envelope = PeerEnvelope::decode(first).map_err(|e| refuse(format!("not a peer envelope: {e}")))?;
    let message = Message::parse_from_bytes(&envelope.raft_message).map_err(|e| refuse(format!("undecodable: {e}")))?;
    if message.get_msg_type() != MessageType::MsgSnapshot || envelope.from_id != sender {
        return Err(refuse("the first message is not a snapshot from the sender".into()));
    }
    crate::peer_guard::check_addressing(&message, sender, shared.context.node_id)
        .map_err(|r| refuse(format!("misaddressed ({})", r.label())))?;
    let meta = message.get_snapshot().get_metadata().clone();
    let handle = &shared.context.handle;
    let store = handle.store();
    let mut stager = SnapshotStager::new(&store.incoming_dir(), handle.cluster_id());
    let peer = sender.to_string();
    let staged = loop {
        let frame = next_frame(frames).await.map_err(refuse)?;
        counter!(metrics::SNAPSHOT_STREAM_BYTES, "peer" => peer.clone(), "direction" => "received")
            .increment(frame.len() as u64 + 4);
        let store = store.clone();
        // Building the store blocks on disk writes.
        let (returned, pushed) = tokio::task::spawn_blocking(move || {
            let pushed = stager.push(&frame, |h| store.staged_path(h.index, h.term));
            (stager, pushed)
        })
        .await
        .map_err(|e| refuse(format!("staging task failed: {e}")))?;
        stager = returned;
        match pushed {
            Ok(Some((header, path))) => break (header, path),
            Ok(None) => {}
            Err(e) => {
                let _ = send_ack(replies, false, &e.to_string()).await;
                return Err(refuse(e.to_string()));
            }
        }
    };
    let (header, path) = staged;
    if (header.index, header.term) != (meta.index, meta.term) {
        let _ = std::fs::remove_file(&path);
        let why = format!(
            "the state is at index {} term {} but the message says {} term {}",
            header.index, header.term, meta.index, meta.term
        );
        let _ = send_ack(replies, false, &why).await;
        return Err(refuse(why));
    }
    let inbox = Inbox::Raft {
        message: Box::new(message),
        sender,
        from_peer_addr: envelope.from_peer_addr,
        cluster_id: envelope.cluster_id,
        // Only heartbeats are judged by this; a snapshot never is.
        certified: false,
    };
    if shared.context.inbox.try_send(inbox).is_err() {
        crate::metrics::inbox_full();
        let _ = send_ack(replies, false, "the receiver's raft loop is busy; retry").await;
        return Ok(());
    }
    histogram!(metrics::SNAPSHOT_STREAM_DURATION, "peer" => peer, "direction" => "received")
        .record(started.elapsed().as_secs_f64());
    info!(from = sender, index = meta.index, records = header.records, took = ?started.elapsed(), "snapshot received and staged");
    let _ = send_ack(replies, true, "").await;
    Ok(())
}

async fn send_ack<W: AsyncWrite + Unpin>(
    replies: &mut tokio_util::codec::FramedWrite<W, tokio_util::codec::LengthDelimitedCodec>,
    ok: bool,
    message: &str,
) -> Result<(), std::io::Error> {
    let ack = SnapshotFrame {
        part: Some(snapshot_frame::Part::Ack(SnapshotAck {
            ok,
            message: message.to_string(),
        })),
    };
    tokio::time::timeout(STALL, replies.send(Bytes::from(ack.encode_to_vec())))
        .await
        .map_err(|_| std::io::Error::other("stalled"))?
}
