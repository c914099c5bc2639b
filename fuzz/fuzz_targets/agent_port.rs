//! Fuzz target `agent_port`: see `vport_fuzz::agent_port` for the input format and the properties checked.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| vport_fuzz::agent_port::run(data));
