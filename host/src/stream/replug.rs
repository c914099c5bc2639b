//! A [`SessionSource`] that lives through unplugs: when its port is unplugged and plugged in
//! again ([`crate::rig::replug_port`]), the old [`PortServer`] is closed for good
//! ([`EndReason::Unplugged`]); this source then serves the new port of the same name with a
//! new server over the same chardev, so a transfer resumes on it.

use super::SessionSource;
use crate::qemu::PortInfo;
use crate::qmp::Qmp;
use crate::session::{EndReason, PortServer, Session, SessionError};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Sessions of one port, across its unplugs and replugs.
pub struct ReplugSource {
    server: PortServer,
    port: PortInfo,
    qmp: Arc<Qmp>,
    renewed: u64,
}

impl ReplugSource {
    /// Serves `port` (a unix-socket client end, as the rig's ports are) from `server`.
    pub fn new(server: PortServer, port: PortInfo, qmp: Arc<Qmp>) -> ReplugSource {
        ReplugSource { server, port, qmp, renewed: 0 }
    }
}

/// The next session of `port` from `server` within `timeout`; when the server finds the port
/// unplugged, `server` is replaced by a new one over the same chardev (the port plugged in
/// again) and the session comes from it, reporting to the old one's observer (a trace goes on
/// across the replug). `renewed` counts the replacements.
pub fn accept_through_unplug(
    server: &mut PortServer,
    port: &PortInfo,
    qmp: &Arc<Qmp>,
    timeout: Duration,
    renewed: &mut u64,
) -> Result<Session, SessionError> {
    let deadline = Instant::now() + timeout;
    match server.accept(timeout) {
        Err(SessionError::Closed { reason: EndReason::Unplugged, .. }) => {
            let endpoint = crate::chardev::endpoint(&port.name, &port.endpoint, None)?;
            let observer = server.observer();
            *server = PortServer::new(port, endpoint, qmp.clone());
            if let Some(observer) = observer {
                server.set_observer(observer);
            }
            *renewed += 1;
            log::info!("port {}: served anew after an unplug ({renewed} so far)", port.name);
            server.accept(deadline.saturating_duration_since(Instant::now()))
        }
        other => other,
    }
}

impl SessionSource for ReplugSource {
    fn next_session(&mut self, timeout: Duration) -> Result<Session, SessionError> {
        accept_through_unplug(&mut self.server, &self.port, &self.qmp, timeout, &mut self.renewed)
    }
    fn reconnect(&mut self) {
        self.server.disconnect();
    }
    fn vm_paused(&self) -> bool {
        self.server.vm_paused()
    }
}
