//! EBUSY at start and console ports, on a real VM.
//!
//! Another guest process holds `/dev/vport0p1` for 4 s before the agent starts: the agent backs
//! off, serves the port once it is free, and reports the EBUSY it met in STATS. The same VM has
//! a virtconsole (`/dev/hvc0`) the agent serves in raw mode with the same protocol.

use std::time::Instant;
use vport_host::client::AgentClient;
use vport_host::image::initscript::init_cmd_param;
use vport_host::link::stat;
use vport_host::qemu::{PortConfig, PortKind};
use vport_host::rig::{vm_config, Rig};
use vport_tests::{guest_image, TestVm, REPLY_TIMEOUT};

const PORT: &str = "org.vport.0";
const CONSOLE: &str = "con.vport";

#[test]
fn ebusy_at_start_is_backed_off_and_reported_and_a_console_is_served() {
    let args: Vec<String> = ["--port", "/dev/hvc0", "--prefix", "org.vport."].iter().map(|s| s.to_string()).collect();
    let mut cfg = vm_config(guest_image(), &[PORT], &args);
    cfg.ports.push(PortConfig { kind: PortKind::Console, ..PortConfig::serial(CONSOLE) });
    cfg.cmdline.push(' ');
    cfg.cmdline.push_str(&init_cmd_param("(exec 3<>/dev/vport0p1; echo holder-has-the-port; sleep 4) &"));
    let mut vm = TestVm { rig: Rig::launch(cfg).unwrap_or_else(|e| panic!("cannot launch the vm: {e}")) };
    let mut link = vm.connect(PORT);
    let mut console = vm.connect(CONSOLE);
    vm.resume();
    let started = Instant::now();
    let hs = vm.handshake(&mut link);
    eprintln!("e2e: port served {:?} after cont (HELLO_REQUESTs sent: {})", started.elapsed(), hs.requests_sent);
    assert!(vm.console_tail(200).contains("holder-has-the-port"), "{}", vm.rig.failure_context());
    let stats = link.agent_stats(REPLY_TIMEOUT).unwrap();
    let (ebusy, total) = (stat(&stats, "ebusy").unwrap(), stat(&stats, "ebusy_total").unwrap());
    eprintln!("e2e: STATS ebusy={ebusy} ebusy_total={total}");
    assert!(ebusy > 0, "the agent met EBUSY at start: {stats:?}");
    assert!(total >= ebusy);
    // Bounded exponential back-off: 100 ms doubling to 5 s, so a 4 s hold costs a handful.
    assert!(ebusy <= 8, "{ebusy} EBUSY retries for a 4 s hold: not backing off");
    assert!(vm.console_tail(200).contains("is busy (open elsewhere); retrying in"), "EBUSY is logged");

    // The console port: same protocol, raw mode (bytes pass unchanged both ways).
    let chs = vm.handshake(&mut console);
    assert_eq!(chs.hello.port_name, "/dev/hvc0");
    let mut tricky: Vec<u8> = (0..=255u8).collect();
    tricky.extend_from_slice(b"\r\n\x03\x04\x1a\x11\x13");
    let back = console
        .echo(&tricky, REPLY_TIMEOUT)
        .unwrap_or_else(|e| panic!("console echo: {e}\n{}", vm.rig.failure_context()));
    assert_eq!(back, tricky, "raw mode: every byte value passes unchanged");
    let cstats = console.agent_stats(REPLY_TIMEOUT).unwrap();
    assert_eq!(stat(&cstats, "ports_open"), Some(2));
    eprintln!("e2e: console {} served, echo of {} bytes ok", chs.hello.port_name, tricky.len());
}
