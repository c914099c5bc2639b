//! `vport connect`: a port of a VM started by `vport boot`, bridged to stdin/stdout (the
//! bridge itself is [`crate::connect`]).

use super::{stdout_err, CommandError};
use crate::connect;
use crate::registry;
use crate::usage::UsageError;
use std::io::Write;
use std::os::fd::AsFd;
use std::path::PathBuf;
use std::time::Duration;

/// What `vport connect` is asked for.
#[derive(Debug, Clone)]
pub struct ConnectCommand {
    /// The port, by name.
    pub port: Option<String>,
    /// QEMU pid of the VM, when several have the port.
    pub vm: Option<u32>,
    /// A chardev socket to connect to directly.
    pub socket: Option<PathBuf>,
    /// How long QEMU may take to accept the connection.
    pub timeout: Duration,
    /// Only list the ports of the running VMs.
    pub list: bool,
}

/// `vport connect`: lists the registered ports, or bridges one to stdin/stdout until QEMU
/// closes the connection.
pub fn connect(cmd: &ConnectCommand) -> Result<(), CommandError> {
    if cmd.list {
        let entries = registry::live_entries(&registry::registry_dir(), registry::pid_alive)?;
        let mut out = std::io::stdout();
        return write!(out, "{}", registry::render_list(&entries)).map_err(stdout_err);
    }
    let target = match (&cmd.socket, &cmd.port) {
        (Some(socket), _) => connect::Target::socket(socket),
        (None, Some(port)) => connect::lookup(&registry::registry_dir(), port, cmd.vm)?,
        (None, None) => return Err(UsageError::MissingPort.into()),
    };
    let stream = connect::open(&target, cmd.timeout)?;
    // Raw bytes straight to fd 1: `std::io::stdout()` is line-buffered and would hold back
    // everything after the last newline of binary data until one arrives.
    let stdout = std::fs::File::from(std::io::stdout().as_fd().try_clone_to_owned().map_err(stdout_err)?);
    Ok(connect::bridge(stream, std::io::stdin(), stdout, &target.place())?)
}
