//! What the agent's code costs per byte moved, without a VM: a [`Port`] served over an
//! in-memory device (reads of at most one 4 KiB page, as virtio-console gives them; writes
//! taken whole up to 32 KiB), against the raw loops the bench's baseline runs in the guest.
//!
//! Run it under callgrind for instruction counts, which are stable where seconds are not:
//! `scripts/agent-costs` does, and prints instructions per MiB of each mode against its raw
//! loop. Under `qemu-x86_64 -cpu qemu64` (user-mode TCG, the guest's instruction set) the
//! seconds show what the emulated guest pays.
//!
//! Modes (`MODE MIB`): `sink` (the host sends DATA frames of a SINK), `source` (the agent sends
//! a SOURCE), `raw-read` (read and digest, the raw baseline's guest loop), `raw-write` (fill,
//! digest and write). Each prints one line: mode, bytes, seconds.

use nix::errno::Errno;
use nix::poll::PollFlags;
use std::process::ExitCode;
use std::rc::Rc;
use std::time::Instant;
use vport_agent::port::{AgentInfo, Carry, Env, Port, PortIo, ProbeOutcome};
use vport_agent::settings::Settings;
use vport_common::message::{Message, ProbeKind, ProbeTarget};
use vport_common::{pattern, Decoder};

/// One page: what one `read()` of a virtio-serial port returns at most.
const PAGE: usize = 4096;
/// The guest's write cut.
const MAX_WRITE: usize = 32 * 1024;
/// The DATA payload the bench uses.
const CHUNK: usize = 64 * 1024;
const SEED: u64 = 0x5eed;

/// An in-memory port: reads come from `input`, writes go to `output` (or are counted only).
struct Memory {
    input: Vec<u8>,
    at: usize,
    output: Vec<u8>,
    keep_output: bool,
    written: u64,
}

impl PortIo for Memory {
    fn read(&mut self, buf: &mut [u8]) -> Result<usize, Errno> {
        let n = buf.len().min(PAGE).min(self.input.len() - self.at);
        if n == 0 {
            return Err(Errno::EAGAIN);
        }
        buf[..n].copy_from_slice(&self.input[self.at..self.at + n]);
        self.at += n;
        Ok(n)
    }
    fn write(&mut self, buf: &[u8]) -> Result<usize, Errno> {
        let n = buf.len().min(MAX_WRITE);
        if self.keep_output {
            self.output.extend_from_slice(&buf[..n]);
        }
        self.written += n as u64;
        Ok(n)
    }
    fn poll_mask(&mut self) -> Result<PollFlags, Errno> {
        let readable = if self.at < self.input.len() { PollFlags::POLLIN } else { PollFlags::empty() };
        Ok(PollFlags::POLLOUT | readable)
    }
    fn probe(&mut self, _: ProbeKind, _: ProbeTarget, _: u32) -> ProbeOutcome {
        ProbeOutcome::default()
    }
    fn set_async(&mut self, _: bool) -> Result<(), Errno> {
        Ok(())
    }
}

struct Clock(u64);

impl Env for Clock {
    fn now_ns(&mut self) -> u64 {
        self.0 += 1000;
        self.0
    }
    fn random_u64(&mut self) -> u64 {
        self.0 += 1;
        self.0.wrapping_mul(0x9E37_79B9_7F4A_7C15)
    }
    fn wakeups(&mut self) -> u64 {
        0
    }
    fn cpu_ns(&mut self) -> u64 {
        0
    }
    fn agent_stats(&mut self) -> Vec<(&'static str, u64)> {
        vec![]
    }
}

fn frame(msg: &Message, session: u32, seq: u32) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    msg.encode_into(session, seq, &mut out).map_err(|e| e.to_string())?;
    Ok(out)
}

/// The frames the port wrote, decoded.
fn sent(port: &mut Port<Memory>) -> Vec<Message> {
    let mut d = Decoder::default();
    d.push(&std::mem::take(&mut port.io_mut().output));
    d.filter_map(|f| f.ok().and_then(|f| Message::from_frame(&f).ok())).collect()
}

/// A port with a READY session; returns it and the session.
fn ready_port() -> Result<(Port<Memory>, u32, Clock), String> {
    let info = Rc::new(AgentInfo { agent_version: "cost".into(), kernel_release: "-".into(), boot_id: "-".into() });
    let io = Memory { input: vec![], at: 0, output: vec![], keep_output: true, written: 0 };
    let settings = Rc::new(Settings::default());
    let mut port = Port::with_carry("org.vport.cost".into(), "vport0p1".into(), io, info, settings, Carry::default());
    let mut env = Clock(0);
    port.service(&mut env).map_err(|e| e.to_string())?;
    let Some((session, nonce)) = sent_hello(&mut port) else { return Err("the port sent no HELLO".into()) };
    let ack = Message::HelloAck { nonce, host_version: "cost".into() };
    port.io_mut().input = frame(&ack, session, 0)?;
    port.service(&mut env).map_err(|e| e.to_string())?;
    Ok((port, session, env))
}

fn sent_hello(port: &mut Port<Memory>) -> Option<(u32, u64)> {
    let mut d = Decoder::default();
    d.push(&std::mem::take(&mut port.io_mut().output));
    let f = d.next()?.ok()?;
    match Message::from_frame(&f).ok()? {
        Message::Hello(h) => Some((f.header.session, h.nonce)),
        _ => None,
    }
}

/// Serves the port until it has nothing left to do.
fn serve(port: &mut Port<Memory>, env: &mut Clock) -> Result<(), String> {
    while port.service(env).map_err(|e| e.to_string())? == vport_agent::port::Health::MoreWork {}
    Ok(())
}

/// Runs the measured part: its time is printed, and `scripts/agent-costs` counts the
/// instructions inside this function only (callgrind `--toggle-collect`), not the set-up.
#[inline(never)]
fn timed(work: impl FnOnce() -> Result<(), String>) -> Result<f64, String> {
    let started = Instant::now();
    work()?;
    Ok(started.elapsed().as_secs_f64())
}

fn run(mode: &str, bytes: u64) -> Result<(), String> {
    let seconds;
    match mode {
        "sink" => {
            let (mut port, session, mut env) = ready_port()?;
            let mut wire = frame(&Message::Sink { seed: SEED, bytes }, session, 1)?;
            let mut data = vec![0u8; CHUNK];
            let mut offset = 0;
            while offset < bytes {
                let n = (bytes - offset).min(CHUNK as u64) as usize;
                pattern::fill(SEED, offset, &mut data[..n]);
                let msg = Message::Data { offset, bytes: data[..n].to_vec() };
                msg.encode_into(session, 2 + (offset / CHUNK as u64) as u32, &mut wire).map_err(|e| e.to_string())?;
                offset += n as u64;
            }
            port.io_mut().input = wire;
            port.io_mut().at = 0;
            seconds = timed(|| serve(&mut port, &mut env))?;
            match sent(&mut port).last() {
                Some(Message::SinkResult { bytes: b, first_mismatch, .. })
                    if *b == bytes && *first_mismatch == vport_common::message::NO_MISMATCH => {}
                other => return Err(format!("SINK did not end clean: {other:?}")),
            }
        }
        "source" => {
            let (mut port, session, mut env) = ready_port()?;
            port.io_mut().keep_output = false;
            port.io_mut().input = frame(&Message::Source { seed: SEED, bytes, chunk: CHUNK as u32 }, session, 1)?;
            port.io_mut().at = 0;
            seconds = timed(|| serve(&mut port, &mut env))?;
            let min = bytes + bytes / CHUNK as u64 * 36;
            if port.io_mut().written < min {
                return Err(format!("SOURCE wrote {} bytes, at least {min} expected", port.io_mut().written));
            }
        }
        "raw-read" => {
            let mut input = vec![0u8; bytes as usize];
            pattern::fill(SEED, 0, &mut input);
            let mut io = Memory { input, at: 0, output: vec![], keep_output: false, written: 0 };
            let mut buf = vec![0u8; PAGE];
            let mut digest = pattern::StreamDigest::new();
            let expected = pattern::pattern_digest(SEED, bytes);
            seconds = timed(|| {
                while let Ok(n) = io.read(&mut buf) {
                    digest.update(&buf[..n]);
                }
                Ok(())
            })?;
            if digest.digest() != expected {
                return Err("raw read: wrong digest".into());
            }
        }
        "raw-write" => {
            let mut io = Memory { input: vec![], at: 0, output: vec![], keep_output: false, written: 0 };
            let mut buf = vec![0u8; CHUNK];
            let mut digest = pattern::StreamDigest::new();
            seconds = timed(|| {
                let mut offset = 0;
                while offset < bytes {
                    let n = (bytes - offset).min(CHUNK as u64) as usize;
                    pattern::fill(SEED, offset, &mut buf[..n]);
                    digest.update(&buf[..n]);
                    let mut done = 0;
                    while done < n {
                        done += io.write(&buf[done..n]).map_err(|e| e.to_string())?;
                    }
                    offset += n as u64;
                }
                Ok(())
            })?;
            if io.written != bytes {
                return Err("raw write: short".into());
            }
        }
        other => return Err(format!("unknown mode {other:?}: use sink, source, raw-read or raw-write")),
    }
    println!("{mode} {bytes} {seconds:.6}");
    Ok(())
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (Some(mode), Some(mib)) = (args.first(), args.get(1).and_then(|m| m.parse::<u64>().ok())) else {
        eprintln!("usage: port_cost sink|source|raw-read|raw-write MIB");
        return ExitCode::from(2);
    };
    match run(mode, mib << 20) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("port_cost: {e}");
            ExitCode::FAILURE
        }
    }
}
