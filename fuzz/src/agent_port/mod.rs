//! Target `agent_port`: the agent's frame handling, a [`vport_agent::port::Port`] driven by a
//! scripted fake port ([`fake::FakeIo`]) and environment ([`fake::FuzzEnv`]).
//!
//! The script plays host, kernel and event loop at once: it queues reads (raw bytes, frames,
//! typed requests, HELLO_ACKs with the nonce the port offered, `read() == 0`, errnos), sets the
//! poll mask (host connected, no host, unplugged), write budgets, short writes and errnos,
//! advances the clock, and calls the port the way the event loop does (`service`, again at once
//! while it answers `MoreWork`; guest ops run, completed or refused; SIGIO; close and reopen
//! with the carried counters; shutdown BYE).
//!
//! # Input
//!
//! The first byte: bits 0..4 seed the fake's randomness (session ids, nonces); bit 4 set =
//! guest ops off (the agent's default; clear = `--allow-guest-ops`); bit 5 set = small limits
//! follow: stream limit (u16 bytes), decode reports per second (u8 % 12), write budget
//! (64 + u16), read budget (1 + u16), reopen-delay limit (u16 ms); clear = the defaults. Then
//! steps: an op byte ([`ops`], modulo [`ops::OPS`]) and its arguments.
//!
//! Work per input is capped: at most [`WRITE_CAP`] bytes are ever accepted by the fake's
//! writes (a SOURCE of 2^64 bytes stops there: writes return EAGAIN), [`MAX_OPS`] steps and
//! [`harness::MAX_MORE_WORK`] service calls per SERVICE step.
//!
//! # What is checked
//!
//! Output (every byte the port wrote, per open of the port; `output.rs`):
//! - it is **whole, valid frames** (magic, version, both CRCs, payload within the default
//!   limit), except that a frame may be cut short where the port may have dropped its queue (a
//!   `read() == 0`, a poll showing POLLHUP, a close), and the last frame may be incomplete while
//!   the rest is still queued;
//! - every frame **parses** as a message of a type the agent sends, with flags 0; every write
//!   is at most 32 KiB;
//! - **sequence numbers** go up by one per frame; only a new session's HELLO starts again at 0;
//!   a HELLO with seq > 0 repeats the current offer (same session and nonce);
//! - **replies match requests** (requests are found by decoding every byte the host side fed):
//!   PONG echoes a PING's time, ECHO_REPLY an ECHO's bytes, DATA is the pattern of a SOURCE's
//!   seed at its offset, SOURCE_DONE has a SOURCE's length and digest, SINK_RESULT answers a
//!   SINK, streams only within the stream limit, GUEST_OP_DONE an accepted op's id (never with
//!   guest ops off), each in the request's session; every reply's session is 0, one the host
//!   used or one the agent offered;
//! - an **ERROR** has a documented code (1..=9) and names a frame the host really sent
//!   (`about_kind`/`about_seq`, in its session or in session 0), or 0/0 for a decode report;
//!   DENIED only for a GUEST_OP with guest ops off, LIMIT only for a stream, a guest op or a
//!   CLOSE asking more than the reopen-delay limit;
//! - **BYE is the last frame** an open begins (`[after-bye]`), and its reopen delay is within
//!   the limit (or "never" at shutdown); `say_bye` queues no second BYE;
//! - after a **HELLO_REQUEST in READY**, the first frame begun is the new session's HELLO: the
//!   old session's unsent output is dropped, and only a frame already begun may end
//!   (`[new-session-drop]`);
//! - **decode reports** are at most `decode_reports_per_sec` per second of the fake clock
//!   (`[report-rate]`), and no more are written than the `decode_reports` counter says.
//!
//! State and counters, after every step:
//! - after `service` returned `Open` or `MoreWork`, the state follows the mask: a host attached
//!   means a session (CONNECTED or READY), no host means DISCONNECTED; `MoreWork` means bytes
//!   moved in that call (`[more-work-progress]`: else the event loop would spin);
//! - with guest ops off, no guest op is handed to the event loop (`[guest-ops-off]`);
//! - `bytes_out` is exactly what the fake accepted, `bytes_in` exactly what reads (and own-fd
//!   read probes) returned; the decoder's `bytes_in`, frames, errors and torn frames match this
//!   open's reads, `frames_in`, `decode_errors` and `torn_frames`; `skipped_bytes_before` is the
//!   earlier opens' skipped bytes; counters never go down; the queue stays within its limit;
//! - the life-cycle ring is continuous (each record starts where the previous ended) and ends
//!   in the current state; `STATS` names are unique, and `skipped_bytes` there is every open's.
//!
//! Never panicking is implied (and the port must not loop for ever: libFuzzer's timeout).

mod fake;
pub mod harness;
mod output;

use crate::input::{put_u16, Input};
use fake::{Mode, ReadItem, ERRNOS};
use harness::Harness;
use nix::errno::Errno;
use std::collections::HashSet;
use std::rc::Rc;
use vport_agent::port::{AgentInfo, Carry, Counters, Port, ProbeOutcome};
use vport_agent::settings::{Limits, Settings};
use vport_common::message::{GuestOp, Hello, MessageType as T, ProbeKind, ProbeTarget};
use vport_common::pattern;
use vport_common::{Frame, Message, PortState};

// ---- adapter: the agent API this target uses ---------------------------------------------------

/// The port's name, and what its HELLO says about the agent.
pub const NAME: &str = "org.vport.0";
pub const AGENT_VERSION: &str = "fuzz-agent";

/// A port in DISCONNECTED over `io` under `settings`, continuing `carry` (the counters and ring
/// of an earlier open), as the event loop makes one.
fn open_port(io: fake::FakeIo, settings: Settings, carry: Carry) -> Port<fake::FakeIo> {
    let info = Rc::new(AgentInfo {
        agent_version: AGENT_VERSION.into(),
        kernel_release: "6.1.0-fuzz".into(),
        boot_id: "fuzz-boot".into(),
    });
    Port::with_carry(NAME.into(), "vport0p1".into(), io, info, Rc::new(settings), carry)
}

/// The agent's settings from the input's first byte (and the limits after it when asked).
fn settings(first: u8, input: &mut Input) -> Settings {
    let limits = if first & 0x20 != 0 {
        Limits {
            max_stream_bytes: u64::from(input.u16()),
            decode_reports_per_sec: u32::from(input.u8() % 12),
            write_budget: 64 + usize::from(input.u16()),
            read_budget: 1 + usize::from(input.u16()),
            max_reopen_delay_ms: u32::from(input.u16()),
            ..Limits::default()
        }
    } else {
        Limits::default()
    };
    Settings { allow_guest_ops: first & 0x10 == 0, limits, stream_dir: None }
}

/// Counters as a list, to check that none goes down (a new counter belongs here).
fn counter_list(c: &Counters) -> [(&'static str, u64); 26] {
    [
        ("bytes_in", c.bytes_in),
        ("bytes_out", c.bytes_out),
        ("frames_in", c.frames_in),
        ("frames_out", c.frames_out),
        ("sessions", c.sessions),
        ("hello_repeats", c.hello_repeats),
        ("decode_errors", c.decode_errors),
        ("stale_frames", c.stale_frames),
        ("illegal_transitions", c.illegal_transitions),
        ("errors_sent", c.errors_sent),
        ("errors_received", c.errors_received),
        ("dropped_bytes", c.dropped_bytes),
        ("queue_overflows", c.queue_overflows),
        ("short_writes", c.short_writes),
        ("ebusy", c.ebusy),
        ("opens", c.opens),
        ("closes", c.closes),
        ("stream_aborts", c.stream_aborts),
        ("bye_flush_timeouts", c.bye_flush_timeouts),
        ("sigio_signals", c.sigio_signals),
        ("torn_frames", c.torn_frames),
        ("decode_reports", c.decode_reports),
        ("decode_reports_held_back", c.decode_reports_held_back),
        ("skipped_bytes_before", c.skipped_bytes_before),
        ("refusals", c.refusals),
        ("after_bye_dropped", c.after_bye_dropped),
    ]
}

// ---- end of adapter ----------------------------------------------------------------------------

/// Most bytes the fake accepts in writes over one input.
pub const WRITE_CAP: usize = 512 * 1024;
/// Most script steps per input.
pub const MAX_OPS: usize = 2000;

/// A request the script can send: a message type and fields from the input.
fn request(idx: u8, input: &mut Input) -> Message {
    match idx % 16 {
        0 => Message::Ping { time_ns: input.u64() },
        1 => {
            let n = usize::from(input.u8());
            Message::Echo(input.bytes(n).to_vec())
        }
        2 => Message::Close { reopen_after_ms: input.u32() },
        3 => Message::Reopen,
        4 => {
            let kind = ProbeKind::from_u8(input.u8() % 6 + 1).unwrap_or(ProbeKind::Poll);
            let target = if input.u8() & 1 == 0 { ProbeTarget::OwnFd } else { ProbeTarget::SecondFd };
            Message::Probe { kind, target, arg: input.u32() }
        }
        5 => {
            let action = vport_common::message::SigioAction::from_u8(input.u8() % 3);
            Message::Sigio { action: action.unwrap_or(vport_common::message::SigioAction::Query) }
        }
        6 => {
            let seed = u64::from(input.u8());
            let bytes = match input.u8() {
                0xFF => u64::MAX,
                b => u64::from(b) << (input.u8() % 24),
            };
            Message::Source { seed, bytes, chunk: u32::from(input.u16()) << (input.u8() % 8) }
        }
        7 => Message::Sink { seed: u64::from(input.u8()), bytes: u64::from(input.u16()) },
        8 => {
            // A piece of the pattern of a small seed (what a SINK of that seed expects).
            let (seed, offset, n) = (u64::from(input.u8()), u64::from(input.u16()), usize::from(input.u8()));
            let mut bytes = vec![0; n];
            pattern::fill(seed, offset, &mut bytes);
            if input.u8() & 1 == 1 && n > 0 {
                bytes[n / 2] ^= 1;
            }
            Message::Data { offset, bytes }
        }
        9 => Message::Stats,
        10 => Message::Events { since_seq: u64::from(input.u8()) },
        11 => {
            let op_id = u32::from(input.u8());
            let op = match input.u8() % 11 {
                0 => GuestOp::Open { port: "org.vport.1".into(), nonblock: true, sigio: false },
                1 => GuestOp::Read { handle: 1, bytes: 16, all: false },
                2 => GuestOp::Write { handle: 1, seed: 1, bytes: 16 },
                3 => GuestOp::Poll { handle: 1, events: 1, timeout_ms: 0 },
                4 => GuestOp::Close { handle: 1 },
                5 => GuestOp::Cancel { handle: 1 },
                6 => GuestOp::Debugfs { port: "vport0p2".into() },
                7 => GuestOp::Sysfs,
                8 => GuestOp::SigioCount { handle: 1 },
                9 => GuestOp::Loopback { handle: 1, bytes: 16 },
                _ => GuestOp::WriteEach { handle: 1, seed: 1, bytes: 16, each: 4 },
            };
            Message::GuestOp { op_id, op }
        }
        12 => Message::HelloRequest,
        13 => Message::Error {
            code: input.u16(),
            about_kind: input.u8(),
            about_seq: u32::from(input.u8()),
            text: "host error".into(),
        },
        14 => Message::HelloAck { nonce: input.u64(), host_version: "fuzz-host".into() },
        _ => Message::Hello(Hello {
            agent_version: "host?".into(),
            port_name: NAME.into(),
            kernel_release: String::new(),
            boot_id: String::new(),
            nonce: 1,
            agent_time_ns: 2,
        }),
    }
}

/// Interprets `data` as a script (see [`op`]) and checks every property in the module
/// documentation.
pub fn run(data: &[u8]) {
    drive(data);
}

/// Runs the script in `data` with every check; returns the harness at the end.
fn drive(data: &[u8]) -> Harness {
    let mut input = Input::new(data);
    let first = input.u8();
    let settings = settings(first, &mut input);
    let mut h = Harness::new(first & 0x0f, settings);
    let mut steps = 0;
    while !input.is_empty() && steps < MAX_OPS {
        steps += 1;
        op(&mut h, &mut input);
        h.check_state();
    }
    h.check_output(true);
    // STATS names are unique (the host reads them into a map); skipped_bytes is every open's.
    let stats = h.port.stats(&mut h.env);
    let names: HashSet<&str> = stats.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names.len(), stats.len(), "duplicate STATS names: {stats:?}");
    let skipped = stats.iter().find(|(n, _)| n == "skipped_bytes").map(|&(_, v)| v);
    let want = h.skipped_before + h.port.decoder_stats().skipped_bytes;
    assert_eq!(skipped, Some(want), "STATS skipped_bytes is not the skipped bytes of every open");
    h
}

/// Hand-written seeds (`corpus/agent_port/model-*`) for the settings and the newer guarantees:
/// guest ops off, small limits with decode reports over the rate limit across clock jumps and
/// a CLOSE over the reopen-delay limit, and a HELLO_REQUEST while a stream runs at a small
/// write budget (`MoreWork`).
pub fn model_seeds() -> Vec<(&'static str, Vec<u8>)> {
    use ops::*;
    let ready = [HOST, SERVICE, ACK, 0, SERVICE];
    // Limits: stream 60000 bytes, 3 reports/s, write budget 64 + 200, read budget 1 + 50,
    // reopen delay 1000 ms.
    let small = [0x21, 0x60, 0xea, 3, 200, 0, 50, 0, 0xe8, 0x03];
    let mut off = vec![0x11];
    off.extend_from_slice(&ready);
    off.extend_from_slice(&[REQUEST, 11, 1, 2, 7, SERVICE, REQUEST, 11, 1, 3, 1, SERVICE, COMPLETE, REFUSE]);
    let mut limits = small.to_vec();
    limits.extend_from_slice(&ready);
    for round in 0..2 {
        for _ in 0..5 {
            limits.extend_from_slice(&[RAW, 6, b'n', b'o', b'i', b's', b'e', b'\n', SERVICE]);
        }
        if round == 0 {
            limits.extend_from_slice(&[CLOCK, 60]);
        }
    }
    // A SOURCE over the stream limit, one within it, a CLOSE over the delay limit, then one within.
    limits.extend_from_slice(&[REQUEST, 6, 1, 1, 1, 17, 0, 1, 0, SERVICE]);
    limits.extend_from_slice(&[REQUEST, 6, 1, 2, 10, 10, 0, 2, 0, SERVICE, SERVICE]);
    limits.extend_from_slice(&[REQUEST, 2, 1, 0x88, 0x13, 0, 0, SERVICE, REQUEST, 2, 1, 10, 0, 0, 0, SERVICE]);
    let mut stream = small.to_vec();
    stream.extend_from_slice(&ready);
    // The host takes 300 bytes, then stops reading: the stream waits mid-frame.
    stream.extend_from_slice(&[BUDGET, 0x2c, 0x01, REQUEST, 6, 1, 3, 200, 8, 0, 4, 0, SERVICE]);
    stream.extend_from_slice(&[REQUEST, 12, 1, SERVICE, BUDGET, 0xff, 0xff, SERVICE, SERVICE, ACK, 0, SERVICE]);
    stream.extend_from_slice(&[REQUEST, 9, 1, SERVICE, SHUTDOWN]);
    vec![("model-guest-ops-off", off), ("model-small-limits", limits), ("model-new-session-mid-stream", stream)]
}

/// Op codes (the first byte of each step, modulo [`OPS`]).
pub mod ops {
    /// Host attached.
    pub const HOST: u8 = 0;
    /// No host.
    pub const NO_HOST: u8 = 1;
    /// Unplugged.
    pub const UNPLUG: u8 = 2;
    /// Raw bytes: length (u8), bytes.
    pub const RAW: u8 = 3;
    /// A frame: session selector (u8), type (u8), payload length (u16), payload.
    pub const FRAME: u8 = 4;
    /// A typed request: which ([`super::request`]), session selector, fields.
    pub const REQUEST: u8 = 5;
    /// HELLO_ACK: variant (0 right, 1 wrong nonce, 2 session 0, 3 previous session).
    pub const ACK: u8 = 6;
    /// read() == 0 (the host leaves).
    pub const READ_ZERO: u8 = 7;
    /// A read errno (selector).
    pub const READ_ERR: u8 = 8;
    /// Write budget (u16; 0xFFFF unlimited).
    pub const BUDGET: u8 = 9;
    /// Largest write (u16; 0 makes writes return 0).
    pub const CHUNK: u8 = 10;
    /// A one-shot write errno (selector).
    pub const WRITE_ERR: u8 = 11;
    /// A one-shot poll errno (selector).
    pub const POLL_ERR: u8 = 12;
    /// One event-loop step (`service` and what follows it).
    pub const SERVICE: u8 = 13;
    /// A SIGIO for the port.
    pub const SIGIO: u8 = 14;
    /// Complete the deferred guest ops.
    pub const COMPLETE: u8 = 15;
    /// Agent shutdown: BYE, flush, close, open again.
    pub const SHUTDOWN: u8 = 16;
    /// Close (unplug) and open again.
    pub const CLOSE: u8 = 17;
    /// Probe results: ret (u8 - 1), errno (u8), mask (u16), read length (u16).
    pub const PROBE: u8 = 18;
    /// SIGIO set-up fails from now on (bit 0 of the next byte) or not.
    pub const ASYNC_ERR: u8 = 19;
    /// Advance the clock by (u8) * 20 ms.
    pub const CLOCK: u8 = 20;
    /// Refuse the deferred guest ops (ERROR limit), as the guest-op runner does at a limit.
    pub const REFUSE: u8 = 21;
    /// How many op codes there are.
    pub const OPS: u8 = 22;
}

/// Runs one script step.
fn op(h: &mut Harness, input: &mut Input) {
    let code = input.u8() % ops::OPS;
    match code {
        ops::HOST => h.wire.borrow_mut().mode = Mode::Host,
        ops::NO_HOST => h.wire.borrow_mut().mode = Mode::NoHost,
        ops::UNPLUG => h.wire.borrow_mut().mode = Mode::Unplugged,
        ops::RAW => {
            let n = usize::from(input.u8());
            h.feed(input.bytes(n).to_vec());
        }
        ops::FRAME => {
            let sel = input.u8();
            let session = h.session(sel, input);
            let kind = input.u8();
            let n = usize::from(input.u16());
            let payload = input.bytes(n).to_vec();
            // At most 64 KiB of payload: an encode failure is a finding in the encoder.
            h.feed(Frame::new(kind, session, u32::from(sel), payload).encode().expect("a 64 KiB frame encodes"));
        }
        ops::REQUEST => {
            let idx = input.u8();
            let sel = input.u8();
            let session = h.session(sel, input);
            let m = request(idx, input);
            h.feed_message(&m, session, u32::from(idx));
        }
        ops::ACK => {
            let v = input.u8();
            let (session, nonce) = match h.port.state() {
                PortState::Connected { session, nonce } | PortState::Ready { session, nonce } => (session, nonce),
                PortState::Disconnected => (0, 0),
            };
            let (session, nonce) = match v % 4 {
                0 => (session, nonce),
                1 => (session, nonce ^ 1),
                2 => (0, nonce),
                _ => (h.session(2, input), nonce),
            };
            h.feed_message(&Message::HelloAck { nonce, host_version: "fuzz-host".into() }, session, 0);
        }
        ops::READ_ZERO => h.wire.borrow_mut().reads.push_back(ReadItem::Zero),
        ops::READ_ERR => {
            let e = ERRNOS[usize::from(input.u8()) % ERRNOS.len()];
            h.wire.borrow_mut().reads.push_back(ReadItem::Err(e));
        }
        ops::BUDGET => {
            h.wire.borrow_mut().budget = match input.u16() {
                0xFFFF => usize::MAX,
                b => usize::from(b),
            }
        }
        ops::CHUNK => h.wire.borrow_mut().write_chunk = usize::from(input.u16()),
        ops::WRITE_ERR => {
            let e = ERRNOS[usize::from(input.u8()) % ERRNOS.len()];
            h.wire.borrow_mut().write_errs.push_back(e);
        }
        ops::POLL_ERR => h.wire.borrow_mut().poll_err = Some(ERRNOS[usize::from(input.u8()) % ERRNOS.len()]),
        ops::SERVICE => h.service(),
        ops::SIGIO => h.port.on_sigio(&mut h.env),
        ops::COMPLETE => h.answer_deferred(false),
        ops::REFUSE => h.answer_deferred(true),
        ops::CLOCK => h.advance(u64::from(input.u8()) * 20),
        ops::SHUTDOWN => h.shutdown(),
        ops::CLOSE => h.reopen("unplugged"),
        ops::PROBE => {
            let mut w = h.wire.borrow_mut();
            w.probe = ProbeOutcome {
                ret: i64::from(input.u8()) - 1,
                errno: i32::from(input.u8()),
                mask: input.u16(),
                data: Vec::new(),
            };
            w.probe_data_len = usize::from(input.u16());
        }
        ops::ASYNC_ERR => h.wire.borrow_mut().async_err = (input.u8() & 1 == 1).then_some(Errno::EIO),
        _ => unreachable!("op codes are taken modulo OPS"),
    }
}

/// What a host sent, for seeds: a frame, or raw bytes (garbage, a damaged frame).
#[derive(Debug, Clone)]
pub enum HostSend {
    /// A whole frame.
    Frame(Frame),
    /// Bytes as they were written.
    Raw(Vec<u8>),
}

/// Writes seed steps that replay a host's side of a real conversation: attach a host, then
/// each thing the host sent, each followed by a service step. HELLO_ACK becomes an ACK of the
/// current offer (the fake's nonce is not the captured one); frames in one of `sessions` (the
/// sessions the captured agent offered) use the current session; raw bytes are fed as they
/// were.
pub fn seed_from_host(sent: &[HostSend], sessions: &[u32]) -> Vec<u8> {
    let mut out = vec![7, ops::HOST, ops::SERVICE];
    for item in sent {
        match item {
            HostSend::Frame(f) if f.header.kind == T::HelloAck as u8 => out.extend_from_slice(&[ops::ACK, 0]),
            HostSend::Frame(f) => {
                let sel = match f.header.session {
                    0 => 0,
                    s if sessions.contains(&s) => 1,
                    _ => 2,
                };
                out.extend_from_slice(&[ops::FRAME, sel, f.header.kind]);
                let n = f.payload.len().min(usize::from(u16::MAX));
                put_u16(&mut out, n as u16);
                out.extend_from_slice(&f.payload[..n]);
            }
            HostSend::Raw(bytes) => {
                for c in bytes.chunks(255) {
                    out.extend_from_slice(&[ops::RAW, c.len() as u8]);
                    out.extend_from_slice(c);
                }
            }
        }
        out.push(ops::SERVICE);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_model_seeds_reach_what_they_are_for() {
        let seeds = model_seeds();
        let off = drive(&seeds[0].1);
        assert!(!off.settings.allow_guest_ops);
        assert!(off.port.counters().refusals >= 2, "{:?}", off.port.counters());
        let limits = drive(&seeds[1].1);
        let c = limits.port.counters();
        assert!(c.decode_reports >= 6 && c.decode_reports_held_back >= 2, "{c:?}");
        assert!(c.refusals >= 2 && c.closes >= 1, "{c:?}");
        let stream = drive(&seeds[2].1);
        assert!(stream.port.counters().sessions >= 2, "{:?}", stream.port.counters());
        assert!(stream.port.counters().dropped_bytes > 0, "{:?}", stream.port.counters());
    }

    /// Writes the model seeds into the corpus: `cargo test -- --ignored write_model_seeds`.
    #[test]
    #[ignore]
    fn write_model_seeds() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus/agent_port");
        for (name, data) in model_seeds() {
            std::fs::write(dir.join(name), data).unwrap();
        }
    }

    #[test]
    fn a_session_with_requests() {
        let mut s = vec![1, ops::HOST, ops::SERVICE, ops::ACK, 0, ops::SERVICE];
        for idx in 0..16u8 {
            s.extend_from_slice(&[ops::REQUEST, idx, 1, 3, 4, 5, 6, 7, 8, 9, 10, ops::SERVICE]);
        }
        s.extend_from_slice(&[ops::REQUEST, 6, 1, 9, 2, 10, 0, 4, 0, ops::SERVICE, ops::SERVICE]);
        s.extend_from_slice(&[ops::READ_ZERO, ops::SERVICE, ops::HOST, ops::SERVICE, ops::SHUTDOWN]);
        run(&s);
    }

    #[test]
    fn every_op() {
        let mut s = vec![3];
        for code in 0..ops::OPS {
            s.extend_from_slice(&[ops::HOST, code, 1, 2, 3, 4, 5, 6, ops::SERVICE]);
        }
        run(&s);
    }
}
