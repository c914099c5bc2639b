//! Tests of the vsock reference without a VM: finding the daemon, QEMU's arguments, the wait
//! for the daemon's socket, its start failures, and the daemon's CONNECT exchange.

use super::*;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixListener;

/// The PCI machines' vsock device.
const PCI: &str = "vhost-user-vsock-pci";

/// An executable shell script `name` in `dir`.
fn script(dir: &Path, name: &str, body: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    p
}

#[test]
fn the_daemon_is_found_on_path_then_in_the_cache_else_the_fix_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let (on_path, cache) = (dir.path().join("bin"), dir.path().join("cache"));
    std::fs::create_dir_all(&on_path).unwrap();
    std::fs::create_dir_all(cache.join("tools/bin")).unwrap();
    let err = find_daemon(Some(on_path.as_os_str()), &cache).unwrap_err();
    let text = err.to_string();
    let install =
        format!("cargo install vhost-device-vsock --locked --version 0.3.0 --root {}", cache.join("tools").display());
    assert!(text.contains(&install) && text.contains("not installed"), "{text}");
    let cached = script(&cache.join("tools/bin"), DAEMON, "exit 0");
    assert_eq!(find_daemon(Some(on_path.as_os_str()), &cache).unwrap(), cached);
    assert_eq!(find_daemon(None, &cache).unwrap(), cached, "no PATH at all: the cache");
    let first = script(&on_path, DAEMON, "exit 0");
    assert_eq!(find_daemon(Some(on_path.as_os_str()), &cache).unwrap(), first, "PATH first");
}

#[test]
fn qemu_help_lists_devices_and_objects_by_name() {
    let devices = "Misc devices:\nname \"vhost-user-vsock-pci\", bus PCI\nname \"vhost-user-vsock-pci-non-transitional\", bus PCI\n";
    let device = Transport::Pci.vhost_user_vsock();
    assert!(lists_name(devices, device));
    assert!(!lists_name("name \"vhost-user-vsock-pci-non-transitional\", bus PCI\n", device));
    assert!(!lists_name("name \"vhost-vsock-pci\", bus PCI\n", device));
    assert!(lists_name("name \"vhost-user-vsock-device\", bus virtio-bus\n", Transport::Mmio.vhost_user_vsock()));
    let objects = "List of user creatable objects:\n  memory-backend-file\n  memory-backend-memfd\n";
    assert!(lists_name(objects, MEMORY_BACKEND));
    assert!(!lists_name("  memory-backend-memfd-x\n", MEMORY_BACKEND));
}

#[test]
fn qemu_and_daemon_arguments_are_exact() {
    let os = |v: &[&str]| v.iter().map(OsString::from).collect::<Vec<_>>();
    assert_eq!(
        memory_args(1024),
        os(&[
            "-object",
            "memory-backend-memfd,id=vport-mem,size=1024M,share=on",
            "-machine",
            "memory-backend=vport-mem"
        ])
    );
    assert_eq!(
        device_args(Transport::Pci.vhost_user_vsock(), Path::new("/w/a,b/vhost.sock")),
        os(&[
            "-chardev",
            "socket,id=vport-vsock,path=/w/a,,b/vhost.sock",
            "-device",
            "vhost-user-vsock-pci,chardev=vport-vsock,id=vport-vsock-dev"
        ])
    );
    assert_eq!(
        device_args(Transport::Mmio.vhost_user_vsock(), Path::new("/w/v.sock"))[3],
        "vhost-user-vsock-device,chardev=vport-vsock,id=vport-vsock-dev"
    );
    assert_eq!(
        daemon_args(3, Path::new("/w/v.sock"), Path::new("/w/h.sock")),
        os(&["--guest-cid", "3", "--socket", "/w/v.sock", "--uds-path", "/w/h.sock"])
    );
}

#[test]
fn proc_net_unix_tells_a_listening_socket_from_a_connected_one() {
    let table = "\
Num       RefCount Protocol Flags    Type St Inode Path
0000000000000000: 00000002 00000000 00010000 0001 01 21337 /tmp/w/vhost-vsock.sock
0000000000000000: 00000003 00000000 00000000 0001 03 21338 /tmp/w/vsock.sock
0000000000000000: 00000003 00000000 00000000 0001 03 21339
";
    assert!(listening_in(table, Path::new("/tmp/w/vhost-vsock.sock")));
    assert!(!listening_in(table, Path::new("/tmp/w/vsock.sock")), "connected, not listening");
    assert!(!listening_in(table, Path::new("/tmp/w/other.sock")));
    assert!(!listening_in("Num RefCount Protocol Flags Type St Inode Path\n", Path::new("/x")));
}

#[test]
fn the_wait_sees_a_listener_made_before_or_meanwhile_and_not_a_file() {
    let dir = tempfile::tempdir().unwrap();
    let before = dir.path().join("before.sock");
    let _l = UnixListener::bind(&before).unwrap();
    wait_listening(&before, Duration::from_secs(10), || Ok(())).unwrap();

    let meanwhile = dir.path().join("meanwhile.sock");
    let path = meanwhile.clone();
    let binder = std::thread::spawn(move || UnixListener::bind(path).unwrap());
    wait_listening(&meanwhile, Duration::from_secs(10), || Ok(())).unwrap();
    drop(binder.join().unwrap());

    let file = dir.path().join("file.sock");
    std::fs::write(&file, b"").unwrap();
    let err = wait_listening(&file, Duration::from_millis(120), || Ok(())).unwrap_err();
    assert!(err.contains("no listening socket") && err.contains("file.sock"), "{err}");
    let err = wait_listening(&dir.path().join("never.sock"), Duration::from_secs(10), || Err("it died".into()));
    assert_eq!(err.unwrap_err(), "it died", "a dead daemon ends the wait at once");
}

#[test]
fn a_daemon_that_exits_or_never_listens_is_a_reason_with_its_log() {
    let dir = tempfile::tempdir().unwrap();
    let bin = dir.path().join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    let quits = script(&bin, "quits", "[ \"$1\" = --version ] && { echo 'vhost-device-vsock 9.9.9'; exit 0; }\necho 'socket path too long' >&2\nexit 1");
    let err = Daemon::start(&quits, PCI, dir.path(), Duration::from_secs(10)).unwrap_err().to_string();
    assert!(
        err.contains("exited before its socket listened") && err.contains("it said: socket path too long"),
        "{err}"
    );
    let idles =
        script(&bin, "idles", "[ \"$1\" = --version ] && { echo 'vhost-device-vsock 9.9.9'; exit 0; }\nexec sleep 30");
    let t0 = Instant::now();
    let err = Daemon::start(&idles, PCI, dir.path(), Duration::from_millis(150)).unwrap_err().to_string();
    assert!(err.contains("no listening socket") && err.contains(VHOST_SOCKET), "{err}");
    assert!(t0.elapsed() < Duration::from_secs(5), "killed at the deadline, not waited for");
    let missing = Daemon::start(&bin.join("nothing"), PCI, dir.path(), Duration::from_secs(1)).unwrap_err().to_string();
    assert!(missing.contains("cannot run it"), "{missing}");
}

#[test]
fn connect_is_answered_ok_and_the_stream_starts_after_the_line() {
    assert_eq!(connect_line(5201), "CONNECT 5201\n");
    assert_eq!(parse_connect_reply("OK 1073741824"), Ok(1_073_741_824));
    assert!(parse_connect_reply("ERR").unwrap_err().contains("instead of `OK <port>`"));
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("h.sock");
    let listener = UnixListener::bind(&sock).unwrap();
    let daemon = std::thread::spawn(move || {
        for answer in [&b"OK 1024\npayload"[..], &b""[..]] {
            let (mut s, _) = listener.accept().unwrap();
            let mut line = [0u8; 13];
            s.read_exact(&mut line).unwrap();
            assert_eq!(&line, b"CONNECT 5201\n");
            s.write_all(answer).unwrap();
        }
    });
    let mut s = host_connect(&sock, 5201, Duration::from_secs(10)).unwrap();
    let mut payload = [0u8; 7];
    s.read_exact(&mut payload).unwrap();
    assert_eq!(&payload, b"payload", "nothing after the line was read with it");
    let refused = host_connect(&sock, 5201, Duration::from_secs(10)).unwrap_err();
    assert!(refused.contains("nothing listens there"), "{refused}");
    daemon.join().unwrap();
}

#[test]
fn a_skipped_reference_says_why_and_takes_no_sample() {
    let mut r = Reference { daemon: None, state: Err("vhost-device-vsock is not installed".into()) };
    assert!(!r.runs());
    assert_eq!(r.describe(), "skipped: vhost-device-vsock is not installed");
    assert!(matches!(r.port(), Err(BenchError::Setup(m)) if m.contains("vsock was skipped")));
    assert!(r.take().is_none());
    let hint = guest_hint(&Unavailable::Guest("errno 97: this guest kernel has no AF_VSOCK".into()));
    assert!(hint.contains("vmw_vsock_virtio_transport") && hint.contains("--kernel-deb"), "{hint}");
}
