//! Hostile bytes on a real VM: each input is sent in a live session (or, for the last ones,
//! instead of one), the agent's answer is checked (`docs/protocol.md`, "What bad input gets
//! back"), and a fresh connection then completes a handshake and an echo. The agent's pid is
//! the same at the end: it never restarted.

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::time::Instant;
use vport_common::frame::{DEFAULT_MAX_PAYLOAD, HEADER_LEN};
use vport_common::message::error_code;
use vport_common::{Frame, Message, MessageType};
use vport_host::client::AgentClient;
use vport_host::link::{stat, Link};
use vport_tests::{TestVm, REPLY_TIMEOUT};

const PORT: &str = "org.vport.0";

/// Leaves `old` (QEMU serves one client at a time: the next one waits until this one is gone),
/// then makes a fresh connection with a handshake and an echo: the agent serves.
fn fresh(vm: &TestVm, old: Link<UnixStream>, after: &str) -> Link<UnixStream> {
    drop(old);
    let started = Instant::now();
    let mut link = vm.connect(PORT);
    let hs = vm.handshake(&mut link);
    let marker = format!("after {after}").into_bytes();
    let back = link.echo(&marker, REPLY_TIMEOUT).unwrap_or_else(|e| panic!("echo after {after}: {e}"));
    assert_eq!(back, marker);
    eprintln!("e2e: after {after}: session {:#x}, echo answered {:?} after connecting", hs.session, started.elapsed());
    link
}

/// Reads until an ERROR accepted by `want` arrives (other frames are skipped); returns its
/// header session and text.
fn expect_error(vm: &TestVm, link: &mut Link<UnixStream>, what: &str, want: impl Fn(u16, u8) -> bool) -> (u32, String) {
    let deadline = Instant::now() + REPLY_TIMEOUT;
    loop {
        let r = link.recv(deadline, what).unwrap_or_else(|e| panic!("{what}: {e}\n{}", vm.rig.failure_context()));
        if let Ok(Message::Error { code, about_kind, text, .. }) = &r.message {
            if want(*code, *about_kind) {
                eprintln!("e2e: {what}: ERROR {code} ({}): {text}", error_code::name(*code));
                return (r.frame.header.session, text.clone());
            }
            eprintln!("e2e: {what}: other ERROR {code}: {text}");
        }
    }
}

fn decode_report(vm: &TestVm, link: &mut Link<UnixStream>, what: &str, needle: &str) {
    let (session, text) = expect_error(vm, link, what, |code, about| code == error_code::DECODE && about == 0);
    assert_eq!(session, link.session(), "{what}: reported in the session");
    assert!(text.contains(needle) && text.contains("stream offset"), "{what}: {text}");
}

fn raw(link: &mut Link<UnixStream>, bytes: &[u8]) {
    link.stream_mut().write_all(bytes).unwrap();
}

/// A PING frame of `link`'s session, encoded, for damaging.
fn ping(link: &Link<UnixStream>) -> Vec<u8> {
    Message::Ping { time_ns: 1 }.to_frame(link.session(), 99).unwrap().encode().unwrap()
}

fn fix_header_crc(w: &mut [u8]) {
    let c = crc32fast::hash(&w[..20]);
    w[20..24].copy_from_slice(&c.to_le_bytes());
}

#[test]
fn hostile_bytes_are_survived_answered_and_the_agent_keeps_serving() {
    let mut vm = TestVm::launch(&[PORT]);
    let mut link = vm.connect(PORT);
    vm.resume();
    vm.handshake(&mut link);
    let pid = stat(&link.agent_stats(REPLY_TIMEOUT).unwrap(), "pid").unwrap();

    // 1. 64 KiB of random bytes.
    let mut junk = vec![0u8; 64 * 1024];
    let mut x = 0x1234_5678_9abc_def0u64;
    for b in junk.iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
    raw(&mut link, &junk);
    decode_report(&vm, &mut link, "64 KiB of random bytes", "skipped");
    link = fresh(&vm, link, "64 KiB of random bytes");

    // 2. A wrong header CRC.
    let mut w = ping(&link);
    w[20] ^= 0xFF;
    raw(&mut link, &w);
    decode_report(&vm, &mut link, "a wrong header crc", "bad header crc");
    link = fresh(&vm, link, "a wrong header crc");

    // 3. A wrong frame CRC.
    let mut w = ping(&link);
    w[HEADER_LEN] ^= 0xFF;
    raw(&mut link, &w);
    decode_report(&vm, &mut link, "a wrong frame crc", "bad frame crc");
    link = fresh(&vm, link, "a wrong frame crc");

    // 4. A length over the agent's limit (1 MiB): refused from the header alone.
    let mut w = ping(&link);
    w[16..20].copy_from_slice(&(DEFAULT_MAX_PAYLOAD + 1).to_le_bytes());
    fix_header_crc(&mut w);
    raw(&mut link, &w[..HEADER_LEN]);
    decode_report(&vm, &mut link, "a length over the limit", "exceeds the limit of 1048576");
    link = fresh(&vm, link, "a length over the limit");

    // 5. An unknown version.
    let mut w = ping(&link);
    w[4] = 2;
    fix_header_crc(&mut w);
    raw(&mut link, &w);
    decode_report(&vm, &mut link, "an unknown version", "unknown protocol version 2");
    link = fresh(&vm, link, "an unknown version");

    // 6. An unknown type.
    let w = Frame::new(0x66, link.session(), 5, vec![1, 2]).encode().unwrap();
    raw(&mut link, &w);
    expect_error(&vm, &mut link, "an unknown type", |code, about| code == error_code::UNKNOWN_TYPE && about == 0x66);
    link = fresh(&vm, link, "an unknown type");

    // 7. A malformed payload (a PING of 3 bytes instead of 8).
    let w = Frame::new(MessageType::Ping as u8, link.session(), 6, vec![1, 2, 3]).encode().unwrap();
    raw(&mut link, &w);
    expect_error(&vm, &mut link, "a malformed payload", |code, about| code == error_code::MALFORMED && about == 0x10);
    link = fresh(&vm, link, "a malformed payload");

    // 8. Another session's id: answered outside any session (0), which every host accepts.
    let other = link.session() ^ 0x5A5A_5A5A;
    let w = Message::Echo(b"foreign".to_vec()).to_frame(other, 7).unwrap().encode().unwrap();
    raw(&mut link, &w);
    let (session, text) = expect_error(&vm, &mut link, "another session's id", |code, about| {
        code == error_code::BAD_SESSION && about == 0x12
    });
    assert_eq!(session, 0);
    assert!(text.contains(&format!("{other:#010x}")), "{text}");
    link = fresh(&vm, link, "another session's id");

    // 9. Requests before the handshake, on a new connection.
    let mut early = {
        drop(link);
        vm.connect(PORT)
    };
    for m in [Message::Stats, Message::Echo(b"early".to_vec())] {
        raw(&mut early, &m.to_frame(0, 1).unwrap().encode().unwrap());
        let what = format!("{:?} before the handshake", m.kind());
        expect_error(&vm, &mut early, &what, |code, about| code == error_code::BAD_STATE && about == m.kind() as u8);
    }
    link = fresh(&vm, early, "requests before the handshake");

    // 10. A truncated frame, then the client leaves.
    let w = Message::Echo(vec![0xAB; 64 * 1024]).to_frame(link.session(), 8).unwrap().encode().unwrap();
    raw(&mut link, &w[..w.len() / 2]);
    let mut link = fresh(&vm, link, "a truncated frame then disconnect");

    let stats = link.agent_stats(REPLY_TIMEOUT).unwrap();
    eprintln!(
        "e2e: agent after the hostile inputs: decode_errors {:?}, decode_reports {:?}, errors_sent {:?}, torn_frames {:?}, \
         skipped_bytes {:?}, rss_kib {:?}",
        stat(&stats, "decode_errors"),
        stat(&stats, "decode_reports"),
        stat(&stats, "errors_sent"),
        stat(&stats, "torn_frames"),
        stat(&stats, "skipped_bytes"),
        stat(&stats, "rss_kib"),
    );
    assert_eq!(stat(&stats, "pid"), Some(pid), "the agent never restarted");
    assert!(stat(&stats, "decode_errors").unwrap() >= 4);
}
