//! The test guest itself: it boots under TCG, ticks, keeps its counter on disk, and really
//! notices when disk and memory disagree (so a snapshot test that sees no MISMATCH means it).

use qsnap_qmp::types;
use qsnap_testkit::{create_image, init_logging, require_qemu, DiskStyle, VmBuilder};
use std::time::Duration;

const BOOT: Duration = Duration::from_secs(90);

#[tokio::test]
async fn guest_ticks_persists_its_counter_and_detects_a_mismatch() {
    require_qemu!();
    init_logging();
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("counter.qcow2");
    create_image(&disk, "qcow2", "64M").await;

    // First boot on a fresh disk: the counter starts at 0 and goes up one by one.
    let mut vm = VmBuilder::guest()
        .disk(&disk, "qcow2", DiskStyle::Blockdev)
        .spawn()
        .await;
    assert_eq!(vm.wait_booted(BOOT).await, 1, "{}", vm.report());
    let (_, t5) = vm
        .serial
        .wait_from(0, Duration::from_secs(30), |l| {
            qsnap_testkit::serial::parse_tick(l).filter(|&n| n >= 5)
        })
        .await
        .unwrap();
    let ticks = vm.serial.ticks();
    assert!(ticks.windows(2).all(|w| w[1] == w[0] + 1), "{ticks:?}");
    assert!(vm.serial.mismatches().is_empty(), "{}", vm.report());
    let qmp = vm.qmp().await;
    qmp.execute(types::quit {}).await.ok();
    drop(qmp);
    assert!(vm.wait_exit(Duration::from_secs(10)).await.is_some());
    let last = *vm.serial.ticks().last().unwrap();
    assert!(last >= t5);

    // Second boot on the same disk, with the memory-dirtying load on: the counter resumes
    // from what the disk holds.
    let vm = VmBuilder::guest()
        .disk(&disk, "qcow2", DiskStyle::Drive)
        .dirty_mb(16)
        .spawn()
        .await;
    let first = vm.wait_booted(BOOT).await;
    assert_eq!(first, last + 1, "counter did not persist on disk");
    assert!(
        vm.serial
            .lines()
            .iter()
            .any(|l| l.text == "qsnap-guest: dirtying 16 MiB"),
        "{}",
        vm.report()
    );
    assert!(vm.serial.mismatches().is_empty(), "{}", vm.report());

    // Wipe the counter sector behind the guest's back: it must say MISMATCH.
    let qmp = vm.qmp().await;
    let seen = vm.serial.len();
    qmp.execute(types::human_monitor_command {
        command_line: "qemu-io drive0 \"write -P 0 0 512\"".into(),
        cpu_index: None,
    })
    .await
    .unwrap();
    let (_, line) = vm
        .serial
        .wait_from(seen, Duration::from_secs(30), |l| {
            l.contains("MISMATCH").then(|| l.to_owned())
        })
        .await
        .unwrap();
    assert!(line.starts_with("MISMATCH disk=none mem="), "{line}");
}
