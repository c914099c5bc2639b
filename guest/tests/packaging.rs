//! The packaged systemd unit (`guest/dist/vport-agent.service`) is checked by systemd's own
//! tools, offline: `systemd-analyze verify` (syntax, directives, the referenced binary) and
//! `systemd-analyze security --offline` (the hardening, as an exposure score). The unit is not
//! booted by any test (the test image has no systemd); `tests/tests/agent_unprivileged.rs`
//! runs the agent the way the unit does instead (docs/security.md).

use std::path::{Path, PathBuf};
use std::process::Command;

const UNIT: &str = "vport-agent.service";
/// `systemd-analyze security` exposure (0..100, shown divided by 10) the unit must stay under.
const MAX_EXPOSURE: u32 = 15;

fn dist() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("dist")
}

fn systemd_analyze() -> Command {
    let c = Command::new("systemd-analyze");
    if which("systemd-analyze").is_none() {
        panic!("systemd-analyze not found: install the Debian package systemd (scripts/bootstrap does it)");
    }
    c
}

fn which(cmd: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?.to_str()?.split(':').map(|d| Path::new(d).join(cmd)).find(|p| p.is_file())
}

/// A root with the distribution's unit directory, the unit installed as its header says, and
/// an executable at /usr/bin/vport-agent (where the unit and the .deb put the agent).
fn root() -> tempfile::TempDir {
    let root = tempfile::tempdir().unwrap();
    let units = root.path().join("usr/lib/systemd/system");
    std::fs::create_dir_all(&units).unwrap();
    for e in std::fs::read_dir("/lib/systemd/system").expect("/lib/systemd/system (systemd installed)") {
        let e = e.unwrap();
        if e.file_type().unwrap().is_file() {
            std::fs::copy(e.path(), units.join(e.file_name())).unwrap();
        }
    }
    let etc = root.path().join("etc/systemd/system");
    std::fs::create_dir_all(&etc).unwrap();
    std::fs::copy(dist().join(UNIT), etc.join(UNIT)).unwrap();
    let bin = root.path().join("usr/bin");
    std::fs::create_dir_all(&bin).unwrap();
    std::fs::copy(std::env::current_exe().unwrap(), bin.join("vport-agent")).unwrap();
    root
}

#[test]
fn the_unit_verifies_and_its_exposure_stays_low() {
    let root = root();
    let r = root.path().to_str().unwrap();
    let out = systemd_analyze()
        .args(["verify", "--man=no", &format!("--root={r}"), &format!("/etc/systemd/system/{UNIT}")])
        .output()
        .unwrap();
    let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && said.trim().is_empty(), "systemd-analyze verify: {:?}\n{said}", out.status);

    let out = systemd_analyze()
        .args(["security", "--offline=true", &format!("--threshold={MAX_EXPOSURE}"), &format!("--root={r}"), UNIT])
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&out.stdout);
    let overall = report.lines().find(|l| l.contains("Overall exposure level")).unwrap_or("(no overall line)");
    eprintln!("{overall}");
    assert!(out.status.success(), "exposure over {MAX_EXPOSURE}/10:\n{report}{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn the_udev_rule_gives_the_agents_group_the_org_vport_nodes() {
    // The rule and the test image's /init (host/src/image/initscript.rs, grant_ports) must do
    // the same: group vport, mode 0660, org.vport.* only.
    let rule = std::fs::read_to_string(dist().join("99-vport.rules")).unwrap();
    let active: Vec<&str> = rule.lines().filter(|l| !l.trim_start().starts_with('#') && !l.trim().is_empty()).collect();
    assert_eq!(
        active,
        [r#"SUBSYSTEM=="virtio-ports", ATTR{name}=="org.vport.*", GROUP="vport", MODE="0660""#],
        "the one rule"
    );
    let unit = std::fs::read_to_string(dist().join(UNIT)).unwrap();
    assert!(unit.contains("SupplementaryGroups=vport") && unit.contains("DynamicUser=yes"), "{unit}");
}
