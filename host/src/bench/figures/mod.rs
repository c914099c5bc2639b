//! The bench's figures and how they are judged, pure: samples of one measurement, their
//! median, a comparison of a candidate against its baseline of the same run as a ratio, and the
//! report (a table for people, JSON for machines). No I/O here: the measurements are in
//! [`super::measure`].

use serde::Serialize;
use std::time::Duration;

/// Which way bytes move.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Direction {
    /// From the guest to the host.
    GuestToHost,
    /// From the host to the guest.
    HostToGuest,
}

impl Direction {
    /// `guest->host` or `host->guest`.
    pub fn arrow(self) -> &'static str {
        match self {
            Direction::GuestToHost => "guest->host",
            Direction::HostToGuest => "host->guest",
        }
    }
}

/// How the bytes are carried.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Carrier {
    /// The raw port: a guest read/write loop on a port the agent does not serve, the host on
    /// the chardev socket directly. The baseline.
    Raw,
    /// The agent's SOURCE / SINK: framed, checked, not acknowledged.
    Plain,
    /// An acknowledged stream (`vport send` / `vport recv`): framed, acknowledged, resumable.
    Acked,
    /// The reference transport: a virtio-vsock stream (vhost-user, `vhost-device-vsock` on the
    /// host), driven by the same guest loop as raw. Compared with raw, not held to the goal:
    /// what virtio-serial costs against vsock.
    Vsock,
}

impl Carrier {
    /// The carrier's name in tables.
    pub fn name(self) -> &'static str {
        match self {
            Carrier::Raw => "raw",
            Carrier::Plain => "plain",
            Carrier::Acked => "acked",
            Carrier::Vsock => "vsock",
        }
    }
}

/// The repeated timings of moving `bytes` one way by one carrier. Every sample moved all the
/// bytes with their digest checked (a sample that did not is an error, never a figure).
#[derive(Debug, Clone, PartialEq)]
pub struct Throughput {
    /// Which way.
    pub direction: Direction,
    /// By what.
    pub carrier: Carrier,
    /// Bytes per sample.
    pub bytes: u64,
    /// Size of each write: the guest's `write()` (raw), a DATA frame's payload (plain,
    /// acked).
    pub write_size: u32,
    /// Wall time of each sample, in the order taken.
    pub samples: Vec<Duration>,
    /// The agent's CPU time (all its threads) over each sample: how busy the guest side was.
    pub agent_cpu: Vec<Duration>,
    /// The guest's instructions over each sample (kernel and user, every process), where they
    /// were counted (`super::insns`); empty where not.
    pub guest_insns: Vec<u64>,
}

impl Throughput {
    /// The median sample; `None` without samples. With an even count, the lower middle one
    /// (a measured time, never an average of two).
    pub fn median(&self) -> Option<Duration> {
        median(&self.samples)
    }

    /// The agent's CPU time as a share of the wall time, over all samples (1.0: one guest CPU
    /// busy throughout); `None` without samples.
    pub fn agent_busy(&self) -> Option<f64> {
        let wall: Duration = self.samples.iter().sum();
        let cpu: Duration = self.agent_cpu.iter().sum();
        (!wall.is_zero()).then(|| cpu.as_secs_f64() / wall.as_secs_f64())
    }

    /// The guest's instructions per MiB moved, at the lower median of the counted samples;
    /// `None` where none were counted.
    pub fn insns_per_mib(&self) -> Option<f64> {
        let mut sorted = self.guest_insns.clone();
        sorted.sort_unstable();
        let mid = *sorted.get(sorted.len().checked_sub(1)? / 2)?;
        (self.bytes > 0).then(|| mid as f64 / (self.bytes as f64 / f64::from(1u32 << 20)))
    }

    /// Megabytes (10^6 bytes) per second at the median sample; `None` without samples or with
    /// a zero median.
    pub fn mb_per_s(&self) -> Option<f64> {
        let secs = self.median()?.as_secs_f64();
        (secs > 0.0).then(|| self.bytes as f64 / 1e6 / secs)
    }
}

/// The lower median of `samples`; `None` if empty.
pub fn median(samples: &[Duration]) -> Option<Duration> {
    let mut sorted = samples.to_vec();
    sorted.sort();
    sorted.get(sorted.len().checked_sub(1)? / 2).copied()
}

/// A candidate's figure against its baseline of the same run, and the goal it is held to.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Comparison {
    /// What is compared, in words (`guest->host 64 KiB plain / raw`).
    pub what: String,
    /// The baseline's figure (MB/s).
    pub baseline: f64,
    /// The candidate's figure (MB/s).
    pub candidate: f64,
    /// candidate / baseline.
    pub ratio: f64,
    /// The least ratio the goal accepts.
    pub goal: f64,
    /// Whether the ratio reaches the goal.
    pub met: bool,
}

/// The throughput goal: at least this fraction of the raw port's, both ways, plain and
/// acknowledged, at [`GOAL_WRITE_SIZE`] (issue 13).
pub const THROUGHPUT_GOAL: f64 = 0.95;
/// How soon the host knew of one kind of life-cycle event by one way of knowing: each sample
/// one event, timed on the host from its cause (the request, the connect, the `device_add`).
/// The first figure of an event is the baseline the others of that event are compared with.
#[derive(Debug, Clone, PartialEq)]
pub struct EventLatency {
    /// The event (`guest opens a port`).
    pub event: &'static str,
    /// How the host knew (`QMP VSERPORT_CHANGE`).
    pub by: &'static str,
    /// The latencies.
    pub samples: Vec<Duration>,
    /// Events this way of knowing did not see at all (a state polled too late to catch it).
    pub missed: u32,
}

/// Boot to READY against boot to a raw shell, on one VM (times from QEMU's `cont`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BootFigure {
    /// The VM's vCPUs.
    pub cpus: u32,
    /// To the guest's `/init` saying its virtio modules are loaded: where a raw shell could
    /// use the ports (the baseline).
    pub raw_shell: Duration,
    /// To the first session READY.
    pub first_ready: Duration,
    /// To every port's session READY.
    pub all_ready: Duration,
    /// How many ports.
    pub ports: u32,
    /// Host clients reconnected because their port stayed silent (it missed the connect).
    pub reconnected: u32,
}

/// SOURCE on `ports` ports at once: the aggregate throughput.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PortsFigure {
    /// The VM's vCPUs.
    pub cpus: u32,
    /// Ports moving at once.
    pub ports: u32,
    /// Bytes each port moved.
    pub bytes_per_port: u64,
    /// Wall time of them all.
    pub took: Duration,
}

impl PortsFigure {
    /// MB/s of all the ports together; `None` for a zero time.
    pub fn mb_per_s(&self) -> Option<f64> {
        let secs = self.took.as_secs_f64();
        (secs > 0.0).then(|| (self.bytes_per_port * u64::from(self.ports)) as f64 / 1e6 / secs)
    }
}

/// The write size the throughput goal is stated at; the other sizes are measured and shown
/// as ratios to raw, without a goal.
pub const GOAL_WRITE_SIZE: u32 = 64 << 10;

/// `candidate` against `baseline` (MB/s at their medians): `None` if either has no figure.
pub fn compare(candidate: &Throughput, baseline: &Throughput, goal: f64) -> Option<Comparison> {
    let (c, b) = (candidate.mb_per_s()?, baseline.mb_per_s()?);
    let ratio = c / b;
    Some(Comparison {
        what: format!(
            "{} {} {} / {}",
            candidate.direction.arrow(),
            size_name(u64::from(candidate.write_size)),
            candidate.carrier.name(),
            baseline.carrier.name()
        ),
        baseline: b,
        candidate: c,
        ratio,
        goal,
        met: ratio >= goal,
    })
}

/// Round trips of `size` bytes by one carrier: raw, the host's write echoed by a guest loopback
/// (LOOPBACK) on the raw port; plain, ECHO in a session. Each sample is one round trip, timed on
/// the host, the echo compared with what was sent.
#[derive(Debug, Clone, PartialEq)]
pub struct RoundTrip {
    /// By what ([`Carrier::Raw`] or [`Carrier::Plain`]).
    pub carrier: Carrier,
    /// Bytes each way.
    pub size: u32,
    /// Each round trip, in the order taken.
    pub samples: Vec<Duration>,
}

impl RoundTrip {
    /// The `p`-th percentile (0 < p <= 100), nearest rank: a measured sample; `None` without
    /// samples.
    pub fn percentile(&self, p: f64) -> Option<Duration> {
        percentile(&self.samples, p)
    }
}

/// The nearest-rank `p`-th percentile of `samples` (0 < p <= 100, to a tenth); `None` if
/// empty.
pub fn percentile(samples: &[Duration], p: f64) -> Option<Duration> {
    let mut sorted = samples.to_vec();
    sorted.sort();
    let n = sorted.len();
    // In tenths of a percent, as integers: 99.9% of 1,000 is rank 999, not 1,000 by rounding.
    let per_mille = (p * 10.0).round().clamp(1.0, 1000.0) as usize;
    let rank = (per_mille * n).div_ceil(1000).max(1);
    sorted.get(rank.min(n).checked_sub(1)?).copied()
}

/// The round-trip goal: ECHO's median at most this multiple of the raw loopback's (issue 13).
pub const ROUND_TRIP_GOAL: f64 = 1.1;

/// The agent's own cost while idle, measured over a window: with a READY session and no
/// traffic. `wakeups` and `cpu` are the agent's counters' growth over the window.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct IdleCost {
    /// How long the agent was watched.
    pub window_ms: u64,
    /// Its wakeups over the window (goal: 0).
    pub wakeups: u64,
    /// CPU time it used over the window, ns.
    pub cpu_ns: u64,
    /// Its resident set at the end, KiB (goal: at most 4 MiB).
    pub rss_kib: u64,
    /// Wakeups one STATS request cost the agent, with the ones after its reply (the short
    /// interval's count).
    pub request_wakeups: u64,
}

/// The idle goals: no wakeup, resident set at most this many KiB.
pub const RSS_GOAL_KIB: u64 = 4096;

/// One bench run's figures.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct BenchReport {
    /// The machine and the VM: accelerator, QEMU, guest kernel, host CPU.
    pub environment: Vec<(String, String)>,
    /// Every throughput measured.
    pub throughput: Vec<Throughput>,
    /// Every round trip measured.
    pub round_trips: Vec<RoundTrip>,
    /// Event latencies, grouped by event, each event's baseline first.
    pub events: Vec<EventLatency>,
    /// Boot to READY, per vCPU count.
    pub boots: Vec<BootFigure>,
    /// Aggregate throughput of many ports, per vCPU count and port count.
    pub ports: Vec<PortsFigure>,
    /// The agent idle.
    pub idle: Option<IdleCost>,
    /// Wall time of the run.
    pub elapsed: Duration,
}

impl BenchReport {
    /// The throughput of `carrier` one way at `write_size`, if measured.
    pub fn find(&self, direction: Direction, carrier: Carrier, write_size: u32) -> Option<&Throughput> {
        self.throughput.iter().find(|t| t.direction == direction && t.carrier == carrier && t.write_size == write_size)
    }

    /// Plain and acknowledged against raw at [`GOAL_WRITE_SIZE`], each way, wherever the raw
    /// baseline was measured (vsock, a reference, is not held to the goal).
    pub fn comparisons(&self) -> Vec<Comparison> {
        let mut out = Vec::new();
        let held = |t: &&Throughput| matches!(t.carrier, Carrier::Plain | Carrier::Acked);
        for t in self.throughput.iter().filter(held).filter(|t| t.write_size == GOAL_WRITE_SIZE) {
            if let Some(c) =
                self.find(t.direction, Carrier::Raw, t.write_size).and_then(|raw| compare(t, raw, THROUGHPUT_GOAL))
            {
                out.push(c);
            }
        }
        out
    }

    /// ECHO's median round trip against the raw loopback's of the same size (figures in µs;
    /// met when the ratio is at most [`ROUND_TRIP_GOAL`]).
    pub fn round_trip_comparisons(&self) -> Vec<Comparison> {
        let mut out = Vec::new();
        for t in self.round_trips.iter().filter(|t| t.carrier == Carrier::Plain) {
            let raw = self.round_trips.iter().find(|r| r.carrier == Carrier::Raw && r.size == t.size);
            let (Some(c), Some(b)) = (t.percentile(50.0), raw.and_then(|r| r.percentile(50.0))) else { continue };
            if b.is_zero() {
                continue;
            }
            let ratio = c.as_secs_f64() / b.as_secs_f64();
            out.push(Comparison {
                what: format!("round trip {} echo / raw loopback, p50", size_name(u64::from(t.size))),
                baseline: b.as_secs_f64() * 1e6,
                candidate: c.as_secs_f64() * 1e6,
                ratio,
                goal: ROUND_TRIP_GOAL,
                met: ratio <= ROUND_TRIP_GOAL,
            });
        }
        out
    }

    /// `t`'s median MB/s over raw's of the same direction and write size, if both are known.
    pub fn ratio_to_raw(&self, t: &Throughput) -> Option<f64> {
        let raw = self.find(t.direction, Carrier::Raw, t.write_size)?;
        Some(t.mb_per_s()? / raw.mb_per_s()?)
    }

    /// `t`'s guest instructions per MiB over raw's of the same direction and write size (lower
    /// is cheaper), if both were counted.
    pub fn insns_ratio_to_raw(&self, t: &Throughput) -> Option<f64> {
        let raw = self.find(t.direction, Carrier::Raw, t.write_size)?.insns_per_mib()?;
        (raw > 0.0).then(|| t.insns_per_mib().map(|c| c / raw)).flatten()
    }

    /// `e`'s median over its event's baseline's (the first figure of that event), if both are
    /// known and the baseline's is not zero.
    pub fn event_ratio(&self, e: &EventLatency) -> Option<f64> {
        let base = self.events.iter().find(|b| b.event == e.event)?;
        let (c, b) = (median(&e.samples)?, median(&base.samples)?);
        (!b.is_zero()).then(|| c.as_secs_f64() / b.as_secs_f64())
    }

    /// `f`'s aggregate over one port's on a VM of the same vCPUs, if both are known.
    pub fn ports_ratio(&self, f: &PortsFigure) -> Option<f64> {
        let one = self.ports.iter().find(|o| o.cpus == f.cpus && o.ports == 1)?;
        Some(f.mb_per_s()? / one.mb_per_s()?)
    }

    /// The throughput figures by direction, then write size, then carrier (raw, plain, acked,
    /// vsock).
    pub fn sorted_throughput(&self) -> Vec<&Throughput> {
        let rank = |c: Carrier| match c {
            Carrier::Raw => 0,
            Carrier::Plain => 1,
            Carrier::Acked => 2,
            Carrier::Vsock => 3,
        };
        let mut sorted: Vec<&Throughput> = self.throughput.iter().collect();
        sorted.sort_by_key(|t| (t.direction == Direction::HostToGuest, t.write_size, rank(t.carrier)));
        sorted
    }

    /// The report as one JSON object: the environment, each throughput with its samples (ms)
    /// and median MB/s, the comparisons with their goals, the idle cost.
    pub fn to_json(&self) -> serde_json::Value {
        let throughput: Vec<_> = self
            .throughput
            .iter()
            .map(|t| {
                serde_json::json!({
                    "direction": t.direction,
                    "carrier": t.carrier,
                    "bytes": t.bytes,
                    "write_size": t.write_size,
                    "samples_ms": t.samples.iter().map(|d| d.as_secs_f64() * 1e3).collect::<Vec<_>>(),
                    "median_mb_per_s": t.mb_per_s(),
                    "x_raw": self.ratio_to_raw(t),
                    "agent_cpu_ms": t.agent_cpu.iter().map(|d| d.as_secs_f64() * 1e3).collect::<Vec<_>>(),
                    "agent_busy": t.agent_busy(),
                    "guest_insns": t.guest_insns,
                    "guest_insns_per_mib": t.insns_per_mib(),
                    "guest_insns_x_raw": self.insns_ratio_to_raw(t),
                })
            })
            .collect();
        let us = |d: Option<Duration>| d.map(|d| d.as_secs_f64() * 1e6);
        let round_trips: Vec<_> = self
            .round_trips
            .iter()
            .map(|t| {
                serde_json::json!({
                    "carrier": t.carrier,
                    "size": t.size,
                    "samples": t.samples.len(),
                    "p50_us": us(t.percentile(50.0)),
                    "p99_us": us(t.percentile(99.0)),
                    "p99_9_us": us(t.percentile(99.9)),
                })
            })
            .collect();
        let env: serde_json::Map<_, _> =
            self.environment.iter().map(|(k, v)| (k.clone(), serde_json::Value::from(v.clone()))).collect();
        serde_json::json!({
            "environment": env,
            "throughput": throughput,
            "comparisons": self.comparisons(),
            "round_trips": round_trips,
            "round_trip_comparisons": self.round_trip_comparisons(),
            "events": self.events.iter().map(|e| serde_json::json!({
                "event": e.event,
                "by": e.by,
                "samples_ms": e.samples.iter().map(|d| d.as_secs_f64() * 1e3).collect::<Vec<_>>(),
                "median_ms": median(&e.samples).map(|d| d.as_secs_f64() * 1e3),
                "missed": e.missed,
                "x_baseline": self.event_ratio(e),
            })).collect::<Vec<_>>(),
            "boots": self.boots.iter().map(|b| serde_json::json!({
                "cpus": b.cpus,
                "ports": b.ports,
                "raw_shell_ms": b.raw_shell.as_secs_f64() * 1e3,
                "first_ready_ms": b.first_ready.as_secs_f64() * 1e3,
                "all_ready_ms": b.all_ready.as_secs_f64() * 1e3,
                "reconnected": b.reconnected,
                "first_ready_x_raw_shell": ratio(b.first_ready, b.raw_shell),
            })).collect::<Vec<_>>(),
            "ports": self.ports.iter().map(|f| serde_json::json!({
                "cpus": f.cpus,
                "ports": f.ports,
                "bytes_per_port": f.bytes_per_port,
                "took_ms": f.took.as_secs_f64() * 1e3,
                "mb_per_s": f.mb_per_s(),
                "x_one_port": self.ports_ratio(f),
            })).collect::<Vec<_>>(),
            "idle": self.idle,
            "idle_goals": { "wakeups": 0, "rss_kib_at_most": RSS_GOAL_KIB },
            "elapsed_s": self.elapsed.as_secs_f64(),
        })
    }
}

/// `a / b`; `None` when `b` is zero.
fn ratio(a: Duration, b: Duration) -> Option<f64> {
    (!b.is_zero()).then(|| a.as_secs_f64() / b.as_secs_f64())
}

/// `64 B`, `4 KiB`, `1 MiB`: a size as written in the tables.
pub fn size_name(bytes: u64) -> String {
    match bytes {
        b if b >= 1 << 20 && b % (1 << 20) == 0 => format!("{} MiB", b >> 20),
        b if b >= 1 << 10 && b % (1 << 10) == 0 => format!("{} KiB", b >> 10),
        b => format!("{b} B"),
    }
}

mod text;

#[cfg(test)]
mod tests;
