//! vport host rig: boots QEMU with a vport guest image, speaks QMP, connects to the
//! virtio-serial chardevs and talks to `vport-agent` over them.
//!
//! Layout: [`image`] builds the guest kernel + initramfs, [`qemu`] builds QEMU command lines
//! and owns the QEMU process, [`qmp`] is the QMP client, [`chardev`] the host ends of a port
//! (unix, TCP, pty), [`link`] the framed typed link to the agent, [`client`] the typed
//! requests, [`session`] the session server, [`rig`] ties a VM, its QMP session and its ports
//! together, [`timeline`] records every observation as a trace that [`trace_check`] judges, [`hello`], [`watch`] and
//! [`connect`] are the `vport hello`, `vport watch` and `vport connect` commands, [`registry`]
//! lists the VMs `vport boot` keeps up, [`attach`] reaches a VM vport did not start. [`conformance`] is the conformance suite, which reports
//! through [`report`]'s typed run events (rendered as text, JSON and JUnit). [`command`] holds
//! the bodies of the `vport` commands (the binary only parses, dispatches and exits), [`usage`]
//! checks command-line values before anything is built, and [`exit`] is the one table of the
//! command's exit codes.
//!
//! Every conversation with an agent goes through [`client::AgentClient`], the one
//! request/reply path; normally in a [`session::Session`] that a [`session::PortServer`] hands
//! out, whose life is exactly one READY connection. The bare [`link::Link`] is for the
//! end-to-end tests of the agent's protocol.
//!
//! # Example: boot, take the agent's session, ping
//!
//! ```no_run
//! use std::time::Duration;
//! use vport_host::client::AgentClient;
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
//! let mut server = rig.port_server("org.vport.0")?;
//! server.connect(Duration::from_secs(5))?; // the host is there before the guest runs
//! rig.resume()?;
//! // Yields only when the guest has the port open and the handshake is done.
//! let mut session = server.accept(Duration::from_secs(60))?;
//! let hello = &session.handshake().hello;
//! println!("agent {} on {}", hello.agent_version, hello.port_name);
//! println!("round trip {:?}", session.ping(Duration::from_secs(5), 0)?.rtt);
//! // After the guest closes the port, requests fail with SessionError::Ended(AgentBye).
//! let reason = session.close_guest(0, Duration::from_secs(5))?;
//! println!("session ended: {reason}");
//! # Ok(())
//! # }
//! ```

pub mod attach;
pub mod bench;
pub mod cache;
pub mod chardev;
pub mod client;
pub mod command;
pub mod conformance;
pub mod connect;
pub mod connect_attached;
pub mod exit;
pub mod faults;
pub mod hello;
pub mod image;
pub mod libvirt;
pub mod link;
pub mod liveness;
pub mod logwatch;
pub mod matrix;
pub mod qemu;
pub mod qmp;
pub mod registry;
pub mod report;
pub mod rig;
pub mod session;
pub mod soak;
pub mod speed;
pub mod stream;
pub mod timeline;
pub mod trace_check;
pub mod usage;
pub mod wait;
pub mod watch;
