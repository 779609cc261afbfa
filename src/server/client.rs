//! Client connections: a task per connection reads frames, runs each request
//! in its own task (so a slow write never holds up a read behind it), and a
//! writer task sends responses in completion order, matched by request id.
//!
//! A connection's cost is bounded: at most `max_connections` are served at
//! once; one with nothing in flight is closed after `client_idle_timeout_ms`
//! (with an `IDLE_CLOSED` notice, so the client knows unanswered requests did
//! not run); a started frame must arrive within `client_read_timeout_ms`; and
//! partly received frames share one memory budget. With TLS on, the
//! handshake has the same deadline, and the certificate's common name is the
//! client's identity for `client_roles`.

use std::sync::Arc;
use std::time::Duration;

use ::metrics::counter;
use bytes::Bytes;
use futures::SinkExt;
use prost::Message as _;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, BufReader};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};
use tokio_rustls::TlsAcceptor;
use tracing::debug;

use super::accept::Acceptor;
use super::access::AccessControl;
use super::watches::ConnectionWatches;
use super::{requests, Limits};
use crate::codec::{self, FrameReader, ReadError, ReceiveBudget};
use crate::error::WireError;
use crate::metrics;
use crate::node::NodeHandle;
use crate::proto::{response, ErrorCode, Request, Response};
use crate::tls::server::ClientPortTls;

/// Requests one connection may have in flight, counted until their response
/// is written; more wait unread (TCP pushes back on the client). So a
/// connection that stops reading makes the node hold at most this many
/// responses, for at most `client_read_timeout_ms`.
const MAX_IN_FLIGHT: usize = 64;

/// A response on its way out, with the in-flight slot it frees once written.
pub(super) struct Reply {
    response: Response,
    _slot: Option<OwnedSemaphorePermit>,
}

impl Reply {
    /// A response that holds `slot` until it is written.
    pub(super) fn with_slot(response: Response, slot: OwnedSemaphorePermit) -> Reply {
        Reply {
            response,
            _slot: Some(slot),
        }
    }

    pub(super) fn without_slot(response: Response) -> Reply {
        Reply { response, _slot: None }
    }
}
/// After an idle notice, how long input is drained before the socket closes
/// (closing with unread input would reset the connection and could discard
/// the notice before the client reads it).
const CLOSE_GRACE: Duration = Duration::from_secs(1);
/// The first byte of a TLS handshake record.
const TLS_HANDSHAKE: u8 = 0x16;

/// What every client connection shares.
#[derive(Clone)]
pub struct ClientPort {
    /// The node.
    pub handle: NodeHandle,
    /// Limits and timeouts.
    pub limits: Limits,
    /// TLS, if on.
    pub tls: Option<Arc<ClientPortTls>>,
    /// Roles in force.
    pub access: AccessControl,
}

/// Accepts client connections until `stop` turns true. At most
/// `limits.max_connections` are served at once; more wait in the kernel's
/// accept queue.
pub async fn serve(listener: tokio::net::TcpListener, port: ClientPort, mut stop: watch::Receiver<bool>) {
    let slots = Arc::new(Semaphore::new(port.limits.max_connections));
    let budget = ReceiveBudget::new(port.limits.max_partial_frame_bytes);
    let mut acceptor = Acceptor::new(listener, "client");
    loop {
        let slot = tokio::select! {
            _ = stop.wait_for(|s| *s) => return,
            slot = slots.clone().acquire_owned() => slot.expect("the semaphore is never closed"),
        };
        tokio::select! {
            _ = stop.wait_for(|s| *s) => return,
            (stream, _) = acceptor.accept() => {
                let _ = stream.set_nodelay(true);
                let (port, budget) = (port.clone(), budget.clone());
                tokio::spawn(async move {
                    accept_connection(stream, port, budget).await;
                    drop(slot);
                });
            }
        }
    }
}

fn closed(reason: &'static str) {
    counter!(metrics::CLIENT_CONNECTIONS_CLOSED, "reason" => reason).increment(1);
}

/// Sorts out TLS (or its absence), then serves the connection.
async fn accept_connection(stream: TcpStream, port: ClientPort, budget: ReceiveBudget) {
    let read_timeout = port.limits.read_timeout;
    let mut first = [0u8; 1];
    // A connection that says nothing is idle, whatever it may say later.
    let peeked = tokio::time::timeout(port.limits.idle_timeout, stream.peek(&mut first)).await;
    let speaks_tls = match peeked {
        Ok(Ok(1)) => first[0] == TLS_HANDSHAKE,
        // Closed or failed before saying anything.
        Ok(_) => return,
        // Silent for the whole idle timeout.
        Err(_) => {
            closed("idle");
            return;
        }
    };
    match (&port.tls, speaks_tls) {
        (Some(tls), true) => {
            let acceptor = TlsAcceptor::from(tls.server_config());
            match tokio::time::timeout(read_timeout, acceptor.accept(stream)).await {
                Ok(Ok(stream)) => {
                    let identity =
                        crate::tls::leaf_certificate(stream.get_ref().1).and_then(crate::tls::files::common_name);
                    connection(stream, port, budget, identity).await;
                }
                Ok(Err(e)) => {
                    closed("tls_handshake");
                    debug!(error = %e, "client TLS handshake failed");
                }
                Err(_) => closed("tls_handshake"),
            }
        }
        (Some(_), false) => {
            closed("tls_required");
            refuse(
                stream,
                WireError::new(
                    ErrorCode::Unauthenticated,
                    "this port requires TLS: connect with --cacert (and --cert/--key if the server asks for client certificates)",
                ),
            )
            .await;
        }
        (None, true) => {
            // A TLS client on a plaintext port: the client reads this frame as
            // a corrupt TLS record and says the port is plaintext.
            refuse(
                stream,
                WireError::new(
                    ErrorCode::MalformedRequest,
                    "this port does not speak TLS: connect without --cacert/--cert/--key",
                ),
            )
            .await;
        }
        (None, false) => connection(stream, port, budget, None).await,
    }
}

/// Writes one connection-level error and closes.
async fn refuse(stream: TcpStream, error: WireError) {
    let mut sink = codec::framed(stream, codec::DEFAULT_MAX_FRAME);
    let _ = tokio::time::timeout(CLOSE_GRACE, sink.send(codec::encode(&error_response(0, error)))).await;
    let mut stream = sink.into_inner();
    drain_then_close(&mut stream).await;
}

/// Reads and discards input for a short while so that closing doesn't reset
/// the connection before the client has read what we sent.
async fn drain_then_close<S: AsyncRead + AsyncWrite + Unpin>(stream: &mut S) {
    use tokio::io::AsyncWriteExt;
    let _ = stream.shutdown().await;
    let mut sink = [0u8; 4096];
    let _ = tokio::time::timeout(CLOSE_GRACE, async {
        while matches!(stream.read(&mut sink).await, Ok(n) if n > 0) {}
    })
    .await;
}

fn error_response(id: u64, error: WireError) -> Response {
    Response {
        id,
        result: Some(response::Result::Error(error.into())),
    }
}

async fn connection<S>(stream: S, port: ClientPort, budget: ReceiveBudget, identity: Option<String>)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let limits = port.limits;
    let identity: Option<Arc<str>> = identity.map(Arc::from);
    let (read_half, write_half) = tokio::io::split(stream);
    let mut frames = FrameReader::new(BufReader::new(read_half), limits.max_frame_size)
        .with_read_timeout(limits.read_timeout)
        .with_budget(budget);
    let sink = tokio_util::codec::FramedWrite::new(write_half, codec::codec(codec::CLIENT_MAX_FRAME));
    let (tx, rx) = mpsc::channel::<Reply>(MAX_IN_FLIGHT);
    // A client that stops taking its responses is dropped after the read
    // timeout, rather than holding them (and its slot) forever.
    let stall = Some(limits.read_timeout);
    let writer = tokio::spawn(codec::write_frames(rx, sink, stall, |reply: &Reply| {
        codec::encode(&reply.response)
    }));
    let in_flight = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    let watches = ConnectionWatches::default();
    // Set when we close deliberately after sending a notice: input is then
    // drained briefly so the notice isn't lost to a connection reset.
    let mut drain = false;
    loop {
        let frame = tokio::select! {
            frame = frames.next_frame() => frame,
            // The writer gave up (the client stopped reading, or left).
            _ = tx.closed() => break,
            _ = tokio::time::sleep(limits.idle_timeout) => {
                if frames.in_frame() || in_flight.available_permits() < MAX_IN_FLIGHT || !watches.is_empty() {
                    continue;
                }
                closed("idle");
                let notice = WireError::new(
                    ErrorCode::IdleClosed,
                    "closing a connection idle for longer than client_idle_timeout_ms; requests without a response were not run",
                );
                let notice = Reply::without_slot(error_response(0, notice));
                let _ = tokio::time::timeout(limits.read_timeout, tx.send(notice)).await;
                drain = true;
                break;
            }
        };
        match frame {
            Ok(Some(bytes)) => handle_frame(bytes, &port, &identity, &tx, &in_flight, &watches).await,
            Ok(None) => break,
            Err(ReadError::TooLarge { .. }) => {
                closed("frame_too_large");
                // The stream can't be resynchronised past an oversized frame.
                let error = WireError::new(
                    ErrorCode::FrameTooLarge,
                    format!(
                        "frame larger than the server's limit of {} bytes; send smaller values (limit {} bytes) or raise --max-frame-size",
                        limits.max_frame_size, limits.max_value_size
                    ),
                );
                let _ = tx.send(Reply::without_slot(error_response(0, error))).await;
                drain = true;
                break;
            }
            Err(ReadError::Slow(_)) => {
                closed("slow");
                break;
            }
            Err(e) => {
                debug!(error = %e, "client connection closed");
                break;
            }
        }
    }
    // Its watches end with it (they hold the writer's queue open).
    watches.cancel_all();
    drop(tx);
    // Nothing more is read unless draining: give back any budget a partial
    // frame holds before waiting for the writer.
    let read_half = drain.then(|| frames.into_inner());
    let Ok((sink, end)) = writer.await else { return };
    if end == codec::WriteEnd::Stalled {
        closed("slow");
    }
    if let Some(read_half) = read_half {
        let mut stream = read_half.into_inner().unsplit(sink.into_inner());
        drain_then_close(&mut stream).await;
    }
}

async fn handle_frame(
    bytes: Bytes,
    port: &ClientPort,
    identity: &Option<Arc<str>>,
    tx: &mpsc::Sender<Reply>,
    in_flight: &Arc<Semaphore>,
    watches: &ConnectionWatches,
) {
    match Request::decode(bytes) {
        Ok(mut request) => {
            use crate::proto::request::Command as C;
            // Watches live as long as the client wants: they take no slot (a
            // cap of their own), and neither does a cancel, so open watches
            // never stop the connection from reading.
            match request.command.take() {
                Some(C::Watch(watch)) => {
                    watches
                        .open(request.id, watch, port.clone(), identity.clone(), tx.clone())
                        .await;
                    return;
                }
                Some(C::WatchCancel(cancel)) => {
                    watches.cancel(request.id, cancel.watch_id, tx).await;
                    return;
                }
                other => request.command = other,
            }
            // Waits (reading nothing more) while MAX_IN_FLIGHT are unanswered.
            let Ok(slot) = in_flight.clone().acquire_owned().await else {
                return;
            };
            let (tx, port, identity) = (tx.clone(), port.clone(), identity.clone());
            if let Some(C::SnapshotSave(save)) = request.command {
                // A stream of responses; it holds its slot until done.
                tokio::spawn(async move {
                    super::backup::stream(request.id, save, port, identity, tx).await;
                    drop(slot);
                });
                return;
            }
            tokio::spawn(async move {
                let response =
                    requests::dispatch(request, &port.handle, port.limits, &port.access, identity.as_deref()).await;
                let _ = tx
                    .send(Reply {
                        response,
                        _slot: Some(slot),
                    })
                    .await;
            });
        }
        Err(e) => {
            // Framing is intact, so the connection stays usable.
            let error = WireError::new(
                ErrorCode::MalformedRequest,
                format!("the frame is not a kvraft.Request ({e}); send a protobuf Request per length-delimited frame"),
            );
            let _ = tx.send(Reply::without_slot(error_response(0, error))).await;
        }
    }
}
