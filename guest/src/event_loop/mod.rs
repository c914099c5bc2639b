//! The agent's event loop: one mio `Poll` over the signal fd, the uevent socket and every open
//! port. It does the I/O (epoll, fds, sysfs, inotify, signals); where each known port stands,
//! and what happens to it next, is decided by the pure slot machine ([`crate::slot`]), which
//! the loop feeds what it observes ([`SlotInput`]) and obeys ([`SlotAction`]).
//!
//! # A known port (keyed by its node name, `vportNpM`)
//!
//! A port the sysfs scan selects is opened; EBUSY backs off (100 ms, doubling, at most 5 s),
//! EACCES/EPERM waits for inotify to report a change of the node's mode or owner, any other
//! failure waits for a uevent naming the port. An open port is served on its readiness events;
//! one whose service call stopped at its write or read budget (`Health::MoreWork`) is served
//! again on the next turn of the loop without waiting in `epoll_wait`, after the other ports'
//! events: a long stream or a flood of input on one port never starves another port, and a
//! stream never starves its own port's input. ENODEV, or a port gone from sysfs whose fd
//! reports POLLHUP alone, closes and forgets it; an unexpected I/O error closes it and retries.
//!
//! A CLOSE/REOPEN command moves an open port to closing (its BYE is flushed on writable edges,
//! for at most [`BYE_FLUSH_BOUND`]; then it is closed anyway and the timeout counted), then to
//! reopen, opened again when the delay passes. A port's counters and life-cycle ring are kept
//! by name across closes, unplugs and replugs ([`crate::port::Carry`]).
//!
//! Console ports (`/dev/hvcN`) are served in raw mode with the same protocol. One named with
//! `--port` is opened at start (it must exist). With `--consoles`, every hvc line a virtio
//! console backs is found at start and again on every virtio-ports uevent (a console's
//! hot-plug and unplug come with the uevents of its `vportNpM` device, never with a tty
//! uevent): a line that opens is served, one that fails with ENODEV has no console; an open
//! console whose fd reports POLLHUP was unplugged (its tty is hung up) and is forgotten. The
//! guest cannot tell which port name a line belongs to ([`crate::consoles`]), so a console is
//! known by its node, `/dev/hvcN`. An hvc port always looks host-connected, so a session is
//! offered as soon as it is open.
//!
//! The only timers are the back-off deadlines, BYE flush bounds, reopen delays
//! ([`Slot::deadline`]) and the lost-wakeup re-checks
//! ([`RECHECK_STEPS`](crate::recheck::RECHECK_STEPS), armed only after traffic in a session);
//! with none pending the loop blocks in `epoll_wait` with no timeout, so an idle agent makes
//! zero wakeups. Every return from `poll` is counted.
//!
//! # Lost wakeups
//!
//! On the Debian 6.1 guest kernel under TCG, data sometimes sits on a port (poll(2) reports
//! POLLIN) without the edge-triggered epoll ever reporting it: a reply the host sent right
//! after the agent wrote waited until the next data arrived (`docs/conformance.md`). Two
//! guards: every wakeup looks at the ports epoll did not report, and a port that moved bytes in
//! a session is looked at again after [`RECHECK_STEPS`](crate::recheck::RECHECK_STEPS). A port
//! found with input pending is confirmed with a zero-timeout `epoll_wait` (its event may be
//! just late), then counted in STATS `missed_wakeups`, logged and served.
//!
//! # Rooms
//!
//! This file holds the loop itself (its state, `run`, the glue to the slot machine, the status
//! dump and the shutdown); `ports.rs` opens, serves and closes the ports; `events.rs` handles
//! what else wakes the loop (signals, uevents and rescans, permission changes, lost wakeups).
//! Both add methods to [`EventLoop`] and import this file, never each other.

mod events;
mod ports;

use crate::discovery::{PortSpec, Selector, Wanted};
use crate::fdio::FdIo;
use crate::guest_ops::{GuestOps, GuestOpsError};
pub use crate::log::chain;
use crate::permwatch::PermWatch;
use crate::port::{AgentInfo, Carry, Env, Port, SystemEnv};
use crate::recheck::Rechecks;
use crate::settings::Settings;
pub use crate::slot::{next_backoff, BACKOFF_MAX, BACKOFF_MIN, BYE_FLUSH_BOUND};
use crate::slot::{Slot, SlotAction, SlotInput};
use crate::uevent::{UeventError, UeventSocket};
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};
use nix::errno::Errno;
use nix::sys::signal::Signal;
use nix::sys::signalfd::{SfdFlags, SignalFd};
use std::collections::{BTreeMap, HashMap, HashSet};
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
    /// `--consoles`: serve every hvc line a virtio console backs, found at start and on
    /// uevents, forgotten on unplug.
    pub discover_consoles: bool,
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
    /// Inputs the slot machine refused ([`crate::slot::SlotError`]): a fault of the loop,
    /// logged; the port's slot was left as it was.
    pub illegal_slot_inputs: u64,
}

/// The poll timeout for the earliest of `deadlines`: `None` (block forever) when there is none.
pub fn poll_timeout(now: Instant, deadlines: impl Iterator<Item = Instant>) -> Option<Duration> {
    deadlines.min().map(|d| d.saturating_duration_since(now))
}

/// A known port: its name (for logs and HELLO) and where it stands.
#[derive(Debug)]
struct Known {
    name: String,
    slot: Slot,
}

/// An open port (its slot is Open or Closing): its epoll token and its protocol logic.
#[derive(Debug)]
struct OpenPort {
    token: Token,
    port: Box<Port<FdIo>>,
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
    /// Every known port by node name, and where it stands ([`Slot`]; Absent ones have no entry).
    slots: BTreeMap<String, Known>,
    /// The open ports by node name: exactly those whose slot is Open or Closing.
    open: BTreeMap<String, OpenPort>,
    tokens: HashMap<Token, String>,
    next_token: usize,
    waiting_logged: HashSet<PortSpec>,
    /// Nodes whose ENXIO (a console's `vportNpM`) was logged.
    enxio_logged: HashSet<String>,
    stats: Stats,
    /// Counters and rings of ports that are not open now, by port name.
    carry: HashMap<String, Carry>,
    /// Node names (`hvcN`) of the known console ports, named or discovered: opened in raw mode,
    /// and left out of the virtio-ports rescan.
    consoles: HashSet<String>,
    /// Node names of the consoles named with `--port` (never forgotten).
    named_consoles: HashSet<String>,
    /// Guest operations on ports the agent does not serve (GUEST_OP).
    guest_ops: GuestOps,
    /// Lost-wakeup re-checks ([`RECHECK_STEPS`](crate::recheck::RECHECK_STEPS)).
    rechecks: Rechecks,
    /// Nodes of ports that were not accessible, watched for a permission change.
    perms: PermWatch,
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
        let named_consoles =
            config.consoles.iter().filter_map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned())).collect();
        let mut env = SystemEnv::new();
        env.guest_ops_allowed = config.settings.allow_guest_ops;
        Ok(EventLoop {
            settings: Rc::new(config.settings.clone()),
            config,
            info: Rc::new(info),
            env,
            poll,
            signals,
            uevents,
            slots: BTreeMap::new(),
            open: BTreeMap::new(),
            tokens: HashMap::new(),
            next_token: FIRST_PORT_TOKEN,
            waiting_logged: HashSet::new(),
            enxio_logged: HashSet::new(),
            stats: Stats::default(),
            carry: HashMap::new(),
            consoles: HashSet::new(),
            named_consoles,
            guest_ops,
            rechecks: Rechecks::default(),
            perms,
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
                self.slots
                    .values()
                    .filter_map(|k| k.slot.deadline())
                    .chain(self.rechecks.next_deadline())
                    // Ports with work left: look at events, then serve them again at once.
                    .chain(self.slots.values().any(|k| k.slot.serve_again()).then_some(now)),
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
            self.feed_all(|slot| slot.serve_again(), SlotInput::ServeTurn);
            let now = Instant::now();
            self.feed_all(|slot| slot.deadline().is_some_and(|d| d <= now), SlotInput::Tick);
        }
    }

    /// Feeds `input` to the slot machine of every known port `which` picks, in node order.
    fn feed_all(&mut self, which: impl Fn(&Slot) -> bool, input: SlotInput) {
        let picked: Vec<Wanted> = self
            .slots
            .iter()
            .filter(|(_, k)| which(&k.slot))
            .map(|(dev, k)| Wanted { dev: dev.clone(), name: k.name.clone() })
            .collect();
        for port in picked {
            self.apply(&port, input);
        }
    }

    /// Feeds `input` to `port`'s slot machine and carries out the machine's decision. A refused
    /// input leaves the slot as it was (logged and counted: it is a fault of the loop).
    fn apply(&mut self, port: &Wanted, input: SlotInput) {
        let slot = self.slots.get(&port.dev).map_or(Slot::Absent, |k| k.slot);
        let step = match slot.step(input, Instant::now()) {
            Ok(step) => step,
            Err(e) => {
                self.stats.illegal_slot_inputs += 1;
                log::warn!("port {} ({}): {e}", port.name, port.dev);
                return;
            }
        };
        if step.next.name() != slot.name() {
            log::debug!(
                "port {} ({}): {} -> {} ({})",
                port.name,
                port.dev,
                slot.name(),
                step.next.name(),
                input.name()
            );
        }
        match (step.next, self.slots.get_mut(&port.dev)) {
            (Slot::Absent, _) => {
                self.slots.remove(&port.dev);
            }
            (next, Some(known)) => {
                // An open port keeps the name it was opened with; otherwise the latest scan's.
                if !slot.is_open() && known.name != port.name {
                    known.name.clone_from(&port.name);
                }
                known.slot = next;
            }
            (next, None) => {
                self.slots.insert(port.dev.clone(), Known { name: port.name.clone(), slot: next });
            }
        }
        match step.action {
            SlotAction::Wait => {}
            SlotAction::Open => self.try_open(port),
            SlotAction::Serve => self.service(&port.dev),
            SlotAction::Close(cause) => self.close(&port.dev, cause),
            SlotAction::Forget => self.perms.unwatch(&port.dev),
        }
    }

    /// The known port on node `dev`, if any.
    fn known(&self, dev: &str) -> Option<Wanted> {
        self.slots.get(dev).map(|k| Wanted { dev: dev.to_owned(), name: k.name.clone() })
    }

    fn dump_status(&mut self) {
        log::info!("status: {:?}", self.stats);
        for (dev, Known { name, slot }) in &self.slots {
            match slot {
                Slot::Open { .. } | Slot::Closing { .. } => match self.open.get(dev) {
                    Some(OpenPort { port, .. }) => log::info!(
                        "port {name} ({dev}): {}{} queued={} history={} {:?} {:?}",
                        port.state().name(),
                        if matches!(slot, Slot::Closing { .. }) { " closing" } else { "" },
                        port.queued(),
                        port.history().len(),
                        port.counters(),
                        port.decoder_stats()
                    ),
                    None => log::error!("port {name} ({dev}): {} without an open port", slot.name()),
                },
                Slot::Busy { delay, .. } => log::info!("port {name} ({dev}): busy, back-off {delay:?}"),
                Slot::Failed => log::info!("port {name} ({dev}): closed, waiting for a uevent"),
                Slot::Denied => {
                    log::info!("port {name} ({dev}): permission denied, waiting for its node's permissions to change")
                }
                Slot::Reopen { at } => log::info!(
                    "port {name} ({dev}): closed by command, reopening in {:?}",
                    at.saturating_duration_since(Instant::now())
                ),
                Slot::Absent => log::error!("port {name} ({dev}): kept while absent"),
            }
        }
    }

    /// BYE{NO_REOPEN, "shutdown"} on every port with a session, a flush bounded by
    /// [`BYE_FLUSH_BOUND`] (waiting on writable edges), then every port is closed.
    fn shutdown(&mut self, sig: Signal) {
        let mut pending = 0;
        for OpenPort { port, .. } in self.open.values_mut() {
            if port.say_bye(NO_REOPEN, "shutdown") {
                pending += 1;
            }
        }
        let deadline = Instant::now() + BYE_FLUSH_BOUND;
        let mut events = Events::with_capacity(64);
        while pending > 0 {
            let mut left = 0;
            for OpenPort { port, .. } in self.open.values_mut() {
                match port.flush_out() {
                    Ok(true) => {}
                    Ok(false) => left += 1,
                    Err(e) => log::warn!("{}", chain(&e)),
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
        self.feed_all(|_| true, SlotInput::Shutdown);
        let now = self.env.now_ns();
        log::info!("exiting on {sig} at {now} ns: {:?}", self.stats);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
