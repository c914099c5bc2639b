//! The accelerator probe: resolves `--accel auto` to KVM when KVM really runs guest code, to
//! TCG otherwise.
//!
//! `/dev/kvm` existing is not enough: nested KVM may fail at vCPU setup ("failed to set
//! MSR") or hang. `auto` therefore runs two probes under KVM, each with a deadline (a QEMU
//! still running at the deadline is killed):
//!
//! 1. [`probe`]: a 64 KiB firmware whose reset vector writes 1 to an `isa-debug-exit` port,
//!    making QEMU exit with status `(1 << 1) | 1 = 3`. Catches KVM that cannot run at all.
//! 2. [`probe_kernel`] (when the guest kernel is known): boots that kernel with no initramfs
//!    and `panic=-1`; it panics ("VFS: Unable to mount root fs") and QEMU exits with status
//!    0 under `-no-reboot`. Catches nested KVM that runs real-mode firmware but hangs once
//!    the kernel starts (observed on the CI host: probe 1 passes, the kernel hangs).
//!
//! The verdict is cached in `<cache>/accel.json`, keyed by the QEMU binary (path, size,
//! mtime), the host kernel release and the guest kernel (release, size), so the probes run
//! once per machine setup.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::accel::{Accel, AccelChoice};
use super::args::{probe_args, probe_kernel_args};
use super::cleanup::spawn_with_pdeathsig;
use crate::wait::wait_until;

/// Exit status QEMU returns when the probe firmware ran.
pub const PROBE_EXIT_STATUS: i32 = 3;
/// How long the probe may take before KVM is declared unusable.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(10);
/// Probe code at the reset vector: `mov al,1; out 0xf4,al; hlt; jmp $`.
pub const PROBE_RESET_CODE: [u8; 7] = [0xB0, 0x01, 0xE6, 0xF4, 0xF4, 0xEB, 0xFE];

/// Why the probe could not be run at all (as opposed to KVM not working).
#[derive(Debug, thiserror::Error)]
pub enum AccelError {
    /// Setting up the probe's files failed.
    #[error("cannot prepare the kvm probe in {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// QEMU could not be started.
    #[error("cannot run {qemu}")]
    Spawn {
        qemu: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The 64 KiB probe firmware: `hlt` everywhere, [`PROBE_RESET_CODE`] at the reset vector
/// (offset 0xFFF0, mapped at 0xFFFFFFF0).
pub fn probe_bios() -> Vec<u8> {
    let mut b = vec![0xF4u8; 64 * 1024];
    b[0xFFF0..0xFFF0 + PROBE_RESET_CODE.len()].copy_from_slice(&PROBE_RESET_CODE);
    b
}

/// Result of one probe run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeOutcome {
    /// Whether the firmware ran (QEMU exited with [`PROBE_EXIT_STATUS`]).
    pub works: bool,
    /// What happened, for the log.
    pub reason: String,
}

/// Runs QEMU with `args` until it exits or `timeout` passes (then kills and reaps it).
/// Returns the exit status (`None`: killed at the deadline) and QEMU's stdout+stderr.
fn run_probe(
    qemu: &Path,
    args: Vec<std::ffi::OsString>,
    log: &Path,
    timeout: Duration,
) -> Result<(Option<std::process::ExitStatus>, String), AccelError> {
    let io = |source| AccelError::Io { path: log.to_path_buf(), source };
    let out = std::fs::File::create(log).map_err(io)?;
    let err = out.try_clone().map_err(io)?;
    let mut cmd = Command::new(qemu);
    cmd.args(args).stdin(Stdio::null()).stdout(out).stderr(err);
    log::debug!("accelerator probe: {cmd:?}");
    let mut child =
        spawn_with_pdeathsig(&mut cmd).map_err(|source| AccelError::Spawn { qemu: qemu.to_path_buf(), source })?;
    let waited = wait_until(
        "accelerator probe to exit",
        timeout,
        Duration::from_millis(10),
        || Ok(()),
        || child.try_wait().ok().flatten(),
    );
    let status = match waited {
        Ok(status) => Some(status),
        Err(_) => {
            let _ = child.kill();
            let _ = child.wait();
            None
        }
    };
    let output = std::fs::read_to_string(log).unwrap_or_default().trim().to_string();
    Ok((status, output))
}

/// The probe's directory: removed when dropped, and by the Ctrl-C handler.
fn probe_dir() -> Result<super::cleanup::WorkDir, AccelError> {
    super::cleanup::WorkDir::with_prefix("vport-probe-")
        .map_err(|source| AccelError::Io { path: std::env::temp_dir(), source })
}

/// Boots the probe firmware with `accel` and reports whether it ran within `timeout`.
pub fn probe(qemu: &Path, accel: Accel, timeout: Duration) -> Result<ProbeOutcome, AccelError> {
    let dir = probe_dir()?;
    let bios = dir.path().join("probe.bin");
    std::fs::write(&bios, probe_bios()).map_err(|source| AccelError::Io { path: bios.clone(), source })?;
    let (status, output) = run_probe(qemu, probe_args(&bios, accel), &dir.path().join("qemu.log"), timeout)?;
    let outcome = match status {
        Some(s) if s.code() == Some(PROBE_EXIT_STATUS) => ProbeOutcome {
            works: true,
            reason: format!("{accel} firmware probe ran guest code (exit status {PROBE_EXIT_STATUS})"),
        },
        Some(s) => {
            ProbeOutcome { works: false, reason: format!("{accel} firmware probe: qemu exited with {s}: {output}") }
        }
        None => ProbeOutcome {
            works: false,
            reason: format!("{accel} firmware probe: no exit within {timeout:?}, killed qemu: {output}"),
        },
    };
    log::debug!("{}", outcome.reason);
    Ok(outcome)
}

/// Console text the kernel probe waits for.
pub const KERNEL_PROBE_MARK: &str = "Kernel panic";

/// Boots `kernel` with `accel`, no initramfs and `panic=-1`, and reports whether it got to
/// its "cannot mount root" panic (QEMU exit status 0, panic on the console) within `timeout`.
pub fn probe_kernel(qemu: &Path, accel: Accel, kernel: &Path, timeout: Duration) -> Result<ProbeOutcome, AccelError> {
    let dir = probe_dir()?;
    let console = dir.path().join("console.log");
    let (status, output) =
        run_probe(qemu, probe_kernel_args(kernel, &console, accel), &dir.path().join("qemu.log"), timeout)?;
    let text = std::fs::read_to_string(&console).unwrap_or_default();
    let panicked = text.contains(KERNEL_PROBE_MARK);
    let outcome = match status {
        Some(s) if s.success() && panicked => {
            ProbeOutcome { works: true, reason: format!("{accel} kernel probe booted {} to its panic", kernel.display()) }
        }
        Some(s) => ProbeOutcome {
            works: false,
            reason: format!("{accel} kernel probe: qemu exited with {s} (kernel panic seen: {panicked}): {output}"),
        },
        None => ProbeOutcome {
            works: false,
            reason: format!(
                "{accel} kernel probe: {} did not reach its panic within {timeout:?} ({} console bytes), killed qemu: {output}",
                kernel.display(),
                text.len()
            ),
        },
    };
    log::debug!("{}", outcome.reason);
    Ok(outcome)
}

/// One cached verdict.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Verdict {
    accel: Accel,
    reason: String,
}

/// `<cache>/accel.json`: cache key → verdict.
#[derive(Debug, Default, Serialize, Deserialize)]
struct VerdictFile {
    verdicts: BTreeMap<String, Verdict>,
}

fn file_id(p: &Path) -> String {
    let (size, mtime) = std::fs::metadata(p)
        .map(|m| {
            use std::os::unix::fs::MetadataExt;
            (m.size(), m.mtime())
        })
        .unwrap_or((0, 0));
    format!("{}|{size}|{mtime}", p.display())
}

/// Identifies a guest kernel by content rather than path (image directories copy the
/// kernel, so its path and mtime change with every agent rebuild): size and the release
/// string from the bzImage header.
fn kernel_id(p: &Path) -> String {
    use std::io::Read;
    let size = std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
    let mut head = Vec::new();
    if let Ok(f) = std::fs::File::open(p) {
        let _ = f.take(64 * 1024).read_to_end(&mut head);
    }
    let release = crate::image::kernel::bzimage_release(&head).unwrap_or_else(|| p.display().to_string());
    format!("{release}|{size}")
}

/// Cache key for a verdict: QEMU binary (path, size, mtime), host kernel release and
/// guest kernel (release, size).
pub fn cache_key(qemu: &Path, kernel: Option<&Path>) -> String {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let kernel = kernel.map(kernel_id).unwrap_or_else(|| "-".into());
    format!("qemu={}|host={}|kernel={kernel}", file_id(qemu), release.trim())
}

fn load(file: &Path) -> VerdictFile {
    std::fs::read(file).ok().and_then(|b| serde_json::from_slice(&b).ok()).unwrap_or_default()
}

fn store(file: &Path, vf: &VerdictFile) {
    let write = || -> std::io::Result<()> {
        let dir = file.parent().unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir)?;
        let mut tmp = tempfile::NamedTempFile::new_in(dir)?;
        serde_json::to_writer_pretty(&mut tmp, vf)?;
        tmp.persist(file).map_err(|e| e.error)?;
        Ok(())
    };
    if let Err(e) = write() {
        log::warn!("cannot save accelerator verdict to {}: {e}", file.display());
    }
}

/// Resolves `choice` to an accelerator. `Auto` uses the verdict cached in
/// `<cache_dir>/accel.json` or runs the KVM probes (see the module docs; the kernel probe
/// only when `kernel` is given); explicit choices are returned as they are.
pub fn resolve(choice: AccelChoice, qemu: &Path, kernel: Option<&Path>, cache_dir: &Path) -> Result<Accel, AccelError> {
    match choice {
        AccelChoice::Kvm => return Ok(Accel::Kvm),
        AccelChoice::Tcg => return Ok(Accel::Tcg),
        AccelChoice::Auto => {}
    }
    let kvm_usable = std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm");
    if let Err(e) = kvm_usable {
        log::info!("accelerator: tcg (/dev/kvm not usable: {e})");
        return Ok(Accel::Tcg);
    }
    let file = cache_dir.join("accel.json");
    let key = cache_key(qemu, kernel);
    let mut vf = load(&file);
    if let Some(v) = vf.verdicts.get(&key) {
        log::debug!("accelerator: {} (cached in {}: {})", v.accel, file.display(), v.reason);
        return Ok(v.accel);
    }
    let mut outcome = probe(qemu, Accel::Kvm, PROBE_TIMEOUT)?;
    if let (true, Some(kernel)) = (outcome.works, kernel) {
        outcome = probe_kernel(qemu, Accel::Kvm, kernel, PROBE_TIMEOUT)?;
    }
    let accel = if outcome.works { Accel::Kvm } else { Accel::Tcg };
    log::info!("accelerator: {accel} ({})", outcome.reason);
    vf.verdicts.insert(key, Verdict { accel, reason: outcome.reason });
    store(&file, &vf);
    Ok(accel)
}

/// Whether KVM runs a guest with `qemu` here (the same probe and cached verdict as
/// [`AccelChoice::Auto`]); `Err` says why not.
pub fn kvm_runs_guests(qemu: &Path, kernel: Option<&Path>, cache_dir: &Path) -> Result<(), String> {
    if let Err(e) = std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm") {
        return Err(format!("/dev/kvm is not usable ({e})"));
    }
    match resolve(AccelChoice::Auto, qemu, kernel, cache_dir).map_err(|e| e.to_string())? {
        Accel::Kvm => Ok(()),
        Accel::Tcg => {
            let reason = load(&cache_dir.join("accel.json"))
                .verdicts
                .get(&cache_key(qemu, kernel))
                .map_or_else(|| "the probe chose TCG".to_string(), |v| v.reason.clone());
            Err(reason)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_bios_layout() {
        let b = probe_bios();
        assert_eq!(b.len(), 65536);
        assert_eq!(&b[0xFFF0..0xFFF7], &[0xB0, 0x01, 0xE6, 0xF4, 0xF4, 0xEB, 0xFE]);
        assert_eq!(b[0], 0xF4);
        assert_eq!(b[0xFFFF], 0xF4);
    }

    #[test]
    fn explicit_choice_needs_no_probe() {
        let nothing = Path::new("/nonexistent/qemu");
        assert_eq!(resolve(AccelChoice::Tcg, nothing, None, nothing).unwrap(), Accel::Tcg);
        assert_eq!(resolve(AccelChoice::Kvm, nothing, Some(nothing), nothing).unwrap(), Accel::Kvm);
    }

    #[test]
    fn verdicts_round_trip_through_the_cache_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("sub/accel.json");
        let mut vf = VerdictFile::default();
        vf.verdicts.insert("k".into(), Verdict { accel: Accel::Tcg, reason: "r".into() });
        store(&file, &vf);
        assert_eq!(load(&file).verdicts.get("k"), vf.verdicts.get("k"));
        std::fs::write(&file, b"not json").unwrap();
        assert!(load(&file).verdicts.is_empty());
    }

    #[test]
    fn cache_key_names_binary_and_changes_with_it() {
        let dir = tempfile::tempdir().unwrap();
        let q = dir.path().join("qemu");
        std::fs::write(&q, b"a").unwrap();
        let k1 = cache_key(&q, None);
        assert!(k1.contains(&q.display().to_string()));
        assert_ne!(cache_key(&q, Some(Path::new("/k"))), k1);
        // The guest kernel is identified by content, not path.
        let (k1p, k2p) = (dir.path().join("k1"), dir.path().join("k2"));
        let mut bz = vec![0u8; 0x800];
        bz[0x202..0x206].copy_from_slice(b"HdrS");
        bz[0x20E..0x210].copy_from_slice(&0x400u16.to_le_bytes());
        bz[0x600..0x60F].copy_from_slice(b"6.1.0-56-amd64 ");
        std::fs::write(&k1p, &bz).unwrap();
        std::fs::write(&k2p, &bz).unwrap();
        assert_eq!(cache_key(&q, Some(&k1p)), cache_key(&q, Some(&k2p)));
        assert!(cache_key(&q, Some(&k1p)).contains("kernel=6.1.0-56-amd64|2048"));
        std::fs::write(&q, b"ab").unwrap();
        assert_ne!(cache_key(&q, None), k1);
    }

    /// A fake "qemu" that ignores its arguments lets the probe's classification be tested
    /// without QEMU: wrong status, and a hang past the deadline.
    #[test]
    fn probe_classifies_exit_status_and_hangs() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let fake = |name: &str, body: &str| {
            let p = dir.path().join(name);
            std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
            p
        };
        let ok = probe(&fake("ok", "exit 3"), Accel::Kvm, Duration::from_secs(10)).unwrap();
        assert!(ok.works, "{ok:?}");
        let msr = probe(&fake("msr", "echo 'failed to set MSR 0x1' >&2; exit 1"), Accel::Kvm, Duration::from_secs(10))
            .unwrap();
        assert!(!msr.works && msr.reason.contains("failed to set MSR"), "{msr:?}");
        let start = std::time::Instant::now();
        let hang = probe(&fake("hang", "exec sleep 30"), Accel::Kvm, Duration::from_millis(300)).unwrap();
        assert!(!hang.works && hang.reason.contains("no exit within"), "{hang:?}");
        // Kernel probe: exit 0 alone is not enough, the panic must be on the console.
        let k = Path::new("/nonexistent/vmlinuz");
        let silent = probe_kernel(&fake("silent", "exit 0"), Accel::Kvm, k, Duration::from_secs(10)).unwrap();
        assert!(!silent.works, "{silent:?}");
        let hung = probe_kernel(&fake("hung", "exec sleep 30"), Accel::Kvm, k, Duration::from_millis(300)).unwrap();
        assert!(!hung.works && hung.reason.contains("did not reach its panic"), "{hung:?}");
        assert!(start.elapsed() < Duration::from_secs(10));
    }

    fn qemu_on_path() -> Option<PathBuf> {
        super::super::binary::find_on_path(
            super::super::binary::QEMU_BINARY.as_ref(),
            std::env::var_os("PATH").as_deref(),
        )
    }

    /// Real QEMU: the KVM probe firmware must make QEMU exit with status 3 under TCG, so
    /// the probe is known to detect "guest code ran".
    #[test]
    fn probe_bios_exits_3_under_tcg() {
        let Some(qemu) = qemu_on_path() else {
            println!("skipped: qemu-system-x86_64 not on PATH");
            return;
        };
        let o = probe(&qemu, Accel::Tcg, Duration::from_secs(30)).unwrap();
        assert!(o.works, "{o:?}");
    }

    /// Real QEMU and a real kernel (`VPORT_KERNEL` or one unpacked in the cache): the kernel
    /// probe must see the kernel reach its panic under TCG.
    #[test]
    fn kernel_probe_panics_under_tcg() {
        let Some(qemu) = qemu_on_path() else {
            println!("skipped: qemu-system-x86_64 not on PATH");
            return;
        };
        let from_cache = || {
            std::fs::read_dir(crate::cache::cache_dir().join("kernels"))
                .ok()?
                .filter_map(|e| e.ok())
                .map(|e| e.path().join("vmlinuz"))
                .find(|p| p.is_file())
        };
        let Some(kernel) = std::env::var_os("VPORT_KERNEL").map(PathBuf::from).or_else(from_cache) else {
            println!("skipped: no kernel (set VPORT_KERNEL or run `vport image build`)");
            return;
        };
        let o = probe_kernel(&qemu, Accel::Tcg, &kernel, Duration::from_secs(60)).unwrap();
        assert!(o.works, "{o:?}");
    }
}
