//! What a qsnap store should hold, read from `qsnap list VM --json`, for tests that check
//! that every file is accounted for (after a crash, a power cut, a repair): the images whose
//! chains the store needs, and the memory files its snapshots name. Reads only; running
//! `qemu-img` on the chains (with whatever deadline the test needs) is the caller's.

use serde_json::Value;
use std::collections::BTreeSet;
use std::path::Path;

/// The top images of every chain the store needs: the VM's disks now, and every snapshot's
/// frozen disks. Their backing chains are what must stay.
pub fn chain_tops(listing: &Value) -> Vec<String> {
    let mut tops: Vec<String> = listing["vm"]["disks"]
        .as_array()
        .expect("a listing's vm.disks")
        .iter()
        .map(|d| d["image"].as_str().expect("a disk's image").to_owned())
        .collect();
    for m in listing["snapshots"]
        .as_array()
        .expect("a listing's snapshots")
    {
        for d in m["disks"].as_array().expect("a snapshot's disks") {
            tops.push(d["image"].as_str().expect("a disk's image").to_owned());
        }
    }
    tops
}

/// The file names of the memory files the snapshots name: each one's stream, or (lazy) its
/// device state and RAM image.
pub fn memory_files_named(listing: &Value) -> BTreeSet<String> {
    let mut named = BTreeSet::new();
    for m in listing["snapshots"]
        .as_array()
        .expect("a listing's snapshots")
    {
        let memory = &m["memory"];
        for f in [&memory["file"], &memory["lazy"]["image"]] {
            if let Some(f) = f.as_str() {
                named.insert(f.rsplit('/').next().unwrap_or(f).to_owned());
            }
        }
    }
    named
}

/// The names of the entries of `dir` (none when it does not exist).
pub fn file_names(dir: &Path) -> BTreeSet<String> {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}
