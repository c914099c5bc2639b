//! The payload codec: how each field type is written and read (`docs/protocol.md`, "Payload
//! encoding"). Integers little-endian; `bool` one byte, 0 or 1; strings a `u16` byte length then
//! UTF-8; lists a `u16` count then the items; byte blobs (`as rest` in the tables) the rest of
//! the payload. Every reading error names the message type and the field.
//!
//! The message table (`table.rs`) and the structs written with `wire_struct!` say *which*
//! fields a payload has, in order; this module says *how* each one is encoded. Its macros
//! (`put!`, `get!`, `wire_struct!`) are in scope in the sibling modules declared after it.

use super::{MessageError, MessageType, ProbeKind, ProbeTarget, SigioAction, StreamDirection};
use crate::phase::Phase;

/// Builds one payload.
pub(super) struct Writer {
    out: Vec<u8>,
    kind: MessageType,
}

impl Writer {
    /// An empty payload of a message of type `kind` (named in errors).
    pub(super) fn new(kind: MessageType) -> Writer {
        Writer::after(kind, Vec::new())
    }

    /// A payload of a message of type `kind` written after the bytes `out` already holds
    /// (a frame's header): [`Writer::finish`] gives `out` back, the payload appended.
    pub(super) fn after(kind: MessageType, out: Vec<u8>) -> Writer {
        Writer { out, kind }
    }

    /// The bytes written so far (after those given to [`Writer::after`]).
    pub(super) fn finish(self) -> Vec<u8> {
        self.out
    }

    fn bytes(&mut self, b: &[u8]) {
        self.out.extend_from_slice(b);
    }

    /// A byte blob that takes the rest of the payload (always the last field).
    pub(super) fn rest(&mut self, b: &[u8]) {
        self.bytes(b);
    }

    fn count(&mut self, field: &'static str, len: usize) -> Result<(), MessageError> {
        let n = u16::try_from(len).map_err(|_| MessageError::ListTooLong { kind: self.kind, field, len })?;
        self.bytes(&n.to_le_bytes());
        Ok(())
    }
}

/// Reads one payload.
pub(super) struct Reader<'a> {
    b: &'a [u8],
    kind: MessageType,
}

impl<'a> Reader<'a> {
    /// A reader over the payload of a message of type `kind` (named in errors).
    pub(super) fn new(b: &'a [u8], kind: MessageType) -> Reader<'a> {
        Reader { b, kind }
    }

    /// The message type, for errors about a field.
    pub(super) fn kind(&self) -> MessageType {
        self.kind
    }

    fn take(&mut self, field: &'static str, n: usize) -> Result<&'a [u8], MessageError> {
        if self.b.len() < n {
            return Err(MessageError::Truncated { kind: self.kind, field });
        }
        let (head, tail) = self.b.split_at(n);
        self.b = tail;
        Ok(head)
    }

    fn array<const N: usize>(&mut self, field: &'static str) -> Result<[u8; N], MessageError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(field, N)?);
        Ok(a)
    }

    fn invalid(&self, field: &'static str, value: u64) -> MessageError {
        MessageError::InvalidValue { kind: self.kind, field, value }
    }

    /// A byte that must be a value of an enumeration (`from` says which bytes are).
    pub(super) fn enum_u8<T>(&mut self, field: &'static str, from: fn(u8) -> Option<T>) -> Result<T, MessageError> {
        let v = u8::get(self, field)?;
        from(v).ok_or_else(|| self.invalid(field, v.into()))
    }

    /// The rest of the payload as a byte blob (always the last field).
    pub(super) fn rest(&mut self) -> Vec<u8> {
        self.rest_borrowed().to_vec()
    }

    /// The rest of the payload, borrowed (always the last field).
    pub(super) fn rest_borrowed(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.b)
    }

    /// Succeeds when the whole payload was read.
    pub(super) fn finish(self) -> Result<(), MessageError> {
        match self.b.len() {
            0 => Ok(()),
            extra => Err(MessageError::TrailingBytes { kind: self.kind, extra }),
        }
    }
}

/// A field type and its encoding. `field` is the field's name, for errors.
pub(super) trait Wire: Sized {
    /// Appends the encoding of `self`.
    fn put(&self, w: &mut Writer, field: &'static str) -> Result<(), MessageError>;
    /// Reads one value.
    fn get(r: &mut Reader<'_>, field: &'static str) -> Result<Self, MessageError>;
}

/// A type that is an item of a `u16`-counted list (`Vec<T>` is then a [`Wire`] field). Byte
/// blobs are no lists: a `Vec<u8>` field must be marked `as rest`, or it does not compile.
pub(super) trait ListItem: Wire {}

/// Writes a field: with the [`Wire`] encoding of its type, or as the rest of the payload.
macro_rules! put {
    ($w:ident, $field:expr, $v:expr) => {
        $crate::message::codec::Wire::put($v, $w, $field)?
    };
    ($w:ident, $field:expr, $v:expr, rest) => {
        $w.rest($v)
    };
}

/// Reads a field (its type is inferred from where it goes), the counterpart of `put!`.
macro_rules! get {
    ($r:ident, $field:expr) => {
        $crate::message::codec::Wire::get($r, $field)?
    };
    ($r:ident, $field:expr, rest) => {
        $r.rest()
    };
}

/// Defines a struct whose wire encoding is its fields in the order written here, each named
/// `$prefix` + its name in errors. A `Vec<u8>` field marked `as rest` takes the rest of the
/// payload (only as the last field).
macro_rules! wire_struct {
    (
        $(#[$meta:meta])*
        pub struct $t:ident (names $prefix:literal) {
            $( $(#[$fmeta:meta])* pub $f:ident : $ft:ty $(as $enc:ident)? ),* $(,)?
        }
    ) => {
        $(#[$meta])*
        pub struct $t {
            $( $(#[$fmeta])* pub $f: $ft ),*
        }

        impl $crate::message::codec::Wire for $t {
            fn put(
                &self,
                w: &mut $crate::message::codec::Writer,
                _field: &'static str,
            ) -> Result<(), $crate::message::MessageError> {
                $( put!(w, concat!($prefix, stringify!($f)), &self.$f $(, $enc)?); )*
                Ok(())
            }

            fn get(
                r: &mut $crate::message::codec::Reader<'_>,
                _field: &'static str,
            ) -> Result<Self, $crate::message::MessageError> {
                Ok($t { $( $f: get!(r, concat!($prefix, stringify!($f)) $(, $enc)?) ),* })
            }
        }
    };
}

macro_rules! wire_int {
    ($($t:ty),*) => {$(
        impl Wire for $t {
            fn put(&self, w: &mut Writer, _field: &'static str) -> Result<(), MessageError> {
                w.bytes(&self.to_le_bytes());
                Ok(())
            }
            fn get(r: &mut Reader<'_>, field: &'static str) -> Result<Self, MessageError> {
                Ok(<$t>::from_le_bytes(r.array(field)?))
            }
        }
    )*};
}
wire_int!(u8, u16, u32, u64, i32, i64);

impl Wire for bool {
    fn put(&self, w: &mut Writer, field: &'static str) -> Result<(), MessageError> {
        u8::from(*self).put(w, field)
    }
    fn get(r: &mut Reader<'_>, field: &'static str) -> Result<Self, MessageError> {
        r.enum_u8(field, |b| match b {
            0 => Some(false),
            1 => Some(true),
            _ => None,
        })
    }
}

impl Wire for String {
    fn put(&self, w: &mut Writer, field: &'static str) -> Result<(), MessageError> {
        let len = u16::try_from(self.len()).map_err(|_| MessageError::StringTooLong {
            kind: w.kind,
            field,
            len: self.len(),
        })?;
        len.put(w, field)?;
        w.bytes(self.as_bytes());
        Ok(())
    }
    fn get(r: &mut Reader<'_>, field: &'static str) -> Result<Self, MessageError> {
        let len = u16::get(r, field)?;
        let b = r.take(field, usize::from(len))?;
        String::from_utf8(b.to_vec()).map_err(|_| MessageError::InvalidUtf8 { kind: r.kind, field })
    }
}

impl<T: ListItem> Wire for Vec<T> {
    fn put(&self, w: &mut Writer, field: &'static str) -> Result<(), MessageError> {
        w.count(field, self.len())?;
        self.iter().try_for_each(|item| item.put(w, field))
    }
    fn get(r: &mut Reader<'_>, field: &'static str) -> Result<Self, MessageError> {
        let n = u16::get(r, field)?;
        (0..n).map(|_| T::get(r, field)).collect()
    }
}

/// A named counter of STATS_REPLY.
impl Wire for (String, u64) {
    fn put(&self, w: &mut Writer, _field: &'static str) -> Result<(), MessageError> {
        self.0.put(w, "stat name")?;
        self.1.put(w, "stat value")
    }
    fn get(r: &mut Reader<'_>, _field: &'static str) -> Result<Self, MessageError> {
        Ok((String::get(r, "stat name")?, u64::get(r, "stat value")?))
    }
}
impl ListItem for (String, u64) {}

/// One-byte enumerations: the discriminant on the wire, any other byte an invalid value.
macro_rules! wire_u8_enum {
    ($($t:ty),*) => {$(
        impl Wire for $t {
            fn put(&self, w: &mut Writer, field: &'static str) -> Result<(), MessageError> {
                (*self as u8).put(w, field)
            }
            fn get(r: &mut Reader<'_>, field: &'static str) -> Result<Self, MessageError> {
                r.enum_u8(field, <$t>::from_u8)
            }
        }
    )*};
}
wire_u8_enum!(ProbeKind, ProbeTarget, SigioAction, StreamDirection, Phase);
