//! The checks behind vport's fuzz targets, one module per target.
//!
//! Each module has `run(data)`, which interprets the fuzz input, drives the code under test and
//! asserts its documented properties: a failed assertion *is* the finding, so these functions
//! panic (assert, `expect`) on purpose. Each module starts with an **adapter** section: the few
//! lines that touch the API under test, so a change of that API (a new error variant, a new
//! constructor argument) is one small edit there.
//!
//! The targets in `fuzz_targets/` only call `run`; `tests/corpus.rs` replays the committed
//! corpus through the same functions on the stable toolchain; `examples/capture.rs` writes the
//! corpus seeds from a real VM (see `README.md`).

use std::sync::OnceLock;

pub mod agent_port;
pub mod decoder;
pub mod input;
pub mod message;
pub mod qmp;
pub mod trace;

/// Whether the check named `name` is switched off by `VPORT_FUZZ_ALLOW` (a comma-separated list
/// of check names, shown in brackets in their failure messages). For a finding that is known and
/// reported, so a long run can look for others meanwhile; unset, every check is on.
pub fn allowed(name: &str) -> bool {
    static ALLOW: OnceLock<Vec<String>> = OnceLock::new();
    ALLOW
        .get_or_init(|| {
            std::env::var("VPORT_FUZZ_ALLOW")
                .map(|v| v.split(',').map(|s| s.trim().to_string()).filter(|s| !s.is_empty()).collect())
                .unwrap_or_default()
        })
        .iter()
        .any(|a| a == name)
}
