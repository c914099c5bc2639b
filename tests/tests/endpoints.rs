//! Every kind of host end carries a PING round trip with the real agent, on one VM with one
//! port per kind; QEMU's reconnection to a vport listener is accepted after the host drops it.

use std::time::{Duration, Instant};
use vport_host::chardev::{Connection, Endpoint, EndpointEventKind, EndpointKind};
use vport_host::client::AgentClient;
use vport_host::link::Link;
use vport_host::qemu::{HostEnd, PortConfig};
use vport_tests::{launch_with_ports, TestVm, HELLO_TIMEOUT, REPLY_TIMEOUT};

const PORTS: [(&str, HostEnd); 5] = [
    ("org.vport.unix-client", HostEnd::UnixClient),
    ("org.vport.unix-server", HostEnd::UnixServer { reconnect_secs: 1 }),
    ("org.vport.tcp-client", HostEnd::TcpClient),
    ("org.vport.tcp-server", HostEnd::TcpServer { reconnect_secs: 1 }),
    ("org.vport.pty", HostEnd::Pty),
];

/// How long QEMU may take to connect to a vport listener (at start, or `reconnect=1` after a
/// drop), with margin for a loaded machine.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

fn handshake_and_ping(vm: &TestVm, link: &mut Link<Connection>, tag: u64) -> Duration {
    let hs = link
        .handshake(HELLO_TIMEOUT, "vport-tests")
        .unwrap_or_else(|e| panic!("handshake on {}: {e}\n{}", link.port(), vm.rig.failure_context()));
    assert_eq!(hs.hello.port_name, link.port());
    let p = link
        .ping(REPLY_TIMEOUT, tag)
        .unwrap_or_else(|e| panic!("ping on {}: {e}\n{}", link.port(), vm.rig.failure_context()));
    p.rtt
}

#[test]
fn every_endpoint_kind_carries_a_ping_and_qemu_reconnects_to_vport_listeners() {
    let mut vm = launch_with_ports(PORTS.iter().map(|(n, h)| PortConfig::serial(*n).with_host(*h)).collect());
    let mut endpoints: Vec<Box<dyn Endpoint>> = Vec::new();
    let mut links = Vec::new();
    for (name, _) in PORTS {
        let info = vm.rig.port(name).unwrap();
        eprintln!("e2e: {name}: {}", info.endpoint);
        let mut ep = vm.rig.endpoint(name).unwrap();
        let conn = ep
            .connect(CONNECT_TIMEOUT)
            .unwrap_or_else(|e| panic!("connect {name}: {:#}\n{}", anyhow::Error::new(e), vm.rig.failure_context()));
        links.push(Some(Link::new(name, conn)));
        endpoints.push(ep);
    }
    let kinds: Vec<EndpointKind> = endpoints.iter().map(|e| e.kind()).collect();
    use EndpointKind::*;
    assert_eq!(kinds, [UnixClient, UnixServer, TcpClient, TcpServer, Pty]);
    vm.resume();
    let t0 = Instant::now();
    for (i, link) in links.iter_mut().enumerate() {
        let link = link.as_mut().unwrap();
        let rtt = handshake_and_ping(&vm, link, 100 + i as u64);
        eprintln!(
            "e2e: {} ({}): READY and ping rtt {rtt:?} at +{} ms",
            link.port(),
            kinds[i].name(),
            t0.elapsed().as_millis()
        );
    }

    // Drop the connections to the vport listeners: QEMU reconnects (reconnect=1), the agent
    // sees a new host and offers a new session.
    for i in [1, 3] {
        let name = PORTS[i].0;
        drop(links[i].take());
        let dropped = Instant::now();
        let conn = endpoints[i]
            .connect(CONNECT_TIMEOUT)
            .unwrap_or_else(|e| panic!("reconnect {name}: {:#}\n{}", anyhow::Error::new(e), vm.rig.failure_context()));
        let waited = dropped.elapsed();
        eprintln!("e2e: {name}: qemu reconnected {} ms after the drop", waited.as_millis());
        assert!(waited < Duration::from_secs(5), "reconnect=1 took {waited:?}");
        let mut link = Link::new(name, conn);
        let rtt = handshake_and_ping(&vm, &mut link, 200 + i as u64);
        eprintln!("e2e: {name}: READY again, ping rtt {rtt:?}");
        let whats: Vec<_> = endpoints[i].events().history().iter().map(|e| (e.conn, e.what)).collect();
        use EndpointEventKind::*;
        assert_eq!(whats, [(1, Connected), (1, ClosedByHost), (2, Connected)], "{name}");
        links[i] = Some(link);
    }

    // The pty: close the slave and open it again; QEMU notices within its 1 s poll.
    let pty = PORTS[4].0;
    drop(links[4].take());
    let conn = endpoints[4].connect(CONNECT_TIMEOUT).unwrap();
    let mut link = Link::new(pty, conn);
    let t = Instant::now();
    let rtt = handshake_and_ping(&vm, &mut link, 300);
    eprintln!("e2e: {pty}: READY again {} ms after reopening the slave, ping rtt {rtt:?}", t.elapsed().as_millis());
    vm.rig.vm.check_alive().unwrap();
}
