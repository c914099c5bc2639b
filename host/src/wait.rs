//! Deadline-bounded waiting: the only way vport code waits for something to happen.
//!
//! Every wait names what it waits for, has a deadline, and re-checks a liveness condition
//! (normally "QEMU is still running") so a dead VM fails the wait at once instead of at the
//! deadline.

use std::time::{Duration, Instant};

/// Why a [`wait_until`] gave up.
#[derive(Debug, thiserror::Error)]
pub enum WaitError {
    /// The condition did not hold before the deadline.
    #[error("timed out after {waited:?} waiting for {what}")]
    Timeout {
        /// What was being waited for.
        what: String,
        /// How long the wait lasted.
        waited: Duration,
    },
    /// The liveness check failed while waiting (for example QEMU exited).
    #[error("gave up waiting for {what}: {reason}")]
    Aborted {
        /// What was being waited for.
        what: String,
        /// Why the wait could not go on.
        reason: String,
    },
}

/// Polls `cond` until it returns `Some`, the `alive` check returns `Err`, or `timeout` passes.
///
/// `cond` is called at least once. Between calls the thread parks for `interval` at most;
/// this is a bounded poll of state that has no event source (a file appearing, a process
/// exiting), never a substitute for an available event.
pub fn wait_until<T>(
    what: &str,
    timeout: Duration,
    interval: Duration,
    mut alive: impl FnMut() -> Result<(), String>,
    mut cond: impl FnMut() -> Option<T>,
) -> Result<T, WaitError> {
    let start = Instant::now();
    loop {
        if let Some(v) = cond() {
            return Ok(v);
        }
        if let Err(reason) = alive() {
            // One last look: the condition may have become true just before the exit.
            if let Some(v) = cond() {
                return Ok(v);
            }
            return Err(WaitError::Aborted { what: what.to_string(), reason });
        }
        let waited = start.elapsed();
        if waited >= timeout {
            return Err(WaitError::Timeout { what: what.to_string(), waited });
        }
        std::thread::park_timeout(interval.min(timeout - waited));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn returns_value_when_condition_holds() {
        let mut n = 0;
        let v = wait_until(
            "n to reach 3",
            Duration::from_secs(5),
            Duration::from_millis(1),
            || Ok(()),
            || {
                n += 1;
                (n >= 3).then_some(n)
            },
        );
        assert_eq!(v.unwrap(), 3);
    }

    #[test]
    fn times_out_naming_what_it_waited_for() {
        let err = wait_until::<()>("never", Duration::from_millis(20), Duration::from_millis(5), || Ok(()), || None)
            .unwrap_err();
        assert!(matches!(err, WaitError::Timeout { .. }));
        assert!(err.to_string().contains("never"), "{err}");
    }

    #[test]
    fn aborts_when_liveness_fails() {
        let err = wait_until::<()>(
            "x",
            Duration::from_secs(60),
            Duration::from_millis(1),
            || Err("qemu exited with status 1".into()),
            || None,
        )
        .unwrap_err();
        assert!(err.to_string().contains("qemu exited"), "{err}");
    }
}
