//! A chardev that misbehaves under a host [`Link`]: a peer (standing in for QEMU's end of a
//! port) that sends part of a frame and then closes or falls silent. Each test asserts the
//! typed error and that the call returned, at its deadline for a timeout and at once for a
//! close, never later than the deadline plus a generous margin: no hang, no panic.
//!
//! The QMP side of a misbehaving QEMU is tested against a scripted fake QMP server in
//! `src/qmp/tests.rs` and `src/qmp/ready.rs`.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};
use vport_common::frame::{Frame, HEADER_LEN};
use vport_common::message::Hello;
use vport_common::{Decoder, Message};
use vport_host::client::AgentClient;
use vport_host::link::{Link, LinkError, Received};

/// Far beyond any deadline used here: a call that has not returned by then hangs.
const MARGIN: Duration = Duration::from_secs(10);
/// The deadline of calls expected to time out.
const SHORT: Duration = Duration::from_millis(300);
/// The deadline of calls expected to fail at once, long before it.
const LONG: Duration = Duration::from_secs(60);

/// `msg` as bytes on the wire, in session 0.
fn wire(msg: &Message) -> Vec<u8> {
    msg.to_frame(0, 1).expect("a valid message").encode().expect("encodes")
}

fn pong(time_ns: u64) -> Vec<u8> {
    wire(&Message::Pong { ping_time_ns: 1, time_ns })
}

fn hello() -> Message {
    Message::Hello(Hello {
        agent_version: "fake".into(),
        port_name: "org.vport.test".into(),
        kernel_release: "k".into(),
        boot_id: "b".into(),
        nonce: 7,
        agent_time_ns: 0,
    })
}

/// A host link and the peer end of its connection.
fn link() -> (Link<UnixStream>, UnixStream) {
    let (host, peer) = UnixStream::pair().expect("socketpair");
    (Link::new("org.vport.test", host), peer)
}

/// Runs `f` on its own thread; its result and how long it took. Panics if it has not
/// returned within `limit`.
fn returns_within<T: Send + 'static>(limit: Duration, f: impl FnOnce() -> T + Send + 'static) -> (T, Duration) {
    let (tx, rx) = crossbeam_channel::bounded(1);
    let started = Instant::now();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    let r = rx.recv_timeout(limit).unwrap_or_else(|_| panic!("the call did not return within {limit:?}"));
    (r, started.elapsed())
}

/// `link.recv` with `timeout` on its own thread; the result, the link back, and how long it
/// took.
fn recv(mut link: Link<UnixStream>, timeout: Duration) -> (Result<Received, LinkError>, Link<UnixStream>, Duration) {
    let ((r, link), took) = returns_within(timeout + MARGIN, move || {
        let r = link.recv(Instant::now() + timeout, "a frame");
        (r, link)
    });
    (r, link, took)
}

/// Asserts that the next `recv` on `host`, whose peer has gone, fails with `Closed` long
/// before its deadline.
fn assert_closed_at_once(host: Link<UnixStream>, context: &str) {
    let (r, _, took) = recv(host, LONG);
    assert!(matches!(r, Err(LinkError::Closed { .. })), "{context}: {r:?}");
    assert!(took < LONG, "{context}: took {took:?}");
}

#[test]
fn half_a_frame_then_close_is_closed_at_every_cut() {
    let frame = pong(5);
    let cuts = [1, 3, 4, HEADER_LEN - 1, HEADER_LEN, HEADER_LEN + 5, frame.len() - 1];
    for cut in cuts {
        let (host, mut peer) = link();
        peer.write_all(&frame[..cut]).expect("write");
        drop(peer);
        assert_closed_at_once(host, &format!("cut at {cut}"));
    }
}

#[test]
fn half_a_frame_then_silence_is_a_timeout_at_the_deadline_and_the_rest_still_completes_it() {
    let frame = pong(6);
    let (host, mut peer) = link();
    let cut = HEADER_LEN + 3;
    peer.write_all(&frame[..cut]).expect("write");
    let (r, host, took) = recv(host, SHORT);
    assert!(matches!(&r, Err(LinkError::Timeout { what, .. }) if what == "a frame"), "{r:?}");
    assert!(took >= SHORT, "returned before the deadline: {took:?}");
    // The bytes of the half frame were kept: the rest completes it.
    peer.write_all(&frame[cut..]).expect("write");
    let (r, _, _) = recv(host, LONG);
    let got = r.expect("the completed frame").message;
    assert_eq!(got, Ok(Message::Pong { ping_time_ns: 1, time_ns: 6 }));
}

#[test]
fn a_request_answered_with_half_a_reply_times_out_and_a_later_close_is_closed() {
    let (host, mut peer) = link();
    let reply = wire(&Message::EchoReply(b"abc".to_vec()));
    peer.write_all(&reply[..reply.len() / 2]).expect("write");
    let ((r, host), took) = returns_within(SHORT + MARGIN, move || {
        let mut host = host;
        (host.echo(b"abc", SHORT), host)
    });
    assert!(matches!(&r, Err(LinkError::Timeout { what, .. }) if what == "ECHO_REPLY"), "{r:?}");
    assert!(took >= SHORT, "returned before the deadline: {took:?}");
    // The peer goes without reading the ECHO: the read fails with ECONNRESET, still Closed.
    drop(peer);
    assert_closed_at_once(host, "after the half reply");
}

#[test]
fn a_handshake_answered_with_half_a_hello_then_a_close_is_closed() {
    let (mut host, mut peer) = link();
    let hello = wire(&hello());
    std::thread::spawn(move || {
        // Wait for the host's HELLO_REQUEST, as an agent would, then tear the HELLO.
        let mut decoder = Decoder::default();
        let mut buf = [0u8; 256];
        peer.set_read_timeout(Some(MARGIN)).expect("timeout");
        while decoder.next_frame().is_none() {
            match peer.read(&mut buf) {
                Ok(n) if n > 0 => decoder.push(&buf[..n]),
                _ => return,
            }
        }
        let _ = peer.write_all(&hello[..hello.len() - 4]);
    });
    let (r, took) = returns_within(LONG + MARGIN, move || host.handshake(LONG, "test").map(|h| h.session));
    assert!(matches!(r, Err(LinkError::Closed { .. })), "{r:?}");
    assert!(took < LONG, "{took:?}");
}

#[test]
fn a_header_torn_off_before_a_whole_frame_costs_only_its_bytes() {
    let torn = pong(1);
    let (host, mut peer) = link();
    peer.write_all(&torn[..HEADER_LEN / 2]).expect("write");
    peer.write_all(&pong(2)).expect("write");
    let (r, host, _) = recv(host, LONG);
    assert_eq!(r.expect("the whole frame").message, Ok(Message::Pong { ping_time_ns: 1, time_ns: 2 }));
    let (_, decoder) = host.stats();
    assert_eq!((decoder.frames, decoder.errors), (1, 1), "{decoder:?}");
}

#[test]
fn a_header_announcing_an_oversize_payload_is_skipped_not_waited_for() {
    // A valid header (its CRC matches) announcing 2 MiB, over the link's 1 MiB limit; the
    // payload never comes. The link must not wait for it.
    let big = Frame::new(0x7f, 0, 0, vec![0; 2 << 20]).encode().expect("encodes");
    let (host, mut peer) = link();
    peer.write_all(&big[..HEADER_LEN]).expect("write");
    peer.write_all(&pong(3)).expect("write");
    let (r, host, _) = recv(host, LONG);
    assert_eq!(r.expect("the whole frame").message, Ok(Message::Pong { ping_time_ns: 1, time_ns: 3 }));
    drop(peer);
    assert_closed_at_once(host, "after the oversize header");
}
