//! The matrix's cells, pure: the axes a user asks for, their product, each cell's name and the
//! arguments its suites run with, and why a cell cannot run (said, never hidden).

use crate::qemu::Accel;
use std::ffi::OsString;
use std::path::{Path, PathBuf};

/// A suite a cell runs, as a child `vport` process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Suite {
    /// `vport run conformance`: every documented behaviour.
    Conformance,
    /// `vport run faults --quick`: each fault 3 times under a two-way acknowledged transfer.
    Faults,
    /// `vport bench --quick`: the figures (a missed goal is a figure, not a failure).
    Bench,
}

impl Suite {
    /// Every suite, in the order a cell runs them.
    pub const ALL: [Suite; 3] = [Suite::Conformance, Suite::Faults, Suite::Bench];

    /// The suite's name (`conformance`).
    pub fn name(self) -> &'static str {
        match self {
            Suite::Conformance => "conformance",
            Suite::Faults => "faults",
            Suite::Bench => "bench",
        }
    }

    /// The suite by its name; `Err` lists the names.
    pub fn from_name(name: &str) -> Result<Suite, String> {
        Suite::ALL
            .into_iter()
            .find(|s| s.name() == name)
            .ok_or_else(|| format!("unknown suite `{name}`: the suites are conformance, faults and bench"))
    }

    /// The `vport` arguments that run the suite, reporting JSON on stdout; its JUnit (where it
    /// writes one) into `dir`.
    pub fn command(self, dir: &Path) -> Vec<OsString> {
        let mut v: Vec<OsString> = match self {
            Suite::Conformance => vec!["run".into(), "conformance".into()],
            Suite::Faults => vec!["run".into(), "faults".into(), "--quick".into()],
            Suite::Bench => vec!["bench".into(), "--quick".into()],
        };
        v.push("--json".into());
        if self != Suite::Bench {
            v.push("--junit".into());
            v.push(dir.join(format!("{}-junit.xml", self.name())).into());
        }
        v
    }
}

/// One QEMU of the matrix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QemuChoice {
    /// Its version (`7.2.22`), or the path's file name when it could not be asked.
    pub label: String,
    /// The binary (`None`: the one on `PATH`).
    pub path: Option<PathBuf>,
}

/// One guest kernel of the matrix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelChoice {
    /// The package's release (`6.12.48+deb12-amd64`), or `cached` for the default one.
    pub label: String,
    /// The `linux-image-*.deb` (`None`: the one in vport's cache).
    pub deb: Option<PathBuf>,
}

impl KernelChoice {
    /// The cached default kernel.
    pub fn cached() -> KernelChoice {
        KernelChoice { label: "cached".into(), deb: None }
    }

    /// A kernel package, labelled by the release in its file name.
    pub fn deb(path: PathBuf) -> KernelChoice {
        KernelChoice { label: kernel_label(&path), deb: Some(path) }
    }
}

/// The release in a kernel package's file name: `linux-image-6.12.48+deb12-amd64_6.12...deb`
/// gives `6.12.48+deb12-amd64`; another name gives its stem.
pub fn kernel_label(deb: &Path) -> String {
    let name = deb.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let stem = name.strip_suffix(".deb").unwrap_or(&name);
    let stem = stem.strip_prefix("linux-image-").unwrap_or(stem);
    stem.split('_').next().unwrap_or(stem).to_string()
}

/// The axes: every combination is a cell.
#[derive(Debug, Clone)]
pub struct Axes {
    /// QEMU binaries.
    pub qemus: Vec<QemuChoice>,
    /// Guest kernels.
    pub kernels: Vec<KernelChoice>,
    /// Machine types ([`crate::qemu::MACHINES`]).
    pub machines: Vec<String>,
    /// vCPU counts.
    pub cpus: Vec<u32>,
    /// Accelerators.
    pub accels: Vec<Accel>,
}

/// One combination of the axes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cell {
    /// The QEMU.
    pub qemu: QemuChoice,
    /// The guest kernel.
    pub kernel: KernelChoice,
    /// The machine type.
    pub machine: String,
    /// vCPUs.
    pub cpus: u32,
    /// The accelerator.
    pub accel: Accel,
}

impl Cell {
    /// A name that is also a directory name: `qemu-7.2.22_linux-cached_pc_1cpu_tcg`.
    pub fn name(&self) -> String {
        let safe = |s: &str| {
            s.chars().map(|c| if c.is_ascii_alphanumeric() || ".-+".contains(c) { c } else { '-' }).collect::<String>()
        };
        format!(
            "qemu-{}_linux-{}_{}_{}cpu_{}",
            safe(&self.qemu.label),
            safe(&self.kernel.label),
            safe(&self.machine),
            self.cpus,
            self.accel.as_str()
        )
    }

    /// The platform arguments every suite of the cell gets.
    pub fn args(&self) -> Vec<OsString> {
        let mut v: Vec<OsString> = vec![
            "--accel".into(),
            self.accel.as_str().into(),
            "--machine".into(),
            self.machine.clone().into(),
            "--cpus".into(),
            self.cpus.to_string().into(),
        ];
        if let Some(q) = &self.qemu.path {
            v.extend(["--qemu".into(), q.clone().into_os_string()]);
        }
        if let Some(d) = &self.kernel.deb {
            v.extend(["--kernel-deb".into(), d.clone().into_os_string()]);
        }
        v
    }

    /// Why the cell cannot run, if it cannot: a machine type vport builds no command line for
    /// (not one of [`crate::qemu::MACHINES`]), or KVM where `kvm` (the probe's verdict for this
    /// cell's QEMU) says it does not run a guest.
    pub fn skip_reason(&self, kvm: &Result<(), String>) -> Option<String> {
        if !crate::qemu::MACHINES.contains(&self.machine.as_str()) {
            return Some(format!(
                "vport builds no command line for machine type {} (it builds {})",
                self.machine,
                crate::qemu::MACHINES.join(", ")
            ));
        }
        match (self.accel, kvm) {
            (Accel::Kvm, Err(why)) => Some(format!("KVM does not run a guest here: {}", first_line(why))),
            _ => None,
        }
    }
}

/// The first line of a probe's account, at most [`REASON_CHARS`] characters: QEMU's KVM errors
/// run to a register dump, which belongs in vport's verdict cache (`<cache>/accel.json`), not in a
/// table.
pub fn first_line(text: &str) -> String {
    let line = text.lines().find(|l| !l.trim().is_empty()).unwrap_or("").trim();
    let more = text.trim().len() > line.len();
    let mut out: String = line.chars().take(REASON_CHARS).collect();
    if more || line.chars().count() > REASON_CHARS {
        out.push_str(" ... (the whole account: <cache>/accel.json)");
    }
    out
}

/// The longest reason a skipped cell shows, in characters.
pub const REASON_CHARS: usize = 300;

/// Every combination of `axes`, QEMU outermost and accelerator innermost.
pub fn cells(axes: &Axes) -> Vec<Cell> {
    let mut out = Vec::new();
    for qemu in &axes.qemus {
        for kernel in &axes.kernels {
            for machine in &axes.machines {
                for &cpus in &axes.cpus {
                    for &accel in &axes.accels {
                        out.push(Cell {
                            qemu: qemu.clone(),
                            kernel: kernel.clone(),
                            machine: machine.clone(),
                            cpus,
                            accel,
                        });
                    }
                }
            }
        }
    }
    out
}

/// How many cells run at once by default: one TCG guest keeps a core busy and its host side
/// wants another, so half the cores, at least one.
pub fn default_jobs(cores: usize) -> usize {
    (cores / 2).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn axes() -> Axes {
        Axes {
            qemus: vec![
                QemuChoice { label: "7.2.22".into(), path: None },
                QemuChoice { label: "10.0.2".into(), path: Some("/c/q10/qemu".into()) },
            ],
            kernels: vec![
                KernelChoice::cached(),
                KernelChoice::deb("/d/linux-image-6.12.48+deb12-amd64_6.12.48-1_amd64.deb".into()),
            ],
            machines: vec!["pc".into(), "q35".into(), "microvm".into()],
            cpus: vec![1, 2],
            accels: vec![Accel::Tcg, Accel::Kvm],
        }
    }

    #[test]
    fn every_combination_is_a_cell_with_a_name_of_its_own() {
        let cells = cells(&axes());
        assert_eq!(cells.len(), 2 * 2 * 3 * 2 * 2);
        let mut names: Vec<String> = cells.iter().map(Cell::name).collect();
        assert_eq!(names[0], "qemu-7.2.22_linux-cached_pc_1cpu_tcg");
        assert!(names.contains(&"qemu-10.0.2_linux-6.12.48+deb12-amd64_q35_2cpu_kvm".to_string()), "{names:?}");
        names.sort();
        names.dedup();
        assert_eq!(names.len(), cells.len());
    }

    #[test]
    fn a_cell_passes_its_platform_to_every_suite() {
        let cell = cells(&axes()).into_iter().find(|c| c.qemu.path.is_some() && c.kernel.deb.is_some()).unwrap();
        let args: Vec<String> = cell.args().iter().map(|a| a.to_string_lossy().into_owned()).collect();
        assert_eq!(
            args,
            [
                "--accel",
                "tcg",
                "--machine",
                "pc",
                "--cpus",
                "1",
                "--qemu",
                "/c/q10/qemu",
                "--kernel-deb",
                "/d/linux-image-6.12.48+deb12-amd64_6.12.48-1_amd64.deb"
            ]
        );
        let conformance: Vec<String> =
            Suite::Conformance.command(Path::new("/o")).iter().map(|a| a.to_string_lossy().into_owned()).collect();
        assert_eq!(conformance, ["run", "conformance", "--json", "--junit", "/o/conformance-junit.xml"]);
        assert_eq!(Suite::Bench.command(Path::new("/o")), ["bench", "--quick", "--json"]);
    }

    #[test]
    fn cells_that_cannot_run_say_why() {
        let all = cells(&axes());
        let kvm_missing = Err("no /dev/kvm".to_string());
        let microvm = all.iter().find(|c| c.machine == "microvm" && c.accel == Accel::Tcg).unwrap();
        assert_eq!(microvm.skip_reason(&kvm_missing), None);
        let isapc = Cell { machine: "isapc".into(), ..microvm.clone() };
        assert_eq!(
            isapc.skip_reason(&Ok(())).unwrap(),
            "vport builds no command line for machine type isapc (it builds pc, q35, microvm)"
        );
        let kvm = all.iter().find(|c| c.accel == Accel::Kvm && c.machine == "pc").unwrap();
        assert_eq!(kvm.skip_reason(&kvm_missing).unwrap(), "KVM does not run a guest here: no /dev/kvm");
        assert_eq!(kvm.skip_reason(&Ok(())), None);
        let tcg = all.iter().find(|c| c.accel == Accel::Tcg && c.machine == "q35").unwrap();
        assert_eq!(tcg.skip_reason(&kvm_missing), None);
    }

    #[test]
    fn a_long_probe_account_is_cut_to_its_first_line() {
        assert_eq!(first_line("no /dev/kvm"), "no /dev/kvm");
        let dump = "kvm kernel probe: vmlinuz did not reach its panic\nKVM internal error. Suberror: 1\nRAX=0";
        assert_eq!(
            first_line(dump),
            "kvm kernel probe: vmlinuz did not reach its panic ... (the whole account: <cache>/accel.json)"
        );
        assert_eq!(first_line(&"x".repeat(400)).chars().filter(|c| *c == 'x').count(), REASON_CHARS);
    }

    #[test]
    fn suites_and_kernels_are_named_as_users_write_them() {
        assert_eq!(Suite::from_name("faults"), Ok(Suite::Faults));
        assert!(Suite::from_name("soak").unwrap_err().contains("conformance, faults and bench"));
        assert_eq!(kernel_label(Path::new("/x/linux-image-6.1.0-57-amd64_6.1.192-3_amd64.deb")), "6.1.0-57-amd64");
        assert_eq!(kernel_label(Path::new("my-kernel.deb")), "my-kernel");
        assert_eq!((default_jobs(1), default_jobs(2), default_jobs(8)), (1, 1, 4));
    }
}
