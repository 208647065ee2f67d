//! Snapshots against a real QEMU and the real test guest: memory and disks belong to the same
//! instant (the restored guest goes on from its tick with no MISMATCH), twenty times in a row
//! under a memory-dirtying load, in point-in-time and precopy modes; the guest keeps running;
//! the store records what was made.

use qsnap_engine::snapshot::{memfile, CreateReport, Mode};
use qsnap_engine::{Engine, SnapshotName, Store, VmName};
use qsnap_qmp::types;
use qsnap_testkit::restore::{assert_resumes, restore_guest, Frozen};
use qsnap_testkit::{
    create_image, init_logging, require_qemu, serial::parse_tick, DiskStyle, Vm, VmBuilder,
};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

const BOOT: Duration = Duration::from_secs(90);

fn mode_of(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

/// The last tick the guest printed, after waiting for at least `min`.
async fn tick_at_least(vm: &Vm, min: u64) -> u64 {
    vm.serial
        .wait_from(0, Duration::from_secs(30), |l| {
            parse_tick(l).filter(|&n| n >= min)
        })
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", vm.report()));
    *vm.serial.ticks().last().unwrap()
}

async fn booted(dir: &Path, dirty_mb: u32) -> Vm {
    let base = dir.join("base.qcow2");
    create_image(&base, "qcow2", "64M").await;
    let vm = VmBuilder::guest()
        .disk(&base, "qcow2", DiskStyle::Blockdev)
        .dirty_mb(dirty_mb)
        .spawn()
        .await;
    vm.wait_booted(BOOT).await;
    vm
}

/// The VM registered as `vm1` in a store under `dir`.
async fn attached(dir: &Path, vm: &Vm) -> (Engine, qsnap_engine::Vm) {
    let engine = Engine::new(Store::new(dir.join("store")));
    let handle = engine
        .attach(&VmName::new("vm1").unwrap(), vm.qmp_path.to_str().unwrap())
        .await
        .unwrap();
    (engine, handle)
}

/// Loads the snapshot into a fresh QEMU and checks it goes on from its own instant.
async fn restores_to(dir: &Path, s: &CreateReport, before: u64, after: u64) {
    let mem = s.memory.as_ref().unwrap();
    let disk = &s.disks[0];
    let restored = restore_guest(
        dir,
        &mem.file,
        memfile::HEADER_LEN,
        &mem.capabilities,
        &[Frozen {
            image: disk.image.clone(),
            format: disk.format.clone(),
        }],
        16,
    )
    .await;
    assert_resumes(&restored, before, after, 2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_point_in_time_snapshots_each_restore_to_their_instant() {
    require_qemu!();
    init_logging();
    let dir = tempfile::tempdir().unwrap();
    let vm = booted(dir.path(), 16).await;
    let (engine, handle) = attached(dir.path(), &vm).await;
    let mut last = tick_at_least(&vm, 3).await;

    for i in 1..=20 {
        let snap = SnapshotName::new(&format!("s{i}")).unwrap();
        let before = *vm.serial.ticks().last().unwrap();
        let m = handle
            .create_snapshot(handle.create_options(snap))
            .await
            .unwrap_or_else(|e| panic!("snapshot {i}: {e}\n{}", vm.report()));
        let after = vm
            .serial
            .wait_new_tick(Duration::from_secs(30))
            .await
            .unwrap();
        let s = &m.snapshot;
        assert_eq!(s.mode, Mode::PointInTime);
        assert!(s.was_running);
        assert_eq!(
            m.parent.as_deref(),
            (i > 1).then(|| format!("s{}", i - 1)).as_deref()
        );
        let mem = s.memory.as_ref().unwrap();
        eprintln!("s{i}: pause {:.1} ms, {} bytes", s.pause_ms, mem.bytes);

        // The guest runs on, on the new overlay.
        last = tick_at_least(&vm, after.max(last) + 1).await;
        let disk = &s.disks[0];
        assert_eq!(disk.device, "vd0");
        assert_eq!(disk.overlay, dir.path().join(format!("base.s{i}.qcow2")));
        assert!(disk.frozen.is_some());
        if i == 1 {
            // Private memory file, complete header, settings put back, store consistent.
            assert_eq!(mode_of(&mem.file), 0o600);
            assert_eq!(mode_of(mem.file.parent().unwrap()), 0o700);
            let h = memfile::read_header(mem.file.clone()).await.unwrap();
            assert!(h.complete);
            assert_eq!(h.stream_len, mem.bytes);
            let qmp = vm.qmp().await;
            let caps = qmp
                .execute_raw("query-migrate-capabilities", None)
                .await
                .unwrap();
            assert!(
                caps.as_array().unwrap().iter().all(|c| c["state"] == false),
                "capabilities left on: {caps}"
            );
            assert!(qmp.execute(types::query_status {}).await.unwrap().running);
            let top = &qmp.execute(types::query_block {}).await.unwrap()[0];
            assert_eq!(
                top.inserted.as_ref().unwrap().file,
                disk.overlay.display().to_string()
            );
        }

        // Load it into a fresh QEMU: it goes on from its own tick, memory agreeing with disk.
        restores_to(dir.path(), s, before, after).await;
        // Keep the temp dir small: twenty memory files would be gigabytes.
        std::fs::remove_file(&mem.file).unwrap();
    }

    let list = handle.snapshots().await.unwrap();
    assert_eq!(list.len(), 20);
    let rec = engine.vm(&VmName::new("vm1").unwrap()).await.unwrap();
    assert_eq!(rec.record().current.as_deref(), Some("s20"));
    assert_eq!(
        rec.record().disks[0].image,
        dir.path().join("base.s20.qcow2")
    );
    assert!(vm.serial.mismatches().is_empty(), "{}", vm.report());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn precopy_snapshots_restore_to_the_end_of_the_copy_and_a_slow_copy_is_bounded() {
    require_qemu!();
    init_logging();
    let dir = tempfile::tempdir().unwrap();
    let vm = booted(dir.path(), 16).await;
    let (_engine, handle) = attached(dir.path(), &vm).await;
    tick_at_least(&vm, 3).await;

    // A generous limit: the copy converges by itself; then a zero limit: qsnap must pause
    // the guest to finish, and say so.
    for (name, limit, forced) in [("p1", 60, false), ("p2", 0, true)] {
        let before = *vm.serial.ticks().last().unwrap();
        let mut opts = handle.create_options(SnapshotName::new(name).unwrap());
        opts.mode = Some(Mode::Precopy);
        opts.live_limit = Duration::from_secs(limit);
        let m = handle.create_snapshot(opts).await.unwrap();
        let after = vm
            .serial
            .wait_new_tick(Duration::from_secs(30))
            .await
            .unwrap();
        let s = &m.snapshot;
        eprintln!("{name}: {s:#?}");
        assert_eq!(s.mode, Mode::Precopy);
        let live = s.live_phase.as_ref().unwrap();
        assert_eq!(live.forced_pause, forced, "{live:?}");
        assert!(s.pause_ms > 0.0);
        tick_at_least(&vm, after + 1).await;
        restores_to(dir.path(), s, before, after).await;
    }
    assert!(vm.serial.mismatches().is_empty(), "{}", vm.report());
}
