use super::*;

fn channels(xml: &str) -> DomainChannels {
    parse_channels(xml).unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn a_running_domains_guest_agent_channel_is_a_unix_socket_qemu_listens_on() {
    let d = channels(include_str!("testdata/running-guest-agent.xml"));
    assert_eq!(d.name, "upstream");
    assert!(d.running);
    assert_eq!(d.channels.len(), 2, "the console and the serial are no channels: {d:?}");
    let ga = &d.channels[0];
    assert_eq!(ga.name, "org.qemu.guest_agent.0");
    assert_eq!(
        ga.addr,
        Ok(EndpointAddr::UnixClient {
            path: "/var/lib/libvirt/qemu/channel/target/domain-1-upstream/org.qemu.guest_agent.0".into()
        })
    );
    assert_eq!(ga.state.as_deref(), Some("disconnected"));
    let spice = &d.channels[1];
    assert_eq!(spice.name, "com.redhat.spice.0");
    assert!(spice.addr.as_ref().is_err_and(|e| e.contains("spicevmc")), "{spice:?}");
    assert!(
        spice.describe().starts_with("com.redhat.spice.0: not reachable (a spicevmc channel"),
        "{}",
        spice.describe()
    );
}

#[test]
fn pty_channels_carry_their_state_and_one_without_a_pty_is_not_reachable() {
    let d = channels(include_str!("testdata/pty-channel-states.xml"));
    let got: Vec<(&str, Option<&str>, bool)> =
        d.channels.iter().map(|c| (c.name.as_str(), c.state.as_deref(), c.addr.is_ok())).collect();
    assert_eq!(
        got,
        [
            ("org.linux-kvm.port.foo", Some("connected"), true),
            ("org.linux-kvm.port.foo1", Some("disconnected"), true),
            ("org.linux-kvm.port.foo2", None, false),
        ]
    );
    assert_eq!(d.channels[0].addr, Ok(EndpointAddr::Pty { path: Some("/dev/pts/5".into()) }));
    assert_eq!(d.channels[0].describe(), "org.linux-kvm.port.foo at pty:/dev/pts/5 (pty channel, state=connected)");
}

#[test]
fn source_modes_map_to_who_listens_and_entities_are_decoded() {
    let d = channels(include_str!("testdata/inactive-source-paths.xml"));
    assert!(!d.running, "a defined domain's xml has no id");
    let by = |n: &str| d.channels.iter().find(|c| c.name == n).unwrap_or_else(|| panic!("no {n}: {d:?}"));
    assert_eq!(
        by("org.qemu.guest_agent.3").addr,
        Ok(EndpointAddr::UnixClient {
            path: "/var/lib/libvirt/qemu/channel/target/QEMUGuest1/org.qemu.guest_agent.3".into()
        })
    );
    assert!(by("org.vport.auto").addr.as_ref().is_err_and(|e| e.contains("libvirt picks it")));
    assert_eq!(
        by("org.vport.1").addr,
        Ok(EndpointAddr::UnixServer { path: "/run/vport/org.vport.'q'.sock".into(), reconnect_secs: 0 }),
        "mode='connect': qemu connects, vport listens"
    );
    assert_eq!(by("org.vport.tcp").addr, Ok(EndpointAddr::TcpClient { addr: "127.0.0.1:4555".parse().unwrap() }));
    assert_eq!(d.channels.len(), 7, "the guestfwd channel is no virtio port");
}

#[test]
fn the_spec_takes_the_ports_asked_for_or_every_reachable_one() {
    let d = channels(include_str!("testdata/inactive-source-paths.xml"));
    let all = spec_of("QEMUGuest1", &d, &[], None).unwrap();
    assert_eq!(all.ports.len(), 6, "every channel but the one without a path: {all:?}");
    let one = spec_of("QEMUGuest1", &d, &["org.vport.tcp".into()], Some("/t/qmp".into())).unwrap();
    assert_eq!(one.names(), ["org.vport.tcp"]);
    assert_eq!(one.qmp, Some(PathBuf::from("/t/qmp")));
    let e = spec_of("QEMUGuest1", &d, &["org.vport.auto".into()], None).unwrap_err();
    assert_eq!(e.exit_code(), ExitCode::Usage);
    let msg = e.to_string();
    assert!(msg.contains("no virtio channel \"org.vport.auto\"") && msg.contains("libvirt picks it"), "{msg}");
    let none = DomainChannels { name: "x".into(), running: true, channels: vec![] };
    let e = spec_of("x", &none, &[], None).unwrap_err().to_string();
    assert!(e.contains("none (add one"), "{e}");
}

#[test]
fn what_is_not_a_domain_is_refused() {
    assert!(parse_channels("<network/>").unwrap_err().contains("not <domain>"));
    assert!(parse_channels("<domain>").is_err());
}

#[test]
fn virsh_comes_from_the_environment_and_its_failures_say_what_to_do() {
    let dir = tempfile::tempdir().unwrap();
    let fake = dir.path().join("virsh");
    std::fs::write(
        &fake,
        "#!/bin/sh\n[ \"$1 $2\" = 'dumpxml --' ] || exit 9\n[ \"$3\" = vm1 ] && { cat \"$(dirname \"$0\")/vm1.xml\"; exit 0; }\n\
         echo \"error: failed to get domain '$3'\" >&2; exit 1\n",
    )
    .unwrap();
    std::os::unix::fs::PermissionsExt::set_mode(&mut std::fs::metadata(&fake).unwrap().permissions(), 0o755);
    std::fs::set_permissions(&fake, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    std::fs::write(dir.path().join("vm1.xml"), include_str!("testdata/running-guest-agent.xml")).unwrap();
    // The environment is the process's: set and read within this one test.
    std::env::set_var(VIRSH_ENV, &fake);
    let (spec, found) = attach_spec("vm1", &["org.qemu.guest_agent.0".into()], None).unwrap();
    assert_eq!(spec.names(), ["org.qemu.guest_agent.0"]);
    assert_eq!(found.name, "upstream");
    let e = attach_spec("nosuch", &[], None).unwrap_err();
    assert_eq!(e.exit_code(), ExitCode::Usage, "{e}");
    assert!(e.to_string().contains("failed to get domain 'nosuch'"), "{e}");
    std::env::set_var(VIRSH_ENV, dir.path().join("missing"));
    let e = attach_spec("vm1", &[], None).unwrap_err();
    assert_eq!(e.exit_code(), ExitCode::Infrastructure);
    assert!(e.to_string().contains(VIRSH_ENV), "{e}");
    std::env::remove_var(VIRSH_ENV);
}
