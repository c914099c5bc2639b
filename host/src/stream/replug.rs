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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chardev::{EndpointAddr, EndpointKind};
    use crate::link::LinkObserver;
    use crate::qemu::PortKind;
    use crate::session::fakes::{event, scripted_qmp, server_with, Recorded};
    use serde_json::json;

    #[test]
    fn a_server_made_anew_after_an_unplug_reports_to_the_same_observer() {
        let (qmp, dir) = scripted_qmp(|_| Some(json!({})));
        let (mut server, _agents, events) = server_with(EndpointKind::UnixClient, None);
        let observer = Arc::new(Recorded::default());
        server.set_observer(observer.clone());
        events.send(event("DEVICE_DELETED", json!({"device": "vport-port0", "path": "/x"}))).unwrap();
        // Nothing listens on the new port's socket: the new server finds no session.
        let path = dir.path().join("port.sock");
        let port = PortInfo {
            name: "org.vport.fake".into(),
            id: "vport-port0".into(),
            chardev_id: "vport-ch0".into(),
            kind: PortKind::Serial,
            socket: path.clone(),
            endpoint: EndpointAddr::UnixClient { path },
            controller: 0,
            nr: None,
        };
        let mut renewed = 0;
        let outcome = accept_through_unplug(&mut server, &port, &qmp, Duration::from_millis(300), &mut renewed);
        assert!(outcome.is_err(), "no session without a listener");
        assert_eq!(renewed, 1, "the unplugged server was replaced");
        let carried = server.observer().expect("the new server has an observer");
        let expected: Arc<dyn LinkObserver> = observer;
        assert!(Arc::ptr_eq(&carried, &expected), "the same observer");
    }
}
