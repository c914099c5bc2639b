//! Sessions on a real VM: 50 host connect/disconnect cycles, each with a new nonce, with a
//! poison pattern sent just before each disconnect that must never come back in a later
//! session; then 5 s without a host, during which the agent must not wake up or burn CPU.

use std::collections::HashSet;
use std::io::Write;
use std::time::{Duration, Instant};
use vport_common::Message;
use vport_common::Phase;
use vport_host::client::AgentClient;
use vport_host::link::stat;
use vport_tests::{TestVm, REPLY_TIMEOUT};

const PORT: &str = "org.vport.0";
const CYCLES: usize = 50;
const POISON: &[u8] = b"POISON-POISON-POISON";

#[test]
fn fifty_sessions_never_see_poison_and_an_idle_agent_costs_nothing() {
    let mut vm = TestVm::launch(&[PORT]);
    let mut link = vm.connect(PORT);
    vm.resume();
    let mut hs = vm.handshake(&mut link);
    let mut nonces = HashSet::new();
    let mut sessions = HashSet::new();
    let mut old_frames_before_hello = 0;
    let mut via_request = 0;
    let started = Instant::now();
    for i in 0..CYCLES {
        assert!(nonces.insert(hs.hello.nonce), "cycle {i}: nonce {:#x} reused", hs.hello.nonce);
        assert!(sessions.insert(hs.session), "cycle {i}: session {:#x} reused", hs.session);
        // Nothing of an earlier session after the HELLO: the first reply is ours.
        let marker = format!("marker-{i}").into_bytes();
        link.send(&Message::Echo(marker.clone())).unwrap();
        loop {
            let r = link
                .recv(Instant::now() + REPLY_TIMEOUT, "ECHO_REPLY")
                .unwrap_or_else(|e| panic!("cycle {i}: {e}\n{}", vm.rig.failure_context()));
            assert_eq!(r.frame.header.session, hs.session, "cycle {i}: a frame of another session");
            match r.message {
                Ok(Message::EchoReply(b)) => {
                    assert_eq!(b, marker, "cycle {i}: the first reply after the handshake is ours");
                    break;
                }
                // The agent's answer to our HELLO_REQUEST when it had already offered this session.
                Ok(Message::Hello(h)) if h.nonce == hs.hello.nonce => {}
                other => panic!("cycle {i}: unexpected {other:?} before our echo reply"),
            }
        }
        let (ls, ds) = link.stats();
        assert_eq!((ls.stale_frames, ds.errors), (0, 0), "cycle {i}");
        // Poison: ECHO frames in this session, then raw bytes (one with a false magic), then leave.
        for _ in 0..3 {
            link.send(&Message::Echo(POISON.to_vec())).unwrap();
        }
        let mut raw = vec![0xF5, 0x56, 0x50, 0x52, 1, 0x12, 0, 0];
        raw.extend_from_slice(POISON);
        link.stream_mut().write_all(&raw).unwrap();
        let old_session = hs.session;
        drop(link);
        link = vm.connect(PORT);
        hs = link
            .handshake(vport_tests::HELLO_TIMEOUT, "vport-tests")
            .unwrap_or_else(|e| panic!("cycle {i}: {e}\n{}", vm.rig.failure_context()));
        if hs.before.iter().any(|r| r.frame.header.session == old_session) {
            via_request += 1;
        }
        for r in &hs.before {
            // Replies the old session had in flight may arrive before the new HELLO, tagged with
            // the old session; they are never in the new one.
            assert_eq!(r.frame.header.session, old_session, "cycle {i}: a frame of neither session before HELLO");
            old_frames_before_hello += 1;
        }
    }
    let elapsed = started.elapsed();
    eprintln!(
        "e2e: {CYCLES} cycles in {elapsed:?}; {via_request} had old-session replies in flight (the agent had not seen the disconnect); \
         {old_frames_before_hello} old-session frames arrived before a new HELLO"
    );
    let stats = link.agent_stats(REPLY_TIMEOUT).unwrap();
    eprintln!("e2e: agent stats after the cycles: {stats:?}");
    assert_eq!(stat(&stats, "stale_frames"), Some(0), "no old-session frame reached a new session");
    assert!(stat(&stats, "sessions").unwrap() > CYCLES as u64);

    // No host for 5 s: the agent's wakeups and CPU time do not move.
    let before = link.events(0, REPLY_TIMEOUT).unwrap().next_seq;
    drop(link);
    let idle_from = Instant::now();
    // A measurement interval, not synchronisation: nothing is awaited here.
    std::thread::sleep(Duration::from_secs(5));
    let mut link = vm.connect(PORT);
    let hs = vm.handshake(&mut link);
    let idle = idle_from.elapsed();
    let ev = link.events(before, REPLY_TIMEOUT).unwrap();
    let recs = &ev.records;
    eprintln!("e2e: records across the idle window: {recs:?}");
    let down = recs
        .iter()
        .find(|r| r.to == Phase::Disconnected)
        .unwrap_or_else(|| panic!("the agent never saw the host leave: {recs:?}"));
    let up = recs
        .iter()
        .find(|r| r.seq > down.seq && r.to == Phase::Connected)
        .unwrap_or_else(|| panic!("no CONNECTED after DISCONNECTED: {recs:?}"));
    let wake_gap = up.wakeups - down.wakeups;
    let cpu_gap = up.cpu_ns - down.cpu_ns;
    let agent_gap = Duration::from_nanos(up.time_ns - down.time_ns);
    eprintln!(
        "e2e: host away {agent_gap:?} (agent clock; host side {idle:?}): {wake_gap} wakeups, {} us cpu between \
         DISCONNECTED and CONNECTED (session {:#x})",
        cpu_gap / 1000,
        hs.session
    );
    assert!(agent_gap >= Duration::from_secs(5), "the idle window is {agent_gap:?}");
    // The disconnect's trailing wakeups and the reconnect's own; a 100 ms poller would show 50.
    assert!(wake_gap <= 3, "{wake_gap} wakeups while no host was attached");
    assert!(cpu_gap < 20_000_000, "{cpu_gap} ns of CPU while no host was attached");
}
