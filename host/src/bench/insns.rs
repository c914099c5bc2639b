//! Guest instructions per MiB moved: instruction counts are stable on a noisy machine where
//! seconds are not. Under TCG the guest has no PMU (`perf` counts nothing), so a QEMU TCG plugin
//! (`insn_count.c`, built here with the system's C compiler into vport's cache) counts every
//! instruction the guest's vCPU executes, kernel and user, into a file the host reads while the
//! guest runs: a sample's count is the difference across it.
//!
//! What can stop it is said, never hidden: KVM (plugins are TCG's), more than one vCPU (the
//! plugin's add is not atomic), a QEMU whose plugin API is not version 1 (9.0 raised the
//! minimum to 2), no C compiler. The bench then reports the figure as not counted, with the
//! reason, and measures everything else.

use crate::qemu::{Accel, QemuVersion};
use std::ffi::OsString;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The plugin's C source.
pub const PLUGIN_SOURCE: &str = include_str!("insn_count.c");
/// The counter file's size: one page, which the plugin maps shared.
const COUNTER_FILE_BYTES: u64 = 4096;
/// The first QEMU whose plugin loader refuses API version 1 (`QEMU_PLUGIN_MIN_VERSION` 2).
const FIRST_UNSUPPORTED_MAJOR: u32 = 9;

/// Whether a VM can count its instructions with the plugin: `Err` says why not, for the report.
pub fn availability(accel: Accel, qemu: QemuVersion, cpus: u32) -> Result<(), String> {
    if accel != Accel::Tcg {
        return Err(format!("the guest runs under {} and QEMU's plugins count under TCG only", accel.as_str()));
    }
    if cpus != 1 {
        return Err(format!("the VM has {cpus} vCPUs and the plugin counts exactly on one only"));
    }
    if qemu.major >= FIRST_UNSUPPORTED_MAJOR {
        return Err(format!(
            "QEMU {qemu} loads plugins of API version 2 or later; vport's counter is version 1 (QEMU 4.2 to 8.x)"
        ));
    }
    Ok(())
}

/// The plugin's file name in the cache: keyed by its source, so a changed source is rebuilt.
pub fn plugin_file_name(source: &str) -> String {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(source.as_bytes());
    let key = crate::cache::hex(&digest[..8]);
    format!("vport-insn-count-{key}.so")
}

/// The plugin built into `cache_dir/plugins/` (once per source); `Err` says why it could not
/// be, with the fix.
pub fn build_plugin(cache_dir: &Path) -> Result<PathBuf, String> {
    let dir = cache_dir.join("plugins");
    let so = dir.join(plugin_file_name(PLUGIN_SOURCE));
    if so.is_file() {
        return Ok(so);
    }
    std::fs::create_dir_all(&dir).map_err(|e| format!("cannot make {}: {e}", dir.display()))?;
    let src = dir.join("insn_count.c");
    std::fs::write(&src, PLUGIN_SOURCE).map_err(|e| format!("cannot write {}: {e}", src.display()))?;
    // Built beside its final name and renamed into place: a run that stops half-way leaves no
    // broken plugin behind under the final name.
    let part = so.with_extension("so.part");
    let cc = std::env::var_os("CC").unwrap_or_else(|| "cc".into());
    let out = Command::new(&cc)
        .args(["-shared", "-fPIC", "-O2", "-Wall", "-Werror", "-fvisibility=hidden", "-o"])
        .arg(&part)
        .arg(&src)
        .output()
        .map_err(|e| format!("cannot run the C compiler `{}` ({e}): install gcc or set CC", cc.to_string_lossy()))?;
    if !out.status.success() {
        return Err(format!(
            "`{}` could not build {}: {}",
            cc.to_string_lossy(),
            src.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    std::fs::rename(&part, &so).map_err(|e| format!("cannot rename {} into place: {e}", part.display()))?;
    Ok(so)
}

/// The count of a running VM: the plugin's counter file, read by the host.
#[derive(Debug)]
pub struct InsnCounter {
    file: File,
}

impl InsnCounter {
    /// Makes the (zeroed) counter file at `path` before QEMU starts; the plugin maps it.
    pub fn create(path: &Path) -> std::io::Result<InsnCounter> {
        let file = std::fs::OpenOptions::new().read(true).write(true).create_new(true).open(path)?;
        file.set_len(COUNTER_FILE_BYTES)?;
        Ok(InsnCounter { file })
    }

    /// Instructions the guest executed since QEMU started.
    pub fn read(&self) -> std::io::Result<u64> {
        let mut bytes = [0u8; 8];
        self.file.read_exact_at(&mut bytes, 0)?;
        Ok(u64::from_ne_bytes(bytes))
    }
}

/// Sets up counting for a VM about to start: the plugin built, the counter file made in
/// `work`; returns QEMU's extra arguments and the counter, or why it cannot count.
pub fn prepare(
    cache_dir: &Path,
    work: &Path,
    accel: Accel,
    qemu: QemuVersion,
    cpus: u32,
) -> Result<(Vec<OsString>, InsnCounter), String> {
    availability(accel, qemu, cpus)?;
    let plugin = build_plugin(cache_dir)?;
    let path = work.join("guest-insns.count");
    let counter = InsnCounter::create(&path).map_err(|e| format!("cannot make {}: {e}", path.display()))?;
    Ok((crate::qemu::args::plugin_args(&plugin, &[("out", path.as_os_str())]), counter))
}

#[cfg(test)]
mod tests {
    use super::*;

    const V7: QemuVersion = QemuVersion { major: 7, minor: 2, micro: 22 };

    #[test]
    fn only_a_one_vcpu_tcg_guest_on_a_qemu_of_api_version_one_is_counted() {
        assert_eq!(availability(Accel::Tcg, V7, 1), Ok(()));
        let kvm = availability(Accel::Kvm, V7, 1).unwrap_err();
        assert!(kvm.contains("kvm") && kvm.contains("TCG only"), "{kvm}");
        let smp = availability(Accel::Tcg, V7, 2).unwrap_err();
        assert!(smp.contains("2 vCPUs"), "{smp}");
        let v10 = availability(Accel::Tcg, QemuVersion { major: 10, minor: 0, micro: 2 }, 1).unwrap_err();
        assert!(v10.contains("QEMU 10.0.2") && v10.contains("version 1"), "{v10}");
        assert_eq!(availability(Accel::Tcg, QemuVersion { major: 8, minor: 2, micro: 0 }, 1), Ok(()));
    }

    #[test]
    fn the_plugin_name_follows_its_source() {
        let a = plugin_file_name("int a;");
        assert_ne!(a, plugin_file_name("int b;"));
        assert_eq!(a, plugin_file_name("int a;"));
        assert!(a.starts_with("vport-insn-count-") && a.ends_with(".so"), "{a}");
    }

    #[test]
    fn the_counter_reads_what_is_stored_at_its_start() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c");
        let counter = InsnCounter::create(&path).unwrap();
        assert_eq!(counter.read().unwrap(), 0);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), COUNTER_FILE_BYTES);
        let writer = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        writer.write_all_at(&123_456_789u64.to_ne_bytes(), 0).unwrap();
        assert_eq!(counter.read().unwrap(), 123_456_789);
        assert!(InsnCounter::create(&path).is_err(), "an existing counter file is never reused");
    }

    #[test]
    fn the_plugin_source_builds_with_the_system_compiler() {
        // The machines vport runs on link Rust with `cc`: the compiler is there.
        let dir = tempfile::tempdir().unwrap();
        let so = build_plugin(dir.path()).unwrap();
        assert!(so.is_file());
        assert_eq!(build_plugin(dir.path()).unwrap(), so, "built once, then reused");
    }
}
