//! Which kernel modules the guest loads, and in what order.
//!
//! The dependency graph comes from `modules.dep` when the module tree has one (a tree
//! installed by `depmod`), otherwise from the `depends=` entry in each module's `.modinfo`
//! section (a freshly unpacked Debian `.deb` ships no `modules.dep`; it is generated at
//! install time). [`load_order`] turns the graph into an insmod order.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use super::elf::{modinfo, ElfError};

/// Modules the guest must have (unless built into the kernel), PCI transport first.
pub const REQUIRED_MODULES: &[&str] = &["virtio_pci", "virtio_console"];
/// Modules loaded when the kernel has them, with their dependencies: virtio-mmio for a future
/// `microvm` machine; AF_VSOCK over a virtio-vsock device (GUEST_OP VSOCK_ACCEPT, `vport
/// bench`'s vsock reference).
pub const OPTIONAL_MODULES: &[&str] =
    &["virtio_mmio", "vsock", "vmw_vsock_virtio_transport_common", "vmw_vsock_virtio_transport"];

/// Why the module set could not be worked out.
#[derive(Debug, thiserror::Error)]
pub enum ModuleError {
    /// A wanted module, or a dependency of one, is neither a file in the tree nor built in.
    #[error("kernel module {name} not found in {tree} (needed by {needed_by})")]
    Missing { name: String, needed_by: String, tree: String },
    /// The dependency graph has a cycle through this module.
    #[error("kernel module dependency cycle through {0}")]
    Cycle(String),
    /// A file of the module tree could not be read.
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A module file is not a valid ELF object.
    #[error("cannot parse kernel module {path}")]
    Elf {
        path: PathBuf,
        #[source]
        source: ElfError,
    },
    /// A compressed module could not be decompressed with the external tool.
    #[error("cannot decompress {path} with `{tool}` ({hint})")]
    Decompress { path: PathBuf, tool: &'static str, hint: String },
}

/// Module name as the kernel sees it: file name without `.ko[.xz|.zst|.gz]`, `-` → `_`.
pub fn normalize_name(name_or_path: &str) -> String {
    let base = name_or_path.rsplit('/').next().unwrap_or(name_or_path);
    let base = ["", ".xz", ".zst", ".gz"].iter().find_map(|c| base.strip_suffix(&format!(".ko{c}"))).unwrap_or(base);
    base.replace('-', "_")
}

/// The normalised names of the modules a kernel module depends on, from the `depends=` entry of
/// its `.modinfo` section (empty when it depends on nothing or has no such entry).
pub fn modinfo_depends(ko: &[u8]) -> Result<Vec<String>, ElfError> {
    let depends = modinfo(ko, "depends")?.unwrap_or_default();
    Ok(depends.split(',').filter(|s| !s.is_empty()).map(normalize_name).collect())
}

/// Module dependency graph: module name → names it depends on, and module name → file path
/// relative to the `lib/modules/<release>` directory.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct DepGraph {
    /// Direct (or, from `modules.dep`, transitive) dependencies of each module.
    pub deps: BTreeMap<String, Vec<String>>,
    /// Relative path of each module file.
    pub paths: BTreeMap<String, String>,
}

/// Parses the text of a `modules.dep` file (`path.ko: dep.ko dep2.ko` per line).
pub fn parse_modules_dep(text: &str) -> DepGraph {
    let mut g = DepGraph::default();
    for line in text.lines() {
        let Some((module, deps)) = line.split_once(':') else { continue };
        let module = module.trim();
        if module.is_empty() {
            continue;
        }
        let name = normalize_name(module);
        g.paths.insert(name.clone(), module.to_string());
        g.deps.insert(name, deps.split_whitespace().map(normalize_name).collect());
    }
    g
}

/// Parses `modules.builtin` (one path per line) into module names.
pub fn parse_builtin(text: &str) -> BTreeSet<String> {
    text.lines().map(str::trim).filter(|l| !l.is_empty()).map(normalize_name).collect()
}

/// Orders the dependency closure of `wanted` so every module comes after all of its
/// dependencies. Modules in `builtin` are skipped (they need no loading); a module that is
/// neither in `graph` nor built in is an error. The result is deterministic: wanted modules
/// are visited in the given order, dependencies in name order.
pub fn load_order(graph: &DepGraph, builtin: &BTreeSet<String>, wanted: &[&str]) -> Result<Vec<String>, ModuleError> {
    fn visit(
        name: &str,
        needed_by: &str,
        graph: &DepGraph,
        builtin: &BTreeSet<String>,
        stack: &mut Vec<String>,
        out: &mut Vec<String>,
    ) -> Result<(), ModuleError> {
        if builtin.contains(name) || out.iter().any(|m| m == name) {
            return Ok(());
        }
        if stack.iter().any(|m| m == name) {
            return Err(ModuleError::Cycle(name.to_string()));
        }
        let Some(deps) = graph.deps.get(name) else {
            return Err(ModuleError::Missing {
                name: name.to_string(),
                needed_by: needed_by.to_string(),
                tree: String::new(),
            });
        };
        let mut deps = deps.clone();
        deps.sort();
        deps.dedup();
        stack.push(name.to_string());
        for d in &deps {
            visit(d, name, graph, builtin, stack, out)?;
        }
        stack.pop();
        out.push(name.to_string());
        Ok(())
    }
    let mut out = Vec::new();
    for w in wanted {
        let w = normalize_name(w);
        visit(&w, "vport", graph, builtin, &mut Vec::new(), &mut out)?;
    }
    Ok(out)
}

/// A kernel module ready to go into the initramfs.
#[derive(Debug, Clone)]
pub struct LoadedModule {
    /// Kernel module name (`virtio_pci`).
    pub name: String,
    /// Uncompressed `.ko` contents.
    pub bytes: Vec<u8>,
}

/// Reads a module file, decompressing `.ko.xz`, `.ko.zst` and `.ko.gz` with the host tools.
pub fn read_module(path: &Path) -> Result<Vec<u8>, ModuleError> {
    let s = path.to_string_lossy();
    let (tool, pkg) = if s.ends_with(".ko.xz") {
        ("xz", "xz-utils")
    } else if s.ends_with(".ko.zst") {
        ("zstd", "zstd")
    } else if s.ends_with(".ko.gz") {
        ("gzip", "gzip")
    } else {
        return std::fs::read(path).map_err(|source| ModuleError::Read { path: path.into(), source });
    };
    log::debug!("decompressing {} with {tool}", path.display());
    let out = Command::new(tool).arg("-dc").arg(path).output().map_err(|e| ModuleError::Decompress {
        path: path.into(),
        tool,
        hint: format!("{e}; install the Debian package {pkg}, scripts/bootstrap does it"),
    })?;
    if !out.status.success() {
        return Err(ModuleError::Decompress {
            path: path.into(),
            tool,
            hint: format!("{}: {}", out.status, String::from_utf8_lossy(&out.stderr).trim()),
        });
    }
    Ok(out.stdout)
}

/// Index of every module file under `dir` (a `lib/modules/<release>` tree): name → relative path.
fn scan_tree(dir: &Path) -> Result<BTreeMap<String, String>, ModuleError> {
    let mut found = BTreeMap::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        let rd = std::fs::read_dir(&d).map_err(|source| ModuleError::Read { path: d.clone(), source })?;
        for entry in rd {
            let entry = entry.map_err(|source| ModuleError::Read { path: d.clone(), source })?;
            let p = entry.path();
            let ft = entry.file_type().map_err(|source| ModuleError::Read { path: p.clone(), source })?;
            if ft.is_dir() {
                todo.push(p);
            } else if let Some(n) = p.file_name().and_then(|n| n.to_str()) {
                if [".ko", ".ko.xz", ".ko.zst", ".ko.gz"].iter().any(|s| n.ends_with(s)) {
                    if let Ok(rel) = p.strip_prefix(dir) {
                        found.insert(normalize_name(n), rel.to_string_lossy().into_owned());
                    }
                }
            }
        }
    }
    Ok(found)
}

/// Works out and reads the modules the guest must load from the `lib/modules/<release>`
/// tree `dir`, in load order: [`REQUIRED_MODULES`] and those of [`OPTIONAL_MODULES`] the tree has
/// ([`collect_wanted`]).
pub fn collect(dir: &Path) -> Result<Vec<LoadedModule>, ModuleError> {
    let wanted: Vec<&str> = REQUIRED_MODULES.iter().chain(OPTIONAL_MODULES).copied().collect();
    collect_wanted(dir, &wanted, OPTIONAL_MODULES)
}

/// The modules `wanted` and their dependencies from the tree `dir` (`modules.dep` when it has
/// one, else each module's modinfo), in load order, skipping what `modules.builtin` lists and
/// the `optional` ones of `wanted` the tree does not have.
pub fn collect_wanted(dir: &Path, wanted: &[&str], optional: &[&str]) -> Result<Vec<LoadedModule>, ModuleError> {
    let read_text = |name: &str| -> Result<Option<String>, ModuleError> {
        let p = dir.join(name);
        match std::fs::read_to_string(&p) {
            Ok(t) => Ok(Some(t)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(ModuleError::Read { path: p, source }),
        }
    };
    let builtin = read_text("modules.builtin")?.map(|t| parse_builtin(&t)).unwrap_or_default();
    let tree = dir.display().to_string();
    let mut cache: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    let graph = if let Some(dep) = read_text("modules.dep")? {
        log::debug!("module graph from {}/modules.dep", tree);
        parse_modules_dep(&dep)
    } else {
        log::debug!("no modules.dep in {tree}: reading dependencies from modinfo");
        let index = scan_tree(dir)?;
        let mut g = DepGraph::default();
        let mut todo: Vec<String> = wanted.iter().map(|w| normalize_name(w)).collect();
        while let Some(name) = todo.pop() {
            if g.deps.contains_key(&name) || builtin.contains(&name) {
                continue;
            }
            let Some(rel) = index.get(&name) else { continue };
            let path = dir.join(rel);
            let bytes = read_module(&path)?;
            let deps = modinfo_depends(&bytes).map_err(|source| ModuleError::Elf { path: path.clone(), source })?;
            todo.extend(deps.iter().cloned());
            g.deps.insert(name.clone(), deps);
            g.paths.insert(name.clone(), rel.clone());
            cache.insert(name, bytes);
        }
        g
    };
    let wanted: Vec<&str> =
        wanted.iter().copied().filter(|w| !optional.contains(w) || graph.deps.contains_key(*w)).collect();
    let order = load_order(&graph, &builtin, &wanted).map_err(|e| match e {
        ModuleError::Missing { name, needed_by, .. } => ModuleError::Missing { name, needed_by, tree: tree.clone() },
        other => other,
    })?;
    log::debug!("module load order: {}", order.join(" "));
    order
        .into_iter()
        .map(|name| {
            let bytes = match cache.remove(&name) {
                Some(b) => b,
                None => {
                    let rel = graph.paths.get(&name).cloned().unwrap_or_default();
                    read_module(&dir.join(rel))?
                }
            };
            Ok(LoadedModule { name, bytes })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEP: &str = "\
kernel/drivers/virtio/virtio.ko: kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/virtio/virtio_ring.ko:
kernel/drivers/virtio/virtio_pci_modern_dev.ko:
kernel/drivers/virtio/virtio_pci_legacy_dev.ko:
kernel/drivers/virtio/virtio_pci.ko: kernel/drivers/virtio/virtio_pci_modern_dev.ko kernel/drivers/virtio/virtio_pci_legacy_dev.ko kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/char/virtio_console.ko: kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/virtio/virtio_mmio.ko.xz: kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/net/virtio_net.ko: kernel/drivers/net/net_failover.ko kernel/drivers/virtio/virtio.ko
";

    fn assert_topological(g: &DepGraph, order: &[String]) {
        for (i, m) in order.iter().enumerate() {
            for d in &g.deps[m] {
                let j = order.iter().position(|x| x == d).unwrap_or_else(|| panic!("{d} missing"));
                assert!(j < i, "{d} must come before {m} in {order:?}");
            }
        }
    }

    #[test]
    fn normalizes_names() {
        assert_eq!(normalize_name("kernel/drivers/char/virtio_console.ko"), "virtio_console");
        assert_eq!(normalize_name("virtio-rng.ko.zst"), "virtio_rng");
        assert_eq!(normalize_name("a/b/virtio_mmio.ko.xz"), "virtio_mmio");
        assert_eq!(normalize_name("virtio"), "virtio");
    }

    #[test]
    fn parses_modules_dep() {
        let g = parse_modules_dep(DEP);
        assert_eq!(g.deps["virtio"], vec!["virtio_ring"]);
        assert!(g.deps["virtio_ring"].is_empty());
        assert_eq!(g.paths["virtio_mmio"], "kernel/drivers/virtio/virtio_mmio.ko.xz");
        assert_eq!(g.deps.len(), 8);
    }

    #[test]
    fn orders_virtio_closure() {
        let g = parse_modules_dep(DEP);
        let order = load_order(&g, &BTreeSet::new(), &["virtio_pci", "virtio_console"]).unwrap();
        assert_eq!(
            order,
            ["virtio_ring", "virtio", "virtio_pci_legacy_dev", "virtio_pci_modern_dev", "virtio_pci", "virtio_console"]
        );
        assert_topological(&g, &order);
        let order = load_order(&g, &BTreeSet::new(), &["virtio_console", "virtio_mmio"]).unwrap();
        assert_eq!(order, ["virtio_ring", "virtio", "virtio_console", "virtio_mmio"]);
    }

    #[test]
    fn skips_builtin_and_reports_missing() {
        let g = parse_modules_dep(DEP);
        let builtin: BTreeSet<String> = ["virtio".to_string(), "virtio_ring".to_string()].into();
        let order = load_order(&g, &builtin, &["virtio_console"]).unwrap();
        assert_eq!(order, ["virtio_console"]);
        let err = load_order(&g, &BTreeSet::new(), &["virtio_net"]).unwrap_err();
        assert!(
            matches!(&err, ModuleError::Missing { name, needed_by, .. } if name == "net_failover" && needed_by == "virtio_net"),
            "{err:?}"
        );
        let err = load_order(&g, &BTreeSet::new(), &["nope"]).unwrap_err();
        assert!(err.to_string().contains("nope"), "{err}");
    }

    #[test]
    fn detects_cycles() {
        let g = parse_modules_dep("a.ko: b.ko\nb.ko: c.ko\nc.ko: a.ko\n");
        assert!(matches!(load_order(&g, &BTreeSet::new(), &["a"]), Err(ModuleError::Cycle(_))));
    }

    #[test]
    fn reads_normalised_dependencies_from_modinfo() {
        use crate::image::elf::tests::fake_elf;
        let ko = fake_elf(&[], ".modinfo", b"license=GPL\0depends=virtio,virtio-ring\0name=x\0");
        assert_eq!(modinfo_depends(&ko).unwrap(), vec!["virtio", "virtio_ring"]);
        let none = fake_elf(&[], ".modinfo", b"license=GPL\0depends=\0");
        assert!(modinfo_depends(&none).unwrap().is_empty());
        let other = fake_elf(&[], ".text", b"depends=virtio\0");
        assert!(modinfo_depends(&other).unwrap().is_empty());
        assert_eq!(modinfo_depends(b"#!/bin/sh\n"), Err(ElfError::NotElf));
    }

    #[test]
    fn parses_builtin() {
        let b = parse_builtin("kernel/drivers/virtio/virtio.ko\n\nkernel/drivers/char/virtio_console.ko\n");
        assert!(b.contains("virtio") && b.contains("virtio_console") && b.len() == 2);
    }

    /// A fake module `rel` under `tree` that depends on `deps` (comma-separated).
    fn write_fake_module(tree: &Path, rel: &str, deps: &str) {
        let p = tree.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        let info = format!("license=GPL\0depends={deps}\0");
        std::fs::write(p, crate::image::elf::tests::fake_elf(&[], ".modinfo", info.as_bytes())).unwrap();
    }

    #[test]
    fn collects_from_modinfo_when_no_modules_dep() {
        let dir = tempfile::tempdir().unwrap();
        let write = |rel: &str, deps: &str| write_fake_module(dir.path(), rel, deps);
        write("kernel/drivers/virtio/virtio_ring.ko", "");
        write("kernel/drivers/virtio/virtio.ko", "virtio_ring");
        write("kernel/drivers/virtio/virtio_pci_modern_dev.ko", "");
        write("kernel/drivers/virtio/virtio_pci_legacy_dev.ko", "");
        write("kernel/drivers/virtio/virtio_pci.ko", "virtio_ring,virtio_pci_modern_dev,virtio_pci_legacy_dev,virtio");
        write("kernel/drivers/char/virtio_console.ko", "virtio,virtio_ring");
        let mods = collect(dir.path()).unwrap();
        let names: Vec<_> = mods.iter().map(|m| m.name.as_str()).collect();
        assert_eq!(
            names,
            ["virtio_ring", "virtio", "virtio_pci_legacy_dev", "virtio_pci_modern_dev", "virtio_pci", "virtio_console"]
        );
        assert!(mods.iter().all(|m| m.bytes.starts_with(b"\x7fELF")));
        std::fs::remove_file(dir.path().join("kernel/drivers/virtio/virtio.ko")).unwrap();
        let err = collect(dir.path()).unwrap_err();
        assert!(err.to_string().contains("kernel module virtio not found"), "{err}");
    }

    #[test]
    fn optional_vsock_modules_come_with_their_dependencies_when_the_tree_has_them() {
        let dir = tempfile::tempdir().unwrap();
        let write = |rel: &str, deps: &str| write_fake_module(dir.path(), rel, deps);
        write("kernel/drivers/virtio/virtio_ring.ko", "");
        write("kernel/drivers/virtio/virtio.ko", "virtio_ring");
        write("kernel/drivers/virtio/virtio_pci.ko", "virtio_ring,virtio");
        write("kernel/drivers/char/virtio_console.ko", "virtio,virtio_ring");
        let names = |mods: Vec<LoadedModule>| mods.into_iter().map(|m| m.name).collect::<Vec<_>>();
        let without = names(collect(dir.path()).unwrap());
        assert!(!without.iter().any(|m| m.contains("vsock")), "no vsock in the tree, none loaded: {without:?}");
        // As Debian 6.1 has them: the transport needs its common part, vsock and virtio.
        write("kernel/net/vmw_vsock/vsock.ko", "");
        write("kernel/net/vmw_vsock/vmw_vsock_virtio_transport_common.ko", "vsock");
        write(
            "kernel/net/vmw_vsock/vmw_vsock_virtio_transport.ko",
            "virtio,vmw_vsock_virtio_transport_common,virtio_ring,vsock",
        );
        let with = names(collect(dir.path()).unwrap());
        let at = |m: &str| with.iter().position(|n| n == m).unwrap_or_else(|| panic!("{m} missing from {with:?}"));
        assert!(at("vsock") < at("vmw_vsock_virtio_transport_common"));
        assert!(at("vmw_vsock_virtio_transport_common") < at("vmw_vsock_virtio_transport"));
        assert!(at("virtio") < at("vmw_vsock_virtio_transport"));
        assert_eq!(&with[..without.len()], &without[..], "the required modules first, as before");
    }
}
