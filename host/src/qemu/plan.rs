//! Planning a VM, pure: from a [`VmConfig`] to the ids, sockets and host ends of its ports
//! ([`plan_endpoints_on`]) and to QEMU's full command line ([`build_args`]), with the file
//! names of the VM directory. No I/O: the one decision that needs the machine, which loopback
//! TCP port a port gets, is a function the caller passes in.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use super::accel::Accel;
use super::args::{self, ChardevBackend, PortKind, PortSpec};
use super::config::{controller_id, HostEnd, PortConfig, VmConfig, CONTROLLER_ID};
use super::machine::Transport;
use crate::chardev::EndpointAddr;

/// The QMP socket, in the VM directory.
pub const QMP_SOCKET: &str = "qmp.sock";
/// The socket of the second QMP monitor of [`VmConfig::tools_qmp`], in the VM directory.
pub const TOOLS_QMP_SOCKET: &str = "qmp-tools.sock";
/// The serial console (guest `ttyS0`) log, in the VM directory.
pub const CONSOLE_LOG: &str = "console.log";
/// QEMU's stdout and stderr, in the VM directory.
pub const QEMU_LOG: &str = "qemu.log";

/// Why the ports of a configuration cannot be planned.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    /// The port list is invalid.
    #[error("invalid port {name:?}: {reason}")]
    InvalidPort {
        /// The port's name.
        name: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// No loopback TCP port could be had for a TCP host end.
    #[error("cannot pick a loopback tcp port for port {name:?}")]
    TcpPort {
        /// The port's name.
        name: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
}

/// A created port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortInfo {
    /// Name the guest sees.
    pub name: String,
    /// QEMU device id (appears in `VSERPORT_CHANGE` events).
    pub id: String,
    /// QEMU chardev id.
    pub chardev_id: String,
    /// Device type.
    pub kind: PortKind,
    /// Unix socket QEMU listens on ([`HostEnd::UnixClient`] ports; empty for other kinds).
    pub socket: PathBuf,
    /// The host end.
    pub endpoint: EndpointAddr,
    /// Index of the controller the port is on (0: the first).
    pub controller: usize,
    /// Fixed port number on the bus (`nr=`), or `None` where QEMU chose it.
    pub nr: Option<u32>,
}

impl PortInfo {
    /// The port planned as `spec` with host end `endpoint`.
    pub fn planned(spec: &PortSpec, endpoint: EndpointAddr) -> PortInfo {
        PortInfo {
            name: spec.name.clone(),
            id: spec.id.clone(),
            chardev_id: spec.chardev_id.clone(),
            kind: spec.kind,
            socket: match &spec.backend {
                ChardevBackend::UnixServer { path } => path.clone(),
                _ => PathBuf::new(),
            },
            endpoint,
            controller: spec.controller,
            nr: spec.nr,
        }
    }
}

/// Port specs for `ports` with sockets in `dir`: ids `vport-port<i>`, chardevs `vport-ch<i>`,
/// sockets `port<i>.sock` (short, so paths stay under the 108-byte unix socket limit; vport's
/// own listening sockets are `port<i>.host.sock`). TCP ports are chosen by [`plan_endpoints`].
pub fn plan_ports(dir: &Path, ports: &[PortConfig]) -> Result<Vec<PortSpec>, PlanError> {
    plan_endpoints(dir, ports, &mut |_| Ok(0)).map(|v| v.into_iter().map(|(s, _)| s).collect())
}

/// Like [`plan_ports`], with each port's host end; `tcp_port(i)` picks the loopback TCP port of
/// port `i` (for TCP host ends).
pub fn plan_endpoints(
    dir: &Path,
    ports: &[PortConfig],
    tcp_port: &mut dyn FnMut(usize) -> std::io::Result<u16>,
) -> Result<Vec<(PortSpec, EndpointAddr)>, PlanError> {
    plan_endpoints_on(dir, ports, usize::MAX, tcp_port)
}

/// Like [`plan_endpoints`] for a VM with `controllers` extra controllers (a port on a
/// controller beyond them is an error).
pub fn plan_endpoints_on(
    dir: &Path,
    ports: &[PortConfig],
    controllers: usize,
    tcp_port: &mut dyn FnMut(usize) -> std::io::Result<u16>,
) -> Result<Vec<(PortSpec, EndpointAddr)>, PlanError> {
    let mut out: Vec<(PortSpec, EndpointAddr)> = Vec::new();
    for (i, p) in ports.iter().enumerate() {
        let bad = |reason| PlanError::InvalidPort { name: p.name.clone(), reason };
        if p.controller > controllers {
            return Err(bad("the port names a controller the vm does not have"));
        }
        if p.name.is_empty() {
            return Err(bad("port names must not be empty"));
        }
        if p.name.contains('\0') {
            return Err(bad("port names must not contain NUL"));
        }
        if out.iter().any(|(o, _)| o.name == p.name) {
            return Err(bad("duplicate port name"));
        }
        if matches!(p.host, HostEnd::UnixServer { reconnect_secs: 0 } | HostEnd::TcpServer { reconnect_secs: 0 }) {
            return Err(bad("a host end that qemu connects to needs reconnect_secs >= 1"));
        }
        let loopback = std::net::Ipv4Addr::LOCALHOST;
        let tcp = |tcp_port: &mut dyn FnMut(usize) -> std::io::Result<u16>| {
            tcp_port(i).map_err(|source| PlanError::TcpPort { name: p.name.clone(), source })
        };
        let (backend, addr) = match p.host {
            HostEnd::UnixClient => {
                let path = dir.join(format!("port{i}.sock"));
                (ChardevBackend::UnixServer { path: path.clone() }, EndpointAddr::UnixClient { path })
            }
            HostEnd::UnixServer { reconnect_secs } => {
                let path = dir.join(format!("port{i}.host.sock"));
                (
                    ChardevBackend::UnixClient { path: path.clone(), reconnect_secs },
                    EndpointAddr::UnixServer { path, reconnect_secs },
                )
            }
            HostEnd::TcpClient => {
                let port = tcp(tcp_port)?;
                (
                    ChardevBackend::TcpServer { host: loopback.to_string(), port },
                    EndpointAddr::TcpClient { addr: (loopback, port).into() },
                )
            }
            HostEnd::TcpServer { reconnect_secs } => {
                let port = tcp(tcp_port)?;
                (
                    ChardevBackend::TcpClient { host: loopback.to_string(), port, reconnect_secs },
                    EndpointAddr::TcpServer { addr: (loopback, port).into(), reconnect_secs },
                )
            }
            HostEnd::Pty => (ChardevBackend::Pty, EndpointAddr::Pty { path: None }),
        };
        let spec = PortSpec {
            name: p.name.clone(),
            id: format!("vport-port{i}"),
            chardev_id: format!("vport-ch{i}"),
            kind: p.kind,
            backend,
            nr: None,
            controller: p.controller,
        };
        out.push((spec, addr));
    }
    Ok(out)
}

/// Whether the guest of `cfg` under `accel` needs the host's TSC rate on its kernel command line:
/// `microvm` under TCG, which has no timer to calibrate the TSC against when the PIT fails
/// (see [`super::tsc`]).
pub fn needs_host_tsc_rate(cfg: &VmConfig, accel: Accel) -> bool {
    accel == Accel::Tcg && Transport::of(&cfg.machine) == Transport::Mmio
}

/// The guest's kernel command line: `cfg`'s, with the host's TSC rate when given (see
/// [`needs_host_tsc_rate`]).
pub fn kernel_cmdline(cfg: &VmConfig, host_tsc_khz: Option<u32>) -> String {
    match host_tsc_khz {
        Some(khz) => format!("{} {}", cfg.cmdline, super::tsc::kernel_param(khz)),
        None => cfg.cmdline.clone(),
    }
}

/// The full QEMU argument list for `cfg` under `accel`, with files in `dir`; `host_tsc_khz` as
/// [`kernel_cmdline`] takes it.
pub fn build_args(
    cfg: &VmConfig,
    accel: Accel,
    host_tsc_khz: Option<u32>,
    dir: &Path,
    ports: &[PortSpec],
) -> Vec<OsString> {
    let mut a = args::machine_args(&cfg.machine, accel);
    a.extend(args::memory_args(cfg.memory_mib));
    a.extend(args::smp_args(cfg.cpus));
    a.extend(args::base_args());
    a.extend(args::kernel_args(&cfg.kernel, &cfg.initrd, &kernel_cmdline(cfg, host_tsc_khz)));
    a.extend(args::console_args(&dir.join(CONSOLE_LOG)));
    let transport = Transport::of(&cfg.machine);
    a.extend(args::virtio_serial_args(transport, CONTROLLER_ID, cfg.max_ports));
    for (i, max) in cfg.extra_controllers.iter().enumerate() {
        a.extend(args::virtio_serial_args(transport, &controller_id(i + 1), *max));
    }
    for p in ports {
        a.extend(args::port_args(&controller_id(p.controller), p));
    }
    if let Some(uri) = &cfg.incoming {
        a.extend(args::incoming_args(uri));
    }
    if cfg.tools_qmp {
        a.extend(args::monitor_args("qmp-tools", &dir.join(TOOLS_QMP_SOCKET)));
    }
    // Last, so that the QMP socket existing implies every other socket exists too.
    a.extend(args::qmp_args(&dir.join(QMP_SOCKET)));
    a.extend(cfg.extra_args.iter().cloned());
    a
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plans_ports_with_ids_and_rejects_bad_names() {
        let specs = plan_ports(Path::new("/t"), &[PortConfig::serial("a"), PortConfig::serial("b")]).unwrap();
        assert_eq!(specs[1].id, "vport-port1");
        assert_eq!(specs[1].chardev_id, "vport-ch1");
        assert_eq!(specs[1].backend, ChardevBackend::UnixServer { path: "/t/port1.sock".into() });
        assert!(matches!(
            plan_ports(Path::new("/t"), &[PortConfig::serial("a"), PortConfig::serial("a")]),
            Err(PlanError::InvalidPort { .. })
        ));
        assert!(plan_ports(Path::new("/t"), &[PortConfig::serial("")]).is_err());
    }

    #[test]
    fn plans_each_host_end_with_the_opposite_qemu_role() {
        let ports = [
            PortConfig::serial("a"),
            PortConfig::serial("b").with_host(HostEnd::UnixServer { reconnect_secs: 1 }),
            PortConfig::serial("c").with_host(HostEnd::TcpClient),
            PortConfig::serial("d").with_host(HostEnd::TcpServer { reconnect_secs: 2 }),
            PortConfig::serial("e").with_host(HostEnd::Pty),
        ];
        let p = plan_endpoints(Path::new("/t"), &ports, &mut |i| Ok(4000 + i as u16)).unwrap();
        assert_eq!(p[0].1, EndpointAddr::UnixClient { path: "/t/port0.sock".into() });
        assert_eq!(p[1].0.backend, ChardevBackend::UnixClient { path: "/t/port1.host.sock".into(), reconnect_secs: 1 });
        assert_eq!(p[2].0.backend, ChardevBackend::TcpServer { host: "127.0.0.1".into(), port: 4002 });
        assert_eq!(p[2].1, EndpointAddr::TcpClient { addr: "127.0.0.1:4002".parse().unwrap() });
        assert_eq!(
            p[3].0.backend,
            ChardevBackend::TcpClient { host: "127.0.0.1".into(), port: 4003, reconnect_secs: 2 }
        );
        assert_eq!(p[4], (p[4].0.clone(), EndpointAddr::Pty { path: None }));
        assert_eq!(p[4].0.backend, ChardevBackend::Pty);
        let bad = [PortConfig::serial("x").with_host(HostEnd::UnixServer { reconnect_secs: 0 })];
        assert!(plan_endpoints(Path::new("/t"), &bad, &mut |_| Ok(1)).is_err());
    }

    #[test]
    fn second_controller_and_incoming_args() {
        let mut cfg = VmConfig::new("/k", "/i", "console=ttyS0");
        cfg.ports = vec![PortConfig::serial("a"), PortConfig::serial("b").on_controller(1)];
        cfg.extra_controllers = vec![Some(4)];
        cfg.incoming = Some("unix:/t/mig.sock".into());
        let specs = plan_endpoints_on(Path::new("/t"), &cfg.ports, 1, &mut |_| Ok(0))
            .unwrap()
            .into_iter()
            .map(|(s, _)| s)
            .collect::<Vec<_>>();
        assert_eq!(specs[1].controller, 1);
        let a: Vec<String> = build_args(&cfg, Accel::Tcg, None, Path::new("/t"), &specs)
            .into_iter()
            .map(|s| s.into_string().unwrap())
            .collect();
        assert!(a.contains(&"virtio-serial-pci,id=vser1,max_ports=4".to_string()), "{a:?}");
        assert!(a.iter().any(|x| x.starts_with("virtserialport,bus=vser0.0,chardev=vport-ch0,")), "{a:?}");
        assert!(a.iter().any(|x| x.starts_with("virtserialport,bus=vser1.0,chardev=vport-ch1,")), "{a:?}");
        let i = a.iter().position(|x| x == "-incoming").unwrap();
        assert_eq!(a[i + 1], "unix:/t/mig.sock");
        assert_eq!(controller_id(0), CONTROLLER_ID);
        let bad = [PortConfig::serial("c").on_controller(2)];
        assert!(plan_endpoints_on(Path::new("/t"), &bad, 1, &mut |_| Ok(0)).is_err());
    }

    #[test]
    fn full_args_put_qmp_after_ports() {
        let mut cfg = VmConfig::new("/k", "/i", "console=ttyS0");
        cfg.ports = vec![PortConfig::serial("p")];
        cfg.max_ports = Some(2);
        cfg.tools_qmp = true;
        let specs = plan_ports(Path::new("/t"), &cfg.ports).unwrap();
        let a: Vec<String> = build_args(&cfg, Accel::Tcg, None, Path::new("/t"), &specs)
            .into_iter()
            .map(|s| s.into_string().unwrap())
            .collect();
        let pos = |s: &str| a.iter().position(|x| x.starts_with(s)).unwrap_or_else(|| panic!("{s} not in {a:?}"));
        assert!(pos("virtio-serial-pci,id=vser0,max_ports=2") < pos("virtserialport,bus=vser0.0"));
        assert!(pos("virtserialport") < pos("socket,id=qmp"));
        assert!(pos("socket,id=qmp-tools,path=/t/qmp-tools.sock") < pos("socket,id=qmp,path=/t/qmp.sock"));
        assert!(a.contains(&"file,id=console,path=/t/console.log".to_string()));
        assert_eq!(&a[..4], ["-machine", "pc", "-accel", "tcg"]);
    }

    #[test]
    fn microvm_puts_every_controller_on_virtio_mmio_with_the_same_buses() {
        let mut cfg = VmConfig::new("/k", "/i", "console=ttyS0");
        cfg.machine = "microvm".into();
        cfg.ports = vec![PortConfig::serial("a"), PortConfig::serial("b").on_controller(1)];
        cfg.extra_controllers = vec![None];
        let specs = plan_endpoints_on(Path::new("/t"), &cfg.ports, 1, &mut |_| Ok(0))
            .unwrap()
            .into_iter()
            .map(|(s, _)| s)
            .collect::<Vec<_>>();
        let a: Vec<String> = build_args(&cfg, Accel::Tcg, None, Path::new("/t"), &specs)
            .into_iter()
            .map(|s| s.into_string().unwrap())
            .collect();
        assert_eq!(&a[..2], ["-machine", "microvm,acpi=on,auto-kernel-cmdline=off,isa-serial=on,rtc=on"]);
        assert!(a.contains(&"virtio-serial-device,id=vser0".to_string()), "{a:?}");
        assert!(a.contains(&"virtio-serial-device,id=vser1".to_string()), "{a:?}");
        assert!(!a.iter().any(|x| x.contains("-pci")), "{a:?}");
        assert!(a.iter().any(|x| x.starts_with("virtserialport,bus=vser1.0,chardev=vport-ch1,")), "{a:?}");
        assert!(a.contains(&"chardev:console".to_string()), "the isa-serial console: {a:?}");
        assert!(needs_host_tsc_rate(&cfg, Accel::Tcg));
        assert!(!needs_host_tsc_rate(&cfg, Accel::Kvm), "kvmclock gives the rate");
        assert!(!needs_host_tsc_rate(&VmConfig::new("/k", "/i", "c"), Accel::Tcg), "pc has the ACPI PM timer");
        let a = build_args(&cfg, Accel::Tcg, Some(2_600_000), Path::new("/t"), &specs);
        let i = a.iter().position(|x| x == "-append").unwrap();
        assert_eq!(a[i + 1], "console=ttyS0 tsc_early_khz=2600000");
    }

    #[test]
    fn a_tcp_port_that_cannot_be_had_names_the_port() {
        let ports = [PortConfig::serial("a"), PortConfig::serial("t").with_host(HostEnd::TcpClient)];
        let err =
            plan_endpoints(Path::new("/t"), &ports, &mut |_| Err(std::io::ErrorKind::AddrInUse.into())).unwrap_err();
        assert!(matches!(&err, PlanError::TcpPort { name, .. } if name == "t"), "{err:?}");
    }

    #[test]
    fn port_info_keeps_the_socket_qemu_listens_on_only() {
        let ports = [PortConfig::serial("a"), PortConfig::serial("b").with_host(HostEnd::Pty)];
        let p = plan_endpoints(Path::new("/t"), &ports, &mut |_| Ok(0)).unwrap();
        let infos: Vec<PortInfo> = p.into_iter().map(|(s, e)| PortInfo::planned(&s, e)).collect();
        assert_eq!(infos[0].socket, Path::new("/t/port0.sock"));
        assert_eq!((infos[0].id.as_str(), infos[0].chardev_id.as_str()), ("vport-port0", "vport-ch0"));
        assert_eq!(infos[1].socket, PathBuf::new());
        assert_eq!(infos[1].endpoint, EndpointAddr::Pty { path: None });
    }
}
