//! A fixed-window rate limit for reports a port sends unasked (decode errors), with the count
//! of what it held back. Pure: time is passed in.

/// Admits at most `per_window` reports per `window_ns`; counts the rest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReportLimiter {
    per_window: u32,
    window_ns: u64,
    window_start: Option<u64>,
    sent: u32,
    suppressed: u64,
    suppressed_total: u64,
}

impl ReportLimiter {
    /// At most `per_window` reports per `window_ns` nanoseconds.
    pub fn new(per_window: u32, window_ns: u64) -> Self {
        ReportLimiter { per_window, window_ns, window_start: None, sent: 0, suppressed: 0, suppressed_total: 0 }
    }

    /// Whether a report may go out at `now_ns`. `Some(n)`: send it, saying that `n` reports
    /// were held back since the last one sent; `None`: hold it back (counted).
    pub fn admit(&mut self, now_ns: u64) -> Option<u64> {
        let fresh = match self.window_start {
            Some(start) => now_ns.saturating_sub(start) >= self.window_ns,
            None => true,
        };
        if fresh {
            self.window_start = Some(now_ns);
            self.sent = 0;
        }
        if self.sent >= self.per_window {
            self.suppressed += 1;
            self.suppressed_total += 1;
            return None;
        }
        self.sent += 1;
        Some(std::mem::take(&mut self.suppressed))
    }

    /// Reports held back since the limiter was made.
    pub fn suppressed_total(&self) -> u64 {
        self.suppressed_total
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEC: u64 = 1_000_000_000;

    #[test]
    fn a_burst_is_cut_at_the_limit_and_the_next_window_says_how_many_were_held_back() {
        let mut l = ReportLimiter::new(3, SEC);
        let burst: Vec<Option<u64>> = (0..10).map(|i| l.admit(100 + i)).collect();
        assert_eq!(burst, vec![Some(0), Some(0), Some(0), None, None, None, None, None, None, None]);
        assert_eq!(l.admit(100 + SEC - 1), None, "still the first window");
        assert_eq!(l.admit(100 + SEC), Some(8));
        assert_eq!(l.admit(100 + SEC + 1), Some(0));
        assert_eq!(l.suppressed_total(), 8);
    }

    #[test]
    fn a_steady_trickle_under_the_limit_is_never_held_back() {
        let mut l = ReportLimiter::new(2, SEC);
        for i in 0..100 {
            assert_eq!(l.admit(i * SEC / 2), Some(0), "report {i}");
        }
    }

    #[test]
    fn a_zero_limit_holds_everything_back() {
        let mut l = ReportLimiter::new(0, SEC);
        assert_eq!(l.admit(0), None);
        assert_eq!(l.admit(5 * SEC), None);
        assert_eq!(l.suppressed_total(), 2);
    }
}
