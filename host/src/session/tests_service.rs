//! When the server asks for a HELLO, and what its observer hears of a connection.

use super::fakes::{agent, server, server_with, Recorded};
use super::*;
use crate::chardev::EndpointKind;
use crate::client::AgentClient;
use crate::link::HELLO_REQUEST_INTERVAL;
use crossbeam_channel::Receiver;
use std::sync::Arc;
use std::time::Instant;
use vport_common::Message;

const A: SessionId = SessionId { session: 0xA, nonce: 1 };
const T: Duration = Duration::from_secs(5);
/// How much earlier than the interval the agent may see a request (its clock reads after the
/// server's), and how much later (a loaded machine schedules the threads late: generous, the
/// bugs these tests catch ask at half the interval or at once).
const EARLY: Duration = Duration::from_millis(100);
const LATE: Duration = Duration::from_millis(700);

/// A scripted agent that answers the `n`th HELLO_REQUEST with the HELLO of session A, then
/// serves A; `asked` gets the time each request arrived.
fn agent_answering_request(n: usize, agents: Receiver<std::os::unix::net::UnixStream>) -> Receiver<Instant> {
    let (asked_tx, asked) = crossbeam_channel::unbounded();
    std::thread::spawn(move || {
        let mut g = agent(&agents);
        for _ in 0..n {
            let (session, m) = g.recv();
            assert!(matches!((session, &m), (0, Message::HelloRequest)), "{m:?} in {session:#x}");
            asked_tx.send(Instant::now()).unwrap();
        }
        g.hello(A);
        assert!(matches!(g.recv(), (0xA, Message::HelloAck { nonce: 1, .. })));
        g.serve(A, |_| false);
    });
    asked
}

/// The gaps between the times in `asked`, each checked to be one [`HELLO_REQUEST_INTERVAL`].
fn request_gaps(asked: &Receiver<Instant>, n: usize) -> Vec<Duration> {
    let times: Vec<Instant> = asked.try_iter().collect();
    assert_eq!(times.len(), n, "requests the agent got before it answered");
    let gaps: Vec<Duration> = times.windows(2).map(|w| w[1] - w[0]).collect();
    for gap in &gaps {
        let (low, high) = (HELLO_REQUEST_INTERVAL - EARLY, HELLO_REQUEST_INTERVAL + LATE);
        assert!(
            (low..high).contains(gap),
            "a request {gap:?} after the last, not {HELLO_REQUEST_INTERVAL:?}: {gaps:?}"
        );
    }
    gaps
}

#[test]
fn accept_in_short_slices_asks_again_once_the_interval_passed() {
    let (mut srv, agents, _qmp) = server();
    let asked = agent_answering_request(2, agents);
    let started = Instant::now();
    let mut calls = 0;
    let session = loop {
        calls += 1;
        match srv.accept(Duration::from_millis(200)) {
            Ok(s) => break s,
            Err(SessionError::Timeout { .. }) if started.elapsed() < T => {}
            Err(e) => panic!("after {calls} calls: {e}"),
        }
    };
    assert!(calls >= 5, "{calls} calls of 200 ms make a second");
    assert_eq!(request_gaps(&asked, 2).len(), 1);
    assert_eq!(session.handshake().requests_sent, 2, "the requests on the connection, across calls");
}

#[test]
fn one_long_accept_asks_once_per_interval() {
    let (mut srv, agents, _qmp) = server();
    let asked = agent_answering_request(3, agents);
    let session = srv.accept(T).unwrap();
    assert_eq!(session.id(), A);
    assert_eq!(request_gaps(&asked, 3).len(), 2);
    assert_eq!(session.handshake().requests_sent, 3);
}

/// A scripted agent that answers the first HELLO_REQUEST with session A's HELLO and then
/// serves A.
fn agent_offering_a(agents: Receiver<std::os::unix::net::UnixStream>) {
    std::thread::spawn(move || {
        let mut g = agent(&agents);
        assert!(matches!(g.recv(), (0, Message::HelloRequest)));
        g.hello(A);
        assert!(matches!(g.recv(), (0xA, Message::HelloAck { nonce: 1, .. })));
        g.serve(A, |_| false);
    });
}

#[test]
fn the_observer_hears_a_served_connection_once_before_its_messages() {
    let (mut srv, agents, _qmp) = server();
    agent_offering_a(agents);
    let seen = Arc::new(Recorded::default());
    srv.set_observer(seen.clone());
    srv.connect(T).unwrap();
    assert_eq!(srv.backlog(), Backlog::Served, "a socketpair is served at once");
    assert_eq!(seen.take(), ["connect"], "heard once QEMU serves it, before anything is sent");
    let mut s = srv.accept(T).unwrap();
    s.ping(T, 1).unwrap();
    assert_eq!(s.close(), EndReason::HostClosed);
    assert_eq!(seen.take(), ["HelloRequest", "Hello", "HelloAck", "Ping", "Pong", "disconnect: host close"]);
}

#[test]
fn an_observer_set_on_a_served_connection_hears_the_connect_first() {
    let (mut srv, agents, _qmp) = server();
    agent_offering_a(agents);
    let mut s = srv.accept(T).unwrap();
    let first = Arc::new(Recorded::default());
    srv.set_observer(first.clone());
    assert_eq!(first.take(), ["connect"]);
    s.ping(T, 1).unwrap();
    assert_eq!(first.take(), ["Ping", "Pong"]);
    let second = Arc::new(Recorded::default());
    srv.set_observer(second.clone());
    s.ping(T, 2).unwrap();
    drop(s);
    assert_eq!(second.take(), ["connect", "Ping", "Pong", "disconnect: host close"]);
    assert_eq!(first.take(), Vec::<String>::new(), "a replaced observer hears nothing more");
}

#[test]
fn a_connection_whose_service_is_unknown_is_heard_with_the_first_guest_frame() {
    // A TCP connection: the kernel cannot say whether QEMU accepted it.
    let (mut srv, agents, _qmp) = server_with(EndpointKind::TcpClient, None);
    agent_offering_a(agents);
    srv.connect(T).unwrap();
    assert_eq!(srv.backlog(), Backlog::Unknown);
    let seen = Arc::new(Recorded::default());
    srv.set_observer(seen.clone());
    assert_eq!(seen.take(), Vec::<String>::new(), "not taken as served");
    let s = srv.accept(T).unwrap();
    drop(s);
    // The request went out before QEMU was known to serve the connection: not reported.
    assert_eq!(seen.take(), ["connect", "Hello", "HelloAck", "disconnect: host close"]);
}
