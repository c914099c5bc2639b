//! The trace format: every observation of a port's life cycle as one record on one monotonic
//! timeline, written as JSON lines (one object per line). `docs/trace.md` is the schema's
//! reference; this module is its code.
//!
//! ```text
//! {"seq":0,"t_ns":1200,"port":"org.vport.0","source":"host","kind":"host_connect"}
//! {"seq":1,"t_ns":2500,"port":"org.vport.0","source":"host","kind":"hello","session":7,"nonce":42}
//! ```
//!
//! Every record has `seq` (record number, from 0, in write order), `t_ns` (host monotonic
//! nanoseconds since the trace origin), `port` (the port's name; empty for a rig note about no
//! particular port), `source` (who observed it) and `kind` with the kind's own fields.
//!
//! Compatibility: unknown *fields* are ignored, so fields can be added to a kind. An unknown
//! *kind* is a parse error naming the line ([`TraceError::UnknownKind`]): a checker must not
//! pass a trace it cannot fully read, because a record it skipped may be the one that changes
//! a port's state.
//!
//! Writing uses serde (`serde_json::to_writer` in the host); reading is [`parse_jsonl`], with
//! serde_json and the same `Deserialize` implementations, so the schema is defined once, by the
//! types below. Integers are exact up to `u64::MAX`.

use crate::message::EventRecord;
use crate::phase::Phase;
use serde::{Deserialize, Serialize};
use thiserror::Error;

/// Who made an observation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    /// The host end of the port (chardev endpoint and the host's frame decoder).
    Host,
    /// A QMP event or a QMP query result (`query-chardev`).
    Qmp,
    /// The agent's own life-cycle records (EVENTS), mapped onto the host timeline.
    Agent,
    /// The test rig itself (notes, phase markers).
    Rig,
}

/// Direction of data on a port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Direction {
    /// Host to guest.
    #[serde(rename = "h2g")]
    HostToGuest,
    /// Guest to host.
    #[serde(rename = "g2h")]
    GuestToHost,
}

impl Direction {
    /// `h2g` or `g2h`, as in the trace.
    pub fn name(self) -> &'static str {
        match self {
            Direction::HostToGuest => "h2g",
            Direction::GuestToHost => "g2h",
        }
    }
}

/// What was observed, with the kind's own fields. Serialized as `"kind": "<snake_case name>"`
/// next to the fields, in the same JSON object as the [`Record`]'s common fields.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Kind {
    /// The host endpoint got a connection to the port's chardev (QEMU's CHR_EVENT_OPENED as the
    /// host sees it). Source `host`.
    HostConnect,
    /// The host endpoint's connection ended. Source `host`.
    HostDisconnect {
        /// Why (`host closed`, `eof`, `i/o error: ...`); free text.
        reason: String,
    },
    /// Session payload moved on the port (frames of a session other than the handshake and
    /// PING/PONG, which are legal outside READY). Source `host`.
    Data {
        /// Which way.
        dir: Direction,
        /// Byte count on the wire (whole frames).
        bytes: u64,
        /// The frames' header session id.
        session: u32,
    },
    /// The host received HELLO (a session offer; repeats carry the same session and nonce).
    /// Source `host`.
    Hello {
        /// Session id in the frame header.
        session: u32,
        /// The HELLO's nonce.
        nonce: u64,
    },
    /// The host sent HELLO_ACK. Source `host`.
    HelloAck {
        /// Session id in the frame header.
        session: u32,
        /// The echoed nonce.
        nonce: u64,
    },
    /// The host sent HELLO_REQUEST (asking the agent for a HELLO, or for a new session once
    /// READY). Source `host`.
    HelloRequest,
    /// The host received BYE: the agent is about to close the port. Source `host`.
    Bye {
        /// Session id in the frame header.
        session: u32,
        /// When the agent will reopen, in ms; `null` when it will not.
        #[serde(default)]
        reopen_after_ms: Option<u32>,
        /// The BYE's reason text.
        #[serde(default)]
        reason: String,
    },
    /// A QMP `VSERPORT_CHANGE` event. Rate-limited by QEMU to one per second per id: a level
    /// hint, never an edge (see [`crate::checker`]). Source `qmp`; `t_ns` is the receipt time.
    VserportChange {
        /// The port's qdev id (the record's `port` is its name when the rig knows it).
        id: String,
        /// The event's `open`.
        open: bool,
    },
    /// A `query-chardev` sample of the port's chardev: `frontend-open`, QEMU's own record of
    /// whether the guest has the port open. Source `qmp`; `t_ns` is when the answer arrived.
    FrontendOpen {
        /// `frontend-open`.
        open: bool,
    },
    /// One of the agent's own transition records (EVENTS), with `t_ns` mapped from the agent's
    /// clock by an estimated offset (error bound: half the round trip of the ping it came
    /// from). Source `agent`.
    AgentTransition {
        /// Phase before (written as its name, `DISCONNECTED`, `CONNECTED` or `READY`).
        from: Phase,
        /// Phase after.
        to: Phase,
        /// Session id after the transition (0 when DISCONNECTED).
        session: u32,
        /// The agent's cause text.
        cause: String,
        /// The agent's monotonic clock at the transition.
        agent_time_ns: u64,
        /// The agent's record number (consecutive per port; a gap means records were lost).
        agent_seq: u64,
    },
    /// Free text from the rig (a phase marker, a command it issued). Source `rig`.
    Note {
        /// The text.
        text: String,
    },
}

impl Kind {
    /// Every kind name, as written in `kind`. A name outside this list is a parse error.
    pub const NAMES: [&'static str; 11] = [
        "host_connect",
        "host_disconnect",
        "data",
        "hello",
        "hello_ack",
        "hello_request",
        "bye",
        "vserport_change",
        "frontend_open",
        "agent_transition",
        "note",
    ];

    /// The kind's name, as written in `kind`.
    pub fn name(&self) -> &'static str {
        match self {
            Kind::HostConnect => "host_connect",
            Kind::HostDisconnect { .. } => "host_disconnect",
            Kind::Data { .. } => "data",
            Kind::Hello { .. } => "hello",
            Kind::HelloAck { .. } => "hello_ack",
            Kind::HelloRequest => "hello_request",
            Kind::Bye { .. } => "bye",
            Kind::VserportChange { .. } => "vserport_change",
            Kind::FrontendOpen { .. } => "frontend_open",
            Kind::AgentTransition { .. } => "agent_transition",
            Kind::Note { .. } => "note",
        }
    }

    /// The source that observes this kind.
    pub fn default_source(&self) -> Source {
        match self {
            Kind::HostConnect
            | Kind::HostDisconnect { .. }
            | Kind::Data { .. }
            | Kind::Hello { .. }
            | Kind::HelloAck { .. }
            | Kind::HelloRequest
            | Kind::Bye { .. } => Source::Host,
            Kind::VserportChange { .. } | Kind::FrontendOpen { .. } => Source::Qmp,
            Kind::AgentTransition { .. } => Source::Agent,
            Kind::Note { .. } => Source::Rig,
        }
    }

    /// An agent transition record for `r`, as fetched with EVENTS.
    pub fn from_event_record(r: &EventRecord) -> Kind {
        Kind::AgentTransition {
            from: r.from,
            to: r.to,
            session: r.session,
            cause: r.cause.clone(),
            agent_time_ns: r.time_ns,
            agent_seq: r.seq,
        }
    }
}

impl std::fmt::Display for Kind {
    /// A short human rendering: the kind's name and its fields.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Kind::HostConnect | Kind::HelloRequest => write!(f, "{}", self.name()),
            Kind::HostDisconnect { reason } => write!(f, "host_disconnect ({reason})"),
            Kind::Data { dir, bytes, session } => {
                write!(f, "data {} {bytes} bytes session={session:#010x}", dir.name())
            }
            Kind::Hello { session, nonce } | Kind::HelloAck { session, nonce } => {
                write!(f, "{} session={session:#010x} nonce={nonce:#x}", self.name())
            }
            Kind::Bye { session, reopen_after_ms, reason } => {
                write!(f, "bye session={session:#010x} ({reason})")?;
                match reopen_after_ms {
                    Some(ms) => write!(f, " reopen after {ms} ms"),
                    None => Ok(()),
                }
            }
            Kind::VserportChange { id, open } => write!(f, "vserport_change id={id} open={open}"),
            Kind::FrontendOpen { open } => write!(f, "frontend_open open={open}"),
            Kind::AgentTransition { from, to, session, cause, .. } => {
                write!(f, "agent {} -> {} session={session:#010x} ({cause})", from.name(), to.name())
            }
            Kind::Note { text } => write!(f, "note: {text}"),
        }
    }
}

/// One observation on the timeline: one JSON line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// Record number: from 0, +1 per record, in the order the records were written.
    pub seq: u64,
    /// When it was observed: host monotonic nanoseconds since the trace's origin. Records are
    /// written in observation order except where an observation reaches the recorder late
    /// (QMP events carry their receipt time; agent records their mapped agent time).
    pub t_ns: u64,
    /// The port's name (virtio-serial `name=`); empty for a note about no particular port.
    pub port: String,
    /// Who observed it.
    pub source: Source,
    /// What was observed.
    #[serde(flatten)]
    pub kind: Kind,
}

/// Why a trace could not be read. Line numbers count from 1, like an editor's.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum TraceError {
    /// The line is not valid JSON.
    #[error("line {line}, column {column}: invalid json: {msg}")]
    Json {
        /// Line number.
        line: usize,
        /// Byte column in the line, from 1.
        column: usize,
        /// What is wrong.
        msg: String,
    },
    /// The line is JSON, but not an object.
    #[error("line {line}: a trace record must be a json object")]
    NotAnObject {
        /// Line number.
        line: usize,
    },
    /// The object has no string `kind`.
    #[error("line {line}: trace record has no string \"kind\" field")]
    MissingKind {
        /// Line number.
        line: usize,
    },
    /// The `kind` is not one this version knows (a newer writer, or a typo).
    #[error("line {line}: unknown record kind {kind:?} (known kinds: {known})", known = Kind::NAMES.join(", "))]
    UnknownKind {
        /// Line number.
        line: usize,
        /// The kind found.
        kind: String,
    },
    /// A known kind with missing or mistyped fields.
    #[error("line {line}: invalid {kind} record: {msg}")]
    InvalidRecord {
        /// Line number.
        line: usize,
        /// The record's kind.
        kind: String,
        /// What is wrong (serde's message: missing field, invalid type, ...).
        msg: String,
    },
}

impl TraceError {
    /// The line the error is about.
    pub fn line(&self) -> usize {
        match self {
            TraceError::Json { line, .. }
            | TraceError::NotAnObject { line }
            | TraceError::MissingKind { line }
            | TraceError::UnknownKind { line, .. }
            | TraceError::InvalidRecord { line, .. } => *line,
        }
    }
}

/// Parses one line of a trace; `line_no` (from 1) is used in errors. A blank line (only
/// whitespace) is `Ok(None)`.
pub fn parse_record(line: &str, line_no: usize) -> Result<Option<Record>, TraceError> {
    let text = line.trim();
    if text.is_empty() {
        return Ok(None);
    }
    let value: serde_json::Value = serde_json::from_str(text).map_err(|e| TraceError::Json {
        line: line_no,
        column: e.column(),
        msg: without_position(&e),
    })?;
    let Some(fields) = value.as_object() else {
        return Err(TraceError::NotAnObject { line: line_no });
    };
    let kind = match fields.get("kind") {
        Some(serde_json::Value::String(kind)) => kind.clone(),
        _ => return Err(TraceError::MissingKind { line: line_no }),
    };
    if !Kind::NAMES.contains(&kind.as_str()) {
        return Err(TraceError::UnknownKind { line: line_no, kind });
    }
    Record::deserialize(value).map(Some).map_err(|e| TraceError::InvalidRecord {
        line: line_no,
        kind,
        msg: without_position(&e),
    })
}

/// serde_json's message without its " at line L column C" suffix (the line is the trace's).
fn without_position(e: &serde_json::Error) -> String {
    let text = e.to_string();
    match text.rfind(" at line ") {
        Some(i) => text[..i].to_string(),
        None => text,
    }
}

/// Parses a whole trace: one record per line, blank lines skipped. Stops at the first bad line
/// and names it. Does not judge the records (numbering, order): that is [`crate::checker`]'s.
pub fn parse_jsonl(text: &str) -> Result<Vec<Record>, TraceError> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if let Some(r) = parse_record(line, i + 1)? {
            out.push(r);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_match_the_variants() {
        let kinds = [
            Kind::HostConnect,
            Kind::HostDisconnect { reason: String::new() },
            Kind::Data { dir: Direction::HostToGuest, bytes: 0, session: 0 },
            Kind::Hello { session: 0, nonce: 0 },
            Kind::HelloAck { session: 0, nonce: 0 },
            Kind::HelloRequest,
            Kind::Bye { session: 0, reopen_after_ms: None, reason: String::new() },
            Kind::VserportChange { id: String::new(), open: false },
            Kind::FrontendOpen { open: false },
            Kind::AgentTransition {
                from: Phase::Disconnected,
                to: Phase::Connected,
                session: 0,
                cause: String::new(),
                agent_time_ns: 0,
                agent_seq: 0,
            },
            Kind::Note { text: String::new() },
        ];
        let names: Vec<&str> = kinds.iter().map(Kind::name).collect();
        assert_eq!(names, Kind::NAMES);
    }

    #[test]
    fn parses_a_record_and_ignores_unknown_fields() {
        let line = r#"{"seq":3,"t_ns":18446744073709551615,"port":"p","source":"host","kind":"hello","session":4294967295,"nonce":18446744073709551615,"future":{"x":[1]}}"#;
        let r = parse_record(line, 1).unwrap().unwrap();
        assert_eq!(
            r,
            Record {
                seq: 3,
                t_ns: u64::MAX,
                port: "p".into(),
                source: Source::Host,
                kind: Kind::Hello { session: u32::MAX, nonce: u64::MAX }
            }
        );
        let unit = r#"{"seq":0,"t_ns":0,"port":"p","source":"host","kind":"host_connect","extra":1}"#;
        assert_eq!(parse_record(unit, 1).unwrap().unwrap().kind, Kind::HostConnect);
        let bye = r#"{"seq":0,"t_ns":0,"port":"p","source":"host","kind":"bye","session":1}"#;
        assert_eq!(
            parse_record(bye, 1).unwrap().unwrap().kind,
            Kind::Bye { session: 1, reopen_after_ms: None, reason: String::new() }
        );
    }

    #[test]
    fn errors_name_the_line() {
        let good = r#"{"seq":0,"t_ns":0,"port":"p","source":"host","kind":"host_connect"}"#;
        let cases = [
            ("{\"seq\":", TraceError::Json { line: 3, column: 7, msg: "EOF while parsing a value".into() }),
            ("[1]", TraceError::NotAnObject { line: 3 }),
            (r#"{"seq":1}"#, TraceError::MissingKind { line: 3 }),
            (r#"{"seq":1,"kind":7}"#, TraceError::MissingKind { line: 3 }),
            (r#"{"seq":1,"kind":"teleport"}"#, TraceError::UnknownKind { line: 3, kind: "teleport".into() }),
        ];
        for (bad, expected) in cases {
            let text = format!("{good}\n\n{bad}\n{good}\n");
            assert_eq!(parse_jsonl(&text).unwrap_err(), expected, "{bad}");
        }
        let text = format!("{good}\n{}", r#"{"seq":1,"t_ns":0,"port":"p","source":"host","kind":"data","dir":"up"}"#);
        let e = parse_jsonl(&text).unwrap_err();
        assert!(matches!(&e, TraceError::InvalidRecord { line: 2, kind, .. } if kind == "data"), "{e:?}");
        assert!(e.to_string().starts_with("line 2: invalid data record: "), "{e}");
        let e =
            parse_record(r#"{"seq":1,"t_ns":0,"port":"p","source":"host","kind":"hello","session":-1,"nonce":0}"#, 9)
                .unwrap_err();
        assert_eq!(e.line(), 9);
        let e =
            parse_record(r#"{"seq":1,"t_ns":0,"port":"p","source":"moon","kind":"note","text":""}"#, 4).unwrap_err();
        assert!(e.to_string().contains("moon"), "{e}");
        let e = parse_record(r#"{"seq":1,"t_ns":0,"port":"p","kind":"note","text":""}"#, 4).unwrap_err();
        assert!(e.to_string().contains("source"), "{e}");
    }

    #[test]
    fn display_is_short_and_complete() {
        let k = Kind::Bye { session: 1, reopen_after_ms: Some(500), reason: "close command".into() };
        assert_eq!(k.to_string(), "bye session=0x00000001 (close command) reopen after 500 ms");
        let e = EventRecord {
            seq: 4,
            time_ns: 9,
            from: Phase::Connected,
            to: Phase::Ready,
            session: 2,
            wakeups: 0,
            cpu_ns: 0,
            cause: "hello ack".into(),
        };
        assert_eq!(Kind::from_event_record(&e).to_string(), "agent CONNECTED -> READY session=0x00000002 (hello ack)");
    }
}
