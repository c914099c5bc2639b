//! The client against scripted fake servers: first a well-behaved one, then one test per way
//! a server can misbehave, each asserting the typed error and that the call returned (long)
//! before its deadline plus a generous margin, never a hang or a panic.

use super::fake::{ok, FakeQmp, Peer, GREETING};
use super::*;

#[test]
fn replies_route_by_id_and_events_arrive_on_the_channel() {
    let fake = FakeQmp::respond(|cmd| {
        match cmd["execute"].as_str().unwrap() {
        "query-chardev" => vec![
            // an event interleaved before the reply
            r#"{"event":"VSERPORT_CHANGE","data":{"id":"port0","open":true},"timestamp":{"seconds":2,"microseconds":5}}"#.into(),
            ok(cmd, json!([{"label":"c0","filename":"unix:/x,server=on","frontend-open":true}])),
        ],
        _ => vec![ok(cmd, json!({}))],
    }
    });
    let qmp = Qmp::connect(&fake.path, Duration::from_secs(5)).unwrap();
    let sub = qmp.subscribe();
    let devs = qmp.query_chardev().unwrap();
    assert_eq!(
        devs,
        vec![ChardevInfo { label: "c0".into(), filename: "unix:/x,server=on".into(), frontend_open: true }]
    );
    let (ev, others) = qmp.wait_event(Duration::from_secs(5), |e| e.vserport_change().is_some());
    let ev = ev.unwrap();
    assert_eq!(ev.vserport_change(), Some(("port0", true)));
    assert_eq!(ev.qemu_time_us, 2_000_005);
    assert!(others.is_empty());
    // Subscribed before the event: the subscriber has its own copy.
    assert_eq!(sub.recv_timeout(Duration::from_secs(5)).unwrap().vserport_change(), Some(("port0", true)));
}

#[test]
fn command_errors_carry_class_and_description() {
    let fake = FakeQmp::respond(|cmd| match cmd["execute"].as_str().unwrap() {
        "device_del" => {
            vec![json!({"error": {"class": "DeviceNotFound", "desc": "Device 'x' not found"}, "id": cmd["id"]})
                .to_string()]
        }
        _ => vec![ok(cmd, json!({}))],
    });
    let qmp = Qmp::connect(&fake.path, Duration::from_secs(5)).unwrap();
    let err = qmp.device_del("x").unwrap_err();
    assert!(matches!(&err, QmpError::Command { class, .. } if class == "DeviceNotFound"), "{err}");
}

#[test]
fn silent_server_times_out_and_closed_server_disconnects() {
    let fake = FakeQmp::respond(|cmd| match cmd["execute"].as_str().unwrap() {
        "qmp_capabilities" => vec![ok(cmd, json!({}))],
        _ => vec![],
    });
    let qmp = Qmp::connect(&fake.path, Duration::from_secs(5)).unwrap();
    let err = qmp.execute_timeout("query-status", None, Duration::from_millis(50)).unwrap_err();
    assert!(matches!(err, QmpError::Timeout { .. }), "{err}");

    let fake = FakeQmp::start(|p| {
        p.negotiate();
        p.command(); // read the next command, then hang up
    });
    let qmp = Qmp::connect(&fake.path, Duration::from_secs(5)).unwrap();
    let sub = qmp.subscribe();
    let err = qmp.execute_timeout("query-status", None, Duration::from_secs(30)).unwrap_err();
    assert!(matches!(err, QmpError::Disconnected { reason: ConnectionEnd::Closed, .. }), "{err}");
    assert!(sub.recv_timeout(Duration::from_secs(5)).is_err(), "subscribers see the close");
}

#[test]
fn migration_wrappers_send_the_uri_and_parse_the_status() {
    let fake = FakeQmp::respond(|cmd| match cmd["execute"].as_str().unwrap() {
        "migrate" => {
            assert_eq!(cmd["arguments"]["uri"], "unix:/tmp/m.sock");
            vec![ok(cmd, json!({}))]
        }
        "query-migrate" => vec![ok(cmd, json!({"status": "failed", "error-desc": "boom"}))],
        _ => vec![ok(cmd, json!({}))],
    });
    let qmp = Qmp::connect(&fake.path, Duration::from_secs(5)).unwrap();
    qmp.migrate("unix:/tmp/m.sock").unwrap();
    assert_eq!(qmp.query_migrate().unwrap(), MigrationStatus { status: "failed".into(), error: Some("boom".into()) });
}

#[test]
fn vring_num_finds_the_device_on_pci_and_on_virtio_mmio_and_is_none_without_the_command() {
    // The shapes QEMU 7.2 gives: the backend under the PCI proxy, or the virtio-mmio device itself.
    for (path, num) in [("/machine/peripheral/vser0/virtio-backend", 128), ("/machine/peripheral/vser0", 1024)] {
        let fake = FakeQmp::respond(move |cmd| match cmd["execute"].as_str().unwrap() {
            "x-query-virtio" => vec![ok(
                cmd,
                json!([{"name": "virtio-serial", "path": "/machine/peripheral/vser01"}, {"name": "virtio-serial", "path": path}]),
            )],
            "x-query-virtio-queue-status" => {
                assert_eq!(
                    (cmd["arguments"]["path"].as_str(), cmd["arguments"]["queue"].as_u64()),
                    (Some(path), Some(5))
                );
                vec![ok(cmd, json!({"name": "virtio-serial", "vring-num": num, "vring-num-default": 128}))]
            }
            _ => vec![ok(cmd, json!({}))],
        });
        let qmp = Qmp::connect(&fake.path, Duration::from_secs(5)).unwrap();
        assert_eq!(qmp.virtio_vring_num("vser0", 5).unwrap(), Some(num));
        assert_eq!(qmp.virtio_vring_num("vser9", 5).unwrap(), None);
    }
    let fake = FakeQmp::respond(|cmd| match cmd["execute"].as_str().unwrap() {
        "x-query-virtio" => {
            vec![json!({"error": {"class": "CommandNotFound", "desc": "The command x-query-virtio has not been found"}, "id": cmd["id"]}).to_string()]
        }
        _ => vec![ok(cmd, json!({}))],
    });
    let qmp = Qmp::connect(&fake.path, Duration::from_secs(5)).unwrap();
    assert_eq!(qmp.virtio_vring_num("vser0", 5).unwrap(), None);
}

#[test]
fn version_display_puts_the_package_in_parentheses() {
    let v = QemuVersion { major: 7, minor: 2, micro: 22, package: "Debian 1:7.2+dfsg-7".into() };
    assert_eq!(v.to_string(), "7.2.22 (Debian 1:7.2+dfsg-7)");
    let v = QemuVersion { package: String::new(), ..v };
    assert_eq!(v.to_string(), "7.2.22");
}

#[test]
fn a_missing_socket_is_a_connect_error_naming_the_path() {
    let err = Qmp::connect(Path::new("/nonexistent/qmp.sock"), Duration::from_secs(1)).err().unwrap();
    assert!(err.to_string().contains("/nonexistent/qmp.sock"), "{err}");
}

// ---- A misbehaving server -------------------------------------------------------------

/// Far beyond any deadline used below: a call that has not returned by then hangs.
const MARGIN: Duration = Duration::from_secs(10);
/// A short deadline for the calls expected to time out.
const SHORT: Duration = Duration::from_millis(300);
/// A long deadline for the calls expected to fail at once, long before it.
const LONG: Duration = Duration::from_secs(60);

/// Runs `f` on its own thread and returns its result and how long it took; panics if it has
/// not returned within `limit` (the call hangs).
fn returns_within<T: Send + 'static>(limit: Duration, f: impl FnOnce() -> T + Send + 'static) -> (T, Duration) {
    let (tx, rx) = crossbeam_channel::bounded(1);
    let started = Instant::now();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    match rx.recv_timeout(limit) {
        Ok(v) => (v, started.elapsed()),
        Err(_) => panic!("the call did not return within {limit:?}"),
    }
}

/// A client connected to a server that negotiates and then runs `script`.
fn connected(script: impl Fn(&mut Peer) + Send + 'static) -> (FakeQmp, Arc<Qmp>) {
    let fake = FakeQmp::start(move |p| {
        p.negotiate();
        script(p);
    });
    let qmp = Qmp::connect(&fake.path, Duration::from_secs(5)).unwrap();
    (fake, Arc::new(qmp))
}

/// `execute_timeout(query-status, timeout)` on its own thread, bounded by `timeout + MARGIN`.
fn run(qmp: &Arc<Qmp>, timeout: Duration) -> (Result<Value, QmpError>, Duration) {
    let qmp = qmp.clone();
    returns_within(timeout + MARGIN, move || qmp.execute_timeout("query-status", None, timeout))
}

/// A reply to the next command: `{"return": <body>, "id": N}`.
fn reply_with(p: &mut Peer, body: &str) {
    let cmd = p.command().unwrap_or(Value::Null);
    p.line(&format!(r#"{{"return": {body}, "id": {}}}"#, cmd["id"]));
}

/// The error of a command that must fail with `Disconnected` long before `LONG`, and the
/// reason; later commands fail at once with the same reason.
fn lost(qmp: &Arc<Qmp>) -> ConnectionEnd {
    let (r, _) = run(qmp, LONG);
    let Err(QmpError::Disconnected { reason, .. }) = r else { panic!("not disconnected: {r:?}") };
    let (again, _) = run(qmp, LONG);
    assert!(matches!(&again, Err(QmpError::Disconnected { reason: r2, .. }) if *r2 == reason), "{again:?}");
    reason
}

#[test]
fn an_endless_line_without_a_newline_ends_the_connection_with_line_too_long() {
    let (_f, qmp) = connected(|p| {
        p.command();
        let chunk = vec![b'x'; 64 * 1024];
        // 2 MiB and no newline; the client closes the socket, and then writes fail.
        for _ in 0..32 {
            p.send(&chunk);
        }
        p.hold();
    });
    let sub = qmp.subscribe();
    assert_eq!(lost(&qmp), ConnectionEnd::LineTooLong { limit: MAX_LINE_BYTES });
    assert!(sub.recv_timeout(MARGIN).is_err(), "subscribers see the end");
}

#[test]
fn a_complete_reply_over_the_line_limit_ends_the_connection_with_line_too_long() {
    let (_f, qmp) = connected(|p| {
        reply_with(p, &format!("\"{}\"", "y".repeat(MAX_LINE_BYTES + 10)));
        p.hold();
    });
    assert_eq!(lost(&qmp), ConnectionEnd::LineTooLong { limit: MAX_LINE_BYTES });
}

#[test]
fn a_huge_reply_within_the_line_limit_is_delivered() {
    let (_f, qmp) = connected(|p| {
        let big: Vec<Value> = (0..20_000).map(|i| json!({"label": format!("c{i}"), "x": "z".repeat(20)})).collect();
        let body = Value::Array(big).to_string();
        assert!(body.len() > 800_000 && body.len() < MAX_LINE_BYTES - 100, "{}", body.len());
        reply_with(p, &body);
        p.hold();
    });
    let (r, _) = run(&qmp, LONG);
    let v = r.unwrap();
    assert_eq!((v.as_array().map(Vec::len), &v[19_999]["label"]), (Some(20_000), &json!("c19999")));
}

#[test]
fn lines_that_are_not_qmp_messages_are_skipped_and_counted() {
    let (_f, qmp) = connected(|p| {
        let cmd = p.command().unwrap_or(Value::Null);
        p.send(b"not json at all\n");
        p.send(b"{\"return\": \"\xff\xfe\", \"id\": 99}\n"); // not UTF-8
        p.send(b"\r\n"); // empty
        p.send(b"[1, 2, 3]\n"); // JSON, not an object
        p.send(b"{\"greetings\": \"earthlings\"}\n"); // none of the QMP members
        p.send(b"{\"event\": 42}\n"); // an event without a name
        p.line(GREETING); // a second greeting
        p.send(b"{\"return\": \n"); // cut-off JSON
        p.line(&ok(&cmd, json!({"status": "running"})));
        p.hold();
    });
    let (r, _) = run(&qmp, LONG);
    assert_eq!(r.unwrap(), json!({"status": "running"}));
    let st = qmp.stats();
    assert_eq!((st.skipped, st.replies, st.lines), (8, 2, 10), "{st:?}");
}

#[test]
fn replies_with_a_missing_or_unknown_id_go_to_nobody_and_the_command_times_out() {
    let (_f, qmp) = connected(|p| {
        p.command();
        p.line(r#"{"return": {}}"#);
        p.line(r#"{"return": {}, "id": 999999}"#);
        p.line(r#"{"error": {"class": "GenericError", "desc": "JSON parse error"}}"#);
        p.line(r#"{"return": {}, "id": "2"}"#);
        reply_with(p, r#""second""#); // the next command is answered
        p.hold();
    });
    let (r, took) = run(&qmp, SHORT);
    assert!(matches!(r, Err(QmpError::Timeout { .. })), "{r:?}");
    assert!(took >= SHORT, "{took:?}");
    assert_eq!(qmp.stats().unmatched_replies, 4);
    let (r, _) = run(&qmp, LONG);
    assert_eq!(r.unwrap(), json!("second"), "the reader goes on");
}

#[test]
fn a_reply_that_comes_after_its_command_gave_up_goes_to_nobody() {
    let (_f, qmp) = connected(|p| {
        let first = p.command().unwrap_or(Value::Null);
        let second = p.command().unwrap_or(Value::Null); // sent after the first timed out
        p.line(&ok(&first, json!("first")));
        p.line(&ok(&second, json!("second")));
        p.hold();
    });
    let (r, _) = run(&qmp, SHORT);
    assert!(matches!(r, Err(QmpError::Timeout { .. })), "{r:?}");
    let (r, _) = run(&qmp, LONG);
    assert_eq!(r.unwrap(), json!("second"), "a late reply is not taken for the next command's");
    assert_eq!((qmp.stats().unmatched_replies, qmp.stats().replies), (1, 2));
}

#[test]
fn unknown_and_odd_events_are_delivered_and_the_reader_goes_on() {
    let (_f, qmp) = connected(|p| {
        let cmd = p.command().unwrap_or(Value::Null);
        p.line(
            r#"{"event": "FROM_A_FUTURE_QEMU", "data": {"x": [1]}, "timestamp": {"seconds": 1, "microseconds": 2}}"#,
        );
        p.line(r#"{"event": "NO_DATA"}"#);
        p.line(r#"{"event": "ODD", "data": "text", "timestamp": "now"}"#);
        p.line(&format!(r#"{{"event": "LATE", "timestamp": {{"seconds": {}, "microseconds": 1}}}}"#, u64::MAX));
        p.line(&ok(&cmd, json!({})));
        p.hold();
    });
    let sub = qmp.subscribe();
    let (r, _) = run(&qmp, LONG);
    r.unwrap();
    let got: Vec<(String, Value, u64)> = sub.try_iter().map(|e| (e.name, e.data, e.qemu_time_us)).collect();
    let want = vec![
        ("FROM_A_FUTURE_QEMU".to_string(), json!({"x": [1]}), 1_000_002),
        ("NO_DATA".to_string(), Value::Null, 0),
        ("ODD".to_string(), json!("text"), 0),
        ("LATE".to_string(), Value::Null, u64::MAX),
    ];
    assert_eq!(got, want);
    assert_eq!(qmp.events().try_iter().count(), 4, "the main stream has them too");
}

#[test]
fn an_event_flood_nobody_reads_is_bounded_and_counted() {
    const EXTRA: usize = 10;
    let (_f, qmp) = connected(|p| {
        let cmd = p.command().unwrap_or(Value::Null);
        let ev = "{\"event\": \"FLOOD\"}\n".repeat(EVENT_BACKLOG + EXTRA);
        p.send(ev.as_bytes());
        p.line(&ok(&cmd, json!({})));
        p.hold();
    });
    let sub = qmp.subscribe();
    let (r, _) = returns_within(MARGIN * 6, {
        let qmp = qmp.clone();
        move || qmp.execute_timeout("query-status", None, MARGIN * 5)
    });
    r.unwrap();
    let st = qmp.stats();
    assert_eq!(st.events, (EVENT_BACKLOG + EXTRA) as u64);
    assert_eq!(st.events_dropped, 2 * EXTRA as u64, "{st:?}");
    assert_eq!((sub.len(), qmp.events().len()), (EVENT_BACKLOG, EVENT_BACKLOG));
}

#[test]
fn an_error_reply_with_missing_fields_is_a_command_error() {
    let (_f, qmp) = connected(|p| {
        for body in [r#"{}"#, r#"{"class": 7}"#, r#""just text""#, r#"{"desc": "no class"}"#] {
            let cmd = p.command().unwrap_or(Value::Null);
            p.line(&format!(r#"{{"error": {body}, "id": {}}}"#, cmd["id"]));
        }
        p.hold();
    });
    let mut got = Vec::new();
    for _ in 0..4 {
        match run(&qmp, LONG).0 {
            Err(QmpError::Command { class, desc, .. }) => got.push((class, desc)),
            other => panic!("not a command error: {other:?}"),
        }
    }
    let m = MISSING.to_string();
    let want = vec![
        (m.clone(), m.clone()),
        (m.clone(), m.clone()),
        (m.clone(), "just text".to_string()),
        (m, "no class".to_string()),
    ];
    assert_eq!(got, want);
}

/// `Qmp::connect(timeout)` against a server that runs `script` on connect; returns the error
/// and how long it took.
fn connect_err(timeout: Duration, script: impl Fn(&mut Peer) + Send + 'static) -> (GreetingError, Duration) {
    let fake = FakeQmp::start(script);
    let path = fake.path.clone();
    let (r, took) = returns_within(timeout + MARGIN, move || Qmp::connect(&path, timeout).map(drop));
    drop(fake);
    match r {
        Err(QmpError::Greeting { problem, .. }) => (problem, took),
        other => panic!("not a greeting error: {other:?}"),
    }
}

#[test]
fn a_greeting_that_is_not_a_greeting_fails_connect() {
    type Expected = fn(&GreetingError) -> bool;
    let cases: [(&str, Expected); 5] = [
        (r#"{"event": "RESET"}"#, |e| matches!(e, GreetingError::NotAGreeting { got: "an event" })),
        (r#"{"return": {}}"#, |e| matches!(e, GreetingError::NotAGreeting { got: "a command reply" })),
        ("Welcome to QEMU", |e| matches!(e, GreetingError::Parse(QmpParseError::NotJson { .. }))),
        (r#"{"QMP": "7.2"}"#, |e| matches!(e, GreetingError::Parse(QmpParseError::BadGreeting { .. }))),
        ("", |e| matches!(e, GreetingError::Parse(QmpParseError::Empty))),
    ];
    for (first, expected) in cases {
        let (e, _) = connect_err(LONG, move |p| {
            p.line(first);
            p.hold();
        });
        assert!(expected(&e), "{first}: {e:?}");
    }
}

#[test]
fn a_server_that_never_greets_fails_connect_at_the_deadline() {
    let (e, took) = connect_err(SHORT, |p| p.hold());
    assert_eq!(e, GreetingError::Timeout { timeout: SHORT });
    assert!(took >= SHORT, "{took:?}");
}

#[test]
fn a_greeting_that_trickles_in_forever_fails_connect_at_the_deadline() {
    // Each byte comes well within the deadline; the line never completes.
    let (e, took) = connect_err(SHORT, |p| {
        p.send(b"{\"QMP\": ");
        for _ in 0..1000 {
            p.send(b" ");
            p.pause(Duration::from_millis(20));
        }
    });
    assert_eq!(e, GreetingError::Timeout { timeout: SHORT });
    assert!(took >= SHORT, "{took:?}");
}

#[test]
fn a_server_that_closes_before_or_during_the_greeting_fails_connect_at_once() {
    let (e, _) = connect_err(LONG, |_| {});
    assert_eq!(e, GreetingError::Lost(ConnectionEnd::Closed));
    const HALF: &[u8] = b"{\"QMP\": {\"vers";
    let (e, _) = connect_err(LONG, |p| p.send(HALF));
    assert_eq!(e, GreetingError::Lost(ConnectionEnd::ClosedMidLine { bytes: HALF.len() }));
}

#[test]
fn a_greeting_over_the_line_limit_fails_connect_at_once() {
    let (e, _) = connect_err(LONG, |p| {
        p.send(format!("{{\"QMP\": {{\"pad\": \"{}\"}}}}\n", "p".repeat(MAX_LINE_BYTES)).as_bytes());
        p.hold();
    });
    assert_eq!(e, GreetingError::Lost(ConnectionEnd::LineTooLong { limit: MAX_LINE_BYTES }));
}

#[test]
fn a_server_that_never_answers_capabilities_fails_connect_at_the_deadline() {
    let fake = FakeQmp::start(|p| {
        p.line(GREETING);
        p.hold();
    });
    let path = fake.path.clone();
    let (r, took) = returns_within(SHORT + MARGIN, move || Qmp::connect(&path, SHORT).map(drop));
    assert!(matches!(&r, Err(QmpError::Timeout { command, .. }) if command == "qmp_capabilities"), "{r:?}");
    assert!(took >= SHORT, "{took:?}");
}

#[test]
fn connect_has_one_deadline_for_the_greeting_and_the_capabilities_reply() {
    // A greeting late within the deadline leaves only the rest of it for the reply.
    let timeout = Duration::from_secs(2);
    let fake = FakeQmp::start(|p| {
        p.pause(Duration::from_millis(1500));
        p.line(GREETING);
        p.hold();
    });
    let path = fake.path.clone();
    let (r, took) = returns_within(timeout + MARGIN, move || Qmp::connect(&path, timeout).map(drop));
    assert!(matches!(&r, Err(QmpError::Timeout { command, .. }) if command == "qmp_capabilities"), "{r:?}");
    // Each phase with a deadline of its own would take 3.5 s.
    assert!(took >= timeout && took < Duration::from_secs(3), "{took:?}");
}

#[test]
fn a_deadline_of_duration_max_is_taken_as_far_away_not_an_overflow() {
    let (_f, qmp) = connected(|p| {
        reply_with(p, "1");
        p.hold();
    });
    let (r, _) = run(&qmp, Duration::MAX.saturating_sub(MARGIN));
    assert_eq!(r.unwrap(), json!(1));
}

#[test]
fn a_monitor_that_stops_answering_mid_session_times_out_every_command() {
    let (_f, qmp) = connected(|p| while p.command().is_some() {});
    for _ in 0..3 {
        let (r, took) = run(&qmp, SHORT);
        assert!(matches!(r, Err(QmpError::Timeout { .. })), "{r:?}");
        assert!(took >= SHORT, "{took:?}");
    }
}

#[test]
fn a_monitor_that_stops_reading_cannot_hold_a_command_past_its_deadline() {
    let (_f, qmp) = connected(|p| p.hold());
    // Far more than the socket buffers hold: the write itself must give up at the deadline.
    let blob = "b".repeat(16 << 20);
    let q = qmp.clone();
    let (r, took) =
        returns_within(SHORT + MARGIN, move || q.execute_timeout("device_add", Some(json!({ "blob": blob })), SHORT));
    assert!(matches!(r, Err(QmpError::Timeout { .. })), "{r:?}");
    assert!(took >= SHORT, "{took:?}");
    // Half a command went out: the stream is unusable, and said so.
    assert_eq!(lost(&qmp), ConnectionEnd::CommandCutOff { command: "device_add".into() });
}

#[test]
fn a_server_that_closes_mid_line_wakes_every_waiting_command() {
    const HALF: &[u8] = b"{\"return\": {\"status\": \"runn";
    let (_f, qmp) = connected(|p| {
        for _ in 0..3 {
            p.command();
        }
        p.send(HALF);
    });
    let sub = qmp.subscribe();
    let waiters: Vec<_> = (0..3)
        .map(|_| {
            let q = qmp.clone();
            std::thread::spawn(move || run(&q, LONG).0)
        })
        .collect();
    for w in waiters {
        let r = w.join().unwrap();
        assert!(
            matches!(&r, Err(QmpError::Disconnected { reason, .. })
                if *reason == ConnectionEnd::ClosedMidLine { bytes: HALF.len() }),
            "{r:?}"
        );
    }
    assert!(sub.recv_timeout(MARGIN).is_err(), "subscribers see the end");
    assert_eq!(lost(&qmp), ConnectionEnd::ClosedMidLine { bytes: HALF.len() });
    let late = qmp.subscribe();
    assert!(late.recv_timeout(MARGIN).is_err(), "a subscriber after the end sees it at once");
}
