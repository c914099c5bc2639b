//! Writer (and a reader, for tests and inspection) of the SVR4 `newc` cpio format the Linux
//! kernel unpacks as initramfs.
//!
//! Each entry is a 110-byte ASCII header (`070701` then 13 eight-digit hex fields), the NUL
//! terminated name padded to a multiple of 4 bytes (counting the header), then the data
//! padded to a multiple of 4. The archive ends with an entry named `TRAILER!!!`. All
//! timestamps, uids and gids are 0 so equal inputs give byte-identical archives.

use std::io::{self, Write};

const MAGIC: &[u8; 6] = b"070701";
const TRAILER: &str = "TRAILER!!!";
const HEADER_LEN: usize = 110;

/// File type bits of `mode`.
pub const S_IFDIR: u32 = 0o040000;
/// Regular file.
pub const S_IFREG: u32 = 0o100000;
/// Symbolic link.
pub const S_IFLNK: u32 = 0o120000;
/// Character device.
pub const S_IFCHR: u32 = 0o020000;

fn pad4(n: usize) -> usize {
    (4 - n % 4) % 4
}

/// Streams a `newc` archive into `W`. Names are archive paths without a leading `/`.
pub struct CpioWriter<W: Write> {
    out: W,
    next_ino: u32,
    offset: usize,
}

impl<W: Write> CpioWriter<W> {
    /// Starts an archive.
    pub fn new(out: W) -> Self {
        Self { out, next_ino: 1, offset: 0 }
    }

    fn entry(&mut self, name: &str, mode: u32, rdev: (u32, u32), nlink: u32, data: &[u8]) -> io::Result<()> {
        let name = name.trim_start_matches('/');
        let ino = if name == TRAILER { 0 } else { self.next_ino };
        self.next_ino += 1;
        let size = u32::try_from(data.len())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, format!("{name} is too large for cpio")))?;
        let fields = [ino, mode, 0, 0, nlink, 0, size, 0, 0, rdev.0, rdev.1, name.len() as u32 + 1, 0];
        let mut header = Vec::with_capacity(HEADER_LEN + name.len() + 4);
        header.extend_from_slice(MAGIC);
        for f in fields {
            header.extend_from_slice(format!("{f:08X}").as_bytes());
        }
        header.extend_from_slice(name.as_bytes());
        header.push(0);
        header.resize(header.len() + pad4(header.len()), 0);
        self.out.write_all(&header)?;
        self.out.write_all(data)?;
        self.out.write_all(&[0u8; 3][..pad4(data.len())])?;
        self.offset += header.len() + data.len() + pad4(data.len());
        Ok(())
    }

    /// Adds a directory (`mode` holds permission bits only).
    pub fn dir(&mut self, name: &str, mode: u32) -> io::Result<()> {
        self.entry(name, S_IFDIR | (mode & 0o7777), (0, 0), 2, &[])
    }

    /// Adds a regular file.
    pub fn file(&mut self, name: &str, mode: u32, data: &[u8]) -> io::Result<()> {
        self.entry(name, S_IFREG | (mode & 0o7777), (0, 0), 1, data)
    }

    /// Adds a symbolic link pointing at `target`.
    pub fn symlink(&mut self, name: &str, target: &str) -> io::Result<()> {
        self.entry(name, S_IFLNK | 0o777, (0, 0), 1, target.as_bytes())
    }

    /// Adds a character device node.
    pub fn char_dev(&mut self, name: &str, mode: u32, major: u32, minor: u32) -> io::Result<()> {
        self.entry(name, S_IFCHR | (mode & 0o7777), (major, minor), 1, &[])
    }

    /// Writes the trailer and returns the underlying writer.
    pub fn finish(mut self) -> io::Result<W> {
        self.entry(TRAILER, 0, (0, 0), 1, &[])?;
        self.out.flush()?;
        Ok(self.out)
    }
}

/// One entry read back by [`read_archive`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Archive path.
    pub name: String,
    /// Type and permission bits.
    pub mode: u32,
    /// Device numbers (character devices only).
    pub rdev: (u32, u32),
    /// File contents or symlink target.
    pub data: Vec<u8>,
}

/// Why an archive could not be read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CpioError {
    /// The archive is malformed at this byte offset.
    #[error("malformed newc cpio archive at offset {offset}: {what}")]
    Malformed { offset: usize, what: &'static str },
}

/// Parses a whole `newc` archive (up to and excluding the trailer).
pub fn read_archive(bytes: &[u8]) -> Result<Vec<Entry>, CpioError> {
    let mut entries = Vec::new();
    let mut off = 0;
    loop {
        let bad = |what| CpioError::Malformed { offset: off, what };
        let h = bytes.get(off..off + HEADER_LEN).ok_or(bad("truncated header"))?;
        if &h[..6] != MAGIC {
            return Err(bad("bad magic"));
        }
        let field = |i: usize| -> Result<u32, CpioError> {
            let s = std::str::from_utf8(&h[6 + i * 8..14 + i * 8]).map_err(|_| bad("non-ascii field"))?;
            u32::from_str_radix(s, 16).map_err(|_| bad("non-hex field"))
        };
        let mode = field(1)?;
        let size = field(6)? as usize;
        let rdev = (field(9)?, field(10)?);
        let namesize = field(11)? as usize;
        let name_start = off + HEADER_LEN;
        let name_bytes = bytes.get(name_start..name_start + namesize).ok_or(bad("truncated name"))?;
        if name_bytes.last() != Some(&0) {
            return Err(bad("name not NUL terminated"));
        }
        let name = String::from_utf8_lossy(&name_bytes[..namesize - 1]).into_owned();
        let data_start = name_start + namesize + pad4(HEADER_LEN + namesize);
        let data = bytes.get(data_start..data_start + size).ok_or(bad("truncated data"))?;
        if name == TRAILER {
            return Ok(entries);
        }
        entries.push(Entry { name, mode, rdev, data: data.to_vec() });
        off = data_start + size + pad4(size);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_layout_and_padding() {
        let mut w = CpioWriter::new(Vec::new());
        w.file("bin/x", 0o755, b"hello").unwrap();
        let out = w.finish().unwrap();
        // Header: magic + 13 fields.
        assert_eq!(&out[..6], b"070701");
        let field = |i: usize| std::str::from_utf8(&out[6 + i * 8..14 + i * 8]).unwrap().to_string();
        assert_eq!(field(0), "00000001"); // ino
        assert_eq!(field(1), "000081ED"); // S_IFREG | 0755
        assert_eq!(field(4), "00000001"); // nlink
        assert_eq!(field(6), "00000005"); // filesize
        assert_eq!(field(11), "00000006"); // namesize incl NUL
                                           // 110 + 6 = 116, already aligned; data at 116, 5 bytes + 3 pad → next at 124.
        assert_eq!(&out[110..116], b"bin/x\0");
        assert_eq!(&out[116..121], b"hello");
        assert_eq!(&out[121..124], &[0, 0, 0]);
        assert_eq!(&out[124..130], b"070701");
        assert_eq!(out.len() % 4, 0);
        let trailer_name = &out[124 + 110..124 + 110 + 11];
        assert_eq!(trailer_name, b"TRAILER!!!\0");
    }

    #[test]
    fn round_trip() {
        let mut w = CpioWriter::new(Vec::new());
        w.dir("bin", 0o755).unwrap();
        w.file("/init", 0o755, b"#!/bin/sh\n").unwrap();
        w.symlink("bin/sh", "busybox").unwrap();
        w.char_dev("dev/console", 0o600, 5, 1).unwrap();
        w.file("empty", 0o644, b"").unwrap();
        let out = w.finish().unwrap();
        let e = read_archive(&out).unwrap();
        let names: Vec<_> = e.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(names, ["bin", "init", "bin/sh", "dev/console", "empty"]);
        assert_eq!(e[0].mode, S_IFDIR | 0o755);
        assert_eq!(e[1].data, b"#!/bin/sh\n");
        assert_eq!((e[2].mode, e[2].data.as_slice()), (S_IFLNK | 0o777, &b"busybox"[..]));
        assert_eq!((e[3].mode, e[3].rdev), (S_IFCHR | 0o600, (5, 1)));
        assert!(e[4].data.is_empty());
    }

    #[test]
    fn reader_rejects_garbage() {
        assert!(read_archive(b"070702").is_err());
        let mut w = CpioWriter::new(Vec::new());
        w.file("a", 0o644, b"abc").unwrap();
        let out = w.finish().unwrap();
        assert!(read_archive(&out[..out.len() - 20]).is_err());
    }

    proptest::proptest! {
        #[test]
        fn any_files_round_trip(files in proptest::collection::vec(("[a-z]{1,12}", proptest::collection::vec(proptest::num::u8::ANY, 0..64)), 0..8)) {
            let mut w = CpioWriter::new(Vec::new());
            for (n, d) in &files {
                w.file(n, 0o644, d).unwrap();
            }
            let out = w.finish().unwrap();
            proptest::prop_assert_eq!(out.len() % 4, 0);
            let e = read_archive(&out).unwrap();
            proptest::prop_assert_eq!(e.len(), files.len());
            for (entry, (n, d)) in e.iter().zip(&files) {
                proptest::prop_assert_eq!(&entry.name, n);
                proptest::prop_assert_eq!(&entry.data, d);
            }
        }
    }

    #[test]
    fn host_cpio_lists_archive_if_installed() {
        let mut w = CpioWriter::new(Vec::new());
        w.dir("bin", 0o755).unwrap();
        w.file("bin/a", 0o644, b"x").unwrap();
        w.symlink("bin/b", "a").unwrap();
        let out = w.finish().unwrap();
        let child = std::process::Command::new("cpio")
            .args(["-t", "--quiet"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn();
        let Ok(mut child) = child else {
            println!("skipped: cpio not installed");
            return;
        };
        child.stdin.take().unwrap().write_all(&out).unwrap();
        let o = child.wait_with_output().unwrap();
        assert!(o.status.success());
        assert_eq!(String::from_utf8_lossy(&o.stdout), "bin\nbin/a\nbin/b\n");
    }
}
