//! The migration faults: the running VM is migrated, live into a second QEMU or saved to a
//! file and restored from it, with both streams in flight; the streams then go on with the
//! destination's ports.
//!
//! The migration runs inside the hook of the stream that reaches a third first; the other
//! stream's session ends with the source's `STOP` (or, if it was blocked writing, when the
//! source quits once the destination runs) and its next session waits here until the
//! destination runs. The destination and its port servers are handed over through
//! [`Migration`]: each stream takes its own server, and the suite takes the destination VM.
//! A state saved to a file can be restored once more afterwards ([`Migration::restore`]): a
//! second VM rewound to the same moment.

use crate::conformance::trace::VmTrace;
use crate::qemu::VmConfig;
use crate::qmp::Qmp;
use crate::rig::Rig;
use crate::session::PortServer;
use crate::timeline::Timeline;
use crate::wait::wait_until;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How long a migration may take, each step.
pub(super) const MIGRATION_DEADLINE: Duration = Duration::from_secs(60);

/// Where the VM goes.
#[derive(Debug, Clone)]
pub(super) enum Route {
    /// Live, into a second QEMU listening on this unix socket.
    Live(PathBuf),
    /// Saved to this file (`exec:cat > FILE`, the VM paused first), then restored from it in
    /// a new QEMU.
    File(PathBuf),
}

/// A migration of one case: the destination, waiting for the state, and what it hands over.
pub(super) struct Migration {
    route: Route,
    /// The destination's port names: [to-guest, to-host].
    ports: [String; 2],
    started: AtomicBool,
    /// Set once the migration handed over or failed: nothing waits for it any more.
    done: AtomicBool,
    /// Why the migration failed (the streams then go on with the source, if it runs).
    error: Mutex<Option<String>>,
    dest: Mutex<Option<Rig>>,
    /// The destination's part of the suite's trace (its ports under their own prefix).
    trace: VmTrace,
    servers: Mutex<[Option<PortServer>; 2]>,
    took: Mutex<Option<Duration>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Migration {
    /// Starts the destination, configured as `config`, waiting for the state along `route`
    /// (live: on the route's socket; file: deferred until the file is written), serving
    /// `ports` ([to-guest, to-host]), recorded on `trace` with its ports named `<prefix><name>`.
    /// Call it from the thread that owns the suite's VMs: QEMU is killed when the thread that
    /// started it ends.
    pub(super) fn start(
        route: Route,
        mut config: VmConfig,
        ports: [String; 2],
        trace: &Timeline,
        prefix: &str,
    ) -> Result<Migration, String> {
        config.incoming = Some(match &route {
            Route::Live(socket) => format!("unix:{}", socket.display()),
            Route::File(_) => "defer".into(),
        });
        let dest = Rig::launch(config).map_err(|e| format!("cannot start the migration's destination: {e}"))?;
        let trace = VmTrace::start(trace, &dest, prefix).map_err(|e| e.to_string())?;
        Ok(Migration {
            route,
            ports,
            started: AtomicBool::new(false),
            done: AtomicBool::new(false),
            error: Mutex::new(None),
            dest: Mutex::new(Some(dest)),
            trace,
            servers: Mutex::new([None, None]),
            took: Mutex::new(None),
        })
    }

    /// Migrates the VM of `source` (its QMP) and lets the destination run: the destination's
    /// servers and VM wait here to be taken. From `migrate` to `cont` on the destination. A
    /// failure is kept ([`Migration::error`]) and ends the wait of the streams as well.
    pub(super) fn run(&self, source: &Qmp) -> Result<Duration, String> {
        self.started.store(true, Ordering::SeqCst);
        let outcome = self.migrate(source);
        if let Err(e) = &outcome {
            *lock(&self.error) = Some(e.clone());
        }
        self.done.store(true, Ordering::SeqCst);
        outcome
    }

    fn migrate(&self, source: &Qmp) -> Result<Duration, String> {
        let t0 = Instant::now();
        let target = match &self.route {
            Route::Live(socket) => format!("unix:{}", socket.display()),
            Route::File(file) => {
                // Saved like `virsh save`: paused first, so that the state holds the streams
                // in flight (a running VM would finish them during the copy).
                source.stop().map_err(|e| format!("stop before the save: {e}"))?;
                format!("exec:cat > {}", file.display())
            }
        };
        source.migrate(&target).map_err(|e| format!("migrate: {e}"))?;
        wait_completed(source)?;
        let took = self.hand_over(t0)?;
        // The source is done, as libvirt ends it: a stream blocked writing to its port (the
        // socket full when the source stopped; it never reads again) gets EPIPE and goes on
        // with the destination instead of hanging the case.
        if let Err(e) = source.quit() {
            log::warn!("faults: quit on the migrated source: {e}");
        }
        Ok(took)
    }

    /// Restores the state saved along a file route earlier into the destination, with no
    /// source: the guest goes on from the moment of the save, whatever happened to the VM
    /// that ran on from it. The destination's servers and VM wait here to be taken, as after
    /// [`Migration::run`].
    pub(super) fn restore(&self) -> Result<Duration, String> {
        self.started.store(true, Ordering::SeqCst);
        let outcome = match &self.route {
            Route::File(_) => self.hand_over(Instant::now()),
            Route::Live(socket) => Err(format!("nothing to restore from the live route {}", socket.display())),
        };
        if let Err(e) = &outcome {
            *lock(&self.error) = Some(e.clone());
        }
        self.done.store(true, Ordering::SeqCst);
        outcome
    }

    /// The destination loads the state (from the file, or as the live migration sends it),
    /// its port servers are made, and it runs: how long since `t0`.
    fn hand_over(&self, t0: Instant) -> Result<Duration, String> {
        let slot = lock(&self.dest);
        let dest = slot.as_ref().ok_or("the destination is gone")?;
        if let Route::File(file) = &self.route {
            let uri = format!("exec:cat {}", file.display());
            dest.qmp
                .execute("migrate-incoming", Some(serde_json::json!({ "uri": uri })))
                .map_err(|e| format!("migrate-incoming: {e}"))?;
        }
        wait_until(
            "the destination to load the state",
            crate::speed::scaled(MIGRATION_DEADLINE),
            Duration::from_millis(20),
            || dest.vm.check_alive(),
            || dest.qmp.query_status().ok().filter(|s| s != "inmigrate"),
        )
        .map_err(|e| format!("{e}\n{}", dest.failure_context()))?;
        let servers = [self.trace.serve(dest, &self.ports[0]), self.trace.serve(dest, &self.ports[1])];
        let [Ok(into), Ok(out_of)] = servers else {
            return Err("the destination has not the suite's ports".into());
        };
        dest.qmp.cont().map_err(|e| format!("cont on the destination: {e}"))?;
        let took = t0.elapsed();
        drop(slot);
        *lock(&self.servers) = [Some(into), Some(out_of)];
        *lock(&self.took) = Some(took);
        Ok(took)
    }

    /// Where the VM goes.
    pub(super) fn route(&self) -> &Route {
        &self.route
    }

    /// Why the migration failed, if it did.
    pub(super) fn error(&self) -> Option<String> {
        lock(&self.error).clone()
    }

    /// Whether the migration has begun and not yet handed over: a stream waiting for a session
    /// should [`Migration::wait`].
    pub(super) fn in_progress(&self) -> bool {
        self.started.load(Ordering::SeqCst) && !self.done.load(Ordering::SeqCst)
    }

    /// Waits (at most [`MIGRATION_DEADLINE`]) until the destination runs.
    pub(super) fn wait(&self) -> Result<(), String> {
        wait_until(
            "the migration to hand over",
            crate::speed::scaled(MIGRATION_DEADLINE),
            Duration::from_millis(10),
            || Ok(()),
            || self.done.load(Ordering::SeqCst).then_some(()),
        )
        .map_err(|e| e.to_string())
    }

    /// The destination's server of stream `index` (0 to-guest, 1 to-host), once: `None`
    /// before the hand-over and after it was taken.
    pub(super) fn take_server(&self, index: usize) -> Option<PortServer> {
        lock(&self.servers).get_mut(index).and_then(Option::take)
    }

    /// The destination VM, once the migration handed over (a destination never used is
    /// dropped, and killed, with the migration).
    pub(super) fn take_dest(&self) -> Option<Rig> {
        if !self.done.load(Ordering::SeqCst) || self.error().is_some() {
            return None;
        }
        lock(&self.dest).take()
    }

    /// How long the migration took, when it completed.
    pub(super) fn took(&self) -> Option<Duration> {
        *lock(&self.took)
    }
}

fn wait_completed(source: &Qmp) -> Result<(), String> {
    wait_until(
        "the migration to complete",
        crate::speed::scaled(MIGRATION_DEADLINE),
        Duration::from_millis(20),
        || Ok(()),
        || match source.query_migrate() {
            Ok(m) if m.status == "completed" => Some(Ok(())),
            Ok(m) if m.status == "failed" || m.status == "cancelled" => Some(Err(format!("migration {}", m.status))),
            Err(e) => Some(Err(format!("query-migrate: {e}"))),
            _ => None,
        },
    )
    .map_err(|e| e.to_string())?
}
