//! SIGTERM: the agent says BYE on every port with a session before it exits, so a host learns
//! of the shutdown in band.
//!
//! The trigger is event-driven: a guest script watches the port's debugfs `bytes_received` and
//! terminates the agent once the host has sent a 4 KiB "go" ECHO after the handshake.

use std::time::{Duration, Instant};
use vport_common::message::NO_REOPEN;
use vport_common::Message;
use vport_host::image::initscript::{init_cmd_param, AGENT_EXITED};
use vport_host::rig::{vm_config, Rig};
use vport_tests::{guest_image, TestVm, REPLY_TIMEOUT};

const PORT: &str = "org.vport.0";
const GO_BYTES: usize = 4096;

#[test]
fn sigterm_sends_bye_then_the_agent_exits_cleanly() {
    let mut cfg = vm_config(guest_image(), &[PORT], &[]);
    let script = format!(
        "(d=/sys/kernel/debug/virtio-ports/vport0p1; \
         until [ -r $d ] && [ $(busybox sed -n 's/^bytes_received: //p' $d) -ge {GO_BYTES} ]; do busybox sleep 0.05; done; \
         echo terminating-the-agent; busybox kill -TERM $(busybox pidof vport-agent)) &"
    );
    cfg.cmdline.push(' ');
    cfg.cmdline.push_str(&init_cmd_param(&script));
    let mut vm = TestVm { rig: Rig::launch(cfg).unwrap_or_else(|e| panic!("cannot launch the vm: {e}")) };
    let mut link = vm.connect(PORT);
    vm.resume();
    let hs = vm.handshake(&mut link);

    link.send(&Message::Echo(vec![0x5A; GO_BYTES])).unwrap();
    let sent = Instant::now();
    let deadline = sent + Duration::from_secs(30);
    let bye = loop {
        let r =
            link.recv(deadline, "BYE after SIGTERM").unwrap_or_else(|e| panic!("{e}\n{}", vm.rig.failure_context()));
        if let Ok(m @ Message::Bye { .. }) = r.message {
            assert_eq!(r.frame.header.session, hs.session, "BYE is sent in the live session");
            break m;
        }
    };
    eprintln!("e2e: {bye:?} {:?} after the go signal", sent.elapsed());
    assert_eq!(bye, Message::Bye { reopen_after_ms: NO_REOPEN, reason: "shutdown".into() });
    let status = vm.rig.vm.wait_exit(REPLY_TIMEOUT).unwrap_or_else(|e| panic!("{e}\n{}", vm.rig.failure_context()));
    assert!(status.success(), "qemu: {status}");
    let console = vm.console_tail(50);
    assert!(console.contains("terminating-the-agent"), "{console}");
    assert!(console.contains(&format!("{AGENT_EXITED}0")), "SIGTERM is a clean exit (status 0):\n{console}");
}
