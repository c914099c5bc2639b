//! GUEST_OP and GUEST_OP_DONE: guest operations the agent runs on ports it does not serve.
//! [`GuestOp`] is generated from one table (operation code and fields in wire order), like the
//! message table.

use super::codec::{Reader, Wire, Writer};
use super::MessageError;

macro_rules! guest_op_table {
    ($(
        $(#[$doc:meta])*
        $name:ident = $code:literal
        $( { $( $(#[$fdoc:meta])* $f:ident : $ft:ty ),* $(,)? } )?
        ;
    )*) => {
        /// A guest operation: one system call (or a loop of them) the agent runs inside the
        /// guest on a port it does **not** serve, so the host can observe what an ordinary guest
        /// program sees.
        ///
        /// Operations on a handle run in order of arrival on a worker thread of that handle, so
        /// a blocking call (a write with no host client, a read with no data) blocks only its
        /// handle: the agent keeps serving the control port, and the completion
        /// ([`GuestOpDone`]) arrives when the call returns. Handles belong to the control
        /// session that opened them and are closed when it ends.
        #[derive(Debug, Clone, PartialEq, Eq)]
        pub enum GuestOp {
            $( $(#[$doc])* $name $( { $( $(#[$fdoc])* $f: $ft ),* } )?, )*
        }

        impl GuestOp {
            /// The operation's code on the wire (the `op` byte).
            pub fn code(&self) -> u8 {
                match self {
                    $( GuestOp::$name { .. } => $code, )*
                }
            }
        }

        impl Wire for GuestOp {
            fn put(&self, w: &mut Writer, field: &'static str) -> Result<(), MessageError> {
                self.code().put(w, field)?;
                match self {
                    $( GuestOp::$name $( { $($f),* } )? => { $( $( put!(w, stringify!($f), $f); )* )? } )*
                }
                Ok(())
            }

            fn get(r: &mut Reader<'_>, field: &'static str) -> Result<Self, MessageError> {
                Ok(match u8::get(r, field)? {
                    $( $code => GuestOp::$name $( { $( $f: get!(r, stringify!($f)) ),* } )?, )*
                    v => return Err(MessageError::InvalidValue { kind: r.kind(), field, value: v.into() }),
                })
            }
        }
    };
}

guest_op_table! {
    /// `open(node, O_RDWR|O_CLOEXEC|O_NOCTTY|O_NOFOLLOW [|O_NONBLOCK])` of a virtio-serial port
    /// node. `port` is a port reference: a sysfs port name, a node name `vportNpM`,
    /// `/dev/vportNpM` or `/dev/virtio-ports/NAME`, always resolved through sysfs (anything else
    /// is refused with ERROR denied; see `docs/security.md`). Done: `ret` = the new handle (> 0)
    /// or -1 and `errno` (ENOENT: no such port in sysfs); `data` = the device path opened.
    Open = 1 {
        /// Port reference (see above).
        port: String,
        /// Open with `O_NONBLOCK`.
        nonblock: bool,
        /// Count SIGIO for this fd (`F_SETOWN` + `F_SETSIG` + `O_ASYNC`), see [`GuestOp::SigioCount`].
        sigio: bool,
    };
    /// `read(2)`. With `all` false: one call of at most `bytes` (<= 64 KiB) bytes, `data` holds
    /// what it returned. With `all` true: calls until `bytes` bytes came, a call returned 0 or
    /// failed; `bytes`/`digest` (xxh3-64) cover everything, `data` the first 4 KiB.
    Read = 2 {
        /// The handle.
        handle: u32,
        /// Bytes wanted.
        bytes: u64,
        /// Keep reading until `bytes` came (or 0 / an error).
        all: bool,
    };
    /// `write(2)` of `bytes` bytes of the pattern of `seed`, calling again after short writes;
    /// done when all are written or a call failed: `bytes` written, `digest` of them, `ret` the
    /// last call's result.
    Write = 3 {
        /// The handle.
        handle: u32,
        /// Pattern seed ([`crate::pattern`]).
        seed: u64,
        /// Stream length.
        bytes: u64,
    };
    /// `poll(2)` on the handle: `ret` the call's result, `mask` the exact revents.
    Poll = 4 {
        /// The handle.
        handle: u32,
        /// Requested events.
        events: u16,
        /// poll timeout (-1 waits for ever).
        timeout_ms: i32,
    };
    /// Close the handle (after the operations queued on it; a blocked one is interrupted).
    Close = 5 {
        /// The handle.
        handle: u32,
    };
    /// Interrupt the handle's blocked operation (it completes with EINTR).
    Cancel = 6 {
        /// The handle.
        handle: u32,
    };
    /// The port's debugfs file (`/sys/kernel/debug/virtio-ports/vportNpM`) as text in `data`.
    Debugfs = 7 {
        /// Port name or node (`vportNpM`).
        port: String,
    };
    /// Every port in sysfs as `node name` lines in `data` (name empty when unset).
    Sysfs = 8;
    /// SIGIO signals received for the handle since it was opened with `sigio`: `ret` the
    /// count, `data` the poll mask sampled at each (u16 little-endian, first 64).
    SigioCount = 9 {
        /// The handle.
        handle: u32,
    };
    /// A loopback, as a guest program echoing what it reads: `read(2)` (at most 64 KiB) and
    /// `write(2)` back all that came, again and again, until `bytes` were echoed, a read
    /// returned 0 or a call failed (CANCEL interrupts it): `bytes` echoed, `digest` of them,
    /// `ret` the last call's result. The baseline of a round trip on the raw port.
    Loopback = 10 {
        /// The handle.
        handle: u32,
        /// Bytes to echo before completing.
        bytes: u64,
    };
    /// [`GuestOp::Write`] in calls of `each` bytes (1 to [`MAX_WRITE_EACH`]; the last call may
    /// be shorter) instead of 64 KiB: a guest program's write size. `vport bench` measures the
    /// raw port with it at every write size. `each` out of range: `ret` −1, EINVAL.
    WriteEach = 11 {
        /// The handle.
        handle: u32,
        /// Pattern seed ([`crate::pattern`]).
        seed: u64,
        /// Stream length.
        bytes: u64,
        /// Bytes per `write(2)` call.
        each: u32,
    };
    /// A vsock stream as a handle: `socket(AF_VSOCK, SOCK_STREAM)`, `bind` to
    /// `VMADDR_CID_ANY:port` and `listen`, done before the agent runs the next guest operation
    /// (so the completion of a later one, SYSFS say, tells the host that the guest listens:
    /// guest operations are started in order), then one `accept` within
    /// `timeout_ms` on the new handle's worker; the listener is closed after it, whatever
    /// happened. Done: `ret` = the handle of the accepted connection (> 0), on which READ,
    /// WRITE, WRITE_EACH, POLL, LOOPBACK and CLOSE run as on a port, `data` = the peer as
    /// `vsock:CID:PORT`; or −1 and `errno`: EAFNOSUPPORT (the guest kernel has no AF_VSOCK:
    /// the `vsock` and `vmw_vsock_virtio_transport` modules are not loaded), EADDRINUSE,
    /// ETIMEDOUT (no connection within `timeout_ms`), EINTR (the session ended). `vport bench`
    /// measures the virtio-vsock reference with it.
    VsockAccept = 12 {
        /// The vsock port to listen on.
        port: u32,
        /// How long to wait for the connection, ms (0: no wait, a connection must be pending).
        timeout_ms: u32,
    };
}

/// The largest `each` of [`GuestOp::WriteEach`]: 1 MiB.
pub const MAX_WRITE_EACH: u32 = 1 << 20;

impl GuestOp {
    /// The handle the operation runs on, if any.
    pub fn handle(&self) -> Option<u32> {
        match self {
            GuestOp::Read { handle, .. }
            | GuestOp::Write { handle, .. }
            | GuestOp::Poll { handle, .. }
            | GuestOp::Close { handle }
            | GuestOp::Cancel { handle }
            | GuestOp::SigioCount { handle }
            | GuestOp::Loopback { handle, .. }
            | GuestOp::WriteEach { handle, .. } => Some(*handle),
            GuestOp::Open { .. } | GuestOp::Debugfs { .. } | GuestOp::Sysfs | GuestOp::VsockAccept { .. } => None,
        }
    }
}

wire_struct! {
    /// The completion of a [`GuestOp`].
    #[derive(Debug, Clone, PartialEq, Eq, Default)]
    pub struct GuestOpDone (names "") {
        /// The request's `op_id`.
        pub op_id: u32,
        /// The (last) system call's return value; -1 on failure.
        pub ret: i64,
        /// `errno` when `ret` is -1, else 0.
        pub errno: i32,
        /// poll revents (POLL), else 0.
        pub mask: u16,
        /// Bytes moved (READ, WRITE).
        pub bytes: u64,
        /// xxh3-64 of the bytes moved (READ, WRITE), else 0.
        pub digest: u64,
        /// Time from the start of the operation to its completion, in the guest.
        pub elapsed_ns: u64,
        /// Operation-specific bytes (see [`GuestOp`]).
        pub data: Vec<u8> as rest,
    }
}
