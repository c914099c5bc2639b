//! Replays the committed corpus (`corpus/<target>/*`) through each target's checks, on any
//! toolchain: `cargo test --manifest-path fuzz/Cargo.toml`. A failure names the file.

use std::path::Path;

fn replay(target: &str, run: fn(&[u8])) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus").join(target);
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.expect("directory entry").path())
        .collect();
    files.sort();
    assert!(!files.is_empty(), "{}: no seeds", dir.display());
    for f in files {
        let data = std::fs::read(&f).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
        let result = std::panic::catch_unwind(|| run(&data));
        assert!(result.is_ok(), "{target}: {} fails", f.display());
    }
}

#[test]
fn decoder_corpus() {
    replay("decoder", vport_fuzz::decoder::run);
}

#[test]
fn message_corpus() {
    replay("message", vport_fuzz::message::run);
}

#[test]
fn agent_port_corpus() {
    replay("agent_port", vport_fuzz::agent_port::run);
}

#[test]
fn trace_corpus() {
    replay("trace", vport_fuzz::trace::run);
}

#[test]
fn qmp_corpus() {
    replay("qmp", vport_fuzz::qmp::run);
}
