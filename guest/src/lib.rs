//! vport-agent: serves named virtio-serial ports inside a QEMU guest.
//!
//! Runs as a static binary in an initramfs (busybox, no udev, no systemd). One job per module;
//! from the top down, a module uses only modules listed after it:
//!
//! - [`event_loop`]: the mio loop over the signal fd, the uevent socket, the inotify fd and
//!   every open port. It does the I/O (opening, serving and closing ports; signals, uevents and
//!   rescans, permission changes, lost wakeups) and carries out the decisions of [`slot`].
//! - [`guest_ops`]: system calls on ports the agent does not serve (GUEST_OP): the handle table
//!   and its limits, and the worker threads that run blocking calls, with their cancel.
//! - [`fdio`] (the real port fd: probes, SIGIO set-up, console raw mode) and [`devnode`]
//!   (opening a port node on a host's behalf, safely).
//! - [`port`]: one served port's protocol logic over the [`port::PortIo`] and [`port::Env`]
//!   traits, in rooms: the service loop, transmit, decode reports, the session, the commands,
//!   the streams, the counters.
//! - Pure parts and small services: [`slot`] (where each known port stands in the loop, and
//!   what happens to it next, as a pure machine with time passed in), [`recheck`] (the
//!   lost-wakeup re-check schedule), [`outqueue`] (the transmit buffer), [`history`] (the
//!   life-cycle ring), [`ratelimit`] (the decode-report rate limit), [`discovery`] (which ports:
//!   sysfs listing and a pure matcher), [`consoles`] (which hvc lines `--consoles` tries, and
//!   what the guest can learn about a console), [`uevent`] (when to look again: netlink socket
//!   and a pure parser), [`permwatch`] (waiting for a node's permissions to change), [`sigio`]
//!   (SIGIO observation), [`log`] (stderr logger, error chains), [`sys`] (clock, randomness,
//!   guest facts), [`settings`] (policy and limits), [`stream_dir`] (the files acknowledged
//!   streams read and write).

#![deny(unsafe_op_in_unsafe_fn)]

pub mod consoles;
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
pub mod slot;
pub mod stream_dir;
pub mod sys;
pub mod uevent;
