//! The spine: a real VM boots, the real agent answers over a real virtio-serial port, and
//! QEMU's view (QMP) agrees that the guest opened the port.

use std::time::{Duration, Instant};
use vport_common::frame::MAGIC;
use vport_tests::vport_host::client::AgentClient;
use vport_tests::{TestVm, REPLY_TIMEOUT};

const PORT: &str = "org.vport.0";

#[test]
fn agent_handshakes_pings_and_echoes_over_a_real_port() {
    let mut vm = TestVm::launch(&[PORT]);
    let mut link = vm.connect(PORT);
    vm.resume();
    let started = Instant::now();
    let hs = vm.handshake(&mut link);
    eprintln!(
        "e2e: HELLO from vport-agent {} on {} (kernel {}, session {:#x}) {} ms after cont",
        hs.hello.agent_version,
        hs.hello.port_name,
        hs.hello.kernel_release,
        hs.session,
        started.elapsed().as_millis()
    );
    assert_eq!(hs.hello.port_name, PORT);
    assert_ne!(hs.session, 0, "a session id of 0 means 'no session'");
    assert!(hs.hello.kernel_release.starts_with("6."), "guest kernel {}", hs.hello.kernel_release);
    assert_eq!(hs.hello.boot_id.len(), 36, "boot id {:?}", hs.hello.boot_id);

    let origin = Instant::now();
    let mut last_agent_time = 0;
    for i in 0..5u64 {
        let t = origin.elapsed().as_nanos() as u64 + i;
        let p = link.ping(REPLY_TIMEOUT, t).unwrap_or_else(|e| panic!("ping {i}: {e}\n{}", vm.rig.failure_context()));
        assert!(p.agent_time_ns > last_agent_time, "the agent's monotonic clock must advance");
        last_agent_time = p.agent_time_ns;
        eprintln!("e2e: ping {i} round trip {:?}", p.rtt);
    }

    // Payloads that look like frames must pass through untouched.
    let mut tricky = MAGIC.to_vec();
    tricky.extend_from_slice(&[1, 0x10, 0, 0]);
    tricky.extend((0..70_000u32).map(|i| (i * 31 % 251) as u8));
    let back = link.echo(&tricky, REPLY_TIMEOUT).unwrap_or_else(|e| panic!("echo: {e}\n{}", vm.rig.failure_context()));
    assert_eq!(back.len(), tricky.len());
    assert!(back == tricky, "echo payload differs");
}

#[test]
fn qemu_sees_the_guest_open_the_port() {
    let mut vm = TestVm::launch(&[PORT]);
    let port = vm.rig.port(PORT).unwrap().clone();
    assert_eq!(
        vm.rig.qmp.frontend_open(&port.chardev_id).unwrap(),
        Some(false),
        "before the guest runs, nobody has the port open"
    );
    let mut link = vm.connect(PORT);
    vm.resume();
    vm.handshake(&mut link);
    // The agent opened the port before it could send HELLO: QEMU has emitted the event.
    let (ev, others) =
        vm.rig.qmp.wait_event(Duration::from_secs(5), |e| e.vserport_change() == Some((port.id.as_str(), true)));
    assert!(ev.is_some(), "no VSERPORT_CHANGE open=true for {}; other events: {others:?}", port.id);
    assert_eq!(vm.rig.qmp.frontend_open(&port.chardev_id).unwrap(), Some(true), "query-chardev frontend-open");
}
