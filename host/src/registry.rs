//! The registry of VMs that `vport boot` keeps running, so other `vport` commands (`connect`)
//! can find a port by name.
//!
//! Each running VM is one JSON file `<registry dir>/<qemu pid>.json`, written by `vport boot`
//! and removed when it ends. An entry whose QEMU pid no longer exists is stale and ignored
//! (and removed on the next lookup): `vport boot` may have been killed without cleaning up.

use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use thiserror::Error;

/// One running VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmEntry {
    /// QEMU's pid.
    pub pid: u32,
    /// The VM's directory (sockets, console log).
    pub dir: PathBuf,
    /// Guest console log.
    pub console_log: PathBuf,
    /// Ports: name and chardev socket.
    pub ports: Vec<PortEntry>,
    /// The VM's second QMP monitor, free for tools (`vport connect` asks it whether a port is
    /// held by another client); absent in entries of older `vport boot`s.
    #[serde(default)]
    pub qmp_tools: Option<PathBuf>,
}

impl VmEntry {
    /// The entry of the running VM `vm`.
    pub fn of(vm: &crate::qemu::Vm) -> VmEntry {
        VmEntry {
            pid: vm.pid(),
            dir: vm.dir().to_path_buf(),
            console_log: vm.console_log(),
            ports: vm
                .ports()
                .iter()
                .map(|p| PortEntry {
                    name: p.name.clone(),
                    id: p.id.clone(),
                    socket: p.socket.clone(),
                    chardev: Some(p.chardev_id.clone()),
                })
                .collect(),
            qmp_tools: vm.tools_qmp_socket(),
        }
    }

    /// `vport boot --json`: the entry as one JSON object, with the accelerator.
    pub fn to_json(&self, accel: &str) -> serde_json::Value {
        let mut v = serde_json::to_value(self).unwrap_or_default();
        if let Some(obj) = v.as_object_mut() {
            obj.insert("accel".into(), accel.into());
        }
        v
    }

    /// `vport boot`'s description: the VM, its tools monitor, how to reach each port.
    pub fn render_text(&self, accel: &str) -> String {
        let mut out = format!("vm running: qemu pid {}, accelerator {accel}\n", self.pid);
        out.push_str(&format!("guest console log: {}\n", self.console_log.display()));
        if let Some(q) = &self.qmp_tools {
            out.push_str(&format!("qmp monitor for tools: {} (one client at a time)\n", q.display()));
        }
        for p in &self.ports {
            out.push_str(&format!(
                "port {} (device id {}): vport connect {}   (or: socat - UNIX-CONNECT:{})\n",
                p.name,
                p.id,
                p.name,
                p.socket.display()
            ));
        }
        out.push_str("Ctrl-C stops the vm.\n");
        out
    }
}

/// One port of a running VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortEntry {
    /// Name the guest sees.
    pub name: String,
    /// QEMU device id.
    pub id: String,
    /// Unix socket of the port's chardev.
    pub socket: PathBuf,
    /// QEMU chardev id (the `label` in `query-chardev`); absent in entries of older `vport boot`s.
    #[serde(default)]
    pub chardev: Option<String>,
}

/// Registry failures.
#[derive(Debug, Error)]
pub enum RegistryError {
    /// The registry directory or an entry could not be written or read.
    #[error("cannot access the vm registry at {path}")]
    Io {
        /// The path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// No running VM has a port of that name.
    #[error(
        "no running vm{} has a port named {port:?}; {}; start a vm with it with `vport boot --port {port}`",
        .vm.map(|pid| format!(" with qemu pid {pid}")).unwrap_or_default(),
        known_ports(.known)
    )]
    NoSuchPort {
        /// The port name.
        port: String,
        /// The QEMU pid the lookup was restricted to (`--vm`).
        vm: Option<u32>,
        /// Every port that does exist, as `(qemu pid, port name)`.
        known: Vec<(u32, String)>,
    },
    /// Several running VMs have a port of that name.
    #[error("{count} running vms have a port named {port} (qemu pids {pids}): choose one with --vm PID")]
    Ambiguous {
        /// The port name.
        port: String,
        /// How many.
        count: usize,
        /// Their pids, comma-separated.
        pids: String,
    },
}

/// Where entries live: `$XDG_RUNTIME_DIR/vport`, else `<tmp>/vport-<uid>`.
pub fn registry_dir() -> PathBuf {
    match std::env::var_os("XDG_RUNTIME_DIR").filter(|v| !v.is_empty()) {
        Some(d) => PathBuf::from(d).join("vport"),
        None => std::env::temp_dir().join(format!("vport-{}", nix::unistd::getuid())),
    }
}

/// Records `entry` in `dir`; the returned guard removes it when dropped.
pub fn register(dir: &Path, entry: &VmEntry) -> Result<Registration, RegistryError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| RegistryError::Io { path, source }
    };
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let path = dir.join(format!("{}.json", entry.pid));
    let tmp = dir.join(format!(".{}.json.tmp", entry.pid));
    let text =
        serde_json::to_vec_pretty(entry).map_err(|e| RegistryError::Io { path: path.clone(), source: e.into() })?;
    std::fs::write(&tmp, text).map_err(io(&tmp))?;
    std::fs::rename(&tmp, &path).map_err(io(&path))?;
    Ok(Registration { path })
}

/// Removes its entry when dropped.
#[derive(Debug)]
pub struct Registration {
    path: PathBuf,
}

impl Drop for Registration {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_file(&self.path) {
            log::debug!("cannot remove registry entry {}: {e}", self.path.display());
        }
    }
}

/// The live entries in `dir`; stale ones (dead pid) are removed.
pub fn live_entries(dir: &Path, alive: impl Fn(u32) -> bool) -> Result<Vec<VmEntry>, RegistryError> {
    let rd = match std::fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => return Err(RegistryError::Io { path: dir.into(), source }),
    };
    let mut out = Vec::new();
    for ent in rd.flatten() {
        let path = ent.path();
        if path.extension().and_then(|e| e.to_str()) != Some("json") {
            continue;
        }
        let parsed = std::fs::read(&path).ok().and_then(|b| serde_json::from_slice::<VmEntry>(&b).ok());
        match parsed {
            Some(e) if alive(e.pid) => out.push(e),
            Some(e) => {
                log::debug!("removing stale registry entry of qemu pid {}", e.pid);
                let _ = std::fs::remove_file(&path);
            }
            None => log::warn!("ignoring unreadable registry entry {}", path.display()),
        }
    }
    out.sort_by_key(|e| e.pid);
    Ok(out)
}

/// `known` as a clause: "the running vms have ports a (qemu pid 1), b (qemu pid 2); `vport
/// connect --list` lists them", or "no vm started by `vport boot` is running".
fn known_ports(known: &[(u32, String)]) -> String {
    if known.is_empty() {
        return "no vm started by `vport boot` is running".into();
    }
    let list: Vec<String> = known.iter().map(|(pid, name)| format!("{name} (qemu pid {pid})")).collect();
    format!("the running vms have {}; `vport connect --list` lists them", list.join(", "))
}

/// Every port of `entries`, one line each: `<name>  qemu pid <pid>  <socket>`; a line saying so
/// when there is none.
pub fn render_list(entries: &[VmEntry]) -> String {
    let mut out = String::new();
    for e in entries {
        for p in &e.ports {
            out.push_str(&format!("{:<24} qemu pid {:<8} {}\n", p.name, e.pid, p.socket.display()));
        }
    }
    if out.is_empty() {
        out.push_str("no vm started by `vport boot` is running\n");
    }
    out
}

/// Whether process `pid` exists.
pub fn pid_alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// The port `name` among `entries`, restricted to QEMU pid `vm` when given.
pub fn find_port<'a>(
    entries: &'a [VmEntry],
    name: &str,
    vm: Option<u32>,
) -> Result<(&'a VmEntry, &'a PortEntry), RegistryError> {
    let hits: Vec<_> = entries
        .iter()
        .filter(|e| vm.is_none_or(|pid| e.pid == pid))
        .filter_map(|e| e.ports.iter().find(|p| p.name == name).map(|p| (e, p)))
        .collect();
    match hits.len() {
        0 => Err(RegistryError::NoSuchPort {
            port: name.into(),
            vm,
            known: entries.iter().flat_map(|e| e.ports.iter().map(|p| (e.pid, p.name.clone()))).collect(),
        }),
        1 => Ok(hits[0]),
        count => Err(RegistryError::Ambiguous {
            port: name.into(),
            count,
            pids: hits.iter().map(|(e, _)| e.pid.to_string()).collect::<Vec<_>>().join(", "),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(pid: u32, ports: &[&str]) -> VmEntry {
        VmEntry {
            pid,
            dir: "/d".into(),
            console_log: "/d/console.log".into(),
            ports: ports
                .iter()
                .map(|n| PortEntry {
                    name: n.to_string(),
                    id: "p".into(),
                    socket: format!("/d/{n}.sock").into(),
                    chardev: Some(format!("ch-{n}")),
                })
                .collect(),
            qmp_tools: Some("/d/qmp-tools.sock".into()),
        }
    }

    #[test]
    fn register_lists_and_the_guard_removes() {
        let dir = tempfile::tempdir().unwrap();
        let e = entry(4242, &["org.vport.0"]);
        let reg = register(dir.path(), &e).unwrap();
        assert_eq!(live_entries(dir.path(), |_| true).unwrap(), vec![e]);
        drop(reg);
        assert!(live_entries(dir.path(), |_| true).unwrap().is_empty());
    }

    #[test]
    fn stale_entries_are_ignored_and_removed() {
        let dir = tempfile::tempdir().unwrap();
        let reg = register(dir.path(), &entry(7, &["a"])).unwrap();
        assert!(live_entries(dir.path(), |_| false).unwrap().is_empty());
        assert!(!dir.path().join("7.json").exists(), "stale entry removed");
        drop(reg); // already gone: dropping must not panic
    }

    #[test]
    fn find_port_is_unique_or_says_why_not() {
        let es = vec![entry(1, &["a", "b"]), entry(2, &["b"])];
        assert_eq!(find_port(&es, "a", None).unwrap().0.pid, 1);
        let err = find_port(&es, "b", None).unwrap_err();
        assert!(err.to_string().contains("--vm PID") && err.to_string().contains("1, 2"), "{err}");
        assert_eq!(find_port(&es, "b", Some(2)).unwrap().0.pid, 2);
        let err = find_port(&es, "c", None).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("vport boot --port c"), "{msg}");
        assert!(msg.contains("a (qemu pid 1), b (qemu pid 1), b (qemu pid 2)") && msg.contains("--list"), "{msg}");
        let msg = find_port(&es, "a", Some(2)).unwrap_err().to_string();
        assert!(msg.contains("no running vm with qemu pid 2 has a port named \"a\"") && msg.contains("a (qemu pid 1)"));
        let msg = find_port(&[], "c", None).unwrap_err().to_string();
        assert!(msg.contains("no vm started by `vport boot` is running"), "{msg}");
    }

    #[test]
    fn boot_describes_the_vm_as_text_and_json() {
        let e = entry(9, &["org.vport.0"]);
        let text = e.render_text("tcg");
        assert!(text.contains("qemu pid 9, accelerator tcg") && text.contains("/d/qmp-tools.sock"), "{text}");
        assert!(text.contains("vport connect org.vport.0   (or: socat - UNIX-CONNECT:/d/org.vport.0.sock)"), "{text}");
        let v = e.to_json("kvm");
        assert_eq!((v["pid"].as_u64(), v["accel"].as_str()), (Some(9), Some("kvm")), "{v}");
        assert_eq!(v["ports"][0]["chardev"], "ch-org.vport.0", "{v}");
    }

    #[test]
    fn entries_of_older_boots_still_read() {
        let old = r#"{"pid":5,"dir":"/d","console_log":"/d/c","ports":[{"name":"a","id":"p","socket":"/d/a.sock"}]}"#;
        let e: VmEntry = serde_json::from_str(old).unwrap();
        assert_eq!((e.qmp_tools, e.ports[0].chardev.clone()), (None, None));
    }

    #[test]
    fn the_list_shows_every_port_or_says_there_is_none() {
        let text = render_list(&[entry(1, &["a", "b"])]);
        assert_eq!(text.lines().count(), 2, "{text}");
        assert!(text.contains("qemu pid 1") && text.contains("/d/b.sock"), "{text}");
        assert!(render_list(&[]).contains("no vm"));
    }
}
