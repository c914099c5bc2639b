//! Finding the guest kernel: a user-supplied bzImage, a Debian `linux-image-*` package, or
//! (automatically) the package cached in `<cache>/debs/`, downloaded with `apt-get` if needed.
//!
//! A package is unpacked once into `<cache>/kernels/<package-file-stem>/`, keeping only the
//! kernel image and the virtio modules the guest needs (a full unpack is ~400 MB).

use std::cmp::Ordering;
use std::path::{Path, PathBuf};
use std::process::Command;

use super::{modules, ImageError};

/// Environment variable naming a bzImage to boot (same as `--kernel`).
pub const KERNEL_ENV: &str = "VPORT_KERNEL";
/// Environment variable naming the `lib/modules/<release>` tree of that kernel.
pub const KERNEL_MODULES_ENV: &str = "VPORT_KERNEL_MODULES";
/// Debian package whose dependency names the current kernel package.
pub const KERNEL_META_PACKAGE: &str = "linux-image-amd64";

/// Where the guest kernel comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KernelSource {
    /// A bzImage, plus optionally its `lib/modules/<release>` tree. Without a tree the
    /// kernel must have virtio-pci and virtio-console built in; no modules are loaded.
    Image {
        /// The bzImage.
        path: PathBuf,
        /// The matching `lib/modules/<release>` directory, if any.
        modules_dir: Option<PathBuf>,
    },
    /// A Debian `linux-image-<release>` package file.
    Deb(PathBuf),
    /// A `linux-image-*-amd64*.deb` in `<cache>/debs/`, downloaded with `apt-get` if absent.
    Auto,
}

impl KernelSource {
    /// The source chosen by command line values (which win) and the environment
    /// (`VPORT_KERNEL`, `VPORT_KERNEL_MODULES`): a kernel path gives [`KernelSource::Image`],
    /// else a `.deb` gives [`KernelSource::Deb`], else [`KernelSource::Auto`].
    pub fn from_args(kernel: Option<PathBuf>, modules_dir: Option<PathBuf>, deb: Option<PathBuf>) -> Self {
        let env = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty()).map(PathBuf::from);
        let kernel = kernel.or_else(|| env(KERNEL_ENV));
        let modules_dir = modules_dir.or_else(|| env(KERNEL_MODULES_ENV));
        match (kernel, deb) {
            (Some(path), _) => KernelSource::Image { path, modules_dir },
            (None, Some(deb)) => KernelSource::Deb(deb),
            (None, None) => KernelSource::Auto,
        }
    }
}

/// A kernel ready to be put in an image.
#[derive(Debug, Clone)]
pub struct ResolvedKernel {
    /// The bzImage.
    pub image: PathBuf,
    /// The module tree to take virtio modules from (`None`: load no modules).
    pub modules_dir: Option<PathBuf>,
    /// Kernel release (`6.1.0-56-amd64`), `unknown` if it could not be determined.
    pub release: String,
}

/// Release string embedded in a bzImage (the first word of the version string the boot
/// protocol header points at), if `bytes` is a bzImage.
pub fn bzimage_release(bytes: &[u8]) -> Option<String> {
    if bytes.get(0x202..0x206)? != b"HdrS" {
        return None;
    }
    let ptr = u16::from_le_bytes([*bytes.get(0x20E)?, *bytes.get(0x20F)?]) as usize;
    let s = bytes.get(0x200 + ptr..)?;
    let end = s.iter().position(|&c| c == 0 || c == b' ')?;
    let r = std::str::from_utf8(&s[..end]).ok()?;
    (!r.is_empty()).then(|| r.to_string())
}

/// Compares strings treating digit runs as numbers (`6.1.0-9` < `6.1.0-56`).
pub fn natural_cmp(a: &str, b: &str) -> Ordering {
    let (mut a, mut b) = (a.as_bytes(), b.as_bytes());
    loop {
        match (a.first(), b.first()) {
            (None, None) => return Ordering::Equal,
            (None, _) => return Ordering::Less,
            (_, None) => return Ordering::Greater,
            (Some(x), Some(y)) if x.is_ascii_digit() && y.is_ascii_digit() => {
                let na = a.iter().take_while(|c| c.is_ascii_digit()).count();
                let nb = b.iter().take_while(|c| c.is_ascii_digit()).count();
                let (da, db) = (&a[..na], &b[..nb]);
                let strip = |d: &[u8]| -> usize { d.iter().take_while(|&&c| c == b'0').count() };
                let (ta, tb) = (&da[strip(da)..], &db[strip(db)..]);
                let o = ta.len().cmp(&tb.len()).then_with(|| ta.cmp(tb));
                if o != Ordering::Equal {
                    return o;
                }
                a = &a[na..];
                b = &b[nb..];
            }
            (Some(x), Some(y)) => {
                if x != y {
                    return x.cmp(y);
                }
                a = &a[1..];
                b = &b[1..];
            }
        }
    }
}

/// Whether `file_name` is a versioned amd64 kernel image package (not the meta package,
/// not debug symbols).
pub fn is_kernel_deb(file_name: &str) -> bool {
    let Some(rest) = file_name.strip_prefix("linux-image-") else { return false };
    rest.starts_with(|c: char| c.is_ascii_digit())
        && rest.contains("-amd64")
        && rest.ends_with(".deb")
        && !rest.contains("-dbg")
}

/// The newest kernel package among `names`.
pub fn pick_kernel_deb<'a>(names: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    names.into_iter().filter(|n| is_kernel_deb(n)).max_by(|a, b| natural_cmp(a, b))
}

/// The versioned kernel package named by `apt-cache depends linux-image-amd64` output.
pub fn parse_apt_depends(text: &str) -> Option<String> {
    text.lines()
        .filter_map(|l| l.trim().trim_start_matches('|').strip_prefix("Depends:"))
        .map(str::trim)
        .find(|p| p.strip_prefix("linux-image-").is_some_and(|r| r.starts_with(|c: char| c.is_ascii_digit())))
        .map(str::to_string)
}

fn no_kernel(reason: impl Into<String>) -> ImageError {
    ImageError::NoKernel { reason: reason.into() }
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> ImageError + '_ {
    move |source| ImageError::Io { path: path.to_path_buf(), source }
}

fn run(cmd: &mut Command, what: &str) -> Result<std::process::Output, String> {
    log::debug!("running {cmd:?}");
    let out = cmd.output().map_err(|e| format!("cannot run {what}: {e}"))?;
    if !out.status.success() {
        return Err(format!("{what} failed with {}: {}", out.status, String::from_utf8_lossy(&out.stderr).trim()));
    }
    Ok(out)
}

/// The cached kernel package in `debs`, downloading it with apt-get when there is none.
fn auto_deb(debs: &Path, progress: &mut dyn FnMut(&str)) -> Result<PathBuf, ImageError> {
    let find = || -> Option<PathBuf> {
        let names: Vec<String> =
            std::fs::read_dir(debs).ok()?.filter_map(|e| e.ok()?.file_name().into_string().ok()).collect();
        pick_kernel_deb(names.iter().map(String::as_str)).map(|n| debs.join(n))
    };
    if let Some(p) = find() {
        log::debug!("using cached kernel package {}", p.display());
        return Ok(p);
    }
    let out = run(Command::new("apt-cache").args(["depends", KERNEL_META_PACKAGE]), "apt-cache depends")
        .map_err(|e| no_kernel(format!("no kernel package in {} and {e}", debs.display())))?;
    let pkg = parse_apt_depends(&String::from_utf8_lossy(&out.stdout)).ok_or_else(|| {
        no_kernel(format!("apt-cache depends {KERNEL_META_PACKAGE} names no linux-image-<version> package"))
    })?;
    std::fs::create_dir_all(debs).map_err(io_err(debs))?;
    progress(&format!("downloading kernel package {pkg} with apt-get..."));
    run(Command::new("apt-get").args(["download", "-q", &pkg]).current_dir(debs), "apt-get download")
        .map_err(|e| no_kernel(format!("downloading {pkg}: {e}")))?;
    find().ok_or_else(|| no_kernel(format!("apt-get download {pkg} left no kernel package in {}", debs.display())))
}

/// Unpacks the kernel and its virtio modules from `deb` into `<cache>/kernels/<stem>/`
/// (once; later calls reuse the directory).
/// The directory a package is unpacked into: its file stem and a key of the module set vport
/// keeps ([`modules::REQUIRED_MODULES`], [`modules::OPTIONAL_MODULES`]), so that a vport wanting
/// other modules unpacks the package again instead of reusing a copy without them.
pub fn unpack_dir_name(stem: &str) -> String {
    use sha2::Digest;
    let wanted = [modules::REQUIRED_MODULES, modules::OPTIONAL_MODULES].map(|m| m.join(",")).join(";");
    let digest = sha2::Sha256::digest(wanted.as_bytes());
    let key = crate::cache::hex(&digest[..4]);
    format!("{stem}.m{key}")
}

fn unpack_deb(deb: &Path, cache_dir: &Path, progress: &mut dyn FnMut(&str)) -> Result<ResolvedKernel, ImageError> {
    let stem = deb
        .file_stem()
        .and_then(|s| s.to_str())
        .ok_or_else(|| no_kernel(format!("{} is not a .deb file name", deb.display())))?;
    let kernels = cache_dir.join("kernels");
    let dest = kernels.join(unpack_dir_name(stem));
    let release_file = dest.join("release");
    if let Ok(release) = std::fs::read_to_string(&release_file) {
        let release = release.trim().to_string();
        let mdir = dest.join("lib/modules").join(&release);
        return Ok(ResolvedKernel { image: dest.join("vmlinuz"), modules_dir: mdir.is_dir().then_some(mdir), release });
    }
    if !deb.is_file() {
        return Err(no_kernel(format!("kernel package {} does not exist", deb.display())));
    }
    std::fs::create_dir_all(&kernels).map_err(io_err(&kernels))?;
    let tmp = tempfile::Builder::new().prefix(".unpack-").tempdir_in(&kernels).map_err(io_err(&kernels))?;
    progress(&format!("unpacking {}...", deb.display()));
    let x = tmp.path().join("x");
    run(Command::new("dpkg-deb").arg("-x").arg(deb).arg(&x), "dpkg-deb -x")
        .map_err(|e| ImageError::Unpack { deb: deb.to_path_buf(), reason: e })?;
    let boot = x.join("boot");
    let vmlinuz = std::fs::read_dir(&boot)
        .map_err(io_err(&boot))?
        .filter_map(|e| e.ok())
        .find(|e| e.file_name().to_string_lossy().starts_with("vmlinuz-"))
        .ok_or_else(|| ImageError::Unpack { deb: deb.into(), reason: "no boot/vmlinuz-* in package".into() })?;
    let release = vmlinuz.file_name().to_string_lossy()["vmlinuz-".len()..].to_string();
    let out = tmp.path().join("out");
    let out_mods = out.join("lib/modules").join(&release);
    std::fs::create_dir_all(&out_mods).map_err(io_err(&out_mods))?;
    std::fs::copy(vmlinuz.path(), out.join("vmlinuz")).map_err(io_err(&vmlinuz.path()))?;
    let src_mods = ["lib/modules", "usr/lib/modules"].iter().map(|d| x.join(d).join(&release)).find(|d| d.is_dir());
    if let Some(src_mods) = src_mods {
        for m in modules::collect(&src_mods)? {
            let p = out_mods.join(format!("{}.ko", m.name));
            std::fs::write(&p, &m.bytes).map_err(io_err(&p))?;
        }
        let builtin = src_mods.join("modules.builtin");
        if builtin.is_file() {
            let to = out_mods.join("modules.builtin");
            std::fs::copy(&builtin, &to).map_err(io_err(&to))?;
        }
    }
    let rf = out.join("release");
    std::fs::write(&rf, format!("{release}\n")).map_err(io_err(&rf))?;
    match std::fs::rename(&out, &dest) {
        Ok(()) => {}
        // Another vport unpacked the same package concurrently: use its copy.
        Err(_) if release_file.is_file() => {}
        Err(source) => return Err(ImageError::Io { path: dest, source }),
    }
    log::debug!("unpacked kernel {release} into {}", dest.display());
    unpack_deb(deb, cache_dir, progress)
}

/// Resolves `source` to a kernel image and module tree.
pub fn resolve(
    source: &KernelSource,
    cache_dir: &Path,
    progress: &mut dyn FnMut(&str),
) -> Result<ResolvedKernel, ImageError> {
    match source {
        KernelSource::Image { path, modules_dir } => {
            let bytes =
                std::fs::read(path).map_err(|e| no_kernel(format!("cannot read kernel {}: {e}", path.display())))?;
            let release = match modules_dir {
                Some(d) => d.file_name().map(|n| n.to_string_lossy().into_owned()),
                None => None,
            }
            .or_else(|| bzimage_release(&bytes))
            .unwrap_or_else(|| "unknown".to_string());
            if let Some(d) = modules_dir {
                if !d.is_dir() {
                    return Err(ImageError::Io {
                        path: d.clone(),
                        source: std::io::Error::new(std::io::ErrorKind::NotFound, "module directory not found"),
                    });
                }
            }
            Ok(ResolvedKernel { image: path.clone(), modules_dir: modules_dir.clone(), release })
        }
        KernelSource::Deb(deb) => unpack_deb(deb, cache_dir, progress),
        KernelSource::Auto => {
            let deb = auto_deb(&cache_dir.join("debs"), progress)?;
            unpack_deb(&deb, cache_dir, progress)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn natural_order() {
        assert_eq!(natural_cmp("6.1.0-9", "6.1.0-56"), Ordering::Less);
        assert_eq!(natural_cmp("a10", "a9"), Ordering::Greater);
        assert_eq!(natural_cmp("a01", "a1"), Ordering::Equal);
        assert_eq!(natural_cmp("a", "ab"), Ordering::Less);
    }

    #[test]
    fn picks_newest_versioned_kernel_deb() {
        let names = [
            "linux-image-amd64_6.1.192-2_amd64.deb",
            "linux-image-6.1.0-9-amd64_6.1.27-1_amd64.deb",
            "linux-image-6.1.0-56-amd64_6.1.192-2_amd64.deb",
            "linux-image-6.1.0-60-amd64-dbg_6.1.200-1_amd64.deb",
            "busybox_1.35.deb",
        ];
        assert_eq!(pick_kernel_deb(names), Some("linux-image-6.1.0-56-amd64_6.1.192-2_amd64.deb"));
        assert_eq!(pick_kernel_deb(["linux-image-amd64_1_amd64.deb"]), None);
    }

    #[test]
    fn parses_apt_cache_depends() {
        let out = "linux-image-amd64\n  Depends: linux-image-6.1.0-56-amd64\n";
        assert_eq!(parse_apt_depends(out).as_deref(), Some("linux-image-6.1.0-56-amd64"));
        let alt = "linux-image-amd64\n |Depends: linux-image-6.1.0-57-amd64-unsigned\n  Depends: foo\n";
        assert_eq!(parse_apt_depends(alt).as_deref(), Some("linux-image-6.1.0-57-amd64-unsigned"));
        assert_eq!(parse_apt_depends("linux-image-amd64\n  Depends: initramfs-tools\n"), None);
    }

    #[test]
    fn reads_bzimage_release() {
        let mut b = vec![0u8; 0x800];
        b[0x202..0x206].copy_from_slice(b"HdrS");
        b[0x20E..0x210].copy_from_slice(&0x400u16.to_le_bytes());
        b[0x600..0x600 + 20].copy_from_slice(b"6.1.0-56-amd64 (x) #");
        assert_eq!(bzimage_release(&b).as_deref(), Some("6.1.0-56-amd64"));
        b[0x202] = b'X';
        assert_eq!(bzimage_release(&b), None);
    }

    #[test]
    fn source_from_args_prefers_kernel_then_deb() {
        // Environment variables are process-wide; only the explicit-argument paths are
        // checked here so parallel tests stay independent of the environment.
        let s = KernelSource::from_args(Some("/k".into()), Some("/m".into()), Some("/d.deb".into()));
        assert_eq!(s, KernelSource::Image { path: "/k".into(), modules_dir: Some("/m".into()) });
        if std::env::var_os(KERNEL_ENV).is_none() {
            assert_eq!(KernelSource::from_args(None, None, Some("/d.deb".into())), KernelSource::Deb("/d.deb".into()));
            assert_eq!(KernelSource::from_args(None, None, None), KernelSource::Auto);
        }
    }

    #[test]
    fn missing_kernel_error_says_what_to_do() {
        let dir = tempfile::tempdir().unwrap();
        let src = KernelSource::Image { path: dir.path().join("nope"), modules_dir: None };
        let err = resolve(&src, dir.path(), &mut |_| {}).unwrap_err();
        assert!(err.to_string().contains("pass --kernel PATH, set VPORT_KERNEL, or run scripts/bootstrap"), "{err}");
    }

    #[test]
    fn the_unpack_directory_follows_the_module_set() {
        let name = unpack_dir_name("linux-image-6.1.0-57-amd64_6.1.192-3_amd64");
        assert!(name.starts_with("linux-image-6.1.0-57-amd64_6.1.192-3_amd64.m"), "{name}");
        assert_eq!(name.len(), "linux-image-6.1.0-57-amd64_6.1.192-3_amd64".len() + 2 + 8);
        assert_eq!(name, unpack_dir_name("linux-image-6.1.0-57-amd64_6.1.192-3_amd64"), "stable");
    }

    /// Debian's 6.12 kernel (bookworm-backports) has virtio_pci and virtio_console built in
    /// (listed in `modules.builtin`, no `.ko`): its package unpacks, and the image loads none of
    /// them, only the optional modules the package ships.
    #[test]
    fn unpacks_a_kernel_package_whose_virtio_drivers_are_built_in() {
        use crate::image::elf::tests::fake_elf;
        if Command::new("dpkg-deb").arg("--version").output().is_err() {
            println!("skipped: dpkg-deb not found");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let release = "6.12.95+deb12-amd64";
        let pkg = dir.path().join("pkg");
        let mods = pkg.join("lib/modules").join(release);
        for d in [pkg.join("DEBIAN"), pkg.join("boot"), mods.join("kernel/drivers/virtio")] {
            std::fs::create_dir_all(d).unwrap();
        }
        let control = format!(
            "Package: linux-image-{release}\nVersion: 6.12.95-1~bpo12+1\nArchitecture: amd64\n\
             Maintainer: vport <vport@localhost>\nDescription: test kernel\n"
        );
        std::fs::write(pkg.join("DEBIAN/control"), control).unwrap();
        std::fs::write(pkg.join("boot").join(format!("vmlinuz-{release}")), b"not a real bzImage").unwrap();
        let builtin = "kernel/drivers/virtio/virtio.ko\nkernel/drivers/virtio/virtio_ring.ko\n\
                       kernel/drivers/virtio/virtio_pci.ko\nkernel/drivers/char/virtio_console.ko\n";
        std::fs::write(mods.join("modules.builtin"), builtin).unwrap();
        let mmio = fake_elf(&[], ".modinfo", b"license=GPL\0depends=\0name=virtio_mmio\0");
        std::fs::write(mods.join("kernel/drivers/virtio/virtio_mmio.ko"), mmio).unwrap();
        let deb = dir.path().join(format!("linux-image-{release}_6.12.95-1~bpo12+1_amd64.deb"));
        let mut build = Command::new("dpkg-deb");
        build.args(["--root-owner-group", "-Zgzip", "--build"]).arg(&pkg).arg(&deb);
        run(&mut build, "dpkg-deb --build").unwrap();

        let cache = dir.path().join("cache");
        let k = resolve(&KernelSource::Deb(deb.clone()), &cache, &mut |_| {}).unwrap();
        assert_eq!(k.release, release);
        let mdir = k.modules_dir.clone().expect("the module tree is kept");
        assert!(mdir.join("modules.builtin").is_file());
        let names: Vec<String> = modules::collect(&mdir).unwrap().into_iter().map(|m| m.name).collect();
        assert_eq!(names, ["virtio_mmio"], "virtio_pci and virtio_console are built in, not loaded");
        // The unpacked copy is reused.
        std::fs::remove_file(&deb).unwrap();
        let again = resolve(&KernelSource::Deb(deb), &cache, &mut |_| {}).unwrap();
        assert_eq!((again.image, again.release), (k.image, k.release));
    }
}
