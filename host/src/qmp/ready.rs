//! The start-up check: has QEMU's main loop started? QEMU answers QMP commands only from its
//! main loop, that is after machine set-up (the greeting alone can come earlier, from the
//! monitor I/O thread), so a reply to `qmp_capabilities` means the machine is set up and, for
//! example, the kernel was loaded.
//!
//! The check uses its own short-lived connection and closes it when done, so QMP is free for
//! the caller afterwards (QEMU serves one QMP client at a time on a socket). Reads are bounded
//! ([`MAX_LINE_BYTES`] a line, 64 KiB a step) and the whole check has one deadline; whatever
//! the server sends, it fails with a [`WaitError`], never a panic.

use super::{parse_message, Incoming, LineSplitter, LineTooLong, QmpParseError, MAX_LINE_BYTES};
use crate::wait::{wait_until, WaitError};
use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;
use thiserror::Error;

/// What the check waits for, as [`WaitError`]s name it.
const WHAT: &str = "qemu to answer on QMP";
/// The longest a single step blocks in a read before the deadline and the liveness check are
/// looked at again.
const STEP: Duration = Duration::from_millis(20);
/// The id of the check's `qmp_capabilities`.
const ID: u64 = 1;

/// Waits up to `timeout` until the QMP server on `sock` has sent its greeting and answered
/// `qmp_capabilities`, reconnecting while the socket refuses or closes connections. `alive` is
/// checked between steps (normally "QEMU still runs"); its `Err` ends the wait at once.
///
/// Errors: [`WaitError::Timeout`] at the deadline; [`WaitError::Aborted`] when `alive` fails or
/// at once when the server cannot be a working QMP server: a first line that is not a
/// greeting, a line over [`MAX_LINE_BYTES`], or an error reply to `qmp_capabilities`. Lines
/// between the greeting and the reply that are not the reply (events, garbage) are skipped.
pub fn wait_ready(sock: &Path, timeout: Duration, alive: impl FnMut() -> Result<(), String>) -> Result<(), WaitError> {
    let mut check = Check::default();
    wait_until(WHAT, timeout, Duration::from_millis(5), alive, || check.step(sock)).and_then(|verdict| {
        verdict.map_err(|e| WaitError::Aborted { what: WHAT.into(), reason: format!("qmp at {}: {e}", sock.display()) })
    })
}

/// Why the server cannot be a working QMP server.
#[derive(Debug, Error)]
enum NotQmp {
    #[error("the first line is {0}")]
    BadFirstLine(QmpParseError),
    #[error("the first line is {0}, not a greeting")]
    NotAGreeting(&'static str),
    #[error("the server sent {0}")]
    TooLong(LineTooLong),
    #[error("qmp_capabilities failed: {class}: {desc}")]
    Refused { class: String, desc: String },
}

#[derive(Default)]
struct Check {
    conn: Option<Conn>,
}

struct Conn {
    stream: UnixStream,
    lines: LineSplitter,
    greeted: bool,
}

/// What a connection's lines say so far.
enum Verdict {
    NotYet,
    Reconnect,
    Done(Result<(), NotQmp>),
}

impl Check {
    /// One step: connect if needed, read once (blocking at most [`STEP`]), judge the lines.
    /// `None` while the answer is still to come.
    fn step(&mut self, sock: &Path) -> Option<Result<(), NotQmp>> {
        if self.conn.is_none() {
            // Not there or not listening yet: the next step tries again.
            let stream = UnixStream::connect(sock).ok()?;
            stream.set_read_timeout(Some(STEP)).ok()?;
            stream.set_write_timeout(Some(STEP)).ok()?;
            self.conn = Some(Conn { stream, lines: LineSplitter::new(MAX_LINE_BYTES), greeted: false });
        }
        let conn = self.conn.as_mut()?;
        let verdict = conn.read().unwrap_or_else(|| conn.judge());
        match verdict {
            Verdict::NotYet => None,
            Verdict::Reconnect => {
                self.conn = None;
                None
            }
            Verdict::Done(v) => {
                // Closing the connection frees QMP for the caller.
                self.conn = None;
                Some(v)
            }
        }
    }
}

impl Conn {
    /// Reads what is there; `Some(Reconnect)` when the connection is gone.
    fn read(&mut self) -> Option<Verdict> {
        let mut chunk = vec![0u8; 64 * 1024];
        match self.stream.read(&mut chunk) {
            Ok(0) => {
                log::debug!("qmp ready check: the server closed the connection; reconnecting");
                Some(Verdict::Reconnect)
            }
            Ok(n) => {
                self.lines.push(&chunk[..n]);
                None
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted) => None,
            Err(e) => {
                log::debug!("qmp ready check: read failed ({e}); reconnecting");
                Some(Verdict::Reconnect)
            }
        }
    }

    /// Judges the complete lines received so far, sending `qmp_capabilities` after the greeting.
    fn judge(&mut self) -> Verdict {
        while let Some(line) = self.lines.next_line() {
            let line = match line {
                Ok(line) => line,
                Err(e) => return Verdict::Done(Err(NotQmp::TooLong(e))),
            };
            let message = parse_message(&line);
            if !self.greeted {
                match message {
                    Ok(Incoming::Greeting(_)) => {}
                    Ok(Incoming::Event(_)) => return Verdict::Done(Err(NotQmp::NotAGreeting("an event"))),
                    Ok(Incoming::Reply(_)) => return Verdict::Done(Err(NotQmp::NotAGreeting("a command reply"))),
                    Err(e) => return Verdict::Done(Err(NotQmp::BadFirstLine(e))),
                }
                let cmd = format!("{{\"execute\":\"qmp_capabilities\",\"id\":{ID}}}\n");
                if let Err(e) = self.stream.write_all(cmd.as_bytes()) {
                    log::debug!("qmp ready check: cannot send qmp_capabilities ({e}); reconnecting");
                    return Verdict::Reconnect;
                }
                self.greeted = true;
                continue;
            }
            match message {
                Ok(Incoming::Reply(r)) if r.numeric_id() == Some(ID) => {
                    log::debug!("qmp ready check: answered {:?}", r.outcome);
                    let missing = || super::MISSING.to_string();
                    return Verdict::Done(r.outcome.map(drop).map_err(|e| NotQmp::Refused {
                        class: e.class.unwrap_or_else(missing),
                        desc: e.desc.unwrap_or_else(missing),
                    }));
                }
                Ok(other) => log::debug!("qmp ready check: skipping {other:?}"),
                Err(e) => log::debug!("qmp ready check: skipping a line that is not a QMP message ({e})"),
            }
        }
        Verdict::NotYet
    }
}

#[cfg(test)]
mod tests {
    use super::super::fake::{FakeQmp, Peer, GREETING};
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
            assert_eq!(cmd, json!({"execute": "qmp_capabilities", "id": ID}));
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
}
