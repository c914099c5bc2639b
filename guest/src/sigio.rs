//! SIGIO observation (the SIGIO command).
//!
//! The kernel sends SIGIO for a virtio-serial port on host connect, host disconnect, each data
//! arrival and unplug, always with band `POLL_OUT` (`send_sigio_to_port`), once `F_SETOWN` and
//! `O_ASYNC` are set on the fd. Plain SIGIO is a standard signal: while one is pending, more
//! coalesce into it, so it cannot be counted. The agent therefore:
//!
//! 1. sets `F_SETOWN(getpid())`, `F_SETSIG(SIGRTMIN+2)` ([`signal_number`]) and `O_ASYNC` on the
//!    port fd ([`crate::fdio::FdIo`]'s `set_async`): with `F_SETSIG` the kernel queues one
//!    real-time signal per event, each carrying the fd (`si_fd`) and band;
//! 2. keeps that signal (and plain SIGIO, the kernel's fallback when the real-time queue
//!    overflows) blocked from start-up and reads it through the same signalfd as SIGTERM, which
//!    is registered in the mio loop: no handler runs, no event is lost between checks;
//! 3. for each signal read, finds the open port whose fd is `ssi_fd`, counts it and samples that
//!    fd's `poll(2)` mask ([`crate::port::Port::on_sigio`]). The mask is the one at the time the
//!    agent reads the signal, which may be later than the event; the count is exact.
//!
//! A plain SIGIO (queue overflow) carries no fd: it is counted agent-wide as `sigio_overflows`.
//! Disable clears `O_ASYNC`; signals already queued are read but no longer counted.

use nix::sys::signal::{SigSet, Signal};

/// The real-time signal the agent asks for with `F_SETSIG`.
pub fn signal_number() -> nix::libc::c_int {
    nix::libc::SIGRTMIN() + 2
}

/// `base` plus the real-time SIGIO signal.
pub fn with_rt_signal(base: &SigSet) -> SigSet {
    let mut raw: nix::libc::sigset_t = *base.as_ref();
    // SAFETY: `raw` is a valid, initialised sigset_t owned by this frame; sigaddset only writes
    // into it. The signal number is in range (SIGRTMIN + 2 <= SIGRTMAX).
    unsafe {
        nix::libc::sigaddset(&mut raw, signal_number());
    }
    // SAFETY: `raw` was initialised from a valid SigSet and only extended by sigaddset.
    unsafe { SigSet::from_sigset_t_unchecked(raw) }
}

/// The signals the agent blocks and reads through its signalfd.
pub fn agent_signals() -> SigSet {
    let mut mask = SigSet::empty();
    for s in [Signal::SIGTERM, Signal::SIGINT, Signal::SIGUSR1, Signal::SIGIO] {
        mask.add(s);
    }
    with_rt_signal(&mask)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rt_signal_is_in_the_set_and_is_real_time() {
        let set = agent_signals();
        // SAFETY: `set.as_ref()` is a valid sigset_t for the duration of the call.
        let member = unsafe { nix::libc::sigismember(set.as_ref(), signal_number()) };
        assert_eq!(member, 1);
        assert!(set.contains(Signal::SIGTERM) && set.contains(Signal::SIGIO));
        assert!(signal_number() > Signal::SIGSYS as i32 && signal_number() <= nix::libc::SIGRTMAX());
    }
}
