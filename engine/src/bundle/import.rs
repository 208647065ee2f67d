//! `qsnap import`: a bundle → a new VM, stopped, holding the snapshot (or, for an incremental
//! bundle, the snapshot added to the VM that holds its base).
//!
//! ```text
//! lock NAME → sweep what an interrupted import left (staging.rs)
//! → read the manifest entry → refuse, having written nothing: not a bundle, a name in use,
//!   a QEMU here that lacks the machine type or memory format, a command line that reaches
//!   the host (launch/untrusted.rs) unless trusted, what must differ between hosts
//!   (launch/clone_argv.rs) unless replaced, a base snapshot missing or changed
//! → note (staged → final paths) → every file into staging, hashed as it is written
//! → the seal: the manifest's hash, every file's hash and size  ── any mismatch, a bundle
//!   cut short, any error: staging and note removed, nothing registered
//! → disk headers pointed at their new places (qemu-img rebase -u), checked (no data file,
//!   the declared format) → fsync → rename into place (never over a file)
//! → [new VM: overlays the VM will write to] → manifest → record (the commit) → note removed
//! ```
//! A kill at any moment leaves a note whose lock is free: the next import, or `check
//! --repair`, removes everything it names unless the commit happened.

use super::container::{self, Entry};
use super::export::BundleProgressFn;
use super::format::{
    safe_file_name, BundleManifest, Role, Seal, BUNDLE_TOKEN, JSON_LIMIT, MANIFEST, SEAL, VM_TOKEN,
};
use super::sparse::FileDigest;
use super::staging::{self, FileId, Move, Note};
use crate::error::{BundleError, Error, Result};
use crate::failpoint;
use crate::image;
use crate::launch::argv::guest_agent_socket;
use crate::launch::clone_argv::{clone_argv, Purpose};
use crate::launch::{machine, untrusted};
use crate::name::{SnapshotName, VmName};
use crate::store::{
    self, blocking, CurrentDisk, Imported, ImportedFile, LaunchCommand, Manifest, MovedPath,
    Origin, VmRecord,
};
use crate::vm::{Engine, Replacement};
use serde::Serialize;
use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::Instant;
use tokio_util::sync::CancellationToken;

/// How to import.
#[derive(Clone, Default)]
pub struct ImportOptions {
    /// Where the disk layers go (default: `<store>/vms/<name>/disks`).
    pub disk_dir: Option<PathBuf>,
    /// Text replacements on the bundle's command line (`--replace OLD=NEW`), applied first:
    /// how the user gives the VM what must differ between hosts.
    pub replace: Vec<Replacement>,
    /// Run the bundle's command line even where it reaches the host (its author is trusted).
    pub trust_command_line: bool,
    /// Public keys (`qsnap keygen`'s `.pub`, or minisign's): the bundle must be signed by one
    /// of them, and its command line is then trusted.
    pub trust: Vec<PathBuf>,
    /// The QEMU binary to run the VM with (default: the bundle's binary name, found in PATH).
    pub qemu: Option<String>,
    /// Progress over the files' bytes.
    pub progress: Option<BundleProgressFn>,
}

impl std::fmt::Debug for ImportOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ImportOptions")
            .field("disk_dir", &self.disk_dir)
            .field("replace", &self.replace)
            .field("trust_command_line", &self.trust_command_line)
            .field("trust", &self.trust)
            .field("qemu", &self.qemu)
            .finish_non_exhaustive()
    }
}

/// What an import did.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct ImportReport {
    /// The VM.
    pub vm: String,
    /// The snapshot it now holds.
    pub snapshot: String,
    /// True when the import made the VM; false when it added the snapshot to it.
    pub new_vm: bool,
    /// The VM and snapshot the bundle was exported from.
    pub source: String,
    /// The base snapshot (here) of an incremental bundle.
    pub base: Option<String>,
    /// Every file written, and where.
    pub files: Vec<PathBuf>,
    /// Where each per-VM path of the command line went.
    pub moved: Vec<MovedPath>,
    /// What the user should know (a host-dependent CPU model, a MAC address kept, …).
    pub notes: Vec<String>,
    /// The bundle's seal hash.
    pub seal: String,
    /// Bytes of the files (uncompressed).
    pub bytes: u64,
    /// Wall time.
    pub total_ms: f64,
}

/// Where one bundle file goes.
#[derive(Debug, Clone)]
struct Dest {
    staged: PathBuf,
    place: PathBuf,
    /// A delta's base file (held here).
    base: Option<PathBuf>,
}

/// What the manifest decided, before any byte of a file is read.
struct Plan {
    manifest: BundleManifest,
    manifest_hash: String,
    /// The files' bytes together (for progress).
    total: u64,
    snap: SnapshotName,
    new_vm: bool,
    argv: Vec<String>,
    moved: Vec<MovedPath>,
    notes: Vec<String>,
    dests: BTreeMap<String, Dest>,
    /// Per disk: the file its bottom layer stands on (an incremental bundle).
    on_base: Vec<Option<(PathBuf, String)>>,
    base: Option<Manifest>,
    note: Note,
}

/// Why the reading stopped.
enum Stop {
    Io(std::io::Error),
    Engine(Error),
}

impl From<std::io::Error> for Stop {
    fn from(e: std::io::Error) -> Stop {
        Stop::Io(e)
    }
}

impl From<Error> for Stop {
    fn from(e: Error) -> Stop {
        Stop::Engine(e)
    }
}

fn corrupt(why: impl Into<String>) -> Error {
    BundleError::Corrupt { why: why.into() }.into()
}

fn refused(why: impl Into<String>) -> Error {
    BundleError::ImportRefused { why: why.into() }.into()
}

impl Engine {
    /// Imports the bundle read from `input` (a file, a pipe, stdin) as VM `name`.
    pub async fn import(
        &self,
        input: Box<dyn Read + Send>,
        name: &VmName,
        opts: &ImportOptions,
    ) -> Result<ImportReport> {
        let started = Instant::now();
        let store = self.store().clone();
        let keys = {
            let paths = opts.trust.clone();
            blocking(move || {
                paths
                    .iter()
                    .map(|p| super::sign::read_public(p))
                    .collect::<Result<Vec<_>>>()
            })
            .await?
        };
        // Leftovers of imports that died (their VM's lock is free).
        staging::sweep_all(&store).await?;
        // Noted before anything is made, the VM's lock and directory included: a kill from
        // here on leaves a note that the next import, or `check --repair`, sweeps. A note
        // already there is another import's (live: the lock says so; or dead: swept below).
        let mut first = Note {
            vm: name.to_string(),
            snapshot: String::new(),
            new_vm: !store.has_vm(name).await?,
            dirs: vec![staging::dir(&store, name)],
            moves: Vec::new(),
        };
        let ours = staging::write_new(&store, &first).await?;
        let lock = match store.lock(name, "import").await {
            Ok(l) => l,
            Err(e) => {
                if ours {
                    staging::forget(&store, name).await;
                }
                return Err(e);
            }
        };
        if !ours {
            staging::sweep(&store, name).await?;
        }
        let new_vm = !store.has_vm(name).await?;
        first.new_vm = new_vm;
        if let Err(e) = staging::write(&store, &first).await {
            return Err(fail(&store, name, &first, e).await);
        }
        if !new_vm && store.journal(name).await?.is_some() {
            let e = Error::Busy {
                what: format!(
                    "an interrupted operation on {name} must be finished first (`qsnap check {name} --repair`)"
                ),
            };
            return Err(fail(&store, name, &first, e).await);
        }
        let handle = tokio::runtime::Handle::current();
        let (engine, name2, opts2) = (self.clone(), name.clone(), opts.clone());
        let read = tokio::task::spawn_blocking(move || {
            read_bundle(input, &handle, &engine, &name2, new_vm, &opts2)
        })
        .await
        .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()));
        let outcome = match read {
            Ok(r) => self.commit(r, name, &keys).await,
            Err(b) => match *b {
                (e, None) => Err(fail(&store, name, &first, e).await),
                (e, Some(note)) => Err(fail(&store, name, &note, e).await),
            },
        };
        drop(lock);
        let mut report = outcome?;
        report.total_ms = started.elapsed().as_secs_f64() * 1e3;
        Ok(report)
    }

    /// Checks the seal, puts every file in place and commits.
    async fn commit(
        &self,
        read: Read_,
        name: &VmName,
        keys: &[minisign::PublicKey],
    ) -> Result<ImportReport> {
        let store = self.store().clone();
        let note = read.plan.note.clone();
        match self.commit_inner(read, name, keys).await {
            Ok(r) => Ok(r),
            Err(e) => Err(fail(&store, name, &note, e).await),
        }
    }

    async fn commit_inner(
        &self,
        read: Read_,
        name: &VmName,
        keys: &[minisign::PublicKey],
    ) -> Result<ImportReport> {
        let Read_ {
            mut plan,
            digests,
            seal,
            signature,
        } = read;
        let store = self.store().clone();
        let cancel = CancellationToken::new();
        check_seal(&plan, &digests, &seal.0)?;
        if !keys.is_empty() {
            super::sign::verify(keys, &seal.1, signature.as_deref())?;
        }
        let (seal, seal_bytes) = seal;
        let seal_hash = super::hash_bytes(&seal_bytes);

        // Disk headers: each layer onto the one below it, at its final place.
        let m = plan.manifest.clone();
        let mut sizes: BTreeMap<String, u64> = BTreeMap::new();
        for (i, d) in m.disks.iter().enumerate() {
            for (k, l) in d.layers.iter().enumerate() {
                let dest = &plan.dests[&l.name];
                if l.format == "qcow2" {
                    // Read here before any tool opens it: an external data file is a second
                    // host file the image would reach.
                    let p = dest.staged.clone();
                    let data_file = blocking(move || {
                        image::qcow2_has_data_file(&p)
                            .map_err(store::io("reading an imported image", &p))
                    })
                    .await?;
                    if data_file {
                        return Err(corrupt(format!(
                            "{} asks for an external data file (a host file qsnap would have to trust)",
                            l.name
                        )));
                    }
                }
                // Read as what it is declared to be, never probed.
                let info = image::info_as(&dest.staged, &l.format, &cancel)
                    .await
                    .map_err(|e| {
                        corrupt(format!("{} is not a {} image ({e})", l.name, l.format))
                    })?;
                sizes.insert(l.name.clone(), info.virtual_size);
                if l.format != "qcow2" {
                    continue;
                }
                if info
                    .format_specific
                    .as_ref()
                    .and_then(|f| f.get("data"))
                    .and_then(|d| d.get("data-file"))
                    .is_some()
                {
                    return Err(corrupt(format!(
                        "{} names an external data file (a host file qsnap would have to trust)",
                        l.name
                    )));
                }
                let below = if k > 0 {
                    let b = &d.layers[k - 1];
                    Some((plan.dests[&b.name].place.clone(), b.format.clone()))
                } else {
                    plan.on_base[i].clone()
                };
                match below {
                    Some((path, fmt)) => {
                        image::set_backing(&dest.staged, &path, &fmt, &cancel).await?
                    }
                    None => image::drop_backing(&dest.staged, &cancel).await?,
                }
            }
        }

        // Durable, noted by identity (only these very files are ever removed again), then
        // into place: never over an existing file.
        for dest in plan.dests.values() {
            image::sync(&dest.staged).await?;
        }
        for m in &mut plan.note.moves {
            let staged = m.staged.clone();
            m.id = blocking(move || Ok(FileId::of(&staged))).await?;
        }
        staging::write(&store, &plan.note).await?;
        failpoint::hit("import.staged", None).await?;
        for dest in plan.dests.values() {
            let (from, to) = (dest.staged.clone(), dest.place.clone());
            blocking(move || {
                if let Some(dir) = to.parent() {
                    store::create_dir_durably(dir, 0o700)?;
                }
                rename_noreplace(&from, &to)?;
                store::sync_dir(to.parent().unwrap_or(Path::new("/")))
            })
            .await?;
        }

        failpoint::hit("import.placed", None).await?;
        let vm_dir = store.vm_dir(name);
        let snap = plan.snap.clone();
        let place = |bundle_name: &Path| -> PathBuf {
            plan.dests[&bundle_name.to_string_lossy().into_owned()]
                .place
                .clone()
        };
        let mut manifest = m.snapshot.clone();
        manifest.vm = name.to_string();
        manifest.name = snap.to_string();
        manifest.parent = plan.base.as_ref().map(|b| b.name.clone());
        let mut overlays = Vec::new();
        for (i, d) in manifest.snapshot.disks.iter_mut().enumerate() {
            let frozen = match m.disks[i].layers.last() {
                Some(l) => plan.dests[&l.name].place.clone(),
                None => plan.on_base[i].clone().map(|(p, _)| p).unwrap_or_default(),
            };
            let stem = frozen
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_else(|| "disk".into());
            d.image = frozen.clone();
            d.overlay = frozen.with_file_name(format!("{stem}.{snap}.qcow2"));
            d.frozen = Some(image::stamp(&frozen).await?);
            // What the frozen image is, as checked (never what the manifest claims).
            if let Some(top) = m.disks[i].layers.last() {
                d.format.clone_from(&top.format);
                d.size = sizes.get(&top.name).copied().unwrap_or(d.size);
            }
            overlays.push((
                d.device.clone(),
                d.overlay.clone(),
                frozen,
                d.format.clone(),
                d.size,
            ));
        }
        if let Some(mem) = manifest.snapshot.memory.as_mut() {
            mem.file = place(&mem.file);
            if let Some(l) = mem.lazy.as_mut() {
                l.image = place(&l.image);
                l.stamp = image::stamp(&l.image).await?;
            }
        }
        let mut files = Vec::new();
        for (bname, dest) in &plan.dests {
            files.push(ImportedFile {
                path: dest.place.clone(),
                hash: seal.files[bname].hash.clone(),
                stamp: image::stamp(&dest.place).await?,
            });
        }
        manifest.imported = Some(Imported {
            vm: m.vm.clone(),
            snapshot: m.snapshot.name.clone(),
            at: store::now_rfc3339(),
            bundle: seal_hash.clone(),
            files,
        });

        // A new VM writes to overlays of its own over the snapshot's frozen images (a cold
        // start must never write into them).
        let mut current = Vec::new();
        if plan.new_vm {
            blocking({
                let d = vm_dir.join("files");
                move || store::create_dir_durably(&d, 0o700)
            })
            .await?;
            for (k, (device, overlay, frozen, format, size)) in overlays.iter().enumerate() {
                // Made in the disks' staging directory, noted, then moved into place like
                // every other file: a kill at any moment leaves nothing a sweep cannot tell
                // for the import's own.
                let stage = plan
                    .note
                    .dirs
                    .iter()
                    .find(|d| overlay.parent().is_some_and(|p| d.parent() == Some(p)))
                    .cloned()
                    .unwrap_or_else(|| staging::dir(&store, name));
                let staged = stage.join(format!("overlay-{k}.qcow2"));
                image::create_overlay(&staged, frozen, format, *size, &cancel).await?;
                let s2 = staged.clone();
                let id = blocking(move || Ok(FileId::of(&s2))).await?;
                plan.note.moves.push(Move {
                    staged: staged.clone(),
                    place: overlay.clone(),
                    id,
                });
                staging::write(&store, &plan.note).await?;
                let to = overlay.clone();
                blocking(move || {
                    rename_noreplace(&staged, &to)?;
                    store::sync_dir(to.parent().unwrap_or(Path::new("/")))
                })
                .await?;
                let bottom = m
                    .disks
                    .iter()
                    .find(|x| x.device == *device)
                    .and_then(|x| x.layers.first())
                    .map(|l| plan.dests[&l.name].place.clone())
                    .unwrap_or_default();
                current.push(CurrentDisk {
                    device: device.clone(),
                    image: overlay.clone(),
                    launch_image: bottom,
                    owned: true,
                });
            }
        }
        let mut owned: Vec<PathBuf> = Vec::new();
        for d in &m.disks {
            for (k, l) in d.layers.iter().enumerate() {
                // A new VM's bottom layers are its command line's images, like a `run` VM's
                // own: never merged away. Everything above is qsnap's.
                if k > 0 || !plan.new_vm {
                    owned.push(plan.dests[&l.name].place.clone());
                }
            }
        }
        if plan.new_vm {
            // The manifest, then the record: the commit (a manifest without its record is
            // this import's, and a sweep removes it).
            failpoint::hit("import.overlays-made", None).await?;
            store.write_manifest(&manifest).await?;
            failpoint::hit("import.manifest-written", None).await?;
            owned.extend(current.iter().map(|c| c.image.clone()));
            let qmp = vm_dir.join("qmp.sock");
            let command = LaunchCommand {
                argv: plan.argv.clone(),
                cwd: vm_dir.clone(),
            };
            let record = VmRecord {
                schema: store::SCHEMA,
                name: name.to_string(),
                qmp: qmp.display().to_string(),
                origin: Origin::Run,
                pid: None,
                pid_start: None,
                guest_agent: guest_agent_socket(&command.argv, &command.cwd),
                command: Some(command),
                current: Some(snap.to_string()),
                disks: current,
                owned_images: owned,
                registered_at: store::now_rfc3339(),
                clone_of: None,
            };
            store.write_record(&record).await?; // the commit
        } else {
            // The record owns the new layers first, then the manifest commits (a sweep takes
            // them out of the record again when it did not).
            let mut record = store.record(name).await?;
            record.owned_images.extend(owned);
            store.write_record(&record).await?;
            store.write_manifest(&manifest).await?; // the commit
        }
        failpoint::hit("import.committed", None).await?;
        staging::remove(&store, name, &plan.note, true).await?;
        Ok(ImportReport {
            vm: name.to_string(),
            snapshot: snap.to_string(),
            new_vm: plan.new_vm,
            source: format!("{}/{}", m.vm, m.snapshot.name),
            base: plan.base.as_ref().map(|b| b.name.clone()),
            files: plan.dests.values().map(|d| d.place.clone()).collect(),
            moved: plan.moved.clone(),
            notes: plan.notes.clone(),
            seal: seal_hash,
            bytes: digests.values().map(|d| d.size).sum(),
            total_ms: 0.0,
        })
    }
}

impl Engine {
    /// Removes what interrupted imports left (their staging, and — unless they committed —
    /// every file they placed), for every VM no operation holds. `qsnap check --repair`.
    pub async fn sweep_imports(&self) -> Result<Vec<PathBuf>> {
        staging::sweep_all(self.store()).await
    }
}

/// Removes what a failed import made and returns its error.
async fn fail(store: &store::Store, vm: &VmName, note: &Note, e: Error) -> Error {
    if let Err(c) = staging::remove(store, vm, note, false).await {
        tracing::warn!(error = %c, "an import's staging could not be removed; the next import or `qsnap check --repair` removes it");
    }
    e
}

/// What reading the stream produced.
struct Read_ {
    plan: Plan,
    digests: BTreeMap<String, FileDigest>,
    /// The seal, and its bytes as read.
    seal: (Seal, Vec<u8>),
    /// The seal's signature, if the bundle carries one.
    signature: Option<Vec<u8>>,
}

/// Reads the whole bundle on this (blocking) thread: the manifest, the plan (on the runtime,
/// through `rt`), every file into staging, the seal.
fn read_bundle(
    input: Box<dyn Read + Send>,
    rt: &tokio::runtime::Handle,
    engine: &Engine,
    name: &VmName,
    new_vm: bool,
    opts: &ImportOptions,
) -> std::result::Result<Read_, Box<(Error, Option<Note>)>> {
    let mut plan: Option<Plan> = None;
    let mut digests = BTreeMap::new();
    let mut seal: Option<(Seal, Vec<u8>)> = None;
    let mut signature: Option<Vec<u8>> = None;
    let mut next = 0usize;
    let mut done = 0u64;
    let result = container::read(
        input,
        |e: &mut Entry<'_>| -> std::result::Result<(), Stop> {
            if seal.is_some() {
                if e.name() == super::sign::SIGNATURE && signature.is_none() {
                    signature = Some(e.bytes(64 << 10)?);
                    return Ok(());
                }
                return Err(corrupt(format!("an entry {} follows the seal", e.name())).into());
            }
            let Some(p) = plan.as_mut() else {
                if e.name() != MANIFEST {
                    return Err(corrupt(format!(
                        "it starts with {} instead of {MANIFEST} (is it a qsnap bundle?)",
                        e.name()
                    ))
                    .into());
                }
                let bytes = e.bytes(JSON_LIMIT)?;
                let manifest: BundleManifest = serde_json::from_slice(&bytes)
                    .map_err(|err| corrupt(format!("its manifest is unreadable: {err}")))?;
                manifest.check().map_err(corrupt)?;
                let hash = super::hash_bytes(&bytes);
                plan = Some(rt.block_on(make_plan(engine, name, new_vm, manifest, hash, opts))?);
                rt.block_on(failpoint::hit("import.planned", None))?;
                return Ok(());
            };
            if e.name() == SEAL {
                let bytes = e.bytes(JSON_LIMIT)?;
                let parsed: Seal = serde_json::from_slice(&bytes)
                    .map_err(|err| corrupt(format!("its seal is unreadable: {err}")))?;
                seal = Some((parsed, bytes));
                return Ok(());
            }
            let Some(f) = p.manifest.files.get(next) else {
                return Err(corrupt(format!(
                    "it carries {}, which its manifest does not list",
                    e.name()
                ))
                .into());
            };
            if f.name != e.name() || f.size != e.size() {
                return Err(corrupt(format!(
                    "entry {} ({} bytes) where the manifest lists {} ({} bytes)",
                    e.name(),
                    e.size(),
                    f.name,
                    f.size
                ))
                .into());
            }
            next += 1;
            let Some(dest) = p.dests.get(&f.name).cloned() else {
                return Err(corrupt(format!(
                    "it carries {}, which has no place in VM {name}",
                    f.name
                ))
                .into());
            };
            let out = OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&dest.staged)
                .map_err(store::io("staging an imported file", &dest.staged))?;
            let base = match &dest.base {
                Some(b) => Some(File::open(b).map_err(store::io("opening a delta's base", b))?),
                None => None,
            };
            let progress = opts.progress.clone();
            let size_all = p.total;
            let mut tell = |n: u64| {
                if let Some(f) = &progress {
                    f(done + n, size_all);
                }
            };
            let digest = e.write_to(&out, base.as_ref(), &mut tell)?;
            done += f.size;
            digests.insert(f.name.clone(), digest);
            Ok(())
        },
    );
    let fail = |e: Error, plan: Option<Plan>| Err(Box::new((e, plan.map(|p| p.note))));
    match result {
        Ok(()) => {}
        Err(Stop::Engine(e)) => return fail(e, plan),
        Err(Stop::Io(e)) => {
            let e = match e.kind() {
                std::io::ErrorKind::InvalidData | std::io::ErrorKind::UnexpectedEof => {
                    corrupt(e.to_string())
                }
                _ => Error::Io {
                    what: "importing",
                    path: PathBuf::from("(the bundle)"),
                    source: e,
                },
            };
            return fail(e, plan);
        }
    }
    let Some(plan) = plan else {
        return fail(corrupt("it is empty"), None);
    };
    let Some(seal) = seal else {
        return fail(
            corrupt("it ends before its seal (cut short, or the exporter failed)"),
            Some(plan),
        );
    };
    if next != plan.manifest.files.len() {
        return fail(
            corrupt(format!(
                "it carries {next} of the {} files its manifest lists",
                plan.manifest.files.len()
            )),
            Some(plan),
        );
    }
    Ok(Read_ {
        plan,
        digests,
        seal,
        signature,
    })
}

/// Every file's hash and size against the seal, and the manifest's.
fn check_seal(plan: &Plan, digests: &BTreeMap<String, FileDigest>, seal: &Seal) -> Result<()> {
    if seal.format != super::format::FORMAT {
        return Err(corrupt("its seal is not a qsnap seal"));
    }
    if seal.manifest != plan.manifest_hash {
        return Err(corrupt(
            "its manifest does not match the hash its seal gives (changed after export)",
        ));
    }
    if seal.files.len() != plan.manifest.files.len() {
        return Err(corrupt("its seal and its manifest list different files"));
    }
    for f in &plan.manifest.files {
        let (Some(s), Some(d)) = (seal.files.get(&f.name), digests.get(&f.name)) else {
            return Err(corrupt(format!("its seal gives no hash of {}", f.name)));
        };
        if s.hash != d.hash || s.size != d.size {
            return Err(corrupt(format!(
                "{} does not match its hash (damaged or changed after export)",
                f.name
            )));
        }
    }
    Ok(())
}

/// Decides everything from the manifest and refuses before anything is written; then writes
/// the note and makes the staging directories.
async fn make_plan(
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

/// `rename(2)` that fails rather than replace a file (`RENAME_NOREPLACE`).
fn rename_noreplace(from: &Path, to: &Path) -> Result<()> {
    nix::fcntl::renameat2(
        None,
        from,
        None,
        to,
        nix::fcntl::RenameFlags::RENAME_NOREPLACE,
    )
    .map_err(|errno| {
        if errno == nix::errno::Errno::EEXIST {
            Error::TargetExists {
                path: to.to_owned(),
            }
        } else {
            Error::Io {
                what: "moving an imported file into place",
                path: to.to_owned(),
                source: std::io::Error::from(errno),
            }
        }
    })
}
