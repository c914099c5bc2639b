//! Helpers shared by the `vport` command-line tests.

#![allow(dead_code)] // each test crate uses its own subset

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

/// The `vport` binary under test, with `VPORT_LOG` unset.
pub fn vport() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_vport"));
    c.env_remove("VPORT_LOG");
    c
}

/// The static agent (`scripts/build-agent`'s output or `VPORT_AGENT`).
pub fn agent() -> PathBuf {
    vport_host::image::resolve_agent(None).unwrap_or_else(|e| panic!("{e}: run scripts/build-agent first"))
}

/// A child process killed when the test ends, however it ends (a panicking test must not leave
/// a `vport boot` and its QEMU running).
pub struct KillOnDrop(pub std::process::Child);

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

/// A command's exit status and both streams, for assertion messages.
pub fn show(o: &Output) -> String {
    format!(
        "status {:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Starts `vport boot --json <extra>` registering in `runtime` (its `XDG_RUNTIME_DIR`) and
/// returns it with the VM description it prints once QEMU runs.
pub fn boot(runtime: &Path, extra: &[&str]) -> (KillOnDrop, serde_json::Value) {
    let mut boot = KillOnDrop(
        vport()
            .args(["boot", "--json"])
            .args(extra)
            .env("VPORT_AGENT", agent())
            .env("XDG_RUNTIME_DIR", runtime)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap(),
    );
    let mut line = String::new();
    BufReader::new(boot.0.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let info = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line:?}"));
    (boot, info)
}

/// Starts `vport connect <port>` against the VMs registered in `runtime`, with stdin and stdout
/// piped.
pub fn spawn_connect(runtime: &Path, port: &str) -> KillOnDrop {
    KillOnDrop(
        vport()
            .args(["connect", port])
            .env("XDG_RUNTIME_DIR", runtime)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap(),
    )
}
