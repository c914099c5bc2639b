//! The agent's event loop: one mio `Poll` over the signal fd, the uevent socket and every open
//! port.
//!
//! # States of a known port (keyed by its node name, `vportNpM`)
//!
//! ```text
//!            open ok                         ENODEV / gone from sysfs + POLLHUP only
//!  (wanted) ---------> Open{token, Port} ----------------------------------------> (forgotten)
//!     |                   ^        |  unexpected I/O error
//!     | EBUSY             | ok     v
//!     +------------> Busy{back-off} <-+  (retried when its deadline passes: 100 ms .. 5 s)
//!     | other error                   |
//!     +------------> Failed ----------+  (retried on the next uevent naming the port)
//! ```
//!
//! The only timers are the back-off deadlines; with none pending the loop blocks in `epoll_wait`
//! with no timeout, so an idle agent makes zero wakeups. Every return from `poll` is counted.

use crate::discovery::{list_sysfs, select, PortSpec, Selector, Wanted};
use crate::port::{AgentInfo, Env, Health, Port, PortIo, SystemEnv};
use crate::uevent::{Action, UeventError, UeventSocket};
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};
use nix::errno::Errno;
use nix::fcntl::{open, OFlag};
use nix::poll::{PollFd, PollFlags, PollTimeout};
use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::stat::Mode;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::PathBuf;
use std::rc::Rc;
use std::time::{Duration, Instant};
use thiserror::Error;

const SIGNAL: Token = Token(0);
const UEVENT: Token = Token(1);
const FIRST_PORT_TOKEN: usize = 2;

/// First EBUSY back-off.
pub const BACKOFF_MIN: Duration = Duration::from_millis(100);
/// Longest EBUSY back-off.
pub const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// Where to look and what to serve.
#[derive(Debug, Clone)]
pub struct Config {
    /// Which ports.
    pub selector: Selector,
    /// sysfs mount point (`/sys`).
    pub sysfs_root: PathBuf,
    /// Device directory (`/dev`).
    pub dev_root: PathBuf,
}

/// Failures that stop the agent.
#[derive(Debug, Error)]
pub enum LoopError {
    /// Blocking the termination signals or creating the signalfd failed.
    #[error("cannot set up signal handling")]
    Signals(#[source] Errno),
    /// The uevent socket failed.
    #[error(transparent)]
    Uevent(#[from] UeventError),
    /// epoll failed.
    #[error("cannot {op} the event loop's epoll instance")]
    Poll {
        /// What failed.
        op: &'static str,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

/// Loop-wide counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Returns from `poll` (including timeouts).
    pub wakeups: u64,
    /// uevent messages received.
    pub uevents: u64,
    /// sysfs rescans.
    pub rescans: u64,
    /// EBUSY on open (each schedules a back-off).
    pub busy_retries: u64,
    /// Other open failures.
    pub open_failures: u64,
    /// Ports opened.
    pub opens: u64,
    /// Ports forgotten after an unplug.
    pub unplugs: u64,
    /// Ports closed after an unexpected I/O error.
    pub io_errors: u64,
}

/// The real port I/O: the fd of `/dev/vportNpM`.
#[derive(Debug)]
pub struct FdIo {
    fd: OwnedFd,
}

impl PortIo for FdIo {
    fn read(&mut self, buf: &mut [u8]) -> Result<usize, Errno> {
        nix::unistd::read(&self.fd, buf)
    }
    fn write(&mut self, buf: &[u8]) -> Result<usize, Errno> {
        nix::unistd::write(&self.fd, buf)
    }
    fn poll_mask(&mut self) -> Result<PollFlags, Errno> {
        let mut fds = [PollFd::new(self.fd.as_fd(), PollFlags::POLLIN | PollFlags::POLLOUT)];
        nix::poll::poll(&mut fds, PollTimeout::ZERO)?;
        Ok(fds[0].revents().unwrap_or(PollFlags::empty()))
    }
}

/// The next EBUSY back-off after `prev`: 100 ms, doubling, capped at 5 s.
pub fn next_backoff(prev: Option<Duration>) -> Duration {
    match prev {
        None => BACKOFF_MIN,
        Some(d) => (d * 2).clamp(BACKOFF_MIN, BACKOFF_MAX),
    }
}

/// The poll timeout for the earliest of `deadlines`: `None` (block forever) when there is none.
pub fn poll_timeout(now: Instant, deadlines: impl Iterator<Item = Instant>) -> Option<Duration> {
    deadlines.min().map(|d| d.saturating_duration_since(now))
}

#[derive(Debug)]
enum Slot {
    Open { token: Token, port: Box<Port<FdIo>> },
    Busy { name: String, delay: Duration, deadline: Instant },
    Failed { name: String },
}

/// The agent.
pub struct EventLoop {
    config: Config,
    info: Rc<AgentInfo>,
    env: SystemEnv,
    poll: Poll,
    signals: SignalFd,
    uevents: UeventSocket,
    ports: BTreeMap<String, Slot>,
    tokens: HashMap<Token, String>,
    next_token: usize,
    waiting_logged: HashSet<PortSpec>,
    stats: Stats,
}

/// `err` and its sources, joined with ": ".
pub fn chain(err: &dyn std::error::Error) -> String {
    let mut s = err.to_string();
    let mut cur = err.source();
    while let Some(e) = cur {
        s.push_str(": ");
        s.push_str(&e.to_string());
        cur = e.source();
    }
    s
}

impl EventLoop {
    /// Blocks SIGTERM/SIGINT/SIGUSR1 into a signalfd and subscribes to uevents (before any
    /// sysfs scan, so no event falls between the scan and the subscription).
    pub fn new(config: Config, info: AgentInfo) -> Result<EventLoop, LoopError> {
        let mut mask = SigSet::empty();
        for s in [Signal::SIGTERM, Signal::SIGINT, Signal::SIGUSR1] {
            mask.add(s);
        }
        // The agent is single-threaded, so blocking in this thread blocks for the process.
        mask.thread_block().map_err(LoopError::Signals)?;
        let signals =
            SignalFd::with_flags(&mask, SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC).map_err(LoopError::Signals)?;
        let uevents = UeventSocket::open()?;
        let poll = Poll::new().map_err(|source| LoopError::Poll { op: "create", source })?;
        let registry = poll.registry();
        registry
            .register(&mut SourceFd(&signals.as_fd().as_raw_fd()), SIGNAL, Interest::READABLE)
            .map_err(|source| LoopError::Poll { op: "register the signal fd with", source })?;
        registry
            .register(&mut SourceFd(&uevents.raw_fd()), UEVENT, Interest::READABLE)
            .map_err(|source| LoopError::Poll { op: "register the uevent socket with", source })?;
        Ok(EventLoop {
            config,
            info: Rc::new(info),
            env: SystemEnv,
            poll,
            signals,
            uevents,
            ports: BTreeMap::new(),
            tokens: HashMap::new(),
            next_token: FIRST_PORT_TOKEN,
            waiting_logged: HashSet::new(),
            stats: Stats::default(),
        })
    }

    /// Loop counters.
    pub fn stats(&self) -> Stats {
        self.stats
    }

    /// Runs until SIGTERM or SIGINT.
    pub fn run(&mut self) -> Result<(), LoopError> {
        self.rescan(&HashSet::new(), false);
        let mut events = Events::with_capacity(64);
        loop {
            let now = Instant::now();
            let timeout = poll_timeout(
                now,
                self.ports.values().filter_map(|s| match s {
                    Slot::Busy { deadline, .. } => Some(*deadline),
                    _ => None,
                }),
            );
            let res = self.poll.poll(&mut events, timeout);
            self.stats.wakeups += 1;
            match res {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(source) => return Err(LoopError::Poll { op: "wait on", source }),
            }
            let tokens: Vec<Token> = events.iter().map(|e| e.token()).collect();
            for token in tokens {
                match token {
                    SIGNAL => {
                        if let Some(sig) = self.handle_signals() {
                            self.shutdown(sig);
                            return Ok(());
                        }
                    }
                    UEVENT => self.handle_uevents(),
                    t => {
                        if let Some(dev) = self.tokens.get(&t).cloned() {
                            self.service(&dev);
                        }
                    }
                }
            }
            self.retry_due(Instant::now());
        }
    }

    /// Reads pending signals; returns the terminating one, if any.
    fn handle_signals(&mut self) -> Option<Signal> {
        let mut term = None;
        loop {
            match self.signals.read_signal() {
                Ok(Some(info)) => match Signal::try_from(info.ssi_signo as i32) {
                    Ok(Signal::SIGUSR1) => self.dump_status(),
                    Ok(s) => term = Some(s),
                    Err(_) => {}
                },
                Ok(None) => return term,
                Err(Errno::EINTR) => {}
                Err(e) => {
                    log::error!("reading the signal fd failed: {e}");
                    return term;
                }
            }
        }
    }

    fn handle_uevents(&mut self) {
        let drained = match self.uevents.drain() {
            Ok(d) => d,
            Err(e) => {
                log::error!("{}", chain(&e));
                return;
            }
        };
        self.stats.uevents += drained.messages;
        if drained.overflowed {
            log::warn!("uevent socket overflowed: events lost, rescanning everything");
        }
        if drained.port_events.is_empty() && !drained.overflowed {
            return;
        }
        let mut touched = HashSet::new();
        for ev in &drained.port_events {
            log::debug!("uevent {:?} {} ({})", ev.action, ev.node(), ev.devpath);
            if matches!(ev.action, Action::Add | Action::Change | Action::Remove) {
                touched.insert(ev.node().to_owned());
            }
        }
        self.rescan(&touched, drained.overflowed);
    }

    /// Reconciles the open ports with sysfs. `touched` are nodes named by uevents since the
    /// last scan (failed opens of these are retried; all are if `everything`).
    fn rescan(&mut self, touched: &HashSet<String>, everything: bool) {
        self.stats.rescans += 1;
        let listing = match list_sysfs(&self.config.sysfs_root) {
            Ok(l) => l,
            Err(e) => {
                log::error!("{}", chain(&e));
                return;
            }
        };
        let selection = select(&listing, &self.config.selector);
        let present: HashSet<&str> = listing.iter().map(|p| p.dev.as_str()).collect();

        // Ports that left sysfs (or got a remove uevent): unplugged if the fd says so.
        let gone: Vec<String> =
            self.ports.keys().filter(|d| !present.contains(d.as_str()) || touched.contains(*d)).cloned().collect();
        for dev in gone {
            let listed = present.contains(dev.as_str());
            match self.ports.get(&dev) {
                Some(Slot::Open { .. }) => {
                    // ENODEV on read/write closes it here; so does an I/O error.
                    self.service(&dev);
                    if let Some(Slot::Open { port, .. }) = self.ports.get_mut(&dev) {
                        if !listed && port.looks_unplugged().unwrap_or(true) {
                            self.close(&dev, "unplugged");
                        }
                    }
                }
                Some(_) if !listed => {
                    self.ports.remove(&dev);
                }
                _ => {}
            }
        }

        for w in &selection.wanted {
            let retry = match self.ports.get(&w.dev) {
                None => true,
                Some(Slot::Failed { .. }) => everything || touched.contains(&w.dev),
                Some(Slot::Open { .. } | Slot::Busy { .. }) => false,
            };
            if retry {
                self.try_open(w, None);
            }
        }

        let missing: HashSet<PortSpec> = selection.missing.iter().cloned().collect();
        for spec in &selection.missing {
            if self.waiting_logged.insert(spec.clone()) {
                log::info!("port {spec} is not present: waiting for it to be plugged");
            }
        }
        self.waiting_logged.retain(|s| missing.contains(s));
    }

    fn try_open(&mut self, w: &Wanted, prev_delay: Option<Duration>) {
        let path = self.config.dev_root.join(&w.dev);
        let fd = match open(&path, OFlag::O_RDWR | OFlag::O_NONBLOCK | OFlag::O_CLOEXEC, Mode::empty()) {
            Ok(fd) => fd,
            Err(Errno::EBUSY) => {
                let delay = next_backoff(prev_delay);
                self.stats.busy_retries += 1;
                log::warn!(
                    "port {}: {} is busy (open elsewhere); retrying in {} ms",
                    w.name,
                    path.display(),
                    delay.as_millis()
                );
                let deadline = Instant::now() + delay;
                self.ports.insert(w.dev.clone(), Slot::Busy { name: w.name.clone(), delay, deadline });
                return;
            }
            Err(e) => {
                self.stats.open_failures += 1;
                log::warn!("port {}: cannot open {}: {e}; waiting for a uevent", w.name, path.display());
                self.ports.insert(w.dev.clone(), Slot::Failed { name: w.name.clone() });
                return;
            }
        };
        let token = Token(self.next_token);
        self.next_token += 1;
        let raw = fd.as_raw_fd();
        if let Err(e) =
            self.poll.registry().register(&mut SourceFd(&raw), token, Interest::READABLE | Interest::WRITABLE)
        {
            self.stats.open_failures += 1;
            log::error!("port {}: cannot register {} with epoll: {e}", w.name, path.display());
            self.ports.insert(w.dev.clone(), Slot::Failed { name: w.name.clone() });
            return;
        }
        self.stats.opens += 1;
        log::info!("port {}: opened {}", w.name, path.display());
        let port = Port::new(w.name.clone(), w.dev.clone(), FdIo { fd }, Rc::clone(&self.info));
        self.tokens.insert(token, w.dev.clone());
        self.ports.insert(w.dev.clone(), Slot::Open { token, port: Box::new(port) });
        self.service(&w.dev);
    }

    fn service(&mut self, dev: &str) {
        let Some(Slot::Open { port, .. }) = self.ports.get_mut(dev) else { return };
        match port.service(&mut self.env) {
            Ok(Health::Open) => {}
            Ok(Health::Unplugged) => self.close(dev, "unplugged"),
            Err(e) => {
                self.stats.io_errors += 1;
                log::error!("{}; closing it and retrying", chain(&e));
                let name = port.name().to_owned();
                self.close(dev, "i/o error");
                let delay = next_backoff(None);
                let deadline = Instant::now() + delay;
                self.ports.insert(dev.to_owned(), Slot::Busy { name, delay, deadline });
            }
        }
    }

    /// Deregisters, closes and forgets an open port.
    fn close(&mut self, dev: &str, cause: &'static str) {
        let Some(Slot::Open { token, mut port }) = self.ports.remove(dev) else { return };
        self.tokens.remove(&token);
        let raw = port.io().fd.as_raw_fd();
        if let Err(e) = self.poll.registry().deregister(&mut SourceFd(&raw)) {
            log::debug!("port {}: deregister: {e}", port.name());
        }
        port.close(&mut self.env, cause);
        if cause == "unplugged" {
            self.stats.unplugs += 1;
        }
        log::info!("port {} ({}): closed ({cause}); {:?}", port.name(), port.dev(), port.counters());
    }

    fn retry_due(&mut self, now: Instant) {
        let due: Vec<(String, String, Duration)> = self
            .ports
            .iter()
            .filter_map(|(dev, s)| match s {
                Slot::Busy { name, delay, deadline } if *deadline <= now => Some((dev.clone(), name.clone(), *delay)),
                _ => None,
            })
            .collect();
        for (dev, name, delay) in due {
            self.ports.remove(&dev);
            self.try_open(&Wanted { dev, name }, Some(delay));
        }
    }

    fn dump_status(&mut self) {
        log::info!("status: {:?}", self.stats);
        for (dev, slot) in &self.ports {
            match slot {
                Slot::Open { port, .. } => log::info!(
                    "port {} ({dev}): {} queued={} history={} {:?} {:?}",
                    port.name(),
                    port.state().name(),
                    port.queued(),
                    port.history().len(),
                    port.counters(),
                    port.decoder_stats()
                ),
                Slot::Busy { name, delay, .. } => log::info!("port {name} ({dev}): busy, back-off {delay:?}"),
                Slot::Failed { name } => log::info!("port {name} ({dev}): open failed, waiting for a uevent"),
            }
        }
    }

    fn shutdown(&mut self, sig: Signal) {
        let devs: Vec<String> = self.ports.keys().cloned().collect();
        for dev in devs {
            self.close(&dev, "agent exiting");
        }
        let now = self.env.now_ns();
        log::info!("exiting on {sig} at {now} ns: {:?}", self.stats);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_from_100ms_to_5s() {
        let mut d = None;
        let mut seen = vec![];
        for _ in 0..9 {
            let n = next_backoff(d);
            seen.push(n.as_millis());
            d = Some(n);
        }
        assert_eq!(seen, vec![100, 200, 400, 800, 1600, 3200, 5000, 5000, 5000]);
    }

    #[test]
    fn timeout_is_none_without_deadlines_and_the_earliest_otherwise() {
        let now = Instant::now();
        assert_eq!(poll_timeout(now, std::iter::empty()), None);
        let ds = [now + Duration::from_millis(300), now + Duration::from_millis(100)];
        assert_eq!(poll_timeout(now, ds.into_iter()), Some(Duration::from_millis(100)));
        assert_eq!(poll_timeout(now, std::iter::once(now - Duration::from_millis(5))), Some(Duration::ZERO));
    }

    #[test]
    fn error_chain_is_joined() {
        let e = crate::port::PortError { port: "p".into(), op: "read", source: Errno::EIO };
        assert_eq!(chain(&e), "port p: read failed: EIO: I/O error");
    }
}
