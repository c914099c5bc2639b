//! The QEMU binary: where it is (`$VPORT_QEMU` or `PATH`) and which version it is.

use std::path::{Path, PathBuf};
use std::process::Command;

/// Environment variable naming the QEMU binary to run.
pub const QEMU_ENV: &str = "VPORT_QEMU";
/// QEMU binary looked up on `PATH` by default.
pub const QEMU_BINARY: &str = "qemu-system-x86_64";

/// The QEMU binary could not be found.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FindQemuError {
    /// Not on `PATH` and not configured.
    #[error("qemu-system-x86_64 not found on PATH: install the Debian package qemu-system-x86 (scripts/bootstrap does it) or set VPORT_QEMU")]
    NotOnPath,
    /// An explicitly configured binary does not exist.
    #[error("qemu binary {0} does not exist")]
    Missing(PathBuf),
}

/// The QEMU binary to run: `explicit`, else `$VPORT_QEMU`, else `qemu-system-x86_64` on `PATH`.
pub fn find_qemu(explicit: Option<&Path>) -> Result<PathBuf, FindQemuError> {
    let configured = explicit
        .map(Path::to_path_buf)
        .or_else(|| std::env::var_os(QEMU_ENV).filter(|v| !v.is_empty()).map(PathBuf::from));
    if let Some(p) = configured {
        if p.components().count() == 1 {
            return find_on_path(p.as_os_str(), std::env::var_os("PATH").as_deref()).ok_or(FindQemuError::Missing(p));
        }
        return if p.is_file() { Ok(p) } else { Err(FindQemuError::Missing(p)) };
    }
    find_on_path(QEMU_BINARY.as_ref(), std::env::var_os("PATH").as_deref()).ok_or(FindQemuError::NotOnPath)
}

/// First executable file called `name` in the `PATH`-style list `path`.
pub fn find_on_path(name: &std::ffi::OsStr, path: Option<&std::ffi::OsStr>) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    std::env::split_paths(path?)
        .map(|d| d.join(name))
        .find(|p| std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0))
}

/// A QEMU version number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct QemuVersion {
    /// Major version.
    pub major: u32,
    /// Minor version.
    pub minor: u32,
    /// Micro (patch) version.
    pub micro: u32,
}

impl std::fmt::Display for QemuVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.micro)
    }
}

/// Parses the first line of `qemu-system-x86_64 --version`
/// (`QEMU emulator version 7.2.19 (Debian 1:7.2+dfsg-7+deb12u18)`).
pub fn parse_version(text: &str) -> Option<QemuVersion> {
    let rest = text.lines().next()?.split("version ").nth(1)?;
    let v = rest.split_whitespace().next()?;
    let mut it = v.split('.').map(|p| p.parse::<u32>());
    Some(QemuVersion { major: it.next()?.ok()?, minor: it.next()?.ok()?, micro: it.next().unwrap_or(Ok(0)).ok()? })
}

/// Runs `qemu --version` and parses it; `Err` says why not.
pub fn query_version(qemu: &Path) -> Result<QemuVersion, String> {
    let out = Command::new(qemu)
        .arg("--version")
        .output()
        .map_err(|e| format!("cannot run {} --version: {e}", qemu.display()))?;
    let text = String::from_utf8_lossy(&out.stdout);
    parse_version(&text).ok_or_else(|| format!("unrecognised `{} --version` output: {}", qemu.display(), text.trim()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_versions() {
        let v = parse_version("QEMU emulator version 7.2.19 (Debian 1:7.2+dfsg-7+deb12u18)\nCopyright (c) 2003-2022\n");
        assert_eq!(v, Some(QemuVersion { major: 7, minor: 2, micro: 19 }));
        assert_eq!(parse_version("QEMU emulator version 8.1\n").map(|v| v.to_string()).as_deref(), Some("8.1.0"));
        assert_eq!(parse_version("something else"), None);
        assert!(QemuVersion { major: 7, minor: 2, micro: 0 } < QemuVersion { major: 8, minor: 0, micro: 0 });
    }

    #[test]
    fn finds_executables_on_path() {
        let dir = tempfile::tempdir().unwrap();
        let exe = dir.path().join("qemu-system-x86_64");
        std::fs::write(&exe, b"#!/bin/sh\n").unwrap();
        let path = std::ffi::OsString::from(format!("/nonexistent:{}", dir.path().display()));
        assert_eq!(find_on_path(QEMU_BINARY.as_ref(), Some(&path)), None, "not executable yet");
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755)).unwrap();
        assert_eq!(find_on_path(QEMU_BINARY.as_ref(), Some(&path)), Some(exe));
        assert_eq!(find_on_path(QEMU_BINARY.as_ref(), None), None);
    }

    #[test]
    fn missing_qemu_message_says_what_to_install() {
        let msg = FindQemuError::NotOnPath.to_string();
        assert!(msg.contains("qemu-system-x86") && msg.contains("VPORT_QEMU") && msg.contains("scripts/bootstrap"));
        assert_eq!(
            find_qemu(Some(Path::new("/nonexistent/qemu"))),
            Err(FindQemuError::Missing("/nonexistent/qemu".into()))
        );
    }
}
