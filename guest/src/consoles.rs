//! Which console nodes (`/dev/hvcN`) `--consoles` tries: a pure reading of
//! `<sysfs>/class/tty`.
//!
//! What the guest can learn about a virtconsole port (measured on Debian's 6.1 kernel, see
//! `guest/README.md`, "Console ports"):
//!
//! - Its virtio-serial side is an ordinary `vportNpM` device: listed in
//!   `<sysfs>/class/virtio-ports` with its `name` attribute, announced by the same `add` /
//!   `change` / `remove` uevents as a serial port; opening that node fails with ENXIO
//!   (`port_fops_open`: consoles are reached through hvc only).
//! - Its tty is one of `hvc0`..`hvc7`: the hvc driver registers 8 lines at once when the first
//!   console appears (`/proc/tty/drivers`: `hvc 229 0-7`), all eight are
//!   `/sys/devices/virtual/tty/hvcN` with no link to the virtio device, and no tty uevent
//!   marks a console's hot-plug or unplug. The line a console gets is the first free one
//!   (`hvc_alloc`), not its port id, and nothing in sysfs maps a port name to its line. A
//!   ninth console has no line, so no node.
//! - An hvc line without a console behind it fails to open with ENODEV; one whose console was
//!   unplugged is hung up (`hvc_remove` -> `tty_vhangup`): POLLHUP, reads return 0.
//!
//! So `--consoles` serves every hvc line a console backs, identified by its node
//! (`/dev/hvcN`), found again on every virtio-ports uevent; [`list_lines`] says which lines
//! to try.

use std::path::Path;

use crate::discovery::DiscoveryError;

/// True for `hvc<N>`.
pub fn is_console_node_name(s: &str) -> bool {
    s.strip_prefix("hvc").is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

/// The hvc lines listed in `<sysfs_root>/class/tty` (`hvc0`, `hvc1`, ...), in numeric order,
/// without the ones the kernel writes its own console to (`<sysfs_root>/class/tty/console/active`,
/// for example `hvc0` with `console=hvc0`): a system console (and the getty on it) is never
/// taken over. A missing directory (no tty class yet) is an empty listing.
pub fn list_lines(sysfs_root: &Path) -> Result<Vec<String>, DiscoveryError> {
    let dir = sysfs_root.join("class/tty");
    let entries = match std::fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => return Err(DiscoveryError::List { path: dir, source }),
    };
    let active = std::fs::read_to_string(dir.join("console/active")).unwrap_or_default();
    let active: Vec<&str> = active.split_whitespace().collect();
    let mut out = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|source| DiscoveryError::List { path: dir.clone(), source })?;
        let Some(name) = entry.file_name().to_str().map(str::to_owned) else { continue };
        if is_console_node_name(&name) && !active.contains(&name.as_str()) {
            out.push(name);
        }
    }
    out.sort_by_key(|n| (n.len(), n.clone()));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tree(lines: &[&str], active: Option<&str>) -> std::path::PathBuf {
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let root = std::env::temp_dir().join(format!("vport-agent-consoles-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(&root).unwrap();
        let class = root.join("class/tty");
        for l in lines {
            std::fs::create_dir_all(class.join(l)).unwrap();
        }
        if let Some(a) = active {
            std::fs::create_dir_all(class.join("console")).unwrap();
            std::fs::write(class.join("console/active"), a).unwrap();
        }
        root
    }

    #[test]
    fn lists_hvc_lines_in_numeric_order() {
        let root = tree(&["hvc10", "hvc2", "ttyS0", "hvc0", "hvcx", "tty1"], None);
        assert_eq!(list_lines(&root).unwrap(), ["hvc0", "hvc2", "hvc10"]);
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn the_kernels_active_console_is_left_alone() {
        let root = tree(&["hvc0", "hvc1", "ttyS0"], Some("ttyS0 hvc0\n"));
        assert_eq!(list_lines(&root).unwrap(), ["hvc1"]);
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn no_tty_class_is_no_lines() {
        let root = tree(&[], None);
        assert_eq!(list_lines(&root).unwrap(), Vec::<String>::new());
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn console_node_names() {
        assert!(is_console_node_name("hvc0"));
        assert!(is_console_node_name("hvc15"));
        assert!(!is_console_node_name("hvc"));
        assert!(!is_console_node_name("hvcs0"));
        assert!(!is_console_node_name("vport0p1"));
    }
}
