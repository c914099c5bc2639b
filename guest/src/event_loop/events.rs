//! What wakes the loop besides a port's readiness: signals (termination, SIGUSR1 for a status
//! dump, SIGIO), uevents (a rescan of sysfs, which tells the slot machine which ports are
//! wanted and which left), permission changes of nodes that were not accessible, and the
//! lost-wakeup guard (see "Lost wakeups" in [`crate::event_loop`]).

use super::{EventLoop, Known, LoopError, OpenPort};
use crate::consoles::list_lines;
use crate::discovery::{list_sysfs, select, PortSpec, Wanted};
use crate::fdio::FdIo;
use crate::log::chain;
use crate::slot::{OpenOutcome, Slot, SlotInput};
use crate::uevent::Action;
use mio::{Events, Token};
use nix::errno::Errno;
use nix::poll::PollFlags;
use nix::sys::signal::Signal;
use std::collections::HashSet;
use std::time::{Duration, Instant};

impl EventLoop {
    /// Reads pending signals; returns the terminating one, if any.
    pub(super) fn handle_signals(&mut self) -> Option<Signal> {
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

    /// A SIGIO real-time signal for `fd`: the open port with that fd counts it.
    fn on_sigio(&mut self, fd: i32) {
        match self.open.values_mut().find(|o| o.port.io().raw_fd() == fd) {
            Some(o) => o.port.on_sigio(&mut self.env),
            None if self.guest_ops.on_sigio(fd) => {}
            None => log::debug!("SIGIO for fd {fd}, which is no open port"),
        }
    }

    /// Drains the uevent socket; events naming ports (or lost events) rescan sysfs.
    pub(super) fn handle_uevents(&mut self) {
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
    pub(super) fn rescan(&mut self, touched: &HashSet<String>, everything: bool) {
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
            .slots
            .keys()
            .filter(|d| !self.consoles.contains(*d) && (!present.contains(d.as_str()) || touched.contains(*d)))
            .cloned()
            .collect();
        for dev in gone {
            let listed = present.contains(dev.as_str());
            let Some(port) = self.known(&dev) else { continue };
            let was_open = self.open.contains_key(&dev);
            if was_open {
                // ENODEV on read/write closes it here; so does an I/O error.
                self.service(&dev);
            }
            if listed {
                continue;
            }
            match self.open.get_mut(&dev) {
                Some(OpenPort { port: open, .. }) => {
                    let fd_unplugged = open.looks_unplugged().unwrap_or(true);
                    self.apply(&port, SlotInput::Unlisted { fd_unplugged });
                }
                None if !was_open => self.apply(&port, SlotInput::Unlisted { fd_unplugged: false }),
                // Its service closed it: unplugged (forgotten), or an I/O error (retried).
                None => {}
            }
        }

        for w in &selection.wanted {
            self.apply(w, SlotInput::Wanted { retry: everything || touched.contains(&w.dev) });
        }

        // A node that left sysfs logs its ENXIO again if it comes back.
        self.enxio_logged.retain(|d| present.contains(d.as_str()));
        if self.config.discover_consoles {
            self.rescan_consoles();
        }

        let missing: HashSet<PortSpec> = selection.missing.iter().cloned().collect();
        for spec in &selection.missing {
            if self.waiting_logged.insert(spec.clone()) {
                log::info!("port {spec} is not present: waiting for it to be plugged");
            }
        }
        self.waiting_logged.retain(|s| missing.contains(s));
    }

    /// `--consoles`: reconciles the known consoles with the hvc lines ([`crate::consoles`]). A
    /// line not known is opened (in raw mode) and served; ENODEV or ENXIO means no console
    /// backs it. A known one that failed is tried again. An open console whose fd reports
    /// POLLHUP was unplugged (`hvc_remove` hangs its tty up): closed and forgotten. Consoles
    /// named with `--port` are left as they are.
    pub(super) fn rescan_consoles(&mut self) {
        let lines = match list_lines(&self.config.sysfs_root) {
            Ok(l) => l,
            Err(e) => {
                log::error!("{}", chain(&e));
                return;
            }
        };
        let lines: Vec<String> = lines.into_iter().filter(|d| !self.named_consoles.contains(d)).collect();
        for dev in lines {
            let port = Wanted { name: format!("/dev/{dev}"), dev: dev.clone() };
            if let Some(OpenPort { port: open, .. }) = self.open.get_mut(&dev) {
                let hung_up = open.peek_mask().is_none_or(|m| m.contains(PollFlags::POLLHUP));
                if hung_up {
                    log::info!("console {}: its tty was hung up: unplugged", port.name);
                    self.apply(&port, SlotInput::Unlisted { fd_unplugged: true });
                }
                continue;
            }
            if self.slots.contains_key(&dev) {
                // Known, not open: a failed one is tried again (an ENODEV then forgets it, see
                // `try_open`); a busy or reopening one waits for its timer.
                self.apply(&port, SlotInput::Wanted { retry: true });
                continue;
            }
            let path = self.config.dev_root.join(&dev);
            match FdIo::open_console(&path) {
                Ok(io) => {
                    self.consoles.insert(dev.clone());
                    let outcome = match self.register(&port.name, &dev, io) {
                        Ok(()) => OpenOutcome::Opened,
                        Err(e) => {
                            self.stats.open_failures += 1;
                            log::error!("console {}: cannot register with epoll: {e}", port.name);
                            OpenOutcome::Failed
                        }
                    };
                    self.apply(&port, SlotInput::OpenEnded(outcome));
                }
                // No console behind this line.
                Err(e) if matches!(e.errno(), Errno::ENODEV | Errno::ENXIO) => {}
                Err(e) => {
                    self.stats.open_failures += 1;
                    log::warn!("console {}: {}; trying again at the next uevent", port.name, chain(&e));
                }
            }
        }
        let (slots, named) = (&self.slots, &self.named_consoles);
        self.consoles.retain(|d| named.contains(d) || slots.contains_key(d));
    }

    /// Tries again the ports whose node's mode or owner changed while they were Denied.
    pub(super) fn handle_permission_changes(&mut self) {
        for dev in self.perms.drain() {
            let Some(port) = self.known(&dev) else { continue };
            if matches!(self.slots.get(&dev), Some(Known { slot: Slot::Denied, .. })) {
                log::info!("port {}: its node's permissions changed; opening it again", port.name);
            }
            self.apply(&port, SlotInput::PermissionsChanged);
        }
    }

    /// Finds the open ports epoll did not report in `tokens` that have input pending and
    /// wanted (POLLIN, host connected, not paused): all of them on any wakeup, so this costs no
    /// wakeup of its own; the due lost-wakeup re-checks ([`RECHECK_STEPS`](crate::recheck::RECHECK_STEPS)) are what wake the
    /// loop when nothing else does. Each candidate is confirmed with a zero-timeout
    /// `epoll_wait` (an event may be just late); a port still unreported then had its wakeup
    /// lost: it is counted (STATS `missed_wakeups`), logged, and added to `tokens` to be served.
    pub(super) fn add_missed_wakeups(
        &mut self,
        tokens: &mut Vec<Token>,
        events: &mut Events,
        now: Instant,
    ) -> Result<(), LoopError> {
        // Advance the due re-checks; the look below covers every port anyway. Serving a port
        // that moves bytes restarts its schedule.
        let open = &self.open;
        self.rechecks.take_due(now, |dev| open.get(dev).is_some_and(|o| o.port.state().session().is_some()));
        let candidates: Vec<(Token, String)> = self
            .open
            .iter_mut()
            .filter_map(|(dev, OpenPort { token, port })| {
                if tokens.contains(token) || !port.wants_input() {
                    return None;
                }
                let mask = port.peek_mask()?;
                let pending =
                    mask.contains(nix::poll::PollFlags::POLLIN) && !mask.contains(nix::poll::PollFlags::POLLHUP);
                pending.then(|| (*token, format!("{} ({dev}, revents {:#x})", port.name(), mask.bits())))
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
}
