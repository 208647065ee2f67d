//! The tar and zstd primitives under the bundle container: ustar headers, pax records, and
//! a zstd decoder that knows where frames end. Only the format, no policy: what a bundle may
//! hold is decided in `container`. Nothing here allocates from a size read from the input.

use std::cmp::min;
use std::io::{self, BufRead, Read};

use zstd::stream::raw::{Decoder, InBuffer, Operation, OutBuffer};

pub(super) const RECORD: usize = 512;
/// The most an 11-digit octal ustar size field holds (8 GiB - 1).
pub(super) const OCTAL_MAX: u64 = (1 << 33) - 1;
pub(super) const MAX_PAX: u64 = 1 << 20;
pub(super) const MAX_REGIONS: u64 = 1 << 20;
pub(super) const MAX_MAP: u64 = 32 << 20;

pub(super) fn invalid(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

pub(super) fn early(what: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::UnexpectedEof,
        format!("the bundle ends early: {what}"),
    )
}

pub(super) fn padding(len: u64) -> usize {
    usize::try_from((RECORD as u64 - len % RECORD as u64) % RECORD as u64).unwrap_or(0)
}

pub(super) fn check_name(name: &str, kind: io::ErrorKind) -> io::Result<()> {
    let bad = name.is_empty()
        || name.starts_with('/')
        || name.contains('\0')
        || name
            .split('/')
            .any(|c| c.is_empty() || c == "." || c == "..");
    if bad {
        return Err(io::Error::new(
            kind,
            format!("bundle entry name `{name}` is not a plain relative path"),
        ));
    }
    Ok(())
}

/// The longest prefix of `s` that fits `max` bytes, cut at a character boundary.
pub(super) fn fit(s: &str, max: usize) -> &str {
    let mut end = min(s.len(), max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

pub(super) fn octal(field: &mut [u8], value: u64) {
    let w = field.len() - 1;
    field[..w].copy_from_slice(format!("{value:0w$o}").as_bytes());
}

pub(super) fn header(name: &str, mode: u64, size: u64, kind: u8) -> [u8; RECORD] {
    let mut h = [0u8; RECORD];
    let name = fit(name, 100);
    h[..name.len()].copy_from_slice(name.as_bytes());
    octal(&mut h[100..108], mode);
    octal(&mut h[108..116], 0);
    octal(&mut h[116..124], 0);
    octal(&mut h[124..136], if size > OCTAL_MAX { 0 } else { size });
    octal(&mut h[136..148], 0);
    h[156] = kind;
    h[257..263].copy_from_slice(b"ustar\0");
    h[263..265].copy_from_slice(b"00");
    h[148..156].fill(b' ');
    let sum: u64 = h.iter().map(|&b| u64::from(b)).sum();
    h[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
    h
}

/// One pax record: `<len> key=value\n`, where `len` counts its own digits.
pub(super) fn pax_record(out: &mut Vec<u8>, key: &str, value: &str) {
    let body = key.len() + value.len() + 3;
    let mut len = body + 1;
    while len != body + len.to_string().len() {
        len = body + len.to_string().len();
    }
    out.extend_from_slice(format!("{len} {key}={value}\n").as_bytes());
}

/// The zstd decoder, by hand rather than `zstd::Decoder`: the reader must know where frames
/// end, to tell a stream cut short (an error) from garbage after the last frame (ignored).
pub(super) struct Unzstd<R> {
    pub(super) input: R,
    pub(super) zstd: Decoder<'static>,
    /// Inside a frame: input ending now is a truncation.
    pub(super) in_frame: bool,
    /// Draining: report the end at the next frame boundary.
    pub(super) stop_at_boundary: bool,
}

impl<R: BufRead> Read for Unzstd<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            if buf.is_empty() || (self.stop_at_boundary && !self.in_frame) {
                return Ok(0);
            }
            let data = self.input.fill_buf()?;
            let eof = data.is_empty();
            let mut src = InBuffer::around(data);
            let mut dst = OutBuffer::around(&mut *buf);
            let hint = self
                .zstd
                .run(&mut src, &mut dst)
                .map_err(|e| invalid(format!("the bundle's zstd stream is corrupt: {e}")))?;
            let (used, made) = (src.pos(), dst.pos());
            self.input.consume(used);
            // With no input nor output, the hint speaks of a frame not yet begun.
            if used > 0 || made > 0 {
                self.in_frame = hint != 0;
            }
            if made > 0 {
                return Ok(made);
            }
            if eof {
                return if self.in_frame {
                    Err(early("the zstd stream stops mid-frame"))
                } else {
                    Ok(0)
                };
            }
        }
    }
}

pub(super) fn fill(src: &mut dyn Read, buf: &mut [u8], what: &str) -> io::Result<()> {
    src.read_exact(buf).map_err(|e| {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            early(what)
        } else {
            e
        }
    })
}

pub(super) fn skip(src: &mut dyn Read, len: u64, what: &str) -> io::Result<()> {
    if io::copy(&mut src.take(len), &mut io::sink())? != len {
        return Err(early(what));
    }
    Ok(())
}

pub(super) fn parse_number(field: &[u8]) -> Option<u64> {
    if field[0] & 0x80 != 0 {
        // GNU base-256: big-endian, top bit of the first byte is the marker.
        let mut v: u64 = u64::from(field[0] & 0x7f);
        for &b in &field[1..] {
            v = v.checked_mul(256)? | u64::from(b);
        }
        return Some(v);
    }
    let text = std::str::from_utf8(field).ok()?;
    let text = text.trim_matches(|c| c == ' ' || c == '\0');
    if text.is_empty() {
        return Some(0);
    }
    u64::from_str_radix(text, 8).ok()
}

pub(super) fn cstr(field: &[u8]) -> io::Result<&str> {
    let end = field.iter().position(|&b| b == 0).unwrap_or(field.len());
    std::str::from_utf8(&field[..end]).map_err(|_| invalid("a bundle entry name is not UTF-8"))
}

pub(super) fn type_name(kind: u8) -> &'static str {
    match kind {
        b'1' => "a hard link",
        b'2' => "a symbolic link",
        b'3' => "a character device",
        b'4' => "a block device",
        b'5' => "a directory",
        b'6' => "a FIFO",
        b'L' | b'K' => "a GNU long name",
        b'S' => "an old GNU sparse file",
        _ => "of an unknown type",
    }
}

pub(super) fn parse_pax(data: &[u8]) -> io::Result<Vec<(String, String)>> {
    let bad = || invalid("malformed pax header in the bundle");
    let mut records = Vec::new();
    let mut rest = data;
    while !rest.is_empty() {
        let space = rest.iter().position(|&b| b == b' ').ok_or_else(bad)?;
        let len: usize = std::str::from_utf8(&rest[..space])
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or_else(bad)?;
        if len <= space + 1 || len > rest.len() || rest[len - 1] != b'\n' {
            return Err(bad());
        }
        let record = std::str::from_utf8(&rest[space + 1..len - 1]).map_err(|_| bad())?;
        let (key, value) = record.split_once('=').ok_or_else(bad)?;
        records.push((key.to_owned(), value.to_owned()));
        rest = &rest[len..];
    }
    Ok(records)
}

/// The name (prefix joined) and data size of a ustar header, checksum and magic checked.
pub(super) fn parse_header(h: &[u8; RECORD]) -> io::Result<(String, u64)> {
    let sum: u64 = h
        .iter()
        .enumerate()
        .map(|(i, &b)| u64::from(if (148..156).contains(&i) { b' ' } else { b }))
        .sum();
    if &h[257..262] != b"ustar" || parse_number(&h[148..156]) != Some(sum) {
        return Err(invalid(
            "a bundle header is damaged (bad checksum or not ustar)",
        ));
    }
    let mut name = cstr(&h[..100])?.to_owned();
    let prefix = cstr(&h[345..500])?;
    if !prefix.is_empty() {
        name = format!("{prefix}/{name}");
    }
    let size =
        parse_number(&h[124..136]).ok_or_else(|| invalid("a bundle header has a bad size"))?;
    Ok((name, size))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pax_records_count_their_own_length() {
        // Bodies around the points where the length gains a digit.
        for n in [
            0, 1, 2, 3, 4, 5, 90, 91, 92, 93, 94, 95, 96, 990, 994, 995, 996, 1000,
        ] {
            let value = "v".repeat(n);
            let mut out = Vec::new();
            pax_record(&mut out, "k", &value);
            let len: usize = std::str::from_utf8(&out)
                .unwrap()
                .split(' ')
                .next()
                .unwrap()
                .parse()
                .unwrap();
            assert_eq!(len, out.len(), "{n}");
            assert_eq!(parse_pax(&out).unwrap(), vec![("k".to_owned(), value)]);
        }
        assert!(parse_pax(b"9 k=v\n").is_err());
        assert!(parse_pax(b"99999 k=v\n").is_err());
    }

    #[test]
    fn headers_round_trip() {
        let h = header("a/b.json", 0o644, 1234, b'0');
        assert_eq!(parse_header(&h).unwrap(), ("a/b.json".to_owned(), 1234));
        let mut bad = h;
        bad[0] = b'c';
        assert!(parse_header(&bad).is_err());
        // Sizes past the octal field go to pax; GNU base-256 is still read.
        assert_eq!(
            parse_header(&header("x", 0o600, OCTAL_MAX + 1, b'0'))
                .unwrap()
                .1,
            0
        );
        let mut field = [0u8; 12];
        field[0] = 0x80;
        field[7] = 2;
        assert_eq!(parse_number(&field), Some(2 << 32));
    }

    #[test]
    fn names_must_be_plain_relative_paths() {
        for ok in ["a", "a/b.bin", "..a", "a.."] {
            check_name(ok, io::ErrorKind::InvalidData).unwrap();
        }
        for bad in ["", "/etc/x", "../x", "a/../b", "a//b", "./a", "a/", "a\0b"] {
            assert!(
                check_name(bad, io::ErrorKind::InvalidData).is_err(),
                "{bad:?}"
            );
        }
    }
}
