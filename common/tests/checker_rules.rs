//! The checker's rules on hand-made traces: each rule broken once (and the violation names the
//! right records), a clean trace accepted, the QMP throttle case accepted with a note.

use vport_common::checker::{check, CheckReport, NoteKind, Rule};
use vport_common::trace::{parse_jsonl, Direction, Kind, Record, Source};
use vport_common::Phase;

const P: &str = "org.vport.0";
const MS: u64 = 1_000_000;

/// Records numbered from 0 in the given order, at the given millisecond.
fn trace(items: Vec<(u64, Kind)>) -> Vec<Record> {
    items
        .into_iter()
        .enumerate()
        .map(|(i, (ms, kind))| Record {
            seq: i as u64,
            t_ns: ms * MS,
            port: P.into(),
            source: kind.default_source(),
            kind,
        })
        .collect()
}

fn connect() -> Kind {
    Kind::HostConnect
}
fn disconnect() -> Kind {
    Kind::HostDisconnect { reason: "host closed".into() }
}
fn hello(session: u32, nonce: u64) -> Kind {
    Kind::Hello { session, nonce }
}
fn ack(session: u32, nonce: u64) -> Kind {
    Kind::HelloAck { session, nonce }
}
fn data(dir: Direction, session: u32) -> Kind {
    Kind::Data { dir, bytes: 100, session }
}
fn bye(session: u32) -> Kind {
    Kind::Bye { session, reopen_after_ms: Some(100), reason: "reopen command".into() }
}
fn vserport(open: bool) -> Kind {
    Kind::VserportChange { id: "vport0".into(), open }
}
fn frontend(open: bool) -> Kind {
    Kind::FrontendOpen { open }
}
fn agent(agent_seq: u64, from: Phase, to: Phase, session: u32) -> Kind {
    Kind::AgentTransition { from, to, session, cause: "test".into(), agent_time_ns: 0, agent_seq }
}
use Direction::{GuestToHost as G2H, HostToGuest as H2G};
use Phase::{Connected as C, Disconnected as D, Ready as R};

/// Exactly one violation, of `rule`, naming exactly `records`.
fn assert_one(report: &CheckReport, rule: Rule, records: &[u64]) {
    assert_eq!(report.violations.len(), 1, "{:#?}", report.violations);
    let v = &report.violations[0];
    assert_eq!((v.rule, v.records.as_slice(), v.port.as_str()), (rule, records, P), "{v}");
    let text = v.to_string();
    let names: Vec<String> = records.iter().map(|r| format!("#{r}")).collect();
    assert!(text.starts_with(&format!("violation: {}: records {}: ", rule.name(), names.join(", "))), "{text}");
}

/// A whole life: connect, handshake, data, a guest reopen (BYE, new session), QMP that agrees,
/// the agent's own records, disconnect.
fn clean_trace() -> Vec<Record> {
    trace(vec![
        (0, vserport(true)),
        (1, frontend(true)),
        (10, connect()),
        (11, hello(1, 10)),
        (12, ack(1, 10)),
        (13, data(H2G, 1)),
        (14, data(G2H, 1)),
        (20, bye(1)),
        (21, vserport(false)),
        (22, frontend(false)),
        (130, hello(2, 20)),
        (131, ack(2, 20)),
        (132, data(G2H, 2)),
        (1100, vserport(true)),
        (1101, frontend(true)),
        (1200, disconnect()),
        (1300, connect()),
        (1301, hello(3, 30)),
        (1302, ack(3, 30)),
        (1400, disconnect()),
        // The agent's records, fetched at the end (their t_ns is the mapped agent time).
        (11, agent(0, D, C, 1)),
        (12, agent(1, C, R, 1)),
        (20, agent(2, R, D, 0)),
        (130, agent(3, D, C, 2)),
        (131, agent(4, C, R, 2)),
        (1200, agent(5, R, D, 0)),
        (1301, agent(6, D, C, 3)),
        (1302, agent(7, C, R, 3)),
        (1400, agent(8, R, D, 0)),
    ])
}

#[test]
fn a_clean_trace_is_accepted_with_a_true_summary() {
    let report = check(&clean_trace());
    assert!(report.is_clean(), "{:#?}", report.violations);
    assert!(report.notes.is_empty(), "{:#?}", report.notes);
    assert_eq!(report.records, 29);
    assert_eq!(report.ports.len(), 1);
    let s = &report.ports[0];
    assert_eq!(s.port, P);
    assert_eq!((s.counts.host_connects, s.counts.host_disconnects, s.host_connected), (2, 2, false));
    assert_eq!((s.counts.sessions, s.counts.ready, s.counts.byes, s.counts.hello_repeats), (3, 3, 1, 0));
    assert_eq!((s.counts.data_records, s.counts.bytes_h2g, s.counts.bytes_g2h), (3, 100, 200));
    assert_eq!((s.state, s.session), (Phase::Disconnected, None));
    assert_eq!(
        (s.counts.vserport_changes, s.counts.coalesced, s.counts.frontend_samples, s.guest_open),
        (3, 0, 3, Some(true))
    );
    assert_eq!((s.counts.agent_transitions, s.agent_state), (9, Some(D)));
    assert_eq!(s.violations, 0);
}

#[test]
fn duplicate_opened_names_both_connects() {
    let report = check(&trace(vec![(0, connect()), (1, hello(1, 10)), (2, connect())]));
    assert_one(&report, Rule::DuplicateOpened, &[0, 2]);
    assert!(report.violations[0].detail.contains("duplicate OPENED"));
    assert_eq!(report.ports[0].violations, 1);
}

#[test]
fn duplicate_opened_from_a_jsonl_file() {
    let text = r#"{"seq":0,"t_ns":1000,"port":"org.vport.0","source":"host","kind":"host_connect"}
{"seq":1,"t_ns":2000,"port":"org.vport.0","source":"host","kind":"host_connect"}
"#;
    assert_one(&check(&parse_jsonl(text).unwrap()), Rule::DuplicateOpened, &[0, 1]);
}

#[test]
fn a_session_offered_twice_with_another_nonce_is_a_duplicate_opened() {
    let report = check(&trace(vec![(0, connect()), (1, hello(1, 10)), (2, hello(1, 11))]));
    assert_one(&report, Rule::DuplicateOpened, &[1, 2]);
}

#[test]
fn a_repeated_hello_answering_hello_request_is_legal() {
    let report = check(&trace(vec![
        (0, connect()),
        (1000, Kind::HelloRequest),
        (2000, Kind::HelloRequest),
        (2100, hello(1, 10)),
        (2101, hello(1, 10)),
        (2102, ack(1, 10)),
        (2103, hello(1, 10)),
        (2104, data(G2H, 1)),
    ]));
    assert!(report.is_clean(), "{:#?}", report.violations);
    assert!(report.notes.is_empty(), "{:#?}", report.notes);
    assert_eq!(
        (report.ports[0].counts.sessions, report.ports[0].counts.hello_repeats, report.ports[0].counts.hello_requests),
        (1, 2, 2)
    );
}

#[test]
fn host_disconnect_without_connect_breaks_alternation() {
    let report = check(&trace(vec![(0, connect()), (1, disconnect()), (2, disconnect())]));
    assert_one(&report, Rule::HostAlternation, &[1, 2]);
    let report = check(&trace(vec![(0, disconnect())]));
    assert_one(&report, Rule::HostAlternation, &[0]);
}

#[test]
fn two_byes_without_a_reopen_break_guest_alternation() {
    let report = check(&trace(vec![(0, connect()), (1, hello(1, 10)), (2, ack(1, 10)), (3, bye(1)), (4, bye(1))]));
    assert_one(&report, Rule::GuestAlternation, &[3, 4]);
    // Even with QMP showing the port open again in between, a BYE of a session that already
    // ended is not a close of anything open: a reopened guest offers a new session first.
    let report = check(&trace(vec![
        (0, connect()),
        (1, hello(1, 10)),
        (2, ack(1, 10)),
        (3, bye(1)),
        (4, frontend(true)),
        (5, bye(1)),
    ]));
    assert_one(&report, Rule::GuestAlternation, &[3, 5]);
    // A reopen (a new session) in between makes the second BYE legal.
    let report = check(&trace(vec![
        (0, connect()),
        (1, hello(1, 10)),
        (2, ack(1, 10)),
        (3, bye(1)),
        (4, hello(2, 20)),
        (5, bye(2)),
    ]));
    assert!(report.is_clean(), "{:#?}", report.violations);
}

#[test]
fn bye_outside_a_session_breaks_guest_alternation() {
    let report = check(&trace(vec![(0, connect()), (1, bye(7))]));
    assert_one(&report, Rule::GuestAlternation, &[1]);
}

#[test]
fn hello_ack_without_its_hello_breaks_ready_only_from_connected() {
    // No offer at all.
    assert_one(&check(&trace(vec![(0, connect()), (1, ack(1, 10))])), Rule::ReadyOnlyFromConnected, &[1]);
    // Another session's ack.
    let report = check(&trace(vec![(0, connect()), (1, hello(1, 10)), (2, ack(2, 10))]));
    assert_one(&report, Rule::ReadyOnlyFromConnected, &[1, 2]);
    // The right session, the wrong nonce.
    let report = check(&trace(vec![(0, connect()), (1, hello(1, 10)), (2, ack(1, 11))]));
    assert_one(&report, Rule::ReadyOnlyFromConnected, &[1, 2]);
    // A second ack: READY from READY.
    let report = check(&trace(vec![(0, connect()), (1, hello(1, 10)), (2, ack(1, 10)), (3, ack(1, 10))]));
    assert_one(&report, Rule::ReadyOnlyFromConnected, &[2, 3]);
}

#[test]
fn agent_ready_from_disconnected_breaks_ready_only_from_connected() {
    let report = check(&trace(vec![(0, agent(0, D, R, 1))]));
    assert_one(&report, Rule::ReadyOnlyFromConnected, &[0]);
    let report = check(&trace(vec![(0, agent(0, D, C, 1)), (1, agent(1, C, R, 2))]));
    assert_one(&report, Rule::ReadyOnlyFromConnected, &[1]);
}

#[test]
fn data_outside_ready_names_the_data_and_the_state_it_met() {
    // Before the ack: CONNECTED since the hello (#1).
    let report = check(&trace(vec![(0, connect()), (1, hello(1, 10)), (2, data(G2H, 1)), (3, data(H2G, 1))]));
    assert_one(&report, Rule::NoDataOutsideReady, &[1, 2]);
    assert!(report.violations[0].detail.contains("1 more such data records, the last #3"), "{}", report.violations[0]);
    // A stale session's data after a new session became READY.
    let report = check(&trace(vec![
        (0, connect()),
        (1, hello(1, 10)),
        (2, ack(1, 10)),
        (3, bye(1)),
        (4, hello(2, 20)),
        (5, ack(2, 20)),
        (6, data(G2H, 1)),
    ]));
    assert_one(&report, Rule::NoDataOutsideReady, &[5, 6]);
    // After the host left.
    let report =
        check(&trace(vec![(0, connect()), (1, hello(1, 10)), (2, ack(1, 10)), (3, disconnect()), (4, data(H2G, 1))]));
    assert_one(&report, Rule::NoDataOutsideReady, &[3, 4]);
}

#[test]
fn in_band_messages_need_a_host_connection() {
    let report = check(&trace(vec![(0, hello(1, 10))]));
    assert_one(&report, Rule::InBandWithoutHost, &[0]);
    let report = check(&trace(vec![(0, connect()), (1, disconnect()), (2, Kind::HelloRequest)]));
    assert_one(&report, Rule::InBandWithoutHost, &[1, 2]);
}

#[test]
fn agent_records_must_continue_each_other() {
    let report = check(&trace(vec![(0, agent(0, D, C, 1)), (1, agent(1, R, D, 0))]));
    assert_one(&report, Rule::AgentContinuity, &[0, 1]);
    // A gap in agent record numbers is a note, and continuity is not judged across it.
    let report = check(&trace(vec![(0, agent(0, D, C, 1)), (1, agent(5, R, D, 0))]));
    assert!(report.is_clean(), "{:#?}", report.violations);
    assert_eq!(report.notes.len(), 1);
    assert_eq!(
        (report.notes[0].kind, report.notes[0].records.as_slice()),
        (NoteKind::AgentRecordsMissing, &[0, 1][..])
    );
    // A record fetched twice is a note and ignored.
    let report = check(&trace(vec![(0, agent(0, D, C, 1)), (1, agent(0, D, C, 1)), (2, agent(1, C, R, 1))]));
    assert!(report.is_clean(), "{:#?}", report.violations);
    assert_eq!(report.notes[0].kind, NoteKind::AgentRecordRepeated);
}

#[test]
fn agent_records_that_are_no_transition_are_violations() {
    assert_one(&check(&trace(vec![(0, agent(0, D, D, 0))])), Rule::AgentTransition, &[0]);
    assert_one(&check(&trace(vec![(0, agent(0, D, C, 0))])), Rule::AgentTransition, &[0]);
    let report = check(&trace(vec![(0, agent(0, D, C, 1)), (1, agent(1, C, R, 1)), (2, agent(2, R, C, 1))]));
    assert_one(&report, Rule::AgentTransition, &[2]);
}

#[test]
fn record_numbers_must_increase() {
    let mut t = trace(vec![(0, connect()), (1, hello(1, 10)), (2, ack(1, 10))]);
    t[2].seq = 1;
    assert_one(&check(&t), Rule::RecordNumbering, &[1]);
}

#[test]
fn qmp_throttle_repeats_are_notes_not_violations() {
    // The guest closes, opens and closes again within a second: QEMU sends open=false at
    // once, then (at the end of the window) the latest, open=false again. The frontend-open
    // samples agree with each event; the in-band BYE/HELLO show the real edges.
    let report = check(&trace(vec![
        (0, connect()),
        (1, vserport(true)),
        (2, frontend(true)),
        (3, hello(1, 10)),
        (4, ack(1, 10)),
        (100, bye(1)),
        (101, vserport(false)),
        (102, frontend(false)),
        (300, hello(2, 20)),
        (301, ack(2, 20)),
        (500, bye(2)),
        (1101, vserport(false)),
        (1102, frontend(false)),
    ]));
    assert!(report.is_clean(), "{:#?}", report.violations);
    assert_eq!(report.notes.len(), 1, "{:#?}", report.notes);
    let n = &report.notes[0];
    assert_eq!((n.kind, n.records.as_slice()), (NoteKind::CoalescedVserportChange, &[6, 11][..]));
    assert!(n.detail.contains("1000 ms apart"), "{}", n.detail);
    assert_eq!(report.ports[0].counts.coalesced, 1);
    assert!(n.to_string().starts_with("note: coalesced-vserport-change: records #6, #11: port org.vport.0: "), "{n}");
}

#[test]
fn qmp_events_are_ordered_by_receipt_time_not_file_order() {
    // The event arrived at 101 ms but was written after the sample of 102 ms.
    let report = check(&trace(vec![(0, vserport(true)), (102, frontend(false)), (101, vserport(false))]));
    assert!(report.notes.is_empty(), "{:#?}", report.notes);
}

#[test]
fn a_sample_never_followed_by_its_event_is_a_note() {
    let report = check(&trace(vec![(0, vserport(true)), (200, frontend(false)), (3000, frontend(false))]));
    assert!(report.is_clean());
    assert_eq!(report.notes.len(), 1, "{:#?}", report.notes);
    assert_eq!(
        (report.notes[0].kind, report.notes[0].records.as_slice()),
        (NoteKind::UnreconciledQmpLevel, &[0, 1][..])
    );
    // Within the window the event is still allowed to come: no note.
    let report = check(&trace(vec![(0, vserport(true)), (200, frontend(false)), (1000, vserport(false))]));
    assert!(report.notes.is_empty(), "{:#?}", report.notes);
}

#[test]
fn a_new_session_without_a_reason_is_a_note() {
    let report = check(&trace(vec![(0, connect()), (1, hello(1, 10)), (2, ack(1, 10)), (3, hello(2, 20))]));
    assert!(report.is_clean());
    assert_eq!(
        (report.notes[0].kind, report.notes[0].records.as_slice()),
        (NoteKind::UnexplainedNewSession, &[1, 3][..])
    );
    // After a HELLO_REQUEST in READY, a new session is the protocol's answer.
    let report = check(&trace(vec![
        (0, connect()),
        (1, hello(1, 10)),
        (2, ack(1, 10)),
        (3, Kind::HelloRequest),
        (4, hello(2, 20)),
        (5, ack(2, 20)),
        (6, data(H2G, 2)),
    ]));
    assert!(report.is_clean() && report.notes.is_empty(), "{report:#?}");
}

#[test]
fn ports_are_checked_independently() {
    let mut t = trace(vec![(0, connect()), (1, connect())]);
    t[1].port = "org.vport.1".into();
    t.push(Record { seq: 2, t_ns: 2, port: String::new(), source: Source::Rig, kind: Kind::Note { text: "x".into() } });
    let report = check(&t);
    assert!(report.is_clean(), "{:#?}", report.violations);
    assert_eq!(report.ports.iter().map(|p| p.port.as_str()).collect::<Vec<_>>(), ["org.vport.0", "org.vport.1"]);
}
