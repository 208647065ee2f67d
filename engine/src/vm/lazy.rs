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

use super::Vm;
use crate::error::{Error, LazyRamError, LazyRamRefusal, QemuFeature, Result};
use crate::failpoint;
use crate::image;
use crate::launch::{argv, machine, ram, wait_ready, NotReady, RamMapping};
use crate::name::SnapshotName;
use crate::qemu::{Capability, MigrateSetCapabilities};
use crate::snapshot::memfile;
use crate::snapshot::revert::{self as snaprevert, PreparedRevert};
use crate::snapshot::save::Watch;
use crate::store::{self, LazyRam, Manifest};
use qsnap_qmp::{types, Qmp};
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// What `lazy-ram` did.
#[derive(Debug, Clone, Serialize)]
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
        .or_else(|| ram::backend_id(machine).err())
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
        let backend = ram::backend_id(manifest.machine.as_deref()).map_err(unsupported)?;
        let ram_bytes = ram::ram_size(&command.argv).map_err(unsupported)?;
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
            return Err(unsupported(format!(
                "the memory directory has {} MiB free; the RAM image needs about {} MiB",
                free >> 20,
                need >> 20
            )));
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
                RamMapping::Writable {
                    backend: backend.clone(),
                    image: image.clone(),
                    size: ram_bytes,
                },
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
            x.lazy = Some(LazyRam {
                image: image.clone(),
                backend,
                size: ram_bytes,
                stamp,
                checksum,
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
const LOAD_CAPS: [&str; 2] = ["events", "x-ignore-shared"];

async fn allocated(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    tokio::fs::metadata(path)
        .await
        .map(|m| m.blocks() * 512)
        .unwrap_or(0)
}

/// The helper QEMU and its monitor.
struct Helper {
    child: tokio::process::Child,
    qmp: Qmp,
    log: PathBuf,
}

const HELPER_READY: Duration = Duration::from_secs(30);

impl Helper {
    async fn start(
        vm: &Vm,
        record: &store::VmRecord,
        manifest: &Manifest,
        command: &store::LaunchCommand,
        ram: RamMapping,
        tmp: &Path,
    ) -> Result<Helper> {
        // Every disk a blank stand-in of the same size in the private directory: the guest
        // never runs in the helper, so contents do not matter, and the helper never opens
        // one of the VM's images at all (no lock taken, nothing written).
        let mut disks = record.disks.clone();
        for (n, d) in disks.iter_mut().enumerate() {
            let size = match manifest
                .snapshot
                .disks
                .iter()
                .find(|s| s.device == d.device)
            {
                Some(s) => s.size,
                None => image::info(&d.image, vm.cancel()).await?.virtual_size,
            };
            let blank = tmp.join(format!("disk{n}.qcow2"));
            image::create_blank(&blank, size, vm.cancel()).await?;
            d.image = blank;
        }
        let subs: Vec<_> = disks
            .iter()
            .map(|d| crate::launch::DiskSubstitution {
                from: d.launch_image.clone(),
                to: d.image.clone(),
            })
            .collect();
        let mut a = argv::remove_flag(&command.argv, "incoming");
        a = argv::substitute_disks(&a, &command.cwd, &subs)?;
        a = ram::helper_argv(&a).map_err(|why| LazyRamError::HelperCommandLine { why })?;
        if let Some(m) = &manifest.machine {
            a = machine::pin(&a, m)?;
        }
        a.extend(ram.args());
        let socket = tmp.join("qmp.sock");
        a.extend([
            "-qmp".into(),
            format!("unix:{},server=on,wait=off", socket.display()),
            "-incoming".into(),
            "defer".into(),
            "-S".into(),
        ]);
        let log = tmp.join("helper.log");
        let out = tokio::fs::File::create(&log)
            .await
            .map_err(|source| Error::Io {
                what: "creating the helper's log",
                path: log.clone(),
                source,
            })?
            .into_std()
            .await;
        // The helper dies with qsnap, even SIGKILLed: util-linux's setpriv sets the parent-death
        // signal (no unsafe pre_exec here); without setpriv, dropping the child kills it.
        let spawn = |via_setpriv: bool| -> std::io::Result<tokio::process::Child> {
            let mut cmd = if via_setpriv {
                let mut c = tokio::process::Command::new("setpriv");
                c.args(["--pdeathsig", "KILL", "--"]).args(&a);
                c
            } else {
                let mut c = tokio::process::Command::new(&a[0]);
                c.args(&a[1..]);
                c
            };
            cmd.current_dir(&command.cwd)
                .stdin(Stdio::null())
                .stdout(out.try_clone()?)
                .stderr(out.try_clone()?)
                .kill_on_drop(true)
                .spawn()
        };
        let mut child = match spawn(true) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => spawn(false),
            other => other,
        }
        .map_err(|source| Error::Io {
            what: "starting the helper QEMU",
            path: a[0].clone().into(),
            source,
        })?;
        let why =
            match wait_ready(&mut child, &socket, HELPER_READY, false, Some(vm.cancel())).await {
                Ok(qmp) => return Ok(Helper { child, qmp, log }),
                Err(NotReady::Cancelled(_)) => return Err(Error::Cancelled),
                Err(NotReady::Exited(status)) => format!("it exited ({status})"),
                Err(NotReady::TimedOut(after)) => {
                    format!("its monitor did not answer within {after:?}")
                }
            };
        Err(Error::LaunchFailed {
            why: format!("the helper QEMU did not come up: {why}"),
            tail: crate::launch::log_tail(&log).await,
            log,
        })
    }

    /// Loads the stream into the image, then saves the device state alone to `dev_file`.
    async fn convert(
        &self,
        manifest: &Manifest,
        dev_file: &std::fs::File,
        cancel: &CancellationToken,
    ) -> Result<()> {
        let qmp = &self.qmp;
        let f = crate::features::Features::of(qmp).await?;
        let version = qmp.greeting().version.qemu;
        let props = qmp
            .execute(types::qom_list_properties {
                typename: "memory-backend-file".into(),
            })
            .await
            .map_err(Error::qmp("listing memory-backend-file's properties"))?;
        if !f.ignore_shared || !f.file_uri || !props.iter().any(|p| p.name == "rom") {
            return Err(Error::QemuLacks {
                feature: QemuFeature::LazyRam,
                version: version.to_string(),
            });
        }
        let mem = manifest
            .snapshot
            .memory
            .as_ref()
            .expect("checked: a memory snapshot");
        // The load, as a revert does it (x-ignore-shared stays off: the stream was saved so).
        let load = PreparedRevert {
            snapshot: manifest.name.clone(),
            disks: Vec::new(),
            memory: Some(mem.file.clone()),
            capabilities: mem.capabilities.clone(),
            was_running: false,
            verify_ms: 0.0,
            ram: None,
        };
        snaprevert::restore(qmp, &load, false, Duration::from_secs(600)).await?;
        // Only device state from here: RAM is in the shared file mapping, which
        // x-ignore-shared leaves out. Every other capability off, as the load will expect.
        let caps = qmp
            .execute(crate::qemu::QueryMigrateCapabilities {})
            .await
            .map_err(Error::qmp("reading migration capabilities"))?;
        let want = caps
            .into_iter()
            .filter(|c| c.state || LOAD_CAPS.contains(&c.capability.as_str()))
            .map(|c| Capability {
                state: LOAD_CAPS.contains(&c.capability.as_str()),
                capability: c.capability,
            })
            .collect();
        qmp.execute(MigrateSetCapabilities { capabilities: want })
            .await
            .map_err(Error::qmp("setting x-ignore-shared on the helper"))?;
        failpoint::hit("lazy.caps-sent", qmp.peer_pid()).await?;
        let fdset = qmp
            .add_fd(dev_file, None, Some(crate::snapshot::memfile::FD_NAME))
            .await
            .map_err(Error::qmp("passing the device-state file to the helper"))?;
        qmp.execute(types::migrate {
            uri: Some(format!(
                "file:/dev/fdset/{},offset={}",
                fdset.fdset_id,
                memfile::HEADER_LEN
            )),
            channels: None,
            detach: None,
            resume: None,
        })
        .await
        .map_err(Error::qmp("saving the device state"))?;
        failpoint::hit("lazy.save-sent", qmp.peer_pid()).await?;
        let watch = Watch {
            started: Instant::now(),
            timeout: Duration::from_secs(120),
            progress: None,
            cancel,
        };
        watch.until_completed(qmp, |_| async { Ok(()) }).await?;
        Ok(())
    }

    async fn stop(mut self) {
        let _ =
            tokio::time::timeout(Duration::from_secs(2), self.qmp.execute(types::quit {})).await;
        drop(self.qmp);
        if tokio::time::timeout(Duration::from_secs(10), self.child.wait())
            .await
            .is_err()
        {
            warn!(log = %self.log.display(), "the helper QEMU did not quit; killing it");
            let _ = self.child.start_kill();
            let _ = self.child.wait().await;
        }
    }
}

/// The helper QEMU's private directories: `<temp>/qsnap-lazy-<pid of qsnap>-<random>`.
const HELPER_DIR_PREFIX: &str = "qsnap-lazy-";

/// A helper directory younger than this is never swept: its owner may not have locked it yet.
const HELPER_DIR_MIN_AGE: Duration = Duration::from_secs(60);

/// The helper QEMU's private directory (a monitor socket, blank overlays, a log). Its owner
/// holds an flock on `<dir>/owner` while it exists, so a later run can tell a directory a
/// killed qsnap left (lock free) from one in use — also across pid namespaces sharing /tmp.
struct HelperDir {
    dir: tempfile::TempDir,
    _owner: nix::fcntl::Flock<std::fs::File>,
}

impl HelperDir {
    fn create() -> Result<HelperDir> {
        let temp = std::env::temp_dir();
        let io = |source| Error::Io {
            what: "creating a private directory for the helper QEMU",
            path: temp.clone(),
            source,
        };
        let dir = tempfile::Builder::new()
            .prefix(&format!("{HELPER_DIR_PREFIX}{}-", std::process::id()))
            .tempdir()
            .map_err(io)?;
        let file = std::fs::File::create(dir.path().join("owner")).map_err(io)?;
        let owner = nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock)
            .map_err(|(_, e)| io(e.into()))?;
        Ok(HelperDir { dir, _owner: owner })
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }
}

/// Removes helper directories that killed qsnap processes left behind: this user's, named
/// `qsnap-lazy-<pid>-…`, older than `min_age`, with their owner lock free and no QEMU
/// answering on their monitor socket. Errors are ignored (a later run tries again).
fn sweep_helper_dirs(temp: &Path, min_age: Duration) {
    use std::os::unix::fs::MetadataExt;
    let Ok(entries) = std::fs::read_dir(temp) else {
        return;
    };
    let me = nix::unistd::geteuid().as_raw();
    for e in entries.flatten() {
        let name = e.file_name();
        let shaped = name
            .to_str()
            .and_then(|n| n.strip_prefix(HELPER_DIR_PREFIX))
            .and_then(|rest| rest.split_once('-'))
            .is_some_and(|(pid, _)| !pid.is_empty() && pid.bytes().all(|b| b.is_ascii_digit()));
        let Ok(md) = std::fs::symlink_metadata(e.path()) else {
            continue;
        };
        let old = md
            .modified()
            .ok()
            .and_then(|m| m.elapsed().ok())
            .is_some_and(|age| age >= min_age);
        if !shaped || !md.is_dir() || md.uid() != me || !old {
            continue;
        }
        let dir = e.path();
        // Its owner's lock, held until the sweep is done (no one else takes it then).
        let Ok(file) = std::fs::File::open(dir.join("owner")) else {
            continue;
        };
        let Ok(_lock) = nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock)
        else {
            continue;
        };
        // A helper that outlived its qsnap still answers: leave it to whoever finds it.
        if std::os::unix::net::UnixStream::connect(dir.join("qmp.sock")).is_ok() {
            continue;
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_abandoned_helper_dirs_are_swept() {
        let temp = tempfile::tempdir().unwrap();
        let made = |name: &str, owner: bool| {
            let d = temp.path().join(name);
            std::fs::create_dir(&d).unwrap();
            std::fs::write(d.join("helper.log"), b"x").unwrap();
            if owner {
                std::fs::write(d.join("owner"), b"").unwrap();
            }
            d
        };
        let abandoned = made("qsnap-lazy-123-abc", true);
        let held = made("qsnap-lazy-124-abc", true);
        let _holder = nix::fcntl::Flock::lock(
            std::fs::File::open(held.join("owner")).unwrap(),
            nix::fcntl::FlockArg::LockExclusiveNonblock,
        )
        .unwrap();
        let listening = made("qsnap-lazy-125-abc", true);
        let _qemu = std::os::unix::net::UnixListener::bind(listening.join("qmp.sock")).unwrap();
        let unshaped = made("qsnap-lazy-126", true);
        let ownerless = made("qsnap-lazy-127-abc", false);
        // Too young: kept whatever else holds.
        sweep_helper_dirs(temp.path(), Duration::from_secs(3600));
        assert!(abandoned.exists());
        sweep_helper_dirs(temp.path(), Duration::ZERO);
        assert!(!abandoned.exists());
        for kept in [&held, &listening, &unshaped, &ownerless] {
            assert!(kept.exists(), "{}", kept.display());
        }
        // One of our own holds its owner lock while it exists.
        let ours = HelperDir::create().unwrap();
        let name = ours
            .path()
            .file_name()
            .unwrap()
            .to_string_lossy()
            .into_owned();
        assert!(name.starts_with(&format!("qsnap-lazy-{}-", std::process::id())));
        assert!(nix::fcntl::Flock::lock(
            std::fs::File::open(ours.path().join("owner")).unwrap(),
            nix::fcntl::FlockArg::LockExclusiveNonblock,
        )
        .is_err());
    }
}
