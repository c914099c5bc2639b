//! The start-up check: has QEMU's main loop started? QEMU answers QMP commands only from its
//! main loop, that is after machine set-up (the greeting alone can come earlier, from the
//! monitor I/O thread), so a reply to `qmp_capabilities` means the machine is set up and, for
//! example, the kernel was loaded.
//!
//! The check is the QMP client itself: a [`Qmp::connect_while`] (greeting, then
//! `qmp_capabilities`), retried while the socket is not there yet, refuses connections or drops
//! them. The connection is closed when the check is done, so QMP is free for the caller
//! afterwards (QEMU serves one QMP client at a time on a socket). The whole check has one
//! deadline and keeps the client's bounds ([`MAX_LINE_BYTES`](super::MAX_LINE_BYTES) a line);
//! whatever the server sends, it fails with a [`WaitError`], never a panic.

use super::{ConnectionEnd, GreetingError, Qmp, QmpError};
use crate::wait::{wait_until, WaitError};
use std::cell::RefCell;
use std::path::Path;
use std::time::{Duration, Instant};

/// What the check waits for, as [`WaitError`]s name it.
const WHAT: &str = "qemu to answer on QMP";
/// The pause between two connection attempts.
const RETRY: Duration = Duration::from_millis(5);

/// Waits up to `timeout` until the QMP server on `sock` has sent its greeting and answered
/// `qmp_capabilities`, reconnecting while the socket refuses or closes connections. `alive` is
/// checked between attempts and, during one, while the client waits (normally "QEMU still
/// runs"); its `Err` ends the wait at once.
///
/// Errors: [`WaitError::Timeout`] at the deadline; [`WaitError::Aborted`] when `alive` fails or
/// at once when the server cannot be a working QMP server: a first line that is not a
/// greeting, a line over [`MAX_LINE_BYTES`](super::MAX_LINE_BYTES), or an error reply to
/// `qmp_capabilities`. Lines between the greeting and the reply that are not the reply (events,
/// garbage) are skipped.
pub fn wait_ready(sock: &Path, timeout: Duration, alive: impl FnMut() -> Result<(), String>) -> Result<(), WaitError> {
    let deadline = Instant::now() + timeout;
    // Asked by `wait_until` between attempts and by the client during one, never at once.
    let alive = RefCell::new(alive);
    let ask = || (alive.borrow_mut())();
    let attempt = || {
        let left = deadline.saturating_duration_since(Instant::now());
        // The connection closes as the client is dropped, freeing QMP for the caller.
        judge(sock, Qmp::connect_while(sock, left, ask).map(drop))
    };
    wait_until(WHAT, timeout, RETRY, ask, attempt)
        .and_then(|verdict| verdict.map_err(|reason| WaitError::Aborted { what: WHAT.into(), reason }))
}

/// What one attempt on `sock` says: `None` to try again (the socket is not there or not
/// listening yet, or the connection was lost; at the deadline `wait_until` gives up),
/// `Some(Err(reason))` when the liveness check failed or the server cannot be a working QMP
/// server.
fn judge(sock: &Path, attempt: Result<(), QmpError>) -> Option<Result<(), String>> {
    let lost = |end: &ConnectionEnd| !matches!(end, ConnectionEnd::LineTooLong { .. });
    match attempt {
        Ok(()) => Some(Ok(())),
        Err(QmpError::Connect { source, .. }) => {
            log::debug!("qmp ready check: cannot connect yet ({source})");
            None
        }
        Err(QmpError::Greeting { problem: GreetingError::Timeout { .. }, .. }) | Err(QmpError::Timeout { .. }) => None,
        Err(QmpError::Greeting { problem: GreetingError::Lost(end), .. }) if lost(&end) => {
            log::debug!("qmp ready check: {end}; reconnecting");
            None
        }
        Err(QmpError::Disconnected { reason, .. }) if lost(&reason) => {
            log::debug!("qmp ready check: {reason}; reconnecting");
            None
        }
        Err(QmpError::Send { source, .. }) => {
            log::debug!("qmp ready check: cannot send qmp_capabilities ({source}); reconnecting");
            None
        }
        Err(QmpError::Abandoned { reason, .. })
        | Err(QmpError::Greeting { problem: GreetingError::Abandoned { reason }, .. }) => Some(Err(reason)),
        Err(QmpError::Greeting { problem, .. }) => Some(Err(format!("qmp at {}: {problem}", sock.display()))),
        Err(e) => Some(Err(format!("qmp at {}: {e}", sock.display()))),
    }
}

#[cfg(test)]
mod tests {
    use super::super::fake::{FakeQmp, Peer, GREETING};
    use super::super::MAX_LINE_BYTES;
    use super::*;
    use serde_json::{json, Value};
    use std::time::Instant;

    /// Far beyond any deadline used below.
    const MARGIN: Duration = Duration::from_secs(10);

    /// `wait_ready` against a server running `script` on every connection; the result and how
    /// long it took (panics if it took `timeout + MARGIN`).
    fn check(timeout: Duration, script: impl FnMut(&mut Peer) + Send + 'static) -> (Result<(), WaitError>, Duration) {
        let fake = FakeQmp::start(script);
        let path = fake.path.clone();
        let (tx, rx) = crossbeam_channel::bounded(1);
        let started = Instant::now();
        std::thread::spawn(move || {
            let _ = tx.send(wait_ready(&path, timeout, || Ok(())));
        });
        let r = rx.recv_timeout(timeout + MARGIN).expect("wait_ready did not return");
        (r, started.elapsed())
    }

    fn aborted(r: Result<(), WaitError>) -> String {
        match r {
            Err(WaitError::Aborted { reason, .. }) => reason,
            other => panic!("not aborted: {other:?}"),
        }
    }

    #[test]
    fn a_server_that_answers_is_ready_despite_events_and_garbage_before_the_reply() {
        let (r, _) = check(MARGIN, |p| {
            p.line(GREETING);
            let cmd = p.command().unwrap_or(Value::Null);
            assert_eq!(cmd, json!({"execute": "qmp_capabilities", "id": 1}));
            p.line(r#"{"event": "RESUME"}"#);
            p.send(b"\xff garbage\n");
            p.line(r#"{"return": {}, "id": 2}"#); // not ours
            p.line(r#"{"return": {}, "id": 1}"#);
            p.hold();
        });
        r.unwrap();
    }

    #[test]
    fn a_first_line_that_is_not_a_greeting_aborts_at_once() {
        for first in ["Welcome to QEMU", r#"{"event": "RESET"}"#, r#"{"return": {}, "id": 1}"#] {
            let (r, _) = check(Duration::from_secs(60), move |p| {
                p.line(first);
                p.hold();
            });
            let reason = aborted(r);
            assert!(reason.contains("the first line is"), "{first}: {reason}");
        }
    }

    #[test]
    fn a_line_over_the_limit_aborts_at_once() {
        let (r, _) = check(Duration::from_secs(60), |p| {
            p.line(GREETING);
            p.command();
            p.send(&vec![b'{'; MAX_LINE_BYTES + 1]);
            p.hold();
        });
        assert!(aborted(r).contains("longer than"));
    }

    #[test]
    fn an_error_reply_to_capabilities_aborts_naming_it() {
        let (r, _) = check(Duration::from_secs(60), |p| {
            p.line(GREETING);
            let cmd = p.command().unwrap_or(Value::Null);
            p.line(&json!({"error": {"desc": "nope"}, "id": cmd["id"]}).to_string());
            p.hold();
        });
        let reason = aborted(r);
        assert!(reason.contains("(missing): nope"), "{reason}");
    }

    #[test]
    fn a_server_that_greets_and_never_answers_times_out_at_the_deadline() {
        let timeout = Duration::from_millis(300);
        let (r, took) = check(timeout, |p| {
            p.line(GREETING);
            p.hold();
        });
        assert!(matches!(r, Err(WaitError::Timeout { .. })), "{r:?}");
        assert!(took >= timeout, "{took:?}");
    }

    #[test]
    fn a_server_that_always_closes_mid_line_times_out_at_the_deadline() {
        let timeout = Duration::from_millis(300);
        let (r, took) = check(timeout, |p| p.send(b"{\"QMP\": {\"vers"));
        assert!(matches!(r, Err(WaitError::Timeout { .. })), "{r:?}");
        assert!(took >= timeout, "{took:?}");
    }

    #[test]
    fn a_failing_liveness_check_aborts_without_a_server() {
        let dir = tempfile::tempdir().unwrap();
        let r = wait_ready(&dir.path().join("none.sock"), Duration::from_secs(60), || Err("qemu exited".into()));
        assert!(aborted(r).contains("qemu exited"));
    }

    #[test]
    fn the_check_closes_its_connection_so_qmp_is_free_afterwards() {
        let (tx, closed) = crossbeam_channel::unbounded();
        let (r, _) = check(MARGIN, move |p| {
            p.negotiate();
            let _ = tx.send(p.sees_close());
        });
        r.unwrap();
        assert_eq!(closed.recv_timeout(MARGIN), Ok(true), "the server still has the check as its client");
    }

    #[test]
    fn a_liveness_check_that_fails_during_an_attempt_ends_it_at_once() {
        let silent: fn(&mut Peer) = |p| p.hold();
        let greets: fn(&mut Peer) = |p| {
            p.line(GREETING);
            p.hold();
        };
        for (what, script) in [("greeting", silent), ("reply", greets)] {
            let fake = FakeQmp::start(script);
            let mut asked = 0;
            let started = Instant::now();
            let r = wait_ready(&fake.path, Duration::from_secs(60), || {
                asked += 1;
                if asked > 3 {
                    Err("qemu exited".into())
                } else {
                    Ok(())
                }
            });
            assert_eq!(aborted(r), "qemu exited", "waiting for the {what}");
            assert!(started.elapsed() < MARGIN, "waiting for the {what}: {:?}", started.elapsed());
        }
    }
}
