//! The service loop: [`Port::service`] does what can be done now on a port within its read and
//! write budgets (the steps are in the module documentation of [`crate::port`]), and says
//! whether the port needs to be served again without waiting for an event ([`Health`]).

use super::transmit::FlushEnd;
use super::{Env, Health, Port, PortError, PortIo, DECODER_KEEP, HELD_INPUT_LIMIT, READ_HIGH_WATER};
use nix::errno::Errno;
use nix::poll::PollFlags;

/// How a read drain ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ReadEnd {
    /// EAGAIN: host attached, nothing more to read.
    WouldBlock,
    /// read returned 0: no host client.
    NoHost,
    /// Stopped because the output queue is above the high-water mark.
    Throttled,
    /// Stopped at the read budget with input maybe left.
    Budget,
    /// Not read: a CLOSE or REOPEN was served, the port closes once its BYE is out.
    Closing,
    /// Not read: no session, and [`HELD_INPUT_LIMIT`] bytes already wait for one (the
    /// host's arrival wakes the port again).
    Held,
    /// ENODEV.
    Unplugged,
}

impl<I: PortIo> Port<I> {
    /// Does everything that can be done now, writing at most the write budget; see
    /// [`crate::port`], "How a port is serviced".
    pub fn service(&mut self, env: &mut impl Env) -> Result<Health, PortError> {
        let mut budget = self.settings.limits.write_budget;
        let mut read_budget = self.settings.limits.read_budget;
        loop {
            let mask = self.poll_mask()?;
            self.apply_mask(mask, env);
            let end = self.drain_reads(&mut read_budget, env)?;
            match end {
                ReadEnd::Unplugged => return Ok(Health::Unplugged),
                ReadEnd::NoHost => self.host_gone(env, "read returned 0"),
                ReadEnd::WouldBlock | ReadEnd::Throttled | ReadEnd::Budget | ReadEnd::Closing | ReadEnd::Held => {}
            }
            let mask = self.poll_mask()?;
            self.apply_mask(mask, env);
            self.process_frames(env);
            self.report_skipped(env);
            self.damage_reported = false;
            let flushed = loop {
                self.pump_source();
                self.pump_acked();
                let f = self.flush(&mut budget)?;
                if f != FlushEnd::Done || (self.source.is_none() && !self.acked.wants_to_send()) {
                    break f;
                }
                if budget == 0 {
                    break FlushEnd::Budget;
                }
            };
            match flushed {
                FlushEnd::Unplugged => return Ok(Health::Unplugged),
                FlushEnd::Budget => return Ok(Health::MoreWork),
                FlushEnd::Done | FlushEnd::Pending if end == ReadEnd::Budget => return Ok(Health::MoreWork),
                FlushEnd::Done | FlushEnd::Pending if end == ReadEnd::Throttled && budget == 0 => {
                    return Ok(Health::MoreWork)
                }
                FlushEnd::Done if end == ReadEnd::Throttled => continue,
                FlushEnd::Pending if end == ReadEnd::Throttled && self.out.len() < READ_HIGH_WATER => continue,
                FlushEnd::Done | FlushEnd::Pending => {
                    self.release_idle_memory();
                    return Ok(Health::Open);
                }
            }
        }
    }

    /// At the end of a turn with nothing left to do: the buffers a large frame grew are given
    /// back (the decoder's when nothing is pending, the queue's spare when nothing is queued or
    /// streaming), so that an idle agent's memory does not depend on the frames it once saw.
    fn release_idle_memory(&mut self) {
        // Not while bytes are coming: a stream of large frames keeps its buffer.
        if self.sink.is_none() && self.acked.incoming.is_none() {
            self.decoder.release_spare(DECODER_KEEP);
        }
        if self.out.is_empty() && self.source.is_none() && self.acked.outgoing.is_none() {
            self.out.release_spare();
        }
    }

    /// True when the mask is exactly what an unplugged port reports (POLLHUP only).
    pub fn looks_unplugged(&mut self) -> Result<bool, PortError> {
        let mask = self.poll_mask()?;
        Ok(mask.contains(PollFlags::POLLHUP) && !mask.intersects(PollFlags::POLLIN | PollFlags::POLLOUT))
    }

    /// The port's current `poll(2)` revents (POLLIN|POLLOUT asked), `None` if poll failed.
    pub fn peek_mask(&mut self) -> Option<PollFlags> {
        self.poll_mask().ok()
    }

    /// `poll(2)` of the port's fd (timeout 0); a failure names the port.
    pub(super) fn poll_mask(&mut self) -> Result<PollFlags, PortError> {
        self.io.poll_mask().map_err(|source| PortError { port: self.name.clone(), op: "poll", source })
    }

    /// Reads until EAGAIN, 0 or an error, handing frames over as they complete; stops early
    /// at the output high-water mark, when `budget` bytes were read (decreased by what was
    /// read), once a CLOSE was served, or when [`HELD_INPUT_LIMIT`] bytes wait for a session.
    fn drain_reads(&mut self, budget: &mut usize, env: &mut impl Env) -> Result<ReadEnd, PortError> {
        loop {
            if self.close_request.is_some() {
                return Ok(ReadEnd::Closing);
            }
            if self.out.len() >= READ_HIGH_WATER {
                return Ok(ReadEnd::Throttled);
            }
            if *budget == 0 {
                return Ok(ReadEnd::Budget);
            }
            if self.machine.state().session().is_none() && self.decoder.buffered() >= HELD_INPUT_LIMIT {
                return Ok(ReadEnd::Held);
            }
            match self.io.read(&mut self.read_buf) {
                Ok(0) => return Ok(ReadEnd::NoHost),
                Ok(n) => {
                    *budget = budget.saturating_sub(n);
                    log::trace!("port {}: read {n} bytes", self.name);
                    self.counters.bytes_in += n as u64;
                    self.decoder.push(&self.read_buf[..n]);
                    self.process_frames(env);
                }
                Err(Errno::EAGAIN) => {
                    log::trace!("port {}: read: EAGAIN", self.name);
                    return Ok(ReadEnd::WouldBlock);
                }
                Err(Errno::EINTR) => {}
                Err(Errno::ENODEV) => return Ok(ReadEnd::Unplugged),
                Err(source) => return Err(PortError { port: self.name.clone(), op: "read", source }),
            }
        }
    }
}
