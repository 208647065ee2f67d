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
/// Reads it back (the monitor's reply does not carry qemu-io's output, so a failed write
/// would otherwise go unseen).
pub async fn write(qmp: &Qmp, disk: &Disk, pattern: u8, offset_kib: u64, len_kib: u64) {
    qemu_io(
        qmp,
        disk,
        &format!("write -P {pattern:#04x} {offset_kib}k {len_kib}k"),
    )
    .await;
    if let Err(e) = check(qmp, disk, pattern, offset_kib, len_kib).await {
        panic!("the write did not land: {e}");
    }
}

/// Whether `len_kib` KiB at `offset_kib` KiB all hold byte `pattern`; `Err` says what was
/// found instead. Panics when it cannot tell (no such disk, qemu-io failing), so that `Err`
/// always means "other data". QEMU prints `qemu-io`'s output on its own stdout, not in the monitor's
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
        .unwrap_or_else(|e| panic!("query-block: {e}"));
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
        .unwrap_or_else(|| panic!("{disk:?}: no such disk with a medium in query-block"));
    let out = tokio::process::Command::new("qemu-io")
        .args(["-r", "-U", "-f", &format, "-c"])
        .arg(format!("read -P {pattern:#04x} {offset_kib}k {len_kib}k"))
        .arg(&file)
        .output()
        .await
        .unwrap_or_else(|e| panic!("running qemu-io: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if !text.contains("read ") {
        panic!("qemu-io could not read {file}: {}", text.trim());
    }
    if text.contains("verification failed") {
        Err(format!(
            "{disk:?} ({file}) at {offset_kib}k: expected {pattern:#04x}: {}",
            text.trim()
        ))
    } else {
        Ok(())
    }
}

/// Damages a qcow2 image's metadata the way a bad sector would: its first refcount block is
/// zeroed, so every cluster in use has refcount 0 (`qemu-img check` reports corruptions). For
/// an image no QEMU has open.
pub fn zero_first_refcount_block(image: &std::path::Path) {
    use std::io::{Read, Seek, SeekFrom, Write};
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(image)
        .unwrap();
    let mut h = [0u8; 56];
    f.read_exact(&mut h).unwrap();
    let table = u64::from_be_bytes(h[48..56].try_into().unwrap());
    let mut entry = [0u8; 8];
    f.seek(SeekFrom::Start(table)).unwrap();
    f.read_exact(&mut entry).unwrap();
    let block = u64::from_be_bytes(entry);
    assert!(block > 0, "{}: no refcount block", image.display());
    f.seek(SeekFrom::Start(block)).unwrap();
    f.write_all(&[0u8; 4096]).unwrap();
}
