//! `qsnap export`: one snapshot (its disk chains down to the base images, its memory, the
//! files its command line boots from, and a portable command line) as one bundle stream.
//!
//! ```text
//! source lock (shared: the VM may run, clone and export side by side; delete/revert wait)
//! → refuse: an interrupted operation, a damaged snapshot (memory checksum, frozen images
//!   changed), a read-only disk, a command line qsnap cannot make portable
//!   (launch/clone_argv.rs)                                             ── nothing written
//! → manifest entry → every file (holes and zero blocks skipped, compressed) → seal entry
//! ```
//! Reads only: the snapshot's frozen images are never written while it exists, its memory
//! files never. A failed export leaves a partial stream, which an import refuses (no seal).

use super::container;
use super::format::{
    BaseRef, BundleDisk, BundleFile, BundleManifest, Layer, QemuInfo, Role, Seal, Sealed,
    BUNDLE_TOKEN, FORMAT, SEAL, VERSION, VM_TOKEN,
};
use super::sparse::FileDigest;
use crate::error::{BundleError, Error, Result};
use crate::image;
use crate::launch::argv::rename_files;
use crate::launch::clone_argv::{clone_argv, Purpose};
use crate::name::SnapshotName;
use crate::snapshot::revert;
use crate::store::VmLock;
use crate::store::{self, blocking, Manifest};
use crate::vm::Vm;
use serde::Serialize;

mod parts;
pub use parts::{ExportPart, ExportParts, SealedParts};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

/// Told the bytes covered so far and the total, as an export or import goes.
pub type BundleProgressFn = Arc<dyn Fn(u64, u64) + Send + Sync>;

/// How to export.
#[derive(Clone, Default)]
pub struct ExportOptions {
    /// An incremental bundle, for a receiver that holds this snapshot already (imported
    /// from an earlier bundle): only the disk layers above it, the memory as a delta where
    /// both memories have pages at fixed offsets.
    pub base: Option<SnapshotName>,
    /// zstd compression level (0 = zstd's default, 3).
    pub level: i32,
    /// Compression threads (0 = one per CPU).
    pub threads: u32,
    /// Sign the bundle with this secret key (`qsnap keygen`).
    pub sign: Option<PathBuf>,
    /// Progress over the files' bytes.
    pub progress: Option<BundleProgressFn>,
}

impl std::fmt::Debug for ExportOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExportOptions")
            .field("base", &self.base)
            .field("level", &self.level)
            .field("threads", &self.threads)
            .field("sign", &self.sign)
            .finish_non_exhaustive()
    }
}

/// One file an export wrote.
#[derive(Debug, Clone, Serialize, schemars::JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub struct ExportedFile {
    /// Its name in the bundle.
    pub name: String,
    /// Its size.
    pub size: u64,
    /// The bytes of it read and shipped (holes and zero blocks are not; a delta ships only
    /// what differs from its base).
    pub shipped: u64,
    /// True for a delta against the base snapshot's file.
    pub delta: bool,
}

/// What an export did.
#[derive(Debug, Clone, Serialize, schemars::JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub struct ExportReport {
    /// The VM.
    pub vm: String,
    /// The snapshot.
    pub snapshot: String,
    /// The base snapshot of an incremental bundle.
    pub base: Option<String>,
    /// Every file, in bundle order.
    pub files: Vec<ExportedFile>,
    /// Bytes of the bundle written (compressed).
    pub bundle_bytes: u64,
    /// What the user should know (memory shipped whole in an incremental bundle, and why).
    pub notes: Vec<String>,
    /// The seal's hash: what an import records as the bundle it came from.
    pub seal: String,
    /// Whether the bundle carries a signature of its seal.
    pub signed: bool,
    /// Wall time.
    pub total_ms: f64,
}

/// A file to ship, and how.
struct Planned {
    file: BundleFile,
    path: PathBuf,
    /// A delta against this file of the base snapshot.
    base: Option<PathBuf>,
}

/// Everything an export reads, decided and checked, under the snapshot's shared lock:
/// what [`Vm::export`] writes as a bundle, and what `push` cuts into chunks.
struct Prepared {
    lock: VmLock,
    job: Job,
    notes: Vec<String>,
}

impl Vm {
    /// Writes snapshot `snap` as a bundle to `out` (a file, a pipe, stdout). The VM may be
    /// running; nothing of it is changed.
    pub async fn export(
        &self,
        snap: &SnapshotName,
        out: Box<dyn Write + Send>,
        opts: &ExportOptions,
    ) -> Result<ExportReport> {
        let started = Instant::now();
        let Prepared { lock, job, notes } = self.prepare_export(snap, opts).await?;
        let written = store::blocking(move || write_bundle(out, job)).await?;
        drop(lock);
        Ok(ExportReport {
            vm: self.name().to_string(),
            snapshot: snap.to_string(),
            base: opts.base.as_ref().map(ToString::to_string),
            files: written.files,
            bundle_bytes: written.bytes,
            notes,
            seal: written.seal,
            signed: written.signed,
            total_ms: started.elapsed().as_secs_f64() * 1e3,
        })
    }

    async fn prepare_export(&self, snap: &SnapshotName, opts: &ExportOptions) -> Result<Prepared> {
        let store = self.store().clone();
        let lock = self.lock_for_reading(&format!("export {snap}")).await?;
        let refuse = |why: String| -> Error {
            BundleError::ExportRefused {
                snapshot: snap.to_string(),
                why,
            }
            .into()
        };
        let signer = match &opts.sign {
            Some(k) => {
                let k = k.clone();
                Some(blocking(move || super::sign::read_secret(&k)).await?)
            }
            None => None,
        };
        let record = store.record(self.name()).await?;
        let manifest = store.manifest(self.name(), snap).await?;
        revert::validate(snap.as_str(), &manifest.snapshot)
            .await
            .map_err(|e| refuse(e.to_string()))?;
        if let Some(s) = manifest
            .snapshot
            .skipped
            .iter()
            .find(|s| s.reason == "read-only")
        {
            return Err(refuse(format!(
                "its read-only disk {} (a CD-ROM or shared image) is not something a bundle carries yet; detach it, or export a snapshot taken without it",
                s.device
            )));
        }
        let command = Self::command_of(&record)?.clone();
        let base = match &opts.base {
            Some(b) => Some(store.manifest(self.name(), b).await?),
            None => None,
        };
        let cancel = self.cancel().clone();
        let mut planned: Vec<Planned> = Vec::new();
        let mut notes = Vec::new();
        let mut base_hashes: Vec<String> = Vec::new();

        // Disks: every layer of each frozen image's chain, bottom first (above the base's
        // frozen image, for an incremental bundle).
        let mut disks = Vec::new();
        let mut renames: Vec<(PathBuf, String)> = Vec::new();
        for (i, d) in manifest.snapshot.disks.iter().enumerate() {
            let mut chain = image::chain(&d.image, &cancel).await?;
            chain.reverse();
            let mut on_base = false;
            if let Some(b) = &base {
                let Some(bd) = b.snapshot.disks.iter().find(|x| x.device == d.device) else {
                    return Err(refuse(format!(
                        "the base snapshot {} has no state of disk {}",
                        b.name, d.device
                    )));
                };
                let Some(k) = chain.iter().position(|c| c.filename == bd.image) else {
                    return Err(refuse(format!(
                        "the base snapshot {}'s image of disk {} ({}) is not in this snapshot's chain (it is not an ancestor, or a delete merged it); export without --base",
                        b.name,
                        d.device,
                        bd.image.display()
                    )));
                };
                if k + 1 == chain.len() {
                    return Err(refuse(format!(
                        "the base snapshot {} froze the same image of disk {} as this one",
                        b.name, d.device
                    )));
                }
                on_base = true;
                chain.drain(..=k);
            }
            let mut layers = Vec::new();
            for (k, c) in chain.iter().enumerate() {
                let name = format!("disks/{i}/{k}.{}", c.format);
                if !matches!(c.format.as_str(), "qcow2" | "raw") {
                    return Err(refuse(format!(
                        "disk {} has a layer {} in format {} (a bundle carries qcow2 and raw)",
                        d.device,
                        c.filename.display(),
                        c.format
                    )));
                }
                layers.push(Layer {
                    name: name.clone(),
                    format: c.format.clone(),
                });
                planned.push(Planned {
                    file: bundle_file(&name, Role::Disk, &c.filename).await?,
                    path: c.filename.clone(),
                    base: None,
                });
            }
            if let Some(cur) = record.disks.iter().find(|x| x.device == d.device) {
                let bottom = if on_base {
                    // The receiver's base image stands where the command line names a disk.
                    format!("{BUNDLE_TOKEN}/base/{i}")
                } else {
                    format!("{BUNDLE_TOKEN}/{}", layers[0].name)
                };
                renames.push((cur.launch_image.clone(), bottom));
            }
            disks.push(BundleDisk {
                device: d.device.clone(),
                layers,
                on_base,
            });
        }

        // Boot files the command line reads at start (a receiver of an incremental bundle
        // has them, with its command line).
        let boot_flags: &[&str] = if base.is_some() {
            &[]
        } else {
            &["-kernel", "-initrd", "-dtb"]
        };
        for (k, flag) in boot_flags.iter().enumerate() {
            if let Some(v) = command
                .argv
                .iter()
                .position(|a| a == flag)
                .and_then(|p| command.argv.get(p + 1))
            {
                let path = store::plain_path(&command.cwd.join(v));
                let name = format!(
                    "boot/{k}-{}",
                    super::format::safe_file_name(&path.to_string_lossy(), "file")
                );
                renames.push((path.clone(), format!("{BUNDLE_TOKEN}/{name}")));
                planned.push(Planned {
                    file: bundle_file(&name, Role::Boot, &path).await?,
                    path,
                    base: None,
                });
            }
        }

        // Memory: the stream (or device state) and a lazy snapshot's RAM image.
        let mut portable = manifest.clone();
        for d in &mut portable.snapshot.disks {
            let i = manifest
                .snapshot
                .disks
                .iter()
                .position(|x| x.device == d.device)
                .unwrap_or_default();
            d.image = match disks[i].layers.last() {
                Some(l) => PathBuf::from(&l.name),
                None => PathBuf::new(),
            };
            d.overlay = PathBuf::new();
            d.frozen = None;
        }
        if let Some(mem) = &manifest.snapshot.memory {
            let pm = portable.snapshot.memory.as_mut().expect("cloned above");
            let bm = base.as_ref().and_then(|b| b.snapshot.memory.as_ref());
            let (name, delta_base) = match &mem.lazy {
                None => {
                    let mapped = |m: &store::MemoryImage| {
                        m.lazy.is_none() && m.capabilities.iter().any(|c| c == "mapped-ram")
                    };
                    let delta = match bm {
                        Some(b) if mapped(mem) && mapped(b) => Some(b.file.clone()),
                        Some(_) => {
                            notes.push("memory shipped whole: a delta needs both snapshots' memory at fixed offsets (both mapped-ram, or both lazy: `qsnap lazy-ram`)".into());
                            None
                        }
                        None => None,
                    };
                    ("memory/state.mem", delta)
                }
                Some(_) => ("memory/state.dev", None),
            };
            pm.file = PathBuf::from(name);
            planned.push(Planned {
                file: bundle_file(name, Role::Memory, &mem.file).await?,
                path: mem.file.clone(),
                base: delta_base,
            });
            if let Some(l) = &mem.lazy {
                let delta = match bm.and_then(|b| b.lazy.as_ref()) {
                    Some(bl) => Some(bl.image.clone()),
                    None if bm.is_some() => {
                        notes.push("RAM image shipped whole: the base snapshot's memory is not lazy (`qsnap lazy-ram` it for a delta)".into());
                        None
                    }
                    None => None,
                };
                pm.lazy.as_mut().expect("cloned above").image = PathBuf::from("memory/ram.img");
                planned.push(Planned {
                    file: bundle_file("memory/ram.img", Role::Ram, &l.image).await?,
                    path: l.image.clone(),
                    base: delta,
                });
            }
        }
        if let Some(b) = &base {
            for p in &mut planned {
                if let Some(bp) = &p.base {
                    let h = base_hash(b, bp).await?;
                    base_hashes.push(h.clone());
                    p.file.delta_of = Some(h);
                }
            }
        }

        // The portable command line.
        let (renamed, missing) = rename_files(&command.argv, &command.cwd, &renames);
        if let Some(m) = missing.first() {
            return Err(refuse(format!(
                "its command line does not name {} as -drive file=, -blockdev filename=, -kernel, -initrd or -dtb",
                m.display()
            )));
        }
        let vm_dir = Path::new(VM_TOKEN);
        let source_qmp = self.socket_path(&record).ok();
        let portable_argv = clone_argv(
            &renamed,
            &command.cwd,
            &vm_dir.join("files"),
            source_qmp.as_deref(),
            &vm_dir.join("qmp.sock"),
            &[],
            Purpose::Export,
        )
        .map_err(|why| refuse(format!("its command line cannot be made portable: {why}")))?;
        let mut argv = portable_argv.argv;
        argv[0] = Path::new(&argv[0])
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();

        portable.vm = self.name().to_string();
        portable.imported = None;
        let bundle = BundleManifest {
            format: FORMAT.into(),
            version: VERSION,
            qsnap_version: env!("CARGO_PKG_VERSION").into(),
            created_at: store::now_rfc3339(),
            vm: self.name().to_string(),
            qemu: QemuInfo {
                version: manifest.qemu_version.clone(),
                machine: manifest.machine.clone(),
                binary: argv[0].clone(),
            },
            command: argv,
            snapshot: portable,
            disks,
            files: planned.iter().map(|p| p.file.clone()).collect(),
            base: base.as_ref().map(|b| BaseRef {
                snapshot: b.name.clone(),
                created_at: b.created_at.clone(),
                memory_checksum: b.snapshot.memory.as_ref().and_then(|m| m.checksum.clone()),
                hashes: {
                    let mut h = base_hashes.clone();
                    h.sort();
                    h.dedup();
                    h
                },
            }),
        };
        bundle.check().map_err(|why| {
            refuse(format!(
                "qsnap made a bundle manifest it would not read ({why}); this is a bug"
            ))
        })?;
        let manifest_bytes = serde_json::to_vec_pretty(&bundle).expect("serializable");
        let total: u64 = planned.iter().map(|p| p.file.size).sum();
        let progress = opts.progress.clone();
        let (level, threads) = (
            if opts.level == 0 { 3 } else { opts.level },
            if opts.threads == 0 {
                std::thread::available_parallelism()
                    .map_or(1, |n| u32::try_from(n.get()).unwrap_or(1))
            } else {
                opts.threads
            },
        );
        let job = Job {
            manifest: manifest_bytes,
            planned,
            level,
            threads,
            total,
            progress,
            sign: signer.map(|k| (k, format!("{}/{snap}", self.name()))),
        };
        Ok(Prepared { lock, job, notes })
    }
}

/// A file of the bundle, named after the host file it is.
async fn bundle_file(name: &str, role: Role, path: &Path) -> Result<BundleFile> {
    let p = path.to_owned();
    let size = store::blocking(move || {
        std::fs::metadata(&p)
            .map(|m| m.len())
            .map_err(store::io("reading a file to export", &p))
    })
    .await?;
    Ok(BundleFile {
        name: name.to_owned(),
        role,
        size,
        file_name: super::format::safe_file_name(&path.to_string_lossy(), "file"),
        delta_of: None,
    })
}

/// The content hash of one of the base snapshot's files: the one its import recorded while
/// the file is unchanged since (what the receiver holds), else computed (and remembered
/// under the file's identity).
async fn base_hash(base: &Manifest, path: &Path) -> Result<String> {
    if let Some(imp) = &base.imported {
        if let Some(f) = imp.files.iter().find(|f| f.path == path) {
            if image::stamp(path).await.ok() == Some(f.stamp) {
                return Ok(f.hash.clone());
            }
        }
    }
    super::hash_cached(path).await
}

/// What writing the stream produced.
struct Written {
    files: Vec<ExportedFile>,
    signed: bool,
    bytes: u64,
    seal: String,
}

/// Counts the bytes that reach the output.
struct Counting<W> {
    inner: W,
    count: u64,
}

impl<W: Write> Write for Counting<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.count += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// Everything [`write_bundle`] writes.
struct Job {
    manifest: Vec<u8>,
    planned: Vec<Planned>,
    level: i32,
    threads: u32,
    total: u64,
    progress: Option<BundleProgressFn>,
    /// The signing key and what the signature's comment names.
    sign: Option<(minisign::SecretKey, String)>,
}

fn write_bundle(out: Box<dyn Write + Send>, job: Job) -> Result<Written> {
    let Job {
        manifest,
        planned,
        level,
        threads,
        total,
        progress,
        sign,
    } = job;
    let (manifest, planned) = (&manifest[..], &planned[..]);
    let io = store::io;
    let out_path = Path::new("(the bundle)");
    let mut w = container::Writer::new(
        Counting {
            inner: out,
            count: 0,
        },
        level,
        threads,
    )
    .map_err(io("starting the bundle", out_path))?;
    w.add_bytes(super::format::MANIFEST, manifest)
        .map_err(io("writing the bundle", out_path))?;
    let mut seal = Seal {
        format: FORMAT.into(),
        manifest: super::hash_bytes(manifest),
        files: BTreeMap::new(),
    };
    let mut files = Vec::new();
    let mut done = 0u64;
    for p in planned {
        let mut tell = |n: u64| {
            if let Some(f) = &progress {
                f(done + n.min(p.file.size), total);
            }
        };
        let digest: FileDigest = match &p.base {
            Some(b) => w.add_delta(&p.file.name, &p.path, b, &mut tell),
            None => w.add_file(&p.file.name, &p.path, &mut tell),
        }
        .map_err(io("exporting", &p.path))?;
        done += p.file.size;
        if digest.size != p.file.size {
            return Err(Error::Io {
                what: "exporting (the file changed size while it was read)",
                path: p.path.clone(),
                source: std::io::Error::other("size changed"),
            });
        }
        seal.files.insert(
            p.file.name.clone(),
            Sealed {
                hash: digest.hash.clone(),
                size: digest.size,
            },
        );
        files.push(ExportedFile {
            name: p.file.name.clone(),
            size: digest.size,
            shipped: digest.stored,
            delta: p.base.is_some(),
        });
    }
    let seal_bytes = serde_json::to_vec_pretty(&seal).expect("serializable");
    w.add_bytes(SEAL, &seal_bytes)
        .map_err(io("writing the bundle", out_path))?;
    let signed = sign.is_some();
    if let Some((key, what)) = sign {
        let sig = super::sign::sign(&key, &seal_bytes, &what)?;
        w.add_bytes(super::sign::SIGNATURE, &sig)
            .map_err(io("writing the bundle", out_path))?;
    }
    let mut counted = w.finish().map_err(io("finishing the bundle", out_path))?;
    counted
        .flush()
        .map_err(io("finishing the bundle", out_path))?;
    Ok(Written {
        files,
        signed,
        bytes: counted.count,
        seal: super::hash_bytes(&seal_bytes),
    })
}
