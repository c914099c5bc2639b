//! Group `scale`: 31 serial ports on controller 0 (max_ports 32: port 0 stays reserved for a
//! console), 4 on a second controller and 8 consoles on a third (the guest's hvc driver has 8
//! lines; the agent runs with `--consoles`), every host client connected before the guest boots.
//! The set-up takes a [`Session`] on every port through its [`PortServer`] (waiting in slices of
//! a second, then reconnecting, one at a time, the ports that never answered); the cases judge
//! that and send traffic in every session at once.

use super::case::{Case, CaseError, Observation};
use super::group::Group;
use super::options::SuiteOptions;
use super::recorder::Recorder;
use super::support::{boot, CONSOLES_FLAG};
use super::trace::VmTrace;
use crate::client::AgentClient;
use crate::qemu::PortConfig;
use crate::rig::Rig;
use crate::session::{PortServer, Reconnect, Session, SessionError};
use std::time::{Duration, Instant};

/// Serial ports on controller 0.
const FIRST: usize = 31;
/// Serial ports on controller 1.
const SECOND: usize = 4;
/// Consoles (`virtconsole`) on controller 2: as many as the guest has hvc lines.
const CONSOLES: usize = 8;
/// Deadline of a silent port's handshake after its host client reconnected.
const SCALE_RECONNECT_DEADLINE: Duration = Duration::from_secs(20);
/// How long after the first READY port of a pass the other ports are still waited for.
const SCALE_GRACE: Duration = Duration::from_secs(5);

/// A port that did not see the host connected at boot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct LostPort {
    /// Its name.
    pub(crate) name: String,
    /// `frontend-open` right after the first pass: whether the guest had opened it.
    pub(crate) guest_open: Option<bool>,
    /// Whether a reconnect of its host client made a session.
    pub(crate) recovered: bool,
}

/// The scale group's state.
pub(crate) struct Scale {
    _rig: Rig,
    /// The serial ports' sessions, then the consoles'.
    sessions: Vec<Session>,
    ports: usize,
    lost: Vec<LostPort>,
    ready: usize,
    failures: Vec<String>,
    all_ready: Duration,
    /// Each console's name and the line its agent named in HELLO (`/dev/hvcN`), or why no
    /// session came.
    consoles: Vec<(String, Result<String, String>)>,
}

/// Concurrently, under one deadline (a port that never answers costs the deadline once): each
/// server of `idx` waits for its session (it asked for a HELLO when it connected) in slices of
/// a second, until `timeout`, or until [`SCALE_GRACE`] after the first port of this pass became
/// READY: by then the agent runs and has opened every port, so a port still silent never got
/// the host's PORT_OPEN. Returns (index, the session or why not).
fn accept_all(servers: &mut [PortServer], idx: &[usize], timeout: Duration) -> Vec<(usize, Result<Session, String>)> {
    let start = Instant::now();
    let first_ready: std::sync::Mutex<Option<Instant>> = std::sync::Mutex::new(None);
    let first_ready = &first_ready;
    std::thread::scope(|s| {
        let handles: Vec<_> = servers
            .iter_mut()
            .enumerate()
            .filter(|(i, _)| idx.contains(i))
            .map(|(i, srv)| {
                s.spawn(move || loop {
                    match srv.accept(Duration::from_secs(1)) {
                        Ok(session) => {
                            if let Ok(mut f) = first_ready.lock() {
                                f.get_or_insert_with(Instant::now);
                            }
                            return (i, Ok(session));
                        }
                        Err(SessionError::Timeout { .. }) => {
                            let now = Instant::now();
                            let grace_over =
                                first_ready.lock().ok().and_then(|f| *f).is_some_and(|t| now >= t + SCALE_GRACE);
                            if grace_over || now >= start + timeout {
                                let waited = now - start;
                                return (i, Err(format!("{}: no HELLO within {waited:.1?}", srv.port())));
                            }
                        }
                        Err(e) => return (i, Err(format!("{}: {e}", srv.port()))),
                    }
                })
            })
            .collect();
        handles.into_iter().filter_map(|h| h.join().ok()).collect()
    })
}

/// A session server on port `name`, on the trace, not connected yet. It connects once: a
/// reconnect is a new server.
fn serve(trace: &VmTrace, rig: &Rig, name: &str) -> Result<PortServer, CaseError> {
    let mut server = trace.serve(rig, name)?;
    server.set_reconnect(Reconnect::Once);
    Ok(server)
}

/// How long a server may take to connect to QEMU's listener.
const CONNECT_DEADLINE: Duration = Duration::from_secs(10);

fn setup(opts: &SuiteOptions, rec: &mut Recorder<'_>) -> Result<Scale, CaseError> {
    let mut ports: Vec<PortConfig> = (0..FIRST).map(|i| PortConfig::serial(format!("org.vport.s{i}"))).collect();
    ports.extend((0..SECOND).map(|i| PortConfig::serial(format!("org.vport.c1.s{i}")).on_controller(1)));
    let names: Vec<String> = ports.iter().map(|p| p.name.clone()).collect();
    let console_names: Vec<String> = (0..CONSOLES).map(|i| format!("org.vport.c2.c{i}")).collect();
    ports.extend(console_names.iter().map(|n| PortConfig::console(n.clone()).on_controller(2)));
    // The agent serves consoles only when asked (it cannot tell which hvc line is which port).
    let opts = &SuiteOptions {
        agent_args: opts.agent_args.iter().cloned().chain([CONSOLES_FLAG.to_string()]).collect(),
        ..opts.clone()
    };
    let mut rig = boot(opts, ports, |c| {
        c.max_ports = Some(FIRST as u32 + 1);
        c.extra_controllers = vec![None, None];
        c.memory_mib = 384;
    })?;
    rec.watch_vm(&rig.vm);
    let trace = rec.trace_vm(&rig, "")?;
    let mut servers = Vec::new();
    for n in names.iter().chain(&console_names) {
        let mut server = serve(&trace, &rig, n)?;
        server.connect(crate::speed::scaled(CONNECT_DEADLINE))?;
        servers.push(server);
    }
    rig.resume()?;
    let t0 = Instant::now();
    let all: Vec<usize> = (0..servers.len()).collect();
    let mut first = accept_all(&mut servers, &all, opts.hello_timeout);
    // The consoles are judged on their own (scale-consoles-ready): a console always looks
    // host-connected to the guest, so no PORT_OPEN can be lost for it.
    let console_results = first.split_off(names.len());
    servers.truncate(names.len());
    // QEMU sends PORT_OPEN to the guest when the guest announces a port (PORT_READY) and a host
    // client is already there; with dozens of ports announced at once the guest's control queue
    // runs out of buffers and QEMU drops those messages (send_control_msg), so the guest never
    // learns that the host is connected. A reconnect makes QEMU send PORT_OPEN again.
    let lost_idx: Vec<usize> = first.iter().filter(|(_, r)| r.is_err()).map(|(i, _)| *i).collect();
    let chardevs = rig.qmp.query_chardev()?;
    let guest_open = |name: &str| {
        let id = rig.port(name).ok().map(|p| p.chardev_id.clone());
        chardevs.iter().find(|c| Some(&c.label) == id.as_ref()).map(|c| c.frontend_open)
    };
    let mut lost: Vec<LostPort> = lost_idx
        .iter()
        .map(|&i| LostPort { name: names[i].clone(), guest_open: guest_open(&names[i]), recovered: false })
        .collect();
    // One port at a time: reconnecting them all at once floods the control queue again (seen
    // here: about five of 29 got through per burst).
    let mut second = Vec::new();
    for (&i, l) in lost_idx.iter().zip(lost.iter_mut()) {
        // The old client leaves first (its server is dropped): the chardev takes one client at a
        // time.
        drop(std::mem::replace(&mut servers[i], serve(&trace, &rig, &names[i])?));
        servers[i].connect(crate::speed::scaled(CONNECT_DEADLINE))?;
        let outcome =
            accept_all(&mut servers, &[i], crate::speed::scaled(SCALE_RECONNECT_DEADLINE).min(opts.hello_timeout));
        l.recovered = outcome.iter().all(|(_, r)| r.is_ok()) && !outcome.is_empty();
        second.extend(outcome);
    }
    let mut sessions = Vec::new();
    let mut failures = Vec::new();
    for (_, o) in first.into_iter().filter(|(_, r)| r.is_ok()).chain(second) {
        match o {
            Ok(session) => {
                rec.note_versions(&rig, &session.handshake().hello.kernel_release);
                sessions.push(session);
            }
            Err(e) => failures.push(e),
        }
    }
    let ready = sessions.len();
    let all_ready = t0.elapsed();
    let mut consoles = Vec::new();
    for ((_, r), name) in console_results.into_iter().zip(&console_names) {
        match r {
            Ok(session) => {
                consoles.push((name.clone(), Ok(session.handshake().hello.port_name.clone())));
                sessions.push(session);
            }
            Err(e) => {
                failures.push(e.clone());
                consoles.push((name.clone(), Err(e)));
            }
        }
    }
    if !failures.is_empty() {
        log::warn!("scale: ports not READY; vm state:\n{}", rig.failure_context());
    }
    Ok(Scale { _rig: rig, sessions, ports: names.len(), lost, ready, failures, all_ready, consoles })
}

/// `scale-port-open-lost-at-boot`.
fn port_open_lost_at_boot(st: &mut Scale) -> Result<Observation, CaseError> {
    Ok(judge_boot_contact(st.ports, &st.lost))
}

/// PASS: every port saw the host connected at boot. QUIRK: some did not, and each of them is
/// explained by a dropped PORT_OPEN: the guest had the port open (so the open was not what
/// was lost) and a reconnect of its host client (which makes QEMU send PORT_OPEN again) made a
/// session. FAIL: a lost port the explanation does not cover.
pub(crate) fn judge_boot_contact(ports: usize, lost: &[LostPort]) -> Observation {
    if lost.is_empty() {
        return Observation::check(true, format!("every port saw the host connected at boot ({ports} ports)"));
    }
    let names: Vec<&str> = lost.iter().map(|l| l.name.as_str()).collect();
    let unexplained: Vec<String> = lost
        .iter()
        .filter(|l| l.guest_open != Some(true) || !l.recovered)
        .map(|l| {
            format!("{} (guest had it open: {:?}, a reconnect recovered it: {})", l.name, l.guest_open, l.recovered)
        })
        .collect();
    if !unexplained.is_empty() {
        return Observation::check(
            false,
            format!(
                "{}/{ports} ports never saw the host connected at boot; not explained by a dropped PORT_OPEN: {}",
                lost.len(),
                unexplained.join("; ")
            ),
        );
    }
    Observation::quirk(
        format!(
            "{}/{ports} ports never saw the host connected at boot ({}); the guest had each open, and a host \
             reconnect recovered each",
            lost.len(),
            names.join(" ")
        ),
        "QEMU drops host->guest control messages (PORT_OPEN) when the guest's control queue has no free buffer \
         (send_control_msg); announcing dozens of ports at once under TCG exhausts it",
    )
}

/// `scale-ports-ready`.
fn ports_ready(st: &mut Scale) -> Result<Observation, CaseError> {
    Ok(Observation::check(
        st.ready == st.ports,
        format!(
            "{}/{} READY ({FIRST} on vser0, {SECOND} on vser1) {:.1} s after cont{}",
            st.ready,
            st.ports,
            st.all_ready.as_secs_f64(),
            if st.failures.is_empty() { String::new() } else { format!("; failed: {}", st.failures.join("; ")) }
        ),
    ))
}

/// `scale-consoles-ready`.
fn consoles_ready(st: &mut Scale) -> Result<Observation, CaseError> {
    Ok(judge_consoles(&st.consoles))
}

/// PASS when every console made a session, each on its own hvc line (the line is the port
/// name the agent gives in HELLO: the guest cannot tell a console's name, the host can).
pub(crate) fn judge_consoles(consoles: &[(String, Result<String, String>)]) -> Observation {
    let lines: Vec<&str> = consoles.iter().filter_map(|(_, r)| r.as_deref().ok()).collect();
    let mut distinct = lines.clone();
    distinct.sort_unstable();
    distinct.dedup();
    let failed: Vec<&str> = consoles.iter().filter_map(|(_, r)| r.as_ref().err().map(String::as_str)).collect();
    let map: Vec<String> = consoles
        .iter()
        .filter_map(|(n, r)| r.as_ref().ok().map(|l| format!("{n}={}", l.trim_start_matches("/dev/"))))
        .collect();
    Observation::check(
        failed.is_empty() && distinct.len() == consoles.len() && lines.iter().all(|l| l.starts_with("/dev/hvc")),
        format!(
            "{}/{} consoles READY beside the serial ports, on {} distinct lines: {}{}",
            lines.len(),
            consoles.len(),
            distinct.len(),
            map.join(" "),
            if failed.is_empty() { String::new() } else { format!("; failed: {}", failed.join("; ")) }
        ),
    )
}

/// `scale-traffic`.
fn traffic(st: &mut Scale) -> Result<Observation, CaseError> {
    const BYTES: u64 = 256 * 1024;
    let t0 = Instant::now();
    let results: Vec<Result<bool, String>> = std::thread::scope(|s| {
        let handles: Vec<_> = st
            .sessions
            .iter_mut()
            .enumerate()
            .map(|(i, l)| {
                s.spawn(move || {
                    let src = l.source(i as u64 + 1, BYTES, 16 * 1024, Duration::from_secs(120));
                    let echo = l.echo(format!("port {i}").as_bytes(), Duration::from_secs(60));
                    match (src, echo) {
                        (Ok(o), Ok(e)) => Ok(o.verified && e == format!("port {i}").as_bytes()),
                        (Err(e), _) | (_, Err(e)) => Err(format!("{}: {e}", l.port())),
                    }
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap_or_else(|_| Err("thread panicked".into()))).collect()
    });
    let ok = results.iter().filter(|r| matches!(r, Ok(true))).count();
    let errs: Vec<&String> = results.iter().filter_map(|r| r.as_ref().err()).collect();
    Ok(Observation::check(
        ok == results.len(),
        format!(
            "{ok}/{} ports verified {} KiB SOURCE + ECHO concurrently in {:.1} s{}",
            results.len(),
            BYTES / 1024,
            t0.elapsed().as_secs_f64(),
            if errs.is_empty() { String::new() } else { format!("; errors: {errs:?}") }
        ),
    ))
}

/// The group's name.
const GROUP_NAME: &str = "scale";

/// The group, its cases in run order.
pub(crate) static GROUP: Group<Scale> = Group {
    name: GROUP_NAME,
    setup,
    diagnose: None,
    cases: &[
        Case::new(
            GROUP_NAME,
            "scale-port-open-lost-at-boot",
            "host clients connected before boot on a full controller: does every port see the host (PORT_OPEN)?",
            "every port sees the host connected (a port that does not: the guest has it open, a reconnect recovers it)",
            port_open_lost_at_boot,
        ),
        Case::new(
            GROUP_NAME,
            "scale-ports-ready",
            "31 serial ports on one controller (max_ports 32, port 0 reserved) + a second controller",
            "every port READY",
            ports_ready,
        ),
        Case::new(
            GROUP_NAME,
            "scale-consoles-ready",
            "8 consoles (virtconsole, the guest's 8 hvc lines) on a third controller, the agent with --consoles",
            "every console READY, each on its own /dev/hvcN",
            consoles_ready,
        ),
        Case::new(
            GROUP_NAME,
            "scale-traffic",
            "traffic on every port and console at once (no cross-talk, no loss)",
            "SOURCE verified on every port",
            traffic,
        ),
    ],
};

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::Verdict;

    fn lost(name: &str, guest_open: Option<bool>, recovered: bool) -> LostPort {
        LostPort { name: name.into(), guest_open, recovered }
    }

    #[test]
    fn consoles_pass_only_all_ready_on_distinct_hvc_lines() {
        let c = |n: &str, r: Result<&str, &str>| (n.to_string(), r.map(String::from).map_err(String::from));
        let good = [c("a", Ok("/dev/hvc0")), c("b", Ok("/dev/hvc1"))];
        let o = judge_consoles(&good);
        assert_eq!(o.verdict, Verdict::Pass, "{o:?}");
        assert_eq!(o.observed, "2/2 consoles READY beside the serial ports, on 2 distinct lines: a=hvc0 b=hvc1");
        assert_eq!(judge_consoles(&[c("a", Ok("/dev/hvc0")), c("b", Ok("/dev/hvc0"))]).verdict, Verdict::Fail);
        let o = judge_consoles(&[c("a", Ok("/dev/hvc0")), c("b", Err("b: no HELLO within 90s"))]);
        assert_eq!(o.verdict, Verdict::Fail);
        assert!(o.observed.ends_with("; failed: b: no HELLO within 90s"), "{o:?}");
        assert_eq!(judge_consoles(&[c("a", Ok("/dev/vport0p1"))]).verdict, Verdict::Fail, "not a console line");
    }

    #[test]
    fn a_lost_port_open_is_a_quirk_only_when_the_explanation_holds() {
        assert_eq!(judge_boot_contact(35, &[]).verdict, Verdict::Pass);
        let explained = [lost("org.vport.s0", Some(true), true), lost("org.vport.s1", Some(true), true)];
        let o = judge_boot_contact(35, &explained);
        assert_eq!(o.verdict, Verdict::Quirk);
        assert!(!o.note.is_empty() && o.observed.starts_with("2/35"), "{o:?}");
        let not_recovered = [lost("org.vport.s0", Some(true), true), lost("org.vport.s1", Some(true), false)];
        let o = judge_boot_contact(35, &not_recovered);
        assert_eq!(o.verdict, Verdict::Fail);
        assert!(
            o.observed.contains("org.vport.s1 (guest had it open: Some(true), a reconnect recovered it: false)"),
            "{o:?}"
        );
        let never_opened = [lost("org.vport.s0", Some(false), true)];
        assert_eq!(judge_boot_contact(35, &never_opened).verdict, Verdict::Fail, "the guest never opened it");
        assert_eq!(judge_boot_contact(35, &[lost("org.vport.s0", None, true)]).verdict, Verdict::Fail);
    }
}
