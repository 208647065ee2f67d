//! Writing and checking data on a running VM's disks without a guest: QEMU's own `qemu-io`
//! through the human monitor (`human-monitor-command`). Kernel-less test VMs use it to put a
//! known pattern on each disk before each snapshot, and to check after a revert or a merge
//! that every byte is where it belongs.

use qsnap_qmp::Qmp;
use serde_json::json;

/// How `qemu-io` names a disk.
#[derive(Debug, Clone)]
pub enum Disk {
    /// A `-drive` by its id.
    Drive(String),
    /// A guest device (a `-blockdev` disk) by its id: `-device virtio-blk-pci,id=vd0`.
    Device(String),
}

impl Disk {
    fn arg(&self) -> String {
        match self {
            Disk::Drive(id) => id.clone(),
            Disk::Device(id) => format!("-d /machine/peripheral/{id}/virtio-backend"),
        }
    }
}

async fn qemu_io(qmp: &Qmp, disk: &Disk, command: &str) -> String {
    let line = format!("qemu-io {} \"{command}\"", disk.arg());
    let out = qmp
        .execute_raw(
            "human-monitor-command",
            Some(json!({ "command-line": line })),
        )
        .await
        .unwrap_or_else(|e| panic!("{line}: {e}"));
    out.as_str().unwrap_or_default().to_owned()
}

/// Writes byte `pattern` over `len_kib` KiB at `offset_kib` KiB, and flushes: what a guest
/// that called fsync would have made durable, so it must survive whatever happens to QEMU.
pub async fn write(qmp: &Qmp, disk: &Disk, pattern: u8, offset_kib: u64, len_kib: u64) {
    let out = qemu_io(
        qmp,
        disk,
        &format!("write -P {pattern:#04x} {offset_kib}k {len_kib}k"),
    )
    .await;
    assert!(!out.contains("rror") && !out.contains("failed"), "{out}");
    let out = qemu_io(qmp, disk, "flush").await;
    assert!(!out.contains("rror") && !out.contains("failed"), "{out}");
}

/// Whether `len_kib` KiB at `offset_kib` KiB all hold byte `pattern`; `Err` says what was
/// found instead. QEMU prints `qemu-io`'s output on its own stdout, not in the monitor's
/// reply, so the read runs outside: QEMU flushes the disk, then `qemu-io -r -U` reads the
/// device's current image (and its backing chain) from the files.
pub async fn check(
    qmp: &Qmp,
    disk: &Disk,
    pattern: u8,
    offset_kib: u64,
    len_kib: u64,
) -> Result<(), String> {
    qemu_io(qmp, disk, "flush").await;
    let blocks = qmp
        .execute_raw("query-block", None)
        .await
        .map_err(|e| format!("query-block: {e}"))?;
    let (file, format) = blocks
        .as_array()
        .into_iter()
        .flatten()
        .find(|b| match disk {
            Disk::Drive(id) => b["device"] == id.as_str(),
            Disk::Device(id) => {
                b["qdev"] == format!("/machine/peripheral/{id}/virtio-backend").as_str()
                    || b["qdev"] == id.as_str()
            }
        })
        .and_then(|b| {
            let img = &b["inserted"]["image"];
            Some((
                img["filename"].as_str()?.to_owned(),
                img["format"].as_str()?.to_owned(),
            ))
        })
        .ok_or_else(|| format!("{disk:?}: no such disk with a medium in query-block"))?;
    let out = tokio::process::Command::new("qemu-io")
        .args(["-r", "-U", "-f", &format, "-c"])
        .arg(format!("read -P {pattern:#04x} {offset_kib}k {len_kib}k"))
        .arg(&file)
        .output()
        .await
        .map_err(|e| format!("running qemu-io: {e}"))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if !out.status.success() || text.contains("verification failed") || !text.contains("read ") {
        Err(format!(
            "{disk:?} ({file}) at {offset_kib}k: expected {pattern:#04x}: {}",
            text.trim()
        ))
    } else {
        Ok(())
    }
}
