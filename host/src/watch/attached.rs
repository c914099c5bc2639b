//! Watching the ports of a VM vport did not start ([`start_attached`], see [`crate::attach`]).

use super::{spawn, start_servers, Command, WatchError};
use crate::attach::Attached;
use crate::qmp::QmpEvent;
use crate::timeline::Timeline;
use crossbeam_channel::{Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Watching a VM vport did not start ([`start_attached`]).
pub struct AttachedWatch {
    /// Commands for the watchers.
    pub commands: Sender<Command>,
    /// Closes when QEMU is gone: QMP's event channel with `--qmp`; without, a channel that
    /// closes once every port's chardev server is gone ([`AttachedWatch::servers_gone`]).
    pub qemu_gone: Receiver<QmpEvent>,
    gone: Arc<Mutex<Vec<String>>>,
}

impl AttachedWatch {
    /// Without QMP: why each port's chardev server was taken for gone, as noted on the
    /// timeline (`port NAME: the chardev's server is gone (qemu exited?): ...`).
    pub fn servers_gone(&self) -> Vec<String> {
        self.gone.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// Like [`start`](super::start), for the ports of a VM vport did not start. Without its QMP, no QMP event
/// is recorded, and QEMU's exit is seen as every port's chardev server going away
/// ([`PortServer::infer_exit_from_chardev`](crate::session::PortServer::infer_exit_from_chardev)): each is noted on the timeline, and
/// [`AttachedWatch::qemu_gone`] closes once all are gone. A port whose server never goes (vport
/// listens) keeps it open: watching then ends on `quit`.
pub fn start_attached(
    attached: &Attached,
    timeline: &Timeline,
    liveness: Option<Duration>,
) -> Result<AttachedWatch, WatchError> {
    let events = attached.qmp.as_ref().map(|q| q.subscribe());
    let mut servers = Vec::new();
    for port in attached.ports() {
        for id in [&port.device_id, &port.chardev_id].into_iter().flatten() {
            timeline.alias(id, &port.name);
        }
        servers.push(attached.port_server(&port.name)?);
    }
    let gone = Arc::new(Mutex::new(Vec::new()));
    let (gone_tx, qemu_gone) = match &attached.qmp {
        Some(_) => (None, attached.events()),
        None => {
            let (tx, rx) = crossbeam_channel::unbounded::<String>();
            let (exit_tx, exit_rx) = crossbeam_channel::unbounded::<QmpEvent>();
            let (reasons, ports) = (gone.clone(), servers.len());
            spawn("watch-gone".into(), move || {
                for why in rx.iter() {
                    let mut r = reasons.lock().unwrap_or_else(|e| e.into_inner());
                    r.push(why);
                    if r.len() == ports {
                        drop(exit_tx);
                        return;
                    }
                }
                // A watcher ended otherwise: its server may be there still, so QEMU is not
                // known to be gone; the channel stays open for the rest of the run.
                std::mem::forget(exit_tx);
            })?;
            (Some(tx), exit_rx)
        }
    };
    let commands = start_servers(events, servers, timeline, liveness, gone_tx)?;
    Ok(AttachedWatch { commands, qemu_gone, gone })
}
