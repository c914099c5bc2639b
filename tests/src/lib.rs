//! Harness for vport's end-to-end tests: every test boots `qemu-system-x86_64` with the
//! Debian kernel and the real `vport-agent`, and talks to it over real virtio-serial ports.
//!
//! - [`guest_image`] builds (or reuses) the image once per test process.
//! - [`TestVm`] owns a [`Rig`]; when a test panics, its drop prints what the guest console and
//!   QEMU's stderr said last; the VM is always killed.
//!
//! Prerequisites (`scripts/test` does them): `scripts/bootstrap` and `scripts/build-agent`.

use std::os::unix::net::UnixStream;
use std::sync::OnceLock;
use std::time::Duration;
use vport_host::image::{self, kernel::KernelSource, GuestImage, ImageRequest};
use vport_host::link::{Handshake, Link};
use vport_host::rig::{vm_config, Rig};

pub use vport_host;

/// Deadline from `cont` to the agent's HELLO: a TCG boot takes 4-8 s on these machines;
/// the margin covers a loaded CI runner.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(60);
/// Deadline for one request/response on a live session.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(10);

/// The guest image, built once per process from the environment's settings.
pub fn guest_image() -> &'static GuestImage {
    static IMAGE: OnceLock<GuestImage> = OnceLock::new();
    IMAGE.get_or_init(|| {
        let _ = env_logger::builder().is_test(true).try_init();
        let agent = image::resolve_agent(None).unwrap_or_else(|e| panic!("{e}: run scripts/build-agent first"));
        let req = ImageRequest {
            kernel: KernelSource::from_args(None, None, None),
            agent,
            busybox: image::default_busybox(),
            cache_dir: vport_host::cache::cache_dir(),
        };
        image::build(&req, &mut |m| eprintln!("image: {m}"))
            .unwrap_or_else(|e| panic!("cannot build the guest image: {e:#}: run scripts/bootstrap first"))
    })
}

/// The `vport` binary under test: `$VPORT_BIN`, or `vport` in the test's profile directory
/// (`target/<profile>/deps/<test>-<hash>` -> `target/<profile>/vport`; `cargo test --workspace`
/// builds it, alone `cargo build -p vport-host --bin vport`).
pub fn vport_bin() -> std::path::PathBuf {
    if let Some(p) = std::env::var_os("VPORT_BIN") {
        return p.into();
    }
    let exe = std::env::current_exe().expect("the test's own path");
    let bin = exe.parent().and_then(std::path::Path::parent).map(|d| d.join("vport")).expect("a profile directory");
    assert!(bin.exists(), "{} is missing: cargo build -p vport-host --bin vport (or set VPORT_BIN)", bin.display());
    bin
}

/// A booted test VM. Killed on drop; on a panicking test, prints the guest console and QEMU
/// stderr tails first.
pub struct TestVm {
    /// The rig: VM, QMP.
    pub rig: Rig,
}

impl TestVm {
    /// Starts a VM (paused) with virtio-serial ports `ports`; call [`TestVm::resume`] after
    /// connecting what must be connected before the guest runs.
    pub fn launch(ports: &[&str]) -> TestVm {
        let cfg = vm_config(guest_image(), ports, &[]);
        let rig = Rig::launch(cfg).unwrap_or_else(|e| panic!("cannot launch the vm: {:#}", anyhow::Error::new(e)));
        eprintln!("e2e: qemu pid {} accelerator {}", rig.vm.pid(), rig.vm.accel());
        TestVm { rig }
    }

    /// Starts a VM (paused) with `ports`, the agent run with `agent_args` (none: the image's
    /// defaults) and `cmdline` appended to the kernel command line (see
    /// [`vport_host::image::initscript`] for the `vport.*` parameters).
    pub fn launch_with(ports: &[&str], agent_args: &[&str], cmdline: &[String]) -> TestVm {
        let args: Vec<String> = agent_args.iter().map(|a| a.to_string()).collect();
        let mut cfg = vm_config(guest_image(), ports, &args);
        for p in cmdline {
            cfg.cmdline.push(' ');
            cfg.cmdline.push_str(p);
        }
        let rig = Rig::launch(cfg).unwrap_or_else(|e| panic!("cannot launch the vm: {:#}", anyhow::Error::new(e)));
        eprintln!("e2e: qemu pid {} accelerator {}", rig.vm.pid(), rig.vm.accel());
        TestVm { rig }
    }

    /// Starts a VM (paused) with virtio-serial ports `ports` and its configuration changed by
    /// `tweak` (extra QEMU arguments, for example).
    pub fn launch_tweaked(ports: &[&str], tweak: impl FnOnce(&mut vport_host::qemu::VmConfig)) -> TestVm {
        let mut cfg = vm_config(guest_image(), ports, &[]);
        tweak(&mut cfg);
        let rig = Rig::launch(cfg).unwrap_or_else(|e| panic!("cannot launch the vm: {:#}", anyhow::Error::new(e)));
        eprintln!("e2e: qemu pid {} accelerator {}", rig.vm.pid(), rig.vm.accel());
        TestVm { rig }
    }

    /// Lets the guest run.
    pub fn resume(&mut self) {
        self.rig.resume().unwrap_or_else(|e| panic!("cannot resume the vm: {:#}", anyhow::Error::new(e)));
    }

    /// Connects to port `name`'s chardev.
    pub fn connect(&self, name: &str) -> Link<UnixStream> {
        self.rig.connect(name).unwrap_or_else(|e| panic!("cannot connect to port {name}: {:#}", anyhow::Error::new(e)))
    }

    /// Waits for the agent's HELLO on `link` and acknowledges it.
    pub fn handshake(&self, link: &mut Link<UnixStream>) -> Handshake {
        link.handshake(HELLO_TIMEOUT, "vport-tests")
            .unwrap_or_else(|e| panic!("handshake on {} failed: {e}\n{}", link.port(), self.rig.failure_context()))
    }

    /// The `n` last guest console lines.
    pub fn console_tail(&self, n: usize) -> String {
        self.rig.vm.console_tail(n)
    }
}

impl Drop for TestVm {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("e2e: test failed; vm state:\n{}", self.rig.failure_context());
        }
    }
}

/// Starts a VM (paused) with `ports`, each with the host end it names (see
/// [`vport_host::qemu::HostEnd`]); call [`TestVm::resume`] when the host side is ready.
pub fn launch_with_ports(ports: Vec<vport_host::qemu::PortConfig>) -> TestVm {
    let mut cfg = vm_config(guest_image(), &[], &[]);
    cfg.ports = ports;
    let rig = Rig::launch(cfg).unwrap_or_else(|e| panic!("cannot launch the vm: {:#}", anyhow::Error::new(e)));
    eprintln!("e2e: qemu pid {} accelerator {}", rig.vm.pid(), rig.vm.accel());
    TestVm { rig }
}

/// Accepts the next session on `server` within `timeout`, panicking with the VM's state if
/// none comes.
pub fn accept_session(
    vm: &TestVm,
    server: &mut vport_host::session::PortServer,
    timeout: Duration,
) -> vport_host::session::Session {
    server.accept(timeout).unwrap_or_else(|e| {
        panic!("no session on {}: {:#}\n{}", server.port(), anyhow::Error::new(e), vm.rig.failure_context())
    })
}

/// Waits up to `timeout` for the outgoing migration of `vm` to complete (`query-migrate`);
/// a failed or cancelled migration, QEMU's exit or the deadline is the error.
pub fn wait_migration_completed(vm: &TestVm, timeout: Duration) -> Result<(), String> {
    vport_host::wait::wait_until(
        "the migration to complete",
        timeout,
        Duration::from_millis(20),
        || vm.rig.vm.check_alive(),
        || match vm.rig.qmp.query_migrate() {
            Ok(m) if m.status == "completed" => Some(Ok(())),
            Ok(m) if m.status == "failed" || m.status == "cancelled" => Some(Err(format!("{m:?}"))),
            _ => None,
        },
    )
    .map_err(|e| e.to_string())?
}
