//! Damaged, cut-short, re-packed, host-reaching and wrongly signed bundles are refused,
//! leaving nothing behind.

use super::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn damaged_cut_short_and_host_reaching_bundles_are_refused_and_leave_nothing() {
    require_qemu!();
    let dir = tempfile::tempdir().unwrap();
    let bundle = small_bundle(dir.path()).await;
    let bytes = std::fs::read(&bundle).unwrap();
    let b = dir.path().join("b");
    let disks = dir.path().join("disks");
    std::fs::create_dir_all(&disks).unwrap();
    let run = in_store(&b);
    let vm_name = std::cell::RefCell::new("vm2".to_owned());
    let try_import = |data: &[u8], extra: &[&str]| {
        let f = dir.path().join("try.qsnap");
        std::fs::write(&f, data).unwrap();
        let vm = vm_name.borrow().clone();
        let d = if vm == "vm2" {
            disks.clone()
        } else {
            disks.join(&vm)
        };
        let mut args = vec![
            "import",
            f.to_str().unwrap(),
            &vm,
            "--disk-dir",
            d.to_str().unwrap(),
        ];
        args.extend(extra);
        let out = run(&args);
        std::fs::remove_file(&f).unwrap();
        out
    };

    // One flipped byte anywhere: at the start (the manifest), the middle, near the end (the
    // seal) — and a bundle cut short at several points.
    for at in [40, bytes.len() / 3, bytes.len() / 2, bytes.len() - 40] {
        let mut d = bytes.clone();
        d[at] ^= 0x20;
        let out = try_import(&d, &["--trust-command-line"]);
        assert_eq!(out.status.code(), Some(6), "flip at {at}: {out:?}");
        assert!(
            text(&out.stderr).contains("not intact"),
            "flip at {at}: {}",
            text(&out.stderr)
        );
        nothing_left(&b, "vm2", &disks, &format!("flip at {at}"));
    }
    for cut in [100, bytes.len() / 2, bytes.len() - 10] {
        let out = try_import(&bytes[..cut], &["--trust-command-line"]);
        assert_eq!(out.status.code(), Some(6), "cut at {cut}: {out:?}");
        assert!(
            text(&out.stderr).contains("not intact"),
            "cut at {cut}: {}",
            text(&out.stderr)
        );
        nothing_left(&b, "vm2", &disks, &format!("cut at {cut}"));
    }

    // Its command line reads a host file into the guest: refused by name unless trusted.
    let out = try_import(&bytes, &[]);
    assert_eq!(out.status.code(), Some(6), "{out:?}");
    let err = text(&out.stderr);
    assert!(
        err.contains("-fw_cfg")
            && err.contains("names the host path /etc/hostname")
            && err.contains("--trust-command-line"),
        "{err}"
    );
    nothing_left(&b, "vm2", &disks, "untrusted");
    let out = try_import(&bytes, &["--trust-command-line", "--json"]);
    ok(&out, "trusted import");
    let rep = json(&out);
    assert!(rep["notes"].to_string().contains("/etc/hostname"), "{rep}");
    // Guest memory 0600 in 0700 directories; disk images 0600.
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&b.join("vms/vm2/memory/s1.mem")), 0o600);
    assert_eq!(mode(&b.join("vms/vm2/memory")), 0o700);
    for f in files_under(&disks) {
        assert_eq!(mode(&f), 0o600, "{}", f.display());
    }
    // A file where the new VM's overlay would go is never overwritten: refused, left as it
    // was, and nothing else made.
    let theirs = dir.path().join("theirs");
    std::fs::create_dir_all(&theirs).unwrap();
    std::fs::write(theirs.join("d.s1.qcow2"), b"someone's file").unwrap();
    let out = run(&[
        "import",
        bundle.to_str().unwrap(),
        "vm5",
        "--trust-command-line",
        "--disk-dir",
        theirs.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(6), "{out:?}");
    assert!(text(&out.stderr).contains("already exists"), "{out:?}");
    assert_eq!(
        std::fs::read(theirs.join("d.s1.qcow2")).unwrap(),
        b"someone's file"
    );
    assert_eq!(files_under(&theirs).len(), 1, "{:?}", files_under(&theirs));
    assert!(!b.join("vms/vm5").exists());
    // A name in use is refused, writing nothing.
    let before = files_under(&disks).len();
    let out = try_import(&bytes, &["--trust-command-line"]);
    assert_eq!(out.status.code(), Some(6), "{out:?}");
    assert!(text(&out.stderr).contains("exists"), "{out:?}");
    assert_eq!(files_under(&disks).len(), before);
    // The imported VM starts from its snapshot.
    let _kill = KillRecordedQemu::new(&b, "vm2");
    ok(&run(&["revert", "vm2", "s1"]), "revert");
    ok(&run(&["check", "vm2"]), "check");
    ok(&run(&["stop", "vm2"]), "stop");
    // A bundle re-packed by hand: bytes changed inside a file, or the manifest changed, with
    // the compression intact — only the seal's BLAKE3 hashes can tell.
    *vm_name.borrow_mut() = "r1".to_owned();
    if let Some(tar) = unzstd(&bytes) {
        let mem = find(&tar, b"memory/state.mem").expect("the memory entry");
        let mut t = tar.clone();
        // The memory file's first data block follows its header block(s); its first bytes
        // are qsnap's header magic.
        let data = find(&t[mem..], b"QSNAPMEM").expect("memory data") + mem;
        t[data] ^= 1;
        let out = try_import(&rezstd(&t), &["--trust-command-line"]);
        assert_eq!(out.status.code(), Some(6), "{out:?}");
        assert!(
            text(&out.stderr).contains("does not match its hash"),
            "{}",
            text(&out.stderr)
        );
        nothing_left(&b, "r1", &disks.join("r1"), "a file changed");
        let mut t = tar.clone();
        let at = find(&t, b"\"created-at\": \"2").expect("created-at") + 15;
        t[at] = b'1';
        let out = try_import(&rezstd(&t), &["--trust-command-line"]);
        assert_eq!(out.status.code(), Some(6), "{out:?}");
        assert!(
            text(&out.stderr).contains("manifest does not match"),
            "{}",
            text(&out.stderr)
        );
        nothing_left(&b, "r1", &disks.join("r1"), "the manifest changed");
    }

    // Signed bundles: --trust takes only a bundle signed by a trusted key, and trusts its
    // command line then; an unsigned one, or one signed by another key, is refused.
    let a = dir.path().join("a");
    *vm_name.borrow_mut() = "vm3".to_owned();
    let keys = dir.path().join("keys");
    std::fs::create_dir_all(&keys).unwrap();
    for k in ["ours", "theirs"] {
        ok(&run(&["keygen", keys.join(k).to_str().unwrap()]), "keygen");
    }
    let again = run(&["keygen", keys.join("ours").to_str().unwrap()]);
    assert_eq!(again.status.code(), Some(6), "keygen over a key: {again:?}");
    let signed = dir.path().join("signed.qsnap");
    let key = keys.join("ours.key");
    ok(
        &in_store(&a)(&[
            "export",
            "vm1",
            "s1",
            signed.to_str().unwrap(),
            "--sign",
            key.to_str().unwrap(),
        ]),
        "export --sign",
    );
    let signed_bytes = std::fs::read(&signed).unwrap();
    let ours = keys.join("ours.pub");
    let theirs = keys.join("theirs.pub");
    let trust = |k: &Path| ["--trust".to_owned(), k.to_str().unwrap().to_owned()];
    let t = trust(&theirs);
    let out = try_import(&signed_bytes, &[&t[0], &t[1]]);
    assert_eq!(out.status.code(), Some(6), "{out:?}");
    assert!(
        text(&out.stderr).contains("not by a key you trust"),
        "{out:?}"
    );
    nothing_left(&b, "vm3", &disks.join("vm3"), "signed by another key");
    let o = trust(&ours);
    let out = try_import(&bytes, &[&o[0], &o[1]]);
    assert_eq!(out.status.code(), Some(6), "{out:?}");
    assert!(text(&out.stderr).contains("not signed"), "{out:?}");
    let out = try_import(&signed_bytes, &[&o[0], &o[1], "--json"]);
    ok(&out, "import --trust");
    assert!(json(&out)["notes"]
        .to_string()
        .contains("signed by a key you trust"));
    // Not a bundle at all.
    let out = try_import(b"hello", &[]);
    assert_eq!(out.status.code(), Some(6), "{out:?}");
    assert!(text(&out.stderr).contains("not intact"), "{out:?}");
}

/// Where entry `name`'s data sits in a plain tar (`None` if it is not there): its header's
/// name field, then the size field (octal), data in the next block.
fn entry_data(tar: &[u8], name: &str) -> Option<std::ops::Range<usize>> {
    let mut at = 0;
    while at + 512 <= tar.len() {
        let h = &tar[at..at + 512];
        if h.iter().all(|&b| b == 0) {
            return None;
        }
        let size_field = text(&h[124..136]);
        let size =
            usize::from_str_radix(size_field.trim_matches(|c: char| c == '\0' || c == ' '), 8)
                .ok()?;
        let data = at + 512;
        if h.starts_with(name.as_bytes()) && h[name.len()] == 0 && h[156] != b'x' {
            return Some(data..data + size);
        }
        at = data + size.div_ceil(512) * 512;
    }
    None
}

/// The bundle with its manifest edited (same length, so no tar header changes) and its seal
/// re-computed over the edited manifest: what someone forging a bundle would do.
fn forge(tar: &[u8], edit: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
    let mut t = tar.to_vec();
    let m = entry_data(&t, "qsnap-bundle.json").expect("the manifest entry");
    let mut manifest = t[m.clone()].to_vec();
    edit(&mut manifest);
    assert_eq!(manifest.len(), m.len(), "same-length edits only");
    t[m].copy_from_slice(&manifest);
    let s = entry_data(&t, "qsnap-seal.json").expect("the seal entry");
    let hash = format!("blake3:{}", blake3::hash(&manifest).to_hex());
    let at = find(&t[s.clone()], b"blake3:").expect("the seal's manifest hash") + s.start;
    t[at..at + hash.len()].copy_from_slice(hash.as_bytes());
    t
}

fn replace_all(hay: &mut [u8], from: &[u8], to: &[u8]) -> usize {
    assert_eq!(from.len(), to.len());
    let mut n = 0;
    let mut i = 0;
    while let Some(p) = find(&hay[i..], from) {
        hay[i + p..i + p + to.len()].copy_from_slice(to);
        i += p + to.len();
        n += 1;
    }
    n
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_manifest_with_a_matching_seal_is_refused_before_anything_is_written() {
    require_qemu!();
    let dir = tempfile::tempdir().unwrap();
    let bundle = std::fs::read(small_bundle(dir.path()).await).unwrap();
    let Some(tar) = unzstd(&bundle) else {
        return;
    };
    let b = dir.path().join("b");
    let disks = dir.path().join("disks");
    let run = in_store(&b);
    let f = dir.path().join("forged.qsnap");
    let try_import = |data: Vec<u8>, vm: &str| {
        std::fs::write(&f, rezstd(&data)).unwrap();
        let out = run(&[
            "import",
            f.to_str().unwrap(),
            vm,
            "--trust-command-line",
            "--disk-dir",
            disks.join(vm).to_str().unwrap(),
        ]);
        std::fs::remove_file(&f).unwrap();
        out
    };
    // The forgery itself is sound: re-sealed with no edit, the bundle goes in.
    ok(
        &try_import(forge(&tar, |_| {}), "sound"),
        "re-sealed, unedited",
    );

    let device = |m: &mut Vec<u8>| {
        let key = b"\"device\": \"";
        let mut last = None;
        let mut i = 0;
        while let Some(p) = find(&m[i..], key) {
            last = Some(i + p);
            i += p + 1;
        }
        let at = last.expect("a disk chain's device") + key.len();
        m[at] = if m[at] == b'x' { b'y' } else { b'x' };
    };
    type Edit = Box<dyn Fn(&mut Vec<u8>)>;
    let cases: Vec<(&str, Edit, &str)> = vec![
        (
            "a file name that leaves the bundle",
            Box::new(|m| {
                assert!(replace_all(m, b"memory/state.mem", b"/emory/state.mem") > 1);
            }),
            "names a file \"/emory/state.mem\"",
        ),
        (
            "a file name with ..",
            Box::new(|m| {
                assert!(replace_all(m, b"memory/state.mem", b"memory/../ab.mem") > 1);
            }),
            "names a file \"memory/../ab.mem\"",
        ),
        (
            "a disk chain for another device",
            Box::new(device),
            "its snapshot's disks and its disk chains do not match",
        ),
        (
            "a format version this qsnap does not read",
            Box::new(|m| {
                assert_eq!(replace_all(m, b"\"version\": 1,", b"\"version\": 7,"), 1);
            }),
            "bundle format version 7",
        ),
    ];
    for (i, (what, edit, says)) in cases.into_iter().enumerate() {
        let vm = format!("f{i}");
        let out = try_import(forge(&tar, |m| edit(m)), &vm);
        assert_eq!(out.status.code(), Some(6), "{what}: {out:?}");
        let err = text(&out.stderr);
        assert!(err.contains(says), "{what}: {err}");
        nothing_left(&b, &vm, &disks.join(&vm), what);
    }
}
