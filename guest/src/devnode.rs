//! Opening a virtio-serial port node on a host's behalf (GUEST_OP OPEN and DEBUGFS), safely.
//!
//! A host may name a port only; it can never make the agent open anything else:
//!
//! 1. [`parse_reference`]: the reference is a port name (`org.vport.x`), a node name
//!    (`vport0p3`), `/dev/vportNpM` or `/dev/virtio-ports/NAME`. Any other path, `..`, an
//!    empty name or a control character is refused ([`NodeError::Denied`]).
//! 2. [`resolve`]: the port is looked up in `<sysfs>/class/virtio-ports` (as discovery does),
//!    giving its node name and its device number (the `dev` attribute). A reference that is
//!    not listed is [`NodeError::NotFound`]. The path opened is always `<dev>/<node>`, built
//!    from the listing: a `/dev/virtio-ports/NAME` symlink is never followed.
//! 3. [`open_node`]: `lstat` first (the node must be a character device with exactly that
//!    device number: nothing else is opened at all), then `open` with
//!    `O_NOFOLLOW | O_NOCTTY | O_CLOEXEC`, then `fstat` of the opened fd, checked again (a
//!    node swapped between the two is closed and refused).
//!
//! Virtio-console ports are in the same sysfs class, so their `vportNpM` node passes these
//! checks; the kernel itself answers its open with ENXIO.

use crate::discovery::{is_port_node_name, list_sysfs};
use nix::errno::Errno;
use nix::fcntl::{open, OFlag};
use nix::sys::stat::{fstat, lstat, Mode, SFlag};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use thiserror::Error;

/// Why a port reference cannot be opened.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum NodeError {
    /// Refused by policy: not a port reference, or not a virtio-ports device.
    #[error("{0}")]
    Denied(String),
    /// A well-formed reference to a port that is not present (errno ENOENT).
    #[error("{0}")]
    NotFound(String),
    /// A system call failed (the errno and what was being done).
    #[error("{what}: {errno}")]
    Sys {
        /// The errno.
        errno: Errno,
        /// The call and its path.
        what: String,
    },
}

/// A port reference as the host gave it, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PortRef {
    /// A sysfs port name.
    Name(String),
    /// A node name, `vportNpM`.
    Node(String),
}

/// A port found in sysfs: where its node is and which device it must be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortNode {
    /// Node name, `vportNpM`.
    pub node: String,
    /// `<dev_root>/<node>`.
    pub path: PathBuf,
    /// The device number sysfs gives for it (`major:minor`).
    pub rdev: (u64, u64),
}

/// Validates a host's port reference (see the module docs); pure.
pub fn parse_reference(reference: &str) -> Result<PortRef, NodeError> {
    let deny =
        |why: &str| Err(NodeError::Denied(format!("{reference:?} is not a virtio-serial port reference: {why}")));
    if reference.is_empty() {
        return deny("it is empty");
    }
    if reference.chars().any(char::is_control) {
        return deny("it contains a control character");
    }
    let name = if let Some(rest) = reference.strip_prefix("/dev/virtio-ports/") {
        rest
    } else if let Some(rest) = reference.strip_prefix("/dev/") {
        if is_port_node_name(rest) {
            return Ok(PortRef::Node(rest.to_owned()));
        }
        return deny("the only paths accepted are /dev/vportNpM and /dev/virtio-ports/NAME");
    } else if reference.starts_with('/') {
        return deny("the only paths accepted are /dev/vportNpM and /dev/virtio-ports/NAME");
    } else {
        reference
    };
    if name.contains('/') || name == "." || name == ".." {
        return deny("a port name has no '/' and is not '.' or '..'");
    }
    if name.is_empty() {
        return deny("the port name is empty");
    }
    Ok(if is_port_node_name(name) { PortRef::Node(name.to_owned()) } else { PortRef::Name(name.to_owned()) })
}

/// Looks `reference` up in `<sysfs_root>/class/virtio-ports`.
pub fn resolve(reference: &str, sysfs_root: &Path, dev_root: &Path) -> Result<PortNode, NodeError> {
    let wanted = parse_reference(reference)?;
    let listing =
        list_sysfs(sysfs_root).map_err(|e| NodeError::Sys { errno: Errno::EIO, what: crate::log::chain(&e) })?;
    let found = listing.iter().find(|p| match &wanted {
        PortRef::Name(n) => p.name.as_deref() == Some(n.as_str()),
        PortRef::Node(d) => p.dev == *d,
    });
    let Some(port) = found else {
        return Err(NodeError::NotFound(format!("no port named {reference} in sysfs")));
    };
    let dev_file = sysfs_root.join("class/virtio-ports").join(&port.dev).join("dev");
    let text = std::fs::read_to_string(&dev_file).map_err(|e| NodeError::Sys {
        errno: e.raw_os_error().map_or(Errno::EIO, Errno::from_raw),
        what: format!("read {}", dev_file.display()),
    })?;
    let rdev = parse_dev(&text).ok_or_else(|| NodeError::Sys {
        errno: Errno::EINVAL,
        what: format!("{} holds {text:?}, not major:minor", dev_file.display()),
    })?;
    Ok(PortNode { node: port.dev.clone(), path: dev_root.join(&port.dev), rdev })
}

/// Parses a sysfs `dev` attribute (`"252:3\n"`).
pub fn parse_dev(text: &str) -> Option<(u64, u64)> {
    let (major, minor) = text.trim_end_matches('\n').split_once(':')?;
    Some((major.parse().ok()?, minor.parse().ok()?))
}

/// Checks that `stat` describes the character device `rdev`.
fn is_the_device(mode: u32, st_rdev: u64, rdev: (u64, u64)) -> bool {
    let kind = SFlag::from_bits_truncate(mode & SFlag::S_IFMT.bits());
    kind == SFlag::S_IFCHR && (nix::sys::stat::major(st_rdev), nix::sys::stat::minor(st_rdev)) == rdev
}

/// Opens `port`'s node read-write (see the module docs for the checks).
pub fn open_node(port: &PortNode, nonblock: bool) -> Result<OwnedFd, NodeError> {
    let path = &port.path;
    let denied = |what: &str| {
        NodeError::Denied(format!(
            "{} is not the virtio-ports device {}:{} that sysfs lists for {}: {what}",
            path.display(),
            port.rdev.0,
            port.rdev.1,
            port.node
        ))
    };
    let st = lstat(path).map_err(|errno| NodeError::Sys { errno, what: format!("lstat {}", path.display()) })?;
    if !is_the_device(st.st_mode, st.st_rdev, port.rdev) {
        return Err(denied("refused before opening it"));
    }
    let mut flags = OFlag::O_RDWR | OFlag::O_CLOEXEC | OFlag::O_NOCTTY | OFlag::O_NOFOLLOW;
    if nonblock {
        flags |= OFlag::O_NONBLOCK;
    }
    let fd = match open(path, flags, Mode::empty()) {
        Ok(fd) => fd,
        Err(Errno::ELOOP) => return Err(denied("it became a symbolic link")),
        Err(errno) => return Err(NodeError::Sys { errno, what: format!("open {}", path.display()) }),
    };
    let st = fstat(&fd).map_err(|errno| NodeError::Sys { errno, what: format!("fstat {}", path.display()) })?;
    if !is_the_device(st.st_mode, st.st_rdev, port.rdev) {
        return Err(denied("it changed while being opened; closed again"));
    }
    Ok(fd)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_nodes_and_the_two_dev_paths_are_port_references() {
        assert_eq!(parse_reference("org.vport.x"), Ok(PortRef::Name("org.vport.x".into())));
        assert_eq!(parse_reference("vport0p3"), Ok(PortRef::Node("vport0p3".into())));
        assert_eq!(parse_reference("/dev/vport1p12"), Ok(PortRef::Node("vport1p12".into())));
        assert_eq!(parse_reference("/dev/virtio-ports/org.vport.x"), Ok(PortRef::Name("org.vport.x".into())));
        assert_eq!(parse_reference("/dev/virtio-ports/vport0p2"), Ok(PortRef::Node("vport0p2".into())));
    }

    #[test]
    fn every_other_path_and_traversal_is_denied() {
        for bad in [
            "/etc/passwd",
            "/init",
            "/proc/self/environ",
            "/dev/virtio-ports/../../etc/passwd",
            "/dev/virtio-ports/..",
            "/dev/virtio-ports/",
            "/dev/vport0p3/../../init",
            "/dev/hvc0",
            "/dev/mem",
            "../etc/passwd",
            "..",
            ".",
            "a/b",
            "",
            "org.vport\n.x",
            "/dev/vport0p3\0",
        ] {
            assert!(matches!(parse_reference(bad), Err(NodeError::Denied(_))), "{bad:?} must be denied");
        }
    }

    #[test]
    fn sysfs_dev_attributes_parse() {
        assert_eq!(parse_dev("252:3\n"), Some((252, 3)));
        assert_eq!(parse_dev("252:3"), Some((252, 3)));
        assert_eq!(parse_dev("252"), None);
        assert_eq!(parse_dev("a:b\n"), None);
    }

    /// A fake sysfs and dev tree: `dev_file` is what sysfs says for vport0p1; `node` makes the
    /// node in the dev directory.
    fn tree(dev_file: &str, node: impl FnOnce(&Path)) -> (tempfile::TempDir, PathBuf, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let sys = dir.path().join("sys");
        let devd = dir.path().join("dev");
        let port = sys.join("class/virtio-ports/vport0p1");
        std::fs::create_dir_all(&port).unwrap();
        std::fs::create_dir_all(&devd).unwrap();
        std::fs::write(port.join("name"), "org.vport.x\n").unwrap();
        std::fs::write(port.join("dev"), dev_file).unwrap();
        node(&devd.join("vport0p1"));
        (dir, sys, devd)
    }

    #[test]
    fn a_regular_file_or_a_symlink_in_place_of_the_node_is_never_opened() {
        let (_d, sys, devd) = tree("1:3\n", |p| std::fs::write(p, "secret").unwrap());
        let node = resolve("org.vport.x", &sys, &devd).unwrap();
        assert_eq!(node.rdev, (1, 3));
        assert!(matches!(open_node(&node, true), Err(NodeError::Denied(_))));

        let (_d, sys, devd) = tree("1:3\n", |p| std::os::unix::fs::symlink("/dev/null", p).unwrap());
        let node = resolve("/dev/virtio-ports/org.vport.x", &sys, &devd).unwrap();
        assert!(matches!(open_node(&node, true), Err(NodeError::Denied(_))), "symlinks are not followed");
    }

    #[test]
    fn a_character_device_with_another_number_is_refused_and_the_right_one_opens() {
        // /dev/null is 1:3. A node that is /dev/null while sysfs says 1:5 is refused.
        let (_d, sys, devd) = tree("1:5\n", |_| {});
        let mut node = resolve("vport0p1", &sys, &devd).unwrap();
        node.path = PathBuf::from("/dev/null");
        assert!(matches!(open_node(&node, true), Err(NodeError::Denied(_))));
        node.rdev = (1, 3);
        assert!(open_node(&node, true).is_ok(), "the device sysfs names opens");
    }

    #[test]
    fn an_unlisted_name_is_not_found() {
        let (_d, sys, devd) = tree("1:3\n", |_| {});
        assert!(matches!(resolve("org.vport.y", &sys, &devd), Err(NodeError::NotFound(_))));
        assert!(matches!(resolve("vport9p9", &sys, &devd), Err(NodeError::NotFound(_))));
    }
}
