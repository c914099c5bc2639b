//! Commands (`commands.rs`): dispatch, READY checks, PING, ECHO, CLOSE/REOPEN, PROBE, SIGIO,
//! the GUEST_OP hand-off.

use super::*;

#[test]
fn ping_gets_pong_in_the_requests_session() {
    let (mut p, mut e) = (port(), env());
    p.io.mask = HOST;
    p.service(&mut e).unwrap();
    let (session, _) = expect_hello(&take_sent(&mut p));
    p.io.reads.push_back(Read::Data(wire(&Message::Ping { time_ns: 77 }, 0, 0)));
    p.io.reads.push_back(Read::Data(wire(&Message::Ping { time_ns: 78 }, session, 1)));
    p.service(&mut e).unwrap();
    let sent = take_sent(&mut p);
    assert_eq!(sent.len(), 2);
    assert_eq!((sent[0].0.session, sent[0].0.seq), (0, 1));
    assert_eq!((sent[1].0.session, sent[1].0.seq), (session, 2));
    match (&sent[0].1, &sent[1].1) {
        (Message::Pong { ping_time_ns: 77, time_ns: t1 }, Message::Pong { ping_time_ns: 78, time_ns: t2 }) => {
            assert!(*t1 > 0 && t2 > t1)
        }
        other => panic!("expected two PONGs, got {other:?}"),
    }
}

#[test]
fn echo_only_in_ready() {
    let (mut p, mut e) = (port(), env());
    p.io.mask = HOST;
    p.service(&mut e).unwrap();
    let (session, hello) = expect_hello(&take_sent(&mut p));
    p.io.reads.push_back(Read::Data(wire(&Message::Echo(b"early".to_vec()), session, 0)));
    p.service(&mut e).unwrap();
    expect_error(&take_sent(&mut p), error_code::BAD_STATE);

    let ack = Message::HelloAck { nonce: hello.nonce, host_version: "h".into() };
    p.io.reads.push_back(Read::Data(wire(&ack, session, 1)));
    p.io.reads.push_back(Read::Data(wire(&Message::Echo(b"hello world".to_vec()), session, 2)));
    p.io.reads.push_back(Read::Data(wire(&Message::Echo(b"no session".to_vec()), 0, 3)));
    p.service(&mut e).unwrap();
    let sent = take_sent(&mut p);
    assert_eq!(sent.len(), 2, "{sent:?}");
    assert_eq!(sent[0].1, Message::EchoReply(b"hello world".to_vec()));
    assert_eq!(sent[0].0.session, session);
    expect_error(&sent[1..], error_code::BAD_STATE);
}

#[test]
fn echo_says_exactly_what_it_lacks() {
    let (mut p, mut e) = (port(), env());
    let session = ready(&mut p, &mut e);
    let sent = request(&mut p, &mut e, &Message::Echo(b"x".to_vec()), 0);
    expect_error(&sent, error_code::BAD_STATE);
    assert!(
        matches!(&sent[0].1, Message::Error { text, .. }
        if text.contains("needs the READY session's id") && text.contains("0x00000000")),
        "{sent:?}"
    );
    let sent = request(&mut p, &mut e, &Message::Echo(b"x".to_vec()), session);
    assert_eq!(sent[0].1, Message::EchoReply(b"x".to_vec()));
}

#[test]
fn unknown_type_and_malformed_payload() {
    let (mut p, mut e) = (port(), env());
    let session = ready(&mut p, &mut e);
    let unknown = Frame::new(0x55, session, 1, vec![]).encode().unwrap();
    let malformed = Frame::new(MessageType::Ping as u8, session, 2, vec![1, 2]).encode().unwrap();
    let host_error = wire(&Message::error_unsolicited(5, "x"), session, 3);
    p.io.reads.push_back(Read::Data([unknown, malformed, host_error].concat()));
    p.service(&mut e).unwrap();
    let sent = take_sent(&mut p);
    assert_eq!(sent.len(), 2, "no reply to the host's ERROR: {sent:?}");
    expect_error(&sent[..1], error_code::UNKNOWN_TYPE);
    expect_error(&sent[1..], error_code::MALFORMED);
    assert_eq!(p.counters().errors_received, 1);
}

#[test]
fn commands_need_a_ready_session() {
    let (mut p, mut e) = (port(), env());
    p.io.mask = HOST;
    p.service(&mut e).unwrap();
    let (session, _) = expect_hello(&take_sent(&mut p));
    let cmds = [
        Message::Close { reopen_after_ms: 5 },
        Message::Reopen,
        Message::Probe { kind: ProbeKind::Lseek, target: ProbeTarget::OwnFd, arg: 0 },
        Message::Sigio { action: SigioAction::Query },
        Message::Source { seed: 1, bytes: 10, chunk: 0 },
        Message::Sink { seed: 1, bytes: 10 },
        Message::Data { offset: 0, bytes: vec![1] },
        Message::Stats,
        Message::Events { since_seq: 0 },
        Message::GuestOp { op_id: 1, op: GuestOp::Sysfs },
    ];
    for m in &cmds {
        expect_error(&request(&mut p, &mut e, m, session), error_code::BAD_STATE);
    }
    assert_eq!(p.close_request(), None);
    assert!(p.io.probes.is_empty() && p.io.async_calls.is_empty());
    expect_error(&request(&mut p, &mut e, &Message::Stats, 0), error_code::BAD_STATE);
    // Agent-to-host messages are refused in any state, as sent the wrong way.
    let bye = Message::Bye { reopen_after_ms: 0, reason: "x".into() };
    expect_error(&request(&mut p, &mut e, &bye, session), error_code::WRONG_DIRECTION);
}

#[test]
fn close_queues_bye_in_the_session_and_stops_serving() {
    let (mut p, mut e) = (port(), env());
    let session = ready(&mut p, &mut e);
    p.io.budget = 0;
    let mut bytes = wire(&Message::Close { reopen_after_ms: 1500 }, session, 1);
    bytes.extend(wire(&Message::Ping { time_ns: 1 }, session, 2));
    feed(&mut p, &bytes);
    p.service(&mut e).unwrap();
    assert_eq!(p.close_request(), Some(1500));
    assert!(p.queued() > 0, "BYE waits for a writable port");
    p.io.budget = usize::MAX;
    assert!(p.flush_out().unwrap());
    let sent = take_sent(&mut p);
    assert_eq!(sent.len(), 1, "the PING after CLOSE is not served: {sent:?}");
    assert_eq!(sent[0].0.session, session);
    assert_eq!(sent[0].1, Message::Bye { reopen_after_ms: 1500, reason: "close requested".into() });

    let (mut p, mut e) = (port(), env());
    let session = ready(&mut p, &mut e);
    let sent = request(&mut p, &mut e, &Message::Reopen, session);
    assert!(matches!(&sent[..], [(_, Message::Bye { reopen_after_ms: 0, .. })]), "{sent:?}");
    assert_eq!(p.close_request(), Some(0));
    // A shutdown while that BYE is pending sends no second BYE: nothing follows a BYE.
    assert!(!p.say_bye(NO_REOPEN, "shutdown"));
    p.close(&mut e, "reopen requested");
    assert_eq!(p.state(), PortState::Disconnected);

    // Shutdown BYE only with a session.
    let (mut p, mut e) = (port(), env());
    assert!(!p.say_bye(NO_REOPEN, "shutdown"), "no session, no BYE");
    ready(&mut p, &mut e);
    assert!(p.say_bye(NO_REOPEN, "shutdown"));
    assert!(!p.say_bye(NO_REOPEN, "shutdown"), "one BYE per session");
}

#[test]
fn a_reopen_delay_over_the_limit_is_refused() {
    let (mut p, mut e) = (port(), env());
    let session = ready(&mut p, &mut e);
    for ms in [60_001, NO_REOPEN] {
        expect_error(&request(&mut p, &mut e, &Message::Close { reopen_after_ms: ms }, session), error_code::LIMIT);
    }
    assert_eq!(p.close_request(), None, "the port stays open");
    let sent = request(&mut p, &mut e, &Message::Close { reopen_after_ms: 60_000 }, session);
    assert!(matches!(&sent[..], [(_, Message::Bye { reopen_after_ms: 60_000, .. })]), "{sent:?}");
}

#[test]
fn probe_returns_the_raw_result_of_the_call() {
    let (mut p, mut e) = (port(), env());
    let session = ready(&mut p, &mut e);
    p.io.probe_result = ProbeOutcome { ret: -1, errno: Errno::EBUSY as i32, mask: 0, data: vec![] };
    let req = Message::Probe { kind: ProbeKind::Open, target: ProbeTarget::SecondFd, arg: 0 };
    let sent = request(&mut p, &mut e, &req, session);
    assert_eq!(
        sent[0].1,
        Message::ProbeResult {
            kind: ProbeKind::Open,
            target: ProbeTarget::SecondFd,
            ret: -1,
            errno: Errno::EBUSY as i32,
            mask: 0,
            data: vec![]
        }
    );
    p.io.probe_result = ProbeOutcome { ret: 3, errno: 0, mask: 0, data: b"abc".to_vec() };
    let req = Message::Probe { kind: ProbeKind::Read, target: ProbeTarget::OwnFd, arg: 1 << 30 };
    let before = p.counters().bytes_in;
    let sent = request(&mut p, &mut e, &req, session);
    assert!(matches!(&sent[0].1, Message::ProbeResult { ret: 3, data, .. } if data == b"abc"), "{sent:?}");
    assert_eq!(p.io.probes[1], (ProbeKind::Read, ProbeTarget::OwnFd, MAX_PROBE_READ as u32), "read size capped");
    assert_eq!(p.counters().bytes_in - before, 3 + wire(&req, session, 1).len() as u64);
}

#[test]
fn sigio_enable_counts_samples_and_disable_stops() {
    let (mut p, mut e) = (port(), env());
    let session = ready(&mut p, &mut e);
    p.on_sigio(&mut e);
    assert_eq!(p.sigio().count, 0, "not counting before enable");
    let sent = request(&mut p, &mut e, &Message::Sigio { action: SigioAction::Enable }, session);
    assert_eq!(sent[0].1, Message::SigioReport { enabled: true, count: 0, samples: vec![] });
    for i in 0..70 {
        p.io.mask = if i % 2 == 0 { HOST } else { NO_HOST };
        p.on_sigio(&mut e);
    }
    p.io.mask = HOST;
    let sent = request(&mut p, &mut e, &Message::Sigio { action: SigioAction::Query }, session);
    let Message::SigioReport { enabled: true, count: 70, samples } = &sent[0].1 else { panic!("{sent:?}") };
    assert_eq!(samples.len(), MAX_SIGIO_SAMPLES);
    assert_eq!((samples[0].mask, samples[1].mask), (HOST.bits() as u16, NO_HOST.bits() as u16));
    assert!(samples.windows(2).all(|w| w[0].time_ns < w[1].time_ns));
    let sent = request(&mut p, &mut e, &Message::Sigio { action: SigioAction::Disable }, session);
    assert!(matches!(sent[0].1, Message::SigioReport { enabled: false, count: 70, .. }));
    p.on_sigio(&mut e);
    assert_eq!(p.sigio().count, 70);
    assert_eq!(p.io.async_calls, vec![true, false]);
    p.io.async_err = Some(Errno::EINVAL);
    let sent = request(&mut p, &mut e, &Message::Sigio { action: SigioAction::Enable }, session);
    expect_error(&sent, error_code::INTERNAL);
}

#[test]
fn guest_ops_are_handed_to_the_loop_and_answered_only_in_their_session() {
    let (mut p, mut e) = (port(), env());
    let session = ready(&mut p, &mut e);
    let op = GuestOp::Read { handle: 3, bytes: 10, all: false };
    let sent = request(&mut p, &mut e, &Message::GuestOp { op_id: 7, op: op.clone() }, session);
    assert!(sent.is_empty(), "the completion comes from the loop, not the port");
    let taken = p.take_guest_ops();
    assert_eq!(taken.len(), 1);
    assert_eq!((taken[0].session, taken[0].op_id, &taken[0].op), (session, 7, &op));
    assert!(p.take_guest_ops().is_empty());
    let done = GuestOpDone { op_id: 7, ret: 10, ..Default::default() };
    assert!(p.send_guest_op_done(session, done.clone()));
    assert!(!p.send_guest_op_done(session ^ 1, done.clone()), "another session's completion is dropped");
    p.flush_out().unwrap();
    let sent = take_sent(&mut p);
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].0.session, session);
    assert_eq!(sent[0].1, Message::GuestOpDone(done));
}

#[test]
fn guest_ops_are_refused_unless_allowed() {
    let (mut p, mut e) = (port_with(Settings::default()), env());
    let session = ready(&mut p, &mut e);
    let op = GuestOp::Open { port: "/etc/passwd".into(), nonblock: true, sigio: false };
    let sent = request(&mut p, &mut e, &Message::GuestOp { op_id: 3, op }, session);
    expect_error(&sent, error_code::DENIED);
    assert!(matches!(&sent[0].1, Message::Error { about_kind: 0x50, about_seq: 1, text, .. }
        if text.contains("guest ops disabled") && text.contains("--allow-guest-ops")));
    assert!(p.take_guest_ops().is_empty(), "nothing reaches the loop: nothing is opened");
    assert_eq!(p.counters().refusals, 1);
}
