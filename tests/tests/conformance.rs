//! The conformance suite (`vport_host::conformance`) as one end-to-end test: every implemented
//! case on real VMs (shared boot, guest-side operations, migration chain, scale). Fails if any case FAILs or ERRORs,
//! if a group cannot boot, or if a QUIRK comes without its explanation. Prints the matrix and
//! writes JSON and JUnit XML next to the test's target directory (`target/conformance.*`).

use std::time::Duration;
use vport_host::conformance::{self, CaseEvent, SuiteOptions, Verdict};

#[test]
fn conformance_suite() {
    let mut opts = SuiteOptions::new(vport_tests::guest_image().clone());
    opts.filter = std::env::var("VPORT_CONFORMANCE_FILTER").ok().filter(|s| !s.is_empty());
    if let Some(n) = std::env::var("VPORT_CONFORMANCE_CYCLES").ok().and_then(|s| s.parse().ok()) {
        opts.reopen_cycles = n;
    }
    let report = conformance::run(&opts, &mut |ev| match ev {
        CaseEvent::GroupStarted { group } => eprintln!("conformance: group {group}"),
        CaseEvent::CaseFinished(c) => eprintln!("conformance: {} {}: {}", c.verdict.label(), c.name, c.observed),
        CaseEvent::GroupFailed(e) => eprintln!("conformance: group {} failed: {}", e.group, e.error),
    })
    .expect("the suite selects cases");
    let text = conformance::render_text(&report);
    println!("{text}");
    let out = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target");
    for (file, body) in [
        ("conformance.json", conformance::render_json(&report)),
        ("conformance.xml", conformance::render_junit(&report)),
    ] {
        let path = out.join(file);
        std::fs::write(&path, body).unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
    }
    assert!(!report.cases.is_empty());
    for c in &report.cases {
        assert!(c.verdict != Verdict::Quirk || !c.note.is_empty(), "QUIRK without explanation: {}", c.name);
    }
    assert!(report.ok(), "conformance failures:\n{text}");
    assert!(report.elapsed < Duration::from_secs(600), "suite took {:?}", report.elapsed);
}
