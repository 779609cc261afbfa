//! `snapshot_save`: a backup streamed over a client connection. After a
//! linearizable barrier (so every write acknowledged before the request is
//! in it) the node takes a read view of its store and sends its frames, one
//! response each, all under the request's id. At most `WINDOW` frames are
//! queued or being written at a time, so a slow client holds a few MiB, not
//! a whole queue of chunks, and paces the store reads.

use ::metrics::{counter, histogram};
use bytes::Bytes;
use tokio::sync::{mpsc, Semaphore};
use tracing::info;

use super::client::{ClientPort, Reply};
use crate::error::WireError;
use crate::metrics;
use crate::proto::{request, response, ErrorCode, Response, SnapshotSaveRequest};
use crate::storage::snapshot_stream::SnapshotFrames;

/// Frames of one backup queued or being written at once.
const WINDOW: usize = 2;
/// A backup whose client takes no frame for this long is abandoned.
const STALL: std::time::Duration = std::time::Duration::from_secs(30);

/// Streams a backup for request `id`; every response goes through `tx`.
pub(super) async fn stream(
    id: u64,
    save: SnapshotSaveRequest,
    port: ClientPort,
    identity: Option<std::sync::Arc<str>>,
    tx: mpsc::Sender<Reply>,
) {
    let started = std::time::Instant::now();
    let outcome = match send_frames(id, save, &port, identity.as_deref(), &tx).await {
        Ok((frames, bytes)) => {
            info!(frames, bytes, took = ?started.elapsed(), "backup streamed to a client");
            "ok".to_string()
        }
        Err(error) => {
            let outcome = error.code.as_str_name().to_ascii_lowercase();
            let response = Response {
                id,
                result: Some(response::Result::Error(error.into())),
            };
            let _ = tx.send(Reply::without_slot(response)).await;
            outcome
        }
    };
    counter!(metrics::REQUESTS, "op" => "snapshot_save", "outcome" => outcome).increment(1);
    histogram!(metrics::REQUEST_DURATION, "op" => "snapshot_save").record(started.elapsed().as_secs_f64());
}

async fn send_frames(
    id: u64,
    save: SnapshotSaveRequest,
    port: &ClientPort,
    identity: Option<&str>,
    tx: &mpsc::Sender<Reply>,
) -> Result<(u64, u64), WireError> {
    port.access.check(identity, &request::Command::SnapshotSave(save))?;
    if !save.serializable {
        port.handle.linearizable_barrier().await?;
    }
    let store = port.handle.store();
    let internal =
        |e: crate::storage::StorageError| WireError::new(ErrorCode::Internal, format!("reading the state store: {e}"));
    // A view is of the file: flush first, so it holds every write applied
    // before the barrier (a flush fsyncs, so it runs on a blocking thread).
    let view = tokio::task::spawn_blocking(move || store.flush().and_then(|()| store.view()))
        .await
        .map_err(|e| WireError::new(ErrorCode::Internal, format!("the backup's flush stopped: {e}")))?
        .map_err(internal)?;
    let frames = SnapshotFrames::new(view, port.handle.status().id).map_err(internal)?;
    // Reading the store blocks: a blocking thread produces frames, at most
    // two ahead of the connection.
    let (frame_tx, mut frame_rx) = mpsc::channel(2);
    tokio::task::spawn_blocking(move || {
        for frame in frames {
            if frame_tx.blocking_send(frame).is_err() {
                return;
            }
        }
    });
    let (mut count, mut bytes) = (0u64, 0u64);
    let window = std::sync::Arc::new(Semaphore::new(WINDOW));
    while let Some(frame) = frame_rx.recv().await {
        let frame = frame.map_err(internal)?;
        bytes += frame.len() as u64;
        count += 1;
        let response = Response {
            id,
            result: Some(response::Result::SnapshotFrame(Bytes::from(frame).into())),
        };
        // The slot is released once the writer has written the frame. A
        // client that takes no frame for STALL loses its backup (and frees
        // the view it holds).
        let sent = tokio::time::timeout(STALL, async {
            let slot = window
                .clone()
                .acquire_owned()
                .await
                .expect("the window is never closed");
            tx.send(Reply::with_slot(response, slot)).await.is_ok()
        })
        .await;
        if sent != Ok(true) {
            return Err(WireError::new(
                ErrorCode::Internal,
                "the client stopped reading the backup (or went away)",
            ));
        }
    }
    Ok((count, bytes))
}
