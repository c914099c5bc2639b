//! The long `--help` texts of the `vport` commands whose options alone do not explain them.

/// `vport connect --help`.
pub const CONNECT_ABOUT: &str = "Bridge a port to stdin/stdout, byte for byte, like \
`socat - UNIX-CONNECT:<socket>`. The port is found by name among the running VMs that `vport boot` \
registered (`vport connect --list` shows them); with several candidates pass --vm PID (printed by `vport boot`). \
The bridge ends when QEMU closes the connection; end of input half-closes it, which QEMU takes as the host \
leaving.\n\nQEMU serves one client per port: a second client would wait silently in the socket's backlog. \
vport connect asks QEMU first (query-chardev on the tools monitor of `vport boot`) and exits 4 when another \
client holds the port; it also exits 4 when QEMU has not taken the connection within --timeout.\n\n\
A VM vport did not start: --socket NAME=ADDR (the forms of `vport hello --socket`; the older --socket PATH \
still works, without a name) or --libvirt DOMAIN PORT (the channel's socket from `virsh dumpxml`), and \
optionally --qmp PATH. With --qmp, QEMU is asked whether the port exists under that name (exit 2 if not) and, \
for a unix or TCP socket QEMU listens on, whether another client holds it (exit 4). Without it that check is \
not possible: for a unix socket only the --timeout bound applies (a connection the server does not take in time \
is reported busy, exit 4); for TCP nothing tells a connection QEMU took from one in its backlog. For \
unix-listen:PATH and tcp-listen:ADDR vport listens and waits up to --timeout for QEMU to connect (its \
reconnect=N must be shorter); the socket file is removed on exit and on Ctrl-C or SIGTERM. A pty cannot be \
half-closed: the bridge ends once the input has ended and the port has been quiet for 0.5 s.";

/// `--socket` of `vport connect`.
pub const CONNECT_SOCKET_HELP: &str = "Connect to a VM vport did not start: port NAME (its name= as the guest \
sees it) has its chardev at ADDR, one of the forms of `vport hello --socket`: PATH or unix:PATH (QEMU listens), \
unix-listen:PATH (vport listens; QEMU's chardev has server=off,reconnect=N), tcp:HOST:PORT, \
tcp-listen:127.0.0.1:PORT, pty:/dev/pts/N. NAME= may be left out (the older --socket PATH); --qmp then cannot \
find the port. Example: --socket org.vport.0=/run/vm/port0.sock --qmp /run/vm/qmp.sock";

/// `--libvirt` of `vport hello`, `watch` and `connect`.
pub const ATTACH_LIBVIRT_HELP: &str = "A libvirt domain vport did not start: its ports are the \
<channel> elements with <target type='virtio' name=NAME/> that `virsh dumpxml DOMAIN` shows (virsh is \
$VPORT_VIRSH, else virsh on PATH, with libvirt's default URI). <source mode='bind' path=P/> is a socket QEMU \
listens on (vport connects), mode='connect' one QEMU connects to (vport listens there; P must not exist), a \
pty channel its /dev/pts/N; tcp channels too. The port is --port (hello, watch) or PORT (connect); a channel \
that is not there or not reachable (another type, a domain that is not running) is a usage error listing the \
domain's channels. libvirt keeps QEMU's monitor to itself: QMP facts are reported unavailable unless --qmp \
names a second monitor given to the domain (guest/README.md, \"libvirt\"); QMP through virsh \
qemu-monitor-command is not built. The channel sockets libvirt makes are owned by its qemu user: run vport as \
root or as that user. Example: --libvirt vm1 --port org.vport.0";

/// `vport send --help` and `vport recv --help` (the common part).
pub const TRANSFER_ABOUT: &str = "The file moves as an acknowledged stream (docs/protocol.md): the receiver \
acknowledges what it has stored, the sender keeps at most a window unacknowledged, and the digest (xxh3-64) is \
verified end to end before the file is renamed into place. When the session ends (the host connection drops, \
the guest closes the port, the agent restarts, the VM is migrated or reset) vport waits up to --timeout for the \
next session and resumes from the receiver's offset: nothing acknowledged is sent again or lost. Sessions that \
keep ending without moving the stream on end the transfer once three in a row and --timeout have passed \
(exit 1); QEMU exiting ends it at once (exit 3). Interrupted for good, run the same command again: it resumes from what is stored (the guest's part file, or DEST.ID.vport-part \
on the host). `vport recv` into a DEST that is already there compares it with the guest's file first: the \
same length and digest, nothing is moved again (run twice, or against a guest restored to an earlier state); \
otherwise the file is received afresh and replaces DEST once verified.\n\nThe agent must run with --stream-dir DIR: it reads and writes only plain names in that \
directory (docs/security.md). The port is found like `vport connect` finds it (a VM of `vport boot`, --vm PID), \
or given as --socket PATH. Progress goes to stderr, the result line (or --json) to stdout.";

/// `vport watch --help`.
pub const WATCH_ABOUT: &str = "Boot a VM and show the life cycle of its ports live. vport watch is the host client of \
every port: it completes the handshake, reads continuously (so an in-band BYE or HELLO shows within \
milliseconds), records QMP events (VSERPORT_CHANGE is rate-limited by QEMU to one per second per port), \
and after each handshake fetches the agent's own transition records, mapped onto the host clock.\n\n\
Output: a table on stdout, redrawn on every change (on a terminal) or appended; with --json, every \
record of the timeline as one JSON line (the trace format of docs/trace.md; `vport trace check` judges it).\n\n\
Commands, one per line on stdin: `close PORT [MS]` (the agent closes the port and reopens it after MS \
milliseconds, default 1000), `reopen PORT`, `ping PORT`, `quit`. At end of input, watching goes on until \
Ctrl-C or until QEMU exits.\n\n\
A VM vport did not start (a hand-written command line, libvirt): give --socket NAME=ADDR for each of its \
ports instead of --port, and --qmp PATH for its QMP socket if it has one. Nothing is booted and the VM is \
never stopped or killed (--libvirt DOMAIN finds the ports in the domain's XML, see its help). Without --qmp, \
no QMP event is recorded and sessions end on in-band signals and on the connection's loss only. QEMU's exit \
then shows as each port's chardev server going away: a connection QEMU closed whose socket (unix or TCP, \
QEMU listening) then refuses the reconnect, or a pty that is gone, is noted on the timeline as \"the chardev's \
server is gone (qemu exited?)\"; once every port's server is gone, watching ends with exit 1, as for QEMU's \
exit seen through QMP. A port where vport listens (unix-listen:, tcp-listen:) cannot tell QEMU's exit from \
a slow reconnect: it waits, and watching then ends on `quit` or Ctrl-C.";

/// `--socket` of `vport hello` and `vport watch`: attaching to a VM vport did not start.
pub const ATTACH_SOCKET_HELP: &str = "Talk to a VM vport did not start: port NAME (its name= as the guest sees \
it) has its chardev at ADDR. ADDR is PATH or unix:PATH for `-chardev socket,path=PATH,server=on,wait=off` \
(QEMU listens, vport connects), unix-listen:PATH for `server=off,reconnect=N` (vport listens at PATH, which \
must not exist yet; QEMU connects within N seconds), tcp:HOST:PORT (QEMU listens), tcp-listen:127.0.0.1:PORT \
(vport listens on loopback), or pty:/dev/pts/N (`-chardev pty`). No image is built and no VM booted; the VM is \
left running as it was. Example: --socket org.vport.0=/run/vm/port0.sock --qmp /run/vm/qmp.sock";

/// `--qmp` of `vport hello`, `watch` and `connect`.
pub const ATTACH_QMP_HELP: &str = "The QMP socket of the VM given with --socket or --libvirt (`-qmp \
unix:PATH,server=on,wait=off`; QEMU serves one QMP client at a time, so give a monitor no other tool holds). \
With it vport finds each port's device and chardev by name (QOM), follows VSERPORT_CHANGE, STOP, RESET and \
unplugs, and reports QEMU's version and frontend-open (vport connect: asks whether the port exists and whether \
another client holds it). Without it those are reported as unavailable (no --qmp), not as failures.";

/// `vport run faults --help`.
pub const FAULTS_ABOUT: &str =
    "Inject faults during a two-way acknowledged transfer on a real VM and check that nothing \
acknowledged is lost or stored twice. One VM, two ports: a file streams into the guest on one while another \
streams out on the other. Both begin together; a per-port fault hits each stream at a third of it, a VM-wide \
one is injected once, by the first stream to reach a third (the stop faults and a full queue by the to-host \
stream). A case PASSes when both files arrive whole (digests equal on both sides) and the fault interrupted \
the stream it was aimed at (each for a per-port fault and restore-twice, else the one that injected it). The \
matrix shows, per \
stream, the sessions it took, the bytes sent again (unacknowledged when the session ended), the duplicate bytes \
the receiver dropped, and the time from the fault back to a READY session and to the stream's resumption.\n\n\
Faults (--fault NAME picks some): host-drop, guest-close-reopen, stop-cont, host-drop-during-stop (the pause \
bug), host-drop-queue-full (the host reads nothing until QEMU's trace says it throttled the port, then leaves), \
unplug-replug (device_del + device_add of each port), agent-kill (SysRq-i through QMP send-key; the test image's \
/init restarts the agent), migrate-live, migrate-file (paused, saved with migrate exec:cat > FILE, restored in \
a new QEMU), restore-twice (as migrate-file; once both transfers ended, the same state is restored again and both \
run again: nothing may be delivered twice, so the host keeps its whole file and the rewound guest is sent only \
what it lacked), system-reset (the guest reboots and loses its RAM stream directory: the to-guest stream starts \
again from 0, the to-host one carries the agent's pattern), guest-reboot (Ctrl-Alt-Del through QMP send-key: \
/init stops the agent, which says BYE, and reboots; then as system-reset), qemu-kill (the to-host transfer, and the to-guest one unless \
already done, must fail within 1 s and QEMU's directory be gone; on a new VM both run again and end whole, the \
to-host one resumed from the host's part file). After the matrix, a table per fault: the cases whole, bytes \
resent, duplicates dropped, and the times back to READY and to resumption (median / max).\n\n\
Every case's trace (each VM's QMP port events, host connects and disconnects, in-band messages and stream \
frames, the injection and any liveness reconnect as notes) is judged by `vport trace check`'s checker: a \
broken life-cycle rule fails the case, naming the records. --trace FILE keeps the whole run's trace.";

/// `vport run soak --help`.
pub const SOAK_ABOUT: &str = "Drive a port's life cycle round many times on one real VM and check that nothing \
accumulates. One VM, two ports. On the first: the host leaves and connects again (host-reconnects), the agent \
closes and reopens the port (guest-reopens), the VM is stopped and resumed (stop-cont); every cycle must end in \
a READY session, counted by the agent too. On the second, a file streams into the guest as an acknowledged \
stream while the port is unplugged and plugged in again (unplug-replug); the stream must end whole. Then \
agent-resources compares the agent's resident set and open descriptors with the values before the first cycle \
(growth under 1 MiB, descriptors equal), and cleanup checks, once the VM is shut down, that no QEMU process and \
no VM directory are left and that vport's own descriptors are back to their count.\n\n--quick (the default, \
in scripts/test): 1,000 reconnects, 500 reopens, 50 stop/cont, 10 replugs. --full: 10,000, 10,000, 1,000, 100 \
(docs/reliability.md has the last full run). --reconnects, --reopens, --stop-conts and --replugs override one \
count of the preset. Ctrl-C kills the VM and removes its directory.";

/// `vport bench --help`.
pub const BENCH_ABOUT: &str = "Measure what vport costs over the raw virtio-serial port, side by side in one boot. \
One VM gets three ports: one the agent serves for its plain SOURCE / SINK streams and for the guest operations \
that drive the raw port, one for the acknowledged streams (what `vport send` / `vport recv` use), and `bench.raw`, \
which the agent does not serve: the baseline, a guest write()/read() loop (as `dd` would) with the host on the \
chardev socket directly. Every round moves the same number of bytes each way by each carrier (raw, plain, acked) \
in writes of 64 KiB, in turn, every byte's digest checked; a figure is the median of its rounds and is printed \
as a ratio to the raw port of the same direction and write size, with the goal at 64 KiB (at least 0.95x raw). \
Where the machine allows it, a fourth carrier is the reference: vsock, the same guest loops on a virtio-vsock \
stream (QEMU's vhost-user-vsock-pci served by vhost-device-vsock, found on PATH or in <cache>/tools/bin: \
scripts/install-vhost-vsock installs it), shown as a ratio to raw and held to no goal; where it cannot run, the \
report's `vsock reference` line says why and what to do. \
Under TCG (one vCPU, QEMU 4.2 to 8.x) each figure also gets the guest's instructions per MiB, counted by a TCG \
plugin vport builds with the C compiler into its cache, as a ratio to raw (stable where seconds are not). \
A sweep follows: raw and plain both ways in writes (raw) and DATA frames (plain) of other sizes, 64 B to 1 MiB, \
each a ratio to raw at its size (the acknowledged streams move their bytes in their own 32 KiB frames whatever \
the write size). Round trips of 64 B and 4 KiB come next: the host \
writing to the raw port and reading back what a guest loopback (the agent's LOOPBACK guest operation, a \
read()/write() loop) returns, against ECHO in a session; p50, p99 and p99.9, with the goal (ECHO's p50 at most \
1.1x raw). Event latencies next: a guest opening and closing a port as QMP VSERPORT_CHANGE, query-chardev polled \
and the guest call's reply show it; host connect -> READY against the raw round trip; device_add -> READY; a \
dropped acknowledged stream resumed. Then the agent is watched idle with its session READY: wakeups (goal 0), CPU \
and resident set (goal at most 4 MiB). Then the pause bug, last on that VM (a stop ends every session): a \
guest->host acknowledged stream, the VM stopped at its first acknowledgement, the host gone while it is stopped, \
the VM resumed; QEMU's throttle trace (switched on through QMP) shows whether the port was left stuck, and the \
times from cont to the stream's liveness leaving the stuck connection (its stall deadline is 2 s here) and to the \
stream flowing again are ratios to host connect -> READY (--quick 2 samples, --full 5). Last, one VM of 1 and one of 2 vCPUs with 31 served ports each: boot to the first READY against boot to a raw \
shell (the guest's /init with its virtio modules loaded), and SOURCE on 1, 4, 16 and 31 ports at once, the \
aggregate as a ratio to one port.\n\nUnder TCG only the ratios are stable: \
the absolute figures belong to the machine. --quick (the default; scripts/test runs it) moves 8 MiB a sample \
over 3 rounds, sweeps 64 B, 4 KiB and 1 MiB once and times 300 round trips of each kind; --full 64 MiB over 5, \
sweeps six sizes three times, 2,000 round trips. Progress goes to stderr, the table (or --json) to stdout; \
--json-out FILE also writes the JSON, --plots DIR draws SVG plots (throughput against write size each way, the \
round-trip distributions). A missed goal does not fail the command: bytes that arrive other than sent do (exit 1), \
and a VM that cannot be set up or driven is exit 3. docs/bench.md holds the latest figures.";

/// `vport --help`: every environment variable vport reads.
pub const ENVIRONMENT: &str = "Environment:\n  \
VPORT_LOG             diagnostics level, as --log-level\n  \
VPORT_AGENT           the static vport-agent, as --agent (else searched: see --agent in a command's --help)\n  \
VPORT_BUSYBOX         the static busybox, as --busybox\n  \
VPORT_KERNEL          your own bzImage, as --kernel; VPORT_KERNEL_MODULES its lib/modules/RELEASE\n  \
VPORT_QEMU            the qemu-system-x86_64 to run, as --qemu (default: the one on PATH; scripts/fetch-platforms \
prints QEMU 10.0's)\n  \
VPORT_CACHE_DIR       where images and downloaded packages are kept (default: $XDG_CACHE_HOME/vport, \
$HOME/.cache/vport, /var/tmp/vport-cache)\n  \
VPORT_VIRSH           the virsh that --libvirt runs (default: virsh on PATH)\n  \
VPORT_SPEED_FACTOR    stretch the suites' failure deadlines by this factor, 1 to 10, as --speed-factor (the matrix \
measures it)\n  \
VPORT_KEEP_VM_DIR     set (not 0) to keep each VM's directory (console log, QEMU stderr, sockets) after it ends\n  \
XDG_RUNTIME_DIR       where `vport boot` registers its VMs for `vport connect` (default: /tmp/vport-UID)\n  \
CC                    the C compiler `vport bench` builds its guest instruction counter with (default: cc)";

/// `vport run matrix --help`.
pub const MATRIX_ABOUT: &str = "Run vport's suites once per platform cell: every combination of the QEMU binaries \
(--qemu), guest kernel packages (--kernel-deb), machine types (--machine: pc and q35, the default, with \
virtio-serial-pci; microvm, with virtio-serial-device on virtio-mmio), vCPU counts (--cpus) and accelerators (--accel: a KVM cell is skipped, with \
the probe's reason, where KVM does not run a guest). Each cell runs the suites (--suite: conformance, faults \
--quick, bench --quick) one after another, each as a child vport process with the cell's --qemu, --kernel-deb, \
--machine, --cpus and --accel; cells run --jobs at a time (default half the cores: a TCG guest keeps a core busy). \
scripts/fetch-platforms puts QEMU 10.0 and Linux 6.12 from Debian's bookworm-backports into vport's cache and prints \
their paths.\n\nWhile the cells run, a line per suite started and ended goes to stderr. At the end the summary goes \
to stdout (or --json): a row per cell, a column per suite (passed, FAILED, ERROR, skipped), each suite's result in a \
line (verdict counts; the bench's ratios to the raw port), and the conformance cases whose verdict differs between \
cells. --out DIR (default ./vport-matrix) gets a directory per cell (each suite's JSON report, its log, its JUnit), \
junit.xml (a test suite per cell, a test case per suite: skipped cells as skipped, with the reason) and \
summary.json.\n\nDeadlines: a calibration boot first (the first kernel's guest under TCG) measures the machine's \
speed factor, its boot to HELLO against 6 s (at least 1, at most 10); every suite gets it as --speed-factor and \
stretches its failure deadlines by it (measurement windows are not stretched). --speed-factor X gives it instead \
and skips the calibration. summary.json and each suite's report state the factor used.\n\nExit 1 when a suite failed, else 3 when one could not run or outlived --suite-deadline, else 0: \
skipped cells do not fail the run.";

#[cfg(test)]
mod tests {
    use super::ENVIRONMENT;

    #[test]
    fn every_environment_variable_vport_reads_is_in_the_help() {
        let read = [
            "VPORT_LOG",
            crate::image::AGENT_ENV,
            crate::image::BUSYBOX_ENV,
            crate::image::kernel::KERNEL_ENV,
            crate::image::kernel::KERNEL_MODULES_ENV,
            crate::qemu::binary::QEMU_ENV,
            crate::cache::CACHE_DIR_ENV,
            crate::qemu::cleanup::KEEP_DIR_ENV,
            crate::libvirt::VIRSH_ENV,
            crate::speed::SPEED_FACTOR_ENV,
            "XDG_CACHE_HOME",
            "XDG_RUNTIME_DIR",
        ];
        for var in read {
            assert!(ENVIRONMENT.contains(var), "{var} is read but not in vport --help");
        }
    }
}
