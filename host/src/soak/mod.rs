//! `vport run soak`: the port's life cycle driven round many times on one real VM, to show that
//! nothing accumulates (docs/reliability.md, "Soak").
//!
//! One VM with two ports. On the first: the host leaves and comes back (`host-reconnects`), the
//! guest closes and reopens (`guest-reopens`), the VM is stopped and resumed (`stop-cont`), each
//! ending in a READY session every time. On the second, a file streams into the guest as an
//! acknowledged stream while the port is unplugged and plugged in again (`unplug-replug`); the
//! stream must end whole. Then `agent-resources` compares the agent's resident set and open file
//! descriptors with what they were before the first cycle (growth under 1 MiB, descriptors
//! equal), and `cleanup`, once the VM is gone, checks that its QEMU process and directory are
//! gone and that vport holds no more file descriptors than before it booted.
//!
//! `--quick` (in scripts/test) runs 1,000 reconnects, 500 reopens, 50 stop/cont and 10 replugs;
//! `--full` 10,000, 10,000, 1,000 and 100.

mod cycles;

use crate::image::initscript::GUEST_STREAM_DIR;
use crate::image::GuestImage;
use crate::qemu::AccelChoice;
use crate::report::{CaseResult, Environment, GroupError, RunEvent, RunReport, TraceVerdict, Verdict};
use crate::rig::{vm_config, Rig};
use crate::stream::TransferOptions;
use cycles::CycleFigures;
use std::path::PathBuf;
use std::time::{Duration, Instant};
use vport_common::pattern;

const GROUP: &str = "soak";
const PORT_CYCLES: &str = "org.vport.soak.cycles";
const PORT_REPLUG: &str = "org.vport.soak.replug";
/// The guest file the unplug cycles stream into.
const GUEST_FILE: &str = "soak-in.bin";
/// Bytes each session acknowledges before its port is unplugged.
const REPLUG_STEP: u64 = 64 << 10;
/// The window of the stream the port is unplugged under: small, so that the guest file of
/// `--full`'s 100 sessions stays small.
const REPLUG_WINDOW: u32 = 128 << 10;
/// How much the agent's resident set may grow over the soak.
pub const RSS_GROWTH_LIMIT_KIB: u64 = 1024;

/// How many of each cycle a soak runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SoakCounts {
    /// Host disconnects and reconnects.
    pub reconnects: u64,
    /// Guest closes and reopens.
    pub reopens: u64,
    /// `stop` / `cont` pairs.
    pub stop_conts: u64,
    /// Unplugs and replugs under traffic.
    pub replugs: u64,
}

impl SoakCounts {
    /// `--quick`, for CI: 1,000, 500, 50, 10.
    pub const QUICK: SoakCounts = SoakCounts { reconnects: 1000, reopens: 500, stop_conts: 50, replugs: 10 };
    /// `--full`: 10,000, 10,000, 1,000, 100.
    pub const FULL: SoakCounts = SoakCounts { reconnects: 10_000, reopens: 10_000, stop_conts: 1_000, replugs: 100 };
}

/// How the soak runs.
#[derive(Debug, Clone)]
pub struct SoakOptions {
    /// The guest image.
    pub image: GuestImage,
    /// Accelerator.
    pub accel: AccelChoice,
    /// Which QEMU, machine type and vCPU count the VMs run on.
    pub platform: crate::qemu::Platform,
    /// The cycles.
    pub counts: SoakCounts,
}

/// The cases, in order, with what each checks and expects.
const CASES: [(&str, &str, &str); 6] = [
    ("host-reconnects", "the host leaves and connects again", "READY every time; the agent counts each session"),
    (
        "guest-reopens",
        "the agent closes the port and opens it again (REOPEN)",
        "READY every time; the agent counts each open",
    ),
    ("stop-cont", "stop, cont", "READY every time after cont"),
    (
        "unplug-replug",
        "the port is unplugged and plugged in again while a file streams into the guest",
        "READY after every replug; the stream ends whole (digest equal), interrupted by each unplug",
    ),
    (
        "agent-resources",
        "the agent's resident set and open descriptors before the first cycle and after the last",
        "RSS grows by less than 1024 KiB; open descriptors equal",
    ),
    (
        "cleanup",
        "the VM is shut down",
        "no QEMU process, no VM directory; vport's descriptors back to their count before boot",
    ),
];

fn not_run(name: &str, spec: &str, expected: &str, why: &str) -> CaseResult {
    case_result(name, spec, expected, Verdict::NotRun, String::new(), why.into(), Duration::ZERO)
}

fn case_result(
    name: &str,
    spec: &str,
    expected: &str,
    verdict: Verdict,
    observed: String,
    note: String,
    duration: Duration,
) -> CaseResult {
    CaseResult {
        name: name.into(),
        group: GROUP.into(),
        spec: spec.into(),
        expected: expected.into(),
        observed,
        verdict,
        note,
        trace: TraceVerdict::NotRecorded,
        duration,
    }
}

/// Runs the soak; every event goes to `events` as it happens; the report is their fold.
pub fn run(opts: &SoakOptions, events: &mut dyn FnMut(&RunEvent)) -> RunReport {
    let started = Instant::now();
    let mut report = RunReport::new(GROUP);
    let mut emit = |ev: RunEvent, report: &mut RunReport| {
        events(&ev);
        report.apply(&ev);
    };
    emit(RunEvent::RunStarted { suite: GROUP.into(), cases: CASES.len() }, &mut report);
    emit(RunEvent::GroupStarted { group: GROUP.into(), cases: CASES.len() }, &mut report);
    let mut environment = Environment::default();
    let fds_before = host_fds();
    let mut finished = 0;
    match boot(opts, &mut environment) {
        Err(error) => {
            emit(RunEvent::GroupFailed(GroupError { group: GROUP.into(), error: error.clone() }), &mut report);
        }
        Ok(mut soak) => {
            for (i, (name, spec, expected)) in CASES.iter().enumerate().take(CASES.len() - 1) {
                emit(RunEvent::CaseStarted { group: GROUP.into(), name: (*name).into() }, &mut report);
                let t0 = Instant::now();
                let mut progress = |done: u64, total: u64| {
                    let ev = RunEvent::CaseProgress { name: (*name).into(), done, total };
                    emit(ev, &mut report)
                };
                let outcome = soak.case(i, &mut progress);
                let (verdict, observed, note) = match outcome {
                    Ok((ok, observed)) => (if ok { Verdict::Pass } else { Verdict::Fail }, observed, String::new()),
                    Err(e) => (Verdict::Error, String::new(), format!("{e}\n{}", soak.rig.failure_context())),
                };
                let result = case_result(name, spec, expected, verdict, observed, note, t0.elapsed());
                emit(RunEvent::CaseFinished(result), &mut report);
            }
            let (pid, dir) = (soak.rig.vm.pid(), soak.rig.vm.dir().to_path_buf());
            drop(soak);
            let (name, spec, expected) = CASES[5];
            emit(RunEvent::CaseStarted { group: GROUP.into(), name: name.into() }, &mut report);
            // QMP's reader thread lets go of its descriptor as it ends: wait (bounded) for the
            // count to come back down before judging it.
            let fds_after = crate::wait::wait_until(
                "vport's descriptors to come back to their count",
                crate::speed::scaled(Duration::from_secs(2)),
                Duration::from_millis(10),
                || Ok(()),
                || Some(host_fds()).filter(|n| *n <= fds_before),
            )
            .unwrap_or_else(|_| host_fds());
            let (ok, observed) = judge_cleanup(pid, &dir, fds_before, fds_after);
            let verdict = if ok { Verdict::Pass } else { Verdict::Fail };
            let result = case_result(name, spec, expected, verdict, observed, String::new(), Duration::ZERO);
            emit(RunEvent::CaseFinished(result), &mut report);
            finished = CASES.len();
        }
    }
    for (name, spec, expected) in &CASES[finished..] {
        let why = "the soak's VM could not be set up";
        emit(RunEvent::CaseFinished(not_run(name, spec, expected, why)), &mut report);
    }
    emit(RunEvent::RunFinished { environment, elapsed: started.elapsed() }, &mut report);
    report
}

/// The soak's VM and what its cases share.
struct Soak {
    rig: Rig,
    cycles: crate::session::PortServer,
    replug: Option<crate::session::PortServer>,
    work: crate::qemu::WorkDir,
    counts: SoakCounts,
    /// The agent's resident set (KiB) and open descriptors before the first cycle.
    baseline: (u64, u64),
}

fn boot(opts: &SoakOptions, env: &mut Environment) -> Result<Soak, String> {
    let args: Vec<String> =
        ["--log-level", "info", "--stream-dir", GUEST_STREAM_DIR].iter().map(|a| a.to_string()).collect();
    let mut cfg = vm_config(&opts.image, &[PORT_CYCLES, PORT_REPLUG], &args);
    cfg.accel = opts.accel;
    opts.platform.apply(&mut cfg);
    let mut rig = Rig::launch(cfg).map_err(|e| format!("cannot boot the vm: {e}"))?;
    env.accel = rig.vm.accel().to_string();
    if let Ok(v) = rig.qmp.query_version() {
        env.qemu_version = format!("{}.{}.{} ({})", v.major, v.minor, v.micro, v.package.trim());
    }
    let mut cycles = rig.port_server(PORT_CYCLES).map_err(|e| e.to_string())?;
    let replug = rig.port_server(PORT_REPLUG).map_err(|e| e.to_string())?;
    rig.resume().map_err(|e| e.to_string())?;
    let mut first = cycles
        .accept(Duration::from_secs(120))
        .map_err(|e| format!("the agent did not come up: {e}\n{}", rig.failure_context()))?;
    env.kernel_release.clone_from(&first.handshake().hello.kernel_release);
    let baseline = cycles::agent_usage(&mut first).map_err(|e| format!("the agent's usage before the soak: {e}"))?;
    drop(first);
    let work = crate::qemu::WorkDir::create().map_err(|e| format!("cannot make a work directory: {e}"))?;
    Ok(Soak { rig, cycles, replug: Some(replug), work, counts: opts.counts, baseline })
}

impl Soak {
    /// Case `i` of [`CASES`] (not `cleanup`): `(passed, observed)`, or an error that stopped
    /// it.
    fn case(&mut self, i: usize, progress: &mut dyn FnMut(u64, u64)) -> Result<(bool, String), String> {
        let c = self.counts;
        // Progress every tenth, at least every 500 cycles.
        let every = |total: u64| (total / 10).clamp(1, 500);
        match i {
            0 => {
                let n = c.reconnects;
                let fig = cycles::host_reconnects(&mut self.cycles, n, &mut |d| tick(progress, d, n, every(n)))?;
                Ok(judge_counted(&fig, n, "sessions"))
            }
            1 => {
                let n = c.reopens;
                let fig = cycles::guest_reopens(&mut self.cycles, n, &mut |d| tick(progress, d, n, every(n)))?;
                Ok(judge_counted(&fig, n, "opens"))
            }
            2 => {
                let (n, qmp) = (c.stop_conts, self.rig.qmp.clone());
                let fig = cycles::stop_conts(&mut self.cycles, &qmp, n, &mut |d| tick(progress, d, n, every(n)))?;
                Ok(judge_counted(&fig, n, "sessions"))
            }
            3 => self.replugs(progress),
            _ => {
                let mut s =
                    self.cycles.accept(crate::speed::scaled(cycles::CYCLE_DEADLINE)).map_err(|e| e.to_string())?;
                let after = cycles::agent_usage(&mut s)?;
                Ok(judge_resources(self.baseline, after))
            }
        }
    }

    fn replugs(&mut self, progress: &mut dyn FnMut(u64, u64)) -> Result<(bool, String), String> {
        let n = self.counts.replugs;
        // A session acknowledges up to a progress report (ACK_EVERY) past its start, then its
        // step, then what was in flight (a window) before the unplug is seen: room for each
        // session and one more.
        let per_session = 2 * REPLUG_STEP + u64::from(REPLUG_WINDOW);
        let size = (n + 2) * per_session;
        let mut bytes = vec![0u8; usize::try_from(size).map_err(|e| e.to_string())?];
        pattern::fill(0x50a4, 0, &mut bytes);
        let local = self.work.path().join(GUEST_FILE);
        std::fs::write(&local, &bytes).map_err(|e| format!("cannot write {}: {e}", local.display()))?;
        let server = self.replug.take().ok_or("the replug port's server is gone")?;
        let port = self.rig.port(PORT_REPLUG).map_err(|e| e.to_string())?.clone();
        let opts =
            TransferOptions { session_timeout: Duration::from_secs(60), window: REPLUG_WINDOW, ..Default::default() };
        let fig = cycles::replugs(server, &port, &self.rig.qmp, &local, GUEST_FILE, REPLUG_STEP, n, &opts, &mut |d| {
            progress(d, n)
        })?;
        let digest = {
            let mut d = pattern::StreamDigest::new();
            d.update(&bytes);
            d.digest()
        };
        let (mut ok, mut observed) = judge_counted(&fig.cycles, n, "");
        match &fig.stream {
            Ok(r) => {
                let whole = r.bytes == size && r.digest == digest && r.interruptions >= n;
                ok &= whole;
                observed.push_str(&format!(
                    "; stream {} of {size} B, digest {}, {} interruption(s), {} session(s), resent {} B",
                    r.bytes,
                    if r.digest == digest { "equal" } else { "DIFFERENT" },
                    r.interruptions,
                    r.sessions,
                    r.resent
                ));
            }
            Err(e) => {
                ok = false;
                observed.push_str(&format!("; the stream failed: {e}"));
            }
        }
        Ok((ok, observed))
    }
}

fn tick(progress: &mut dyn FnMut(u64, u64), done: u64, total: u64, every: u64) {
    if done.checked_rem(every) == Some(0) || done == total {
        progress(done, total);
    }
}

/// PASS when every cycle gave a READY session and the agent counted at least one `counter`
/// per cycle (`counter` empty: not counted by the agent).
fn judge_counted(fig: &CycleFigures, want: u64, counter: &str) -> (bool, String) {
    let counted = fig.agent_after.saturating_sub(fig.agent_before);
    let mut observed = format!("{} of {want} cycles, {}", fig.done, fig.ready_summary());
    if !counter.is_empty() {
        observed.push_str(&format!("; the agent's {counter} {} -> {}", fig.agent_before, fig.agent_after));
    }
    (fig.done == want && (counter.is_empty() || counted >= want), observed)
}

/// PASS when the resident set grew by less than [`RSS_GROWTH_LIMIT_KIB`] and the open
/// descriptors are as many as before.
fn judge_resources((rss_before, fds_before): (u64, u64), (rss_after, fds_after): (u64, u64)) -> (bool, String) {
    let growth = rss_after.saturating_sub(rss_before);
    (
        growth < RSS_GROWTH_LIMIT_KIB && fds_after == fds_before,
        format!("RSS {rss_before} -> {rss_after} KiB (+{growth}); open descriptors {fds_before} -> {fds_after}"),
    )
}

/// PASS when QEMU `pid` is gone, `dir` is gone, and vport holds as many descriptors as before.
fn judge_cleanup(pid: u32, dir: &std::path::Path, fds_before: u64, fds_after: u64) -> (bool, String) {
    let qemu_gone = !PathBuf::from(format!("/proc/{pid}")).exists();
    let dir_gone = !dir.exists();
    (
        qemu_gone && dir_gone && fds_after <= fds_before,
        format!(
            "QEMU {pid} {}; {} {}; vport's descriptors {fds_before} -> {fds_after}",
            if qemu_gone { "gone" } else { "STILL RUNNING" },
            dir.display(),
            if dir_gone { "removed" } else { "STILL THERE" }
        ),
    )
}

/// vport's own open file descriptors.
fn host_fds() -> u64 {
    std::fs::read_dir("/proc/self/fd").map_or(0, |d| (d.count() as u64).saturating_sub(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missed_cycle_or_an_uncounted_one_fails() {
        let fig = CycleFigures {
            done: 3,
            ready: vec![Duration::from_millis(5), Duration::from_millis(9), Duration::from_millis(7)],
            agent_before: 10,
            agent_after: 13,
        };
        let (ok, observed) = judge_counted(&fig, 3, "sessions");
        assert!(ok, "{observed}");
        assert!(observed.contains("median 7 ms, max 9 ms") && observed.contains("10 -> 13"), "{observed}");
        assert!(!judge_counted(&fig, 4, "sessions").0);
        assert!(!judge_counted(&CycleFigures { agent_after: 12, ..fig.clone() }, 3, "sessions").0);
        assert!(judge_counted(&CycleFigures { agent_after: 0, ..fig }, 3, "").0);
    }

    #[test]
    fn resource_growth_and_leaked_descriptors_fail() {
        assert!(judge_resources((4000, 7), (4500, 7)).0);
        assert!(!judge_resources((4000, 7), (5024, 7)).0);
        assert!(!judge_resources((4000, 7), (4000, 8)).0);
        assert!(judge_resources((4000, 7), (3900, 7)).1.contains("(+0)"));
    }

    #[test]
    fn a_live_process_or_a_left_directory_fails_the_cleanup() {
        let dir = tempfile::tempdir().unwrap();
        let me = std::process::id();
        assert!(!judge_cleanup(me, dir.path(), 5, 5).0, "this process is alive");
        let gone = dir.path().join("gone");
        let (ok, observed) = judge_cleanup(u32::MAX, &gone, 5, 5);
        assert!(ok, "{observed}");
        assert!(!judge_cleanup(u32::MAX, &gone, 5, 6).0);
        assert!(!judge_cleanup(u32::MAX, dir.path(), 5, 5).0);
    }

    #[test]
    fn quick_is_smaller_than_full_in_every_cycle() {
        let (q, f) = (SoakCounts::QUICK, SoakCounts::FULL);
        assert!(q.reconnects < f.reconnects && q.reopens < f.reopens);
        assert!(q.stop_conts < f.stop_conts && q.replugs < f.replugs);
        assert_eq!((f.reconnects, f.reopens, f.stop_conts, f.replugs), (10_000, 10_000, 1_000, 100));
    }
}
