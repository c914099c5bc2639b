//! The guest's `/init`: a busybox `sh` script that mounts the pseudo file systems, loads the
//! virtio modules, then runs `vport-agent` and powers the VM off when the agent exits.
//!
//! # Kernel command line parameters read by `/init`
//!
//! * `vport.agent_args=ARGS` — the agent's arguments, comma separated; each argument is
//!   percent-decoded (`%2C` = `,`, `%20` = space, `%25` = `%`, any `%XX` byte). Absent: the
//!   agent runs with `--log-level info`. Present but empty: no arguments. Build the parameter
//!   with [`agent_args_param`].
//! * `vport.init_cmd=CMD` — debugging aid: percent-decoded `CMD` runs with `sh -c` after the
//!   modules are loaded and before the agent (for example
//!   `vport.init_cmd=ls%20/sys/class/virtio-ports`). Build it with [`init_cmd_param`].
//! * `vport.agent_user=UID:GID` — run the agent unprivileged, as user and group `vport` with
//!   these ids (written to `/etc/passwd` and `/etc/group`; `start-stop-daemon -c` switches),
//!   the way the packaged systemd unit runs it. The port nodes stay `root:root 0600` (what
//!   devtmpfs makes) until granted:
//! * `vport.grant=early|late` — give every `org.vport.*` node to group GID with mode 0660, as
//!   the packaged udev rule (`guest/dist/99-vport.rules`) does: `early` before the agent
//!   starts; `late` only once the agent has logged that it waits for a node's permissions
//!   ([`AGENT_WAITING_FOR_PERMISSIONS`]), to exercise its EACCES path. Absent: never.
//!   Build both with [`unprivileged_params`].
//! * `vport.supervise=N` — restart the agent (run as root) when a signal kills it, up to `N`
//!   times, printing [`AGENT_RESTARTING`] with the status each time: the way a service manager
//!   keeps it running, for faults that kill the agent. Absent: 0, the VM powers off when the
//!   agent exits. Build it with [`supervise_param`].
//!
//! When the agent runs as root, Ctrl-Alt-Del reboots the guest the orderly way, as an init
//! does: `/init` turns the kernel's immediate restart off (`/proc/sys/kernel/ctrl-alt-del` 0,
//! so the kernel sends it SIGINT), sends the agent SIGTERM (it says BYE on its ports), waits
//! for it, prints [`GUEST_REBOOTING`] with its status, syncs, and reboots (`reboot -f`).
//!
//! `/init` also makes [`GUEST_STREAM_DIR`] for the agent's acknowledged streams.
//!
//! Console lines printed by `/init` (all start with `vport-init: `): `modules loaded` after
//! the insmod step, `failed to load module NAME` per failed insmod, `vport-agent exited with
//! status N` when the agent exits, after which the VM powers off.

/// The directory `/init` makes for the agent's acknowledged streams (owned by the agent's user
/// when it runs unprivileged); pass it with `--stream-dir` to enable `vport send` / `vport recv`.
pub const GUEST_STREAM_DIR: &str = "/var/lib/vport-streams";

/// Line printed on the console once the modules are loaded.
pub const MODULES_LOADED: &str = "vport-init: modules loaded";
/// Prefix of the line printed when a signal killed the agent and `/init` starts it again
/// (followed by the status and the count: `137 (restart 1 of 5)`).
pub const AGENT_RESTARTING: &str = "vport-init: restarting vport-agent after status ";
/// Prefix of the line printed when Ctrl-Alt-Del reboots the guest, once the agent has ended
/// (followed by its status).
pub const GUEST_REBOOTING: &str = "vport-init: ctrl-alt-del: rebooting after vport-agent ended with status ";
/// Prefix of the line printed when the agent exits (followed by the exit status).
pub const AGENT_EXITED: &str = "vport-init: vport-agent exited with status ";
/// What the agent logs when a port's node is not accessible yet (the `late` grant waits for
/// it).
pub const AGENT_WAITING_FOR_PERMISSIONS: &str = "waiting for its permissions to change";
/// Prefix of the line `/init` prints for each node it grants to the agent's group.
pub const GRANTED: &str = "vport-init: granted ";

/// When `/init` gives the `org.vport.*` nodes to an unprivileged agent's group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Grant {
    /// Before the agent starts (udev already ran).
    Early,
    /// Once the agent has logged that it waits for a node's permissions (udev late).
    Late,
    /// Never (the agent stays without access).
    Never,
}

/// Kernel command line parameters running the agent as `uid:gid` with the ports granted as
/// `grant` says (see the module docs).
pub fn unprivileged_params(uid: u32, gid: u32, grant: Grant) -> Vec<String> {
    let mut p = vec![format!("vport.agent_user={uid}:{gid}")];
    match grant {
        Grant::Early => p.push("vport.grant=early".into()),
        Grant::Late => p.push("vport.grant=late".into()),
        Grant::Never => {}
    }
    p
}

/// Arguments the agent gets when the command line has no `vport.agent_args=`.
pub const DEFAULT_AGENT_ARGS: &[&str] = &["--log-level", "info"];

/// The `/init` script loading `modules` (names of `/lib/modules/<name>.ko`) in the given order.
pub fn init_script(modules: &[String]) -> String {
    let mut s = String::new();
    s.push_str(
        r#"#!/bin/busybox sh
# vport guest init, generated by vport-host (see host/src/image/initscript.rs).
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t debugfs debugfs /sys/kernel/debug
exec </dev/console >/dev/console 2>&1
"#,
    );
    for m in modules {
        s.push_str(&format!("insmod /lib/modules/{m}.ko || echo \"vport-init: failed to load module {m}\"\n"));
    }
    s.push_str(&format!("echo \"{MODULES_LOADED}\"\n"));
    s.push_str(&format!("mkdir -p {GUEST_STREAM_DIR}\n"));
    let defaults = DEFAULT_AGENT_ARGS.join(" ");
    s.push_str(&format!(
        r#"vport_decode() {{
    printf '%b' "$(printf '%s' "$1" | sed 's/%\([0-9A-Fa-f][0-9A-Fa-f]\)/\\x\1/g')"
}}
set -f
have_args=0
agent_args=
init_cmd=
agent_user=
grant=
supervise=0
for p in $(cat /proc/cmdline); do
    case "$p" in
        vport.agent_args=*) agent_args="${{p#vport.agent_args=}}"; have_args=1 ;;
        vport.init_cmd=*) init_cmd="${{p#vport.init_cmd=}}" ;;
        vport.agent_user=*) agent_user="${{p#vport.agent_user=}}" ;;
        vport.grant=*) grant="${{p#vport.grant=}}" ;;
        vport.supervise=*) supervise="${{p#vport.supervise=}}" ;;
    esac
done
if [ -n "$init_cmd" ]; then
    sh -c "$(vport_decode "$init_cmd")"
    echo "vport-init: init_cmd exited with status $?"
fi
if [ "$have_args" = 1 ]; then
    set --
    IFS=,
    for a in $agent_args; do
        set -- "$@" "$(vport_decode "$a")"
    done
    unset IFS
else
    set -- {defaults}
fi
set +f
# Gives every org.vport.* node to the agent's group, as guest/dist/99-vport.rules does.
grant_ports() {{
    for d in /sys/class/virtio-ports/*; do
        n=$(cat "$d/name" 2>/dev/null) || continue
        case "$n" in
            org.vport.*) node="/dev/${{d##*/}}"
                chgrp "$agent_gid" "$node" && chmod 0660 "$node" && echo "{GRANTED}$node ($n) to group $agent_gid" ;;
        esac
    done
}}
if [ -n "$agent_user" ]; then
    agent_uid="${{agent_user%%:*}}"
    agent_gid="${{agent_user##*:}}"
    mkdir -p /etc
    echo "root:x:0:0:root:/:/bin/sh" > /etc/passwd
    echo "vport:x:$agent_uid:$agent_gid:vport-agent:/:/bin/false" >> /etc/passwd
    echo "root:x:0:" > /etc/group
    echo "vport:x:$agent_gid:" >> /etc/group
    chown "$agent_uid:$agent_gid" {GUEST_STREAM_DIR}
    [ "$grant" = early ] && grant_ports
    echo "vport-init: starting vport-agent as uid $agent_uid gid $agent_gid $*"
    if [ "$grant" = late ]; then
        # The agent's log passes through this loop, which grants the nodes once the agent
        # says it waits for them: no timing guess.
        mkfifo /agent.log
        start-stop-daemon -S -c vport:vport -x /bin/vport-agent -- "$@" >/agent.log 2>&1 &
        agent_pid=$!
        granted=0
        while IFS= read -r line; do
            echo "$line"
            case "$line" in
                *"{AGENT_WAITING_FOR_PERMISSIONS}"*) [ "$granted" = 0 ] && grant_ports && granted=1 ;;
            esac
        done < /agent.log
        wait "$agent_pid"
        status=$?
    else
        start-stop-daemon -S -c vport:vport -x /bin/vport-agent -- "$@"
        status=$?
    fi
else
    echo "vport-init: starting vport-agent $*"
    # Ctrl-Alt-Del: SIGINT to this shell (not the kernel's immediate restart), an orderly
    # reboot. The agent runs in the background so that the trap runs while it is waited for.
    reboot_asked=0
    agent_pid=
    trap 'reboot_asked=1; interrupted=1; [ -n "$agent_pid" ] && kill -TERM "$agent_pid"' INT
    echo 0 > /proc/sys/kernel/ctrl-alt-del
    restarts=0
    while :; do
        interrupted=0
        /bin/vport-agent "$@" &
        agent_pid=$!
        # Ctrl-Alt-Del before the line above found no agent to stop: stop it now.
        [ "$reboot_asked" = 1 ] && kill -TERM "$agent_pid"
        wait "$agent_pid"
        status=$?
        # A trapped signal ends the wait early with 128 + its number: wait again, for the
        # agent's own status (the shell keeps a finished job's status until it is waited for,
        # even when the shell reaped it first). 127 means the first wait had already collected
        # the agent and the signal came after it: its status stands.
        while [ "$interrupted" = 1 ]; do
            interrupted=0
            wait "$agent_pid"
            again=$?
            [ "$again" = 127 ] || status=$again
        done
        if [ "$reboot_asked" = 1 ]; then
            echo "{GUEST_REBOOTING}$status"
            sync
            reboot -f
        fi
        # Killed by a signal (status 128 + N): started again while restarts are left.
        if [ "$status" -gt 128 ] && [ "$restarts" -lt "$supervise" ]; then
            restarts=$((restarts + 1))
            echo "{AGENT_RESTARTING}$status (restart $restarts of $supervise)"
            continue
        fi
        break
    done
fi
echo "{AGENT_EXITED}$status"
poweroff -f
exit 1
"#
    ));
    s
}

fn percent_encode(arg: &str) -> String {
    let mut out = String::new();
    for b in arg.bytes() {
        if b.is_ascii_alphanumeric() || b"-_./:=+@".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Kernel command line parameter passing `args` to the agent (see the module docs).
pub fn agent_args_param<S: AsRef<str>>(args: &[S]) -> String {
    let encoded: Vec<String> = args.iter().map(|a| percent_encode(a.as_ref())).collect();
    format!("vport.agent_args={}", encoded.join(","))
}

/// Kernel command line parameter making `/init` restart the agent when a signal kills it, up to
/// `max` times (see the module docs).
pub fn supervise_param(max: u32) -> String {
    format!("vport.supervise={max}")
}

/// Kernel command line parameter making `/init` run `cmd` with `sh -c` before the agent.
pub fn init_cmd_param(cmd: &str) -> String {
    format!("vport.init_cmd={}", percent_encode(cmd))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mods() -> Vec<String> {
        ["virtio_ring", "virtio", "virtio_console"].map(String::from).to_vec()
    }

    #[test]
    fn script_loads_modules_in_order_then_runs_agent() {
        let s = init_script(&mods());
        assert!(s.starts_with("#!/bin/busybox sh\n"));
        let pos = |needle: &str| s.find(needle).unwrap_or_else(|| panic!("{needle} not in script"));
        assert!(pos("mount -t proc") < pos("insmod /lib/modules/virtio_ring.ko"));
        assert!(pos("mount -t debugfs debugfs /sys/kernel/debug") < pos("insmod"));
        assert!(pos("insmod /lib/modules/virtio_ring.ko") < pos("insmod /lib/modules/virtio.ko"));
        assert!(pos("insmod /lib/modules/virtio.ko") < pos("insmod /lib/modules/virtio_console.ko"));
        assert!(pos("insmod /lib/modules/virtio_console.ko") < pos(MODULES_LOADED));
        assert!(pos(MODULES_LOADED) < pos("/bin/vport-agent \"$@\""));
        assert!(pos("/bin/vport-agent \"$@\"") < pos(AGENT_EXITED));
        assert!(pos("start-stop-daemon -S -c vport:vport") < pos(AGENT_EXITED));
        assert!(pos(AGENT_EXITED) < pos("poweroff -f"));
        assert!(s.contains("failed to load module virtio_console"));
        assert!(s.contains("set -- --log-level info"));
        assert!(s.contains("exec </dev/console >/dev/console 2>&1"));
    }

    #[test]
    fn no_modules_means_no_insmod() {
        assert!(!init_script(&[]).contains("insmod"));
    }

    #[test]
    fn encodes_params() {
        assert_eq!(agent_args_param(&["--log-level", "debug"]), "vport.agent_args=--log-level,debug");
        assert_eq!(agent_args_param(&["a b", "x,y", "50%"]), "vport.agent_args=a%20b,x%2Cy,50%25");
        assert_eq!(agent_args_param::<&str>(&[]), "vport.agent_args=");
        assert_eq!(init_cmd_param("ls /sys"), "vport.init_cmd=ls%20/sys");
        assert_eq!(supervise_param(5), "vport.supervise=5");
        assert_eq!(unprivileged_params(900, 901, Grant::Late), ["vport.agent_user=900:901", "vport.grant=late"]);
        assert_eq!(unprivileged_params(1, 2, Grant::Never), ["vport.agent_user=1:2"]);
    }

    /// Runs `grant_ports` under the host busybox against a fake sysfs and dev tree (paths
    /// rewritten into a temp dir): only org.vport.* nodes are given to the group, mode 0660.
    #[test]
    fn grant_gives_only_org_vport_nodes_to_the_group_under_busybox_if_present() {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        if !std::path::Path::new("/bin/busybox").exists() {
            println!("skipped: /bin/busybox not present");
            return;
        }
        let script = init_script(&[]);
        let start = script.find("grant_ports() {").unwrap();
        let end = script.find("if [ -n \"$agent_user\" ]").unwrap();
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().display().to_string();
        for (node, name) in [("vport0p1", "org.vport.0"), ("vport0p2", "other.port")] {
            std::fs::create_dir_all(dir.path().join(format!("sys/class/virtio-ports/{node}"))).unwrap();
            std::fs::write(dir.path().join(format!("sys/class/virtio-ports/{node}/name")), format!("{name}\n"))
                .unwrap();
            std::fs::create_dir_all(dir.path().join("dev")).unwrap();
            let f = dir.path().join(format!("dev/{node}"));
            std::fs::write(&f, b"").unwrap();
            std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o600)).unwrap();
        }
        let body =
            script[start..end].replace("/sys/", &format!("{root}/sys/")).replace("/dev/", &format!("{root}/dev/"));
        let full = format!("agent_gid=4321\n{body}\ngrant_ports\n");
        let out = std::process::Command::new("/bin/busybox").args(["sh", "-c", &full]).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(stdout.contains(GRANTED) && stdout.contains("org.vport.0"), "{stdout}");
        let granted = std::fs::metadata(dir.path().join("dev/vport0p1")).unwrap();
        assert_eq!((granted.gid(), granted.mode() & 0o777), (4321, 0o660));
        let other = std::fs::metadata(dir.path().join("dev/vport0p2")).unwrap();
        assert_eq!(other.mode() & 0o777, 0o600, "other ports are left alone");
    }

    /// Runs the argument-parsing part of the script under the host busybox with a fake
    /// /proc/cmdline and checks the agent gets exactly the encoded arguments.
    #[test]
    fn script_decodes_args_under_busybox_if_present() {
        if !std::path::Path::new("/bin/busybox").exists() {
            println!("skipped: /bin/busybox not present");
            return;
        }
        let script = init_script(&[]);
        let start = script.find("vport_decode() {").unwrap();
        let end = script.find("set +f").unwrap();
        let run = |cmdline: &str| -> String {
            let dir = tempfile::tempdir().unwrap();
            let cmdfile = dir.path().join("cmdline");
            std::fs::write(&cmdfile, cmdline).unwrap();
            let body = script[start..end].replace("/proc/cmdline", &cmdfile.to_string_lossy());
            let full = format!("{body}\nfor a in \"$@\"; do echo \"[$a]\"; done\n");
            let out = std::process::Command::new("/bin/busybox").args(["sh", "-c", &full]).output().unwrap();
            assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
            String::from_utf8(out.stdout).unwrap()
        };
        let p = agent_args_param(&["--x", "a b", "c,d", "e%f", "*", "-n", "-e"]);
        assert_eq!(run(&format!("console=ttyS0 {p} quiet")), "[--x]\n[a b]\n[c,d]\n[e%f]\n[*]\n[-n]\n[-e]\n");
        assert_eq!(run("console=ttyS0 quiet"), "[--log-level]\n[info]\n");
        assert_eq!(run("vport.agent_args="), "");
        let c = init_cmd_param("echo hi there");
        assert_eq!(run(&c), "hi there\nvport-init: init_cmd exited with status 0\n[--log-level]\n[info]\n");
    }

    /// Runs the root branch's agent loop under the host busybox with a fake agent that kills
    /// itself with SIGKILL a given number of times, then exits 3: it is restarted while
    /// restarts are left, and an ordinary exit is never restarted.
    #[test]
    fn a_killed_agent_is_restarted_as_often_as_supervise_allows_under_busybox_if_present() {
        if !std::path::Path::new("/bin/busybox").exists() {
            println!("skipped: /bin/busybox not present");
            return;
        }
        let script = init_script(&[]);
        let dir = tempfile::tempdir().unwrap();
        let body = root_agent_loop(&script, &dir.path().join("ctrl-alt-del"));
        let run = |supervise: u32, kills: u32| -> String {
            let dir = tempfile::tempdir().unwrap();
            let agent = dir.path().join("agent");
            let count = dir.path().join("count");
            std::fs::write(
                &agent,
                format!(
                    "#!/bin/busybox sh\nn=$(cat {c} 2>/dev/null || echo 0)\necho $((n + 1)) > {c}\n\
                     [ \"$n\" -lt {kills} ] && kill -9 $$\nexit 3\n",
                    c = count.display()
                ),
            )
            .unwrap();
            std::fs::set_permissions(&agent, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
            let body = body.replace("/bin/vport-agent", &agent.to_string_lossy());
            let full = format!("supervise={supervise}\n{body}echo \"status $status\"\n");
            let out = std::process::Command::new("/bin/busybox").args(["sh", "-c", &full]).output().unwrap();
            String::from_utf8(out.stdout).unwrap()
        };
        let out = run(5, 2);
        assert_eq!(out.matches(AGENT_RESTARTING).count(), 2, "{out}");
        assert!(out.contains("137 (restart 2 of 5)") && out.ends_with("status 3\n"), "{out}");
        let out = run(1, 3);
        assert_eq!(out.matches(AGENT_RESTARTING).count(), 1, "{out}");
        assert!(out.ends_with("status 137\n"), "out of restarts, the kill is the status: {out}");
        assert_eq!(run(0, 1), "status 137\n", "no supervision by default");
    }

    /// The root branch's agent loop of `script`, from the Ctrl-Alt-Del trap to the loop's end,
    /// with the kernel's switch written to `cad` instead and `reboot -f` only printed.
    fn root_agent_loop(script: &str, cad: &std::path::Path) -> String {
        let start = script.find("    reboot_asked=0").unwrap();
        let end = script.find("    done\nfi").unwrap() + "    done\n".len();
        script[start..end]
            .replace("/proc/sys/kernel/ctrl-alt-del", &cad.to_string_lossy())
            .replace("reboot -f", "echo REBOOT; exit 0")
    }

    /// Ctrl-Alt-Del under the host busybox: SIGINT to the loop (as the kernel sends init once
    /// its switch is 0) makes it SIGTERM the agent, wait for its end, and reboot.
    #[test]
    fn ctrl_alt_del_stops_the_agent_then_reboots_under_busybox_if_present() {
        use std::io::Read;
        use std::time::{Duration, Instant};
        if !std::path::Path::new("/bin/busybox").exists() {
            println!("skipped: /bin/busybox not present");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let (agent, ready, cad) = (dir.path().join("agent"), dir.path().join("ready"), dir.path().join("cad"));
        // The fake agent says it got SIGTERM and exits 0, like the agent's BYE and exit.
        std::fs::write(
            &agent,
            format!(
                "#!/bin/busybox sh\ntrap 'echo agent: SIGTERM; exit 0' TERM\necho $$ > {}\nwhile :; do sleep 1 & wait $!; done\n",
                ready.display()
            ),
        )
        .unwrap();
        std::fs::set_permissions(&agent, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        let body = root_agent_loop(&init_script(&[]), &cad).replace("/bin/vport-agent", &agent.to_string_lossy());
        let mut command = std::process::Command::new("/bin/busybox");
        command.args(["sh", "-c", &format!("supervise=3\n{body}echo \"ended $status\"\n")]);
        command.stdout(std::process::Stdio::piped());
        // A shell cannot trap a signal ignored when it started (as SIGINT is for a test run
        // in a background job): the loop gets SIGINT at its default, as the kernel's init does.
        // SAFETY: between fork and exec only `sigaction`, which is async-signal-safe, runs.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut command, || {
                let default = nix::sys::signal::SigAction::new(
                    nix::sys::signal::SigHandler::SigDfl,
                    nix::sys::signal::SaFlags::empty(),
                    nix::sys::signal::SigSet::empty(),
                );
                nix::sys::signal::sigaction(nix::sys::signal::Signal::SIGINT, &default)
                    .map(|_| ())
                    .map_err(std::io::Error::from)
            });
        }
        let mut child = command.spawn().unwrap();
        let started = Instant::now();
        while std::fs::read_to_string(&ready).map_or(true, |pid| !pid.ends_with('\n')) {
            assert!(started.elapsed() < Duration::from_secs(10), "the fake agent never started");
            std::thread::park_timeout(Duration::from_millis(5));
        }
        let pid = nix::unistd::Pid::from_raw(child.id() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT).unwrap();
        let mut stdout = child.stdout.take().unwrap();
        let reader = std::thread::spawn(move || {
            let mut out = String::new();
            stdout.read_to_string(&mut out).map(|_| out)
        });
        let started = Instant::now();
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            if started.elapsed() > Duration::from_secs(10) {
                child.kill().unwrap();
                if let Ok(agent) = std::fs::read_to_string(&ready).unwrap_or_default().trim().parse::<i32>() {
                    let _ =
                        nix::sys::signal::kill(nix::unistd::Pid::from_raw(agent), nix::sys::signal::Signal::SIGKILL);
                }
                panic!("the loop did not end within 10 s of SIGINT");
            }
            std::thread::park_timeout(Duration::from_millis(5));
        };
        assert!(status.success());
        let out = reader.join().unwrap().unwrap();
        assert_eq!(std::fs::read_to_string(&cad).unwrap(), "0\n", "the kernel's immediate restart turned off");
        assert_eq!(out, format!("agent: SIGTERM\n{GUEST_REBOOTING}0\nREBOOT\n"), "no restart, no power-off");
    }
}
