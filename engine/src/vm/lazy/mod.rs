//! Making a snapshot's memory lazy: its stream becomes a flat RAM image plus a small
//! device-state file, so a revert maps the image (pages fault in as the guest touches them,
//! copy-on-write, shared between VMs) instead of loading every page first.
//!
//! ```text
//! lock → checks (memory snapshot, not lazy yet, the command line allows it, the stream whole)
//! → <snap>.ram (holes, 0600) and <snap>.dev (memory-file header, 0600), both new
//! → helper QEMU: the VM's devices made inert, RAM = the image (share=on), its disks on
//!   throwaway overlays in a private temp dir, -incoming defer -S, its own monitor
//! → migrate-incoming the stream (x-ignore-shared off, as it was saved)
//! → x-ignore-shared on, migrate to <snap>.dev: only device state and small ROM blocks
//! → helper quit; image fsynced, checksummed, stamped
//! → manifest replaced (atomic): memory = <snap>.dev + lazy image → <snap>.mem removed
//! ```
//! No journal: until the manifest is replaced the new files are orphans `qsnap check
//! --repair` removes, after it the old stream is; the manifest is never half-written. The
//! helper never writes the VM's images (its overlays are its own, in a temp dir), never binds a
//! socket or port but its own monitor, and dies with qsnap (parent-death signal).

mod helper;

use super::Vm;
use crate::error::{Error, LazyRamError, LazyRamRefusal, Result};
use crate::failpoint;
use crate::image;
use crate::launch::{ram, RamMapping};
use crate::name::SnapshotName;
use crate::snapshot::memfile;
use crate::store::{self, LazyRam};
use helper::{sweep_helper_dirs, Helper, HelperDir, HELPER_DIR_MIN_AGE};
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::time::Instant;
use tracing::{info, warn};

/// What `lazy-ram` did.
#[derive(Debug, Clone, Serialize, schemars::JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub struct LazyReport {
    /// The snapshot.
    pub snapshot: String,
    /// The RAM image a revert maps.
    pub image: PathBuf,
    /// Its size (the guest's RAM).
    pub image_bytes: u64,
    /// What it occupies on disk (zero pages are holes).
    pub image_allocated: u64,
    /// The device-state file a revert loads.
    pub devices: PathBuf,
    /// Its stream's length.
    pub devices_bytes: u64,
    /// The memory stream that was replaced (and removed), in bytes.
    pub stream_bytes: u64,
    /// How long the conversion took.
    pub total_ms: f64,
    /// True when the snapshot was lazy already (nothing done).
    pub already: bool,
}

/// Why a VM with this command line and machine type cannot use lazy RAM, or `None`.
pub(crate) fn why_not(argv: &[String], machine: Option<&str>) -> Option<String> {
    ram::obstacle(argv)
        .or_else(|| ram::layout(argv, machine).err())
        .or_else(|| ram::helper_argv(argv).err())
}

impl Vm {
    /// Makes `snap`'s memory lazy (see the module docs). A snapshot that is lazy already is
    /// left as it is.
    pub async fn make_lazy(&self, snap: &SnapshotName) -> Result<LazyReport> {
        let started = Instant::now();
        let op = self.begin(&format!("lazy-ram {snap}")).await?;
        store::blocking(|| {
            sweep_helper_dirs(&std::env::temp_dir(), HELPER_DIR_MIN_AGE);
            Ok(())
        })
        .await?;
        let record = op.record.clone();
        let manifest = self.store().manifest(self.name(), snap).await?;
        let refused = |reason: LazyRamRefusal| -> Error {
            LazyRamError::Refused {
                snapshot: snap.to_string(),
                reason,
            }
            .into()
        };
        let unsupported = |why: String| refused(LazyRamRefusal::CommandLine { why });
        let Some(mem) = manifest.snapshot.memory.clone() else {
            return Err(refused(LazyRamRefusal::DiskOnly));
        };
        let (devices, image) = self.store().lazy_paths(self.name(), snap);
        if let Some(l) = &mem.lazy {
            return Ok(LazyReport {
                snapshot: snap.to_string(),
                image: l.image.clone(),
                image_bytes: l.size,
                image_allocated: allocated(&l.image).await,
                devices: mem.file.clone(),
                devices_bytes: mem.bytes,
                stream_bytes: 0,
                total_ms: 0.0,
                already: true,
            });
        }
        let command = Self::command_of(&record)?.clone();
        if let Some(why) = why_not(&command.argv, manifest.machine.as_deref()) {
            return Err(unsupported(why));
        }
        let layout =
            ram::layout(&command.argv, manifest.machine.as_deref()).map_err(unsupported)?;
        let ram_bytes = layout.size();
        memfile::verify(mem.file.clone(), mem.bytes, mem.checksum.clone())
            .await
            .map_err(|e| {
                refused(LazyRamRefusal::MemoryFileNotWhole {
                    problem: Box::new(e),
                })
            })?;
        for p in [&devices, &image] {
            let q = p.clone();
            if store::blocking(move || store::exists(&q)).await? {
                return Err(LazyRamError::Leftover {
                    path: p.clone(),
                    vm: self.name().to_string(),
                }
                .into());
            }
        }

        // Room for the image (about what the stream allocates: zero pages are holes in
        // both, and a mapped-ram stream is as large as RAM only in appearance) and the
        // device state next to the stream, with a margin: a full filesystem would stop the
        // helper and could pause the running VM if its disks live there too.
        let dir = self.store().memory_dir(self.name());
        let free = store::blocking(move || {
            nix::sys::statvfs::statvfs(&dir)
                .map(|s| s.blocks_available() * s.fragment_size())
                .map_err(|e| Error::Io {
                    what: "reading the free space of the memory directory",
                    path: dir.clone(),
                    source: e.into(),
                })
        })
        .await?;
        let need = allocated(&mem.file).await + (64 << 20);
        if free < need {
            return Err(refused(LazyRamRefusal::NoSpace { free, need }));
        }

        // ---- new files only; on failure they go again ----
        let made = async {
            memfile::create_ram_image(image.clone(), ram_bytes).await?;
            let dev_file =
                memfile::create(self.store().memory_dir(self.name()), devices.clone()).await?;
            let tmp = store::blocking(HelperDir::create).await?;
            let helper = Helper::start(
                self,
                &record,
                &manifest,
                &command,
                RamMapping::new(&layout, image.clone(), true),
                tmp.path(),
            )
            .await?;
            let helper_pid = helper.child.id();
            // Ctrl-C ends the conversion at once; the helper is stopped and the new files go.
            let converted = async {
                failpoint::hit("lazy.helper-up", helper_pid).await?;
                tokio::select! {
                    r = helper.convert(&manifest, &dev_file, self.cancel()) => r,
                    () = self.cancel().cancelled() => Err(Error::Cancelled),
                }?;
                failpoint::hit("lazy.converted", helper_pid).await
            }
            .await;
            if let Err(e) = &converted {
                // The helper's log goes with its temp directory: keep its last words.
                let tail = crate::launch::log_tail(&helper.log).await;
                warn!(error = %e, log = %tail.replace('\n', " | "), "the conversion failed");
            }
            helper.stop().await;
            converted?;
            let sealed = memfile::seal(dev_file, devices.clone()).await?;
            let checksum = memfile::seal_ram_image(image.clone()).await?;
            let stamp = image::stamp(&image).await?;
            // Just read in full: the first lazy revert need not read it again.
            memfile::remember_ram_verified(&image, &checksum).await;
            failpoint::hit("lazy.made", None).await?;
            Ok::<_, Error>((sealed, checksum, stamp))
        }
        .await;
        let (sealed, checksum, stamp) = match made {
            Ok(x) => x,
            Err(e) => {
                discard(&[&devices, &image]).await;
                return Err(e);
            }
        };

        // ---- the switch: one atomic manifest write ----
        let mut m = manifest.clone();
        if let Some(x) = &mut m.snapshot.memory {
            x.file = devices.clone();
            x.bytes = sealed.stream_len;
            x.checksum = Some(sealed.checksum);
            x.capabilities = LOAD_CAPS.iter().map(|s| (*s).to_owned()).collect();
            let mapping = RamMapping::new(&layout, image.clone(), false);
            x.lazy = Some(LazyRam {
                image: image.clone(),
                backend: layout.blocks[0].id.clone(),
                size: ram_bytes,
                stamp,
                checksum,
                blocks: match mapping {
                    RamMapping::Private { blocks, .. } | RamMapping::Writable { blocks, .. } => {
                        blocks
                    }
                },
            });
        }
        let write_switch = || async {
            self.store().replace_manifest(&m).await?;
            // (A test's stand-in for a directory sync that failed after the rename.)
            failpoint::hit("lazy.switch-written", None).await
        };
        if let Err(e) = write_switch().await {
            // The rename may have happened before the error (a failed directory sync): the
            // new files go only if the manifest on disk still names the stream. A manifest
            // that cannot be read back says nothing either way: every file stays (one of the
            // two copies is the snapshot's memory), and `check` sorts them out by what the
            // manifest names once it can be read.
            let read_back = match failpoint::hit("lazy.read-back", None).await {
                Ok(()) => self.store().manifest(self.name(), snap).await,
                Err(e) => Err(e),
            };
            match read_back {
                Ok(now)
                    if now
                        .snapshot
                        .memory
                        .as_ref()
                        .is_some_and(|x| x.lazy.is_some()) =>
                {
                    // Switched, but not known durable (the read sees the page cache): after a
                    // power cut the manifest could name the stream again. Only a write that
                    // goes through makes the switch durable, and the command must not say
                    // done before it is; until then every memory file stays.
                    warn!(error = %e, "the manifest switched to the RAM image, but writing it reported an error; writing it again");
                    if let Err(again) = write_switch().await {
                        return Err(Error::StoreBehind {
                            vm: self.name().to_string(),
                            cause: Box::new(e),
                            problem: Box::new(
                                LazyRamError::NotDurable {
                                    vm: self.name().to_string(),
                                    snapshot: snap.to_string(),
                                    problem: Box::new(again),
                                }
                                .into(),
                            ),
                        });
                    }
                }
                Ok(_) => {
                    discard(&[&devices, &image]).await;
                    return Err(e);
                }
                Err(read) => {
                    return Err(Error::StoreBehind {
                        vm: self.name().to_string(),
                        cause: Box::new(e),
                        problem: Box::new(
                            LazyRamError::SwitchUnknown {
                                snapshot: snap.to_string(),
                                problem: Box::new(read),
                            }
                            .into(),
                        ),
                    });
                }
            }
        }
        failpoint::hit("lazy.switched", None).await?;
        if let Err(e) = crate::unlink::checked(&mem.file, crate::unlink::Kind::Memory).await {
            warn!(error = %e, "the old memory stream stays; `qsnap check --repair` removes it");
        }
        let report = LazyReport {
            snapshot: snap.to_string(),
            image: image.clone(),
            image_bytes: ram_bytes,
            image_allocated: allocated(&image).await,
            devices,
            devices_bytes: sealed.stream_len,
            stream_bytes: mem.bytes,
            total_ms: started.elapsed().as_secs_f64() * 1e3,
            already: false,
        };
        info!(vm = %self.name(), %snap, ms = report.total_ms, "memory made lazy");
        Ok(report)
    }
}

/// Removes files this conversion made (best effort: a leftover is an orphan `check` removes).
async fn discard(files: &[&PathBuf]) {
    for p in files {
        if let Err(e) = crate::unlink::checked(p, crate::unlink::Kind::Memory).await {
            warn!(error = %e, "kept a file of the failed conversion; `qsnap check --repair` removes it");
        }
    }
}

/// The capabilities of the device-state save (and so of its load).
pub(super) const LOAD_CAPS: [&str; 2] = ["events", "x-ignore-shared"];

async fn allocated(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    tokio::fs::metadata(path)
        .await
        .map(|m| m.blocks() * 512)
        .unwrap_or(0)
}
