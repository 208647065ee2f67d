//! Shared by the harness's tests and the engine's (`engine/tests/common` includes this file):
//! the golden snapshot of the test guest.

use qsnap_harness::{console_prints, Golden};
use qsnap_testkit::{DiskStyle, VmBuilder};
use std::path::PathBuf;

/// The golden snapshot the tests share (each test is its own process under nextest: the first
/// one to ask boots the test guest and snapshots it when it ticks, the others fork from that
/// snapshot at once; kept in the target directory for the next run). Forks load its memory
/// rather than map it, so that they take point-in-time snapshots like a booted guest.
///
/// The engine's tests include this file too (`engine/tests/common`): one cached snapshot
/// serves both crates' tests.
pub async fn golden() -> Golden {
    let argv = VmBuilder::guest()
        .disk("{dir}/disk.qcow2", "qcow2", DiskStyle::Blockdev)
        .command_line(std::path::Path::new("{dir}/console.log"))
        .await;
    Golden::boot(argv)
        .disk("disk.qcow2", 64 << 20)
        .ready_when(console_prints("tick 3"))
        .lazy(false)
        .cache_in(PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("golden"))
        .snapshot("ready")
        .await
        .unwrap()
}
