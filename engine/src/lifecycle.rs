//! A VM's lifecycle under qsnap: `run` (start a command line and register it), `stop`,
//! `start` (relaunch on the current disk chain), `status`, and `revert` (stop, new overlays
//! over the snapshot's frozen images, relaunch incoming, load memory, resume).
//!
//! Every relaunch rewrites the recorded command line's disk paths to the current images, so a
//! frozen snapshot image is never opened read-write. The record changes only after the new
//! QEMU runs; until then the previous images are kept.

use crate::error::{Error, Result};
use crate::launch::{
    self, argv, stop_qemu, DiskSubstitution, LaunchSpec, Launched, Launcher, ProcessLauncher,
};
use crate::name::{SnapshotName, VmName};
use crate::snapshot::revert::{self, PreparedRevert, RestoreReport};
use crate::store::{self, CurrentDisk, LaunchCommand, Origin, VmRecord};
use crate::vm::{disks_now, merge_disks, Engine, Vm};
use qsnap_qmp::{types, Endpoint};
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tracing::{info, warn};

/// How long `quit` may take before QEMU is killed.
const QUIT_TIMEOUT: Duration = Duration::from_secs(10);

/// Options for `run`.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Do not add `tsc-frequency` to an invtsc CPU.
    pub no_tsc_fix: bool,
    /// The working directory for relative paths (default: the current one).
    pub cwd: Option<PathBuf>,
}

/// What `run` did.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct RunReport {
    /// The new record.
    pub record: VmRecord,
    /// `tsc-frequency` added for an invtsc CPU, in Hz, and where the figure came from.
    pub tsc_pinned: Option<(u64, String)>,
}

/// A VM's state.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct Status {
    /// The VM.
    pub vm: String,
    /// True when QEMU answers on the monitor.
    pub running: bool,
    /// QEMU's run state when it answers (`running`, `paused`, …).
    pub runstate: Option<String>,
    /// QEMU's pid.
    pub pid: Option<u32>,
    /// The snapshot the current state descends from.
    pub current: Option<String>,
    /// Each disk's chain, top first.
    pub disks: Vec<DiskChain>,
}

/// One disk's backing chain.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct DiskChain {
    /// Device name.
    pub device: String,
    /// Images from the top (written) to the base.
    pub chain: Vec<PathBuf>,
}

/// What a revert did.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct RevertReport {
    /// The snapshot reverted to.
    pub snapshot: String,
    /// The new overlays the VM runs on.
    pub disks: Vec<revert::RevertDisk>,
    /// True for a memory snapshot (state restored); false for disk-only (booted).
    pub memory_restored: bool,
    /// Whether the guest runs now.
    pub resumed: bool,
    /// Memory load time.
    pub load_ms: f64,
    /// From the request to the guest running (or ready, when paused).
    pub total_ms: f64,
    /// Abandoned overlays deleted (the previous "current state").
    pub removed: Vec<PathBuf>,
    /// QEMU's pid.
    pub pid: Option<u32>,
}

impl Engine {
    /// Starts `argv` (a `qemu-system-*` command line) detached, with a monitor socket in the
    /// store, and registers it as `name`. Adds `tsc-frequency` to an invtsc CPU unless told
    /// not to, so the VM's memory can be saved.
    pub async fn run(
        &self,
        name: &VmName,
        argv: Vec<String>,
        opts: &RunOptions,
    ) -> Result<RunReport> {
        self.run_with(name, argv, opts, &ProcessLauncher::default())
            .await
    }

    /// [`Engine::run`] with a launcher of your own.
    pub async fn run_with<L: Launcher>(
        &self,
        name: &VmName,
        argv: Vec<String>,
        opts: &RunOptions,
        launcher: &L,
    ) -> Result<RunReport> {
        if argv.is_empty() {
            return Err(Error::CommandLine {
                why: "no QEMU command given".into(),
            });
        }
        let _lock = self.store().lock(name, "run").await?;
        if self.store().has_vm(name).await {
            return Err(Error::VmExists {
                vm: name.to_string(),
            });
        }
        let mut argv = argv;
        let mut tsc_pinned = None;
        if !opts.no_tsc_fix && argv::needs_tsc_frequency(&argv) {
            let (hz, source) =
                launch::tsc_frequency_for(&argv)
                    .await
                    .ok_or_else(|| Error::CommandLine {
                        why: "the CPU asks for invtsc but the TSC frequency could not be found; \
                              add tsc-frequency=<Hz> to -cpu yourself"
                            .into(),
                    })?;
            argv = argv::pin_tsc_frequency(&argv, hz);
            tsc_pinned = Some((hz, format!("{source:?}").to_lowercase()));
        }
        let cwd = match &opts.cwd {
            Some(c) => c.clone(),
            None => std::env::current_dir().map_err(|source| Error::Io {
                what: "reading the working directory",
                path: ".".into(),
                source,
            })?,
        };
        let socket = self.store().vm_dir(name).join("qmp.sock");
        check_socket_path(&socket)?;
        let command = LaunchCommand { argv, cwd };
        let spec = LaunchSpec {
            vm: name.to_string(),
            command: command.clone(),
            disks: Vec::new(),
            qmp_socket: socket.clone(),
            incoming: false,
            paused: false,
            log: self.store().vm_dir(name).join("qemu.log"),
        };
        let launched = launcher.launch(&spec).await?;
        let handle = self.vm_from(
            name.clone(),
            VmRecord {
                schema: store::SCHEMA,
                name: name.to_string(),
                qmp: socket.display().to_string(),
                origin: Origin::Run,
                pid: launched.pid,
                guest_agent: argv::guest_agent_socket(&command.argv, &command.cwd),
                command: Some(command),
                current: None,
                disks: Vec::new(),
                registered_at: store::now_rfc3339(),
            },
        );
        let qmp = handle.connect().await?;
        let mut record = handle.record().clone();
        record.disks = merge_disks(&[], disks_now(&qmp).await?);
        record.pid = qmp.peer_pid().or(record.pid);
        drop(qmp);
        self.store().write_record(&record).await?;
        Ok(RunReport { record, tsc_pinned })
    }
}

/// Unix socket paths are limited to 107 bytes.
fn check_socket_path(p: &Path) -> Result<()> {
    if p.as_os_str().len() > 107 {
        return Err(Error::CommandLine {
            why: format!(
                "the monitor socket path {} is longer than a unix socket allows (107 bytes); use a shorter --store",
                p.display()
            ),
        });
    }
    Ok(())
}

impl Vm {
    /// The pid if QEMU is alive and answers on its monitor.
    async fn running_pid(&self) -> Option<u32> {
        let qmp = self.connect_quick().await.ok()?;
        qmp.peer_pid().or(self.record().pid)
    }

    fn socket(&self) -> Result<PathBuf> {
        match Endpoint::parse(&self.record().qmp) {
            Endpoint::Unix(p) => Ok(p),
            Endpoint::Tcp(_) => Err(Error::CommandLine {
                why: "the VM's monitor is TCP; qsnap can only relaunch VMs it reaches over a unix socket".into(),
            }),
        }
    }

    fn command(&self) -> Result<&LaunchCommand> {
        self.record().command.as_ref().ok_or_else(|| Error::CommandLine {
            why: "no command line was recorded for this VM (its QEMU's /proc entry was not readable at attach)".into(),
        })
    }

    fn log_path(&self) -> PathBuf {
        self.store().vm_dir(self.name()).join("qemu.log")
    }

    /// Substitutions from the command line's images to the given current images.
    fn substitutions(disks: &[CurrentDisk]) -> Vec<DiskSubstitution> {
        disks
            .iter()
            .filter(|d| d.image != d.launch_image)
            .map(|d| DiskSubstitution {
                from: d.launch_image.clone(),
                to: d.image.clone(),
            })
            .collect()
    }

    /// Stops QEMU (`quit`, then SIGKILL after 10 s). Returns true if it had to be killed.
    pub async fn stop(&self) -> Result<bool> {
        let _lock = self.store().lock(self.name(), "stop").await?;
        let mut record = self.store().record(self.name()).await?;
        let pid = self.running_pid().await.or(record.pid);
        let killed = stop_qemu(&record.qmp, pid, QUIT_TIMEOUT).await?;
        record.pid = None;
        self.store().write_record(&record).await?;
        Ok(killed)
    }

    /// Starts a stopped VM again on its current disk chain.
    pub async fn start(&self) -> Result<Launched> {
        self.start_with(&ProcessLauncher::default()).await
    }

    /// [`Vm::start`] with a launcher of your own.
    pub async fn start_with<L: Launcher>(&self, launcher: &L) -> Result<Launched> {
        let _lock = self.store().lock(self.name(), "start").await?;
        let mut record = self.store().record(self.name()).await?;
        if let Some(pid) = self.running_pid().await {
            return Err(Error::AlreadyRunning {
                vm: self.name().to_string(),
                pid,
            });
        }
        let spec = LaunchSpec {
            vm: self.name().to_string(),
            command: self.command()?.clone(),
            disks: Self::substitutions(&record.disks),
            qmp_socket: self.socket()?,
            incoming: false,
            paused: false,
            log: self.log_path(),
        };
        let launched = launcher.launch(&spec).await?;
        record.pid = launched.pid;
        self.store().write_record(&record).await?;
        Ok(launched)
    }

    /// Running or not, the current snapshot, and each disk's chain.
    pub async fn status(&self) -> Result<Status> {
        let record = self.store().record(self.name()).await?;
        let (running, runstate, pid) = match self.connect_quick().await {
            Ok(qmp) => {
                let st = qmp.execute(types::query_status {}).await.ok();
                let pid = qmp.peer_pid().or(record.pid);
                (
                    true,
                    st.and_then(|s| serde_json::to_value(s.status).ok())
                        .and_then(|v| v.as_str().map(str::to_owned)),
                    pid,
                )
            }
            Err(_) => (false, None, None),
        };
        let mut disks = Vec::new();
        for d in &record.disks {
            disks.push(DiskChain {
                device: d.device.clone(),
                chain: backing_chain(&d.image).await,
            });
        }
        Ok(Status {
            vm: self.name().to_string(),
            running,
            runstate,
            pid,
            current: record.current.clone(),
            disks,
        })
    }

    /// Reverts to `snap`: the VM comes back with the memory and disks it had then, running if
    /// it was running then (unless `paused`).
    pub async fn revert(&self, snap: &SnapshotName, paused: bool) -> Result<RevertReport> {
        self.revert_with(snap, paused, &ProcessLauncher::default())
            .await
    }

    /// [`Vm::revert`] with a launcher of your own.
    pub async fn revert_with<L: Launcher>(
        &self,
        snap: &SnapshotName,
        paused: bool,
        launcher: &L,
    ) -> Result<RevertReport> {
        let started = Instant::now();
        let _lock = self
            .store()
            .lock(self.name(), &format!("revert {snap}"))
            .await?;
        let manifest = self.store().manifest(self.name(), snap).await?;
        let mut record = self.store().record(self.name()).await?;
        let command = self.command()?.clone();
        let socket = self.socket()?;
        let refuse = |why: String| Error::RevertRefused {
            snapshot: snap.to_string(),
            why,
        };
        // Every snapshotted disk must be one the command line opens.
        for d in &manifest.snapshot.disks {
            if !record.disks.iter().any(|r| r.device == d.device) {
                return Err(refuse(format!("the VM has no disk {} any more", d.device)));
            }
        }
        // Both only read; run them side by side.
        let machine_ok = async {
            match &manifest.machine {
                Some(machine) => check_machine(&command.argv[0], machine).await,
                None => Ok(()),
            }
        };
        let (machine_ok, prepared) = tokio::join!(
            machine_ok,
            revert::prepare(snap.as_str(), &manifest.snapshot, None)
        );
        let prepared = prepared?;
        if let Err(why) = machine_ok {
            revert::discard(&prepared).await;
            return Err(refuse(why));
        }
        let t_prepared = started.elapsed();
        // The new chain: the snapshot's disks on their new overlays, others as they are.
        let mut new_disks = record.disks.clone();
        for d in &mut new_disks {
            if let Some(r) = prepared.disks.iter().find(|r| r.device == d.device) {
                d.image = r.overlay.clone();
                d.owned = true;
            }
        }
        let spec = LaunchSpec {
            vm: self.name().to_string(),
            command,
            disks: Self::substitutions(&new_disks),
            qmp_socket: socket,
            incoming: prepared.memory.is_some(),
            paused: prepared.memory.is_some() || paused,
            log: self.log_path(),
        };
        // Check the command line rewrites before anything stops.
        if let Err(e) =
            launch::argv::substitute_disks(&spec.command.argv, &spec.command.cwd, &spec.disks)
        {
            revert::discard(&prepared).await;
            return Err(refuse(e.to_string()));
        }

        if let Some(pid) = self.running_pid().await.or(record.pid) {
            stop_qemu(&record.qmp, Some(pid), QUIT_TIMEOUT).await?;
        }
        let t_stopped = started.elapsed();
        let failed = |cause: Error, record: &VmRecord| Error::RevertFailed {
            vm: self.name().to_string(),
            cause: Box::new(cause),
            disks: record
                .disks
                .iter()
                .map(|d| format!("{}: {}", d.device, d.image.display()))
                .collect(),
        };
        let (launched, restored) = match self.relaunch(launcher, &spec, &prepared, paused).await {
            Ok(x) => x,
            Err((cause, pid)) => {
                if let Some(pid) = pid {
                    let _ = stop_qemu(&record.qmp, Some(pid), Duration::from_secs(2)).await;
                }
                revert::discard(&prepared).await;
                record.pid = None;
                let _ = self.store().write_record(&record).await;
                return Err(failed(cause, &record));
            }
        };

        // The new VM runs: the old "current state" overlays are abandoned.
        let old = std::mem::replace(&mut record.disks, new_disks);
        record.current = Some(snap.to_string());
        record.pid = launched.pid;
        self.store().write_record(&record).await?;
        let removed = self.remove_abandoned(&old, &record.disks).await;
        info!(vm = %self.name(), %snap, ms = started.elapsed().as_secs_f64() * 1e3, "reverted");
        tracing::debug!(?t_prepared, ?t_stopped, load_ms = restored.load_ms, total = ?started.elapsed(), "revert breakdown");
        Ok(RevertReport {
            snapshot: snap.to_string(),
            disks: prepared.disks.clone(),
            memory_restored: prepared.memory.is_some(),
            resumed: restored.resumed,
            load_ms: restored.load_ms,
            total_ms: started.elapsed().as_secs_f64() * 1e3,
            removed,
            pid: launched.pid,
        })
    }

    async fn relaunch<L: Launcher>(
        &self,
        launcher: &L,
        spec: &LaunchSpec,
        prepared: &PreparedRevert,
        paused: bool,
    ) -> std::result::Result<(Launched, RestoreReport), (Error, Option<u32>)> {
        let launched = launcher.launch(spec).await.map_err(|e| (e, None))?;
        let pid = launched.pid;
        let qmp = self.connect().await.map_err(|e| (e, pid))?;
        let restored = revert::restore(&qmp, prepared, !paused, Duration::from_secs(600))
            .await
            .map_err(|e| (e, pid))?;
        let pid = qmp.peer_pid().or(pid);
        Ok((Launched { pid, ..launched }, restored))
    }

    /// Deletes overlays qsnap made that the VM no longer uses and no snapshot froze.
    async fn remove_abandoned(&self, old: &[CurrentDisk], now: &[CurrentDisk]) -> Vec<PathBuf> {
        let frozen: Vec<PathBuf> = match self.store().manifests(self.name()).await {
            Ok(all) => all
                .iter()
                .flat_map(|m| m.snapshot.disks.iter().map(|d| d.image.clone()))
                .collect(),
            Err(e) => {
                warn!(error = %e, "cannot read manifests; keeping the old overlays");
                return Vec::new();
            }
        };
        let mut removed = Vec::new();
        for d in old {
            let in_use = now.iter().any(|n| n.image == d.image);
            if d.owned && !in_use && !frozen.contains(&d.image) {
                match tokio::fs::remove_file(&d.image).await {
                    Ok(()) => removed.push(d.image.clone()),
                    Err(e) => {
                        warn!(image = %d.image.display(), error = %e, "could not remove an abandoned overlay")
                    }
                }
            }
        }
        removed
    }
}

/// Refuses when the QEMU binary cannot run the snapshot's machine type.
async fn check_machine(binary: &str, machine: &str) -> std::result::Result<(), String> {
    let out = tokio::process::Command::new(binary)
        .args(["-machine", "help"])
        .output()
        .await
        .map_err(|e| format!("cannot run {binary}: {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    if text
        .lines()
        .any(|l| l.split_whitespace().next() == Some(machine))
    {
        Ok(())
    } else {
        Err(format!(
            "{binary} does not offer the machine type {machine} the snapshot was taken with"
        ))
    }
}

/// An image's backing chain, top first (`qemu-img info -U --backing-chain`).
async fn backing_chain(image: &Path) -> Vec<PathBuf> {
    let out = tokio::process::Command::new("qemu-img")
        .args(["info", "-U", "--backing-chain", "--output=json"])
        .arg(image)
        .output()
        .await;
    let Ok(out) = out else {
        return vec![image.to_owned()];
    };
    match serde_json::from_slice::<Vec<serde_json::Value>>(&out.stdout) {
        Ok(list) => list
            .iter()
            .filter_map(|i| i["filename"].as_str().map(PathBuf::from))
            .collect(),
        Err(_) => vec![image.to_owned()],
    }
}
