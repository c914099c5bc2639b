//! QEMU: what to run, and running it.
//!
//! Planning, pure and unit-tested (no I/O):
//! - [`config`]: what a VM is to be ([`VmConfig`], its ports and their [`HostEnd`]s);
//! - [`accel`]: the accelerator names ([`AccelChoice`] asked for, [`Accel`] used);
//! - [`args`]: QEMU command-line fragments, one small function each;
//! - [`plan`]: a configuration turned into port ids, sockets, host ends and the command line;
//! - [`machine`]: the machine types and their virtio transport (PCI, or virtio-mmio on `microvm`);
//! - [`platform`]: which QEMU, machine type and vCPU count a suite's VMs run on.
//!
//! Running:
//! - [`binary`]: finding the QEMU binary and its version;
//! - [`tsc`]: the host's TSC rate, which a `microvm` guest under TCG is told;
//! - [`probe`]: the accelerator probe (does KVM really run guest code?), with its cached verdict;
//! - [`vm`]: the QEMU process of a running guest ([`Vm`]: spawn, readiness, pid, wait, kill, logs);
//! - [`cleanup`]: QEMU never outlives vport (the VM directory, the Ctrl-C handler, kill when vport
//!   dies).

pub mod accel;
pub mod args;
pub mod binary;
pub mod cleanup;
pub mod config;
pub mod machine;
pub mod plan;
pub mod platform;
pub mod probe;
pub mod tsc;
pub mod vm;

pub use accel::{Accel, AccelChoice};
pub use args::{ChardevBackend, PortKind, PortSpec};
pub use binary::{
    find_on_path, find_qemu, parse_version, query_version, FindQemuError, QemuVersion, QEMU_BINARY, QEMU_ENV,
};
pub use cleanup::{install_signal_cleanup, interrupted, WorkDir, KEEP_DIR_ENV};
pub use config::{controller_id, HostEnd, PortConfig, VmConfig, CONTROLLER_ID};
pub use machine::{Transport, MACHINES};
pub use plan::{PlanError, PortInfo, TOOLS_QMP_SOCKET};
pub use platform::Platform;
pub use vm::{file_tail, Vm, VmError};
