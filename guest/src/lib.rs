//! vport-agent: serves named virtio-serial ports inside a QEMU guest.
//!
//! Runs as a static binary in an initramfs (busybox, no udev, no systemd). One job per module:
//! [`discovery`] (which ports: sysfs listing and a pure matcher), [`uevent`] (when to look again:
//! netlink socket and a pure parser), [`port`] (one port's protocol logic over the
//! [`port::PortIo`] trait), [`event_loop`] (mio loop, back-off timers, signals, lost-wakeup
//! guard), [`recheck`] (the lost-wakeup re-check schedule, pure), [`guest_ops`] (system calls on
//! ports the agent does not serve, on worker threads), [`history`] (life-cycle ring), [`fdio`]
//! (the real port fd: probes, SIGIO set-up, console raw mode), [`sigio`] (SIGIO observation),
//! [`log`] (stderr logger), [`sys`] (clock, randomness, guest facts).

#![deny(unsafe_op_in_unsafe_fn)]

pub mod devnode;
pub mod discovery;
pub mod event_loop;
pub mod fdio;
pub mod guest_ops;
pub mod history;
pub mod log;
pub mod outqueue;
pub mod permwatch;
pub mod port;
pub mod ratelimit;
pub mod recheck;
pub mod settings;
pub mod sigio;
pub mod sys;
pub mod uevent;
