//! A port's transmit buffer: whole encoded frames waiting to be written, in order.
//!
//! Guarantees:
//! - Frames are appended whole or not at all ([`OutQueue::push`] refuses a frame that would pass
//!   the limit), and written in order, so short writes never interleave frames.
//! - [`OutQueue::drop_unstarted`] never tears a frame: a frame whose first bytes were written
//!   is kept to its end. A reader that saw its header would otherwise wait for a payload that
//!   never comes and swallow the frames after it (`docs/protocol.md`, "Torn frames").

use std::collections::VecDeque;

/// How many written bytes at the front make compacting the buffer worth its memmove.
const COMPACT_MIN: usize = 128 * 1024;

/// Whole encoded frames waiting to be written, in order.
#[derive(Debug, Default)]
pub struct OutQueue {
    buf: Vec<u8>,
    /// Index in `buf` of the first byte not yet written.
    head: usize,
    /// Stream position (bytes ever queued) just after each frame not completely written yet.
    ends: VecDeque<u64>,
    /// Stream position where the front frame starts.
    front_start: u64,
    /// Bytes ever queued (dropped ones excluded): the stream position of `buf.len()`.
    pushed: u64,
    limit: usize,
}

impl OutQueue {
    /// An empty queue holding at most `limit` bytes.
    pub fn new(limit: usize) -> Self {
        OutQueue { limit, ..OutQueue::default() }
    }

    /// Bytes waiting.
    pub fn len(&self) -> usize {
        self.buf.len() - self.head
    }

    /// True when nothing waits.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Frames waiting (a partly written one included).
    pub fn frames(&self) -> usize {
        self.ends.len()
    }

    /// Appends a whole frame, or refuses it (nothing appended; `Err` carries its length) if the
    /// queue would exceed its limit.
    pub fn push(&mut self, frame: &[u8]) -> Result<(), usize> {
        if self.len() + frame.len() > self.limit {
            return Err(frame.len());
        }
        if self.head > 0 && (self.head == self.buf.len() || self.head >= COMPACT_MIN) {
            self.buf.drain(..self.head);
            self.head = 0;
        }
        self.buf.extend_from_slice(frame);
        self.pushed += frame.len() as u64;
        self.ends.push_back(self.pushed);
        Ok(())
    }

    /// Up to `max` bytes from the front.
    pub fn front(&self, max: usize) -> &[u8] {
        let end = self.buf.len().min(self.head + max);
        &self.buf[self.head..end]
    }

    /// Marks `n` front bytes as written.
    pub fn consume(&mut self, n: usize) {
        self.head = (self.head + n).min(self.buf.len());
        let written = self.written_pos();
        while let Some(&end) = self.ends.front() {
            if end > written {
                break;
            }
            self.front_start = end;
            self.ends.pop_front();
        }
        if self.head == self.buf.len() {
            self.buf.clear();
            self.head = 0;
        }
    }

    /// True if the first bytes of the front frame have been written and the rest have not.
    pub fn mid_frame(&self) -> bool {
        !self.ends.is_empty() && self.front_start < self.written_pos()
    }

    /// Drops every frame not started yet and keeps the rest of a frame whose first bytes were
    /// written (see the module docs). Returns how many bytes were dropped.
    pub fn drop_unstarted(&mut self) -> usize {
        let keep = match self.ends.front() {
            Some(&end) if self.mid_frame() => (end - self.written_pos()) as usize,
            _ => 0,
        };
        let dropped = self.len() - keep;
        self.buf.truncate(self.head + keep);
        self.pushed -= dropped as u64;
        self.ends.truncate(usize::from(keep > 0));
        if self.ends.is_empty() {
            self.front_start = self.pushed;
        }
        if self.head == self.buf.len() {
            self.buf.clear();
            self.head = 0;
        }
        dropped
    }

    /// Drops everything, a partly written frame included (its reader is gone); returns how
    /// many bytes were dropped.
    pub fn clear(&mut self) -> usize {
        let n = self.len();
        self.pushed -= n as u64;
        self.front_start = self.pushed;
        self.buf.clear();
        self.head = 0;
        self.ends.clear();
        n
    }

    /// Stream position of the first unwritten byte.
    fn written_pos(&self) -> u64 {
        self.pushed - self.len() as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_come_out_whole_and_in_order_and_the_limit_refuses_whole_frames() {
        let mut q = OutQueue::new(10);
        q.push(b"aaaa").unwrap();
        q.push(b"bbbb").unwrap();
        assert_eq!(q.push(b"ccc"), Err(3), "11 bytes would pass the 10-byte limit");
        assert_eq!((q.len(), q.frames()), (8, 2));
        assert_eq!(q.front(5), b"aaaab");
        q.consume(5);
        assert_eq!((q.front(99), q.frames()), (&b"bbb"[..], 1));
        q.consume(3);
        assert!(q.is_empty());
        assert_eq!(q.frames(), 0);
    }

    #[test]
    fn dropping_keeps_the_rest_of_a_frame_already_started() {
        let mut q = OutQueue::new(1 << 20);
        for f in [&b"frame-one"[..], b"frame-two", b"frame-three"] {
            q.push(f).unwrap();
        }
        q.consume(4); // "fram" of frame-one is on the wire
        assert!(q.mid_frame());
        assert_eq!(q.drop_unstarted(), 9 + 11);
        assert_eq!(q.front(99), b"e-one");
        assert_eq!(q.frames(), 1);
        q.consume(5);
        assert!(q.is_empty() && !q.mid_frame());
        // The queue is usable afterwards, boundaries intact.
        q.push(b"next").unwrap();
        q.consume(2);
        assert!(q.mid_frame());
        assert_eq!(q.drop_unstarted(), 0);
        assert_eq!(q.front(99), b"xt");
    }

    #[test]
    fn dropping_at_a_frame_boundary_drops_everything() {
        let mut q = OutQueue::new(1 << 20);
        q.push(b"one").unwrap();
        q.push(b"two").unwrap();
        q.consume(3);
        assert!(!q.mid_frame());
        assert_eq!(q.drop_unstarted(), 3);
        assert!(q.is_empty());
        q.push(b"three").unwrap();
        assert!(!q.mid_frame());
        assert_eq!(q.front(99), b"three");
    }

    #[test]
    fn clear_drops_a_started_frame_too() {
        let mut q = OutQueue::new(1 << 20);
        q.push(b"one").unwrap();
        q.consume(1);
        assert_eq!(q.clear(), 2);
        assert!(q.is_empty() && !q.mid_frame());
        q.push(b"two").unwrap();
        q.consume(3);
        assert!(q.is_empty() && !q.mid_frame());
    }

    #[test]
    fn compaction_keeps_boundaries() {
        let mut q = OutQueue::new(1 << 22);
        let frame = vec![7u8; 1000];
        for _ in 0..300 {
            q.push(&frame).unwrap();
        }
        q.consume(200 * 1000 + 10);
        q.push(&frame).unwrap(); // compacts: 200 KiB written at the front
        assert!(q.mid_frame());
        assert_eq!(q.drop_unstarted(), 100 * 1000);
        assert_eq!(q.len(), 990);
    }

    #[test]
    fn queue_overflow_is_counted_not_silent() {
        let mut q = OutQueue::new(10);
        assert_eq!(q.push(&[1; 6]), Ok(()));
        assert_eq!(q.push(&[2; 6]), Err(6));
        assert_eq!(q.front(4), &[1; 4]);
        q.consume(4);
        assert_eq!(q.push(&[3; 8]), Ok(()));
        assert_eq!(q.len(), 10);
        assert_eq!(q.front(100), &[1, 1, 3, 3, 3, 3, 3, 3, 3, 3]);
        assert_eq!(q.clear(), 10);
    }
}
