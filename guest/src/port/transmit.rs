//! The transmit path: frames into the output queue ([`crate::outqueue::OutQueue`], the
//! transmit buffer) and out of it onto the port.
//!
//! Guarantees: a frame is queued whole with the session's next sequence number, or not at all
//! (counted and logged); nothing is queued after the session's BYE; an ERROR never answers an
//! ERROR; a flush offers at most [`MAX_WRITE`] bytes to one `write(2)` and stops at its budget
//! (a short write leaves the rest of the frame at the front of the queue).

use super::{Port, PortError, PortIo, MAX_WRITE, QUEUE_LIMIT};
use nix::errno::Errno;
use vport_common::{Header, Message, MessageType};

/// How a flush ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum FlushEnd {
    /// Queue empty.
    Done,
    /// EAGAIN with bytes left: wait for the next writable edge.
    Pending,
    /// The write budget ran out with bytes left and no EAGAIN seen.
    Budget,
    /// ENODEV.
    Unplugged,
}

impl<I: PortIo> Port<I> {
    /// Writes queued output until the queue is empty or the port would block. Returns true
    /// when nothing is left to write (or the port is gone).
    pub fn flush_out(&mut self) -> Result<bool, PortError> {
        let mut unlimited = usize::MAX;
        Ok(match self.flush(&mut unlimited)? {
            FlushEnd::Done | FlushEnd::Unplugged => true,
            FlushEnd::Pending | FlushEnd::Budget => false,
        })
    }

    /// Writes queued output until the queue is empty, the port would block, or `budget` bytes
    /// were written (the budget is decreased by what was written).
    pub(super) fn flush(&mut self, budget: &mut usize) -> Result<FlushEnd, PortError> {
        while !self.out.is_empty() {
            if *budget == 0 {
                return Ok(FlushEnd::Budget);
            }
            let chunk = self.out.front(MAX_WRITE.min(*budget));
            let offered = chunk.len();
            match self.io.write(chunk) {
                // A zero-byte write of a non-empty buffer would otherwise spin; wait for an edge.
                Ok(0) => return Ok(FlushEnd::Pending),
                Ok(n) => {
                    log::trace!("port {}: wrote {n} of {offered} bytes", self.name);
                    if n < offered {
                        self.counters.short_writes += 1;
                    }
                    self.out.consume(n);
                    self.counters.bytes_out += n as u64;
                    *budget = budget.saturating_sub(n);
                }
                Err(Errno::EAGAIN) => return Ok(FlushEnd::Pending),
                Err(Errno::EINTR) => {}
                Err(Errno::ENODEV) => return Ok(FlushEnd::Unplugged),
                Err(source) => return Err(PortError { port: self.name.clone(), op: "write", source }),
            }
        }
        Ok(FlushEnd::Done)
    }

    /// Queues `msg` as one frame with header session `session` and the next sequence number.
    /// Returns false (logged and counted) when it could not be queued.
    pub(super) fn send(&mut self, msg: &Message, session: u32) -> bool {
        if self.bye_queued {
            // BYE ends the session on the wire: a late reply (a guest-op completion, a second
            // BYE at shutdown) is dropped, never sent after it.
            self.counters.after_bye_dropped += 1;
            log::debug!("port {}: {:?} after BYE dropped", self.name, msg.kind());
            return false;
        }
        let wire = match msg.to_frame(session, self.seq).map(|f| f.encode()) {
            Ok(Ok(w)) => w,
            Ok(Err(e)) => {
                log::error!("port {}: cannot encode {:?}: {e}", self.name, msg.kind());
                return false;
            }
            Err(e) => {
                log::error!("port {}: cannot encode {:?}: {e}", self.name, msg.kind());
                return false;
            }
        };
        match self.out.push(&wire) {
            Ok(()) => {
                self.seq = self.seq.wrapping_add(1);
                self.counters.frames_out += 1;
                self.bye_queued = msg.kind() == MessageType::Bye;
                true
            }
            Err(len) => {
                self.counters.queue_overflows += 1;
                self.counters.dropped_bytes += len as u64;
                log::error!(
                    "port {}: output queue full ({} bytes queued, limit {QUEUE_LIMIT}): dropped a {:?} frame of {len} bytes",
                    self.name,
                    self.out.len(),
                    msg.kind()
                );
                false
            }
        }
    }

    /// Answers `request` with an ERROR in session `session`, unless the request was itself an
    /// ERROR (no loops).
    pub(super) fn reply_error(&mut self, request: &Header, session: u32, code: u16, text: String) {
        if request.kind == MessageType::Error as u8 {
            return;
        }
        self.counters.errors_sent += 1;
        self.send(&Message::error_for(request, code, text), session);
    }
}
