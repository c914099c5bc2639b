//! The Debian root file system: `mmdebstrap` (from Debian's packages) into a directory, the
//! agent's `.deb` installed in it with `dpkg -i` (its maintainer scripts run: the `vport`
//! group, the unit enabled), the test image's report unit, then `mkfs.ext4 -d` into a disk
//! image without mounting anything.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use super::init::{REPORT_SCRIPT_PATH, REPORT_UNIT_NAME};
use super::DistroError;

/// Packages installed on top of Debian's essential set: systemd as init (`systemd-sysv`,
/// `/sbin/init`) and udev, what the agent's package depends on.
pub const PACKAGES: &[&str] = &["systemd-sysv", "udev"];
/// mmdebstrap's variant: the essential packages and [`PACKAGES`] with their dependencies only
/// (no apt in the guest; the agent's package is installed with dpkg).
pub const VARIANT: &str = "essential";
/// Size of the disk image (sparse: the file takes what the tree takes, about 220 MB).
pub const DISK_BYTES: u64 = 1 << 30;
/// The file name the agent's package has in the staging directory and in the guest's `/tmp`
/// while it is installed.
const DEB_NAME: &str = "vport-agent.deb";
/// The hostname of the guest.
pub const HOSTNAME: &str = "vport-distro";

/// `s` quoted for `sh` (single quotes).
fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// Writes what the hooks copy into the tree into `staging`: the agent's package (a copy of
/// `deb`), the report unit and its script.
pub(super) fn stage(staging: &Path, deb: &Path) -> Result<(), DistroError> {
    let io = |path: PathBuf| move |source| DistroError::Io { path, source };
    std::fs::create_dir_all(staging).map_err(io(staging.into()))?;
    std::fs::copy(deb, staging.join(DEB_NAME)).map_err(io(deb.into()))?;
    std::fs::write(staging.join(REPORT_UNIT_NAME), super::init::REPORT_UNIT).map_err(io(staging.into()))?;
    std::fs::write(staging.join("vport-distro-report"), super::init::REPORT_SCRIPT).map_err(io(staging.into()))?;
    Ok(())
}

/// mmdebstrap's arguments: `suite` from `mirror` into the directory `root`, with the customize
/// hooks that install what [`stage`] put in `staging`. A hook that fails fails mmdebstrap; the
/// last two check what the package's postinst did: the agent's unit enabled, the group made.
pub(super) fn mmdebstrap_args(suite: &str, mirror: &str, root: &Path, staging: &Path) -> Vec<OsString> {
    let st = |f: &str| sh_quote(&staging.join(f).to_string_lossy());
    let mut a: Vec<OsString> = [
        "--mode=root".to_string(),
        format!("--variant={VARIANT}"),
        format!("--include={}", PACKAGES.join(",")),
        "--format=directory".into(),
        // Manual pages and translations: nobody reads them in a test guest.
        "--dpkgopt=path-exclude=/usr/share/man/*".into(),
        "--dpkgopt=path-exclude=/usr/share/locale/*".into(),
        format!("--customize-hook=cp {} \"$1/tmp/{DEB_NAME}\"", st(DEB_NAME)),
        format!("--customize-hook=chroot \"$1\" dpkg -i /tmp/{DEB_NAME}"),
        format!("--customize-hook=rm \"$1/tmp/{DEB_NAME}\""),
        format!("--customize-hook=install -m 0755 {} \"$1{REPORT_SCRIPT_PATH}\"", st("vport-distro-report")),
        format!("--customize-hook=install -m 0644 {} \"$1/etc/systemd/system/\"", st(REPORT_UNIT_NAME)),
        format!("--customize-hook=chroot \"$1\" systemctl enable {REPORT_UNIT_NAME}"),
        format!("--customize-hook=echo {HOSTNAME} > \"$1/etc/hostname\""),
        "--customize-hook=chroot \"$1\" systemctl is-enabled vport-agent.service".into(),
        "--customize-hook=chroot \"$1\" getent group vport".into(),
    ]
    .into_iter()
    .map(OsString::from)
    .collect();
    a.push(suite.into());
    a.push(root.into());
    a.push(mirror.into());
    a
}

/// Runs `cmd` with its output appended to `log`; a failure names `what`, its status and the
/// log's last lines.
pub(super) fn run_logged(cmd: &mut Command, what: &str, tool: &'static str, log: &Path) -> Result<(), DistroError> {
    let io = |source| DistroError::Io { path: log.to_path_buf(), source };
    let file = std::fs::OpenOptions::new().create(true).append(true).open(log).map_err(io)?;
    let err = file.try_clone().map_err(io)?;
    log::debug!("running {cmd:?} (output in {})", log.display());
    let status =
        cmd.stdin(Stdio::null()).stdout(file).stderr(err).status().map_err(|e| DistroError::tool(tool, tool, e))?;
    if status.success() {
        return Ok(());
    }
    Err(DistroError::Step { what: what.into(), status: status.to_string(), log: log.into(), tail: tail(log, 25) })
}

/// The last `n` lines of the file at `path` (empty when it cannot be read).
pub(super) fn tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// `mkfs.ext4` arguments making `disk` ([`DISK_BYTES`]) from the tree `root`. The inode tables
/// and the journal are initialised now, so the guest's kernel does not spend its time on it.
pub(super) fn mkfs_args(root: &Path, disk: &Path) -> Vec<OsString> {
    let mut a: Vec<OsString> =
        ["-q", "-F", "-t", "ext4", "-L", "vport-root", "-E", "lazy_itable_init=0,lazy_journal_init=0"]
            .into_iter()
            .map(OsString::from)
            .collect();
    a.push("-d".into());
    a.push(root.into());
    a.push(disk.into());
    a.push(format!("{}k", DISK_BYTES / 1024).into());
    a
}

/// Mount points at or under `dir` (from `/proc/self/mountinfo`): an interrupted mmdebstrap can
/// leave its `/proc`, `/sys` and `/dev` mounts there, and removing the tree then would reach
/// into them.
pub(super) fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else { return Vec::new() };
    let dir = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
    info.lines()
        .filter_map(|l| l.split(' ').nth(4))
        // mountinfo escapes space, tab, newline and backslash as octal.
        .map(|p| PathBuf::from(p.replace("\\040", " ").replace("\\011", "\t").replace("\\134", "\\")))
        .filter(|p| p.starts_with(&dir))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mmdebstrap_installs_the_deb_with_dpkg_and_checks_the_unit() {
        let a = mmdebstrap_args("bookworm", "http://m/debian", Path::new("/b/root"), Path::new("/b/st it's"));
        let a: Vec<String> = a.iter().map(|s| s.to_string_lossy().into_owned()).collect();
        let pos = |n: &str| a.iter().position(|x| x.contains(n)).unwrap_or_else(|| panic!("{n} not in {a:?}"));
        assert_eq!(a[..4], ["--mode=root", "--variant=essential", "--include=systemd-sysv,udev", "--format=directory"]);
        assert!(pos("cp '/b/st it'\\''s/vport-agent.deb'") < pos("dpkg -i /tmp/vport-agent.deb"));
        assert!(pos("dpkg -i") < pos("systemctl is-enabled vport-agent.service"));
        assert!(pos("systemctl enable vport-distro-report.service") < pos("systemctl is-enabled"));
        assert_eq!(a[a.len() - 3..], ["bookworm", "/b/root", "http://m/debian"]);
    }

    #[test]
    fn mkfs_builds_from_the_tree_without_lazy_init() {
        let a = mkfs_args(Path::new("/r"), Path::new("/d.ext4"));
        let s: Vec<String> = a.iter().map(|s| s.to_string_lossy().into_owned()).collect();
        assert!(s.windows(2).any(|w| w == ["-d", "/r"]), "{s:?}");
        assert_eq!(s.last().map(String::as_str), Some("1048576k"));
        assert!(s.iter().any(|x| x.contains("lazy_itable_init=0")));
    }

    #[test]
    fn no_mounts_under_a_fresh_directory_but_the_root_has_some() {
        let dir = tempfile::tempdir().unwrap();
        assert!(mounts_under(dir.path()).is_empty());
        if Path::new("/proc/self/mountinfo").exists() {
            assert!(!mounts_under(Path::new("/")).is_empty());
        }
    }

    #[test]
    fn tail_keeps_the_last_lines() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("log");
        std::fs::write(&p, "a\nb\nc\n").unwrap();
        assert_eq!(tail(&p, 2), "b\nc");
        assert_eq!(tail(&dir.path().join("none"), 2), "");
    }
}
