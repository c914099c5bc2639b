//! Bounded line splitting for QMP's newline-delimited stream (pure: no I/O).
//!
//! QMP sends one JSON message per line (QEMU ends lines with `\r\n`). [`LineSplitter`] turns
//! bytes, pushed in any chunking, into complete lines, and refuses any line longer than its
//! limit instead of buffering it: memory stays below `limit` plus the largest single push, even
//! on a stream that never sends a newline.

use thiserror::Error;

/// The longest QMP line vport accepts, newline excluded: 1 MiB. QEMU's replies to the commands
/// vport sends are far smaller (`query-chardev` is about 100 bytes a chardev; even
/// `query-qmp-schema`, which vport does not send, is a few hundred KiB).
pub const MAX_LINE_BYTES: usize = 1 << 20;

/// A line longer than the limit began; the splitter is unusable from here on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
#[error("a line longer than {limit} bytes")]
pub struct LineTooLong {
    /// The limit that was exceeded.
    pub limit: usize,
}

/// Splits a byte stream into lines of at most `limit` bytes; see the module docs.
#[derive(Debug, Clone)]
pub struct LineSplitter {
    buf: Vec<u8>,
    /// Start in `buf` of the first line not yet returned.
    start: usize,
    /// Bytes from `start` on already known to hold no newline.
    scanned: usize,
    limit: usize,
    failed: bool,
}

impl LineSplitter {
    /// A splitter that accepts lines of up to `limit` bytes (newline excluded).
    pub fn new(limit: usize) -> Self {
        LineSplitter { buf: Vec::new(), start: 0, scanned: 0, limit, failed: false }
    }

    /// Appends bytes read from the stream. After a [`LineTooLong`] the bytes are dropped.
    pub fn push(&mut self, bytes: &[u8]) {
        if self.failed {
            return;
        }
        if self.start > 0 && self.start == self.buf.len() {
            self.buf.clear();
            self.start = 0;
        }
        self.buf.extend_from_slice(bytes);
    }

    /// The next complete line without its `\n` (a `\r` before it is kept: JSON treats it as
    /// white space), `None` until one is complete, or [`LineTooLong`] as soon as the line being
    /// read has more than `limit` bytes, complete or not; it is returned again on every later
    /// call.
    pub fn next_line(&mut self) -> Option<Result<Vec<u8>, LineTooLong>> {
        if self.failed {
            return Some(Err(LineTooLong { limit: self.limit }));
        }
        let rest = &self.buf[self.start + self.scanned..];
        match rest.iter().position(|&b| b == b'\n') {
            Some(i) => {
                let len = self.scanned + i;
                if len > self.limit {
                    return Some(Err(self.fail()));
                }
                let line = self.buf[self.start..self.start + len].to_vec();
                self.start += len + 1;
                self.scanned = 0;
                if self.start > self.limit {
                    // Compact now and then, so consumed lines do not pile up.
                    self.buf.drain(..self.start);
                    self.start = 0;
                }
                Some(Ok(line))
            }
            None => {
                self.scanned = self.buf.len() - self.start;
                (self.scanned > self.limit).then(|| Err(self.fail()))
            }
        }
    }

    /// Bytes of a line that has begun but is not complete yet.
    pub fn partial(&self) -> usize {
        self.buf.len() - self.start
    }

    fn fail(&mut self) -> LineTooLong {
        self.failed = true;
        self.buf = Vec::new();
        self.start = 0;
        self.scanned = 0;
        LineTooLong { limit: self.limit }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drain(s: &mut LineSplitter) -> Vec<Result<Vec<u8>, LineTooLong>> {
        std::iter::from_fn(|| s.next_line()).take(100).collect()
    }

    #[test]
    fn lines_come_out_whole_in_any_chunking() {
        let stream = b"{\"a\":1}\r\n\n{\"b\":2}\nrest";
        for chunk in 1..stream.len() {
            let mut s = LineSplitter::new(16);
            let mut got = Vec::new();
            for part in stream.chunks(chunk) {
                s.push(part);
                got.extend(drain(&mut s));
            }
            let want: Vec<Result<Vec<u8>, LineTooLong>> =
                vec![Ok(b"{\"a\":1}\r".to_vec()), Ok(Vec::new()), Ok(b"{\"b\":2}".to_vec())];
            assert_eq!(got, want, "chunk {chunk}");
            assert_eq!(s.partial(), 4);
        }
    }

    #[test]
    fn a_line_at_the_limit_passes_and_one_byte_more_fails_for_good() {
        let mut s = LineSplitter::new(4);
        s.push(b"abcd\nabcde\nok\n");
        assert_eq!(s.next_line(), Some(Ok(b"abcd".to_vec())));
        assert_eq!(s.next_line(), Some(Err(LineTooLong { limit: 4 })));
        s.push(b"more\n");
        assert_eq!(s.next_line(), Some(Err(LineTooLong { limit: 4 })), "no resynchronisation");
        assert_eq!(s.partial(), 0, "the buffer is released");
    }

    #[test]
    fn an_endless_line_fails_without_waiting_for_its_newline_and_stays_bounded() {
        let mut s = LineSplitter::new(1000);
        let chunk = [b'x'; 300];
        let mut pushed = 0;
        let err = loop {
            s.push(&chunk);
            pushed += chunk.len();
            assert!(s.partial() <= 1000 + chunk.len(), "buffered {}", s.partial());
            if let Some(r) = s.next_line() {
                break r;
            }
            assert!(pushed < 10_000, "no error after {pushed} bytes");
        };
        assert_eq!(err, Err(LineTooLong { limit: 1000 }));
        assert_eq!(pushed, 1200);
    }

    #[test]
    fn consumed_lines_do_not_pile_up() {
        let mut s = LineSplitter::new(8);
        s.push(b"1");
        for _ in 0..10_000 {
            // Always a partial line left over, so the buffer is never simply emptied.
            s.push(b"2345\n1");
            assert_eq!(s.next_line(), Some(Ok(b"12345".to_vec())));
            assert!(s.buf.len() <= 8 + 6 + 6, "{}", s.buf.len());
        }
    }
}
