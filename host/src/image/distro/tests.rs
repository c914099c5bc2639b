use super::*;
use crate::image::elf::tests::fake_elf;

fn request(dir: &Path) -> DistroRequest {
    let k = dir.join("bzImage");
    std::fs::write(&k, b"kernel").unwrap();
    let bb = dir.join("busybox");
    std::fs::write(&bb, fake_elf(&[1], ".x", b"")).unwrap();
    let deb = dir.join("vport-agent_0.1.0-1_amd64.deb");
    std::fs::write(&deb, b"deb 1").unwrap();
    DistroRequest {
        agent_deb: deb,
        kernel: KernelSource::Image { path: k, modules_dir: None },
        busybox: bb,
        cache_dir: dir.join("cache"),
        suite: DEFAULT_SUITE.into(),
        mirror: DEFAULT_MIRROR.into(),
    }
}

fn key_of(req: &DistroRequest) -> String {
    let deb = kmods::file_sha256(&req.agent_deb).unwrap();
    let k = kmods::resolve(&req.kernel, &req.cache_dir, &mut |_| {}).unwrap();
    key(req, &deb, &k.identity, &std::fs::read(&req.busybox).unwrap())
}

#[test]
fn the_key_follows_the_deb_the_suite_and_the_mirror() {
    let dir = tempfile::tempdir().unwrap();
    let req = request(dir.path());
    let a = key_of(&req);
    assert_eq!(a, key_of(&req), "the key is stable");
    std::fs::write(&req.agent_deb, b"deb 2").unwrap();
    let b = key_of(&req);
    assert_ne!(a, b, "a rebuilt .deb gives a new image");
    let c = key_of(&DistroRequest { suite: "trixie".into(), ..req.clone() });
    let d = key_of(&DistroRequest { mirror: "http://other/debian".into(), ..req.clone() });
    assert!(c != b && d != b && c != d);
}

/// An image already in the cache is reused as it is: no root, no mmdebstrap, no network.
#[test]
fn a_cached_image_is_reused_without_building() {
    let dir = tempfile::tempdir().unwrap();
    let req = request(dir.path());
    let key = key_of(&req);
    let cached = req.cache_dir.join("distro").join(&key);
    std::fs::create_dir_all(&cached).unwrap();
    std::fs::write(cached.join("image.json"), r#"{"modules":["virtio_blk","ext4"]}"#).unwrap();
    let img = build(&req, &mut |m| panic!("nothing to build, yet: {m}")).unwrap();
    assert!(!img.fresh);
    assert_eq!((img.dir.clone(), img.key.clone()), (cached.clone(), key));
    assert_eq!(img.modules, ["virtio_blk", "ext4"]);
    assert_eq!(img.disk, cached.join("rootfs.ext4"));
    assert_eq!(img.cmdline, init::cmdline());
}

#[test]
fn a_missing_deb_or_busybox_is_named_with_the_fix() {
    let dir = tempfile::tempdir().unwrap();
    let req = request(dir.path());
    let err = build(&DistroRequest { agent_deb: dir.path().join("none.deb"), ..req.clone() }, &mut |_| {}).unwrap_err();
    assert!(err.to_string().contains("none.deb") && err.to_string().contains("scripts/build-deb"), "{err}");
    let err = build(&DistroRequest { busybox: dir.path().join("nobusybox"), ..req }, &mut |_| {}).unwrap_err();
    assert!(err.to_string().contains("busybox-static"), "{err}");
}

#[test]
fn a_file_that_is_not_the_agent_package_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("x.deb");
    std::fs::write(&p, b"not a deb").unwrap();
    match check_deb(&p) {
        Err(DistroError::BadDeb { reason, .. }) => assert!(reason.contains("dpkg-deb"), "{reason}"),
        Err(DistroError::Tool { .. }) => println!("skipped: no dpkg-deb"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn the_deb_is_found_in_the_target_directory_newest_first() {
    let dir = tempfile::tempdir().unwrap();
    let exe = dir.path().join("target/debug/deps/distro-123");
    let dirs = deb_dirs(Some(&exe));
    assert_eq!(
        dirs,
        [dir.path().join("target/debug/deps/../debian"), dir.path().join("target/debug/deps/../../debian")]
    );
    assert!(deb_dirs(None).is_empty());
}

#[test]
fn the_vm_gets_the_disk_as_virtio_blk_snapshot_and_more_memory() {
    let img = DistroImage {
        dir: "/c/d".into(),
        kernel: "/c/d/vmlinuz".into(),
        initramfs: "/c/d/initramfs.cpio".into(),
        disk: "/c/a,b/rootfs.ext4".into(),
        build_log: "/c/d/build.log".into(),
        kernel_release: "6.1".into(),
        modules: Vec::new(),
        cmdline: init::cmdline(),
        suite: DEFAULT_SUITE.into(),
        agent_deb: "/x.deb".into(),
        agent_deb_sha256: String::new(),
        key: "k".into(),
        fresh: false,
    };
    let cfg = img.vm_config(&["org.vport.0"]);
    let args: Vec<String> = cfg.extra_args.iter().map(|a| a.to_string_lossy().into_owned()).collect();
    assert_eq!(
        args,
        [
            "-drive",
            "file=/c/a,,b/rootfs.ext4,if=none,id=vport-root,format=raw,snapshot=on",
            "-device",
            "virtio-blk-pci,drive=vport-root"
        ]
    );
    assert_eq!(cfg.memory_mib, MEMORY_MIB);
    assert_eq!(cfg.ports.len(), 1);
    assert!(cfg.cmdline.contains("root=/dev/vda"));
}

#[test]
fn the_initramfs_has_busybox_the_modules_and_init() {
    let mods = vec![crate::image::modules::LoadedModule { name: "virtio_blk".into(), bytes: b"\x7fELFko".to_vec() }];
    let init = init::init_script(&["virtio_blk".into()]);
    let bytes = initramfs(b"busybox", &mods, &init).unwrap();
    let entries = cpio::read_archive(&bytes).unwrap();
    let find = |n: &str| entries.iter().find(|e| e.name == n).unwrap_or_else(|| panic!("{n} missing"));
    assert_eq!(find("bin/busybox").data, b"busybox");
    assert_eq!(find("lib/modules/virtio_blk.ko").data, b"\x7fELFko");
    assert_eq!(find("init").data, init.as_bytes());
    assert_eq!(find("dev/console").rdev, (5, 1));
    assert_eq!(find("newroot").mode & 0o170000, cpio::S_IFDIR);
}

#[test]
fn pruning_keeps_the_newest_complete_images_and_scratch_directories() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path();
    for (i, name) in ["a", "b", "c"].iter().enumerate() {
        let d = base.join(name);
        std::fs::create_dir_all(&d).unwrap();
        let f = std::fs::File::create(d.join("image.json")).unwrap();
        let t = std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_000 + i as u64);
        f.set_modified(t).unwrap();
    }
    std::fs::create_dir_all(base.join(".build-x")).unwrap();
    std::fs::create_dir_all(base.join("incomplete")).unwrap();
    let removed = prune(base, 2);
    assert_eq!(removed, [base.join("a")]);
    for kept in ["b", "c", ".build-x", "incomplete"] {
        assert!(base.join(kept).exists(), "{kept} kept");
    }
}
