//! What a bench is asked for ([`BenchSize`], [`BenchOptions`]) and why it can fail
//! ([`BenchError`]).

use crate::image::GuestImage;
use crate::qemu::AccelChoice;
use crate::session::SessionError;
use crate::stream::TransferError;
use std::time::Duration;
use thiserror::Error;

/// How much a bench measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BenchSize {
    /// Bytes each throughput sample moves.
    pub bytes: u64,
    /// Rounds: samples of each figure.
    pub rounds: u32,
    /// How long the agent is watched idle.
    pub idle_window: Duration,
    /// Round trips of each size by each carrier.
    pub round_trips: u32,
    /// The other write sizes raw and plain are measured at, both ways (the sweep).
    pub sweep: &'static [u32],
    /// Bytes each sweep sample moves: this many writes, at most `bytes`.
    pub sweep_writes: u64,
    /// Samples of each sweep figure.
    pub sweep_rounds: u32,
    /// Samples of each event latency.
    pub events: u32,
    /// Samples of the pause bug (each stops and resumes the VM; the last phase on its VM).
    pub pauses: u32,
    /// vCPU counts of the many-ports VMs (none: not measured).
    pub ports_cpus: &'static [u32],
    /// How many ports move at once, in turn.
    pub ports_counts: &'static [usize],
    /// Bytes each port moves.
    pub ports_bytes: u64,
}

impl BenchSize {
    /// Bytes a sweep sample at `write_size` moves.
    pub fn sweep_bytes(&self, write_size: u32) -> u64 {
        (u64::from(write_size) * self.sweep_writes).min(self.bytes)
    }
}

impl BenchSize {
    /// `--quick` (scripts/test): 8 MiB, 3 rounds, 300 round trips, 2 s idle; the sweep at
    /// 64 B, 4 KiB and 1 MiB, one sample each of at most 2,048 writes; 3 samples of each
    /// event; 4 MiB a port on the many-ports VMs.
    pub const QUICK: BenchSize = BenchSize {
        bytes: 8 << 20,
        rounds: 3,
        idle_window: Duration::from_secs(2),
        round_trips: 300,
        sweep: &[64, 4 << 10, 1 << 20],
        sweep_writes: 2048,
        sweep_rounds: 1,
        events: 3,
        pauses: 2,
        ports_cpus: &[1, 2],
        ports_counts: &[1, 4, 16, 31],
        ports_bytes: 4 << 20,
    };
    /// The full set: 64 MiB, 5 rounds, 2,000 round trips, 10 s idle; the sweep from 64 B to
    /// 1 MiB, three samples each of at most 8,192 writes (16 MiB); 10 samples of each event;
    /// 16 MiB a port on the many-ports VMs.
    pub const FULL: BenchSize = BenchSize {
        bytes: 64 << 20,
        rounds: 5,
        idle_window: Duration::from_secs(10),
        round_trips: 2000,
        sweep: &[64, 512, 4 << 10, 32 << 10, 256 << 10, 1 << 20],
        sweep_writes: 8192,
        sweep_rounds: 3,
        events: 10,
        pauses: 5,
        ports_cpus: &[1, 2],
        ports_counts: &[1, 4, 16, 31],
        ports_bytes: 16 << 20,
    };
}

/// How the bench runs.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// The guest image.
    pub image: GuestImage,
    /// Accelerator.
    pub accel: AccelChoice,
    /// Which QEMU, machine type and vCPU count the VMs run on.
    pub platform: crate::qemu::Platform,
    /// What to measure.
    pub size: BenchSize,
}

/// Why a bench did not produce its figures.
#[derive(Debug, Error)]
pub enum BenchError {
    /// The VM could not be set up (the infrastructure's failure, not a figure).
    #[error("cannot set up the bench's vm: {0}")]
    Setup(String),
    /// Bytes moved but not as sent (a wrong digest, a short count): vport or the VM is wrong.
    #[error("integrity: {0}")]
    Integrity(String),
    /// A guest operation did not do what it was asked.
    #[error("guest: {what}: {detail}")]
    Guest {
        /// What was asked.
        what: String,
        /// What the agent answered.
        detail: String,
    },
    /// A session failed (the agent went away, a reply did not come).
    #[error(transparent)]
    Session(#[from] SessionError),
    /// An acknowledged stream failed.
    #[error(transparent)]
    Transfer(#[from] TransferError),
    /// A host-side i/o call failed.
    #[error("cannot {what}: {source}")]
    Io {
        /// What was done.
        what: &'static str,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
}

impl BenchError {
    pub(crate) fn io(what: &'static str, source: std::io::Error) -> BenchError {
        BenchError::Io { what, source }
    }

    /// Whether the error is the machine's or the VM's setup (exit 3), not a wrong result.
    pub fn is_infrastructure(&self) -> bool {
        matches!(self, BenchError::Setup(_) | BenchError::Io { .. })
    }
}
