//! vport host rig: boots QEMU with a vport guest image, speaks QMP, connects to the
//! virtio-serial chardevs and talks to `vport-agent` over them.
//!
//! Layout: [`image`] builds the guest kernel + initramfs, [`qemu`] builds QEMU command lines
//! and owns the QEMU process, [`qmp`] is the QMP client, [`chardev`] the host ends of a port
//! (unix, TCP, pty), [`link`] the framed typed link to the agent, [`session`] the session
//! server, [`rig`] ties a VM, its QMP session and its ports together, [`timeline`] records
//! every observation as a trace that [`trace_check`] judges, [`hello`], [`watch`] and
//! [`connect`] are the `vport hello`, `vport watch` and `vport connect` commands, [`registry`]
//! lists the VMs `vport boot` keeps up. [`conformance`] is the conformance suite, which reports
//! through [`report`]'s typed run events (rendered as text, JSON and JUnit). [`command`] holds
//! the bodies of the `vport` commands (the binary only parses, dispatches and exits), [`usage`]
//! checks command-line values before anything is built, and [`exit`] is the one table of the
//! command's exit codes.
//!
//! # Example: boot, handshake, ping
//!
//! ```no_run
//! use std::time::{Duration, Instant};
//! use vport_host::image::{self, kernel::KernelSource, ImageRequest};
//! use vport_host::rig::{vm_config, Rig};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let image = image::build(
//!     &ImageRequest {
//!         kernel: KernelSource::Auto, // the Debian kernel package, downloaded once
//!         agent: image::resolve_agent(None)?, // scripts/build-agent's static binary
//!         busybox: image::default_busybox(),
//!         cache_dir: vport_host::cache::cache_dir(),
//!     },
//!     &mut |msg| eprintln!("{msg}"),
//! )?;
//! // QEMU starts paused with QMP connected, so no event and no byte can be missed.
//! let mut rig = Rig::launch(vm_config(&image, &["org.vport.0"], &[]))?;
//! let mut link = rig.connect("org.vport.0")?;
//! rig.resume()?;
//! let hs = link.handshake(Duration::from_secs(60), "my-test")?;
//! println!("agent {} on {}", hs.hello.agent_version, hs.hello.port_name);
//! let rtt = link.ping(Duration::from_secs(5), 0)?.rtt;
//! println!("round trip {rtt:?}, frontend-open {:?}", rig.qmp.frontend_open(&rig.port("org.vport.0")?.chardev_id)?);
//! # let _ = Instant::now();
//! # Ok(())
//! # }
//! ```
//!
//! # Example: sessions that live exactly as long as the connection
//!
//! ```no_run
//! # use std::time::Duration;
//! # fn demo(rig: &vport_host::rig::Rig) -> Result<(), Box<dyn std::error::Error>> {
//! let mut server = rig.port_server("org.vport.0")?;
//! // Yields only when the guest has the port open and the handshake is done.
//! let mut session = server.accept(Duration::from_secs(60))?;
//! session.ping(Duration::from_secs(5), 1)?;
//! // After the guest closes the port, requests fail with SessionError::Ended(GuestClosed).
//! let reason = session.close_guest(0, Duration::from_secs(5))?;
//! println!("session ended: {reason:?}");
//! # Ok(())
//! # }
//! ```

pub mod cache;
pub mod chardev;
pub mod command;
pub mod conformance;
pub mod connect;
pub mod exit;
pub mod hello;
pub mod image;
pub mod link;
pub mod qemu;
pub mod qmp;
pub mod registry;
pub mod report;
pub mod rig;
pub mod session;
pub mod timeline;
pub mod trace_check;
pub mod usage;
pub mod wait;
pub mod watch;
