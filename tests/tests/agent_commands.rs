//! Every agent command on a real port of a real VM: PROBE (second open, lseek, pread, pwrite,
//! non-blocking read, poll mask), SIGIO, SOURCE, SINK, STATS, EVENTS, CLOSE, REOPEN, and a
//! `device_del` + `device_add` of the open port. One VM serves all of them, in an order where
//! no check disturbs the next.

use std::time::{Duration, Instant};
use vport_common::message::{ProbeKind, ProbeTarget, SigioAction, NO_MISMATCH};
use vport_common::Phase;
use vport_host::client::AgentClient;
use vport_host::link::{stat, Link};
use vport_host::wait::wait_until;
use vport_tests::{TestVm, REPLY_TIMEOUT};

const PORT: &str = "org.vport.0";
use nix::libc::{EAGAIN, EBUSY, ESPIPE};
/// poll(2) bits as the agent reports them (`revents`, a u16 on the wire).
const POLLIN: u16 = nix::libc::POLLIN as u16;
const POLLOUT: u16 = nix::libc::POLLOUT as u16;
const POLLHUP: u16 = nix::libc::POLLHUP as u16;
const STREAM: u64 = 8 << 20;

fn ctx(vm: &TestVm) -> String {
    vm.rig.failure_context()
}

/// Waits until QEMU's `query-chardev` says the guest has (or has not) the port open.
fn wait_frontend(vm: &TestVm, chardev: &str, open: bool, timeout: Duration) -> Instant {
    wait_until(
        &format!("frontend-open={open} on {chardev}"),
        timeout,
        Duration::from_millis(5),
        || vm.rig.vm.check_alive(),
        || (vm.rig.qmp.frontend_open(chardev).ok().flatten() == Some(open)).then(Instant::now),
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", ctx(vm)))
}

fn probe(
    vm: &TestVm,
    link: &mut Link<std::os::unix::net::UnixStream>,
    kind: ProbeKind,
    target: ProbeTarget,
    arg: u32,
) -> vport_host::link::ProbeOutcome {
    let out =
        link.probe(kind, target, arg, REPLY_TIMEOUT).unwrap_or_else(|e| panic!("probe {kind:?}: {e}\n{}", ctx(vm)));
    eprintln!(
        "e2e: probe {kind:?} on {target:?}: ret={} errno={} mask={:#x} data={} bytes",
        out.ret,
        out.errno,
        out.mask,
        out.data.len()
    );
    out
}

#[test]
fn every_command_works_on_a_real_port() {
    let args: Vec<String> = ["--log-level", "debug"].iter().map(|s| s.to_string()).collect();
    let cfg = vport_host::rig::vm_config(vport_tests::guest_image(), &[PORT], &args);
    let mut vm = TestVm { rig: vport_host::rig::Rig::launch(cfg).expect("launch") };
    let port = vm.rig.port(PORT).unwrap().clone();
    let mut link = vm.connect(PORT);
    vm.resume();
    let hs = vm.handshake(&mut link);

    // PROBE: what the spec says the guest observes.
    let p = probe(&vm, &mut link, ProbeKind::Open, ProbeTarget::SecondFd, 0);
    assert_eq!((p.ret, p.errno), (-1, EBUSY), "a second open of a held port");
    let p = probe(&vm, &mut link, ProbeKind::Lseek, ProbeTarget::SecondFd, 0);
    assert_eq!((p.ret, p.errno), (-1, EBUSY), "a probe on a second fd reports the open's errno");
    for kind in [ProbeKind::Lseek, ProbeKind::Pread, ProbeKind::Pwrite] {
        let p = probe(&vm, &mut link, kind, ProbeTarget::OwnFd, 0);
        assert_eq!((p.ret, p.errno), (-1, ESPIPE), "{kind:?} on a nonseekable port");
    }
    let p = probe(&vm, &mut link, ProbeKind::Read, ProbeTarget::OwnFd, 64);
    assert_eq!((p.ret, p.errno, p.data.len()), (-1, EAGAIN, 0), "non-blocking read, host connected, no data");
    let p = probe(&vm, &mut link, ProbeKind::Poll, ProbeTarget::OwnFd, 0);
    assert_eq!((p.ret, p.mask), (1, POLLOUT), "host connected, nothing pending: POLLOUT only");

    // STATS and EVENTS so far.
    let stats = link.agent_stats(REPLY_TIMEOUT).unwrap_or_else(|e| panic!("stats: {e}\n{}", ctx(&vm)));
    eprintln!("e2e: stats {stats:?}");
    for name in [
        "bytes_in",
        "bytes_out",
        "frames_in",
        "frames_out",
        "decode_errors",
        "stale_frames",
        "sessions",
        "hello_repeats",
        "illegal_transitions",
        "dropped_bytes",
        "short_writes",
        "queue_overflows",
        "ebusy",
        "opens",
        "closes",
        "wakeups",
        "ebusy_total",
        "rss_kib",
        "uptime_ns",
        "cpu_ns",
        "ports_open",
    ] {
        assert!(stat(&stats, name).is_some(), "STATS has no {name}");
    }
    assert_eq!(stat(&stats, "opens"), Some(1));
    assert_eq!(stat(&stats, "ports_open"), Some(1));
    assert!(stat(&stats, "frames_in").unwrap() >= 9, "handshake ack and 8 probes");
    assert!(stat(&stats, "rss_kib").unwrap() > 0 && stat(&stats, "cpu_ns").unwrap() > 0);
    let pid = stat(&stats, "pid").unwrap();
    let uptime0 = stat(&stats, "uptime_ns").unwrap();
    let ev = link.events(0, REPLY_TIMEOUT).unwrap();
    let last = ev.records.last().unwrap();
    assert_eq!((last.to, last.session), (Phase::Ready, hs.session));
    assert!(ev
        .records
        .windows(2)
        .all(|w| w[0].seq + 1 == w[1].seq && w[0].wakeups <= w[1].wakeups && w[0].cpu_ns <= w[1].cpu_ns));

    // SIGIO: enable, then a host disconnect and reconnect.
    let s =
        link.sigio(SigioAction::Enable, REPLY_TIMEOUT).unwrap_or_else(|e| panic!("sigio enable: {e}\n{}", ctx(&vm)));
    assert_eq!((s.enabled, s.count), (true, 0));
    drop(link);
    let mut link = vm.connect(PORT);
    let hs2 = vm.handshake(&mut link);
    assert_ne!(hs2.session, hs.session);
    let s = link.sigio(SigioAction::Query, REPLY_TIMEOUT).unwrap_or_else(|e| panic!("sigio query: {e}\n{}", ctx(&vm)));
    let masks: Vec<String> = s.samples.iter().map(|x| format!("{:#x}", x.mask)).collect();
    eprintln!("e2e: SIGIO after disconnect+reconnect: count {} masks {masks:?}", s.count);
    assert!(s.enabled);
    assert!(s.count >= 2, "host disconnect and connect each raise SIGIO: {}", s.count);
    assert_eq!(s.samples.len() as u64, s.count.min(64));
    assert!(s.samples.iter().all(|x| x.mask & !(POLLIN | POLLOUT | POLLHUP) == 0));
    let s =
        link.sigio(SigioAction::Disable, REPLY_TIMEOUT).unwrap_or_else(|e| panic!("sigio disable: {e}\n{}", ctx(&vm)));
    assert!(!s.enabled);
    let frozen = s.count;
    link.ping(REPLY_TIMEOUT, 1).unwrap_or_else(|e| panic!("ping after disable: {e}\n{}", ctx(&vm)));
    let s = link
        .sigio(SigioAction::Query, REPLY_TIMEOUT)
        .unwrap_or_else(|e| panic!("sigio query after disable: {e}\n{}", ctx(&vm)));
    assert_eq!(s.count, frozen, "no counting after disable");

    // SOURCE and SINK, 8 MiB each.
    let src =
        link.source(0x5EED, STREAM, 32 * 1024, REPLY_TIMEOUT).unwrap_or_else(|e| panic!("source: {e}\n{}", ctx(&vm)));
    eprintln!(
        "e2e: SOURCE {} bytes in {} frames, {:?} ({:.1} MiB/s), digest {:#x}",
        src.bytes,
        src.frames,
        src.elapsed,
        src.bytes as f64 / (1 << 20) as f64 / src.elapsed.as_secs_f64(),
        src.digest
    );
    assert!(src.verified, "{src:?}");
    assert_eq!(src.digest, vport_common::pattern::pattern_digest(0x5EED, STREAM));
    let sink = link
        .sink(0xF00D, STREAM, 32 * 1024, Duration::from_secs(60))
        .unwrap_or_else(|e| panic!("sink: {e}\n{}", ctx(&vm)));
    eprintln!(
        "e2e: SINK {} bytes, {:?} ({:.1} MiB/s), first mismatch {:?}",
        sink.bytes,
        sink.elapsed,
        sink.bytes as f64 / (1 << 20) as f64 / sink.elapsed.as_secs_f64(),
        sink.first_mismatch
    );
    assert!(sink.verified, "{sink:?}");
    // A corrupted stream is caught at the exact offset.
    link.send(&vport_common::Message::Sink { seed: 1, bytes: 4096 }).unwrap();
    let mut bad = vec![0u8; 4096];
    vport_common::pattern::fill(1, 0, &mut bad);
    bad[1000] ^= 0xFF;
    link.send(&vport_common::Message::Data { offset: 0, bytes: bad }).unwrap();
    let r = link.recv(Instant::now() + REPLY_TIMEOUT, "SINK_RESULT").unwrap();
    assert!(
        matches!(r.message, Ok(vport_common::Message::SinkResult { bytes: 4096, first_mismatch: 1000, .. })),
        "{:?}",
        r.message
    );
    assert_ne!(1000, NO_MISMATCH);

    // CLOSE for 1500 ms: QEMU sees the guest close then reopen; a new session follows.
    let bye = link.close(1500, REPLY_TIMEOUT).unwrap_or_else(|e| panic!("close: {e}\n{}", ctx(&vm)));
    let bye_at = Instant::now();
    assert_eq!(bye.reopen_after_ms, 1500);
    let closed_at = wait_frontend(&vm, &port.chardev_id, false, Duration::from_secs(5));
    let reopened_at = wait_frontend(&vm, &port.chardev_id, true, Duration::from_secs(10));
    eprintln!(
        "e2e: CLOSE 1500 ms: frontend closed {:?} after BYE, open again {:?} after BYE",
        closed_at - bye_at,
        reopened_at - bye_at
    );
    assert!(reopened_at - bye_at >= Duration::from_millis(1400), "reopened too early");
    let hs3 = vm.handshake(&mut link);
    assert_ne!(hs3.session, hs2.session);
    // REOPEN.
    let bye = link.reopen(REPLY_TIMEOUT).unwrap();
    assert_eq!(bye.reopen_after_ms, 0);
    let hs4 = vm.handshake(&mut link);
    assert_ne!(hs4.session, hs3.session);
    let stats = link.agent_stats(REPLY_TIMEOUT).unwrap();
    assert_eq!((stat(&stats, "opens"), stat(&stats, "closes")), (Some(3), Some(2)), "{stats:?}");
    let ev = link.events(0, REPLY_TIMEOUT).unwrap();
    let causes: Vec<String> =
        ev.records.iter().map(|r| format!("{}->{} {}", r.from.name(), r.to.name(), r.cause)).collect();
    eprintln!("e2e: events {causes:?}");
    assert!(causes.iter().any(|c| c == "READY->DISCONNECTED close requested"), "{causes:?}");
    assert!(causes.iter().any(|c| c == "READY->DISCONNECTED reopen requested"), "{causes:?}");

    // device_del of the open port, then device_add with the same name and chardev.
    drop(link);
    vm.rig.qmp.device_del(&port.id).unwrap_or_else(|e| panic!("device_del: {e}\n{}", ctx(&vm)));
    let (ev, others) = vm.rig.qmp.wait_event(Duration::from_secs(10), |e| {
        e.name == "DEVICE_DELETED" && e.data.get("device").and_then(|d| d.as_str()) == Some(port.id.as_str())
    });
    assert!(ev.is_some(), "no DEVICE_DELETED for {}: {others:?}\n{}", port.id, ctx(&vm));
    let added = Instant::now();
    vm.rig
        .qmp
        .device_add(
            // A JSON object, built without naming serde_json (not a dependency of this crate).
            [
                ("driver", "virtserialport"),
                ("bus", "vser0.0"),
                ("chardev", port.chardev_id.as_str()),
                ("id", port.id.as_str()),
                ("name", PORT),
            ]
            .into_iter()
            .collect(),
        )
        .unwrap_or_else(|e| panic!("device_add: {e}\n{}", ctx(&vm)));
    let mut link = vm.connect(PORT);
    let hs5 = link
        .handshake(Duration::from_secs(10), "vport-tests")
        .unwrap_or_else(|e| panic!("after replug: {e}\n{}", ctx(&vm)));
    let ready_after = added.elapsed();
    eprintln!("e2e: READY again {ready_after:?} after device_add (requests sent: {})", hs5.requests_sent);
    assert!(ready_after < Duration::from_secs(3), "READY {ready_after:?} after device_add");
    let stats = link.agent_stats(REPLY_TIMEOUT).unwrap();
    assert_eq!(stat(&stats, "pid"), Some(pid), "same agent process: no restart");
    assert!(stat(&stats, "uptime_ns").unwrap() > uptime0);
    assert_eq!(stat(&stats, "opens"), Some(4), "{stats:?}");
    let ev = link.events(0, REPLY_TIMEOUT).unwrap();
    let tail: Vec<String> =
        ev.records.iter().rev().take(3).map(|r| format!("{}->{} {}", r.from.name(), r.to.name(), r.cause)).collect();
    eprintln!("e2e: last events after the replug (newest first): {tail:?}");
    // The unplug ended the session (seen as POLLHUP or ENODEV, whichever came first), then the
    // replugged port got a new session.
    assert_eq!(ev.records.last().map(|r| r.to), Some(Phase::Ready));
    assert!(tail.iter().any(|c| c.starts_with("READY->DISCONNECTED")), "{tail:?}");
}
