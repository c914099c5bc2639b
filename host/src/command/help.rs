//! The long `--help` texts of the `vport` commands whose options alone do not explain them.

/// `vport connect --help`.
pub const CONNECT_ABOUT: &str = "Bridge a port of a VM started by `vport boot` to stdin/stdout, byte for byte, like \
`socat - UNIX-CONNECT:<socket>`. The port is found by name among the running VMs that `vport boot` \
registered (`vport connect --list` shows them); with several candidates pass --vm PID (printed by `vport boot`). \
The bridge ends when QEMU closes the connection; end of input half-closes it, which QEMU takes as the host \
leaving.\n\nQEMU serves one client per port: a second client would wait silently in the socket's backlog. \
vport connect asks QEMU first (query-chardev on the tools monitor of `vport boot`) and exits 4 when another \
client holds the port; it also exits 4 when QEMU has not taken the connection within --timeout.\n\nWith \
--socket there is no VM to ask: the check is not possible, and only the --timeout bound applies (a connection \
the server does not take in time is reported busy, exit 4).";

/// `vport send --help` and `vport recv --help` (the common part).
pub const TRANSFER_ABOUT: &str = "The file moves as an acknowledged stream (docs/protocol.md): the receiver \
acknowledges what it has stored, the sender keeps at most a window unacknowledged, and the digest (xxh3-64) is \
verified end to end before the file is renamed into place. When the session ends (the host connection drops, \
the guest closes the port, the agent restarts, the VM is migrated or reset) vport waits up to --timeout for the \
next session and resumes from the receiver's offset: nothing acknowledged is sent again or lost. Interrupted for \
good, run the same command again: it resumes from what is stored (the guest's part file, or DEST.ID.vport-part \
on the host).\n\nThe agent must run with --stream-dir DIR: it reads and writes only plain names in that \
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
Ctrl-C or until QEMU exits.";
