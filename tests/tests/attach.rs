//! Attaching to a VM vport did not start (issue 14, "Reach"): QEMU is booted from a command line
//! written here by hand, not through vport's builder, and the `vport` binary runs against it:
//! `hello --json` with `--socket` and `--qmp`, `hello` without `--qmp` (QEMU's view reported
//! unavailable, not failed), and `watch --json` with `--socket` and `--qmp`, where a guest close
//! shows as a QMP `VSERPORT_CHANGE` and the reopened port as a new session; and `hello --libvirt`
//! with a stand-in `virsh` (`$VPORT_VIRSH`) whose domain XML names the VM's port socket.
//!
//! The binary is `$VPORT_BIN`, or `vport` next to this test's profile directory
//! (`target/debug/vport`: `cargo test --workspace` builds it; alone, `cargo build -p vport-host
//! --bin vport` first).

use serde_json::Value;
use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};
use vport_tests::vport_host::qemu::{self, Accel, AccelChoice};
use vport_tests::vport_host::{cache, wait::wait_until};
use vport_tests::{guest_image, vport_bin, HELLO_TIMEOUT};

const PORT: &str = "org.vport.0";

/// A QEMU started here by hand; killed (and reaped) on drop, whatever the test did.
struct HandQemu {
    child: Child,
    dir: tempfile::TempDir,
}

impl HandQemu {
    /// Boots the guest image with one virtio-serial port `PORT` whose chardev QEMU serves
    /// (`server=on,wait=off`), a QMP monitor, and the console in a file; returns once both sockets
    /// exist.
    fn boot() -> HandQemu {
        let img = guest_image();
        let dir = tempfile::tempdir().expect("temporary directory");
        let d = dir.path();
        let stderr = std::fs::File::create(d.join("qemu.stderr")).expect("stderr file");
        // The accelerator vport itself would use here (KVM only where its probe boots a kernel).
        let qemu_bin = qemu::find_qemu(None).unwrap_or_else(|e| panic!("{e}: run scripts/bootstrap first"));
        let accel = qemu::probe::resolve(AccelChoice::Auto, &qemu_bin, Some(&img.kernel), &cache::cache_dir())
            .unwrap_or_else(|e| panic!("cannot choose an accelerator: {e}"));
        let cpu: &[&str] = if accel == Accel::Kvm { &["-cpu", "host"] } else { &[] };
        let child = Command::new(&qemu_bin)
            .args(["-machine", "q35", "-accel", accel.as_str(), "-m", "256M", "-smp", "1"])
            .args(cpu)
            .args(["-nodefaults", "-no-user-config", "-display", "none", "-no-reboot"])
            .arg("-kernel")
            .arg(&img.kernel)
            .arg("-initrd")
            .arg(&img.initramfs)
            .args(["-append", &img.cmdline])
            .arg("-serial")
            .arg(format!("file:{}", d.join("console.log").display()))
            .args(["-device", "virtio-serial-pci,id=vser0"])
            .arg("-chardev")
            .arg(format!("socket,id=ch0,path={},server=on,wait=off", d.join("port0.sock").display()))
            .args(["-device", &format!("virtserialport,bus=vser0.0,chardev=ch0,id=port0,name={PORT}")])
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", d.join("qmp.sock").display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("cannot start qemu-system-x86_64: run scripts/bootstrap first");
        let mut qemu = HandQemu { child, dir };
        eprintln!("e2e: hand-started qemu pid {} accelerator {accel}", qemu.child.id());
        let (port, qmp) = (qemu.port_socket(), qemu.qmp_socket());
        let mut alive = || qemu.alive();
        wait_until("qemu's sockets", Duration::from_secs(30), Duration::from_millis(20), &mut alive, || {
            (port.exists() && qmp.exists()).then_some(())
        })
        .unwrap_or_else(|e| panic!("{e}"));
        qemu
    }

    fn port_socket(&self) -> PathBuf {
        self.dir.path().join("port0.sock")
    }

    fn qmp_socket(&self) -> PathBuf {
        self.dir.path().join("qmp.sock")
    }

    /// `Err` once QEMU has exited, with its stderr and console tails.
    fn alive(&mut self) -> Result<(), String> {
        match self.child.try_wait() {
            Ok(None) => Ok(()),
            Ok(Some(status)) => Err(format!("qemu exited ({status})\n{}", self.tails())),
            Err(e) => Err(format!("cannot ask whether qemu runs: {e}")),
        }
    }

    fn tails(&self) -> String {
        let read = |f: &str| std::fs::read_to_string(self.dir.path().join(f)).unwrap_or_default();
        let console = read("console.log");
        let tail: Vec<&str> = console.lines().rev().take(30).collect::<Vec<_>>().into_iter().rev().collect();
        format!("--- qemu stderr ---\n{}\n--- console tail ---\n{}", read("qemu.stderr"), tail.join("\n"))
    }
}

impl Drop for HandQemu {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("e2e: test failed; vm state:\n{}", self.tails());
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `vport hello` with `args` against the hand-started VM and returns its output.
fn hello(args: &[&str]) -> Output {
    hello_with(args, &[])
}

/// Like [`hello`], with environment variables `env` set.
fn hello_with(args: &[&str], env: &[(&str, &std::ffi::OsStr)]) -> Output {
    let out = Command::new(vport_bin())
        .envs(env.iter().copied())
        .arg("hello")
        .args(args)
        .args(["--timeout", &HELLO_TIMEOUT.as_secs().to_string()])
        .stdin(Stdio::null())
        .output()
        .expect("cannot run vport");
    eprintln!("e2e: vport hello {args:?}: {}\n{}", out.status, String::from_utf8_lossy(&out.stderr));
    out
}

#[test]
fn hello_and_watch_attach_to_a_vm_started_by_hand() {
    let mut qemu = HandQemu::boot();
    let socket = format!("{PORT}={}", qemu.port_socket().display());
    let qmp = qemu.qmp_socket().display().to_string();

    // hello with QMP: the handshake, and QEMU's view of the port.
    let out = hello(&["--json", "--socket", &socket, "--qmp", &qmp]);
    assert!(out.status.success(), "vport hello --qmp failed: {}", out.status);
    let r: Value = serde_json::from_slice(&out.stdout).expect("hello --json prints one JSON object");
    assert_eq!(r["attached"], true, "{r}");
    assert_eq!(r["port"], PORT, "{r}");
    assert_eq!(r["port_id"], "port0", "the device id is found through QMP: {r}");
    assert_eq!(r["frontend_open"], true, "{r}");
    assert!(r["qemu_version"].as_str().is_some_and(|v| !v.is_empty()), "{r}");
    assert!(r["trace"]["violations"].as_array().is_some_and(|v| v.is_empty()), "{r}");
    assert!(r["ping"]["count"].as_u64().is_some_and(|n| n > 0), "{r}");
    qemu.alive().expect("hello leaves the vm running");

    // hello without QMP: QEMU's view is unavailable, and that is no failure.
    let out = hello(&["--socket", &socket]);
    assert!(out.status.success(), "vport hello without --qmp failed: {}", out.status);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("frontend-open      unavailable (no --qmp)"), "{text}");
    assert!(text.contains("qemu               unavailable (no --qmp)"), "{text}");
    assert!(text.contains("agent              vport-agent "), "{text}");

    // --libvirt: the port found in a domain's XML as `virsh dumpxml` prints it (a stand-in
    // virsh, $VPORT_VIRSH, printing the live XML libvirt would give this VM's channel).
    let virsh = fake_virsh(&qemu);
    let out = hello_with(
        &["--json", "--libvirt", "vm1", "--port", PORT, "--qmp", &qmp],
        &[("VPORT_VIRSH", virsh.as_os_str())],
    );
    assert!(out.status.success(), "vport hello --libvirt failed: {}", out.status);
    let r: Value = serde_json::from_slice(&out.stdout).expect("hello --json prints one JSON object");
    assert_eq!((r["attached"].as_bool(), r["port_id"].as_str()), (Some(true), Some("port0")), "{r}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains(&format!("domain vm1: {PORT} at unix:")), "the channel as the XML gave it: {stderr}");
    let out = hello_with(&["--libvirt", "vm1", "--port", "org.vport.9"], &[("VPORT_VIRSH", virsh.as_os_str())]);
    assert_eq!(out.status.code(), Some(2), "a channel the domain lacks is a usage error");
    assert!(String::from_utf8_lossy(&out.stderr).contains(PORT), "the error lists the domain's channels");

    // watch --json with QMP: a guest close shows as QMP's VSERPORT_CHANGE, the reopen as a new
    // session.
    watch_close_and_reopen(&mut qemu, &socket, &qmp);
    qemu.alive().expect("watch leaves the vm running");
}

/// A stand-in `virsh` in the VM's directory: `virsh dumpxml -- vm1` prints a running domain's
/// XML whose one channel is the VM's port socket (QEMU listening: `mode='bind'`).
fn fake_virsh(qemu: &HandQemu) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let path = qemu.dir.path().join("virsh");
    let xml = format!(
        "<domain type='kvm' id='7'><name>vm1</name><devices>\
         <channel type='unix'><source mode='bind' path='{}'/>\
         <target type='virtio' name='{PORT}' state='connected'/></channel></devices></domain>",
        qemu.port_socket().display()
    );
    let script = format!("#!/bin/sh\n[ \"$1 $2 $3\" = 'dumpxml -- vm1' ] || {{ echo \"error: no domain $3\" >&2; exit 1; }}\ncat <<'EOF'\n{xml}\nEOF\n");
    std::fs::write(&path, script).expect("write the stand-in virsh");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("make it executable");
    path
}

/// Runs `vport watch --json` against the VM, has the agent close the port and reopen it, and
/// checks the timeline on stdout; then quits.
fn watch_close_and_reopen(qemu: &mut HandQemu, socket: &str, qmp: &str) {
    let mut watch = Command::new(vport_bin())
        .args(["watch", "--json", "--socket", socket, "--qmp", qmp])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("cannot run vport watch");
    let stdout = watch.stdout.take().expect("piped stdout");
    let (tx, records) = crossbeam_channel::unbounded::<Value>();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            match serde_json::from_str(&line) {
                Ok(v) => drop(tx.send(v)),
                Err(e) => panic!("watch --json printed a line that is not JSON ({e}): {line}"),
            }
        }
    });
    let mut stdin = watch.stdin.take().expect("piped stdin");
    let mut seen = Vec::new();
    let mut next = |what: &str, pred: &dyn Fn(&Value) -> bool, qemu: &mut HandQemu| -> Value {
        let deadline = Instant::now() + HELLO_TIMEOUT;
        loop {
            if let Err(e) = qemu.alive() {
                panic!("waiting for {what}: {e}");
            }
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(!left.is_zero(), "no {what} on watch's timeline within {HELLO_TIMEOUT:?}; seen: {seen:#?}");
            if let Ok(r) = records.recv_timeout(left.min(Duration::from_millis(500))) {
                seen.push(r.clone());
                if pred(&r) {
                    return r;
                }
            }
        }
    };
    let kind = |r: &Value, k: &str| r["kind"] == k && r["port"] == PORT;
    // QEMU sends at most one VSERPORT_CHANGE per second per port and keeps only the latest
    // within that window: the port stays closed for 2 s so that open=false is not coalesced away.
    let first = next("the first hello_ack", &|r| kind(r, "hello_ack"), qemu);
    writeln!(stdin, "close {PORT} 2000").expect("watch reads commands");
    let closed = next("QMP's VSERPORT_CHANGE open=false", &|r| kind(r, "vserport_change") && r["open"] == false, qemu);
    assert_eq!((closed["source"].as_str(), closed["id"].as_str()), (Some("qmp"), Some("port0")), "{closed}");
    let second = next("the next session's hello_ack", &|r| kind(r, "hello_ack"), qemu);
    assert_ne!(first["session"], second["session"], "a new session after the reopen");
    writeln!(stdin, "quit").expect("watch reads commands");
    drop(stdin);
    let exited = || watch.try_wait().ok().flatten();
    let status =
        wait_until("vport watch to quit", Duration::from_secs(10), Duration::from_millis(20), || qemu.alive(), exited)
            .unwrap_or_else(|e| panic!("{e}"));
    assert!(status.success(), "vport watch ended {status}");
    reader.join().expect("the stdout reader");
}
