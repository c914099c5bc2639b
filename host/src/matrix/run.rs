//! Running the cells: each suite of a cell is a child `vport` process (the same binary) with
//! the cell's platform arguments, its JSON report on stdout kept as `<cell>/<suite>.json`, its
//! progress and diagnostics as `<cell>/<suite>.log`. Cells run `jobs` at a time; a cell's
//! suites run one after another. A suite that outlives its deadline is killed and is an error,
//! never a hang.

use super::plan::{Cell, Suite};
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How a suite of a cell ended.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "outcome", rename_all = "kebab-case")]
pub enum Outcome {
    /// Exit 0.
    Passed,
    /// Exit 1: the suite ran and a check failed.
    Failed,
    /// Any other end: the suite could not run (exit 3), was interrupted, or was killed at its
    /// deadline.
    Error {
        /// What happened (`exit 3`, `killed after 1800 s`).
        detail: String,
    },
    /// Not run.
    Skipped {
        /// Why.
        reason: String,
    },
}

/// One suite of one cell.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SuiteResult {
    /// Which.
    pub suite: Suite,
    /// How it ended.
    #[serde(flatten)]
    pub outcome: Outcome,
    /// How long it ran, s.
    pub seconds: f64,
    /// What its JSON report says in a line (`35 cases: 33 pass, 2 quirk`), when it has one.
    pub summary: Option<String>,
    /// Its JSON report, when it printed one.
    #[serde(skip)]
    pub report: Option<serde_json::Value>,
    /// Its log file.
    pub log: PathBuf,
}

/// One cell's results.
#[derive(Debug, Clone)]
pub struct CellResult {
    /// The cell.
    pub cell: Cell,
    /// Its suites, in the order run.
    pub suites: Vec<SuiteResult>,
}

/// What the run is given.
pub struct RunOptions<'a> {
    /// The `vport` binary the suites run as.
    pub vport: PathBuf,
    /// Where each cell's directory goes.
    pub out_dir: PathBuf,
    /// Cells at once.
    pub jobs: usize,
    /// The suites of every cell.
    pub suites: Vec<Suite>,
    /// Arguments every suite gets besides the cell's (`--agent PATH`).
    pub extra_args: Vec<OsString>,
    /// Longest run of one suite.
    pub suite_deadline: Duration,
    /// Hears a line per suite started and ended.
    pub progress: &'a (dyn Fn(&str) + Sync),
}

/// Runs `cells` (each with its skip reason, if it cannot run); results in the cells' order.
pub fn run(cells: Vec<(Cell, Option<String>)>, opts: &RunOptions<'_>) -> Vec<CellResult> {
    let total = cells.len();
    let queue = Mutex::new(cells.into_iter().enumerate().collect::<Vec<_>>().into_iter());
    let results = Mutex::new(Vec::with_capacity(total));
    std::thread::scope(|scope| {
        for _ in 0..opts.jobs.max(1) {
            scope.spawn(|| loop {
                let next = queue.lock().map(|mut q| q.next()).unwrap_or(None);
                let Some((i, (cell, skip))) = next else { break };
                let result = run_cell(i + 1, total, cell, skip, opts);
                if let Ok(mut r) = results.lock() {
                    r.push((i, result));
                }
            });
        }
    });
    let mut results = results.into_inner().unwrap_or_default();
    results.sort_by_key(|(i, _)| *i);
    results.into_iter().map(|(_, r)| r).collect()
}

fn run_cell(n: usize, total: usize, cell: Cell, skip: Option<String>, opts: &RunOptions<'_>) -> CellResult {
    let name = cell.name();
    let dir = opts.out_dir.join(&name);
    let mut suites = Vec::new();
    if let Some(reason) = skip {
        (opts.progress)(&format!("cell {n}/{total} {name}: skipped: {reason}"));
        for &suite in &opts.suites {
            let outcome = Outcome::Skipped { reason: reason.clone() };
            suites.push(SuiteResult { suite, outcome, seconds: 0.0, summary: None, report: None, log: PathBuf::new() });
        }
        return CellResult { cell, suites };
    }
    if let Err(e) = std::fs::create_dir_all(&dir) {
        let detail = format!("cannot make {}: {e}", dir.display());
        for &suite in &opts.suites {
            let outcome = Outcome::Error { detail: detail.clone() };
            suites.push(SuiteResult { suite, outcome, seconds: 0.0, summary: None, report: None, log: PathBuf::new() });
        }
        return CellResult { cell, suites };
    }
    for &suite in &opts.suites {
        (opts.progress)(&format!("cell {n}/{total} {name}: {} running", suite.name()));
        let r = run_suite(&cell, suite, &dir, opts);
        let verdict = match &r.outcome {
            Outcome::Passed => "passed".to_string(),
            Outcome::Failed => "FAILED".to_string(),
            Outcome::Error { detail } => format!("ERROR ({detail})"),
            Outcome::Skipped { reason } => format!("skipped ({reason})"),
        };
        let summary = r.summary.as_deref().map_or(String::new(), |s| format!(": {s}"));
        (opts.progress)(&format!("cell {n}/{total} {name}: {} {verdict} in {:.0} s{summary}", suite.name(), r.seconds));
        suites.push(r);
    }
    CellResult { cell, suites }
}

fn run_suite(cell: &Cell, suite: Suite, dir: &Path, opts: &RunOptions<'_>) -> SuiteResult {
    let log = dir.join(format!("{}.log", suite.name()));
    let json = dir.join(format!("{}.json", suite.name()));
    let t0 = Instant::now();
    let fail = |detail: String, log: PathBuf| SuiteResult {
        suite,
        outcome: Outcome::Error { detail },
        seconds: t0.elapsed().as_secs_f64(),
        summary: None,
        report: None,
        log,
    };
    let (stdout, stderr) = match (std::fs::File::create(&json), std::fs::File::create(&log)) {
        (Ok(o), Ok(e)) => (o, e),
        (Err(e), _) | (_, Err(e)) => {
            return fail(format!("cannot create the suite's files in {}: {e}", dir.display()), log)
        }
    };
    let mut cmd = Command::new(&opts.vport);
    cmd.args(suite.command(dir)).args(cell.args()).args(&opts.extra_args);
    cmd.stdin(Stdio::null()).stdout(stdout).stderr(stderr);
    log::debug!("matrix: {cmd:?}");
    // The child is stopped with SIGTERM should this worker thread (and so the matrix) die.
    let mut child = match crate::qemu::cleanup::spawn_with_parent_death_signal(&mut cmd, nix::libc::SIGTERM) {
        Ok(c) => c,
        Err(e) => return fail(format!("cannot run {}: {e}", opts.vport.display()), log),
    };
    let pid = child.id();
    let (tx, rx) = mpsc::channel();
    let waiter = std::thread::spawn(move || {
        let status = child.wait();
        // The receiver may have given up at its deadline: nothing is left to tell.
        let _ = tx.send(status);
    });
    let status = match rx.recv_timeout(opts.suite_deadline) {
        Ok(s) => s,
        Err(_) => {
            // SIGTERM: the suite kills its VMs and removes their directories (its own handler).
            if let Ok(pid) = i32::try_from(pid) {
                if let Err(e) =
                    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGTERM)
                {
                    log::warn!("matrix: cannot stop suite process {pid}: {e}");
                }
            }
            let _ = waiter.join();
            return fail(format!("killed after {} s (its deadline)", opts.suite_deadline.as_secs()), log);
        }
    };
    let _ = waiter.join();
    let seconds = t0.elapsed().as_secs_f64();
    let outcome = match status {
        Ok(s) if s.code() == Some(0) => Outcome::Passed,
        Ok(s) if s.code() == Some(1) => Outcome::Failed,
        Ok(s) => Outcome::Error { detail: s.code().map_or_else(|| format!("ended by {s}"), |c| format!("exit {c}")) },
        Err(e) => Outcome::Error { detail: format!("cannot wait for it: {e}") },
    };
    let report = std::fs::read(&json).ok().and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok());
    let summary = report.as_ref().and_then(|r| summarise(suite, r));
    SuiteResult { suite, outcome, seconds, summary, report, log }
}

/// A suite's JSON report in a line: verdict counts of a suite of cases, the goals of the bench.
pub fn summarise(suite: Suite, report: &serde_json::Value) -> Option<String> {
    match suite {
        Suite::Conformance | Suite::Faults => {
            let cases = report.get("cases")?.as_array()?;
            let mut counts: Vec<(String, usize)> = Vec::new();
            for v in cases.iter().filter_map(|c| c.get("verdict")?.as_str()) {
                match counts.iter_mut().find(|(k, _)| k == v) {
                    Some((_, n)) => *n += 1,
                    None => counts.push((v.to_string(), 1)),
                }
            }
            let list: Vec<String> = counts.iter().map(|(k, n)| format!("{n} {k}")).collect();
            Some(format!("{} cases: {}", cases.len(), list.join(", ")))
        }
        Suite::Bench => {
            let goals = report.get("comparisons")?.as_array()?;
            let list: Vec<String> = goals
                .iter()
                .filter_map(|c| Some(format!("{} {:.2}x", c.get("what")?.as_str()?, c.get("ratio")?.as_f64()?)))
                .collect();
            Some(list.join("; "))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_are_summed_up_in_a_line() {
        let conformance = serde_json::json!({"cases": [
            {"verdict": "pass"}, {"verdict": "quirk"}, {"verdict": "pass"}, {"verdict": "fail"}
        ]});
        assert_eq!(summarise(Suite::Conformance, &conformance).unwrap(), "4 cases: 2 pass, 1 quirk, 1 fail");
        let bench = serde_json::json!({"comparisons": [
            {"what": "guest->host 64 KiB plain / raw", "ratio": 0.6123}
        ]});
        assert_eq!(summarise(Suite::Bench, &bench).unwrap(), "guest->host 64 KiB plain / raw 0.61x");
        assert_eq!(summarise(Suite::Faults, &serde_json::json!({"error": "x"})), None);
    }
}
