//! Checking a snapshot the independent way: load its memory stream into a fresh QEMU (on new
//! overlays over the snapshot's frozen images) with plain QMP, and watch the guest go on.
//! Uses no qsnap engine code, so an engine bug cannot hide itself here.

use crate::fixture::{Vm, VmBuilder};
use crate::serial::parse_tick;
use crate::DiskStyle;
use qsnap_qmp::types;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::process::Command;

/// A frozen image to restore onto.
#[derive(Debug, Clone)]
pub struct Frozen {
    /// The image.
    pub image: PathBuf,
    /// Its format.
    pub format: String,
}

/// Starts the test guest with `-incoming defer` on new overlays (in `work`) over `images`,
/// loads `mem` from `offset` with the stream format capabilities the save recorded
/// (`mapped-ram`, `multifd`), and resumes it. Panics with QEMU's report on failure.
pub async fn restore_guest(
    work: &Path,
    mem: &Path,
    offset: u64,
    capabilities: &[String],
    images: &[Frozen],
    dirty_mb: u32,
) -> Vm {
    let mut builder = VmBuilder::guest().dirty_mb(dirty_mb);
    for (i, f) in images.iter().enumerate() {
        let overlay = work.join(format!(
            "restore-{}-{i}.qcow2",
            mem.file_stem().unwrap_or_default().to_string_lossy()
        ));
        // The image may be held by a running QEMU: read its size without a lock (-U), create
        // the overlay without opening it (-u).
        let info = Command::new("qemu-img")
            .args(["info", "-U", "--output=json"])
            .arg(&f.image)
            .output()
            .await
            .expect("qemu-img runs");
        let info: serde_json::Value = serde_json::from_slice(&info.stdout).expect("qemu-img json");
        let size = info["virtual-size"]
            .as_u64()
            .expect("virtual-size")
            .to_string();
        let out = Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "-u", "-F", &f.format, "-b"])
            .arg(&f.image)
            .arg(&overlay)
            .arg(size)
            .output()
            .await
            .expect("qemu-img runs");
        assert!(out.status.success(), "{out:?}");
        builder = builder.disk(overlay, "qcow2", DiskStyle::Blockdev);
    }
    let vm = builder.args(["-incoming", "defer"]).spawn().await;
    let qmp = vm.qmp().await;
    let mut events = qmp.events();
    let caps: Vec<serde_json::Value> = std::iter::once("events")
        .chain(
            capabilities
                .iter()
                .map(String::as_str)
                .filter(|c| matches!(*c, "mapped-ram" | "multifd")),
        )
        .map(|c| serde_json::json!({"capability": c, "state": true}))
        .collect();
    qmp.execute_raw(
        "migrate-set-capabilities",
        Some(serde_json::json!({ "capabilities": caps })),
    )
    .await
    .unwrap();
    qmp.execute(types::migrate_incoming {
        uri: Some(format!("file:{},offset={offset}", mem.display())),
        channels: None,
        exit_on_error: None,
    })
    .await
    .unwrap();
    if let Err(e) = events
        .wait_for("MIGRATION completed", Duration::from_secs(120), |e| {
            e.name == "MIGRATION"
                && matches!(e.data["status"].as_str(), Some("completed" | "failed"))
        })
        .await
    {
        panic!("{e}\n{}", vm.report());
    }
    let st = qmp.execute_raw("query-migrate", None).await.unwrap();
    assert_eq!(st["status"], "completed", "{st}\n{}", vm.report());
    // The save stopped the guest, so the loaded state is paused: resume it.
    qmp.execute(types::cont {}).await.unwrap();
    vm
}

/// Asserts that a restored guest goes on from a tick in `(before, after + 1]` (the snapshot
/// was taken between ticks `before` and `after`), ticks `more` times, and never sees its
/// memory disagree with its disk. Returns the first tick.
pub async fn assert_resumes(vm: &Vm, before: u64, after: u64, more: u64) -> u64 {
    let first = match vm.serial.wait_tick_from(0, Duration::from_secs(60)).await {
        Ok((_, n)) => n,
        Err(e) => panic!("restored guest did not tick: {e}\n{}", vm.report()),
    };
    assert!(
        first > before && first <= after + 1,
        "restored at tick {first}, but the snapshot was taken between ticks {before} and {after}\n{}",
        vm.report()
    );
    if let Err(e) = vm
        .serial
        .wait_from(0, Duration::from_secs(60), |l| {
            parse_tick(l).filter(|&n| n >= first + more)
        })
        .await
    {
        panic!("restored guest stalled: {e}\n{}", vm.report());
    }
    assert!(vm.serial.mismatches().is_empty(), "{}", vm.report());
    first
}
