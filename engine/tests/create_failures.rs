//! When a snapshot cannot be taken or fails half-way, nothing is lost or left half-made:
//! a full disk, a cancel (Ctrl-C) and a QEMU killed mid-save roll back; bad input, the invtsc
//! blocker and a concurrent create are refused before anything changes.

use nix::sys::signal::{kill, Signal};
use qsnap_engine::snapshot::{memfile, Mode};
use qsnap_engine::{CreateError, Engine, Error, SnapshotName, Store, VmName};
use qsnap_qmp::types;
use qsnap_testkit::restore::{assert_resumes, restore_guest, Frozen};
use qsnap_testkit::{
    create_image, init_logging, require_qemu, serial::parse_tick, Accel, DiskStyle,
    KillRecordedQemu, Vm, VmBuilder,
};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

fn files_in(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

async fn top_image(vm: &Vm) -> String {
    let qmp = vm.qmp().await;
    let blocks = qmp.execute(types::query_block {}).await.unwrap();
    blocks[0].inserted.as_ref().unwrap().file.clone()
}

async fn ticks_on(vm: &Vm) {
    let last = *vm.serial.ticks().last().unwrap();
    vm.serial
        .wait_from(0, Duration::from_secs(30), |l| {
            parse_tick(l).filter(|&n| n > last + 1)
        })
        .await
        .unwrap_or_else(|e| panic!("the guest stopped ticking: {e}\n{}", vm.report()));
    assert!(vm.serial.mismatches().is_empty(), "{}", vm.report());
}

/// `qemu-img check` of an image a running QEMU holds (-U: no lock).
async fn image_is_valid(image: &Path) {
    let out = tokio::process::Command::new("qemu-img")
        .args(["check", "-U"])
        .arg(image)
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "qemu-img check {}: {out:?}",
        image.display()
    );
}

/// Mounts a tiny tmpfs (root only). `None` (and a loud note) where that is not possible.
fn tiny_fs(at: &Path) -> Option<TinyFs> {
    if !qsnap_testkit::root_or_skip("the ENOSPC part of full_disk_cancel_and_killed_qemu") {
        return None;
    }
    std::fs::create_dir_all(at).unwrap();
    let ok = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=16m,mode=0700", "tmpfs"])
        .arg(at)
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "cannot mount a tmpfs at {} as root", at.display());
    Some(TinyFs(at.to_owned()))
}

struct TinyFs(PathBuf);

impl Drop for TinyFs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_disk_cancel_and_killed_qemu_leave_nothing_half_made() {
    require_qemu!();
    init_logging();
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.qcow2");
    create_image(&base, "qcow2", "64M").await;
    let mut vm = VmBuilder::guest()
        .disk(&base, "qcow2", DiskStyle::Blockdev)
        .dirty_mb(16)
        .spawn()
        .await;
    vm.wait_booted(Duration::from_secs(90)).await;
    let vm_name = VmName::new("vm1").unwrap();
    let attach = |store: PathBuf| {
        let socket = vm.qmp_path.display().to_string();
        let name = vm_name.clone();
        async move {
            let engine = Engine::new(Store::new(store));
            engine.attach(&name, &socket).await.unwrap()
        }
    };

    // 1. ENOSPC while QEMU writes RAM (after the disks switched): the disks merge back.
    let tiny = dir.path().join("tiny");
    if let Some(_fs) = tiny_fs(&tiny) {
        let handle = attach(tiny.join("store")).await;
        let err = handle
            .create_snapshot(handle.create_options(SnapshotName::new("full").unwrap()))
            .await
            .unwrap_err();
        eprintln!("ENOSPC: {err}");
        assert!(matches!(err, Error::SaveFailed { .. }), "{err:?}");
        assert!(err.to_string().contains("No space left"), "{err}");
        assert_eq!(top_image(&vm).await, base.display().to_string());
        assert!(!dir.path().join("base.full.qcow2").exists());
        assert!(files_in(&tiny.join("store/vms/vm1/memory")).is_empty());
        assert!(handle.snapshots().await.unwrap().is_empty());
        image_is_valid(&base).await;
        ticks_on(&vm).await;
    }

    let store = dir.path().join("store");
    let handle = attach(store.clone()).await;
    let mem_dir = store.join("vms/vm1/memory");

    // 2. Cancel (what Ctrl-C does) while RAM is being written.
    let mut opts = handle.create_options(SnapshotName::new("cancelled").unwrap());
    let token = opts.cancel.clone();
    opts.progress = Some(Arc::new(move |_| token.cancel()));
    let err = handle.create_snapshot(opts).await.unwrap_err();
    assert!(matches!(err, Error::Cancelled), "{err:?}");
    assert_eq!(top_image(&vm).await, base.display().to_string());
    assert!(!dir.path().join("base.cancelled.qcow2").exists());
    assert!(files_in(&mem_dir).is_empty(), "{:?}", files_in(&mem_dir));
    assert!(handle.snapshots().await.unwrap().is_empty());
    image_is_valid(&base).await;
    ticks_on(&vm).await;
    {
        let qmp = vm.qmp().await;
        let caps = qmp
            .execute_raw("query-migrate-capabilities", None)
            .await
            .unwrap();
        assert!(caps.as_array().unwrap().iter().all(|c| c["state"] == false));
    }

    // 3. A good snapshot still works after all that.
    let before = *vm.serial.ticks().last().unwrap();
    let good = handle
        .create_snapshot(handle.create_options(SnapshotName::new("good").unwrap()))
        .await
        .unwrap();
    let after = vm
        .serial
        .wait_new_tick(Duration::from_secs(30))
        .await
        .unwrap();
    let mem = good.snapshot.memory.clone().unwrap();
    let restored = restore_guest(
        dir.path(),
        &mem.file,
        memfile::HEADER_LEN,
        &mem.capabilities,
        &[Frozen {
            image: base.clone(),
            format: "qcow2".into(),
        }],
        16,
    )
    .await;
    assert_resumes(&restored, before, after, 2).await;
    drop(restored);

    // 4. QEMU killed while it writes RAM, after the guest made a tick durable on the new
    //    overlay: a clear error, the memory file gone, the overlay kept (it holds the
    //    guest's last writes), named, and recorded as the disk.
    let pid = vm.pid();
    let serial = vm.serial.clone();
    let scenario = qsnap_testkit::failpoints();
    // At the point where the disks have switched and the guest runs again while RAM is
    // saved: wait for two ticks (at least one written and flushed on the new overlay), then
    // kill QEMU.
    fail::cfg_callback("create.resumed", move || {
        let mark = serial.ticks().last().copied().unwrap_or(0);
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while serial.ticks().last().map_or(true, |&t| t < mark + 2)
            && std::time::Instant::now() < deadline
        {
            std::thread::yield_now();
        }
        let _ = kill(pid, Signal::SIGKILL);
    })
    .unwrap();
    let opts = handle.create_options(SnapshotName::new("killed").unwrap());
    let err = handle.create_snapshot(opts).await.unwrap_err();
    drop(scenario);
    let last_durable = *vm.serial.ticks().last().unwrap();
    eprintln!("killed after tick {last_durable}: {err}");
    let text = err.to_string();
    assert!(text.contains("QEMU went away"), "{text}");
    let overlay = dir.path().join("base.killed.qcow2");
    assert!(text.contains(&overlay.display().to_string()), "{text}");
    assert!(overlay.exists());
    assert!(!mem_dir.join("killed.mem").exists());
    assert_eq!(files_in(&mem_dir), vec!["good.mem".to_owned()]);
    assert_eq!(handle.snapshots().await.unwrap().len(), 1);
    assert_eq!(err.kept_overlays(), [("vd0".to_owned(), overlay.clone())]);
    vm.kill().await;

    // The record follows the kept overlay, so a restart opens it (with the guest's last
    // writes), not the image below it, and the guest finds every tick it made durable.
    let status = handle.status().await.unwrap();
    assert!(!status.running);
    assert_eq!(status.disks[0].chain[0], overlay);
    let _kill = KillRecordedQemu::new(&store, "vm1");
    let launched = handle.start().await.unwrap();
    let argv = std::fs::read(format!("/proc/{}/cmdline", launched.pid.unwrap())).unwrap();
    let argv = String::from_utf8_lossy(&argv).replace('\0', " ");
    assert!(argv.contains("base.killed.qcow2"), "{argv}");
    let console = qsnap_testkit::SerialLog::follow(store.join("vms/vm1/qemu.log"));
    let (_, counter) = console
        .wait_from(0, Duration::from_secs(90), |l| {
            l.strip_prefix("qsnap-guest: ready counter=")
                .and_then(|n| n.trim().parse::<u64>().ok())
        })
        .await
        .unwrap_or_else(|e| panic!("the restarted guest did not come up: {e}"));
    assert!(
        counter >= last_durable,
        "the guest printed tick {last_durable} (flushed) before QEMU was killed, but its disk says {counter}"
    );
    handle.stop().await.unwrap();
}

#[tokio::test]
async fn invtsc_blocker_is_refused_with_the_fix_and_disk_only_still_works() {
    require_qemu!();
    init_logging();
    if !qsnap_testkit::kvm_or_skip(
        "invtsc_blocker_is_refused_with_the_fix_and_disk_only_still_works",
    ) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("d.qcow2");
    create_image(&disk, "qcow2", "16M").await;
    let vm = match VmBuilder::idle()
        .accel(Accel::Kvm)
        .cpu("host,+invtsc,-arch-capabilities")
        .disk(&disk, "qcow2", DiskStyle::Drive)
        .try_spawn()
        .await
    {
        Ok(vm) => vm,
        Err(report) => {
            qsnap_testkit::kvm_vm_failed("invtsc_blocker", &report);
            return;
        }
    };
    let engine = Engine::new(Store::new(dir.path().join("store")));
    let handle = engine
        .attach(&VmName::new("tsc").unwrap(), vm.qmp_path.to_str().unwrap())
        .await
        .unwrap();
    let err = handle
        .create_snapshot(handle.create_options(SnapshotName::new("s1").unwrap()))
        .await
        .unwrap_err();
    let text = err.to_string();
    eprintln!("{text}");
    match &err {
        Error::Create(CreateError::MigrationBlocked { reasons, tsc_hz }) => {
            assert!(reasons.iter().any(|r| r.contains("invtsc")), "{reasons:?}");
            let hz = tsc_hz.expect("the TSC frequency is read for the hint");
            assert!(hz > 100_000_000, "{hz}");
            assert!(text.contains(&format!("tsc-frequency={hz}")), "{text}");
            assert!(text.contains("--disk-only"), "{text}");
        }
        other => panic!("expected MigrationBlocked, got {other:?}"),
    }
    // Nothing changed.
    assert!(!dir.path().join("d.s1.qcow2").exists());
    assert!(files_in(&dir.path().join("store/vms/tsc/memory")).is_empty());
    assert_eq!(top_image(&vm).await, disk.display().to_string());

    // The way out the error offers works.
    let mut opts = handle.create_options(SnapshotName::new("s1").unwrap());
    opts.mode = Some(Mode::DiskOnly);
    let m = handle.create_snapshot(opts).await.unwrap();
    assert_eq!(m.snapshot.mode, Mode::DiskOnly);
    assert!(m.snapshot.memory.is_none());
    assert_eq!(
        top_image(&vm).await,
        dir.path().join("d.s1.qcow2").display().to_string()
    );
}

#[tokio::test]
async fn bad_input_and_a_concurrent_create_are_refused_and_change_nothing() {
    require_qemu!();
    init_logging();
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("d.qcow2");
    create_image(&disk, "qcow2", "16M").await;
    let vm = VmBuilder::idle()
        .memory(256)
        .disk(&disk, "qcow2", DiskStyle::Drive)
        .spawn()
        .await;
    let engine = Engine::new(Store::new(dir.path().join("store")));
    for bad in ["../etc", "a/b", "..", "x\ny", ""] {
        assert!(
            matches!(SnapshotName::new(bad), Err(Error::InvalidName { .. })),
            "{bad:?}"
        );
    }
    let missing = engine.vm(&VmName::new("nope").unwrap()).await.unwrap_err();
    assert!(matches!(missing, Error::UnknownVm { .. }), "{missing}");
    let err = engine
        .attach(&VmName::new("ghost").unwrap(), "/nonexistent/qmp.sock")
        .await
        .unwrap_err();
    assert!(err.to_string().contains("monitor"), "{err}");
    assert!(!dir.path().join("store/vms/ghost").exists());

    let handle = engine
        .attach(&VmName::new("vm1").unwrap(), vm.qmp_path.to_str().unwrap())
        .await
        .unwrap();
    let again = engine
        .attach(&VmName::new("vm1").unwrap(), vm.qmp_path.to_str().unwrap())
        .await
        .unwrap_err();
    assert!(matches!(again, Error::VmExists { .. }), "{again}");

    // A file where the overlay would go: qsnap names its overlays, so it takes the next free
    // name, and the file is untouched.
    let squatter = dir.path().join("d.s1.qcow2");
    std::fs::write(&squatter, b"mine").unwrap();
    let s1 = handle
        .create_snapshot(handle.create_options(SnapshotName::new("s1").unwrap()))
        .await
        .unwrap();
    let overlay = dir.path().join("d.s1-2.qcow2");
    assert_eq!(s1.snapshot.disks[0].overlay, overlay);
    assert_eq!(std::fs::read(&squatter).unwrap(), b"mine");
    assert_eq!(top_image(&vm).await, overlay.display().to_string());
    std::fs::remove_file(&squatter).unwrap();

    // A file where the memory file would go (a name the user gave): refused before anything
    // changes, the file untouched.
    let memory_dir = dir.path().join("store/vms/vm1/memory");
    let squatter = memory_dir.join("m.mem");
    std::fs::write(&squatter, b"mine").unwrap();
    let before = files_in(&memory_dir);
    let err = handle
        .create_snapshot(handle.create_options(SnapshotName::new("m").unwrap()))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::TargetExists { .. }), "{err}");
    assert!(err.to_string().contains("never overwrites"), "{err}");
    assert_eq!(std::fs::read(&squatter).unwrap(), b"mine");
    assert_eq!(files_in(&memory_dir), before);
    assert_eq!(top_image(&vm).await, overlay.display().to_string());
    assert!(!dir.path().join("d.m.qcow2").exists());
    std::fs::remove_file(&squatter).unwrap();

    // Two creates at once on one VM: exactly one runs, the other is told who holds the VM.
    let (a, b) = tokio::join!(
        handle.create_snapshot(handle.create_options(SnapshotName::new("a").unwrap())),
        handle.create_snapshot(handle.create_options(SnapshotName::new("b").unwrap())),
    );
    let (ok, refused) = match (a, b) {
        (Ok(m), Err(e)) | (Err(e), Ok(m)) => (m, e),
        (a, b) => panic!("expected one success and one refusal, got {a:?} / {b:?}"),
    };
    match &refused {
        Error::Locked { vm, holder } => {
            assert_eq!(vm, "vm1");
            assert!(holder.contains(&format!("create {}", ok.name)), "{holder}");
        }
        other => panic!("expected Locked, got {other:?}"),
    }
    assert_eq!(
        handle.snapshots().await.unwrap().len(),
        2,
        "s1 and one of the two"
    );

    // A used name and an unknown snapshot.
    let err = handle
        .create_snapshot(handle.create_options(SnapshotName::new(&ok.name).unwrap()))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::SnapshotExists { .. }), "{err}");
    let err = handle
        .snapshot(&SnapshotName::new("never").unwrap())
        .await
        .unwrap_err();
    assert!(matches!(err, Error::UnknownSnapshot { .. }), "{err}");
}
