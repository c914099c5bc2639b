//! How to run the suite, and which cases a run selects.

use crate::image::GuestImage;
use crate::qemu::AccelChoice;
use std::path::PathBuf;
use std::time::Duration;

/// How to run the suite.
#[derive(Debug, Clone)]
pub struct SuiteOptions {
    /// The guest image (kernel, initramfs with the agent).
    pub image: GuestImage,
    /// Accelerator choice.
    pub accel: AccelChoice,
    /// Which QEMU, machine type and vCPU count the VMs run on.
    pub platform: crate::qemu::Platform,
    /// Run only cases whose name contains one of these comma-separated strings (and the
    /// groups they are in).
    pub filter: Option<String>,
    /// Run only the cases with exactly these names (with [`SuiteOptions::filter`], both must
    /// select a case). The e2e harness passes the cases its own filter left.
    pub names: Option<Vec<String>>,
    /// Open/close cycles of the REOPEN case (the issue asks for 1000).
    pub reopen_cycles: u32,
    /// Deadline from `cont` to the agent's HELLO (a TCG boot takes 4-8 s; more under load).
    pub hello_timeout: Duration,
    /// Deadline of one request on a live session.
    pub reply_timeout: Duration,
    /// Extra vport-agent arguments (kernel command line), e.g. `--log-level debug`.
    pub agent_args: Vec<String>,
    /// Write each group's life-cycle trace to `<dir>/<group>.jsonl` (docs/trace.md; `vport
    /// trace check` reads it), so the record numbers a verdict names can be looked up.
    pub trace_dir: Option<PathBuf>,
}

impl SuiteOptions {
    /// Defaults: auto accelerator, every case, 1000 cycles, 90 s HELLO and 15 s reply
    /// deadlines, traces kept in memory only.
    pub fn new(image: GuestImage) -> Self {
        SuiteOptions {
            image,
            accel: AccelChoice::Auto,
            platform: Default::default(),
            filter: None,
            names: None,
            reopen_cycles: 1000,
            hello_timeout: Duration::from_secs(90),
            reply_timeout: Duration::from_secs(15),
            agent_args: Vec::new(),
            trace_dir: None,
        }
    }

    /// Whether the run selects the case `name`.
    pub fn selects(&self, name: &str) -> bool {
        filter_selects(self.filter.as_deref(), name)
            && self.names.as_ref().is_none_or(|names| names.iter().any(|n| n == name))
    }
}

/// Whether `filter` (comma-separated parts; `None`: no filter) selects the case `name`: some
/// non-empty part is contained in the name.
pub fn filter_selects(filter: Option<&str>, name: &str) -> bool {
    filter.is_none_or(|f| f.split(',').any(|p| !p.is_empty() && name.contains(p)))
}
