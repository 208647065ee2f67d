//! The store never disagrees with QEMU, and nothing qsnap does on a failure path loses the
//! guest's writes: a QMP command that timed out but ran is undone from what QEMU did; a
//! merge-back that fails leaves the record on the overlay QEMU writes to; a failure after the
//! point of no return is "snapshot taken, but …" and is finished by a repair; a busy monitor
//! is never taken for a stopped VM; another user's QEMU is not adopted by accident; an
//! unreadable store is an error, not "absent"; files qsnap makes are private.
// Plants damage through the store writers and reads qemu-img directly: test builds only.
#![cfg(feature = "testing")]

use qsnap_engine::testing::{blocks, StoreWriters};
use qsnap_engine::{AttachOptions, CreateError, Engine, Error, Store, VmState};
use qsnap_testkit::{create_image, init_logging, require_qemu, DiskStyle, VmBuilder};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

mod common;
use common::{n, v, Guest};

/// The image QEMU writes disk `device` to now.
async fn qemu_top(g: &Guest, device: &str) -> PathBuf {
    let qmp = g.vm.connect().await.unwrap();
    blocks::read(&qmp)
        .await
        .unwrap()
        .into_iter()
        .find(|d| d.device == device)
        .and_then(|d| d.top().map(Path::to_owned))
        .unwrap()
}

async fn record_top(g: &Guest) -> PathBuf {
    g.vm.store().record(g.vm.name()).await.unwrap().disks[0]
        .image
        .clone()
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

/// A create with failpoints set (`(point, action)`): its error.
async fn create_failing(g: &Guest, points: &[(&str, &str)], name: &str) -> Error {
    for (point, action) in points {
        fail::cfg(*point, &format!("return({action})")).unwrap();
    }
    let result = g.vm.create_snapshot(g.vm.create_options(n(name))).await;
    for (point, _) in points {
        fail::remove(*point);
    }
    match result {
        Ok(_) => panic!("create {name} succeeded despite {points:?}"),
        Err(e) => e,
    }
}

async fn ticks_on(g: &Guest) {
    let now = g.last_tick();
    g.tick_above(g.serial().len(), now + 2).await;
    assert!(g.serial().mismatches().is_empty(), "{}", g.report());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_around_the_switch_follow_what_qemu_did_and_the_record_follows_qemu() {
    require_qemu!();
    init_logging();
    let _fp = qsnap_testkit::failpoints();
    // A running guest is all this test needs: a fork of the shared golden snapshot.
    let g = Guest::fork().await;
    let base = g.base.clone();
    g.tick_above(0, 3).await;

    // 1. The disk switch ran, but its answer "timed out": the overlay the guest now writes
    //    to must be merged back, never deleted under it.
    let err = create_failing(&g, &[("create.switch-sent", "timeout")], "t1").await;
    eprintln!("switch timed out: {err}");
    assert!(
        err.is_timeout() || err.to_string().contains("timeout"),
        "{err}"
    );
    assert_eq!(
        qemu_top(&g, "vd0").await,
        base,
        "the disk was not merged back"
    );
    assert_eq!(record_top(&g).await, base);
    assert!(!g.disk_dir().join("disk.t1.qcow2").exists());
    assert!(g.vm.snapshots().await.unwrap().is_empty());
    ticks_on(&g).await;

    // 2. `stop` ran, but its answer "timed out": the guest must be running again.
    let err = create_failing(&g, &[("create.stop-sent", "timeout")], "t2").await;
    eprintln!("stop timed out: {err}");
    match g.vm.status().await.unwrap().state {
        VmState::Running { runstate, .. } => assert_eq!(runstate, "running"),
        other => panic!("{other:?}"),
    }
    ticks_on(&g).await;

    // 3. The save fails after the switch and merging back fails too: the disk stays on the
    //    overlay, the error names it, and the record says so before the error returns.
    let err = create_failing(
        &g,
        &[("create.saved", "error"), ("rollback.merge-back", "error")],
        "t3",
    )
    .await;
    eprintln!("merge-back failed: {err}");
    let overlay = g.disk_dir().join("disk.t3.qcow2");
    assert_eq!(err.kept_overlays(), [("vd0".to_owned(), overlay.clone())]);
    assert!(err.to_string().contains("rollback was incomplete"), "{err}");
    assert_eq!(qemu_top(&g, "vd0").await, overlay);
    let rec = g.vm.store().record(g.vm.name()).await.unwrap();
    assert_eq!(rec.disks[0].image, overlay);
    assert!(rec.owned_images.contains(&overlay));
    assert!(g.vm.store().journal(g.vm.name()).await.unwrap().is_none());
    assert!(!g.vm.store().memory_path(g.vm.name(), &n("t3")).exists());
    // The store agrees with QEMU, so check has nothing to say but that the overlay's base is
    // a layer it could merge (no snapshot needs it).
    let report = g.vm.check(false).await.unwrap();
    assert!(
        report.findings.iter().all(|f| f.kind == "unmerged-layer"),
        "{:#?}",
        report.findings
    );
    ticks_on(&g).await;
    // A restart opens the overlay: the guest finds every tick it made durable.
    let last = g.last_tick();
    g.vm.stop().await.unwrap();
    g.vm.start_with(&g.launcher).await.unwrap();
    let (_, counter) = g
        .serial()
        .wait_from(0, Duration::from_secs(90), |l| {
            l.strip_prefix("qsnap-guest: ready counter=")
                .and_then(|x| x.trim().parse::<u64>().ok())
        })
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", g.report()));
    assert!(
        counter >= last,
        "disk says {counter}, the guest had printed {last}"
    );
    g.tick_above(0, counter + 1).await;
    assert!(g.serial().mismatches().is_empty(), "{}", g.report());

    // 4. Past the point of no return, the store cannot be written: "snapshot taken, but",
    //    the record already follows QEMU, and a repair finishes the bookkeeping.
    let before = g.last_tick();
    let err = create_failing(&g, &[("create.recorded", "error")], "s1").await;
    let after = g
        .serial()
        .wait_new_tick(Duration::from_secs(30))
        .await
        .unwrap();
    eprintln!("after the point of no return: {err}");
    assert!(
        matches!(err, Error::Create(CreateError::TakenBut { .. })),
        "{err}"
    );
    let text = err.to_string();
    assert!(
        text.contains("snapshot s1 was taken")
            && text.contains(&format!("qsnap check {} --repair", g.vm.name())),
        "{text}"
    );
    let s1_overlay = g.disk_dir().join("disk.s1.qcow2");
    assert_eq!(qemu_top(&g, "vd0").await, s1_overlay);
    assert_eq!(record_top(&g).await, s1_overlay);
    assert!(g.vm.snapshot(&n("s1")).await.is_err(), "no manifest yet");
    let report = g.vm.check(false).await.unwrap();
    assert!(
        report.findings.iter().any(|f| f.kind == "interrupted"),
        "{:#?}",
        report.findings
    );
    let report = g.vm.check(true).await.unwrap();
    assert!(report.clean, "{:#?}", report.findings);
    let m = g.vm.snapshot(&n("s1")).await.unwrap();
    assert_eq!(m.snapshot.disks[0].overlay, s1_overlay);
    // It is a real snapshot: the guest goes back to its instant.
    let now = g.last_tick();
    g.tick_above(g.serial().len(), now + 3).await;
    g.revert_and_check("s1", (before, after)).await;

    // Every file qsnap made for the guest's disk is private.
    let rec = g.vm.store().record(g.vm.name()).await.unwrap();
    for img in &rec.owned_images {
        if img.exists() {
            assert_eq!(mode(img), 0o600, "{}", img.display());
        }
    }
    assert_eq!(mode(&m.snapshot.memory.unwrap().file), 0o600);
    g.vm.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_monitor_is_unreachable_and_start_never_launches_a_second_qemu() {
    require_qemu!();
    init_logging();
    let g = Guest::start(VmBuilder::idle().memory(64), "qcow2").await;
    // A snapshot to revert to: the revert below must be refused for the busy monitor, not
    // for a snapshot that does not exist.
    g.take("s0").await;
    let pid = g.vm.status().await.unwrap().pid.unwrap();
    // Another client holds the monitor (QEMU serves one at a time).
    let holder = g.vm.connect().await.unwrap();
    let st = g.vm.status().await.unwrap();
    match &st.state {
        VmState::Unreachable { pid: Some(p), .. } => assert_eq!(*p, pid),
        other => panic!("a busy monitor must not look stopped: {other:?}"),
    }
    // Its QEMU runs: `running` says so (`state` says its monitor does not answer).
    assert!(st.running);
    let err = g.vm.start_with(&g.launcher).await.unwrap_err();
    assert!(matches!(err, Error::Unreachable { .. }), "{err}");
    assert!(err.to_string().contains("does not answer"), "{err}");
    let err =
        g.vm.create_snapshot(g.vm.create_options(n("s1")))
            .await
            .unwrap_err();
    assert!(matches!(err, Error::Unreachable { .. }), "{err}");
    let err = g.vm.revert(&n("s0"), false).await.unwrap_err();
    assert!(matches!(err, Error::Unreachable { .. }), "{err}");
    // Still the one QEMU, serving its socket once the other client lets go.
    drop(holder);
    let qmp = g.vm.connect().await.unwrap();
    assert_eq!(qmp.peer_pid(), Some(pid));
    drop(qmp);
    assert!(g.vm.status().await.unwrap().running);
    // `stop` works on a QEMU whose monitor does not answer (it is killed).
    let holder = g.vm.connect().await.unwrap();
    g.vm.stop().await.unwrap();
    drop(holder);
    let state = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    assert!(
        state.is_empty() || state.contains(") Z"),
        "QEMU {pid} still runs: {state}"
    );
    assert!(matches!(
        g.vm.status().await.unwrap().state,
        VmState::Stopped
    ));
}

#[tokio::test]
async fn an_unreadable_store_is_an_error_never_absent() {
    require_qemu!();
    init_logging();
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("d.qcow2");
    create_image(&disk, "qcow2", "16M").await;
    let vm = VmBuilder::idle()
        .disk(&disk, "qcow2", DiskStyle::Drive)
        .spawn()
        .await;
    let engine = Engine::new(Store::new(dir.path().join("store")));
    let handle = engine
        .attach(&v("vm1"), vm.qmp_path.to_str().unwrap())
        .await
        .unwrap();
    // The snapshots directory cannot be read (a regular file stands in its way): "is the
    // name taken?" has no answer, so the create must stop before anything changes — not
    // take the snapshot and fail to record it.
    std::fs::write(dir.path().join("store/vms/vm1/snapshots"), b"in the way").unwrap();
    let err = handle
        .create_snapshot(handle.create_options(n("s1")))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Io { .. }), "{err}");
    assert!(!dir.path().join("d.s1.qcow2").exists());
    let qmp = vm.qmp().await;
    let top = blocks::read(&qmp).await.unwrap()[0]
        .top()
        .unwrap()
        .to_owned();
    assert_eq!(top, disk);
    drop(qmp);
    // A store root that is not a directory: attaching says so instead of "no such VM".
    let file_root = dir.path().join("not-a-dir");
    std::fs::write(&file_root, b"x").unwrap();
    let err = Engine::new(Store::new(&file_root))
        .attach(&v("vm2"), vm.qmp_path.to_str().unwrap())
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Io { .. }), "{err}");
}

#[tokio::test]
async fn another_users_qemu_is_refused_unless_asked_for() {
    require_qemu!();
    init_logging();
    if !qsnap_testkit::root_or_skip("another_users_qemu_is_refused_unless_asked_for") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    let sock = dir.path().join("qmp.sock");
    // QEMU as `nobody`, as another user's VM would run.
    let mut child = tokio::process::Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(qsnap_testkit::qemu_binary())
        .args(["-nodefaults", "-display", "none", "-m", "32", "-qmp"])
        .arg(format!("unix:{},server=on,wait=off", sock.display()))
        .kill_on_drop(true)
        .spawn()
        .expect("setpriv (util-linux) starts QEMU as nobody");
    let engine = Engine::new(Store::new(dir.path().join("store")));
    let engine = engine.with_connect_options(qsnap_qmp::ConnectOptions {
        connect_retry: Duration::from_secs(10),
        ..qsnap_qmp::ConnectOptions::default()
    });
    let err = engine
        .attach(&v("theirs"), sock.to_str().unwrap())
        .await
        .unwrap_err();
    match &err {
        Error::ForeignQemu { uid, ours } => assert_eq!((*uid, *ours), (65534, 0)),
        other => panic!("expected ForeignQemu, got {other}"),
    }
    assert!(err.to_string().contains("--allow-other-user"), "{err}");
    assert!(!engine.store().has_vm(&v("theirs")).await.unwrap());
    let vm = engine
        .attach_with(
            &v("theirs"),
            sock.to_str().unwrap(),
            &AttachOptions {
                allow_other_user: true,
            },
        )
        .await
        .unwrap();
    assert!(vm.record().pid.is_some());
    let _ = child.start_kill();
    let _ = child.wait().await;
}

/// base ← mid ← top, qcow2 over qcow2.
async fn chain_of_three(base: &Path, mid: &Path, top: &Path) {
    create_image(base, "qcow2", "16M").await;
    for (upper, lower) in [(mid, base), (top, mid)] {
        let made = tokio::process::Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b"])
            .arg(lower)
            .arg(upper)
            .status()
            .await
            .unwrap();
        assert!(made.success());
    }
}

/// QEMU (10.0.2) dies of a NULL pointer when asked for its block nodes while a block-stream
/// job has ended (finished or cancelled) but is not dismissed — the state a qsnap killed
/// between a merge's finalize and its dismiss leaves. qsnap's own such job is dismissed
/// before the listing; anyone else's is refused. Commit jobs in that state are harmless, and
/// are left alone. QEMU lives through all of it.
#[tokio::test]
async fn an_ended_stream_job_never_makes_listing_the_nodes_crash_qemu() {
    require_qemu!();
    init_logging();
    #[derive(Debug, PartialEq)]
    enum Way {
        Stream,
        CancelledStream,
        Commit,
        ActiveCommit,
    }
    async fn status(qmp: &qsnap_qmp::Qmp) -> String {
        let jobs = qmp.execute_raw("query-jobs", None).await.unwrap();
        jobs[0]["status"].as_str().unwrap_or("gone").to_owned()
    }
    let dir = tempfile::tempdir().unwrap();
    for (job, way) in [
        ("qsnap-merge-1-0", Way::Stream),
        ("qsnap-merge-2-0", Way::CancelledStream),
        ("theirs", Way::Stream),
        ("their-commit", Way::Commit),
        ("their-active-commit", Way::ActiveCommit),
    ] {
        let what = format!("{job} ({way:?})");
        // base <- mid <- top, the VM on top.
        let image = |layer: &str| dir.path().join(format!("{job}.{layer}.qcow2"));
        chain_of_three(&image("base"), &image("mid"), &image("top")).await;
        let vm = VmBuilder::idle()
            .disk(image("top"), "qcow2", DiskStyle::Blockdev)
            .spawn()
            .await;
        let qmp = vm.qmp().await;
        // No job yet: listing is safe, and names the lower layers' nodes.
        let nodes = blocks::nodes(&qmp).await.unwrap();
        let node = |layer: &str| {
            blocks::format_node_for(&nodes, &image(layer))
                .unwrap_or_else(|| panic!("{what}: no node for {layer}: {nodes:?}"))
                .name
                .clone()
        };
        let (command, args) = match way {
            Way::Stream | Way::CancelledStream => (
                "block-stream",
                serde_json::json!({ "device": "disk0", "speed": if way == Way::Stream { 0 } else { 1 } }),
            ),
            Way::Commit => (
                "block-commit",
                serde_json::json!({ "device": "disk0", "top-node": node("mid"), "base-node": node("base") }),
            ),
            Way::ActiveCommit => (
                "block-commit",
                serde_json::json!({ "device": "disk0", "base-node": node("mid") }),
            ),
        };
        let mut args = args;
        args["job-id"] = job.into();
        args["auto-finalize"] = false.into();
        args["auto-dismiss"] = false.into();
        qmp.execute_raw(command, Some(args)).await.unwrap();
        let id = serde_json::json!({ "id": job });
        if way == Way::CancelledStream {
            qmp.execute_raw("job-cancel", Some(id.clone()))
                .await
                .unwrap();
        }
        let mut waited = 0;
        loop {
            match status(&qmp).await.as_str() {
                "ready" => drop(qmp.execute_raw("job-complete", Some(id.clone())).await),
                "pending" => drop(qmp.execute_raw("job-finalize", Some(id.clone())).await),
                "concluded" => break,
                _ => {}
            }
            assert!(waited < 200, "{what}: never concluded");
            tokio::time::sleep(Duration::from_millis(50)).await;
            waited += 1;
        }
        let listed = blocks::nodes(&qmp).await;
        match way {
            Way::Stream | Way::CancelledStream if job.starts_with("qsnap-merge-") => {
                let nodes = listed.unwrap();
                assert!(nodes.iter().any(|n| n.image == image("top")), "{nodes:?}");
                assert_eq!(status(&qmp).await, "gone", "{what} was not dismissed");
            }
            Way::Stream | Way::CancelledStream => {
                let err = listed.unwrap_err();
                assert!(matches!(err, Error::ForeignJob { .. }), "{err}");
                assert!(err.to_string().contains(job), "{err}");
                assert!(err.to_string().contains("job-dismiss"), "{err}");
                assert_eq!(status(&qmp).await, "concluded", "{what} is not ours");
            }
            Way::Commit | Way::ActiveCommit => {
                assert!(listed.is_ok(), "{what}: {listed:?}");
                assert_eq!(status(&qmp).await, "concluded", "{what} is not ours");
            }
        }
        // QEMU is alive and answers.
        let st = qmp.execute_raw("query-status", None).await;
        assert!(st.is_ok(), "{what}: QEMU died: {st:?}");
        if job == "theirs" {
            // `check` says what stands in the way, and stops there rather than guess.
            drop(qmp);
            let engine = Engine::new(Store::new(dir.path().join("store")));
            let handle = engine
                .attach(&v("vm1"), vm.qmp_path.to_str().unwrap())
                .await
                .unwrap();
            let report = handle.check(false).await.unwrap();
            assert!(!report.clean, "{report:?}");
            let finding = report.findings.last().unwrap();
            assert_eq!(finding.kind, "unreadable-qemu", "{report:?}");
            assert!(finding.what.contains("theirs"), "{report:?}");
            let st = vm.qmp().await.execute_raw("query-status", None).await;
            assert!(st.is_ok(), "{what}: QEMU died: {st:?}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hand_edited_records_never_make_qsnap_delete_a_file() {
    require_qemu!();
    init_logging();
    let g = Guest::start(VmBuilder::idle().memory(64), "qcow2").await;
    g.take("s1").await;
    let base = g.dir.join("disk.qcow2");
    let precious = g.dir.join("precious.txt");
    std::fs::write(&precious, b"someone's data").unwrap();
    let linked = g.dir.join("link.qcow2");
    std::os::unix::fs::symlink(&base, &linked).unwrap();
    // Someone lists files that are not qsnap's as qsnap's.
    let mut rec = g.vm.store().record(g.vm.name()).await.unwrap();
    rec.owned_images
        .extend([precious.clone(), base.clone(), linked.clone()]);
    g.vm.store().write_record(&rec).await.unwrap();
    let report = g.vm.check(true).await.unwrap();
    eprintln!("{:#?}", report.findings);
    assert!(!report.clean, "refusals must be reported");
    assert_eq!(std::fs::read(&precious).unwrap(), b"someone's data");
    assert!(base.exists() && linked.symlink_metadata().is_ok());
    // A delete merges layers but never touches them either.
    g.vm.delete_all(&qsnap_engine::DeleteOptions::default())
        .await
        .unwrap();
    assert_eq!(std::fs::read(&precious).unwrap(), b"someone's data");
    assert!(base.exists() && linked.symlink_metadata().is_ok());
    g.vm.stop().await.unwrap();
}

/// A journal is read like a manifest: one naming a memory file that is not the store's own
/// for its snapshot, or a path with a `..` part, is refused as corrupt before anything acts
/// on it; and one whose paths look plain still never makes qsnap delete an image that
/// something names or that holds data.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hand_edited_journals_never_make_qsnap_delete_a_file() {
    use qsnap_engine::store::{CreateIntent, Intent, RevertIntent, RevertPhase};
    require_qemu!();
    init_logging();
    let g = Guest::start(VmBuilder::idle().memory(64), "qcow2").await;
    g.take("s1").await;
    let base = g.dir.join("disk.qcow2");
    let precious = g.dir.join("precious.txt");
    std::fs::write(&precious, b"someone's data").unwrap();
    // A qcow2 image nothing in the store names, holding data.
    let stranger = g.dir.join("stranger.qcow2");
    create_image(&stranger, "qcow2", "16M").await;
    let wrote = std::process::Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", "write -P 0x5a 0 64k"])
        .arg(&stranger)
        .output()
        .unwrap();
    assert!(wrote.status.success(), "{wrote:?}");
    let current = record_top(&g).await;
    let untouched = |what: &str| {
        assert_eq!(
            std::fs::read(&precious).unwrap(),
            b"someone's data",
            "{what}"
        );
        for f in [&base, &stranger, &current] {
            assert!(f.exists(), "{what}: {} was removed", f.display());
        }
    };
    let store = g.vm.store();
    // Written by hand, as a hand edit would: the store's own writer refuses such journals.
    let journal_path = store.vm_dir(g.vm.name()).join("journal.json");
    let hand_write = |intent: &Intent| {
        let j = qsnap_engine::store::Journal {
            schema: qsnap_engine::store::SCHEMA,
            pid: 1,
            started_at: "2026-01-01T00:00:00.000Z".into(),
            intent: intent.clone(),
        };
        std::fs::write(&journal_path, serde_json::to_vec_pretty(&j).unwrap()).unwrap();
    };
    let create = |memory_file: PathBuf| {
        Intent::Create(CreateIntent {
            snapshot: "s2".into(),
            memory_file: Some(memory_file),
            overlays: Vec::new(),
            was_running: true,
            qemu_pid: None,
            settings: None,
            quiesce: None,
            committed: None,
            offline: false,
        })
    };
    let memory = store.memory_dir(g.vm.name());
    for (what, intent) in [
        ("a memory file outside the store", create(precious.clone())),
        (
            "a memory file path climbing out of the store",
            create(memory.join("../../../../precious.txt")),
        ),
    ] {
        assert!(
            store.write_journal(g.vm.name(), &intent).await.is_err(),
            "{what}: the store wrote a journal it would refuse to read"
        );
        hand_write(&intent);
        let err = g.vm.check(true).await.unwrap_err();
        assert!(matches!(err, Error::CorruptStore { .. }), "{what}: {err}");
        let err =
            g.vm.create_snapshot(g.vm.create_options(n("s3")))
                .await
                .unwrap_err();
        assert!(matches!(err, Error::CorruptStore { .. }), "{what}: {err}");
        untouched(what);
    }
    // `named`: whether the revert's new disks name its new overlays (they must).
    let revert = |new_overlays: Vec<PathBuf>, named: bool| {
        let new_disks = if named {
            new_overlays
                .iter()
                .enumerate()
                .map(|(i, o)| qsnap_engine::store::CurrentDisk {
                    device: format!("d{i}"),
                    image: o.clone(),
                    launch_image: o.clone(),
                    owned: true,
                })
                .collect()
        } else {
            Vec::new()
        };
        Intent::Revert(RevertIntent {
            snapshot: "s1".into(),
            phase: RevertPhase::Preparing,
            new_overlays,
            old_disks: Vec::new(),
            new_disks,
            resume: true,
            old_pid: None,
            new_pid: None,
            new_pid_start: None,
            kept_current: None,
        })
    };
    // New overlays the revert's new disks do not name: refused as corrupt.
    hand_write(&revert(vec![g.dir.join("x/../disk.qcow2")], false));
    let err = g.vm.check(true).await.unwrap_err();
    assert!(matches!(err, Error::CorruptStore { .. }), "{err}");
    untouched("new overlays its new disks do not name");
    // Plain paths: the VM's current overlay, its original image (both named by the
    // record), a stranger holding data, a text file. All stay; the check says so.
    store
        .write_journal(
            g.vm.name(),
            &revert(
                vec![
                    current.clone(),
                    base.clone(),
                    stranger.clone(),
                    precious.clone(),
                ],
                true,
            ),
        )
        .await
        .unwrap();
    let report = g.vm.check(true).await.unwrap();
    eprintln!("{:#?}", report.findings);
    assert!(!report.clean, "the kept files must be reported");
    untouched("plain paths of files that are not the revert's");
    // Past the point where a revert goes forward (its QEMU gone): a journal whose "new
    // overlay" is a stranger holding data, or a file that is not there, never makes the
    // record name it, nor the VM's current overlay go.
    g.vm.stop().await.unwrap();
    let record = store.record(g.vm.name()).await.unwrap();
    let device = record.disks[0].device.clone();
    for (what, phase, overlay) in [
        (
            "running, a stranger",
            RevertPhase::Running,
            stranger.clone(),
        ),
        (
            "running, a file that is not there",
            RevertPhase::Running,
            g.dir.join("gone.qcow2"),
        ),
        (
            "relaunching, a stranger holding data",
            RevertPhase::Relaunching,
            stranger.clone(),
        ),
    ] {
        let mut new_disks = record.disks.clone();
        new_disks[0].image = overlay.clone();
        hand_write(&Intent::Revert(RevertIntent {
            snapshot: "s1".into(),
            phase,
            new_overlays: vec![overlay.clone()],
            old_disks: record.disks.clone(),
            new_disks,
            resume: true,
            old_pid: None,
            new_pid: None,
            new_pid_start: None,
            kept_current: None,
        }));
        let _ = g.vm.check(true).await;
        let now = store.record(g.vm.name()).await.unwrap();
        assert_eq!(
            now.disks.iter().find(|d| d.device == device).unwrap().image,
            current,
            "{what}: the record left the VM's own overlay"
        );
        untouched(what);
        let _ = std::fs::remove_file(&journal_path);
    }
    g.vm.start_with(&g.launcher).await.unwrap();
    store.clear_journal(g.vm.name()).await.unwrap();
    assert!(g.vm.check(false).await.unwrap().clean);
    g.vm.stop().await.unwrap();
}

#[test]
fn qmp_errors_say_what_qemu_said() {
    let e = Error::Qmp {
        step: "pausing the guest",
        source: qsnap_qmp::Error::Qemu {
            command: "stop".into(),
            class: "GenericError".into(),
            desc: "the VM is migrating".into(),
        },
    };
    let text = e.to_string();
    assert!(
        text.contains("pausing the guest") && text.contains("the VM is migrating"),
        "{text}"
    );
}

/// The node list told from QEMU's block graph (a tenth of the cost of the full listing on a
/// long chain) is the full listing, for each layout the disks' chains explain: a `-drive`
/// chain of three, `-blockdev` disks (raw and qcow2), an empty drive. A node no disk uses,
/// or a job's filter node, is not explained: those are listed in full, and then too the
/// listing qsnap uses is the full one.
#[tokio::test]
async fn nodes_told_from_the_block_graph_are_the_full_listing() {
    require_qemu!();
    init_logging();
    let dir = tempfile::tempdir().unwrap();
    let image = |name: &str| dir.path().join(name);
    chain_of_three(
        &image("base.qcow2"),
        &image("mid.qcow2"),
        &image("top.qcow2"),
    )
    .await;
    // Data below the top, for the stream below to copy slowly.
    let written = tokio::process::Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", "write -P 7 0 4M"])
        .arg(image("base.qcow2"))
        .output()
        .await
        .expect("qemu-io (Debian's qemu-utils) writes the test's data");
    assert!(written.status.success(), "{written:?}");
    create_image(&image("raw.img"), "raw", "4M").await;
    create_image(&image("second.qcow2"), "qcow2", "4M").await;
    create_image(&image("loose.qcow2"), "qcow2", "4M").await;
    let vm = VmBuilder::idle()
        .disk(image("top.qcow2"), "qcow2", DiskStyle::Drive)
        .disk(image("raw.img"), "raw", DiskStyle::Blockdev)
        .disk(image("second.qcow2"), "qcow2", DiskStyle::Blockdev)
        .args(["-drive", "if=none,id=empty0"])
        .spawn()
        .await;
    let qmp = vm.qmp().await;
    let sorted = |mut nodes: Vec<blocks::Node>| {
        nodes.sort_by(|a, b| a.name.cmp(&b.name));
        nodes
    };
    // (told, as qsnap lists them, in full)
    let look = || async {
        let disks = blocks::read(&qmp).await.unwrap();
        (
            blocks::nodes_from_graph(&qmp, &disks).await.map(sorted),
            sorted(blocks::nodes_of(&qmp, &disks).await.unwrap()),
            sorted(blocks::nodes(&qmp).await.unwrap()),
        )
    };

    let (told, used, full) = look().await;
    // Three layers, a format and a file node each; two `-blockdev` disks, two nodes each.
    assert_eq!(full.len(), 10, "{full:#?}");
    assert_eq!(told.as_ref(), Some(&full), "told from the graph");
    assert_eq!(used, full);
    for layer in ["top.qcow2", "mid.qcow2", "base.qcow2"] {
        assert!(
            blocks::format_node_for(&used, &image(layer)).is_some(),
            "{layer}: {used:#?}"
        );
    }

    // A node no disk uses.
    qmp.execute_raw(
        "blockdev-add",
        Some(serde_json::json!({
            "driver": "qcow2", "node-name": "loose",
            "file": { "driver": "file", "filename": image("loose.qcow2") },
        })),
    )
    .await
    .unwrap();
    let (told, used, full) = look().await;
    assert_eq!(told, None, "a node no disk uses was explained: {told:#?}");
    assert!(used.iter().any(|n| n.name == "loose"), "{used:#?}");
    assert_eq!(used, full);
    qmp.execute_raw(
        "blockdev-del",
        Some(serde_json::json!({ "node-name": "loose" })),
    )
    .await
    .unwrap();
    let (told, _, full) = look().await;
    assert_eq!(told.as_ref(), Some(&full), "once the node is gone");

    // A job's filter node (a stream that runs at one byte a second).
    qmp.execute_raw(
        "block-stream",
        Some(serde_json::json!({ "job-id": "slow", "device": "drive0", "speed": 1 })),
    )
    .await
    .unwrap();
    let (told, used, full) = look().await;
    assert_eq!(told, None, "a job's filter was explained: {told:#?}");
    assert!(full.len() > 10, "no filter node: {full:#?}");
    assert_eq!(used, full);
    qmp.execute_raw("job-cancel", Some(serde_json::json!({ "id": "slow" })))
        .await
        .unwrap();
    for _ in 0..100 {
        let jobs = qmp.execute_raw("query-jobs", None).await.unwrap();
        if jobs.as_array().is_some_and(Vec::is_empty) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (told, _, full) = look().await;
    assert_eq!(told.as_ref(), Some(&full), "once the job is gone");
}
