//! Acknowledged streams end to end (`vport send` / `vport recv`, [`vport_host::stream`]) on real
//! VMs: a file goes into the guest and another comes out of it at the same time, each through
//! a host drop (the host leaves at a quarter of the stream) and a live migration (at half the
//! stream, with data in flight, to a second QEMU over a unix socket). Both digests are verified
//! by the receivers and compared here byte for byte; the file sent in is then read back from
//! the migrated guest.

use crossbeam_channel::{Receiver, Sender};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use vport_common::pattern::StreamDigest;
use vport_host::image::initscript::GUEST_STREAM_DIR;
use vport_host::rig::{vm_config, Rig};
use vport_host::session::{PortServer, Session, SessionError};
use vport_host::stream::to_guest::ToGuest;
use vport_host::stream::to_host::ToHost;
use vport_host::stream::{Control, SessionSource, StreamSide, TransferEvent, TransferOptions, TransferReport};
use vport_host::wait::wait_until;
use vport_tests::{guest_image, wait_migration_completed, TestVm, HELLO_TIMEOUT};

const PORT_IN: &str = "org.vport.xfer.in";
const PORT_OUT: &str = "org.vport.xfer.out";
const AGENT_ARGS: [&str; 4] = ["--log-level", "info", "--stream-dir", GUEST_STREAM_DIR];
/// Bytes of each file: large enough that a quarter and a half of it are reached well inside
/// the stream under TCG.
const SIZE: usize = 3 << 20;
const MIGRATION_DEADLINE: Duration = Duration::from_secs(120);

fn opts() -> TransferOptions {
    TransferOptions { session_timeout: HELLO_TIMEOUT, stall_timeout: Duration::from_secs(10), ..Default::default() }
}

/// Random-looking bytes that differ per `seed` (the pattern generator's, so no new crate).
fn file_bytes(seed: u64) -> Vec<u8> {
    let mut v = vec![0u8; SIZE];
    vport_common::pattern::fill(seed, 0, &mut v);
    v
}

fn digest(bytes: &[u8]) -> u64 {
    let mut d = StreamDigest::new();
    d.update(bytes);
    d.digest()
}

/// The source VM's server until the migration switched the guest over, then the
/// destination's.
struct MigratingSource {
    servers: [PortServer; 2],
    switched: Arc<AtomicBool>,
}

impl SessionSource for MigratingSource {
    fn next_session(&mut self, timeout: Duration) -> Result<Session, SessionError> {
        let i = usize::from(self.switched.load(Ordering::SeqCst));
        self.servers[i].accept(timeout)
    }
    fn reconnect(&mut self) {
        let i = usize::from(self.switched.load(Ordering::SeqCst));
        self.servers[i].disconnect();
    }
    fn vm_paused(&self) -> bool {
        self.servers[usize::from(self.switched.load(Ordering::SeqCst))].vm_paused()
    }
}

/// The faults of one transfer, from its hook: the host leaves at a quarter; at half, the hook
/// says so and waits for the migration (data stays in flight meanwhile).
fn faults(ready: Sender<()>, migrated: Receiver<()>) -> impl FnMut(&TransferEvent) -> Control {
    let (mut dropped, mut waited) = (false, false);
    move |e| {
        if let TransferEvent::Reconnecting { waited } = e {
            eprintln!("e2e: no session within {waited:?}: the host reconnects");
        }
        let TransferEvent::Progress { acked, total } = *e else { return Control::Continue };
        if !dropped && acked * 4 >= total {
            dropped = true;
            eprintln!("e2e: host drop at {acked} of {total}");
            return Control::DropSession;
        }
        if dropped && !waited && acked * 2 >= total {
            waited = true;
            eprintln!("e2e: waiting for the migration at {acked} of {total}");
            ready.send(()).expect("the test thread is gone");
            migrated.recv_timeout(MIGRATION_DEADLINE).expect("the migration did not complete");
        }
        Control::Continue
    }
}

fn server(vm: &TestVm, port: &str) -> PortServer {
    vm.rig.port_server(port).unwrap_or_else(|e| panic!("no server for {port}: {e}"))
}

/// Live migration of `src` into `dst` (started with `-incoming unix:...`), then `cont` there.
fn migrate(src: &TestVm, dst: &mut TestVm, uri: &str) -> Duration {
    let t0 = Instant::now();
    src.rig.qmp.migrate(uri).unwrap_or_else(|e| panic!("migrate: {e}\n{}", src.rig.failure_context()));
    wait_migration_completed(src, MIGRATION_DEADLINE).unwrap_or_else(|e| panic!("migration: {e}"));
    wait_until(
        "the destination to load the state",
        MIGRATION_DEADLINE,
        Duration::from_millis(20),
        || dst.rig.vm.check_alive(),
        || dst.rig.qmp.query_status().ok().filter(|s| s != "inmigrate"),
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", dst.rig.failure_context()));
    dst.resume();
    t0.elapsed()
}

fn report_line(what: &str, r: &TransferReport) {
    eprintln!(
        "e2e: {what}: {} bytes digest {:#018x} in {} sessions, {} interruptions, {} bytes resent, {} duplicate bytes \
         dropped, {:.1} s",
        r.bytes,
        r.digest,
        r.sessions,
        r.interruptions,
        r.resent,
        r.duplicates,
        r.elapsed.as_secs_f64()
    );
}

#[test]
fn files_go_each_way_through_a_host_drop_and_a_live_migration() {
    let work = tempfile::tempdir().unwrap();
    let ports = [PORT_IN, PORT_OUT];
    let mut src = TestVm::launch_with(&ports, &AGENT_ARGS, &[]);
    let args: Vec<String> = AGENT_ARGS.iter().map(|a| a.to_string()).collect();
    let mut cfg = vm_config(guest_image(), &ports, &args);
    let mig_sock = work.path().join("migration.sock");
    cfg.incoming = Some(format!("unix:{}", mig_sock.display()));
    // QEMU's own account of the ports' throttling on the destination (docs/reliability.md).
    cfg.extra_args.extend(["-trace".into(), "virtio_serial_throttle_port".into()]);
    let mut dst = TestVm { rig: Rig::launch(cfg).unwrap_or_else(|e| panic!("destination: {e}")) };
    src.resume();

    // Into the guest first, without faults: the file the guest will send back.
    let (a, b) = (file_bytes(1), file_bytes(2));
    let (a_path, b_path) = (work.path().join("a.bin"), work.path().join("b.bin"));
    std::fs::write(&a_path, &a).unwrap();
    std::fs::write(&b_path, &b).unwrap();
    let mut out_src = server(&src, PORT_OUT);
    let mut setup = ToGuest::new(PORT_OUT, &b_path, "b.bin", opts()).unwrap();
    let r = setup.run(&mut out_src, &mut |_| Control::Continue).unwrap_or_else(|e| panic!("setup: {e}"));
    assert_eq!((r.bytes, r.digest, r.interruptions), (SIZE as u64, digest(&b), 0));

    // Both ways at once, through the faults.
    let switched = Arc::new(AtomicBool::new(false));
    let (ready_tx, ready_rx) = crossbeam_channel::unbounded();
    let (go_tx, go_rx) = crossbeam_channel::unbounded();
    let mut into =
        MigratingSource { servers: [server(&src, PORT_IN), server(&dst, PORT_IN)], switched: switched.clone() };
    let mut out_of = MigratingSource { servers: [out_src, server(&dst, PORT_OUT)], switched: switched.clone() };
    let mut sending = ToGuest::new(PORT_IN, &a_path, "a.bin", opts()).unwrap();
    let received_path = work.path().join("b.received");
    let mut receiving = ToHost::new(PORT_OUT, "b.bin", &received_path, opts()).unwrap();
    let (mut send_faults, mut recv_faults) = (faults(ready_tx.clone(), go_rx.clone()), faults(ready_tx, go_rx));
    let send = std::thread::spawn(move || sending.run(&mut into, &mut send_faults).map(|r| (r, into)));
    let recv = std::thread::spawn(move || receiving.run(&mut out_of, &mut recv_faults).map(|r| (r, out_of)));
    for _ in 0..2 {
        ready_rx.recv_timeout(MIGRATION_DEADLINE).unwrap_or_else(|_| panic!("a transfer never reached half"));
    }
    let took = migrate(&src, &mut dst, &format!("unix:{}", mig_sock.display()));
    eprintln!("e2e: live migration with both streams in flight took {} ms", took.as_millis());
    switched.store(true, Ordering::SeqCst);
    go_tx.send(()).unwrap();
    go_tx.send(()).unwrap();

    let (sent, mut into) = send.join().expect("the send thread panicked").unwrap_or_else(|e| panic!("send: {e}"));
    let (got, _) = recv.join().expect("the recv thread panicked").unwrap_or_else(|e| panic!("recv: {e}"));
    report_line("host -> guest", &sent);
    report_line("guest -> host", &got);
    let trace = std::fs::read_to_string(dst.rig.vm.stderr_log()).unwrap_or_default();
    let throttles: Vec<&str> = trace.lines().filter(|l| l.contains("virtio_serial_throttle_port")).take(6).collect();
    eprintln!("e2e: destination's first throttle trace lines: {throttles:?}");
    assert_eq!((sent.bytes, sent.digest), (SIZE as u64, digest(&a)));
    assert_eq!((got.bytes, got.digest), (SIZE as u64, digest(&b)));
    for r in [&sent, &got] {
        // The drop, and the migration (its STOP ends the source's session).
        assert!(r.interruptions >= 2 && r.sessions >= 3, "{r:?}");
    }
    assert!(std::fs::read(&received_path).unwrap() == b, "the received file differs from the guest's");
    let parts: Vec<_> = std::fs::read_dir(work.path())
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().ends_with(".vport-part"))
        .collect();
    assert!(parts.is_empty(), "part files left: {parts:?}");

    // The migrated guest holds exactly the file sent in: read it back.
    let back_path = work.path().join("a.back");
    let mut back = ToHost::new(PORT_IN, "a.bin", &back_path, opts()).unwrap();
    let r = back.run(&mut into, &mut |_| Control::Continue).unwrap_or_else(|e| panic!("read back: {e}"));
    assert_eq!(r.digest, digest(&a));
    assert!(std::fs::read(&back_path).unwrap() == a, "the guest's copy differs from what was sent");
}
