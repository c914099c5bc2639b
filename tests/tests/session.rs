//! The session server on a real VM: exactly one Session per guest open, ended with the right
//! reason, and an ended Session refuses work with a typed error.

use std::time::{Duration, Instant};
use vport_host::client::AgentClient;
use vport_host::session::{EndReason, SessionError};
use vport_tests::{accept_session, TestVm, HELLO_TIMEOUT, REPLY_TIMEOUT};

const PORT: &str = "org.vport.session";

/// Deadline for the agent to reopen the port and offer the next session.
const REOPEN_TIMEOUT: Duration = Duration::from_secs(15);

#[test]
fn one_session_per_guest_open_ended_by_guest_close_and_by_host_close() {
    let mut vm = TestVm::launch(&[PORT]);
    let port = vm.rig.port(PORT).unwrap().clone();
    let mut server = vm.rig.port_server(PORT).unwrap();
    vm.resume();
    let t0 = Instant::now();
    let mut s1 = accept_session(&vm, &mut server, HELLO_TIMEOUT);
    eprintln!("e2e: session 1 ({:#010x}) ready {} ms after cont", s1.id().session, t0.elapsed().as_millis());
    assert_eq!(s1.handshake().hello.port_name, PORT);
    s1.ping(REPLY_TIMEOUT, 1).unwrap_or_else(|e| panic!("ping: {e}\n{}", vm.rig.failure_context()));
    assert_eq!(vm.rig.qmp.frontend_open(&port.chardev_id).unwrap(), Some(true));

    // No second Session while the guest keeps the port open (its HELLO requests included).
    let err = server.accept(Duration::from_millis(2500)).unwrap_err();
    assert!(matches!(err, SessionError::Timeout { .. }), "{err}");
    assert_eq!(server.sessions(), 1);
    assert_eq!(s1.end_reason(), None);
    s1.ping(REPLY_TIMEOUT, 2).expect("session 1 still live after a fruitless accept");

    // The guest closes the port (CLOSE -> BYE -> close, reopen after 300 ms).
    let t = Instant::now();
    let reason =
        s1.close_guest(300, REPLY_TIMEOUT).unwrap_or_else(|e| panic!("close: {e}\n{}", vm.rig.failure_context()));
    eprintln!("e2e: guest close ended session 1 with {reason:?} after {} ms", t.elapsed().as_millis());
    assert_eq!(reason, EndReason::AgentBye);
    assert_eq!(s1.end_reason(), Some(EndReason::AgentBye));
    let err = s1.ping(REPLY_TIMEOUT, 3).unwrap_err();
    assert!(matches!(err, SessionError::Ended(EndReason::AgentBye)), "{err}");
    let err = s1.send(&vport_common::Message::Stats).unwrap_err();
    assert!(matches!(err, SessionError::Ended(EndReason::AgentBye)), "{err}");

    // The agent reopens: the next accept yields the new Session.
    let t = Instant::now();
    let mut s2 = accept_session(&vm, &mut server, REOPEN_TIMEOUT);
    eprintln!("e2e: session 2 ({:#010x}) ready {} ms after session 1 ended", s2.id().session, t.elapsed().as_millis());
    assert_eq!(s2.number(), 2);
    assert_ne!(s2.id(), s1.id(), "a reopen is a new guest session");
    s2.ping(REPLY_TIMEOUT, 4).unwrap();
    assert_eq!(s2.echo(b"session two", REPLY_TIMEOUT).unwrap(), b"session two");
    assert_eq!(s1.end_reason(), Some(EndReason::AgentBye), "the old session keeps its reason");

    // The host closes: HostClosed, and the session refuses work.
    assert_eq!(s2.close(), EndReason::HostClosed);
    let err = s2.ping(REPLY_TIMEOUT, 5).unwrap_err();
    assert!(matches!(err, SessionError::Ended(EndReason::HostClosed)), "{err}");
    assert!(err.to_string().contains("host closed"), "{err}");

    // Dropping a live Session closes the host connection the same way; the server reconnects
    // and the agent offers a fresh session.
    let s3 = accept_session(&vm, &mut server, REOPEN_TIMEOUT);
    assert_eq!(s3.number(), 3);
    let s3_id = s3.id();
    drop(s3);
    assert_eq!(server.last_end(), Some(EndReason::HostClosed));
    let mut s4 = accept_session(&vm, &mut server, REOPEN_TIMEOUT);
    assert_ne!(s4.id(), s3_id);
    s4.ping(REPLY_TIMEOUT, 6).unwrap();
    assert_eq!(server.sessions(), 4);
    vm.rig.vm.check_alive().unwrap();
}

#[test]
fn vm_stop_and_unplug_end_sessions_with_their_reasons() {
    let mut vm = TestVm::launch(&[PORT]);
    let port = vm.rig.port(PORT).unwrap().clone();
    let mut server = vm.rig.port_server(PORT).unwrap();
    vm.resume();
    let mut s1 = accept_session(&vm, &mut server, HELLO_TIMEOUT);
    s1.ping(REPLY_TIMEOUT, 1).unwrap();

    vm.rig.qmp.stop().unwrap();
    assert_eq!(s1.wait_end(REPLY_TIMEOUT).unwrap(), EndReason::VmStopped);
    let err = s1.ping(REPLY_TIMEOUT, 2).unwrap_err();
    assert!(matches!(err, SessionError::Ended(EndReason::VmStopped)), "{err}");

    // After `cont` the agent still holds its old session; the server asks for a new one.
    vm.rig.qmp.cont().unwrap();
    let t = Instant::now();
    let mut s2 = accept_session(&vm, &mut server, REOPEN_TIMEOUT);
    eprintln!("e2e: session 2 ready {} ms after cont", t.elapsed().as_millis());
    assert_ne!(s2.id(), s1.id());
    s2.ping(REPLY_TIMEOUT, 3).unwrap();

    vm.rig.qmp.device_del(&port.id).unwrap();
    let t = Instant::now();
    assert_eq!(s2.wait_end(REPLY_TIMEOUT).unwrap(), EndReason::Unplugged);
    eprintln!("e2e: unplug ended session 2 after {} ms", t.elapsed().as_millis());
    let err = s2.echo(b"x", REPLY_TIMEOUT).unwrap_err();
    assert!(matches!(err, SessionError::Ended(EndReason::Unplugged)), "{err}");
    let err = server.accept(Duration::from_secs(1)).unwrap_err();
    assert!(matches!(err, SessionError::Closed { reason: EndReason::Unplugged, .. }), "{err}");
    vm.rig.vm.check_alive().unwrap();
}

#[test]
fn reset_and_migration_end_sessions_with_their_reasons() {
    // vport's base arguments include -no-reboot, under which QEMU turns system_reset into a
    // shutdown; `-action reboot=reset` restores the reset.
    let mut vm = TestVm::launch_tweaked(&[PORT], |c| c.extra_args.extend(["-action".into(), "reboot=reset".into()]));
    let mut server = vm.rig.port_server(PORT).unwrap();
    vm.resume();
    let mut s1 = accept_session(&vm, &mut server, HELLO_TIMEOUT);
    s1.ping(REPLY_TIMEOUT, 1).unwrap();

    // system_reset: QMP RESET ends the session as GuestReset; the rebooted agent offers the next.
    vm.rig.qmp.system_reset().unwrap();
    let t = Instant::now();
    assert_eq!(s1.wait_end(REPLY_TIMEOUT).unwrap(), EndReason::GuestReset);
    eprintln!("e2e: system_reset ended session 1 after {} ms", t.elapsed().as_millis());
    let err = s1.echo(b"x", REPLY_TIMEOUT).unwrap_err();
    assert!(matches!(err, SessionError::Ended(EndReason::GuestReset)), "{err}");
    let mut s2 = accept_session(&vm, &mut server, HELLO_TIMEOUT);
    eprintln!("e2e: session 2 ready {} ms after the reset", t.elapsed().as_millis());
    assert_ne!(s2.handshake().hello.nonce, s1.handshake().hello.nonce);
    s2.ping(REPLY_TIMEOUT, 2).unwrap();

    // Migration (to a file): the source stops while query-migrate shows it under way, so the
    // session ends as Migrated, not as a plain stop; nothing more is written into it.
    let file = vm.rig.vm.dir().join("session-migration.bin");
    vm.rig.qmp.migrate(&format!("exec:cat > {}", file.display())).unwrap();
    let t = Instant::now();
    assert_eq!(s2.wait_end(Duration::from_secs(120)).unwrap(), EndReason::Migrated);
    eprintln!("e2e: migration ended session 2 after {} ms", t.elapsed().as_millis());
    let err = s2.send(&vport_common::Message::Stats).unwrap_err();
    assert!(matches!(err, SessionError::Ended(EndReason::Migrated)), "{err}");
    assert_eq!(server.last_end(), Some(EndReason::Migrated));
    vm.rig.vm.check_alive().unwrap();
}
