//! QMP wire framing: one JSON object per line, in both directions.
//!
//! This module turns bytes into [`Frame`]s and commands into bytes. It knows nothing of sockets,
//! ids in flight or timeouts, so it can be tested (and fuzzed) alone. It must never panic on
//! input: a line that is not a QMP message becomes [`Frame::Invalid`], not an error that would
//! tear the connection down.
//!
//! Rules: QEMU ends lines with `\r\n`; a partial line waits for more bytes; EOF between frames
//! is a clean end; EOF inside a frame is reported (the peer died mid-message).

use bytes::{Buf, BytesMut};
use serde::Deserialize;
use serde_json::Value;
use std::io;
use std::time::Instant;
use tokio_util::codec::Decoder;

/// Upper bound on one line. `query-qmp-schema` is ~200 KiB on QEMU 10; anything near this bound
/// is a broken peer, not a reply.
pub const MAX_LINE: usize = 64 << 20;

/// How deeply one line may nest. `query-block` nests each disk's backing chain one object per
/// image, so a VM with a long snapshot chain sends lines nested hundreds deep (serde_json's
/// default limit, 128, is a chain of about 120). Parsing recurses once per level and so do
/// the typed replies built from it; 512 levels stay well inside a 2 MiB thread stack even in
/// a debug build. A deeper line fails the command it answers (see [`Frame::Invalid`]).
pub const MAX_DEPTH: usize = 512;

/// QEMU's version triple and package string, as in the greeting and `query-version`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct QemuVersion {
    /// Major, minor, micro.
    pub qemu: VersionTriple,
    /// Distribution package string, e.g. `Debian 1:10.0.2+ds-2`.
    #[serde(default)]
    pub package: String,
}

/// `major.minor.micro`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Deserialize)]
pub struct VersionTriple {
    /// Major version.
    pub major: u32,
    /// Minor version.
    pub minor: u32,
    /// Micro version.
    pub micro: u32,
}

impl VersionTriple {
    /// True when this version is at least `major.minor`.
    pub fn at_least(&self, major: u32, minor: u32) -> bool {
        (self.major, self.minor) >= (major, minor)
    }
}

impl std::fmt::Display for VersionTriple {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.micro)
    }
}

/// The greeting QEMU sends when a client connects.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Greeting {
    /// QEMU's version.
    pub version: QemuVersion,
    /// Capabilities the server offers (e.g. `oob`).
    #[serde(default)]
    pub capabilities: Vec<String>,
}

/// One event from QEMU.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    /// Event name, e.g. `STOP`, `RESUME`, `MIGRATION`, `JOB_STATUS_CHANGE`.
    pub name: String,
    /// The event's `data` (`null` when it has none).
    pub data: Value,
    /// When QEMU emitted it (QEMU's clock).
    pub timestamp: Timestamp,
    /// When this client read it (our monotonic clock).
    pub received: Instant,
}

impl Event {
    /// Decodes `data` as a typed event from `qapi_qmp` (e.g. `qapi_qmp::MIGRATION`).
    pub fn decode<E: qapi_spec::Event>(&self) -> Option<E> {
        (self.name == E::NAME)
            .then(|| serde_json::from_value(self.data.clone()).ok())
            .flatten()
    }
}

/// When QEMU emitted an event (host wall clock).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub struct Timestamp {
    /// Seconds since the epoch.
    pub seconds: i64,
    /// Microseconds within the second.
    pub microseconds: i64,
}

impl Timestamp {
    /// As a `SystemTime` (saturating at the epoch for negative values).
    pub fn to_system_time(self) -> std::time::SystemTime {
        let micros = (self.seconds.max(0) as u64)
            .saturating_mul(1_000_000)
            .saturating_add(self.microseconds.max(0) as u64);
        std::time::UNIX_EPOCH + std::time::Duration::from_micros(micros)
    }
}

/// One message from QEMU.
#[derive(Debug, Clone, PartialEq)]
pub enum Frame {
    /// The greeting, first thing on a new connection.
    Greeting(Greeting),
    /// A successful reply.
    Return {
        /// The id we sent (QEMU echoes it verbatim).
        id: Option<Value>,
        /// The `return` member.
        value: Value,
    },
    /// An error reply.
    Error {
        /// The id we sent, absent when QEMU could not parse the command.
        id: Option<Value>,
        /// QEMU's error class.
        class: String,
        /// QEMU's description.
        desc: String,
    },
    /// An asynchronous event.
    Event {
        /// Event name, e.g. `STOP`.
        name: String,
        /// The `data` member (`null` when absent).
        data: Value,
        /// When QEMU emitted it.
        timestamp: Timestamp,
    },
    /// A line that is not a QMP message; kept so it can be logged.
    Invalid {
        /// The line (lossy UTF-8).
        line: String,
        /// Why it was rejected.
        reason: String,
        /// The `id` it carries, if one could be read: a reply QEMU sent that could not be
        /// parsed, which fails that command.
        id: Option<u64>,
    },
}

impl std::fmt::Display for Frame {
    /// Renders the frame as QMP JSON again (for transcripts and logs).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let id = |id: &Option<Value>| id.clone().unwrap_or(Value::Null);
        let v = match self {
            Frame::Greeting(g) => serde_json::json!({"QMP": {"version": {"qemu": {
                "major": g.version.qemu.major, "minor": g.version.qemu.minor,
                "micro": g.version.qemu.micro}, "package": g.version.package},
                "capabilities": g.capabilities}}),
            Frame::Return { id: i, value } => serde_json::json!({"return": value, "id": id(i)}),
            Frame::Error { id: i, class, desc } => {
                serde_json::json!({"error": {"class": class, "desc": desc}, "id": id(i)})
            }
            Frame::Event {
                name,
                data,
                timestamp,
            } => serde_json::json!({"event": name,
                "data": data, "timestamp": {"seconds": timestamp.seconds,
                "microseconds": timestamp.microseconds}}),
            Frame::Invalid { line, reason, .. } => return write!(f, "{line} (invalid: {reason})"),
        };
        write!(f, "{v}")
    }
}

impl Frame {
    /// Classifies one line (without its line ending).
    pub fn parse(line: &[u8]) -> Frame {
        let shape = shape(line);
        let invalid = |reason: String| Frame::Invalid {
            line: String::from_utf8_lossy(line).into_owned(),
            reason,
            id: shape.id,
        };
        let depth = shape.deepest;
        if depth > MAX_DEPTH {
            return invalid(format!(
                "nested {depth} levels deep, more than the {MAX_DEPTH} qsnap reads (a backing \
                 chain of about {} images? stop the VM, then delete snapshots to shorten it)",
                depth.saturating_sub(6)
            ));
        }
        let mut de = serde_json::Deserializer::from_slice(line);
        de.disable_recursion_limit();
        let mut obj = match Value::deserialize(&mut de).and_then(|v| de.end().map(|()| v)) {
            Ok(Value::Object(obj)) => obj,
            Ok(_) => return invalid("not a JSON object".into()),
            Err(e) => return invalid(format!("not JSON: {e}")),
        };
        if let Some(greeting) = obj.remove("QMP") {
            return match serde_json::from_value(greeting) {
                Ok(g) => Frame::Greeting(g),
                Err(e) => invalid(format!("bad greeting: {e}")),
            };
        }
        let id = obj.remove("id");
        if let Some(value) = obj.remove("return") {
            return Frame::Return { id, value };
        }
        if let Some(err) = obj.remove("error") {
            let field = |k: &str| err.get(k).and_then(Value::as_str).unwrap_or("").to_owned();
            return Frame::Error {
                id,
                class: field("class"),
                desc: field("desc"),
            };
        }
        if let Some(Value::String(name)) = obj.remove("event") {
            let data = obj.remove("data").unwrap_or(Value::Null);
            let timestamp = obj
                .remove("timestamp")
                .and_then(|t| serde_json::from_value(t).ok())
                .unwrap_or(Timestamp {
                    seconds: 0,
                    microseconds: 0,
                });
            return Frame::Event {
                name,
                data,
                timestamp,
            };
        }
        invalid("neither greeting, return, error nor event".into())
    }
}

/// What a line looks like before it is parsed: how deeply it nests objects and arrays
/// (brackets inside strings do not count), and the `id` member of its outermost object.
#[derive(Debug, PartialEq, Eq)]
struct Shape {
    deepest: usize,
    id: Option<u64>,
}

/// Reads a line's [`Shape`] in one pass, without parsing it: the guard that keeps a
/// pathological line from exhausting the stack, and the id that lets a reply that cannot be
/// parsed fail the command it answers at once instead of leaving it to time out (QMP ids are
/// numbers this client chose).
fn shape(line: &[u8]) -> Shape {
    let mut shape = Shape {
        deepest: 0,
        id: None,
    };
    let (mut depth, mut in_string, mut escaped) = (0usize, false, false);
    for (i, &b) in line.iter().enumerate() {
        if in_string {
            match (escaped, b) {
                (true, _) => escaped = false,
                (false, b'\\') => escaped = true,
                (false, b'"') => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => {
                if depth == 1 && shape.id.is_none() {
                    shape.id = id_member(&line[i..]);
                }
                in_string = true;
            }
            b'{' | b'[' => {
                depth += 1;
                shape.deepest = shape.deepest.max(depth);
            }
            b'}' | b']' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    shape
}

/// The number in `"id": 123` at the start of `at`, if that is what it holds: a whole
/// number, nothing else (`5.7` or `5e1` is not the id 5 qsnap sent).
fn id_member(at: &[u8]) -> Option<u64> {
    let value = at
        .strip_prefix(b"\"id\"")?
        .trim_ascii_start()
        .strip_prefix(b":")?
        .trim_ascii_start();
    let digits = value.iter().take_while(|c| c.is_ascii_digit()).count();
    let after = value[digits..].trim_ascii_start();
    if digits == 0 || !matches!(after.first(), Some(b',' | b'}')) {
        return None;
    }
    std::str::from_utf8(&value[..digits]).ok()?.parse().ok()
}

/// Serialises a command as one line: `{"execute":NAME,"arguments":ARGS,"id":ID}\n`.
/// `oob` selects `exec-oob`, which QEMU runs out of band (only for commands that allow it).
pub fn encode_command(name: &str, arguments: Option<&Value>, id: u64, oob: bool) -> Vec<u8> {
    let mut msg = serde_json::Map::new();
    let key = if oob { "exec-oob" } else { "execute" };
    msg.insert(key.into(), Value::String(name.into()));
    if let Some(args) = arguments {
        msg.insert("arguments".into(), args.clone());
    }
    msg.insert("id".into(), Value::from(id));
    let mut line = serde_json::to_vec(&Value::Object(msg)).expect("a JSON map always serialises");
    line.push(b'\n');
    line
}

/// Splits the byte stream from QEMU into frames.
#[derive(Debug, Default)]
pub struct QmpCodec {
    /// How far the current buffer was already searched for a newline.
    scanned: usize,
}

impl Decoder for QmpCodec {
    type Item = Frame;
    type Error = io::Error;

    fn decode(&mut self, buf: &mut BytesMut) -> io::Result<Option<Frame>> {
        loop {
            match buf[self.scanned..].iter().position(|&b| b == b'\n') {
                Some(pos) => {
                    let end = self.scanned + pos;
                    self.scanned = 0;
                    let line = buf.split_to(end + 1);
                    let trimmed = trim_line(&line);
                    if trimmed.is_empty() {
                        continue; // blank keep-alive lines carry nothing
                    }
                    return Ok(Some(Frame::parse(trimmed)));
                }
                None => {
                    if buf.len() > MAX_LINE {
                        return Err(io::Error::new(
                            io::ErrorKind::InvalidData,
                            format!("QMP line longer than {MAX_LINE} bytes"),
                        ));
                    }
                    self.scanned = buf.len();
                    return Ok(None);
                }
            }
        }
    }

    fn decode_eof(&mut self, buf: &mut BytesMut) -> io::Result<Option<Frame>> {
        if let Some(frame) = self.decode(buf)? {
            return Ok(Some(frame));
        }
        if trim_line(buf).is_empty() {
            buf.advance(buf.len());
            // The buffer is empty now: a stale scan position would slice past its end.
            self.scanned = 0;
            return Ok(None);
        }
        let partial = String::from_utf8_lossy(&buf[..buf.len().min(200)]).into_owned();
        buf.advance(buf.len());
        self.scanned = 0;
        Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!("connection closed in the middle of a message: {partial:?}"),
        ))
    }
}

fn trim_line(line: &[u8]) -> &[u8] {
    let mut end = line.len();
    while end > 0 && matches!(line[end - 1], b'\n' | b'\r' | b' ' | b'\t') {
        end -= 1;
    }
    &line[..end]
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn decode_all(codec: &mut QmpCodec, buf: &mut BytesMut) -> Vec<Frame> {
        let mut out = Vec::new();
        while let Some(f) = codec.decode(buf).unwrap() {
            out.push(f);
        }
        out
    }

    #[test]
    fn greeting_is_parsed() {
        let line = br#"{"QMP": {"version": {"qemu": {"micro": 2, "minor": 0, "major": 10}, "package": "Debian"}, "capabilities": ["oob"]}}"#;
        let Frame::Greeting(g) = Frame::parse(line) else {
            panic!("not a greeting")
        };
        assert_eq!(g.version.qemu.major, 10);
        assert!(g.version.qemu.at_least(9, 0));
        assert!(!g.version.qemu.at_least(10, 1));
        assert_eq!(g.capabilities, vec!["oob"]);
    }

    /// `query-block`'s answer for a disk whose backing chain is `layers` images long, with
    /// brackets and an escaped quote inside strings that must not count.
    fn chain_reply(layers: usize, id: u64) -> Vec<u8> {
        let mut image = json!({"filename": "base {[\"]} .raw", "format": "raw"});
        for i in 0..layers {
            image = json!({"filename": format!("/v/s{i}.qcow2"), "format": "qcow2", "backing-image": image});
        }
        let line = json!({"return": [{"device": "drive0", "inserted": {"image": image, "id": 1}}], "id": id});
        let mut de = serde_json::Serializer::new(Vec::new());
        // serialising recurses as parsing does; a thread with room for it
        std::thread::Builder::new()
            .stack_size(64 << 20)
            .spawn(move || {
                serde::Serialize::serialize(&line, &mut de).unwrap();
                let out = de.into_inner();
                drop(line);
                out
            })
            .unwrap()
            .join()
            .unwrap()
    }

    #[test]
    fn a_long_backing_chain_is_read_and_a_pathological_one_fails_its_command() {
        // 300 images: beyond serde_json's default limit of 128, within MAX_DEPTH
        let line = chain_reply(300, 41);
        assert_eq!(shape(&line).deepest, 300 + 5);
        let Frame::Return { id, value } = Frame::parse(&line) else {
            panic!("a chain of 300 is not read")
        };
        assert_eq!(id, Some(json!(41)));
        let mut at = &value[0]["inserted"]["image"];
        let mut layers = 0;
        while let Some(below) = at.get("backing-image") {
            layers += 1;
            at = below;
        }
        assert_eq!(
            (layers, at["filename"].as_str()),
            (300, Some("base {[\"]} .raw"))
        );

        // deeper than MAX_DEPTH: not parsed, but the id it answers is known
        let line = chain_reply(MAX_DEPTH, 42);
        match Frame::parse(&line) {
            Frame::Invalid { reason, id, .. } => {
                assert_eq!(id, Some(42));
                assert!(reason.contains("levels deep"), "{reason}");
            }
            other => panic!("{:.200}", other.to_string()),
        }
    }

    #[test]
    fn the_id_is_the_outermost_objects() {
        let id = |l: &str| shape(l.as_bytes()).id;
        assert_eq!(id(r#"{"return": {"id": 3}, "id": 9}"#), Some(9));
        assert_eq!(id(r#"{"return": "\"id\": 4", "id" : 5}"#), Some(5));
        assert_eq!(id(r#"{"return": ["id", {"id": 6}]}"#), None);
        assert_eq!(id(r#"{"event": "X", "data": {"id": 7}}"#), None);
        assert_eq!(id(r#"{"return": {}, "id": "a"}"#), None);
        assert_eq!(id(r#"{"return": {}, "id": 5.7}"#), None);
        assert_eq!(id(r#"{"return": {}, "id": 5e1}"#), None);
        assert_eq!(id(r#"{"id": 8 , "return": {}}"#), Some(8));
        assert_eq!(id(r#"{"return": {}, "id": 12 }"#), Some(12));
        assert_eq!(shape(br#"{"a": "{{{[[[", "b": [[]]}"#).deepest, 3);
    }

    #[test]
    fn line_split_across_reads_waits_for_the_rest() {
        let mut codec = QmpCodec::default();
        let mut buf = BytesMut::from(&b"{\"return\": {}, \"id\""[..]);
        assert!(codec.decode(&mut buf).unwrap().is_none());
        buf.extend_from_slice(b": 7}\r\n{\"event\": \"STOP\", \"timestamp\": {\"seconds\": 1, \"microseconds\": 2}}\r\n");
        let frames = decode_all(&mut codec, &mut buf);
        assert_eq!(
            frames[0],
            Frame::Return {
                id: Some(json!(7)),
                value: json!({})
            }
        );
        assert!(
            matches!(&frames[1], Frame::Event { name, timestamp, .. } if name == "STOP" && timestamp.microseconds == 2)
        );
        assert!(buf.is_empty());
    }

    #[test]
    fn byte_by_byte_delivery_gives_the_same_frames() {
        let input = b"{\"return\": [1,2,3], \"id\": 1}\r\n\r\n{\"error\": {\"class\": \"GenericError\", \"desc\": \"no\"}, \"id\": 2}\r\n";
        let mut codec = QmpCodec::default();
        let mut buf = BytesMut::new();
        let mut frames = Vec::new();
        for b in input {
            buf.extend_from_slice(&[*b]);
            frames.extend(decode_all(&mut codec, &mut buf));
        }
        assert_eq!(frames.len(), 2);
        assert!(
            matches!(&frames[1], Frame::Error { class, desc, id: Some(i) } if class == "GenericError" && desc == "no" && *i == json!(2))
        );
    }

    #[test]
    fn garbage_lines_become_invalid_frames_not_errors() {
        let mut codec = QmpCodec::default();
        let mut buf = BytesMut::from(&b"hello\n[1]\n{\"x\":1}\n{\"return\":1,\"id\":3}\n"[..]);
        let frames = decode_all(&mut codec, &mut buf);
        assert_eq!(frames.len(), 4);
        assert!(frames[..3]
            .iter()
            .all(|f| matches!(f, Frame::Invalid { .. })));
        assert!(matches!(frames[3], Frame::Return { .. }));
    }

    #[test]
    fn huge_reply_is_decoded() {
        let big: Vec<Value> = (0..200_000).map(|i| json!({"name": i})).collect();
        let mut line = serde_json::to_vec(&json!({"return": big, "id": 9})).unwrap();
        line.extend_from_slice(b"\r\n");
        let mut codec = QmpCodec::default();
        let mut buf = BytesMut::new();
        let mut got = None;
        for chunk in line.chunks(4096) {
            buf.extend_from_slice(chunk);
            if let Some(f) = codec.decode(&mut buf).unwrap() {
                got = Some(f);
            }
        }
        let Some(Frame::Return { value, .. }) = got else {
            panic!("no reply")
        };
        assert_eq!(value.as_array().unwrap().len(), 200_000);
    }

    #[test]
    fn eof_mid_frame_is_an_error_and_eof_between_frames_is_not() {
        let mut codec = QmpCodec::default();
        let mut buf = BytesMut::from(&b"{\"return\":{},\"id\":1}\r\n"[..]);
        assert!(codec.decode_eof(&mut buf).unwrap().is_some());
        assert!(codec.decode_eof(&mut buf).unwrap().is_none());
        let mut buf = BytesMut::from(&b"{\"return\":"[..]);
        assert!(codec.decode(&mut buf).unwrap().is_none());
        let err = codec.decode_eof(&mut buf).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
    }

    #[test]
    fn encode_uses_exec_oob_when_asked() {
        let line = encode_command("migrate-pause", None, 5, true);
        let v: Value = serde_json::from_slice(&line).unwrap();
        assert_eq!(v, json!({"exec-oob": "migrate-pause", "id": 5}));
        assert_eq!(*line.last().unwrap(), b'\n');
        let line = encode_command("stop", Some(&json!({})), 6, false);
        let v: Value = serde_json::from_slice(&line).unwrap();
        assert_eq!(v, json!({"execute": "stop", "arguments": {}, "id": 6}));
    }
}
