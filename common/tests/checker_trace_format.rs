//! The trace format: what serde_json writes, `parse_jsonl` reads back unchanged (the host
//! writes with serde_json; `vport-common` reads with its own JSON reader), and the JSON shape
//! is the documented one.

use proptest::prelude::*;
use vport_common::checker::check;
use vport_common::trace::{parse_jsonl, parse_record, Direction, Kind, Record, Source};
use vport_common::Phase;

fn state() -> impl Strategy<Value = Phase> {
    prop_oneof![Just(Phase::Disconnected), Just(Phase::Connected), Just(Phase::Ready)]
}

fn kind() -> impl Strategy<Value = Kind> {
    // Any chars, control characters and quotes included (`any::<String>()` leaves controls out).
    let text = proptest::collection::vec(any::<char>(), 0..24).prop_map(String::from_iter);
    prop_oneof![
        Just(Kind::HostConnect),
        text.clone().prop_map(|reason| Kind::HostDisconnect { reason }),
        (any::<bool>(), any::<u64>(), any::<u32>()).prop_map(|(h2g, bytes, session)| Kind::Data {
            dir: if h2g { Direction::HostToGuest } else { Direction::GuestToHost },
            bytes,
            session
        }),
        (any::<u32>(), any::<u64>()).prop_map(|(session, nonce)| Kind::Hello { session, nonce }),
        (any::<u32>(), any::<u64>()).prop_map(|(session, nonce)| Kind::HelloAck { session, nonce }),
        Just(Kind::HelloRequest),
        (any::<u32>(), any::<Option<u32>>(), text.clone()).prop_map(|(session, reopen_after_ms, reason)| Kind::Bye {
            session,
            reopen_after_ms,
            reason
        }),
        (text.clone(), any::<bool>()).prop_map(|(id, open)| Kind::VserportChange { id, open }),
        any::<bool>().prop_map(|open| Kind::FrontendOpen { open }),
        (state(), state(), any::<u32>(), text.clone(), any::<u64>(), any::<u64>()).prop_map(
            |(from, to, session, cause, agent_time_ns, agent_seq)| Kind::AgentTransition {
                from,
                to,
                session,
                cause,
                agent_time_ns,
                agent_seq
            }
        ),
        text.prop_map(|text| Kind::Note { text }),
    ]
}

fn source() -> impl Strategy<Value = Source> {
    prop_oneof![Just(Source::Host), Just(Source::Qmp), Just(Source::Agent), Just(Source::Rig)]
}

proptest! {
    #[test]
    fn serde_json_lines_read_back_unchanged(
        records in proptest::collection::vec((any::<u64>(), any::<u64>(), "[a-z.0-9]{0,12}", source(), kind()), 0..20)
    ) {
        let records: Vec<Record> = records
            .into_iter()
            .map(|(seq, t_ns, port, source, kind)| Record { seq, t_ns, port, source, kind })
            .collect();
        let mut text = String::new();
        for r in &records {
            text.push_str(&serde_json::to_string(r).unwrap());
            text.push('\n');
        }
        prop_assert_eq!(parse_jsonl(&text).unwrap(), records);
    }

    #[test]
    fn the_checker_never_panics_on_any_trace(
        records in proptest::collection::vec((0u64..40, any::<u64>(), "[ab]", source(), kind()), 0..60)
    ) {
        let records: Vec<Record> = records
            .into_iter()
            .map(|(seq, t_ns, port, source, kind)| Record { seq, t_ns, port, source, kind })
            .collect();
        let report = check(&records);
        prop_assert_eq!(report.records, records.len());
        for v in &report.violations {
            prop_assert!(!v.records.is_empty() && v.records.windows(2).all(|w| w[0] < w[1]), "{}", v);
        }
    }

    #[test]
    fn any_line_parses_or_errors_without_panicking(line in ".{0,200}") {
        let _ = parse_record(&line, 1);
    }

    #[test]
    fn damaged_records_are_errors_naming_their_line(cut in 1usize..60) {
        let r = Record { seq: 1, t_ns: 2, port: "p".into(), source: Source::Host, kind: Kind::Hello { session: 3, nonce: 4 } };
        let line = serde_json::to_string(&r).unwrap();
        let cut = cut.min(line.len() - 1);
        let text = format!("{line}\n{}\n", &line[..cut]);
        let e = parse_jsonl(&text).unwrap_err();
        prop_assert_eq!(e.line(), 2);
    }
}

#[test]
fn the_json_shape_is_the_documented_one() {
    let r = Record {
        seq: 7,
        t_ns: 1_500,
        port: "org.vport.0".into(),
        source: Source::Agent,
        kind: Kind::AgentTransition {
            from: Phase::Connected,
            to: Phase::Ready,
            session: 9,
            cause: "hello ack".into(),
            agent_time_ns: 42,
            agent_seq: 3,
        },
    };
    assert_eq!(
        serde_json::to_string(&r).unwrap(),
        r#"{"seq":7,"t_ns":1500,"port":"org.vport.0","source":"agent","kind":"agent_transition","from":"CONNECTED","to":"READY","session":9,"cause":"hello ack","agent_time_ns":42,"agent_seq":3}"#
    );
    let d = Kind::Data { dir: Direction::GuestToHost, bytes: 5, session: 1 };
    assert_eq!(serde_json::to_string(&d).unwrap(), r#"{"kind":"data","dir":"g2h","bytes":5,"session":1}"#);
    let b = Kind::Bye { session: 1, reopen_after_ms: None, reason: "shutdown".into() };
    assert_eq!(
        serde_json::to_string(&b).unwrap(),
        r#"{"kind":"bye","session":1,"reopen_after_ms":null,"reason":"shutdown"}"#
    );
    assert_eq!(serde_json::to_string(&Kind::HostConnect).unwrap(), r#"{"kind":"host_connect"}"#);
}
