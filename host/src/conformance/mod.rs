//! The conformance suite: the virtio-serial semantics of `shared/spec/virtio-serial-semantics.md`
//! turned into executable cases against a real VM running the real agent.
//!
//! A case ([`Case`]) is its description ([`CaseDef`]: name, spec row, expected outcome) and
//! its code; a group holds its cases, which share one boot and run in a fixed order where no
//! case disturbs the next. A group whose set-up fails (QEMU will not start, the agent never
//! says HELLO) is an infrastructure error: its cases are reported NOT RUN, the other groups
//! still run. A case that fails or errors never stops the cases after it.
//!
//! Every case's life-cycle trace is judged by the checker ([`vport_common::checker`], the
//! engine of `vport trace check`): a violation in it makes the case FAIL, naming the records
//! (see `trace.rs` for what a case's trace is).
//!
//! The suite reports through one typed event stream ([`RunEvent`]); [`crate::report`] renders
//! it as the matrix, JSON and JUnit. Entry point: [`run`].

mod case;
mod group;
mod guest;
mod migration;
mod options;
mod recorder;
mod scale;
mod shared;
mod support;
pub(crate) mod trace;

pub(crate) use case::chain;
pub use case::{Case, CaseDef, CaseError, Observation};
pub use options::{filter_selects, SuiteOptions};
pub use support::GUEST_OPS_FLAG;

use crate::report::{RunEvent, RunReport};
use group::GroupRun;
use recorder::Recorder;
use thiserror::Error;

/// The groups, in run order.
static GROUPS: [&dyn GroupRun; 4] = [&shared::GROUP, &guest::GROUP, &migration::GROUP, &scale::GROUP];

/// Every case, in run (and report) order.
pub fn all_cases() -> Vec<&'static CaseDef> {
    GROUPS.iter().flat_map(|g| g.defs()).collect()
}

/// The cases `filter` selects (see [`SuiteOptions::filter`]), in run order (every case for
/// `None`). Empty means [`run`] would refuse the filter with
/// [`ConformanceError::NothingSelected`].
pub fn selected_cases(filter: Option<&str>) -> Vec<&'static CaseDef> {
    all_cases().into_iter().filter(|c| filter_selects(filter, c.name)).collect()
}

/// Errors of the suite as a whole (per-case and per-group trouble is in the report instead).
#[derive(Debug, Error)]
pub enum ConformanceError {
    /// The options select no case.
    #[error("no conformance case matches the filter {0:?}")]
    NothingSelected(String),
}

impl ConformanceError {
    /// The exit code it maps to: a selection that selects nothing is a usage error.
    pub fn exit_code(&self) -> crate::exit::ExitCode {
        match self {
            ConformanceError::NothingSelected(_) => crate::exit::ExitCode::Usage,
        }
    }
}

/// Runs every selected case, group by group (one VM boot per group, fresh VMs where a case
/// needs one), emitting each [`RunEvent`] to `events` as it happens. The report returned is
/// the fold of those events. Case failures and group set-up failures are in the report; `Err`
/// only when nothing is selected.
pub fn run(opts: &SuiteOptions, events: &mut dyn FnMut(&RunEvent)) -> Result<RunReport, ConformanceError> {
    let selected = all_cases().iter().filter(|c| opts.selects(c.name)).count();
    if selected == 0 {
        let what = match (&opts.filter, &opts.names) {
            (Some(f), _) => f.clone(),
            (None, Some(names)) => names.join(","),
            (None, None) => String::new(),
        };
        return Err(ConformanceError::NothingSelected(what));
    }
    // The failure deadlines stretched by the machine's speed factor (crate::speed).
    let opts = &SuiteOptions {
        hello_timeout: crate::speed::scaled(opts.hello_timeout),
        reply_timeout: crate::speed::scaled(opts.reply_timeout),
        ..opts.clone()
    };
    let mut rec = Recorder::new(opts, events, selected);
    for g in GROUPS {
        let defs: Vec<&CaseDef> = g.defs().into_iter().filter(|d| opts.selects(d.name)).collect();
        if defs.is_empty() {
            continue;
        }
        if let Err(e) = rec.start_group(g.name(), defs.len()).and_then(|()| g.run(&mut rec)) {
            rec.group_failed(g.name(), &defs, &e);
        }
        rec.end_group();
    }
    Ok(rec.finish_run())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_case_has_a_unique_name_its_groups_name_and_a_spec() {
        let cases = all_cases();
        let mut names: Vec<&str> = cases.iter().map(|c| c.name).collect();
        names.sort_unstable();
        let n = names.len();
        names.dedup();
        assert_eq!(names.len(), n, "duplicate case names");
        assert_eq!(n, 36);
        for g in GROUPS {
            for c in g.defs() {
                assert_eq!(c.group, g.name(), "{} is held by group {}", c.name, g.name());
                assert!(!c.spec.is_empty() && !c.expected.is_empty(), "{}", c.name);
            }
        }
    }

    #[test]
    fn filters_select_by_substring_of_any_part() {
        assert_eq!(selected_cases(None).len(), all_cases().len());
        let names = |f| selected_cases(Some(f)).iter().map(|c| c.name).collect::<Vec<_>>();
        assert_eq!(names("second-open-ebusy"), ["second-open-ebusy"]);
        assert_eq!(names("second-open-ebusy,lseek"), ["second-open-ebusy", "lseek-pread-pwrite-espipe"]);
        assert!(names("nosuchcase").is_empty());
        assert!(names("").is_empty() && names(",").is_empty(), "empty parts select nothing");
    }
}
