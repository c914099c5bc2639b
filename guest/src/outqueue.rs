//! A port's transmit buffer: whole encoded frames waiting to be written, in order.
//!
//! Guarantees:
//! - Frames are appended whole or not at all ([`OutQueue::push`] refuses a frame that would pass
//!   the limit), and written in order, so short writes never interleave frames.
//! - [`OutQueue::drop_unstarted`] never tears a frame: a frame whose first bytes were written
//!   is kept to its end. A reader that saw its header would otherwise wait for a payload that
//!   never comes and swallow the frames after it (`docs/protocol.md`, "Torn frames").

use std::collections::VecDeque;

/// Frames are appended to the last segment while it holds less than this; then a new segment
/// starts. Small frames share a segment (one `write()` covers several), a large frame has one
/// to itself, and no byte is ever moved once queued (a single buffer compacted by `memmove`
/// moved each byte of a SOURCE about twice: measured, a fifth of its cost).
const SEGMENT: usize = 64 * 1024;
/// A written segment up to this capacity (one frame of the largest payload the agent takes)
/// is kept for the next one, not freed: a stream of large frames reuses one buffer.
const KEEP_SPARE: usize = vport_common::frame::DEFAULT_MAX_PAYLOAD as usize + 4096;
/// What [`OutQueue::release_spare`] keeps.
const KEEP_IDLE: usize = 2 * SEGMENT;

/// Why [`OutQueue::push_encoded`] refused a frame.
#[derive(Debug, PartialEq, Eq)]
pub enum PushError<E> {
    /// The frame (this many bytes) would take the queue past its limit.
    Full(usize),
    /// The frame could not be encoded.
    Encode(E),
}

/// Whole encoded frames waiting to be written, in order.
#[derive(Debug, Default)]
pub struct OutQueue {
    /// The waiting bytes, in segments; a frame is always within one segment.
    segs: VecDeque<Vec<u8>>,
    /// Index in the first segment of the first byte not yet written.
    head: usize,
    /// Bytes waiting.
    waiting: usize,
    /// A written segment's buffer, kept to hold the next one.
    spare: Vec<u8>,
    /// Stream position (bytes ever queued) just after each frame not completely written yet.
    ends: VecDeque<u64>,
    /// Stream position where the front frame starts.
    front_start: u64,
    /// Bytes ever queued (dropped ones excluded).
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
        self.waiting
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
        let copy = |buf: &mut Vec<u8>| {
            buf.extend_from_slice(frame);
            Ok::<(), std::convert::Infallible>(())
        };
        self.push_encoded(copy).map_err(|e| match e {
            PushError::Full(len) => len,
            PushError::Encode(never) => match never {},
        })
    }

    /// Appends the frame that `encode` appends to the buffer it is given: encoded in place, its
    /// bytes are not copied again. `encode` appends one whole frame, or fails (whatever it
    /// appended is removed). A frame that would take the queue past its limit is removed again
    /// and refused ([`PushError::Full`]); either way nothing of a refused frame stays.
    pub fn push_encoded<E>(&mut self, encode: impl FnOnce(&mut Vec<u8>) -> Result<(), E>) -> Result<(), PushError<E>> {
        let mut seg = match self.segs.pop_back() {
            Some(last) if last.len() < SEGMENT => last,
            last => {
                self.segs.extend(last);
                std::mem::take(&mut self.spare)
            }
        };
        let start = seg.len();
        let encoded = encode(&mut seg);
        let len = seg.len() - start;
        let refused = match encoded {
            Err(e) => Some(PushError::Encode(e)),
            Ok(()) if self.waiting + len > self.limit => Some(PushError::Full(len)),
            Ok(()) => None,
        };
        if refused.is_some() {
            seg.truncate(start);
        }
        if !seg.is_empty() {
            self.segs.push_back(seg);
        } else if seg.capacity() > self.spare.capacity() && seg.capacity() <= KEEP_SPARE {
            // A refused frame in a fresh segment: its buffer stays the spare.
            self.spare = seg;
        }
        if let Some(refused) = refused {
            return Err(refused);
        }
        self.waiting += len;
        self.pushed += len as u64;
        self.ends.push_back(self.pushed);
        Ok(())
    }

    /// Up to `max` bytes from the front (fewer at the end of a segment: the next call gives
    /// the rest).
    pub fn front(&self, max: usize) -> &[u8] {
        match self.segs.front() {
            Some(seg) => &seg[self.head..seg.len().min(self.head + max)],
            None => &[],
        }
    }

    /// Marks `n` front bytes as written.
    pub fn consume(&mut self, n: usize) {
        let mut n = n.min(self.waiting);
        self.waiting -= n;
        while let Some(seg) = self.segs.front() {
            let here = (seg.len() - self.head).min(n);
            self.head += here;
            n -= here;
            if self.head < seg.len() {
                break;
            }
            self.pop_front_segment();
        }
        let written = self.written_pos();
        while let Some(&end) = self.ends.front() {
            if end > written {
                break;
            }
            self.front_start = end;
            self.ends.pop_front();
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
        // A frame is within one segment: the rest of a started one is in the first.
        self.segs.truncate(1);
        if let Some(seg) = self.segs.front_mut() {
            seg.truncate(self.head + keep);
        }
        if keep == 0 {
            self.segs.clear();
            self.head = 0;
        }
        self.waiting = keep;
        self.pushed -= dropped as u64;
        self.ends.truncate(usize::from(keep > 0));
        if self.ends.is_empty() {
            self.front_start = self.pushed;
        }
        dropped
    }

    /// Drops everything, a partly written frame included (its reader is gone); returns how
    /// many bytes were dropped.
    pub fn clear(&mut self) -> usize {
        let n = self.len();
        self.pushed -= n as u64;
        self.front_start = self.pushed;
        self.segs.clear();
        self.head = 0;
        self.waiting = 0;
        self.ends.clear();
        n
    }

    /// Frees the kept segment buffer if it is larger than a small frame needs: for a port
    /// that has gone idle after a stream of large frames.
    pub fn release_spare(&mut self) {
        if self.spare.capacity() > KEEP_IDLE {
            self.spare = Vec::new();
        }
    }

    /// Stream position of the first unwritten byte.
    fn written_pos(&self) -> u64 {
        self.pushed - self.len() as u64
    }

    /// Removes the written first segment, keeping its buffer for the next one if small.
    fn pop_front_segment(&mut self) {
        self.head = 0;
        if let Some(mut seg) = self.segs.pop_front() {
            if seg.capacity() <= KEEP_SPARE && seg.capacity() > self.spare.capacity() {
                seg.clear();
                self.spare = seg;
            }
        }
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
        let failed = q.push_encoded(|b| {
            b.push(b'x');
            Err("cannot")
        });
        assert_eq!(failed, Err(PushError::Encode("cannot")), "and its byte is not queued");
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

#[cfg(test)]
mod model_tests {
    use super::*;
    use proptest::prelude::*;

    #[derive(Debug, Clone)]
    enum Op {
        Push(usize),
        Write(usize),
        DropUnstarted,
        Clear,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (1usize..90_000).prop_map(Op::Push),
            4 => (0usize..100_000).prop_map(Op::Write),
            1 => Just(Op::DropUnstarted),
            1 => Just(Op::Clear),
        ]
    }

    proptest! {
        /// The segmented queue against a flat model (one buffer, frame ends as stream
        /// positions): the same bytes come out in the same order, whole frames are refused
        /// at the limit, and dropping keeps exactly the rest of a started frame.
        #[test]
        fn the_queue_behaves_as_one_flat_buffer(ops in proptest::collection::vec(op(), 1..60)) {
            let limit = 300_000;
            let mut q = OutQueue::new(limit);
            // The model: waiting bytes, and the length of each waiting frame's unwritten part.
            let mut flat: Vec<u8> = vec![];
            let mut frames: VecDeque<usize> = VecDeque::new();
            let mut started = false;
            let mut next = 0u8;
            for op in ops {
                match op {
                    Op::Push(len) => {
                        next = next.wrapping_add(1);
                        let frame = vec![next; len];
                        let fits = flat.len() + len <= limit;
                        prop_assert_eq!(q.push(&frame), if fits { Ok(()) } else { Err(len) });
                        if fits {
                            flat.extend(&frame);
                            frames.push_back(len);
                        }
                    }
                    Op::Write(max) => {
                        // Write as the port does: front() until max bytes or empty.
                        let mut left = max.min(flat.len());
                        while left > 0 {
                            let n = q.front(left).len();
                            prop_assert!(n > 0, "front empty with bytes waiting");
                            prop_assert_eq!(q.front(left), &flat[..n]);
                            q.consume(n);
                            flat.drain(..n);
                            left -= n;
                            let mut n = n;
                            while n > 0 {
                                let Some(front) = frames.front_mut() else { break };
                                let here = (*front).min(n);
                                *front -= here;
                                n -= here;
                                started = *front > 0;
                                if *front == 0 {
                                    frames.pop_front();
                                }
                            }
                        }
                    }
                    Op::DropUnstarted => {
                        let keep = if started { frames.front().copied().unwrap_or(0) } else { 0 };
                        prop_assert_eq!(q.drop_unstarted(), flat.len() - keep);
                        flat.truncate(keep);
                        frames.truncate(usize::from(keep > 0));
                        started = keep > 0;
                    }
                    Op::Clear => {
                        prop_assert_eq!(q.clear(), flat.len());
                        flat.clear();
                        frames.clear();
                        started = false;
                    }
                }
                prop_assert_eq!(q.len(), flat.len());
                prop_assert_eq!(q.frames(), frames.len());
                prop_assert_eq!(q.mid_frame(), started);
            }
        }
    }
}
