//! A running test rig: one VM started paused, its QMP session, and links to its ports.
//!
//! The VM is started with `-S` so that QMP and the port connections are in place before the
//! guest runs: no `VSERPORT_CHANGE` event and no early byte from the agent can be missed.
//! [`Rig::resume`] then lets the guest boot. Dropping the rig kills QEMU and removes its
//! directory (see [`Vm`]).

use crate::chardev::{connect_unix, ChardevError};
use crate::image::initscript::agent_args_param;
use crate::image::GuestImage;
use crate::link::Link;
use crate::qemu::vm::{PortConfig, PortInfo, Vm, VmConfig, VmError};
use crate::qmp::{Qmp, QmpError};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};
use thiserror::Error;

/// Deadline for QMP commands issued by the rig.
pub const QMP_TIMEOUT: Duration = Duration::from_secs(10);
/// How many console and stderr lines a failure report carries.
pub const CONTEXT_LINES: usize = 30;

/// What went wrong setting up or driving a rig.
#[derive(Debug, Error)]
pub enum RigError {
    /// QEMU could not be started.
    #[error("cannot start the vm")]
    Vm(#[from] VmError),
    /// QMP failed.
    #[error("qmp failed")]
    Qmp(#[from] QmpError),
    /// A port's chardev could not be connected.
    #[error("cannot reach a port")]
    Chardev(#[from] ChardevError),
    /// The VM has no port of that name.
    #[error("the vm has no port named {0}")]
    NoSuchPort(String),
}

/// The VM settings for `image` with `ports`, agent arguments passed on the kernel command line.
pub fn vm_config(image: &GuestImage, ports: &[&str], agent_args: &[String]) -> VmConfig {
    let mut cmdline = image.cmdline.clone();
    if !agent_args.is_empty() {
        cmdline.push(' ');
        cmdline.push_str(&agent_args_param(agent_args));
    }
    let mut cfg = VmConfig::new(&image.kernel, &image.initramfs, cmdline);
    cfg.ports = ports.iter().map(|p| PortConfig::serial(*p)).collect();
    cfg
}

/// A VM with QMP connected.
pub struct Rig {
    /// The QEMU process (killed on drop).
    pub vm: Vm,
    /// The QMP session.
    pub qmp: Qmp,
    resumed_at: Option<Instant>,
}

impl Rig {
    /// Starts QEMU paused with `cfg` and connects QMP.
    pub fn launch(mut cfg: VmConfig) -> Result<Rig, RigError> {
        if !cfg.extra_args.iter().any(|a| a == "-S") {
            cfg.extra_args.push("-S".into());
        }
        let vm = Vm::start(&cfg)?;
        let qmp = Qmp::connect(&vm.qmp_socket(), QMP_TIMEOUT)?;
        Ok(Rig { vm, qmp, resumed_at: None })
    }

    /// The port called `name`.
    pub fn port(&self, name: &str) -> Result<&PortInfo, RigError> {
        self.vm.port(name).ok_or_else(|| RigError::NoSuchPort(name.into()))
    }

    /// Connects a link to port `name`'s chardev.
    pub fn connect(&self, name: &str) -> Result<Link<UnixStream>, RigError> {
        let port = self.port(name)?;
        Ok(Link::new(name, connect_unix(name, &port.socket)?))
    }

    /// Lets the guest run (QMP `cont`) and remembers when.
    pub fn resume(&mut self) -> Result<Instant, RigError> {
        self.qmp.cont()?;
        let now = Instant::now();
        self.resumed_at.get_or_insert(now);
        Ok(now)
    }

    /// When the guest was first resumed.
    pub fn resumed_at(&self) -> Option<Instant> {
        self.resumed_at
    }

    /// The last lines of the guest console and of QEMU's stderr, for failure messages.
    pub fn failure_context(&self) -> String {
        failure_context(&self.vm)
    }
}

/// The last lines of `vm`'s guest console and QEMU stderr, labelled.
pub fn failure_context(vm: &Vm) -> String {
    let status = match vm.check_alive() {
        Ok(()) => "qemu is running".to_string(),
        Err(e) => e,
    };
    format!(
        "{status}\n--- last {n} lines of the guest console ({}) ---\n{}\n--- last {n} lines of qemu stderr ---\n{}",
        vm.console_log().display(),
        vm.console_tail(CONTEXT_LINES).trim_end(),
        vm.stderr_tail(CONTEXT_LINES).trim_end(),
        n = CONTEXT_LINES,
    )
}
