//! Fuzz target `trace`: see `vport_fuzz::trace` for the input format and the properties checked.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| vport_fuzz::trace::run(data));
