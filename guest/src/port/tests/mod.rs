//! Tests of [`crate::port`], one file per room, over the shared fakes here: [`Fake`], a
//! scripted port (poll masks, reads, write limits, probe results, errnos), and [`TestEnv`], a
//! deterministic clock and random source.

mod acked;
mod commands;
mod counters;
mod decode_reports;
mod service;
mod session;
mod streams;
mod transmit;

use super::*;
use crate::settings::Limits;
use nix::errno::Errno;
use nix::poll::PollFlags;
use std::collections::VecDeque;
use std::rc::Rc;
use vport_common::message::{
    error_code, GuestOp, GuestOpDone, Hello, ProbeKind, ProbeTarget, SigioAction, NO_MISMATCH, NO_REOPEN,
};
use vport_common::pattern::{self, StreamDigest};
use vport_common::{Decoder, Frame, Header, Message, MessageType, PortEvent, PortState};

const HOST: PollFlags = PollFlags::POLLOUT;

const NO_HOST: PollFlags = PollFlags::POLLIN.union(PollFlags::POLLHUP);

enum Read {
    Data(Vec<u8>),
    Zero,
    Err(Errno),
}

/// A scripted port: reads come from `reads` (EAGAIN when empty, like a connected port with
/// no data), `mask` is what poll says, writes accept at most `chunk` bytes per call and
/// `budget` bytes in total before EAGAIN.
struct Fake {
    reads: VecDeque<Read>,
    mask: PollFlags,
    chunk: usize,
    budget: usize,
    written: Vec<u8>,
    write_calls: Vec<usize>,
    probes: Vec<(ProbeKind, ProbeTarget, u32)>,
    probe_result: ProbeOutcome,
    async_calls: Vec<bool>,
    async_err: Option<Errno>,
}

impl Fake {
    fn new() -> Self {
        Fake {
            reads: VecDeque::new(),
            mask: NO_HOST,
            chunk: usize::MAX,
            budget: usize::MAX,
            written: vec![],
            write_calls: vec![],
            probes: vec![],
            probe_result: ProbeOutcome::default(),
            async_calls: vec![],
            async_err: None,
        }
    }
}

impl PortIo for Fake {
    fn read(&mut self, buf: &mut [u8]) -> Result<usize, Errno> {
        match self.reads.pop_front() {
            Some(Read::Data(d)) => {
                assert!(d.len() <= buf.len());
                buf[..d.len()].copy_from_slice(&d);
                Ok(d.len())
            }
            Some(Read::Zero) => {
                // read() == 0 means no host client at this moment.
                self.mask = NO_HOST;
                Ok(0)
            }
            Some(Read::Err(e)) => Err(e),
            None if self.mask.contains(PollFlags::POLLHUP) => Ok(0),
            None => Err(Errno::EAGAIN),
        }
    }
    fn write(&mut self, buf: &[u8]) -> Result<usize, Errno> {
        assert!(buf.len() <= MAX_WRITE, "write of {} bytes exceeds 32 KiB", buf.len());
        if self.budget == 0 {
            return Err(Errno::EAGAIN);
        }
        let n = buf.len().min(self.chunk).min(self.budget);
        self.budget -= n;
        self.written.extend_from_slice(&buf[..n]);
        self.write_calls.push(n);
        Ok(n)
    }
    fn poll_mask(&mut self) -> Result<PollFlags, Errno> {
        Ok(self.mask)
    }
    fn probe(&mut self, kind: ProbeKind, target: ProbeTarget, arg: u32) -> ProbeOutcome {
        self.probes.push((kind, target, arg));
        self.probe_result.clone()
    }
    fn set_async(&mut self, on: bool) -> Result<(), Errno> {
        self.async_calls.push(on);
        self.async_err.map_or(Ok(()), Err)
    }
}

/// Deterministic env: the clock advances 1000 ns per reading; randomness is a counter-seeded
/// splitmix so every value differs.
struct TestEnv {
    now: u64,
    rng: u64,
    wakeups: u64,
}

impl Env for TestEnv {
    fn now_ns(&mut self) -> u64 {
        self.now += 1000;
        self.now
    }
    fn wakeups(&mut self) -> u64 {
        self.wakeups
    }
    fn cpu_ns(&mut self) -> u64 {
        self.wakeups * 10
    }
    fn agent_stats(&mut self) -> Vec<(&'static str, u64)> {
        vec![("wakeups", self.wakeups), ("ebusy_total", 3)]
    }
    fn random_u64(&mut self) -> u64 {
        self.rng = self.rng.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.rng;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

fn env() -> TestEnv {
    TestEnv { now: 0, rng: 7, wakeups: 0 }
}

/// A port with guest operations allowed (the default settings refuse them: see
/// `guest_ops_are_refused_unless_allowed`).
fn port() -> Port<Fake> {
    port_with(Settings { allow_guest_ops: true, ..Settings::default() })
}

fn port_with(settings: Settings) -> Port<Fake> {
    let info = Rc::new(AgentInfo {
        agent_version: "9.9.9".into(),
        kernel_release: "6.1.0-test".into(),
        boot_id: "boot-id".into(),
    });
    Port::with_carry("org.vport.0".into(), "vport0p1".into(), Fake::new(), info, Rc::new(settings), Carry::default())
}

/// Frames the port wrote since the last call, decoded.
fn take_sent(p: &mut Port<Fake>) -> Vec<(Header, Message)> {
    let bytes = std::mem::take(&mut p.io.written);
    let mut d = Decoder::default();
    d.push(&bytes);
    let mut out = vec![];
    for f in d.by_ref() {
        let f = f.expect("agent wrote a damaged frame");
        out.push((f.header, Message::from_frame(&f).unwrap()));
    }
    assert_eq!(d.buffered(), 0, "agent wrote a partial frame");
    out
}

fn wire(msg: &Message, session: u32, seq: u32) -> Vec<u8> {
    msg.to_frame(session, seq).unwrap().encode().unwrap()
}

fn expect_hello(sent: &[(Header, Message)]) -> (u32, Hello) {
    match sent {
        [(h, Message::Hello(hello))] => (h.session, hello.clone()),
        other => panic!("expected one HELLO, got {other:?}"),
    }
}

fn expect_error(sent: &[(Header, Message)], want: u16) -> Header {
    match sent {
        [(h, Message::Error { code, .. })] if *code == want => *h,
        other => panic!("expected one ERROR {want}, got {other:?}"),
    }
}

/// Queues `bytes` as reads of at most one read buffer each.
fn feed(p: &mut Port<Fake>, bytes: &[u8]) {
    for c in bytes.chunks(READ_BUF) {
        p.io.reads.push_back(Read::Data(c.to_vec()));
    }
}

/// Connects a host and completes the handshake; returns the session.
fn ready(p: &mut Port<Fake>, e: &mut TestEnv) -> u32 {
    p.io.mask = HOST;
    p.service(e).unwrap();
    let (session, hello) = expect_hello(&take_sent(p));
    let ack = Message::HelloAck { nonce: hello.nonce, host_version: "host".into() };
    p.io.reads.push_back(Read::Data(wire(&ack, session, 0)));
    p.service(e).unwrap();
    assert!(take_sent(p).is_empty());
    assert_eq!(p.state(), PortState::Ready { session, nonce: hello.nonce });
    session
}

/// Services the port as the event loop does: again while it reports more work (bounded).
/// Returns the number of calls.
fn service_until_idle(p: &mut Port<Fake>, e: &mut TestEnv) -> usize {
    for calls in 1..10_000 {
        if p.service(e).unwrap() != Health::MoreWork {
            return calls;
        }
    }
    panic!("the port never ran out of work");
}

/// Feeds one request in `session` and services the port; returns what it sent.
fn request(p: &mut Port<Fake>, e: &mut TestEnv, msg: &Message, session: u32) -> Vec<(Header, Message)> {
    feed(p, &wire(msg, session, 1));
    p.service(e).unwrap();
    take_sent(p)
}
