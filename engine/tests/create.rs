//! Point-in-time create against a real QEMU and the real test guest: the snapshot's memory and
//! disks belong to the same instant (the restored guest goes on from its tick with no
//! MISMATCH), the guest keeps running, and bad input changes nothing.

use qsnap_engine::snapshot::{self, memfile, CreateOptions, SnapshotName};
use qsnap_qmp::types;
use qsnap_testkit::{
    create_image, init_logging, require_qemu, serial::parse_tick, DiskStyle, VmBuilder,
};
use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

const BOOT: Duration = Duration::from_secs(90);

#[tokio::test]
async fn snapshot_restores_memory_and_disk_from_the_same_instant() {
    require_qemu!();
    init_logging();
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.qcow2");
    create_image(&base, "qcow2", "64M").await;
    let vm = VmBuilder::guest()
        .disk(&base, "qcow2", DiskStyle::Blockdev)
        .dirty_mb(16)
        .spawn()
        .await;
    vm.wait_booted(BOOT).await;
    let (seen, _) = vm
        .serial
        .wait_from(0, Duration::from_secs(30), |l| {
            parse_tick(l).filter(|&n| n >= 3)
        })
        .await
        .unwrap();

    let qmp = vm.qmp().await;
    let before = *vm.serial.ticks().last().unwrap();
    let opts = CreateOptions {
        name: SnapshotName::new("s1").unwrap(),
        dir: dir.path().join("store/vm1"),
        overlay_dir: None,
        save_timeout: Duration::from_secs(120),
    };
    let report = snapshot::create(&qmp, &opts).await.unwrap();
    let after = *vm.serial.ticks().last().unwrap();
    eprintln!("{report:#?}");

    // The guest runs on: it ticks after the snapshot, now on the overlay.
    let (_, next) = vm
        .serial
        .wait_from(seen, Duration::from_secs(30), |l| {
            parse_tick(l).filter(|&n| n > after)
        })
        .await
        .unwrap();
    assert!(next > after);
    assert!(qmp.execute(types::query_status {}).await.unwrap().running);
    assert_eq!(report.disks.len(), 1);
    let overlay = &report.disks[0].overlay;
    assert_eq!(overlay, &dir.path().join("base.s1.qcow2"));
    let blocks = qmp.execute(types::query_block {}).await.unwrap();
    let top = blocks[0].inserted.as_ref().unwrap();
    assert_eq!(
        top.file,
        overlay.display().to_string(),
        "the VM is not on the overlay"
    );

    // The memory file: private, complete, QEMU's stream behind the header.
    let mem = &report.memory_file;
    assert_eq!(
        std::fs::metadata(mem).unwrap().permissions().mode() & 0o777,
        0o600
    );
    assert_eq!(
        std::fs::metadata(mem.parent().unwrap())
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o700
    );
    let header = memfile::read_header(mem.clone()).await.unwrap();
    assert!(header.complete);
    assert_eq!(header.stream_len, report.memory_bytes);
    // Capabilities are restored.
    let caps = qmp
        .execute_raw("query-migrate-capabilities", None)
        .await
        .unwrap();
    let bg = caps
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["capability"] == "background-snapshot")
        .unwrap();
    assert_eq!(bg["state"], false);
    drop(qmp);

    // Restore into a fresh QEMU on a new overlay over the frozen image.
    let restore_disk = dir.path().join("restore.qcow2");
    let out = tokio::process::Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-u", "-F", "qcow2", "-b"])
        .arg(&base)
        .arg(&restore_disk)
        .arg("64M")
        .output()
        .await
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let restored = VmBuilder::guest()
        .disk(&restore_disk, "qcow2", DiskStyle::Blockdev)
        .dirty_mb(16)
        .args(["-incoming", "defer"])
        .spawn()
        .await;
    let rq = restored.qmp().await;
    let mut events = rq.events();
    rq.execute_raw(
        "migrate-set-capabilities",
        Some(serde_json::json!({"capabilities": [{"capability": "events", "state": true}]})),
    )
    .await
    .unwrap();
    rq.execute(types::migrate_incoming {
        uri: Some(format!(
            "file:{},offset={}",
            mem.display(),
            memfile::HEADER_LEN
        )),
        channels: None,
        exit_on_error: None,
    })
    .await
    .unwrap();
    events
        .wait_for("MIGRATION completed", Duration::from_secs(120), |e| {
            e.name == "MIGRATION" && e.data["status"] == "completed"
        })
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", restored.report()));
    rq.execute(types::cont {}).await.unwrap();
    let (_, first) = restored
        .serial
        .wait_tick_from(0, Duration::from_secs(60))
        .await
        .unwrap();
    // The restored guest goes on from the tick it had when the snapshot froze it…
    assert!(
        first > before && first <= after + 1,
        "restored at tick {first}, but the snapshot was taken between ticks {before} and {after}"
    );
    // …and its memory agrees with its disk, for several ticks.
    restored
        .serial
        .wait_from(0, Duration::from_secs(30), |l| {
            parse_tick(l).filter(|&n| n >= first + 3)
        })
        .await
        .unwrap();
    assert!(
        restored.serial.mismatches().is_empty(),
        "{}",
        restored.report()
    );
}

#[tokio::test]
async fn bad_input_is_refused_and_changes_nothing() {
    require_qemu!();
    assert!(SnapshotName::new("../etc").is_err());
    assert!(SnapshotName::new("a/b").is_err());
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("d.qcow2");
    create_image(&disk, "qcow2", "16M").await;
    let vm = VmBuilder::idle()
        .disk(&disk, "qcow2", DiskStyle::Drive)
        .spawn()
        .await;
    let qmp = vm.qmp().await;
    // An overlay that already exists: refused before anything changes.
    let squatter = dir.path().join("d.s1.qcow2");
    std::fs::write(&squatter, b"mine").unwrap();
    let opts = CreateOptions {
        name: SnapshotName::new("s1").unwrap(),
        dir: dir.path().join("store"),
        overlay_dir: None,
        save_timeout: Duration::from_secs(60),
    };
    let err = snapshot::create(&qmp, &opts).await.unwrap_err();
    assert!(err.to_string().contains("already exists"), "{err}");
    assert_eq!(std::fs::read(&squatter).unwrap(), b"mine");
    assert!(
        !dir.path().join("store").exists(),
        "preflight created the store"
    );
    let status = qmp.execute(types::query_status {}).await.unwrap();
    assert!(status.running);
    let blocks = qmp.execute(types::query_block {}).await.unwrap();
    assert_eq!(
        blocks[0].inserted.as_ref().unwrap().file,
        disk.display().to_string()
    );
}
