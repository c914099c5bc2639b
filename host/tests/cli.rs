//! `vport` command-line behaviour: exit codes and error messages for the failures a user meets
//! first. The silent-agent case boots a real VM.

use std::path::PathBuf;
use std::process::{Command, Output};

fn vport() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_vport"));
    c.env_remove("VPORT_LOG");
    c
}

fn agent() -> PathBuf {
    vport_host::image::resolve_agent(None).unwrap_or_else(|e| panic!("{e}: run scripts/build-agent first"))
}

fn show(o: &Output) -> String {
    format!(
        "status {:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn help_documents_the_exit_codes() {
    let o = vport().args(["hello", "--help"]).output().unwrap();
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", show(&o));
    for needle in ["Exit codes:", "infrastructure failure", "--accel", "--json", "--timeout"] {
        assert!(text.contains(needle), "hello --help lacks {needle:?}:\n{text}");
    }
}

#[test]
fn missing_qemu_is_an_infrastructure_failure_that_says_what_to_install() {
    let empty = tempfile::tempdir().unwrap();
    let o = vport()
        .args(["hello", "--accel", "tcg"])
        .env("PATH", empty.path())
        .env("VPORT_AGENT", agent())
        .env_remove("VPORT_QEMU")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(3), "{}", show(&o));
    assert!(err.contains("qemu-system-x86_64 not found"), "{}", show(&o));
    assert!(err.contains("qemu-system-x86"), "names the package: {}", show(&o));
}

#[test]
fn no_kernel_is_an_infrastructure_failure_that_says_what_to_do() {
    // An empty cache and no apt-get on PATH: nothing can provide a kernel.
    let cache = tempfile::tempdir().unwrap();
    let empty = tempfile::tempdir().unwrap();
    let o = vport()
        .args(["hello"])
        .env("PATH", empty.path())
        .env("VPORT_CACHE_DIR", cache.path())
        .env("VPORT_AGENT", agent())
        .env_remove("VPORT_KERNEL")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(3), "{}", show(&o));
    assert!(err.contains("--kernel"), "suggests --kernel: {}", show(&o));
    assert!(err.contains("scripts/bootstrap"), "suggests scripts/bootstrap: {}", show(&o));
}

#[test]
fn a_missing_kernel_file_is_named() {
    let o = vport().args(["hello", "--kernel", "/nonexistent/bzImage"]).env("VPORT_AGENT", agent()).output().unwrap();
    assert_eq!(o.status.code(), Some(3), "{}", show(&o));
    assert!(String::from_utf8_lossy(&o.stderr).contains("/nonexistent/bzImage"), "{}", show(&o));
}

#[test]
fn bad_arguments_are_usage_errors() {
    let o = vport().args(["hello", "--accel", "warp"]).output().unwrap();
    assert_eq!(o.status.code(), Some(2), "{}", show(&o));
    assert!(String::from_utf8_lossy(&o.stderr).contains("warp"), "{}", show(&o));
}

/// Boots a real VM whose only port has a name the agent does not serve by default, so no HELLO
/// ever comes: `vport hello` must fail with exit 1, say what it waited for, and show the
/// guest console.
#[test]
fn a_silent_agent_fails_with_the_deadline_and_the_console() {
    let o = vport()
        .args(["hello", "--port", "com.example.not-vport", "--timeout", "20"])
        .env("VPORT_AGENT", agent())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{}", show(&o));
    assert!(err.contains("no HELLO from vport-agent within"), "{}", show(&o));
    assert!(err.contains("guest console"), "{}", show(&o));
    assert!(err.contains("vport-init: modules loaded"), "the console tail shows the boot: {}", show(&o));
}
