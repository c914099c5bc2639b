//! One port's host end of any kind, as the rest of the rig sees it ([`Endpoint`]).

use std::time::Duration;

use super::addr::{EndpointAddr, EndpointKind};
use super::connection::Connection;
use super::error::ChardevError;
use super::events::EndpointEvents;

/// One port's host end, of any [`EndpointKind`].
pub trait Endpoint: Send {
    /// The port name.
    fn port(&self) -> &str;
    /// Where the host end is.
    fn addr(&self) -> &EndpointAddr;
    /// The kind.
    fn kind(&self) -> EndpointKind {
        self.addr().kind()
    }
    /// Establishes the next connection within `timeout`: connects to QEMU, accepts QEMU's
    /// connection, or opens the pty. The connection is recorded as
    /// [`EndpointEventKind::Connected`](super::EndpointEventKind::Connected) at the moment it
    /// exists.
    fn connect(&mut self, timeout: Duration) -> Result<Connection, ChardevError>;
    /// This endpoint's connect/disconnect record.
    fn events(&self) -> &EndpointEvents;
}
