//! The lazy-RAM helper QEMU: started from the VM's command line with every device made inert
//! (`launch::ram::helper_argv`), its disks blank stand-ins in a private directory, its RAM the
//! new image; it loads the snapshot's stream and saves the device state alone. It never opens
//! the VM's images, never binds a socket but its own monitor, and dies with qsnap.
//! Abandoned private directories (a killed qsnap's) are swept by the next run.

use super::LOAD_CAPS;
use crate::error::{Error, LazyRamError, QemuFeature, Result};
use crate::failpoint;
use crate::image;
use crate::launch::{argv, machine, ram, wait_ready, NotReady, RamMapping};
use crate::qemu::{Capability, MigrateSetCapabilities};
use crate::snapshot::memfile;
use crate::snapshot::revert::{self as snaprevert, PreparedRevert};
use crate::snapshot::save::Watch;
use crate::store::{self, Manifest};
use crate::vm::Vm;
use qsnap_qmp::{types, Qmp};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;
use tracing::warn;

/// The helper QEMU and its monitor.
pub(super) struct Helper {
    pub(super) child: tokio::process::Child,
    qmp: Qmp,
    pub(super) log: PathBuf,
}

const HELPER_READY: Duration = Duration::from_secs(30);

impl Helper {
    pub(super) async fn start(
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
        a = ram
            .apply(&a)
            .map_err(|why| LazyRamError::HelperCommandLine { why })?;
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
    pub(super) async fn convert(
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

    pub(super) async fn stop(mut self) {
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
pub(super) const HELPER_DIR_MIN_AGE: Duration = Duration::from_secs(60);

/// The helper QEMU's private directory (a monitor socket, blank overlays, a log). Its owner
/// holds an flock on `<dir>/owner` while it exists, so a later run can tell a directory a
/// killed qsnap left (lock free) from one in use — also across pid namespaces sharing /tmp.
pub(super) struct HelperDir {
    dir: tempfile::TempDir,
    _owner: nix::fcntl::Flock<std::fs::File>,
}

impl HelperDir {
    pub(super) fn create() -> Result<HelperDir> {
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

    pub(super) fn path(&self) -> &Path {
        self.dir.path()
    }
}

/// Removes helper directories that killed qsnap processes left behind: this user's, named
/// `qsnap-lazy-<pid>-…`, older than `min_age`, with their owner lock free and no QEMU
/// answering on their monitor socket. Errors are ignored (a later run tries again).
pub(super) fn sweep_helper_dirs(temp: &Path, min_age: Duration) {
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
