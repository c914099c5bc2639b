//! `vport` command-line behaviour: exit codes and error messages for the failures a user meets
//! first. The silent-agent case boots a real VM.

mod common;

use common::{agent, show, vport, KillOnDrop};

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
    use std::io::{Read, Write};
    use std::time::{Duration, Instant};
    use vport_common::{Decoder, Message};

    let runtime = tempfile::tempdir().unwrap();
    let (mut boot, info) = common::boot(runtime.path(), &["--agent-log-level", "debug"]);
    let qemu_pid = info["pid"].as_u64().unwrap();
    assert_eq!(info["ports"][0]["name"], "org.vport.0", "{info}");

    let mut connect = common::spawn_connect(runtime.path(), "org.vport.0");
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

#[test]
fn trace_check_rejects_a_duplicate_opened_naming_the_records() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("dup.jsonl");
    std::fs::write(
        &path,
        concat!(
            r#"{"seq":0,"t_ns":1000,"port":"org.vport.0","source":"host","kind":"host_connect"}"#,
            "\n",
            r#"{"seq":1,"t_ns":2000,"port":"org.vport.0","source":"host","kind":"hello","session":7,"nonce":42}"#,
            "\n",
            r#"{"seq":2,"t_ns":3000,"port":"org.vport.0","source":"host","kind":"host_connect"}"#,
            "\n",
        ),
    )
    .unwrap();
    let o = vport().args(["trace", "check"]).arg(&path).output().unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    assert_eq!(o.status.code(), Some(1), "{}", show(&o));
    assert!(out.contains("duplicate-opened") && out.contains("records #0, #2"), "{}", show(&o));

    let o = vport().args(["trace", "check", "--json"]).arg(&path).output().unwrap();
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("{e}: {}", show(&o)));
    assert_eq!(v["clean"], false, "{v}");
    assert_eq!(v["violations"][0]["records"], serde_json::json!([0, 2]), "{v}");

    std::fs::write(&path, "{\"seq\":0,\"kind\":\"warp\"}\n").unwrap();
    let o = vport().args(["trace", "check"]).arg(&path).output().unwrap();
    assert_eq!(o.status.code(), Some(3), "a malformed trace is unreadable: {}", show(&o));
    assert!(String::from_utf8_lossy(&o.stderr).contains("line 1"), "{}", show(&o));
}

/// A real run's own trace — host connection, in-band handshake, QMP events, frontend-open
/// samples and the agent's transitions mapped onto the host clock — passes the checker.
#[test]
fn the_trace_of_a_real_hello_run_is_accepted() {
    let dir = tempfile::tempdir().unwrap();
    let trace = dir.path().join("hello.jsonl");
    let o = vport().args(["hello", "--json", "--trace"]).arg(&trace).env("VPORT_AGENT", agent()).output().unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));
    let report: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("{e}: {}", show(&o)));
    assert_eq!(report["trace"]["violations"], serde_json::json!([]), "{report}");
    let text = std::fs::read_to_string(&trace).unwrap();
    for kind in ["host_connect", "hello", "hello_ack", "vserport_change", "frontend_open", "agent_transition"] {
        assert!(text.contains(&format!("\"kind\":\"{kind}\"")), "the trace lacks {kind}:\n{text}");
    }
    let o = vport().args(["trace", "check"]).arg(&trace).output().unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));
    assert!(String::from_utf8_lossy(&o.stdout).contains(": clean"), "{}", show(&o));
}

/// `vport watch --json` shows a guest close and reopen through the in-band handshake within
/// 50 ms of the guest's own transition (the agent's records, mapped onto the host clock), and
/// through QMP within 1.5 s (QEMU rate-limits VSERPORT_CHANGE to one per second per port).
#[test]
fn watch_reports_guest_close_and_open_in_band_and_through_qmp() {
    use std::io::{BufRead, BufReader, Write};
    use std::process::Stdio;
    use std::time::{Duration, Instant};
    use vport_common::trace::{parse_record, Kind, Record};
    use vport_common::Phase;

    let mut watch = KillOnDrop(
        vport()
            .args(["watch", "--json", "--liveness", "2"])
            .env("VPORT_AGENT", agent())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap(),
    );
    let (tx, rx) = crossbeam_channel::unbounded::<Record>();
    let out = watch.0.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines() {
            let Ok(line) = line else { break };
            match parse_record(&line, 0) {
                Ok(Some(r)) => drop(tx.send(r)),
                other => panic!("vport watch --json printed a line that is not a record: {line:?}: {other:?}"),
            }
        }
    });
    let mut seen: Vec<Record> = Vec::new();
    let mut wait_for = |what: &str, pred: &dyn Fn(&Record) -> bool| -> Record {
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            if let Some(r) = seen.iter().find(|r| pred(r)) {
                return r.clone();
            }
            match rx.recv_deadline(deadline) {
                Ok(r) => seen.push(r),
                Err(_) => panic!("vport watch --json showed no {what}; records so far:\n{seen:#?}"),
            }
        }
    };
    let first_ready = wait_for("READY", &|r| matches!(r.kind, Kind::AgentTransition { to: Phase::Ready, .. }));
    // QEMU emits at most one VSERPORT_CHANGE per second per port and replaces the ones in the
    // window by the latest: a close within a second of the boot's open=true would be coalesced
    // away (the spec's "fast open/close/open collapses"). The scenario therefore starts one
    // throttle window after that event; this spacing is QEMU's rule, not a synchronisation.
    let boot_open = wait_for("the boot's VSERPORT_CHANGE open=true", &|r| {
        matches!(r.kind, Kind::VserportChange { open: true, .. })
    });
    let watch_origin = Instant::now() - Duration::from_nanos(first_ready.t_ns);
    let window_end = watch_origin + Duration::from_nanos(boot_open.t_ns) + Duration::from_millis(1100);
    while Instant::now() < window_end {
        std::thread::park_timeout(window_end - Instant::now());
    }
    let mut stdin = watch.0.stdin.take().unwrap();
    writeln!(stdin, "close org.vport.0 300").unwrap();

    let after = first_ready.seq;
    let closed = wait_for("the agent's close record", &|r| {
        r.seq > after
            && matches!(&r.kind, Kind::AgentTransition { to: Phase::Disconnected, cause, .. } if cause.contains("close"))
    });
    let bye = wait_for("BYE", &|r| matches!(r.kind, Kind::Bye { .. }));
    let qmp_closed =
        wait_for("VSERPORT_CHANGE open=false", &|r| matches!(r.kind, Kind::VserportChange { open: false, .. }));
    let reopened = wait_for("the agent's reopen record", &|r| {
        r.seq > after
            && matches!(&r.kind, Kind::AgentTransition { from: Phase::Disconnected, to: Phase::Connected, .. })
            && r.t_ns > closed.t_ns
    });
    let hello = wait_for("a HELLO after the reopen", &|r| matches!(r.kind, Kind::Hello { .. }) && r.t_ns > bye.t_ns);
    let qmp_opened = wait_for("VSERPORT_CHANGE open=true after the close", &|r| {
        matches!(r.kind, Kind::VserportChange { open: true, .. }) && r.t_ns > qmp_closed.t_ns
    });

    let ms = |later: &Record, earlier: &Record| (later.t_ns as f64 - earlier.t_ns as f64) / 1e6;
    eprintln!(
        "watch: close in band {:+.2} ms, via qmp {:+.1} ms; open in band {:+.2} ms, via qmp {:+.1} ms",
        ms(&bye, &closed),
        ms(&qmp_closed, &closed),
        ms(&hello, &reopened),
        ms(&qmp_opened, &reopened)
    );
    // BYE is sent before the close, so it may precede the agent's record.
    assert!(ms(&bye, &closed) < 50.0, "in-band close seen {} ms after the guest closed", ms(&bye, &closed));
    assert!(ms(&hello, &reopened) < 50.0, "in-band open seen {} ms after the guest opened", ms(&hello, &reopened));
    assert!(ms(&qmp_closed, &closed) < 1500.0, "QMP close seen {} ms after the guest closed", ms(&qmp_closed, &closed));
    assert!(
        ms(&qmp_opened, &reopened) < 1500.0,
        "QMP open seen {} ms after the guest opened",
        ms(&qmp_opened, &reopened)
    );

    // Liveness (`--liveness 2`): an idle session is probed after 1 s of silence; a live agent
    // answers, so 3 s of idleness neither ends the session nor makes the host connect again.
    let idle_end = Instant::now() + Duration::from_secs(3);
    while let Ok(r) = rx.recv_deadline(idle_end) {
        seen.push(r);
    }
    let liveness: Vec<_> =
        seen.iter().filter(|r| matches!(&r.kind, Kind::Note { text } if text.starts_with("liveness"))).collect();
    assert!(liveness.is_empty(), "a live idle agent was taken for dead: {liveness:#?}");
    let connects = seen.iter().filter(|r| matches!(r.kind, Kind::HostConnect)).count();
    assert_eq!(connects, 1, "the host connected once and stayed: {seen:#?}");

    writeln!(stdin, "quit").unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(s) = watch.0.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "vport watch did not quit");
        std::thread::park_timeout(Duration::from_millis(20));
    };
    assert!(status.success(), "vport watch: {status}");
}
