//! `vport bench`: what the agent and its protocol cost over the raw port, measured side by side
//! in one boot (docs/bench.md).
//!
//! One VM with three ports: `org.vport.bench` (the agent serves it: SOURCE / SINK and the guest
//! operations that drive the raw port), `org.vport.bench.stream` (the acknowledged streams) and
//! `bench.raw`, which the agent does not serve: the raw baseline, a guest `write()` / `read()`
//! loop with the host on the chardev socket directly. Each round measures every figure once,
//! raw, plain and acked in turn both ways, so that a drift of the machine spreads over all of
//! them; a figure is the median of its rounds and is printed as a ratio to the raw port of the
//! same direction. Round trips of 64 B and 4 KiB come next: the raw port with a guest loopback
//! (LOOPBACK) against ECHO in a session. Then the agent is watched idle with a READY session
//! (wakeups, CPU, RSS).
//!
//! Under TCG only the ratios are stable; absolute figures belong to the machine.

pub mod events;
pub mod figures;
pub mod insns;
pub mod measure;
mod options;
mod pause;
pub mod plot;
pub mod ports;
pub mod vsock;

use crate::client::AgentClient;
use crate::image::initscript::GUEST_STREAM_DIR;
use crate::link::stat;
use crate::rig::{vm_config, Rig};
use crate::session::{PortServer, Session};
use crate::stream::TransferOptions;
use figures::{BenchReport, Carrier, Direction, IdleCost, RoundTrip, Throughput};
use measure::RawPort;
use std::time::{Duration, Instant};
use vport_common::pattern;

pub use options::{BenchError, BenchOptions, BenchSize};

/// The port the agent serves for SOURCE / SINK and the guest operations.
pub const PORT_CTL: &str = "org.vport.bench";
/// The port of the acknowledged streams.
pub const PORT_STREAM: &str = "org.vport.bench.stream";
/// The raw port: outside the agent's prefix, so the agent leaves it alone.
pub const PORT_RAW: &str = "bench.raw";
/// The write size of the rounds every carrier is measured in: the agent's DATA chunk and the
/// raw loop's write (the goal is stated at 64 KiB). The acknowledged streams move the same
/// bytes in their own frames (32 KiB on the wire) whatever the write size.
pub const WRITE_SIZE: u32 = figures::GOAL_WRITE_SIZE;
/// The largest DATA payload after its 8-byte offset, the plain carrier's chunk at 1 MiB.
const MAX_DATA_CHUNK: u32 = vport_common::frame::DEFAULT_MAX_PAYLOAD - 8;
/// The sizes of the round trips (the goal's).
pub const ROUND_TRIP_SIZES: [usize; 2] = [64, 4096];
/// The guest file the acknowledged host->guest stream writes.
const GUEST_FILE: &str = "bench.bin";
/// How long after its last traffic the agent still wakes to re-check a port for a lost wakeup
/// (its last re-check is 1 s after, `guest/src/recheck.rs`), with a margin: an interval shorter
/// than this would miss a request's last wakeup and count it as idle.
const AGENT_RECHECK_SPAN: Duration = Duration::from_millis(1500);
/// The bench VM's memory, MiB.
const BENCH_MEMORY_MIB: u32 = 1024;
/// The largest sample, MiB: two of them fit the guest's stream directory.
pub const MAX_SAMPLE_MIB: u64 = 192;
/// Longest wait for the agent's first session.
const BOOT_TIMEOUT: Duration = Duration::from_secs(120);
/// Longest wait for a request's reply (STATS, OPEN).
const REPLY: Duration = Duration::from_secs(10);

/// Runs the bench; `progress` hears one line per sample. The VM is killed on return, whatever
/// happened.
pub fn run(opts: &BenchOptions, progress: &mut dyn FnMut(&str)) -> Result<BenchReport, BenchError> {
    let started = Instant::now();
    let mut bench = Bench::boot(opts)?;
    progress(&format!(
        "booted ({}), agent READY; {} round(s) of {} each way",
        bench.report.environment.first().map_or("", |(_, v)| v.as_str()),
        opts.size.rounds,
        figures::size_name(opts.size.bytes)
    ));
    progress(&format!("{}: {}", vsock::REPORT_KEY, bench.vsock.describe()));
    let vsock_runs = bench.vsock.runs();
    for round in 0..opts.size.rounds {
        for (direction, carrier) in PLAN.into_iter().filter(|(_, c)| *c != Carrier::Vsock || vsock_runs) {
            let seed = 0xbe4c_0000 + u64::from(round) * 16 + bench.report.throughput.len() as u64;
            let (took, cpu, wakeups) = bench.measure(direction, carrier, seed, opts.size.bytes, WRITE_SIZE)?;
            let mb = opts.size.bytes as f64 / 1e6 / took.as_secs_f64().max(1e-9);
            progress(&format!(
                "round {}/{}: {} {}: {:.1} MB/s ({} ms, agent CPU {} ms, {wakeups} wakeups)",
                round + 1,
                opts.size.rounds,
                direction.arrow(),
                carrier.name(),
                mb,
                took.as_millis(),
                cpu.as_millis()
            ));
        }
    }
    bench.sweep(opts.size, progress)?;
    bench.round_trips(opts.size, progress)?;
    bench.events(opts.size, progress)?;
    progress(&format!("watching the agent idle for {} s", opts.size.idle_window.as_secs()));
    bench.report.idle = Some(bench.idle(opts.size.idle_window)?);
    bench.pauses(opts.size.pauses, progress)?;
    let mut report = bench.finish();
    for &cpus in opts.size.ports_cpus {
        progress(&format!("booting a VM of {cpus} vCPU(s) with {} ports", ports::PORTS));
        let (boot, figures) = ports::measure(
            &opts.image,
            opts.accel,
            &opts.platform,
            cpus,
            opts.size.ports_counts,
            opts.size.ports_bytes,
            progress,
        )?;
        report.boots.push(boot);
        report.ports.extend(figures);
    }
    report.elapsed = started.elapsed();
    Ok(report)
}

/// The order of a round (vsock where it runs: [`vsock::Reference::runs`]).
const PLAN: [(Direction, Carrier); 8] = [
    (Direction::GuestToHost, Carrier::Raw),
    (Direction::GuestToHost, Carrier::Plain),
    (Direction::GuestToHost, Carrier::Acked),
    (Direction::GuestToHost, Carrier::Vsock),
    (Direction::HostToGuest, Carrier::Raw),
    (Direction::HostToGuest, Carrier::Plain),
    (Direction::HostToGuest, Carrier::Acked),
    (Direction::HostToGuest, Carrier::Vsock),
];

/// The bench's VM and what its samples share.
struct Bench {
    rig: Rig,
    ctl: Session,
    raw: RawPort,
    streams: PortServer,
    work: crate::qemu::WorkDir,
    transfer: TransferOptions,
    report: BenchReport,
    /// The guest's instruction count, when it can be counted ([`insns`]).
    insns: Option<insns::InsnCounter>,
    /// The vsock reference: its daemon (dropped after the VM, which uses it) and connection,
    /// or why it was skipped.
    vsock: vsock::Reference,
}

impl Bench {
    fn boot(opts: &BenchOptions) -> Result<Bench, BenchError> {
        let args: Vec<String> = ["--log-level", "info", "--stream-dir", GUEST_STREAM_DIR, "--allow-guest-ops"]
            .iter()
            .map(|a| a.to_string())
            .collect();
        let mut cfg = vm_config(&opts.image, &[PORT_CTL, PORT_STREAM, PORT_RAW], &args);
        cfg.accel = opts.accel;
        opts.platform.apply(&mut cfg);
        // The guest's stream directory is in its RAM (the initramfs, at most half of it) and
        // holds the last file received and the next one's part file: room for two of the
        // largest sample (`--mib` 192).
        cfg.memory_mib = cfg.memory_mib.max(BENCH_MEMORY_MIB);
        let work = crate::qemu::WorkDir::create().map_err(|e| BenchError::io("make a work directory", e))?;
        let mut report = BenchReport::default();
        let insns = match count_insns(&cfg, work.path()) {
            Ok((args, counter)) => {
                cfg.extra_args.extend(args);
                report.environment.push((
                    INSNS_KEY.into(),
                    "counted by a TCG plugin: every instruction of the guest's vCPU, kernel and user".into(),
                ));
                Some(counter)
            }
            Err(reason) => {
                report.environment.push((INSNS_KEY.into(), format!("not counted: {reason}")));
                None
            }
        };
        let daemon = vsock::prepare(&mut cfg, work.path());
        let mut rig = Rig::launch(cfg).map_err(|e| setup("cannot boot the vm", e))?;
        report.environment.insert(0, ("accelerator".into(), rig.vm.accel().to_string()));
        if let Ok(v) = rig.qmp.query_version() {
            report
                .environment
                .push(("qemu".into(), format!("{}.{}.{} ({})", v.major, v.minor, v.micro, v.package.trim())));
        }
        report.environment.push(("host cpu".into(), host_cpu()));
        let mut ctl_server = rig.port_server(PORT_CTL).map_err(|e| setup("port server", e))?;
        let streams = rig.port_server(PORT_STREAM).map_err(|e| setup("port server", e))?;
        let raw_host = rig.connect_raw(PORT_RAW).map_err(|e| setup("cannot connect to the raw port", e))?;
        rig.resume().map_err(|e| setup("cont", e))?;
        let mut ctl = ctl_server
            .accept(crate::speed::scaled(BOOT_TIMEOUT))
            .map_err(|e| BenchError::Setup(format!("the agent did not come up: {e}\n{}", rig.failure_context())))?;
        report.environment.push(("guest kernel".into(), ctl.handshake().hello.kernel_release.clone()));
        // The session holds the connection; the server is not needed again.
        drop(ctl_server);
        let raw = measure::open_raw(&mut ctl, PORT_RAW, raw_host, crate::speed::scaled(REPLY))?;
        let vsock = vsock::Reference::connect(daemon, &mut ctl, crate::speed::scaled(REPLY));
        report.environment.push((vsock::REPORT_KEY.into(), vsock.describe()));
        let transfer = TransferOptions { session_timeout: Duration::from_secs(60), ..Default::default() };
        Ok(Bench { rig, ctl, raw, streams, work, transfer, report, insns, vsock })
    }

    /// One sample of `carrier` moving `bytes` of the pattern of `seed` in `direction`, in
    /// writes (raw) or DATA frames (plain) of `write_size` bytes; the acknowledged streams use
    /// their own frames.
    fn sample(
        &mut self,
        direction: Direction,
        carrier: Carrier,
        seed: u64,
        bytes: u64,
        write_size: u32,
    ) -> Result<Duration, BenchError> {
        use measure::*;
        let chunk = write_size.min(MAX_DATA_CHUNK);
        match (direction, carrier) {
            (Direction::GuestToHost, Carrier::Raw) => {
                raw_to_host(&mut self.ctl, &mut self.raw, seed, bytes, write_size)
            }
            (Direction::GuestToHost, Carrier::Plain) => plain_to_host(&mut self.ctl, seed, bytes, chunk),
            (Direction::GuestToHost, Carrier::Acked) => {
                let dest = self.work.path().join("from-guest.bin");
                acked_to_host(&mut self.streams, PORT_STREAM, seed, bytes, &dest, &self.transfer)
            }
            (Direction::HostToGuest, Carrier::Raw) => {
                let data = pattern_bytes(seed, bytes)?;
                raw_to_guest(&mut self.ctl, &mut self.raw, seed, &data, write_size)
            }
            (Direction::HostToGuest, Carrier::Plain) => plain_to_guest(&mut self.ctl, seed, bytes, chunk),
            (Direction::GuestToHost, Carrier::Vsock) => {
                vsock::to_host(&mut self.ctl, &mut self.vsock, seed, bytes, write_size)
            }
            (Direction::HostToGuest, Carrier::Vsock) => {
                let data = pattern_bytes(seed, bytes)?;
                vsock::to_guest(&mut self.ctl, &mut self.vsock, seed, &data, write_size)
            }
            (Direction::HostToGuest, Carrier::Acked) => {
                let local = self.work.path().join("to-guest.bin");
                std::fs::write(&local, pattern_bytes(seed, bytes)?)
                    .map_err(|e| BenchError::io("write the file to send", e))?;
                acked_to_guest(&mut self.streams, PORT_STREAM, &local, GUEST_FILE, seed, bytes, &self.transfer)
            }
        }
        .map_err(|e| match e {
            BenchError::Session(_) | BenchError::Transfer(_) => BenchError::Setup(format!(
                "{} {}: {e}\n{}",
                direction.arrow(),
                carrier.name(),
                self.rig.failure_context()
            )),
            e => e,
        })
    }

    /// Round trips of each of [`ROUND_TRIP_SIZES`], raw loopback then ECHO in turn, in
    /// `size.rounds` batches: a drift of the machine spreads over both.
    fn round_trips(&mut self, size: BenchSize, progress: &mut dyn FnMut(&str)) -> Result<(), BenchError> {
        let per_batch = (size.round_trips / size.rounds.max(1)).max(1) as usize;
        for round in 0..size.rounds {
            for bytes in ROUND_TRIP_SIZES {
                let seed = 0x4771_0000 + u64::from(round) * 8 + bytes as u64;
                let raw = measure::raw_round_trips(&mut self.ctl, &mut self.raw, seed, bytes, per_batch)?;
                let echo = measure::echo_round_trips(&mut self.ctl, seed, bytes, per_batch)?;
                let p50 = |v: &[Duration]| figures::percentile(v, 50.0).map_or(0, |d| d.as_micros());
                progress(&format!(
                    "round {}/{}: round trips of {}: raw p50 {} us, echo p50 {} us ({per_batch} each)",
                    round + 1,
                    size.rounds,
                    figures::size_name(bytes as u64),
                    p50(&raw),
                    p50(&echo)
                ));
                for (carrier, samples) in [(Carrier::Raw, raw), (Carrier::Plain, echo)] {
                    let size = bytes as u32;
                    match self.report.round_trips.iter_mut().find(|t| t.carrier == carrier && t.size == size) {
                        Some(t) => t.samples.extend(samples),
                        None => self.report.round_trips.push(RoundTrip { carrier, size, samples }),
                    }
                }
            }
        }
        Ok(())
    }

    /// Raw and plain, both ways, at each of `size.sweep`'s write sizes: `size.sweep_rounds`
    /// samples of each, every figure once per round.
    fn sweep(&mut self, size: BenchSize, progress: &mut dyn FnMut(&str)) -> Result<(), BenchError> {
        for round in 0..size.sweep_rounds {
            for &write_size in size.sweep {
                let bytes = size.sweep_bytes(write_size);
                for (direction, carrier) in PLAN.into_iter().filter(|(_, c)| matches!(c, Carrier::Raw | Carrier::Plain))
                {
                    let seed = 0x5eeb_0000 + u64::from(round) * 64 + u64::from(write_size.trailing_zeros());
                    let (took, _, _) = self.measure(direction, carrier, seed, bytes, write_size)?;
                    progress(&format!(
                        "sweep {}/{}: {} {} in writes of {}: {:.1} MB/s",
                        round + 1,
                        size.sweep_rounds,
                        direction.arrow(),
                        carrier.name(),
                        figures::size_name(u64::from(write_size)),
                        bytes as f64 / 1e6 / took.as_secs_f64().max(1e-9)
                    ));
                }
            }
        }
        Ok(())
    }

    /// Event latencies, `size.events` samples of each: the guest closes and opens the raw
    /// port, the host connects to the streams' port, a port is hot-plugged.
    fn events(&mut self, size: BenchSize, progress: &mut dyn FnMut(&str)) -> Result<(), BenchError> {
        let mut figures = events::Events::new(&events::raw_64b(&self.report));
        for i in 0..size.events {
            self.raw.handle = figures.guest_close_and_open(&self.rig, &mut self.ctl, self.raw.handle)?;
            figures.host_connects(&mut self.streams)?;
            figures.device_add(&mut self.rig)?;
            let local = self.work.path().join("resume.bin");
            events::drop_and_resume(&mut figures, &mut self.streams, &local, 0x7e5u64 + u64::from(i), &self.transfer)?;
            progress(&format!(
                "events {}/{}: guest close and open, host connect, device_add, a stream dropped and resumed",
                i + 1,
                size.events
            ));
        }
        self.report.events = figures.into_figures();
        Ok(())
    }

    /// The pause bug, `count` samples ([`pause`]); the events' connect -> READY samples are
    /// its reference. Stopping the VM ends the control session: nothing may use it after this.
    fn pauses(&mut self, count: u32, progress: &mut dyn FnMut(&str)) -> Result<(), BenchError> {
        if count == 0 {
            return Ok(());
        }
        let reference = self
            .report
            .events
            .iter()
            .find(|e| e.event == events::HOST_CONNECTS && e.by.starts_with("HELLO"))
            .map_or_else(Vec::new, |e| e.samples.clone());
        pause::set_trace(&self.rig.qmp, true)?;
        let (stderr, dest) = (self.rig.vm.stderr_log(), self.work.path().join("pause.bin"));
        let mut samples = Vec::new();
        for i in 0..count {
            let vm = &self.rig.vm;
            let s = pause::sample(
                &mut self.streams,
                &self.rig.qmp,
                &stderr,
                &|| vm.check_alive(),
                0x9a05 + u64::from(i),
                &dest,
            )?;
            let ms = |d: Option<Duration>| d.map_or("-".to_string(), |d| format!("{} ms", d.as_millis()));
            progress(&format!(
                "pause {}/{count}: port throttled after cont: {}; liveness left the connection at {}; the stream flowed \
                 again at {}",
                i + 1,
                if s.throttled { "yes" } else { "no" },
                ms(s.detected),
                ms(s.resumed)
            ));
            samples.push(s);
        }
        pause::set_trace(&self.rig.qmp, false)?;
        self.report.events.extend(pause::figures(&reference, &samples));
        Ok(())
    }

    /// One sample (see [`Bench::sample`]) with the agent's CPU time and wakeups over it, added
    /// to its figure; returns (time, agent CPU, agent wakeups).
    fn measure(
        &mut self,
        direction: Direction,
        carrier: Carrier,
        seed: u64,
        bytes: u64,
        write_size: u32,
    ) -> Result<(Duration, Duration, u64), BenchError> {
        let before = self.usage()?;
        let insns_before = self.guest_insns()?;
        let took = self.sample(direction, carrier, seed, bytes, write_size)?;
        let insns = self.guest_insns()?.zip(insns_before).map(|(after, before)| after.saturating_sub(before));
        let after = self.usage()?;
        let cpu = Duration::from_nanos(after.1.saturating_sub(before.1));
        self.record(direction, carrier, write_size, Cost { bytes, took, cpu, insns });
        Ok((took, cpu, after.0.saturating_sub(before.0)))
    }

    /// The guest's instruction count so far, when it is counted.
    fn guest_insns(&self) -> Result<Option<u64>, BenchError> {
        self.insns
            .as_ref()
            .map(|c| c.read())
            .transpose()
            .map_err(|e| BenchError::io("read the guest's instruction count", e))
    }

    /// Adds a sample to its figure.
    fn record(&mut self, direction: Direction, carrier: Carrier, write_size: u32, cost: Cost) {
        let Cost { bytes, took, cpu, insns } = cost;
        let same = |t: &&mut Throughput| t.direction == direction && t.carrier == carrier && t.write_size == write_size;
        match self.report.throughput.iter_mut().find(same) {
            Some(t) => {
                t.samples.push(took);
                t.agent_cpu.push(cpu);
                t.guest_insns.extend(insns);
            }
            None => self.report.throughput.push(Throughput {
                direction,
                carrier,
                bytes,
                write_size,
                samples: vec![took],
                agent_cpu: vec![cpu],
                guest_insns: insns.into_iter().collect(),
            }),
        }
    }

    /// The agent idle with READY sessions: its wakeups and CPU over `window` of idle time. A
    /// STATS request costs the agent wakeups of its own, some after its reply (they fall into
    /// the next interval), so two intervals are measured, a short one (a quarter of `window`,
    /// at least [`AGENT_RECHECK_SPAN`]) and one `window` longer: both hold one request's cost,
    /// and their difference is what `window` of idle time cost.
    fn idle(&mut self, window: Duration) -> Result<IdleCost, BenchError> {
        close_guest_handle(&mut self.ctl, self.raw.handle)?;
        if let Some(v) = self.vsock.take() {
            close_guest_handle(&mut self.ctl, v.handle)?;
        }
        let short = (window / 4).max(AGENT_RECHECK_SPAN);
        let a = self.usage()?;
        // Measurement intervals, not synchronisation: nothing is waited for.
        std::thread::sleep(short);
        let b = self.usage()?;
        std::thread::sleep(short + window);
        let c = self.usage()?;
        let d_short = (b.0.saturating_sub(a.0), b.1.saturating_sub(a.1));
        let d_long = (c.0.saturating_sub(b.0), c.1.saturating_sub(b.1));
        Ok(IdleCost {
            window_ms: u64::try_from(window.as_millis()).unwrap_or(u64::MAX),
            wakeups: d_long.0.saturating_sub(d_short.0),
            cpu_ns: d_long.1.saturating_sub(d_short.1),
            rss_kib: c.2,
            request_wakeups: d_short.0,
        })
    }

    /// The report, the VM killed (one VM at a time: the next phase boots its own).
    fn finish(self) -> BenchReport {
        self.report
    }

    /// The agent's (wakeups, cpu_ns, rss_kib).
    fn usage(&mut self) -> Result<(u64, u64, u64), BenchError> {
        let stats = self.ctl.agent_stats(crate::speed::scaled(REPLY))?;
        match (stat(&stats, "wakeups"), stat(&stats, "cpu_ns"), stat(&stats, "rss_kib")) {
            (Some(w), Some(c), Some(r)) => Ok((w, c, r)),
            _ => Err(BenchError::Guest {
                what: "STATS".into(),
                detail: "no wakeups, cpu_ns or rss_kib: install the vport-agent of this vport".into(),
            }),
        }
    }
}

/// What one throughput sample moved and cost.
struct Cost {
    /// Bytes moved.
    bytes: u64,
    /// Wall time.
    took: Duration,
    /// The agent's CPU time.
    cpu: Duration,
    /// The guest's instructions, where counted.
    insns: Option<u64>,
}

/// Closes the guest's raw-port handle (its worker thread ends), so that the idle agent holds
/// only what it holds for its served ports.
fn close_guest_handle(ctl: &mut Session, handle: u32) -> Result<(), BenchError> {
    let done = ctl.guest_op(vport_common::message::GuestOp::Close { handle }, crate::speed::scaled(REPLY))?;
    if done.ret < 0 {
        return Err(BenchError::Guest { what: "close the raw port".into(), detail: format!("errno {}", done.errno) });
    }
    Ok(())
}

/// The environment entry saying whether guest instructions are counted, and if not, why.
const INSNS_KEY: &str = "guest instructions";

/// Sets up the count of the guest's instructions for the VM of `cfg` ([`insns::prepare`]).
fn count_insns(
    cfg: &crate::qemu::VmConfig,
    work: &std::path::Path,
) -> Result<(Vec<std::ffi::OsString>, insns::InsnCounter), String> {
    let qemu = crate::qemu::find_qemu(cfg.qemu.as_deref()).map_err(|e| e.to_string())?;
    let accel =
        crate::qemu::probe::resolve(cfg.accel, &qemu, Some(&cfg.kernel), &cfg.cache_dir).map_err(|e| e.to_string())?;
    let version = crate::qemu::query_version(&qemu)?;
    insns::prepare(&cfg.cache_dir, work, accel, version, cfg.cpus)
}

fn setup(what: &str, e: impl std::fmt::Display) -> BenchError {
    BenchError::Setup(format!("{what}: {e}"))
}

/// `bytes` of the pattern of `seed`.
fn pattern_bytes(seed: u64, bytes: u64) -> Result<Vec<u8>, BenchError> {
    let len = usize::try_from(bytes).map_err(|_| BenchError::Setup(format!("{bytes} bytes do not fit in memory")))?;
    let mut data = vec![0u8; len];
    pattern::fill(seed, 0, &mut data);
    Ok(data)
}

/// The host CPU's model name and count, from `/proc/cpuinfo`.
fn host_cpu() -> String {
    let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = info
        .lines()
        .find_map(|l| l.strip_prefix("model name").and_then(|r| r.split_once(':')).map(|(_, v)| v.trim().to_string()))
        .unwrap_or_else(|| "unknown".into());
    let count = info.lines().filter(|l| l.starts_with("processor")).count();
    format!("{model} x {count}")
}
