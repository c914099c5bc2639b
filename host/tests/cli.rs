//! `vport` command-line behaviour: exit codes and error messages for the failures a user meets
//! first. The silent-agent case boots a real VM.

use std::path::PathBuf;
use std::process::{Command, Output};

fn vport() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_vport"));
    c.env_remove("VPORT_LOG");
    c
}

fn agent() -> PathBuf {
    vport_host::image::resolve_agent(None).unwrap_or_else(|e| panic!("{e}: run scripts/build-agent first"))
}

/// A child process killed when the test ends, however it ends (a panicking test must not leave
/// a `vport boot` and its QEMU running).
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            // SIGINT lets `vport boot` kill its QEMU first.
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(self.0.id() as i32),
                nix::sys::signal::Signal::SIGINT,
            );
            let _ = self.0.wait();
        }
    }
}

fn show(o: &Output) -> String {
    format!(
        "status {:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn help_documents_the_exit_codes() {
    let o = vport().args(["hello", "--help"]).output().unwrap();
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", show(&o));
    for needle in ["Exit codes:", "infrastructure failure", "--accel", "--json", "--timeout"] {
        assert!(text.contains(needle), "hello --help lacks {needle:?}:\n{text}");
    }
}

#[test]
fn missing_qemu_is_an_infrastructure_failure_that_says_what_to_install() {
    let empty = tempfile::tempdir().unwrap();
    let o = vport()
        .args(["hello", "--accel", "tcg"])
        .env("PATH", empty.path())
        .env("VPORT_AGENT", agent())
        .env_remove("VPORT_QEMU")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(3), "{}", show(&o));
    assert!(err.contains("qemu-system-x86_64 not found"), "{}", show(&o));
    assert!(err.contains("qemu-system-x86"), "names the package: {}", show(&o));
}

#[test]
fn no_kernel_is_an_infrastructure_failure_that_says_what_to_do() {
    // An empty cache and no apt-get on PATH: nothing can provide a kernel.
    let cache = tempfile::tempdir().unwrap();
    let empty = tempfile::tempdir().unwrap();
    let o = vport()
        .args(["hello"])
        .env("PATH", empty.path())
        .env("VPORT_CACHE_DIR", cache.path())
        .env("VPORT_AGENT", agent())
        .env_remove("VPORT_KERNEL")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(3), "{}", show(&o));
    assert!(err.contains("--kernel"), "suggests --kernel: {}", show(&o));
    assert!(err.contains("scripts/bootstrap"), "suggests scripts/bootstrap: {}", show(&o));
}

#[test]
fn a_missing_kernel_file_is_named() {
    let o = vport().args(["hello", "--kernel", "/nonexistent/bzImage"]).env("VPORT_AGENT", agent()).output().unwrap();
    assert_eq!(o.status.code(), Some(3), "{}", show(&o));
    assert!(String::from_utf8_lossy(&o.stderr).contains("/nonexistent/bzImage"), "{}", show(&o));
}

#[test]
fn bad_arguments_are_usage_errors() {
    let o = vport().args(["hello", "--accel", "warp"]).output().unwrap();
    assert_eq!(o.status.code(), Some(2), "{}", show(&o));
    assert!(String::from_utf8_lossy(&o.stderr).contains("warp"), "{}", show(&o));
}

/// Boots a real VM whose only port has a name the agent does not serve by default, so no HELLO
/// ever comes: `vport hello` must fail with exit 1, say what it waited for, and show the
/// guest console.
#[test]
fn a_silent_agent_fails_with_the_deadline_and_the_console() {
    let o = vport()
        .args(["hello", "--port", "com.example.not-vport", "--timeout", "20"])
        .env("VPORT_AGENT", agent())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{}", show(&o));
    assert!(err.contains("no HELLO from vport-agent within"), "{}", show(&o));
    assert!(err.contains("guest console"), "{}", show(&o));
    assert!(err.contains("vport-init: modules loaded"), "the console tail shows the boot: {}", show(&o));
}

/// `vport boot` keeps a VM up and registers it; `vport connect PORT` finds it by name and
/// bridges the port: the agent's HELLO arrives on stdout, a HELLO_ACK and a PING written to
/// stdin get a PONG back. Ctrl-C on `vport boot` exits 130 and leaves no QEMU behind.
#[test]
fn boot_then_connect_bridges_the_port_to_stdio() {
    use std::io::{BufRead, BufReader, Read, Write};
    use std::process::Stdio;
    use std::time::{Duration, Instant};
    use vport_common::{Decoder, Message};

    let runtime = tempfile::tempdir().unwrap();
    let mut boot = KillOnDrop(
        vport()
            .args(["boot", "--json", "--agent-log-level", "debug"])
            .env("VPORT_AGENT", agent())
            .env("XDG_RUNTIME_DIR", runtime.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap(),
    );
    let mut line = String::new();
    BufReader::new(boot.0.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let info: serde_json::Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line:?}"));
    let qemu_pid = info["pid"].as_u64().unwrap();
    assert_eq!(info["ports"][0]["name"], "org.vport.0", "{info}");

    let mut connect = KillOnDrop(
        vport()
            .args(["connect", "org.vport.0"])
            .env("XDG_RUNTIME_DIR", runtime.path())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let (tx, rx) = crossbeam_channel::unbounded();
    let mut out = connect.0.stdout.take().unwrap();
    std::thread::spawn(move || {
        let mut d = Decoder::default();
        let mut buf = [0u8; 4096];
        while let Ok(n) = out.read(&mut buf) {
            if n == 0 {
                break;
            }
            d.push(&buf[..n]);
            while let Some(Ok(f)) = d.next_frame() {
                let _ = tx.send(f);
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    let hello = loop {
        let f = rx.recv_deadline(deadline).unwrap_or_else(|_| {
            let console = std::fs::read_to_string(info["console_log"].as_str().unwrap_or_default()).unwrap_or_default();
            panic!("no HELLO through vport connect within 60 s; guest console:\n{console}")
        });
        if let Ok(Message::Hello(h)) = Message::from_frame(&f) {
            break (f.header.session, h);
        }
    };
    let mut stdin = connect.0.stdin.take().unwrap();
    let ack = Message::HelloAck { nonce: hello.1.nonce, host_version: "cli-test".into() };
    stdin.write_all(&ack.to_frame(hello.0, 0).unwrap().encode().unwrap()).unwrap();
    stdin.write_all(&Message::Ping { time_ns: 99 }.to_frame(hello.0, 1).unwrap().encode().unwrap()).unwrap();
    let pong = loop {
        let f = rx.recv_deadline(Instant::now() + Duration::from_secs(10)).expect("no PONG through vport connect");
        if let Ok(m @ Message::Pong { .. }) = Message::from_frame(&f) {
            break m;
        }
    };
    assert!(matches!(pong, Message::Pong { ping_time_ns: 99, .. }), "{pong:?}");

    // End of input half-closes; QEMU drops the client and the bridge ends by itself.
    drop(stdin);
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(s) = connect.0.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "vport connect did not end after its input closed");
        std::thread::park_timeout(Duration::from_millis(20));
    };
    assert!(status.success(), "vport connect: {status}");

    nix::sys::signal::kill(nix::unistd::Pid::from_raw(boot.0.id() as i32), nix::sys::signal::Signal::SIGINT).unwrap();
    let status = boot.0.wait().unwrap();
    assert_eq!(status.code(), Some(130), "vport boot after Ctrl-C");
    assert!(!std::path::Path::new(&format!("/proc/{qemu_pid}")).exists(), "qemu {qemu_pid} survived Ctrl-C");
}
