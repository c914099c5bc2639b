//! vport host rig: boots QEMU with a vport guest image, speaks QMP, connects to the
//! virtio-serial chardevs and talks to `vport-agent` over them.
//!
//! Layout: [`image`] builds the guest kernel + initramfs, [`qemu`] builds QEMU command lines
//! and owns the QEMU process, [`qmp`] is the QMP client, [`chardev`] the host end of a port,
//! [`hello`] the first end-to-end handshake.

pub mod cache;
pub mod chardev;
pub mod hello;
pub mod image;
pub mod link;
pub mod qemu;
pub mod qmp;
pub mod registry;
pub mod rig;
pub mod session;
pub mod timeline;
pub mod trace_check;
pub mod wait;
pub mod watch;
