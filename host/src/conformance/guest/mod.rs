//! Group `guest`: what an ordinary guest program sees. The agent's guest ops (real `open`,
//! `read`, `write`, `poll`, `close` in the guest, on ports the agent does not serve) are
//! driven over the agent's control port, while the host connects, writes and leaves on the
//! target ports' host ends (plain byte streams).

mod calls;
mod data;
mod program;
mod state;

use super::case::Case;
use super::group::Group;
use state::GuestGroup;

/// The group's name.
const GROUP_NAME: &str = "guest";

/// The group, its cases in run order.
pub(crate) static GROUP: Group<GuestGroup> = Group {
    name: GROUP_NAME,
    setup: state::setup,
    diagnose: None,
    cases: &[
        Case::new(
            GROUP_NAME,
            "sysfs-name-appears",
            "/sys/class/virtio-ports/vportNpM/name set from PORT_NAME (add_port, handle_control_message)",
            "every configured name listed, each with its node",
            calls::sysfs_name_appears,
        ),
        Case::new(
            GROUP_NAME,
            "virtconsole-vport-enxio",
            "open a virtconsole port through its vport node (port_fops_open)",
            "-1 ENXIO",
            calls::virtconsole_vport_enxio,
        ),
        Case::new(
            GROUP_NAME,
            "read-no-host-returns-0",
            "read, no data, no host client (port_fops_read)",
            "returns 0 at once (not EOF: 'host not connected')",
            calls::read_no_host_returns_0,
        ),
        Case::new(
            GROUP_NAME,
            "poll-mask-no-host",
            "poll with no host client (port_fops_poll: read would not block, write would)",
            "revents == POLLIN|POLLHUP (0x11) exactly",
            calls::poll_mask_no_host,
        ),
        Case::new(
            GROUP_NAME,
            "nonblock-write-no-host-eagain",
            "O_NONBLOCK write with no host client (wait_port_writable)",
            "-1 EAGAIN, nothing written",
            calls::nonblock_write_no_host_eagain,
        ),
        Case::new(
            GROUP_NAME,
            "write-no-host-blocks-10b",
            "blocking write with no host client (wait_port_writable, will_write_block)",
            "blocks; completes when a host connects; 10 bytes intact",
            calls::write_no_host_blocks_10b,
        ),
        Case::new(
            GROUP_NAME,
            "write-no-host-blocks-64mib",
            "the same with 64 MiB (32 KiB per call, short writes)",
            "blocks; completes when a host connects; 64 MiB intact",
            calls::write_no_host_blocks_64mib,
        ),
        Case::new(
            GROUP_NAME,
            "blocking-read-returns-on-host-write",
            "blocking read, host connected, no data (port_fops_read waits)",
            "blocks; returns the host's 100 bytes when it writes",
            calls::blocking_read_returns_on_host_write,
        ),
        Case::new(
            GROUP_NAME,
            "poll-masks-host-connected",
            "poll, host connected (port_fops_poll)",
            "POLLOUT (0x4) idle; POLLIN|POLLOUT (0x5) with data pending; 0x4 after reading it",
            calls::poll_masks_host_connected,
        ),
        Case::new(
            GROUP_NAME,
            "poll-mask-host-closed-unread",
            "host disconnects with data unread; read after disconnect (port_fops_poll, port_fops_read)",
            "POLLIN|POLLHUP (0x11); the data is read first, then 0; 0x11 after",
            calls::poll_mask_host_closed_unread,
        ),
        Case::new(
            GROUP_NAME,
            "host-writes-before-guest-opens",
            "host data while the guest has the port closed (QEMU reads only when guest_connected)",
            "delivered intact after the open",
            data::host_writes_before_guest_opens,
        ),
        Case::new(
            GROUP_NAME,
            "close-discards-unread",
            "close with unread host data (port_fops_release, discard_port_data)",
            "debugfs bytes_discarded grows by the unread bytes",
            data::close_discards_unread,
        ),
        Case::new(
            GROUP_NAME,
            "debugfs-counters",
            "debugfs virtio-ports/vportNpM (debugfs_show)",
            "bytes_sent / bytes_received grow by exactly what moved; flags right",
            data::debugfs_counters,
        ),
        Case::new(
            GROUP_NAME,
            "guest-to-host-loss-on-disconnect",
            "host disconnects with guest data queued (virtio_serial_close, discard_vq_data)",
            "the loss is measured: one hole, everything after it intact",
            data::guest_to_host_loss_on_disconnect,
        ),
        Case::new(
            GROUP_NAME,
            "sigio-data-and-unplug",
            "SIGIO on a plain O_ASYNC fd (send_sigio_to_port)",
            "a signal on host connect, on data arrival and on unplug",
            data::sigio_data_and_unplug,
        ),
    ],
};
