//! The phase of a port's session: DISCONNECTED, CONNECTED or READY, the one spelling of the
//! three states everywhere they appear.
//!
//! - The port machine ([`crate::lifecycle::PortState::phase`]) keeps a session id and nonce
//!   next to the phase; the phase alone is this type.
//! - The wire (EVENTS records, `docs/protocol.md`) carries it as one byte: [`Phase::code`] and
//!   [`Phase::from_u8`].
//! - The trace (`docs/trace.md`) writes it as its name: [`Phase::name`], through serde.
//! - The host's session server reports its state as a phase too
//!   ([`crate::server::ServerState::phase`]).
//!
//! The names and the wire bytes are defined here and nowhere else.

use serde::de::Error as _;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// One of the three phases of a port's session. The discriminant is the wire byte. The
/// default is DISCONNECTED, where every port starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
#[repr(u8)]
pub enum Phase {
    /// No host client is attached (or the port is closed or unplugged).
    #[default]
    Disconnected = 0,
    /// A host client is attached and a session was offered (HELLO); the handshake is pending.
    Connected = 1,
    /// The handshake completed (HELLO_ACK with the session's nonce): data may flow.
    Ready = 2,
}

impl Phase {
    /// Every phase, in wire-byte order: `Phase::ALL[b]` has the wire byte `b`.
    pub const ALL: [Phase; 3] = [Phase::Disconnected, Phase::Connected, Phase::Ready];

    /// The names, as written in traces and logs, indexed by the wire byte.
    pub const NAMES: [&'static str; 3] = ["DISCONNECTED", "CONNECTED", "READY"];

    /// The name used in traces and logs: `DISCONNECTED`, `CONNECTED` or `READY`.
    pub fn name(self) -> &'static str {
        Phase::NAMES[self.code() as usize]
    }

    /// The byte carried on the wire: 0, 1 or 2.
    pub fn code(self) -> u8 {
        self as u8
    }

    /// The phase for a wire byte, if it is one.
    pub fn from_u8(b: u8) -> Option<Phase> {
        Phase::ALL.get(usize::from(b)).copied()
    }

    /// The phase for a name as [`Phase::name`] writes it, if it is one.
    pub fn from_name(name: &str) -> Option<Phase> {
        Phase::ALL.into_iter().find(|p| p.name() == name)
    }
}

impl std::fmt::Display for Phase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl Serialize for Phase {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.name())
    }
}

impl<'de> Deserialize<'de> for Phase {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let name = std::borrow::Cow::<'de, str>::deserialize(d)?;
        Phase::from_name(&name).ok_or_else(|| D::Error::unknown_variant(&name, &Phase::NAMES))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_wire_bytes_are_one_table() {
        for (i, p) in Phase::ALL.into_iter().enumerate() {
            assert_eq!(usize::from(p.code()), i);
            assert_eq!(Phase::from_u8(p.code()), Some(p));
            assert_eq!(Phase::from_name(p.name()), Some(p));
            assert_eq!(p.to_string(), p.name());
        }
        // The wire format and the trace format: changing one breaks deployed agents and old traces.
        let spelled: Vec<(u8, &str)> = Phase::ALL.iter().map(|p| (p.code(), p.name())).collect();
        assert_eq!(spelled, [(0, "DISCONNECTED"), (1, "CONNECTED"), (2, "READY")]);
        assert_eq!(Phase::from_u8(3), None);
        assert_eq!(Phase::from_name("ready"), None);
    }

    #[test]
    fn serde_writes_and_reads_the_name() {
        assert_eq!(serde_json::to_string(&Phase::Ready).unwrap(), "\"READY\"");
        assert_eq!(serde_json::from_str::<Phase>("\"CONNECTED\"").unwrap(), Phase::Connected);
        let e = serde_json::from_str::<Phase>("\"OPEN\"").unwrap_err().to_string();
        assert!(e.starts_with("unknown variant `OPEN`, expected one of `DISCONNECTED`, `CONNECTED`, `READY`"), "{e}");
        assert!(serde_json::from_str::<Phase>("1").is_err(), "the trace spells the phase, never its byte");
    }
}
