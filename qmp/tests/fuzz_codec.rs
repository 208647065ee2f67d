//! Property tests (proptest) for the QMP line codec, `qsnap_qmp::codec`: whatever bytes a peer
//! sends, in whatever pieces they arrive, `QmpCodec` never panics and never spins.
//!
//! * Arbitrary bytes, split at arbitrary points, then EOF: no panic, every call that returns a
//!   frame consumes input (so decoding always ends), every complete non-blank line becomes
//!   exactly one frame, and EOF is an error exactly when a partial line is left.
//! * Arbitrary JSON-ish lines mixed with valid QMP frames (greeting, return, error, event):
//!   no panic, and every valid line decodes to exactly the frame it encodes.
//! * A valid frame delivered one byte at a time decodes to the same frame as delivered whole;
//!   the same frame cut off by EOF is reported as an unexpected EOF.
//! * EOF is sticky: once `decode_eof` has drained the buffer, calling it again (or decoding
//!   more input) does not panic. (This property found a real bug: a whitespace-only tail at
//!   EOF left the codec's scan offset stale, and the next call sliced out of range.)

use bytes::BytesMut;
use proptest::collection::vec;
use proptest::prelude::*;
use proptest::sample::Index;
use qsnap_qmp::codec::{Frame, QmpCodec};
use qsnap_qmp::{Greeting, QemuVersion, Timestamp, VersionTriple};
use serde_json::{json, Value};
use std::io;
use tokio_util::codec::Decoder;

/// Modest case counts so the file runs in seconds; no regression files are written into the
/// source tree.
fn config(cases: u32) -> ProptestConfig {
    ProptestConfig {
        cases,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// What the codec made of a byte stream.
struct Decoded {
    frames: Vec<Frame>,
    eof: io::Result<()>,
}

/// Decodes every complete frame in `buf`. A call that returns a frame without consuming input
/// would make a caller loop forever, so it fails the property; so does an error (inputs here are
/// far below `MAX_LINE`, and a bad line must become `Frame::Invalid`, not an error).
fn drain(
    codec: &mut QmpCodec,
    buf: &mut BytesMut,
    out: &mut Vec<Frame>,
) -> Result<(), TestCaseError> {
    loop {
        let before = buf.len();
        match codec.decode(buf) {
            Ok(Some(frame)) => {
                prop_assert!(
                    buf.len() < before,
                    "decode returned {frame:?} without consuming input"
                );
                out.push(frame);
            }
            Ok(None) => return Ok(()),
            Err(e) => return Err(TestCaseError::fail(format!("decode failed: {e}"))),
        }
    }
}

/// Runs `decode_eof` until it reports the end (`Ok(None)`) or an error, as `FramedRead` does.
fn finish(
    codec: &mut QmpCodec,
    buf: &mut BytesMut,
    out: &mut Vec<Frame>,
) -> Result<io::Result<()>, TestCaseError> {
    loop {
        let before = buf.len();
        match codec.decode_eof(buf) {
            Ok(Some(frame)) => {
                prop_assert!(
                    buf.len() < before,
                    "decode_eof returned {frame:?} without consuming input"
                );
                out.push(frame);
            }
            Ok(None) => return Ok(Ok(())),
            Err(e) => return Ok(Err(e)),
        }
    }
}

/// Feeds `data` to a fresh codec in pieces cut at `cuts` (indices into `data`, any order,
/// duplicates allowed), decoding after each piece, then signals EOF.
fn feed(data: &[u8], cuts: &[Index]) -> Result<Decoded, TestCaseError> {
    let mut at: Vec<usize> = cuts.iter().map(|i| i.index(data.len() + 1)).collect();
    at.push(0);
    at.push(data.len());
    at.sort_unstable();
    at.dedup();
    let mut codec = QmpCodec::default();
    let mut buf = BytesMut::new();
    let mut frames = Vec::new();
    for w in at.windows(2) {
        buf.extend_from_slice(&data[w[0]..w[1]]);
        drain(&mut codec, &mut buf, &mut frames)?;
    }
    let eof = finish(&mut codec, &mut buf, &mut frames)?;
    prop_assert!(buf.is_empty(), "EOF left {} bytes in the buffer", buf.len());
    Ok(Decoded { frames, eof })
}

/// The codec's own notion of a line's content: trailing `\r`, `\n`, spaces and tabs dropped.
fn trim(line: &[u8]) -> &[u8] {
    let end = line
        .iter()
        .rposition(|b| !matches!(b, b'\n' | b'\r' | b' ' | b'\t'))
        .map_or(0, |p| p + 1);
    &line[..end]
}

/// What one non-blank line must decode to.
#[derive(Debug, Clone)]
enum Expect {
    /// Whatever the classifier says about exactly these bytes (framing is what is checked).
    Line(Vec<u8>),
    /// Exactly this frame.
    Exact(Frame),
}

/// The frames a stream of lines must give: one per complete non-blank line.
fn expected_lines(data: &[u8]) -> (Vec<Expect>, bool) {
    let mut pieces: Vec<&[u8]> = data.split(|&b| b == b'\n').collect();
    let tail = pieces.pop().unwrap_or_default();
    let lines = pieces
        .into_iter()
        .map(trim)
        .filter(|l| !l.is_empty())
        .map(|l| Expect::Line(l.to_vec()))
        .collect();
    (lines, !trim(tail).is_empty())
}

fn check(frames: &[Frame], expected: &[Expect]) -> Result<(), TestCaseError> {
    prop_assert_eq!(
        frames.len(),
        expected.len(),
        "frames {:?}, expected {:?}",
        frames,
        expected
    );
    for (got, want) in frames.iter().zip(expected) {
        match want {
            Expect::Line(line) => prop_assert_eq!(got, &Frame::parse(line)),
            Expect::Exact(frame) => prop_assert_eq!(got, frame),
        }
    }
    Ok(())
}

// ---- strategies ---------------------------------------------------------------------------

fn json_str(s: &str) -> String {
    serde_json::to_string(s).expect("a string serialises")
}

fn line_end() -> impl Strategy<Value = &'static str> {
    prop_oneof![Just("\n"), Just("\r\n"), Just(" \r\n"), Just("\t\n")]
}

/// A byte, three times in four one the codec treats specially (line breaks, trailing
/// whitespace) or that starts JSON, so blank-line and trimming paths are reached far more often
/// than with uniform bytes.
fn special_byte() -> impl Strategy<Value = u8> {
    const SPECIAL: &[u8] = b"\n\r \t{}";
    any::<u16>().prop_map(|n| {
        let [hi, lo] = n.to_be_bytes();
        if hi < 192 {
            SPECIAL[usize::from(lo) % SPECIAL.len()]
        } else {
            lo
        }
    })
}

/// An `id` as a client might send it: a number or a string.
fn id() -> impl Strategy<Value = Value> {
    prop_oneof![
        any::<u64>().prop_map(Value::from),
        "[a-z0-9-]{0,12}".prop_map(Value::from),
    ]
}

/// A small JSON value (for `return` and `data` members).
fn small_value() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(json!({})),
        Just(json!([])),
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        "\\PC{0,16}".prop_map(Value::from),
        ("[a-z-]{1,10}", "\\PC{0,10}").prop_map(|(k, v)| json!({ k: v })),
        vec(any::<u32>(), 0..5).prop_map(|v| json!(v)),
    ]
}

/// A valid QMP frame from QEMU: its wire text (with a line ending) and the frame it must
/// decode to.
fn valid_frame() -> impl Strategy<Value = (String, Frame)> {
    let fixed = prop_oneof![
        Just((
            "{\"return\": {}, \"id\": 1}\r\n".to_owned(),
            Frame::Return {
                id: Some(json!(1)),
                value: json!({}),
            },
        )),
        Just((
            "{\"event\": \"STOP\", \"data\": {}, \"timestamp\": {\"seconds\": 1, \"microseconds\": 2}}\n"
                .to_owned(),
            Frame::Event {
                name: "STOP".into(),
                data: json!({}),
                timestamp: Timestamp {
                    seconds: 1,
                    microseconds: 2,
                },
            },
        )),
        Just((
            "{\"error\": {\"class\": \"GenericError\", \"desc\": \"x\"}, \"id\": 3}\n".to_owned(),
            Frame::Error {
                id: Some(json!(3)),
                class: "GenericError".into(),
                desc: "x".into(),
            },
        )),
    ];
    let ret =
        (id(), small_value(), any::<bool>(), line_end()).prop_map(|(id, value, id_first, end)| {
            let text = if id_first {
                format!("{{\"id\": {id}, \"return\": {value}}}{end}")
            } else {
                format!("{{\"return\": {value}, \"id\": {id}}}{end}")
            };
            (
                text,
                Frame::Return {
                    id: Some(id),
                    value,
                },
            )
        });
    let err = (
        proptest::option::of(id()),
        "[A-Za-z]{1,16}",
        "\\PC{0,24}",
        line_end(),
    )
        .prop_map(|(id, class, desc, end)| {
            let id_part = id
                .as_ref()
                .map_or(String::new(), |i| format!(", \"id\": {i}"));
            let text = format!(
                "{{\"error\": {{\"class\": {}, \"desc\": {}}}{id_part}}}{end}",
                json_str(&class),
                json_str(&desc)
            );
            (text, Frame::Error { id, class, desc })
        });
    let event = (
        "[A-Z_]{1,20}",
        proptest::option::of(small_value()),
        any::<i64>(),
        0..1_000_000i64,
        line_end(),
    )
        .prop_map(|(name, data, seconds, microseconds, end)| {
            let data_part = data.as_ref().map_or(String::new(), |d| format!("\"data\": {d}, "));
            let text = format!(
                "{{\"event\": {}, {data_part}\"timestamp\": {{\"seconds\": {seconds}, \"microseconds\": {microseconds}}}}}{end}",
                json_str(&name)
            );
            let frame = Frame::Event {
                name,
                data: data.unwrap_or(Value::Null),
                timestamp: Timestamp {
                    seconds,
                    microseconds,
                },
            };
            (text, frame)
        });
    let greeting = (
        any::<u32>(),
        any::<u32>(),
        any::<u32>(),
        "\\PC{0,20}",
        vec("[a-z-]{1,8}", 0..3),
        line_end(),
    )
        .prop_map(|(major, minor, micro, package, capabilities, end)| {
            let text = format!(
                "{{\"QMP\": {{\"version\": {{\"qemu\": {{\"micro\": {micro}, \"minor\": {minor}, \"major\": {major}}}, \"package\": {}}}, \"capabilities\": {}}}}}{end}",
                json_str(&package),
                json!(capabilities)
            );
            let frame = Frame::Greeting(Greeting {
                version: QemuVersion {
                    qemu: VersionTriple {
                        major,
                        minor,
                        micro,
                    },
                    package,
                },
                capabilities,
            });
            (text, frame)
        });
    prop_oneof![fixed, ret, err, event, greeting]
}

/// One item of a JSON-ish stream: junk from a small alphabet (which may itself hold line
/// breaks) ended by a newline, or a valid frame.
fn item() -> impl Strategy<Value = (String, Vec<Expect>)> {
    let junk = r#"[{}\[\]":,0-9a-z \n\r\\]{0,60}"#.prop_map(|j| {
        let text = format!("{j}\n");
        let (lines, _) = expected_lines(text.as_bytes());
        (text, lines)
    });
    let valid = valid_frame().prop_map(|(text, frame)| (text, vec![Expect::Exact(frame)]));
    prop_oneof![junk, valid]
}

// ---- properties ---------------------------------------------------------------------------

proptest! {
    #![proptest_config(config(500))]

    /// Arbitrary bytes in arbitrary pieces: no panic, no spin, one frame per complete
    /// non-blank line, and EOF is an error exactly when a partial line is left over.
    #[test]
    fn arbitrary_bytes_never_panic(
        data in vec(any::<u8>(), 0..4096),
        cuts in vec(any::<Index>(), 0..16),
    ) {
        let decoded = feed(&data, &cuts)?;
        let (expected, partial_tail) = expected_lines(&data);
        check(&decoded.frames, &expected)?;
        match decoded.eof {
            Ok(()) => prop_assert!(!partial_tail, "EOF inside a line was not reported"),
            Err(e) => {
                prop_assert!(partial_tail, "EOF between frames was an error: {e}");
                prop_assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
            }
        }
    }

    /// Arbitrary bytes that are mostly line breaks and whitespace (the codec's special
    /// bytes), to reach blank-line and trimming paths far more often than uniform bytes do.
    #[test]
    fn whitespace_heavy_bytes_never_panic(
        data in vec(special_byte(), 0..256),
        cuts in vec(any::<Index>(), 0..16),
    ) {
        let decoded = feed(&data, &cuts)?;
        let (expected, partial_tail) = expected_lines(&data);
        check(&decoded.frames, &expected)?;
        prop_assert_eq!(decoded.eof.is_err(), partial_tail);
    }

    /// JSON-ish junk lines mixed with valid QMP frames: no panic, and every valid line
    /// decodes to exactly its frame, whatever came before it.
    #[test]
    fn json_ish_lines_give_the_expected_frames(
        items in vec(item(), 0..24),
        cuts in vec(any::<Index>(), 0..24),
    ) {
        let data: String = items.iter().map(|(text, _)| text.as_str()).collect();
        let expected: Vec<Expect> = items.into_iter().flat_map(|(_, e)| e).collect();
        let decoded = feed(data.as_bytes(), &cuts)?;
        check(&decoded.frames, &expected)?;
        prop_assert!(decoded.eof.is_ok(), "clean EOF reported as {:?}", decoded.eof);
    }

    /// A valid frame decodes the same whole and byte by byte; cut off by EOF it is an
    /// unexpected EOF, not a frame.
    #[test]
    fn byte_by_byte_equals_whole((text, frame) in valid_frame(), cut in any::<Index>()) {
        let bytes = text.as_bytes();

        let whole = feed(bytes, &[])?;
        prop_assert!(whole.eof.is_ok());
        prop_assert_eq!(&whole.frames, &vec![frame.clone()]);

        let mut codec = QmpCodec::default();
        let mut buf = BytesMut::new();
        let mut frames = Vec::new();
        for b in bytes {
            buf.extend_from_slice(&[*b]);
            drain(&mut codec, &mut buf, &mut frames)?;
        }
        prop_assert!(finish(&mut codec, &mut buf, &mut frames)?.is_ok());
        prop_assert_eq!(&frames, &whole.frames);

        // Cut before the newline: the peer died mid-message.
        let newline = bytes.iter().position(|&b| b == b'\n').unwrap_or(bytes.len());
        let content_end = trim(&bytes[..newline]).len();
        let at = 1 + cut.index(content_end);
        let truncated = feed(&bytes[..at], &[cut])?;
        prop_assert!(truncated.frames.is_empty(), "got {:?}", truncated.frames);
        match truncated.eof {
            Err(e) => prop_assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof),
            Ok(()) => prop_assert!(false, "truncated frame at EOF was not reported"),
        }
    }
}

proptest! {
    #![proptest_config(config(500))]

    /// EOF is sticky and the codec stays usable: after `decode_eof` has reported the end
    /// (cleanly or not), calling it again returns `Ok(None)` without panicking, and a frame fed
    /// afterwards (a stream that resumes after EOF, as `FramedRead` allows) decodes normally.
    #[test]
    fn decode_eof_twice_and_resume_never_panic(
        data in vec(special_byte(), 0..64),
        cuts in vec(any::<Index>(), 0..8),
        (text, frame) in valid_frame(),
    ) {
        let mut at: Vec<usize> = cuts.iter().map(|i| i.index(data.len() + 1)).collect();
        at.extend([0, data.len()]);
        at.sort_unstable();
        at.dedup();
        let mut codec = QmpCodec::default();
        let mut buf = BytesMut::new();
        let mut frames = Vec::new();
        for w in at.windows(2) {
            buf.extend_from_slice(&data[w[0]..w[1]]);
            drain(&mut codec, &mut buf, &mut frames)?;
        }
        let _ = finish(&mut codec, &mut buf, &mut frames)?;
        prop_assert!(buf.is_empty());

        let again = codec.decode_eof(&mut buf);
        prop_assert!(matches!(again, Ok(None)), "second decode_eof gave {:?}", again);

        buf.extend_from_slice(text.as_bytes());
        let mut after = Vec::new();
        drain(&mut codec, &mut buf, &mut after)?;
        prop_assert_eq!(after, vec![frame]);
    }
}
