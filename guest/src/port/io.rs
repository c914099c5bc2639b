//! What the port logic needs from the world, as traits: [`PortIo`] (the port's fd) and [`Env`]
//! (clock, randomness, agent-wide facts), with [`SystemEnv`], the real environment. The real
//! [`PortIo`] is [`crate::fdio::FdIo`]; the unit tests and the fuzz target use scripted fakes.

use nix::errno::Errno;
use nix::poll::PollFlags;
use vport_common::message::{ProbeKind, ProbeTarget};

/// The operations the port logic needs from a port's fd.
pub trait PortIo {
    /// `read(2)`.
    fn read(&mut self, buf: &mut [u8]) -> Result<usize, Errno>;
    /// `write(2)`.
    fn write(&mut self, buf: &[u8]) -> Result<usize, Errno>;
    /// The current `poll(2)` mask (timeout 0).
    fn poll_mask(&mut self) -> Result<PollFlags, Errno>;
    /// Runs one PROBE system call (see [`ProbeKind`] and [`ProbeTarget`]) and reports its raw
    /// result; never fails: an errno is part of the result.
    fn probe(&mut self, kind: ProbeKind, target: ProbeTarget, arg: u32) -> ProbeOutcome;
    /// Starts (`F_SETOWN` + `F_SETSIG` + `O_ASYNC`) or stops (clears `O_ASYNC`) SIGIO delivery
    /// for the fd.
    fn set_async(&mut self, on: bool) -> Result<(), Errno>;
}

/// The raw result of a PROBE system call.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ProbeOutcome {
    /// The call's return value (-1 on failure).
    pub ret: i64,
    /// errno when `ret == -1`, else 0.
    pub errno: i32,
    /// `revents` for a poll probe, else 0.
    pub mask: u16,
    /// Bytes a read probe returned.
    pub data: Vec<u8>,
}

impl ProbeOutcome {
    /// A failed call.
    pub fn failed(errno: Errno) -> Self {
        ProbeOutcome { ret: -1, errno: errno as i32, ..Default::default() }
    }
}

/// Clock, randomness and the agent-wide facts a port reports.
pub trait Env {
    /// Monotonic nanoseconds.
    fn now_ns(&mut self) -> u64;
    /// A random u64.
    fn random_u64(&mut self) -> u64;
    /// The agent's wakeup counter (returns from `epoll_wait`).
    fn wakeups(&mut self) -> u64;
    /// The agent's CPU time (user + system), nanoseconds.
    fn cpu_ns(&mut self) -> u64;
    /// Agent-wide STATS entries (see [`super::Port::stats`] for the names).
    fn agent_stats(&mut self) -> Vec<(&'static str, u64)>;
}

/// The real clock and random source, and the agent-wide counters the event loop keeps.
#[derive(Debug, Clone, Copy)]
pub struct SystemEnv {
    /// Returns from `epoll_wait` (the loop increments it).
    pub wakeups: u64,
    /// EBUSY results of opening any port.
    pub ebusy_total: u64,
    /// Ports currently open.
    pub ports_open: u64,
    /// Plain SIGIO signals received: the real-time signal queue overflowed.
    pub sigio_overflows: u64,
    /// Open ports found with data pending that epoll had not reported (see the event loop).
    pub missed_wakeups: u64,
    /// Whether GUEST_OP requests are served (`--allow-guest-ops`).
    pub guest_ops_allowed: bool,
    /// Monotonic time the agent started.
    pub started_ns: u64,
}

impl SystemEnv {
    /// Counters at zero, started now.
    pub fn new() -> Self {
        SystemEnv {
            wakeups: 0,
            ebusy_total: 0,
            ports_open: 0,
            sigio_overflows: 0,
            missed_wakeups: 0,
            guest_ops_allowed: false,
            started_ns: crate::sys::monotonic_ns(),
        }
    }
}

impl Default for SystemEnv {
    fn default() -> Self {
        Self::new()
    }
}

impl Env for SystemEnv {
    fn now_ns(&mut self) -> u64 {
        crate::sys::monotonic_ns()
    }
    fn random_u64(&mut self) -> u64 {
        crate::sys::random_u64()
    }
    fn wakeups(&mut self) -> u64 {
        self.wakeups
    }
    fn cpu_ns(&mut self) -> u64 {
        crate::sys::cpu_ns()
    }
    fn agent_stats(&mut self) -> Vec<(&'static str, u64)> {
        vec![
            ("wakeups", self.wakeups),
            ("ebusy_total", self.ebusy_total),
            ("rss_kib", crate::sys::rss_kib()),
            ("open_fds", crate::sys::open_fds()),
            ("uptime_ns", crate::sys::monotonic_ns().saturating_sub(self.started_ns)),
            ("cpu_ns", crate::sys::cpu_ns()),
            ("ports_open", self.ports_open),
            ("pid", u64::from(std::process::id())),
            ("sigio_overflows", self.sigio_overflows),
            ("missed_wakeups", self.missed_wakeups),
            ("euid", u64::from(nix::unistd::geteuid().as_raw())),
            ("egid", u64::from(nix::unistd::getegid().as_raw())),
            ("guest_ops_allowed", u64::from(self.guest_ops_allowed)),
        ]
    }
}
