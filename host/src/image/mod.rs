//! Guest image builder: a kernel plus an initramfs holding static busybox, `vport-agent`,
//! the virtio kernel modules and a generated `/init` (see [`initscript`]).
//!
//! Images are cached under `<cache_dir>/images/<key>/` where `key` is a SHA-256 over every
//! input (kernel, modules, busybox, agent, init script, [`BUILDER_VERSION`]); an unchanged
//! input set reuses the directory, any change (a rebuilt agent) gives a new one. A directory
//! is created complete or not at all (built in a temporary directory, then renamed).

pub mod cpio;
pub mod distro;
pub mod elf;
pub mod initscript;
pub mod kernel;
pub mod modules;

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

pub use kernel::KernelSource;

/// Bumped whenever the image layout changes, so old cache entries are not reused.
pub const BUILDER_VERSION: &str = "vport-image-1";
/// Environment variable naming the static `vport-agent` binary (same as `--agent`).
pub const AGENT_ENV: &str = "VPORT_AGENT";
/// Environment variable naming the static busybox to use instead of `/bin/busybox`.
pub const BUSYBOX_ENV: &str = "VPORT_BUSYBOX";
/// Default static busybox (Debian package `busybox-static`).
pub const DEFAULT_BUSYBOX: &str = "/bin/busybox";
/// Kernel command line suggested for the image: serial console, reboot (= QEMU exit with
/// `-no-reboot`) at once on panic, few kernel messages.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 panic=-1 quiet";

/// Busybox applets linked into `/bin`.
const APPLETS: &[&str] = &[
    "sh", "ash", "mount", "umount", "insmod", "rmmod", "lsmod", "echo", "cat", "sed", "printf", "poweroff", "reboot",
    "ls", "mkdir", "dmesg", "ps", "kill", "sleep", "grep", "head", "tail", "cp", "mv", "rm", "ln", "chmod", "stat",
    "find", "hexdump", "od", "dd", "true", "false", "test", "[", "uname", "env", "timeout", "sync", "wc", "tr", "cut",
    "xargs", "setsid", "stty", "readlink", "realpath", "sysctl",
];

/// Why an image could not be built.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// No kernel was given and none could be found or downloaded.
    #[error("no guest kernel found: pass --kernel PATH, set VPORT_KERNEL, or run scripts/bootstrap ({reason})")]
    NoKernel {
        /// What was tried.
        reason: String,
    },
    /// A kernel package could not be unpacked.
    #[error("cannot unpack kernel package {deb}: {reason}")]
    Unpack { deb: PathBuf, reason: String },
    /// No agent binary was given and none was found at the default build locations.
    #[error(
        "no statically linked vport-agent found (looked at {looked_at}): run scripts/build-agent in a checkout, or \
         install it beside vport with RUSTFLAGS='-C target-feature=+crt-static' cargo install --locked --path guest \
         --target x86_64-unknown-linux-gnu, or pass --agent PATH / set VPORT_AGENT"
    )]
    AgentNotFound { looked_at: String },
    /// A binary the image needs does not exist.
    #[error("{what} {path} not found: {hint}")]
    MissingBinary { what: &'static str, path: PathBuf, hint: &'static str },
    /// A binary that must be static needs a dynamic loader.
    #[error("{what} {path} is dynamically linked; the initramfs has no libc: {hint}")]
    NotStatic { what: &'static str, path: PathBuf, hint: &'static str },
    /// A binary is not an ELF executable.
    #[error("{what} {path} is not a usable x86_64 executable ({problem}): {hint}")]
    BadBinary {
        what: &'static str,
        path: PathBuf,
        /// What is wrong with the file.
        problem: elf::ElfError,
        hint: &'static str,
    },
    /// Module selection failed.
    #[error("cannot prepare the guest kernel modules")]
    Modules(#[from] modules::ModuleError),
    /// A file operation failed.
    #[error("i/o error on {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> ImageError + '_ {
    move |source| ImageError::Io { path: path.to_path_buf(), source }
}

/// What to build an image from.
#[derive(Debug, Clone)]
pub struct ImageRequest {
    /// Kernel source.
    pub kernel: KernelSource,
    /// Static `vport-agent` binary (see [`resolve_agent`]).
    pub agent: PathBuf,
    /// Static busybox (see [`default_busybox`]).
    pub busybox: PathBuf,
    /// Cache directory (normally [`crate::cache::cache_dir`]).
    pub cache_dir: PathBuf,
}

/// A built (or reused) guest image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestImage {
    /// The image directory `<cache>/images/<key>/`.
    pub dir: PathBuf,
    /// Kernel to pass to QEMU `-kernel`.
    pub kernel: PathBuf,
    /// Uncompressed newc initramfs to pass to QEMU `-initrd`.
    pub initramfs: PathBuf,
    /// Kernel release (`6.1.0-56-amd64`, or `unknown`).
    pub kernel_release: String,
    /// Modules `/init` loads, in order.
    pub modules: Vec<String>,
    /// Suggested kernel command line ([`DEFAULT_CMDLINE`]); append
    /// [`initscript::agent_args_param`] to pass agent arguments.
    pub cmdline: String,
    /// Whether this call built the image (`false`: reused from the cache).
    pub fresh: bool,
    /// The cache key (hex SHA-256 of all inputs).
    pub key: String,
}

/// Busybox to use: `$VPORT_BUSYBOX` if set, else `/bin/busybox`.
pub fn default_busybox() -> PathBuf {
    std::env::var_os(BUSYBOX_ENV)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_BUSYBOX))
}

/// The agent's file name.
pub const AGENT_FILE: &str = "vport-agent";
/// System places an agent is looked for last, for packagers (`/usr/libexec/vport/vport-agent`
/// first).
pub const AGENT_SYSTEM_PATHS: [&str; 3] =
    ["/usr/libexec/vport/vport-agent", "/usr/local/libexec/vport/vport-agent", "/usr/lib/vport/vport-agent"];

/// Where the agent is looked for when neither `--agent` nor `$VPORT_AGENT` names it, in order,
/// for a vport binary at `exe` and a `$PATH` of `path_var`:
///
/// 1. a `scripts/build-agent` build beside the vport build (`<target>/debug/vport` ->
///    `<target>/x86_64-unknown-linux-gnu/release/vport-agent`; test binaries live one level
///    deeper, `<target>/debug/deps/`);
/// 2. `vport-agent` beside `vport` (both installed with `cargo install` into one `bin/`);
/// 3. `vport-agent` in each `$PATH` directory;
/// 4. [`AGENT_SYSTEM_PATHS`].
///
/// No path of the source tree vport was built from is compiled in: an installed vport finds
/// its agent where it is installed.
pub fn agent_candidates(exe: Option<&Path>, path_var: Option<&std::ffi::OsStr>) -> Vec<PathBuf> {
    let rel = Path::new("x86_64-unknown-linux-gnu/release").join(AGENT_FILE);
    let mut v = Vec::new();
    if let Some(dir) = exe.and_then(Path::parent) {
        v.push(dir.join("..").join(&rel));
        v.push(dir.join("../..").join(&rel));
        v.push(dir.join(AGENT_FILE));
    }
    if let Some(paths) = path_var {
        v.extend(std::env::split_paths(paths).filter(|d| d.is_absolute()).map(|d| d.join(AGENT_FILE)));
    }
    v.extend(AGENT_SYSTEM_PATHS.iter().map(PathBuf::from));
    let mut seen = std::collections::HashSet::new();
    v.retain(|p| seen.insert(p.clone()));
    v
}

/// The agent binary: `explicit` (from `--agent`), else `$VPORT_AGENT`, else the first of
/// [`agent_candidates`] that is a statically linked executable (a dynamically linked
/// `vport-agent`, such as a plain `cargo build` makes, is passed over and named in the error
/// if nothing better is found).
pub fn resolve_agent(explicit: Option<&Path>) -> Result<PathBuf, ImageError> {
    if let Some(p) = explicit {
        return Ok(p.to_path_buf());
    }
    if let Some(p) = std::env::var_os(AGENT_ENV).filter(|v| !v.is_empty()) {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe().ok();
    let path_var = std::env::var_os("PATH");
    let candidates = agent_candidates(exe.as_deref(), path_var.as_deref());
    let mut passed_over = Vec::new();
    for p in candidates.iter().filter(|p| p.is_file()) {
        match std::fs::read(p).map(|bytes| elf::has_interpreter(&bytes)) {
            Ok(Ok(false)) => {
                log::debug!("using agent {}", p.display());
                return Ok(p.clone());
            }
            Ok(Ok(true)) => passed_over.push(format!("{} (dynamically linked)", p.display())),
            Ok(Err(e)) => passed_over.push(format!("{} ({e})", p.display())),
            Err(e) => passed_over.push(format!("{} ({e})", p.display())),
        }
    }
    let mut looked_at = candidates.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ");
    if !passed_over.is_empty() {
        looked_at.push_str(&format!("; passed over: {}", passed_over.join(", ")));
    }
    Err(ImageError::AgentNotFound { looked_at })
}

/// What to do about a bad or missing agent binary.
pub const AGENT_HINT: &str =
    "build the static agent with scripts/build-agent (RUSTFLAGS='-C target-feature=+crt-static'), or pass --agent PATH / set VPORT_AGENT";
/// What to do about a bad or missing busybox.
pub const BUSYBOX_HINT: &str = "install the Debian package busybox-static (scripts/bootstrap does it), or pass --busybox PATH / set VPORT_BUSYBOX to a static busybox";

/// Reads a binary that will run in the guest and checks it is a static ELF executable; errors
/// name the file and carry `hint`, what to do about it.
pub(crate) fn read_static(what: &'static str, path: &Path, hint: &'static str) -> Result<Vec<u8>, ImageError> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(ImageError::MissingBinary { what, path: path.into(), hint })
        }
        Err(source) => return Err(ImageError::Io { path: path.into(), source }),
    };
    match elf::has_interpreter(&bytes) {
        Ok(false) => Ok(bytes),
        Ok(true) => Err(ImageError::NotStatic { what, path: path.into(), hint }),
        Err(problem) => Err(ImageError::BadBinary { what, path: path.into(), problem, hint }),
    }
}

/// Everything that goes into an image, read into memory.
struct Inputs {
    kernel: Vec<u8>,
    release: String,
    modules: Vec<modules::LoadedModule>,
    busybox: Vec<u8>,
    agent: Vec<u8>,
    init: String,
}

impl Inputs {
    fn key(&self) -> String {
        let mut h = Sha256::new();
        let mut part = |tag: &str, data: &[u8]| {
            h.update(tag.as_bytes());
            h.update((data.len() as u64).to_le_bytes());
            h.update(data);
        };
        part("builder", BUILDER_VERSION.as_bytes());
        part("kernel", &self.kernel);
        for m in &self.modules {
            part("module-name", m.name.as_bytes());
            part("module", &m.bytes);
        }
        part("busybox", &self.busybox);
        part("agent", &self.agent);
        part("init", self.init.as_bytes());
        crate::cache::hex(&h.finalize())
    }

    fn initramfs(&self) -> std::io::Result<Vec<u8>> {
        let mut w = cpio::CpioWriter::new(Vec::new());
        for d in ["bin", "dev", "proc", "sys", "tmp", "run", "lib", "lib/modules"] {
            w.dir(d, 0o755)?;
        }
        // The kernel opens /dev/console for init before /init can mount devtmpfs.
        w.char_dev("dev/console", 0o600, 5, 1)?;
        w.char_dev("dev/null", 0o666, 1, 3)?;
        w.file("bin/busybox", 0o755, &self.busybox)?;
        for a in APPLETS {
            w.symlink(&format!("bin/{a}"), "busybox")?;
        }
        w.file("bin/vport-agent", 0o755, &self.agent)?;
        for m in &self.modules {
            w.file(&format!("lib/modules/{}.ko", m.name), 0o644, &m.bytes)?;
        }
        w.file("init", 0o755, self.init.as_bytes())?;
        w.finish()
    }
}

/// Builds the guest image for `req`, or returns the cached one when all inputs are
/// unchanged. `progress` receives one-line human-readable status messages.
///
/// The agent and busybox are checked first (present, static ELF executables), so a bad one is
/// reported before any kernel is looked for, downloaded or unpacked.
pub fn build(req: &ImageRequest, progress: &mut dyn FnMut(&str)) -> Result<GuestImage, ImageError> {
    let agent = read_static("vport-agent", &req.agent, AGENT_HINT)?;
    let busybox = read_static("busybox", &req.busybox, BUSYBOX_HINT)?;
    let k = kernel::resolve(&req.kernel, &req.cache_dir, progress)?;
    let kernel_bytes = std::fs::read(&k.image).map_err(io_err(&k.image))?;
    let mods = match &k.modules_dir {
        Some(d) => modules::collect(d)?,
        None => {
            log::debug!("no module tree for kernel {}: assuming virtio is built in", k.release);
            Vec::new()
        }
    };
    let names: Vec<String> = mods.iter().map(|m| m.name.clone()).collect();
    let inputs = Inputs {
        kernel: kernel_bytes,
        release: k.release.clone(),
        modules: mods,
        busybox,
        agent,
        init: initscript::init_script(&names),
    };
    let key = inputs.key();
    let images = req.cache_dir.join("images");
    let dir = images.join(&key);
    let image = GuestImage {
        kernel: dir.join("vmlinuz"),
        initramfs: dir.join("initramfs.cpio"),
        dir: dir.clone(),
        kernel_release: inputs.release.clone(),
        modules: names,
        cmdline: DEFAULT_CMDLINE.to_string(),
        fresh: false,
        key,
    };
    if dir.join("image.json").is_file() {
        log::debug!("reusing guest image {}", dir.display());
        return Ok(image);
    }
    std::fs::create_dir_all(&images).map_err(io_err(&images))?;
    let tmp = tempfile::Builder::new().prefix(".build-").tempdir_in(&images).map_err(io_err(&images))?;
    progress(&format!("writing initramfs ({} modules, kernel {})...", image.modules.len(), image.kernel_release));
    let cpio = inputs.initramfs().map_err(io_err(&image.initramfs))?;
    let write = |name: &str, data: &[u8]| -> Result<(), ImageError> {
        let p = tmp.path().join(name);
        std::fs::write(&p, data).map_err(io_err(&p))
    };
    write("vmlinuz", &inputs.kernel)?;
    write("initramfs.cpio", &cpio)?;
    write("init", inputs.init.as_bytes())?;
    let meta = serde_json::json!({
        "builder": BUILDER_VERSION,
        "kernel_release": image.kernel_release,
        "modules": image.modules,
        "cmdline": image.cmdline,
        "agent": req.agent,
        "busybox": req.busybox,
    });
    write("image.json", meta.to_string().as_bytes())?;
    let tmp_path = tmp.keep();
    if let Err(source) = std::fs::rename(&tmp_path, &dir) {
        // Lost a race with a concurrent build of the same inputs: theirs is identical.
        let _ = std::fs::remove_dir_all(&tmp_path);
        if !dir.join("image.json").is_file() {
            return Err(ImageError::Io { path: dir, source });
        }
        return Ok(image);
    }
    log::debug!("built guest image {} ({} bytes initramfs)", dir.display(), cpio.len());
    Ok(GuestImage { fresh: true, ..image })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agent_candidates_are_the_build_beside_vport_then_its_bin_then_path_then_system_places() {
        let path = std::ffi::OsString::from("/opt/bin:relative/bin:/home/u/.cargo/bin");
        let c = agent_candidates(Some(Path::new("/home/u/.cargo/bin/vport")), Some(&path));
        let want: Vec<PathBuf> = [
            "/home/u/.cargo/bin/../x86_64-unknown-linux-gnu/release/vport-agent",
            "/home/u/.cargo/bin/../../x86_64-unknown-linux-gnu/release/vport-agent",
            "/home/u/.cargo/bin/vport-agent",
            "/opt/bin/vport-agent",
            "/usr/libexec/vport/vport-agent",
            "/usr/local/libexec/vport/vport-agent",
            "/usr/lib/vport/vport-agent",
        ]
        .iter()
        .map(PathBuf::from)
        .collect();
        // A relative $PATH entry is skipped; the bin/ directory, on $PATH too, is listed once.
        assert_eq!(c, want);
        assert!(c.iter().all(|p| !p.starts_with(env!("CARGO_MANIFEST_DIR"))), "no source path compiled in");
    }

    #[test]
    fn refuses_dynamic_binary() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("agent");
        std::fs::write(&p, elf::tests::fake_elf(&[3], ".x", b"")).unwrap();
        let err = read_static("vport-agent", &p, "hint").unwrap_err();
        assert!(err.to_string().contains("dynamically linked"), "{err}");
        std::fs::write(&p, b"#!/bin/sh\n").unwrap();
        let err = read_static("vport-agent", &p, "the hint").unwrap_err();
        assert!(matches!(err, ImageError::BadBinary { .. }), "{err}");
        assert!(err.to_string().contains("not an ELF file") && err.to_string().contains("the hint"), "{err}");
        let err = read_static("busybox", &dir.path().join("missing"), BUSYBOX_HINT).unwrap_err();
        assert!(matches!(err, ImageError::MissingBinary { .. }), "{err}");
        assert!(err.to_string().contains("busybox-static"), "{err}");
    }

    /// Builds an image from fake inputs (no real kernel needed), checks its contents, that
    /// it is reused when unchanged and rebuilt when the agent changes.
    #[test]
    fn builds_caches_and_rebuilds_on_agent_change() {
        let dir = tempfile::tempdir().unwrap();
        let static_elf = elf::tests::fake_elf(&[1], ".x", b"");
        let kpath = dir.path().join("bzImage");
        std::fs::write(&kpath, b"kernel").unwrap();
        let agent = dir.path().join("agent");
        std::fs::write(&agent, &static_elf).unwrap();
        let bb = dir.path().join("busybox");
        std::fs::write(&bb, &static_elf).unwrap();
        let req = ImageRequest {
            kernel: KernelSource::Image { path: kpath, modules_dir: None },
            agent: agent.clone(),
            busybox: bb,
            cache_dir: dir.path().join("cache"),
        };
        let mut msgs = Vec::new();
        let a = build(&req, &mut |m| msgs.push(m.to_string())).unwrap();
        assert!(a.fresh);
        assert!(msgs.iter().any(|m| m.contains("writing initramfs")), "{msgs:?}");
        assert_eq!(a.kernel_release, "unknown");
        assert_eq!(std::fs::read(&a.kernel).unwrap(), b"kernel");
        let entries = cpio::read_archive(&std::fs::read(&a.initramfs).unwrap()).unwrap();
        let find = |n: &str| entries.iter().find(|e| e.name == n).unwrap_or_else(|| panic!("{n} missing"));
        assert_eq!(find("bin/vport-agent").data, static_elf);
        assert_eq!(find("bin/sh").data, b"busybox");
        assert_eq!(find("dev/console").rdev, (5, 1));
        assert!(String::from_utf8_lossy(&find("init").data).contains(initscript::MODULES_LOADED));
        for d in ["proc", "sys", "dev", "tmp", "run"] {
            assert_eq!(find(d).mode & 0o170000, cpio::S_IFDIR);
        }
        let b = build(&req, &mut |_| {}).unwrap();
        assert!(!b.fresh);
        assert_eq!(b.dir, a.dir);
        let mut changed = static_elf.clone();
        changed.push(1);
        std::fs::write(&agent, changed).unwrap();
        let c = build(&req, &mut |_| {}).unwrap();
        assert!(c.fresh);
        assert_ne!(c.key, a.key);
        // No temporary build directories are left behind.
        let leftovers: Vec<_> = std::fs::read_dir(dir.path().join("cache/images"))
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().starts_with('.'))
            .collect();
        assert!(leftovers.is_empty());
    }
}
