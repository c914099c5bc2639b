//! Which virtio-serial ports to serve.
//!
//! Without udev there is no `/dev/virtio-ports/<name>` symlink: the names live in
//! `<sysfs>/class/virtio-ports/vportNpM/name`, and that file appears only when the host's
//! PORT_NAME arrives, after the node exists (a `change` uevent follows). [`list_sysfs`] reads
//! that directory; [`select`] is the pure function that decides, from such a listing and the
//! command line's [`Selector`], which ports to open.

use std::path::{Path, PathBuf};
use thiserror::Error;

/// The default name prefix of ports the agent serves.
pub const DEFAULT_PREFIX: &str = "org.vport.";

/// Ports owned by other agents: never served unless named explicitly with `--port`.
pub const RESERVED_NAMES: [&str; 2] = ["org.qemu.guest_agent.0", "com.redhat.spice.0"];

/// Why the sysfs listing could not be read.
#[derive(Debug, Error)]
pub enum DiscoveryError {
    /// The class directory exists but could not be listed.
    #[error("cannot list {path}")]
    List {
        /// The directory.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

/// Why a `--port` argument is not usable.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum PortSpecError {
    /// A path that is neither a `vportNpM` node nor a `virtio-ports/<name>` link.
    #[error("port path {0} is neither a vportNpM node nor a virtio-ports/<name> link")]
    UnsupportedPath(String),
    /// An empty argument.
    #[error("empty port name")]
    Empty,
}

/// One `--port` argument.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum PortSpec {
    /// A port name (`org.vport.0`, or from `/dev/virtio-ports/<name>`).
    Name(String),
    /// A device node name (`vport1p2`, from `/dev/vport1p2`).
    Dev(String),
}

impl PortSpec {
    /// Parses a `--port` argument: a name, `/dev/vportNpM`, or `/dev/virtio-ports/<name>`.
    pub fn parse(arg: &str) -> Result<PortSpec, PortSpecError> {
        if arg.is_empty() {
            return Err(PortSpecError::Empty);
        }
        if !arg.contains('/') {
            return Ok(PortSpec::Name(arg.to_owned()));
        }
        let path = Path::new(arg);
        let base = path.file_name().and_then(|b| b.to_str());
        let parent = path.parent().and_then(|p| p.file_name()).and_then(|p| p.to_str());
        match (base, parent) {
            (Some(b), _) if is_port_node_name(b) => Ok(PortSpec::Dev(b.to_owned())),
            (Some(b), Some("virtio-ports")) => Ok(PortSpec::Name(b.to_owned())),
            _ => Err(PortSpecError::UnsupportedPath(arg.to_owned())),
        }
    }
}

impl std::fmt::Display for PortSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PortSpec::Name(n) => f.write_str(n),
            PortSpec::Dev(d) => write!(f, "/dev/{d}"),
        }
    }
}

/// Which ports are picked without being named.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AutoSelect {
    /// Only the `--port` ones.
    None,
    /// Every port whose name starts with this prefix (reserved names excluded).
    Prefix(String),
    /// Every named port (reserved names excluded).
    All,
}

/// The command line's choice of ports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Selector {
    /// `--port` arguments.
    pub explicit: Vec<PortSpec>,
    /// `--all` / `--prefix` / the default prefix.
    pub auto: AutoSelect,
}

impl std::fmt::Display for Selector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut parts: Vec<String> = self.explicit.iter().map(|p| format!("port {p}")).collect();
        match &self.auto {
            AutoSelect::None => {}
            AutoSelect::Prefix(p) => parts.push(format!("prefix {p}")),
            AutoSelect::All => parts.push("all ports".to_owned()),
        }
        f.write_str(&parts.join(", "))
    }
}

/// One entry of `<sysfs>/class/virtio-ports`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SysfsPort {
    /// Device node name, `vportNpM`.
    pub dev: String,
    /// Contents of the `name` attribute without the trailing newline; `None` until PORT_NAME.
    pub name: Option<String>,
}

/// A port to serve.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Wanted {
    /// Device node name, `vportNpM`: the identity of an open port.
    pub dev: String,
    /// The name used in logs and HELLO: the sysfs name, or the node name while it has none
    /// (only possible for a port selected by node path).
    pub name: String,
}

/// The result of [`select`].
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Selection {
    /// Ports to serve, in listing order.
    pub wanted: Vec<Wanted>,
    /// Explicit `--port`s not present in the listing (waited for).
    pub missing: Vec<PortSpec>,
}

/// True for `vport<N>p<M>`.
pub fn is_port_node_name(s: &str) -> bool {
    let Some(rest) = s.strip_prefix("vport") else { return false };
    let Some((n, m)) = rest.split_once('p') else { return false };
    let digits = |x: &str| !x.is_empty() && x.bytes().all(|b| b.is_ascii_digit());
    digits(n) && digits(m)
}

/// Decides which ports of `listing` to serve. Pure: the unit of discovery logic.
pub fn select(listing: &[SysfsPort], selector: &Selector) -> Selection {
    let mut sel = Selection::default();
    let explicit_hit = |p: &SysfsPort, spec: &PortSpec| match spec {
        PortSpec::Name(n) => p.name.as_deref() == Some(n.as_str()),
        PortSpec::Dev(d) => p.dev == *d,
    };
    for port in listing {
        let explicit = selector.explicit.iter().any(|s| explicit_hit(port, s));
        let auto = match (&port.name, &selector.auto) {
            (None, _) | (_, AutoSelect::None) => false,
            (Some(n), _) if RESERVED_NAMES.contains(&n.as_str()) => false,
            (Some(_), AutoSelect::All) => true,
            (Some(n), AutoSelect::Prefix(p)) => n.starts_with(p.as_str()),
        };
        if explicit || auto {
            sel.wanted
                .push(Wanted { dev: port.dev.clone(), name: port.name.clone().unwrap_or_else(|| port.dev.clone()) });
        }
    }
    for spec in &selector.explicit {
        if !listing.iter().any(|p| explicit_hit(p, spec)) {
            sel.missing.push(spec.clone());
        }
    }
    sel
}

/// Reads `<sysfs_root>/class/virtio-ports`. A missing directory (virtio_console not loaded yet)
/// is an empty listing. Entries are sorted by node name.
pub fn list_sysfs(sysfs_root: &Path) -> Result<Vec<SysfsPort>, DiscoveryError> {
    let dir = sysfs_root.join("class/virtio-ports");
    let entries = match std::fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => return Err(DiscoveryError::List { path: dir, source }),
    };
    let mut out = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|source| DiscoveryError::List { path: dir.clone(), source })?;
        let Some(dev) = entry.file_name().to_str().map(str::to_owned) else { continue };
        if !is_port_node_name(&dev) {
            continue;
        }
        // A port unplugged between readdir and this read simply has no name.
        let name = std::fs::read_to_string(entry.path().join("name"))
            .ok()
            .map(|s| s.trim_end_matches('\n').to_owned())
            .filter(|s| !s.is_empty());
        out.push(SysfsPort { dev, name });
    }
    out.sort_by_key(|p| node_order(&p.dev));
    Ok(out)
}

/// Numeric order of `vportNpM` names (vport2p1 before vport10p1).
fn node_order(dev: &str) -> (u64, u64, String) {
    let num = |s: &str| s.parse::<u64>().unwrap_or(u64::MAX);
    match dev.strip_prefix("vport").and_then(|r| r.split_once('p')) {
        Some((n, m)) => (num(n), num(m), dev.to_owned()),
        None => (u64::MAX, u64::MAX, dev.to_owned()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(dev: &str, name: Option<&str>) -> SysfsPort {
        SysfsPort { dev: dev.into(), name: name.map(Into::into) }
    }

    fn w(dev: &str, name: &str) -> Wanted {
        Wanted { dev: dev.into(), name: name.into() }
    }

    fn listing() -> Vec<SysfsPort> {
        vec![
            p("vport0p1", Some("org.qemu.guest_agent.0")),
            p("vport0p2", Some("org.vport.0")),
            p("vport0p3", Some("com.redhat.spice.0")),
            p("vport1p1", Some("org.vport.1")),
            p("vport1p2", None),
            p("vport1p3", Some("other.port")),
        ]
    }

    fn default_selector() -> Selector {
        Selector { explicit: vec![], auto: AutoSelect::Prefix(DEFAULT_PREFIX.into()) }
    }

    #[test]
    fn default_prefix_picks_org_vport_only() {
        let s = select(&listing(), &default_selector());
        assert_eq!(s.wanted, vec![w("vport0p2", "org.vport.0"), w("vport1p1", "org.vport.1")]);
        assert!(s.missing.is_empty());
    }

    #[test]
    fn all_excludes_reserved_and_unnamed() {
        let s = select(&listing(), &Selector { explicit: vec![], auto: AutoSelect::All });
        assert_eq!(
            s.wanted,
            vec![w("vport0p2", "org.vport.0"), w("vport1p1", "org.vport.1"), w("vport1p3", "other.port")]
        );
    }

    #[test]
    fn a_prefix_matching_reserved_names_still_excludes_them() {
        let s = select(&listing(), &Selector { explicit: vec![], auto: AutoSelect::Prefix("org.".into()) });
        assert_eq!(s.wanted, vec![w("vport0p2", "org.vport.0"), w("vport1p1", "org.vport.1")]);
    }

    #[test]
    fn explicit_reserved_name_and_node_path_are_served() {
        let sel = Selector {
            explicit: vec![
                PortSpec::parse("org.qemu.guest_agent.0").unwrap(),
                PortSpec::parse("/dev/vport1p2").unwrap(),
                PortSpec::parse("/dev/virtio-ports/other.port").unwrap(),
                PortSpec::parse("org.vport.9").unwrap(),
            ],
            auto: AutoSelect::None,
        };
        let s = select(&listing(), &sel);
        assert_eq!(
            s.wanted,
            vec![w("vport0p1", "org.qemu.guest_agent.0"), w("vport1p2", "vport1p2"), w("vport1p3", "other.port")]
        );
        assert_eq!(s.missing, vec![PortSpec::Name("org.vport.9".into())]);
    }

    #[test]
    fn explicit_and_prefix_do_not_duplicate() {
        let sel = Selector {
            explicit: vec![PortSpec::Name("org.vport.0".into())],
            auto: AutoSelect::Prefix(DEFAULT_PREFIX.into()),
        };
        let s = select(&listing(), &sel);
        assert_eq!(s.wanted, vec![w("vport0p2", "org.vport.0"), w("vport1p1", "org.vport.1")]);
    }

    #[test]
    fn port_spec_parsing() {
        assert_eq!(PortSpec::parse("org.vport.0"), Ok(PortSpec::Name("org.vport.0".into())));
        assert_eq!(PortSpec::parse("/dev/vport3p12"), Ok(PortSpec::Dev("vport3p12".into())));
        assert_eq!(PortSpec::parse("/dev/virtio-ports/org.x"), Ok(PortSpec::Name("org.x".into())));
        assert_eq!(PortSpec::parse("/dev/hvc0"), Err(PortSpecError::UnsupportedPath("/dev/hvc0".into())));
        assert_eq!(PortSpec::parse("/dev/vportXp1"), Err(PortSpecError::UnsupportedPath("/dev/vportXp1".into())));
        assert_eq!(PortSpec::parse(""), Err(PortSpecError::Empty));
    }

    #[test]
    fn node_names() {
        assert!(is_port_node_name("vport0p1"));
        assert!(is_port_node_name("vport12p345"));
        assert!(!is_port_node_name("vport0"));
        assert!(!is_port_node_name("vportp1"));
        assert!(!is_port_node_name("vport1p"));
        assert!(!is_port_node_name("hvc0"));
    }

    #[test]
    fn lists_a_sysfs_tree() {
        let root = std::env::temp_dir().join(format!("vport-agent-discovery-{}", std::process::id()));
        let class = root.join("class/virtio-ports");
        let _ = std::fs::remove_dir_all(&root);
        assert_eq!(list_sysfs(&root).unwrap(), vec![], "missing class dir is an empty listing");
        for (dev, name) in
            [("vport10p1", Some("org.vport.b\n")), ("vport2p1", Some("org.vport.a\n")), ("vport2p2", None)]
        {
            std::fs::create_dir_all(class.join(dev)).unwrap();
            if let Some(n) = name {
                std::fs::write(class.join(dev).join("name"), n).unwrap();
            }
        }
        std::fs::create_dir_all(class.join("not-a-port")).unwrap();
        let l = list_sysfs(&root).unwrap();
        assert_eq!(
            l,
            vec![p("vport2p1", Some("org.vport.a")), p("vport2p2", None), p("vport10p1", Some("org.vport.b"))]
        );
        let s = select(&l, &default_selector());
        assert_eq!(s.wanted, vec![w("vport2p1", "org.vport.a"), w("vport10p1", "org.vport.b")]);
        std::fs::remove_dir_all(&root).unwrap();
    }
}
