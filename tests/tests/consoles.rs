//! Consoles discovered like serial ports (`vport-agent --consoles`), on a VM with three
//! serial ports and three virtconsoles at once: a READY session on each (the consoles' HELLOs
//! name three distinct `/dev/hvcN`, which is how the host learns the mapping the guest cannot
//! see), then a console hot-plugged gets a session on the next free hvc line, its unplug makes
//! the agent forget it (its tty is hung up), and a console plugged after that reuses the line.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};
use vport_common::Message;
use vport_host::logwatch::{wait_for_line, LogTail};
use vport_host::qemu::{PortConfig, PortKind};
use vport_host::rig::{vm_config, Rig};
use vport_tests::{guest_image, TestVm, REPLY_TIMEOUT};

const SERIALS: [&str; 3] = ["org.vport.s0", "org.vport.s1", "org.vport.s2"];
const CONSOLES: [&str; 3] = ["org.vport.c0", "org.vport.c1", "org.vport.c2"];

fn console(name: &str) -> PortConfig {
    let mut p = PortConfig::serial(name);
    p.kind = PortKind::Console;
    p
}

/// One ECHO round trip on `link`'s session.
fn echo(vm: &TestVm, link: &mut vport_host::link::Link<std::os::unix::net::UnixStream>, what: &str) {
    let marker = format!("echo-{what}").into_bytes();
    link.send(&Message::Echo(marker.clone())).unwrap();
    loop {
        let r = link
            .recv(Instant::now() + REPLY_TIMEOUT, "ECHO_REPLY")
            .unwrap_or_else(|e| panic!("{what}: {e}\n{}", vm.rig.failure_context()));
        match r.message {
            Ok(Message::EchoReply(b)) => {
                assert_eq!(b, marker, "{what}: echo reply");
                return;
            }
            Ok(Message::Hello(_)) => {}
            other => panic!("{what}: unexpected {other:?}"),
        }
    }
}

#[test]
fn many_serial_ports_and_consoles_at_once_and_a_console_hot_plugged_and_unplugged() {
    let args = vec!["--consoles".to_string()];
    let mut cfg = vm_config(guest_image(), &[], &args);
    cfg.ports = SERIALS.iter().map(|s| PortConfig::serial(*s)).chain(CONSOLES.iter().map(|c| console(c))).collect();
    let rig = Rig::launch(cfg).unwrap_or_else(|e| panic!("cannot launch the vm: {:#}", anyhow::Error::new(e)));
    eprintln!("e2e: qemu pid {} accelerator {}", rig.vm.pid(), rig.vm.accel());
    let mut vm = TestVm { rig };
    let mut log = LogTail::from_end(&vm.rig.vm.console_log()).unwrap();
    let mut links: BTreeMap<&str, _> = SERIALS.iter().chain(&CONSOLES).map(|p| (*p, vm.connect(p))).collect();
    let started = Instant::now();
    vm.resume();

    let mut lines = BTreeMap::new();
    for (name, link) in &mut links {
        let hs = vm.handshake(link);
        if SERIALS.contains(name) {
            assert_eq!(hs.hello.port_name, *name, "a serial port's HELLO names the port");
        } else {
            assert!(hs.hello.port_name.starts_with("/dev/hvc"), "{name}: HELLO names {:?}", hs.hello.port_name);
            lines.insert(hs.hello.port_name.clone(), *name);
        }
        echo(&vm, link, name);
    }
    eprintln!("e2e: {} sessions READY {:?} after resume; console lines {lines:?}", links.len(), started.elapsed());
    let expected: Vec<String> = (0..3).map(|i| format!("/dev/hvc{i}")).collect();
    assert_eq!(lines.keys().cloned().collect::<Vec<_>>(), expected, "each console on its own hvc line");

    // Hot-plug a console: the next free line.
    let hot = "org.vport.c3";
    vm.rig.hotplug_port(hot, PortKind::Console, 0).unwrap();
    let mut link = vm.connect(hot);
    let hs = vm.handshake(&mut link);
    assert_eq!(hs.hello.port_name, "/dev/hvc3", "the hot-plugged console");
    echo(&vm, &mut link, hot);

    // Unplug it: the agent forgets it (its tty is hung up).
    let info = vm.rig.port(hot).unwrap().clone();
    let events = vm.rig.qmp.subscribe();
    vm.rig.qmp.device_del(&info.id).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let ev = events
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .unwrap_or_else(|_| panic!("no DEVICE_DELETED for {}\n{}", info.id, vm.rig.failure_context()));
        if ev.name == "DEVICE_DELETED" && ev.data.get("device").and_then(|d| d.as_str()) == Some(info.id.as_str()) {
            break;
        }
    }
    wait_for_line(&mut log, "port /dev/hvc3 (hvc3): closed (unplugged)", Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("{e}\n{}", vm.rig.failure_context()));
    drop(link);

    // A console plugged after that takes the freed line and is served again.
    let again = "org.vport.c4";
    vm.rig.hotplug_port(again, PortKind::Console, 0).unwrap();
    let mut link = vm.connect(again);
    let hs = vm.handshake(&mut link);
    assert_eq!(hs.hello.port_name, "/dev/hvc3", "the freed line");
    echo(&vm, &mut link, again);
    // The first sessions are unaffected.
    for (name, link) in &mut links {
        echo(&vm, link, name);
    }
    eprintln!("e2e: done {:?} after resume", started.elapsed());
}

/// Without `--consoles` the agent opens no console: a prefix-matching virtconsole is only
/// logged (its `vportNpM` node answers ENXIO), while the serial port beside it is served.
#[test]
fn without_the_flag_no_console_is_opened() {
    let cfg = {
        let mut cfg = vm_config(guest_image(), &[], &[]);
        cfg.ports = vec![PortConfig::serial(SERIALS[0]), console(CONSOLES[0])];
        cfg
    };
    let rig = Rig::launch(cfg).unwrap_or_else(|e| panic!("cannot launch the vm: {:#}", anyhow::Error::new(e)));
    let mut vm = TestVm { rig };
    let mut log = LogTail::from_end(&vm.rig.vm.console_log()).unwrap();
    let mut link = vm.connect(SERIALS[0]);
    vm.resume();
    vm.handshake(&mut link);
    // The start-up scan logs the console port before it ends; an hvc open would come in the
    // same scan.
    wait_for_line(
        &mut log,
        "a virtconsole port (or one just unplugged); a console is served only as",
        Duration::from_secs(30),
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", vm.rig.failure_context()));
    let text = std::fs::read_to_string(vm.rig.vm.console_log()).unwrap();
    assert!(!text.contains("opened /dev/hvc"), "an hvc line was opened without --consoles:\n{text}");
}
