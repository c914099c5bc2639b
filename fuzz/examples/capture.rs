//! Captures a real conversation with vport-agent on a VM started by `vport boot`, and writes
//! it as fuzz corpus seeds.
//!
//! ```text
//! cargo run --manifest-path fuzz/Cargo.toml --example capture -- SOCKET CORPUS_DIR
//! ```
//!
//! `SOCKET` is the port's chardev socket (`vport boot --json` prints it). The program speaks
//! the protocol as the host does (HELLO_REQUEST until HELLO, HELLO_ACK, then PING, ECHO, STATS,
//! EVENTS, SOURCE, SINK and DATA, PROBE, SIGIO, GUEST_OP, bad frames of every kind the agent
//! answers with ERROR, garbage, a new session on request, REOPEN with its BYE and the HELLO
//! after it), records the raw bytes each way, and writes under `CORPUS_DIR`:
//! `decoder/capture-*` (both byte streams, several chunkings and payload limits),
//! `message/capture-*` (each distinct frame) and `agent_port/capture-*` (the host's side
//! replayed against the fake port: the whole conversation and each phase).
//! `fuzz/capture-corpus` runs it around a VM.

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use vport_common::message::{GuestOp, ProbeKind, ProbeTarget, SigioAction};
use vport_common::{pattern, Decoder, Frame, Message, MessageType};
use vport_fuzz::agent_port::HostSend;

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

/// The host end of the conversation, recording both directions.
struct Host {
    sock: UnixStream,
    decoder: Decoder,
    /// Every byte received (guest to host) and sent (host to guest).
    g2h: Vec<u8>,
    h2g: Vec<u8>,
    /// Every frame received, in order.
    received: Vec<Frame>,
    /// What was sent, in order, and the phase each item belongs to.
    sent: Vec<(String, HostSend)>,
    phase: String,
    session: u32,
    sessions: Vec<u32>,
    seq: u32,
}

impl Host {
    fn send_bytes(&mut self, bytes: Vec<u8>, item: HostSend) -> Result<()> {
        self.sock.write_all(&bytes)?;
        self.h2g.extend_from_slice(&bytes);
        self.sent.push((self.phase.clone(), item));
        Ok(())
    }

    /// Sends `m` in `session`.
    fn send_in(&mut self, m: &Message, session: u32) -> Result<()> {
        let f = m.to_frame(session, self.seq)?;
        self.seq = self.seq.wrapping_add(1);
        let wire = f.encode()?;
        self.send_bytes(wire, HostSend::Frame(f))
    }

    /// Sends `m` in the current session.
    fn send(&mut self, m: &Message) -> Result<()> {
        self.send_in(m, self.session)
    }

    /// Receives until a frame satisfies `done` (returned) or `timeout` passes (an error).
    fn until(&mut self, what: &str, timeout: Duration, done: impl Fn(&Frame) -> bool) -> Result<Frame> {
        let deadline = Instant::now() + timeout;
        let mut buf = [0u8; 65536];
        loop {
            while let Some(r) = self.decoder.next_frame() {
                match r {
                    Ok(f) => {
                        self.received.push(f.clone());
                        if done(&f) {
                            return Ok(f);
                        }
                    }
                    Err(e) => eprintln!("capture: decode error: {e}"),
                }
            }
            if Instant::now() > deadline {
                return Err(format!("no {what} within {timeout:?}").into());
            }
            match self.sock.read(&mut buf) {
                Ok(0) => return Err("the port's socket closed".into()),
                Ok(n) => {
                    self.g2h.extend_from_slice(&buf[..n]);
                    self.decoder.push(&buf[..n]);
                }
                Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Receives until a frame of type `kind` arrives.
    fn expect(&mut self, kind: MessageType) -> Result<Frame> {
        self.until(&format!("{kind:?}"), Duration::from_secs(10), |f| f.header.kind == kind as u8)
    }

    /// HELLO_REQUEST each second until a HELLO, then HELLO_ACK: the session is READY.
    fn handshake(&mut self) -> Result<()> {
        let start = Instant::now();
        let hello = loop {
            self.send_in(&Message::HelloRequest, 0)?;
            match self.until("HELLO", Duration::from_secs(1), |f| f.header.kind == MessageType::Hello as u8) {
                Ok(f) => break f,
                Err(_) if start.elapsed() < Duration::from_secs(90) => continue,
                Err(e) => return Err(e),
            }
        };
        self.ack(&hello)
    }

    fn ack(&mut self, hello: &Frame) -> Result<()> {
        let Message::Hello(h) = Message::from_frame(hello)? else { return Err("not a HELLO".into()) };
        self.session = hello.header.session;
        self.sessions.push(self.session);
        self.seq = 0;
        self.send(&Message::HelloAck { nonce: h.nonce, host_version: "vport-capture".into() })?;
        // A PING in the session confirms READY (the ACK has no answer).
        self.send(&Message::Ping { time_ns: 1 })?;
        self.expect(MessageType::Pong)?;
        eprintln!("capture: session {:#010x} ready", self.session);
        Ok(())
    }
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let [_, socket, corpus] = args.as_slice() else {
        return Err("usage: capture SOCKET CORPUS_DIR".into());
    };
    let sock = UnixStream::connect(socket)?;
    sock.set_read_timeout(Some(Duration::from_millis(50)))?;
    let mut h = Host {
        sock,
        decoder: Decoder::default(),
        g2h: Vec::new(),
        h2g: Vec::new(),
        received: Vec::new(),
        sent: Vec::new(),
        phase: "handshake".into(),
        session: 0,
        sessions: Vec::new(),
        seq: 0,
    };
    converse(&mut h)?;
    write_corpus(&h, Path::new(corpus))?;
    eprintln!(
        "capture: {} bytes host to guest, {} bytes guest to host, {} frames received",
        h.h2g.len(),
        h.g2h.len(),
        h.received.len()
    );
    Ok(())
}

/// The conversation, phase by phase.
fn converse(h: &mut Host) -> Result<()> {
    h.handshake()?;

    h.phase = "ping".into();
    h.send_in(&Message::Ping { time_ns: 123_456_789 }, 0)?;
    h.expect(MessageType::Pong)?;
    h.send(&Message::Ping { time_ns: 987_654_321 })?;
    h.expect(MessageType::Pong)?;

    h.phase = "echo".into();
    h.send(&Message::Echo(b"hello, vport".to_vec()))?;
    h.expect(MessageType::EchoReply)?;
    h.send(&Message::Echo(Vec::new()))?;
    h.expect(MessageType::EchoReply)?;
    let mut tricky = b"console text ".to_vec();
    tricky.extend_from_slice(&[0xF5, 0x56, 0x50, 0x52, 1, 0x10, 0, 0]);
    h.send(&Message::Echo(tricky))?;
    h.expect(MessageType::EchoReply)?;

    h.phase = "stats".into();
    h.send(&Message::Stats)?;
    h.expect(MessageType::StatsReply)?;
    h.send(&Message::Events { since_seq: 0 })?;
    h.expect(MessageType::EventsReply)?;

    h.phase = "source".into();
    h.send(&Message::Source { seed: 7, bytes: 3000, chunk: 1000 })?;
    h.expect(MessageType::SourceDone)?;

    h.phase = "sink".into();
    h.send(&Message::Sink { seed: 9, bytes: 2000 })?;
    for (offset, n) in [(0u64, 1200usize), (1200, 800)] {
        let mut bytes = vec![0; n];
        pattern::fill(9, offset, &mut bytes);
        h.send(&Message::Data { offset, bytes })?;
    }
    h.expect(MessageType::SinkResult)?;

    h.phase = "probe".into();
    for (kind, target) in [
        (ProbeKind::Poll, ProbeTarget::OwnFd),
        (ProbeKind::Lseek, ProbeTarget::OwnFd),
        (ProbeKind::Open, ProbeTarget::SecondFd),
        (ProbeKind::Pread, ProbeTarget::OwnFd),
    ] {
        h.send(&Message::Probe { kind, target, arg: 0 })?;
        h.expect(MessageType::ProbeResult)?;
    }
    h.send(&Message::Sigio { action: SigioAction::Query })?;
    h.expect(MessageType::SigioReport)?;

    h.phase = "guest-op".into();
    h.send(&Message::GuestOp { op_id: 1, op: GuestOp::Sysfs })?;
    h.expect(MessageType::GuestOpDone)?;
    h.send(&Message::GuestOp { op_id: 2, op: GuestOp::Read { handle: 99, bytes: 16, all: false } })?;
    h.until("GUEST_OP_DONE or ERROR", Duration::from_secs(10), |f| {
        f.header.kind == MessageType::GuestOpDone as u8 || f.header.kind == MessageType::Error as u8
    })?;

    h.phase = "errors".into();
    // Unknown type, malformed payload, a frame of another session, ECHO outside the session,
    // a message the agent does not accept: each answered with ERROR.
    let unknown = Frame::new(0x55, h.session, h.seq, b"future".to_vec());
    h.seq += 1;
    h.send_bytes(unknown.encode()?, HostSend::Frame(unknown))?;
    h.expect(MessageType::Error)?;
    let malformed = Frame::new(MessageType::Ping as u8, h.session, h.seq, vec![1, 2, 3]);
    h.seq += 1;
    h.send_bytes(malformed.encode()?, HostSend::Frame(malformed))?;
    h.expect(MessageType::Error)?;
    h.send_in(&Message::Echo(b"stale".to_vec()), h.session ^ 0x0101_0101)?;
    h.expect(MessageType::Error)?;
    h.send_in(&Message::Echo(b"no session".to_vec()), 0)?;
    h.expect(MessageType::Error)?;
    h.send(&Message::Bye { reopen_after_ms: 0, reason: "host says bye".into() })?;
    h.expect(MessageType::Error)?;
    // A damaged frame (no answer: a decode error), garbage, then a PING to see the stream in sync.
    let mut damaged = Message::Echo(b"damaged".to_vec()).to_frame(h.session, h.seq)?.encode()?;
    h.seq += 1;
    damaged[26] ^= 0x40;
    h.send_bytes(damaged.clone(), HostSend::Raw(damaged))?;
    let garbage = b"\r\nlogin: some console noise\r\n\xF5\x56\x50".to_vec();
    h.send_bytes(garbage.clone(), HostSend::Raw(garbage))?;
    h.send(&Message::Ping { time_ns: 42 })?;
    h.expect(MessageType::Pong)?;
    h.send(&Message::Stats)?;
    h.expect(MessageType::StatsReply)?;

    h.phase = "new-session".into();
    h.send_in(&Message::HelloRequest, 0)?;
    let hello = h.expect(MessageType::Hello)?;
    h.ack(&hello)?;

    h.phase = "reopen".into();
    h.send(&Message::Reopen)?;
    h.expect(MessageType::Bye)?;
    let hello =
        h.until("HELLO after the reopen", Duration::from_secs(20), |f| f.header.kind == MessageType::Hello as u8)?;
    h.ack(&hello)?;
    h.send(&Message::Events { since_seq: 0 })?;
    h.expect(MessageType::EventsReply)?;
    Ok(())
}

fn write_file(dir: &Path, name: &str, data: &[u8]) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    std::fs::write(dir.join(name), data)?;
    Ok(())
}

/// Writes the seeds of every target.
fn write_corpus(h: &Host, corpus: &Path) -> Result<()> {
    let dir = |t: &str| -> PathBuf { corpus.join(t) };
    use vport_fuzz::{agent_port, decoder, message};

    // decoder: both streams whole, one byte at a time, in mixed chunks; and with a 64-byte
    // payload limit (most real frames are then oversize).
    for (name, stream) in [("g2h", &h.g2h), ("h2g", &h.h2g)] {
        write_file(&dir("decoder"), &format!("capture-{name}-whole"), &decoder::seed(0, &[0xff], stream))?;
        write_file(&dir("decoder"), &format!("capture-{name}-bytewise"), &decoder::seed(0, &[], stream))?;
        write_file(
            &dir("decoder"),
            &format!("capture-{name}-chunks"),
            &decoder::seed(0, &[0x7f, 0x05, 0xc1, 0x40], stream),
        )?;
        write_file(&dir("decoder"), &format!("capture-{name}-limit64"), &decoder::seed(0x90, &[0x7f, 0x43], stream))?;
    }

    // message: each distinct frame of either direction, at most three of a type.
    let mut seen = BTreeSet::new();
    let sent_frames = h.sent.iter().filter_map(|(_, s)| match s {
        HostSend::Frame(f) => Some(f.clone()),
        HostSend::Raw(_) => None,
    });
    for (dirname, frames) in [("g2h", h.received.clone()), ("h2g", sent_frames.collect::<Vec<_>>())] {
        for f in frames {
            let seed = message::seed(&f);
            let per_type =
                seen.iter().filter(|(d, k, _): &&(String, u8, Vec<u8>)| d == dirname && *k == f.header.kind).count();
            if per_type >= 3 || !seen.insert((dirname.to_string(), f.header.kind, seed.clone())) {
                continue;
            }
            let kind =
                MessageType::from_u8(f.header.kind).map_or(format!("{:#04x}", f.header.kind), |k| format!("{k:?}"));
            write_file(&dir("message"), &format!("capture-{dirname}-{kind}-{per_type}"), &seed)?;
        }
    }

    // agent_port: the host's side of the whole conversation, and each phase after a handshake.
    let all: Vec<HostSend> = h.sent.iter().map(|(_, s)| s.clone()).collect();
    write_file(&dir("agent_port"), "capture-conversation", &agent_port::seed_from_host(&all, &h.sessions))?;
    let handshake: Vec<HostSend> = h.sent.iter().filter(|(p, _)| p == "handshake").map(|(_, s)| s.clone()).collect();
    let mut phases: Vec<&str> = h.sent.iter().map(|(p, _)| p.as_str()).collect();
    phases.dedup();
    for phase in phases.into_iter().filter(|p| *p != "handshake") {
        let mut items = handshake.clone();
        items.extend(h.sent.iter().filter(|(p, _)| p == phase).map(|(_, s)| s.clone()));
        write_file(&dir("agent_port"), &format!("capture-{phase}"), &agent_port::seed_from_host(&items, &h.sessions))?;
    }
    Ok(())
}
