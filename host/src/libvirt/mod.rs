//! `--libvirt DOMAIN`: the virtio-serial ports of a libvirt domain, read from its XML (`virsh
//! dumpxml DOMAIN`), as an [`AttachSpec`] for `vport hello`, `watch` and `connect`.
//!
//! Each `<channel>` whose `<target type='virtio' name=NAME>` names a port becomes a port
//! `NAME`, its host end from `<source>`:
//!
//! | domain XML | QEMU | vport's [`EndpointAddr`] |
//! |---|---|---|
//! | `<channel type='unix'><source mode='bind' path=P/>` | listens on `P` | `unix:P` (vport connects) |
//! | `<channel type='unix'><source mode='connect' path=P/>` | connects to `P` | `unix-listen:P` (vport listens) |
//! | `<channel type='tcp'><source mode='bind' host=H service=S/>` | listens | `tcp:H:S` |
//! | `<channel type='tcp'><source mode='connect' host=H service=S/>` | connects | `tcp-listen:H:S` |
//! | `<channel type='pty'><source path=/dev/pts/N/>` | a pty | `pty:/dev/pts/N` |
//!
//! A channel of another type (`spicevmc`, `pipe`, ...) or without a path (a domain that is not
//! running: libvirt chooses the unix path, under `/var/lib/libvirt/qemu/channel/target/`, and
//! the pty at start) is listed with the reason vport cannot reach it. `state='connected'` /
//! `'disconnected'` on the target (live XML only) is whether the guest has the port open, as
//! libvirt last heard from QEMU's `VSERPORT_CHANGE`.
//!
//! QMP: libvirt holds QEMU's monitor, so vport has none of its own under `--libvirt` unless
//! `--qmp PATH` names a second monitor the domain was given (`<qemu:commandline>` with `-qmp
//! unix:PATH,server=on,wait=off`, see guest/README.md); without it QMP facts are reported
//! unavailable, as for `--socket` without `--qmp`. QMP through `virsh qemu-monitor-command` and
//! `qemu-monitor-event` is not built.
//!
//! `virsh` is `$VPORT_VIRSH` ([`VIRSH_ENV`]), else `virsh` on `PATH`; it connects to libvirt's
//! default URI (`LIBVIRT_DEFAULT_URI`, root: `qemu:///system`).

use crate::attach::AttachSpec;
use crate::chardev::EndpointAddr;
use crate::exit::ExitCode;
use crate::usage::check_port_names;
use std::path::PathBuf;
use std::process::Command;
use thiserror::Error;

/// The variable naming the `virsh` to run (default: `virsh` on `PATH`).
pub const VIRSH_ENV: &str = "VPORT_VIRSH";

/// One `<channel>` of a domain with a virtio target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Channel {
    /// The port's name (`<target name=...>`).
    pub name: String,
    /// libvirt's channel `type=` (`unix`, `pty`, `tcp`, `spicevmc`, ...).
    pub kind: String,
    /// Its host end, or why vport cannot reach it.
    pub addr: Result<EndpointAddr, String>,
    /// `<target state=...>` (`connected`, `disconnected`): live XML only.
    pub state: Option<String>,
}

impl Channel {
    /// `NAME at ADDR (state=...)`, or `NAME: not reachable (why)`.
    pub fn describe(&self) -> String {
        let state = self.state.as_ref().map(|s| format!(", state={s}")).unwrap_or_default();
        match &self.addr {
            Ok(a) => format!("{} at {a} ({} channel{state})", self.name, self.kind),
            Err(why) => format!("{}: not reachable ({why}{state})", self.name),
        }
    }
}

/// A domain's name and its virtio channels, from its XML.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DomainChannels {
    /// `<name>`.
    pub name: String,
    /// Whether the XML is a running domain's (`<domain id=...>`).
    pub running: bool,
    /// The channels with a virtio target, in document order.
    pub channels: Vec<Channel>,
}

/// Why the domain's ports could not be had.
#[derive(Debug, Error)]
pub enum LibvirtError {
    /// `virsh` could not be run.
    #[error("cannot run {} (install libvirt's virsh, libvirt-clients on Debian, or name it with {VIRSH_ENV})", virsh.display())]
    Virsh {
        /// The program.
        virsh: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// `virsh dumpxml` failed.
    #[error("virsh dumpxml {domain} failed ({status}): {stderr}")]
    Dumpxml {
        /// The domain given.
        domain: String,
        /// virsh's exit status.
        status: String,
        /// What virsh said.
        stderr: String,
    },
    /// The XML is not a domain's.
    #[error("cannot read the xml of domain {domain}: {reason}")]
    Xml {
        /// The domain given.
        domain: String,
        /// What is wrong.
        reason: String,
    },
    /// A port asked for is not a reachable virtio channel of the domain.
    #[error("domain {domain} has no virtio channel {port:?} that vport can reach; its channels: {known}")]
    NoChannel {
        /// The domain.
        domain: String,
        /// The port asked for.
        port: String,
        /// Every virtio channel, described ([`Channel::describe`]), or `none`.
        known: String,
    },
}

impl LibvirtError {
    /// A domain libvirt does not know, or a port it does not have, is a usage error; the rest
    /// is infrastructure.
    pub fn exit_code(&self) -> ExitCode {
        match self {
            LibvirtError::NoChannel { .. } => ExitCode::Usage,
            LibvirtError::Dumpxml { stderr, .. } if stderr.contains("failed to get domain") => ExitCode::Usage,
            _ => ExitCode::Infrastructure,
        }
    }
}

/// The `virsh` to run: `$VPORT_VIRSH`, else `virsh`.
pub fn virsh() -> PathBuf {
    std::env::var_os(VIRSH_ENV).filter(|v| !v.is_empty()).map_or_else(|| PathBuf::from("virsh"), PathBuf::from)
}

/// `virsh dumpxml DOMAIN`: the running domain's live XML (its channel paths and states).
pub fn dumpxml(domain: &str) -> Result<String, LibvirtError> {
    let virsh = virsh();
    let out = Command::new(&virsh)
        .args(["dumpxml", "--", domain])
        .output()
        .map_err(|source| LibvirtError::Virsh { virsh: virsh.clone(), source })?;
    if !out.status.success() {
        return Err(LibvirtError::Dumpxml {
            domain: domain.into(),
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    String::from_utf8(out.stdout).map_err(|_| LibvirtError::Xml {
        domain: domain.into(),
        reason: "virsh printed bytes that are not UTF-8".into(),
    })
}

/// The first child element of `n` called `tag`.
fn child<'a, 'input>(n: roxmltree::Node<'a, 'input>, tag: &str) -> Option<roxmltree::Node<'a, 'input>> {
    n.children().find(|c| c.has_tag_name(tag))
}

/// The virtio channels of the domain XML `xml`.
pub fn parse_channels(xml: &str) -> Result<DomainChannels, String> {
    let doc = roxmltree::Document::parse(xml).map_err(|e| e.to_string())?;
    let root = doc.root_element();
    if !root.has_tag_name("domain") {
        return Err(format!("the root element is <{}>, not <domain>", root.tag_name().name()));
    }
    let name = child(root, "name").and_then(|n| n.text()).unwrap_or_default().trim().to_string();
    let mut channels = Vec::new();
    let devices = child(root, "devices").into_iter().flat_map(|d| d.children());
    for ch in devices.filter(|c| c.has_tag_name("channel")) {
        let Some(target) = child(ch, "target") else { continue };
        if target.attribute("type") != Some("virtio") {
            continue; // guestfwd, xen: not a virtio-serial port
        }
        let Some(port) = target.attribute("name") else { continue };
        let kind = ch.attribute("type").unwrap_or_default().to_string();
        let source = child(ch, "source");
        let attr = |a: &str| source.and_then(|s| s.attribute(a)).filter(|v| !v.is_empty());
        let mode = attr("mode").unwrap_or("bind");
        let addr = match kind.as_str() {
            "unix" => match attr("path") {
                Some(p) if mode == "connect" => Ok(EndpointAddr::UnixServer { path: p.into(), reconnect_secs: 0 }),
                Some(p) => Ok(EndpointAddr::UnixClient { path: p.into() }),
                None => Err("no socket path: libvirt picks it when the domain starts".to_string()),
            },
            "pty" => match attr("path") {
                Some(p) => Ok(EndpointAddr::Pty { path: Some(p.into()) }),
                None => Err("no pty yet: QEMU opens it when the domain starts".to_string()),
            },
            "tcp" => match (attr("host"), attr("service")) {
                (Some(h), Some(s)) => {
                    let spec = if mode == "connect" { format!("tcp-listen:{h}:{s}") } else { format!("tcp:{h}:{s}") };
                    EndpointAddr::parse(&spec).map_err(|e| e.reason)
                }
                _ => Err("no host and service".to_string()),
            },
            other => Err(format!("a {other} channel: vport reaches unix, tcp and pty channels")),
        };
        channels.push(Channel {
            name: port.to_string(),
            kind,
            addr,
            state: target.attribute("state").map(String::from),
        });
    }
    Ok(DomainChannels { name, running: root.attribute("id").is_some(), channels })
}

/// The [`AttachSpec`] of ports `ports` of `domain` (the channels' host ends; QMP `qmp`, which
/// libvirt does not give), and what the domain's XML said.
pub fn attach_spec(
    domain: &str,
    ports: &[String],
    qmp: Option<PathBuf>,
) -> Result<(AttachSpec, DomainChannels), LibvirtError> {
    let xml = dumpxml(domain)?;
    let found = parse_channels(&xml).map_err(|reason| LibvirtError::Xml { domain: domain.into(), reason })?;
    let spec = spec_of(domain, &found, ports, qmp)?;
    Ok((spec, found))
}

/// The spec of ports `ports` among `found`'s channels (all reachable ones when `ports` is
/// empty).
pub fn spec_of(
    domain: &str,
    found: &DomainChannels,
    ports: &[String],
    qmp: Option<PathBuf>,
) -> Result<AttachSpec, LibvirtError> {
    let known = || {
        let all: Vec<String> = found.channels.iter().map(Channel::describe).collect();
        if all.is_empty() {
            "none (add one: guest/README.md, \"libvirt\")".to_string()
        } else {
            all.join("; ")
        }
    };
    let mut out = Vec::new();
    if ports.is_empty() {
        out.extend(found.channels.iter().filter_map(|c| c.addr.clone().ok().map(|a| (c.name.clone(), a))));
        if out.is_empty() {
            return Err(LibvirtError::NoChannel { domain: domain.into(), port: "(any)".into(), known: known() });
        }
    }
    for p in ports {
        match found.channels.iter().find(|c| c.name == *p).map(|c| c.addr.clone()) {
            Some(Ok(addr)) => out.push((p.clone(), addr)),
            _ => return Err(LibvirtError::NoChannel { domain: domain.into(), port: p.clone(), known: known() }),
        }
    }
    let names: Vec<&str> = out.iter().map(|(n, _)| n.as_str()).collect();
    check_port_names(&names).map_err(|e| LibvirtError::Xml { domain: domain.into(), reason: e.to_string() })?;
    Ok(AttachSpec { ports: out, qmp })
}

#[cfg(test)]
mod tests;
