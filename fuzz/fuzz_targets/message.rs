//! Fuzz target `message`: see `vport_fuzz::message` for the input format and the properties checked.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| vport_fuzz::message::run(data));
