//! Protobuf messages in length-delimited frames (a 4-byte big-endian length,
//! then the message), with a maximum frame size so a bad or hostile peer can't
//! make us allocate without bound.
//!
//! Writing goes through tokio-util's `LengthDelimitedCodec`. Reading from
//! anyone we don't fully trust goes through [`FrameReader`], whose memory grows
//! with the bytes that arrive rather than with the length a frame declares.

mod reader;

pub use reader::{FrameReader, ReadError, ReceiveBudget};

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::codec::{Framed, LengthDelimitedCodec};

/// Default largest client frame: room for a 1 MiB value plus the key and
/// envelope, with margin.
pub const DEFAULT_MAX_FRAME: usize = 4 * 1024 * 1024;

/// Largest frame between peers: snapshots travel inside raft messages.
pub const PEER_MAX_FRAME: usize = 1024 * 1024 * 1024;

/// Largest frame the client accepts from a server (scan pages are capped by the
/// server's own frame limit, which an operator may raise).
pub const CLIENT_MAX_FRAME: usize = 256 * 1024 * 1024;

/// Largest frame a peer may send before it has proven it is a member (its
/// first frame is a small hello envelope), and the largest reply a node reads
/// from a peer it dialled (replies are only ever small rejections).
pub const PEER_PREAUTH_MAX_FRAME: usize = 64 * 1024;

/// The codec for a stream with this frame limit.
pub fn codec(max_frame: usize) -> LengthDelimitedCodec {
    LengthDelimitedCodec::builder().max_frame_length(max_frame).new_codec()
}

/// A connection of either kind (plain TCP or TLS), boxed.
pub trait ByteStream: AsyncRead + AsyncWrite + Send + Unpin {}

impl<T: AsyncRead + AsyncWrite + Send + Unpin> ByteStream for T {}

/// Wraps a byte stream into a frame stream with this limit.
pub fn framed<T: AsyncRead + AsyncWrite>(io: T, max_frame: usize) -> Framed<T, LengthDelimitedCodec> {
    Framed::new(io, codec(max_frame))
}

/// Encodes a message into one frame's payload.
pub fn encode<M: prost::Message>(message: &M) -> Bytes {
    Bytes::from(message.encode_to_vec())
}

/// Why [`write_frames`] returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteEnd {
    /// Every message was written and the queue closed.
    Done,
    /// A write failed (the connection is gone).
    Failed,
    /// A write made no progress within the stall limit: the other end
    /// stopped reading.
    Stalled,
}

/// Writes every item from `queue` to `sink`, as `frame` makes it, until the
/// queue closes or a write fails, batching what is ready into one flush. With
/// `stall`, a write that makes no progress for that long also ends it. An
/// item is dropped once written. Returns the sink and why it stopped; the
/// queue is closed by then.
pub async fn write_frames<M, S>(
    mut queue: tokio::sync::mpsc::Receiver<M>,
    mut sink: S,
    stall: Option<std::time::Duration>,
    frame: impl Fn(&M) -> Bytes,
) -> (S, WriteEnd)
where
    S: futures::Sink<Bytes> + Unpin,
{
    use futures::SinkExt;
    async fn bounded<F: std::future::Future<Output = Result<(), E>>, E>(
        stall: Option<std::time::Duration>,
        write: F,
    ) -> Result<(), WriteEnd> {
        let written = match stall {
            Some(limit) => tokio::time::timeout(limit, write)
                .await
                .map_err(|_| WriteEnd::Stalled)?,
            None => write.await,
        };
        written.map_err(|_| WriteEnd::Failed)
    }
    let end = async {
        while let Some(item) = queue.recv().await {
            bounded(stall, sink.feed(frame(&item))).await?;
            drop(item);
            while let Ok(more) = queue.try_recv() {
                bounded(stall, sink.feed(frame(&more))).await?;
            }
            bounded(stall, sink.flush()).await?;
        }
        Ok(())
    }
    .await
    .err()
    .unwrap_or(WriteEnd::Done);
    queue.close();
    (sink, end)
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::BytesMut;
    use tokio_util::codec::{Decoder, Encoder};

    #[test]
    fn frames_round_trip_under_the_limit() {
        let mut codec = codec(16);
        let mut buf = BytesMut::new();
        codec.encode(Bytes::from_static(b"hello"), &mut buf).unwrap();
        assert_eq!(&buf[..4], &[0, 0, 0, 5]);
        let frame = codec.decode(&mut buf).unwrap().unwrap();
        assert_eq!(&frame[..], b"hello");
    }

    #[test]
    fn a_frame_exactly_at_the_limit_is_accepted() {
        let mut codec = codec(4);
        let mut buf = BytesMut::from(&[0u8, 0, 0, 4, 1, 2, 3, 4][..]);
        assert_eq!(codec.decode(&mut buf).unwrap().unwrap().len(), 4);
    }

    #[test]
    fn an_encoder_refuses_to_send_an_oversized_frame() {
        let mut codec = codec(4);
        let mut buf = BytesMut::new();
        assert!(codec.encode(Bytes::from_static(b"12345"), &mut buf).is_err());
    }
}
