use super::core::lock;
use super::*;
use crate::chardev::{Connection, Endpoint, EndpointEvents};
use crate::chardev::{EndpointAddr, EndpointEventKind, EndpointKind};
use crate::client::AgentClient;
use crate::qmp::QmpEvent;
use crossbeam_channel::Receiver;
use crossbeam_channel::Sender;
use serde_json::json;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::Instant;
use vport_common::message::error_code;
use vport_common::message::Hello;
use vport_common::Decoder;
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

/// An endpoint whose connections are socketpairs handed to a scripted agent.
struct FakeEndpoint {
    addr: EndpointAddr,
    events: EndpointEvents,
    agents: Sender<UnixStream>,
}

impl Endpoint for FakeEndpoint {
    fn port(&self) -> &str {
        "org.vport.fake"
    }
    fn addr(&self) -> &EndpointAddr {
        &self.addr
    }
    fn connect(&mut self, _timeout: Duration) -> Result<Connection, ChardevError> {
        let (host, guest) = UnixStream::pair().unwrap();
        self.agents.send(guest).unwrap();
        Ok(Connection::from_unix_stream("org.vport.fake", EndpointKind::UnixClient, host, &self.events))
    }
    fn events(&self) -> &EndpointEvents {
        &self.events
    }
}

/// The guest side of one connection, scripted by the test thread.
struct Agent {
    s: UnixStream,
    dec: Decoder,
    seq: u32,
}

impl Agent {
    fn send(&mut self, session: u32, m: &Message) {
        self.s.write_all(&m.to_frame(session, self.seq).unwrap().encode().unwrap()).unwrap();
        self.seq += 1;
    }
    fn hello(&mut self, id: SessionId) {
        let h = Hello {
            agent_version: "t".into(),
            port_name: "org.vport.fake".into(),
            kernel_release: "k".into(),
            boot_id: "b".into(),
            nonce: id.nonce,
            agent_time_ns: 0,
        };
        self.send(id.session, &Message::Hello(h));
    }
    fn recv(&mut self) -> (u32, Message) {
        let (h, m) = self.recv_frame();
        (h.session, m)
    }
    fn recv_frame(&mut self) -> (vport_common::Header, Message) {
        let mut buf = [0u8; 4096];
        loop {
            if let Some(f) = self.dec.next_frame() {
                let f = f.unwrap();
                return (f.header, Message::from_frame(&f).unwrap());
            }
            let n = self.s.read(&mut buf).unwrap();
            assert!(n > 0, "host closed");
            self.dec.push(&buf[..n]);
        }
    }
    /// Answers requests like the agent in session `id` until `until` matches.
    fn serve(&mut self, id: SessionId, mut until: impl FnMut(&Message) -> bool) {
        loop {
            let (sess, m) = self.recv();
            if until(&m) {
                return;
            }
            match m {
                Message::Ping { time_ns } if sess == id.session || sess == 0 => {
                    self.send(sess, &Message::Pong { ping_time_ns: time_ns, time_ns: 7 })
                }
                Message::Ping { .. } => self.send(0, &Message::error_unsolicited(error_code::BAD_SESSION, "stale")),
                _ => {}
            }
        }
    }
}

fn server() -> (PortServer, Receiver<UnixStream>, Sender<QmpEvent>) {
    let (agents, rx) = crossbeam_channel::unbounded();
    let addr = EndpointAddr::UnixClient { path: "/fake".into() };
    let ep = FakeEndpoint { addr, events: Default::default(), agents };
    let (qtx, qrx) = crossbeam_channel::unbounded();
    let srv = PortServer::with_events("org.vport.fake", "vport-port0", "vport-ch0", Box::new(ep), qrx, None);
    (srv, rx, qtx)
}

fn agent(rx: &Receiver<UnixStream>) -> Agent {
    Agent { s: rx.recv_timeout(Duration::from_secs(5)).unwrap(), dec: Decoder::default(), seq: 0 }
}

fn event(name: &str, data: serde_json::Value) -> QmpEvent {
    QmpEvent { name: name.into(), data, qemu_time_us: 0, received: Instant::now() }
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

/// An observer that keeps what it heard of the connection.
#[derive(Default)]
struct Recorded(std::sync::Mutex<Vec<String>>);

impl Recorded {
    fn take(&self) -> Vec<String> {
        std::mem::take(&mut *self.0.lock().unwrap())
    }
}

impl crate::link::LinkObserver for Recorded {
    fn message(&self, _: &str, _: vport_common::trace::Direction, _: u32, m: &Message, _: u64) {
        self.0.lock().unwrap().push(format!("{:?}", m.kind()));
    }
    fn host_connected(&self, _: &str) {
        self.0.lock().unwrap().push("connect".into());
    }
    fn host_disconnected(&self, _: &str, reason: &str) {
        self.0.lock().unwrap().push(format!("disconnect: {reason}"));
    }
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
