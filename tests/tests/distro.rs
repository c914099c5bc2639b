//! A real distribution guest (issue 14, Deliver 2): Debian bookworm with systemd and udev on a
//! disk image, the agent installed from its `.deb` with `dpkg -i`
//! ([`vport_host::image::distro`]), booted under TCG (KVM where it works). The test checks that
//! the package was installed with its maintainer scripts, that systemd started the packaged
//! unit at boot, that the agent runs as a dynamic (non-root) user with group `vport`, that udev
//! gave the port node to that group, and that `vport hello` attached to the VM (`--socket`,
//! `--qmp`) handshakes with it. Of the conformance cases, the ones that need no guest operation
//! (the packaged unit does not allow them) and no VM of vport's own are checked here: QEMU's
//! view of the open port, and a guest close and reopen seen through QMP (`VSERPORT_CHANGE`)
//! and in band (BYE, then a new HELLO on the same connection).
//!
//! Ignored by a plain `cargo test`: it needs root, `mmdebstrap` and the network for the first
//! build of the image (cached afterwards), and the agent's `.deb`. `scripts/test-distro`
//! provides them and runs it.

use std::ops::RangeInclusive;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use vport_host::client::AgentClient;
use vport_host::image::distro::{self, init, DistroImage, DistroRequest};
use vport_host::link::stat;
use vport_host::rig::Rig;
use vport_host::wait::wait_until;
use vport_tests::{vport_bin, TestVm, REPLY_TIMEOUT};

const PORT: &str = "org.vport.0";
/// The uids systemd gives `DynamicUser=yes` services (systemd.exec(5)): an agent with one of
/// these was started by systemd from the packaged unit, not by hand or by the busybox image.
const DYNAMIC_UIDS: RangeInclusive<u64> = 61184..=65519;
/// Deadline from `cont` to the agent's HELLO, and to the report unit's last line: systemd's
/// boot under TCG (13 to 18 s here), with room for a loaded CI machine.
const BOOT_TIMEOUT: Duration = Duration::from_secs(240);

/// Builds the Debian guest image, or takes it from the cache.
fn distro_image() -> DistroImage {
    let _ = env_logger::builder().is_test(true).try_init();
    let deb = distro::resolve_agent_deb(None).unwrap_or_else(|e| panic!("{e}"));
    let t = Instant::now();
    let img = distro::build(&DistroRequest::new(deb), &mut |m| eprintln!("distro image: {m}"))
        .unwrap_or_else(|e| panic!("cannot build the Debian guest image: {:#}", anyhow::Error::new(e)));
    eprintln!(
        "e2e: Debian guest image {} ({} in {:.1} s; kernel {}, initramfs modules {})",
        img.dir.display(),
        if img.fresh { "built" } else { "from the cache" },
        t.elapsed().as_secs_f64(),
        img.kernel_release,
        img.modules.join(" ")
    );
    img
}

/// The whole guest console so far.
fn console(vm: &TestVm) -> String {
    std::fs::read_to_string(vm.rig.vm.console_log()).unwrap_or_default()
}

/// Runs `vport hello --json` attached to the VM's port and QMP, waiting for it with a deadline
/// while QEMU runs; returns its JSON report.
fn hello_attached(vm: &TestVm) -> serde_json::Value {
    let port = vm.rig.port(PORT).unwrap_or_else(|e| panic!("{e}"));
    let socket = format!("{PORT}={}", port.socket.display());
    let qmp = vm.rig.vm.tools_qmp_socket().expect("the VM has a second QMP monitor (tools_qmp)");
    let out_dir = tempfile::tempdir().expect("a temporary directory");
    let (out_path, err_path) = (out_dir.path().join("stdout"), out_dir.path().join("stderr"));
    let file = |p: &std::path::Path| std::fs::File::create(p).expect("an output file");
    let mut child = Command::new(vport_bin())
        .args(["hello", "--json", "--socket", &socket, "--qmp"])
        .arg(&qmp)
        .args(["--timeout", &BOOT_TIMEOUT.as_secs().to_string()])
        .stdin(Stdio::null())
        .stdout(file(&out_path))
        .stderr(file(&err_path))
        .spawn()
        .expect("cannot run vport");
    let waited = wait_until(
        "vport hello to finish",
        BOOT_TIMEOUT + Duration::from_secs(30),
        Duration::from_millis(50),
        || vm.rig.vm.check_alive(),
        || child.try_wait().ok().flatten(),
    );
    let stderr = std::fs::read_to_string(&err_path).unwrap_or_default();
    let status = match waited {
        Ok(s) => s,
        Err(e) => {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{e}; vport hello said:\n{stderr}");
        }
    };
    eprintln!("e2e: vport hello --socket {socket} --qmp {}: {status}\n{stderr}", qmp.display());
    assert!(status.success(), "vport hello failed ({status})");
    let stdout = std::fs::read_to_string(&out_path).unwrap_or_default();
    serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("hello --json printed no JSON object ({e}): {stdout}"))
}

/// The value of `key=` in the report line that starts with `prefix` (the unit's properties).
fn property<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    line.split(' ').find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
}

#[test]
#[ignore = "needs root, mmdebstrap, the network (first build) and the agent's .deb: run scripts/test-distro"]
fn the_packaged_agent_comes_up_under_systemd_as_an_unprivileged_user() {
    let img = distro_image();

    // The package went in with dpkg, and its maintainer scripts ran.
    let build_log = std::fs::read_to_string(&img.build_log).expect("the image's build log");
    for line in [
        "Setting up vport-agent",
        "Creating group 'vport'",
        "Created symlink /etc/systemd/system/multi-user.target.wants/vport-agent.service",
    ] {
        assert!(build_log.contains(line), "{} has no '{line}':\n{build_log}", img.build_log.display());
    }

    let mut cfg = img.vm_config(&[PORT]);
    cfg.tools_qmp = true;
    let rig = Rig::launch(cfg).unwrap_or_else(|e| panic!("cannot launch the vm: {:#}", anyhow::Error::new(e)));
    let mut vm = TestVm { rig };
    eprintln!("e2e: qemu pid {} accelerator {}", vm.rig.vm.pid(), vm.rig.vm.accel());
    let events = vm.rig.qmp.subscribe();
    let booted = Instant::now();
    vm.resume();

    // vport hello, attached as to any VM: the handshake, QEMU's view, and who the agent runs as.
    let r = hello_attached(&vm);
    eprintln!("e2e: boot to the end of vport hello: {:.1} s", booted.elapsed().as_secs_f64());
    assert_eq!((r["attached"].as_bool(), r["port"].as_str()), (Some(true), Some(PORT)), "{r}");
    assert_eq!(r["frontend_open"], true, "QEMU shows the port open: {r}");
    assert_eq!(r["kernel_release"].as_str(), Some(img.kernel_release.as_str()), "{r}");
    assert!(r["trace"]["violations"].as_array().is_some_and(|v| v.is_empty()), "{r}");
    let uid = r["agent_uid"].as_u64().unwrap_or_else(|| panic!("hello reports no agent uid: {r}"));
    let gid = r["agent_gid"].as_u64().unwrap_or_else(|| panic!("hello reports no agent gid: {r}"));
    assert!(DYNAMIC_UIDS.contains(&uid), "the agent runs as uid {uid}, not a systemd dynamic user");

    // Our own session: the agent's pid, to match it with systemd's and the journal's.
    let mut link = vm.connect(PORT);
    vm.handshake(&mut link);
    let stats = link.agent_stats(REPLY_TIMEOUT).unwrap_or_else(|e| panic!("STATS: {e}"));
    assert_eq!((stat(&stats, "euid"), stat(&stats, "egid")), (Some(uid), Some(gid)));
    let pid = stat(&stats, "pid").expect("STATS has the agent's pid");

    // The report unit: what systemd and udev did, from inside the guest.
    wait_until(
        "the report unit's last line",
        BOOT_TIMEOUT,
        Duration::from_millis(100),
        || vm.rig.vm.check_alive(),
        || console(&vm).contains(init::REPORT_DONE).then_some(()),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let text = console(&vm);
    let report: Vec<&str> = text.lines().filter_map(|l| l.split_once(init::REPORT_PREFIX).map(|(_, r)| r)).collect();
    eprintln!("e2e: the report unit said:\n  {}", report.join("\n  "));
    let find = |start: &str| {
        report
            .iter()
            .find(|l| l.starts_with(start))
            .copied()
            .unwrap_or_else(|| panic!("no '{start}' line in {report:#?}"))
    };
    let node = find(&format!("port {PORT} node "));
    assert!(node.ends_with("owner root group vport mode 660"), "udev's rule gives the node to group vport: {node}");
    let link_line = find(&format!("port {PORT} link "));
    assert!(link_line.contains("-> ../vport"), "systemd's rule makes the by-name link: {link_line}");
    let unit = find("unit vport-agent.service ");
    assert_eq!(property(unit, "ActiveState"), Some("active"), "{unit}");
    assert_eq!(property(unit, "DynamicUser"), Some("yes"), "{unit}");
    assert_eq!(property(unit, "SupplementaryGroups"), Some("vport"), "{unit}");
    assert_eq!(
        property(unit, "FragmentPath"),
        Some("/lib/systemd/system/vport-agent.service"),
        "from the package: {unit}"
    );
    let agent = find(&format!("agent pid {pid} "));
    assert!(agent.contains(&format!("Uid: {uid} {uid} {uid} {uid}")), "{agent}");
    let group = find("group vport:x:");
    let vport_gid = group.trim_start_matches("group vport:x:").trim_end_matches(':').to_string();
    assert!(agent.contains(&format!("Groups: {vport_gid}")), "the agent has group vport ({vport_gid}): {agent}");
    let package = find("package ");
    assert!(package.starts_with("package vport-agent ") && package.ends_with(" install ok installed"), "{package}");

    // systemd started the unit, and the agent's own start line (in the journal, forwarded to the
    // console) names the same process and ids.
    assert!(text.contains("systemd[1]: Started vport-agent.service"), "systemd's journal line for the unit");
    let started = text
        .lines()
        .find(|l| l.contains(&format!("vport-agent[{pid}]:")) && l.contains(" started: "))
        .unwrap_or_else(|| panic!("no start line of vport-agent[{pid}] on the console"));
    assert!(started.contains(&format!("uid {uid} gid {gid}")), "{started}");
    let waited =
        text.lines().any(|l| l.contains(&format!("vport-agent[{pid}]:")) && l.contains("waiting for its permissions"));
    eprintln!("e2e: agent pid {pid} uid {uid} gid {gid} (group vport {vport_gid}); waited for udev's grant: {waited}");

    // A guest close and reopen under the unit's sandbox: BYE, VSERPORT_CHANGE open=false, then
    // (2 s later) open=true and a new HELLO on the same connection.
    let port = vm.rig.port(PORT).unwrap_or_else(|e| panic!("{e}")).clone();
    // Only what follows the CLOSE counts (the boot's events are long past).
    while events.try_recv().is_ok() {}
    let bye = link.close(2000, REPLY_TIMEOUT).unwrap_or_else(|e| panic!("CLOSE: {e}"));
    eprintln!("e2e: CLOSE 2000 ms answered with {bye:?}");
    let vserport = |open: bool| {
        wait_until(
            &format!("VSERPORT_CHANGE open={open} for {}", port.id),
            Duration::from_secs(10),
            Duration::from_millis(20),
            || vm.rig.vm.check_alive(),
            || events.try_iter().find(|e| e.vserport_change() == Some((port.id.as_str(), open))).map(|_| ()),
        )
        .unwrap_or_else(|e| panic!("{e}"))
    };
    vserport(false);
    let again = vm.handshake(&mut link);
    vserport(true);
    assert_eq!(vm.rig.qmp.frontend_open(&port.chardev_id).ok().flatten(), Some(true));
    eprintln!("e2e: reopened: new session {:#x} on the same connection", again.session);
}
