//! `vport hello`: the first end-to-end handshake.
//!
//! Boots the guest image paused, connects QMP and the port (a [`crate::session::PortServer`] that connects
//! once), lets the guest run, takes the agent's session (HELLO acknowledged), pings, and checks
//! QEMU's view of the port (the `VSERPORT_CHANGE` event and `query-chardev` `frontend-open`).

use crate::client::AgentClient;
use crate::image::GuestImage;
use crate::link::PingSample;
use crate::qemu::accel::AccelChoice;
use crate::rig::{vm_config, Rig, RigError};
use crate::session::{Reconnect, SessionError};
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
    /// `kvm` or `tcg`.
    pub accel: String,
    /// QEMU version from QMP.
    pub qemu_version: String,
    /// Guest kernel release, as the agent reported it.
    pub kernel_release: String,
    /// Agent version.
    pub agent_version: String,
    /// Port name, as the agent reported it.
    pub port: String,
    /// QEMU device id of the port.
    pub port_id: String,
    /// Session id the agent chose.
    pub session: String,
    /// HELLO nonce.
    pub nonce: String,
    /// Guest boot id.
    pub boot_id: String,
    /// Time from `cont` to the HELLO, milliseconds.
    pub boot_to_hello_ms: u64,
    /// HELLO_REQUESTs the host sent before a HELLO came.
    pub hello_requests: u32,
    /// Ping round trips.
    pub ping: RttSummary,
    /// Whether QMP reported `VSERPORT_CHANGE` open=true for the port.
    pub vserport_change_open_seen: bool,
    /// `query-chardev` `frontend-open` of the port's chardev after the handshake.
    pub frontend_open: bool,
    /// Whether the guest image was built by this run (`false`: from the cache).
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
    /// Whether QEMU's view agrees that the guest has the port open.
    pub fn qemu_view_ok(&self) -> bool {
        self.vserport_change_open_seen && self.frontend_open
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
                self.vserport_change_open_seen, self.frontend_open
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
        let yes = |b: bool| if b { "yes" } else { "NO" };
        format!(
            "accelerator        {}\nqemu               {}\nguest kernel       {}\nagent              vport-agent {}\n\
             port               {} (device id {}, session {}, nonce {})\nboot to HELLO      {} ms{}\n\
             ping round trip    min {} us, median {} us, max {} us ({} pings)\nVSERPORT_CHANGE    open=true seen: {}\n\
             frontend-open      {}\ntrace              {} records, {} violations, {} notes{}\n{}",
            self.accel,
            self.qemu_version,
            self.kernel_release,
            self.agent_version,
            self.port,
            self.port_id,
            self.session,
            self.nonce,
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
            yes(self.vserport_change_open_seen),
            self.frontend_open,
            self.trace.records,
            self.trace.violations.len(),
            self.trace.notes,
            self.trace.file.as_ref().map(|f| format!(" ({})", f.display())).unwrap_or_default(),
            self.trace.violations.iter().map(|v| format!("  {v}\n")).collect::<String>(),
        )
    }
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
        matches!(self, HelloError::Rig(_) | HelloError::Trace(_))
    }
}

/// Monotonic nanoseconds since `origin`, for PING timestamps.
fn ns_since(origin: Instant) -> u64 {
    origin.elapsed().as_nanos() as u64
}

/// Boots `image`, handshakes with the agent on `opts.port`, pings, and checks QEMU's view.
pub fn run(image: &GuestImage, opts: &HelloOptions, progress: &mut dyn FnMut(&str)) -> Result<HelloReport, HelloError> {
    if !opts.port.starts_with(AGENT_DEFAULT_PREFIX) {
        progress(&format!(
            "note: vport-agent serves ports named {AGENT_DEFAULT_PREFIX}* by default; {} will get no HELLO",
            opts.port
        ));
    }
    let mut cfg = vm_config(image, &[opts.port.as_str()], &opts.agent_args);
    cfg.accel = opts.accel;
    cfg.memory_mib = opts.memory_mib;
    cfg.cpus = opts.cpus;
    let origin = Instant::now();
    let timeline = match &opts.trace {
        Some(path) => Timeline::create(path, origin)?,
        None => Timeline::new(origin),
    };
    progress("starting qemu");
    let mut rig = Rig::launch(cfg)?;
    let qemu_version = rig.qmp.query_version().map_err(RigError::from)?.to_string();
    let port = rig.port(&opts.port)?.clone();
    timeline.alias(&port.id, &opts.port);
    timeline.alias(&port.chardev_id, &opts.port);
    let events = rig.qmp.subscribe();
    let recorder = timeline.clone();
    // Ends when QEMU closes the QMP socket (the rig is dropped at the end of the run).
    std::thread::spawn(move || {
        for ev in events.iter() {
            recorder.qmp_event(&ev);
        }
    });
    let agent_err = |rig: &Rig, cause| HelloError::Agent { cause, context: rig.failure_context() };
    let mut server = rig.port_server(&opts.port)?;
    server.set_observer(Arc::new(timeline.clone()));
    server.set_reconnect(Reconnect::Once);
    // Connected before the guest runs, so the agent finds a host when it opens the port.
    server.connect(Duration::from_secs(10)).map_err(|e| agent_err(&rig, e))?;
    progress(&format!("booting the guest ({})", rig.vm.accel()));
    let resumed = rig.resume()?;
    let mut session = server.accept(opts.hello_timeout).map_err(|e| agent_err(&rig, e))?;
    let hs = session.handshake().clone();
    progress("handshake done; pinging");
    let ping_origin = Instant::now();
    let mut samples = Vec::new();
    for _ in 0..opts.pings.max(1) {
        samples.push(session.ping(Duration::from_secs(10), ns_since(ping_origin)).map_err(|e| agent_err(&rig, e))?);
    }
    // The agent opened the port before it could send HELLO, so QEMU has emitted the event
    // already; it is in the channel (QMP was connected before the guest ran).
    let (ev, _) = rig.qmp.wait_event(Duration::from_secs(2), |e| e.vserport_change() == Some((port.id.as_str(), true)));
    let chardevs = rig.qmp.query_chardev().map_err(RigError::from)?;
    timeline.frontend_samples(&chardevs, Instant::now());
    let frontend_open = chardevs.iter().any(|c| c.label == port.chardev_id && c.frontend_open);
    // The agent's own record of the port's life cycle, mapped onto the host clock.
    let agent_events = session.events(0, Duration::from_secs(10)).map_err(|e| agent_err(&rig, e))?;
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
    let ping = RttSummary::of(&samples).unwrap_or(RttSummary { count: 0, min_us: 0, median_us: 0, max_us: 0 });
    Ok(HelloReport {
        accel: rig.vm.accel().to_string(),
        qemu_version,
        kernel_release: hs.hello.kernel_release.clone(),
        agent_version: hs.hello.agent_version.clone(),
        port: hs.hello.port_name.clone(),
        port_id: port.id.clone(),
        session: format!("{:#010x}", hs.session),
        nonce: format!("{:#018x}", hs.hello.nonce),
        boot_id: hs.hello.boot_id.clone(),
        boot_to_hello_ms: hs.hello_at.saturating_duration_since(resumed).as_millis() as u64,
        hello_requests: hs.requests_sent,
        ping,
        vserport_change_open_seen: ev.is_some(),
        frontend_open,
        image_fresh: image.fresh,
        trace,
    })
}
