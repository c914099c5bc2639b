//! QEMU command-line fragments, one small pure function per concern (no I/O; each one
//! unit-tested below). [`super::plan::build_args`] puts a VM's together.
//!
//! Option values are escaped with [`escape`] (QEMU splits options on `,`; a literal comma
//! is written `,,`).

use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};

use super::accel::Accel;
use super::machine::{machine_value, Transport};

/// Doubles every comma so `s` can be used as a QEMU option value.
pub fn escape(s: &OsStr) -> OsString {
    let mut out = Vec::with_capacity(s.len());
    for &b in s.as_bytes() {
        out.push(b);
        if b == b',' {
            out.push(b',');
        }
    }
    OsString::from_vec(out)
}

fn os(s: impl AsRef<OsStr>) -> OsString {
    s.as_ref().to_os_string()
}

/// Concatenates string and path pieces into one argument.
fn cat(parts: &[&OsStr]) -> OsString {
    let mut o = OsString::new();
    for p in parts {
        o.push(p);
    }
    o
}

/// `-machine <machine> -accel <accel>` (`microvm` with its options: [`machine_value`]), plus
/// `-cpu host` under KVM. Under TCG the default CPU model is kept (it boots the Debian kernel;
/// `-cpu max` measured no faster).
pub fn machine_args(machine: &str, accel: Accel) -> Vec<OsString> {
    let mut v = vec![os("-machine"), os(machine_value(machine)), os("-accel"), os(accel.as_str())];
    if accel == Accel::Kvm {
        v.extend([os("-cpu"), os("host")]);
    }
    v
}

/// `-m <mib>M`.
pub fn memory_args(mib: u32) -> Vec<OsString> {
    vec![os("-m"), os(format!("{mib}M"))]
}

/// `-smp <cpus>`.
pub fn smp_args(cpus: u32) -> Vec<OsString> {
    vec![os("-smp"), os(cpus.to_string())]
}

/// No default devices, no config files, no display, exit instead of rebooting.
pub fn base_args() -> Vec<OsString> {
    ["-nodefaults", "-no-user-config", "-display", "none", "-no-reboot"].map(os).to_vec()
}

/// Direct kernel boot: `-kernel`, `-initrd`, `-append` (plain values: QEMU does not split
/// these on commas for a Linux kernel).
pub fn kernel_args(kernel: &Path, initrd: &Path, append: &str) -> Vec<OsString> {
    vec![os("-kernel"), os(kernel), os("-initrd"), os(initrd), os("-append"), os(append)]
}

/// The first serial port (guest `ttyS0`) written to the file `log`.
pub fn console_args(log: &Path) -> Vec<OsString> {
    vec![
        os("-chardev"),
        cat(&["file,id=console,path=".as_ref(), &escape(log.as_os_str())]),
        os("-serial"),
        os("chardev:console"),
    ]
}

/// A QMP monitor listening on the unix socket `sock` (QEMU creates it, does not wait).
pub fn qmp_args(sock: &Path) -> Vec<OsString> {
    monitor_args("qmp", sock)
}

/// A QMP monitor on chardev `id` listening on the unix socket `sock`. Like every socket
/// chardev it serves one client at a time; a VM can have several.
pub fn monitor_args(id: &str, sock: &Path) -> Vec<OsString> {
    let id = escape(id.as_ref());
    vec![
        os("-chardev"),
        cat(&[
            "socket,id=".as_ref(),
            &id,
            ",path=".as_ref(),
            &escape(sock.as_os_str()),
            ",server=on,wait=off".as_ref(),
        ]),
        os("-mon"),
        cat(&["chardev=".as_ref(), &id, ",mode=control".as_ref()]),
    ]
}

/// A virtio-serial controller on `transport` (`virtio-serial-pci` or `virtio-serial-device`)
/// with device id `id` (its bus is `<id>.0` on both) and at most `max_ports` ports (QEMU default
/// 31 when `None`).
pub fn virtio_serial_args(transport: Transport, id: &str, max_ports: Option<u32>) -> Vec<OsString> {
    let mut dev = format!("{},id={}", transport.serial_controller(), escape(id.as_ref()).to_string_lossy());
    if let Some(n) = max_ports {
        dev.push_str(&format!(",max_ports={n}"));
    }
    vec![os("-device"), os(dev)]
}

/// `-incoming <uri>`: wait for a migration stream (`exec:cat FILE`, `unix:PATH`, `tcp:...`).
pub fn incoming_args(uri: &str) -> Vec<OsString> {
    vec![os("-incoming"), os(uri)]
}

/// `-plugin file=<plugin>,<key>=<value>...`: a TCG plugin and its arguments (values escaped).
pub fn plugin_args(plugin: &Path, plugin_args: &[(&str, &OsStr)]) -> Vec<OsString> {
    let mut spec = cat(&[OsStr::new("file="), &escape(plugin.as_os_str())]);
    for (key, value) in plugin_args {
        spec.push(format!(",{key}="));
        spec.push(escape(value));
    }
    vec![os("-plugin"), spec]
}

/// The host side of a port: which kind of QEMU chardev backs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChardevBackend {
    /// QEMU listens on a unix socket at `path` and does not wait for a client at startup.
    UnixServer {
        /// Socket path.
        path: PathBuf,
    },
    /// QEMU connects to a unix socket at `path`, retrying every `reconnect_secs` seconds.
    UnixClient {
        /// Socket path.
        path: PathBuf,
        /// Reconnect interval in seconds (0: no reconnect).
        reconnect_secs: u32,
    },
    /// QEMU listens on a TCP address and does not wait for a client at startup.
    TcpServer {
        /// Listen host.
        host: String,
        /// Listen port.
        port: u16,
    },
    /// QEMU connects to a TCP listener at `host:port`, retrying every `reconnect_secs` seconds.
    TcpClient {
        /// Host to connect to.
        host: String,
        /// Port to connect to.
        port: u16,
        /// Reconnect interval in seconds (0: no reconnect).
        reconnect_secs: u32,
    },
    /// A pseudo terminal allocated by QEMU.
    Pty,
}

/// `-chardev` for backend `b` with chardev id `id`.
pub fn chardev_args(id: &str, b: &ChardevBackend) -> Vec<OsString> {
    let id = escape(id.as_ref());
    let spec = match b {
        ChardevBackend::UnixServer { path } => cat(&[
            "socket,id=".as_ref(),
            &id,
            ",path=".as_ref(),
            &escape(path.as_os_str()),
            ",server=on,wait=off".as_ref(),
        ]),
        ChardevBackend::UnixClient { path, reconnect_secs } => cat(&[
            "socket,id=".as_ref(),
            &id,
            ",path=".as_ref(),
            &escape(path.as_os_str()),
            format!(",server=off,reconnect={reconnect_secs}").as_ref(),
        ]),
        ChardevBackend::TcpServer { host, port } => cat(&[
            "socket,id=".as_ref(),
            &id,
            format!(",host={},port={port},server=on,wait=off", escape(host.as_ref()).to_string_lossy()).as_ref(),
        ]),
        ChardevBackend::TcpClient { host, port, reconnect_secs } => cat(&[
            "socket,id=".as_ref(),
            &id,
            format!(
                ",host={},port={port},server=off,reconnect={reconnect_secs}",
                escape(host.as_ref()).to_string_lossy()
            )
            .as_ref(),
        ]),
        ChardevBackend::Pty => cat(&["pty,id=".as_ref(), &id]),
    };
    vec![os("-chardev"), spec]
}

/// Guest-side device type of a port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PortKind {
    /// `virtserialport`: a generic port (`/dev/vport*`, `/sys/class/virtio-ports/*`).
    Serial,
    /// `virtconsole`: a console port (`/dev/hvc*`).
    Console,
}

/// One virtio-serial port on the controller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortSpec {
    /// Port name the guest sees (`/sys/class/virtio-ports/vportNpM/name`).
    pub name: String,
    /// QEMU device id: QMP `VSERPORT_CHANGE` events carry it (and are only sent for ports
    /// that have one).
    pub id: String,
    /// Chardev id.
    pub chardev_id: String,
    /// Device type.
    pub kind: PortKind,
    /// Backing chardev.
    pub backend: ChardevBackend,
    /// Fixed port number on the bus (`nr=`), or `None` to let QEMU choose.
    pub nr: Option<u32>,
    /// Controller index (0: the first controller); informational here, [`port_args`] takes
    /// the controller id.
    pub controller: usize,
}

/// `-chardev` + `-device virtserialport|virtconsole` for `port` on the controller `controller_id`.
pub fn port_args(controller_id: &str, port: &PortSpec) -> Vec<OsString> {
    let mut v = chardev_args(&port.chardev_id, &port.backend);
    let driver = match port.kind {
        PortKind::Serial => "virtserialport",
        PortKind::Console => "virtconsole",
    };
    let e = |s: &str| escape(s.as_ref()).to_string_lossy().into_owned();
    let mut dev = format!(
        "{driver},bus={}.0,chardev={},id={},name={}",
        e(controller_id),
        e(&port.chardev_id),
        e(&port.id),
        e(&port.name)
    );
    if let Some(nr) = port.nr {
        dev.push_str(&format!(",nr={nr}"));
    }
    v.extend([os("-device"), os(dev)]);
    v
}

/// Arguments of the KVM probe: boot the probe firmware `bios` under `accel` with an
/// `isa-debug-exit` device at port 0xf4 (the port the firmware writes to).
pub fn probe_args(bios: &Path, accel: Accel) -> Vec<OsString> {
    let mut v = vec![os("-accel"), os(accel.as_str()), os("-machine"), os("pc")];
    v.extend(base_args());
    v.extend([os("-bios"), escape(bios.as_os_str()), os("-device"), os("isa-debug-exit,iobase=0xf4,iosize=0x04")]);
    v
}

/// Arguments of the kernel probe: boot `kernel` under `accel` without initramfs, console
/// to the file `console`; the kernel panics for lack of a root file system and, with
/// `panic=-1` and `-no-reboot`, QEMU exits with status 0.
pub fn probe_kernel_args(kernel: &Path, console: &Path, accel: Accel) -> Vec<OsString> {
    let mut v = vec![os("-accel"), os(accel.as_str()), os("-machine"), os("pc")];
    v.extend(memory_args(128));
    v.extend(base_args());
    v.extend([os("-kernel"), os(kernel), os("-append"), os("console=ttyS0 panic=-1 loglevel=1")]);
    v.extend(console_args(console));
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: Vec<OsString>) -> Vec<String> {
        v.into_iter().map(|a| a.into_string().unwrap()).collect()
    }

    #[test]
    fn escapes_commas() {
        assert_eq!(escape("/a,b,,c".as_ref()), "/a,,b,,,,c");
        assert_eq!(escape("plain".as_ref()), "plain");
    }

    #[test]
    fn machine_and_accel() {
        assert_eq!(s(machine_args("pc", Accel::Tcg)), ["-machine", "pc", "-accel", "tcg"]);
        assert_eq!(s(machine_args("q35", Accel::Kvm)), ["-machine", "q35", "-accel", "kvm", "-cpu", "host"]);
        assert_eq!(
            s(machine_args("microvm", Accel::Tcg)),
            ["-machine", "microvm,acpi=on,auto-kernel-cmdline=off,isa-serial=on,rtc=on", "-accel", "tcg"]
        );
    }

    #[test]
    fn memory_smp_base() {
        assert_eq!(s(memory_args(256)), ["-m", "256M"]);
        assert_eq!(s(smp_args(2)), ["-smp", "2"]);
        assert_eq!(s(base_args()), ["-nodefaults", "-no-user-config", "-display", "none", "-no-reboot"]);
    }

    #[test]
    fn kernel_boot() {
        assert_eq!(
            s(kernel_args(Path::new("/k"), Path::new("/i"), "console=ttyS0 quiet")),
            ["-kernel", "/k", "-initrd", "/i", "-append", "console=ttyS0 quiet"]
        );
    }

    #[test]
    fn console_and_qmp() {
        assert_eq!(
            s(console_args(Path::new("/t/console.log"))),
            ["-chardev", "file,id=console,path=/t/console.log", "-serial", "chardev:console"]
        );
        assert_eq!(
            s(qmp_args(Path::new("/t/q,mp.sock"))),
            ["-chardev", "socket,id=qmp,path=/t/q,,mp.sock,server=on,wait=off", "-mon", "chardev=qmp,mode=control"]
        );
        assert_eq!(
            s(monitor_args("qmp-tools", Path::new("/t/qmp-tools.sock"))),
            [
                "-chardev",
                "socket,id=qmp-tools,path=/t/qmp-tools.sock,server=on,wait=off",
                "-mon",
                "chardev=qmp-tools,mode=control"
            ]
        );
    }

    #[test]
    fn controller() {
        assert_eq!(s(virtio_serial_args(Transport::Pci, "vser0", None)), ["-device", "virtio-serial-pci,id=vser0"]);
        assert_eq!(
            s(virtio_serial_args(Transport::Pci, "vser0", Some(4))),
            ["-device", "virtio-serial-pci,id=vser0,max_ports=4"]
        );
        assert_eq!(
            s(virtio_serial_args(Transport::Mmio, "vser1", Some(4))),
            ["-device", "virtio-serial-device,id=vser1,max_ports=4"]
        );
    }

    #[test]
    fn chardev_backends() {
        assert_eq!(
            s(chardev_args("c1", &ChardevBackend::UnixClient { path: "/s".into(), reconnect_secs: 1 })),
            ["-chardev", "socket,id=c1,path=/s,server=off,reconnect=1"]
        );
        assert_eq!(
            s(chardev_args("c2", &ChardevBackend::TcpServer { host: "127.0.0.1".into(), port: 4444 })),
            ["-chardev", "socket,id=c2,host=127.0.0.1,port=4444,server=on,wait=off"]
        );
        assert_eq!(s(chardev_args("c3", &ChardevBackend::Pty)), ["-chardev", "pty,id=c3"]);
        assert_eq!(
            s(chardev_args(
                "c4",
                &ChardevBackend::TcpClient { host: "127.0.0.1".into(), port: 5555, reconnect_secs: 1 }
            )),
            ["-chardev", "socket,id=c4,host=127.0.0.1,port=5555,server=off,reconnect=1"]
        );
    }

    #[test]
    fn plugin() {
        let args = plugin_args(Path::new("/c/p,1.so"), &[("out", OsStr::new("/w/n,2")), ("x", OsStr::new("y"))]);
        assert_eq!(args, [os("-plugin"), os("file=/c/p,,1.so,out=/w/n,,2,x=y")]);
    }

    #[test]
    fn incoming() {
        assert_eq!(s(incoming_args("exec:cat /t/state")), ["-incoming", "exec:cat /t/state"]);
        assert_eq!(s(incoming_args("unix:/t/mig.sock")), ["-incoming", "unix:/t/mig.sock"]);
    }

    #[test]
    fn ports() {
        let mut p = PortSpec {
            name: "org.vport.ctl".into(),
            id: "vport-port0".into(),
            chardev_id: "vport-ch0".into(),
            kind: PortKind::Serial,
            backend: ChardevBackend::UnixServer { path: "/t/port0.sock".into() },
            nr: None,
            controller: 0,
        };
        assert_eq!(
            s(port_args("vser0", &p)),
            [
                "-chardev",
                "socket,id=vport-ch0,path=/t/port0.sock,server=on,wait=off",
                "-device",
                "virtserialport,bus=vser0.0,chardev=vport-ch0,id=vport-port0,name=org.vport.ctl"
            ]
        );
        p.kind = PortKind::Console;
        p.nr = Some(0);
        p.name = "a,b".into();
        assert_eq!(
            s(port_args("vser0", &p))[3],
            "virtconsole,bus=vser0.0,chardev=vport-ch0,id=vport-port0,name=a,,b,nr=0"
        );
    }

    #[test]
    fn probe() {
        let a = s(probe_args(Path::new("/t/bios.bin"), Accel::Kvm));
        assert_eq!(&a[..4], ["-accel", "kvm", "-machine", "pc"]);
        assert!(a.windows(2).any(|w| w == ["-bios", "/t/bios.bin"]));
        assert!(a.windows(2).any(|w| w == ["-device", "isa-debug-exit,iobase=0xf4,iosize=0x04"]));
        assert!(a.contains(&"-nodefaults".to_string()));
        let k = s(probe_kernel_args(Path::new("/k"), Path::new("/t/c.log"), Accel::Kvm));
        assert!(k.windows(2).any(|w| w == ["-kernel", "/k"]));
        assert!(k.windows(2).any(|w| w == ["-append", "console=ttyS0 panic=-1 loglevel=1"]));
        assert!(k.contains(&"-no-reboot".to_string()) && !k.contains(&"-initrd".to_string()));
        assert!(k.contains(&"file,id=console,path=/t/c.log".to_string()));
    }
}
