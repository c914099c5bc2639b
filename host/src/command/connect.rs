//! `vport connect`: a port bridged to stdin/stdout (the bridge itself is [`crate::connect`]):
//! a port of a VM started by `vport boot`, found by name, or of a VM vport did not start, given
//! as `--socket NAME=ADDR` (optionally with `--qmp`) or found in a libvirt domain
//! (`--libvirt DOMAIN`, see [`crate::connect_attached`]).

use super::{stdout_err, CommandError};
use crate::connect::{self, PortStream};
use crate::connect_attached::{check_qmp, choose, open_attached, parse_connect_socket};
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
    /// The port's host end given directly: `NAME=ADDR`, or a bare `ADDR` (`PATH` as before).
    pub socket: Option<String>,
    /// The QMP socket of the VM given with `--socket` or `--libvirt`.
    pub qmp: Option<PathBuf>,
    /// A libvirt domain whose channel `port` is.
    pub libvirt: Option<String>,
    /// How long QEMU may take to accept the connection (or to make it, for a listening kind).
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
    check_qmp(cmd.qmp.as_ref())?;
    let (stream, place): (PortStream, String) = match (&cmd.libvirt, &cmd.socket, &cmd.port) {
        (Some(domain), _, port) => {
            let ports: Vec<String> = port.iter().cloned().collect();
            let (spec, _) =
                crate::libvirt::attach_spec(domain, &ports, cmd.qmp.clone()).map_err(connect::ConnectError::from)?;
            let (name, addr) = choose(&spec, port.as_deref(), &format!("domain {domain}"))?;
            open_attached(Some(&name), &addr, cmd.qmp.as_deref(), cmd.timeout)?
        }
        (None, Some(socket), _) => {
            let (name, addr) = parse_connect_socket(socket)?;
            open_attached(name.as_deref(), &addr, cmd.qmp.as_deref(), cmd.timeout)?
        }
        (None, None, Some(port)) => {
            let target = connect::lookup(&registry::registry_dir(), port, cmd.vm)?;
            (PortStream::Unix(connect::open(&target, cmd.timeout)?), target.place())
        }
        (None, None, None) => return Err(UsageError::MissingPort.into()),
    };
    // Raw bytes straight to fd 1: `std::io::stdout()` is line-buffered and would hold back
    // everything after the last newline of binary data until one arrives.
    let stdout = std::fs::File::from(std::io::stdout().as_fd().try_clone_to_owned().map_err(stdout_err)?);
    Ok(connect::bridge(stream, std::io::stdin(), stdout, &place)?)
}
