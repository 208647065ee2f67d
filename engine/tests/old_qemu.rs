//! QEMU older than 9.0 and 8.2 (Debian bookworm's 7.2): no `file:` migration, so the memory
//! stream goes through a pipe qsnap drains (and feeds back on revert); the background-snapshot
//! thread resumes the guest by itself, so the disks switch before the save starts. Snapshots
//! and reverts must be as consistent as on a new QEMU.

use qsnap_engine::snapshot::{memfile, Mode};
use qsnap_engine::{Engine, RunOptions, SnapshotName, Store, VmName};
use qsnap_testkit::serial::parse_tick;
use qsnap_testkit::{
    create_image, init_logging, old_qemu, require_qemu, DiskStyle, KillRecordedQemu, VmBuilder,
};
use std::time::Duration;

mod common;
use common::PerLaunchSerial;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_7_2_point_in_time_and_precopy_snapshots_revert_consistently() {
    require_qemu!();
    init_logging();
    let Some(qemu) = old_qemu() else { return };
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.qcow2");
    create_image(&disk, "qcow2", "64M").await;
    let serial = dir.path().join("serial-0.log");
    let mut argv = VmBuilder::guest()
        .dirty_mb(16)
        .disk(&disk, "qcow2", DiskStyle::Blockdev)
        .command_line(&serial)
        .await;
    // The VM's QEMU is whatever `dir/qemu` points to: 7.2 now; later the upgrade.
    let binary = dir.path().join("qemu");
    std::os::unix::fs::symlink(&qemu, &binary).unwrap();
    argv[0] = binary.display().to_string();
    let engine = Engine::new(Store::new(dir.path().join("store")));
    let launcher = PerLaunchSerial::new(dir.path());
    let _kill = KillRecordedQemu::new(&dir.path().join("store"), "old");
    engine
        .run_with(
            &VmName::new("old").unwrap(),
            argv,
            &RunOptions::default(),
            &launcher,
        )
        .await
        .unwrap();
    let vm = engine.vm(&VmName::new("old").unwrap()).await.unwrap();
    let log = launcher.serial();
    let report = || {
        let q =
            std::fs::read_to_string(dir.path().join("store/vms/old/qemu.log")).unwrap_or_default();
        format!(
            "--- qemu.log:\n{q}\n--- serial ({}):\n{}",
            launcher.path().display(),
            launcher.serial().tail(20)
        )
    };
    let wait_above = |from: usize, n: u64| {
        let log = log.clone();
        async move {
            log.wait_from(from, Duration::from_secs(120), |l| {
                parse_tick(l).filter(|&t| t > n)
            })
            .await
        }
    };
    wait_above(0, 3)
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", report()));

    let mut ranges = Vec::new();
    for (name, mode) in [("pit", None), ("pre", Some(Mode::Precopy))] {
        let before = *log.ticks().last().unwrap();
        let mut opts = vm.create_options(SnapshotName::new(name).unwrap());
        opts.mode = mode;
        let m = vm
            .create_snapshot(opts)
            .await
            .unwrap_or_else(|e| panic!("{name}: {e}\n{}", report()));
        let after = log.wait_new_tick(Duration::from_secs(60)).await.unwrap();
        let s = &m.snapshot;
        eprintln!("{name}: mode {} pause {:.1} ms", s.mode, s.pause_ms);
        assert_eq!(s.mode, mode.unwrap_or(Mode::PointInTime));
        assert!(m.qemu_version.starts_with("7.2"), "{}", m.qemu_version);
        let mem = s.memory.as_ref().unwrap();
        let h = memfile::read_header(mem.file.clone()).await.unwrap();
        assert!(h.complete && h.stream_len == mem.bytes && mem.bytes > 1 << 20);
        // The guest runs on by itself (7.2 resumed it; nobody sent cont twice).
        wait_above(0, after + 2)
            .await
            .unwrap_or_else(|e| panic!("{e}\n{}", report()));
        ranges.push((name, before, after));
    }

    // Revert, then the guest must go on from a tick inside the snapshot's range, with memory
    // and disk agreeing.
    let revert_and_check = |name: &'static str, before: u64, after: u64| {
        let (vm, launcher, report) = (&vm, &launcher, &report);
        async move {
            let r = vm
                .revert_with(
                    &SnapshotName::new(name).unwrap(),
                    &qsnap_engine::RevertOptions::default(),
                    launcher,
                )
                .await
                .unwrap_or_else(|e| panic!("revert {name}: {e}\n{}", report()));
            assert!(r.memory_restored && r.resumed);
            // The new QEMU has its own console file: its first tick is the reverted guest's.
            let log = launcher.serial();
            let (idx, first) = log
                .wait_from(0, Duration::from_secs(60), parse_tick)
                .await
                .unwrap_or_else(|e| panic!("{e}\n{}", report()));
            assert!(
                first > before && first <= after + 1,
                "{name}: resumed at {first}, taken in {before}..{after}\n{}",
                report()
            );
            log.wait_from(idx, Duration::from_secs(60), |l| {
                parse_tick(l).filter(|&t| t >= first + 2)
            })
            .await
            .unwrap_or_else(|e| panic!("{e}\n{}", report()));
            assert!(log.mismatches().is_empty(), "{}", report());
            r
        }
    };
    for &(name, before, after) in &ranges {
        revert_and_check(name, before, after).await;
    }

    // QEMU is upgraded (the same path now runs 10.x): a snapshot taken under 7.2 still
    // reverts, because the relaunch asks for the snapshot's versioned machine type rather
    // than the `pc` alias, which 10.x resolves to a newer machine.
    vm.stop().await.unwrap();
    let new = std::process::Command::new("sh")
        .args([
            "-c",
            &format!("command -v {}", qsnap_testkit::qemu_binary()),
        ])
        .output()
        .unwrap();
    let new = String::from_utf8_lossy(&new.stdout).trim().to_owned();
    assert!(
        !new.is_empty(),
        "no {} on PATH",
        qsnap_testkit::qemu_binary()
    );
    std::fs::remove_file(&binary).unwrap();
    std::os::unix::fs::symlink(&new, &binary).unwrap();
    let (name, before, after) = ranges[0];
    let m = vm
        .snapshot(&SnapshotName::new(name).unwrap())
        .await
        .unwrap();
    assert_eq!(m.machine.as_deref(), Some("pc-i440fx-7.2"));
    let r = revert_and_check(name, before, after).await;
    let cmdline = std::fs::read(format!("/proc/{}/cmdline", r.pid.unwrap())).unwrap();
    let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
    assert!(cmdline.contains("-machine pc-i440fx-7.2"), "{cmdline}");
    let qmp = vm.connect().await.unwrap();
    assert!(!qmp.greeting().version.qemu.to_string().starts_with("7.2"));
    drop(qmp);
    vm.stop().await.unwrap();
}
