//! The guest image boots on a real VM: `/init` loads the virtio modules, the ports get their
//! names in sysfs, agent arguments reach the agent, and an agent that exits powers the guest off.

use std::time::{Duration, Instant};
use vport_host::image::initscript::{agent_args_param, init_cmd_param, AGENT_EXITED, MODULES_LOADED};
use vport_host::qemu::{PortConfig, Vm, VmConfig};
use vport_host::rig::failure_context;
use vport_host::wait::wait_until;
use vport_tests::guest_image;

const BOOT_TIMEOUT: Duration = Duration::from_secs(90);

fn boot(extra_cmdline: &[String]) -> Vm {
    let img = guest_image();
    let cmdline =
        std::iter::once(img.cmdline.clone()).chain(extra_cmdline.iter().cloned()).collect::<Vec<_>>().join(" ");
    let mut cfg = VmConfig::new(&img.kernel, &img.initramfs, cmdline);
    cfg.ports = vec![PortConfig::serial("org.vport.a"), PortConfig::serial("org.vport.b")];
    Vm::start(&cfg).unwrap_or_else(|e| panic!("cannot start the vm: {:#}", anyhow::Error::new(e)))
}

fn wait_console(vm: &Vm, what: &str, timeout: Duration) {
    wait_until(
        what,
        timeout,
        Duration::from_millis(50),
        || vm.check_alive(),
        || vm.console_tail(400).contains(what).then_some(()),
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", failure_context(vm)));
}

#[test]
fn init_loads_modules_and_the_ports_get_their_names() {
    let started = Instant::now();
    let vm = boot(&[
        init_cmd_param(
            "for p in /sys/class/virtio-ports/*; do echo \"sysfs: ${p##*/} $(cat $p/name)\"; done; echo init-cmd-done",
        ),
        agent_args_param(&["--log-level", "debug"]),
    ]);
    wait_console(&vm, MODULES_LOADED, BOOT_TIMEOUT);
    eprintln!("e2e: {MODULES_LOADED} after {:?} ({})", started.elapsed(), vm.accel());
    wait_console(&vm, "init-cmd-done", BOOT_TIMEOUT);
    let console = vm.console_tail(400);
    // Port 0 of the controller is reserved for a console, so the ports are p1 and p2.
    assert!(console.contains("sysfs: vport0p1 org.vport.a"), "{}", failure_context(&vm));
    assert!(console.contains("sysfs: vport0p2 org.vport.b"), "{}", failure_context(&vm));
    wait_console(&vm, "starting vport-agent --log-level debug", BOOT_TIMEOUT);
}

#[test]
fn an_exiting_agent_is_reported_and_powers_the_guest_off() {
    // The agent refuses a console path it cannot serve as a vport and exits 1.
    let vm = boot(&[agent_args_param(&["--port", "/dev/hvc0"])]);
    wait_console(&vm, &format!("{AGENT_EXITED}1"), BOOT_TIMEOUT);
    let status = vm.wait_exit(Duration::from_secs(30)).unwrap_or_else(|e| panic!("{e}\n{}", failure_context(&vm)));
    assert!(status.success(), "poweroff -f with -no-reboot makes qemu exit 0, got {status}");
}
