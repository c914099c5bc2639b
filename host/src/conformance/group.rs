//! A VM group: the cases that share one boot, in an order where none disturbs the next, with
//! the set-up they share.

use super::case::{Case, CaseDef, CaseError};
use super::options::SuiteOptions;
use super::recorder::Recorder;

/// A group whose cases run against state `S`: `setup` boots the VM(s) and connects what every
/// case needs (a failure there makes the group's cases NOT RUN); each selected case then runs
/// in order, and the state (the VM) is dropped, killing QEMU, after the last one.
pub(crate) struct Group<S: 'static> {
    /// Group name.
    pub(crate) name: &'static str,
    /// Boots and connects.
    pub(crate) setup: fn(&SuiteOptions, &mut Recorder<'_>) -> Result<S, CaseError>,
    /// The cases, in run order.
    pub(crate) cases: &'static [Case<S>],
    /// Asked when a case ends in ERROR, before the result is reported: a line that helps tell
    /// why (for the shared group: whether the agent still answers on the other port).
    pub(crate) diagnose: Option<fn(&mut S) -> String>,
}

/// A group with its state type erased, as the runner sees it.
pub(crate) trait GroupRun: Sync {
    /// Group name.
    fn name(&self) -> &'static str;
    /// Its cases, in run order.
    fn defs(&self) -> Vec<&'static CaseDef>;
    /// Sets up and runs the selected cases, reporting each to `rec`. `Err`: the set-up failed.
    fn run(&self, rec: &mut Recorder<'_>) -> Result<(), CaseError>;
}

impl<S> GroupRun for Group<S> {
    fn name(&self) -> &'static str {
        self.name
    }

    fn defs(&self) -> Vec<&'static CaseDef> {
        self.cases.iter().map(|c| &c.def).collect()
    }

    fn run(&self, rec: &mut Recorder<'_>) -> Result<(), CaseError> {
        let opts = rec.opts();
        let mut state = (self.setup)(opts, rec)?;
        for case in self.cases.iter().filter(|c| opts.selects(c.def.name)) {
            let started = rec.begin(&case.def);
            let outcome = (case.run)(&mut state).map_err(|e| (e, self.diagnose.map(|d| d(&mut state))));
            rec.finish(&case.def, started, outcome);
        }
        Ok(())
    }
}
