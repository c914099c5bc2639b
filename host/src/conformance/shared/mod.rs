//! Group `shared`: everything that fits one boot with two ports the agent serves, the reset
//! last (it reboots the guest).

mod connect;
mod device;
mod state;
mod syscalls;
#[cfg(test)]
mod tests;

use super::case::Case;
use super::group::Group;
use state::Shared;

/// The group's name.
const GROUP_NAME: &str = "shared";

/// The group, its cases in run order.
pub(crate) static GROUP: Group<Shared> = Group {
    name: GROUP_NAME,
    setup: state::setup,
    diagnose: Some(state::diagnose_through_b),
    cases: &[
        Case::new(
            GROUP_NAME,
            "host-connects-before-guest-opens",
            "host client attached before the guest opens (spec 4: connecting too early; protocol.md handshake)",
            "READY, and QEMU shows the port open (the guest saw the host that was there first)",
            connect::host_connects_before_guest_opens,
        ),
        Case::new(
            GROUP_NAME,
            "guest-opens-before-host-connects",
            "open before a host client connects succeeds (port_fops_open)",
            "frontend-open true with no host; READY once the host connects",
            connect::guest_opens_before_host_connects,
        ),
        Case::new(
            GROUP_NAME,
            "guest-open-close-frontend",
            "guest opens/closes -> frontend-open, VSERPORT_CHANGE (set_guest_connected; 1 s throttle)",
            "the session ends AgentBye; close: frontend-open false + VSERPORT_CHANGE open=false; reopen: true + open=true",
            connect::guest_open_close_frontend,
        ),
        Case::new(
            GROUP_NAME,
            "second-open-ebusy",
            "open of a port already open (port_fops_open)",
            "EBUSY",
            syscalls::second_open_ebusy,
        ),
        Case::new(
            GROUP_NAME,
            "lseek-pread-pwrite-espipe",
            "lseek / pread / pwrite (nonseekable_open)",
            "ESPIPE x3",
            syscalls::lseek_pread_pwrite_espipe,
        ),
        Case::new(
            GROUP_NAME,
            "nonblock-read-eagain",
            "read, no data, O_NONBLOCK, host connected (port_fops_read)",
            "-1 EAGAIN",
            syscalls::nonblock_read_eagain,
        ),
        Case::new(
            GROUP_NAME,
            "poll-mask-host-connected",
            "poll, host connected, nothing pending (port_fops_poll)",
            "revents == POLLOUT (0x4) exactly",
            syscalls::poll_mask_host_connected,
        ),
        Case::new(
            GROUP_NAME,
            "sigio-host-disconnect-connect",
            "SIGIO on host connect / disconnect / data (send_sigio_to_port)",
            ">= 2 signals: disconnect and connect (data arrivals add more)",
            syscalls::sigio_host_disconnect_connect,
        ),
        Case::new(
            GROUP_NAME,
            "second-host-client-queued",
            "one client at a time, backlog 1; the second becomes active with what it sent (char-socket.c)",
            "2nd client unserved while the 1st is active; then its queued HELLO_REQUEST and ECHO are served",
            connect::second_host_client_queued,
        ),
        Case::new(
            GROUP_NAME,
            "reopen-fast-cycles",
            "VSERPORT_CHANGE rate limit: one per second per id, latest wins (monitor.c)",
            "frontend-open true at the end; ~1 event/s, last open=true",
            connect::reopen_fast_cycles,
        ),
        Case::new(
            GROUP_NAME,
            "pause-host-disconnect",
            "host disconnects while the VM is paused (spec 4, inferred stale host_connected)",
            "the session ends VmStopped at stop; guest sees the disconnect after cont; a new client reaches READY and traffic flows",
            connect::pause_host_disconnect,
        ),
        Case::new(
            GROUP_NAME,
            "hotplug-add",
            "device_add of a port at run time (PORT_ADD, boot sequence)",
            "the agent takes the port: READY, and QEMU shows it open",
            device::hotplug_add,
        ),
        Case::new(
            GROUP_NAME,
            "hotplug-del-open",
            "device_del of an open port (unplug_port; no QMP event)",
            "DEVICE_DELETED, no VSERPORT_CHANGE, the agent drops the port, the port's session ends Unplugged",
            device::hotplug_del_open,
        ),
        Case::new(
            GROUP_NAME,
            "system-reset",
            "guest reset (open=false for open ports; socket stays connected)",
            "VSERPORT_CHANGE open=false; the session ends GuestReset; new boot id; re-handshake on the same connection",
            device::system_reset,
        ),
    ],
};
