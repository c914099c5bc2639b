//! Fuzz target `qmp`: see `vport_fuzz::qmp` for the input format and the properties checked.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| vport_fuzz::qmp::run(data));
