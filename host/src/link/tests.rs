use super::*;
use crate::client::AgentClient;
use std::io::Write;
use std::os::unix::net::UnixStream;
use vport_common::message::{GuestOpDone, Hello, ProbeKind, ProbeTarget, SigioAction, SigioSample, NO_MISMATCH};
use vport_common::pattern::{self, StreamDigest};

/// A scripted agent on the other end of a socketpair.
fn agent(script: impl FnOnce(&mut Link<UnixStream>) + Send + 'static) -> Link<UnixStream> {
    let (host, guest) = UnixStream::pair().unwrap();
    std::thread::spawn(move || {
        let mut l = Link::new("fake-agent", guest);
        script(&mut l);
    });
    Link::new("org.vport.test", host)
}

fn hello(nonce: u64) -> Message {
    Message::Hello(Hello {
        agent_version: "t".into(),
        port_name: "org.vport.test".into(),
        kernel_release: "k".into(),
        boot_id: "b".into(),
        nonce,
        agent_time_ns: 0,
    })
}

fn send_in(l: &mut Link<UnixStream>, session: u32, m: &Message) {
    l.session = session;
    l.send(m).unwrap();
}

#[test]
fn handshake_acks_the_hello_nonce_and_adopts_its_session() {
    let mut host = agent(|g| {
        // garbage first: the decoder must resynchronise
        g.stream.write_all(b"\xF5VPR stale bytes").unwrap();
        let r = g.recv(Instant::now() + Duration::from_secs(5), "request").unwrap();
        assert!(matches!(r.message, Ok(Message::HelloRequest)), "the host asks at once: {:?}", r.message);
        send_in(g, 0xAB, &hello(77));
        let r = g.recv(Instant::now() + Duration::from_secs(5), "ack").unwrap();
        assert_eq!(r.frame.header.session, 0xAB);
        assert!(matches!(r.message, Ok(Message::HelloAck { nonce: 77, .. })));
        let ping = g.recv(Instant::now() + Duration::from_secs(5), "ping").unwrap();
        let Ok(Message::Ping { time_ns }) = ping.message else { panic!("{:?}", ping.message) };
        send_in(g, 0x99, &Message::Pong { ping_time_ns: time_ns, time_ns: 1 }); // stale session
        send_in(g, 0xAB, &Message::Pong { ping_time_ns: time_ns, time_ns: 2 });
    });
    let hs = host.handshake(Duration::from_secs(5), "test").unwrap();
    assert_eq!((hs.session, hs.hello.nonce, hs.requests_sent), (0xAB, 77, 1));
    let p = host.ping(Duration::from_secs(5), 1234).unwrap();
    assert_eq!(p.agent_time_ns, 2, "the stale-session PONG must be dropped");
    assert_eq!(host.stats().0.stale_frames, 1);
}

#[test]
fn a_silent_agent_gets_hello_requests_again_then_the_handshake_completes() {
    let mut host = agent(|g| {
        // Ignore the first request, as an agent that has not opened the port yet would.
        for _ in 0..2 {
            let r = g.recv(Instant::now() + Duration::from_secs(5), "request").unwrap();
            assert!(matches!(r.message, Ok(Message::HelloRequest)));
        }
        send_in(g, 5, &hello(1));
        let _ = g.recv(Instant::now() + Duration::from_secs(5), "ack");
    });
    let hs = host.handshake(Duration::from_secs(5), "test").unwrap();
    assert_eq!(hs.requests_sent, 2);
}

#[test]
fn no_hello_is_a_timeout_naming_what_was_awaited_and_close_is_closed() {
    let (host_end, guest_end) = UnixStream::pair().unwrap();
    let mut host = Link::new("org.vport.quiet", host_end);
    let err = host.handshake(Duration::from_millis(1500), "test").unwrap_err();
    assert!(err.to_string().contains("HELLO from vport-agent"), "{err}");
    drop(guest_end);
    let err = host.recv(Instant::now() + Duration::from_secs(5), "anything").unwrap_err();
    assert!(matches!(err, LinkError::Closed { .. }), "{err}");
}

#[test]
fn an_agent_error_fails_the_request_it_answers_and_others_are_filed() {
    let mut host = agent(|g| {
        let r = g.recv(Instant::now() + Duration::from_secs(5), "echo").unwrap();
        // A decode-error report, an answer to some other frame, then the answer to the echo.
        send_in(g, 0, &Message::error_unsolicited(6, "bad frame crc at stream offset 3"));
        let other = vport_common::Header { kind: 0x40, seq: r.frame.header.seq + 7, ..r.frame.header };
        send_in(g, 0, &Message::error_for(&other, 4, "not this one"));
        send_in(g, 0, &Message::error_for(&r.frame.header, 4, "not ready"));
    });
    let err = host.echo(b"x", Duration::from_secs(5)).unwrap_err();
    assert!(matches!(&err, LinkError::Agent { code: 4, text, .. } if text == "not ready"), "{err}");
    let reports: Vec<AgentReport> = host.take_agent_reports();
    assert_eq!(reports.len(), 2, "{reports:?}");
    assert_eq!((reports[0].code, reports[0].about_kind), (6, 0));
    assert_eq!((reports[1].text.as_str(), reports[1].about_kind), ("not this one", 0x40));
    assert_eq!(host.stats().0.agent_errors, 2);
}

#[test]
fn a_refused_guest_op_fails_its_own_wait_even_while_waiting_for_another() {
    let mut host = agent(|g| {
        let first = g.recv(Instant::now() + Duration::from_secs(5), "op 1").unwrap();
        let second = g.recv(Instant::now() + Duration::from_secs(5), "op 2").unwrap();
        send_in(g, 0, &Message::error_for(&first.frame.header, 8, "guest ops disabled"));
        let Ok(Message::GuestOp { op_id, .. }) = second.message else { panic!("{:?}", second.message) };
        send_in(g, 0, &Message::GuestOpDone(GuestOpDone { op_id, ret: 5, ..Default::default() }));
    });
    let a = host.start_guest_op(GuestOp::Sysfs).unwrap();
    let b = host.start_guest_op(GuestOp::Sysfs).unwrap();
    assert_eq!(host.await_guest_op(b, Duration::from_secs(5)).unwrap().ret, 5);
    let err = host.await_guest_op(a, Duration::from_secs(5)).unwrap_err();
    assert!(matches!(err, LinkError::Agent { code: 8, .. }), "{err}");
}

#[test]
fn writing_to_a_closed_peer_is_closed_not_an_io_error() {
    let (host_end, guest_end) = UnixStream::pair().unwrap();
    drop(guest_end);
    let mut host = Link::new("org.vport.gone", host_end);
    let err = host.send(&Message::HelloRequest).unwrap_err();
    assert!(matches!(err, LinkError::Closed { .. }), "{err}");
}

const T: Duration = Duration::from_secs(5);

/// A host link already in session 7, with a scripted agent that also uses session 7.
fn in_session(script: impl FnOnce(&mut Link<UnixStream>) + Send + 'static) -> Link<UnixStream> {
    let mut host = agent(move |g| {
        g.session = 7;
        script(g)
    });
    host.session = 7;
    host
}

fn next(g: &mut Link<UnixStream>) -> Message {
    g.recv(Instant::now() + T, "request").unwrap().message.unwrap()
}

#[test]
fn close_reopen_probe_sigio_stats_and_events_return_typed_replies() {
    let mut host = in_session(|g| {
        assert_eq!(next(g), Message::Close { reopen_after_ms: 1500 });
        g.send(&Message::Pong { ping_time_ns: 0, time_ns: 0 }).unwrap(); // skipped
        g.send(&Message::Bye { reopen_after_ms: 1500, reason: "close requested".into() }).unwrap();
        assert_eq!(next(g), Message::Reopen);
        g.send(&Message::Bye { reopen_after_ms: 0, reason: "reopen requested".into() }).unwrap();
        let Message::Probe { kind, target, .. } = next(g) else { panic!() };
        g.send(&Message::ProbeResult { kind, target, ret: -1, errno: 16, mask: 0, data: vec![] }).unwrap();
        assert_eq!(next(g), Message::Sigio { action: SigioAction::Enable });
        let samples = vec![SigioSample { time_ns: 1, mask: 0x11 }];
        g.send(&Message::SigioReport { enabled: true, count: 3, samples }).unwrap();
        assert_eq!(next(g), Message::Stats);
        g.send(&Message::StatsReply(vec![("ebusy".into(), 2), ("wakeups".into(), 9)])).unwrap();
        assert_eq!(next(g), Message::Events { since_seq: 4 });
        g.send(&Message::EventsReply { first_seq: 0, next_seq: 4, records: vec![] }).unwrap();
    });
    let bye = host.close(1500, T).unwrap();
    assert_eq!(bye, Bye { reopen_after_ms: 1500, reason: "close requested".into(), session: 7 });
    assert_eq!(host.reopen(T).unwrap().reopen_after_ms, 0);
    let p = host.probe(ProbeKind::Open, ProbeTarget::SecondFd, 0, T).unwrap();
    assert_eq!((p.ret, p.errno), (-1, 16));
    let s = host.sigio(SigioAction::Enable, T).unwrap();
    assert_eq!((s.enabled, s.count, s.samples.len()), (true, 3, 1));
    let stats = host.agent_stats(T).unwrap();
    assert_eq!((stat(&stats, "ebusy"), stat(&stats, "wakeups"), stat(&stats, "nope")), (Some(2), Some(9), None));
    let ev = host.events(4, T).unwrap();
    assert_eq!((ev.first_seq, ev.next_seq, ev.records.len()), (0, 4, 0));
}

#[test]
fn source_is_verified_on_the_host_and_a_gap_is_found() {
    fn stream(g: &mut Link<UnixStream>, skip: Option<u64>) {
        let Message::Source { seed, bytes, chunk } = next(g) else { panic!() };
        let mut d = StreamDigest::new();
        let mut off = 0;
        while off < bytes {
            let n = (bytes - off).min(chunk as u64) as usize;
            let mut b = vec![0u8; n];
            pattern::fill(seed, off, &mut b);
            if Some(off) != skip {
                d.update(&b);
                g.send(&Message::Data { offset: off, bytes: b }).unwrap();
            }
            off += n as u64;
        }
        g.send(&Message::SourceDone { bytes, digest: d.digest() }).unwrap();
    }
    let mut host = in_session(|g| {
        stream(g, None);
        stream(g, Some(2000));
    });
    let ok = host.source(5, 5000, 1000, T).unwrap();
    assert!(ok.verified, "{ok:?}");
    assert_eq!((ok.bytes, ok.frames, ok.first_mismatch), (5000, 5, None));
    let bad = host.source(5, 5000, 1000, T).unwrap();
    assert!(!bad.verified);
    assert_eq!(bad.first_mismatch, Some(2000));
}

#[test]
fn sink_sends_the_pattern_and_reads_the_verdict() {
    let mut host = in_session(|g| {
        let Message::Sink { seed, bytes } = next(g) else { panic!() };
        let mut d = StreamDigest::new();
        let mut mismatch = NO_MISMATCH;
        while d.bytes() < bytes {
            let Message::Data { offset, bytes: b } = next(g) else { panic!() };
            if mismatch == NO_MISMATCH {
                mismatch = pattern::first_mismatch(seed, offset, &b).unwrap_or(NO_MISMATCH);
            }
            d.update(&b);
        }
        g.send(&Message::SinkResult { bytes, digest: d.digest(), first_mismatch: mismatch }).unwrap();
        let Message::Sink { bytes, .. } = next(g) else { panic!() };
        while d.bytes() < 10_000 + bytes {
            let Message::Data { bytes: b, .. } = next(g) else { panic!() };
            d.update(&b);
        }
        g.send(&Message::SinkResult { bytes, digest: 1, first_mismatch: 77 }).unwrap();
    });
    let ok = host.sink(3, 10_000, 3000, T).unwrap();
    assert!(ok.verified, "{ok:?}");
    let bad = host.sink(3, 100, 3000, T).unwrap();
    assert!(!bad.verified);
    assert_eq!(bad.first_mismatch, Some(77));
}

#[test]
fn handshake_keeps_frames_that_came_before_the_hello() {
    let mut host = agent(|g| {
        send_in(g, 0x55, &Message::EchoReply(b"old".to_vec()));
        send_in(g, 0xAB, &hello(3));
        for what in ["request", "ack"] {
            let _ = g.recv(Instant::now() + T, what);
        }
    });
    let hs = host.handshake(T, "test").unwrap();
    assert_eq!(hs.before.len(), 1);
    assert_eq!(hs.before[0].frame.header.session, 0x55);
}

/// What an observer heard: `message KIND session` or `stale KIND session`.
#[derive(Default)]
struct Heard(std::sync::Mutex<Vec<String>>);

impl LinkObserver for Heard {
    fn message(&self, _: &str, _: Direction, session: u32, m: &Message, _: u64) {
        self.0.lock().unwrap().push(format!("message {:?} {session:#x}", m.kind()));
    }
    fn stale(&self, _: &str, _: Direction, session: u32, m: &Message, _: u64) {
        self.0.lock().unwrap().push(format!("stale {:?} {session:#x}", m.kind()));
    }
    fn host_connected(&self, _: &str) {}
    fn host_disconnected(&self, _: &str, _: &str) {}
}

#[test]
fn frames_of_no_session_of_this_connection_are_reported_stale_not_as_messages() {
    let mut host = agent(|g| {
        // A rewound guest: its old session's acknowledgement reaches the new connection
        // before the new session's HELLO, and another arrives once the session is live.
        send_in(g, 0x55, &Message::EchoReply(b"old".to_vec()));
        send_in(g, 0xAB, &hello(3));
        for what in ["request", "ack"] {
            let _ = g.recv(Instant::now() + T, what);
        }
        send_in(g, 0x55, &Message::EchoReply(b"older".to_vec()));
        send_in(g, 0xAB, &Message::EchoReply(b"now".to_vec()));
    });
    let heard = Arc::new(Heard::default());
    host.set_observer(heard.clone());
    host.handshake(T, "test").unwrap();
    let r = host.recv(Instant::now() + T, "echo").unwrap();
    assert_eq!(r.frame.header.session, 0xAB, "the stale frame is dropped");
    let heard = heard.0.lock().unwrap().clone();
    assert_eq!(
        heard,
        [
            "message HelloRequest 0x0",
            "stale EchoReply 0x55",
            "message Hello 0xab",
            "message HelloAck 0xab",
            "stale EchoReply 0x55",
            "message EchoReply 0xab"
        ]
    );
}

#[test]
fn a_repeated_hello_of_the_acknowledged_session_is_not_acknowledged_again() {
    let (tx, rx) = std::sync::mpsc::channel();
    let mut host = agent(move |g| {
        // The agent answers three HELLO_REQUESTs (queued while it was away) with its HELLO.
        for _ in 0..3 {
            send_in(g, 0xAB, &hello(3));
        }
        send_in(g, 0xCD, &hello(4)); // a new session: acknowledged
        g.session = 0; // read the frames of every session
        let mut acks = Vec::new();
        while let Ok(r) = g.recv(Instant::now() + Duration::from_secs(1), "anything") {
            if let Ok(Message::HelloAck { nonce, .. }) = r.message {
                acks.push((r.frame.header.session, nonce));
            }
        }
        tx.send(acks).unwrap();
    });
    for (session, nonce) in [(0xAB, 3), (0xAB, 3), (0xAB, 3), (0xCD, 4)] {
        let hs = host.await_offer(T, "test", &|_, _| false).unwrap();
        assert_eq!((hs.session, hs.hello.nonce), (session, nonce), "each HELLO is still a handshake");
    }
    let acks = rx.recv_timeout(T).unwrap();
    assert_eq!(acks, [(0xAB, 3), (0xCD, 4)], "one HELLO_ACK per session offered");
}
