//! `vport hello`: the first end-to-end handshake.
//!
//! Boots the guest image paused, connects QMP and the port (a [`crate::session::PortServer`] that connects
//! once), lets the guest run, takes the agent's session (HELLO acknowledged), pings, and checks
//! QEMU's view of the port (the `VSERPORT_CHANGE` event and `query-chardev` `frontend-open`).
//!
//! [`run_attached`] does the same on a VM vport did not start ([`crate::attach`]): the VM runs
//! already, so the wait for the HELLO counts from the host's connection, and QEMU's view is
//! asked only when there is QMP (reported unavailable otherwise, which fails nothing).

use crate::attach::{Attached, NO_QMP};
use crate::client::AgentClient;
use crate::image::GuestImage;
use crate::link::{Handshake, PingSample};
use crate::qemu::accel::AccelChoice;
use crate::qmp::Qmp;
use crate::rig::{vm_config, Rig, RigError};
use crate::session::{PortServer, Reconnect, SessionError};
use crate::timeline::{ClockOffset, Timeline};
use serde::Serialize;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use thiserror::Error;

/// The port `vport hello` creates.
pub const DEFAULT_PORT: &str = "org.vport.0";
/// The name prefix of the ports `vport-agent` serves without being told.
pub const AGENT_DEFAULT_PREFIX: &str = "org.vport.";
/// The host software version sent in HELLO_ACK.
pub const HOST_VERSION: &str = concat!("vport ", env!("CARGO_PKG_VERSION"));

/// Settings of a hello run.
#[derive(Debug, Clone)]
pub struct HelloOptions {
    /// Port name.
    pub port: String,
    /// Accelerator choice.
    pub accel: AccelChoice,
    /// QEMU machine type (`pc`, `q35`).
    pub machine: String,
    /// Guest memory, MiB.
    pub memory_mib: u32,
    /// vCPUs.
    pub cpus: u32,
    /// Deadline from `cont` to the agent's HELLO.
    pub hello_timeout: Duration,
    /// Number of pings.
    pub pings: u32,
    /// Arguments for vport-agent (empty: the image's defaults).
    pub agent_args: Vec<String>,
    /// Where to write the run's life-cycle trace (JSON lines, docs/trace.md); the trace is
    /// recorded and checked in any case.
    pub trace: Option<PathBuf>,
}

impl Default for HelloOptions {
    fn default() -> Self {
        HelloOptions {
            port: DEFAULT_PORT.into(),
            accel: AccelChoice::Auto,
            machine: "pc".into(),
            memory_mib: 256,
            cpus: 1,
            hello_timeout: Duration::from_secs(45),
            pings: 10,
            agent_args: Vec::new(),
            trace: None,
        }
    }
}

/// Round-trip figures of the pings, microseconds.
#[derive(Debug, Clone, Copy, Serialize, PartialEq)]
pub struct RttSummary {
    /// Pings sent and answered.
    pub count: usize,
    /// Fastest.
    pub min_us: u64,
    /// Median.
    pub median_us: u64,
    /// Slowest.
    pub max_us: u64,
}

impl RttSummary {
    /// Summary of `samples`; `None` when empty.
    pub fn of(samples: &[PingSample]) -> Option<RttSummary> {
        let mut us: Vec<u64> = samples.iter().map(|s| s.rtt.as_micros() as u64).collect();
        us.sort_unstable();
        Some(RttSummary { count: us.len(), min_us: *us.first()?, median_us: us[us.len() / 2], max_us: *us.last()? })
    }
}

/// What `vport hello` reports.
#[derive(Debug, Clone, Serialize)]
pub struct HelloReport {
    /// Whether vport attached to a VM it did not start (`--socket`) rather than booting one.
    pub attached: bool,
    /// `kvm` or `tcg`; `None` when not known (attached without `--qmp`).
    pub accel: Option<String>,
    /// QEMU version from QMP; `None` without QMP.
    pub qemu_version: Option<String>,
    /// Guest kernel release, as the agent reported it.
    pub kernel_release: String,
    /// Agent version.
    pub agent_version: String,
    /// The agent's effective user and group ids (STATS `euid`, `egid`): 0 in vport's own image,
    /// a dynamic user under the packaged systemd unit. `None` if the agent did not say.
    pub agent_uid: Option<u64>,
    /// See [`HelloReport::agent_uid`].
    pub agent_gid: Option<u64>,
    /// Port name, as the agent reported it.
    pub port: String,
    /// QEMU device id of the port (empty when not known: attached without `--qmp`).
    pub port_id: String,
    /// Session id the agent chose.
    pub session: String,
    /// HELLO nonce.
    pub nonce: String,
    /// Guest boot id.
    pub boot_id: String,
    /// Time to the HELLO, milliseconds: from `cont` for a VM vport booted, from the host's
    /// connection when attached.
    pub boot_to_hello_ms: u64,
    /// HELLO_REQUESTs the host sent before a HELLO came.
    pub hello_requests: u32,
    /// Ping round trips.
    pub ping: RttSummary,
    /// Whether QMP reported `VSERPORT_CHANGE` open=true for the port; `None` without QMP.
    /// Attached, the guest may have opened the port before vport was there: not seeing it is
    /// no failure then.
    pub vserport_change_open_seen: Option<bool>,
    /// `query-chardev` `frontend-open` of the port's chardev after the handshake; `None` without
    /// QMP.
    pub frontend_open: Option<bool>,
    /// Whether the guest image was built by this run (`false`: from the cache or attached).
    pub image_fresh: bool,
    /// The run's own life-cycle trace, judged by the checker.
    pub trace: TraceSummary,
}

/// What the checker said of the run's trace.
#[derive(Debug, Clone, Serialize)]
pub struct TraceSummary {
    /// Records on the timeline (host, QMP and agent observations).
    pub records: usize,
    /// Broken rules, one line each (empty: clean).
    pub violations: Vec<String>,
    /// Notes (observations that break no rule, such as coalesced QMP events).
    pub notes: usize,
    /// The file the trace was written to, if any.
    pub file: Option<PathBuf>,
}

impl HelloReport {
    /// Whether QEMU's view agrees that the guest has the port open, as far as it is known: an
    /// unknown fact (no QMP) is no disagreement, nor is an unseen `VSERPORT_CHANGE` when
    /// attached.
    pub fn qemu_view_ok(&self) -> bool {
        let event_ok = self.attached || self.vserport_change_open_seen != Some(false);
        event_ok && self.frontend_open != Some(false)
    }

    /// Whether every check of the run passed: QEMU's view and the trace checker.
    pub fn ok(&self) -> bool {
        self.problem().is_none()
    }

    /// What failed, as an error message (`None` when [`HelloReport::ok`]).
    pub fn problem(&self) -> Option<String> {
        if !self.qemu_view_ok() {
            return Some(format!(
                "the agent answered, but QEMU does not show the port open (VSERPORT_CHANGE seen: {}, frontend-open: {})",
                known(self.vserport_change_open_seen),
                known(self.frontend_open)
            ));
        }
        if !self.trace.violations.is_empty() {
            return Some(format!(
                "the run's trace breaks {} life-cycle rule(s):\n{}",
                self.trace.violations.len(),
                self.trace.violations.join("\n")
            ));
        }
        None
    }

    /// The human-readable report.
    pub fn to_text(&self) -> String {
        let seen = match self.vserport_change_open_seen {
            Some(true) => "yes".to_string(),
            Some(false) if self.attached => "no (the guest may have opened it before vport attached)".into(),
            Some(false) => "NO".into(),
            None => NO_QMP.into(),
        };
        format!(
            "accelerator        {}\nqemu               {}\nguest kernel       {}\nagent              vport-agent {}\n\
             agent user         {}\nport               {} (device id {}, session {}, nonce {})\n{:<19}{} ms{}\n\
             ping round trip    min {} us, median {} us, max {} us ({} pings)\nVSERPORT_CHANGE    open=true seen: {}\n\
             frontend-open      {}\ntrace              {} records, {} violations, {} notes{}\n{}",
            self.accel.as_deref().unwrap_or(NO_QMP),
            self.qemu_version.as_deref().unwrap_or(NO_QMP),
            self.kernel_release,
            self.agent_version,
            match (self.agent_uid, self.agent_gid) {
                (Some(u), Some(g)) => format!("uid {u}, gid {g}{}", if u == 0 { " (root)" } else { "" }),
                _ => "unknown (no euid/egid in STATS)".into(),
            },
            self.port,
            if self.port_id.is_empty() { "unknown" } else { &self.port_id },
            self.session,
            self.nonce,
            if self.attached { "connect to HELLO" } else { "boot to HELLO" },
            self.boot_to_hello_ms,
            if self.hello_requests > 0 {
                format!(" ({} HELLO_REQUEST sent)", self.hello_requests)
            } else {
                String::new()
            },
            self.ping.min_us,
            self.ping.median_us,
            self.ping.max_us,
            self.ping.count,
            seen,
            known(self.frontend_open),
            self.trace.records,
            self.trace.violations.len(),
            self.trace.notes,
            self.trace.file.as_ref().map(|f| format!(" ({})", f.display())).unwrap_or_default(),
            self.trace.violations.iter().map(|v| format!("  {v}\n")).collect::<String>(),
        )
    }
}

/// `e` and its causes, `: `-separated.
fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(&format!(": {s}"));
        source = s.source();
    }
    text
}

/// A QMP-derived fact as text: its value, or [`NO_QMP`].
fn known(v: Option<bool>) -> String {
    v.map_or_else(|| NO_QMP.to_string(), |b| b.to_string())
}

/// Why a hello run failed.
#[derive(Debug, Error)]
pub enum HelloError {
    /// Setting up the VM failed (QEMU, QMP, sockets): an infrastructure failure.
    #[error(transparent)]
    Rig(#[from] RigError),
    /// The trace file could not be created.
    #[error(transparent)]
    Trace(#[from] crate::timeline::TimelineError),
    /// The VM vport was to attach to could not be reached.
    #[error(transparent)]
    Attach(#[from] crate::attach::AttachError),
    /// The host end of an attached VM's port could not be connected (nothing listens there, no
    /// permission): an infrastructure failure, not a verdict on the agent.
    #[error("cannot connect to port {port}'s chardev at {addr}: {cause}; check the --socket address (QEMU must be running with that chardev)")]
    Connect {
        /// Port name.
        port: String,
        /// The address given.
        addr: String,
        /// Why, with its causes.
        cause: String,
    },
    /// The agent did not complete the handshake or a ping in time.
    #[error("{cause}\n{context}")]
    Agent {
        /// What failed in the session (formatted into the message, so not a `#[source]`).
        cause: SessionError,
        /// Guest console and QEMU stderr tails.
        context: String,
    },
}

impl HelloError {
    /// Whether the failure is of the rig (QEMU, files, sockets) rather than of the guest.
    pub fn is_infrastructure(&self) -> bool {
        matches!(self, HelloError::Rig(_) | HelloError::Trace(_) | HelloError::Attach(_) | HelloError::Connect { .. })
    }
}

/// Monotonic nanoseconds since `origin`, for PING timestamps.
fn ns_since(origin: Instant) -> u64 {
    origin.elapsed().as_nanos() as u64
}

/// What the VM side of a run offers the exchange: QMP and the port's QEMU ids when known, and
/// what a failure can say of the VM.
struct Vantage<'a> {
    qmp: Option<&'a Qmp>,
    device_id: Option<&'a str>,
    chardev_id: Option<&'a str>,
    context: &'a dyn Fn() -> String,
    /// The host end's address when attached: a failed connect is then the infrastructure's.
    attached_at: Option<String>,
}

/// What lets the guest reach the agent once the host is connected (`cont`, or nothing when
/// attached), given the progress reporter; returns when the wait for the HELLO begins.
type Start<'a> = dyn FnMut(&mut dyn FnMut(&str)) -> Result<Instant, HelloError> + 'a;

/// What the exchange with the agent gave.
struct Exchange {
    hs: Handshake,
    /// When the wait for the HELLO began (`cont`, or the connection when attached).
    waited_from: Instant,
    samples: Vec<PingSample>,
    vserport_change_open_seen: Option<bool>,
    frontend_open: Option<bool>,
    trace: TraceSummary,
    /// STATS `euid`, `egid`.
    agent_ids: (Option<u64>, Option<u64>),
}

/// Boots `image`, handshakes with the agent on `opts.port`, pings, and checks QEMU's view.
pub fn run(image: &GuestImage, opts: &HelloOptions, progress: &mut dyn FnMut(&str)) -> Result<HelloReport, HelloError> {
    note_port_prefix(&opts.port, progress);
    let mut cfg = vm_config(image, &[opts.port.as_str()], &opts.agent_args);
    cfg.accel = opts.accel;
    cfg.machine.clone_from(&opts.machine);
    cfg.memory_mib = opts.memory_mib;
    cfg.cpus = opts.cpus;
    let timeline = new_timeline(opts)?;
    progress("starting qemu");
    let rig = Rig::launch(cfg)?;
    let qemu_version = rig.qmp.query_version().map_err(RigError::from)?.to_string();
    let port = rig.port(&opts.port)?.clone();
    let server = rig.port_server(&opts.port)?;
    let context = || rig.failure_context();
    let vantage = Vantage {
        qmp: Some(&rig.qmp),
        device_id: Some(&port.id),
        chardev_id: Some(&port.chardev_id),
        context: &context,
        attached_at: None,
    };
    let mut start = |progress: &mut dyn FnMut(&str)| {
        progress(&format!("booting the guest ({})", rig.vm.accel()));
        rig.qmp.cont().map_err(RigError::from)?;
        Ok(Instant::now())
    };
    let x = exchange(server, &vantage, &timeline, opts, progress, &mut start)?;
    Ok(report(x, false, Some(rig.vm.accel().to_string()), Some(qemu_version), port.id.clone(), image.fresh))
}

/// Like [`run`], on a VM vport did not start (see [`crate::attach`]): connects to the port
/// `opts.port` of `attached` (the VM runs already), handshakes, pings, and checks QEMU's view
/// when QMP is there. The VM is left as it was.
pub fn run_attached(
    attached: &Attached,
    opts: &HelloOptions,
    progress: &mut dyn FnMut(&str),
) -> Result<HelloReport, HelloError> {
    note_port_prefix(&opts.port, progress);
    let timeline = new_timeline(opts)?;
    let port = attached.port(&opts.port)?;
    let qmp = attached.qmp.as_deref();
    let (accel, qemu_version) = match qmp {
        Some(q) => (Some(accel_of(q)?), Some(q.query_version().map_err(RigError::from)?.to_string())),
        None => {
            progress(&format!("no --qmp: QEMU's view of the port is {NO_QMP}"));
            (None, None)
        }
    };
    let server = attached.port_server(&opts.port)?;
    let context = || attached.failure_context();
    let vantage = Vantage {
        qmp,
        device_id: port.device_id.as_deref(),
        chardev_id: port.chardev_id.as_deref(),
        context: &context,
        attached_at: Some(port.addr.to_string()),
    };
    let mut start = |progress: &mut dyn FnMut(&str)| {
        progress(&format!("connected to {} at {}; waiting for the agent", port.name, port.addr));
        Ok(Instant::now())
    };
    let x = exchange(server, &vantage, &timeline, opts, progress, &mut start)?;
    Ok(report(x, true, accel, qemu_version, port.device_id.clone().unwrap_or_default(), false))
}

fn note_port_prefix(port: &str, progress: &mut dyn FnMut(&str)) {
    if !port.starts_with(AGENT_DEFAULT_PREFIX) {
        progress(&format!(
            "note: vport-agent serves ports named {AGENT_DEFAULT_PREFIX}* by default; {port} will get no HELLO"
        ));
    }
}

fn new_timeline(opts: &HelloOptions) -> Result<Timeline, HelloError> {
    let origin = Instant::now();
    Ok(match &opts.trace {
        Some(path) => Timeline::create(path, origin)?,
        None => Timeline::new(origin),
    })
}

/// `kvm` when QEMU says KVM is on (`query-kvm`), else `tcg`.
fn accel_of(qmp: &Qmp) -> Result<String, HelloError> {
    let v = qmp.execute("query-kvm", None).map_err(RigError::from)?;
    let kvm = v.get("enabled").and_then(|e| e.as_bool()).unwrap_or(false);
    Ok(if kvm { "kvm" } else { "tcg" }.into())
}

/// Connects `server` (one connection: hello never takes a port over again), runs `start`
/// (which lets the guest run, or only notes the time), takes the agent's session, pings, asks
/// QEMU's view when there is QMP, fetches the agent's records, and judges the trace.
fn exchange(
    mut server: PortServer,
    v: &Vantage<'_>,
    timeline: &Timeline,
    opts: &HelloOptions,
    progress: &mut dyn FnMut(&str),
    start: &mut Start<'_>,
) -> Result<Exchange, HelloError> {
    for id in [v.device_id, v.chardev_id].into_iter().flatten() {
        timeline.alias(id, &opts.port);
    }
    if let Some(qmp) = v.qmp {
        let events = qmp.subscribe();
        let recorder = timeline.clone();
        // Ends when the QMP connection closes (QEMU exits, or the run drops its QMP).
        std::thread::spawn(move || {
            for ev in events.iter() {
                recorder.qmp_event(&ev);
            }
        });
    }
    let agent_err = |cause| HelloError::Agent { cause, context: (v.context)() };
    server.set_observer(Arc::new(timeline.clone()));
    server.set_reconnect(Reconnect::Once);
    // Connected before the guest runs, so the agent finds a host when it opens the port.
    server.connect(Duration::from_secs(10)).map_err(|cause| match &v.attached_at {
        Some(addr) => HelloError::Connect { port: opts.port.clone(), addr: addr.clone(), cause: chain(&cause) },
        None => agent_err(cause),
    })?;
    let waited_from = start(progress)?;
    let mut session = server.accept(opts.hello_timeout).map_err(agent_err)?;
    let hs = session.handshake().clone();
    progress("handshake done; pinging");
    let ping_origin = Instant::now();
    let mut samples = Vec::new();
    for _ in 0..opts.pings.max(1) {
        samples.push(session.ping(Duration::from_secs(10), ns_since(ping_origin)).map_err(agent_err)?);
    }
    let (mut seen, mut frontend_open) = (None, None);
    if let Some(qmp) = v.qmp {
        // The agent opened the port before it could send HELLO, so QEMU has emitted the event
        // already (if vport was there to see it); it is in the channel.
        let device = v.device_id.unwrap_or_default();
        let (ev, _) = qmp.wait_event(Duration::from_secs(2), |e| e.vserport_change() == Some((device, true)));
        seen = Some(ev.is_some());
        let chardevs = qmp.query_chardev().map_err(RigError::from)?;
        timeline.frontend_samples(&chardevs, Instant::now());
        frontend_open = v.chardev_id.map(|id| chardevs.iter().any(|c| c.label == id && c.frontend_open));
    }
    // The agent's own record of the port's life cycle, mapped onto the host clock.
    let agent_events = session.events(0, Duration::from_secs(10)).map_err(agent_err)?;
    // Who the agent runs as: root in vport's own image, a dynamic user under the packaged unit.
    let stats = session.agent_stats(Duration::from_secs(10)).map_err(agent_err)?;
    let agent_ids = (crate::link::stat(&stats, "euid"), crate::link::stat(&stats, "egid"));
    if let Some(offset) = ClockOffset::from_ping_samples(timeline.origin(), &samples) {
        timeline.agent_events(&opts.port, &agent_events.records, &offset);
    }
    let end = session.close();
    log::debug!("port {}: session ended: {end}", opts.port);
    if let Err(e) = timeline.flush() {
        log::warn!("the trace file is incomplete: {e}");
    }
    let check = timeline.check();
    let trace = TraceSummary {
        records: check.records,
        violations: check.violations.iter().map(|v| v.to_string()).collect(),
        notes: check.notes.len(),
        file: opts.trace.clone(),
    };
    Ok(Exchange { hs, waited_from, samples, vserport_change_open_seen: seen, frontend_open, trace, agent_ids })
}

fn report(
    x: Exchange,
    attached: bool,
    accel: Option<String>,
    qemu_version: Option<String>,
    port_id: String,
    image_fresh: bool,
) -> HelloReport {
    let ping = RttSummary::of(&x.samples).unwrap_or(RttSummary { count: 0, min_us: 0, median_us: 0, max_us: 0 });
    let hello = &x.hs.hello;
    HelloReport {
        attached,
        accel,
        qemu_version,
        kernel_release: hello.kernel_release.clone(),
        agent_version: hello.agent_version.clone(),
        agent_uid: x.agent_ids.0,
        agent_gid: x.agent_ids.1,
        port: hello.port_name.clone(),
        port_id,
        session: format!("{:#010x}", x.hs.session),
        nonce: format!("{:#018x}", hello.nonce),
        boot_id: hello.boot_id.clone(),
        boot_to_hello_ms: x.hs.hello_at.saturating_duration_since(x.waited_from).as_millis() as u64,
        hello_requests: x.hs.requests_sent,
        ping,
        vserport_change_open_seen: x.vserport_change_open_seen,
        frontend_open: x.frontend_open,
        image_fresh,
        trace: x.trace,
    }
}
