//! What a VM is to be: its machine, its kernel, its virtio-serial controllers, and its ports
//! with their host ends. Plain data with defaults; [`super::plan`] turns it into QEMU's
//! command line.

use std::ffi::OsString;
use std::path::PathBuf;
use std::time::Duration;

use super::accel::AccelChoice;
use super::args::PortKind;

/// Device id of the virtio-serial controller (its bus is `vser0.0`).
pub const CONTROLLER_ID: &str = "vser0";

/// Device id of controller `i`: [`CONTROLLER_ID`] for 0, `vser<i>` for the extra ones (bus
/// `<id>.0`).
pub fn controller_id(i: usize) -> String {
    format!("vser{i}")
}

/// Which host end a port gets (see [`crate::chardev`] for what each means). Named from vport's
/// side: `UnixClient` means QEMU listens and vport connects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum HostEnd {
    /// QEMU listens on a unix socket in the VM directory (`server=on,wait=off`); vport connects.
    #[default]
    UnixClient,
    /// vport listens on a unix socket in the VM directory (bound before QEMU starts); QEMU
    /// connects with `reconnect=<reconnect_secs>`.
    UnixServer {
        /// QEMU's reconnect interval in seconds (at least 1).
        reconnect_secs: u32,
    },
    /// QEMU listens on a free loopback TCP port (`server=on,wait=off`); vport connects.
    TcpClient,
    /// vport listens on a free loopback TCP port (bound before QEMU starts); QEMU connects with
    /// `reconnect=<reconnect_secs>`.
    TcpServer {
        /// QEMU's reconnect interval in seconds (at least 1).
        reconnect_secs: u32,
    },
    /// `-chardev pty`; vport opens the slave.
    Pty,
}

/// One port to create, and its host end (by default a unix socket QEMU listens on in the VM
/// directory).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortConfig {
    /// Name the guest sees.
    pub name: String,
    /// `virtserialport` or `virtconsole`.
    pub kind: PortKind,
    /// The host end.
    pub host: HostEnd,
    /// Which virtio-serial controller the port sits on: 0 is [`CONTROLLER_ID`], `i > 0` the
    /// `i`-th of [`VmConfig::extra_controllers`] (id [`controller_id`]`(i)`).
    pub controller: usize,
}

impl PortConfig {
    /// A `virtserialport` called `name` whose host end is a unix socket QEMU listens on.
    pub fn serial(name: impl Into<String>) -> Self {
        Self { name: name.into(), kind: PortKind::Serial, host: HostEnd::UnixClient, controller: 0 }
    }

    /// A `virtconsole` port named `name` (the guest's `/dev/hvcN`) on controller 0, its host
    /// end as [`PortConfig::serial`]'s.
    pub fn console(name: impl Into<String>) -> Self {
        Self { kind: PortKind::Console, ..Self::serial(name) }
    }

    /// The same port on controller `controller` (see [`PortConfig::controller`]).
    pub fn on_controller(mut self, controller: usize) -> Self {
        self.controller = controller;
        self
    }

    /// The same port with host end `host`.
    pub fn with_host(mut self, host: HostEnd) -> Self {
        self.host = host;
        self
    }
}

/// Everything needed to start a VM.
#[derive(Debug, Clone)]
pub struct VmConfig {
    /// QEMU binary; `None`: `$VPORT_QEMU`, else `qemu-system-x86_64` on `PATH`.
    pub qemu: Option<PathBuf>,
    /// Kernel image.
    pub kernel: PathBuf,
    /// Initramfs.
    pub initrd: PathBuf,
    /// Kernel command line.
    pub cmdline: String,
    /// Accelerator choice.
    pub accel: AccelChoice,
    /// Machine type (`pc`).
    pub machine: String,
    /// Guest memory in MiB.
    pub memory_mib: u32,
    /// Number of vCPUs.
    pub cpus: u32,
    /// `max_ports` of the virtio-serial controller (`None`: QEMU default, 31).
    pub max_ports: Option<u32>,
    /// Ports, created in order.
    pub ports: Vec<PortConfig>,
    /// Further virtio-serial controllers, each given by its `max_ports` (`None`: QEMU default);
    /// the `i`-th (from 1) gets id [`controller_id`]`(i)`.
    pub extra_controllers: Vec<Option<u32>>,
    /// `-incoming <uri>`: start as a migration destination (for example `exec:cat FILE` or
    /// `unix:PATH`). The ports and controllers must match the source's.
    pub incoming: Option<String>,
    /// Extra raw QEMU arguments appended last.
    pub extra_args: Vec<OsString>,
    /// Whether QEMU gets a second QMP monitor, `qmp-tools.sock` in the VM directory
    /// ([`super::Vm::tools_qmp_socket`]), for other programs while the rig holds the first (a QMP
    /// socket serves one client at a time): `vport boot` has one so that `vport connect` can
    /// ask `query-chardev` whether a port is free.
    pub tools_qmp: bool,
    /// Deadline for QEMU to create its sockets, and again for it to answer on QMP.
    pub startup_timeout: Duration,
    /// Cache directory (for the accelerator verdict).
    pub cache_dir: PathBuf,
}

impl VmConfig {
    /// Defaults: `pc` machine, auto accelerator, 256 MiB, 1 vCPU, no ports, 30 s startup.
    pub fn new(kernel: impl Into<PathBuf>, initrd: impl Into<PathBuf>, cmdline: impl Into<String>) -> Self {
        Self {
            qemu: None,
            kernel: kernel.into(),
            initrd: initrd.into(),
            cmdline: cmdline.into(),
            accel: AccelChoice::Auto,
            machine: "pc".into(),
            memory_mib: 256,
            cpus: 1,
            max_ports: None,
            ports: Vec::new(),
            extra_controllers: Vec::new(),
            incoming: None,
            extra_args: Vec::new(),
            tools_qmp: false,
            startup_timeout: Duration::from_secs(30),
            cache_dir: crate::cache::cache_dir(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_builders_set_one_field_each() {
        let p = PortConfig::serial("a");
        assert_eq!((p.kind, p.host, p.controller), (PortKind::Serial, HostEnd::UnixClient, 0));
        let q = p.clone().on_controller(2).with_host(HostEnd::Pty);
        assert_eq!(q, PortConfig { host: HostEnd::Pty, controller: 2, ..p });
        assert_eq!(controller_id(0), CONTROLLER_ID);
        assert_eq!(controller_id(3), "vser3");
    }
}
