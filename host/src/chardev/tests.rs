//! The endpoint kinds against stand-ins for QEMU: a peer socket, a listener.

use super::*;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

#[test]
fn unix_server_endpoint_accepts_and_records_both_closes() {
    let dir = tempfile::tempdir().unwrap();
    let addr = EndpointAddr::UnixServer { path: dir.path().join("s.sock"), reconnect_secs: 1 };
    let l = bind("p", &addr).unwrap();
    let mut ep = endpoint("p", &addr, l).unwrap();
    let err = ep.connect(Duration::from_millis(20)).err().unwrap();
    assert!(matches!(err, ChardevError::AcceptTimeout { .. }), "{err}");
    let EndpointAddr::UnixServer { path, .. } = &addr else { unreachable!() };
    let mut peer = UnixStream::connect(path).unwrap();
    let mut c = ep.connect(Duration::from_secs(5)).unwrap();
    peer.write_all(b"hi").unwrap();
    let mut buf = [0u8; 8];
    assert_eq!(c.read(&mut buf).unwrap(), 2);
    drop(peer);
    assert_eq!(c.read(&mut buf).unwrap(), 0);
    assert!(c.peer_closed());
    drop(c);
    let _peer2 = UnixStream::connect(path).unwrap();
    drop(ep.connect(Duration::from_secs(5)).unwrap());
    let whats: Vec<_> = ep.events().history().iter().map(|e| (e.conn, e.what)).collect();
    use EndpointEventKind::*;
    assert_eq!(whats, [(1, Connected), (1, ClosedByPeer), (2, Connected), (2, ClosedByHost)]);
}

#[test]
fn tcp_endpoints_connect_on_loopback_only() {
    let addr = EndpointAddr::TcpServer { addr: "127.0.0.1:0".parse().unwrap(), reconnect_secs: 1 };
    let Some(Listener::Tcp(l)) = bind("p", &addr).unwrap() else { panic!() };
    let real = l.local_addr().unwrap();
    let srv_addr = EndpointAddr::TcpServer { addr: real, reconnect_secs: 1 };
    let mut srv = endpoint("p", &srv_addr, Some(Listener::Tcp(l))).unwrap();
    let mut cli = endpoint("p", &EndpointAddr::TcpClient { addr: real }, None).unwrap();
    let rx = srv.events().subscribe();
    let mut a = cli.connect(Duration::from_secs(5)).unwrap();
    let mut b = srv.connect(Duration::from_secs(5)).unwrap();
    a.write_all(b"x").unwrap();
    b.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut buf = [0u8; 1];
    b.read_exact(&mut buf).unwrap();
    assert_eq!(rx.try_recv().unwrap().what, EndpointEventKind::Connected);
    assert!(bind("p", &EndpointAddr::TcpServer { addr: "10.0.0.1:0".parse().unwrap(), reconnect_secs: 1 }).is_err());
    assert!(endpoint("p", &srv_addr, None).is_err(), "a server endpoint needs its listener");
}

#[test]
fn unknown_pty_path_is_an_error_naming_the_port() {
    let mut ep = endpoint("org.vport.pty", &EndpointAddr::Pty { path: None }, None).unwrap();
    let err = ep.connect(Duration::from_secs(1)).err().unwrap();
    assert!(err.to_string().contains("org.vport.pty"), "{err}");
}
