//! Target `qmp`: bytes from a QMP server through the host's [`LineSplitter`] (in chunks and with
//! a line limit the input chooses), and every line through [`parse_message`].
//!
//! # Input
//!
//! - First byte not `0xFF`: the whole input is what the server sent (the committed seeds are
//!   real QMP lines), split with the real limit ([`MAX_LINE_BYTES`]), pushed at once, one byte
//!   at a time and in 7-byte chunks.
//! - First byte `0xFF`: a line limit selector (below 0x80 [`MAX_LINE_BYTES`], else
//!   `(b & 0x7f) * 4` bytes, 0..=508), a mode byte (bit 0: the rest after the chunk plan is a
//!   *generator script* of QMP messages, [`generate`]; clear: raw bytes), `n` (`% 32`) and an
//!   `n`-byte chunk plan (size `b & 0x3f`, times 64 if bit 7, drain after it if bit 6; empty:
//!   one byte at a time), then the rest.
//!
//! # What is checked
//!
//! Line splitter (`host/src/qmp/lines.rs`), for any chunking:
//! - the lines that come out are exactly the stream split at `\n` (a `\r` before it kept), in
//!   order, so no line contains `\n`; none is longer than the limit;
//! - the first line longer than the limit, complete or not, is reported as `LineTooLong` (with
//!   the limit) as soon as more than `limit` of its bytes are in, and nothing comes out after
//!   it: every later call returns the same error, pushes are dropped, `partial()` is 0;
//! - bytes are accounted: while no line was too long, the lines' bytes, their newlines and
//!   `partial()` add up to every byte pushed; after a drain `partial()` is at most the limit,
//!   and between drains at most the limit plus the bytes pushed since.
//!
//! `parse_message` (`host/src/qmp/parse.rs`), on every line:
//! - it is total (never panics) and agrees with the documented classification, computed here
//!   from the line's JSON value: not UTF-8, nothing but white space, not JSON, not an object,
//!   greeting (`QMP` an object) or bad greeting, event (`event` a string; `data` or null;
//!   `timestamp` seconds and microseconds as u64 or 0, saturating) or bad event name, reply
//!   (`error` wins over `return`; `id` as sent; `class`/`desc` strings or none, a bare string
//!   error is the description), else unrecognised with the first 8 keys cut to 32 characters;
//! - for the generator's lines (JSON objects with `return`/`error` and `id`, `event`, `QMP`,
//!   or none of them, with extra members), the result is the message the generator meant, so
//!   the classification is checked against an independent source, not only against JSON.

use crate::input::Input;
use serde_json::{json, Map, Value};
use vport_host::qmp::{
    parse_message, ErrorReply, EventMessage, Incoming, LineSplitter, LineTooLong, QmpParseError, ReplyMessage,
    MAX_LINE_BYTES,
};

// ---- adapter: the QMP API this target uses -----------------------------------------------------

/// A line splitter with limit `limit`.
fn splitter(limit: usize) -> LineSplitter {
    LineSplitter::new(limit)
}

/// Parses one line.
fn parse(line: &[u8]) -> Result<Incoming, QmpParseError> {
    parse_message(line)
}

// ---- end of adapter ----------------------------------------------------------------------------

/// Pushes that follow the plan; the rest goes in 4032-byte chunks.
const MAX_PUSHES: usize = 4096;
/// Lines a generator script makes at most.
const MAX_LINES: usize = 256;

/// Interprets `data` (layout in the module documentation) and checks every guarantee.
pub fn run(data: &[u8]) {
    if data.first() != Some(&0xFF) {
        for plan in [&[0xff][..], &[0x41], &[0x47]] {
            check_stream(data, plan, MAX_LINE_BYTES, &[]);
        }
        return;
    }
    let mut input = Input::new(&data[1..]);
    let limit = match input.u8() {
        b if b < 0x80 => MAX_LINE_BYTES,
        b => usize::from(b & 0x7f) * 4,
    };
    let generator = input.u8() & 1 == 1;
    let n = usize::from(input.u8() % 32);
    let plan = input.bytes(n).to_vec();
    let (stream, meant) = if generator { generate(&mut input) } else { (input.rest().to_vec(), Vec::new()) };
    check_stream(&stream, &plan, limit, &meant);
}

/// Splits `stream` pushed in the chunks of `plan`, checks the splitter against the model and
/// every line's classification; `meant` is what the generator meant each line to be.
fn check_stream(stream: &[u8], plan: &[u8], limit: usize, meant: &[Option<Result<Incoming, QmpParseError>>]) {
    const BYTEWISE: &[u8] = &[0x41];
    let plan = if plan.is_empty() { BYTEWISE } else { plan };
    // The model: the lines before the first one over the limit, and whether there is one.
    let mut want: Vec<&[u8]> = Vec::new();
    let too_long;
    let mut rest = stream;
    loop {
        match rest.iter().position(|&b| b == b'\n') {
            Some(i) if i <= limit => {
                want.push(&rest[..i]);
                rest = &rest[i + 1..];
            }
            Some(_) => {
                too_long = true;
                break;
            }
            None => {
                too_long = rest.len() > limit;
                break;
            }
        }
    }

    let mut s = splitter(limit);
    let mut got: Vec<Vec<u8>> = Vec::new();
    let mut failed = false;
    let (mut pos, mut step, mut since_drain, mut line_bytes) = (0usize, 0usize, 0usize, 0usize);
    let drain = |s: &mut LineSplitter, got: &mut Vec<Vec<u8>>, failed: &mut bool, line_bytes: &mut usize| {
        while let Some(r) = s.next_line() {
            match r {
                Ok(line) => {
                    assert!(!*failed, "a line came out after LineTooLong");
                    assert!(!line.contains(&b'\n'), "a line contains a newline: {line:?}");
                    assert!(line.len() <= limit, "a line of {} bytes passed the limit {limit}", line.len());
                    *line_bytes += line.len() + 1;
                    got.push(line);
                }
                Err(e) => {
                    assert_eq!(e, LineTooLong { limit }, "LineTooLong names another limit");
                    *failed = true;
                    // It is the splitter's last word: the same error again, the buffer released.
                    assert_eq!(s.next_line(), Some(Err(e)), "LineTooLong is not repeated");
                    assert_eq!(s.partial(), 0, "the buffer is kept after LineTooLong");
                    break;
                }
            }
        }
    };
    while pos < stream.len() {
        let b = if step < MAX_PUSHES { plan[step % plan.len()] } else { 0xff };
        step += 1;
        let size = (usize::from(b & 0x3f) << if b & 0x80 != 0 { 6 } else { 0 }).max(1).min(stream.len() - pos);
        s.push(&stream[pos..pos + size]);
        pos += size;
        since_drain += size;
        if failed {
            assert_eq!(s.partial(), 0, "bytes pushed after LineTooLong are kept");
        } else {
            assert_eq!(line_bytes + s.partial(), pos, "lines, newlines and partial() are not every byte pushed");
            assert!(
                s.partial() <= limit + since_drain,
                "partial() {} over the limit {limit} plus the {since_drain} bytes pushed since the last drain",
                s.partial()
            );
        }
        if b & 0x40 != 0 || step >= MAX_PUSHES {
            drain(&mut s, &mut got, &mut failed, &mut line_bytes);
            since_drain = 0;
            if !failed {
                assert!(s.partial() <= limit, "after a drain partial() {} is over the limit {limit}", s.partial());
            }
        }
    }
    drain(&mut s, &mut got, &mut failed, &mut line_bytes);
    let want: Vec<Vec<u8>> = want.into_iter().map(<[u8]>::to_vec).collect();
    assert_eq!(got, want, "the lines are not the stream split at its newlines (limit {limit}, plan {plan:?})");
    assert_eq!(failed, too_long, "LineTooLong reported: {failed}, a line over the limit {limit}: {too_long}");
    if !failed {
        assert_eq!(line_bytes + s.partial(), stream.len(), "bytes unaccounted at the end");
    }

    for (i, line) in got.iter().enumerate() {
        let r = parse(line);
        let model = classify(line);
        assert!(same(&r, &model), "line {i} {:?}: parse_message says {r:?}, the docs say {model:?}", lossy(line));
        if let Some(Some(m)) = meant.get(i) {
            assert!(same(&r, m), "line {i} {:?}: parse_message says {r:?}, the generator meant {m:?}", lossy(line));
        }
        if let Ok(Incoming::Reply(rep)) = &r {
            assert_eq!(rep.numeric_id(), rep.id.as_ref().and_then(Value::as_u64), "numeric_id");
        }
        // The error's text goes into logs: formatting must not panic.
        if let Err(e) = &r {
            let _ = e.to_string();
        }
    }
}

fn lossy(b: &[u8]) -> String {
    String::from_utf8_lossy(&b[..b.len().min(200)]).into_owned()
}

/// Equal results; a `NotJson` matches any `NotJson` (its reason is serde_json's text).
fn same(a: &Result<Incoming, QmpParseError>, b: &Result<Incoming, QmpParseError>) -> bool {
    match (a, b) {
        (Err(QmpParseError::NotJson { .. }), Err(QmpParseError::NotJson { .. })) => true,
        _ => a == b,
    }
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

/// The documented classification of a line (module docs of `host/src/qmp/parse.rs`), from its
/// JSON value.
fn classify(line: &[u8]) -> Result<Incoming, QmpParseError> {
    let text = std::str::from_utf8(line).map_err(|e| QmpParseError::NotUtf8 { valid_up_to: e.valid_up_to() })?;
    // "Nothing but white space": Unicode white space, as `str::trim` has it.
    if text.chars().all(char::is_whitespace) {
        return Err(QmpParseError::Empty);
    }
    let v: Value = serde_json::from_str(text).map_err(|e| QmpParseError::NotJson { reason: e.to_string() })?;
    let Value::Object(obj) = v else { return Err(QmpParseError::NotObject { kind: kind_of(&v) }) };
    object_meaning(&obj)
}

/// What a JSON object from the server is.
fn object_meaning(obj: &Map<String, Value>) -> Result<Incoming, QmpParseError> {
    if let Some(g) = obj.get("QMP") {
        return match g {
            Value::Object(_) => Ok(Incoming::Greeting(g.clone())),
            other => Err(QmpParseError::BadGreeting { kind: kind_of(other) }),
        };
    }
    if let Some(name) = obj.get("event") {
        let Value::String(name) = name else { return Err(QmpParseError::BadEventName { kind: kind_of(name) }) };
        let part = |k: &str| obj.get("timestamp").and_then(|t| t.get(k)).and_then(Value::as_u64).unwrap_or(0);
        let qemu_time_us = part("seconds").saturating_mul(1_000_000).saturating_add(part("microseconds"));
        let data = obj.get("data").cloned().unwrap_or(Value::Null);
        return Ok(Incoming::Event(EventMessage { name: name.clone(), data, qemu_time_us }));
    }
    let id = obj.get("id").cloned();
    if let Some(e) = obj.get("error") {
        let field = |k: &str| e.get(k).and_then(Value::as_str).map(str::to_string);
        let err = match e {
            Value::String(s) => ErrorReply { class: None, desc: Some(s.clone()) },
            _ => ErrorReply { class: field("class"), desc: field("desc") },
        };
        return Ok(Incoming::Reply(ReplyMessage { id, outcome: Err(err) }));
    }
    if let Some(r) = obj.get("return") {
        return Ok(Incoming::Reply(ReplyMessage { id, outcome: Ok(r.clone()) }));
    }
    let keys: Vec<String> = obj.keys().take(8).map(|k| k.chars().take(32).collect()).collect();
    Err(QmpParseError::Unrecognised { keys: keys.join(",") })
}

/// A small JSON value from the input (no floats: they need not round-trip exactly).
fn value(input: &mut Input, depth: u32) -> Value {
    match input.u8() % if depth > 2 { 5 } else { 7 } {
        0 => Value::Null,
        1 => Value::Bool(input.u8() & 1 == 1),
        2 => json!(input.u64() >> (input.u8() % 64)),
        3 => json!(-i64::from(input.u16())),
        4 => text(input),
        5 => Value::Array((0..input.u8() % 4).map(|_| value(input, depth + 1)).collect()),
        _ => {
            let mut m = Map::new();
            for _ in 0..input.u8() % 4 {
                m.insert(key(input), value(input, depth + 1));
            }
            Value::Object(m)
        }
    }
}

/// A string from the input (any bytes, made UTF-8; JSON escapes what needs it).
fn text(input: &mut Input) -> Value {
    let n = usize::from(input.u8() % 48);
    Value::String(String::from_utf8_lossy(input.bytes(n)).into_owned())
}

/// A member name that is none of the QMP message members.
fn key(input: &mut Input) -> String {
    const KEYS: [&str; 6] = ["timestamp", "data", "class", "desc", "capabilities", "x"];
    match input.u8() % 8 {
        k @ 0..=5 => KEYS[usize::from(k)].to_string(),
        _ => match text(input) {
            Value::String(s) if !["QMP", "event", "return", "error", "id"].contains(&s.as_str()) => s,
            _ => "y".into(),
        },
    }
}

/// Builds a stream of lines from a script: per line an op byte (`% 6`: return reply, error
/// reply, event, greeting, an object with none of the members, raw bytes), its fields, extra
/// members, and a `\r\n` or `\n` end. Returns the stream and what each line is meant to be
/// (`None` for raw bytes).
pub fn generate(input: &mut Input) -> (Vec<u8>, Vec<Option<Result<Incoming, QmpParseError>>>) {
    let mut out = Vec::new();
    let mut meant = Vec::new();
    while !input.is_empty() && meant.len() < MAX_LINES {
        let op = input.u8() % 6;
        if op == 5 {
            let n = usize::from(input.u8());
            out.extend(input.bytes(n).iter().filter(|&&b| b != b'\n'));
            out.push(b'\n');
            meant.push(None);
            continue;
        }
        let mut obj = Map::new();
        for _ in 0..input.u8() % 3 {
            obj.insert(key(input), value(input, 1));
        }
        let id = match input.u8() % 3 {
            0 => None,
            1 => Some(json!(input.u32())),
            _ => Some(text(input)),
        };
        let meaning = match op {
            0 | 1 => {
                obj.remove("timestamp");
                if let Some(id) = &id {
                    obj.insert("id".into(), id.clone());
                }
                let outcome = if op == 0 {
                    let v = value(input, 0);
                    obj.insert("return".into(), v.clone());
                    Ok(v)
                } else {
                    let (class, desc) = (input.u8() & 1 == 1, input.u8() & 1 == 1);
                    let c = class.then(|| format!("Class{}", input.u8()));
                    let d = desc.then(|| String::from("desc"));
                    let e = if input.u8().is_multiple_of(4) {
                        json!(d.clone().unwrap_or_default())
                    } else {
                        let mut m = Map::new();
                        if let Some(c) = &c {
                            m.insert("class".into(), json!(c));
                        }
                        if let Some(d) = &d {
                            m.insert("desc".into(), json!(d));
                        }
                        Value::Object(m)
                    };
                    if input.u8() & 1 == 1 {
                        obj.insert("return".into(), json!({})); // error wins
                    }
                    obj.insert("error".into(), e.clone());
                    Err(match e {
                        Value::String(s) => ErrorReply { class: None, desc: Some(s) },
                        _ => ErrorReply { class: c, desc: d },
                    })
                };
                Ok(Incoming::Reply(ReplyMessage { id, outcome }))
            }
            2 => {
                let name = match text(input) {
                    Value::String(s) => s,
                    _ => String::new(),
                };
                let data = value(input, 0);
                let (secs, us) = (input.u64() >> (input.u8() % 64), u64::from(input.u32()));
                obj.insert("data".into(), data.clone());
                obj.insert("timestamp".into(), json!({ "seconds": secs, "microseconds": us }));
                obj.insert("event".into(), json!(name.clone()));
                let qemu_time_us = secs.saturating_mul(1_000_000).saturating_add(us);
                Ok(Incoming::Event(EventMessage { name, data, qemu_time_us }))
            }
            3 => {
                let g = json!({ "version": { "qemu": { "major": input.u8() } }, "capabilities": ["oob"] });
                obj.insert("QMP".into(), g.clone());
                Ok(Incoming::Greeting(g))
            }
            _ => {
                if obj.is_empty() {
                    obj.insert("greetings".into(), json!("earthlings"));
                }
                let keys: Vec<String> = obj.keys().take(8).map(|k| k.chars().take(32).collect()).collect();
                Err(QmpParseError::Unrecognised { keys: keys.join(",") })
            }
        };
        // serde_json escapes control characters in strings: the line has no newline.
        let line = Value::Object(obj).to_string();
        out.extend_from_slice(line.as_bytes());
        out.extend_from_slice(if input.u8() & 1 == 1 { b"\r\n" } else { b"\n" });
        meant.push(Some(meaning));
    }
    (out, meant)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn real_lines_and_misbehaviour() {
        run(b"{\"return\": {}, \"id\": 1}\r\n");
        run(
            b"not json at all\n{\"return\": \"\xff\xfe\", \"id\": 99}\n\r\n[1, 2, 3]\n{\"event\": 42}\n{\"return\": \n",
        );
        let mut long = vec![0xFF, 0x81, 0, 1, 0x43];
        long.extend_from_slice(b"abcd\nabcde\nok\n");
        run(&long);
    }

    #[test]
    fn generated_messages_parse_as_meant() {
        let script: Vec<u8> = (0u8..=5).flat_map(|op| [op, 2, 1, 9, 3, 7, 0, 1, 2, 3, 4, 5, 6, 1]).collect();
        let mut data = vec![0xFF, 0, 1, 2, 0x45, 0x81];
        data.extend_from_slice(&script);
        run(&data);
        let (stream, meant) = generate(&mut Input::new(&script));
        assert!(meant.len() >= 4, "{}", String::from_utf8_lossy(&stream));
    }
}
