//! Disk overlays on the VM shapes people run: `-drive` and `-blockdev` disks side by side,
//! raw and qcow2 bases, a read-only disk and an empty drive (skipped, and said so). All
//! writable disks switch in one transaction, for memory and disk-only snapshots alike.

use qsnap_engine::snapshot::Mode;
use qsnap_engine::{Engine, RunOptions, SnapshotName, Store, VmName};
use qsnap_qmp::types;
use qsnap_testkit::{
    create_image, init_logging, require_qemu, DiskStyle, KillRecordedQemu, VmBuilder,
};
use std::collections::BTreeMap;
use std::path::Path;

async fn backing_of(overlay: &Path) -> String {
    let out = tokio::process::Command::new("qemu-img")
        .args(["info", "-U", "--output=json"])
        .arg(overlay)
        .output()
        .await
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v["backing-filename"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

#[tokio::test]
async fn drive_and_blockdev_disks_switch_together_and_read_only_or_empty_ones_are_skipped() {
    require_qemu!();
    init_logging();
    let dir = tempfile::tempdir().unwrap();
    let d = |n: &str| dir.path().join(n);
    create_image(&d("raw.img"), "raw", "16M").await;
    create_image(&d("q.qcow2"), "qcow2", "16M").await;
    create_image(&d("bd.qcow2"), "qcow2", "16M").await;
    create_image(&d("ro.qcow2"), "qcow2", "16M").await;
    let vm = VmBuilder::idle()
        .disk(d("raw.img"), "raw", DiskStyle::Drive)
        .disk(d("q.qcow2"), "qcow2", DiskStyle::Drive)
        .disk(d("bd.qcow2"), "qcow2", DiskStyle::Blockdev)
        .args([
            "-drive".to_owned(),
            format!(
                "file={},if=virtio,format=qcow2,readonly=on,id=rodisk",
                d("ro.qcow2").display()
            ),
            "-drive".to_owned(),
            "if=ide,media=cdrom,id=cd0".to_owned(),
        ])
        .spawn()
        .await;
    let engine = Engine::new(Store::new(d("store")));
    let handle = engine
        .attach(
            &VmName::new("multi").unwrap(),
            vm.qmp_path.to_str().unwrap(),
        )
        .await
        .unwrap();

    for (snap, mode) in [("m1", None), ("d1", Some(Mode::DiskOnly))] {
        let mut opts = handle.create_options(SnapshotName::new(snap).unwrap());
        opts.mode = mode;
        let m = handle.create_snapshot(opts).await.unwrap();
        let s = &m.snapshot;
        assert_eq!(s.memory.is_some(), mode.is_none());
        let switched: BTreeMap<_, _> = s.disks.iter().map(|p| (p.device.as_str(), p)).collect();
        assert_eq!(
            switched.keys().copied().collect::<Vec<_>>(),
            vec!["drive0", "drive1", "vd2"],
            "{s:#?}"
        );
        let mut skipped: Vec<_> = s
            .skipped
            .iter()
            .map(|k| (k.device.as_str(), k.reason.as_str()))
            .collect();
        skipped.sort();
        assert_eq!(skipped, vec![("cd0", "empty"), ("rodisk", "read-only")]);
        // Each overlay is named from its image and the snapshot and backed by that image.
        let stems = [("drive0", "raw"), ("drive1", "q"), ("vd2", "bd")];
        for (dev, stem) in stems {
            let p = switched[dev];
            assert_eq!(p.overlay, d(&format!("{stem}.{snap}.qcow2")));
            assert_eq!(backing_of(&p.overlay).await, p.image.display().to_string());
        }
        assert_eq!(
            switched["drive0"].format,
            if snap == "m1" { "raw" } else { "qcow2" }
        );
        // QEMU writes to the overlays now; the read-only disk is untouched.
        let qmp = vm.qmp().await;
        let blocks = qmp.execute(types::query_block {}).await.unwrap();
        let tops: Vec<String> = blocks
            .iter()
            .filter_map(|b| b.inserted.as_ref().map(|i| i.file.clone()))
            .collect();
        for (dev, _) in stems {
            assert!(
                tops.contains(&switched[dev].overlay.display().to_string()),
                "{tops:?}"
            );
        }
        assert!(tops.contains(&d("ro.qcow2").display().to_string()));
        assert!(qmp.execute(types::query_status {}).await.unwrap().running);
    }
    let list = handle.snapshots().await.unwrap();
    assert_eq!(
        list.iter().map(|m| m.name.as_str()).collect::<Vec<_>>(),
        vec!["m1", "d1"]
    );
    assert_eq!(list[1].parent.as_deref(), Some("m1"));
}

/// A command line with a relative image path (QEMU reports it as given): qsnap resolves it
/// against QEMU's working directory, snapshots it, and relaunches on the overlay.
#[tokio::test]
async fn relative_image_paths_resolve_against_qemus_working_directory() {
    require_qemu!();
    init_logging();
    let dir = tempfile::tempdir().unwrap();
    create_image(&dir.path().join("rel.img"), "raw", "16M").await;
    let mut argv = VmBuilder::idle()
        .command_line(&dir.path().join("serial.log"))
        .await;
    argv.extend([
        "-drive".to_owned(),
        "file=rel.img,format=raw,if=virtio,id=d0".to_owned(),
    ]);
    let engine = Engine::new(Store::new(dir.path().join("store")));
    let _kill = KillRecordedQemu::new(&dir.path().join("store"), "rel");
    let opts = RunOptions {
        cwd: Some(dir.path().to_owned()),
        ..RunOptions::default()
    };
    let rec = engine
        .run(&VmName::new("rel").unwrap(), argv, &opts)
        .await
        .unwrap()
        .record;
    assert_eq!(rec.disks[0].image, dir.path().join("rel.img"));
    let vm = engine.vm(&VmName::new("rel").unwrap()).await.unwrap();
    let m = vm
        .create_snapshot(vm.create_options(SnapshotName::new("s1").unwrap()))
        .await
        .unwrap();
    assert_eq!(m.snapshot.disks[0].image, dir.path().join("rel.img"));
    assert_eq!(m.snapshot.disks[0].overlay, dir.path().join("rel.s1.qcow2"));
    vm.stop().await.unwrap();
    vm.start().await.unwrap();
    let st = vm.status().await.unwrap();
    assert_eq!(
        st.disks[0].chain,
        vec![dir.path().join("rel.s1.qcow2"), dir.path().join("rel.img")]
    );
    vm.revert(&SnapshotName::new("s1").unwrap(), false)
        .await
        .unwrap();
    assert!(vm.status().await.unwrap().running);
    vm.stop().await.unwrap();
}
