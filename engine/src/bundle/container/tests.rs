//! The container's tests: round trips, deltas, GNU tar, damaged bundles.

use super::*;
use crate::bundle::sparse::hash_file;
use std::collections::BTreeMap;
use std::fs::{self, OpenOptions};
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::process::Command;

fn make(dir: &Path, name: &str, size: u64, writes: &[(u64, Vec<u8>)]) -> PathBuf {
    let path = dir.join(name);
    let f = File::create(&path).unwrap();
    f.set_len(size).unwrap();
    for (off, bytes) in writes {
        f.write_all_at(bytes, *off).unwrap();
    }
    path
}

fn noise(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| u8::try_from((i * 31 + usize::from(seed)) % 251).unwrap() | 1)
        .collect()
}

/// Extracts every entry of `bundle` into `dir` (deltas against `bases` by name).
fn extract(
    bundle: &[u8],
    dir: &Path,
    bases: &BTreeMap<String, PathBuf>,
) -> io::Result<BTreeMap<String, FileDigest>> {
    let mut out = BTreeMap::new();
    read(bundle, |e: &mut Entry<'_>| -> io::Result<()> {
        let path = dir.join(e.name());
        let f = OpenOptions::new()
            .create_new(true)
            .read(true)
            .write(true)
            .open(&path)?;
        let base = bases.get(e.name()).map(|p| File::open(p).unwrap());
        let mut last = 0;
        let digest = e.write_to(&f, base.as_ref(), &mut |n| {
            assert!(n >= last);
            last = n;
        })?;
        assert_eq!(last, e.size());
        out.insert(e.name().to_owned(), digest);
        Ok(())
    })?;
    Ok(out)
}

const LONG: &str = "a-name-longer-than-a-ustar-header-holds-so-the-sparse-entry-needs-its-pax-name-record-xxxxxxxxxxxxxxxxxxxxxxxxxxxx.bin";

struct Sample {
    _dir: tempfile::TempDir,
    files: Vec<(&'static str, PathBuf, u64)>, // name, path, expected stored
    bundle: Vec<u8>,
    digests: Vec<FileDigest>,
}

fn sample(threads: u32) -> Sample {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mib = 1u64 << 20;
    let zeros = vec![0u8; 8 * BLOCK_USIZE];
    let files = vec![
        (
            "dense.bin",
            make(d, "dense.bin", 3 * mib, &[(0, noise(3 << 20, 1))]),
            3 * mib,
        ),
        (
            "holes.bin",
            make(
                d,
                "holes.bin",
                64 * mib,
                &[
                    (5 * mib, noise(10_000, 2)),
                    (40 * mib, noise(BLOCK_USIZE, 3)),
                ],
            ),
            4 * BLOCK,
        ),
        (
            "zeros.bin",
            make(
                d,
                "zeros.bin",
                12 * BLOCK,
                &[(0, noise(12 * BLOCK_USIZE, 4)), (2 * BLOCK, zeros)],
            ),
            4 * BLOCK,
        ),
        (
            "odd.bin",
            make(
                d,
                "odd.bin",
                3 * BLOCK + 17,
                &[(0, noise(3 * BLOCK_USIZE + 17, 5))],
            ),
            3 * BLOCK + 17,
        ),
        ("empty.bin", make(d, "empty.bin", 0, &[]), 0),
        ("allholes.bin", make(d, "allholes.bin", mib + 1, &[]), 0),
        (
            LONG,
            make(d, LONG, 2 * BLOCK, &[(BLOCK, noise(10, 6))]),
            BLOCK,
        ),
    ];
    let mut w = Writer::new(Vec::new(), 3, threads).unwrap();
    w.add_bytes("manifest.json", b"{\"a\":1}").unwrap();
    let mut digests = Vec::new();
    for (name, path, stored) in &files {
        let mut last = 0;
        let digest = w.add_file(name, path, &mut |n| {
            assert!(n >= last);
            last = n;
        });
        let digest = digest.unwrap();
        assert_eq!(last, digest.size);
        assert_eq!(
            digest,
            FileDigest {
                stored: *stored,
                ..hash_file(path).unwrap()
            },
            "{name}"
        );
        digests.push(digest);
    }
    let bundle = w.finish().unwrap();
    Sample {
        _dir: dir,
        files,
        bundle,
        digests,
    }
}

#[test]
fn round_trip() {
    let s = sample(0);
    let out = tempfile::tempdir().unwrap();
    let mut json = None;
    read(&s.bundle[..], |e: &mut Entry<'_>| -> io::Result<()> {
        if e.name() == "manifest.json" {
            json = Some(e.bytes(100)?);
            return Ok(());
        }
        let f = OpenOptions::new()
            .create_new(true)
            .read(true)
            .write(true)
            .open(out.path().join(e.name()))?;
        let digest = e.write_to(&f, None, &mut |_| {})?;
        let i = s.files.iter().position(|f| f.0 == e.name()).unwrap();
        assert_eq!(digest, s.digests[i]);
        Ok(())
    })
    .unwrap();
    assert_eq!(json.as_deref(), Some(&b"{\"a\":1}"[..]));
    for (name, path, _) in &s.files {
        let got = out.path().join(name);
        assert!(
            fs::read(&got).unwrap() == fs::read(path).unwrap(),
            "{name} differs"
        );
    }
    let holes = fs::metadata(out.path().join("holes.bin")).unwrap();
    assert_eq!(holes.len(), 64 << 20);
    assert!(
        holes.blocks() * 512 < 1 << 20,
        "holes filled: {} blocks",
        holes.blocks()
    );
    let zeros = fs::metadata(out.path().join("zeros.bin")).unwrap();
    assert!(
        zeros.blocks() * 512 <= 4 * BLOCK + BLOCK,
        "zero blocks written: {}",
        zeros.blocks()
    );
}

#[test]
fn multithreaded_writer() {
    let s = sample(2);
    let out = tempfile::tempdir().unwrap();
    let got = extract(&s.bundle, out.path(), &BTreeMap::new()).unwrap();
    assert_eq!(got.len(), 8);
    assert_eq!(got["dense.bin"], s.digests[0]);
}

#[test]
fn delta() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let base_bytes = noise(40 * BLOCK_USIZE, 7);
    let tail = noise(100, 8);
    let base = make(
        d,
        "base",
        40 * BLOCK + 100,
        &[(0, base_bytes.clone()), (40 * BLOCK, tail)],
    );
    let b = BLOCK_USIZE;
    let new_writes = vec![
        (0, base_bytes[..20 * b].to_vec()),
        // Block 20 stays a hole in the new file: base has data there.
        (21 * BLOCK, base_bytes[21 * b..].to_vec()),
        (3 * BLOCK + 5, vec![0xee; 3]),
        (10 * BLOCK, vec![0; b]),
        // Block 40: zeros where base ends with 100 bytes; block 45: past base's end.
        (45 * BLOCK, noise(100, 9)),
    ];
    let new = make(d, "new", 60 * BLOCK + 1, &new_writes);
    // Blocks 41..45 and 46.. are zeros in both (past base's end): not shipped.
    let mut w = Writer::new(Vec::new(), 3, 0).unwrap();
    let digest = w.add_delta("disk.img", &new, &base, &mut |_| {}).unwrap();
    let bundle = w.finish().unwrap();
    assert_eq!(
        digest,
        FileDigest {
            stored: 5 * BLOCK,
            ..hash_file(&new).unwrap()
        }
    );
    let out = tempfile::tempdir().unwrap();
    let bases = BTreeMap::from([("disk.img".to_owned(), base)]);
    let got = extract(&bundle, out.path(), &bases).unwrap();
    assert_eq!(
        fs::read(out.path().join("disk.img")).unwrap(),
        fs::read(&new).unwrap()
    );
    assert_eq!(got["disk.img"], digest);
}

/// GNU tar and zstd, or why not: a skip outside CI, a failure in it.
fn gnu_tar() -> bool {
    let ok = |cmd: &str| {
        Command::new(cmd)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if ok("tar") && ok("zstd") {
        return true;
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "GNU tar or zstd missing (apt-get install tar zstd)"
    );
    eprintln!("SKIPPED: GNU tar or zstd is not installed (apt-get install tar zstd)");
    false
}

#[test]
fn gnu_tar_reads_bundles() {
    if !gnu_tar() {
        return;
    }
    let s = sample(0);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("b.tar.zst");
    fs::write(&file, &s.bundle).unwrap();
    let list = Command::new("tar")
        .arg("--zstd")
        .arg("-tvf")
        .arg(&file)
        .output()
        .unwrap();
    assert!(
        list.status.success(),
        "{}",
        String::from_utf8_lossy(&list.stderr)
    );
    let list = String::from_utf8(list.stdout).unwrap();
    for (name, path, _) in &s.files {
        let size = fs::metadata(path).unwrap().len();
        assert!(
            list.lines()
                .any(|l| l.ends_with(&format!(" {name}")) && l.contains(&format!(" {size} "))),
            "{name} {size} not in\n{list}"
        );
    }
    assert!(!list.contains("GNUSparseFile"), "{list}");
    let out = dir.path().join("x");
    fs::create_dir(&out).unwrap();
    let x = Command::new("tar")
        .arg("--zstd")
        .arg("-xSf")
        .arg(&file)
        .arg("-C")
        .arg(&out)
        .output()
        .unwrap();
    assert!(x.status.success(), "{}", String::from_utf8_lossy(&x.stderr));
    for (name, path, _) in &s.files {
        assert!(
            fs::read(out.join(name)).unwrap() == fs::read(path).unwrap(),
            "{name} differs"
        );
    }
    assert_eq!(fs::read(out.join("manifest.json")).unwrap(), b"{\"a\":1}");
    // holes.bin ends in a hole: its size comes from the final (size, 0) region.
    assert_eq!(fs::metadata(out.join("holes.bin")).unwrap().len(), 64 << 20);
}

#[test]
fn truncated_bundles_fail() {
    let s = sample(0);
    let out = tempfile::tempdir().unwrap();
    let n = s.bundle.len();
    for (i, cut) in [0, 1, 10, n / 3, n / 2, n - 100, n - 5, n - 1]
        .into_iter()
        .enumerate()
    {
        let dir = out.path().join(i.to_string());
        fs::create_dir(&dir).unwrap();
        // A cut zstd stream is never corrupt, only short.
        let err = extract(&s.bundle[..cut], &dir, &BTreeMap::new()).unwrap_err();
        assert_eq!(
            err.kind(),
            io::ErrorKind::UnexpectedEof,
            "cut at {cut}: {err}"
        );
        assert!(
            err.to_string().starts_with("the bundle ends early: "),
            "{err}"
        );
    }
    // The whole bundle plus garbage is fine.
    let mut more = s.bundle.clone();
    more.extend_from_slice(b"garbage after the end");
    let dir = out.path().join("whole");
    fs::create_dir(&dir).unwrap();
    assert_eq!(extract(&more, &dir, &BTreeMap::new()).unwrap().len(), 8);
}

/// A bundle of one hand-made entry: optional pax records, a ustar header, data.
fn crafted(name: &str, kind: u8, pax: &[(&str, &str)], data: &[u8]) -> Vec<u8> {
    let mut tar = Vec::new();
    if !pax.is_empty() {
        let mut records = Vec::new();
        for (k, v) in pax {
            pax_record(&mut records, k, v);
        }
        tar.extend_from_slice(&header("PaxHeaders/x", 0o644, records.len() as u64, b'x'));
        tar.extend_from_slice(&records);
        tar.resize(tar.len() + padding(records.len() as u64), 0);
    }
    tar.extend_from_slice(&header(name, 0o600, data.len() as u64, kind));
    tar.extend_from_slice(data);
    tar.resize(tar.len() + padding(data.len() as u64) + 2 * RECORD, 0);
    zstd::encode_all(&tar[..], 3).unwrap()
}

fn read_crafted(bundle: &[u8]) -> io::Result<()> {
    let out = tempfile::tempdir().unwrap();
    extract(bundle, out.path(), &BTreeMap::new()).map(|_| ())
}

#[test]
fn malformed_entries_are_refused() {
    let sparse = |map: &str, data: &[u8]| {
        let mut body = map.as_bytes().to_vec();
        body.resize(RECORD, 0);
        body.extend_from_slice(data);
        let pax = [
            ("GNU.sparse.major", "1"),
            ("GNU.sparse.minor", "0"),
            ("GNU.sparse.name", "m.bin"),
            ("GNU.sparse.realsize", "100"),
        ];
        crafted("GNUSparseFile.0/m.bin", b'0', &pax, &body)
    };
    read_crafted(&sparse("2\n0\n10\n50\n10\n", &[1; 20])).unwrap();
    let cases = [
        ("overlapping", sparse("2\n0\n10\n5\n10\n", &[1; 20])),
        ("past the size", sparse("1\n95\n10\n", &[1; 10])),
        ("lengths vs data", sparse("1\n0\n10\n", &[1; 20])),
        ("not a number", sparse("1\n0x\n10\n", &[1; 10])),
        ("too many regions", sparse("99999999\n", &[])),
        ("dot-dot", crafted("../x", b'0', &[], b"hi")),
        ("absolute", crafted("/etc/x", b'0', &[], b"hi")),
        (
            "pax dot-dot",
            crafted("x", b'0', &[("path", "a/../../x")], b"hi"),
        ),
        ("symlink", crafted("x", b'2', &[], b"")),
        ("directory", crafted("d", b'5', &[], b"")),
    ];
    for (what, bundle) in cases {
        let err = read_crafted(&bundle).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData, "{what}: {err}");
    }
    let err = read_crafted(&crafted("x", b'2', &[], b""))
        .unwrap_err()
        .to_string();
    assert!(err.contains("symbolic link"), "{err}");
}

#[test]
fn entries_must_be_consumed_and_fit() {
    let bundle = crafted("big.json", b'0', &[], &[b'x'; 1000]);
    let err = read(&bundle[..], |_: &mut Entry<'_>| -> io::Result<()> {
        Ok(())
    })
    .unwrap_err();
    assert!(
        err.to_string().contains("`big.json` was not expected"),
        "{err}"
    );
    let err = read(&bundle[..], |e: &mut Entry<'_>| e.bytes(999).map(|_| ())).unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::InvalidData);
    read(&bundle[..], |e: &mut Entry<'_>| e.bytes(1000).map(|_| ())).unwrap();
}

#[test]
fn a_plain_tar_stream_from_regions_reads_back_as_a_bundle() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (noise(10_000, 3), noise(5_000, 9));
    let size = 1 << 20;
    let regions = [(4096u64, a.len() as u64), (65536, b.len() as u64)];
    let mut t = TarStream::new(Vec::new());
    t.add_bytes("qsnap-bundle.json", b"{}").unwrap();
    t.add_sparse("memory/state.mem", size, &regions, &mut |w| {
        // Handed in pieces that do not follow the regions' edges.
        w(4096, &a[..7000])?;
        w(4096 + 7000, &a[7000..])?;
        w(65536, &b)
    })
    .unwrap();
    let stream = t.finish().unwrap();
    assert!(!stream.starts_with(&ZSTD_MAGIC));
    fs::create_dir_all(dir.path().join("memory")).unwrap();
    let got = extract(&stream, dir.path(), &BTreeMap::new()).unwrap();
    let expect = make(
        dir.path(),
        "expect",
        size,
        &[(4096, a.clone()), (65536, b.clone())],
    );
    assert_eq!(
        fs::read(dir.path().join("memory/state.mem")).unwrap(),
        fs::read(&expect).unwrap()
    );
    assert_eq!(
        got["memory/state.mem"].hash,
        hash_file(&expect).unwrap().hash
    );
    // Data that does not cover its regions exactly is refused, as are regions out of order.
    let mut t = TarStream::new(Vec::new());
    let short = t.add_sparse("f/x", size, &regions, &mut |w| w(4096, &a));
    assert!(short.is_err());
    let mut t = TarStream::new(Vec::new());
    let misplaced = t.add_sparse("f/x", size, &regions, &mut |w| {
        w(4096, &a)?;
        w(65536 + 1, &b[1..])
    });
    assert!(misplaced.unwrap_err().to_string().contains("handed where"));
    let mut t = TarStream::new(Vec::new());
    let backwards = t.add_sparse("f/x", size, &[(8192, 10), (0, 10)], &mut |_| Ok(()));
    assert_eq!(backwards.unwrap_err().kind(), io::ErrorKind::InvalidInput);
}
