//! The fault suite's VM and its cases: each case streams a file into the guest and another
//! out of it at once, with the fault injected (`case.rs`), then judges both (`judge.rs`).

use super::case::{self, CasePort, GuestSource, Plan};
use super::judge::{digest_of, judge, judge_kill, judge_restored_twice, judge_throttled, Expected, Restart};
use super::migration::{Migration, Route};
use super::summary::CaseFigures;
use super::{case_name, Fault, FaultsOptions, GROUP};
use crate::conformance::trace::{judge_trace, judged, VmTrace};
use crate::conformance::Observation;
use crate::image::initscript::{supervise_param, GUEST_STREAM_DIR};
use crate::qemu::VmConfig;
use crate::report::{CaseResult, Environment, Verdict};
use crate::rig::{vm_config, Rig};
use crate::session::PortServer;
use crate::stream::to_guest::ToGuest;
use crate::stream::{Control, StreamSide, TransferOptions};
use crate::timeline::Timeline;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};
use vport_common::pattern;

const PORT_IN: &str = "org.vport.faults.in";
const PORT_OUT: &str = "org.vport.faults.out";
/// The name every case's to-guest stream stores under in the guest's stream directory.
const GUEST_FILE: &str = "faults-in.bin";
/// The guest file every case streams out (except where the guest is reset).
const SEED_FILE: &str = "seed.bin";
/// The seed of the pattern the to-host stream of [`Fault::SystemReset`] carries.
const PATTERN_SEED: u64 = 0x5eed_0ff5;
/// How many times `/init` restarts a killed agent (`--full` kills it 50 times).
const AGENT_RESTARTS: u32 = 100_000;
/// How long a new VM may take to give the first session.
const BOOT_DEADLINE: Duration = Duration::from_secs(120);

/// The suite's VM and what every case shares.
pub(super) struct Suite {
    rig: Rig,
    into: PortServer,
    out_of: PortServer,
    work: crate::qemu::WorkDir,
    seed: Vec<u8>,
    opts: TransferOptions,
    size: usize,
    options: FaultsOptions,
    /// The run's trace: every VM's QMP port events, host connects and disconnects, in-band
    /// messages and stream frames, each VM's ports under its own prefix (`vm1/`, `vm2/`, ...).
    trace: Timeline,
    /// VMs started so far (the next one's prefix).
    vms: u32,
    /// The first record of the trace no case has been judged on yet.
    mark: u64,
}

/// The trace prefix of the `n`th VM of a run.
fn vm_prefix(n: u32) -> String {
    format!("vm{n}/")
}

/// The suite's VM: its two ports, the agent with a stream directory, supervised.
fn suite_config(opts: &FaultsOptions) -> VmConfig {
    let args: Vec<String> =
        ["--log-level", "info", "--stream-dir", GUEST_STREAM_DIR].iter().map(|a| a.to_string()).collect();
    let mut cfg = vm_config(&opts.image, &[PORT_IN, PORT_OUT], &args);
    cfg.accel = opts.accel;
    opts.platform.apply(&mut cfg);
    // Fault::AgentKill: SysRq-i (SIGKILL to every process but init) from the keyboard, and
    // /init restarting the agent it kills.
    cfg.cmdline.push_str(&format!(" sysrq_always_enabled {}", supervise_param(AGENT_RESTARTS)));
    // Fault::HostDropQueueFull: QEMU's own account of the port being throttled, on stderr.
    cfg.extra_args.extend(["-trace".into(), "virtio_serial_throttle_port".into()]);
    cfg
}

/// Removes a migration's saved state (gone already is fine).
fn remove_saved_state(file: &Path) {
    if let Err(e) = std::fs::remove_file(file).or_else(|e| if file.exists() { Err(e) } else { Ok(()) }) {
        log::warn!("faults: cannot remove the saved state {}: {e}", file.display());
    }
}

/// A VM with the suite's two ports served, recorded on `trace` under `prefix`.
fn start_vm(
    opts: &FaultsOptions,
    env: &mut Environment,
    trace: &Timeline,
    prefix: &str,
) -> Result<(Rig, PortServer, PortServer), String> {
    let mut rig = Rig::launch(suite_config(opts)).map_err(|e| format!("cannot boot the vm: {e}"))?;
    let vm_trace = VmTrace::start(trace, &rig, prefix).map_err(|e| e.to_string())?;
    env.accel = rig.vm.accel().to_string();
    if let Ok(v) = rig.qmp.query_version() {
        env.qemu_version = format!("{}.{}.{} ({})", v.major, v.minor, v.micro, v.package.trim());
    }
    let into = vm_trace.serve(&rig, PORT_IN).map_err(|e| e.to_string())?;
    let mut out_of = vm_trace.serve(&rig, PORT_OUT).map_err(|e| e.to_string())?;
    rig.resume().map_err(|e| e.to_string())?;
    let first = out_of
        .accept(crate::speed::scaled(BOOT_DEADLINE))
        .map_err(|e| format!("the agent did not come up: {e}\n{}", rig.failure_context()))?;
    env.kernel_release.clone_from(&first.handshake().hello.kernel_release);
    drop(first);
    Ok((rig, into, out_of))
}

impl Suite {
    /// Boots the VM and stores the file the cases stream back out (`seed.bin`); the run's
    /// trace is recorded on `trace`.
    pub(super) fn boot(opts: &FaultsOptions, env: &mut Environment, trace: Timeline) -> Result<Suite, String> {
        let (rig, into, out_of) = start_vm(opts, env, &trace, &vm_prefix(1))?;
        let work = crate::qemu::WorkDir::create().map_err(|e| format!("cannot make a work directory: {e}"))?;
        let topts = TransferOptions {
            session_timeout: Duration::from_secs(120),
            stall_timeout: opts.stall,
            ..Default::default()
        };
        let mut seed = vec![0u8; opts.size];
        pattern::fill(0x5eed, 0, &mut seed);
        let path = work.path().join(SEED_FILE);
        std::fs::write(&path, &seed).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
        let mut suite = Suite {
            rig,
            into,
            out_of,
            work,
            seed,
            opts: topts,
            size: opts.size,
            options: opts.clone(),
            trace,
            vms: 1,
            mark: 0,
        };
        suite.ensure_seed()?;
        // The boot and the seed belong to no case: a rule they break is the first case's.
        Ok(suite)
    }

    /// Stores `seed.bin` in the guest unless it is there whole (the agent then accepts the
    /// stream as complete at once): a reset or a new VM lost it.
    fn ensure_seed(&mut self) -> Result<(), String> {
        let path = self.work.path().join(SEED_FILE);
        // The guest may still be booting: no liveness reconnect meanwhile.
        let opts = TransferOptions { stall_timeout: self.opts.session_timeout, ..self.opts.clone() };
        let mut setup = ToGuest::new(PORT_OUT, &path, SEED_FILE, opts).map_err(|e| e.to_string())?;
        setup
            .run(&mut self.out_of, &mut |_| Control::Continue)
            .map(drop)
            .map_err(|e| format!("cannot store the seed file in the guest: {e}\n{}", self.rig.failure_context()))
    }

    /// Kills this VM (it is already dead after [`Fault::QemuKill`]) and boots a new one:
    /// what became of the old one and how long the new one took.
    fn restart(&mut self) -> Result<Restart, String> {
        let (pid, dir) = (self.rig.vm.pid(), self.rig.vm.dir().to_path_buf());
        self.rig.vm.kill();
        let t0 = Instant::now();
        let prefix = self.next_prefix();
        let (rig, into, out_of) = start_vm(&self.options, &mut Environment::default(), &self.trace, &prefix)?;
        let booted = t0.elapsed();
        // The old rig is dropped here: its directory goes.
        self.rig = rig;
        self.into = into;
        self.out_of = out_of;
        let qemu_gone = !std::path::Path::new(&format!("/proc/{pid}")).exists();
        let dir_gone = !dir.exists();
        self.ensure_seed()?;
        Ok(Restart { qemu_gone, dir_gone, dir, booted })
    }

    /// Both streams of one pass of a case, with `plan`.
    fn pass(&mut self, plan: &Arc<Plan>, local: &Path, dest: &Path) -> Result<(case::Leg, case::Leg), String> {
        let source = match plan.fault {
            Fault::SystemReset | Fault::GuestReboot => {
                GuestSource::Pattern { seed: PATTERN_SEED, total: self.size as u64 }
            }
            _ => GuestSource::File(SEED_FILE),
        };
        // A full out queue needs more in flight than the socket and the virtqueue hold: the
        // largest window lets the rest of the stream be sent unacknowledged.
        let opts = match plan.fault {
            Fault::HostDropQueueFull => {
                TransferOptions { window: vport_common::stream::MAX_WINDOW, ..self.opts.clone() }
            }
            _ => self.opts.clone(),
        };
        let info_in = self.rig.port(PORT_IN).map_err(|e| e.to_string())?.clone();
        let info_out = self.rig.port(PORT_OUT).map_err(|e| e.to_string())?.clone();
        // One name for every case: each stream replaces the last one's file, so the guest's
        // (RAM) stream directory holds one file however many cases run.
        Ok(case::run_case(
            plan,
            CasePort { server: &mut self.into, info: &info_in },
            CasePort { server: &mut self.out_of, info: &info_out },
            local,
            GUEST_FILE,
            source,
            dest,
            &opts,
        ))
    }

    /// The plan of a case of `fault` (`name` names its migration's socket or file); a
    /// migration's destination is started here, in the suite's thread.
    fn plan(&mut self, fault: Fault, name: &str) -> Result<Arc<Plan>, String> {
        let mut plan = Plan::new(fault, self.rig.qmp.clone(), self.rig.vm.pid());
        plan.trace = Some(self.trace.clone());
        let route = match fault {
            Fault::MigrateLive => Some(Route::Live(self.work.path().join(format!("{name}.sock")))),
            Fault::MigrateFile | Fault::RestoreTwice => {
                Some(Route::File(self.work.path().join(format!("{name}.state"))))
            }
            _ => None,
        };
        if let Some(route) = route {
            let ports = [PORT_IN.into(), PORT_OUT.into()];
            let prefix = self.next_prefix();
            plan.migration = Some(Migration::start(route, suite_config(&self.options), ports, &self.trace, &prefix)?);
        }
        plan.qemu_stderr = Some(self.rig.vm.stderr_log());
        plan.console = Some(self.rig.vm.console_log());
        Ok(Arc::new(plan))
    }

    /// After a migration: the destination becomes the suite's VM (the source, stopped, is
    /// killed), with a server for each port that a stream did not take already, and the saved
    /// state's file is removed (kept for [`Fault::RestoreTwice`]'s second restore). How long
    /// the migration took; a migration that failed is the case's error, and the suite goes on
    /// with a new VM.
    fn take_destination(&mut self, plan: &Plan) -> Result<Option<Duration>, String> {
        let Some(m) = plan.migration.as_ref() else { return Ok(None) };
        if let Route::File(file) = m.route() {
            if plan.fault != Fault::RestoreTwice {
                remove_saved_state(file);
            }
        }
        if let Some(error) = m.error() {
            let restarted = self.restart().map(|_| "a new VM was booted for the next cases".to_string());
            return Err(format!("the migration failed: {error}; {}", restarted.unwrap_or_else(|e| e)));
        }
        if let Some(rig) = m.take_dest() {
            self.rig = rig;
        }
        if let Some(server) = m.take_server(0) {
            self.into = server;
        }
        if let Some(server) = m.take_server(1) {
            self.out_of = server;
        }
        Ok(m.took())
    }

    /// [`Fault::RestoreTwice`]: the state saved in `file` is restored once more in a new QEMU,
    /// which becomes the suite's VM (the one that ran on from the first restore is killed),
    /// and the file is removed. How long the restore took; one that failed is the case's error
    /// and the suite goes on with a new VM.
    fn restore_again(&mut self, file: &Path) -> Result<Duration, String> {
        let ports = [PORT_IN.into(), PORT_OUT.into()];
        let prefix = self.next_prefix();
        let again =
            Migration::start(Route::File(file.to_owned()), suite_config(&self.options), ports, &self.trace, &prefix)
                .and_then(|m| m.restore().map(|took| (m, took)));
        remove_saved_state(file);
        let (m, took) = match again {
            Ok(done) => done,
            Err(error) => {
                let restarted = self.restart().map(|_| "a new VM was booted for the next cases".to_string());
                return Err(format!("the second restore failed: {error}; {}", restarted.unwrap_or_else(|e| e)));
            }
        };
        let (Some(rig), Some(into), Some(out_of)) = (m.take_dest(), m.take_server(0), m.take_server(1)) else {
            return Err("the second restore handed over no VM".into());
        };
        // The VM that ran on from the first restore is dropped here: killed, its directory gone.
        self.rig = rig;
        self.into = into;
        self.out_of = out_of;
        Ok(took)
    }

    /// The plan of a case's second pass (nothing injected), on the suite's VM and trace.
    fn quiet_plan(&self, fault: Fault) -> Arc<Plan> {
        let mut plan = Plan::quiet(fault, self.rig.qmp.clone(), self.rig.vm.pid());
        plan.trace = Some(self.trace.clone());
        Arc::new(plan)
    }

    /// The trace prefix of the next VM started.
    fn next_prefix(&mut self) -> String {
        self.vms += 1;
        vm_prefix(self.vms)
    }

    /// What the to-host stream of `fault` must deliver.
    fn expected_out(&self, fault: Fault) -> Vec<u8> {
        match fault {
            Fault::SystemReset | Fault::GuestReboot => {
                let mut bytes = vec![0u8; self.size];
                pattern::fill(PATTERN_SEED, 0, &mut bytes);
                bytes
            }
            _ => self.seed.clone(),
        }
    }

    /// One case: a pass with the fault injected, judged; for [`Fault::QemuKill`], then a new
    /// VM and a second pass that must resume both transfers. The case's figures unless it
    /// could not run.
    pub(super) fn case(&mut self, fault: Fault, rep: u32) -> (CaseResult, Option<CaseFigures>) {
        let started = Instant::now();
        let name = case_name(fault, rep);
        let mut bytes = vec![0u8; self.size];
        pattern::fill(u64::from(rep) << 8 | fault as u64, 0, &mut bytes);
        let local = self.work.path().join(format!("{name}.in"));
        let dest = self.work.path().join(format!("{name}.out"));
        let outcome = std::fs::write(&local, &bytes)
            .map_err(|e| format!("cannot write {}: {e}", local.display()))
            .and_then(|()| {
                // A VM an earlier case left unusable is replaced before this case runs.
                self.ensure_seed().or_else(|e| {
                    log::warn!("faults: {e}; booting a new VM");
                    self.restart().map(drop).map_err(|again| format!("{e}; a new VM did not help: {again}"))
                })
            })
            .and_then(|()| {
                let out_bytes = self.expected_out(fault);
                let (size, into_digest, out_digest) = (self.size as u64, digest_of(&bytes), digest_of(&out_bytes));
                let want = |received_equal: bool| Expected { size, into_digest, out_digest, received_equal };
                let plan = self.plan(fault, &name)?;
                let (into, out) = self.pass(&plan, &local, &dest)?;
                if matches!(fault, Fault::SystemReset | Fault::GuestReboot) {
                    // Back to vport's default: a reboot (a guest panic) ends QEMU.
                    self.rig.qmp.set_reboot_action("shutdown").map_err(|e| format!("set-action: {e}"))?;
                }
                let migrated = self.take_destination(&plan)?;
                if fault == Fault::RestoreTwice {
                    let Some(Route::File(file)) = plan.migration.as_ref().map(|m| m.route().clone()) else {
                        return Err("restore-twice without a saved state".into());
                    };
                    let restored = self.restore_again(&file)?;
                    let quiet = self.quiet_plan(fault);
                    let (into2, out2) = self.pass(&quiet, &local, &dest)?;
                    let received = std::fs::read(&dest).is_ok_and(|b| b == out_bytes);
                    let judged =
                        judge_restored_twice(&want(received), (&into, &out), migrated, restored, (&into2, &out2));
                    let figures = CaseFigures::of(fault, judged.0 == Verdict::Pass, &into, &out);
                    return Ok((judged, figures));
                }
                if fault != Fault::QemuKill {
                    let received = std::fs::read(&dest).is_ok_and(|b| b == out_bytes);
                    let mut judged = judge(fault, &want(received), &into, &out);
                    if let Some(took) = migrated {
                        judged.1 = format!("migrated in {} ms; {}", took.as_millis(), judged.1);
                    }
                    if fault == Fault::HostDropQueueFull {
                        judged = judge_throttled(judged, plan.throttled.load(std::sync::atomic::Ordering::SeqCst));
                    }
                    let figures = CaseFigures::of(fault, judged.0 == Verdict::Pass, &into, &out);
                    return Ok((judged, figures));
                }
                let restart = self.restart()?;
                let plan = self.quiet_plan(fault);
                let (into2, out2) = self.pass(&plan, &local, &dest)?;
                let received = std::fs::read(&dest).is_ok_and(|b| b == out_bytes);
                let judged = judge_kill(&want(received), (&into, &out), &restart, (&into2, &out2));
                let mut figures = CaseFigures::of(fault, judged.0 == Verdict::Pass, &into2, &out2);
                figures.ready = Some(restart.booted);
                Ok((judged, figures))
            });
        let (outcome, figures) = match outcome {
            Ok(((verdict, observed, note), figures)) => (Ok(Observation { verdict, observed, note }), Some(figures)),
            Err(e) => (Err(e), None),
        };
        // The checker's verdict on the case's trace: a broken life-cycle rule fails the case.
        let records = self.trace.records();
        let trace = judge_trace(&records, self.mark);
        self.mark = records.len() as u64;
        let (verdict, observed, note) = judged(outcome, &trace);
        let _ = std::fs::remove_file(&local);
        let _ = std::fs::remove_file(&dest);
        let result = CaseResult {
            name,
            group: GROUP.into(),
            spec: fault.spec().into(),
            expected: fault.expected().into(),
            observed,
            verdict,
            note,
            trace,
            duration: started.elapsed(),
        };
        (result, figures)
    }
}
