//! Clones against real QEMU and the real guest: several running copies of one snapshot,
//! each resuming at the snapshot's tick and going on by itself; clones of clones; snapshots
//! and reverts on a clone; the source deleting the snapshot under its clones; removing them;
//! and the command-line rules (what must differ is refused by name, and works when replaced).

mod common;

use common::{n, v, Guest};
use qsnap_engine::{CloneOptions, Engine, Error, Replacement, RunOptions, Store};
use qsnap_testkit::serial::{parse_tick, SerialLog};
use qsnap_testkit::{init_logging, require_qemu, KillRecordedQemu, VmBuilder};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Whether `pid` runs (a zombie — exited, not yet reaped by this test process — does not).
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .map(|(_, rest)| rest.trim_start().to_owned())
        })
        .is_some_and(|rest| !rest.starts_with('Z'))
}

fn sha(path: &Path) -> Vec<u8> {
    let data = std::fs::read(path).unwrap();
    xxhash_rust::xxh3::xxh3_128(&data).to_le_bytes().to_vec()
}

/// The clone's console: where the source's `-chardev qsnapser` file went.
fn console_of(report: &qsnap_engine::CloneReport) -> PathBuf {
    report
        .moved
        .iter()
        .find(|m| m.option == "-chardev qsnapser")
        .unwrap_or_else(|| panic!("no console moved: {:?}", report.moved))
        .to
        .clone()
}

/// Waits for the first tick in `log` from line `from` and checks it lies in `(before,
/// after + 1]`; then two more ticks with memory and disk agreeing.
async fn resumes_in(log: &SerialLog, from: usize, (before, after): (u64, u64), what: &str) -> u64 {
    let (idx, first) = log
        .wait_from(from, Duration::from_secs(60), parse_tick)
        .await
        .unwrap_or_else(|e| panic!("{what}: no tick: {e}\n{}", log.tail(30)));
    assert!(
        first > before && first <= after + 1,
        "{what} resumed at {first}; the snapshot was taken between {before} and {after}"
    );
    log.wait_from(idx, Duration::from_secs(60), |l| {
        parse_tick(l).filter(|&t| t >= first + 2)
    })
    .await
    .unwrap_or_else(|e| panic!("{what}: stalled: {e}\n{}", log.tail(30)));
    assert!(log.mismatches().is_empty(), "{what}: {}", log.tail(30));
    first
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_clones_of_one_snapshot_run_side_by_side_and_outlive_its_deletion() {
    require_qemu!();
    init_logging();
    // Its own boot, not a fork of the shared golden: clones of a fork would stand on the
    // fork's files in the shared store, and a failing run would leave them there.
    let g = Guest::start(VmBuilder::guest().dirty_mb(8), "qcow2").await;
    g.tick_above(0, 3).await;
    let s1 = g.snapshot("s1").await;
    let m1 = g.vm.snapshot(&n("s1")).await.unwrap();
    let frozen: Vec<(PathBuf, Vec<u8>)> = m1
        .snapshot
        .disks
        .iter()
        .map(|d| (d.image.clone(), sha(&d.image)))
        .collect();
    let store = g.vm.store().root().to_owned();
    // Clone names of this process only: the golden's store is shared with other tests.
    let c = |i: usize| format!("c{}x{i}", std::process::id());
    let _kills: Vec<KillRecordedQemu> = (1..=5)
        .map(|i| KillRecordedQemu::new(&store, &c(i)))
        .collect();

    // Four clones at once (each its own lock; the source's is shared).
    let mut tasks = tokio::task::JoinSet::new();
    for i in 1..=4 {
        let (vm, name) = (g.vm.clone(), c(i));
        tasks.spawn(async move {
            vm.clone_snapshot(&n("s1"), &v(&name), &CloneOptions::default())
                .await
        });
    }
    let mut reports = Vec::new();
    while let Some(r) = tasks.join_next().await {
        reports.push(
            r.unwrap()
                .unwrap_or_else(|e| panic!("clone: {e}\n{}", g.report())),
        );
    }
    reports.sort_by(|a, b| a.vm.cmp(&b.vm));
    let mut consoles = Vec::new();
    for r in &reports {
        assert!(r.resumed, "{r:?}");
        assert!(r.disks[0]
            .overlay
            .starts_with(store.join("vms").join(&r.vm)));
        let log = SerialLog::follow(console_of(r));
        resumes_in(&log, 0, s1, &r.vm).await;
        consoles.push(log);
    }
    // Each went on by itself: own overlays, own consoles, own pids; the source runs on.
    let pids: std::collections::BTreeSet<_> = reports.iter().map(|r| r.pid).collect();
    assert_eq!(pids.len(), 4);
    let mark = g.serial().len();
    g.tick_above(mark, g.last_tick() + 2).await;
    assert!(g.serial().mismatches().is_empty(), "{}", g.report());
    let st = g
        .engine
        .vm(&v(&c(2)))
        .await
        .unwrap()
        .status()
        .await
        .unwrap();
    let of = st.clone_of.as_ref().unwrap();
    assert_eq!(
        (of.vm.as_str(), of.snapshot.as_str()),
        (g.vm.name().as_str(), "s1")
    );
    assert!(st.running);

    // A clone is a full VM: it snapshots and reverts, and can be cloned in turn.
    let c1 = g.engine.vm(&v(&c(1))).await.unwrap();
    let before = consoles[0].ticks().last().copied().unwrap();
    c1.create_snapshot(c1.create_options(n("cs")))
        .await
        .unwrap();
    let after = consoles[0]
        .wait_new_tick(Duration::from_secs(30))
        .await
        .unwrap();
    consoles[0]
        .wait_from(0, Duration::from_secs(30), |l| {
            parse_tick(l).filter(|&t| t > after + 2)
        })
        .await
        .unwrap();
    let mark = consoles[0].len();
    c1.revert(&n("cs"), false).await.unwrap();
    // The clone's console is one file across the relaunch: the replaced QEMU's last ticks
    // (all past `after + 2`, which was waited for) may follow `mark` before the reverted
    // guest's first. The reverted guest's ticks start again at most at `after + 1`.
    let (resumed, _) = consoles[0]
        .wait_from(mark, Duration::from_secs(60), |l| {
            parse_tick(l).filter(|&t| t <= after + 1)
        })
        .await
        .unwrap_or_else(|e| panic!("c1 reverted to cs: no tick: {e}\n{}", consoles[0].tail(30)));
    resumes_in(&consoles[0], resumed, (before, after), "c1 reverted to cs").await;
    let c5 = c1
        .clone_snapshot(&n("cs"), &v(&c(5)), &CloneOptions::default())
        .await
        .unwrap();
    let c5_log = SerialLog::follow(console_of(&c5));
    resumes_in(&c5_log, 0, (before, after), "c5 (a clone of a clone)").await;

    // The source deletes the snapshot its clones stand on: they run on, its images stay.
    g.vm.delete_snapshot(&n("s1"), &Default::default())
        .await
        .unwrap_or_else(|e| panic!("delete s1: {e}\n{}", g.report()));
    for (log, r) in consoles.iter().zip(&reports) {
        let last = log.ticks().last().copied().unwrap();
        log.wait_from(0, Duration::from_secs(30), |l| {
            parse_tick(l).filter(|&t| t > last + 1)
        })
        .await
        .unwrap_or_else(|e| panic!("{} stopped after the delete: {e}", r.vm));
        assert!(log.mismatches().is_empty(), "{}: {}", r.vm, log.tail(20));
    }
    for (image, digest) in &frozen {
        assert_eq!(&sha(image), digest, "{} changed", image.display());
    }

    // Removing: c1 is refused while c5 stands on its snapshot; then all go, files too.
    let err = c1.remove().await.unwrap_err();
    assert!(err.to_string().contains(&c(5)), "{err}");
    for i in [5, 1, 2, 3, 4] {
        let vm = g.engine.vm(&v(&c(i))).await.unwrap();
        let pid = vm.status().await.unwrap().pid.unwrap();
        let r = vm.remove().await.unwrap();
        assert!(r.stopped);
        assert!(!alive(pid), "c{i}'s QEMU lives on");
        let dir = store.join("vms").join(c(i));
        for sub in ["files", "disks", "memory", "snapshots", "vm.json"] {
            assert!(!dir.join(sub).exists(), "{} left", dir.join(sub).display());
        }
        assert!(matches!(
            g.engine.vm(&v(&c(i))).await,
            Err(Error::UnknownVm { .. })
        ));
    }
    // With the clones gone, the source's layers merge as usual.
    let check = g.vm.check(true).await.unwrap();
    assert!(check.clean, "{:?}", check.findings);
    // Only a clone can be removed.
    let err = g.vm.remove().await.unwrap_err();
    assert!(err.to_string().contains("not a clone"), "{err}");
    g.vm.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostfwd_port_is_refused_by_name_and_a_replacement_works() {
    require_qemu!();
    init_logging();
    let dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let port2 = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let fwd = format!("tcp:127.0.0.1:{port}-:22");
    let mut argv = VmBuilder::idle_with_disk(
        &dir.path().join("disk.qcow2"),
        "16M",
        &dir.path().join("serial.log"),
    )
    .await;
    argv.extend([
        "-netdev".into(),
        format!("user,id=n0,hostfwd={fwd}"),
        "-device".into(),
        "virtio-net-pci,netdev=n0".into(),
    ]);
    let store = dir.path().join("store");
    let engine = Engine::new(Store::new(&store));
    let _k = KillRecordedQemu::new(&store, "src");
    let _k2 = KillRecordedQemu::new(&store, "c1");
    engine
        .run(&v("src"), argv, &RunOptions::default())
        .await
        .unwrap();
    let src = engine.vm(&v("src")).await.unwrap();
    src.create_snapshot(src.create_options(n("s")))
        .await
        .unwrap();

    let err = src
        .clone_snapshot(&n("s"), &v("c1"), &CloneOptions::default())
        .await
        .unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, Error::CloneRefused { .. }), "{msg}");
    assert!(
        msg.contains("hostfwd") && msg.contains("-netdev") && msg.contains("--replace"),
        "{msg}"
    );
    assert!(
        !store.join("vms/c1/vm.json").exists(),
        "a refused clone left a record"
    );

    let opts = CloneOptions {
        paused: false,
        replace: vec![Replacement::Pair(
            fwd.clone(),
            format!("tcp:127.0.0.1:{port2}-:22"),
        )],
        ..CloneOptions::default()
    };
    let r = src.clone_snapshot(&n("s"), &v("c1"), &opts).await.unwrap();
    assert!(r.resumed);
    let c1 = engine.vm(&v("c1")).await.unwrap();
    let argv = &c1.record().command.as_ref().unwrap().argv;
    assert!(
        argv.iter().any(|a| a.contains(&format!(":{port2}-:22"))),
        "{argv:?}"
    );
    // Both forward their own port: the source's and the clone's QEMU each listen.
    for p in [port, port2] {
        std::net::TcpStream::connect(("127.0.0.1", p))
            .unwrap_or_else(|e| panic!("nothing listens on {p}: {e}"));
    }
    assert!(c1.status().await.unwrap().running);
    c1.remove().await.unwrap();
    src.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_clones_from_standbys_resume_at_the_snapshot_and_a_stale_standby_is_never_handed_out()
{
    require_qemu!();
    init_logging();
    let g = Guest::start(VmBuilder::guest().dirty_mb(8), "qcow2").await;
    g.tick_above(0, 3).await;
    let s1 = g.snapshot("s1").await;
    let m1 = g.vm.snapshot(&n("s1")).await.unwrap();
    let frozen: Vec<(PathBuf, Vec<u8>)> = m1
        .snapshot
        .disks
        .iter()
        .map(|d| (d.image.clone(), sha(&d.image)))
        .collect();
    let store = g.vm.store().root().to_owned();
    let c = |i: usize| format!("p{}x{i}", std::process::id());
    let _kills: Vec<KillRecordedQemu> = (1..=5)
        .map(|i| KillRecordedQemu::new(&store, &c(i)))
        .collect();

    let pool =
        g.vm.pool(&n("s1"), 4)
            .await
            .unwrap_or_else(|e| panic!("pool: {e}\n{}", g.report()));
    assert_eq!((pool.ready.len(), pool.made.len()), (4, 4), "{pool:?}");
    let _standby_kills: Vec<KillRecordedQemu> = pool
        .ready
        .iter()
        .map(|sb| KillRecordedQemu::new(&store, sb))
        .collect();
    let mut standby_pids = std::collections::BTreeSet::new();
    for sb in &pool.ready {
        let st = g.engine.vm(&v(sb)).await.unwrap().status().await.unwrap();
        assert_eq!(st.runstate.as_deref(), Some("paused"), "{sb}: {st:?}");
        assert_eq!(st.standby_of.as_ref().unwrap().snapshot, "s1");
        standby_pids.insert(st.pid.unwrap());
        // Its guest never ran: not one line on its console.
        let console = store.join("vms").join(sb).join("files/serial.log");
        assert_eq!(std::fs::read(&console).unwrap(), b"", "{sb} ran");
    }
    // Nothing runs a standby's guest or changes it before a clone claims it.
    let sb0 = g.engine.vm(&v(&pool.ready[0])).await.unwrap();
    for err in [
        sb0.resume().await.err(),
        sb0.start().await.err(),
        sb0.create_snapshot(sb0.create_options(n("x"))).await.err(),
    ] {
        assert!(
            matches!(err, Some(Error::StandbyUntouchable { .. })),
            "{err:?}"
        );
    }
    // Ready standbys show in the source's status.
    let st = g.vm.status().await.unwrap();
    assert_eq!(st.pools[0].standbys, pool.ready);

    // Four clones at once: each claims a standby of its own.
    let mut tasks = tokio::task::JoinSet::new();
    for i in 1..=4 {
        let (vm, name) = (g.vm.clone(), c(i));
        tasks.spawn(async move {
            vm.clone_snapshot(&n("s1"), &v(&name), &CloneOptions::default())
                .await
        });
    }
    let mut reports = Vec::new();
    while let Some(r) = tasks.join_next().await {
        reports.push(
            r.unwrap()
                .unwrap_or_else(|e| panic!("clone: {e}\n{}", g.report())),
        );
    }
    reports.sort_by(|a, b| a.vm.cmp(&b.vm));
    let taken: std::collections::BTreeSet<_> =
        reports.iter().map(|r| r.standby.clone().unwrap()).collect();
    assert_eq!(taken.len(), 4, "{reports:?}");
    assert!(taken.iter().all(|t| pool.ready.contains(t)), "{reports:?}");
    let pids: std::collections::BTreeSet<_> = reports.iter().map(|r| r.pid.unwrap()).collect();
    assert_eq!(pids, standby_pids, "the clones run in the standbys' QEMUs");
    let mut consoles = Vec::new();
    for r in &reports {
        assert!(r.resumed, "{r:?}");
        assert!(
            console_of(r).starts_with(store.join("vms").join(&r.vm)),
            "{r:?}"
        );
        let log = SerialLog::follow(console_of(r));
        resumes_in(&log, 0, s1, &r.vm).await;
        consoles.push(log);
        // A clone like any other: its status names the standby it came from.
        let st = g
            .engine
            .vm(&v(&r.vm))
            .await
            .unwrap()
            .status()
            .await
            .unwrap();
        assert_eq!(st.clone_of.unwrap().standby, r.standby);
        assert!(st.standby_of.is_none());
    }
    // Each goes on by itself (its own ticks, memory and disk agreeing); the source too.
    for (log, r) in consoles.iter().zip(&reports) {
        let last = log.ticks().last().copied().unwrap();
        log.wait_from(0, Duration::from_secs(30), |l| {
            parse_tick(l).filter(|&t| t > last + 1)
        })
        .await
        .unwrap_or_else(|e| panic!("{} stalled: {e}", r.vm));
        assert!(log.mismatches().is_empty(), "{}: {}", r.vm, log.tail(20));
    }
    let mark = g.serial().len();
    g.tick_above(mark, g.last_tick() + 2).await;
    assert!(g.serial().mismatches().is_empty(), "{}", g.report());
    for (image, digest) in &frozen {
        assert_eq!(&sha(image), digest, "{} changed", image.display());
    }
    // A claimed clone snapshots and reverts like any other (QEMU's names for its images
    // are still true: they never moved).
    let c1 = g.engine.vm(&v(&c(1))).await.unwrap();
    c1.create_snapshot(c1.create_options(n("cs")))
        .await
        .unwrap_or_else(|e| panic!("a claimed clone's snapshot: {e}"));
    c1.revert(&n("cs"), false).await.unwrap();
    // The engine does not refill by itself: the pool is empty until asked.
    assert!(g.vm.pools().await.unwrap()[0].standbys.is_empty());

    // A standby made from what is no longer there is never handed out: here one whose
    // snapshot was (as far as its record says) taken at another time.
    let pool = g.vm.pool(&n("s1"), 1).await.unwrap();
    let stale = pool.ready[0].clone();
    let _stale_kill = KillRecordedQemu::new(&store, &stale);
    let stale_pid = g
        .engine
        .vm(&v(&stale))
        .await
        .unwrap()
        .status()
        .await
        .unwrap()
        .pid
        .unwrap();
    let record = store.join("vms").join(&stale).join("vm.json");
    let mut rec: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&record).unwrap()).unwrap();
    rec["standby"]["fingerprint"]["snapshot-taken-at"] = "2001-01-01T00:00:00Z".into();
    std::fs::write(&record, serde_json::to_vec(&rec).unwrap()).unwrap();
    let r =
        g.vm.clone_snapshot(&n("s1"), &v(&c(5)), &CloneOptions::default())
            .await
            .unwrap();
    assert_eq!(r.standby, None, "{r:?}");
    let why = r.cold_because.clone().unwrap();
    assert!(why.contains("deleted and taken again"), "{why}");
    assert_ne!(r.pid, Some(stale_pid));
    resumes_in(&SerialLog::follow(console_of(&r)), 0, s1, "a cold clone").await;
    // `check` finds it, `--repair` discards it: its QEMU stopped, its files gone.
    let report = g.vm.check(false).await.unwrap();
    assert!(
        report
            .findings
            .iter()
            .any(|f| f.kind == "stale-record" && f.what.contains(&stale)),
        "{report:?}"
    );
    let report = g.vm.check(true).await.unwrap();
    assert!(report.clean, "{report:?}");
    assert!(!alive(stale_pid), "the stale standby's QEMU lives on");
    assert!(!store.join("standbys").join(&stale).exists());

    // Deleting the snapshot takes its pool along; `--size 0` leaves no QEMU behind.
    let pool = g.vm.pool(&n("s1"), 2).await.unwrap();
    let pids: Vec<u32> = {
        let mut p = Vec::new();
        for sb in &pool.ready {
            p.push(
                g.engine
                    .vm(&v(sb))
                    .await
                    .unwrap()
                    .status()
                    .await
                    .unwrap()
                    .pid
                    .unwrap(),
            );
        }
        p
    };
    let _pool_kills: Vec<KillRecordedQemu> = pool
        .ready
        .iter()
        .map(|sb| KillRecordedQemu::new(&store, sb))
        .collect();
    let emptied = g.vm.pool(&n("s1"), 0).await.unwrap();
    assert_eq!((emptied.ready.len(), emptied.discarded.len()), (0, 2));
    for pid in pids {
        assert!(!alive(pid), "a standby's QEMU lives on after --size 0");
    }
    assert!(g.vm.pools().await.unwrap().is_empty());
    let pool = g.vm.pool(&n("s1"), 1).await.unwrap();
    let sb = pool.ready[0].clone();
    let _last_kill = KillRecordedQemu::new(&store, &sb);
    let sb_pid = g
        .engine
        .vm(&v(&sb))
        .await
        .unwrap()
        .status()
        .await
        .unwrap()
        .pid
        .unwrap();
    for i in 1..=5 {
        g.engine
            .vm(&v(&c(i)))
            .await
            .unwrap()
            .remove()
            .await
            .unwrap();
    }
    let deleted =
        g.vm.delete_snapshot(&n("s1"), &Default::default())
            .await
            .unwrap_or_else(|e| panic!("delete s1: {e}\n{}", g.report()));
    // Its layer merged away: the standby that stood on it went first, and the delete did
    // not plan from a look that still saw it.
    assert!(
        deleted.merges.iter().any(|m| m.removed.is_some()),
        "{:?}",
        deleted.merges
    );
    assert!(!alive(sb_pid), "the deleted snapshot's standby lives on");
    assert!(g.vm.pools().await.unwrap().is_empty());
    assert!(matches!(
        g.engine.vm(&v(&sb)).await,
        Err(Error::UnknownVm { .. })
    ));
    let check = g.vm.check(true).await.unwrap();
    assert!(check.clean, "{:?}", check.findings);
    // A pool record left for the deleted snapshot (a `pool` that raced the delete): `check`
    // reports it, `--repair` removes it.
    let orphan = store
        .join("pools")
        .join(g.vm.name().as_str())
        .join("s1.json");
    std::fs::create_dir_all(orphan.parent().unwrap()).unwrap();
    std::fs::write(
        &orphan,
        format!(
            r#"{{"schema": 1, "vm": "{}", "snapshot": "s1", "size": 1, "set-at": "2026-12-05T00:00:00Z"}}"#,
            g.vm.name()
        ),
    )
    .unwrap();
    assert_eq!(g.vm.pools().await.unwrap().len(), 1, "the record is read");
    let check = g.vm.check(false).await.unwrap();
    assert!(
        check.findings.iter().any(|f| f.kind == "stale-record"
            && f.what.contains("pool of snapshot s1")
            && !f.repaired),
        "{:?}",
        check.findings
    );
    let check = g.vm.check(true).await.unwrap();
    assert!(!orphan.exists(), "{:?}", check.findings);
    assert!(g.vm.pools().await.unwrap().is_empty());
    assert!(g.vm.check(false).await.unwrap().clean);

    // A clone with a pool of its own: `remove` takes its standbys along.
    g.snapshot("s2").await;
    let c6 =
        g.vm.clone_snapshot(&n("s2"), &v(&c(6)), &CloneOptions::default())
            .await
            .unwrap();
    let _c6_kill = KillRecordedQemu::new(&store, &c6.vm);
    let c6 = g.engine.vm(&v(&c6.vm)).await.unwrap();
    c6.create_snapshot(c6.create_options(n("c6s")))
        .await
        .unwrap();
    let pool = c6.pool(&n("c6s"), 1).await.unwrap();
    let _c6_pool_kill = KillRecordedQemu::new(&store, &pool.ready[0]);
    let sb_pid = g
        .engine
        .vm(&v(&pool.ready[0]))
        .await
        .unwrap()
        .status()
        .await
        .unwrap()
        .pid
        .unwrap();
    c6.remove()
        .await
        .unwrap_or_else(|e| panic!("remove a clone with a pool: {e}"));
    assert!(!alive(sb_pid), "the removed clone's standby lives on");
    assert!(matches!(
        g.engine.vm(&v(&pool.ready[0])).await,
        Err(Error::UnknownVm { .. })
    ));
    g.vm.stop().await.unwrap();
}
