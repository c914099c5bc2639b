//! The platform a suite's VMs run on: which QEMU, which machine type, how many vCPUs. Every
//! suite (conformance, faults, bench, soak) takes one, so the same suite runs unchanged on each
//! cell of a matrix (`vport run matrix`).

use super::VmConfig;
#[cfg(doc)]
use super::MACHINES;
use std::path::PathBuf;

/// Where a suite's VMs run. A field left `None` keeps the suite's own choice: QEMU found as
/// [`super::find_qemu`] finds it (`VPORT_QEMU`, then `PATH`), the `pc` machine, the suite's
/// vCPU count (one, except where a suite measures its own counts).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Platform {
    /// The QEMU binary.
    pub qemu: Option<PathBuf>,
    /// The machine type, one of [`MACHINES`].
    pub machine: Option<String>,
    /// vCPUs of the suite's VMs.
    pub cpus: Option<u32>,
}

impl Platform {
    /// Sets what this platform names on `cfg`, leaving the rest as the suite made it. Called
    /// before a suite's own settings for the VM at hand (a VM that measures a vCPU count sets
    /// its own after).
    pub fn apply(&self, cfg: &mut VmConfig) {
        if let Some(qemu) = &self.qemu {
            cfg.qemu = Some(qemu.clone());
        }
        if let Some(machine) = &self.machine {
            cfg.machine = machine.clone();
        }
        if let Some(cpus) = self.cpus {
            cfg.cpus = cpus;
        }
    }

    /// `QEMU <path>, q35, 2 vCPUs`: what differs from the defaults, for reports; `default` when
    /// nothing does.
    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        if let Some(q) = &self.qemu {
            parts.push(format!("QEMU {}", q.display()));
        }
        if let Some(m) = &self.machine {
            parts.push(m.clone());
        }
        if let Some(c) = self.cpus {
            parts.push(format!("{c} vCPU{}", if c == 1 { "" } else { "s" }));
        }
        if parts.is_empty() {
            "default".into()
        } else {
            parts.join(", ")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_platform_sets_only_what_it_names() {
        let mut cfg = VmConfig::new("k", "i", "c");
        cfg.cpus = 3;
        Platform::default().apply(&mut cfg);
        assert_eq!((cfg.qemu.clone(), cfg.machine.as_str(), cfg.cpus), (None, "pc", 3));
        let p = Platform { qemu: Some("/q/qemu".into()), machine: Some("q35".into()), cpus: Some(2) };
        p.apply(&mut cfg);
        assert_eq!((cfg.qemu, cfg.machine.as_str(), cfg.cpus), (Some(PathBuf::from("/q/qemu")), "q35", 2));
        assert_eq!(p.describe(), "QEMU /q/qemu, q35, 2 vCPUs");
        assert_eq!(Platform::default().describe(), "default");
        assert_eq!(Platform { cpus: Some(1), ..Default::default() }.describe(), "1 vCPU");
    }
}
