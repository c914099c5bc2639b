//! `vport boot`: a VM kept running, registered for `vport connect`, until Ctrl-C or until
//! QEMU exits; and what every command that keeps a VM up reports when QEMU goes away.

use super::image::{prepare, ImageChoice};
use super::{stdout_err, CommandError, Progress};
use crate::image::GuestImage;
use crate::qemu::{AccelChoice, VmConfig};
use crate::registry;
use crate::rig::{vm_config, Rig};
use std::io::Write;
use std::time::Duration;

/// The VM's settings (`--accel`, `--memory`, `--cpus`, and the agent's arguments).
#[derive(Debug, Clone)]
pub struct VmSettings {
    /// Accelerator choice.
    pub accel: AccelChoice,
    /// QEMU machine type (`pc`, `q35`).
    pub machine: String,
    /// Guest memory, MiB.
    pub memory_mib: u32,
    /// vCPUs.
    pub cpus: u32,
    /// vport-agent's arguments (kernel command line).
    pub agent_args: Vec<String>,
}

impl VmSettings {
    /// The VM configuration for `img` with virtio-serial ports `ports`.
    pub fn vm_config(&self, img: &GuestImage, ports: &[String]) -> VmConfig {
        let names: Vec<&str> = ports.iter().map(String::as_str).collect();
        let mut cfg = vm_config(img, &names, &self.agent_args);
        cfg.accel = self.accel;
        cfg.machine.clone_from(&self.machine);
        cfg.memory_mib = self.memory_mib;
        cfg.cpus = self.cpus;
        cfg
    }
}

/// What `vport boot` is asked for.
#[derive(Debug, Clone)]
pub struct BootCommand {
    /// The image.
    pub image: ImageChoice,
    /// The VM.
    pub vm: VmSettings,
    /// The ports to create.
    pub ports: Vec<String>,
    /// Print the VM description as JSON.
    pub json: bool,
}

/// `vport boot`: boots, registers, prints how to reach each port, then prints QMP events on
/// stderr until QEMU exits (an error: [`qemu_gone`]). Ctrl-C is the signal handler's.
pub fn boot(cmd: &BootCommand, out: &mut dyn Write, progress: &Progress) -> Result<(), CommandError> {
    crate::usage::check_port_names(&cmd.ports)?;
    let img = prepare(&cmd.image, progress)?;
    let mut cfg = cmd.vm.vm_config(&img, &cmd.ports);
    cfg.tools_qmp = true;
    progress.say("starting qemu");
    let mut rig = Rig::launch(cfg).map_err(|source| CommandError::Rig { what: "cannot boot the vm", source })?;
    rig.resume().map_err(|source| CommandError::Rig { what: "cannot start the guest", source })?;
    let entry = registry::VmEntry::of(&rig.vm);
    let _registration = registry::register(&registry::registry_dir(), &entry)?;
    let accel = rig.vm.accel().to_string();
    if cmd.json {
        writeln!(out, "{}", entry.to_json(&accel)).map_err(stdout_err)?;
    } else {
        write!(out, "{}", entry.render_text(&accel)).map_err(stdout_err)?;
    }
    out.flush().map_err(stdout_err)?;
    // Print QMP events until QEMU exits (the event channel closes with the QMP socket).
    // Ctrl-C is handled by the signal handler: it kills QEMU and exits 130.
    while let Ok(ev) = rig.qmp.events().recv() {
        eprintln!("vport: qmp event {} {}", ev.name, ev.data);
    }
    qemu_gone(&rig)
}

/// QEMU went away while a command kept the VM up: leave the exit to the Ctrl-C handler if that
/// is why (it exits 130), else report how QEMU ended and what the guest said last.
pub fn qemu_gone(rig: &Rig) -> Result<(), CommandError> {
    if crate::qemu::interrupted() {
        // The handler killed QEMU and is about to exit the process; do not race it with our own
        // exit code.
        loop {
            std::thread::park();
        }
    }
    let status = rig.vm.wait_exit(Duration::from_secs(10))?;
    Err(CommandError::CheckFailed(format!("qemu exited ({status})\n{}", rig.failure_context())))
}
