//! The lost-wakeup re-check schedule (see the event loop's "Lost wakeups"): after a port with a
//! session moved bytes, it is looked at again [`RECHECK_STEPS`] after the last movement, one
//! step after the other, then no more. Pure bookkeeping: time is passed in, nothing is read.

use std::collections::HashMap;
use std::time::{Duration, Instant};

/// Delays of the re-checks after the last traffic, in order: at most three wakeups per burst of
/// traffic, none while idle.
pub const RECHECK_STEPS: [Duration; 3] =
    [Duration::from_millis(10), Duration::from_millis(100), Duration::from_millis(1000)];

/// Pending re-checks by port node name.
#[derive(Debug, Default)]
pub struct Rechecks {
    due: HashMap<String, (Instant, usize)>,
}

impl Rechecks {
    /// `dev` moved bytes at `now` in a session: restart its schedule from the first step.
    pub fn traffic(&mut self, dev: &str, now: Instant) {
        self.due.insert(dev.to_owned(), (now + RECHECK_STEPS[0], 0));
    }

    /// `dev` has no session any more (or is closed): no reply can be on its way.
    pub fn forget(&mut self, dev: &str) {
        self.due.remove(dev);
    }

    /// The earliest pending re-check, for the poll timeout.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.due.values().map(|(d, _)| *d).min()
    }

    /// The ports whose re-check is due at `now`, each moved to its next step (or dropped after
    /// the last one, or when `has_session` says it has none).
    pub fn take_due(&mut self, now: Instant, has_session: impl Fn(&str) -> bool) -> Vec<String> {
        let due: Vec<(String, usize)> =
            self.due.iter().filter(|(_, (d, _))| *d <= now).map(|(k, (_, i))| (k.clone(), *i)).collect();
        for (dev, step) in &due {
            match RECHECK_STEPS.get(step + 1) {
                Some(next) if has_session(dev) => {
                    self.due.insert(dev.clone(), (now + *next, step + 1));
                }
                _ => {
                    self.due.remove(dev);
                }
            }
        }
        due.into_iter().map(|(dev, _)| dev).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_costs_three_checks_then_nothing() {
        let t0 = Instant::now();
        let mut r = Rechecks::default();
        r.traffic("vport0p1", t0);
        assert!(r.take_due(t0, |_| true).is_empty(), "nothing before the first step");
        let mut at = t0;
        for step in RECHECK_STEPS {
            at += step;
            assert_eq!(r.next_deadline(), Some(at));
            assert_eq!(r.take_due(at, |_| true), vec!["vport0p1".to_string()]);
        }
        assert_eq!(r.next_deadline(), None, "idle after the last step");
    }

    #[test]
    fn traffic_restarts_the_schedule_and_no_session_drops_it() {
        let t0 = Instant::now();
        let mut r = Rechecks::default();
        r.traffic("a", t0);
        r.take_due(t0 + RECHECK_STEPS[0], |_| true);
        r.traffic("a", t0 + Duration::from_millis(50));
        assert_eq!(r.next_deadline(), Some(t0 + Duration::from_millis(50) + RECHECK_STEPS[0]));
        let later = t0 + Duration::from_secs(1);
        assert_eq!(r.take_due(later, |_| false), vec!["a".to_string()], "looked at once more");
        assert_eq!(r.next_deadline(), None, "then dropped: no session, no reply on its way");
        r.traffic("b", t0);
        r.forget("b");
        assert_eq!(r.next_deadline(), None);
    }
}
