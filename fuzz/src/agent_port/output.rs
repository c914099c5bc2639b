//! What one open of the port wrote, checked against what the host sent (module documentation
//! of [`super`]).

use super::fake::Wire;
use super::{AGENT_VERSION, NAME};
use std::collections::HashSet;
use vport_agent::settings::Settings;
use vport_common::frame::{DEFAULT_MAX_PAYLOAD, HEADER_LEN, MAGIC, OVERHEAD, VERSION};
use vport_common::message::{error_code, Hello, MessageType as T, NO_REOPEN};
use vport_common::pattern;
use vport_common::{Frame, Header, Message};

/// Every frame found anywhere in the bytes the host side fed (at every magic).
pub struct Requests {
    /// The headers of every valid frame.
    pub headers: Vec<Header>,
    /// Those that parse, with their session.
    pub messages: Vec<(u32, Message)>,
    pub sessions: HashSet<u32>,
}

impl Requests {
    pub fn scan(fed: &[u8]) -> Self {
        let mut r = Requests { headers: Vec::new(), messages: Vec::new(), sessions: HashSet::new() };
        for at in memchr::memmem::find_iter(fed, &MAGIC) {
            if let Parsed::Frame(f, _) = parse_at(fed, at) {
                r.sessions.insert(f.header.session);
                r.headers.push(f.header);
                if let Ok(m) = Message::from_frame(&f) {
                    r.messages.push((f.header.session, m));
                }
            }
        }
        r
    }

    pub fn has(&self, session: u32, pred: impl Fn(&Message) -> bool) -> bool {
        self.messages.iter().any(|(s, m)| *s == session && pred(m))
    }

    pub fn any(&self, pred: impl Fn(&Message) -> bool) -> bool {
        self.messages.iter().any(|(_, m)| pred(m))
    }
}

/// What the bytes at an offset are.
pub enum Parsed {
    /// A whole valid frame and its length on the wire.
    Frame(Frame, usize),
    /// A valid beginning of a frame that the bytes end within.
    Prefix,
    /// Not a frame (for a reason given).
    Bad(&'static str),
}

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn header_of(b: &[u8]) -> Header {
    Header { kind: b[5], flags: u16::from_le_bytes([b[6], b[7]]), session: le32(b, 8), seq: le32(b, 12) }
}

/// Strict frame parse at `at`: magic, version, header CRC, length within the default payload
/// limit, frame CRC.
pub fn parse_at(b: &[u8], at: usize) -> Parsed {
    let rest = &b[at..];
    let m = rest.len().min(MAGIC.len());
    if rest[..m] != MAGIC[..m] {
        return Parsed::Bad("no magic");
    }
    if rest.len() < HEADER_LEN {
        return Parsed::Prefix;
    }
    if rest[4] != VERSION {
        return Parsed::Bad("version");
    }
    if crc32fast::hash(&rest[..20]) != le32(rest, 20) {
        return Parsed::Bad("header crc");
    }
    let len = le32(rest, 16);
    if len > DEFAULT_MAX_PAYLOAD {
        return Parsed::Bad("payload over the default limit");
    }
    let total = OVERHEAD + len as usize;
    if rest.len() < total {
        return Parsed::Prefix;
    }
    let body = total - 4;
    if crc32fast::hash(&rest[..body]) != le32(rest, body) {
        return Parsed::Bad("frame crc");
    }
    Parsed::Frame(Frame { header: header_of(rest), payload: rest[HEADER_LEN..body].to_vec() }, total)
}

/// One frame the port began to write: whole, or cut short (at a cut, or the tail).
pub struct Piece {
    pub at: usize,
    pub frame: Option<Frame>,
    /// The type byte, when it was written.
    pub kind: Option<u8>,
    /// The (valid) header, when all of it was written.
    pub header: Option<Header>,
}

/// Splits what one open wrote into frames (with their offsets). A frame may stop short at a
/// cut (the queue was dropped there: the next frame starts at the cut); the last one may be
/// incomplete if `tail_allowed`. Anything else fails.
pub fn split_frames(b: &[u8], cuts: &[usize], tail_allowed: bool) -> Vec<Piece> {
    let partial = |at: usize, end: usize| {
        let p = &b[at..end];
        Piece { at, frame: None, kind: p.get(5).copied(), header: (p.len() >= HEADER_LEN).then(|| header_of(p)) }
    };
    let mut out = Vec::new();
    let mut pos = 0;
    while pos < b.len() {
        let why = match parse_at(b, pos) {
            Parsed::Frame(f, n) => {
                out.push(Piece { at: pos, kind: Some(f.header.kind), header: Some(f.header), frame: Some(f) });
                pos += n;
                continue;
            }
            Parsed::Prefix => "incomplete",
            Parsed::Bad(why) => why,
        };
        // A frame cut short where the queue may have been dropped: its bytes up to the cut are
        // a valid beginning of a frame, and what follows the cut starts a new one.
        // (The next frame may itself stop short at a later cut, even inside its magic.)
        let torn = cuts.iter().copied().find(|&c| {
            let next_end = cuts.iter().copied().filter(|&d| d > c).min().unwrap_or(b.len()).min(b.len());
            c > pos
                && c <= b.len()
                && matches!(parse_at(&b[..c], pos), Parsed::Prefix)
                && b[c..].starts_with(&MAGIC[..MAGIC.len().min(next_end - c)])
        });
        match torn {
            Some(c) => {
                out.push(partial(pos, c));
                pos = c;
            }
            None if why == "incomplete" && tail_allowed => {
                out.push(partial(pos, b.len()));
                break;
            }
            None => panic!(
                "the agent wrote bytes that are not whole frames at offset {pos} of {} ({why}); cuts {cuts:?}: {:02x?}",
                b.len(),
                &b[pos..b.len().min(pos + 48)]
            ),
        }
    }
    out
}

/// What the output checks read of one open of the port (the harness makes it).
pub struct OpenView<'a> {
    /// The wire: what the host fed and the agent wrote.
    pub wire: &'a Wire,
    /// Bytes the port still has queued.
    pub queued: usize,
    /// The agent's settings.
    pub settings: &'a Settings,
    /// Clock readings of the NewSession transitions.
    pub new_sessions: &'a [u64],
    /// The clock when this open began.
    pub open_clock: u64,
    /// Sessions the port has been in.
    pub sessions: &'a [u32],
    /// The decode_reports counter now, and when this open began.
    pub decode_reports: u64,
    /// See `decode_reports`.
    pub reports_at_open: u64,
}

/// Checks what the current open of the port wrote (module documentation of [`super`]). `end`
/// is true at the end of the input, where the port is still open and the rest of a frame may
/// still be queued.
pub fn check_output(h: &OpenView<'_>, end: bool) {
    let w = h.wire;
    let tail_allowed = end && h.queued > 0;
    let pieces = split_frames(&w.written, &w.cuts, tail_allowed);
    let requests = Requests::scan(&w.fed);
    let limits = h.settings.limits;
    if std::env::var_os("VPORT_FUZZ_DEBUG").is_some() {
        // Runs of one type as "Data x1923", cut frames marked.
        let mut runs: Vec<(String, usize)> = Vec::new();
        for p in &pieces {
            let name = format!("{:?}{}", p.kind.and_then(T::from_u8), if p.frame.is_some() { "" } else { "(cut)" });
            match runs.last_mut() {
                Some((n, k)) if *n == name => *k += 1,
                _ => runs.push((name, 1)),
            }
        }
        let runs: Vec<String> =
            runs.iter().map(|(n, k)| if *k > 1 { format!("{n} x{k}") } else { n.clone() }).collect();
        eprintln!("agent_port: open wrote {} bytes: {}", w.written.len(), runs.join(", "));
    }

    // Nothing after BYE: a BYE (even one cut short) is the last frame this open began.
    if let Some(i) = pieces.iter().position(|p| p.kind == Some(T::Bye as u8)) {
        if let Some(next) = pieces.get(i + 1) {
            if !crate::allowed("after-bye") {
                panic!(
                    "offset {}: {:?} after the BYE at offset {} [after-bye]",
                    next.at,
                    next.kind.and_then(T::from_u8),
                    pieces[i].at
                );
            }
        }
    }

    // A HELLO_REQUEST in READY drops the old session's unsent output: the first frame begun
    // after the new session started is a new session's HELLO (a frame already begun may end).
    for &t in h.new_sessions.iter().filter(|&&t| t > h.open_clock) {
        let w_at = w.written_before(t);
        if let Some(p) = pieces.iter().find(|p| p.at >= w_at) {
            let new_hello = p.kind.is_none_or(|k| k == T::Hello as u8) && p.header.is_none_or(|hd| hd.seq == 0);
            assert!(
                new_hello,
                "offset {}: {:?} (seq {:?}) begun after a HELLO_REQUEST started a new session (at output offset \
                 {w_at}): the old session's unsent output must be dropped [new-session-drop]",
                p.at,
                p.kind.and_then(T::from_u8),
                p.header.map(|hd| hd.seq)
            );
        }
    }

    let mut offer: Option<(u32, u64)> = None;
    let mut prev_seq: Option<u32> = None;
    let mut offered: HashSet<u32> = HashSet::new();
    let mut decode_reports = 0u64;
    for p in &pieces {
        let Some(f) = &p.frame else { continue };
        let at = p.at;
        let hd = f.header;
        let msg = match Message::from_frame(f) {
            Ok(m) => m,
            Err(e) => panic!("offset {at}: the agent sent a frame that does not parse: {e} ({hd:?})"),
        };
        assert_eq!(hd.flags, 0, "offset {at}: flags");
        let new_offer = matches!(msg, Message::Hello(_)) && hd.seq == 0;
        if let Some(p) = prev_seq {
            assert!(
                hd.seq == p.wrapping_add(1) || new_offer,
                "offset {at}: {:?} has seq {} after seq {p}",
                msg.kind(),
                hd.seq
            );
        }
        prev_seq = Some(hd.seq);
        let s = hd.session;
        let source_ok = |total: u64| total <= limits.max_stream_bytes;
        match &msg {
            Message::Hello(Hello { agent_version, port_name, nonce, .. }) => {
                assert_ne!(s, 0, "offset {at}: HELLO offers session 0");
                assert_eq!((agent_version.as_str(), port_name.as_str()), (AGENT_VERSION, NAME), "HELLO");
                if new_offer {
                    offer = Some((s, *nonce));
                    offered.insert(s);
                } else {
                    assert_eq!(offer, Some((s, *nonce)), "offset {at}: a repeated HELLO is not the current offer");
                }
            }
            Message::Bye { reopen_after_ms, reason } => assert!(
                (*reopen_after_ms == NO_REOPEN && reason == "shutdown")
                    || *reopen_after_ms <= limits.max_reopen_delay_ms,
                "offset {at}: BYE with reopen after {reopen_after_ms} ms ({reason}), over the limit of {} ms",
                limits.max_reopen_delay_ms
            ),
            Message::Pong { ping_time_ns, .. } => {
                assert!(
                    requests.has(s, |m| matches!(m, Message::Ping { time_ns } if time_ns == ping_time_ns)),
                    "offset {at}: PONG for no PING ({ping_time_ns}) of session {s:#x}"
                )
            }
            Message::EchoReply(bytes) => {
                assert!(
                    requests.has(s, |m| matches!(m, Message::Echo(b) if b == bytes)),
                    "offset {at}: ECHO_REPLY of no ECHO in session {s:#x}"
                )
            }
            Message::Data { offset, bytes } => assert!(
                requests.has(s, |m| matches!(m, Message::Source { seed, bytes: total, .. }
                    if source_ok(*total) && pattern::first_mismatch(*seed, *offset, bytes).is_none())),
                "offset {at}: DATA at stream offset {offset} ({} bytes) is no SOURCE's pattern in session {s:#x} \
                 within the stream limit",
                bytes.len()
            ),
            Message::SourceDone { bytes, digest } => assert!(
                requests.has(s, |m| matches!(m, Message::Source { seed, bytes: total, .. }
                    if total == bytes && source_ok(*total)
                        && (*bytes > 1 << 20 || pattern::pattern_digest(*seed, *bytes) == *digest))),
                "offset {at}: SOURCE_DONE ({bytes} bytes, digest {digest:#x}) matches no SOURCE of session {s:#x}"
            ),
            Message::SinkResult { .. } => assert!(
                requests.has(s, |m| matches!(m, Message::Sink { bytes, .. } if *bytes <= limits.max_stream_bytes)),
                "offset {at}: SINK_RESULT for no SINK of session {s:#x} within the stream limit"
            ),
            Message::GuestOpDone(done) => {
                assert!(h.settings.allow_guest_ops, "offset {at}: GUEST_OP_DONE with guest ops off [guest-ops-off]");
                assert!(
                    requests.has(s, |m| matches!(m, Message::GuestOp { op_id, .. } if *op_id == done.op_id)),
                    "offset {at}: GUEST_OP_DONE {} for no GUEST_OP of session {s:#x}",
                    done.op_id
                )
            }
            Message::Error { code, about_kind, about_seq, .. } => {
                check_error(&requests, h, at, s, *code, *about_kind, *about_seq);
                decode_reports += u64::from(*code == error_code::DECODE);
            }
            Message::SigioReport { samples, .. } => {
                assert!(samples.len() <= vport_agent::port::MAX_SIGIO_SAMPLES, "offset {at}: SIGIO samples")
            }
            Message::ProbeResult { data, .. } => {
                assert!(data.len() <= vport_agent::port::MAX_PROBE_READ, "offset {at}: probe data")
            }
            Message::StatsReply(_) | Message::EventsReply { .. } => {}
            other => panic!("offset {at}: the agent sent {:?}, which it never should", other.kind()),
        }
        if !matches!(msg, Message::Hello(_)) {
            assert!(
                s == 0 || requests.sessions.contains(&s) || offered.contains(&s) || h.sessions.contains(&s),
                "offset {at}: {:?} in session {s:#x}, which neither side used",
                msg.kind()
            );
        }
    }
    let counted = h.decode_reports - h.reports_at_open;
    assert!(
        decode_reports <= counted,
        "{decode_reports} decode reports written, but the decode_reports counter rose by {counted} in this open"
    );
}

/// An ERROR names a frame the host really sent (kind and seq, in the ERROR's session or in
/// session 0), or 0/0 for a decode report; its code is one of the documented ones and fits it.
fn check_error(r: &Requests, h: &OpenView<'_>, at: usize, session: u32, code: u16, kind: u8, seq: u32) {
    assert!((1..=9).contains(&code), "offset {at}: ERROR code {code}");
    if code == error_code::DECODE {
        assert_eq!((kind, seq), (0, 0), "offset {at}: a decode report names a frame [error-about]");
        return;
    }
    let sent = r.headers.iter().any(|hd| hd.kind == kind && hd.seq == seq && (hd.session == session || session == 0));
    assert!(
        sent,
        "offset {at}: ERROR {code} about type {kind:#04x} seq {seq} in session {session:#x}: the host sent no such \
         frame [error-about]"
    );
    let close = kind == T::Close as u8 || kind == T::Reopen as u8;
    match code {
        error_code::DENIED => assert!(
            kind == T::GuestOp as u8 && !h.settings.allow_guest_ops,
            "offset {at}: ERROR denied about type {kind:#04x} (guest ops allowed: {})",
            h.settings.allow_guest_ops
        ),
        error_code::LIMIT if close => {
            let max = h.settings.limits.max_reopen_delay_ms;
            assert!(
                r.any(|m| matches!(m, Message::Close { reopen_after_ms } if *reopen_after_ms > max)),
                "offset {at}: ERROR limit about a CLOSE, but no CLOSE asked more than {max} ms"
            );
        }
        error_code::LIMIT => assert!(
            [T::Source as u8, T::Sink as u8, T::GuestOp as u8].contains(&kind),
            "offset {at}: ERROR limit about type {kind:#04x}"
        ),
        _ => {}
    }
}
