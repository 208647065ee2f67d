//! What the receiving side must refuse although the bundle is intact: a QEMU that cannot run
//! the snapshot, an incremental bundle whose base changed since it was imported, and a second
//! import of the same name at the same moment.

use super::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_qemu_lacking_the_machine_type_or_the_memory_format_is_refused_before_anything_is_written(
) {
    require_qemu!();
    // QEMU 7.2 has neither a 10.x machine type nor mapped-ram (9.0).
    let Some(old) = qsnap_testkit::old_qemu() else {
        return;
    };
    let old = old.to_str().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let b = dir.path().join("b");
    let disks = dir.path().join("disks");
    let run_b = in_store(&b);

    // The machine type this QEMU pinned (pc-i440fx-10.x): 7.2 does not offer it.
    let bundle = small_bundle(dir.path()).await;
    let out = run_b(&[
        "import",
        bundle.to_str().unwrap(),
        "m1",
        "--trust-command-line",
        "--qemu",
        old,
        "--disk-dir",
        disks.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(6), "{out:?}");
    let err = text(&out.stderr);
    assert!(err.contains("does not offer the machine type pc-"), "{err}");
    nothing_left(&b, "m1", &disks, "machine type");

    // A machine type 7.2 has, but memory in mapped-ram, which it cannot load.
    let root = dir.path().join("pinned");
    std::fs::create_dir_all(&root).unwrap();
    let (_kill, a) = idle_source(&root, Some("pc-i440fx-7.2"), 0).await;
    let bundle = root.join("s1.qsnap");
    ok(
        &in_store(&a)(&["export", "vm1", "s1", bundle.to_str().unwrap()]),
        "export",
    );
    let out = run_b(&[
        "import",
        bundle.to_str().unwrap(),
        "m2",
        "--qemu",
        old,
        "--disk-dir",
        disks.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(6), "{out:?}");
    let err = text(&out.stderr);
    assert!(err.contains("mapped-ram") && err.contains("9.0"), "{err}");
    nothing_left(&b, "m2", &disks, "mapped-ram");
    // The same bundle, with this host's QEMU, goes in.
    ok(
        &run_b(&[
            "import",
            bundle.to_str().unwrap(),
            "m2",
            "--disk-dir",
            disks.to_str().unwrap(),
        ]),
        "import with the new QEMU",
    );
    ok(&in_store(&a)(&["stop", "vm1"]), "stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_incremental_bundle_whose_base_changed_since_its_import_is_refused() {
    require_qemu!();
    let dir = tempfile::tempdir().unwrap();
    let (_kill, a) = idle_source(dir.path(), None, 0).await;
    let run_a = in_store(&a);
    let full = dir.path().join("s1.qsnap");
    ok(
        &run_a(&["export", "vm1", "s1", full.to_str().unwrap()]),
        "export",
    );
    ok(&run_a(&["create", "vm1", "s2", "--mode", "precopy"]), "s2");
    let inc = dir.path().join("s2.qsnap");
    let out = run_a(&[
        "export",
        "vm1",
        "s2",
        inc.to_str().unwrap(),
        "--base",
        "s1",
        "--json",
    ]);
    ok(&out, "export --base");
    ok(&run_a(&["stop", "vm1"]), "stop");
    let b = dir.path().join("b");
    let run_b = in_store(&b);
    ok(
        &run_b(&["import", full.to_str().unwrap(), "vm2"]),
        "import the base",
    );
    let mem = b.join("vms/vm2/memory/s1.mem");
    assert!(mem.exists(), "{:?}", files_under(&b.join("vms")));
    let original = std::fs::read(&mem).unwrap();
    let when = std::fs::metadata(&mem).unwrap().modified().unwrap();
    let n_files = files_under(&b).len();
    let write = |bytes: &[u8], keep_time: bool| {
        let f = std::fs::OpenOptions::new().write(true).open(&mem).unwrap();
        use std::os::unix::fs::FileExt;
        f.write_all_at(bytes, 0).unwrap();
        if keep_time {
            f.set_times(std::fs::FileTimes::new().set_modified(when))
                .unwrap();
        }
    };
    let at = original.len() / 2;
    let mut changed = original.clone();
    changed[at] ^= 0x55;

    // The base's memory was written after its import: refused by its stamp, nothing added.
    write(&changed, false);
    let out = run_b(&["import", inc.to_str().unwrap(), "vm2"]);
    assert_eq!(out.status.code(), Some(6), "{out:?}");
    let err = text(&out.stderr);
    assert!(
        err.contains("changed since it was imported") && err.contains("s1.mem"),
        "{err}"
    );
    assert_eq!(files_under(&b).len(), n_files, "{:?}", files_under(&b));
    assert!(!b.join("vms/vm2/snapshots/s2.json").exists());

    // Written behind the stamp's back (its time put back): the memory the delta builds does
    // not match the seal's hash, and nothing is added either.
    write(&changed, true);
    let out = run_b(&["import", inc.to_str().unwrap(), "vm2"]);
    assert_eq!(out.status.code(), Some(6), "{out:?}");
    let err = text(&out.stderr);
    assert!(err.contains("does not match its hash"), "{err}");
    assert_eq!(files_under(&b).len(), n_files, "{:?}", files_under(&b));

    // The base as it was: the incremental goes in and its snapshot is listed.
    write(&original, true);
    ok(&run_b(&["import", inc.to_str().unwrap(), "vm2"]), "import");
    let out = run_b(&["list", "vm2", "--json"]);
    ok(&out, "list");
    assert!(
        text(&out.stdout).contains("\"s2\""),
        "{}",
        text(&out.stdout)
    );
    ok(&run_b(&["check", "vm2"]), "check");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_imports_of_one_name_at_once_one_wins_and_the_other_is_told() {
    require_qemu!();
    let dir = tempfile::tempdir().unwrap();
    let bundle = small_bundle(dir.path()).await;
    let b = dir.path().join("b");
    let bin = assert_cmd::cargo::cargo_bin("qsnap");
    let children: Vec<_> = (0..2)
        .map(|i| {
            std::process::Command::new(&bin)
                .env("QSNAP_STORE", &b)
                .args(["import", bundle.to_str().unwrap(), "twin"])
                .args(["--trust-command-line", "--disk-dir"])
                .arg(dir.path().join(format!("disks{i}")))
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let outs: Vec<_> = children
        .into_iter()
        .map(|c| c.wait_with_output().unwrap())
        .collect();
    let won: Vec<_> = outs.iter().filter(|o| o.status.success()).collect();
    let lost: Vec<_> = outs.iter().filter(|o| !o.status.success()).collect();
    assert_eq!(won.len(), 1, "{outs:?}");
    let err = text(&lost[0].stderr);
    assert!(
        err.contains("exists") || err.contains("busy") || err.contains("another qsnap"),
        "{err}"
    );
    // The loser left nothing: its disk directory is empty, and no staging remains.
    let loser = outs.iter().position(|o| !o.status.success()).unwrap();
    assert!(
        files_under(&dir.path().join(format!("disks{loser}"))).is_empty(),
        "{:?}",
        files_under(&dir.path().join(format!("disks{loser}")))
    );
    assert!(files_under(&b.join("staging")).is_empty());
    ok(&in_store(&b)(&["check", "twin"]), "check");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_import_into_a_full_filesystem_names_the_file_and_leaves_nothing() {
    require_qemu!();
    if !qsnap_testkit::root_or_skip(
        "an_import_into_a_full_filesystem_names_the_file_and_leaves_nothing",
    ) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (_kill, a) = idle_source(dir.path(), None, 0).await;
    let bundle = dir.path().join("s1.qsnap");
    ok(
        &in_store(&a)(&["export", "vm1", "s1", bundle.to_str().unwrap()]),
        "export",
    );
    ok(&in_store(&a)(&["stop", "vm1"]), "stop");
    // A 2 MiB filesystem for the disks: the 16 MiB disk's data does not fit.
    let small = dir.path().join("small");
    std::fs::create_dir_all(&small).unwrap();
    let fill = small.join("filler");
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=2m", "tmpfs"])
        .arg(&small)
        .status()
        .unwrap();
    assert!(mounted.success());
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg(&self.0).status();
        }
    }
    let _umount = Unmount(small.clone());
    // Leave it nearly full, so that the first data written meets ENOSPC.
    let _ = std::fs::write(&fill, vec![1u8; 2 << 20]);
    let b = dir.path().join("b");
    let out = in_store(&b)(&[
        "import",
        bundle.to_str().unwrap(),
        "full",
        "--disk-dir",
        small.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = text(&out.stderr);
    assert!(
        err.contains("free space") && err.contains(small.to_str().unwrap()),
        "{err}"
    );
    assert_eq!(
        files_under(&small),
        vec![fill.clone()],
        "only the filler is left"
    );
    assert!(!b.join("vms/full").exists());
    assert!(files_under(&b.join("staging")).is_empty());
}
