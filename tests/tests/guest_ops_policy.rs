//! Guest operations are off by default, and when turned on they open virtio-serial port nodes
//! and nothing else, on a real VM: `/etc/passwd`, `/init`, `..` paths, a symlink under
//! `/dev/virtio-ports/`, and port nodes replaced by a symlink or a regular file are all refused.

use std::time::Duration;
use vport_common::message::{error_code, GuestOp};
use vport_host::client::AgentClient;
use vport_host::image::initscript::init_cmd_param;
use vport_host::link::{stat, LinkError};
use vport_tests::{TestVm, REPLY_TIMEOUT};

const CTL: &str = "org.vport.0";
/// A real port the agent does not serve.
const PLAIN: &str = "other.vport.p";
/// A port whose node `/init` replaces with a symlink to `/init`.
const LINKED: &str = "other.vport.lnk";
/// A port whose node `/init` replaces with a regular file (a copy of `/init`).
const REGULAR: &str = "other.vport.reg";

fn denied(r: Result<vport_common::message::GuestOpDone, LinkError>, what: &str) -> String {
    match r {
        Err(LinkError::Agent { code: error_code::DENIED, text, .. }) => text,
        other => panic!("{what}: expected ERROR denied, got {other:?}"),
    }
}

#[test]
fn the_default_agent_refuses_every_guest_op_and_opens_nothing() {
    let mut vm = TestVm::launch(&[CTL, PLAIN]);
    let mut link = vm.connect(CTL);
    vm.resume();
    vm.handshake(&mut link);
    let ops = [
        GuestOp::Open { port: PLAIN.into(), nonblock: true, sigio: false },
        GuestOp::Open { port: "/etc/passwd".into(), nonblock: true, sigio: false },
        GuestOp::Read { handle: 1, bytes: 10, all: false },
        GuestOp::Write { handle: 1, seed: 1, bytes: 10 },
        GuestOp::Poll { handle: 1, events: 1, timeout_ms: 0 },
        GuestOp::Close { handle: 1 },
        GuestOp::Cancel { handle: 1 },
        GuestOp::Debugfs { port: PLAIN.into() },
        GuestOp::Sysfs,
        GuestOp::SigioCount { handle: 1 },
    ];
    for op in ops {
        let what = format!("{op:?}");
        let text = denied(link.guest_op(op, REPLY_TIMEOUT), &what);
        assert!(text.contains("guest ops disabled") && text.contains("--allow-guest-ops"), "{what}: {text}");
    }
    let stats = link.agent_stats(REPLY_TIMEOUT).unwrap();
    assert_eq!(stat(&stats, "guest_ops_allowed"), Some(0));
    assert_eq!(stat(&stats, "refusals"), Some(10));
    // The agent still serves its port.
    assert_eq!(link.echo(b"still here", REPLY_TIMEOUT).unwrap(), b"still here");
    eprintln!("e2e: default agent refused all 10 guest ops with ERROR denied");
}

/// `/init` runs this before the agent: symlinks under /dev/virtio-ports (no udev here), and two
/// port nodes replaced. It waits (bounded, 10 s) for the port names, which arrive from the host
/// after the driver has loaded.
fn tamper_script() -> String {
    format!(
        "i=0; while [ $i -lt 200 ] && [ $(cat /sys/class/virtio-ports/*/name 2>/dev/null | grep -c other.vport) -lt 3 ]; \
         do sleep 0.05; i=$((i+1)); done; \
         mkdir -p /dev/virtio-ports; ln -s /init /dev/virtio-ports/x; ln -s /init /dev/virtio-ports/{PLAIN}; \
         for d in /sys/class/virtio-ports/*; do n=$(cat $d/name); node=/dev/${{d##*/}}; \
         case $n in {LINKED}) rm $node; ln -s /init $node; echo tampered $n $node;; \
         {REGULAR}) rm $node; cp /init $node; echo tampered $n $node;; esac; done"
    )
}

#[test]
fn with_guest_ops_on_only_virtio_port_nodes_are_opened() {
    let mut vm = TestVm::launch_with(
        &[CTL, PLAIN, LINKED, REGULAR],
        &["--allow-guest-ops", "--log-level", "info"],
        &[init_cmd_param(&tamper_script())],
    );
    let mut link = vm.connect(CTL);
    vm.resume();
    vm.handshake(&mut link);
    let console = vm.console_tail(200);
    assert_eq!(console.matches("tampered other.vport.").count(), 2, "the init tampering ran:\n{console}");

    let open = |port: &str| GuestOp::Open { port: port.into(), nonblock: true, sigio: false };
    for port in [
        "/etc/passwd",
        "/init",
        "/proc/self/environ",
        "/dev/virtio-ports/../../etc/passwd",
        "..",
        "../../init",
        "/dev/vport0p1/../../init",
    ] {
        let text = denied(link.guest_op(open(port), REPLY_TIMEOUT), port);
        eprintln!("e2e: OPEN {port:?} refused: {text}");
    }
    // A node replaced by a symlink or a regular file is refused before it is opened.
    for port in [LINKED, REGULAR] {
        let text = denied(link.guest_op(open(port), REPLY_TIMEOUT), port);
        assert!(text.contains("is not the virtio-ports device"), "{port}: {text}");
        eprintln!("e2e: OPEN {port} refused: {text}");
    }
    // A symlink under /dev/virtio-ports is never followed: an unknown name is not found...
    let d = link.guest_op(open("/dev/virtio-ports/x"), REPLY_TIMEOUT).unwrap();
    assert_eq!((d.ret, d.errno), (-1, nix::libc::ENOENT), "{d:?}");
    // ...and a port's name opens that port's node, whatever the symlink of that name says.
    let d = link.guest_op(open(&format!("/dev/virtio-ports/{PLAIN}")), REPLY_TIMEOUT).unwrap();
    let path = String::from_utf8_lossy(&d.data).to_string();
    assert!(d.ret > 0 && path.starts_with("/dev/vport"), "{d:?} ({path})");
    link.guest_op(GuestOp::Close { handle: d.ret as u32 }, REPLY_TIMEOUT).unwrap();
    // DEBUGFS takes port references only, too.
    denied(link.guest_op(GuestOp::Debugfs { port: "/etc/passwd".into() }, REPLY_TIMEOUT), "debugfs");
    let d = link.guest_op(GuestOp::Debugfs { port: PLAIN.into() }, Duration::from_secs(10)).unwrap();
    assert!(d.ret > 0 && String::from_utf8_lossy(&d.data).contains("name: other.vport.p"), "{d:?}");

    let stats = link.agent_stats(REPLY_TIMEOUT).unwrap();
    assert_eq!(stat(&stats, "guest_ops_allowed"), Some(1));
    assert_eq!(stat(&stats, "refusals"), Some(10));
    eprintln!("e2e: {PLAIN} opened as {path}; 10 references refused");
}
