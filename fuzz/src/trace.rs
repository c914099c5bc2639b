//! Target `trace`: the trace reader ([`vport_common::trace::parse_jsonl`]) and the life-cycle
//! checker ([`vport_common::checker::check`]) over whatever parses.
//!
//! # Input
//!
//! - Not starting with `0xFF` (a byte no UTF-8 text has): the whole input is trace text (lossy
//!   UTF-8), parsed and, if it parses, checked. Real traces are the seeds.
//! - Starting with `0xFF`: a script ([`generate`]) that writes a trace from a model of the life
//!   cycle: legal records, plus violations injected on purpose, each with the rule it breaks.
//!   The trace is written with serde (as the host writes it), read back, and checked.
//!
//! # What is checked
//!
//! Reader:
//! - a parsed trace has one record per non-blank line; every record written back with serde
//!   reads back equal (one schema for writer and reader);
//! - an error names a line of the text (1..=lines); every line before it parses alone, and that
//!   line alone gives the same error.
//!
//! Checker (every trace that parses), [`check_report`]:
//! - it never panics, and is deterministic;
//! - `records` is the record count; `is_clean()` means no violations;
//! - every violation and note names at least one record, in ascending order, each a `seq` of the
//!   trace; one `record-numbering` violation per record whose `seq` does not increase;
//! - one summary per port named by a record (rig notes about no port excepted), in name order,
//!   whose counters match the records: records, host connects and disconnects, HELLO_REQUESTs,
//!   BYEs, data records and bytes each way, `VSERPORT_CHANGE`s, `frontend_open` samples and the
//!   last one (in time order), agent transitions, violations; coalesced changes, sessions, HELLO
//!   repeats and READYs never exceed what they are part of; the final state names a session
//!   exactly when it is not DISCONNECTED.
//!
//! Checker against the model (generated traces): the violations are exactly the injected ones
//! (rule, port, offending record): no false alarm on a legal trace, no injected violation missed.

use crate::input::Input;
use std::collections::{BTreeMap, BTreeSet};
use vport_common::checker::{check, CheckReport, Rule};
use vport_common::trace::{parse_jsonl, parse_record, Direction, Kind, Record, Source, TraceError};
use vport_common::Phase;

// ---- adapter: the trace and checker API this target uses ---------------------------------------

/// Reads a whole trace.
fn parse(text: &str) -> Result<Vec<Record>, TraceError> {
    parse_jsonl(text)
}

/// Reads one line (number `line_no`, from 1).
fn parse_line(line: &str, line_no: usize) -> Result<Option<Record>, TraceError> {
    parse_record(line, line_no)
}

/// Writes one record as the host does.
fn write(r: &Record) -> String {
    // Serializing plain data to a string cannot fail; if it does, that is the finding.
    serde_json::to_string(r).expect("a record serializes")
}

/// Judges a trace.
fn judge(records: &[Record]) -> CheckReport {
    check(records)
}

// ---- end of adapter ----------------------------------------------------------------------------

/// Most records a generated trace has (keeps executions fast).
const MAX_RECORDS: usize = 400;

/// Interprets `data` (module documentation) and checks every property.
pub fn run(data: &[u8]) {
    if data.first() == Some(&0xFF) {
        let (records, expected) = generate(&mut Input::new(&data[1..]));
        let text: String = records.iter().map(|r| write(r) + "\n").collect();
        let read = parse(&text).unwrap_or_else(|e| panic!("a written trace does not read back: {e}\n{text}"));
        assert_eq!(read, records, "a written trace reads back different records");
        let report = check_report(&records);
        let mut found: Vec<(Rule, String, u64)> = report
            .violations
            .iter()
            .map(|v| (v.rule, v.port.clone(), v.records.last().copied().unwrap_or(u64::MAX)))
            .collect();
        let mut want = expected;
        found.sort();
        want.sort();
        assert_eq!(found, want, "violations (rule, port, offending record) differ from the injected ones\n{text}");
        return;
    }
    let text = String::from_utf8_lossy(data);
    match parse(&text) {
        Ok(records) => {
            let lines = text.lines().filter(|l| !l.trim().is_empty()).count();
            assert_eq!(records.len(), lines, "one record per non-blank line");
            for r in &records {
                let line = write(r);
                match parse_line(&line, 1) {
                    Ok(Some(back)) => assert_eq!(&back, r, "record written as {line} reads back different"),
                    other => panic!("record written as {line} reads back as {other:?}"),
                }
            }
            check_report(&records);
        }
        Err(e) => {
            let lines: Vec<&str> = text.lines().collect();
            let n = e.line();
            assert!(n >= 1 && n <= lines.len(), "error names line {n} of {}: {e}", lines.len());
            for (i, l) in lines[..n - 1].iter().enumerate() {
                assert!(parse_line(l, i + 1).is_ok(), "line {} parses alone but the trace fails at line {n}", i + 1);
            }
            assert_eq!(parse_line(lines[n - 1], n), Err(e.clone()), "line {n} alone gives another result");
            let _ = e.to_string();
        }
    }
}

/// Runs the checker on `records` and checks the report's consistency (module documentation).
pub fn check_report(records: &[Record]) -> CheckReport {
    let report = judge(records);
    assert_eq!(judge(records), report, "the checker is not deterministic");
    assert_eq!(report.records, records.len(), "report.records");
    assert_eq!(report.is_clean(), report.violations.is_empty(), "is_clean");
    let seqs: BTreeSet<u64> = records.iter().map(|r| r.seq).collect();
    let named = |what: &str, recs: &[u64]| {
        assert!(!recs.is_empty(), "a {what} names no record");
        assert!(recs.windows(2).all(|w| w[0] < w[1]), "a {what} names records out of order: {recs:?}");
        assert!(recs.iter().all(|s| seqs.contains(s)), "a {what} names a record not in the trace: {recs:?}");
    };
    for v in &report.violations {
        named("violation", &v.records);
        assert!(v.to_string().starts_with(&format!("violation: {}: records #", v.rule)), "{v}");
    }
    for n in &report.notes {
        named("note", &n.records);
        assert!(n.to_string().starts_with(&format!("note: {}: records #", n.kind)), "{n}");
    }
    let misnumbered = records.windows(2).filter(|w| w[1].seq <= w[0].seq).count();
    assert_eq!(report.of_rule(Rule::RecordNumbering).count(), misnumbered, "record-numbering violations");

    // Per-port summaries against the records.
    let mut by_port: BTreeMap<&str, Vec<&Record>> = BTreeMap::new();
    for r in records {
        if !(r.port.is_empty() && matches!(r.kind, Kind::Note { .. })) {
            by_port.entry(r.port.as_str()).or_default().push(r);
        }
    }
    let names: Vec<&str> = report.ports.iter().map(|p| p.port.as_str()).collect();
    assert_eq!(names, by_port.keys().copied().collect::<Vec<_>>(), "one summary per port, in name order");
    for s in &report.ports {
        let rs = &by_port[s.port.as_str()];
        let count = |f: &dyn Fn(&Kind) -> bool| rs.iter().filter(|r| f(&r.kind)).count() as u64;
        let bytes = |d: Direction| {
            rs.iter().fold(0u64, |acc, r| match r.kind {
                Kind::Data { dir, bytes, .. } if dir == d => acc.saturating_add(bytes),
                _ => acc,
            })
        };
        let p = &s.port;
        assert_eq!(s.counts.records, rs.len() as u64, "port {p}: records");
        assert_eq!(s.counts.host_connects, count(&|k| matches!(k, Kind::HostConnect)), "port {p}: host_connects");
        assert_eq!(s.counts.host_disconnects, count(&|k| matches!(k, Kind::HostDisconnect { .. })), "port {p}");
        assert_eq!(s.counts.hello_requests, count(&|k| matches!(k, Kind::HelloRequest)), "port {p}: hello_requests");
        assert_eq!(s.counts.byes, count(&|k| matches!(k, Kind::Bye { .. })), "port {p}: byes");
        assert_eq!(s.counts.data_records, count(&|k| matches!(k, Kind::Data { .. })), "port {p}: data_records");
        assert_eq!(s.counts.bytes_h2g, bytes(Direction::HostToGuest), "port {p}: bytes_h2g");
        assert_eq!(s.counts.bytes_g2h, bytes(Direction::GuestToHost), "port {p}: bytes_g2h");
        assert_eq!(s.counts.vserport_changes, count(&|k| matches!(k, Kind::VserportChange { .. })), "port {p}");
        assert_eq!(s.counts.frontend_samples, count(&|k| matches!(k, Kind::FrontendOpen { .. })), "port {p}");
        assert_eq!(s.counts.agent_transitions, count(&|k| matches!(k, Kind::AgentTransition { .. })), "port {p}");
        let hellos = count(&|k| matches!(k, Kind::Hello { .. }));
        assert!(
            s.counts.sessions + s.counts.hello_repeats <= hellos,
            "port {p}: sessions + repeats exceed {hellos} HELLOs"
        );
        assert!(s.counts.ready <= count(&|k| matches!(k, Kind::HelloAck { .. })), "port {p}: ready exceeds HELLO_ACKs");
        assert!(s.counts.coalesced <= s.counts.vserport_changes, "port {p}: coalesced");
        let mut samples: Vec<&&Record> = rs.iter().filter(|r| matches!(r.kind, Kind::FrontendOpen { .. })).collect();
        samples.sort_by_key(|r| r.t_ns);
        let last = samples.last().and_then(|r| match r.kind {
            Kind::FrontendOpen { open } => Some(open),
            _ => None,
        });
        assert_eq!(s.guest_open, last, "port {p}: guest_open is the last frontend_open sample in time order");
        let violations = report.violations.iter().filter(|v| &v.port == p).count() as u64;
        assert_eq!(s.violations, violations, "port {p}: violations");
        match s.state {
            Phase::Disconnected => assert_eq!(s.session, None, "port {p}: a session while DISCONNECTED"),
            Phase::Connected | Phase::Ready => assert!(s.session.is_some(), "port {p}: {} without a session", s.state),
        }
    }
    report
}

/// The host-side view of one port in the generating model (mirrors what the checker tracks).
#[derive(Debug, Default)]
struct ModelPort {
    host: bool,
    /// In-band session: `None` DISCONNECTED, else (session, nonce, ready).
    session: Option<(u32, u64, bool)>,
    /// A BYE was seen and no HELLO since.
    guest_closed: bool,
    /// A data record outside READY has opened a run (later ones in the same state are folded
    /// into its violation).
    data_run: bool,
    /// Agent records: (state, session, agent_seq) of the last one.
    agent: Option<(Phase, u32, u64)>,
}

impl ModelPort {
    /// The in-band state changed (the checker's `set_state`): a data run ends.
    fn set(&mut self, session: Option<(u32, u64, bool)>) {
        self.session = session;
        self.data_run = false;
    }
}

/// Writes a trace from a script: each step is one byte (`op % 16`, bit 7 picks one of two
/// ports) and its arguments. Returns the records and the violations injected on purpose as
/// (rule, port, offending record's seq). Legal steps follow the protocol (`docs/trace.md`);
/// an illegal step is only taken where the model knows exactly which rule it breaks.
pub fn generate(input: &mut Input) -> (Vec<Record>, Vec<(Rule, String, u64)>) {
    const PORTS: [&str; 2] = ["org.vport.0", "org.vport.1"];
    let mut records: Vec<Record> = Vec::new();
    let mut expected = Vec::new();
    let mut ports: [ModelPort; 2] = Default::default();
    let (mut seq, mut t, mut next_session) = (0u64, 0u64, 1u32);
    while !input.is_empty() && records.len() < MAX_RECORDS {
        let b = input.u8();
        let pi = usize::from(b >> 7);
        let port = PORTS[pi];
        let m = &mut ports[pi];
        t += u64::from(input.u8() % 4) * 1_000_000;
        let arg = input.u8();
        let mut kind: Option<Kind> = None;
        let mut violation: Option<Rule> = None;
        let mut seq_of_record = seq;
        match b & 0x0f {
            0 => {
                if m.host {
                    violation = Some(Rule::DuplicateOpened);
                }
                m.host = true;
                kind = Some(Kind::HostConnect);
            }
            1 => {
                if !m.host {
                    violation = Some(Rule::HostAlternation);
                } else if m.session.is_some() {
                    m.set(None);
                }
                m.host = false;
                kind = Some(Kind::HostDisconnect { reason: "eof".into() });
            }
            2 => {
                // A new session. Without a host it still changes the state (the checker judges
                // the session as usual) but breaks in-band-without-host.
                if !m.host {
                    violation = Some(Rule::InBandWithoutHost);
                }
                let (session, nonce) = (next_session, u64::from(next_session) * 1000 + u64::from(arg));
                next_session += 1;
                m.guest_closed = false;
                m.set(Some((session, nonce, false)));
                kind = Some(Kind::Hello { session, nonce });
            }
            3 => {
                // A repeat of the offer; with bit 0 of arg, the same session with another nonce.
                if let (true, Some((session, nonce, _))) = (m.host, m.session) {
                    m.guest_closed = false;
                    let nonce = if arg & 1 == 1 {
                        violation = Some(Rule::DuplicateOpened);
                        nonce ^ 0x8000_0000_0000_0000
                    } else {
                        nonce
                    };
                    kind = Some(Kind::Hello { session, nonce });
                }
            }
            4 => {
                if m.host {
                    match m.session {
                        Some((session, nonce, false)) if arg & 3 != 0 => {
                            m.set(Some((session, nonce, true)));
                            kind = Some(Kind::HelloAck { session, nonce });
                        }
                        Some((session, nonce, false)) => {
                            violation = Some(Rule::ReadyOnlyFromConnected);
                            kind = Some(Kind::HelloAck { session, nonce: nonce.wrapping_add(1) });
                        }
                        Some((session, nonce, true)) => {
                            violation = Some(Rule::ReadyOnlyFromConnected);
                            kind = Some(Kind::HelloAck { session, nonce });
                        }
                        None => {
                            violation = Some(Rule::ReadyOnlyFromConnected);
                            kind = Some(Kind::HelloAck { session: next_session, nonce: 1 });
                        }
                    }
                }
            }
            5 => {
                if !m.host {
                    violation = Some(Rule::InBandWithoutHost);
                }
                kind = Some(Kind::HelloRequest);
            }
            6 => {
                let dir = if arg & 1 == 0 { Direction::HostToGuest } else { Direction::GuestToHost };
                let bytes = u64::from(arg) * 997;
                let session = match m.session {
                    Some((session, _, true)) if arg & 2 == 0 => session,
                    Some((session, _, _)) => session.wrapping_add(0x1000),
                    None => 0x7777,
                };
                if !matches!(m.session, Some((s, _, true)) if s == session) && !m.data_run {
                    violation = Some(Rule::NoDataOutsideReady);
                    m.data_run = true;
                }
                kind = Some(Kind::Data { dir, bytes, session });
            }
            7 => {
                if m.host {
                    let reopen_after_ms = if arg & 4 == 0 { None } else { Some(u32::from(arg)) };
                    let reason = "close command".to_string();
                    let session = match m.session {
                        Some((s, _, _)) if arg & 1 == 0 => s,
                        Some((s, _, _)) => s.wrapping_add(0x2000),
                        None => 0x8888,
                    };
                    if m.guest_closed {
                        violation = Some(Rule::GuestAlternation);
                    } else {
                        if !matches!(m.session, Some((s, _, _)) if s == session) {
                            violation = Some(Rule::GuestAlternation);
                        }
                        if m.session.is_some() {
                            m.set(None);
                        }
                    }
                    m.guest_closed = true;
                    kind = Some(Kind::Bye { session, reopen_after_ms, reason });
                }
            }
            8 => kind = Some(Kind::VserportChange { id: format!("vport-port{pi}"), open: arg & 1 == 1 }),
            9 => kind = Some(Kind::FrontendOpen { open: arg & 1 == 1 }),
            10 => {
                let port_less = arg & 1 == 1;
                kind = Some(Kind::Note { text: format!("phase {arg}") });
                if port_less {
                    records.push(Record {
                        seq,
                        t_ns: t,
                        port: String::new(),
                        source: Source::Rig,
                        kind: Kind::Note { text: "rig".into() },
                    });
                    seq += 1;
                    seq_of_record = seq;
                }
            }
            11 | 12 => {
                // Agent transitions (a stream of their own, judged in file order).
                let (state, session, agent_seq) = match m.agent {
                    Some((s, sess, n)) => (s, sess, n + 1),
                    None => (Phase::Disconnected, 0, u64::from(arg)),
                };
                let fresh = next_session;
                use Phase::{Connected as C, Disconnected as D, Ready as R};
                let (from, to, sess) = match (b & 0x0f, state, arg % 4) {
                    // Legal steps.
                    (11, D, _) => (D, C, fresh),
                    (11, C, 0) => (C, R, session),
                    (11, C, 1) => (C, C, fresh),
                    (11, C, _) => (C, D, 0),
                    (11, R, 0 | 1) => (R, C, fresh),
                    (11, R, _) => (R, D, 0),
                    // Injected: D -> D is no transition; a record that does not start where the
                    // last one ended breaks continuity (and nothing else).
                    (_, D, 0) => {
                        violation = Some(Rule::AgentTransition);
                        (D, D, 0)
                    }
                    (_, C, _) => {
                        violation = Some(Rule::AgentContinuity);
                        (R, D, 0)
                    }
                    (_, _, _) => {
                        violation = Some(Rule::AgentContinuity);
                        (C, R, fresh)
                    }
                };
                if sess == fresh {
                    next_session += 1;
                }
                if m.agent.is_none() && violation == Some(Rule::AgentContinuity) {
                    // The first record has nothing to continue from.
                    violation = None;
                }
                m.agent = Some((to, sess, agent_seq));
                kind = Some(Kind::AgentTransition {
                    from,
                    to,
                    session: sess,
                    cause: "model".into(),
                    agent_time_ns: t,
                    agent_seq,
                });
            }
            13 => {
                // A record number that does not increase.
                if let Some(prev) = records.last() {
                    seq_of_record = prev.seq;
                    violation = Some(Rule::RecordNumbering);
                }
                kind = Some(Kind::Note { text: "renumbered".into() });
            }
            14 => t += u64::from(input.u32()) * 1000,
            _ => {
                // A repeated agent record: noted and ignored.
                if let Some((to, sess, n)) = m.agent {
                    kind = Some(Kind::AgentTransition {
                        from: to,
                        to,
                        session: sess,
                        cause: "fetched twice".into(),
                        agent_time_ns: t,
                        agent_seq: n,
                    });
                }
            }
        }
        if let Some(kind) = kind {
            if let Some(rule) = violation {
                expected.push((rule, port.to_string(), seq_of_record));
            }
            let source = kind.default_source();
            records.push(Record { seq: seq_of_record, t_ns: t, port: port.to_string(), source, kind });
            seq = seq.max(seq_of_record) + 1;
        }
    }
    (records, expected)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_legal_session_is_clean_and_injections_are_found() {
        // connect, hello, ack (arg 1), data (arg 0), bye, disconnect.
        let legal = [0xFF, 0, 0, 0, 2, 0, 0, 4, 0, 1, 6, 0, 0, 7, 0, 0, 1, 0, 0];
        run(&legal);
        // Then a disconnect without a connection, and a second connect.
        let mut bad = legal.to_vec();
        bad.extend_from_slice(&[1, 0, 0, 0, 0, 0, 0, 0, 0]);
        run(&bad);
        // Every op on both ports, all arguments' low bits.
        let mut all = vec![0xFF];
        for op in 0u8..16 {
            for a in 0u8..4 {
                all.extend_from_slice(&[op, 1, a, op | 0x80, 0, a]);
            }
        }
        run(&all);
    }

    #[test]
    fn text_inputs() {
        run(b"{\"seq\":0,\"t_ns\":0,\"port\":\"p\",\"source\":\"host\",\"kind\":\"host_connect\"}\n\n");
        run(b"{\"seq\":0}\nnot json");
        run(b"");
    }
}
