//! The session life cycle (`session.rs`): host presence, HELLO, HELLO_REQUEST, HELLO_ACK,
//! stale frames, the end of a session.

use super::*;

#[test]
fn no_host_stays_disconnected_and_sends_nothing() {
    let (mut p, mut e) = (port(), env());
    assert_eq!(p.service(&mut e), Ok(Health::Open));
    assert_eq!(p.state(), PortState::Disconnected);
    assert!(p.io.written.is_empty());
    assert!(p.history().is_empty());
}

#[test]
fn host_connect_sends_hello_with_a_fresh_nonce() {
    let (mut p, mut e) = (port(), env());
    p.io.mask = HOST;
    p.service(&mut e).unwrap();
    let sent = take_sent(&mut p);
    let (session, hello) = expect_hello(&sent);
    assert_eq!(sent[0].0.seq, 0);
    assert_ne!(session, 0);
    assert_eq!(p.state(), PortState::Connected { session, nonce: hello.nonce });
    assert_eq!(hello.agent_version, "9.9.9");
    assert_eq!(hello.port_name, "org.vport.0");
    assert_eq!(hello.kernel_release, "6.1.0-test");
    assert_eq!(hello.boot_id, "boot-id");
    assert!(hello.agent_time_ns > 0);

    // The host leaves and comes back: a new session with a new id and nonce.
    p.io.mask = NO_HOST;
    p.service(&mut e).unwrap();
    assert_eq!(p.state(), PortState::Disconnected);
    p.io.mask = HOST;
    p.service(&mut e).unwrap();
    let (session2, hello2) = expect_hello(&take_sent(&mut p));
    assert_ne!(session2, session);
    assert_ne!(hello2.nonce, hello.nonce);
    assert_eq!(p.counters().sessions, 2);
    let names: Vec<&str> = p.history().since(0).map(|r| r.transition.to.name()).collect();
    assert_eq!(names, ["CONNECTED", "DISCONNECTED", "CONNECTED"]);
}

#[test]
fn hello_ack_makes_ready_and_wrong_nonce_or_session_is_refused() {
    let (mut p, mut e) = (port(), env());
    p.io.mask = HOST;
    p.service(&mut e).unwrap();
    let (session, hello) = expect_hello(&take_sent(&mut p));

    let bad_nonce = Message::HelloAck { nonce: hello.nonce ^ 1, host_version: "h".into() };
    p.io.reads.push_back(Read::Data(wire(&bad_nonce, session, 0)));
    p.service(&mut e).unwrap();
    expect_error(&take_sent(&mut p), error_code::BAD_SESSION);
    assert!(matches!(p.state(), PortState::Connected { .. }));
    assert_eq!(p.counters().illegal_transitions, 1);

    let ack = Message::HelloAck { nonce: hello.nonce, host_version: "h".into() };
    p.io.reads.push_back(Read::Data(wire(&ack, 0, 1)));
    p.service(&mut e).unwrap();
    expect_error(&take_sent(&mut p), error_code::BAD_SESSION);
    assert!(matches!(p.state(), PortState::Connected { .. }));

    p.io.reads.push_back(Read::Data(wire(&ack, session, 2)));
    p.service(&mut e).unwrap();
    assert!(take_sent(&mut p).is_empty());
    assert_eq!(p.state(), PortState::Ready { session, nonce: hello.nonce });

    // A duplicate ack in READY is refused with BAD_STATE and changes nothing.
    p.io.reads.push_back(Read::Data(wire(&ack, session, 3)));
    p.service(&mut e).unwrap();
    expect_error(&take_sent(&mut p), error_code::BAD_STATE);
    assert_eq!(p.state(), PortState::Ready { session, nonce: hello.nonce });
    assert_eq!(p.counters().illegal_transitions, 2);
}

#[test]
fn stale_session_frame_gets_bad_session() {
    let (mut p, mut e) = (port(), env());
    let session = ready(&mut p, &mut e);
    let stale = session.wrapping_add(1);
    p.io.reads.push_back(Read::Data(wire(&Message::Ping { time_ns: 3 }, stale, 9)));
    p.io.reads.push_back(Read::Data(wire(&Message::Echo(b"x".to_vec()), stale, 10)));
    p.service(&mut e).unwrap();
    let sent = take_sent(&mut p);
    assert_eq!(sent.len(), 2);
    // Answered outside any session (every host accepts session 0), naming the frame it
    // answers and both ids.
    assert_eq!(expect_error(&sent[..1], error_code::BAD_SESSION).session, 0);
    assert!(matches!(&sent[0].1, Message::Error { about_kind: 0x10, about_seq: 9, text, .. }
        if text.contains(&format!("{stale:#010x}")) && text.contains(&format!("{session:#010x}"))));
    expect_error(&sent[1..], error_code::BAD_SESSION);
    assert_eq!(p.counters().stale_frames, 2);
    assert!(matches!(p.state(), PortState::Ready { .. }));
}

#[test]
fn hello_request_starts_a_new_session_with_a_new_nonce() {
    let (mut p, mut e) = (port(), env());
    let session = ready(&mut p, &mut e);
    let PortState::Ready { nonce: old_nonce, .. } = p.state() else { panic!() };
    // Any session id is accepted; a ping right behind it is served (decoder not cleared).
    let mut bytes = wire(&Message::HelloRequest, 0xdead_beef, 0);
    p.io.reads.push_back(Read::Data(bytes.split_off(10)));
    p.io.reads.push_front(Read::Data(bytes));
    p.io.reads.push_back(Read::Data(wire(&Message::Ping { time_ns: 4 }, 0, 1)));
    p.service(&mut e).unwrap();
    let sent = take_sent(&mut p);
    assert_eq!(sent.len(), 2, "{sent:?}");
    let (session2, hello) = expect_hello(&sent[..1]);
    assert_eq!(sent[0].0.seq, 0, "a new session's HELLO has seq 0");
    assert_ne!(session2, session);
    assert_ne!(hello.nonce, old_nonce);
    assert_eq!(p.state(), PortState::Connected { session: session2, nonce: hello.nonce });
    assert!(matches!(sent[1].1, Message::Pong { ping_time_ns: 4, .. }));
    assert_eq!(sent[1].0.seq, 1);
    let last = p.history().since(0).last().unwrap();
    assert_eq!(last.event, PortEvent::NewSession { session: session2, nonce: hello.nonce });
}

#[test]
fn hello_requests_queued_before_the_agent_opened_repeat_the_pending_offer() {
    // A host that connected while the guest booted sent HELLO_REQUESTs that QEMU held back;
    // they all arrive at once after the agent offered its first session.
    let (mut p, mut e) = (port(), env());
    p.io.mask = HOST;
    let mut queued = Vec::new();
    for seq in 0..3 {
        queued.extend(wire(&Message::HelloRequest, 0, seq));
    }
    p.io.reads.push_back(Read::Data(queued));
    p.service(&mut e).unwrap();
    let sent = take_sent(&mut p);
    assert_eq!(sent.len(), 4, "one HELLO on connect and one repeat per request: {sent:?}");
    let (session, first) = expect_hello(&sent[..1]);
    for (h, m) in &sent[1..] {
        let Message::Hello(again) = m else { panic!("{m:?}") };
        assert_eq!((h.session, again.nonce), (session, first.nonce), "the same offer, not a new session");
    }
    assert_eq!(p.counters().sessions, 1);
    assert_eq!(p.counters().hello_repeats, 3);
    assert_eq!(p.state(), PortState::Connected { session, nonce: first.nonce });
}

#[test]
fn data_without_a_host_starts_nothing() {
    let (mut p, mut e) = (port(), env());
    // Data readable while poll says "not connected": no session is started, nothing is sent.
    p.io.reads.push_back(Read::Data(wire(&Message::Ping { time_ns: 1 }, 0, 0)));
    p.service(&mut e).unwrap();
    assert_eq!(p.state(), PortState::Disconnected);
    assert!(p.io.written.is_empty());
    assert!(p.history().is_empty());
}

#[test]
fn a_new_clients_requests_read_before_its_connection_is_known_are_answered() {
    let (mut p, mut e) = (port(), env());
    let old = ready(&mut p, &mut e);
    // The old client leaves: POLLHUP, the session ends.
    p.io.mask = NO_HOST;
    p.service(&mut e).unwrap();
    assert_eq!(p.state(), PortState::Disconnected);
    // A queued client is accepted at once. Its first bytes arrive on the data queue before
    // the guest serves the control message that says a host is there: readable, then
    // read() == 0 with POLLHUP still set (seen on a real VM, `second-host-client-queued`).
    let mut bytes = wire(&Message::HelloRequest, 0, 0);
    bytes.extend(wire(&Message::Echo(b"queued".to_vec()), 0, 1));
    p.io.reads.push_back(Read::Data(bytes));
    p.io.reads.push_back(Read::Zero);
    p.service(&mut e).unwrap();
    assert_eq!(p.state(), PortState::Disconnected);
    assert!(p.io.written.is_empty());
    // The control message arrives: the host is there. The offer, the offer again for the
    // HELLO_REQUEST, and the ECHO refused (no READY session yet), all to the new client.
    p.io.mask = HOST;
    p.service(&mut e).unwrap();
    let sent = take_sent(&mut p);
    let kinds: Vec<MessageType> = sent.iter().map(|(_, m)| m.kind()).collect();
    assert_eq!(kinds, [MessageType::Hello, MessageType::Hello, MessageType::Error], "{sent:?}");
    assert_ne!(sent[0].0.session, old);
    assert_eq!(sent[0].0.session, sent[1].0.session);
    assert!(matches!(&sent[2].1, Message::Error { code: error_code::BAD_STATE, .. }), "{sent:?}");
    assert_eq!(p.counters().hello_repeats, 1);
}

#[test]
fn input_held_for_a_session_is_bounded() {
    let (mut p, mut e) = (port(), env());
    let big = vec![0x11; READ_BUF];
    for _ in 0..(HELD_INPUT_LIMIT / READ_BUF + 8) {
        p.io.reads.push_back(Read::Data(big.clone()));
    }
    let before = p.io.reads.len();
    service_until_idle(&mut p, &mut e);
    let taken = before - p.io.reads.len();
    assert_eq!(taken * READ_BUF, HELD_INPUT_LIMIT, "reading stops at the limit");
    assert_eq!(p.decoder.buffered(), HELD_INPUT_LIMIT);
}

#[test]
fn read_zero_disconnects_drops_the_queue_and_clears_the_decoder() {
    let (mut p, mut e) = (port(), env());
    let session = ready(&mut p, &mut e);
    // The host can't take output, sends a ping and half a frame, then leaves.
    p.io.budget = 0;
    let ping = wire(&Message::Ping { time_ns: 1 }, session, 1);
    let half = wire(&Message::Echo(vec![9; 100]), session, 2);
    let mut bytes = ping.clone();
    bytes.extend_from_slice(&half[..60]);
    p.io.reads.push_back(Read::Data(bytes));
    p.io.reads.push_back(Read::Zero);
    p.service(&mut e).unwrap();
    assert_eq!(p.state(), PortState::Disconnected);
    assert_eq!(p.queued(), 0);
    let pong_len = wire(&Message::Pong { ping_time_ns: 1, time_ns: 1 }, session, 1).len();
    assert_eq!(p.counters().dropped_bytes, pong_len as u64);
    assert_eq!(p.decoder.buffered(), 0, "decoder cleared");

    // A new host must not see anything of the old session, and the old half frame must not
    // swallow the new host's first frame.
    p.io.budget = usize::MAX;
    p.io.mask = HOST;
    p.service(&mut e).unwrap();
    let (session2, _) = expect_hello(&take_sent(&mut p));
    p.io.reads.push_back(Read::Data(wire(&Message::Ping { time_ns: 5 }, session2, 0)));
    p.service(&mut e).unwrap();
    let sent = take_sent(&mut p);
    assert!(matches!(sent.as_slice(), [(_, Message::Pong { ping_time_ns: 5, .. })]), "{sent:?}");
}

#[test]
fn a_hello_request_in_ready_ends_the_old_sessions_work_at_once() {
    let (mut p, mut e) = (port(), env());
    let old = ready(&mut p, &mut e);
    // A long SOURCE, and a host that takes only 1000 bytes: the queue holds a frame cut in
    // the middle on the wire plus more unsent frames.
    p.io.budget = 1000;
    feed(&mut p, &wire(&Message::Source { seed: 9, bytes: 1 << 30, chunk: 0 }, old, 1));
    p.service(&mut e).unwrap();
    assert!(p.queued() > DEFAULT_CHUNK, "{}", p.queued());
    let mut wire_bytes = std::mem::take(&mut p.io.written);
    // A new client (the old one left without the agent seeing it) asks for a session.
    p.io.budget = usize::MAX;
    feed(&mut p, &wire(&Message::HelloRequest, 0, 0));
    service_until_idle(&mut p, &mut e);
    wire_bytes.extend(std::mem::take(&mut p.io.written));
    // Whole frames only: the frame cut on the wire was finished, the rest dropped.
    let mut d = Decoder::default();
    d.push(&wire_bytes);
    let frames: Vec<(Header, Message)> =
        d.by_ref().map(|f| f.unwrap()).map(|f| (f.header, Message::from_frame(&f).unwrap())).collect();
    assert_eq!(d.buffered(), 0, "no torn frame");
    assert_eq!(d.stats().errors, 0);
    let (last_h, last) = frames.last().unwrap();
    let Message::Hello(hello) = last else { panic!("the HELLO comes last: {frames:?}") };
    assert_ne!(last_h.session, old);
    assert!(frames[..frames.len() - 1].iter().all(|(h, m)| h.session == old && matches!(m, Message::Data { .. })));
    assert_eq!(frames.len(), 2, "one DATA frame (the one started) then the HELLO");
    assert_eq!(p.counters().stream_aborts, 1);
    assert!(p.counters().dropped_bytes > 0);
    assert_eq!(p.state(), PortState::Connected { session: last_h.session, nonce: hello.nonce });
    // Nothing of the old stream follows.
    service_until_idle(&mut p, &mut e);
    assert!(take_sent(&mut p).is_empty());
}
