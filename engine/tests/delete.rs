//! Deleting snapshots against a real QEMU: every position of a branched tree (a snapshot with
//! two children, a leaf on another branch, a middle one, the current one, the root), the VM
//! running (live block jobs) and stopped (qemu-img); after each delete every remaining
//! snapshot still reverts to its instant (the guest's memory and disk agree), every image
//! checks clean, no file is left that nothing uses, and the original image stays.
// Plants damage through the store writers and reads qemu-img directly: test builds only.
#![cfg(feature = "testing")]

use qsnap_engine::testing::{blocks, image, StoreWriters};
use qsnap_engine::{CheckOptions, DeleteError, DeleteOptions, Error, Finding, SnapshotName};
use qsnap_testkit::{init_logging, require_qemu, VmBuilder};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

mod common;
use common::{n, v, Guest};

/// Every disk image in the test directory.
fn images_in(dir: &Path) -> BTreeSet<PathBuf> {
    std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "qcow2" || x == "raw"))
        .collect()
}

/// Every image the store needs: the chains of the VM's disks and of every snapshot.
async fn referenced(g: &Guest) -> BTreeSet<PathBuf> {
    let cancel = CancellationToken::new();
    let record = g.vm.store().record(g.vm.name()).await.unwrap();
    let mut tops: Vec<PathBuf> = record.disks.iter().map(|d| d.image.clone()).collect();
    for m in g.vm.snapshots().await.unwrap() {
        tops.extend(m.snapshot.disks.iter().map(|d| d.image.clone()));
    }
    let mut all = BTreeSet::new();
    for t in tops {
        for c in image::chain(&t, &cancel).await.unwrap() {
            all.insert(c.filename);
        }
    }
    all
}

/// What every delete must leave: a clean `check`, every file needed and none extra, the
/// original image in place, every qcow2 image consistent, a memory file per memory snapshot.
async fn assert_consistent(g: &Guest, base: &Path, step: &str) {
    let report = g.vm.check(false).await.unwrap();
    assert!(
        report.clean && report.findings.is_empty(),
        "{step}: check found {:#?}",
        report.findings
    );
    assert!(base.exists(), "{step}: the original image is gone");
    let files = images_in(&g.dir);
    let needed = referenced(g).await;
    assert_eq!(
        files, needed,
        "{step}: files on disk vs images the store needs"
    );
    for f in files
        .iter()
        .filter(|f| f.extension().is_some_and(|x| x == "qcow2"))
    {
        // (Probed, the plain form: it opens the whole chain, so every backing file must be
        // there too.)
        let r = image::check(f, None, &CancellationToken::new())
            .await
            .unwrap();
        assert_eq!(
            (r.corruptions, r.check_errors),
            (0, 0),
            "{step}: qemu-img check {}",
            f.display()
        );
    }
    let mems: BTreeSet<PathBuf> = std::fs::read_dir(g.vm.store().memory_dir(g.vm.name()))
        .map(|rd| rd.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    let expected: BTreeSet<PathBuf> =
        g.vm.snapshots()
            .await
            .unwrap()
            .iter()
            .filter_map(|m| m.snapshot.memory.as_ref().map(|x| x.file.clone()))
            .collect();
    assert_eq!(mems, expected, "{step}: memory files");
}

/// Builds `s1 → s2 → {s3, s4 → s5}` (s2 has two children; s5 is current) and returns each
/// snapshot's tick range.
async fn branched_tree(g: &Guest) -> BTreeMap<&'static str, (u64, u64)> {
    let mut ranges = BTreeMap::new();
    g.tick_above(0, 3).await;
    for name in ["s1", "s2", "s3"] {
        ranges.insert(name, g.snapshot(name).await);
        let now = g.last_tick();
        g.tick_above(g.serial().len(), now + 2).await;
    }
    g.revert_and_check("s2", ranges["s2"]).await;
    for name in ["s4", "s5"] {
        let now = g.last_tick();
        g.tick_above(g.serial().len(), now + 2).await;
        ranges.insert(name, g.snapshot(name).await);
    }
    for s in ["s3", "s4"] {
        let parent = g.vm.snapshot(&n(s)).await.unwrap().parent;
        assert_eq!(parent.as_deref(), Some("s2"), "{s}");
    }
    ranges
}

/// Reverts to every remaining snapshot (the one named `last` last, so it is current after)
/// and checks the guest resumes at its instant.
async fn all_revert(
    g: &Guest,
    ranges: &BTreeMap<&'static str, (u64, u64)>,
    last: &str,
    stopped_after: bool,
) {
    let left: Vec<String> =
        g.vm.snapshots()
            .await
            .unwrap()
            .into_iter()
            .map(|m| m.name)
            .collect();
    let mut order: Vec<&str> = left
        .iter()
        .map(String::as_str)
        .filter(|s| *s != last)
        .collect();
    if left.iter().any(|s| s == last) {
        order.push(last);
    }
    for s in order {
        g.revert_and_check(s, ranges[s]).await;
        // After any successful command, `check` is clean: a revert that abandons the second
        // child of a base no snapshot names any more merges that base.
        let report = g.vm.check(false).await.unwrap();
        assert!(
            report.clean && report.findings.is_empty(),
            "after revert {s}: check found {:#?}",
            report.findings
        );
    }
    if stopped_after {
        g.vm.stop().await.unwrap();
        let report = g.vm.check(false).await.unwrap();
        assert!(report.clean, "after stop: {:#?}", report.findings);
    }
}

async fn delete(g: &Guest, snap: &str) -> qsnap_engine::DeleteReport {
    let r =
        g.vm.delete_snapshot(&n(snap), &DeleteOptions::default())
            .await
            .unwrap_or_else(|e| panic!("delete {snap}: {e}\n{}", g.report()));
    eprintln!(
        "delete {snap}: {:.0} ms, merges {:?}",
        r.total_ms,
        r.merges
            .iter()
            .map(|m| format!("{} {} {}", m.device, m.kind, m.lower.display()))
            .collect::<Vec<_>>()
    );
    assert_eq!(r.deleted, vec![snap.to_owned()]);
    r
}

async fn every_position(stopped: bool) {
    let g = Guest::start(VmBuilder::guest().dirty_mb(8), "qcow2").await;
    let base = g.dir.join("disk.qcow2");
    let ranges = branched_tree(&g).await;
    assert_consistent(&g, &base, "the tree").await;
    if stopped {
        g.vm.stop().await.unwrap();
    }
    let check_live = |r: &qsnap_engine::DeleteReport| {
        assert!(
            r.merges
                .iter()
                .filter(|m| m.upper.is_some())
                .all(|m| m.live != stopped),
            "{r:#?}"
        );
    };

    // 1. A snapshot with two children: its layer stays as their shared base.
    let r = delete(&g, "s2").await;
    assert!(r.merges.is_empty(), "{r:#?}");
    for child in ["s3", "s4"] {
        let m = g.vm.snapshot(&n(child)).await.unwrap();
        assert_eq!(m.parent.as_deref(), Some("s1"), "{child}");
    }
    assert_consistent(&g, &base, "after deleting s2").await;
    all_revert(&g, &ranges, "s5", stopped).await;

    // 2. A leaf on the other branch: its layer goes, and the shared base, now with one child
    //    left, merges into it.
    let r = delete(&g, "s3").await;
    assert!(!r.merges.is_empty(), "{r:#?}");
    check_live(&r);
    assert_consistent(&g, &base, "after deleting s3").await;
    all_revert(&g, &ranges, "s5", stopped).await;

    // 3. A middle snapshot: its child (s5) moves up to s1.
    let r = delete(&g, "s4").await;
    check_live(&r);
    assert_eq!(
        g.vm.snapshot(&n("s5")).await.unwrap().parent.as_deref(),
        Some("s1")
    );
    assert_consistent(&g, &base, "after deleting s4").await;
    all_revert(&g, &ranges, "s5", stopped).await;

    // 4. The current snapshot: the VM keeps its state; current moves to the parent.
    let before = g.vm.status().await.unwrap();
    let r = delete(&g, "s5").await;
    check_live(&r);
    assert_eq!(r.current.as_deref(), Some("s1"));
    let after = g.vm.status().await.unwrap();
    assert_eq!(before.running, after.running);
    if !stopped {
        // The guest ran on through the merge.
        let now = g.last_tick();
        g.tick_above(g.serial().len(), now + 2).await;
        assert!(g.serial().mismatches().is_empty(), "{}", g.report());
    }
    assert_consistent(&g, &base, "after deleting s5").await;
    all_revert(&g, &ranges, "s1", stopped).await;

    // 5. The root (and current) snapshot, the last one: everything merges into the
    //    original image; the VM runs on it alone.
    let r = delete(&g, "s1").await;
    check_live(&r);
    assert_eq!(r.current, None);
    assert_consistent(&g, &base, "after deleting s1").await;
    assert_eq!(images_in(&g.dir), BTreeSet::from([base.clone()]));
    let st = g.vm.status().await.unwrap();
    assert_eq!(st.disks[0].chain, vec![base.clone()]);
    // The state the guest had is still there: it goes on counting from its disk.
    if stopped {
        g.vm.start_with(&g.launcher).await.unwrap();
    }
    let now = g.last_tick();
    g.tick_above(if stopped { 0 } else { g.serial().len() }, now + 2)
        .await;
    assert!(g.serial().mismatches().is_empty(), "{}", g.report());
    g.vm.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_position_of_a_branched_tree_deletes_with_the_vm_running() {
    require_qemu!();
    init_logging();
    every_position(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_position_of_a_branched_tree_deletes_with_the_vm_stopped() {
    require_qemu!();
    init_logging();
    every_position(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_locked_and_hand_edited_snapshots_are_refused_and_change_nothing() {
    require_qemu!();
    init_logging();
    let g = Guest::start(VmBuilder::idle().memory(64), "qcow2").await;
    g.take("s1").await;
    g.take("s2").await;
    let files = images_in(&g.dir);
    let snapshot_dir = g.dir.join("store/vms/g/snapshots");
    let unchanged = || {
        let files = files.clone();
        let g = &g;
        async move {
            assert_eq!(images_in(&g.dir), files);
            let names: Vec<String> = std::fs::read_dir(g.dir.join("store/vms/g/snapshots"))
                .unwrap()
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect();
            assert_eq!(names.len(), 2, "{names:?}");
        }
    };

    // Unknown, and a name that only another VM has.
    let err =
        g.vm.delete_snapshot(&n("nope"), &DeleteOptions::default())
            .await
            .unwrap_err();
    assert!(matches!(err, Error::UnknownSnapshot { .. }), "{err}");
    let other = g
        .engine
        .run(
            &common::v("other"),
            VmBuilder::idle()
                .memory(64)
                .command_line(&g.dir.join("other-serial.log"))
                .await,
            &qsnap_engine::RunOptions::default(),
        )
        .await
        .unwrap();
    let _kill_other = qsnap_testkit::KillRecordedQemu::new(&g.dir.join("store"), "other");
    assert_eq!(other.record.name, "other");
    let other_vm = g.engine.vm(&common::v("other")).await.unwrap();
    let err = other_vm
        .delete_snapshot(&n("s1"), &DeleteOptions::default())
        .await
        .unwrap_err();
    assert!(matches!(err, Error::UnknownSnapshot { .. }), "{err}");
    unchanged().await;

    // Another operation holds the VM.
    let lock = g.vm.store().lock(g.vm.name(), "create s9").await.unwrap();
    let err =
        g.vm.delete_snapshot(&n("s1"), &DeleteOptions::default())
            .await
            .unwrap_err();
    match &err {
        Error::Locked { holder, .. } => assert!(holder.contains("create s9"), "{holder}"),
        other => panic!("expected Locked, got {other}"),
    }
    drop(lock);
    unchanged().await;

    // A manifest edited by hand: an unknown schema, then a missing frozen image, then a
    // memory file outside the store.
    let s1 = snapshot_dir.join("s1.json");
    let original = std::fs::read_to_string(&s1).unwrap();
    let edit = |f: &dyn Fn(&mut serde_json::Value)| {
        let mut v: serde_json::Value = serde_json::from_str(&original).unwrap();
        f(&mut v);
        std::fs::write(&s1, serde_json::to_string_pretty(&v).unwrap()).unwrap();
    };
    edit(&|v| v["schema"] = 99.into());
    let err =
        g.vm.delete_snapshot(&n("s2"), &DeleteOptions::default())
            .await
            .unwrap_err();
    assert!(err.to_string().contains("schema 99"), "{err}");
    let victim = g.dir.join("precious.txt");
    std::fs::write(&victim, b"not qsnap's").unwrap();
    edit(&|v| v["memory"]["file"] = victim.display().to_string().into());
    let err =
        g.vm.delete_snapshot(&n("s1"), &DeleteOptions::default())
            .await
            .unwrap_err();
    assert!(err.to_string().contains("not the store's"), "{err}");
    assert!(victim.exists());
    edit(&|v| v["disks"][0]["image"] = g.dir.join("gone.qcow2").display().to_string().into());
    let err =
        g.vm.delete_snapshot(&n("s2"), &DeleteOptions::default())
            .await
            .unwrap_err();
    assert!(
        matches!(err, Error::Delete(DeleteError::Refused { .. })),
        "{err}"
    );
    assert!(err.to_string().contains("gone.qcow2"), "{err}");
    std::fs::write(&s1, &original).unwrap();
    unchanged().await;
    assert!(g.vm.check(false).await.unwrap().clean);
    g.vm.stop().await.unwrap();
    other_vm.stop().await.unwrap();
}

/// The finding kinds of a check.
/// `check` runs `qemu-img check` on each image qsnap made, as the format its chain reads it
/// (qcow2 here: without opening the chain), and a damaged one is a finding — never "clean".
/// What a check verified is not read again while the file is unchanged (`full` reads it),
/// and a file written since — an image's metadata, a memory file's bytes — is read again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_reports_an_image_it_made_whose_metadata_is_damaged() {
    require_qemu!();
    init_logging();
    let g = Guest::start(VmBuilder::idle().memory(64), "qcow2").await;
    let s1 = g.take("s1").await;
    let s2 = g.take("s2").await;
    // Only a file that had been still for a moment before it was read is remembered (its
    // times come from a coarse clock; `verified.rs`'s unit tests hold that rule).
    tokio::time::sleep(std::time::Duration::from_millis(2500)).await;
    let first = g.vm.check(false).await.unwrap();
    assert!(first.findings.is_empty(), "{:#?}", first.findings);
    // s2's frozen image is the overlay qsnap made at s1; two memory files.
    let frozen = s2.snapshot.disks[0].image.clone();
    let rec = g.vm.store().record(g.vm.name()).await.unwrap();
    assert!(rec.owned_images.contains(&frozen), "{frozen:?}");
    let memory = [&s1, &s2].map(|s| s.snapshot.memory.as_ref().unwrap().file.clone());
    let again = g.vm.check(false).await.unwrap();
    assert!(again.clean, "{:#?}", again.findings);
    assert!(
        again.unchanged >= 3,
        "the frozen image and both memory files were verified by the first check: {} then {}",
        first.unchanged,
        again.unchanged
    );
    let full =
        g.vm.check_with(CheckOptions {
            repair: false,
            full: true,
        })
        .await
        .unwrap();
    assert!(full.clean && full.unchanged == 0, "{full:#?}");

    // Damage after a clean check remembered the files: both are read again, and found.
    qsnap_testkit::disk_io::zero_first_refcount_block(&frozen);
    {
        use std::io::{Seek, SeekFrom, Write};
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .open(&memory[1])
            .unwrap();
        let len = f.metadata().unwrap().len();
        f.seek(SeekFrom::Start(len / 2)).unwrap();
        f.write_all(b"\xa5\x5a\xa5\x5a").unwrap();
    }
    let report = g.vm.check(false).await.unwrap();
    assert!(!report.clean);
    assert!(
        report
            .findings
            .iter()
            .any(|x| x.kind == "corrupt-image" && x.what.contains(&*frozen.to_string_lossy())),
        "{:#?}",
        report.findings
    );
    assert!(
        report
            .findings
            .iter()
            .any(|x| x.kind == "bad-memory" && x.what.contains("snapshot s2")),
        "{:#?}",
        report.findings
    );
    assert!(
        !report
            .findings
            .iter()
            .any(|x| x.what.contains("snapshot s1")),
        "{:#?}",
        report.findings
    );
}

fn kinds(f: &[Finding]) -> Vec<&str> {
    f.iter().map(|f| f.kind.as_str()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctrl_c_cancels_a_merge_cleanly_and_check_repair_finishes_it() {
    require_qemu!();
    init_logging();
    let g = Guest::start(VmBuilder::idle().memory(64), "qcow2").await;
    g.take("s1").await;
    // A layer with data in it, so the merge takes a moment.
    {
        let qmp = g.vm.connect().await.unwrap();
        let disk = qsnap_testkit::disk_io::Disk::Device("vd0".into());
        qsnap_testkit::disk_io::write(&qmp, &disk, 0x5a, 0, 48 * 1024).await;
    }
    g.take("s2").await;
    let layer = g.dir.join("disk.s1.qcow2");
    assert!(layer.exists());

    // Ctrl-C as soon as the merge reports progress: the job is cancelled, no chain changes.
    let cancel = g.engine.cancel_token().clone();
    let opts = DeleteOptions {
        progress: Some(std::sync::Arc::new(move |_| cancel.cancel())),
    };
    let err = g.vm.delete_snapshot(&n("s1"), &opts).await.unwrap_err();
    eprintln!("{err}");
    match &err {
        Error::Delete(DeleteError::MergeUnfinished { problem, .. }) => {
            assert!(matches!(**problem, Error::Cancelled), "{problem}")
        }
        other => panic!("expected MergeUnfinished(Cancelled), got {other}"),
    }
    assert!(err.to_string().contains("check g --repair"), "{err}");
    // The snapshot is gone, its layer is still in the chain, the data is all there. (A new
    // engine: a new `qsnap` command, without the cancelled token.)
    let fresh = qsnap_engine::Engine::new(g.vm.store().clone());
    let vm = fresh.vm(g.vm.name()).await.unwrap();
    assert!(vm.snapshot(&n("s1")).await.is_err());
    assert!(layer.exists());
    let report = vm.check(false).await.unwrap();
    assert!(!report.clean);
    assert_eq!(
        kinds(&report.findings),
        ["unmerged-layer"],
        "{:#?}",
        report.findings
    );
    let report = vm.check(true).await.unwrap();
    assert!(report.clean, "{:#?}", report.findings);
    assert!(!layer.exists());
    assert!(vm.check(false).await.unwrap().findings.is_empty());
    let qmp = vm.connect().await.unwrap();
    let disk = qsnap_testkit::disk_io::Disk::Device("vd0".into());
    qsnap_testkit::disk_io::check(&qmp, &disk, 0x5a, 0, 48 * 1024)
        .await
        .unwrap();
    drop(qmp);
    vm.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_finds_and_repairs_orphans_and_a_record_that_disagrees_with_qemu() {
    require_qemu!();
    init_logging();
    let g = Guest::start(VmBuilder::idle().memory(64), "qcow2").await;
    g.take("s1").await;
    assert!(g.vm.check(false).await.unwrap().findings.is_empty());
    let store = g.vm.store().clone();
    // An orphan memory file, an orphan overlay qsnap made, a stale entry in the record, and
    // a record that names the wrong current image.
    let stray_mem = store.memory_dir(g.vm.name()).join("ghost.mem");
    // (What a crash leaves: qsnap's header, no snapshot naming it.)
    let mut ghost = b"QSNAPMEM".to_vec();
    ghost.resize(4096, 0);
    std::fs::write(&stray_mem, &ghost).unwrap();
    let orphan = g.dir.join("disk.orphan.qcow2");
    image::create_overlay(
        &orphan,
        &g.dir.join("disk.qcow2"),
        "qcow2",
        64 << 20,
        &CancellationToken::new(),
    )
    .await
    .unwrap();
    let mut rec = store.record(g.vm.name()).await.unwrap();
    let truth = rec.disks[0].image.clone();
    rec.owned_images.push(orphan.clone());
    rec.owned_images.push(g.dir.join("never-existed.qcow2"));
    rec.disks[0].image = g.dir.join("disk.qcow2");
    store.write_record(&rec).await.unwrap();

    let report = g.vm.check(false).await.unwrap();
    let mut found = kinds(&report.findings);
    found.sort_unstable();
    assert_eq!(
        found,
        [
            "orphan-image",
            "orphan-memory",
            "stale-record",
            "store-disagrees"
        ],
        "{:#?}",
        report.findings
    );
    assert!(!report.clean);
    assert!(
        stray_mem.exists() && orphan.exists(),
        "check without --repair changed files"
    );

    let report = g.vm.check(true).await.unwrap();
    assert!(report.clean, "{:#?}", report.findings);
    assert!(!stray_mem.exists() && !orphan.exists());
    let rec = store.record(g.vm.name()).await.unwrap();
    assert_eq!(rec.disks[0].image, truth);
    assert!(g.vm.check(false).await.unwrap().findings.is_empty());
    // The snapshot still reverts.
    let vm = g.engine.vm(g.vm.name()).await.unwrap();
    vm.revert(&SnapshotName::new("s1").unwrap(), false)
        .await
        .unwrap();
    vm.stop().await.unwrap();
    let _ = Duration::ZERO;
}

/// The chain of every image in the directory (image → its backing), from the files.
async fn chains(dir: &Path) -> BTreeMap<PathBuf, Option<PathBuf>> {
    let mut out = BTreeMap::new();
    for f in images_in(dir) {
        let info = image::info(&f, &CancellationToken::new()).await.unwrap();
        out.insert(f, info.full_backing_filename);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multi_disk_deletes_merge_every_disk_or_none_live_and_offline() {
    require_qemu!();
    init_logging();
    use qsnap_testkit::disk_io::{check, write, Disk};
    let _fp = qsnap_testkit::failpoints();
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a.qcow2");
    let b = dir.path().join("b.raw");
    qsnap_testkit::create_image(&a, "qcow2", "32M").await;
    qsnap_testkit::create_image(&b, "raw", "32M").await;
    let builder = VmBuilder::idle()
        .memory(64)
        .disk(&a, "qcow2", qsnap_testkit::DiskStyle::Drive)
        .disk(&b, "raw", qsnap_testkit::DiskStyle::Blockdev);
    let g = Guest::start_in(dir, builder).await;
    let disks = [Disk::Drive("drive0".into()), Disk::Device("vd1".into())];
    // Each snapshot step writes its own pattern at its own offset on both disks.
    let put = |step: u8| {
        let g = &g;
        let disks = disks.clone();
        async move {
            let qmp = g.vm.connect().await.unwrap();
            for (i, d) in disks.iter().enumerate() {
                let pattern = 0x10 * (u8::try_from(i).unwrap() + 1) + step;
                write(&qmp, d, pattern, u64::from(step) * 64, 64).await;
            }
        }
    };
    // Steps 1..=upto written, later ones not (zeroes).
    let holds = |upto: u8| {
        let g = &g;
        let disks = disks.clone();
        async move {
            let qmp = g.vm.connect().await.unwrap();
            for (i, d) in disks.iter().enumerate() {
                for step in 1..=3u8 {
                    let pattern = if step <= upto {
                        0x10 * (u8::try_from(i).unwrap() + 1) + step
                    } else {
                        0
                    };
                    check(&qmp, d, pattern, u64::from(step) * 64, 64)
                        .await
                        .unwrap_or_else(|e| panic!("after step {upto}: {e}"));
                }
            }
        }
    };
    put(1).await;
    g.take("s1").await;
    put(2).await;
    let mut opts = g.vm.create_options(n("s2"));
    opts.mode = Some(qsnap_engine::snapshot::Mode::DiskOnly);
    g.vm.create_snapshot(opts).await.unwrap();
    put(3).await;
    g.take("s3").await;

    // A delete whose merge fails after the first disk's part started: the snapshot is gone,
    // and neither disk's chain changed. Returns the chains.
    let fails_changing_no_chain = |snap: &'static str| {
        let g = &g;
        async move {
            let before = chains(&g.dir).await;
            fail::cfg("delete.merge-started", "return(error)").unwrap();
            let err =
                g.vm.delete_snapshot(&n(snap), &DeleteOptions::default())
                    .await
                    .unwrap_err();
            fail::remove("delete.merge-started");
            assert!(
                matches!(err, Error::Delete(DeleteError::MergeUnfinished { .. })),
                "{err}"
            );
            assert_eq!(chains(&g.dir).await, before, "a disk's chain changed");
            before
        }
    };

    // Live.
    let before = fails_changing_no_chain("s2").await;
    holds(3).await;
    // The repair merges both.
    let report = g.vm.check(true).await.unwrap();
    assert!(report.clean, "{:#?}", report.findings);
    assert!(images_in(&g.dir).len() < before.len());
    holds(3).await;
    for (snap, upto) in [("s1", 1), ("s3", 3)] {
        let r = g.vm.revert(&n(snap), false).await.unwrap();
        assert!(r.resumed);
        holds(upto).await;
    }

    // Offline: the same, with qemu-img; a failure after the first disk's copy is undone.
    g.vm.stop().await.unwrap();
    fails_changing_no_chain("s1").await;
    let report = g.vm.check(true).await.unwrap();
    assert!(report.clean, "{:#?}", report.findings);
    g.vm.start_with(&g.launcher).await.unwrap();
    holds(3).await;
    g.vm.revert(&n("s3"), false).await.unwrap();
    holds(3).await;

    // A finalize QEMU refuses for the second disk (the first one's went through): no job is
    // left pending with its disk's I/O drained, the guest reads and writes both disks, and
    // the repair finishes the merge.
    g.take("s4").await;
    fail::cfg("delete.finalize", "1*off->return(error)").unwrap();
    let err =
        g.vm.delete_snapshot(&n("s3"), &DeleteOptions::default())
            .await
            .unwrap_err();
    fail::remove("delete.finalize");
    assert!(
        matches!(err, Error::Delete(DeleteError::MergeUnfinished { .. })),
        "{err}"
    );
    let qmp = g.vm.connect().await.unwrap();
    let jobs = qmp.execute_raw("query-jobs", None).await.unwrap();
    assert_eq!(jobs, serde_json::json!([]), "a merge job was left behind");
    drop(qmp);
    holds(3).await;
    put(3).await;
    let report = g.vm.check(true).await.unwrap();
    assert!(report.clean, "{:#?}", report.findings);
    holds(3).await;
    // A finalize that ran but whose answer timed out: the job concludes by itself, and the
    // delete succeeds.
    fail::cfg("delete.finalize-sent", "1*return(timeout)").unwrap();
    let done =
        g.vm.delete_snapshot(&n("s4"), &DeleteOptions::default())
            .await;
    fail::remove("delete.finalize-sent");
    done.unwrap();
    holds(3).await;
    assert!(g.vm.check(false).await.unwrap().clean);

    // Everything goes: the VM keeps running on its two original images, with all its data.
    let r = g.vm.delete_all(&DeleteOptions::default()).await.unwrap();
    assert!(r.current.is_none());
    assert!(g.vm.snapshots().await.unwrap().is_empty());
    assert_eq!(images_in(&g.dir), BTreeSet::from([a.clone(), b.clone()]));
    holds(3).await;
    let st = g.vm.status().await.unwrap();
    assert!(st.running);
    assert_eq!(st.disks[0].chain, vec![a.clone()]);
    assert_eq!(st.disks[1].chain, vec![b.clone()]);
    assert!(g.vm.check(false).await.unwrap().findings.is_empty());
    g.vm.stop().await.unwrap();
    // And after a restart from the recorded command line (raw stays raw).
    g.vm.start_with(&g.launcher).await.unwrap();
    holds(3).await;
    g.vm.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_cancelled_half_way_leaves_every_snapshot_revertible() {
    require_qemu!();
    init_logging();
    use qsnap_testkit::disk_io::{check, write, Disk};
    let _fp = qsnap_testkit::failpoints();
    let g = Guest::start(VmBuilder::idle().memory(64), "qcow2").await;
    let vd0 = Disk::Device("vd0".into());
    g.take("s1").await;
    write(&g.vm.connect().await.unwrap(), &vd0, 0x5a, 0, 48 * 1024).await;
    g.take("s2").await;
    write(&g.vm.connect().await.unwrap(), &vd0, 0x33, 60 * 1024, 1024).await;
    g.take("s3").await;
    // Deleting s2 streams its layer (48 MiB) into s3's frozen image. Ctrl-C once that image
    // has taken in some of it.
    let upper = g.dir.join("disk.s2.qcow2");
    let initial = std::fs::metadata(&upper).unwrap().len();
    let cancel = g.engine.cancel_token().clone();
    let watched = upper.clone();
    fail::cfg_callback("delete.merge-started", move || {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while std::fs::metadata(&watched).map_or(0, |m| m.len()) < initial + (4 << 20)
            && std::time::Instant::now() < deadline
        {
            std::thread::yield_now();
        }
        cancel.cancel();
    })
    .unwrap();
    // And restamping the snapshots whose image the stream wrote into fails: the round stays
    // journaled (a cancel normally clears it) so that the repair redoes it and restamps.
    fail::cfg("delete.restamp", "return(error)").unwrap();
    let err =
        g.vm.delete_snapshot(&n("s2"), &DeleteOptions::default())
            .await
            .unwrap_err();
    fail::remove("delete.merge-started");
    fail::remove("delete.restamp");
    assert!(
        matches!(&err, Error::Delete(DeleteError::MergeUnfinished { problem, .. })
            if matches!(&**problem, Error::StoreBehind { cause, .. } if matches!(**cause, Error::Cancelled))),
        "{err}"
    );
    assert!(
        g.vm.store().journal(g.vm.name()).await.unwrap().is_some(),
        "the round must stay journaled"
    );
    assert!(
        std::fs::metadata(&upper).unwrap().len() > initial,
        "nothing was copied"
    );
    // s3's frozen image took in data (its content as a chain did not change): it still
    // reverts.
    let fresh = qsnap_engine::Engine::new(g.vm.store().clone());
    let vm = fresh.vm(g.vm.name()).await.unwrap();
    let report = vm.check(true).await.unwrap();
    assert!(report.clean, "{:#?}", report.findings);
    vm.revert(&n("s3"), false)
        .await
        .unwrap_or_else(|e| panic!("s3 after a cancelled stream: {e}"));
    let qmp = vm.connect().await.unwrap();
    check(&qmp, &vd0, 0x5a, 0, 48 * 1024).await.unwrap();
    check(&qmp, &vd0, 0x33, 60 * 1024, 1024).await.unwrap();
    drop(qmp);
    let report = vm.check(true).await.unwrap();
    assert!(report.clean, "{:#?}", report.findings);
    vm.revert(&n("s1"), false).await.unwrap();
    let qmp = vm.connect().await.unwrap();
    check(&qmp, &vd0, 0, 0, 48 * 1024).await.unwrap();
    drop(qmp);
    vm.revert(&n("s3"), false).await.unwrap();
    let qmp = vm.connect().await.unwrap();
    check(&qmp, &vd0, 0x5a, 0, 48 * 1024).await.unwrap();
    drop(qmp);
    vm.stop().await.unwrap();
}

/// The node list told from QEMU's block graph is QEMU's full listing, for the layouts qsnap
/// itself makes (overlays added with `blockdev-add` and switched to, layers merged away).
async fn nodes_agree(g: &Guest, when: &str) {
    let qmp = g.vm.connect().await.unwrap();
    let sorted = |mut nodes: Vec<blocks::Node>| {
        nodes.sort_by(|a, b| a.name.cmp(&b.name));
        nodes
    };
    let disks = blocks::read(&qmp).await.unwrap();
    let told = blocks::nodes_from_graph(&qmp, &disks)
        .await
        .unwrap_or_else(|| panic!("{when}: qsnap's own layout is not explained by its chains"));
    let full = blocks::nodes(&qmp).await.unwrap();
    assert_eq!(sorted(told), sorted(full), "{when}");
}

/// A snapshot deleted and taken again under the same name: its first overlay is the VM's
/// current disk now (the layer below it merged up into it), so the new one is named `….s1-2.qcow2`
/// rather than refused or written over — live and with the VM stopped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_name_taken_again_after_its_delete_gets_a_free_overlay_name() {
    require_qemu!();
    init_logging();
    let g = Guest::start(VmBuilder::idle().memory(64), "qcow2").await;
    nodes_agree(&g, "as launched").await;
    g.take("s0").await;
    let first = g.take("s1").await.snapshot.disks[0].overlay.clone();
    nodes_agree(&g, "after two snapshots").await;
    assert!(first.to_string_lossy().ends_with(".s1.qcow2"), "{first:?}");
    g.vm.delete_snapshot(&n("s1"), &DeleteOptions::default())
        .await
        .unwrap();
    let current = |g: &Guest| {
        let g = g.vm.store().clone();
        async move { g.record(&v("g")).await.unwrap().disks[0].image.clone() }
    };
    assert_eq!(
        current(&g).await,
        first,
        "the VM writes to the first overlay"
    );
    nodes_agree(&g, "after a delete").await;
    let written = std::fs::read(&first).unwrap();

    let again = g.take("s1").await.snapshot.disks[0].overlay.clone();
    assert!(
        again.to_string_lossy().ends_with(".s1-2.qcow2"),
        "{again:?}"
    );
    assert_eq!(current(&g).await, again);
    assert_eq!(
        std::fs::read(&first).unwrap(),
        written,
        "the first overlay was written over"
    );

    // Stopped: the same, through the offline path.
    g.vm.stop().await.unwrap();
    let offline = |name: &'static str| {
        let mut opts = g.vm.create_options(n(name));
        opts.mode = Some(qsnap_engine::snapshot::Mode::DiskOnly);
        let vm = &g.vm;
        async move {
            vm.create_snapshot(opts).await.unwrap().snapshot.disks[0]
                .overlay
                .clone()
        }
    };
    let t = offline("t").await;
    assert!(t.to_string_lossy().ends_with(".t.qcow2"), "{t:?}");
    g.vm.delete_snapshot(&n("t"), &DeleteOptions::default())
        .await
        .unwrap();
    assert_eq!(current(&g).await, t);
    let t2 = offline("t").await;
    assert!(t2.to_string_lossy().ends_with(".t-2.qcow2"), "{t2:?}");
    assert_eq!(current(&g).await, t2);
    let report = g.vm.check(false).await.unwrap();
    assert!(report.clean, "{report:?}");
}

/// QEMU's `query-block` nests a disk's backing chain one object per image, and JSON parsers
/// stop at 128 levels by default: a VM whose chain had grown past about 120 images could no
/// longer be snapshotted, checked or deleted from (every look waited 30 s for an answer it had
/// thrown away). A chain of 140 is read, snapshotted, checked and shortened live.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backing_chain_deeper_than_json_parsers_allow_is_snapshotted_checked_and_deleted() {
    require_qemu!();
    init_logging();
    const LAYERS: usize = 140;
    let (g, layer) = on_a_long_chain(LAYERS).await;
    let top = layer(LAYERS - 1);
    let qmp = g.vm.connect().await.unwrap();
    let disks = blocks::read(&qmp).await.unwrap();
    drop(qmp);
    let chain = &disks[0].medium.as_ref().expect("a medium").chain;
    assert_eq!(chain.len(), LAYERS, "the whole chain is read");
    assert_eq!(
        (chain[0].image.as_path(), chain[LAYERS - 1].image.as_path()),
        (top.as_path(), layer(0).as_path())
    );
    nodes_agree(&g, "as launched").await;

    g.take("s1").await;
    g.take("s2").await;
    let report = g.vm.check(false).await.unwrap();
    assert!(report.clean, "{:#?}", report.findings);
    delete(&g, "s1").await;
    nodes_agree(&g, "after a delete").await;
    let report = g.vm.check(false).await.unwrap();
    assert!(report.clean, "after a delete: {:#?}", report.findings);
    assert_eq!(g.vm.snapshots().await.unwrap().len(), 1, "s2 is left");
}

/// An idle VM whose one disk (a `-drive`) is the top of `layer000.qcow2` ← `layer001.qcow2`
/// ← … (`n` images) in its test directory; and where layer `i` is.
async fn on_a_long_chain(n: usize) -> (Guest, impl Fn(usize) -> PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_owned();
    let layer = move |i: usize| root.join(format!("layer{i:03}.qcow2"));
    qsnap_testkit::create_image(&layer(0), "qcow2", "16M").await;
    for i in 1..n {
        // (-u: the backing is not opened, each image is made in a few ms)
        let made = tokio::process::Command::new("qemu-img")
            .args(["create", "-q", "-u", "-f", "qcow2", "-F", "qcow2", "-b"])
            .arg(layer(i - 1))
            .arg(layer(i))
            .arg("16M")
            .status()
            .await
            .unwrap();
        assert!(made.success(), "qemu-img create layer {i}");
    }
    let g = Guest::start_in(
        dir,
        VmBuilder::idle()
            .memory(64)
            .disk(layer(n - 1), "qcow2", qsnap_testkit::DiskStyle::Drive),
    )
    .await;
    (g, layer)
}

/// The longest chain qsnap lets a snapshot make (496 images: QEMU's answer nests about 502
/// deep, within the 512 qsnap reads) is made and read — by `check`, on the test's 2 MiB stacks
/// of a debug build — and a snapshot that would make it longer is refused, live and offline,
/// with nothing made: past it, no look at the running VM could read QEMU's answer, not even
/// the delete that would shorten the chain.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_past_the_longest_readable_chain_is_refused_and_nothing_is_made() {
    require_qemu!();
    init_logging();
    const LAYERS: usize = 495;
    let (g, _) = on_a_long_chain(LAYERS).await;
    let disk_only = |name: &str| {
        let mut opts = g.vm.create_options(n(name));
        opts.mode = Some(qsnap_engine::snapshot::Mode::DiskOnly);
        opts
    };
    // The 496th image: the longest chain allowed.
    g.vm.create_snapshot(disk_only("s0")).await.unwrap();
    let report = g.vm.check(false).await.unwrap();
    assert!(report.clean, "{:#?}", report.findings);
    let qmp = g.vm.connect().await.unwrap();
    let disks = blocks::read(&qmp).await.unwrap();
    drop(qmp);
    assert_eq!(disks[0].medium.as_ref().unwrap().chain.len(), LAYERS + 1);

    let before = images_in(&g.dir);
    let refused = |e: Error| match e {
        Error::DiskNotSnapshottable { why, .. } => {
            assert!(why.contains("496 images long"), "{why}");
        }
        other => panic!("not refused as too long: {other}"),
    };
    refused(g.vm.create_snapshot(disk_only("s1")).await.unwrap_err());
    assert_eq!(images_in(&g.dir), before, "a refused snapshot made a file");
    assert_eq!(g.vm.snapshots().await.unwrap().len(), 1);

    g.vm.stop().await.unwrap();
    refused(g.vm.create_snapshot(disk_only("s1")).await.unwrap_err());
    assert_eq!(
        images_in(&g.dir),
        before,
        "a refused offline snapshot made a file"
    );
    let report = g.vm.check(false).await.unwrap();
    assert!(report.clean, "after the refusals: {:#?}", report.findings);
}
