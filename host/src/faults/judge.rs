//! The verdict of a fault case: both streams whole, the fault felt where it was aimed, and
//! (QEMU killed) the transfers failing fast and resuming on a new VM; and the matrix's figures.

use super::case::Leg;
use super::Fault;
use crate::report::Verdict;
use std::time::Duration;
use vport_common::pattern::StreamDigest;

/// How long after QEMU is killed the transfers in flight must have failed.
pub(super) const KILL_REPORT_LIMIT: Duration = Duration::from_secs(1);

/// What a case expected of its two streams: the size, each stream's digest, and whether the
/// file received on the host is byte for byte the guest's.
pub(super) struct Expected {
    pub(super) size: u64,
    pub(super) into_digest: u64,
    pub(super) out_digest: u64,
    pub(super) received_equal: bool,
}

/// What became of a VM that was replaced, and how long its successor took to boot.
pub(super) struct Restart {
    pub(super) qemu_gone: bool,
    pub(super) dir_gone: bool,
    pub(super) dir: std::path::PathBuf,
    pub(super) booted: Duration,
}

/// PASS when both streams ended whole and the fault interrupted the streams it was aimed at:
/// both for a per-port fault and for [`Fault::RestoreTwice`] (the VM paused before its save);
/// for another VM-wide fault the stream that injected it (in flight then; the other may have
/// ended before the fault took effect, during a migration's copy for one). FAIL otherwise, the
/// note naming every problem.
pub(super) fn judge(fault: Fault, want: &Expected, into: &Leg, out: &Leg) -> (Verdict, String, String) {
    let observed = format!("in: {}; out: {}", leg_summary(into, false), leg_summary(out, true));
    let mut problems = whole(want, into, out);
    let legs = [("to-guest", into), ("to-host", out)];
    let aimed: Vec<&(&str, &Leg)> = legs.iter().filter(|(_, leg)| fault.hits_both_streams() || leg.injected).collect();
    if aimed.is_empty() {
        problems.push("the fault was never injected: no stream reached a third".into());
    }
    for (what, leg) in aimed {
        if leg.result.as_ref().is_ok_and(|r| r.interruptions == 0) {
            problems.push(format!("{what}: the fault did not interrupt the stream"));
        }
    }
    verdict(observed, problems)
}

/// [`Fault::QemuKill`]: PASS when both transfers failed within [`KILL_REPORT_LIMIT`] of the
/// kill, QEMU and its directory were gone once its rig was dropped, and on the new VM both
/// transfers ended whole, the to-host one resumed from the host's part file.
pub(super) fn judge_kill(
    want: &Expected,
    (into, out): (&Leg, &Leg),
    restart: &Restart,
    (into2, out2): (&Leg, &Leg),
) -> (Verdict, String, String) {
    let mut problems = Vec::new();
    let mut failed = Vec::new();
    for (what, leg) in [("to-guest", into), ("to-host", out)] {
        match (&leg.result, leg.failed_after) {
            (Err(_), Some(after)) if after <= KILL_REPORT_LIMIT => {
                failed.push(format!("{what} {} ms", after.as_millis()))
            }
            (Err(_), Some(after)) => problems
                .push(format!("{what}: failed {} ms after the kill, over {KILL_REPORT_LIMIT:?}", after.as_millis())),
            (Err(e), None) => problems.push(format!("{what}: failed before the kill: {e}")),
            // The to-guest stream may have ended before the kill (it is not the one aimed at).
            (Ok(_), _) if what == "to-guest" => failed.push(format!("{what} done before the kill")),
            (Ok(_), _) => problems.push(format!("{what}: ended although QEMU was killed")),
        }
    }
    if !restart.qemu_gone {
        problems.push("the killed QEMU is still there".into());
    }
    if !restart.dir_gone {
        problems.push(format!("{} is still there", restart.dir.display()));
    }
    problems.extend(whole(want, into2, out2));
    if out2.result.as_ref().is_ok_and(|r| r.started_at == 0) {
        problems.push("to-host: started again from 0 instead of resuming from the host's part file".into());
    }
    let observed = format!(
        "failed after the kill: {}; QEMU {}, its directory {}; new VM in {} ms; then in: {}; out: {}",
        if failed.is_empty() { "-".into() } else { failed.join(", ") },
        if restart.qemu_gone { "gone" } else { "STILL THERE" },
        if restart.dir_gone { "removed" } else { "STILL THERE" },
        restart.booted.as_millis(),
        leg_summary(into2, false),
        leg_summary(out2, true)
    );
    verdict(observed, problems)
}

/// [`Fault::RestoreTwice`]: PASS when the first pass is a PASS of [`judge`] (through the first
/// restore, which took `migrated`), and after the second restore (`restored`) both transfers
/// ended whole with nothing delivered twice: the to-host one moved no byte (the host
/// recognised its whole file), the to-guest one resumed where the rewound guest stood.
pub(super) fn judge_restored_twice(
    want: &Expected,
    (into, out): (&Leg, &Leg),
    migrated: Option<Duration>,
    restored: Duration,
    (into2, out2): (&Leg, &Leg),
) -> (Verdict, String, String) {
    let (_, first, first_note) = judge(Fault::RestoreTwice, want, into, out);
    let mut problems: Vec<String> = Some(first_note).filter(|n| !n.is_empty()).into_iter().collect();
    problems.extend(whole(want, into2, out2).into_iter().map(|p| format!("after the second restore, {p}")));
    if let Ok(r) = &out2.result {
        if r.started_at != r.bytes {
            problems.push(format!(
                "after the second restore, to-host: {} bytes received again although the host held the stream whole",
                r.bytes - r.started_at
            ));
        }
    }
    let resumed_at = |leg: &Leg| leg.result.as_ref().map_or("-".into(), |r| r.started_at.to_string());
    let observed = format!(
        "restored in {} ms; {first}; restored again in {} ms, then in: resumed at {} B ({}); out: {} B moved ({})",
        migrated.map_or("-".into(), |d| d.as_millis().to_string()),
        restored.as_millis(),
        resumed_at(into2),
        leg_summary(into2, false),
        out2.result.as_ref().map_or("-".into(), |r| (r.bytes - r.started_at).to_string()),
        leg_summary(out2, true)
    );
    verdict(observed, problems)
}

/// [`Fault::HostDropQueueFull`]: the verdict of [`judge`], failed when QEMU never throttled
/// the port (the out queue did not fill, so the fault was not the one named).
pub(super) fn judge_throttled(
    (verdict, observed, note): (Verdict, String, String),
    throttled: bool,
) -> (Verdict, String, String) {
    if throttled {
        return (verdict, format!("QEMU throttled the port before the host left; {observed}"), note);
    }
    let why = "QEMU never throttled the port: the out queue did not fill";
    (Verdict::Fail, observed, if note.is_empty() { why.into() } else { format!("{why}; {note}") })
}

fn verdict(observed: String, problems: Vec<String>) -> (Verdict, String, String) {
    if problems.is_empty() {
        (Verdict::Pass, observed, String::new())
    } else {
        (Verdict::Fail, observed, problems.join("; "))
    }
}

/// What keeps both streams from being whole: a failure, a wrong length or digest, a received
/// file that differs from the guest's.
fn whole(want: &Expected, into: &Leg, out: &Leg) -> Vec<String> {
    let mut problems = Vec::new();
    for (what, leg, digest) in [("to-guest", into, want.into_digest), ("to-host", out, want.out_digest)] {
        match &leg.result {
            Ok(r) if r.bytes == want.size && r.digest == digest => {}
            Ok(r) => {
                problems.push(format!("{what}: {} bytes, digest {:#x}, expected {:#x}", r.bytes, r.digest, digest))
            }
            Err(e) => problems.push(format!("{what}: {e}")),
        }
    }
    if out.result.is_ok() && !want.received_equal {
        problems.push("to-host: the received file differs from the guest's".into());
    }
    problems
}

pub(super) fn digest_of(bytes: &[u8]) -> u64 {
    let mut d = StreamDigest::new();
    d.update(bytes);
    d.digest()
}

/// One stream's figures for the matrix. The duplicates are known where the host receives; the
/// resent bytes where it sends.
fn leg_summary(leg: &Leg, host_receives: bool) -> String {
    let ms = |d: Option<Duration>| d.map_or("-".into(), |d| format!("{} ms", d.as_millis()));
    match &leg.result {
        Ok(r) => format!(
            "{} B whole, {} session(s), {}, READY after {}, resumed after {}",
            r.bytes,
            r.sessions,
            if host_receives {
                format!("duplicates dropped {} B", r.duplicates)
            } else {
                format!("resent {} B", r.resent)
            },
            ms(leg.back_to_ready),
            ms(leg.resumed)
        ),
        Err(e) => format!("failed: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_stream_and_a_fault_that_interrupted_nothing_are_reported_as_such() {
        let failed = Leg {
            result: Err(crate::stream::TransferError::Protocol { port: "p".into(), id: 1, detail: "x".into() }),
            back_to_ready: None,
            resumed: None,
            failed_after: None,
            injected: false,
        };
        assert!(leg_summary(&failed, true).starts_with("failed: "));
        let report = crate::stream::TransferReport {
            id: 1,
            bytes: 10,
            digest: 2,
            sessions: 2,
            interruptions: 1,
            resent: 3,
            duplicates: 0,
            started_at: 0,
            elapsed: Duration::ZERO,
        };
        let ok = Leg {
            result: Ok(report.clone()),
            back_to_ready: Some(Duration::from_millis(12)),
            resumed: None,
            failed_after: None,
            injected: true,
        };
        assert_eq!(leg_summary(&ok, false), "10 B whole, 2 session(s), resent 3 B, READY after 12 ms, resumed after -");
        let want = Expected { size: 10, into_digest: 2, out_digest: 2, received_equal: true };
        let leg_of = |interruptions, injected| Leg {
            result: Ok(crate::stream::TransferReport { interruptions, ..report.clone() }),
            back_to_ready: None,
            resumed: None,
            failed_after: None,
            injected,
        };
        let again = |interruptions| leg_of(interruptions, true);
        assert_eq!(judge(Fault::HostDrop, &want, &again(1), &again(1)).0, Verdict::Pass);
        let (v, _, note) = judge(Fault::HostDrop, &want, &again(0), &again(1));
        assert_eq!(v, Verdict::Fail);
        assert!(note.contains("to-guest: the fault did not interrupt"), "{note}");
        // A VM-wide fault is aimed at the stream that injected it only.
        let (by_host, untouched_in) = (leg_of(1, true), leg_of(0, false));
        assert_eq!(judge(Fault::StopCont, &want, &untouched_in, &by_host).0, Verdict::Pass);
        let (v, _, note) = judge(Fault::StopCont, &want, &leg_of(1, true), &leg_of(0, false));
        assert_eq!(v, Verdict::Pass, "{note}");
        let (v, _, note) = judge(Fault::StopCont, &want, &leg_of(0, true), &leg_of(1, false));
        assert!(v == Verdict::Fail && note.contains("to-guest: the fault did not interrupt"), "{note}");
        let (v, _, note) = judge(Fault::StopCont, &want, &untouched_in, &leg_of(1, false));
        assert!(v == Verdict::Fail && note.contains("never injected"), "{note}");
        let (v, _, note) = judge(Fault::StopCont, &want, &again(1), &failed);
        assert_eq!(v, Verdict::Fail);
        assert!(note.contains("to-host: "), "{note}");
        // Restoring a saved state is aimed at both (the VM was paused before the save).
        let (v, _, note) = judge(Fault::RestoreTwice, &want, &untouched_in, &by_host);
        assert!(v == Verdict::Fail && note.contains("to-guest: the fault did not interrupt"), "{note}");
        let wrong = Expected { out_digest: 3, ..want };
        let (v, _, note) = judge(Fault::HostDrop, &wrong, &again(1), &again(1));
        assert!(v == Verdict::Fail && note.contains("expected 0x3"), "{note}");
        let changed = Expected { received_equal: false, ..want };
        assert!(judge(Fault::HostDrop, &changed, &again(1), &again(1)).2.contains("differs"));
    }

    fn report(started_at: u64) -> crate::stream::TransferReport {
        crate::stream::TransferReport {
            id: 1,
            bytes: 10,
            digest: 2,
            sessions: 1,
            interruptions: 0,
            resent: 0,
            duplicates: 0,
            started_at,
            elapsed: Duration::ZERO,
        }
    }

    fn leg(result: Result<crate::stream::TransferReport, crate::stream::TransferError>, failed_ms: Option<u64>) -> Leg {
        let failed_after = failed_ms.map(Duration::from_millis);
        Leg { result, back_to_ready: None, resumed: None, failed_after, injected: true }
    }

    fn failed(ms: Option<u64>) -> Leg {
        let e = crate::stream::TransferError::Protocol { port: "p".into(), id: 1, detail: "vm gone".into() };
        leg(Err(e), ms)
    }

    #[test]
    fn a_kill_must_fail_the_transfers_at_once_leave_nothing_and_let_them_resume() {
        let want = Expected { size: 10, into_digest: 2, out_digest: 2, received_equal: true };
        let clean = Restart { qemu_gone: true, dir_gone: true, dir: "/tmp/x".into(), booted: Duration::from_secs(4) };
        let resumed = leg(Ok(report(4)), None);
        let (v, observed, note) = judge_kill(&want, (&failed(Some(3)), &failed(Some(4))), &clean, (&resumed, &resumed));
        assert_eq!(v, Verdict::Pass, "{note}");
        assert!(
            observed.contains("to-guest 3 ms, to-host 4 ms") && observed.contains("new VM in 4000 ms"),
            "{observed}"
        );
        // The to-guest stream may be done before the kill; the to-host one may not.
        let done = leg(Ok(report(0)), None);
        assert_eq!(judge_kill(&want, (&done, &failed(Some(3))), &clean, (&resumed, &resumed)).0, Verdict::Pass);
        let (v, _, note) = judge_kill(&want, (&failed(Some(3)), &done), &clean, (&resumed, &resumed));
        assert!(v == Verdict::Fail && note.contains("ended although QEMU was killed"), "{note}");
        let (v, _, note) = judge_kill(&want, (&failed(Some(3)), &failed(Some(1500))), &clean, (&resumed, &resumed));
        assert!(v == Verdict::Fail && note.contains("1500 ms after the kill"), "{note}");
        let left = Restart { dir_gone: false, ..clean };
        let (v, _, note) = judge_kill(&want, (&failed(Some(3)), &failed(Some(3))), &left, (&resumed, &resumed));
        assert!(v == Verdict::Fail && note.contains("/tmp/x is still there"), "{note}");
        let clean = Restart { dir_gone: true, ..left };
        let restarted = leg(Ok(report(0)), None);
        let (v, _, note) = judge_kill(&want, (&failed(Some(3)), &failed(Some(3))), &clean, (&resumed, &restarted));
        assert!(v == Verdict::Fail && note.contains("started again from 0"), "{note}");
    }

    #[test]
    fn a_second_restore_must_deliver_nothing_twice() {
        let want = Expected { size: 10, into_digest: 2, out_digest: 2, received_equal: true };
        let interrupted = leg(Ok(crate::stream::TransferReport { interruptions: 1, ..report(0) }), None);
        let (guest_resumed, host_kept) = (leg(Ok(report(4)), None), leg(Ok(report(10)), None));
        let first = (&interrupted, &interrupted);
        let ms = Some(Duration::from_millis(900));
        let (v, observed, note) =
            judge_restored_twice(&want, first, ms, Duration::from_millis(800), (&guest_resumed, &host_kept));
        assert_eq!(v, Verdict::Pass, "{note}");
        assert!(
            observed.starts_with("restored in 900 ms; in: ")
                && observed.contains("restored again in 800 ms, then in: resumed at 4 B")
                && observed.contains("out: 0 B moved"),
            "{observed}"
        );
        let received_again = leg(Ok(report(0)), None);
        let (v, _, note) = judge_restored_twice(&want, first, ms, Duration::ZERO, (&guest_resumed, &received_again));
        assert!(v == Verdict::Fail && note.contains("10 bytes received again"), "{note}");
        let (v, _, note) = judge_restored_twice(&want, first, ms, Duration::ZERO, (&failed(None), &host_kept));
        assert!(v == Verdict::Fail && note.starts_with("after the second restore, to-guest: "), "{note}");
        let untouched = leg(Ok(report(0)), None);
        let (v, _, note) =
            judge_restored_twice(&want, (&untouched, &untouched), ms, Duration::ZERO, (&guest_resumed, &host_kept));
        assert!(v == Verdict::Fail && note.contains("to-guest: the fault did not interrupt"), "{note}");
    }

    #[test]
    fn a_queue_that_never_filled_fails_the_case() {
        let passed = (Verdict::Pass, "in: x".to_string(), String::new());
        let (v, observed, _) = judge_throttled(passed.clone(), true);
        assert!(v == Verdict::Pass && observed.starts_with("QEMU throttled the port"), "{observed}");
        let (v, _, note) = judge_throttled(passed, false);
        assert!(v == Verdict::Fail && note.contains("never throttled"), "{note}");
        let (_, _, note) = judge_throttled((Verdict::Fail, String::new(), "to-host: lost".into()), false);
        assert!(note.ends_with("; to-host: lost"), "{note}");
    }
}
