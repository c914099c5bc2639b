//! The kernel of the Debian guest and the modules its initramfs loads: the busybox test image's
//! virtio modules plus what the root disk needs (virtio_blk, ext4 and its checksum driver).
//!
//! The kernel cache (`<cache>/kernels/`, [`super::super::kernel`]) keeps only the busybox
//! image's modules, so the whole module tree is taken from the kernel package again, unpacked
//! into the build's scratch directory (once per distro image: the image is cached).

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};

use super::super::kernel::{self, KernelSource};
use super::super::modules::{collect_wanted, LoadedModule};
use super::DistroError;

/// Modules the Debian guest's initramfs loads (with their dependencies, unless built in), in
/// this order: the PCI transport, the root disk, the ports, then ext4 after the crc32c driver
/// its journal checksums need (a soft dependency, not in `depends=`; the generic one, because
/// TCG's CPU has no SSE 4.2 for crc32c-intel).
pub const DISTRO_MODULES: &[&str] = &["virtio_pci", "virtio_blk", "virtio_console", "crc32c_generic", "ext4"];
/// Those of [`DISTRO_MODULES`] a kernel may lack without harm (another crc32c provider).
pub const OPTIONAL_DISTRO_MODULES: &[&str] = &["crc32c_generic"];

/// Where the full module tree comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum ModuleTree {
    /// A Debian kernel package to unpack.
    Deb(PathBuf),
    /// A `lib/modules/<release>` directory.
    Dir(PathBuf),
    /// None: the kernel has what the guest needs built in.
    BuiltIn,
}

/// The kernel of a distro image, before its modules are read.
#[derive(Debug, Clone)]
pub(super) struct KernelParts {
    /// The bzImage.
    pub vmlinuz: PathBuf,
    /// Its release (`6.1.0-57-amd64`).
    pub release: String,
    /// Hex SHA-256 of what identifies the kernel and its modules (the package file, or the
    /// bzImage and the module directory's path).
    pub identity: String,
    /// Where the modules come from.
    pub tree: ModuleTree,
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> DistroError + '_ {
    move |source| DistroError::Io { path: path.to_path_buf(), source }
}

/// Hex SHA-256 of the file at `path`, read in chunks.
pub(super) fn file_sha256(path: &Path) -> Result<String, DistroError> {
    let mut f = std::fs::File::open(path).map_err(io_err(path))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(io_err(path))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(crate::cache::hex(&h.finalize()))
}

/// Resolves the kernel (downloading and unpacking the package like the busybox image does) and
/// where its full module tree is.
pub(super) fn resolve(
    source: &KernelSource,
    cache_dir: &Path,
    progress: &mut dyn FnMut(&str),
) -> Result<KernelParts, DistroError> {
    let k = kernel::resolve(source, cache_dir, progress)?;
    let (tree, identity) = match source {
        KernelSource::Deb(deb) => (ModuleTree::Deb(deb.clone()), file_sha256(deb)?),
        KernelSource::Auto => {
            // kernel::resolve has made sure the package is in <cache>/debs; the same pick.
            let debs = cache_dir.join("debs");
            let names: Vec<String> = std::fs::read_dir(&debs)
                .map_err(io_err(&debs))?
                .filter_map(|e| e.ok()?.file_name().into_string().ok())
                .collect();
            let name = kernel::pick_kernel_deb(names.iter().map(String::as_str)).ok_or_else(|| {
                DistroError::Image(super::super::ImageError::NoKernel {
                    reason: format!("no kernel package left in {}", debs.display()),
                })
            })?;
            let deb = debs.join(name);
            let id = file_sha256(&deb)?;
            (ModuleTree::Deb(deb), id)
        }
        KernelSource::Image { path, modules_dir } => {
            let mut h = Sha256::new();
            h.update(file_sha256(path)?.as_bytes());
            if let Some(d) = modules_dir {
                h.update(d.to_string_lossy().as_bytes());
            }
            let id = crate::cache::hex(&h.finalize());
            (modules_dir.clone().map_or(ModuleTree::BuiltIn, ModuleTree::Dir), id)
        }
    };
    Ok(KernelParts { vmlinuz: k.image, release: k.release, identity, tree })
}

/// Reads the modules of [`DISTRO_MODULES`] and their dependencies, in load order; a package is
/// unpacked into `scratch` first.
pub(super) fn collect(
    parts: &KernelParts,
    scratch: &Path,
    progress: &mut dyn FnMut(&str),
) -> Result<Vec<LoadedModule>, DistroError> {
    let dir = match &parts.tree {
        ModuleTree::BuiltIn => return Ok(Vec::new()),
        ModuleTree::Dir(d) => d.clone(),
        ModuleTree::Deb(deb) => {
            progress(&format!("unpacking the modules of {}...", deb.display()));
            let out = Command::new("dpkg-deb")
                .arg("-x")
                .arg(deb)
                .arg(scratch)
                .output()
                .map_err(|e| DistroError::tool("dpkg-deb", "dpkg", e))?;
            if !out.status.success() {
                return Err(DistroError::Image(super::super::ImageError::Unpack {
                    deb: deb.clone(),
                    reason: format!("dpkg-deb -x: {}: {}", out.status, String::from_utf8_lossy(&out.stderr).trim()),
                }));
            }
            ["lib/modules", "usr/lib/modules"]
                .iter()
                .map(|d| scratch.join(d).join(&parts.release))
                .find(|d| d.is_dir())
                .ok_or_else(|| {
                    DistroError::Image(super::super::ImageError::Unpack {
                        deb: deb.clone(),
                        reason: format!("no lib/modules/{} in the package", parts.release),
                    })
                })?
        }
    };
    Ok(collect_wanted(&dir, DISTRO_MODULES, OPTIONAL_DISTRO_MODULES)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::elf::tests::fake_elf;

    #[test]
    fn collects_the_wanted_closure_from_modinfo_skipping_builtin() {
        let dir = tempfile::tempdir().unwrap();
        let write = |rel: &str, deps: &str| {
            let p = dir.path().join(rel);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, fake_elf(&[], ".modinfo", format!("license=GPL\0depends={deps}\0").as_bytes())).unwrap();
        };
        write("kernel/drivers/virtio/virtio_ring.ko", "");
        write("kernel/drivers/virtio/virtio.ko", "virtio_ring");
        write("kernel/drivers/block/virtio_blk.ko", "virtio,virtio_ring");
        write("kernel/fs/jbd2/jbd2.ko", "");
        write("kernel/fs/mbcache.ko", "");
        write("kernel/lib/crc16.ko", "");
        write("kernel/crypto/crc32c_generic.ko", "");
        write("kernel/fs/ext4/ext4.ko", "jbd2,mbcache,crc16");
        std::fs::write(dir.path().join("modules.builtin"), "kernel/lib/crc16.ko\n").unwrap();
        let mods = collect_wanted(dir.path(), &["virtio_blk", "crc32c_generic", "ext4"], &["crc32c_generic"]).unwrap();
        let names: Vec<_> = mods.iter().map(|m| m.name.as_str()).collect();
        assert_eq!(names, ["virtio_ring", "virtio", "virtio_blk", "crc32c_generic", "jbd2", "mbcache", "ext4"]);
        // An optional module the tree lacks is left out; a required one is an error.
        std::fs::remove_file(dir.path().join("kernel/crypto/crc32c_generic.ko")).unwrap();
        let mods = collect_wanted(dir.path(), &["crc32c_generic", "ext4"], &["crc32c_generic"]).unwrap();
        assert_eq!(mods.iter().map(|m| m.name.as_str()).collect::<Vec<_>>(), ["jbd2", "mbcache", "ext4"]);
        let err = collect_wanted(dir.path(), &["virtio_console"], &[]).unwrap_err();
        assert!(err.to_string().contains("virtio_console") && err.to_string().contains("not found"), "{err}");
    }

    #[test]
    fn kernel_identity_follows_the_image_and_module_dir() {
        let dir = tempfile::tempdir().unwrap();
        let k = dir.path().join("bzImage");
        std::fs::write(&k, b"kernel").unwrap();
        let src = |m: Option<&str>| KernelSource::Image { path: k.clone(), modules_dir: m.map(|m| dir.path().join(m)) };
        std::fs::create_dir_all(dir.path().join("m1")).unwrap();
        std::fs::create_dir_all(dir.path().join("m2")).unwrap();
        let a = resolve(&src(Some("m1")), dir.path(), &mut |_| {}).unwrap();
        let b = resolve(&src(Some("m2")), dir.path(), &mut |_| {}).unwrap();
        let c = resolve(&src(None), dir.path(), &mut |_| {}).unwrap();
        assert_ne!(a.identity, b.identity);
        assert_eq!(c.tree, ModuleTree::BuiltIn);
        assert_eq!(a.tree, ModuleTree::Dir(dir.path().join("m1")));
    }
}
