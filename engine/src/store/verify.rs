//! What the store's readers check before anything they read is used, and what its writers
//! check before they write (never what the reader would refuse): the schema version, names,
//! plain absolute paths (no `..` a hand edit could climb out with), memory files that are the
//! store's own. Pure checks over parsed files; no I/O.

use super::*;

impl Store {
    pub(super) fn check_journal(&self, j: &Journal, vm: &VmName, path: &Path) -> Result<()> {
        let bad = |why: String| Error::CorruptStore {
            path: path.to_owned(),
            why: format!("{why}; remove it only after checking by hand what it was doing"),
        };
        let snap = |name: &str| {
            SnapshotName::parse(name).ok_or_else(|| {
                bad(format!(
                    "it names an invalid snapshot \"{}\"",
                    name.escape_debug()
                ))
            })
        };
        let plain = |p: &Path, what: &str| {
            if plain_absolute(p) {
                Ok(())
            } else {
                Err(bad(format!(
                    "{what} {} is not an absolute, plain path",
                    p.display()
                )))
            }
        };
        let disks = |ds: &[CurrentDisk]| {
            ds.iter().try_for_each(|d| {
                plain(&d.image, "the image")?;
                plain(&d.launch_image, "the image")
            })
        };
        match &j.intent {
            Intent::Create(c) => {
                let s = snap(&c.snapshot)?;
                if let Some(mem) = &c.memory_file {
                    if *mem != self.memory_path(vm, &s) {
                        return Err(bad(format!(
                            "its memory file {} is not the store's file for snapshot {s}",
                            mem.display()
                        )));
                    }
                }
                for o in &c.overlays {
                    plain(&o.overlay, "the overlay")?;
                    plain(&o.image, "the image")?;
                }
                if let Some(m) = &c.committed {
                    check_manifest(m, vm, &self.manifest_path(vm, &s))?;
                }
            }
            Intent::Revert(r) => {
                snap(&r.snapshot)?;
                for o in &r.new_overlays {
                    plain(o, "the new overlay")?;
                    // A recovery may make them the VM's disks, or remove them: only overlays
                    // the revert's own new disks name.
                    if !r.new_disks.iter().any(|d| &d.image == o) {
                        return Err(bad(format!(
                            "its new overlay {} is none of the disks it reverts to",
                            o.display()
                        )));
                    }
                }
                disks(&r.old_disks)?;
                disks(&r.new_disks)?;
            }
            Intent::Delete(d) => {
                for s in &d.snapshots {
                    snap(s)?;
                }
                for m in &d.manifests {
                    let s = snap(&m.name)?;
                    check_manifest(m, vm, &self.manifest_path(vm, &s))?;
                }
                for m in &d.merges {
                    plain(&m.lower, "a merged layer")?;
                    plain(&m.upper, "a merged layer")?;
                    for c in &m.upper_children {
                        plain(c, "a merged layer's child")?;
                    }
                    if let Some(b) = &m.lower_backing {
                        plain(b, "a merged layer's backing file")?;
                    }
                }
            }
            Intent::Thaw(t) => {
                snap(&t.snapshot)?;
                plain(&t.socket, "the guest agent socket")?;
            }
            Intent::Claim(c) => {
                if VmName::parse(&c.new).is_none() {
                    return Err(bad(format!(
                        "it names an invalid VM \"{}\"",
                        c.new.escape_debug()
                    )));
                }
            }
            Intent::Start(_) | Intent::Stop(_) => {}
        }
        Ok(())
    }
}

pub(super) fn check_schema(found: u32, path: &Path) -> Result<()> {
    if found == SCHEMA {
        Ok(())
    } else {
        Err(Error::CorruptStore {
            path: path.to_owned(),
            why: format!(
                "schema {found}, this qsnap reads schema {SCHEMA} (a newer qsnap wrote it?)"
            ),
        })
    }
}

/// A manifest read back must be what its place says, and name no path a hand edit could
/// turn against the store: its memory file must be the store's own file for that snapshot.
pub(super) fn check_manifest(m: &Manifest, vm: &VmName, path: &Path) -> Result<()> {
    if m.schema != SCHEMA_NAMED_RAM {
        check_schema(m.schema, path)?;
    }
    let bad = |why: String| Error::CorruptStore {
        path: path.to_owned(),
        why,
    };
    if m.vm != vm.as_str() {
        return Err(bad(format!(
            "it belongs to the VM \"{}\"",
            m.vm.escape_debug()
        )));
    }
    let snap =
        SnapshotName::parse(&m.name).ok_or_else(|| bad("its snapshot name is invalid".into()))?;
    if let Some(mem) = &m.snapshot.memory {
        let dir = path
            .parent()
            .and_then(Path::parent)
            .map(|d| d.join("memory"))
            .unwrap_or_default();
        let (file, ram) = match &mem.lazy {
            None => (format!("{snap}.mem"), None),
            Some(l) => (format!("{snap}.dev"), Some(&l.image)),
        };
        if mem.file != dir.join(file) {
            return Err(bad(format!(
                "its memory file {} is not the store's file for this snapshot",
                mem.file.display()
            )));
        }
        if let Some(ram) = ram {
            if *ram != dir.join(format!("{snap}.ram")) {
                return Err(bad(format!(
                    "its RAM image {} is not the store's file for this snapshot",
                    ram.display()
                )));
            }
        }
        if let Some(l) = &mem.lazy {
            // Each block page-aligned, after the one before, inside the image: a mapping past
            // the file's end would give the guest zeros.
            let mut end = 0u64;
            for b in &l.blocks {
                let fits = b.offset >= end
                    && b.offset % 4096 == 0
                    && b.size > 0
                    && b.offset.checked_add(b.size).is_some_and(|e| e <= l.size);
                if !fits || b.id.is_empty() {
                    return Err(bad(format!(
                        "its RAM image's block {:?} (offset {}, size {}) does not fit the image",
                        b.id, b.offset, b.size
                    )));
                }
                end = b.offset + b.size;
            }
        }
    }
    for d in &m.snapshot.disks {
        if d.image.is_relative() || d.overlay.is_relative() {
            return Err(bad(format!(
                "disk {} names a relative image path (an older qsnap wrote it); `qsnap check {vm} --repair` resolves it",
                d.device
            )));
        }
        if !plain_absolute(&d.image) || !plain_absolute(&d.overlay) {
            return Err(bad(format!(
                "disk {} names an image path with a `.` or `..` part",
                d.device
            )));
        }
    }
    Ok(())
}

/// `path` with its `.` parts dropped and each `..` taken with the part before it, lexically
/// (`/vm/../disk.qcow2` → `/disk.qcow2`; a leading `..` of a relative path stays). Every path
/// a store file names is read through this, and every path qsnap takes from a user or from
/// QEMU is recorded through it: a drive named `../disk.qcow2`, an `--overlay-dir` of `../ovl`
/// or a store an older qsnap wrote never makes a record unreadable, and no prefix check can be
/// fooled by a `..` (what the path really names is checked against the file QEMU has open).
pub fn plain_path(path: &Path) -> PathBuf {
    use std::path::Component;
    let mut out: Vec<Component<'_>> = Vec::new();
    for c in path.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => match out.last() {
                Some(Component::Normal(_)) => {
                    out.pop();
                }
                Some(Component::RootDir | Component::Prefix(_)) => {}
                _ => out.push(c),
            },
            other => out.push(other),
        }
    }
    if out.is_empty() {
        return PathBuf::from(".");
    }
    out.iter().collect()
}

fn plain(p: &mut PathBuf) {
    *p = plain_path(p);
}

pub(super) fn plain_manifest(m: &mut Manifest) {
    for d in &mut m.snapshot.disks {
        plain(&mut d.image);
        plain(&mut d.overlay);
    }
    if let Some(mem) = &mut m.snapshot.memory {
        plain(&mut mem.file);
        if let Some(l) = &mut mem.lazy {
            plain(&mut l.image);
        }
    }
}

pub(super) fn plain_disks(disks: &mut [CurrentDisk]) {
    for d in disks {
        plain(&mut d.image);
        plain(&mut d.launch_image);
    }
}

pub(super) fn plain_record(r: &mut VmRecord) {
    plain_disks(&mut r.disks);
    r.owned_images.iter_mut().for_each(plain);
    if let Some(g) = &mut r.guest_agent {
        plain(g);
    }
    if let Some(c) = &mut r.command {
        plain(&mut c.cwd);
    }
    if let Some(of) = &mut r.clone_of {
        for m in &mut of.moved {
            plain(&mut m.from);
            plain(&mut m.to);
        }
    }
}

pub(super) fn plain_journal(j: &mut Journal) {
    match &mut j.intent {
        Intent::Create(c) => {
            if let Some(m) = &mut c.memory_file {
                plain(m);
            }
            for o in &mut c.overlays {
                plain(&mut o.image);
                plain(&mut o.overlay);
            }
            if let Some(q) = &mut c.quiesce {
                plain(q);
            }
            if let Some(m) = &mut c.committed {
                plain_manifest(m);
            }
        }
        Intent::Revert(r) => {
            r.new_overlays.iter_mut().for_each(plain);
            plain_disks(&mut r.old_disks);
            plain_disks(&mut r.new_disks);
        }
        Intent::Delete(d) => {
            d.manifests.iter_mut().for_each(plain_manifest);
            for m in &mut d.merges {
                plain(&mut m.lower);
                plain(&mut m.upper);
                m.upper_children.iter_mut().for_each(plain);
                if let Some(b) = &mut m.lower_backing {
                    plain(b);
                }
            }
        }
        Intent::Thaw(t) => plain(&mut t.socket),
        Intent::Start(_) | Intent::Stop(_) | Intent::Claim(_) => {}
    }
}

/// A path qsnap may act on (open, rewrite, remove) when a store file names it: absolute, with
/// no `.` or `..` part, so that no hand edit can make it climb out of where it points.
pub(crate) fn plain_absolute(path: &Path) -> bool {
    use std::path::Component;
    path.is_absolute()
        && path
            .components()
            .all(|c| matches!(c, Component::RootDir | Component::Normal(_)))
}
