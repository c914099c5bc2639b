//! [`Receiver`]: the receiving end of an acknowledged stream.

use super::{StreamError, ACK_EVERY};

/// What to do with a piece of data ([`Receiver::on_data`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataVerdict {
    /// Store `data[skip..]` at the receiver's offset, then call [`Receiver::stored`].
    Store {
        /// Leading bytes the receiver already has (sent again after a resume): not stored.
        skip: usize,
    },
    /// Every byte is already stored: drop the piece (counted in
    /// [`ReceiverStats::duplicate_bytes`]).
    Duplicate,
}

/// What a receiver has measured over its life.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReceiverStats {
    /// Bytes stored.
    pub stored: u64,
    /// Bytes received that were already stored (sent again after a resume): dropped, never
    /// stored twice.
    pub duplicate_bytes: u64,
    /// Acknowledgements due so far.
    pub acks: u64,
}

/// The receiving end of stream `id`: accepts data in order from its offset, decides when to
/// acknowledge.
#[derive(Debug, Clone)]
pub struct Receiver {
    id: u64,
    total: u64,
    offset: u64,
    acked: u64,
    stats: ReceiverStats,
}

impl Receiver {
    /// A receiver of `total` bytes that has stored `offset` bytes already (its resume point:
    /// the stored file's length). An offset past the end is refused.
    pub fn new(id: u64, total: u64, offset: u64) -> Result<Receiver, StreamError> {
        if offset > total {
            return Err(StreamError::OffsetPastEnd { id, offset, total });
        }
        Ok(Receiver { id, total, offset, acked: offset, stats: ReceiverStats::default() })
    }

    /// The stream id.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// The stream's length.
    pub fn total(&self) -> u64 {
        self.total
    }

    /// Bytes stored: every byte before this offset.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// True once every byte is stored.
    pub fn is_complete(&self) -> bool {
        self.offset == self.total
    }

    /// The measurements so far.
    pub fn stats(&self) -> ReceiverStats {
        self.stats
    }

    /// A piece of `len` bytes at `offset`: what to store of it. Data after the receiver's
    /// offset ([`StreamError::Gap`]) or past the end ([`StreamError::PastEnd`]) is refused.
    pub fn on_data(&mut self, offset: u64, len: usize) -> Result<DataVerdict, StreamError> {
        let end = offset.saturating_add(len as u64);
        if offset > self.offset {
            return Err(StreamError::Gap { id: self.id, offset, expected: self.offset });
        }
        if end > self.total {
            return Err(StreamError::PastEnd { id: self.id, end, total: self.total });
        }
        if end <= self.offset {
            self.stats.duplicate_bytes += len as u64;
            return Ok(DataVerdict::Duplicate);
        }
        let skip = (self.offset - offset) as usize;
        self.stats.duplicate_bytes += skip as u64;
        Ok(DataVerdict::Store { skip })
    }

    /// `n` more bytes are stored. Returns the offset to acknowledge when one is due: every
    /// [`ACK_EVERY`] bytes, and at the end of the stream.
    pub fn stored(&mut self, n: u64) -> Option<u64> {
        self.offset = (self.offset + n).min(self.total);
        self.stats.stored += n;
        if self.offset - self.acked >= ACK_EVERY || (self.offset == self.total && self.offset > self.acked) {
            return self.take_ack();
        }
        None
    }

    /// The offset to acknowledge now if anything stored is not yet acknowledged (call at the
    /// end of a burst, so the sender's window never waits on a partial [`ACK_EVERY`]).
    pub fn flush_ack(&mut self) -> Option<u64> {
        (self.offset > self.acked).then(|| self.take_ack()).flatten()
    }

    /// The offset to acknowledge once more (after a resume, the receiver's offset).
    fn take_ack(&mut self) -> Option<u64> {
        self.acked = self.offset;
        self.stats.acks += 1;
        Some(self.offset)
    }
}
