//! Least privilege on a real VM: the agent runs as its own uid/gid (as the packaged systemd
//! unit runs it), finds its port before the node is given to its group (root:root 0600, what
//! devtmpfs makes), and takes the port as soon as `/init` grants it, the way the packaged udev
//! rule does: no retry timer, no uevent, only the inotify watch on the node's directory.

use vport_host::client::AgentClient;
use vport_host::image::initscript::{unprivileged_params, Grant, AGENT_WAITING_FOR_PERMISSIONS, GRANTED};
use vport_host::link::stat;
use vport_tests::{TestVm, REPLY_TIMEOUT};

const PORT: &str = "org.vport.0";
const UID: u32 = 900;
const GID: u32 = 901;

#[test]
fn an_unprivileged_agent_serves_a_port_granted_after_it_started() {
    let mut vm = TestVm::launch_with(&[PORT], &["--log-level", "info"], &unprivileged_params(UID, GID, Grant::Late));
    let mut link = vm.connect(PORT);
    vm.resume();
    let hs = vm.handshake(&mut link);
    let console = vm.console_tail(300);
    let waiting = console.find(AGENT_WAITING_FOR_PERMISSIONS);
    let granted = console.find(GRANTED);
    let (Some(waiting), Some(granted)) = (waiting, granted) else {
        panic!("expected the agent to wait for the port's permissions, then /init to grant it:\n{console}");
    };
    assert!(waiting < granted, "the grant came after the agent found the port inaccessible:\n{console}");
    assert!(console.contains("Permission denied") || console.contains("EACCES"), "{console}");

    let stats = link.agent_stats(REPLY_TIMEOUT).unwrap();
    assert_eq!(stat(&stats, "euid"), Some(u64::from(UID)), "the agent runs as uid {UID}");
    assert_eq!(stat(&stats, "egid"), Some(u64::from(GID)));
    assert_eq!(link.echo(b"unprivileged", REPLY_TIMEOUT).unwrap(), b"unprivileged");
    let wakeups = stat(&stats, "wakeups").unwrap();
    eprintln!(
        "e2e: agent uid {UID} gid {GID}: waited for the grant, then served session {:#x} after {} HELLO_REQUEST(s); \
         {wakeups} wakeups since it started",
        hs.session, hs.requests_sent
    );
    // A retry timer would show here; the watch costs a wakeup only when the node changes. The
    // count covers the whole boot (uevents, the handshake): a 100 ms poller over the ~5 s
    // boot alone would add 50.
    assert!(wakeups < 40, "{wakeups} wakeups");
}
