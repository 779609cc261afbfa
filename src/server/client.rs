//! Client connections: a task per connection reads frames, runs each request
//! in its own task (so a slow write never holds up a read behind it), and a
//! writer task sends responses in completion order, matched by request id.

use futures::StreamExt;
use prost::Message as _;
use std::sync::Arc;
use tokio::net::{TcpListener, TcpStream};

use tokio::sync::{mpsc, watch, Semaphore};
use tracing::{debug, warn};

use super::{requests, Limits};
use crate::codec;
use crate::error::WireError;
use crate::node::NodeHandle;
use crate::proto::{response, ErrorCode, Request, Response};

/// Responses queued per connection before request tasks wait for the writer.
const RESPONSE_QUEUE: usize = 1024;

/// Accepts client connections until `stop` turns true. At most
/// `limits.max_connections` are served at once; more wait in the kernel's
/// accept queue.
pub async fn serve(listener: TcpListener, handle: NodeHandle, limits: Limits, mut stop: watch::Receiver<bool>) {
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    loop {
        let slot = tokio::select! {
            _ = stop.wait_for(|s| *s) => return,
            slot = slots.clone().acquire_owned() => slot.expect("the semaphore is never closed"),
        };
        tokio::select! {
            _ = stop.wait_for(|s| *s) => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let _ = stream.set_nodelay(true);
                    let handle = handle.clone();
                    tokio::spawn(async move {
                        connection(stream, handle, limits).await;
                        drop(slot);
                    });
                }
                Err(e) => warn!(error = %e, "client accept failed"),
            }
        }
    }
}

fn error_response(id: u64, error: WireError) -> Response {
    Response {
        id,
        result: Some(response::Result::Error(error.into())),
    }
}

async fn connection(stream: TcpStream, handle: NodeHandle, limits: Limits) {
    let remote = stream.peer_addr().ok();
    let (sink, mut frames) = codec::framed(stream, limits.max_frame_size).split();
    let (tx, rx) = mpsc::channel::<Response>(RESPONSE_QUEUE);
    let writer = tokio::spawn(codec::write_frames(rx, sink));
    while let Some(frame) = frames.next().await {
        match frame {
            Ok(bytes) => match Request::decode(bytes) {
                Ok(request) => {
                    let tx = tx.clone();
                    let handle = handle.clone();
                    tokio::spawn(async move {
                        let response = requests::dispatch(request, &handle, limits).await;
                        let _ = tx.send(response).await;
                    });
                }
                Err(e) => {
                    // Framing is intact, so the connection stays usable.
                    let error = WireError::new(
                        ErrorCode::MalformedRequest,
                        format!("the frame is not a kvraft.Request ({e}); send a protobuf Request per length-delimited frame"),
                    );
                    let _ = tx.send(error_response(0, error)).await;
                }
            },
            Err(e) if codec::is_frame_too_large(&e) => {
                // The stream can't be resynchronised past an oversized frame.
                let error = WireError::new(
                    ErrorCode::FrameTooLarge,
                    format!(
                        "frame larger than the server's limit of {} bytes; send smaller values (limit {} bytes) or raise --max-frame-size",
                        limits.max_frame_size, limits.max_value_size
                    ),
                );
                let _ = tx.send(error_response(0, error)).await;
                break;
            }
            Err(e) => {
                debug!(?remote, error = %e, "client connection closed");
                break;
            }
        }
    }
    drop(tx);
    let _ = writer.await;
}
