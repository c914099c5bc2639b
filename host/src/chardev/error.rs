//! Why a port's host end could not be reached.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;
use thiserror::Error;

/// Why an endpoint could not be reached.
#[derive(Debug, Error)]
pub enum ChardevError {
    /// Connecting to the chardev's unix socket failed.
    #[error("cannot connect to the chardev socket {path} of port {port}")]
    ConnectUnix {
        /// Port name.
        port: String,
        /// Socket path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// Connecting to the chardev's TCP address failed.
    #[error("cannot connect to the chardev address {addr} of port {port}")]
    ConnectTcp {
        /// Port name.
        port: String,
        /// Address.
        addr: SocketAddr,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// Binding or using a listener failed.
    #[error("cannot listen on {addr} for port {port}")]
    Listen {
        /// Port name.
        port: String,
        /// Path or address.
        addr: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// QEMU did not connect to the listener in time.
    #[error("qemu did not connect to {addr} for port {port} within {timeout:?}")]
    AcceptTimeout {
        /// Port name.
        port: String,
        /// Path or address.
        addr: String,
        /// How long we waited.
        timeout: Duration,
    },
    /// A listener that should have been bound before QEMU started is missing.
    #[error("port {port} has no listener at {addr}")]
    NoListener {
        /// Port name.
        port: String,
        /// Path or address.
        addr: String,
    },
    /// The pty's path is not known (QEMU has not reported it).
    #[error("the pty path of port {port} is not known")]
    PtyPathUnknown {
        /// Port name.
        port: String,
    },
    /// Opening or configuring the pty failed.
    #[error("cannot open the pty {path} of port {port}")]
    Pty {
        /// Port name.
        port: String,
        /// Pty slave path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
}
