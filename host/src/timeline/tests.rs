//! The timeline's tests.

use super::*;
use serde_json::json;
use std::time::Duration;
use vport_common::checker::Rule;
use vport_common::trace::{parse_jsonl, Source};
use vport_common::Phase;

/// A `Write` whose bytes the test can read.
#[derive(Clone, Default)]
struct Shared(Arc<Mutex<Vec<u8>>>);

impl Write for Shared {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Shared {
    fn text(&self) -> String {
        String::from_utf8(self.0.lock().unwrap().clone()).unwrap()
    }
}

/// Fails every write after the first `ok` ones.
struct Failing {
    ok: usize,
}

impl Write for Failing {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        if self.ok == 0 {
            return Err(std::io::Error::other("disk full"));
        }
        self.ok -= 1;
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn offset_uses_the_fastest_round_trip() {
    // (sent, recv, agent): RTTs 100, 20, 200. The 20 ns one wins: midpoint 210.
    let o = ClockOffset::from_pings(&[(0, 100, 1_000), (200, 220, 1_205), (300, 500, 1_350)]).unwrap();
    assert_eq!((o.offset_ns(), o.rtt_ns(), o.error_bound_ns()), (210 - 1_205, 20, 10));
    assert_eq!(o.to_host_ns(1_205), 210);
    assert_eq!(o.to_host_ns(0), 0, "before the origin clamps to 0");
    // The true offset lies within the bound of the estimate.
    let truth = 212 - 1_205;
    assert!((o.offset_ns() - truth).unsigned_abs() <= o.error_bound_ns());
    // Odd round trips round the bound up.
    assert_eq!(ClockOffset::from_pings(&[(0, 3, 5)]).unwrap().error_bound_ns(), 2);
}

#[test]
fn offset_ignores_impossible_samples_and_needs_one() {
    assert_eq!(ClockOffset::from_pings(&[]), None);
    assert_eq!(ClockOffset::from_pings(&[(10, 5, 1)]), None);
    let o = ClockOffset::from_pings(&[(10, 5, 1), (100, 110, 7)]).unwrap();
    assert_eq!((o.offset_ns(), o.rtt_ns()), (98, 10));
    // An agent clock far ahead of the host's gives a negative offset, not an overflow.
    let o = ClockOffset::from_pings(&[(0, 10, u64::MAX)]).unwrap();
    assert_eq!(o.offset_ns(), i64::MIN, "clamped for display; mapping stays exact");
    assert_eq!(o.to_host_ns(u64::MAX), 5);
}

#[test]
fn offset_from_ping_samples_measures_from_the_origin() {
    let origin = Instant::now();
    let s = |after_ms: u64, rtt_us: u64, agent: u64| PingSample {
        rtt: Duration::from_micros(rtt_us),
        agent_time_ns: agent,
        sent: origin + Duration::from_millis(after_ms),
    };
    let o = ClockOffset::from_ping_samples(origin, &[s(10, 500, 5_000_000_000), s(20, 100, 5_010_000_000)]).unwrap();
    assert_eq!(o.rtt_ns(), 100_000);
    assert_eq!(o.to_host_ns(5_010_000_000), 20_050_000);
}

#[test]
fn records_are_written_as_json_lines_that_read_back() {
    let sink = Shared::default();
    let origin = Instant::now();
    let t = Timeline::with_sink(origin, sink.clone());
    let p = "org.vport.0";
    assert_eq!(t.host_connect(p), 0);
    t.hello(p, 7, 42);
    t.hello_ack(p, 7, 42);
    t.data(p, Direction::GuestToHost, 64, 7);
    t.bye(p, 7, NO_REOPEN, "shutdown");
    t.host_disconnect(p, "eof");
    t.note("", "phase 2");
    t.flush().unwrap();
    let text = sink.text();
    assert_eq!(text.lines().count(), 7);
    let back = parse_jsonl(&text).unwrap();
    assert_eq!(back, t.records());
    assert!(back.iter().enumerate().all(|(i, r)| r.seq == i as u64));
    assert!(back.windows(2).all(|w| w[0].t_ns <= w[1].t_ns));
    assert_eq!(back[4].kind, Kind::Bye { session: 7, reopen_after_ms: None, reason: "shutdown".into() });
    assert_eq!((back[6].source, back[6].port.as_str()), (Source::Rig, ""));
    let first: serde_json::Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
    assert_eq!(first["kind"], "host_connect");
    assert!(t.check().is_clean());
}

#[test]
fn messages_map_to_their_kinds() {
    let t = Timeline::new(Instant::now());
    let p = "p";
    let hello = Message::Hello(vport_common::message::Hello {
        agent_version: "0".into(),
        port_name: p.into(),
        kernel_release: "6.1".into(),
        boot_id: "b".into(),
        nonce: 9,
        agent_time_ns: 1,
    });
    assert_eq!(t.message(p, Direction::GuestToHost, 3, &hello, 80), Some(0));
    assert_eq!(t.message(p, Direction::HostToGuest, 0, &Message::Ping { time_ns: 1 }, 36), None);
    let ack = Message::HelloAck { nonce: 9, host_version: "v".into() };
    t.message(p, Direction::HostToGuest, 3, &ack, 40);
    t.message(p, Direction::HostToGuest, 3, &Message::Echo(vec![1, 2]), 30);
    t.message(p, Direction::GuestToHost, 3, &Message::Bye { reopen_after_ms: 5, reason: "r".into() }, 40);
    let kinds: Vec<Kind> = t.records().into_iter().map(|r| r.kind).collect();
    assert_eq!(
        kinds,
        vec![
            Kind::Hello { session: 3, nonce: 9 },
            Kind::HelloAck { session: 3, nonce: 9 },
            Kind::Data { dir: Direction::HostToGuest, bytes: 30, session: 3 },
            Kind::Bye { session: 3, reopen_after_ms: Some(5), reason: "r".into() },
        ]
    );
}

#[test]
fn qmp_events_and_samples_are_named_and_stamped_with_their_receipt() {
    let origin = Instant::now();
    let t = Timeline::new(origin);
    t.alias("vport0", "org.vport.0");
    t.alias("char-vport0", "org.vport.0");
    let ev = |name: &str, data: serde_json::Value, after_ms: u64| QmpEvent {
        name: name.into(),
        data,
        qemu_time_us: 0,
        received: origin + Duration::from_millis(after_ms),
    };
    assert_eq!(t.qmp_event(&ev("VSERPORT_CHANGE", json!({"id": "vport0", "open": true}), 5)), Some(0));
    assert_eq!(t.qmp_event(&ev("STOP", json!(null), 6)), None);
    t.qmp_event(&ev("VSERPORT_CHANGE", json!({"id": "other", "open": false}), 7));
    let chardevs = [
        ChardevInfo { label: "char-vport0".into(), filename: "unix:x".into(), frontend_open: true },
        ChardevInfo { label: "monitor".into(), filename: "unix:m".into(), frontend_open: true },
    ];
    assert_eq!(t.frontend_samples(&chardevs, origin + Duration::from_millis(9)), vec![2]);
    let r = t.records();
    assert_eq!((r[0].port.as_str(), r[0].t_ns, r[0].source), ("org.vport.0", 5_000_000, Source::Qmp));
    assert_eq!(r[0].kind, Kind::VserportChange { id: "vport0".into(), open: true });
    assert_eq!(r[1].port, "other", "an unaliased id is used as the name");
    assert_eq!(
        (r[2].port.as_str(), r[2].t_ns, &r[2].kind),
        ("org.vport.0", 9_000_000, &Kind::FrontendOpen { open: true })
    );
}

#[test]
fn agent_records_are_mapped_and_never_recorded_twice() {
    let t = Timeline::new(Instant::now());
    let rec = |seq: u64, time_ns: u64, from: Phase, to: Phase| EventRecord {
        seq,
        time_ns,
        from,
        to,
        session: if to == Phase::Disconnected { 0 } else { 5 },
        wakeups: 0,
        cpu_ns: 0,
        cause: "c".into(),
    };
    let offset = ClockOffset::fixed(-1_000);
    let first = [rec(0, 2_000, Phase::Disconnected, Phase::Connected)];
    assert_eq!(t.agent_events("p", &first, &offset), 1);
    let overlapping = [first[0].clone(), rec(1, 3_000, Phase::Connected, Phase::Ready)];
    assert_eq!(t.agent_events("p", &overlapping, &offset), 1);
    let r = t.records();
    assert_eq!(r.len(), 2);
    assert_eq!((r[0].t_ns, r[1].t_ns, r[1].source), (1_000, 2_000, Source::Agent));
    assert!(matches!(r[1].kind, Kind::AgentTransition { from: Phase::Connected, to: Phase::Ready, agent_seq: 1, .. }));
    assert!(t.check().is_clean());
}

#[test]
fn a_failing_sink_is_reported_and_never_leaves_a_hole() {
    let t = Timeline::with_sink(Instant::now(), Failing { ok: 1 });
    t.host_connect("p");
    t.host_disconnect("p", "x");
    t.host_connect("p");
    assert_eq!(t.len(), 3, "records stay in memory");
    let e = t.flush().unwrap_err();
    assert!(matches!(e, TimelineError::Write { seq: 1, source: Some(_) }), "{e:?}");
    assert_eq!(e.to_string(), "cannot write trace record #1 to the trace sink; records from #1 on are only in memory");
    assert!(matches!(t.flush(), Err(TimelineError::Write { seq: 1, source: None })));
}

#[test]
fn handles_on_many_threads_share_one_numbering_and_one_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("trace.jsonl");
    let t = Timeline::create(&path, Instant::now()).unwrap();
    let threads: Vec<_> = (0..4)
        .map(|i| {
            let t = t.clone();
            std::thread::spawn(move || {
                for _ in 0..50 {
                    t.note(&format!("port{i}"), "tick");
                }
            })
        })
        .collect();
    for th in threads {
        th.join().unwrap();
    }
    t.flush().unwrap();
    let back = parse_jsonl(&std::fs::read_to_string(&path).unwrap()).unwrap();
    assert_eq!(back.len(), 200);
    assert!(back.iter().enumerate().all(|(i, r)| r.seq == i as u64), "written in seq order");
    assert_eq!(back, t.records());
}

#[test]
fn check_sees_a_duplicate_connect() {
    let t = Timeline::new(Instant::now());
    t.host_connect("p");
    t.host_connect("p");
    let report = t.check();
    assert_eq!(report.violations.len(), 1);
    assert_eq!((report.violations[0].rule, report.violations[0].records.clone()), (Rule::DuplicateOpened, vec![0, 1]));
}

#[test]
fn create_names_the_file_it_cannot_create() {
    let e = Timeline::create(Path::new("/nonexistent-dir/x/trace.jsonl"), Instant::now()).unwrap_err();
    assert_eq!(e.to_string(), "cannot create trace file /nonexistent-dir/x/trace.jsonl");
}

#[test]
fn a_stale_frame_is_a_note_naming_its_session_not_data_outside_ready() {
    let t = Timeline::new(Instant::now());
    t.host_connect("p");
    let seq = t.stale_frame("p", Direction::GuestToHost, 0x55, &Message::EchoReply(b"old".to_vec()), 44);
    let records = t.records();
    let Kind::Note { text } = &records[seq as usize].kind else { panic!("{:?}", records[seq as usize]) };
    assert!(text.contains("g2h EchoReply of session 0x00000055 (44 bytes)"), "{text}");
    assert!(t.check().is_clean(), "{:?}", t.check());
    // The same frame recorded as a message is what the checker rejects.
    t.message("p", Direction::GuestToHost, 0x55, &Message::EchoReply(b"old".to_vec()), 44);
    assert!(!t.check().is_clean());
}
