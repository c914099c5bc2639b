//! `vport run soak` interrupted: Ctrl-C in the middle of its cycles exits 130 and leaves no
//! QEMU process and no temporary directory (the VM's or the soak's own).

mod common;

use common::{agent, vport, KillOnDrop};
use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::time::Duration;

/// The processes whose command line mentions `needle`.
fn processes_mentioning(needle: &str) -> Vec<u32> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else { continue };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else { continue };
        if String::from_utf8_lossy(&cmdline).contains(needle) {
            found.push(pid);
        }
    }
    found
}

#[test]
fn an_interrupted_soak_leaves_no_qemu_and_no_directory() {
    let tmp = tempfile::tempdir().unwrap();
    let tmp_path = tmp.path().to_str().unwrap().to_owned();
    let mut soak = KillOnDrop(
        vport()
            .args(["run", "soak", "--reconnects", "1000000"])
            .env("VPORT_AGENT", agent())
            .env("TMPDIR", tmp.path())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    // Wait (with a deadline) for the first progress report of the reconnect cycles.
    let (tx, rx) = crossbeam_channel::unbounded();
    let stderr = soak.0.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut seen = Vec::new();
    loop {
        match rx.recv_timeout(Duration::from_secs(180)) {
            Ok(line) if line.contains("host-reconnects: ") => break,
            Ok(line) => seen.push(line),
            Err(e) => panic!("no progress of the reconnect cycles ({e}); stderr so far:\n{}", seen.join("\n")),
        }
    }
    let qemu = processes_mentioning(&tmp_path);
    assert!(!qemu.is_empty(), "the soak's QEMU runs with its directory under {tmp_path}");
    let dirs: Vec<_> = std::fs::read_dir(tmp.path()).unwrap().flatten().map(|e| e.file_name()).collect();
    assert!(dirs.len() >= 2, "a VM directory and the soak's work directory: {dirs:?}");

    nix::sys::signal::kill(nix::unistd::Pid::from_raw(soak.0.id() as i32), nix::sys::signal::Signal::SIGINT).unwrap();
    let status = soak.0.wait().unwrap();
    assert_eq!(status.code(), Some(130), "vport run soak after Ctrl-C");
    let left: Vec<_> = std::fs::read_dir(tmp.path()).unwrap().flatten().map(|e| e.path()).collect();
    assert!(left.is_empty(), "left behind: {left:?}");
    for pid in qemu {
        assert!(!std::path::Path::new(&format!("/proc/{pid}")).exists(), "qemu {pid} survived Ctrl-C");
    }
}
