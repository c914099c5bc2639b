//! Guest instructions per MiB moved: instruction counts are stable on a noisy machine where
//! seconds are not. Under TCG the guest has no PMU (`perf` counts nothing), so a QEMU TCG plugin
//! (`insn_count.c`, built here with the system's C compiler into vport's cache) counts every
//! instruction the guest's vCPU executes, kernel and user, into a file the host reads while the
//! guest runs: a sample's count is the difference across it.
//!
//! The plugin is built in the [`Variant`] the VM needs: plugin API version 1 with an inline
//! add on a one-vCPU VM of QEMU 4.2 to 8.x (the cheapest), else an atomic add from a callback
//! per block (more vCPUs, or QEMU 9.0 and later, whose loader refuses version 1).
//!
//! What can stop it is said, never hidden: KVM (plugins are TCG's), no C compiler. The bench
//! then reports the figure as not counted, with the reason, and measures everything else.

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
const FIRST_API_2_MAJOR: u32 = 9;

/// How the plugin is built for a VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Variant {
    /// The plugin API version it declares: 1 for QEMU before 9.0, 2 from 9.0 on.
    pub api: u32,
    /// An atomic add from a callback per block (`VPORT_ATOMIC`) rather than QEMU's inline add,
    /// which is exact with one vCPU only and is per vCPU from QEMU 9.0 on.
    pub atomic: bool,
}

impl Variant {
    /// The variant for a VM of QEMU `qemu` with `cpus` vCPUs.
    pub fn for_vm(qemu: QemuVersion, cpus: u32) -> Variant {
        let api = if qemu.major >= FIRST_API_2_MAJOR { 2 } else { 1 };
        Variant { api, atomic: api >= 2 || cpus > 1 }
    }

    /// The C compiler's defines for it.
    pub fn defines(self) -> Vec<String> {
        let mut d = vec![format!("-DVPORT_PLUGIN_API={}", self.api)];
        if self.atomic {
            d.push("-DVPORT_ATOMIC".into());
        }
        d
    }

    /// What the report says of it.
    pub fn describe(self) -> String {
        let add = if self.atomic { "atomic add per block entered" } else { "inline add" };
        format!("plugin API {}, {add}", self.api)
    }
}

/// Whether a VM can count its instructions with the plugin: `Err` says why not, for the report.
pub fn availability(accel: Accel) -> Result<(), String> {
    if accel != Accel::Tcg {
        return Err(format!("the guest runs under {} and QEMU's plugins count under TCG only", accel.as_str()));
    }
    Ok(())
}

/// The plugin's file name in the cache: keyed by its source and variant, so a changed source
/// is rebuilt and each variant is its own file.
pub fn plugin_file_name(source: &str, variant: Variant) -> String {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    h.update(source.as_bytes());
    h.update(variant.defines().join(" ").as_bytes());
    let key = crate::cache::hex(&h.finalize()[..8]);
    format!("vport-insn-count-{key}.so")
}

/// The plugin in `variant` built into `cache_dir/plugins/` (once per source and variant); `Err`
/// says why it could not be, with the fix.
pub fn build_plugin(cache_dir: &Path, variant: Variant) -> Result<PathBuf, String> {
    let dir = cache_dir.join("plugins");
    let so = dir.join(plugin_file_name(PLUGIN_SOURCE, variant));
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
        .args(["-shared", "-fPIC", "-O2", "-Wall", "-Werror", "-fvisibility=hidden"])
        .args(variant.defines())
        .arg("-o")
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

/// Sets up counting for a VM about to start: the plugin built in the VM's [`Variant`], the
/// counter file made in `work`; returns QEMU's extra arguments and the counter, or why it
/// cannot count.
pub fn prepare(
    cache_dir: &Path,
    work: &Path,
    accel: Accel,
    qemu: QemuVersion,
    cpus: u32,
) -> Result<(Vec<OsString>, InsnCounter), String> {
    availability(accel)?;
    let variant = Variant::for_vm(qemu, cpus);
    log::info!("bench: counting guest instructions with the plugin ({})", variant.describe());
    let plugin = build_plugin(cache_dir, variant)?;
    let path = work.join("guest-insns.count");
    let counter = InsnCounter::create(&path).map_err(|e| format!("cannot make {}: {e}", path.display()))?;
    Ok((crate::qemu::args::plugin_args(&plugin, &[("out", path.as_os_str())]), counter))
}

#[cfg(test)]
mod tests {
    use super::*;

    const V7: QemuVersion = QemuVersion { major: 7, minor: 2, micro: 22 };

    const V10: QemuVersion = QemuVersion { major: 10, minor: 0, micro: 2 };

    #[test]
    fn tcg_guests_are_counted_in_the_variant_their_qemu_and_vcpus_need() {
        assert_eq!(availability(Accel::Tcg), Ok(()));
        let kvm = availability(Accel::Kvm).unwrap_err();
        assert!(kvm.contains("kvm") && kvm.contains("TCG only"), "{kvm}");
        assert_eq!(Variant::for_vm(V7, 1), Variant { api: 1, atomic: false }, "the inline add");
        assert_eq!(Variant::for_vm(V7, 2), Variant { api: 1, atomic: true });
        assert_eq!(Variant::for_vm(QemuVersion { major: 8, minor: 2, micro: 0 }, 1).api, 1);
        assert_eq!(Variant::for_vm(V10, 1), Variant { api: 2, atomic: true }, "9.0 refuses version 1");
        assert_eq!(Variant::for_vm(V10, 1).defines(), ["-DVPORT_PLUGIN_API=2", "-DVPORT_ATOMIC"]);
        assert_eq!(Variant::for_vm(V7, 1).defines(), ["-DVPORT_PLUGIN_API=1"]);
    }

    #[test]
    fn the_plugin_name_follows_its_source_and_variant() {
        let one = Variant::for_vm(V7, 1);
        let a = plugin_file_name("int a;", one);
        assert_ne!(a, plugin_file_name("int b;", one));
        assert_ne!(a, plugin_file_name("int a;", Variant::for_vm(V10, 1)));
        assert_eq!(a, plugin_file_name("int a;", one));
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
    fn every_variant_of_the_plugin_builds_with_the_system_compiler() {
        // The machines vport runs on link Rust with `cc`: the compiler is there.
        let dir = tempfile::tempdir().unwrap();
        let mut built = Vec::new();
        for variant in [Variant::for_vm(V7, 1), Variant::for_vm(V7, 2), Variant::for_vm(V10, 1)] {
            let so = build_plugin(dir.path(), variant).unwrap();
            assert!(so.is_file());
            assert_eq!(build_plugin(dir.path(), variant).unwrap(), so, "built once, then reused");
            built.push(so);
        }
        built.dedup();
        assert_eq!(built.len(), 3, "one file per variant");
    }
}
