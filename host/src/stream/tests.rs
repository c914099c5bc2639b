//! The transfer loop's liveness: a connection that yields no session is left and made again
//! only while the VM runs; the ids that make a transfer resumable.

use super::*;

/// A source that never yields a session; the VM's run state per call is scripted.
struct NoSession {
    /// Whether QEMU reports the VM paused at call `n` (from 1).
    paused: fn(usize) -> bool,
    calls: usize,
    reconnects_at: Vec<usize>,
}

impl SessionSource for NoSession {
    fn next_session(&mut self, timeout: Duration) -> Result<Session, SessionError> {
        self.calls += 1;
        Err(SessionError::Timeout { port: "p".into(), what: "HELLO".into(), timeout })
    }
    fn reconnect(&mut self) {
        self.reconnects_at.push(self.calls);
    }
    fn vm_paused(&self) -> bool {
        (self.paused)(self.calls)
    }
}

fn side(opts: TransferOptions) -> (to_guest::ToGuest, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("f");
    std::fs::write(&path, b"abc").unwrap();
    (to_guest::ToGuest::new("p", &path, "f", opts).unwrap(), dir)
}

#[test]
fn no_session_while_the_vm_is_stopped_is_no_stall_and_once_it_runs_the_host_reconnects() {
    let opts = TransferOptions {
        session_timeout: Duration::from_millis(40),
        stall_timeout: Duration::from_millis(10),
        ..Default::default()
    };
    let (mut side, _dir) = side(opts);
    let mut source = NoSession { paused: |call| call <= 5, calls: 0, reconnects_at: Vec::new() };
    let mut events = Vec::new();
    let err = side.run(&mut source, &mut |e| {
        events.push(e.clone());
        Control::Continue
    });
    assert!(matches!(err, Err(TransferError::NoSession { acked: 0, total: 3, .. })), "{err:?}");
    assert!(source.calls > 5, "it kept waiting after the stopped phase: {} calls", source.calls);
    assert!(source.reconnects_at.iter().all(|&call| call > 5), "reconnected while stopped: {:?}", source.reconnects_at);
    assert!(!source.reconnects_at.is_empty(), "a running vm's silent connection was never made again");
    let reported = events.iter().filter(|e| matches!(e, TransferEvent::Reconnecting { .. })).count();
    assert_eq!(reported, source.reconnects_at.len(), "every reconnect is an event");
}

#[test]
fn a_running_or_unknown_vm_s_silent_connection_is_made_again() {
    let opts = TransferOptions {
        session_timeout: Duration::from_millis(30),
        stall_timeout: Duration::from_millis(10),
        ..Default::default()
    };
    let (mut side, _dir) = side(opts);
    let mut source = NoSession { paused: |_| false, calls: 0, reconnects_at: Vec::new() };
    assert!(side.run(&mut source, &mut |_| Control::Continue).is_err());
    assert!(!source.reconnects_at.is_empty());
}

#[test]
fn stream_ids_depend_on_every_part_and_on_where_parts_split() {
    let a = stream_id(&[b"to-guest", b"name", b"x"]);
    assert_eq!(a, stream_id(&[b"to-guest", b"name", b"x"]));
    assert_ne!(a, stream_id(&[b"to-guest", b"name", b"y"]));
    assert_ne!(stream_id(&[b"ab", b"c"]), stream_id(&[b"a", b"bc"]));
}

#[test]
fn only_states_a_vm_leaves_by_itself_or_with_cont_are_pauses() {
    use crate::session::paused_for_now;
    for s in ["paused", "prelaunch", "suspended", "inmigrate", "finish-migrate", "save-vm", "restore-vm"] {
        assert!(paused_for_now(s), "{s}");
    }
    for s in ["running", "postmigrate", "shutdown", "guest-panicked", "internal-error", "io-error", "watchdog", ""] {
        assert!(!paused_for_now(s), "{s}");
    }
}

#[test]
fn a_pattern_stream_resumes_under_its_own_id_which_differs_from_a_files() {
    let dir = tempfile::tempdir().unwrap();
    let dest = dir.path().join("out");
    let opts = TransferOptions::default();
    let a = to_host::ToHost::pattern("p", 7, 100, &dest, opts.clone()).unwrap().id();
    assert_eq!(a, to_host::ToHost::pattern("p", 7, 100, &dest, opts.clone()).unwrap().id());
    assert_ne!(a, to_host::ToHost::pattern("p", 8, 100, &dest, opts.clone()).unwrap().id());
    assert_ne!(a, to_host::ToHost::pattern("p", 7, 101, &dest, opts.clone()).unwrap().id());
    assert_ne!(a, to_host::ToHost::new("p", "f", &dest, opts).unwrap().id());
}

#[test]
fn sessions_that_move_nothing_end_the_stream_only_after_enough_of_them_and_the_timeout() {
    let t0 = Instant::now();
    let timeout = Duration::from_secs(10);
    let mut mark = ProgressMark::new(5, t0);
    let at = |s: u64| t0 + Duration::from_secs(s);
    assert_eq!(mark.session_ended(5, at(20), timeout), None, "one idle session");
    assert_eq!(mark.session_ended(5, at(21), timeout), None, "two");
    assert_eq!(mark.session_ended(5, at(22), timeout), Some((3, Duration::from_secs(22))));
    let mut mark = ProgressMark::new(5, t0);
    for s in 0..50 {
        assert_eq!(
            mark.session_ended(5, t0 + Duration::from_millis(s), timeout),
            None,
            "fast cycling, within the timeout"
        );
    }
    assert_eq!(mark.session_ended(6, at(30), timeout), None, "progress resets the count");
    assert_eq!(mark.session_ended(6, at(31), timeout), None);
    assert_eq!(mark.session_ended(6, at(32), timeout), None);
    assert_eq!(mark.session_ended(6, at(41), timeout), Some((3, Duration::from_secs(11))));
}

mod existing_destination {
    //! `vport recv` run again: a destination already there is kept when it holds the stream
    //! whole, and received afresh (then replaced) when it does not.
    use super::*;
    use crate::session::fakes::{agent, server, Agent};
    use crate::session::SessionId;
    use vport_common::Message;

    const A: SessionId = SessionId { session: 0xA, nonce: 1 };
    const GUEST: &[u8] = b"the guest's file";

    fn digest(bytes: &[u8]) -> u64 {
        let mut d = StreamDigest::new();
        d.update(bytes);
        d.digest()
    }

    /// The next STREAM_OPEN's offset (other messages, acknowledgements, skipped).
    fn open_offset(g: &mut Agent) -> u64 {
        open_request(g).0
    }

    /// The next STREAM_OPEN's offset and header.
    fn open_request(g: &mut Agent) -> (u64, vport_common::Header) {
        loop {
            if let (h, Message::StreamOpen { offset, .. }) = g.recv_frame() {
                return (offset, h);
            }
        }
    }

    /// The next STREAM_DONE's `ok`.
    fn done_ok(g: &mut Agent) -> bool {
        loop {
            if let (_, Message::StreamDone { ok, .. }) = g.recv() {
                return ok;
            }
        }
    }

    fn send_whole_from(g: &mut Agent, id: u64, from: u64) {
        let total = GUEST.len() as u64;
        g.send(A.session, &Message::StreamAccept { id, offset: from, total, window: 0 });
        let bytes = GUEST[from as usize..].to_vec();
        g.send(A.session, &Message::StreamData { id, offset: from, bytes });
        g.send(A.session, &Message::StreamEnd { id, total, digest: digest(GUEST) });
    }

    /// Runs `vport recv` of "f" into `dest` against the scripted agent `script(agent, id)`.
    fn recv(dest: &std::path::Path, script: impl FnOnce(&mut Agent, u64) + Send + 'static) -> TransferReport {
        let (mut srv, agents, _qmp) = server();
        let opts = TransferOptions { session_timeout: Duration::from_secs(5), ..Default::default() };
        let mut side = to_host::ToHost::new("org.vport.fake", "f", dest, opts).unwrap();
        let id = side.id();
        let guest = std::thread::spawn(move || {
            let mut g = agent(&agents);
            assert!(matches!(g.recv(), (0, Message::HelloRequest)));
            g.hello(A);
            assert!(matches!(g.recv(), (0xA, Message::HelloAck { .. })));
            script(&mut g, id);
            g
        });
        let report = side.run(&mut srv, &mut |_| Control::Continue).unwrap();
        drop(guest.join().unwrap());
        report
    }

    fn no_part_file_left(dest: &std::path::Path) {
        let dir = dest.parent().unwrap();
        let left: Vec<_> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(left, [dest.file_name().unwrap()], "only the destination is left");
    }

    #[test]
    fn a_destination_holding_the_stream_whole_is_verified_and_nothing_is_received_again() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("out");
        std::fs::write(&dest, GUEST).unwrap();
        let report = recv(&dest, |g, id| {
            let total = GUEST.len() as u64;
            assert_eq!(open_offset(g), total, "opened at the destination's length");
            g.send(A.session, &Message::StreamAccept { id, offset: total, total, window: 0 });
            g.send(A.session, &Message::StreamEnd { id, total, digest: digest(GUEST) });
            assert!(done_ok(g));
        });
        assert_eq!((report.bytes, report.started_at, report.digest), (16, 16, digest(GUEST)));
        assert_eq!(std::fs::read(&dest).unwrap(), GUEST);
        no_part_file_left(&dest);
    }

    #[test]
    fn a_destination_of_the_same_length_but_other_bytes_is_received_again_and_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("out");
        std::fs::write(&dest, b"another file ...").unwrap();
        let report = recv(&dest, |g, id| {
            let total = GUEST.len() as u64;
            assert_eq!(open_offset(g), total);
            g.send(A.session, &Message::StreamAccept { id, offset: total, total, window: 0 });
            g.send(A.session, &Message::StreamEnd { id, total, digest: digest(GUEST) });
            assert!(!done_ok(g), "the destination's digest differs");
            assert_eq!(open_offset(g), 0, "opened again from the part file");
            send_whole_from(g, id, 0);
            assert!(done_ok(g));
        });
        assert_eq!((report.bytes, report.started_at), (16, 0));
        assert_eq!(std::fs::read(&dest).unwrap(), GUEST);
        no_part_file_left(&dest);
    }

    #[test]
    fn a_shorter_or_longer_destination_is_received_again_in_the_same_session() {
        for existing in [&b"the guest"[..], b"the guest's file, longer"] {
            let dir = tempfile::tempdir().unwrap();
            let dest = dir.path().join("out");
            std::fs::write(&dest, existing).unwrap();
            let len = existing.len() as u64;
            let report = recv(&dest, move |g, id| {
                let total = GUEST.len() as u64;
                let (offset, request) = open_request(g);
                assert_eq!(offset, len);
                if len < total {
                    // The agent starts sending from there before the host asks again.
                    g.send(A.session, &Message::StreamAccept { id, offset: len, total, window: 0 });
                    let bytes = GUEST[len as usize..].to_vec();
                    g.send(A.session, &Message::StreamData { id, offset: len, bytes });
                } else {
                    let code = vport_common::message::error_code::BAD_STATE;
                    g.send(A.session, &Message::error_for(&request, code, "offset past the file's end"));
                }
                assert_eq!(open_offset(g), 0, "opened again from the part file");
                send_whole_from(g, id, 0);
                assert!(done_ok(g));
            });
            assert_eq!((report.bytes, report.started_at, report.sessions), (16, 0, 1), "{existing:?}");
            assert_eq!(std::fs::read(&dest).unwrap(), GUEST);
            no_part_file_left(&dest);
        }
    }
}
