//! What one QMP line means (pure: no I/O, no clock, no panics on any input).
//!
//! [`parse_message`] classifies a line the server sent as a [`Incoming::Greeting`], an
//! [`Incoming::Event`] or an [`Incoming::Reply`], or says why it is none of them
//! ([`QmpParseError`]). It is total: every byte string gives `Ok` or `Err`, never a panic, and its
//! cost is linear in the line's length (JSON nesting deeper than serde_json's limit of 128 is
//! an error, not a deep recursion). It is the entry point for fuzzing the QMP client.

use serde_json::{Map, Value};
use thiserror::Error;

/// One message from a QMP server.
#[derive(Debug, Clone, PartialEq)]
pub enum Incoming {
    /// `{"QMP": {...}}`, the first line of a connection: the value of the `QMP` member (QEMU's
    /// version and capabilities; not interpreted).
    Greeting(Value),
    /// `{"event": NAME, ...}`: an asynchronous event, whatever its name.
    Event(EventMessage),
    /// `{"return": ...}` or `{"error": ...}`: the answer to a command.
    Reply(ReplyMessage),
}

/// An event as sent, without the local time of receipt.
#[derive(Debug, Clone, PartialEq)]
pub struct EventMessage {
    /// Event name, for example `VSERPORT_CHANGE` (any string is accepted).
    pub name: String,
    /// The `data` member, `Null` when absent.
    pub data: Value,
    /// QEMU's `timestamp` in microseconds since the epoch; a missing or malformed part counts as
    /// 0, and a value beyond `u64` saturates.
    pub qemu_time_us: u64,
}

/// A command reply.
#[derive(Debug, Clone, PartialEq)]
pub struct ReplyMessage {
    /// The `id` member as sent (QEMU copies the command's `id`); `None` when absent, as in
    /// QEMU's answer to a command line it could not parse.
    pub id: Option<Value>,
    /// `Ok(return value)` or `Err` for an `error` member (which wins if both are present).
    pub outcome: Result<Value, ErrorReply>,
}

impl ReplyMessage {
    /// The id as the number vport's client sends, if it is one.
    pub fn numeric_id(&self) -> Option<u64> {
        self.id.as_ref().and_then(Value::as_u64)
    }
}

/// The `error` member of a reply; a field QEMU should send but did not is `None`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrorReply {
    /// `class`, for example `GenericError` or `DeviceNotFound`.
    pub class: Option<String>,
    /// `desc`, the human-readable description (an `error` that is a bare string is taken as
    /// the description).
    pub desc: Option<String>,
}

/// Why a line is not a QMP message.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum QmpParseError {
    /// Nothing but white space.
    #[error("an empty line")]
    Empty,
    /// Not UTF-8 (JSON text must be).
    #[error("not utf-8 (valid up to byte {valid_up_to})")]
    NotUtf8 {
        /// Length of the valid UTF-8 prefix.
        valid_up_to: usize,
    },
    /// Not one JSON value (syntax error, trailing data, nesting too deep).
    #[error("not json: {reason}")]
    NotJson {
        /// serde_json's description, with line and column.
        reason: String,
    },
    /// Valid JSON that is not an object.
    #[error("json {kind}, not an object")]
    NotObject {
        /// What it is instead: `null`, `a boolean`, `a number`, `a string` or `an array`.
        kind: &'static str,
    },
    /// A `QMP` member that is not an object.
    #[error("a greeting whose QMP member is {kind}, not an object")]
    BadGreeting {
        /// What it is instead.
        kind: &'static str,
    },
    /// An `event` member that is not a string.
    #[error("an event whose name is {kind}, not a string")]
    BadEventName {
        /// What it is instead.
        kind: &'static str,
    },
    /// An object with none of `QMP`, `event`, `return`, `error`.
    #[error("an object with none of QMP, event, return, error (keys: {keys})")]
    Unrecognised {
        /// Its first keys, comma-separated (at most 8, each cut to 32 characters).
        keys: String,
    },
}

/// Classifies one line from a QMP server (with or without its `\r\n`); see the module docs.
pub fn parse_message(line: &[u8]) -> Result<Incoming, QmpParseError> {
    let text = std::str::from_utf8(line).map_err(|e| QmpParseError::NotUtf8 { valid_up_to: e.valid_up_to() })?;
    if text.trim().is_empty() {
        return Err(QmpParseError::Empty);
    }
    let value: Value = serde_json::from_str(text).map_err(|e| QmpParseError::NotJson { reason: e.to_string() })?;
    let Value::Object(mut obj) = value else {
        return Err(QmpParseError::NotObject { kind: kind_of(&value) });
    };
    if let Some(greeting) = obj.remove("QMP") {
        return match greeting {
            Value::Object(_) => Ok(Incoming::Greeting(greeting)),
            other => Err(QmpParseError::BadGreeting { kind: kind_of(&other) }),
        };
    }
    if let Some(name) = obj.remove("event") {
        let Value::String(name) = name else {
            return Err(QmpParseError::BadEventName { kind: kind_of(&name) });
        };
        let qemu_time_us = timestamp_us(obj.get("timestamp"));
        let data = obj.remove("data").unwrap_or(Value::Null);
        return Ok(Incoming::Event(EventMessage { name, data, qemu_time_us }));
    }
    let id = obj.remove("id");
    if let Some(error) = obj.remove("error") {
        return Ok(Incoming::Reply(ReplyMessage { id, outcome: Err(error_reply(&error)) }));
    }
    if let Some(ret) = obj.remove("return") {
        return Ok(Incoming::Reply(ReplyMessage { id, outcome: Ok(ret) }));
    }
    if let Some(id) = id {
        obj.insert("id".into(), id);
    }
    Err(QmpParseError::Unrecognised { keys: key_list(&obj) })
}

fn timestamp_us(ts: Option<&Value>) -> u64 {
    let part = |k: &str| ts.and_then(|t| t.get(k)).and_then(Value::as_u64).unwrap_or(0);
    part("seconds").saturating_mul(1_000_000).saturating_add(part("microseconds"))
}

fn error_reply(error: &Value) -> ErrorReply {
    let field = |k: &str| error.get(k).and_then(Value::as_str).map(str::to_string);
    match error {
        Value::String(s) => ErrorReply { class: None, desc: Some(s.clone()) },
        _ => ErrorReply { class: field("class"), desc: field("desc") },
    }
}

fn key_list(obj: &Map<String, Value>) -> String {
    let keys: Vec<String> = obj.keys().take(8).map(|k| k.chars().take(32).collect()).collect();
    keys.join(",")
}

fn kind_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn event(line: &str) -> EventMessage {
        match parse_message(line.as_bytes()) {
            Ok(Incoming::Event(e)) => e,
            other => panic!("{line}: {other:?}"),
        }
    }

    fn reply(line: &str) -> ReplyMessage {
        match parse_message(line.as_bytes()) {
            Ok(Incoming::Reply(r)) => r,
            other => panic!("{line}: {other:?}"),
        }
    }

    #[test]
    fn qemu_greeting_event_and_replies_parse() {
        let g = br#"{"QMP": {"version": {"qemu": {"micro": 22, "minor": 2, "major": 7}}, "capabilities": ["oob"]}}"#;
        assert!(matches!(parse_message(g), Ok(Incoming::Greeting(v)) if v["capabilities"][0] == "oob"));
        let e = event(
            "{\"timestamp\": {\"seconds\": 2, \"microseconds\": 5}, \"event\": \"VSERPORT_CHANGE\", \
             \"data\": {\"open\": true, \"id\": \"p0\"}}\r",
        );
        assert_eq!((e.name.as_str(), e.qemu_time_us, &e.data["id"]), ("VSERPORT_CHANGE", 2_000_005, &json!("p0")));
        let r = reply("{\"return\": {}, \"id\": 7}\r\n");
        assert_eq!((r.numeric_id(), r.outcome), (Some(7), Ok(json!({}))));
        let r = reply(r#"{"id": 8, "error": {"class": "DeviceNotFound", "desc": "no x"}}"#);
        let want = ErrorReply { class: Some("DeviceNotFound".into()), desc: Some("no x".into()) };
        assert_eq!((r.numeric_id(), r.outcome), (Some(8), Err(want)));
    }

    #[test]
    fn unknown_events_parse_whatever_their_data_and_timestamp() {
        let e = event(r#"{"event": "NO_SUCH_EVENT_YET"}"#);
        assert_eq!((e.name.as_str(), e.data, e.qemu_time_us), ("NO_SUCH_EVENT_YET", Value::Null, 0));
        let e = event(r#"{"event": "", "data": [1, "x"], "timestamp": "yesterday"}"#);
        assert_eq!((e.data, e.qemu_time_us), (json!([1, "x"]), 0));
        let e = event(r#"{"event": "E", "timestamp": {"seconds": -1, "microseconds": 3.5}}"#);
        assert_eq!(e.qemu_time_us, 0);
    }

    #[test]
    fn a_timestamp_beyond_u64_saturates_instead_of_overflowing() {
        let line = format!(r#"{{"event": "E", "timestamp": {{"seconds": {}, "microseconds": {}}}}}"#, u64::MAX, 9);
        assert_eq!(event(&line).qemu_time_us, u64::MAX);
    }

    #[test]
    fn replies_with_missing_or_odd_ids_and_error_fields() {
        assert_eq!(reply(r#"{"return": 3}"#).id, None);
        let r = reply(r#"{"return": {}, "id": "vport-7"}"#);
        assert_eq!((r.numeric_id(), r.id), (None, Some(json!("vport-7"))));
        assert_eq!(reply(r#"{"return": {}, "id": -4}"#).numeric_id(), None);
        let none = ErrorReply { class: None, desc: None };
        assert_eq!(reply(r#"{"error": {}, "id": 1}"#).outcome, Err(none.clone()));
        assert_eq!(reply(r#"{"error": null, "id": 1}"#).outcome, Err(none.clone()));
        assert_eq!(reply(r#"{"error": {"class": 5, "desc": ["x"]}, "id": 1}"#).outcome, Err(none));
        let r = reply(r#"{"error": "plain text", "id": 1}"#);
        assert_eq!(r.outcome, Err(ErrorReply { class: None, desc: Some("plain text".into()) }));
        let r = reply(r#"{"return": {}, "error": {"class": "C"}, "id": 1}"#);
        assert!(r.outcome.is_err(), "error wins over return");
    }

    #[test]
    fn lines_that_are_not_messages_are_typed_errors() {
        let cases: Vec<(&[u8], QmpParseError)> = vec![
            (b"", QmpParseError::Empty),
            (b" \r", QmpParseError::Empty),
            (b"{\"return\": \"\xff\xfe\"}", QmpParseError::NotUtf8 { valid_up_to: 12 }),
            (b"null", QmpParseError::NotObject { kind: "null" }),
            (b"[{\"return\": {}}]", QmpParseError::NotObject { kind: "an array" }),
            (b"\"QMP\"", QmpParseError::NotObject { kind: "a string" }),
            (b"{\"QMP\": 1}", QmpParseError::BadGreeting { kind: "a number" }),
            (b"{\"event\": {\"name\": \"X\"}}", QmpParseError::BadEventName { kind: "an object" }),
            (b"{\"id\": 3, \"hello\": 1}", QmpParseError::Unrecognised { keys: "hello,id".into() }),
        ];
        for (line, want) in cases {
            assert_eq!(parse_message(line), Err(want), "{}", String::from_utf8_lossy(line));
        }
        for line in [&b"{\"return\": "[..], b"{} {}", b"garbage", b"{\"a\":1}x", b"\x00"] {
            assert!(
                matches!(parse_message(line), Err(QmpParseError::NotJson { .. })),
                "{}",
                String::from_utf8_lossy(line)
            );
        }
    }

    #[test]
    fn deep_nesting_and_huge_values_are_handled_without_panic() {
        let deep = format!("{{\"return\": {}{}}}", "[".repeat(100_000), "]".repeat(100_000));
        assert!(matches!(parse_message(deep.as_bytes()), Err(QmpParseError::NotJson { .. })));
        let big = format!(r#"{{"return": "{}", "id": 1}}"#, "x".repeat(900_000));
        assert_eq!(reply(&big).outcome.map(|v| v.as_str().map(str::len)), Ok(Some(900_000)));
        let keys: String = (0..100).map(|i| format!("\"{}{i}\": 0,", "k".repeat(50))).collect();
        let Err(QmpParseError::Unrecognised { keys }) = parse_message(format!("{{{keys} \"z\": 1}}").as_bytes()) else {
            panic!("not unrecognised");
        };
        assert_eq!(keys.split(',').count(), 8);
        assert!(keys.split(',').all(|k| k.len() <= 32), "{keys}");
    }
}
