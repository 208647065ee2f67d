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
//!
//! This file is the entry (the options, the report, the lock and note around it all), the
//! reading of the stream into staging and the seal's check. What the manifest decides before
//! anything is written (refusals, every file's place, the command line) is `import/plan.rs`;
//! what happens once the seal verified every byte (rebase, checks, fsync, renames, overlays,
//! manifest, record) is `import/commit.rs`.

mod commit;
mod plan;

use super::container::{self, Entry};
use super::export::BundleProgressFn;
use super::format::{BundleManifest, Seal, JSON_LIMIT, MANIFEST, SEAL};
use super::sparse::FileDigest;
use super::staging::{self, Note};
use crate::error::{BundleError, Error, Result};
use crate::failpoint;
use crate::name::VmName;
use crate::store::{self, blocking, MovedPath};
use crate::vm::{Engine, Replacement};
use plan::{make_plan, Plan};
use serde::Serialize;
use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::time::Instant;

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
#[derive(Debug, Clone, Serialize, schemars::JsonSchema)]
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
            writer: Some(staging::Writer::this().await),
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
            staging::sweep(&store, name, true).await?;
        }
        let new_vm = !store.has_vm(name).await?;
        first.new_vm = new_vm;
        if let Err(e) = staging::write(&store, &first).await {
            return Err(fail(&store, name, &first, e).await);
        }
        if new_vm {
            if let Some(dir) = store.leftovers(name).await? {
                let taken = Error::VmExists {
                    vm: name.to_string(),
                    leftovers: Some(dir),
                };
                return Err(fail(&store, name, &first, taken).await);
            }
        }
        if !new_vm {
            if let Err(e) = crate::vm::refuse_if_interrupted(&store, name).await {
                return Err(fail(&store, name, &first, e).await);
            }
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
    if let Err(c) = staging::remove(store, vm, note, false, false).await {
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
            let digest = e
                .write_to(&out, base.as_ref(), &mut tell)
                .map_err(|err| staging_full(err, &dest.staged))?;
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

/// A write that failed for want of space (or quota, or file size limit) is the staging
/// file's, said so; any other error may be the bundle's input and stays as it is.
fn staging_full(err: std::io::Error, staged: &std::path::Path) -> Stop {
    use nix::errno::Errno;
    match err.raw_os_error().map(Errno::from_raw) {
        Some(Errno::ENOSPC | Errno::EDQUOT | Errno::EFBIG) => Stop::Engine(Error::Io {
            what: "writing an imported file (free space where it goes, or --disk-dir elsewhere)",
            path: staged.to_owned(),
            source: err,
        }),
        _ => Stop::Io(err),
    }
}
