//! The fake port fd ([`FakeIo`]) and environment ([`FuzzEnv`]) the agent port is driven with.

use nix::errno::Errno;
use nix::poll::PollFlags;
use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::rc::Rc;
use vport_agent::port::{Env, PortIo, ProbeOutcome, MAX_WRITE};
use vport_common::message::{ProbeKind, ProbeTarget};

/// Host presence as the fake's poll reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// POLLOUT (| POLLIN with input waiting): a host client is attached.
    Host,
    /// POLLIN | POLLHUP: no host client; reads return 0, writes block (EAGAIN).
    NoHost,
    /// POLLHUP alone: the port was unplugged; reads and writes fail with ENODEV.
    Unplugged,
}

/// One queued result of `read(2)`.
#[derive(Debug)]
pub enum ReadItem {
    Data(Vec<u8>),
    Zero,
    Err(Errno),
}

/// The fake's state, shared by the harness and the [`FakeIo`] the port owns.
#[derive(Debug)]
pub struct Wire {
    pub mode: Mode,
    pub reads: VecDeque<ReadItem>,
    /// One-shot errors for the next poll and the next writes.
    pub poll_err: Option<Errno>,
    pub write_errs: VecDeque<Errno>,
    /// Most bytes one write accepts (0: writes return 0).
    pub write_chunk: usize,
    /// Bytes writes accept before EAGAIN (set by the script), and what is left of
    /// [`super::WRITE_CAP`].
    pub budget: usize,
    pub cap_left: usize,
    /// What the current open of the port wrote, and the offsets in it where the port may have
    /// dropped its queue (it learnt that the host is gone, or was closed).
    pub written: Vec<u8>,
    pub cuts: Vec<usize>,
    /// For each write of this open: the clock when it happened and the length of `written`
    /// after it (to place a state transition in the output).
    pub write_log: Vec<(u64, usize)>,
    /// Every byte reads returned (all opens), to find the requests replies answer.
    pub fed: Vec<u8>,
    pub bytes_read: u64,
    pub bytes_read_this_open: u64,
    pub bytes_written: u64,
    pub probe: ProbeOutcome,
    pub probe_data_len: usize,
    pub probe_read_bytes: u64,
    pub async_err: Option<Errno>,
    /// The clock [`FuzzEnv`] reads.
    pub clock: Rc<Cell<u64>>,
}

impl Wire {
    /// A fake with no host, unlimited writes up to `cap` bytes, reading the time from `clock`.
    pub fn new(cap: usize, clock: Rc<Cell<u64>>) -> Self {
        Wire {
            mode: Mode::NoHost,
            reads: VecDeque::new(),
            poll_err: None,
            write_errs: VecDeque::new(),
            write_chunk: MAX_WRITE,
            budget: usize::MAX,
            cap_left: cap,
            written: Vec::new(),
            cuts: Vec::new(),
            write_log: Vec::new(),
            fed: Vec::new(),
            bytes_read: 0,
            bytes_read_this_open: 0,
            bytes_written: 0,
            probe: ProbeOutcome::default(),
            probe_data_len: 0,
            probe_read_bytes: 0,
            async_err: None,
            clock,
        }
    }

    /// Marks the current end of the output as a place where the port may drop its queue.
    pub fn cut_here(&mut self) {
        let at = self.written.len();
        self.cuts.push(at);
    }

    /// The output length when the clock read `t` (bytes of the writes made before that
    /// reading).
    pub fn written_before(&self, t: u64) -> usize {
        self.write_log.iter().take_while(|&&(c, _)| c < t).last().map_or(0, |&(_, end)| end)
    }
}

/// The port's fd, as the agent's [`PortIo`] sees it.
#[derive(Debug)]
pub struct FakeIo {
    pub wire: Rc<RefCell<Wire>>,
}

impl PortIo for FakeIo {
    fn read(&mut self, buf: &mut [u8]) -> Result<usize, Errno> {
        let mut w = self.wire.borrow_mut();
        if w.mode == Mode::Unplugged {
            return Err(Errno::ENODEV);
        }
        match w.reads.pop_front() {
            Some(ReadItem::Data(mut d)) => {
                let n = d.len().min(buf.len());
                buf[..n].copy_from_slice(&d[..n]);
                if n < d.len() {
                    w.reads.push_front(ReadItem::Data(d.split_off(n)));
                }
                w.fed.extend_from_slice(&buf[..n]);
                w.bytes_read += n as u64;
                w.bytes_read_this_open += n as u64;
                Ok(n)
            }
            Some(ReadItem::Zero) => {
                // read() == 0: the host client is gone (until the script attaches one again).
                w.mode = Mode::NoHost;
                w.cut_here();
                Ok(0)
            }
            Some(ReadItem::Err(e)) => Err(e),
            None if w.mode == Mode::Host => Err(Errno::EAGAIN),
            None => {
                w.cut_here();
                Ok(0)
            }
        }
    }

    fn write(&mut self, buf: &[u8]) -> Result<usize, Errno> {
        assert!(buf.len() <= MAX_WRITE, "a write of {} bytes: the port accepts at most {MAX_WRITE}", buf.len());
        let mut w = self.wire.borrow_mut();
        if let Some(e) = w.write_errs.pop_front() {
            return Err(e);
        }
        match w.mode {
            Mode::Unplugged => return Err(Errno::ENODEV),
            Mode::NoHost => return Err(Errno::EAGAIN),
            Mode::Host => {}
        }
        if w.write_chunk == 0 {
            return Ok(0);
        }
        let n = buf.len().min(w.write_chunk).min(w.budget).min(w.cap_left);
        if n == 0 {
            return Err(Errno::EAGAIN);
        }
        w.budget -= n;
        w.cap_left -= n;
        w.written.extend_from_slice(&buf[..n]);
        w.bytes_written += n as u64;
        let entry = (w.clock.get(), w.written.len());
        w.write_log.push(entry);
        Ok(n)
    }

    fn poll_mask(&mut self) -> Result<PollFlags, Errno> {
        let mut w = self.wire.borrow_mut();
        if let Some(e) = w.poll_err.take() {
            return Err(e);
        }
        Ok(match w.mode {
            Mode::Host if w.reads.is_empty() => PollFlags::POLLOUT,
            Mode::Host => PollFlags::POLLOUT | PollFlags::POLLIN,
            Mode::NoHost => {
                w.cut_here();
                PollFlags::POLLIN | PollFlags::POLLHUP
            }
            Mode::Unplugged => {
                w.cut_here();
                PollFlags::POLLHUP
            }
        })
    }

    fn probe(&mut self, kind: ProbeKind, target: ProbeTarget, arg: u32) -> ProbeOutcome {
        assert!(arg as usize <= vport_agent::port::MAX_PROBE_READ, "probe arg {arg} over MAX_PROBE_READ");
        let mut w = self.wire.borrow_mut();
        let mut out = w.probe.clone();
        if kind == ProbeKind::Read {
            let n = w.probe_data_len.min(arg as usize);
            out.data = vec![0x5a; n];
            if target == ProbeTarget::OwnFd {
                w.probe_read_bytes += n as u64;
            }
        }
        out
    }

    fn set_async(&mut self, _on: bool) -> Result<(), Errno> {
        self.wire.borrow().async_err.map_or(Ok(()), Err)
    }
}

/// Clock and randomness: the clock advances 1 ns per reading (and by the script's jumps, in
/// whole milliseconds); randomness is splitmix64 from an input-chosen seed.
///
/// Readings are so fine that all of one input's readings add up to well under a millisecond,
/// so a one-second window of the decode-report rate limit can be judged per script step from
/// the jumps alone (see `Harness::note_reports`).
#[derive(Debug)]
pub struct FuzzEnv {
    pub now: Rc<Cell<u64>>,
    pub rng: u64,
    pub wakeups: u64,
}

impl Env for FuzzEnv {
    fn now_ns(&mut self) -> u64 {
        let t = self.now.get() + 1;
        self.now.set(t);
        t
    }
    fn random_u64(&mut self) -> u64 {
        self.rng = self.rng.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.rng;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn wakeups(&mut self) -> u64 {
        self.wakeups += 1;
        self.wakeups
    }
    fn cpu_ns(&mut self) -> u64 {
        self.now.get() / 2
    }
    fn agent_stats(&mut self) -> Vec<(&'static str, u64)> {
        vec![("wakeups", self.wakeups), ("ebusy_total", 0), ("pid", 1)]
    }
}

/// The errnos the script can inject.
pub const ERRNOS: [Errno; 6] = [Errno::EAGAIN, Errno::EINTR, Errno::ENODEV, Errno::EIO, Errno::EBADF, Errno::EPIPE];
