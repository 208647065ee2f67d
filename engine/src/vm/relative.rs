//! Relative image paths in a store an older qsnap wrote (it recorded `--overlay-dir ovl` as
//! given, so manifests and the record named `ovl/disk.s1.qcow2`): found by `check`, resolved
//! by `check --repair`, so that every record qsnap ever wrote can be repaired.
//!
//! A relative path is resolved only to a file that proves to be it: one of the places it can
//! have been meant from — the VM's recorded working directory (where QEMU resolved it) or the
//! directory of the image it backs onto — holding a qcow2 image whose backing file is that
//! image. No such file, or more than one, is "cannot tell": reported with what to do, the
//! file left as it is, and nothing after it in `check` runs (a relative path must never reach
//! the reference guard, which would resolve it against qsnap's own directory). The store's
//! readers stay strict: only this module reads such a manifest, and only to repair it.

use super::findings::Finding;
use super::Vm;
use crate::error::Result;
use crate::image;
use crate::store::{self, Manifest, VmRecord};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// What `check` learns about relative paths.
pub(crate) struct Resolution {
    /// One per relative path in each file.
    pub findings: Vec<Finding>,
    /// Relative paths are still in the store (not repaired, or not resolvable): nothing that
    /// reads every manifest or unlinks images may run.
    pub remaining: bool,
}

/// Finds the VM's relative image paths and, with `repair`, rewrites every file whose relative
/// paths all resolve.
pub(crate) async fn settle(vm: &Vm, repair: bool) -> Result<Resolution> {
    let manifests = vm.store().manifests_with_relative_paths(vm.name()).await?;
    let mut record = vm.store().record(vm.name()).await?;
    let record_paths = relative_in_record(&record);
    if manifests.is_empty() && record_paths.is_empty() {
        return Ok(Resolution {
            findings: Vec::new(),
            remaining: false,
        });
    }
    let cwd = record.command.as_ref().map(|c| c.cwd.clone());
    let mut resolved: BTreeMap<PathBuf, PathBuf> = BTreeMap::new();
    let mut why_not: BTreeMap<PathBuf, String> = BTreeMap::new();

    // Overlays first, a chain at a time: an overlay's backing is its manifest's image, which
    // may itself be an overlay resolved in an earlier pass.
    loop {
        let mut progress = false;
        for (_, m) in &manifests {
            for d in &m.snapshot.disks {
                if !d.overlay.is_relative() || resolved.contains_key(&d.overlay) {
                    continue;
                }
                let Some(base) = absolute(&d.image, &resolved) else {
                    continue;
                };
                match find(&d.overlay, &[base], cwd.as_deref(), vm).await {
                    Ok(p) => {
                        resolved.insert(d.overlay.clone(), p);
                        why_not.remove(&d.overlay);
                        progress = true;
                    }
                    Err(why) => {
                        why_not.insert(d.overlay.clone(), why);
                    }
                }
            }
        }
        if !progress {
            break;
        }
    }
    // Anything else (the record's current images, images it lists as qsnap's) must back onto
    // an image the VM is known to use.
    let mut known: Vec<PathBuf> = manifests
        .iter()
        .flat_map(|(_, m)| m.snapshot.disks.iter())
        .flat_map(|d| {
            [
                absolute(&d.image, &resolved),
                absolute(&d.overlay, &resolved),
            ]
        })
        .flatten()
        .collect();
    known.extend(
        record
            .disks
            .iter()
            .flat_map(|d| [&d.image, &d.launch_image])
            .filter(|p| p.is_absolute())
            .cloned(),
    );
    let others: Vec<PathBuf> = manifests
        .iter()
        .flat_map(|(_, m)| m.snapshot.disks.iter())
        .flat_map(|d| [&d.image, &d.overlay])
        .chain(record_paths.iter())
        .filter(|p| p.is_relative() && !resolved.contains_key(*p))
        .cloned()
        .collect();
    for rel in others {
        if resolved.contains_key(&rel) {
            continue;
        }
        let found = if known.is_empty() {
            Err("qsnap knows no image of this VM it could back onto".into())
        } else {
            find(&rel, &known, cwd.as_deref(), vm).await
        };
        match found {
            Ok(p) => {
                resolved.insert(rel.clone(), p);
                why_not.remove(&rel);
            }
            Err(why) => {
                why_not.entry(rel).or_insert(why);
            }
        }
    }

    let mut findings = Vec::new();
    let mut remaining = false;
    let files = manifests
        .iter()
        .map(|(file, m)| {
            let paths = m
                .snapshot
                .disks
                .iter()
                .flat_map(|d| [&d.image, &d.overlay])
                .filter(|p| p.is_relative())
                .cloned()
                .collect::<Vec<_>>();
            (file.clone(), Some(m), paths)
        })
        .chain(std::iter::once((
            vm.store().vm_dir(vm.name()).join("vm.json"),
            None,
            record_paths.clone(),
        )));
    for (file, manifest, mut paths) in files {
        paths.sort();
        paths.dedup();
        if paths.is_empty() {
            continue;
        }
        let all = paths.iter().all(|p| resolved.contains_key(p));
        let written = if repair && all {
            let done = match manifest {
                Some(m) => {
                    let mut m: Manifest = m.clone();
                    for d in &mut m.snapshot.disks {
                        for p in [&mut d.image, &mut d.overlay] {
                            if let Some(abs) = resolved.get(p.as_path()) {
                                *p = abs.clone();
                            }
                        }
                    }
                    vm.store().replace_manifest(&m).await
                }
                None => {
                    absolutize_record(&mut record, &resolved);
                    vm.store().write_record(&record).await
                }
            };
            Some(done)
        } else {
            None
        };
        for rel in &paths {
            let what = format!(
                "{} names the image {} by a relative path (an older qsnap recorded a relative \
                 --overlay-dir as given)",
                file.display(),
                rel.display()
            );
            let (fix, repaired) = match (resolved.get(rel), &written) {
                (Some(abs), Some(Ok(()))) => (format!("now {}", abs.display()), true),
                (Some(_), Some(Err(e))) => (format!("could not be rewritten: {e}"), false),
                (Some(abs), None) if all => (
                    format!(
                        "it is {} (a qcow2 image over the image it must back onto); `--repair` \
                         records that",
                        abs.display()
                    ),
                    false,
                ),
                (Some(abs), None) => (
                    format!(
                        "it is {}, but this file also holds a path qsnap cannot resolve; see \
                         the other finding",
                        abs.display()
                    ),
                    false,
                ),
                (None, _) => (
                    format!(
                        "qsnap cannot tell which file it is ({}); edit {} to name the image's \
                         absolute path, then check again",
                        why_not
                            .get(rel)
                            .map(String::as_str)
                            .unwrap_or("no candidate"),
                        file.display()
                    ),
                    false,
                ),
            };
            remaining |= !repaired;
            let mut paths = vec![file.clone()];
            if let Some(abs) = resolved.get(rel) {
                paths.push(abs.clone());
            }
            findings.push(Finding {
                kind: "relative-path".into(),
                what,
                fix,
                repaired,
                // Resolvable only when every path of the file is (it is rewritten whole).
                repairable: all && resolved.contains_key(rel),
                paths,
            });
        }
    }
    Ok(Resolution {
        findings,
        remaining,
    })
}

/// The record's relative paths (current images, command-line images, images it owns).
fn relative_in_record(record: &VmRecord) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = record
        .disks
        .iter()
        .flat_map(|d| [&d.image, &d.launch_image])
        .chain(record.owned_images.iter())
        .filter(|p| p.is_relative())
        .cloned()
        .collect();
    out.sort();
    out.dedup();
    out
}

fn absolutize_record(record: &mut VmRecord, resolved: &BTreeMap<PathBuf, PathBuf>) {
    let fix = |p: &mut PathBuf| {
        if let Some(abs) = resolved.get(p.as_path()) {
            *p = abs.clone();
        }
    };
    for d in &mut record.disks {
        fix(&mut d.image);
        fix(&mut d.launch_image);
    }
    record.owned_images.iter_mut().for_each(fix);
}

/// `p` itself when absolute, else what it was resolved to.
fn absolute(p: &Path, resolved: &BTreeMap<PathBuf, PathBuf>) -> Option<PathBuf> {
    if p.is_absolute() {
        Some(p.to_owned())
    } else {
        resolved.get(p).cloned()
    }
}

/// The one file `rel` can be: a regular file in one of the places it may have been meant
/// from that is a qcow2 image backing onto one of `backings`. Says why not otherwise.
async fn find(
    rel: &Path,
    backings: &[PathBuf],
    cwd: Option<&Path>,
    vm: &Vm,
) -> std::result::Result<PathBuf, String> {
    let mut candidates: Vec<PathBuf> = cwd.map(|c| c.join(rel)).into_iter().collect();
    for dir in backings.iter().filter_map(|b| b.parent()) {
        let c = dir.join(rel);
        if !candidates.contains(&c) {
            candidates.push(c);
        }
    }
    let mut fits: Vec<(PathBuf, Option<(u64, u64)>)> = Vec::new();
    for c in &candidates {
        let Some(id) = file_id(c).await else {
            continue;
        };
        if fits.iter().any(|(_, f)| *f == Some(id)) {
            continue; // the same file by another name
        }
        let Ok(info) = image::info(c, vm.cancel()).await else {
            continue;
        };
        let backs_right = match &info.full_backing_filename {
            Some(b) => {
                let bid = file_id(b).await;
                let mut ok = false;
                for known in backings {
                    if known == b || (bid.is_some() && file_id(known).await == bid) {
                        ok = true;
                        break;
                    }
                }
                ok
            }
            None => false,
        };
        if info.format == "qcow2" && backs_right {
            fits.push((c.clone(), Some(id)));
        }
    }
    let shown = candidates
        .iter()
        .map(|c| c.display().to_string())
        .collect::<Vec<_>>()
        .join(", ");
    match fits.len() {
        1 => Ok(fits.remove(0).0),
        0 => Err(format!(
            "none of {shown} is a qcow2 image backing onto {}",
            backings
                .iter()
                .map(|b| b.display().to_string())
                .collect::<Vec<_>>()
                .join(" or ")
        )),
        _ => Err(format!("several files fit: {shown}")),
    }
}

/// A regular file's device and inode.
async fn file_id(p: &Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    let p = p.to_owned();
    store::blocking(move || {
        Ok(std::fs::metadata(&p)
            .ok()
            .filter(|m| m.is_file())
            .map(|m| (m.dev(), m.ino())))
    })
    .await
    .ok()
    .flatten()
}
