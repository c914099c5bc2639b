//! `vport run matrix` on a real VM (issue 14, "A matrix"): the conformance suite on platforms
//! the other tests never boot (a q35 machine with 2 vCPUs; microvm, with virtio-serial-device on
//! virtio-mmio, with 2 vCPUs), beside cells that cannot run here and must say why (KVM: only
//! where vport's probe boots the guest's kernel). The summary, `summary.json` and `junit.xml`
//! must list every cell as passed or skipped with its reason, and state the speed factor the
//! calibration boot measured and every suite ran with.
//!
//! The binary is `$VPORT_BIN`, or `vport` next to this test's profile directory (see
//! `vport_tests::vport_bin`).

use serde_json::Value;
use std::process::Command;
use vport_tests::vport_host::{cache, qemu};
use vport_tests::{guest_image, vport_bin};

#[test]
fn the_matrix_runs_conformance_on_q35_and_microvm_with_two_vcpus_and_says_why_cells_are_skipped() {
    let img = guest_image();
    let out = tempfile::tempdir().expect("temporary directory");
    let run = Command::new(vport_bin())
        .args(["run", "matrix", "--suite", "conformance", "--machine", "q35,microvm", "--cpus", "2"])
        .args(["--accel", "tcg,kvm", "--json", "--out"])
        .arg(out.path())
        .output()
        .expect("run vport run matrix");
    let stderr = String::from_utf8_lossy(&run.stderr);
    println!("{stderr}");
    let summary: Value = serde_json::from_slice(&run.stdout)
        .unwrap_or_else(|e| panic!("the summary is not JSON ({e}): {}", String::from_utf8_lossy(&run.stdout)));
    assert_eq!(run.status.code(), Some(0), "every cell passed or was skipped: {summary:#}");
    let cells = summary["cells"].as_array().expect("cells");
    assert_eq!(cells.len(), 4, "q35 and microvm, each under tcg and kvm: {summary:#}");
    let outcome = |machine: &str, accel: &str| {
        let cell = cells.iter().find(|c| c["machine"] == machine && c["accel"] == accel).expect("the cell");
        assert_eq!(cell["cpus"], 2);
        assert_eq!(cell["kernel"], img.kernel_release.as_str(), "cells are named by the kernel's release");
        cell["suites"][0].clone()
    };
    for machine in ["q35", "microvm"] {
        let tcg = outcome(machine, "tcg");
        assert_eq!(tcg["outcome"], "passed", "{tcg:#}");
        let counts = tcg["summary"].as_str().expect("a summary line");
        assert!(counts.starts_with("36 cases:") && !counts.contains("fail"), "{machine}: {counts}");
    }
    // KVM: skipped with the probe's reason where it does not run the guest, else it must pass.
    let qemu_bin = qemu::find_qemu(None).expect("qemu");
    let kvm_verdict = qemu::probe::kvm_runs_guests(&qemu_bin, Some(&img.kernel), &cache::cache_dir());
    for machine in ["q35", "microvm"] {
        let kvm = outcome(machine, "kvm");
        match &kvm_verdict {
            Ok(()) => assert_eq!(kvm["outcome"], "passed", "{kvm:#}"),
            Err(why) => {
                assert_eq!(kvm["outcome"], "skipped", "{kvm:#}");
                let shown = vport_tests::vport_host::matrix::plan::first_line(why);
                assert!(kvm["reason"].as_str().unwrap_or("").contains(&shown), "{kvm:#} / {why}");
            }
        }
    }
    // The files CI keeps: the summary, JUnit per cell, and the suite's own report and JUnit.
    let junit = std::fs::read_to_string(out.path().join("junit.xml")).expect("junit.xml");
    assert!(junit.contains("<testsuites name=\"vport-matrix\" tests=\"4\" failures=\"0\" errors=\"0\">"), "{junit}");
    assert_eq!(junit.matches("<skipped message=").count(), if kvm_verdict.is_err() { 2 } else { 0 });
    let written: Value =
        serde_json::from_slice(&std::fs::read(out.path().join("summary.json")).expect("summary.json")).expect("json");
    assert_eq!(written, summary);
    let cell_dir = out.path().join(format!(
        "qemu-{}_linux-{}_q35_2cpu_tcg",
        cells[0]["qemu"].as_str().unwrap_or(""),
        img.kernel_release
    ));
    let report: Value =
        serde_json::from_slice(&std::fs::read(cell_dir.join("conformance.json")).expect("the cell's conformance.json"))
            .expect("the cell's report is JSON");
    assert_eq!(report["cases"].as_array().map(Vec::len), Some(36));
    // The speed factor: measured once by the calibration boot, within its bounds, and the one
    // every suite ran with.
    let factor = summary["speed_factor"].as_f64().expect("the summary states the speed factor");
    assert!((1.0..=10.0).contains(&factor), "{factor}");
    assert_eq!(report["speed_factor"].as_f64(), Some(factor), "the suite ran with the matrix's factor");
    assert!(stderr.contains("matrix: speed factor"), "the calibration is reported: {stderr}");
    assert!(cell_dir.join("conformance-junit.xml").is_file() && cell_dir.join("conformance.log").is_file());
}
