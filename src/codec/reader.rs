//! Reading length-delimited frames from a stream we don't trust.
//!
//! tokio-util's `LengthDelimitedCodec` reserves a frame's declared length as
//! soon as it has read the 4-byte header, so four headers declaring 1 GiB cost
//! 4 GiB of address space before a single byte of body arrived. This reader
//! starts a frame's buffer at 8 KiB and doubles it only once it is full of
//! bytes that arrived (so it never holds more than twice what arrived, or
//! 8 KiB), can charge the growth to a budget shared by every connection, and
//! gives a started frame a deadline so a slow sender can't pin its buffer
//! forever.
//!
//! [`FrameReader::next_frame`] is cancel-safe: progress lives in the reader,
//! so a caller may `select!` it against an idle timer or a shutdown signal.

use std::sync::Arc;
use std::time::Duration;

use bytes::{BufMut, Bytes};
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

/// The budget counts memory in these units (a semaphore permit each).
const UNIT: usize = 1024;
/// The first allocation for a frame's body, made once its header is in and
/// never charged to the budget: frames up to this size (ordinary requests)
/// never wait behind large partial ones, and a header alone can't take any
/// budget. Its cost is bounded by the connection count instead.
pub const UNBUDGETED_FRAME: usize = 8 * 1024;

/// Memory that partly received frames may hold across every connection that
/// shares this budget. Cheap to clone.
#[derive(Clone, Debug)]
pub struct ReceiveBudget {
    units: Arc<Semaphore>,
}

impl ReceiveBudget {
    /// A budget of `bytes` (rounded up to whole KiB).
    pub fn new(bytes: usize) -> Self {
        let units = bytes.div_ceil(UNIT).clamp(1, Semaphore::MAX_PERMITS);
        ReceiveBudget {
            units: Arc::new(Semaphore::new(units)),
        }
    }

    /// Bytes not held by any partly received frame right now.
    pub fn available_bytes(&self) -> usize {
        self.units.available_permits() * UNIT
    }
}

/// Why no frame could be read.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// The header declared more than the limit; the stream can't be
    /// resynchronised after this.
    #[error("a frame declared {declared} bytes, over the limit of {limit} bytes")]
    TooLarge {
        /// The declared length.
        declared: usize,
        /// The limit in force.
        limit: usize,
    },
    /// A frame started but did not complete within the read timeout.
    #[error("a frame did not arrive completely within {0:?}")]
    Slow(Duration),
    /// The stream ended in the middle of a frame.
    #[error("the connection closed in the middle of a frame")]
    Truncated,
    /// The stream failed.
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// A frame in progress.
#[derive(Default)]
struct Partial {
    header: [u8; 4],
    header_len: usize,
    declared: Option<usize>,
    body: Vec<u8>,
    /// Budget held for `body`'s capacity.
    charge: Option<OwnedSemaphorePermit>,
    /// When the frame's first byte arrived.
    started: Option<Instant>,
}

/// Reads frames from `R` with a size limit, an optional per-frame deadline and
/// an optional shared memory budget.
pub struct FrameReader<R> {
    io: R,
    max_frame: usize,
    read_timeout: Option<Duration>,
    budget: Option<ReceiveBudget>,
    partial: Partial,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    /// A reader that refuses frames over `max_frame` bytes.
    pub fn new(io: R, max_frame: usize) -> Self {
        FrameReader {
            io,
            max_frame,
            read_timeout: None,
            budget: None,
            partial: Partial::default(),
        }
    }

    /// Once a frame's first byte has arrived, the whole frame must arrive
    /// within `timeout`.
    pub fn with_read_timeout(mut self, timeout: Duration) -> Self {
        self.read_timeout = Some(timeout);
        self
    }

    /// Charges the memory partly received frames hold beyond their first
    /// `UNBUDGETED_FRAME` bytes to `budget`; a frame that needs more waits
    /// (within its read timeout) for others to finish.
    pub fn with_budget(mut self, budget: ReceiveBudget) -> Self {
        self.budget = Some(budget);
        self
    }

    /// Changes the frame limit for the frames that follow.
    pub fn set_max_frame(&mut self, max_frame: usize) {
        self.max_frame = max_frame;
    }

    /// The stream, once reading is over.
    pub fn into_inner(self) -> R {
        self.io
    }

    /// True while a frame is partly received.
    pub fn in_frame(&self) -> bool {
        self.partial.header_len > 0
    }

    /// The next frame, or `None` when the stream ends cleanly between frames.
    /// Cancel-safe. After an error the partial frame is dropped (and its
    /// budget given back): the stream can't be resynchronised anyway.
    pub async fn next_frame(&mut self) -> Result<Option<Bytes>, ReadError> {
        let result = self.read_frame().await;
        if result.is_err() {
            self.partial = Partial::default();
        }
        result
    }

    async fn read_frame(&mut self) -> Result<Option<Bytes>, ReadError> {
        loop {
            let deadline = self.deadline();
            let partial = &mut self.partial;
            let declared = match partial.declared {
                Some(declared) => declared,
                None if partial.header_len < 4 => {
                    let read = self.io.read(&mut partial.header[partial.header_len..]);
                    let n = within(deadline, self.read_timeout, read).await??;
                    if n == 0 {
                        return if partial.header_len == 0 {
                            Ok(None)
                        } else {
                            Err(ReadError::Truncated)
                        };
                    }
                    partial.header_len += n;
                    partial.started.get_or_insert_with(Instant::now);
                    continue;
                }
                None => {
                    let declared = u32::from_be_bytes(partial.header) as usize;
                    if declared > self.max_frame {
                        return Err(ReadError::TooLarge {
                            declared,
                            limit: self.max_frame,
                        });
                    }
                    partial.declared = Some(declared);
                    declared
                }
            };
            let len = partial.body.len();
            if len == declared {
                let frame = std::mem::take(&mut partial.body);
                self.partial = Partial::default();
                return Ok(Some(Bytes::from(frame)));
            }
            if partial.body.capacity() == len {
                // The buffer is full of bytes that arrived: double it, never
                // past the declared length, charging what exceeds the first,
                // free, allocation.
                let target = if len == 0 {
                    declared.min(UNBUDGETED_FRAME)
                } else {
                    declared.min(len.saturating_mul(2))
                };
                if let Some(budget) = &self.budget {
                    let held = partial.charge.as_ref().map_or(0, |p| p.num_permits());
                    let wanted = target
                        .saturating_sub(UNBUDGETED_FRAME)
                        .div_ceil(UNIT)
                        .saturating_sub(held);
                    if wanted > 0 {
                        let wanted = u32::try_from(wanted).unwrap_or(u32::MAX);
                        let acquire = budget.units.clone().acquire_many_owned(wanted);
                        let permit = within(deadline, self.read_timeout, acquire)
                            .await?
                            .expect("the budget's semaphore is never closed");
                        match &mut partial.charge {
                            Some(charge) => charge.merge(permit),
                            None => partial.charge = Some(permit),
                        }
                    }
                }
                partial.body.reserve_exact(target - len);
            }
            let room = declared - len;
            let mut room = (&mut partial.body).limit(room);
            let n = within(deadline, self.read_timeout, self.io.read_buf(&mut room)).await??;
            if n == 0 {
                return Err(ReadError::Truncated);
            }
        }
    }

    fn deadline(&self) -> Option<Instant> {
        Some(self.partial.started? + self.read_timeout?)
    }
}

/// Runs `future`, failing with [`ReadError::Slow`] if `deadline` passes first.
async fn within<F: std::future::Future>(
    deadline: Option<Instant>,
    timeout: Option<Duration>,
    future: F,
) -> Result<F::Output, ReadError> {
    match deadline {
        Some(deadline) => tokio::time::timeout_at(deadline, future)
            .await
            .map_err(|_| ReadError::Slow(timeout.unwrap_or_default())),
        None => Ok(future.await),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    fn frame(body: &[u8]) -> Vec<u8> {
        let mut out = (body.len() as u32).to_be_bytes().to_vec();
        out.extend_from_slice(body);
        out
    }

    #[tokio::test]
    async fn reads_frames_split_anywhere_and_ends_cleanly() {
        let (mut tx, rx) = tokio::io::duplex(7);
        let mut reader = FrameReader::new(rx, 1024);
        let writer = tokio::spawn(async move {
            let mut bytes = frame(b"hello");
            bytes.extend(frame(b""));
            bytes.extend(frame(&[9u8; 300]));
            for byte in bytes {
                tx.write_all(&[byte]).await.unwrap();
            }
        });
        assert_eq!(&reader.next_frame().await.unwrap().unwrap()[..], b"hello");
        assert_eq!(reader.next_frame().await.unwrap().unwrap().len(), 0);
        assert_eq!(&reader.next_frame().await.unwrap().unwrap()[..], &[9u8; 300][..]);
        writer.await.unwrap();
        assert!(reader.next_frame().await.unwrap().is_none());
    }

    #[tokio::test]
    async fn an_oversized_header_is_refused_before_any_allocation() {
        let (mut tx, rx) = tokio::io::duplex(64);
        tx.write_all(&(1u32 << 30).to_be_bytes()).await.unwrap();
        let mut reader = FrameReader::new(rx, 1 << 20);
        let err = reader.next_frame().await.unwrap_err();
        assert!(matches!(err, ReadError::TooLarge { declared, limit } if declared == 1 << 30 && limit == 1 << 20));
        assert_eq!(reader.partial.body.capacity(), 0);
    }

    #[tokio::test]
    async fn memory_follows_the_bytes_that_arrived_not_the_declared_length() {
        let (mut tx, rx) = tokio::io::duplex(1 << 20);
        let declared = 512 * 1024 * 1024u32;
        tx.write_all(&declared.to_be_bytes()).await.unwrap();
        tx.write_all(&[1u8; 100_000]).await.unwrap();
        let mut reader = FrameReader::new(rx, usize::MAX);
        // The frame can't complete; stop waiting once the bytes are in.
        let _ = tokio::time::timeout(Duration::from_millis(200), reader.next_frame()).await;
        assert_eq!(reader.partial.body.len(), 100_000);
        assert!(
            reader.partial.body.capacity() <= 2 * 100_000,
            "{} bytes reserved for 100000 received",
            reader.partial.body.capacity()
        );
        assert!(reader.in_frame());
    }

    #[tokio::test]
    async fn a_header_alone_takes_no_budget() {
        let budget = ReceiveBudget::new(64 * 1024);
        let (mut tx, rx) = tokio::io::duplex(1 << 20);
        tx.write_all(&(4u32 << 20).to_be_bytes()).await.unwrap();
        tx.write_all(&[1u8; 100]).await.unwrap();
        let mut reader = FrameReader::new(rx, 8 << 20).with_budget(budget.clone());
        let _ = tokio::time::timeout(Duration::from_millis(100), reader.next_frame()).await;
        assert!(reader.in_frame());
        assert_eq!(reader.partial.body.capacity(), UNBUDGETED_FRAME);
        assert_eq!(budget.available_bytes(), 64 * 1024);
    }

    #[tokio::test]
    async fn a_started_frame_must_finish_within_the_read_timeout() {
        let (mut tx, rx) = tokio::io::duplex(64);
        tx.write_all(&frame(b"complete")).await.unwrap();
        tx.write_all(&[0, 0, 0, 10, 1, 2]).await.unwrap();
        let mut reader = FrameReader::new(rx, 1024).with_read_timeout(Duration::from_millis(100));
        assert_eq!(&reader.next_frame().await.unwrap().unwrap()[..], b"complete");
        let started = std::time::Instant::now();
        assert!(matches!(reader.next_frame().await, Err(ReadError::Slow(_))));
        assert!(started.elapsed() < Duration::from_secs(5));
        drop(tx);
    }

    #[tokio::test]
    async fn no_timeout_applies_between_frames() {
        let (mut tx, rx) = tokio::io::duplex(64);
        let mut reader = FrameReader::new(rx, 1024).with_read_timeout(Duration::from_millis(20));
        let writer = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(150)).await;
            tx.write_all(&frame(b"late but whole")).await.unwrap();
        });
        assert_eq!(&reader.next_frame().await.unwrap().unwrap()[..], b"late but whole");
        writer.await.unwrap();
    }

    #[tokio::test]
    async fn the_stream_ending_mid_frame_is_an_error() {
        let (mut tx, rx) = tokio::io::duplex(64);
        tx.write_all(&[0, 0, 0, 10, 1, 2, 3]).await.unwrap();
        drop(tx);
        let mut reader = FrameReader::new(rx, 1024);
        assert!(matches!(reader.next_frame().await, Err(ReadError::Truncated)));
    }

    #[tokio::test]
    async fn partial_frames_share_one_budget_and_release_it_when_done() {
        let budget = ReceiveBudget::new(256 * 1024);
        let (mut tx1, rx1) = tokio::io::duplex(1 << 20);
        let (mut tx2, rx2) = tokio::io::duplex(1 << 20);
        let mut first = FrameReader::new(rx1, 1 << 20).with_budget(budget.clone());
        let mut second = FrameReader::new(rx2, 1 << 20)
            .with_budget(budget.clone())
            .with_read_timeout(Duration::from_millis(300));
        // The first frame grows to 200 KiB (8, 16, ... 128, 200 KiB), 192 KiB
        // of it charged.
        tx1.write_all(&(200u32 * 1024).to_be_bytes()).await.unwrap();
        tx1.write_all(&[1u8; 150 * 1024]).await.unwrap();
        let _ = tokio::time::timeout(Duration::from_millis(100), first.next_frame()).await;
        assert!(budget.available_bytes() <= 256 * 1024 - 150 * 1024);
        // The second can't get the 100 KiB it needs before its deadline.
        tx2.write_all(&frame(&[2u8; 100 * 1024])).await.unwrap();
        assert!(matches!(second.next_frame().await, Err(ReadError::Slow(_))));
        // Once the first completes, its memory is back in the budget.
        tx1.write_all(&[1u8; 50 * 1024]).await.unwrap();
        assert_eq!(first.next_frame().await.unwrap().unwrap().len(), 200 * 1024);
        assert_eq!(budget.available_bytes(), 256 * 1024);
    }
}
