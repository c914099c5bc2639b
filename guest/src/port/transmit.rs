//! The transmit path: frames into the output queue ([`crate::outqueue::OutQueue`], the
//! transmit buffer) and out of it onto the port.
//!
//! Guarantees: a frame is queued whole with the session's next sequence number, or not at all
//! (counted and logged); nothing is queued after the session's BYE; an ERROR never answers an
//! ERROR; a flush offers at most [`MAX_WRITE`] bytes to one `write(2)` and stops at its budget
//! (a short write leaves the rest of the frame at the front of the queue).

use super::{Port, PortError, PortIo, MAX_WRITE, QUEUE_LIMIT};
use crate::outqueue::PushError;
use nix::errno::Errno;
use std::convert::Infallible;
use vport_common::message::BulkError;
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
        if !self.may_send(msg.kind()) {
            return false;
        }
        let seq = self.seq;
        let pushed = self.out.push_encoded(|buf| msg.encode_into(session, seq, buf).map_err(BulkError::Message));
        match self.settle::<Infallible>(msg.kind(), pushed) {
            Ok(queued) => queued,
            Err(never) => match never {},
        }
    }

    /// Whether a frame of `kind` may still be sent: not after BYE, which ends the session on
    /// the wire (a late reply, a guest-op completion or a second BYE at shutdown, is dropped
    /// and counted).
    pub(super) fn may_send(&mut self, kind: MessageType) -> bool {
        if self.bye_queued {
            self.counters.after_bye_dropped += 1;
            log::debug!("port {}: {kind:?} after BYE dropped", self.name);
        }
        !self.bye_queued
    }

    /// The bookkeeping of a frame of `kind` given to the queue with the next sequence number
    /// (after [`Port::may_send`]): `Ok(true)` queued; `Ok(false)` not queued (it could not be
    /// encoded, or the queue is full: logged and counted); `Err` the filler's error (nothing
    /// queued; the caller says what it means).
    pub(super) fn settle<E>(
        &mut self,
        kind: MessageType,
        pushed: Result<(), PushError<BulkError<E>>>,
    ) -> Result<bool, E> {
        match pushed {
            Ok(()) => {
                self.seq = self.seq.wrapping_add(1);
                self.counters.frames_out += 1;
                // Once BYE is queued nothing may follow it: the flag is only ever set here.
                self.bye_queued |= kind == MessageType::Bye;
                Ok(true)
            }
            Err(PushError::Encode(BulkError::Fill(e))) => Err(e),
            Err(PushError::Encode(BulkError::Message(e))) => {
                log::error!("port {}: cannot encode {kind:?}: {e}", self.name);
                Ok(false)
            }
            Err(PushError::Full(len)) => {
                self.counters.queue_overflows += 1;
                self.counters.dropped_bytes += len as u64;
                log::error!(
                    "port {}: output queue full ({} bytes queued, limit {QUEUE_LIMIT}): dropped a {kind:?} frame of {len} bytes",
                    self.name,
                    self.out.len(),
                );
                Ok(false)
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
