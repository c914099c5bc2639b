//! The host end of a virtio-serial port: a connection to the port's QEMU chardev.
//!
//! [`Stream`] is what the rest of the rig needs from any connection: bytes both ways and a read
//! deadline. [`Endpoint`] is one port's host end of any kind ([`EndpointKind`]): it produces
//! [`Connection`]s (a [`Stream`], usable by [`crate::link::Link`]) and reports every connect and
//! disconnect, with its [`Instant`](std::time::Instant), as an [`EndpointEvent`]
//! ([`Endpoint::events`]).
//!
//! Kinds, named from vport's side (the QEMU chardev is the opposite role):
//!
//! | kind | QEMU chardev | connect means |
//! |---|---|---|
//! | [`EndpointKind::UnixClient`] | `socket,path=P,server=on,wait=off` | vport connects to `P` |
//! | [`EndpointKind::UnixServer`] | `socket,path=P,server=off,reconnect=N` | vport accepts QEMU's connection on `P` |
//! | [`EndpointKind::TcpClient`] | `socket,host=127.0.0.1,port=N,server=on,wait=off` | vport connects |
//! | [`EndpointKind::TcpServer`] | `socket,host=127.0.0.1,port=N,server=off,reconnect=N` | vport accepts |
//! | [`EndpointKind::Pty`] | `pty` | vport opens the pty slave (raw, exclusive) |
//!
//! A socket chardev serves one client at a time: QEMU sees the host attached from the
//! moment its side of the connection exists. When the host drops a connection, a QEMU that
//! connects out (`reconnect=N`) comes back within `N` seconds. A pty chardev counts as connected
//! while the slave is open; QEMU checks that once a second while disconnected, so the guest sees
//! a pty host attach up to one second after [`Endpoint::connect`]. A pty has no one-client limit
//! of its own, so vport opens its slave exclusively: a second opener is refused ([`PtyStream`]).
//! Only loopback addresses are used. A second client of a QEMU socket chardev waits in the listen
//! backlog with a connection that looks established; [`unix_diag::peer_accepted`] tells it apart.
//!
//! Files, one job each: `stream.rs` (the [`Stream`] trait), `addr.rs` (kinds and addresses),
//! `error.rs`, `events.rs` (the connect/disconnect record), `connection.rs` (one connection over
//! a socket or a pty), `endpoint.rs` (the [`Endpoint`] trait), `client.rs` (the kinds where vport
//! connects or opens: unix, TCP, pty), `listener.rs` (listeners bound before QEMU starts),
//! `server.rs` (the kinds where vport accepts), `pty.rs` (the pty slave, through the `serialport`
//! crate), and [`unix_diag`].

mod addr;
mod client;
mod connection;
mod endpoint;
mod error;
mod events;
mod listener;
mod pty;
mod server;
mod stream;
pub mod unix_diag;

pub use addr::{BadEndpointAddr, EndpointAddr, EndpointKind, ADDR_FORMS};
pub use client::{connect_unix, PtyEndpoint, TcpClientEndpoint, UnixClientEndpoint};
pub use connection::Connection;
pub use endpoint::Endpoint;
pub use error::ChardevError;
pub use events::{EndpointEvent, EndpointEventKind, EndpointEvents};
pub use listener::{bind, remove_bound_sockets, Accepted, Listener, SocketFile};
pub use pty::PtyStream;
pub use server::ServerEndpoint;
pub use stream::Stream;

/// The endpoint for port `port` at `addr`. Server kinds need the `listener` bound before QEMU
/// started (see [`crate::qemu::Vm::listener`]).
pub fn endpoint(
    port: &str,
    addr: &EndpointAddr,
    listener: Option<Listener>,
) -> Result<Box<dyn Endpoint>, ChardevError> {
    Ok(match addr {
        EndpointAddr::UnixClient { path } => Box::new(UnixClientEndpoint::new(port, path)),
        EndpointAddr::TcpClient { addr: sock } => Box::new(TcpClientEndpoint::new(port, *sock)),
        EndpointAddr::UnixServer { .. } | EndpointAddr::TcpServer { .. } => {
            let listener =
                listener.ok_or_else(|| ChardevError::NoListener { port: port.into(), addr: addr.to_string() })?;
            Box::new(ServerEndpoint::new(port, addr.clone(), listener))
        }
        EndpointAddr::Pty { path } => Box::new(PtyEndpoint::new(port, path.clone())),
    })
}

#[cfg(test)]
mod tests;
