//! The pause bug, reproduced under an acknowledged stream and recovered by liveness, on a real
//! VM (docs/reliability.md).
//!
//! A file streams from the guest to the host. At a quarter of it the VM is stopped, the host
//! leaves while it is stopped (QEMU drops the CLOSED event: virtio-console has no handlers
//! during a stop), and the VM is resumed with no client. The agent, which never saw the host
//! leave, writes on; QEMU's write to the absent client fails and the port is throttled with
//! nothing to unthrottle it: QEMU's own trace (`virtio_serial_throttle_port ... throttle 1`)
//! shows it. The host then connects again: its OPENED is ignored (QEMU still believes the old
//! client is there), the agent's HELLO never leaves the guest, and the transfer's liveness
//! (no session within the stall deadline while the VM runs) leaves and reconnects, which makes
//! QEMU deliver a real close: the port is unthrottled, a session comes, and the stream resumes
//! from the host's offset. Nothing acknowledged is lost; the file arrives whole.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use vport_common::pattern::StreamDigest;
use vport_host::image::initscript::GUEST_STREAM_DIR;
use vport_host::qmp::Qmp;
use vport_host::rig::{vm_config, Rig};
use vport_host::session::{PortServer, Session, SessionError};
use vport_host::stream::to_guest::ToGuest;
use vport_host::stream::to_host::ToHost;
use vport_host::stream::{Control, SessionSource, StreamSide, TransferEvent, TransferOptions};
use vport_host::wait::wait_until;
use vport_tests::{guest_image, TestVm, HELLO_TIMEOUT};

const PORT: &str = "org.vport.pause";
const SIZE: usize = 4 << 20;
/// The liveness deadline of this test: how long a connection may yield no session while the
/// VM runs.
const STALL: Duration = Duration::from_secs(5);
/// QEMU's trace of a port being throttled (QEMU's `log` trace backend, on its stderr).
const THROTTLED: &str = "throttle 1";

/// The server, and the fault: the first time a session is asked for after the VM was stopped,
/// the host leaves (the VM still stopped), resumes the VM with no client, and waits until
/// QEMU's trace shows the port throttled before it connects again.
struct PauseFault {
    server: PortServer,
    qmp: Arc<Qmp>,
    stderr: std::path::PathBuf,
    stopped: Arc<Mutex<Option<Instant>>>,
    injected: bool,
    throttled_after_cont: Option<Duration>,
}

impl SessionSource for PauseFault {
    fn next_session(&mut self, timeout: Duration) -> Result<Session, SessionError> {
        if !self.injected && self.stopped.lock().unwrap().is_some() {
            self.injected = true;
            self.server.disconnect();
            let seen = std::fs::read_to_string(&self.stderr).unwrap_or_default().matches(THROTTLED).count();
            let cont = Instant::now();
            self.qmp.cont().expect("cont");
            let stderr = self.stderr.clone();
            wait_until(
                "QEMU to throttle the port with no client",
                Duration::from_secs(30),
                Duration::from_millis(20),
                || Ok(()),
                || {
                    let now = std::fs::read_to_string(&stderr).unwrap_or_default().matches(THROTTLED).count();
                    (now > seen).then_some(())
                },
            )
            .unwrap_or_else(|e| panic!("the pause bug did not show on this QEMU: {e}"));
            self.throttled_after_cont = Some(cont.elapsed());
        }
        self.server.accept(timeout)
    }
    fn reconnect(&mut self) {
        self.server.disconnect();
    }
    fn vm_paused(&self) -> bool {
        self.server.vm_paused()
    }
}

#[test]
fn a_host_drop_during_a_pause_is_detected_and_recovered_without_loss() {
    let work = tempfile::tempdir().unwrap();
    let args: Vec<String> = ["--log-level", "info", "--stream-dir", GUEST_STREAM_DIR].map(String::from).to_vec();
    let mut cfg = vm_config(guest_image(), &[PORT], &args);
    cfg.extra_args.extend(["-trace".into(), "virtio_serial_throttle_port".into()]);
    let mut vm = TestVm { rig: Rig::launch(cfg).unwrap_or_else(|e| panic!("cannot launch the vm: {e}")) };
    vm.resume();
    let opts = TransferOptions { session_timeout: HELLO_TIMEOUT, stall_timeout: STALL, ..Default::default() };

    let mut data = vec![0u8; SIZE];
    vport_common::pattern::fill(7, 0, &mut data);
    let local = work.path().join("in.bin");
    std::fs::write(&local, &data).unwrap();
    let mut server = vm.rig.port_server(PORT).unwrap();
    ToGuest::new(PORT, &local, "p.bin", opts.clone())
        .unwrap()
        .run(&mut server, &mut |_| Control::Continue)
        .unwrap_or_else(|e| panic!("setup: {e}"));

    let stopped = Arc::new(Mutex::new(None));
    let mut source = PauseFault {
        server,
        qmp: vm.rig.qmp.clone(),
        stderr: vm.rig.vm.stderr_log(),
        stopped: stopped.clone(),
        injected: false,
        throttled_after_cont: None,
    };
    let qmp = vm.rig.qmp.clone();
    let mut reconnects = Vec::new();
    let mut resumed_after_stop = None;
    let mut hook = |e: &TransferEvent| {
        match e {
            TransferEvent::Progress { acked, total } if acked * 4 >= *total && stopped.lock().unwrap().is_none() => {
                eprintln!("e2e: stop at {acked} of {total}");
                qmp.stop().expect("stop");
                *stopped.lock().unwrap() = Some(Instant::now());
            }
            TransferEvent::Reconnecting { waited } => {
                // Liveness may act only while the VM runs.
                reconnects.push((*waited, qmp.query_status().unwrap_or_default()));
            }
            TransferEvent::Accepted { offset, .. } if resumed_after_stop.is_none() => {
                if let Some(t) = *stopped.lock().unwrap() {
                    resumed_after_stop = Some((t.elapsed(), *offset));
                }
            }
            _ => {}
        }
        Control::Continue
    };
    let dest = work.path().join("out.bin");
    let report = ToHost::new(PORT, "p.bin", &dest, opts)
        .unwrap()
        .run(&mut source, &mut hook)
        .unwrap_or_else(|e| panic!("recv: {e}\n{}", vm.rig.failure_context()));
    let mut digest = StreamDigest::new();
    digest.update(&data);
    eprintln!(
        "e2e: throttled {:?} after cont; liveness reconnects {reconnects:?}; stream resumed {:?} after the stop; {} \
         sessions, {} interruptions",
        source.throttled_after_cont, resumed_after_stop, report.sessions, report.interruptions
    );
    assert_eq!((report.bytes, report.digest), (SIZE as u64, digest.digest()));
    assert!(std::fs::read(&dest).unwrap() == data, "the file arrived changed");
    assert!(!reconnects.is_empty(), "the stuck port was recovered without liveness? {report:?}");
    assert!(
        reconnects.iter().all(|(_, state)| state == "running"),
        "liveness acted while the vm was not running: {reconnects:?}"
    );
    let (_, offset) = resumed_after_stop.expect("the stream never resumed after the stop");
    assert!(offset > 0, "the stream started over instead of resuming");
}
