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
//!     | EACCES / EPERM                |
//!     +------------> Denied ----------+  (retried when inotify reports a change of the node's
//!     |                               |   mode or owner: no wakeup until then)
//!     | other error                   |
//!     +------------> Failed ----------+  (retried on the next uevent naming the port)
//! ```
//!
//! An open port whose service call stopped at its write or read budget (`Health::MoreWork`) is
//! served again on the next turn of the loop without waiting in `epoll_wait`, after the other
//! ports' events: a long stream or a flood of input on one port never starves another port,
//! and a stream never starves its own port's input.
//!
//! A CLOSE/REOPEN command moves an open port through `Closing` (its BYE is flushed on writable
//! edges, for at most [`BYE_FLUSH_BOUND`]; then it is closed anyway and the timeout counted) to
//! `Reopen{deadline}`, opened again when the deadline passes. A port's counters and life-cycle
//! ring are kept by name across closes, unplugs and replugs ([`crate::port::Carry`]).
//!
//! Console ports (`/dev/hvcN`, named explicitly) are opened at start in raw mode and served with
//! the same protocol; they are not discovered and never rescanned. An hvc port always looks
//! host-connected, so a session is offered as soon as it is open.
//!
//! The only timers are the back-off deadlines, BYE flush bounds, reopen delays and the
//! lost-wakeup re-checks ([`RECHECK_STEPS`](crate::recheck::RECHECK_STEPS), armed only after traffic in a session); with none
//! pending the loop blocks in `epoll_wait` with no timeout, so an idle agent makes zero wakeups.
//! Every return from `poll` is counted.
//!
//! # Lost wakeups
//!
//! On the Debian 6.1 guest kernel under TCG, data sometimes sits on a port (poll(2) reports
//! POLLIN) without the edge-triggered epoll ever reporting it: a reply the host sent right
//! after the agent wrote waited until the next data arrived (`docs/conformance.md`). Two
//! guards: every wakeup looks at the ports epoll did not report, and a port that moved bytes in
//! a session is looked at again after [`RECHECK_STEPS`](crate::recheck::RECHECK_STEPS). A port found with input pending is
//! confirmed with a zero-timeout `epoll_wait` (its event may be just late), then counted in
//! STATS `missed_wakeups`, logged and served.

use crate::discovery::{list_sysfs, select, PortSpec, Selector, Wanted};
use crate::fdio::FdIo;
use crate::guest_ops::{GuestOps, GuestOpsError, Owner, Submitted};
pub use crate::log::chain;
use crate::permwatch::PermWatch;
use crate::port::{AgentInfo, Carry, Env, Health, Port, SystemEnv};
use crate::recheck::Rechecks;
use crate::settings::Settings;
use crate::uevent::{Action, UeventError, UeventSocket};
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};
use nix::errno::Errno;
use nix::sys::signal::Signal;
use nix::sys::signalfd::{SfdFlags, SignalFd};
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::os::fd::{AsFd, AsRawFd};
use std::path::PathBuf;
use std::rc::Rc;
use std::time::{Duration, Instant};
use thiserror::Error;
use vport_common::message::NO_REOPEN;

const SIGNAL: Token = Token(0);
const UEVENT: Token = Token(1);
/// The inotify fd watching nodes that were not accessible.
const PERMS: Token = Token(2);
/// Guest-op workers wake the loop with this token.
const WAKER: Token = Token(usize::MAX);
const FIRST_PORT_TOKEN: usize = 3;

/// First EBUSY back-off.
pub const BACKOFF_MIN: Duration = Duration::from_millis(100);
/// Longest EBUSY back-off.
pub const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// How long a BYE may take to be written before the port is closed anyway.
pub const BYE_FLUSH_BOUND: Duration = Duration::from_secs(1);

/// Where to look and what to serve.
#[derive(Debug, Clone)]
pub struct Config {
    /// Which ports.
    pub selector: Selector,
    /// sysfs mount point (`/sys`).
    pub sysfs_root: PathBuf,
    /// Device directory (`/dev`).
    pub dev_root: PathBuf,
    /// Console ports (`/dev/hvcN`) to serve in raw mode.
    pub consoles: Vec<PathBuf>,
    /// What hosts may make the agent do, and the bounds.
    pub settings: Settings,
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
    /// A console port named on the command line cannot be served.
    #[error("cannot serve console {path}")]
    Console {
        /// The console.
        path: PathBuf,
        /// The cause.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// Guest operations could not be set up.
    #[error(transparent)]
    GuestOps(#[from] GuestOpsError),
    /// The inotify instance could not be made.
    #[error("cannot create the inotify instance that watches port permissions")]
    Inotify(#[source] Errno),
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
    Open {
        token: Token,
        port: Box<Port<FdIo>>,
    },
    Busy {
        name: String,
        delay: Duration,
        deadline: Instant,
    },
    Failed {
        name: String,
    },
    /// Open failed with EACCES/EPERM; its node is watched ([`PermWatch`]).
    Denied {
        name: String,
    },
    /// Closed by a CLOSE/REOPEN command; opened again at `deadline`.
    Reopen {
        name: String,
        deadline: Instant,
    },
}

/// The agent.
pub struct EventLoop {
    config: Config,
    info: Rc<AgentInfo>,
    settings: Rc<Settings>,
    env: SystemEnv,
    poll: Poll,
    signals: SignalFd,
    uevents: UeventSocket,
    ports: BTreeMap<String, Slot>,
    tokens: HashMap<Token, String>,
    next_token: usize,
    waiting_logged: HashSet<PortSpec>,
    stats: Stats,
    /// Counters and rings of ports that are not open now, by port name.
    carry: HashMap<String, Carry>,
    /// Open ports flushing a BYE before a commanded close: node -> flush deadline.
    closing: HashMap<String, Instant>,
    /// Node names of console ports (never rescanned).
    consoles: HashSet<String>,
    /// Guest operations on ports the agent does not serve (GUEST_OP).
    guest_ops: GuestOps,
    /// Lost-wakeup re-checks ([`RECHECK_STEPS`](crate::recheck::RECHECK_STEPS)).
    rechecks: Rechecks,
    /// Nodes of ports that were not accessible, watched for a permission change.
    perms: PermWatch,
    /// Open ports that stopped at their write or read budget: served again on the next turn.
    more_work: BTreeSet<String>,
}

impl EventLoop {
    /// Blocks SIGTERM/SIGINT/SIGUSR1, SIGIO and the SIGIO real-time signal
    /// ([`crate::sigio`]) into a signalfd and subscribes to uevents (before any
    /// sysfs scan, so no event falls between the scan and the subscription).
    pub fn new(config: Config, info: AgentInfo) -> Result<EventLoop, LoopError> {
        let mask = crate::sigio::agent_signals();
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
        let perms = PermWatch::new().map_err(LoopError::Inotify)?;
        registry
            .register(&mut SourceFd(&perms.raw_fd()), PERMS, Interest::READABLE)
            .map_err(|source| LoopError::Poll { op: "register the inotify fd with", source })?;
        let waker = mio::Waker::new(registry, WAKER)
            .map_err(|source| LoopError::Poll { op: "register the guest-op waker with", source })?;
        let guest_ops = GuestOps::new(
            std::sync::Arc::new(waker),
            config.sysfs_root.clone(),
            config.dev_root.clone(),
            config.settings.limits,
        )?;
        let mut env = SystemEnv::new();
        env.guest_ops_allowed = config.settings.allow_guest_ops;
        Ok(EventLoop {
            settings: Rc::new(config.settings),
            config,
            info: Rc::new(info),
            env,
            poll,
            signals,
            uevents,
            ports: BTreeMap::new(),
            tokens: HashMap::new(),
            next_token: FIRST_PORT_TOKEN,
            waiting_logged: HashSet::new(),
            stats: Stats::default(),
            carry: HashMap::new(),
            closing: HashMap::new(),
            consoles: HashSet::new(),
            guest_ops,
            rechecks: Rechecks::default(),
            perms,
            more_work: BTreeSet::new(),
        })
    }

    /// Loop counters.
    pub fn stats(&self) -> Stats {
        self.stats
    }

    /// Runs until SIGTERM or SIGINT.
    pub fn run(&mut self) -> Result<(), LoopError> {
        for path in self.config.consoles.clone() {
            self.open_console(&path)?;
        }
        self.rescan(&HashSet::new(), false);
        let mut events = Events::with_capacity(64);
        loop {
            let now = Instant::now();
            let timeout = poll_timeout(
                now,
                self.ports
                    .values()
                    .filter_map(|s| match s {
                        Slot::Busy { deadline, .. } | Slot::Reopen { deadline, .. } => Some(*deadline),
                        _ => None,
                    })
                    .chain(self.closing.values().copied())
                    .chain(self.rechecks.next_deadline())
                    // Ports with work left: look at events, then serve them again at once.
                    .chain((!self.more_work.is_empty()).then_some(now)),
            );
            let res = self.poll.poll(&mut events, timeout);
            self.stats.wakeups += 1;
            self.env.wakeups += 1;
            match res {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(source) => return Err(LoopError::Poll { op: "wait on", source }),
            }
            let mut tokens: Vec<Token> = events.iter().map(|e| e.token()).collect();
            log::trace!(
                "wakeup: {:?}",
                events.iter().map(|e| (e.token().0, e.is_readable(), e.is_writable())).collect::<Vec<_>>()
            );
            self.add_missed_wakeups(&mut tokens, &mut events, Instant::now())?;
            for token in tokens {
                match token {
                    SIGNAL => {
                        if let Some(sig) = self.handle_signals() {
                            self.shutdown(sig);
                            return Ok(());
                        }
                    }
                    UEVENT => self.handle_uevents(),
                    PERMS => self.handle_permission_changes(),
                    WAKER => self.deliver_guest_op_completions(),
                    t => {
                        if let Some(dev) = self.tokens.get(&t).cloned() {
                            self.service(&dev);
                        }
                    }
                }
            }
            for dev in std::mem::take(&mut self.more_work) {
                self.service(&dev);
            }
            self.retry_due(Instant::now());
        }
    }

    /// Tries again the ports whose node's mode or owner changed while they were Denied.
    fn handle_permission_changes(&mut self) {
        for dev in self.perms.drain() {
            if let Some(Slot::Denied { name }) = self.ports.get(&dev) {
                let w = Wanted { dev: dev.clone(), name: name.clone() };
                log::info!("port {}: its node's permissions changed; opening it again", w.name);
                self.ports.remove(&dev);
                self.try_open(&w, None);
            }
        }
    }

    /// Finds the open ports epoll did not report in `tokens` that have input pending and
    /// wanted (POLLIN, host connected, not paused): all of them on any wakeup, so this costs no
    /// wakeup of its own; the due lost-wakeup re-checks ([`RECHECK_STEPS`](crate::recheck::RECHECK_STEPS)) are what wake the
    /// loop when nothing else does. Each candidate is confirmed with a zero-timeout
    /// `epoll_wait` (an event may be just late); a port still unreported then had its wakeup
    /// lost: it is counted (STATS `missed_wakeups`), logged, and added to `tokens` to be served.
    fn add_missed_wakeups(
        &mut self,
        tokens: &mut Vec<Token>,
        events: &mut Events,
        now: Instant,
    ) -> Result<(), LoopError> {
        // Advance the due re-checks; the look below covers every port anyway. Serving a port
        // that moves bytes restarts its schedule.
        let ports = &self.ports;
        self.rechecks.take_due(
            now,
            |dev| matches!(ports.get(dev), Some(Slot::Open { port, .. }) if port.state().session().is_some()),
        );
        let candidates: Vec<(Token, String)> = self
            .ports
            .iter_mut()
            .filter_map(|(dev, slot)| match slot {
                Slot::Open { token, port } if !tokens.contains(token) && port.wants_input() => {
                    let mask = port.peek_mask()?;
                    let pending =
                        mask.contains(nix::poll::PollFlags::POLLIN) && !mask.contains(nix::poll::PollFlags::POLLHUP);
                    pending.then(|| (*token, format!("{} ({dev}, revents {:#x})", port.name(), mask.bits())))
                }
                _ => None,
            })
            .collect();
        if candidates.is_empty() {
            return Ok(());
        }
        match self.poll.poll(events, Some(Duration::ZERO)) {
            Ok(()) => tokens.extend(events.iter().map(|e| e.token())),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(source) => return Err(LoopError::Poll { op: "wait on", source }),
        }
        for (token, what) in candidates {
            if !tokens.contains(&token) {
                self.env.missed_wakeups += 1;
                log::warn!("port {what}: input pending without an epoll event: missed wakeup, serving it now");
                tokens.push(token);
            }
        }
        Ok(())
    }

    /// Reads pending signals; returns the terminating one, if any.
    fn handle_signals(&mut self) -> Option<Signal> {
        let mut term = None;
        loop {
            match self.signals.read_signal() {
                Ok(Some(info)) if info.ssi_signo as i32 == crate::sigio::signal_number() => {
                    self.on_sigio(info.ssi_fd);
                }
                Ok(Some(info)) => match Signal::try_from(info.ssi_signo as i32) {
                    Ok(Signal::SIGUSR1) => self.dump_status(),
                    Ok(Signal::SIGIO) => {
                        self.env.sigio_overflows += 1;
                        log::warn!("plain SIGIO received: the real-time signal queue overflowed");
                    }
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
        let gone: Vec<String> = self
            .ports
            .keys()
            .filter(|d| !self.consoles.contains(*d) && (!present.contains(d.as_str()) || touched.contains(*d)))
            .cloned()
            .collect();
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
                    self.perms.unwatch(&dev);
                }
                _ => {}
            }
        }

        for w in &selection.wanted {
            let retry = match self.ports.get(&w.dev) {
                None => true,
                Some(Slot::Failed { .. } | Slot::Denied { .. }) => everything || touched.contains(&w.dev),
                Some(Slot::Open { .. } | Slot::Busy { .. } | Slot::Reopen { .. }) => false,
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
        // Whatever brought this attempt (a uevent, a back-off), a wait for permissions ends here;
        // an EACCES below starts a new one.
        self.perms.unwatch(&w.dev);
        let io = match FdIo::open_port(&path) {
            Ok(io) => io,
            Err(e) if e.source == Errno::EBUSY => {
                let delay = next_backoff(prev_delay);
                self.stats.busy_retries += 1;
                self.env.ebusy_total += 1;
                self.carry.entry(w.name.clone()).or_default().counters.ebusy += 1;
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
            Err(e) if matches!(e.source, Errno::EACCES | Errno::EPERM) => {
                self.stats.open_failures += 1;
                self.perms.unwatch(&w.dev);
                if let Err(werr) = self.perms.watch(&w.dev, &path) {
                    // Without a watch, a later uevent (or a rescan) is the only retry.
                    log::warn!(
                        "port {}: {}; cannot watch {} for a permission change ({werr}); waiting for a uevent",
                        w.name,
                        chain(&e),
                        path.display()
                    );
                    self.ports.insert(w.dev.clone(), Slot::Failed { name: w.name.clone() });
                    return;
                }
                // The mode may have changed between the open and the watch: look once more.
                match FdIo::open_port(&path) {
                    Ok(io) => {
                        self.perms.unwatch(&w.dev);
                        io
                    }
                    Err(_) => {
                        log::warn!(
                            "port {}: {}; waiting for its permissions to change (the packaged udev rule \
                             99-vport.rules gives group vport read/write on org.vport.* nodes)",
                            w.name,
                            chain(&e)
                        );
                        self.ports.insert(w.dev.clone(), Slot::Denied { name: w.name.clone() });
                        return;
                    }
                }
            }
            Err(e) => {
                self.stats.open_failures += 1;
                log::warn!("port {}: {}; waiting for a uevent", w.name, chain(&e));
                self.ports.insert(w.dev.clone(), Slot::Failed { name: w.name.clone() });
                return;
            }
        };
        if let Err(e) = self.register(&w.name, &w.dev, io) {
            self.stats.open_failures += 1;
            log::error!("port {}: cannot register {} with epoll: {e}", w.name, path.display());
            self.ports.insert(w.dev.clone(), Slot::Failed { name: w.name.clone() });
        }
    }

    /// Registers an opened port with epoll and serves it (continuing its carried counters).
    fn register(&mut self, name: &str, dev: &str, io: FdIo) -> Result<(), std::io::Error> {
        let token = Token(self.next_token);
        self.next_token += 1;
        let raw = io.raw_fd();
        self.poll.registry().register(&mut SourceFd(&raw), token, Interest::READABLE | Interest::WRITABLE)?;
        self.stats.opens += 1;
        log::info!("port {name}: opened {}", io.path().display());
        let mut carry = self.carry.remove(name).unwrap_or_default();
        carry.counters.opens += 1;
        let port = Port::with_carry(
            name.to_owned(),
            dev.to_owned(),
            io,
            Rc::clone(&self.info),
            Rc::clone(&self.settings),
            carry,
        );
        self.tokens.insert(token, dev.to_owned());
        self.ports.insert(dev.to_owned(), Slot::Open { token, port: Box::new(port) });
        self.env.ports_open = self.ports.values().filter(|s| matches!(s, Slot::Open { .. })).count() as u64;
        self.service(dev);
        Ok(())
    }

    /// Opens a console port in raw mode and serves it; failure stops the agent (consoles are
    /// named explicitly and not hot-plugged).
    fn open_console(&mut self, path: &std::path::Path) -> Result<(), LoopError> {
        let err = |source| LoopError::Console { path: path.to_owned(), source };
        let io = FdIo::open_console(path).map_err(err)?;
        let dev = path.file_name().map_or_else(|| path.display().to_string(), |n| n.to_string_lossy().into_owned());
        let name = path.display().to_string();
        self.consoles.insert(dev.clone());
        self.register(&name, &dev, io).map_err(|e| err(Box::new(e)))
    }

    /// A SIGIO real-time signal for `fd`: the open port with that fd counts it.
    fn on_sigio(&mut self, fd: i32) {
        let port = self.ports.values_mut().find_map(|s| match s {
            Slot::Open { port, .. } if port.io().raw_fd() == fd => Some(port),
            _ => None,
        });
        match port {
            Some(p) => p.on_sigio(&mut self.env),
            None if self.guest_ops.on_sigio(fd) => {}
            None => log::debug!("SIGIO for fd {fd}, which is no open port"),
        }
    }

    /// A port whose CLOSE/REOPEN was served: close it once its BYE is written (or the bound
    /// passed), then schedule the reopen.
    fn check_close(&mut self, dev: &str, now: Instant) {
        let Some(Slot::Open { port, .. }) = self.ports.get_mut(dev) else {
            self.closing.remove(dev);
            return;
        };
        let Some(ms) = port.close_request() else { return };
        let deadline = *self.closing.entry(dev.to_owned()).or_insert(now + BYE_FLUSH_BOUND);
        let flushed = port.queued() == 0;
        if !flushed && now < deadline {
            return;
        }
        if !flushed {
            port.counters_mut().bye_flush_timeouts += 1;
            log::warn!("port {}: BYE not written within {BYE_FLUSH_BOUND:?}; closing anyway", port.name());
        }
        let name = port.name().to_owned();
        let cause = port.close_cause();
        self.closing.remove(dev);
        self.close(dev, cause);
        // The delay is bounded by the agent's limit (a longer CLOSE was refused).
        let deadline = Instant::now() + Duration::from_millis(u64::from(ms));
        self.ports.insert(dev.to_owned(), Slot::Reopen { name, deadline });
    }

    /// Queues the completions guest-op workers reported on the control ports that asked; the
    /// next turn of the loop writes them (within the port's write budget, like all output).
    fn deliver_guest_op_completions(&mut self) {
        for c in self.guest_ops.completions() {
            match self.ports.get_mut(&c.owner.dev) {
                Some(Slot::Open { port, .. }) => {
                    if port.send_guest_op_done(c.owner.session, c.done) {
                        self.more_work.insert(c.owner.dev.clone());
                    }
                }
                _ => log::info!("guest op {} finished after its control port {} closed", c.done.op_id, c.owner.dev),
            }
        }
    }

    /// Runs the guest ops `dev`'s port accepted, queues the immediate answers (written on the
    /// next turn, within the write budget), and closes the handles of control sessions that
    /// ended.
    fn run_guest_ops(&mut self, dev: &str) {
        if let Some(Slot::Open { port, .. }) = self.ports.get_mut(dev) {
            let requests = port.take_guest_ops();
            if !requests.is_empty() {
                self.more_work.insert(dev.to_owned());
            }
            for request in requests {
                if !port.session_is_ready(request.session) {
                    // A HELLO_REQUEST read in the same batch ended the session that asked.
                    log::info!("guest op {}: its session ended before it ran; dropped", request.op_id);
                    continue;
                }
                let owner = Owner { dev: dev.to_owned(), session: request.session };
                match self.guest_ops.submit(owner, request.op_id, request.op.clone()) {
                    Submitted::Done(done) => {
                        port.send_guest_op_done(request.session, done);
                    }
                    Submitted::Queued => {}
                    Submitted::Refused { code, text } => {
                        port.refuse_guest_op(&request, code, text);
                    }
                }
            }
        }
        self.release_guest_ops();
    }

    /// Closes the guest-op handles whose control session is no longer READY.
    fn release_guest_ops(&mut self) {
        if self.guest_ops.open_handles() > 0 {
            let ports = &self.ports;
            self.guest_ops.release(
                |o| matches!(ports.get(&o.dev), Some(Slot::Open { port, .. }) if port.session_is_ready(o.session)),
            );
        }
    }

    fn service(&mut self, dev: &str) {
        let Some(Slot::Open { port, .. }) = self.ports.get_mut(dev) else { return };
        let before = port.counters();
        let health = port.service(&mut self.env);
        let after = port.counters();
        if port.state().session().is_none() {
            // No host: no reply can be on its way.
            self.rechecks.forget(dev);
        } else if (after.bytes_in, after.bytes_out) != (before.bytes_in, before.bytes_out) {
            self.rechecks.traffic(dev, Instant::now());
        }
        self.run_guest_ops(dev);
        let Some(Slot::Open { port, .. }) = self.ports.get_mut(dev) else { return };
        match health {
            Ok(h @ (Health::Open | Health::MoreWork)) => {
                if h == Health::MoreWork {
                    self.more_work.insert(dev.to_owned());
                }
                if port.close_request().is_some() {
                    self.check_close(dev, Instant::now());
                }
            }
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
        self.closing.remove(dev);
        self.more_work.remove(dev);
        self.rechecks.forget(dev);
        let raw = port.io().raw_fd();
        if let Err(e) = self.poll.registry().deregister(&mut SourceFd(&raw)) {
            log::debug!("port {}: deregister: {e}", port.name());
        }
        port.close(&mut self.env, cause);
        if cause == "unplugged" {
            self.stats.unplugs += 1;
        }
        port.counters_mut().closes += 1;
        log::info!("port {} ({}): closed ({cause}); {:?}", port.name(), port.dev(), port.counters());
        let name = port.name().to_owned();
        self.carry.insert(name, port.into_carry());
        self.env.ports_open = self.ports.values().filter(|s| matches!(s, Slot::Open { .. })).count() as u64;
        self.release_guest_ops();
    }

    fn retry_due(&mut self, now: Instant) {
        let closing: Vec<String> = self.closing.iter().filter(|(_, d)| **d <= now).map(|(k, _)| k.clone()).collect();
        for dev in closing {
            self.check_close(&dev, now);
        }
        let due: Vec<(String, String, Option<Duration>)> = self
            .ports
            .iter()
            .filter_map(|(dev, s)| match s {
                Slot::Busy { name, delay, deadline } if *deadline <= now => {
                    Some((dev.clone(), name.clone(), Some(*delay)))
                }
                Slot::Reopen { name, deadline } if *deadline <= now => Some((dev.clone(), name.clone(), None)),
                _ => None,
            })
            .collect();
        for (dev, name, delay) in due {
            self.ports.remove(&dev);
            self.try_open(&Wanted { dev, name }, delay);
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
                Slot::Failed { name } => log::info!("port {name} ({dev}): closed, waiting for a uevent"),
                Slot::Denied { name } => {
                    log::info!("port {name} ({dev}): permission denied, waiting for its node's permissions to change")
                }
                Slot::Reopen { name, deadline } => log::info!(
                    "port {name} ({dev}): closed by command, reopening in {:?}",
                    deadline.saturating_duration_since(Instant::now())
                ),
            }
        }
    }

    /// BYE{NO_REOPEN, "shutdown"} on every port with a session, a flush bounded by
    /// [`BYE_FLUSH_BOUND`] (waiting on writable edges), then every port is closed.
    fn shutdown(&mut self, sig: Signal) {
        let mut pending = 0;
        for slot in self.ports.values_mut() {
            if let Slot::Open { port, .. } = slot {
                if port.say_bye(NO_REOPEN, "shutdown") {
                    pending += 1;
                }
            }
        }
        let deadline = Instant::now() + BYE_FLUSH_BOUND;
        let mut events = Events::with_capacity(64);
        while pending > 0 {
            let mut left = 0;
            for slot in self.ports.values_mut() {
                if let Slot::Open { port, .. } = slot {
                    match port.flush_out() {
                        Ok(true) => {}
                        Ok(false) => left += 1,
                        Err(e) => log::warn!("{}", chain(&e)),
                    }
                }
            }
            pending = left;
            let now = Instant::now();
            if pending == 0 || now >= deadline {
                break;
            }
            if let Err(e) = self.poll.poll(&mut events, Some(deadline - now)) {
                if e.kind() != std::io::ErrorKind::Interrupted {
                    log::warn!("waiting to flush BYE: {e}");
                    break;
                }
            }
        }
        if pending > 0 {
            log::warn!("{pending} port(s) did not take their BYE within {BYE_FLUSH_BOUND:?}");
        }
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
