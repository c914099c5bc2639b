//! A running test rig: one VM started paused, its QMP session, and links to its ports.
//!
//! The VM is started with `-S` so that QMP and the port connections are in place before the
//! guest runs: no `VSERPORT_CHANGE` event and no early byte from the agent can be missed.
//! [`Rig::resume`] then lets the guest boot. Dropping the rig kills QEMU and removes its
//! directory (see [`Vm`]).

use crate::chardev::{connect_unix, ChardevError, Connection, Endpoint, EndpointAddr};
use crate::image::initscript::agent_args_param;
use crate::image::GuestImage;
use crate::link::Link;
use crate::qemu::{PortConfig, PortInfo, Vm, VmConfig, VmError};
use crate::qmp::{Qmp, QmpError};
use crate::session::PortServer;
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::{Duration, Instant};
use thiserror::Error;

/// Deadline for QMP commands issued by the rig.
pub const QMP_TIMEOUT: Duration = Duration::from_secs(10);
/// How many console and stderr lines a failure report carries.
pub const CONTEXT_LINES: usize = 30;

/// What went wrong setting up or driving a rig.
#[derive(Debug, Error)]
pub enum RigError {
    /// QEMU could not be started.
    #[error("cannot start the vm")]
    Vm(#[from] VmError),
    /// QMP failed.
    #[error("qmp failed")]
    Qmp(#[from] QmpError),
    /// A port's chardev could not be connected.
    #[error("cannot reach a port")]
    Chardev(#[from] ChardevError),
    /// The VM has no port of that name.
    #[error("the vm has no port named {0}")]
    NoSuchPort(String),
    /// QEMU did not confirm an unplug in time.
    #[error("qemu sent no DEVICE_DELETED for {device} within {timeout:?} of device_del")]
    NotDeleted {
        /// The device id.
        device: String,
        /// How long vport waited.
        timeout: Duration,
    },
    /// QEMU did not report the pty of a pty port.
    #[error("qemu reported no pty for port {port} (chardev {chardev})")]
    NoPty {
        /// Port name.
        port: String,
        /// Chardev id.
        chardev: String,
    },
}

/// The VM settings for `image` with `ports`, agent arguments passed on the kernel command line.
pub fn vm_config(image: &GuestImage, ports: &[&str], agent_args: &[String]) -> VmConfig {
    let mut cmdline = image.cmdline.clone();
    if !agent_args.is_empty() {
        cmdline.push(' ');
        cmdline.push_str(&agent_args_param(agent_args));
    }
    let mut cfg = VmConfig::new(&image.kernel, &image.initramfs, cmdline);
    cfg.ports = ports.iter().map(|p| PortConfig::serial(*p)).collect();
    cfg
}

/// A VM with QMP connected.
pub struct Rig {
    /// The QEMU process (killed on drop).
    pub vm: Vm,
    /// The QMP session (shared with the [`PortServer`]s of the rig).
    pub qmp: Arc<Qmp>,
    resumed_at: Option<Instant>,
}

impl Rig {
    /// Starts QEMU paused with `cfg` and connects QMP.
    pub fn launch(mut cfg: VmConfig) -> Result<Rig, RigError> {
        if !cfg.extra_args.iter().any(|a| a == "-S") {
            cfg.extra_args.push("-S".into());
        }
        let mut vm = Vm::start(&cfg)?;
        let qmp = Qmp::connect(&vm.qmp_socket(), crate::speed::scaled(QMP_TIMEOUT))?;
        resolve_ptys(&mut vm, &qmp)?;
        Ok(Rig { vm, qmp: Arc::new(qmp), resumed_at: None })
    }

    /// The port called `name`.
    pub fn port(&self, name: &str) -> Result<&PortInfo, RigError> {
        self.vm.port(name).ok_or_else(|| RigError::NoSuchPort(name.into()))
    }

    /// Connects a link to port `name`'s chardev over its unix socket: the default host end
    /// ([`crate::qemu::HostEnd::UnixClient`]), and the one the tests and the conformance suite
    /// use. For a port configured with another host end (TCP, pty, vport listening) use
    /// [`Rig::link`], which goes through the port's [`Endpoint`].
    pub fn connect(&self, name: &str) -> Result<Link<UnixStream>, RigError> {
        let port = self.port(name)?;
        Ok(Link::new(name, connect_unix(name, &port.socket)?))
    }

    /// Connects to port `name`'s chardev as a plain byte stream, without framing: for cases
    /// where an ordinary guest program, not the agent, is at the other end.
    pub fn connect_raw(&self, name: &str) -> Result<UnixStream, RigError> {
        let port = self.port(name)?;
        Ok(connect_unix(name, &port.socket)?)
    }

    /// The host end of port `name`: an [`Endpoint`] of the kind the port was configured with
    /// ([`crate::qemu::HostEnd`]). Each call gives an independent endpoint object; for server
    /// kinds they share the one listener bound before QEMU started.
    pub fn endpoint(&self, name: &str) -> Result<Box<dyn Endpoint>, RigError> {
        let port = self.port(name)?;
        let listener = match self.vm.listener(name) {
            Some(l) => Some(l.try_clone().map_err(|source| ChardevError::Listen {
                port: name.into(),
                addr: port.endpoint.to_string(),
                source,
            })?),
            None => None,
        };
        Ok(crate::chardev::endpoint(name, &port.endpoint, listener)?)
    }

    /// Connects port `name`'s host end (any kind) within `timeout` and returns a link over it.
    pub fn link(&self, name: &str, timeout: Duration) -> Result<Link<Connection>, RigError> {
        let conn = self.endpoint(name)?.connect(timeout)?;
        Ok(Link::new(name, conn))
    }

    /// A session server for port `name` (see [`crate::session`]): its endpoint, a QMP event
    /// subscription taken now, and the port's ids.
    pub fn port_server(&self, name: &str) -> Result<PortServer, RigError> {
        let port = self.port(name)?.clone();
        let endpoint = self.endpoint(name)?;
        Ok(PortServer::new(&port, endpoint, self.qmp.clone()))
    }

    /// Hot-plugs a `virtserialport` called `name` on controller `controller` of the running
    /// VM: QMP `chardev-add` of a unix socket QEMU listens on (`hot-<name>.sock` in the VM
    /// directory, no wait), then `device_add` with id `vport-hot-<name>`. The port is then
    /// known to [`Rig::port`] / [`Rig::connect`]. Returns its description.
    pub fn hotplug_serial_port(&mut self, name: &str, controller: usize) -> Result<PortInfo, RigError> {
        self.hotplug_port(name, crate::qemu::PortKind::Serial, controller)
    }

    /// [`Rig::hotplug_serial_port`] for a port of either kind: a `virtconsole` with
    /// [`crate::qemu::PortKind::Console`].
    pub fn hotplug_port(
        &mut self,
        name: &str,
        kind: crate::qemu::PortKind,
        controller: usize,
    ) -> Result<PortInfo, RigError> {
        let (chardev_id, id) = hotplug_ids(name);
        let socket = self.vm.dir().join(format!("hot-{}.sock", self.vm.ports().len()));
        self.qmp.execute("chardev-add", Some(hotplug_chardev_args(&chardev_id, &socket)))?;
        let mut args = hotplug_device_args(name, &id, &chardev_id, controller);
        if kind == crate::qemu::PortKind::Console {
            args["driver"] = "virtconsole".into();
        }
        self.qmp.device_add(args)?;
        let info = PortInfo {
            name: name.into(),
            id,
            chardev_id,
            kind,
            socket: socket.clone(),
            endpoint: EndpointAddr::UnixClient { path: socket },
            controller,
            nr: None,
        };
        self.vm.add_port(info.clone());
        Ok(info)
    }

    /// Lets the guest run (QMP `cont`) and remembers when.
    pub fn resume(&mut self) -> Result<Instant, RigError> {
        self.qmp.cont()?;
        let now = Instant::now();
        self.resumed_at.get_or_insert(now);
        Ok(now)
    }

    /// When the guest was first resumed.
    pub fn resumed_at(&self) -> Option<Instant> {
        self.resumed_at
    }

    /// The last lines of the guest console and of QEMU's stderr, for failure messages.
    pub fn failure_context(&self) -> String {
        failure_context(&self.vm)
    }
}

/// Unplugs `port` (QMP `device_del`), waits for QEMU's `DEVICE_DELETED` of its device within
/// `timeout`, and plugs the same port in again ([`replug_device_args`]: its driver, controller,
/// number, name, device id and chardev). The chardev, and so the host's socket, stays; the
/// guest sees the port removed and a new port of the same name. A
/// [`PortServer`] of the port ends at the unplug ([`crate::session::EndReason::Unplugged`]):
/// serve the new port with a new one.
pub fn replug_port(qmp: &Qmp, port: &PortInfo, timeout: Duration) -> Result<(), RigError> {
    let events = qmp.subscribe();
    qmp.device_del(&port.id)?;
    let deadline = Instant::now() + timeout;
    let deleted = |ev: &crate::qmp::QmpEvent| {
        ev.name == "DEVICE_DELETED" && ev.data.get("device").and_then(|d| d.as_str()) == Some(port.id.as_str())
    };
    loop {
        match events.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(ev) if deleted(&ev) => break,
            Ok(_) => continue,
            Err(_) => return Err(RigError::NotDeleted { device: port.id.clone(), timeout }),
        }
    }
    qmp.device_add(replug_device_args(port))?;
    Ok(())
}

/// Chardev id and device id of a hot-plugged port called `name`.
pub fn hotplug_ids(name: &str) -> (String, String) {
    let safe: String = name.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' { c } else { '-' }).collect();
    (format!("vport-hotch-{safe}"), format!("vport-hot-{safe}"))
}

/// QMP `chardev-add` arguments: a unix socket chardev `id` listening on `path`, not waiting.
pub fn hotplug_chardev_args(id: &str, path: &std::path::Path) -> serde_json::Value {
    serde_json::json!({
        "id": id,
        "backend": {"type": "socket", "data": {
            "addr": {"type": "unix", "data": {"path": path.to_string_lossy()}},
            "server": true, "wait": false
        }}
    })
}

/// QMP `device_add` arguments of a `virtserialport` `name` (device `id`, chardev `chardev`) on
/// controller `controller` (bus `<controller id>.0`).
pub fn hotplug_device_args(name: &str, id: &str, chardev: &str, controller: usize) -> serde_json::Value {
    serde_json::json!({
        "driver": "virtserialport",
        "bus": format!("{}.0", crate::qemu::controller_id(controller)),
        "chardev": chardev, "id": id, "name": name
    })
}

/// QMP `device_add` arguments that plug `port` in again as it was: the same driver
/// (`virtserialport` or `virtconsole`), controller, number (when it was fixed), chardev, id
/// and name.
pub fn replug_device_args(port: &PortInfo) -> serde_json::Value {
    let driver = match port.kind {
        crate::qemu::PortKind::Serial => "virtserialport",
        crate::qemu::PortKind::Console => "virtconsole",
    };
    let mut args = hotplug_device_args(&port.name, &port.id, &port.chardev_id, port.controller);
    args["driver"] = driver.into();
    if let Some(nr) = port.nr {
        args["nr"] = nr.into();
    }
    args
}

/// Fills in the pty path of every pty port from `query-chardev` (`filename` `pty:/dev/pts/N`).
fn resolve_ptys(vm: &mut Vm, qmp: &Qmp) -> Result<(), RigError> {
    let ptys: Vec<(String, String)> = vm
        .ports()
        .iter()
        .filter(|p| matches!(p.endpoint, EndpointAddr::Pty { .. }))
        .map(|p| (p.name.clone(), p.chardev_id.clone()))
        .collect();
    if ptys.is_empty() {
        return Ok(());
    }
    let chardevs = qmp.query_chardev()?;
    for (name, chardev) in ptys {
        let path = chardevs
            .iter()
            .find(|c| c.label == chardev)
            .and_then(|c| c.filename.strip_prefix("pty:"))
            .ok_or_else(|| RigError::NoPty { port: name.clone(), chardev: chardev.clone() })?;
        log::debug!("port {name}: pty {path}");
        vm.set_pty_path(&name, path.into());
    }
    Ok(())
}

/// The last lines of `vm`'s guest console and QEMU stderr, labelled.
pub fn failure_context(vm: &Vm) -> String {
    let status = match vm.check_alive() {
        Ok(()) => "qemu is running".to_string(),
        Err(e) => e,
    };
    format!(
        "{status}\n--- last {n} lines of the guest console ({}) ---\n{}\n--- last {n} lines of qemu stderr ---\n{}",
        vm.console_log().display(),
        vm.console_tail(CONTEXT_LINES).trim_end(),
        vm.stderr_tail(CONTEXT_LINES).trim_end(),
        n = CONTEXT_LINES,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hotplug_arguments() {
        let (ch, id) = hotplug_ids("org.vport.hot");
        assert_eq!((ch.as_str(), id.as_str()), ("vport-hotch-org-vport-hot", "vport-hot-org-vport-hot"));
        let c = hotplug_chardev_args(&ch, std::path::Path::new("/t/hot-1.sock"));
        assert_eq!(c["backend"]["type"], "socket");
        assert_eq!(c["backend"]["data"]["addr"]["data"]["path"], "/t/hot-1.sock");
        assert_eq!(c["backend"]["data"]["server"], true);
        assert_eq!(c["backend"]["data"]["wait"], false);
        let d = hotplug_device_args("org.vport.hot", &id, &ch, 1);
        assert_eq!(d["bus"], "vser1.0");
        assert_eq!(d["driver"], "virtserialport");
        assert_eq!(d["name"], "org.vport.hot");
    }

    /// A port comes back as it was planned: a console stays a console, a port on the second
    /// controller goes back there, a fixed number is kept.
    #[test]
    fn a_replugged_port_keeps_its_driver_controller_and_number() {
        let port = |kind, controller, nr| PortInfo {
            name: "org.vport.c".into(),
            id: "vport-port3".into(),
            chardev_id: "vport-ch3".into(),
            kind,
            socket: "/t/port3.sock".into(),
            endpoint: EndpointAddr::UnixClient { path: "/t/port3.sock".into() },
            controller,
            nr,
        };
        let d = replug_device_args(&port(crate::qemu::PortKind::Console, 1, Some(5)));
        assert_eq!(d["driver"], "virtconsole");
        assert_eq!(d["bus"], "vser1.0");
        assert_eq!(d["nr"], 5);
        assert_eq!((d["id"].as_str(), d["chardev"].as_str()), (Some("vport-port3"), Some("vport-ch3")));
        let d = replug_device_args(&port(crate::qemu::PortKind::Serial, 0, None));
        assert_eq!(d["driver"], "virtserialport");
        assert_eq!(d["bus"], format!("{}.0", crate::qemu::controller_id(0)));
        assert!(d.get("nr").is_none(), "QEMU picks the number: {d}");
    }
}
