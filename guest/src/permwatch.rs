//! Waiting for a port node's permissions to change, at no cost while nothing happens.
//!
//! An unprivileged agent (the packaged unit runs it as a dynamic user in group `vport`) can
//! find a port before udev has given the node to that group: `open` fails with EACCES. The
//! kernel sends no uevent when udev then changes the mode, so the agent watches the node with
//! inotify (`IN_ATTRIB`: chmod, chown; `IN_DELETE_SELF`: the node went away) and tries again
//! when it fires. The watch costs no wakeup until the node changes.

use nix::errno::Errno;
use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify, WatchDescriptor};
use std::collections::HashMap;
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::path::Path;

/// Nodes watched for a change of their attributes.
pub struct PermWatch {
    inotify: Inotify,
    by_wd: HashMap<WatchDescriptor, String>,
    by_dev: HashMap<String, WatchDescriptor>,
}

impl PermWatch {
    /// A non-blocking inotify instance with nothing watched.
    pub fn new() -> Result<PermWatch, Errno> {
        let inotify = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC)?;
        Ok(PermWatch { inotify, by_wd: HashMap::new(), by_dev: HashMap::new() })
    }

    /// The fd to register for readability.
    pub fn raw_fd(&self) -> RawFd {
        self.inotify.as_fd().as_raw_fd()
    }

    /// Watches `path`, the node of port `dev`, until it changes or [`PermWatch::unwatch`].
    pub fn watch(&mut self, dev: &str, path: &Path) -> Result<(), Errno> {
        if self.by_dev.contains_key(dev) {
            return Ok(());
        }
        let wd = self.inotify.add_watch(path, AddWatchFlags::IN_ATTRIB | AddWatchFlags::IN_DELETE_SELF)?;
        self.by_wd.insert(wd, dev.to_owned());
        self.by_dev.insert(dev.to_owned(), wd);
        Ok(())
    }

    /// Stops watching `dev` (nothing happens if it is not watched).
    pub fn unwatch(&mut self, dev: &str) {
        if let Some(wd) = self.by_dev.remove(dev) {
            self.by_wd.remove(&wd);
            // The watch may be gone already (node deleted): nothing to undo then.
            if let Err(e) = self.inotify.rm_watch(wd) {
                log::debug!("inotify: rm_watch for {dev}: {e}");
            }
        }
    }

    /// Whether `dev` is watched.
    pub fn is_watched(&self, dev: &str) -> bool {
        self.by_dev.contains_key(dev)
    }

    /// Reads every pending event; returns the ports whose node changed (each once). Their
    /// watches are removed: the caller tries the port again and watches anew if needed.
    pub fn drain(&mut self) -> Vec<String> {
        let mut changed = Vec::new();
        loop {
            match self.inotify.read_events() {
                Ok(events) if events.is_empty() => break,
                Ok(events) => {
                    for ev in events {
                        if let Some(dev) = self.by_wd.get(&ev.wd) {
                            if !changed.contains(dev) {
                                changed.push(dev.clone());
                            }
                        }
                    }
                }
                Err(Errno::EAGAIN) => break,
                Err(Errno::EINTR) => {}
                Err(e) => {
                    log::error!("reading inotify events failed: {e}");
                    break;
                }
            }
        }
        for dev in &changed {
            self.unwatch(dev);
        }
        changed
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn a_chmod_is_reported_once_and_nothing_else_is() {
        let dir = tempfile::tempdir().unwrap();
        let node = dir.path().join("vport0p1");
        std::fs::write(&node, b"").unwrap();
        let mut w = PermWatch::new().unwrap();
        w.watch("vport0p1", &node).unwrap();
        assert!(w.drain().is_empty(), "nothing changed yet");
        std::fs::set_permissions(&node, std::fs::Permissions::from_mode(0o660)).unwrap();
        std::fs::set_permissions(&node, std::fs::Permissions::from_mode(0o666)).unwrap();
        assert_eq!(w.drain(), vec!["vport0p1".to_owned()]);
        assert!(!w.is_watched("vport0p1"), "a reported node is no longer watched");
        std::fs::set_permissions(&node, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(w.drain().is_empty());
    }

    #[test]
    fn unwatched_nodes_report_nothing_and_a_missing_node_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let node = dir.path().join("vport0p2");
        std::fs::write(&node, b"").unwrap();
        let mut w = PermWatch::new().unwrap();
        w.watch("vport0p2", &node).unwrap();
        w.unwatch("vport0p2");
        std::fs::set_permissions(&node, std::fs::Permissions::from_mode(0o660)).unwrap();
        assert!(w.drain().is_empty());
        assert_eq!(w.watch("x", &dir.path().join("absent")), Err(Errno::ENOENT));
    }
}
