//! `vport send` and `vport recv` as a user runs them, against a VM of `vport boot` (whose agent
//! keeps streams in /var/lib/vport-streams): a file goes in and comes back out byte for byte;
//! each command is killed once in the middle of its stream (the host leaves for good) and run
//! again, and resumes from what the receiver had stored instead of starting over; `vport recv`
//! run once more moves nothing.

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Output, Stdio};
use std::time::Duration;

/// Large enough that a transfer is still running when its first acknowledgement shows.
const SIZE: usize = 12 << 20;

fn run(runtime: &Path, args: &[&str]) -> Output {
    common::vport().args(args).env("XDG_RUNTIME_DIR", runtime).output().unwrap()
}

/// Starts `args` and returns it once its first "bytes acknowledged" progress line showed.
fn running_after_first_ack(runtime: &Path, args: &[&str]) -> common::KillOnDrop {
    let mut child = common::KillOnDrop(
        common::vport()
            .args(args)
            .env("XDG_RUNTIME_DIR", runtime)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let (tx, rx) = crossbeam_channel::unbounded();
    let stderr = child.0.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            eprintln!("  | {line}");
            if line.contains("bytes acknowledged") {
                let _ = tx.send(());
            }
        }
    });
    rx.recv_timeout(Duration::from_secs(90)).unwrap_or_else(|_| panic!("no progress from vport {args:?}"));
    child
}

/// Starts `args`, waits for its first "bytes acknowledged" progress line, and kills it
/// (SIGKILL: no goodbye, the host connection just drops).
fn kill_after_first_ack(runtime: &Path, args: &[&str]) {
    let mut child = running_after_first_ack(runtime, args);
    child.0.kill().unwrap();
    child.0.wait().unwrap();
}

fn json_of(o: &Output) -> serde_json::Value {
    assert_eq!(o.status.code(), Some(0), "{}", common::show(o));
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("{e}: {}", common::show(o)))
}

#[test]
fn send_and_recv_copy_a_file_each_way_and_resume_after_being_killed() {
    let runtime = tempfile::tempdir().unwrap();
    let work = tempfile::tempdir().unwrap();
    let (_boot, info) = common::boot(runtime.path(), &[]);
    let port = info["ports"][0]["name"].as_str().unwrap().to_owned();
    let mut data = vec![0u8; SIZE];
    vport_common::pattern::fill(42, 0, &mut data);
    let src = work.path().join("payload.bin");
    std::fs::write(&src, &data).unwrap();
    let src_s = src.to_str().unwrap();
    let mut digest = vport_common::pattern::StreamDigest::new();
    digest.update(&data);
    let digest = format!("{:#018x}", digest.digest());

    // Into the guest: killed after the first acknowledgement, then run again to the end.
    let send = ["send", src_s, "--as", "payload.bin", "--port", &port, "--json"];
    kill_after_first_ack(runtime.path(), &send);
    let sent = json_of(&run(runtime.path(), &send));
    eprintln!("send: {sent}");
    assert_eq!((sent["bytes"].as_u64(), sent["digest"].as_str()), (Some(SIZE as u64), Some(digest.as_str())));
    assert!(sent["resumed_at"].as_u64().unwrap() > 0, "the second run resumed: {sent}");

    // And back out: killed once as well, then the host's part file is resumed.
    let out = work.path().join("back.bin");
    let recv = ["recv", "payload.bin", "-o", out.to_str().unwrap(), "--port", &port, "--json"];
    kill_after_first_ack(runtime.path(), &recv);
    let parts: Vec<_> = std::fs::read_dir(work.path()).unwrap().flatten().map(|e| e.file_name()).collect();
    assert!(parts.iter().any(|n| n.to_string_lossy().ends_with(".vport-part")), "a part file stays: {parts:?}");
    let got = json_of(&run(runtime.path(), &recv));
    eprintln!("recv: {got}");
    assert!(got["resumed_at"].as_u64().unwrap() > 0, "the second run resumed: {got}");
    assert_eq!(got["digest"].as_str(), Some(digest.as_str()));
    assert!(std::fs::read(&out).unwrap() == data, "the file came back changed");
    let left: Vec<_> = std::fs::read_dir(work.path()).unwrap().flatten().map(|e| e.file_name()).collect();
    assert!(!left.iter().any(|n| n.to_string_lossy().ends_with(".vport-part")), "part files left: {left:?}");

    // Run again with the file already there: verified against the guest's, nothing moved, the
    // same file kept (not replaced by a new copy).
    use std::os::unix::fs::MetadataExt;
    let inode = std::fs::metadata(&out).unwrap().ino();
    let again = json_of(&run(runtime.path(), &recv));
    eprintln!("recv again: {again}");
    assert_eq!((again["moved_bytes"].as_u64(), again["resumed_at"].as_u64()), (Some(0), Some(SIZE as u64)), "{again}");
    assert_eq!(std::fs::metadata(&out).unwrap().ino(), inode, "the destination was replaced");
    assert!(std::fs::read(&out).unwrap() == data);
    let left: Vec<_> = std::fs::read_dir(work.path()).unwrap().flatten().map(|e| e.file_name()).collect();
    assert!(!left.iter().any(|n| n.to_string_lossy().ends_with(".vport-part")), "part files left: {left:?}");

    // A name the agent would refuse is refused before anything connects (exit 2).
    let bad = run(runtime.path(), &["recv", "../etc/passwd", "--port", &port]);
    assert_eq!(bad.status.code(), Some(2), "{}", common::show(&bad));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("plain file name"), "{}", common::show(&bad));
}

/// QEMU killed in the middle of `vport send`: the transfer ends at once with the
/// infrastructure's exit code (3), not after its --timeout, and the error says QEMU exited.
#[test]
fn send_ends_at_once_with_exit_3_when_qemu_is_killed() {
    use std::time::Instant;
    let runtime = tempfile::tempdir().unwrap();
    let work = tempfile::tempdir().unwrap();
    let (_boot, info) = common::boot(runtime.path(), &[]);
    let port = info["ports"][0]["name"].as_str().unwrap().to_owned();
    let qemu = nix::unistd::Pid::from_raw(info["pid"].as_u64().unwrap() as i32);
    let src = work.path().join("big.bin");
    let mut data = vec![0u8; SIZE];
    vport_common::pattern::fill(7, 0, &mut data);
    std::fs::write(&src, &data).unwrap();
    let send = ["send", src.to_str().unwrap(), "--as", "big.bin", "--port", &port, "--timeout", "60"];
    let mut child = running_after_first_ack(runtime.path(), &send);
    let killed = Instant::now();
    nix::sys::signal::kill(qemu, nix::sys::signal::Signal::SIGKILL).unwrap();
    let status = loop {
        if let Some(s) = child.0.try_wait().unwrap() {
            break s;
        }
        assert!(killed.elapsed() < Duration::from_secs(10), "vport send still runs 10 s after QEMU was killed");
        std::thread::park_timeout(Duration::from_millis(10));
    };
    eprintln!("vport send ended {} ms after QEMU was killed", killed.elapsed().as_millis());
    assert_eq!(status.code(), Some(3), "the infrastructure's exit code");
}
