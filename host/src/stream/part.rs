//! The host's part file of a to-host stream: `DEST.ID.vport-part` (`ID` the stream id as 16
//! hex digits) beside the destination. Its length is the receiver's offset, so a transfer run
//! again resumes where the last one stopped; once the digest is verified it is `fsync`ed and
//! renamed to the destination.

use super::TransferError;
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use vport_common::pattern::StreamDigest;

/// The part file of stream `id` bound for `dest`.
pub fn part_path(dest: &Path, id: u64) -> PathBuf {
    let mut name = dest.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    name.push(format!(".{id:016x}.vport-part"));
    dest.with_file_name(name)
}

/// An open part file, positioned at its end.
#[derive(Debug)]
pub struct PartFile {
    file: File,
    path: PathBuf,
    dest: PathBuf,
    len: u64,
}

fn file_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> TransferError + 'a {
    move |source| TransferError::File { op, path: path.to_owned(), source }
}

impl PartFile {
    /// Opens (or creates) the part file of stream `id` for `dest`; its length is where the
    /// stream resumes.
    pub fn open(dest: &Path, id: u64) -> Result<PartFile, TransferError> {
        let path = part_path(dest, id);
        let file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(&path)
            .map_err(file_err("cannot open the part file", &path))?;
        let len = file.metadata().map_err(file_err("cannot stat the part file", &path))?.len();
        Ok(PartFile { file, path, dest: dest.to_owned(), len })
    }

    /// Bytes stored.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether nothing is stored.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The part file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Starts again from 0 (a part longer than the stream: another stream's bytes).
    pub fn truncate(&mut self) -> Result<(), TransferError> {
        self.file.set_len(0).map_err(file_err("cannot truncate the part file", &self.path))?;
        self.len = 0;
        Ok(())
    }

    /// Appends `bytes` (the next bytes of the stream).
    pub fn append(&mut self, bytes: &[u8]) -> Result<(), TransferError> {
        self.file.write_all(bytes).map_err(file_err("cannot write the part file", &self.path))?;
        self.len += bytes.len() as u64;
        Ok(())
    }

    /// The digest of everything stored, read back from the file.
    pub fn digest(&mut self) -> Result<StreamDigest, TransferError> {
        let path = self.path.clone();
        self.file.seek(SeekFrom::Start(0)).map_err(file_err("cannot read the part file", &path))?;
        digest_reader(&mut self.file, &path)
    }

    /// The stream is verified: `fsync`, then rename to the destination.
    pub fn finish(self) -> Result<PathBuf, TransferError> {
        self.file.sync_all().map_err(file_err("cannot sync the part file", &self.path))?;
        std::fs::rename(&self.path, &self.dest).map_err(file_err("cannot rename the part file", &self.path))?;
        Ok(self.dest)
    }

    /// The stream failed verification: the part file is removed.
    pub fn discard(self) -> Result<(), TransferError> {
        std::fs::remove_file(&self.path).map_err(file_err("cannot remove the part file", &self.path))
    }
}

/// The digest of everything `reader` yields.
pub fn digest_reader(reader: &mut impl Read, path: &Path) -> Result<StreamDigest, TransferError> {
    let mut d = StreamDigest::new();
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        match reader.read(&mut buf) {
            Ok(0) => return Ok(d),
            Ok(n) => d.update(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(TransferError::File { op: "cannot read", path: path.to_owned(), source: e }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_part_file_resumes_at_its_length_and_becomes_the_destination() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("out.bin");
        assert_eq!(part_path(&dest, 0xab), dir.path().join("out.bin.00000000000000ab.vport-part"));
        let mut part = PartFile::open(&dest, 0xab).unwrap();
        assert!(part.is_empty());
        part.append(b"hello ").unwrap();
        drop(part);
        let mut part = PartFile::open(&dest, 0xab).unwrap();
        assert_eq!(part.len(), 6);
        part.append(b"world").unwrap();
        let mut want = StreamDigest::new();
        want.update(b"hello world");
        let got = part.digest().unwrap();
        assert_eq!((got.bytes(), got.digest()), (11, want.digest()));
        // Appending after the digest still appends (the file is in append mode).
        part.append(b"!").unwrap();
        assert_eq!(part.finish().unwrap(), dest);
        assert_eq!(std::fs::read(&dest).unwrap(), b"hello world!");
        assert!(!part_path(&dest, 0xab).exists());
    }

    #[test]
    fn a_discarded_or_truncated_part_starts_again_from_zero() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("x");
        let mut part = PartFile::open(&dest, 1).unwrap();
        part.append(b"abc").unwrap();
        part.truncate().unwrap();
        assert_eq!(part.len(), 0);
        part.append(b"d").unwrap();
        part.discard().unwrap();
        assert_eq!(PartFile::open(&dest, 1).unwrap().len(), 0);
        assert!(!dest.exists());
    }
}
