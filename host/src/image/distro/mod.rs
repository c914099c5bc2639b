//! A real distribution guest: Debian (bookworm) with systemd and udev on a disk image, the
//! agent installed from its `.deb` (`scripts/build-deb`) with `dpkg -i`, so that systemd starts
//! it at boot as the package's unit says (an unprivileged dynamic user in group `vport`) and
//! udev gives it its ports (`99-vport.rules`).
//!
//! The image is three files: the Debian kernel (the one the busybox image boots), a small
//! busybox initramfs that loads the modules the disk and the ports need ([`kmods`]) and hands
//! over to the disk's systemd ([`init`]), and `rootfs.ext4`, built with `mmdebstrap` from
//! Debian's packages and `mkfs.ext4 -d` ([`rootfs`]). Boot it with [`DistroImage::vm_config`]:
//! the disk is attached with `snapshot=on`, so every boot starts from the built image and the
//! cached file is never written.
//!
//! Images are cached like the busybox image, under `<cache>/distro/<key>/`, where `key` is a
//! SHA-256 over every input: [`DISTRO_BUILDER_VERSION`], suite, mirror, variant and package
//! list, the agent's `.deb`, the kernel, busybox, and the texts and arguments of each step. A
//! changed `.deb` or package list gives a new image; Debian's own updates do not (remove
//! `<cache>/distro/` to take them). A new image removes all but the [`KEEP_IMAGES`] newest. Building needs root (mmdebstrap's root mode keeps the
//! files' owners, which `mkfs.ext4 -d` copies), `mmdebstrap`, `mkfs.ext4`, `dpkg-deb` and the
//! network (about 100 MB from the mirror); it takes about half a minute.

pub mod init;
pub mod kmods;
pub mod rootfs;

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};

use super::kernel::{natural_cmp, KernelSource};
use super::modules::ModuleError;
use super::{cpio, ImageError};

/// Bumped whenever the distro image's layout changes, so old cache entries are not reused.
pub const DISTRO_BUILDER_VERSION: &str = "vport-distro-1";
/// The Debian release the guest runs.
pub const DEFAULT_SUITE: &str = "bookworm";
/// Where its packages come from, unless [`MIRROR_ENV`] says otherwise.
pub const DEFAULT_MIRROR: &str = "http://deb.debian.org/debian";
/// Environment variable naming another Debian mirror (a URL, or anything mmdebstrap takes).
pub const MIRROR_ENV: &str = "VPORT_DEBIAN_MIRROR";
/// Environment variable naming the agent's `.deb`.
pub const AGENT_DEB_ENV: &str = "VPORT_AGENT_DEB";
/// Guest memory for a systemd guest, MiB.
pub const MEMORY_MIB: u32 = 512;
/// The QEMU drive id of the root disk.
pub const DISK_ID: &str = "vport-root";

/// Why the Debian guest image could not be built.
#[derive(Debug, thiserror::Error)]
pub enum DistroError {
    /// The kernel or busybox (shared with the busybox image).
    #[error(transparent)]
    Image(#[from] ImageError),
    /// The modules the initramfs loads.
    #[error("cannot prepare the Debian guest's kernel modules")]
    Modules(#[from] ModuleError),
    /// Not running as root.
    #[error(
        "building the Debian guest image needs root: mmdebstrap --mode=root installs the packages with their \
         owners, which mkfs.ext4 -d copies into the disk image; run it as root (scripts/test-distro)"
    )]
    NotRoot,
    /// A tool could not be run.
    #[error("cannot run {tool} ({cause}): install it with `apt-get install {package}` (scripts/test-distro does)")]
    Tool { tool: &'static str, package: &'static str, cause: String },
    /// No `.deb` of the agent was found.
    #[error(
        "no vport-agent .deb found (looked in {looked_at}): build it with scripts/build-deb, or set {AGENT_DEB_ENV} \
         to its path"
    )]
    DebNotFound { looked_at: String },
    /// The file given as the agent's package is not it.
    #[error("{path} is not the vport-agent package ({reason}): build it with scripts/build-deb")]
    BadDeb { path: PathBuf, reason: String },
    /// A build step failed.
    #[error("{what} failed ({status}); the last lines of its log {log}:\n{tail}")]
    Step { what: String, status: String, log: PathBuf, tail: String },
    /// An interrupted build left mounts in its scratch directory, which is kept.
    #[error(
        "an interrupted mmdebstrap left mounts under {dir} ({mounts}); unmount them (umount -R {dir}), then remove \
         the directory"
    )]
    LeftMounts { dir: PathBuf, mounts: String },
    /// A file operation failed.
    #[error("i/o error on {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl DistroError {
    /// `tool` (from the Debian package `package`) could not be started.
    pub(crate) fn tool(tool: &'static str, package: &'static str, e: std::io::Error) -> DistroError {
        DistroError::Tool { tool, package, cause: e.to_string() }
    }
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> DistroError + '_ {
    move |source| DistroError::Io { path: path.to_path_buf(), source }
}

/// What to build a Debian guest image from.
#[derive(Debug, Clone)]
pub struct DistroRequest {
    /// The agent's package (see [`resolve_agent_deb`]).
    pub agent_deb: PathBuf,
    /// Kernel source (the busybox image's: the Debian kernel package by default).
    pub kernel: KernelSource,
    /// Static busybox for the initramfs.
    pub busybox: PathBuf,
    /// Cache directory.
    pub cache_dir: PathBuf,
    /// Debian release ([`DEFAULT_SUITE`]).
    pub suite: String,
    /// Debian mirror ([`DEFAULT_MIRROR`], or [`MIRROR_ENV`]).
    pub mirror: String,
}

impl DistroRequest {
    /// The defaults for `agent_deb`: the Debian kernel (or `VPORT_KERNEL`), the default
    /// busybox, vport's cache, bookworm from [`MIRROR_ENV`] or [`DEFAULT_MIRROR`].
    pub fn new(agent_deb: PathBuf) -> Self {
        DistroRequest {
            agent_deb,
            kernel: KernelSource::from_args(None, None, None),
            busybox: super::default_busybox(),
            cache_dir: crate::cache::cache_dir(),
            suite: DEFAULT_SUITE.into(),
            mirror: std::env::var(MIRROR_ENV).ok().filter(|m| !m.is_empty()).unwrap_or_else(|| DEFAULT_MIRROR.into()),
        }
    }
}

/// A built (or reused) Debian guest image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DistroImage {
    /// `<cache>/distro/<key>/`.
    pub dir: PathBuf,
    /// Kernel for `-kernel`.
    pub kernel: PathBuf,
    /// The initramfs for `-initrd`.
    pub initramfs: PathBuf,
    /// The ext4 root disk (raw).
    pub disk: PathBuf,
    /// The build's log: mmdebstrap's output, the package's installation by `dpkg -i` (its
    /// maintainer scripts' messages) and the checks after it.
    pub build_log: PathBuf,
    /// Kernel release.
    pub kernel_release: String,
    /// Modules the initramfs loads, in order.
    pub modules: Vec<String>,
    /// Kernel command line ([`init::cmdline`]).
    pub cmdline: String,
    /// Debian release.
    pub suite: String,
    /// The agent's package it was built from.
    pub agent_deb: PathBuf,
    /// Hex SHA-256 of that package.
    pub agent_deb_sha256: String,
    /// Cache key.
    pub key: String,
    /// Whether this call built it (`false`: from the cache).
    pub fresh: bool,
}

impl DistroImage {
    /// QEMU arguments attaching the root disk as a virtio-blk device, `snapshot=on` (writes go
    /// to a temporary file, the image stays as built).
    pub fn disk_args(&self) -> Vec<OsString> {
        // QEMU's option syntax doubles a comma inside a value.
        let file = self.disk.to_string_lossy().replace(',', ",,");
        vec![
            "-drive".into(),
            format!("file={file},if=none,id={DISK_ID},format=raw,snapshot=on").into(),
            "-device".into(),
            format!("virtio-blk-pci,drive={DISK_ID}").into(),
        ]
    }

    /// A VM booting this image with virtio-serial ports `ports` ([`MEMORY_MIB`]).
    pub fn vm_config(&self, ports: &[&str]) -> crate::qemu::VmConfig {
        let mut cfg = crate::qemu::VmConfig::new(&self.kernel, &self.initramfs, self.cmdline.clone());
        cfg.ports = ports.iter().map(|p| crate::qemu::PortConfig::serial(*p)).collect();
        cfg.memory_mib = MEMORY_MIB;
        cfg.extra_args.extend(self.disk_args());
        cfg
    }
}

/// Where the agent's `.deb` is looked for when neither the caller nor [`AGENT_DEB_ENV`] names
/// it: `debian/` of the cargo target directory vport (or a test binary) was built in.
pub fn deb_dirs(exe: Option<&Path>) -> Vec<PathBuf> {
    let Some(dir) = exe.and_then(Path::parent) else { return Vec::new() };
    vec![dir.join("../debian"), dir.join("../../debian")]
}

/// The agent's package: `explicit`, else `$VPORT_AGENT_DEB`, else the newest
/// `vport-agent_*.deb` in [`deb_dirs`] (what `scripts/build-deb` makes).
pub fn resolve_agent_deb(explicit: Option<&Path>) -> Result<PathBuf, DistroError> {
    if let Some(p) = explicit {
        return Ok(p.to_path_buf());
    }
    if let Some(p) = std::env::var_os(AGENT_DEB_ENV).filter(|v| !v.is_empty()) {
        return Ok(PathBuf::from(p));
    }
    let dirs = deb_dirs(std::env::current_exe().ok().as_deref());
    let mut found: Vec<PathBuf> = dirs
        .iter()
        .filter_map(|d| std::fs::read_dir(d).ok())
        .flatten()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("vport-agent_") && n.ends_with(".deb"))
        })
        .collect();
    found.sort_by(|a, b| natural_cmp(&a.to_string_lossy(), &b.to_string_lossy()));
    found.pop().ok_or_else(|| DistroError::DebNotFound {
        looked_at: dirs.iter().map(|d| d.display().to_string()).collect::<Vec<_>>().join(", "),
    })
}

/// Checks that `deb` is a vport-agent package; returns `Package Version Architecture`.
fn check_deb(deb: &Path) -> Result<String, DistroError> {
    let out = Command::new("dpkg-deb")
        .arg("-f")
        .arg(deb)
        .args(["Package", "Version", "Architecture"])
        .output()
        .map_err(|e| DistroError::tool("dpkg-deb", "dpkg", e))?;
    let bad = |reason: String| DistroError::BadDeb { path: deb.into(), reason };
    if !out.status.success() {
        return Err(bad(format!("dpkg-deb -f: {}", String::from_utf8_lossy(&out.stderr).trim())));
    }
    let fields = String::from_utf8_lossy(&out.stdout).lines().map(str::trim).collect::<Vec<_>>().join(" ");
    if !fields.starts_with("Package: vport-agent ") {
        return Err(bad(format!("its control fields are '{fields}'")));
    }
    Ok(fields)
}

/// The cache key over every input (see the module docs).
fn key(req: &DistroRequest, deb_sha256: &str, kernel_id: &str, busybox: &[u8]) -> String {
    let mut h = Sha256::new();
    let mut part = |tag: &str, data: &[u8]| {
        h.update(tag.as_bytes());
        h.update((data.len() as u64).to_le_bytes());
        h.update(data);
    };
    part("builder", DISTRO_BUILDER_VERSION.as_bytes());
    part("suite", req.suite.as_bytes());
    part("mirror", req.mirror.as_bytes());
    part("deb", deb_sha256.as_bytes());
    part("kernel", kernel_id.as_bytes());
    part("busybox", busybox);
    part("modules", kmods::DISTRO_MODULES.join(",").as_bytes());
    part("optional-modules", kmods::OPTIONAL_DISTRO_MODULES.join(",").as_bytes());
    let wanted: Vec<String> = kmods::DISTRO_MODULES.iter().map(|m| m.to_string()).collect();
    part("init", init::init_script(&wanted).as_bytes());
    part("cmdline", init::cmdline().as_bytes());
    part("report-unit", init::REPORT_UNIT.as_bytes());
    part("report-script", init::REPORT_SCRIPT.as_bytes());
    let (root, staging) = (Path::new("/root"), Path::new("/staging"));
    for a in rootfs::mmdebstrap_args(&req.suite, &req.mirror, root, staging) {
        part("mmdebstrap", a.as_encoded_bytes());
    }
    for a in rootfs::mkfs_args(root, Path::new("/disk")) {
        part("mkfs", a.as_encoded_bytes());
    }
    crate::cache::hex(&h.finalize())
}

/// The initramfs: busybox, the modules and `/init`.
fn initramfs(busybox: &[u8], modules: &[super::modules::LoadedModule], init: &str) -> std::io::Result<Vec<u8>> {
    let mut w = cpio::CpioWriter::new(Vec::new());
    for d in ["bin", "dev", "proc", "sys", "newroot", "lib", "lib/modules"] {
        w.dir(d, 0o755)?;
    }
    w.char_dev("dev/console", 0o600, 5, 1)?;
    w.char_dev("dev/null", 0o666, 1, 3)?;
    w.file("bin/busybox", 0o755, busybox)?;
    w.symlink("bin/sh", "busybox")?;
    for m in modules {
        w.file(&format!("lib/modules/{}.ko", m.name), 0o644, &m.bytes)?;
    }
    w.file("init", 0o755, init.as_bytes())?;
    w.finish()
}

/// Builds the Debian guest image for `req`, or returns the cached one when every input is
/// unchanged. `progress` receives one-line status messages.
pub fn build(req: &DistroRequest, progress: &mut dyn FnMut(&str)) -> Result<DistroImage, DistroError> {
    let busybox = super::read_static("busybox", &req.busybox, super::BUSYBOX_HINT)?;
    if !req.agent_deb.is_file() {
        return Err(DistroError::BadDeb { path: req.agent_deb.clone(), reason: "no such file".into() });
    }
    let deb_sha256 = kmods::file_sha256(&req.agent_deb)?;
    let kernel = kmods::resolve(&req.kernel, &req.cache_dir, progress)?;
    let key = key(req, &deb_sha256, &kernel.identity, &busybox);
    let base = req.cache_dir.join("distro");
    let dir = base.join(&key);
    let mut image = DistroImage {
        kernel: dir.join("vmlinuz"),
        initramfs: dir.join("initramfs.cpio"),
        disk: dir.join("rootfs.ext4"),
        build_log: dir.join("build.log"),
        dir: dir.clone(),
        kernel_release: kernel.release.clone(),
        modules: Vec::new(),
        cmdline: init::cmdline(),
        suite: req.suite.clone(),
        agent_deb: req.agent_deb.clone(),
        agent_deb_sha256: deb_sha256,
        key,
        fresh: false,
    };
    let meta_path = dir.join("image.json");
    if let Ok(text) = std::fs::read_to_string(&meta_path) {
        let meta: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
        if let Some(mods) = meta["modules"].as_array() {
            image.modules = mods.iter().filter_map(|m| m.as_str().map(String::from)).collect();
            log::debug!("reusing Debian guest image {}", dir.display());
            return Ok(image);
        }
    }
    if !nix::unistd::geteuid().is_root() {
        return Err(DistroError::NotRoot);
    }
    for (tool, flag, package) in [("mmdebstrap", "--version", "mmdebstrap"), ("mkfs.ext4", "-V", "e2fsprogs")] {
        Command::new(tool).arg(flag).output().map_err(|e| DistroError::tool(tool, package, e))?;
    }
    let control = check_deb(&req.agent_deb)?;
    std::fs::create_dir_all(&base).map_err(io_err(&base))?;
    let tmp = tempfile::Builder::new().prefix(".build-").tempdir_in(&base).map_err(io_err(&base))?;
    // The log lives beside the scratch directory until the image is complete, so that a failed
    // build's log survives the scratch directory's removal.
    let log = base.join(format!("{}.log", image.key));
    let _ = std::fs::remove_file(&log);
    let built = build_in(tmp.path(), req, &kernel, &busybox, &log, &control, &mut image, progress);
    let mounts = rootfs::mounts_under(tmp.path());
    if !mounts.is_empty() {
        let kept = tmp.keep();
        let mounts = mounts.iter().map(|m| m.display().to_string()).collect::<Vec<_>>().join(", ");
        return Err(DistroError::LeftMounts { dir: kept, mounts });
    }
    built?;
    let staged = tmp.path().join("image");
    std::fs::rename(&log, staged.join("build.log")).map_err(io_err(&log))?;
    let meta = serde_json::json!({
        "builder": DISTRO_BUILDER_VERSION,
        "suite": image.suite,
        "mirror": req.mirror,
        "variant": rootfs::VARIANT,
        "packages": rootfs::PACKAGES,
        "agent_deb": image.agent_deb,
        "agent_deb_sha256": image.agent_deb_sha256,
        "agent_deb_control": control,
        "kernel_release": image.kernel_release,
        "modules": image.modules,
        "cmdline": image.cmdline,
    });
    let p = staged.join("image.json");
    std::fs::write(&p, meta.to_string()).map_err(io_err(&p))?;
    if let Err(source) = std::fs::rename(&staged, &dir) {
        // Lost a race with a concurrent build of the same inputs: theirs is as good.
        if !meta_path.is_file() {
            return Err(DistroError::Io { path: dir, source });
        }
        return Ok(image);
    }
    for old in prune(&base, KEEP_IMAGES) {
        progress(&format!("removed the older Debian guest image {}", old.display()));
    }
    Ok(DistroImage { fresh: true, ..image })
}

/// How many Debian guest images the cache keeps (each about 230 MB; every new `.deb` makes one).
pub const KEEP_IMAGES: usize = 2;

/// Removes all but the `keep` newest complete images in `base` (by their `image.json`'s time);
/// returns what it removed. Failures are logged, not fatal: the cache only grows.
fn prune(base: &Path, keep: usize) -> Vec<PathBuf> {
    let Ok(rd) = std::fs::read_dir(base) else { return Vec::new() };
    let mut images: Vec<(std::time::SystemTime, PathBuf)> = rd
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(|n| !n.starts_with('.')))
        .filter_map(|p| Some((std::fs::metadata(p.join("image.json")).ok()?.modified().ok()?, p)))
        .collect();
    images.sort_by_key(|i| std::cmp::Reverse(i.0));
    let mut removed = Vec::new();
    for (_, p) in images.into_iter().skip(keep) {
        match std::fs::remove_dir_all(&p) {
            Ok(()) => removed.push(p),
            Err(e) => log::warn!("cannot remove the old Debian guest image {}: {e}", p.display()),
        }
    }
    removed
}

/// The build proper, in the scratch directory `tmp`: the image's files end in `tmp/image/`.
#[allow(clippy::too_many_arguments)]
fn build_in(
    tmp: &Path,
    req: &DistroRequest,
    kernel: &kmods::KernelParts,
    busybox: &[u8],
    log: &Path,
    control: &str,
    image: &mut DistroImage,
    progress: &mut dyn FnMut(&str),
) -> Result<(), DistroError> {
    let out = tmp.join("image");
    std::fs::create_dir_all(&out).map_err(io_err(&out))?;
    let scratch = tmp.join("kernel");
    let modules = kmods::collect(kernel, &scratch, progress)?;
    if scratch.exists() {
        std::fs::remove_dir_all(&scratch).map_err(io_err(&scratch))?;
    }
    image.modules = modules.iter().map(|m| m.name.clone()).collect();
    let init = init::init_script(&image.modules);
    let cpio = initramfs(busybox, &modules, &init).map_err(io_err(&image.initramfs))?;
    let write = |name: &str, data: &[u8]| -> Result<(), DistroError> {
        let p = out.join(name);
        std::fs::write(&p, data).map_err(io_err(&p))
    };
    write("initramfs.cpio", &cpio)?;
    write("init", init.as_bytes())?;
    std::fs::copy(&kernel.vmlinuz, out.join("vmlinuz")).map_err(io_err(&kernel.vmlinuz))?;

    let staging = tmp.join("staging");
    rootfs::stage(&staging, &req.agent_deb)?;
    let root = tmp.join("root");
    progress(&format!(
        "building Debian {} ({}) with mmdebstrap from {}, then installing {control} with dpkg (log: {})...",
        req.suite,
        rootfs::PACKAGES.join(", "),
        req.mirror,
        log.display()
    ));
    let args = rootfs::mmdebstrap_args(&req.suite, &req.mirror, &root, &staging);
    rootfs::run_logged(Command::new("mmdebstrap").args(&args), "mmdebstrap", "mmdebstrap", log)?;
    progress("writing the ext4 disk image (mkfs.ext4 -d)...");
    let disk = out.join("rootfs.ext4");
    rootfs::run_logged(Command::new("mkfs.ext4").args(rootfs::mkfs_args(&root, &disk)), "mkfs.ext4", "mkfs.ext4", log)?;
    if rootfs::mounts_under(&root).is_empty() {
        std::fs::remove_dir_all(&root).map_err(io_err(&root))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests;
