use super::core::{lock, stopped_by_migration};
use super::fakes::{agent, event, scripted_qmp, server, server_with, Recorded};
use super::*;
use crate::chardev::{EndpointAddr, EndpointEventKind, EndpointKind};
use crate::client::AgentClient;
use serde_json::{json, Value};
use std::sync::{Arc, Mutex};
use std::time::Instant;
use vport_common::message::error_code;
use vport_common::Message;
use ServerState::*;

const A: SessionId = SessionId { session: 0xA, nonce: 1 };
const B: SessionId = SessionId { session: 0xB, nonce: 2 };

#[test]
fn an_illegal_input_is_counted_and_changes_nothing() {
    let (srv, _agents, _qmp) = server();
    {
        let mut c = lock(&srv.core);
        assert_eq!(c.apply(Input::Hello(A)), None, "a HELLO with no connection");
        assert_eq!(c.apply(Input::HostConnected), None);
        assert_eq!(c.apply(Input::HostConnected), None, "a second host connect");
    }
    assert_eq!(srv.illegal_inputs(), 2);
    assert_eq!(srv.state(), Connected { last: None });
}

const T: Duration = Duration::from_secs(5);

#[test]
fn scripted_agent_bye_reopen_and_host_close() {
    let (mut srv, agents, _qmp) = server();
    let guest = std::thread::spawn(move || {
        let mut g = agent(&agents);
        assert!(matches!(g.recv(), (0, Message::HelloRequest)), "the server asks for a session at once");
        g.hello(A);
        assert!(matches!(g.recv(), (0xA, Message::HelloAck { nonce: 1, .. })));
        g.hello(A); // repeated offer: no new session
        g.serve(A, |m| matches!(m, Message::Close { .. }));
        g.send(A.session, &Message::Bye { reopen_after_ms: 0, reason: "close command".into() });
        g.hello(B); // reopened
        assert!(matches!(g.recv(), (0xB, Message::HelloAck { nonce: 2, .. })));
        g.serve(B, |_| false);
    });
    let mut s1 = srv.accept(T).unwrap();
    assert_eq!((s1.id(), s1.number()), (A, 1));
    assert_eq!(s1.ping(T, 11).unwrap().agent_time_ns, 7);
    assert_eq!(s1.close_guest(0, T).unwrap(), EndReason::AgentBye);
    assert_eq!(s1.end_reason(), Some(EndReason::AgentBye));
    assert!(matches!(s1.ping(T, 12), Err(SessionError::Ended(EndReason::AgentBye))));
    assert!(matches!(s1.send(&Message::Stats), Err(SessionError::Ended(EndReason::AgentBye))));
    let mut s2 = srv.accept(T).unwrap();
    assert_eq!((s2.id(), s2.number()), (B, 2));
    s2.ping(T, 13).unwrap();
    assert_eq!(s2.close(), EndReason::HostClosed);
    assert!(matches!(s2.echo(b"x", T), Err(SessionError::Ended(EndReason::HostClosed))));
    assert_eq!(s1.end_reason(), Some(EndReason::AgentBye), "an old session keeps its reason");
    guest.join().unwrap_err(); // the scripted agent saw the host close (assert in recv)
    let whats: Vec<_> = srv.endpoint_events().history().iter().map(|e| e.what).collect();
    assert_eq!(whats, [EndpointEventKind::Connected, EndpointEventKind::ClosedByHost]);
    assert_eq!(srv.state(), Idle);
}

#[test]
fn a_refused_close_is_an_agent_error_not_a_timeout() {
    let (mut srv, agents, _qmp) = server();
    let guest = std::thread::spawn(move || {
        let mut g = agent(&agents);
        g.recv();
        g.hello(A);
        g.recv();
        loop {
            let (h, m) = g.recv_frame();
            if matches!(m, Message::Close { .. }) {
                g.send(A.session, &Message::error_for(&h, error_code::LIMIT, "a reopen delay of 70000 ms exceeds"));
                break;
            }
        }
        g.serve(A, |_| false);
    });
    let mut s1 = srv.accept(T).unwrap();
    let err = s1.close_guest(70_000, T).unwrap_err();
    assert!(matches!(err, SessionError::Agent { code: error_code::LIMIT, .. }), "{err}");
    assert_eq!(s1.end_reason(), None, "the session goes on");
    drop(s1);
    drop(srv);
    let _ = guest.join();
}

#[test]
fn a_newer_session_is_found_by_probing_and_the_next_accept_asks_for_its_hello() {
    let (mut srv, agents, _qmp) = server();
    let guest = std::thread::spawn(move || {
        let mut g = agent(&agents);
        assert!(matches!(g.recv(), (0, Message::HelloRequest)), "the server asks for a session at once");
        g.hello(A);
        g.recv();
        g.serve(A, |m| matches!(m, Message::Ping { time_ns: 1 }));
        g.send(A.session, &Message::Pong { ping_time_ns: 1, time_ns: 1 });
        // The guest reopened without a BYE reaching the host: a HELLO of session B.
        g.hello(B);
        // The host's probe in session A gets bad-session; then it asks for a HELLO.
        g.serve(B, |m| matches!(m, Message::HelloRequest));
        g.hello(B);
        assert!(matches!(g.recv(), (0xB, Message::HelloAck { nonce: 2, .. })));
    });
    let mut s1 = srv.accept(T).unwrap();
    s1.ping(T, 1).unwrap();
    assert_eq!(s1.wait_end(T).unwrap(), EndReason::GuestClosed);
    let s2 = srv.accept(T).unwrap();
    assert_eq!(s2.id(), B);
    guest.join().unwrap();
}

#[test]
fn a_bad_session_error_about_an_earlier_frame_is_probed_and_keeps_the_live_session() {
    // The crossing a CI run met: the host acknowledged an offer the agent had left already; the
    // agent's ERROR bad-session about that HELLO_ACK arrives once the next session is live.
    let (mut srv, agents, _qmp) = server();
    let (probes_tx, probes) = crossbeam_channel::unbounded();
    let guest = std::thread::spawn(move || {
        let mut g = agent(&agents);
        assert!(matches!(g.recv(), (0, Message::HelloRequest)));
        g.hello(A);
        let (ack, m) = g.recv_frame();
        assert!(matches!(m, Message::HelloAck { .. }) && ack.session == A.session, "{m:?}");
        let old_ack = vport_common::Header { session: 0x9, ..ack };
        g.send(0, &Message::error_for(&old_ack, error_code::BAD_SESSION, "hello ack for session 0x9, current is 0xa"));
        // Answer as the agent in A until the host's own PING 1, counting the probes.
        let mut probes = 0;
        loop {
            let (h, m) = g.recv_frame();
            match m {
                Message::Ping { time_ns } => {
                    assert_eq!(h.session, A.session, "the probe is asked in the live session");
                    g.send(A.session, &Message::Pong { ping_time_ns: time_ns, time_ns: 7 });
                    if time_ns == PROBE_PING {
                        probes += 1;
                    } else {
                        break;
                    }
                }
                other => panic!("{other:?}"),
            }
        }
        probes_tx.send(probes).unwrap();
        g.serve(A, |_| false);
    });
    let mut s1 = srv.accept(T).unwrap();
    assert_eq!(s1.id(), A);
    // Let the ERROR arrive before the request, so that the pump meets it first.
    assert!(matches!(s1.recv(Duration::from_millis(300)), Err(SessionError::Timeout { .. })));
    s1.ping(T, 1).unwrap();
    assert_eq!(s1.end_reason(), None, "an ERROR about a frame of another session ends nothing");
    assert_eq!(probes.recv_timeout(T).unwrap(), 1, "one probe asked whether the agent moved on");
    assert_eq!(srv.sessions(), 1);
    drop(s1);
    drop(srv);
    let _ = guest.join();
}

#[test]
fn qmp_events_end_sessions_and_close_the_server() {
    let (mut srv, agents, qmp) = server();
    let guest = std::thread::spawn(move || {
        let mut g = agent(&agents);
        g.hello(A);
        g.recv();
        g.serve(A, |_| false); // until the host closes the connection
    });
    let mut s1 = srv.accept(T).unwrap();
    qmp.send(event("VSERPORT_CHANGE", json!({"id": "other-port", "open": false}))).unwrap();
    assert_eq!(s1.end_reason(), None, "another port's event");
    qmp.send(event("VSERPORT_CHANGE", json!({"id": "vport-port0", "open": false}))).unwrap();
    assert!(matches!(s1.ping(T, 1), Err(SessionError::Ended(EndReason::GuestClosed))));
    drop(s1);
    assert_eq!(srv.last_end(), Some(EndReason::GuestClosed), "dropping an ended session changes nothing");
    qmp.send(event("DEVICE_DELETED", json!({"device": "vport-port0", "path": "/x"}))).unwrap();
    let err = srv.accept(T).unwrap_err();
    assert!(matches!(err, SessionError::Closed { reason: EndReason::Unplugged, .. }), "{err}");
    assert!(err.to_string().contains("org.vport.fake"), "{err}");
    drop(srv);
    drop(qmp);
    let _ = guest.join();
}

#[test]
fn a_cause_ends_the_session_even_after_the_port_event_it_caused() {
    // QEMU emits a reset's VSERPORT_CHANGE open=false before RESET, and an unplug's
    // frontend-open false before DEVICE_DELETED: in the events at hand the cause wins.
    let (mut srv, agents, qmp) = server();
    let guest = std::thread::spawn(move || {
        let mut g = agent(&agents);
        g.hello(A);
        g.recv();
        g.serve(A, |m| matches!(m, Message::HelloRequest));
        g.hello(B);
        g.recv();
        g.serve(B, |_| false);
    });
    let s1 = srv.accept(T).unwrap();
    qmp.send(event("VSERPORT_CHANGE", json!({"id": "vport-port0", "open": false}))).unwrap();
    qmp.send(event("RESET", json!({"guest": true, "reason": "host-qmp-system-reset"}))).unwrap();
    assert_eq!(s1.end_reason(), Some(EndReason::GuestReset));
    let s2 = srv.accept(T).unwrap();
    qmp.send(event("VSERPORT_CHANGE", json!({"id": "vport-port0", "open": false}))).unwrap();
    qmp.send(event("DEVICE_DELETED", json!({"device": "vport-port0", "path": "/x"}))).unwrap();
    assert_eq!(s2.end_reason(), Some(EndReason::Unplugged));
    drop((s1, s2, srv, qmp));
    let _ = guest.join();
}

#[test]
fn stop_ends_with_vm_stopped_and_qmp_gone_closes_the_server() {
    let (mut srv, agents, qmp) = server();
    let guest = std::thread::spawn(move || {
        let mut g = agent(&agents);
        g.hello(A);
        g.recv();
        g.serve(A, |m| matches!(m, Message::HelloRequest));
        g.hello(B);
        g.recv();
        g.serve(B, |_| false);
    });
    let mut s1 = srv.accept(T).unwrap();
    qmp.send(event("STOP", serde_json::Value::Null)).unwrap();
    assert_eq!(s1.wait_end(T).unwrap(), EndReason::VmStopped);
    // After `cont` the agent is still in session A: accept asks for a new one.
    let mut s2 = srv.accept(T).unwrap();
    assert_eq!(s2.id(), B);
    drop(qmp);
    assert!(matches!(s2.ping(T, 1), Err(SessionError::Ended(EndReason::VmExited))));
    assert!(matches!(srv.accept(T), Err(SessionError::Closed { reason: EndReason::VmExited, .. })));
    drop(srv);
    drop(s2);
    let _ = guest.join();
}

#[test]
fn resume_after_a_stop_asks_for_the_next_session_at_once() {
    let (mut srv, agents, qmp) = server();
    let (asked_tx, asked) = crossbeam_channel::unbounded();
    let guest = std::thread::spawn(move || {
        let mut g = agent(&agents);
        g.hello(A);
        g.recv();
        g.serve(A, |m| matches!(m, Message::HelloRequest));
        asked_tx.send(Instant::now()).unwrap();
        g.hello(B);
        g.recv();
        g.serve(B, |_| false);
    });
    let mut s1 = srv.accept(T).unwrap();
    qmp.send(event("STOP", serde_json::Value::Null)).unwrap();
    assert_eq!(s1.wait_end(T).unwrap(), EndReason::VmStopped);
    let resumed = Instant::now();
    qmp.send(event("RESUME", serde_json::Value::Null)).unwrap();
    let s2 = srv.accept(T).unwrap();
    assert_eq!(s2.id(), B);
    let after = asked.recv_timeout(T).unwrap() - resumed;
    assert!(after < crate::link::HELLO_REQUEST_INTERVAL / 2, "asked {after:?} after RESUME");
    drop((s1, s2, srv, qmp));
    let _ = guest.join();
}

#[test]
fn reconnect_once_refuses_a_second_connection_and_connect_is_idempotent() {
    let (mut srv, agents, _qmp) = server();
    srv.set_reconnect(Reconnect::Once);
    srv.connect(T).unwrap();
    srv.connect(T).unwrap();
    assert_eq!(srv.endpoint_events().history().len(), 1, "connect while connected makes no second connection");
    let g = agent(&agents);
    drop(g); // QEMU closes the connection
    let err = srv.accept(T).unwrap_err();
    assert!(matches!(err, SessionError::NoReconnect { .. }), "{err}");
    assert!(err.to_string().contains("reconnect policy"), "{err}");
    assert_eq!(srv.state(), Idle);
}

#[test]
fn a_refused_connect_is_retried_under_always_and_is_an_error_under_once() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("later.sock");
    let addr = EndpointAddr::UnixClient { path: path.clone() };
    let (_qtx, qrx) = crossbeam_channel::unbounded();
    let ep = crate::chardev::endpoint("org.vport.later", &addr, None).unwrap();
    let mut once = PortServer::with_events("org.vport.later", "d", "c", ep, qrx.clone(), None);
    once.set_reconnect(Reconnect::Once);
    assert!(matches!(once.connect(T), Err(SessionError::Endpoint(_))), "no listener yet");

    let ep = crate::chardev::endpoint("org.vport.later", &addr, None).unwrap();
    let mut always = PortServer::with_events("org.vport.later", "d", "c", ep, qrx, None);
    always.set_reconnect(Reconnect::Always { retry: Duration::from_millis(20) });
    let err = always.connect(Duration::from_millis(100)).unwrap_err();
    assert!(matches!(err, SessionError::Timeout { .. }), "retried until the deadline: {err}");
    let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
    let seen = Arc::new(Recorded::default());
    always.set_observer(seen.clone());
    always.connect(T).unwrap();
    assert_eq!(always.backlog(), Backlog::Queued, "connected, not accepted: waiting in the backlog");
    always.send_before_session(&Message::HelloRequest).unwrap();
    assert!(matches!(always.accept(Duration::from_millis(100)), Err(SessionError::Timeout { .. })));
    assert_eq!(seen.take(), Vec::<String>::new(), "a queued connection is not the port's client yet");
    let (_served, _) = listener.accept().unwrap();
    assert_eq!(always.backlog(), Backlog::Served);
    assert!(matches!(always.accept(Duration::from_millis(100)), Err(SessionError::Timeout { .. })));
    assert_eq!(seen.take(), ["connect", "HelloRequest"], "recorded once QEMU serves it, then its request");
    always.disconnect();
    assert_eq!(seen.take(), ["disconnect: host close"]);
    assert_eq!(always.backlog(), Backlog::NotConnected);
}

#[test]
fn a_connection_qemu_closes_before_the_handshake_is_made_again_under_always() {
    let (mut srv, agents, _qmp) = server();
    let guest = std::thread::spawn(move || {
        drop(agent(&agents)); // QEMU closes the first connection before the guest runs
        let mut g = agent(&agents);
        assert!(matches!(g.recv(), (0, Message::HelloRequest)), "the new connection asks at once");
        g.hello(A);
        g.recv();
        g.serve(A, |_| false);
    });
    let s = srv.accept(T).unwrap();
    assert_eq!(s.id(), A);
    let whats: Vec<_> = srv.endpoint_events().history().iter().map(|e| e.what).collect();
    assert_eq!(whats[0], EndpointEventKind::Connected);
    assert_eq!(whats.iter().filter(|w| **w == EndpointEventKind::Connected).count(), 2, "{whats:?}");
    drop((s, srv));
    let _ = guest.join();
}

#[test]
fn only_a_run_state_an_outgoing_migration_leaves_is_a_migration_stop() {
    let states = [
        ("finish-migrate", true),
        ("postmigrate", true),
        ("paused", false),
        ("running", false),
        ("save-vm", false),
        ("inmigrate", false),
        ("prelaunch", false),
        ("shutdown", false),
        ("", false),
    ];
    for (state, migration) in states {
        assert_eq!(stopped_by_migration(state), migration, "run state {state:?}");
    }
}

/// How a live session ends when QMP says `STOP` while `query-status` answers `state`, and the
/// QMP commands the server sent (after `qmp_capabilities`).
fn end_after_stop(state: &'static str) -> (EndReason, Vec<String>) {
    let asked = Arc::new(Mutex::new(Vec::new()));
    let log = asked.clone();
    let (qmp, _dir) = scripted_qmp(move |command| {
        log.lock().unwrap().push(command.to_string());
        Some(json!({"status": state, "running": false, "singlestep": false}))
    });
    let (mut srv, agents, events) = server_with(EndpointKind::UnixClient, Some(qmp));
    let guest = std::thread::spawn(move || {
        let mut g = agent(&agents);
        g.hello(A);
        g.serve(A, |_| false);
    });
    let mut s = srv.accept(T).unwrap();
    assert_eq!(*asked.lock().unwrap(), Vec::<String>::new(), "nothing asked before the STOP");
    events.send(event("STOP", Value::Null)).unwrap();
    let end = s.wait_end(T).unwrap();
    assert_eq!(srv.last_end(), Some(end.clone()));
    assert_eq!(srv.state(), Connected { last: Some(A) }, "a stop keeps the connection");
    drop((s, srv));
    let _ = guest.join();
    let asked = asked.lock().unwrap().clone();
    (end, asked)
}

#[test]
fn a_stop_in_postmigrate_is_a_migration_and_one_in_paused_a_pause() {
    assert_eq!(end_after_stop("postmigrate"), (EndReason::Migrated, vec!["query-status".to_string()]));
    assert_eq!(end_after_stop("finish-migrate").0, EndReason::Migrated);
    // A destination whose incoming migration completed is `paused` after a plain stop (its
    // `query-migrate` would still say `completed`).
    assert_eq!(end_after_stop("paused"), (EndReason::VmStopped, vec!["query-status".to_string()]));
}

#[test]
fn a_connection_qemu_closes_while_qmp_answers_is_lost_and_made_again() {
    let (qmp, _dir) = scripted_qmp(|_| Some(json!({"status": "running", "running": true, "singlestep": false})));
    let (mut srv, agents, _events) = server_with(EndpointKind::UnixClient, Some(qmp));
    let guest = std::thread::spawn(move || {
        let mut g = agent(&agents);
        g.hello(A);
        g.serve(A, |m| matches!(m, Message::Ping { time_ns: 1 }));
        drop(g); // QEMU closes the connection (the chardev was changed) and runs on
        let mut g = agent(&agents);
        assert!(matches!(g.recv(), (0, Message::HelloRequest)), "the new connection asks at once");
        g.hello(B);
        assert!(matches!(g.recv(), (0xB, Message::HelloAck { nonce: 2, .. })));
        g.serve(B, |_| false);
    });
    let mut s1 = srv.accept(T).unwrap();
    let err = s1.ping(T, 1).unwrap_err();
    assert!(matches!(err, SessionError::Ended(EndReason::ConnectionLost)), "{err}");
    assert_eq!(srv.state(), Idle, "the server connects again (Reconnect::Always)");
    let mut s2 = srv.accept(T).unwrap();
    assert_eq!((s2.id(), s2.number()), (B, 2));
    s2.ping(T, 2).unwrap();
    assert_eq!(s1.end_reason(), Some(EndReason::ConnectionLost));
    let whats: Vec<_> = srv.endpoint_events().history().iter().map(|e| e.what).collect();
    use EndpointEventKind::{ClosedByPeer, Connected as Up};
    assert_eq!(whats, [Up, ClosedByPeer, Up]);
    drop((s1, s2, srv));
    let _ = guest.join();
}

#[test]
fn a_connection_qemu_closes_with_qmp_gone_is_the_vm_exiting() {
    // The monitor closes at the first command: QEMU is exiting.
    let (qmp, _dir) = scripted_qmp(|_| None);
    let (mut srv, agents, _events) = server_with(EndpointKind::UnixClient, Some(qmp));
    let guest = std::thread::spawn(move || {
        let mut g = agent(&agents);
        g.hello(A);
        g.serve(A, |m| matches!(m, Message::Ping { time_ns: 1 }));
        drop(g);
    });
    let mut s1 = srv.accept(T).unwrap();
    let err = s1.ping(T, 1).unwrap_err();
    assert!(matches!(err, SessionError::Ended(EndReason::VmExited)), "{err}");
    let err = srv.accept(T).unwrap_err();
    assert!(matches!(err, SessionError::Closed { reason: EndReason::VmExited, .. }), "{err}");
    assert_eq!(srv.endpoint_events().history().len(), 2, "no second connection: connected, closed by QEMU");
    guest.join().unwrap();
}

#[test]
fn a_session_that_ended_here_is_never_handed_out_again_on_a_new_connection() {
    let (mut srv, agents, _qmp) = server();
    let guest = std::thread::spawn(move || {
        let mut g = agent(&agents);
        assert!(matches!(g.recv(), (0, Message::HelloRequest)));
        g.hello(A);
        assert!(matches!(g.recv(), (0xA, Message::HelloAck { .. })));
        // The host leaves and comes back; the agent, which never saw it go (its HELLO_ACK
        // lost, or the close and the connect too close together), offers A again.
        let mut g = agent(&agents);
        assert!(matches!(g.recv(), (0, Message::HelloRequest)));
        g.hello(A);
        // The stale offer is not a session, nor acknowledged: the server asks again, and the
        // agent's new session is the one handed out.
        assert!(matches!(g.recv(), (_, Message::HelloRequest)), "the stale HELLO is not acknowledged");
        g.hello(B);
        assert!(matches!(g.recv(), (0xB, Message::HelloAck { .. })));
        g.serve(B, |_| false);
    });
    let s1 = srv.accept(T).unwrap();
    assert_eq!(s1.id(), A);
    drop(s1);
    let s2 = srv.accept(T).unwrap();
    assert_eq!((s2.id(), s2.number()), (B, 2), "session A ended here; its HELLO again is stale");
    drop(s2);
    guest.join().unwrap_err(); // the scripted agent saw the host close (assert in recv)
}

#[test]
fn a_burst_of_stale_hellos_asks_for_one_new_session_not_one_each() {
    let (mut srv, agents, _qmp) = server();
    let (extra_tx, extra) = crossbeam_channel::unbounded();
    let guest = std::thread::spawn(move || {
        let mut g = agent(&agents);
        assert!(matches!(g.recv(), (0, Message::HelloRequest)));
        g.hello(A);
        assert!(matches!(g.recv(), (0xA, Message::HelloAck { .. })));
        // The host leaves and comes back; the agent answers with A several times (requests it
        // got before it saw anything), then waits to be asked again.
        let mut g = agent(&agents);
        assert!(matches!(g.recv(), (0, Message::HelloRequest)));
        for _ in 0..4 {
            g.hello(A);
        }
        assert!(matches!(g.recv(), (_, Message::HelloRequest)), "no stale HELLO is acknowledged");
        g.hello(B);
        // Every further request would make a real agent, READY in B, start another session.
        let mut more = 0;
        loop {
            match g.recv() {
                (_, Message::HelloRequest) => more += 1,
                (0xB, Message::HelloAck { .. }) => break,
                // No stale HELLO is acknowledged: a real agent in B answers that ERROR
                // bad-session.
                other => panic!("{other:?}"),
            }
        }
        extra_tx.send(more).unwrap();
        g.serve(B, |_| false);
    });
    let s1 = srv.accept(T).unwrap();
    drop(s1);
    let s2 = srv.accept(T).unwrap();
    assert_eq!(s2.id(), B);
    assert_eq!(extra.recv_timeout(T).unwrap(), 0, "requests after the one the agent answered");
    drop(s2);
    guest.join().unwrap_err();
}
