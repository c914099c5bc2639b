//! The fault suite's summary: per fault, over its repetitions, what recovery cost (the table
//! docs/reliability.md quotes).

use super::case::Leg;
use super::Fault;
use std::fmt::Write as _;
use std::time::Duration;

/// One case's figures, both streams together.
#[derive(Debug, Clone, PartialEq)]
pub struct CaseFigures {
    /// The fault.
    pub fault: Fault,
    /// Whether the case passed (both streams whole: nothing acknowledged lost, nothing stored
    /// twice).
    pub passed: bool,
    /// Bytes sent again into the guest (in flight, unacknowledged, when a session ended).
    pub resent: u64,
    /// Bytes the host received twice and dropped.
    pub duplicates: u64,
    /// From the fault to READY again (the later of the two streams; for QEMU killed, the
    /// new VM's boot).
    pub ready: Option<Duration>,
    /// From the fault to the stream's resumption (the later of the two).
    pub resumed: Option<Duration>,
}

impl CaseFigures {
    /// The figures of a case whose streams were `into` and `out`.
    pub(super) fn of(fault: Fault, passed: bool, into: &Leg, out: &Leg) -> CaseFigures {
        let later = |a: Option<Duration>, b: Option<Duration>| a.max(b);
        CaseFigures {
            fault,
            passed,
            resent: into.result.as_ref().map_or(0, |r| r.resent),
            duplicates: out.result.as_ref().map_or(0, |r| r.duplicates),
            ready: later(into.back_to_ready, out.back_to_ready),
            resumed: later(into.resumed, out.resumed),
        }
    }
}

fn median_max<T: Ord + Copy>(mut v: Vec<T>) -> Option<(T, T)> {
    v.sort_unstable();
    Some((*v.get(v.len() / 2)?, *v.last()?))
}

fn ms(v: Vec<Duration>) -> String {
    median_max(v.iter().map(Duration::as_millis).collect()).map_or("-".into(), |(m, x)| format!("{m} / {x}"))
}

/// The table: one row per fault that ran, in the suite's order.
pub fn render(figures: &[CaseFigures]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<22} {:>6} {:>13} {:>17} {:>17} {:>14} {:>14}",
        "fault", "cases", "whole", "resent B med/max", "dup. dropped max", "READY ms m/x", "resumed ms m/x"
    );
    for fault in Fault::ALL {
        let rows: Vec<&CaseFigures> = figures.iter().filter(|f| f.fault == fault).collect();
        if rows.is_empty() {
            continue;
        }
        let whole = rows.iter().filter(|f| f.passed).count();
        let resent =
            median_max(rows.iter().map(|f| f.resent).collect()).map_or("-".into(), |(m, x)| format!("{m} / {x}"));
        let duplicates = rows.iter().map(|f| f.duplicates).max().unwrap_or(0);
        let ready = ms(rows.iter().filter_map(|f| f.ready).collect());
        let resumed = ms(rows.iter().filter_map(|f| f.resumed).collect());
        let _ = writeln!(
            out,
            "{:<22} {:>6} {:>13} {:>17} {:>17} {:>14} {:>14}",
            fault.name(),
            rows.len(),
            format!("{whole} of {}", rows.len()),
            resent,
            duplicates,
            ready,
            resumed
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fig(fault: Fault, passed: bool, resent: u64, ready_ms: u64) -> CaseFigures {
        CaseFigures {
            fault,
            passed,
            resent,
            duplicates: 0,
            ready: Some(Duration::from_millis(ready_ms)),
            resumed: None,
        }
    }

    #[test]
    fn each_fault_gets_its_median_and_max_and_a_failure_shows_in_whole() {
        let figs = [
            fig(Fault::HostDrop, true, 10, 5),
            fig(Fault::HostDrop, true, 30, 9),
            fig(Fault::HostDrop, false, 20, 7),
            fig(Fault::StopCont, true, 0, 1),
        ];
        let table = render(&figs);
        let host_drop = table.lines().find(|l| l.starts_with("host-drop ")).unwrap();
        assert!(host_drop.contains("2 of 3"), "{host_drop}");
        assert!(host_drop.contains("20 / 30"), "{host_drop}");
        assert!(host_drop.contains("7 / 9"), "{host_drop}");
        assert!(host_drop.trim_end().ends_with('-'), "no resumption measured: {host_drop}");
        assert!(table.lines().any(|l| l.starts_with("stop-cont ") && l.contains("1 of 1")));
        assert!(!table.contains("system-reset"), "a fault that did not run has no row");
    }
}
