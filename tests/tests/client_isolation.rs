//! Isolation between host clients on a real VM: 50 times, a client leaves with half of a frame
//! sent (sizes up to the 1 MiB payload limit) or with a 256 MiB SOURCE running, and a new
//! client connects at once. Every new client must reach READY and have an ECHO answered within
//! 2 s of connecting, and its session must never be handed a frame of the old session (frames
//! the old session had in flight may arrive before the new HELLO, tagged with the old id; the
//! host drops them, and they are counted here).

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};
use vport_common::frame::{DEFAULT_MAX_PAYLOAD, OVERHEAD};
use vport_common::Message;
use vport_host::client::AgentClient;
use vport_host::link::{stat, Link};
use vport_tests::{TestVm, REPLY_TIMEOUT};

const PORT: &str = "org.vport.0";
const ROUNDS: usize = 50;
/// From connecting to the ECHO reply.
const BOUND: Duration = Duration::from_secs(2);
const SOURCE_BYTES: u64 = 256 << 20;

/// How the old client leaves.
#[derive(Debug, Clone, Copy)]
enum Leave {
    /// Half of an ECHO frame with this payload size, then gone.
    HalfFrame(usize),
    /// A 256 MiB SOURCE running (its first DATA frame received), then gone.
    Streaming,
}

fn leave_of(round: usize) -> Leave {
    const SIZES: [usize; 5] = [100, 4096, 64 * 1024, 256 * 1024, DEFAULT_MAX_PAYLOAD as usize];
    if round % 2 == 1 {
        Leave::Streaming
    } else {
        Leave::HalfFrame(SIZES[(round / 2) % SIZES.len()])
    }
}

/// Leaves `link` as `how` says.
fn leave(vm: &TestVm, mut link: Link<UnixStream>, how: Leave) {
    match how {
        Leave::HalfFrame(size) => {
            let w = Message::Echo(vec![0xC3; size]).to_frame(link.session(), 1).unwrap().encode().unwrap();
            link.stream_mut().write_all(&w[..w.len() / 2]).unwrap();
        }
        Leave::Streaming => {
            link.send(&Message::Source { seed: 7, bytes: SOURCE_BYTES, chunk: 0 }).unwrap();
            let deadline = Instant::now() + REPLY_TIMEOUT;
            loop {
                let r = link
                    .recv(deadline, "the first DATA")
                    .unwrap_or_else(|e| panic!("{e}\n{}", vm.rig.failure_context()));
                if matches!(r.message, Ok(Message::Data { .. })) {
                    break;
                }
            }
        }
    }
    drop(link);
}

#[test]
fn every_new_client_gets_a_clean_session_whatever_the_last_one_left() {
    let mut vm = TestVm::launch(&[PORT]);
    let mut link = vm.connect(PORT);
    vm.resume();
    vm.handshake(&mut link);
    let rss_before = stat(&link.agent_stats(REPLY_TIMEOUT).unwrap(), "rss_kib").unwrap();
    let mut worst = [Duration::ZERO; 2];
    let mut old_frames = [0u64; 2];
    let mut old_bytes = [0u64; 2];
    for round in 0..ROUNDS {
        let how = leave_of(round);
        let kind = usize::from(matches!(how, Leave::Streaming));
        let old_session = link.session();
        leave(&vm, link, how);

        let started = Instant::now();
        link = vm.connect(PORT);
        let hs = link.handshake(BOUND, "vport-tests").unwrap_or_else(|e| {
            panic!("round {round} ({how:?}): no session within {BOUND:?}: {e}\n{}", vm.rig.failure_context())
        });
        let marker = format!("round {round}").into_bytes();
        let left = BOUND.saturating_sub(started.elapsed());
        let back = link.echo(&marker, left).unwrap_or_else(|e| {
            panic!("round {round} ({how:?}): no echo within {BOUND:?}: {e}\n{}", vm.rig.failure_context())
        });
        let took = started.elapsed();
        assert_eq!(back, marker);
        assert!(took <= BOUND, "round {round} ({how:?}): {took:?}");
        worst[kind] = worst[kind].max(took);
        for r in &hs.before {
            assert_eq!(r.frame.header.session, old_session, "round {round}: a frame of neither session before HELLO");
            old_frames[kind] += 1;
            old_bytes[kind] += (r.frame.payload.len() + OVERHEAD) as u64;
        }
        let (ls, _) = link.stats();
        assert_eq!(ls.stale_frames, 0, "round {round} ({how:?}): old-session frames after the new HELLO");
    }
    let stats = link.agent_stats(REPLY_TIMEOUT).unwrap();
    let rss_after = stat(&stats, "rss_kib").unwrap();
    eprintln!(
        "e2e: {ROUNDS} new clients: after a half frame, READY + ECHO within {:?} at worst ({} old-session frames, {} bytes, \
         arrived before a new HELLO and were dropped); after a 256 MiB SOURCE, within {:?} ({} frames, {} bytes); agent: \
         torn_frames {:?}, stream_aborts {:?}, dropped_bytes {:?}, rss {rss_before} -> {rss_after} KiB",
        worst[0],
        old_frames[0],
        old_bytes[0],
        worst[1],
        old_frames[1],
        old_bytes[1],
        stat(&stats, "torn_frames"),
        stat(&stats, "stream_aborts"),
        stat(&stats, "dropped_bytes"),
    );
    assert_eq!(stat(&stats, "stream_aborts"), Some((ROUNDS / 2) as u64), "every stream was aborted");
}
