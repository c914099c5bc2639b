//! `vport run matrix`: the suites (conformance, `faults --quick`, `bench --quick`) once per
//! platform cell, every combination of QEMU binary, guest kernel, machine type, vCPU count and
//! accelerator; JUnit per cell and one summary table (docs/ci.md).
//!
//! - [`plan`]: the axes, their cells, each cell's arguments and why a cell cannot run (pure);
//! - [`run`]: each suite as a child `vport` process with its cell's platform, cells in
//!   parallel bounded by the cores, every suite under a deadline;
//! - [`summary`]: the results as a table, JSON and JUnit, with the conformance cases whose
//!   verdict differs between cells, and the exit code.

pub mod plan;
pub mod run;
pub mod summary;

pub use plan::{cells, Axes, Cell, KernelChoice, QemuChoice, Suite};
pub use run::{CellResult, Outcome, RunOptions, SuiteResult};
