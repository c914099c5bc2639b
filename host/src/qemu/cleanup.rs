//! QEMU never outlives vport, and a VM leaves no files behind.
//!
//! Three guards, from the narrowest to the widest:
//!
//! - [`VmDir`]: one VM's private directory (sockets, logs), removed when it is dropped, or kept
//!   for post-mortems when [`KEEP_DIR_ENV`] is set.
//! - The live list: every QEMU started with `spawn_tracked` is listed with its directory until
//!   its owner kills and reaps it (`untrack`). The handler of [`install_signal_cleanup`] kills
//!   and reaps every listed QEMU and removes its directory on Ctrl-C / SIGTERM / SIGHUP.
//! - `spawn_with_pdeathsig`: the kernel SIGKILLs QEMU when the thread that started it dies,
//!   which covers vport itself being killed or crashing.
//!
//! The owner of a running QEMU, [`super::Vm`], kills and reaps it on `kill` and on drop.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard};

/// Set (to anything but empty or `0`) to keep every VM directory (guest console log, QEMU
/// log, sockets) after the VM ends, for post-mortems; its path is logged at info level.
pub const KEEP_DIR_ENV: &str = "VPORT_KEEP_VM_DIR";

/// Spawns `cmd` so that the child gets SIGKILL when the spawning thread dies
/// (`PR_SET_PDEATHSIG`), which covers vport being killed or crashing.
pub(crate) fn spawn_with_pdeathsig(cmd: &mut Command) -> std::io::Result<Child> {
    spawn_with_parent_death_signal(cmd, nix::libc::SIGKILL)
}

/// Spawns `cmd` so that the child gets `signal` when the spawning thread dies
/// (`PR_SET_PDEATHSIG`): SIGTERM for a child `vport`, which then cleans up its own VMs.
pub(crate) fn spawn_with_parent_death_signal(cmd: &mut Command, signal: nix::libc::c_int) -> std::io::Result<Child> {
    // SAFETY: the closure runs in the forked child before exec; it only calls prctl(2),
    // which is async-signal-safe, allocates nothing and touches no locks.
    unsafe {
        cmd.pre_exec(move || {
            if nix::libc::prctl(nix::libc::PR_SET_PDEATHSIG, signal) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd.spawn()
}

/// Live QEMU processes and their directories, for the signal handler.
static LIVE: Mutex<Vec<(u32, PathBuf)>> = Mutex::new(Vec::new());

fn live() -> MutexGuard<'static, Vec<(u32, PathBuf)>> {
    LIVE.lock().unwrap_or_else(|e| e.into_inner())
}

/// Spawns `cmd` like [`spawn_with_pdeathsig`] and lists the child with its directory `dir` for
/// the signal handler. The entry is made under the list's lock, before the pid is known
/// anywhere else, so the handler cannot miss the child.
pub(super) fn spawn_tracked(cmd: &mut Command, dir: &Path) -> std::io::Result<Child> {
    let mut list = live();
    let child = spawn_with_pdeathsig(cmd)?;
    list.push((child.id(), dir.to_path_buf()));
    Ok(child)
}

/// Takes the QEMU `pid` off the live list: its owner kills and reaps it now.
pub(super) fn untrack(pid: u32) {
    live().retain(|(p, _)| *p != pid);
}

/// Work directories of running suites ([`WorkDir`]), for the signal handler.
static WORK: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

fn work() -> MutexGuard<'static, Vec<PathBuf>> {
    WORK.lock().unwrap_or_else(|e| e.into_inner())
}

/// A suite's temporary work directory (`vport-work-*`): removed when dropped, and by the
/// handler of [`install_signal_cleanup`] on Ctrl-C / SIGTERM / SIGHUP, so an interrupted run
/// leaves no directory behind.
#[derive(Debug)]
pub struct WorkDir {
    dir: tempfile::TempDir,
}

impl WorkDir {
    /// Creates a fresh directory (`vport-work-*`) under the system's temporary directory and
    /// lists it.
    pub fn create() -> std::io::Result<WorkDir> {
        WorkDir::with_prefix("vport-work-")
    }

    /// Like [`WorkDir::create`], the name starting with `prefix`.
    pub fn with_prefix(prefix: &str) -> std::io::Result<WorkDir> {
        let dir = tempfile::Builder::new().prefix(prefix).tempdir()?;
        work().push(dir.path().to_path_buf());
        Ok(WorkDir { dir })
    }

    /// Where it is.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        work().retain(|p| p != self.dir.path());
    }
}

/// Set by the signal handler before it kills anything.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// Whether Ctrl-C (or SIGTERM) arrived and the cleanup of [`install_signal_cleanup`] is killing
/// the VMs: a caller that sees QEMU exit should then leave the exit code to that handler
/// ([`crate::exit::ExitCode::Interrupted`]).
pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

/// Installs a Ctrl-C / SIGTERM / SIGHUP handler that SIGKILLs and reaps every live VM's
/// QEMU, removes their directories and the unix sockets vport listens on
/// ([`crate::chardev::remove_bound_sockets`]) and exits with [`crate::exit::ExitCode::Interrupted`]
/// (130). Idempotent; fails if another handler was already installed with the `ctrlc` crate.
pub fn install_signal_cleanup() -> Result<(), ctrlc::Error> {
    static INSTALLED: Mutex<bool> = Mutex::new(false);
    let mut installed = INSTALLED.lock().unwrap_or_else(|e| e.into_inner());
    if *installed {
        return Ok(());
    }
    ctrlc::set_handler(|| {
        // First, so a thread that sees QEMU go away knows why (see `interrupted`).
        INTERRUPTED.store(true, Ordering::SeqCst);
        let entries: Vec<_> = live().drain(..).collect();
        let killed = !entries.is_empty();
        for (pid, dir) in entries {
            let Ok(pid) = i32::try_from(pid) else { continue };
            let pid = nix::unistd::Pid::from_raw(pid);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
            let _ = nix::sys::wait::waitpid(pid, None);
            let _ = std::fs::remove_dir_all(&dir);
        }
        for dir in work().drain(..) {
            let _ = std::fs::remove_dir_all(&dir);
        }
        // The unix sockets vport listens on for a VM it did not start (`--socket
        // NAME=unix-listen:PATH`): nothing is dropped on this way out.
        crate::chardev::remove_bound_sockets();
        eprintln!("vport: interrupted{}", if killed { ", killed qemu" } else { "" });
        crate::exit::ExitCode::Interrupted.exit();
    })?;
    *installed = true;
    Ok(())
}

/// A VM's private temporary directory (`vport-vm-*`), removed when dropped unless
/// [`KEEP_DIR_ENV`] is set.
#[derive(Debug)]
pub struct VmDir {
    dir: Option<tempfile::TempDir>,
    path: PathBuf,
}

impl VmDir {
    /// Creates a fresh directory under the system's temporary directory.
    pub fn create() -> std::io::Result<VmDir> {
        let dir = tempfile::Builder::new().prefix("vport-vm-").tempdir()?;
        let path = dir.path().to_path_buf();
        Ok(VmDir { dir: Some(dir), path })
    }

    /// Where it is.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Removes the directory, or keeps it when `keep` (logging where). Once only.
    fn finish(&mut self, keep: bool) {
        let Some(dir) = self.dir.take() else { return };
        if keep {
            let kept = dir.keep();
            log::info!("vm directory kept ({KEEP_DIR_ENV}): {}", kept.display());
        } else if let Err(e) = dir.close() {
            log::warn!("cannot remove vm directory {}: {e}", self.path.display());
        }
    }
}

impl Drop for VmDir {
    fn drop(&mut self) {
        let keep = std::env::var_os(KEEP_DIR_ENV).is_some_and(|v| !v.is_empty() && v != "0");
        self.finish(keep);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_vm_dir_is_removed_or_kept() {
        let mut gone = VmDir::create().unwrap();
        std::fs::write(gone.path().join("qemu.log"), b"x").unwrap();
        let path = gone.path().to_path_buf();
        gone.finish(false);
        assert!(!path.exists());
        gone.finish(true);
        assert!(!path.exists(), "finishing twice does nothing");
        let mut kept = VmDir::create().unwrap();
        kept.finish(true);
        assert!(kept.path().is_dir());
        std::fs::remove_dir_all(kept.path()).unwrap();
    }

    #[test]
    fn a_work_dir_is_listed_while_it_lives_and_removed_when_dropped() {
        let w = WorkDir::create().unwrap();
        let path = w.path().to_path_buf();
        std::fs::write(path.join("f"), b"x").unwrap();
        assert!(work().contains(&path));
        drop(w);
        assert!(!path.exists());
        assert!(!work().contains(&path));
    }

    #[test]
    fn a_tracked_child_is_listed_with_its_directory_until_untracked() {
        let dir = tempfile::tempdir().unwrap();
        let mut child = spawn_tracked(Command::new("sleep").arg("30"), dir.path()).unwrap();
        let pid = child.id();
        assert!(live().contains(&(pid, dir.path().to_path_buf())));
        untrack(pid);
        assert!(!live().iter().any(|(p, _)| *p == pid));
        child.kill().unwrap();
        child.wait().unwrap();
    }
}
