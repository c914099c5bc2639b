//! The agent's stream directory (`--stream-dir`): the only place acknowledged streams read and
//! write (`docs/protocol.md`, "Acknowledged streams"; `docs/security.md`).
//!
//! A to-guest stream `ID` into `NAME` is stored in the part file `DIR/.NAME.ID.part` (`ID` as 16
//! hex digits); its length is the stream's receive offset, so the file is the receiver's whole
//! state: it survives the session, the agent's restart, and is rewound with the guest by a
//! loadvm. A completed stream is renamed to `DIR/NAME` and leaves the marker
//! `DIR/.NAME.ID.done`, so a sender that missed STREAM_DONE is told the stream is complete
//! instead of sending it again. Names are plain file names (no `/`, no leading `.`), and files
//! are opened with `O_NOFOLLOW`, so nothing outside the directory is reached.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use thiserror::Error;
use vport_common::pattern::StreamDigest;

/// Why a stream file operation failed.
#[derive(Debug, Error)]
pub enum StreamDirError {
    /// The name is not a plain file name.
    #[error("stream name {name:?} is not allowed: {why} (a plain file name under the stream directory)")]
    BadName {
        /// The name.
        name: String,
        /// What is wrong with it.
        why: &'static str,
    },
    /// The stream's name is taken by something that is not a regular file (a directory, a
    /// symlink, a device): the agent never replaces it.
    #[error("{path} exists and is not a regular file: the stream cannot be stored there (pick another name)")]
    NotAFile {
        /// The path.
        path: PathBuf,
    },
    /// The host asked to resume a to-host stream past the file's end (its part file is
    /// longer than the file now is).
    #[error("cannot resume {name:?} at {offset}: the file has {len} bytes")]
    PastEnd {
        /// The name.
        name: String,
        /// The host's offset.
        offset: u64,
        /// The file's length.
        len: u64,
    },
    /// A file operation failed.
    #[error("{op} {path}: {source}")]
    Io {
        /// What was done.
        op: &'static str,
        /// The file.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
}

/// Checks that `name` is a plain file name ([`vport_common::stream::name_problem`]).
pub fn check_name(name: &str) -> Result<(), StreamDirError> {
    match vport_common::stream::name_problem(name) {
        Some(why) => Err(StreamDirError::BadName { name: name.to_owned(), why }),
        None => Ok(()),
    }
}

/// The stream directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamDir {
    root: PathBuf,
}

/// A to-guest stream's part file, open for appending.
#[derive(Debug)]
pub struct PartFile {
    file: File,
    path: PathBuf,
    /// Where a completed stream goes.
    final_path: PathBuf,
    /// The completion marker.
    done_marker: PathBuf,
}

fn io<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> StreamDirError + 'a {
    move |source| StreamDirError::Io { op, path: path.to_owned(), source }
}

impl StreamDir {
    /// The directory at `root` (it must exist; the agent checks at start).
    pub fn new(root: PathBuf) -> StreamDir {
        StreamDir { root }
    }

    /// The directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn part_path(&self, name: &str, id: u64) -> PathBuf {
        self.root.join(format!(".{name}.{id:016x}.part"))
    }

    fn done_path(&self, name: &str, id: u64) -> PathBuf {
        self.root.join(format!(".{name}.{id:016x}.done"))
    }

    /// True when stream `id` of `total` bytes into `name` completed here: its marker is a
    /// regular file and `name` a regular file of `total` bytes (neither followed if a symlink).
    /// A name changed since is not complete: the marker is removed and the stream starts again.
    pub fn completed(&self, name: &str, id: u64, total: u64) -> bool {
        let marker = self.done_path(name, id);
        let regular = |p: &Path| std::fs::symlink_metadata(p).ok().filter(|m| m.file_type().is_file());
        if regular(&marker).is_none() {
            return false;
        }
        if regular(&self.root.join(name)).is_some_and(|m| m.len() == total) {
            return true;
        }
        log::info!("{}: {name} changed since the stream completed; it starts again", marker.display());
        if let Err(e) = std::fs::remove_file(&marker) {
            log::warn!("{}: cannot remove: {e}", marker.display());
        }
        false
    }

    /// Forgets that stream `id` into `name` completed (its file no longer matches): the next
    /// STREAM_OPEN stores it again.
    pub fn forget_completed(&self, name: &str, id: u64) {
        let marker = self.done_path(name, id);
        if let Err(e) = std::fs::remove_file(&marker) {
            log::warn!("{}: cannot remove: {e}", marker.display());
        }
    }

    /// Refuses a name taken by anything but a regular file (checked at STREAM_OPEN, so a
    /// stream is not stored in full only to fail its rename).
    fn check_target(&self, name: &str) -> Result<(), StreamDirError> {
        let path = self.root.join(name);
        match std::fs::symlink_metadata(&path) {
            Ok(m) if !m.file_type().is_file() => Err(StreamDirError::NotAFile { path }),
            _ => Ok(()),
        }
    }

    /// Opens (or creates) the part file of stream `id` into `name` for a stream of `total`
    /// bytes; removes part files and markers of `name` with other ids (an interrupted earlier
    /// transfer into the same name). A part file longer than `total` is emptied. Returns it
    /// and its length, the receive offset.
    pub fn open_part(&self, name: &str, id: u64, total: u64) -> Result<(PartFile, u64), StreamDirError> {
        check_name(name)?;
        self.check_target(name)?;
        self.remove_others(name, id)?;
        let path = self.part_path(name, id);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .mode(0o600)
            .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_CLOEXEC)
            .open(&path)
            .map_err(io("open", &path))?;
        let mut len = file.metadata().map_err(io("stat", &path))?.len();
        if len > total {
            log::warn!("{}: {len} bytes, longer than the stream's {total}: started again", path.display());
            file.set_len(0).map_err(io("truncate", &path))?;
            len = 0;
        }
        let part = PartFile { file, path, final_path: self.root.join(name), done_marker: self.done_path(name, id) };
        Ok((part, len))
    }

    /// Removes the part files and markers of `name` whose id is not `id`.
    fn remove_others(&self, name: &str, id: u64) -> Result<(), StreamDirError> {
        let prefix = format!(".{name}.");
        let keep = [format!(".{name}.{id:016x}.part"), format!(".{name}.{id:016x}.done")];
        let entries = std::fs::read_dir(&self.root).map_err(io("list", &self.root))?;
        for entry in entries.flatten() {
            let file_name = entry.file_name();
            let Some(f) = file_name.to_str() else { continue };
            let Some(rest) = f.strip_prefix(&prefix) else { continue };
            let is_ours = rest.len() == 16 + 5
                && (rest.ends_with(".part") || rest.ends_with(".done"))
                && rest[..16].bytes().all(|b| b.is_ascii_hexdigit());
            if is_ours && !keep.iter().any(|k| k == f) {
                let path = entry.path();
                log::info!("{}: removed (a transfer into {name} with another id replaces it)", path.display());
                std::fs::remove_file(&path).map_err(io("remove", &path))?;
            }
        }
        Ok(())
    }

    /// Opens `DIR/name` to send it; returns the file and its length. Never follows a symlink
    /// and never blocks (`O_NONBLOCK`: a FIFO planted under the name would otherwise stall the
    /// agent); only a regular file is sent.
    pub fn open_source(&self, name: &str) -> Result<(File, u64), StreamDirError> {
        check_name(name)?;
        let path = self.root.join(name);
        let file = open_regular(&path)?;
        let len = file.metadata().map_err(io("stat", &path))?.len();
        Ok((file, len))
    }

    /// Length and digest of the first `total` bytes of a completed stream's file `DIR/name`
    /// (fewer if it is shorter: then the stream is not complete).
    pub fn digest_of(&self, name: &str, total: u64) -> Result<(u64, u64), StreamDirError> {
        let path = self.root.join(name);
        let mut f = open_regular(&path)?;
        digest_file(&mut f, &path, total)
    }
}

/// Opens `path` for reading, not following a symlink and not blocking; fails unless it is a
/// regular file.
fn open_regular(path: &Path) -> Result<File, StreamDirError> {
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_CLOEXEC | nix::libc::O_NONBLOCK)
        .open(path)
        .map_err(io("open", path))?;
    if !file.metadata().map_err(io("stat", path))?.is_file() {
        return Err(StreamDirError::NotAFile { path: path.to_owned() });
    }
    Ok(file)
}

/// Length and xxh3-64 of a file's first `limit` bytes (all of them if it is shorter): the
/// stream's digest, even if the file grew since its length was taken.
pub fn digest_file(f: &mut File, path: &Path, limit: u64) -> Result<(u64, u64), StreamDirError> {
    f.seek(SeekFrom::Start(0)).map_err(io("seek", path))?;
    let mut digest = StreamDigest::new();
    let mut buf = vec![0u8; 256 * 1024];
    let mut reader = f.take(limit);
    loop {
        let n = reader.read(&mut buf).map_err(io("read", path))?;
        if n == 0 {
            return Ok((digest.bytes(), digest.digest()));
        }
        digest.update(&buf[..n]);
    }
}

/// `fsync`s the directory holding `path`, so a rename or a new file in it survives a crash.
fn sync_dir_of(path: &Path) -> Result<(), StreamDirError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    File::open(dir).and_then(|d| d.sync_all()).map_err(io("fsync", dir))
}

/// Reads `buf.len()` bytes of `f` at `offset` (a file that is shorter fails).
pub fn read_at(f: &File, offset: u64, buf: &mut [u8], path: &Path) -> Result<(), StreamDirError> {
    use std::os::unix::fs::FileExt;
    f.read_exact_at(buf, offset).map_err(io("read", path))
}

impl PartFile {
    /// Appends `bytes` at the file's end (the receive offset).
    pub fn append(&mut self, bytes: &[u8]) -> Result<(), StreamDirError> {
        self.file.seek(SeekFrom::End(0)).map_err(io("seek", &self.path))?;
        self.file.write_all(bytes).map_err(io("write", &self.path))
    }

    /// Length and digest of everything stored.
    pub fn digest(&mut self) -> Result<(u64, u64), StreamDirError> {
        digest_file(&mut self.file, &self.path, u64::MAX)
    }

    /// The stream is complete and verified: fsync, rename to its name, leave the marker
    /// (created afresh, never through a symlink), fsync the directory: once this returns, a
    /// crash keeps the file.
    pub fn finish(self) -> Result<PathBuf, StreamDirError> {
        self.file.sync_all().map_err(io("fsync", &self.path))?;
        std::fs::rename(&self.path, &self.final_path).map_err(io("rename", &self.path))?;
        match std::fs::remove_file(&self.done_marker) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io("remove", &self.done_marker)(e)),
        }
        OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_CLOEXEC)
            .open(&self.done_marker)
            .map_err(io("create", &self.done_marker))?;
        sync_dir_of(&self.final_path)?;
        Ok(self.final_path)
    }

    /// The stream failed its digest: remove the part file so the next open starts from 0.
    pub fn discard(self) -> Result<(), StreamDirError> {
        std::fs::remove_file(&self.path).map_err(io("remove", &self.path))
    }

    /// The part file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_must_be_plain_file_names() {
        for bad in ["", ".", "..", ".hidden", "a/b", "/etc/passwd", "a\0b", &"x".repeat(256)] {
            assert!(matches!(check_name(bad), Err(StreamDirError::BadName { .. })), "{bad:?}");
        }
        for good in ["a", "disk.img", "x..y", &"x".repeat(255)] {
            check_name(good).unwrap();
        }
    }

    #[test]
    fn a_part_file_is_the_receive_offset_and_completes_into_its_name() {
        let dir = tempfile::tempdir().unwrap();
        let sd = StreamDir::new(dir.path().to_owned());
        let (mut part, offset) = sd.open_part("f", 1, 10).unwrap();
        assert_eq!(offset, 0);
        part.append(b"hello").unwrap();
        drop(part);
        let (mut part, offset) = sd.open_part("f", 1, 10).unwrap();
        assert_eq!(offset, 5, "the stored length survives the reopen");
        part.append(b"world").unwrap();
        let mut whole = StreamDigest::new();
        whole.update(b"helloworld");
        assert_eq!(part.digest().unwrap(), (10, whole.digest()));
        assert!(!sd.completed("f", 1, 10));
        part.finish().unwrap();
        assert_eq!(std::fs::read(dir.path().join("f")).unwrap(), b"helloworld");
        assert!(sd.completed("f", 1, 10));
        assert!(!sd.completed("f", 2, 10));
        // Another id into the same name removes the first one's marker.
        let (_, offset) = sd.open_part("f", 2, 10).unwrap();
        assert_eq!(offset, 0);
        assert!(!dir.path().join(format!(".f.{:016x}.done", 1)).exists());
    }

    #[test]
    fn a_part_longer_than_the_stream_starts_again_and_symlinks_are_not_followed() {
        let dir = tempfile::tempdir().unwrap();
        let sd = StreamDir::new(dir.path().to_owned());
        std::fs::write(dir.path().join(format!(".g.{:016x}.part", 3)), b"0123456789").unwrap();
        let (_, offset) = sd.open_part("g", 3, 4).unwrap();
        assert_eq!(offset, 0);
        std::os::unix::fs::symlink("/etc/hostname", dir.path().join("link")).unwrap();
        assert!(matches!(sd.open_source("link"), Err(StreamDirError::Io { op: "open", .. })));
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        assert!(matches!(sd.open_source("sub"), Err(StreamDirError::NotAFile { .. })));
        std::fs::write(dir.path().join("src"), b"abc").unwrap();
        assert_eq!(sd.open_source("src").unwrap().1, 3);
        // A FIFO under the name is refused at once, not waited on.
        nix::unistd::mkfifo(&dir.path().join("fifo"), nix::sys::stat::Mode::S_IRWXU).unwrap();
        assert!(matches!(sd.open_source("fifo"), Err(StreamDirError::NotAFile { .. })));
        // A directory under the name is refused when the stream opens, not after it is stored.
        assert!(matches!(sd.open_part("sub", 4, 1), Err(StreamDirError::NotAFile { .. })));
    }

    #[test]
    fn a_completed_name_that_changed_is_no_longer_complete_and_markers_never_follow_symlinks() {
        let dir = tempfile::tempdir().unwrap();
        let sd = StreamDir::new(dir.path().to_owned());
        let (mut part, _) = sd.open_part("f", 1, 3).unwrap();
        part.append(b"abc").unwrap();
        part.finish().unwrap();
        assert!(sd.completed("f", 1, 3));
        std::fs::write(dir.path().join("f"), b"abcd").unwrap();
        assert!(!sd.completed("f", 1, 3), "a longer file is not the completed stream");
        assert!(!dir.path().join(format!(".f.{:016x}.done", 1)).exists(), "its marker is gone");
        // A symlink planted as the next marker is replaced, not written through.
        let victim = dir.path().join("victim");
        std::fs::write(&victim, b"keep").unwrap();
        std::os::unix::fs::symlink(&victim, dir.path().join(format!(".g.{:016x}.done", 2))).unwrap();
        let (mut part, _) = sd.open_part("g", 2, 1).unwrap();
        part.append(b"x").unwrap();
        part.finish().unwrap();
        assert_eq!(std::fs::read(&victim).unwrap(), b"keep");
        assert!(sd.completed("g", 2, 1));
        // The digest of a completed file covers its stream's length only.
        assert_eq!(sd.digest_of("f", 3).unwrap().0, 3);
    }
}
