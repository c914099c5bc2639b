//! `vport` given bad input: every case exits with its code from the one table
//! (`vport_host::exit`), and its message names the bad thing and the fix. Most cases are decided
//! before anything is built; two boot a real VM (a port held by another client, a JUnit report
//! that cannot be written at the end).

mod common;

use common::{agent, show, vport};
use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};
use vport_host::exit::ExitCode;

/// A `vport` that cannot build anything (empty cache, empty PATH, no agent, empty registry):
/// a command that still exits 2 decided before building, which would fail with exit 3.
fn unbuildable(dir: &Path) -> Command {
    let mut c = vport();
    c.env("VPORT_CACHE_DIR", dir.join("cache"))
        .env("XDG_RUNTIME_DIR", dir.join("run"))
        .env("PATH", dir.join("bin"))
        .env("VPORT_AGENT", dir.join("no-agent"))
        .env_remove("VPORT_KERNEL")
        .env_remove("VPORT_BUSYBOX");
    c
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn assert_code(o: &Output, code: ExitCode) {
    assert_eq!(o.status.code(), Some(code.code()), "want {code:?}: {}", show(o));
}

/// `o` exited with `code` and its stderr has every one of `needles` (`what` says which case).
fn assert_fails_with(o: &Output, code: ExitCode, needles: &[&str], what: &dyn std::fmt::Debug) {
    assert_code(o, code);
    for n in needles {
        assert!(stderr(o).contains(n), "{what:?}: want {n:?}: {}", show(o));
    }
}

/// Nothing was built or downloaded: the cache directory was not even created.
fn assert_nothing_built(dir: &Path) {
    assert!(!dir.join("cache").exists(), "the command built or fetched something into {}", dir.display());
}

#[test]
fn every_command_help_shows_the_one_exit_code_table() {
    let commands: &[&[&str]] = &[
        &[],
        &["image", "build"],
        &["boot"],
        &["hello"],
        &["watch"],
        &["connect"],
        &["trace", "check"],
        &["run", "conformance"],
        &["bench"],
    ];
    for args in commands {
        let o = vport().args(*args).arg("--help").output().unwrap();
        assert_code(&o, ExitCode::Success);
        let text = String::from_utf8_lossy(&o.stdout);
        assert!(
            text.contains(vport_host::exit::HELP),
            "vport {} --help lacks the exit-code table:\n{text}",
            args.join(" ")
        );
    }
    let o = vport().args(["connect", "--help"]).output().unwrap();
    let text = String::from_utf8_lossy(&o.stdout).split_whitespace().collect::<Vec<_>>().join(" ");
    for needle in ["exits 4 when another client holds the port", "Without it that check is not possible"] {
        assert!(text.contains(needle), "connect --help lacks {needle:?}: {text}");
    }
}

#[test]
fn bad_port_values_are_usage_errors_before_anything_is_built() {
    let dir = tempfile::tempdir().unwrap();
    let bad: &[(&[&str], &str)] = &[
        (&["--port", "org.vport.a", "--port", "org.vport.a"], "\"org.vport.a\" is given twice"),
        (&["--port", ""], "\"\": the name is empty"),
        (&["--port", " \t"], "only whitespace"),
        (&["--port", "org.vport.a,id=x"], "a comma (QEMU's -device option separator)"),
        (&["--port", "org vport"], "a space"),
        (&["--port", "name=x"], "'='"),
    ];
    for cmd in ["boot", "watch", "hello"] {
        for (args, why) in bad {
            let o = unbuildable(dir.path()).arg(cmd).args(*args).output().unwrap();
            let err = stderr(&o);
            if cmd == "hello" && args.len() == 4 {
                // `hello` takes one --port: clap refuses the second.
                assert_code(&o, ExitCode::Usage);
                assert!(err.contains("--port"), "{}", show(&o));
                continue;
            }
            assert_code(&o, ExitCode::Usage);
            assert!(err.contains(why), "vport {cmd} {args:?}: want {why:?}: {}", show(&o));
            assert!(err.contains("A-Z a-z 0-9 . _ -") || err.contains("twice"), "says what is allowed: {}", show(&o));
            assert_nothing_built(dir.path());
        }
    }
}

#[test]
fn a_machine_type_vport_does_not_build_is_a_usage_error_naming_the_ones_it_does() {
    let dir = tempfile::tempdir().unwrap();
    for cmd in ["boot", "watch", "hello"] {
        let o = unbuildable(dir.path()).args([cmd, "--machine", "isapc"]).output().unwrap();
        assert_fails_with(&o, ExitCode::Usage, &["isapc", "pc", "q35", "microvm"], &cmd);
        assert_nothing_built(dir.path());
    }
}

#[test]
fn connect_to_an_unknown_port_without_any_vm_says_how_to_start_one() {
    let dir = tempfile::tempdir().unwrap();
    let o = unbuildable(dir.path()).args(["connect", "nosuch"]).output().unwrap();
    assert_code(&o, ExitCode::Usage);
    let err = stderr(&o);
    assert!(err.contains("\"nosuch\"") && err.contains("no vm started by `vport boot` is running"), "{}", show(&o));
    assert!(err.contains("vport boot --port nosuch"), "{}", show(&o));
    let o = unbuildable(dir.path()).args(["connect", "--list"]).output().unwrap();
    assert_code(&o, ExitCode::Success);
    assert!(String::from_utf8_lossy(&o.stdout).contains("no vm started by `vport boot` is running"), "{}", show(&o));
}

#[test]
fn a_junit_file_that_cannot_be_created_is_refused_before_any_vm() {
    let dir = tempfile::tempdir().unwrap();
    let missing_dir = dir.path().join("no/such/dir/report.xml");
    for path in [missing_dir.as_path(), dir.path()] {
        let o = unbuildable(dir.path()).args(["run", "conformance", "--junit"]).arg(path).output().unwrap();
        assert_code(&o, ExitCode::Usage);
        let err = stderr(&o);
        assert!(err.contains("--junit") && err.contains(&path.display().to_string()), "{}", show(&o));
        assert!(err.contains("writable directory"), "says the fix: {}", show(&o));
        assert_nothing_built(dir.path());
    }
}

#[test]
fn a_bench_json_file_that_cannot_be_created_is_refused_before_any_vm() {
    let dir = tempfile::tempdir().unwrap();
    let missing_dir = dir.path().join("no/such/dir/bench.json");
    let o = unbuildable(dir.path()).args(["bench", "--quick", "--json-out"]).arg(&missing_dir).output().unwrap();
    assert_code(&o, ExitCode::Usage);
    let err = stderr(&o);
    assert!(err.contains("--json-out") && err.contains(&missing_dir.display().to_string()), "{}", show(&o));
    assert_nothing_built(dir.path());
    let o = vport().args(["bench", "--quick", "--full"]).output().unwrap();
    assert_code(&o, ExitCode::Usage);
}

#[test]
fn a_hello_trace_file_that_cannot_be_created_is_refused_before_any_vm() {
    let dir = tempfile::tempdir().unwrap();
    let o = unbuildable(dir.path()).args(["hello", "--trace", "/nonexistent/dir/t.jsonl"]).output().unwrap();
    assert_code(&o, ExitCode::Usage);
    assert!(stderr(&o).contains("--trace /nonexistent/dir/t.jsonl"), "{}", show(&o));
    assert_nothing_built(dir.path());
}

#[test]
fn a_filter_matching_no_case_lists_the_cases_before_any_vm() {
    let dir = tempfile::tempdir().unwrap();
    let o = unbuildable(dir.path()).args(["run", "conformance", "--filter", "nosuchcase"]).output().unwrap();
    assert_code(&o, ExitCode::Usage);
    let err = stderr(&o);
    assert!(err.contains("\"nosuchcase\" matches no conformance case"), "{}", show(&o));
    for name in vport_host::conformance::all_cases().iter().map(|c| c.name) {
        assert!(err.contains(name), "the message lists {name}: {}", show(&o));
    }
    assert!(err.contains("vport run conformance --list"), "{}", show(&o));
    assert_nothing_built(dir.path());

    let o = unbuildable(dir.path()).args(["run", "conformance", "--list", "--filter", "ebusy"]).output().unwrap();
    assert_code(&o, ExitCode::Success);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("second-open-ebusy") && out.lines().count() == 1, "{}", show(&o));
}

/// Images are checked for static binaries before a kernel is looked for: with no kernel to be
/// had, the message is still about the binary.
#[test]
fn a_dynamic_or_non_elf_agent_or_busybox_is_refused_naming_the_file_and_the_fix() {
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("script");
    std::fs::write(&script, "#!/bin/sh\n").unwrap();
    let agent = agent();
    let agent = agent.to_str().unwrap();
    let cases: &[(&[&str], &[&str])] = &[
        (&["--agent", "/bin/ls"], &["vport-agent /bin/ls is dynamically linked", "scripts/build-agent"]),
        (&["--agent", script.to_str().unwrap()], &["not an ELF file", "scripts/build-agent"]),
        (&["--agent", agent, "--busybox", "/bin/true"], &["busybox /bin/true is dynamically linked", "busybox-static"]),
        (&["--agent", agent, "--busybox", script.to_str().unwrap()], &["not an ELF file", "busybox-static"]),
    ];
    for (args, needles) in cases {
        let o = unbuildable(dir.path()).args(["image", "build"]).args(*args).output().unwrap();
        assert_fails_with(&o, ExitCode::Infrastructure, needles, args);
    }
}

#[test]
fn a_missing_agent_or_busybox_is_an_infrastructure_failure_with_the_fix() {
    let dir = tempfile::tempdir().unwrap();
    let agent = agent();
    let cases: &[(&[&str], &[&str])] = &[
        (&["--agent", "/nonexistent/vport-agent"], &["/nonexistent/vport-agent not found", "scripts/build-agent"]),
        (
            &["--agent", agent.to_str().unwrap(), "--busybox", "/nonexistent/busybox"],
            &["busybox /nonexistent/busybox not found", "busybox-static", "--busybox"],
        ),
    ];
    for (args, needles) in cases {
        let o = unbuildable(dir.path()).args(["hello"]).args(*args).output().unwrap();
        assert_fails_with(&o, ExitCode::Infrastructure, needles, args);
    }
}

/// `--socket` has no QEMU to ask: a server that does not take the connection within
/// `--timeout` is reported busy.
#[test]
fn a_socket_that_never_accepts_is_busy_within_the_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("held.sock");
    let _listener = UnixListener::bind(&path).unwrap();
    let start = Instant::now();
    let o = vport().args(["connect", "--timeout", "1", "--socket"]).arg(&path).stdin(Stdio::null()).output().unwrap();
    assert!(start.elapsed() < Duration::from_secs(10), "took {:?}", start.elapsed());
    assert_code(&o, ExitCode::Busy);
    let err = stderr(&o);
    assert!(err.contains("already in use by another client") && err.contains("held.sock"), "{}", show(&o));
    assert!(err.contains("cannot ask qemu"), "says why it cannot tell more: {}", show(&o));
}

#[test]
fn a_socket_that_accepts_is_bridged() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("echo.sock");
    let listener = UnixListener::bind(&path).unwrap();
    let server = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        s.write_all(b"from the port").unwrap();
        let mut got = Vec::new();
        s.read_to_end(&mut got).unwrap();
        got
    });
    let mut c =
        vport().args(["connect", "--socket"]).arg(&path).stdin(Stdio::piped()).stdout(Stdio::piped()).spawn().unwrap();
    c.stdin.take().unwrap().write_all(b"to the port").unwrap();
    let o = c.wait_with_output().unwrap();
    assert_code(&o, ExitCode::Success);
    assert_eq!(o.stdout, b"from the port", "{}", show(&o));
    assert_eq!(server.join().unwrap(), b"to the port");
}

/// Root passes every file-mode check, so the connect runs as `nobody` (uid 65534): once on a
/// socket it may not write (mode 755), once on a socket in a directory it may not enter.
#[test]
fn permission_denied_on_a_socket_names_it_and_the_fix() {
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::process::CommandExt;
    if !nix::unistd::geteuid().is_root() {
        println!("skipped: needs root to run vport as another user");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let open_dir = dir.path().join("open");
    let closed_dir = dir.path().join("closed");
    for (d, mode) in [(&open_dir, 0o755), (&closed_dir, 0o700)] {
        std::fs::create_dir(d).unwrap();
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(mode)).unwrap();
    }
    let cases = [
        (
            open_dir.join("port.sock"),
            format!("{}/port.sock (owner uid 0, mode 755) is not writable", open_dir.display()),
        ),
        (closed_dir.join("port.sock"), format!("{} (owner uid 0, mode 700) is not searchable", closed_dir.display())),
    ];
    for (path, culprit) in cases {
        let listener = UnixListener::bind(&path).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        let o = vport()
            .args(["connect", "--socket"])
            .arg(&path)
            .uid(65534)
            .gid(65534)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        drop(listener);
        assert_code(&o, ExitCode::Infrastructure);
        let err = stderr(&o);
        assert!(err.contains("permission denied") && err.contains(&path.display().to_string()), "{}", show(&o));
        assert!(err.contains(&format!("{culprit} by uid 65534")), "want {culprit:?}: {}", show(&o));
        assert!(err.contains("run vport connect as the user who started the vm"), "{}", show(&o));
    }
}

/// A real VM from `vport boot`: while another client holds its port, `vport connect` exits 4 at
/// once and says so; an unknown port lists the real one; after the other client leaves, the
/// port is free again.
#[test]
fn a_port_held_by_another_client_is_busy() {
    let runtime = tempfile::tempdir().unwrap();
    let (mut boot, info) = common::boot(runtime.path(), &[]);
    assert!(info["qmp_tools"].as_str().is_some_and(|p| p.ends_with("qmp-tools.sock")), "{info}");
    let socket = info["ports"][0]["socket"].as_str().unwrap().to_string();
    let pid = info["pid"].as_u64().unwrap();
    let connect = |args: &[&str]| {
        vport().arg("connect").args(args).env("XDG_RUNTIME_DIR", runtime.path()).stdin(Stdio::null()).output().unwrap()
    };

    let o = connect(&["nosuch"]);
    assert_code(&o, ExitCode::Usage);
    assert!(stderr(&o).contains(&format!("org.vport.0 (qemu pid {pid})")), "lists the real port: {}", show(&o));
    let o = connect(&["--list"]);
    assert!(String::from_utf8_lossy(&o.stdout).contains("org.vport.0"), "{}", show(&o));

    let mut holder = UnixStream::connect(&socket).unwrap();
    vport_host::wait::wait_until(
        "qemu to accept the first client",
        Duration::from_secs(10),
        Duration::from_millis(5),
        || Ok(()),
        || vport_host::chardev::unix_diag::peer_accepted(&holder).unwrap().then_some(()),
    )
    .unwrap();
    let start = Instant::now();
    let o = connect(&["org.vport.0"]);
    assert_code(&o, ExitCode::Busy);
    assert!(start.elapsed() < Duration::from_secs(3), "busy took {:?}", start.elapsed());
    let err = stderr(&o);
    assert!(err.contains("port org.vport.0 is already in use by another client"), "{}", show(&o));
    assert!(err.contains("query-chardev shows chardev vport-ch0 connected"), "{}", show(&o));

    // The holder leaves: half-close, and QEMU closing its side shows it has dropped the client.
    holder.shutdown(std::net::Shutdown::Write).unwrap();
    holder.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut sink = Vec::new();
    match holder.read_to_end(&mut sink) {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        Err(e) => panic!("qemu did not drop the first client: {e}"),
    }
    // Free again: a `vport connect` takes the port and bridges it (the agent's HELLO arrives).
    let mut first = common::spawn_connect(runtime.path(), "org.vport.0");
    let mut out = first.0.stdout.take().unwrap();
    let (tx, rx) = crossbeam_channel::bounded(1);
    std::thread::spawn(move || {
        let mut byte = [0u8; 1];
        let _ = tx.send(out.read_exact(&mut byte).is_ok());
    });
    assert_eq!(rx.recv_timeout(Duration::from_secs(60)), Ok(true), "no byte from the agent through vport connect");
    // A `vport connect` that bridges holds the port too. While the QMP client cannot close its
    // connection early, it also keeps the tools monitor, and the second learns of the holder
    // from the kernel, after --timeout.
    let o = connect(&["--timeout", "2", "org.vport.0"]);
    assert_code(&o, ExitCode::Busy);
    let err = stderr(&o);
    assert!(err.contains("port org.vport.0 is already in use by another client"), "{}", show(&o));
    assert!(err.contains("tools monitor was busy") || err.contains("query-chardev shows"), "{}", show(&o));
    drop(first.0.stdin.take());
    assert!(first.0.wait().unwrap().success(), "the first vport connect ends with its input");

    nix::sys::signal::kill(nix::unistd::Pid::from_raw(boot.0.id() as i32), nix::sys::signal::Signal::SIGINT).unwrap();
    assert_eq!(boot.0.wait().unwrap().code(), Some(ExitCode::Interrupted.code()));
}

/// A JUnit file that opens but cannot be written (`/dev/full`: ENOSPC) fails the run with exit
/// 3 only after the matrix is on stdout: no result is lost. Boots one VM (one cheap case).
#[test]
fn a_junit_report_that_cannot_be_written_at_the_end_comes_after_the_matrix() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("out");
    let file = std::fs::File::create(&log).unwrap();
    let status = vport()
        .args(["run", "conformance", "--filter", "sysfs-name-appears", "--junit", "/dev/full"])
        .env("VPORT_AGENT", agent())
        .stdout(file.try_clone().unwrap())
        .stderr(file)
        .status()
        .unwrap();
    let text = std::fs::read_to_string(&log).unwrap();
    assert_eq!(status.code(), Some(ExitCode::Infrastructure.code()), "{text}");
    let matrix = text.find("vport conformance: QEMU").unwrap_or_else(|| panic!("no matrix:\n{text}"));
    let error = text.find("cannot write the JUnit report /dev/full").unwrap_or_else(|| panic!("no error:\n{text}"));
    assert!(matrix < error, "the matrix must come first:\n{text}");
    assert!(text[matrix..error].contains("sysfs-name-appears"), "{text}");
    assert!(text[error..].contains("No space left on device"), "{text}");
}

#[test]
fn a_bench_plot_directory_that_cannot_be_made_is_refused_before_any_vm() {
    let dir = tempfile::tempdir().unwrap();
    // A directory cannot be made under a regular file.
    let file = dir.path().join("a-file");
    std::fs::write(&file, b"").unwrap();
    let plots = file.join("plots");
    let o = unbuildable(dir.path()).args(["bench", "--quick", "--plots"]).arg(&plots).output().unwrap();
    assert_code(&o, ExitCode::Usage);
    let err = stderr(&o);
    assert!(err.contains("--plots") && err.contains(&plots.display().to_string()), "{}", show(&o));
    assert!(err.contains("directory you can write to"), "says the fix: {}", show(&o));
    assert_nothing_built(dir.path());
}
