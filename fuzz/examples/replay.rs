//! Runs files through a target's checks on any toolchain, without libFuzzer:
//! `cargo run --example replay -- TARGET FILE...` (TARGET: decoder, message, agent_port, trace,
//! qmp). With `VPORT_FUZZ_DEBUG=1` the agent_port target prints the frames each open wrote.

use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some((target, files)) = args.split_first() else {
        eprintln!("usage: replay TARGET FILE...");
        return ExitCode::from(2);
    };
    let run: fn(&[u8]) = match target.as_str() {
        "decoder" => vport_fuzz::decoder::run,
        "message" => vport_fuzz::message::run,
        "agent_port" => vport_fuzz::agent_port::run,
        "trace" => vport_fuzz::trace::run,
        "qmp" => vport_fuzz::qmp::run,
        other => {
            eprintln!("replay: unknown target {other}");
            return ExitCode::from(2);
        }
    };
    for f in files {
        let data = match std::fs::read(f) {
            Ok(d) => d,
            Err(e) => {
                eprintln!("replay: {f}: {e}");
                return ExitCode::from(2);
            }
        };
        // A failed check panics with its message; the exit status says so.
        run(&data);
        println!("{f}: ok");
    }
    ExitCode::SUCCESS
}
