//! Checks of values named on the command line, made before anything is built or booted: port
//! names, output files, the conformance filter. Each failure is a [`UsageError`]: it names the
//! bad value and says what to give instead, and maps to [`ExitCode::Usage`].

use crate::exit::ExitCode;
use std::path::{Path, PathBuf};
use thiserror::Error;

/// Longest port name accepted: the guest links `/dev/virtio-ports/<name>`, and a file name has
/// at most 255 bytes (`NAME_MAX`).
pub const MAX_PORT_NAME: usize = 255;

/// What the user gave wrong.
#[derive(Debug, Error)]
pub enum UsageError {
    /// A `--port` value cannot be a port name.
    #[error("bad --port {name:?}: {reason}; {PORT_NAME_RULE}")]
    BadPortName {
        /// The value as given.
        name: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The same port name was given twice.
    #[error("--port {name:?} is given twice; each port needs its own name (for example {name}.1)")]
    DuplicatePort {
        /// The repeated name.
        name: String,
    },
    /// An output file named on the command line cannot be written.
    #[error("{option} {path}: cannot write there ({reason}); give a file in an existing, writable directory")]
    OutputFile {
        /// The option (`--junit`, `--trace`).
        option: &'static str,
        /// The path as given.
        path: PathBuf,
        /// Why not, from the system.
        reason: String,
    },
    /// An output directory named on the command line cannot be made or written into.
    #[error("{option} {path}: cannot write files there ({reason}); give a directory you can write to (it is created if missing)")]
    OutputDir {
        /// The option (`--plots`).
        option: &'static str,
        /// The path as given.
        path: PathBuf,
        /// Why not, from the system.
        reason: String,
    },
    /// `vport connect` was given neither a port nor a socket.
    #[error("give a port name (`vport connect --list` shows them) or --socket PATH")]
    MissingPort,
    /// A file to send cannot be read, or is not a regular file.
    #[error("{path}: cannot send it ({reason}); give a regular file you can read")]
    SourceFile {
        /// The path as given.
        path: PathBuf,
        /// Why not.
        reason: String,
    },
    /// A name in the guest's stream directory that the agent would refuse.
    #[error("bad guest file name {name:?}: {reason}; give a plain file name (no `/`, not starting with `.`, at most 255 bytes), for example data.bin")]
    StreamName {
        /// The name as given.
        name: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A `--socket` value is not `NAME=ADDR` with a port name and a chardev address.
    #[error("bad --socket {value:?}: {reason}")]
    BadSocket {
        /// The value as given.
        value: String,
        /// What is wrong with it, and the forms that are accepted.
        reason: String,
    },
    /// A `--qmp` path that is no socket one can reach.
    #[error("--qmp {path}: cannot use it ({reason}); give the path of the VM's -qmp unix:PATH,server=on,wait=off socket, or leave --qmp out (QMP facts are then reported unavailable)")]
    QmpPath {
        /// The path as given.
        path: PathBuf,
        /// Why not, from the system.
        reason: String,
    },
    /// `--filter` selects no conformance case.
    #[error(
        "--filter {filter:?} matches no conformance case (it selects the cases whose name contains one of its \
         comma-separated parts); the cases are: {names} (`vport run conformance --list` lists them with their groups)"
    )]
    NoCaseSelected {
        /// The filter as given.
        filter: String,
        /// Every case name, comma-separated.
        names: String,
    },
    /// A value names something that is not there or cannot be used; `fix` says what to give.
    #[error("{option} {value}: {reason}; {fix}")]
    BadValue {
        /// The option (`--qemu`).
        option: &'static str,
        /// The value as given.
        value: String,
        /// What is wrong with it.
        reason: String,
        /// What to give instead.
        fix: &'static str,
    },
}

impl UsageError {
    /// Always [`ExitCode::Usage`].
    pub fn exit_code(&self) -> ExitCode {
        ExitCode::Usage
    }
}

/// What a port name may contain, as the error messages say it.
pub const PORT_NAME_RULE: &str = "a port name is 1 to 255 characters from A-Z a-z 0-9 . _ - (for example org.vport.0)";

/// Why `name` cannot be a port name, or `None` when it can.
///
/// Allowed: 1 to [`MAX_PORT_NAME`] ASCII letters, digits, `.`, `_` and `-`. Everything else is
/// refused because something on the way would misread it: QEMU's `-device` option parser splits
/// on `,` and takes `=` as a key separator, the guest turns the name into a file name under
/// `/dev/virtio-ports/` (no `/`, no NUL), and whitespace or control characters are lost or
/// mangled in shells, the kernel command line and logs.
pub fn port_name_problem(name: &str) -> Option<String> {
    if name.is_empty() {
        return Some("the name is empty".into());
    }
    if name.trim().is_empty() {
        return Some("the name is only whitespace".into());
    }
    if name.len() > MAX_PORT_NAME {
        return Some(format!("the name is {} bytes long", name.len()));
    }
    let mut bad: Vec<String> = Vec::new();
    for c in name.chars().filter(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))) {
        let d = describe_char(c);
        if !bad.contains(&d) {
            bad.push(d);
        }
    }
    (!bad.is_empty()).then(|| format!("it contains {}", bad.join(", ")))
}

/// `','` as "a comma (QEMU's option separator)", and so on.
fn describe_char(c: char) -> String {
    match c {
        ',' => "a comma (QEMU's -device option separator)".into(),
        '=' => "'=' (QEMU's -device key=value separator)".into(),
        '/' => "'/' (the guest makes the name a file name)".into(),
        ' ' => "a space".into(),
        c if c.is_whitespace() => format!("whitespace {c:?}"),
        c if c.is_control() => format!("the control character {c:?}"),
        c => format!("{c:?}"),
    }
}

/// Checks every `--port` value: each must pass [`port_name_problem`] and be unique.
pub fn check_port_names<S: AsRef<str>>(names: &[S]) -> Result<(), UsageError> {
    for (i, n) in names.iter().enumerate() {
        let n = n.as_ref();
        if let Some(reason) = port_name_problem(n) {
            return Err(UsageError::BadPortName { name: n.into(), reason });
        }
        if names[..i].iter().any(|m| m.as_ref() == n) {
            return Err(UsageError::DuplicatePort { name: n.into() });
        }
    }
    Ok(())
}

/// Checks that the output file `path` (given with `option`) can be written, without changing
/// it: an existing file is opened for writing (not truncated); a new one is created and removed
/// again. A later write can still fail (a full disk, `/dev/full`): that is an infrastructure
/// failure, reported when it happens.
pub fn check_output_file(option: &'static str, path: &Path) -> Result<(), UsageError> {
    let err = |e: std::io::Error| UsageError::OutputFile { option, path: path.into(), reason: e.to_string() };
    match std::fs::OpenOptions::new().write(true).open(path) {
        Ok(_) => return Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(err(e)),
    }
    std::fs::OpenOptions::new().write(true).create_new(true).open(path).map_err(err)?;
    std::fs::remove_file(path).map_err(err)
}

/// Checks that `dir` (given with `option`) is a directory files can be written into, creating
/// it (and its parents) if missing, so that a bad path fails before a VM boots.
pub fn check_output_dir(option: &'static str, dir: &Path) -> Result<(), UsageError> {
    let err = |e: std::io::Error| UsageError::OutputDir { option, path: dir.into(), reason: e.to_string() };
    std::fs::create_dir_all(dir).map_err(err)?;
    tempfile::NamedTempFile::new_in(dir).map(drop).map_err(err)
}

/// Checks that `filter` (as given to `vport run conformance --filter`) selects at least one case.
pub fn check_filter(filter: Option<&str>) -> Result<(), UsageError> {
    let Some(f) = filter else { return Ok(()) };
    if crate::conformance::selected_cases(Some(f)).is_empty() {
        let names = crate::conformance::all_cases().iter().map(|c| c.name).collect::<Vec<_>>().join(", ");
        return Err(UsageError::NoCaseSelected { filter: f.into(), names });
    }
    Ok(())
}

/// Checks a file to send: it exists, is a regular file, and can be opened.
pub fn check_source_file(path: &Path) -> Result<(), UsageError> {
    let bad = |reason: String| UsageError::SourceFile { path: path.to_owned(), reason };
    let meta = std::fs::metadata(path).map_err(|e| bad(e.to_string()))?;
    if !meta.is_file() {
        return Err(bad("not a regular file".into()));
    }
    std::fs::File::open(path).map(drop).map_err(|e| bad(e.to_string()))
}

/// Checks a guest file name by the agent's own rule ([`vport_common::stream::name_problem`]),
/// so the user hears of a bad one before anything connects.
pub fn check_stream_name(name: &str) -> Result<(), UsageError> {
    match vport_common::stream::name_problem(name) {
        Some(reason) => Err(UsageError::StreamName { name: name.into(), reason: reason.into() }),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_names_that_qemu_and_the_guest_take_as_given() {
        for ok in ["org.vport.0", "com.example.not-vport", "a", "A_b-9", &"x".repeat(MAX_PORT_NAME)] {
            assert_eq!(port_name_problem(ok), None, "{ok}");
        }
    }

    #[test]
    fn port_names_that_would_be_misread_are_refused_naming_why() {
        let cases = [
            ("", "empty"),
            ("  ", "only whitespace"),
            ("a,b", "comma"),
            ("a=b", "'='"),
            ("a b", "space"),
            ("a\tb", "whitespace"),
            ("a/b", "'/'"),
            ("a\u{1}b", "control"),
            ("é", "'é'"),
        ];
        for (name, why) in cases {
            let p = port_name_problem(name).unwrap_or_else(|| panic!("{name:?} accepted"));
            assert!(p.contains(why), "{name:?}: {p}");
        }
        assert!(port_name_problem(&"x".repeat(MAX_PORT_NAME + 1)).is_some());
    }

    #[test]
    fn port_lists_must_be_unique_and_the_error_names_the_value() {
        check_port_names(&["a", "b"]).unwrap();
        let e = check_port_names(&["a", "b", "a"]).unwrap_err();
        assert!(matches!(&e, UsageError::DuplicatePort { name } if name == "a"), "{e}");
        let e = check_port_names(&["ok", "x,y"]).unwrap_err();
        assert!(e.to_string().contains("\"x,y\"") && e.to_string().contains("org.vport.0"), "{e}");
        assert_eq!(e.exit_code(), ExitCode::Usage);
    }

    #[test]
    fn output_files_are_checked_without_being_changed() {
        let dir = tempfile::tempdir().unwrap();
        let new = dir.path().join("new.xml");
        check_output_file("--junit", &new).unwrap();
        assert!(!new.exists(), "the probe removes what it created");
        let old = dir.path().join("old.xml");
        std::fs::write(&old, "keep").unwrap();
        check_output_file("--junit", &old).unwrap();
        assert_eq!(std::fs::read_to_string(&old).unwrap(), "keep");
        let e = check_output_file("--junit", &dir.path().join("no/such/dir/x.xml")).unwrap_err();
        assert!(e.to_string().contains("--junit") && e.to_string().contains("no/such/dir"), "{e}");
        assert!(check_output_file("--trace", dir.path()).is_err(), "a directory is not a file");
    }

    #[test]
    fn a_filter_must_select_a_case() {
        check_filter(None).unwrap();
        check_filter(Some("second-open-ebusy")).unwrap();
        let e = check_filter(Some("nosuchcase")).unwrap_err();
        assert!(e.to_string().contains("second-open-ebusy") && e.to_string().contains("--list"), "{e}");
        assert!(check_filter(Some("")).is_err(), "an empty filter selects nothing");
    }
}
