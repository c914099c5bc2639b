//! Waiting for a port node's permissions to change, at no cost while nothing happens.
//!
//! An unprivileged agent (the packaged unit runs it as a dynamic user in group `vport`) can
//! find a port before udev has given the node to that group: `open` fails with EACCES. The
//! kernel sends no uevent when udev then changes the mode, so the agent watches for it with
//! inotify and tries again when it happens.
//!
//! The watch is on the node's *directory* (`IN_ATTRIB` of its entries: chmod, chown), not on
//! the node: `inotify_add_watch` needs read permission on what it watches, which is exactly
//! what the agent lacks on the node (found on a real VM: the per-node watch failed with
//! EACCES). A directory is watched only while one of its nodes is waited for, so an agent
//! with every port open watches nothing; attribute changes of other entries wake the agent
//! and are ignored.

use nix::errno::Errno;
use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify, WatchDescriptor};
use std::collections::{BTreeSet, HashMap};
use std::ffi::OsString;
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::path::{Path, PathBuf};

/// One watched directory and the node names waited for in it.
struct Dir {
    path: PathBuf,
    wd: WatchDescriptor,
    nodes: BTreeSet<OsString>,
}

/// Nodes waited for, by port (`dev`), through watches on their directories.
pub struct PermWatch {
    inotify: Inotify,
    dirs: Vec<Dir>,
    /// Port -> (directory, node name).
    by_dev: HashMap<String, (PathBuf, OsString)>,
}

impl PermWatch {
    /// A non-blocking inotify instance with nothing watched.
    pub fn new() -> Result<PermWatch, Errno> {
        let inotify = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC)?;
        Ok(PermWatch { inotify, dirs: Vec::new(), by_dev: HashMap::new() })
    }

    /// The fd to register for readability.
    pub fn raw_fd(&self) -> RawFd {
        self.inotify.as_fd().as_raw_fd()
    }

    /// Waits for a change of `path`'s mode or owner (`path` is the node of port `dev`) until it
    /// is reported by [`PermWatch::drain`] or [`PermWatch::unwatch`]ed.
    pub fn watch(&mut self, dev: &str, path: &Path) -> Result<(), Errno> {
        if self.by_dev.contains_key(dev) {
            return Ok(());
        }
        let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else { return Err(Errno::EINVAL) };
        match self.dirs.iter_mut().find(|d| d.path == dir) {
            Some(d) => {
                d.nodes.insert(name.to_owned());
            }
            None => {
                let wd = self.inotify.add_watch(dir, AddWatchFlags::IN_ATTRIB | AddWatchFlags::IN_ONLYDIR)?;
                self.dirs.push(Dir { path: dir.to_owned(), wd, nodes: BTreeSet::from([name.to_owned()]) });
            }
        }
        self.by_dev.insert(dev.to_owned(), (dir.to_owned(), name.to_owned()));
        Ok(())
    }

    /// Stops waiting for `dev` (nothing happens if it is not waited for); a directory with no
    /// node left is no longer watched.
    pub fn unwatch(&mut self, dev: &str) {
        let Some((dir, name)) = self.by_dev.remove(dev) else { return };
        let Some(i) = self.dirs.iter().position(|d| d.path == dir) else { return };
        self.dirs[i].nodes.remove(&name);
        if self.dirs[i].nodes.is_empty() {
            let d = self.dirs.swap_remove(i);
            if let Err(e) = self.inotify.rm_watch(d.wd) {
                log::debug!("inotify: rm_watch for {}: {e}", d.path.display());
            }
        }
    }

    /// Whether `dev` is waited for.
    pub fn is_watched(&self, dev: &str) -> bool {
        self.by_dev.contains_key(dev)
    }

    /// Reads every pending event; returns the ports whose node's attributes changed (each
    /// once). They are no longer waited for: the caller tries each again and waits anew if
    /// needed.
    pub fn drain(&mut self) -> Vec<String> {
        let mut touched: Vec<(WatchDescriptor, OsString)> = Vec::new();
        loop {
            match self.inotify.read_events() {
                Ok(events) if events.is_empty() => break,
                Ok(events) => touched.extend(events.into_iter().filter_map(|ev| Some((ev.wd, ev.name?)))),
                Err(Errno::EAGAIN) => break,
                Err(Errno::EINTR) => {}
                Err(e) => {
                    log::error!("reading inotify events failed: {e}");
                    break;
                }
            }
        }
        let mut changed: Vec<String> = self
            .by_dev
            .iter()
            .filter(|(_, (dir, name))| {
                touched.iter().any(|(wd, n)| n == name && self.dirs.iter().any(|d| d.wd == *wd && d.path == *dir))
            })
            .map(|(dev, _)| dev.clone())
            .collect();
        changed.sort();
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
    fn only_the_nodes_waited_for_are_reported_and_a_missing_directory_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b, other) = (dir.path().join("vport0p2"), dir.path().join("vport0p3"), dir.path().join("tty9"));
        for f in [&a, &b, &other] {
            std::fs::write(f, b"").unwrap();
        }
        let mut w = PermWatch::new().unwrap();
        w.watch("vport0p2", &a).unwrap();
        w.watch("vport0p3", &b).unwrap();
        w.unwatch("vport0p2");
        std::fs::set_permissions(&a, std::fs::Permissions::from_mode(0o660)).unwrap();
        std::fs::set_permissions(&other, std::fs::Permissions::from_mode(0o660)).unwrap();
        assert!(w.drain().is_empty(), "neither is waited for");
        std::fs::set_permissions(&b, std::fs::Permissions::from_mode(0o660)).unwrap();
        assert_eq!(w.drain(), vec!["vport0p3".to_owned()]);
        assert!(w.dirs.is_empty(), "no node left: the directory is no longer watched");
        assert_eq!(w.watch("x", &dir.path().join("absent/vport9p9")), Err(Errno::ENOENT));
    }

    #[test]
    fn a_node_the_agent_cannot_read_is_still_waited_for() {
        // The directory is watched, so the node's own permissions do not matter: the real
        // case is a root-only node and an unprivileged agent.
        let dir = tempfile::tempdir().unwrap();
        let node = dir.path().join("vport0p1");
        std::fs::write(&node, b"").unwrap();
        std::fs::set_permissions(&node, std::fs::Permissions::from_mode(0o000)).unwrap();
        let mut w = PermWatch::new().unwrap();
        w.watch("vport0p1", &node).unwrap();
        nix::unistd::chown(&node, None, Some(nix::unistd::Gid::from_raw(4321))).unwrap();
        assert_eq!(w.drain(), vec!["vport0p1".to_owned()]);
    }
}
