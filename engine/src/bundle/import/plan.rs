//! What an import decides from the bundle's manifest before it writes anything: the base an
//! incremental bundle stands on (held here, unchanged), this host's QEMU (binary, machine
//! type, memory format), every file's staged and final place, and the new VM's command line
//! (checked by `launch/untrusted.rs` unless trusted, per-VM paths by `launch/clone_argv.rs`).
//!
//! It must never write a file's byte, place anything, or register anything: every refusal
//! comes before any write. It reads only the bundle's manifest (not yet checked against the
//! seal, so trusted for nothing it does not check itself) and the receiving host: the store
//! (names in use, the base's manifests and files) and its QEMU. Its one write, once all is
//! decided, is the note of what the import will make and the empty staging directories.

use super::{corrupt, refused, ImportOptions};
use crate::bundle::format::{safe_file_name, BundleManifest, Role, BUNDLE_TOKEN, VM_TOKEN};
use crate::bundle::staging::{self, Move, Note};
use crate::error::{BundleError, Error, Result};
use crate::image;
use crate::launch::clone_argv::{clone_argv, Purpose};
use crate::launch::{machine, untrusted};
use crate::name::{SnapshotName, VmName};
use crate::store::{self, blocking, Manifest, MovedPath};
use crate::vm::Engine;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use tokio_util::sync::CancellationToken;

/// Where one bundle file goes.
#[derive(Debug, Clone)]
pub(super) struct Dest {
    pub(super) staged: PathBuf,
    pub(super) place: PathBuf,
    /// A delta's base file (held here).
    pub(super) base: Option<PathBuf>,
}

/// What the manifest decided, before any byte of a file is read.
pub(super) struct Plan {
    pub(super) manifest: BundleManifest,
    pub(super) manifest_hash: String,
    /// The files' bytes together (for progress).
    pub(super) total: u64,
    pub(super) snap: SnapshotName,
    pub(super) new_vm: bool,
    pub(super) argv: Vec<String>,
    pub(super) moved: Vec<MovedPath>,
    pub(super) notes: Vec<String>,
    pub(super) dests: BTreeMap<String, Dest>,
    /// Per disk: the file its bottom layer stands on (an incremental bundle).
    pub(super) on_base: Vec<Option<(PathBuf, String)>>,
    pub(super) base: Option<Manifest>,
    pub(super) note: Note,
}

/// Decides everything from the manifest and refuses before anything is written; then writes
/// the note and makes the staging directories.
pub(super) async fn make_plan(
    engine: &Engine,
    name: &VmName,
    new_vm: bool,
    manifest: BundleManifest,
    manifest_hash: String,
    opts: &ImportOptions,
) -> Result<Plan> {
    let store = engine.store().clone();
    let cancel = CancellationToken::new();
    let snap = SnapshotName::parse(&manifest.snapshot.name)
        .ok_or_else(|| corrupt("its snapshot name is invalid"))?;
    let mut notes = Vec::new();

    // The base of an incremental bundle, and the VM to hold it.
    let base = match (&manifest.base, new_vm) {
        (None, false) => {
            return Err(refused(format!(
                "a VM named {name} exists; a full bundle makes a new VM (pick another name), and only an incremental bundle (export --base) adds a snapshot to the VM holding its base"
            )))
        }
        (Some(b), true) => {
            return Err(refused(format!(
                "it is incremental on {}/{}, which must be imported first (into VM {name})",
                manifest.vm, b.snapshot
            )))
        }
        (None, true) => None,
        (Some(b), false) => {
            if store.has_snapshot(name, &snap).await? {
                return Err(Error::SnapshotExists {
                    vm: name.to_string(),
                    snapshot: snap.to_string(),
                });
            }
            let held = store.manifests(name).await?.into_iter().find(|m| {
                m.imported
                    .as_ref()
                    .is_some_and(|i| i.vm == manifest.vm && i.snapshot == b.snapshot)
            });
            let Some(held) = held else {
                return Err(refused(format!(
                    "it is incremental on {}/{}, and VM {name} holds no snapshot imported from it",
                    manifest.vm, b.snapshot
                )));
            };
            if held.created_at != b.created_at
                || held.snapshot.memory.as_ref().and_then(|m| m.checksum.clone())
                    != b.memory_checksum
            {
                return Err(refused(format!(
                    "its base is {}/{} taken at {}, and the snapshot {} imported from there here is another one (taken at {}, or with another memory checksum); import the base again into a new VM",
                    manifest.vm, b.snapshot, b.created_at, held.name, held.created_at
                )));
            }
            let imp = held.imported.as_ref().expect("found by it");
            for h in &b.hashes {
                let Some(f) = imp.files.iter().find(|f| &f.hash == h) else {
                    return Err(refused(format!(
                        "its base {} here does not hold a file it builds on ({h})",
                        held.name
                    )));
                };
                if image::stamp(&f.path).await.ok() != Some(f.stamp) {
                    return Err(refused(format!(
                        "its base {} here changed since it was imported ({} was written)",
                        held.name,
                        f.path.display()
                    )));
                }
            }
            Some(held)
        }
    };
    let by_hash = |h: &str| -> Option<PathBuf> {
        base.as_ref()?
            .imported
            .as_ref()?
            .files
            .iter()
            .find(|f| f.hash == h)
            .map(|f| f.path.clone())
    };

    // This host's QEMU: the machine type and memory format the snapshot needs.
    let binary_name = opts
        .qemu
        .clone()
        .unwrap_or_else(|| manifest.qemu.binary.clone());
    if opts.qemu.is_none()
        && !(binary_name.starts_with("qemu-system-")
            && binary_name[12..]
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_'))
    {
        return Err(corrupt(format!("it names the QEMU binary {binary_name:?}")));
    }
    let binary = crate::cache::resolve_binary(&binary_name)
        .await
        .ok_or_else(|| {
            refused(format!(
                "no QEMU {binary_name} on this host (install it, or name one with --qemu PATH)"
            ))
        })?;
    let bin = binary.display().to_string();
    if let Some(m) = &manifest.qemu.machine {
        machine::check(&bin, m, &cancel).await.map_err(refused)?;
    }
    if let Some(mem) = &manifest.snapshot.snapshot.memory {
        if mem.capabilities.iter().any(|c| c == "mapped-ram") {
            machine::check_version(&bin, (9, 0), "its memory (mapped-ram)", &cancel)
                .await
                .map_err(refused)?;
        }
        if mem.lazy.is_some() {
            machine::check_version(&bin, (8, 2), "its lazy RAM", &cancel)
                .await
                .map_err(refused)?;
        }
    }
    if let Some(cpu) = arg_of(&manifest.command, "-cpu") {
        if cpu.starts_with("host") || cpu.starts_with("max") && cpu.contains("invtsc") {
            notes.push(format!(
                "-cpu {cpu}: the guest's CPU depends on the host CPU; the snapshot loads only where the CPU offers every feature it had ({}); a revert says so if not",
                if cpu.contains("tsc-frequency") {
                    "its TSC frequency is pinned"
                } else {
                    "and the same TSC frequency"
                }
            ));
        }
    }

    // Where everything goes.
    let vm_dir = store.vm_dir(name);
    let disk_dir = opts
        .disk_dir
        .clone()
        .map(|d| store::plain_path(&d))
        .unwrap_or_else(|| vm_dir.join("disks"));
    let sdir = staging::dir(&store, name);
    let disk_stage = disk_dir.join(format!(".qsnap-staging-{name}"));
    let mut dests = BTreeMap::new();
    let mut taken: Vec<PathBuf> = Vec::new();
    for f in &manifest.files {
        let fallback = format!("file{}", dests.len());
        let (place, staged) = match f.role {
            Role::Disk => {
                let base_name = safe_file_name(&f.file_name, &fallback);
                let mut place = disk_dir.join(&base_name);
                let mut k = 2;
                while taken.contains(&place) || exists(&place).await? {
                    place = disk_dir.join(format!("{k}-{base_name}"));
                    k += 1;
                }
                let staged = disk_stage.join(format!("{}-{base_name}", dests.len()));
                (place, staged)
            }
            Role::Memory => {
                let p = match &manifest.snapshot.snapshot.memory {
                    Some(m) if m.lazy.is_some() => store.lazy_paths(name, &snap).0,
                    _ => store.memory_path(name, &snap),
                };
                (p, sdir.join(format!("{}-memory", dests.len())))
            }
            Role::Ram => (
                store.lazy_paths(name, &snap).1,
                sdir.join(format!("{}-ram", dests.len())),
            ),
            Role::Boot => {
                if !new_vm {
                    continue;
                }
                (
                    vm_dir
                        .join("boot")
                        .join(safe_file_name(&f.file_name, &fallback)),
                    sdir.join(format!("{}-boot", dests.len())),
                )
            }
        };
        if exists(&place).await? {
            return Err(Error::TargetExists { path: place });
        }
        let base = match &f.delta_of {
            Some(h) => Some(by_hash(h).ok_or_else(|| {
                refused(format!(
                    "its delta {} builds on a file the base does not hold",
                    f.name
                ))
            })?),
            None => None,
        };
        taken.push(place.clone());
        dests.insert(
            f.name.clone(),
            Dest {
                staged,
                place,
                base,
            },
        );
    }
    // The overlays a new VM will write to, beside its frozen images: never over a file.
    if new_vm {
        for d in &manifest.disks {
            if let Some(top) = d.layers.last() {
                let frozen = &dests[&top.name].place;
                let stem = frozen
                    .file_stem()
                    .map(|s| s.to_string_lossy().into_owned())
                    .unwrap_or_else(|| "disk".into());
                let overlay = frozen.with_file_name(format!("{stem}.{snap}.qcow2"));
                if taken.contains(&overlay) || exists(&overlay).await? {
                    return Err(Error::TargetExists { path: overlay });
                }
                taken.push(overlay);
            }
        }
    }
    let mut on_base = Vec::new();
    for d in &manifest.disks {
        on_base.push(match (&base, d.on_base) {
            (Some(held), true) => {
                let Some(hd) = held.snapshot.disks.iter().find(|x| x.device == d.device) else {
                    return Err(refused(format!(
                        "its disk {} builds on the base's image of it, and {} here has none",
                        d.device, held.name
                    )));
                };
                if hd.frozen.is_some() && image::stamp(&hd.image).await.ok() != hd.frozen {
                    return Err(refused(format!(
                        "its base {}'s image of disk {} ({}) changed since the snapshot",
                        held.name,
                        d.device,
                        hd.image.display()
                    )));
                }
                Some((hd.image.clone(), hd.format.clone()))
            }
            (None, true) => return Err(corrupt("a disk builds on a base it does not name")),
            (_, false) => None,
        });
    }

    // The command line (a new VM's): untrusted until proven otherwise.
    let (argv, moved) = if new_vm {
        command_line(&manifest, &dests, &vm_dir, &binary, opts, &mut notes)?
    } else {
        (Vec::new(), Vec::new())
    };

    let mut dirs = vec![sdir.clone()];
    if dests.values().any(|d| d.staged.starts_with(&disk_stage)) {
        dirs.push(disk_stage.clone());
    }
    let note = Note {
        vm: name.to_string(),
        snapshot: snap.to_string(),
        new_vm,
        dirs: dirs.clone(),
        moves: dests
            .values()
            .map(|d| Move {
                staged: d.staged.clone(),
                place: d.place.clone(),
                id: None,
            })
            .collect(),
        writer: Some(staging::Writer::this().await),
    };
    staging::write(&store, &note).await?;
    blocking(move || {
        for d in &dirs {
            store::create_dir_durably(d, 0o700)?;
        }
        Ok(())
    })
    .await?;
    Ok(Plan {
        total: manifest.files.iter().map(|f| f.size).sum(),
        manifest,
        manifest_hash,
        snap,
        new_vm,

        argv,
        moved,
        notes,
        dests,
        on_base,
        base,
        note,
    })
}

/// The new VM's command line: the bundle's, checked (`untrusted.rs`) unless trusted, its
/// bundle files at their places, its per-VM paths in the VM's directory (`clone_argv.rs`,
/// which refuses what must differ between hosts unless replaced).
fn command_line(
    manifest: &BundleManifest,
    dests: &BTreeMap<String, Dest>,
    vm_dir: &Path,
    binary: &Path,
    opts: &ImportOptions,
    notes: &mut Vec<String>,
) -> Result<(Vec<String>, Vec<MovedPath>)> {
    let argv = &manifest.command;
    let replace = opts
        .replace
        .iter()
        .map(|r| r.split(argv))
        .collect::<std::result::Result<Vec<_>, String>>()
        .map_err(refused)?;
    let mut replaced = argv.clone();
    for (old, new) in &replace {
        for a in &mut replaced {
            *a = a.replace(old.as_str(), new);
        }
    }
    let refusals = untrusted::host_reaching(&replaced);
    if !refusals.is_empty() {
        if opts.trust_command_line {
            notes.push(format!(
                "trusted the bundle's command line (--trust-command-line), which reaches the host: {}",
                refusals.join("; ")
            ));
        } else if !opts.trust.is_empty() {
            // Nothing is registered unless the signature checks out (commit).
            notes.push(format!(
                "trusted the bundle's command line as signed by a key you trust, and it reaches the host: {}",
                refusals.join("; ")
            ));
        } else {
            return Err(BundleError::Untrusted { refusals }.into());
        }
    }
    // A bundle file the command line names is a disk's bottom image (the overlays a launch
    // puts in its place stand on the checked chain) or a boot file, nothing else: a memory
    // file or an upper layer opened as a disk would be read unchecked.
    let named: Vec<&str> = manifest
        .disks
        .iter()
        .filter_map(|d| d.layers.first().map(|l| l.name.as_str()))
        .chain(
            manifest
                .files
                .iter()
                .filter(|f| f.role == Role::Boot)
                .map(|f| f.name.as_str()),
        )
        .collect();
    for a in argv {
        for (i, _) in a.match_indices(&format!("{BUNDLE_TOKEN}/")) {
            let rest = &a[i + BUNDLE_TOKEN.len() + 1..];
            let end = rest.find([',', '"']).unwrap_or(rest.len());
            if !named.contains(&&rest[..end]) {
                return Err(corrupt(format!(
                    "its command line opens {}, which is not a disk's bottom image or a boot file",
                    &rest[..end]
                )));
            }
        }
    }
    // The bundle's files at their places, longest name first (no name is cut short by
    // another that starts it).
    let mut names: Vec<(&String, &Dest)> = dests.iter().collect();
    names.sort_by_key(|(n, _)| std::cmp::Reverse(n.len()));
    let mut placed: Vec<String> = argv.clone();
    for a in &mut placed {
        for (n, d) in &names {
            let token = format!("{BUNDLE_TOKEN}/{n}");
            if a.contains(&token) {
                *a = a.replace(&token, &d.place.display().to_string());
            }
        }
    }
    let rewritten = clone_argv(
        &placed,
        vm_dir,
        &vm_dir.join("files"),
        Some(&Path::new(VM_TOKEN).join("qmp.sock")),
        &vm_dir.join("qmp.sock"),
        &replace,
        Purpose::Import,
    )
    .map_err(refused)?;
    let mut out = rewritten.argv;
    out[0] = binary.display().to_string();
    if let Some(a) = out
        .iter()
        .find(|a| a.contains(BUNDLE_TOKEN) || a.contains(VM_TOKEN))
    {
        return Err(corrupt(format!(
            "its command line names a file it does not carry: {a}"
        )));
    }
    notes.extend(rewritten.notes);
    Ok((out, rewritten.moved))
}

fn arg_of<'a>(argv: &'a [String], flag: &str) -> Option<&'a str> {
    let i = argv.iter().position(|a| a == flag)?;
    argv.get(i + 1).map(String::as_str)
}

async fn exists(p: &Path) -> Result<bool> {
    let p = p.to_owned();
    blocking(move || store::exists(&p)).await
}
