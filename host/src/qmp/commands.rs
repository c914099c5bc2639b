//! The typed QMP commands vport sends (`query-chardev`, `query-version`, `cont`, `device_add`,
//! `migrate`, ...) and the shapes of their replies, on top of [`Qmp::execute`].

use super::{Qmp, QmpError};
use serde::Serialize;
use serde_json::{json, Value};

/// One row of `query-chardev`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ChardevInfo {
    /// Chardev id.
    pub label: String,
    /// Backend description, for example `unix:/tmp/x.sock,server=on`.
    pub filename: String,
    /// Whether the frontend (the guest side) has it open.
    pub frontend_open: bool,
}

/// QEMU version from `query-version`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct QemuVersion {
    /// Major.
    pub major: u64,
    /// Minor.
    pub minor: u64,
    /// Micro.
    pub micro: u64,
    /// Package string, for example `Debian 1:7.2+dfsg-7+deb12u18`.
    pub package: String,
}

impl std::fmt::Display for QemuVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.micro)?;
        match self.package.trim() {
            "" => Ok(()),
            p if p.starts_with('(') => write!(f, " {p}"),
            p => write!(f, " ({p})"),
        }
    }
}

/// The state of a migration, from `query-migrate`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MigrationStatus {
    /// `none` (no migration yet), `setup`, `active`, `completed`, `failed`, `cancelled`, ...
    pub status: String,
    /// QEMU's description of a failure.
    pub error: Option<String>,
}

impl Qmp {
    /// `query-chardev`.
    pub fn query_chardev(&self) -> Result<Vec<ChardevInfo>, QmpError> {
        let reply = self.execute("query-chardev", None)?;
        parse_chardevs(&reply)
            .ok_or_else(|| QmpError::Unexpected { command: "query-chardev".into(), reply: reply.to_string() })
    }

    /// `frontend-open` of the chardev `label`, or `None` if QEMU has no such chardev.
    pub fn frontend_open(&self, label: &str) -> Result<Option<bool>, QmpError> {
        Ok(self.query_chardev()?.into_iter().find(|c| c.label == label).map(|c| c.frontend_open))
    }

    /// `query-version`.
    pub fn query_version(&self) -> Result<QemuVersion, QmpError> {
        let reply = self.execute("query-version", None)?;
        parse_version(&reply)
            .ok_or_else(|| QmpError::Unexpected { command: "query-version".into(), reply: reply.to_string() })
    }

    /// `query-status`: the run state (`running`, `paused`, `prelaunch`, ...).
    pub fn query_status(&self) -> Result<String, QmpError> {
        let reply = self.execute("query-status", None)?;
        reply
            .get("status")
            .and_then(Value::as_str)
            .map(str::to_string)
            .ok_or_else(|| QmpError::Unexpected { command: "query-status".into(), reply: reply.to_string() })
    }

    /// `cont`: run a VM started paused (`-S`) or stopped.
    pub fn cont(&self) -> Result<(), QmpError> {
        self.execute("cont", None).map(drop)
    }

    /// `stop`: pause the VM.
    pub fn stop(&self) -> Result<(), QmpError> {
        self.execute("stop", None).map(drop)
    }

    /// `quit`: QEMU exits, closing its chardevs' connections (a host end blocked writing to a
    /// port gets EPIPE rather than waiting for a VM that will not run again).
    pub fn quit(&self) -> Result<(), QmpError> {
        self.execute("quit", None).map(drop)
    }

    /// `system_reset`.
    pub fn system_reset(&self) -> Result<(), QmpError> {
        self.execute("system_reset", None).map(drop)
    }

    /// `set-action reboot=ACTION`: what a guest reboot (and QMP `system_reset`) does: `reset`,
    /// or `shutdown` (vport's default: its VMs run with `-no-reboot`, so a guest panic ends
    /// QEMU).
    pub fn set_reboot_action(&self, action: &str) -> Result<(), QmpError> {
        self.execute("set-action", Some(json!({ "reboot": action }))).map(drop)
    }

    /// `send-key`: presses `keys` (QEMU key codes, `qcode`, for example `["alt", "sysrq",
    /// "i"]`) together on the VM's keyboard and releases them.
    pub fn send_keys(&self, keys: &[&str]) -> Result<(), QmpError> {
        let keys: Vec<Value> = keys.iter().map(|k| json!({ "type": "qcode", "data": k })).collect();
        self.execute("send-key", Some(json!({ "keys": keys }))).map(drop)
    }

    /// `device_add` with the given properties (`driver`, `id`, ...).
    pub fn device_add(&self, props: Value) -> Result<(), QmpError> {
        self.execute("device_add", Some(props)).map(drop)
    }

    /// `device_del` of device `id`.
    pub fn device_del(&self, id: &str) -> Result<(), QmpError> {
        self.execute("device_del", Some(json!({ "id": id }))).map(drop)
    }

    /// `migrate` to `uri` (for example `unix:/path` to a destination started with
    /// `-incoming unix:/path`, or `exec:cat > FILE` to save the state). Returns at once;
    /// follow progress with [`Qmp::query_migrate`] or the `MIGRATION` events.
    pub fn migrate(&self, uri: &str) -> Result<(), QmpError> {
        self.execute("migrate", Some(json!({ "uri": uri }))).map(drop)
    }

    /// `migrate-incoming` on a destination started with `-incoming defer`.
    pub fn migrate_incoming(&self, uri: &str) -> Result<(), QmpError> {
        self.execute("migrate-incoming", Some(json!({ "uri": uri }))).map(drop)
    }

    /// `query-migrate`: the migration status (`none`, `setup`, `active`, `completed`, `failed`,
    /// ...) and, when failed, QEMU's error description.
    pub fn query_migrate(&self) -> Result<MigrationStatus, QmpError> {
        let reply = self.execute("query-migrate", None)?;
        Ok(MigrationStatus {
            status: reply.get("status").and_then(Value::as_str).unwrap_or("none").to_string(),
            error: reply.get("error-desc").and_then(Value::as_str).map(str::to_string),
        })
    }
}

impl Qmp {
    /// The ring size (`vring-num`) the guest's driver set up for queue `queue` of the virtio
    /// device with qdev id `device_id`, from QEMU's unstable `x-query-virtio` and
    /// `x-query-virtio-queue-status` (QEMU 7.1 and later); `None` where QEMU lacks them or has
    /// no such device. Not the device's default: on virtio-mmio the driver takes QEMU's
    /// `VIRTQUEUE_MAX_SIZE` (1024) for every queue, on PCI the device's own size stands.
    pub fn virtio_vring_num(&self, device_id: &str, queue: u32) -> Result<Option<u64>, QmpError> {
        let devices = match self.execute("x-query-virtio", None) {
            Ok(v) => v,
            Err(QmpError::Command { class, .. }) if class == "CommandNotFound" => return Ok(None),
            Err(e) => return Err(e),
        };
        let Some(path) = virtio_path(&devices, device_id) else { return Ok(None) };
        let status = self.execute("x-query-virtio-queue-status", Some(json!({ "path": path, "queue": queue })))?;
        Ok(status.get("vring-num").and_then(Value::as_u64))
    }
}

/// The QOM path `x-query-virtio` gives the virtio device of qdev id `id`: the device itself
/// (`/machine/peripheral/<id>`, a virtio-mmio device such as virtio-serial-device) or the
/// backend under its PCI proxy (`/machine/peripheral/<id>/virtio-backend`).
fn virtio_path(devices: &Value, id: &str) -> Option<String> {
    let own = format!("/machine/peripheral/{id}");
    devices
        .as_array()?
        .iter()
        .filter_map(|d| d.get("path")?.as_str())
        .find(|p| *p == own || p.strip_prefix(own.as_str()).is_some_and(|rest| rest.starts_with('/')))
        .map(str::to_string)
}

fn parse_chardevs(v: &Value) -> Option<Vec<ChardevInfo>> {
    v.as_array()?
        .iter()
        .map(|c| {
            Some(ChardevInfo {
                label: c.get("label")?.as_str()?.to_string(),
                filename: c.get("filename")?.as_str()?.to_string(),
                frontend_open: c.get("frontend-open")?.as_bool()?,
            })
        })
        .collect()
}

fn parse_version(v: &Value) -> Option<QemuVersion> {
    let q = v.get("qemu")?;
    Some(QemuVersion {
        major: q.get("major")?.as_u64()?,
        minor: q.get("minor")?.as_u64()?,
        micro: q.get("micro")?.as_u64()?,
        package: v.get("package").and_then(Value::as_str).unwrap_or("").to_string(),
    })
}
