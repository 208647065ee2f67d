//! Registering a VM: `run` (start a command line and register it) and `attach` (register a
//! QEMU started elsewhere).
//!
//! Nothing is registered that qsnap could not follow: a drive that writes to a throwaway
//! temporary file (`snapshot=on`, `-snapshot`), an image path that is not the file QEMU has
//! open (a relative name QEMU resolved in a directory it has left), an image another VM of the
//! store froze, writes to or stands on, or a QEMU already registered under another name. `run`
//! refuses what the command line shows before QEMU starts, and what only QEMU can tell before
//! the record is written — stopping the QEMU it started. The record is never written first.
//! Attaching another user's QEMU — whose command line qsnap would later run — is refused
//! unless asked for.

use super::refs::{Graph, Use};
use super::{Engine, Vm};
use crate::blocks;
use crate::error::{Error, Result};
use crate::launch::ProcessLauncher;
use crate::launch::{self, argv, LaunchSpec, Launcher};
use crate::name::VmName;
use crate::store::{self, CurrentDisk, LaunchCommand, Origin, VmRecord};
use qsnap_qmp::{Endpoint, Qmp};
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tracing::warn;

/// Options for `run`.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Do not add `tsc-frequency` to an invtsc CPU.
    pub no_tsc_fix: bool,
    /// The working directory for relative paths (default: the current one).
    pub cwd: Option<PathBuf>,
}

/// Options for `attach`.
#[derive(Debug, Clone, Default)]
pub struct AttachOptions {
    /// Accept a QEMU that runs as another user (qsnap records its command line and would run
    /// it again on start and revert: a privilege boundary when qsnap runs as root).
    pub allow_other_user: bool,
}

/// What `run` did.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct RunReport {
    /// The new record.
    pub record: VmRecord,
    /// `tsc-frequency` added for an invtsc CPU, in Hz, and where the figure came from.
    pub tsc_pinned: Option<(u64, String)>,
    /// Where QEMU's own output (stderr, its -D log when none is given) goes.
    pub log: Option<PathBuf>,
}

impl Engine {
    /// Registers a QEMU that something else started: records its monitor socket and, from the
    /// socket's peer credentials, its pid, command line and working directory (what a later
    /// relaunch needs). Refuses a name already in use.
    pub async fn attach(&self, name: &VmName, qmp_socket: &str) -> Result<Vm> {
        self.attach_with(name, qmp_socket, &AttachOptions::default())
            .await
    }

    /// [`Engine::attach`] with options.
    pub async fn attach_with(
        &self,
        name: &VmName,
        qmp_socket: &str,
        opts: &AttachOptions,
    ) -> Result<Vm> {
        self.store.refuse_taken(name).await?;
        let endpoint = normalise_endpoint(qmp_socket).await;
        let qmp = Qmp::connect_with(Endpoint::parse(&endpoint), &self.connect)
            .await
            .map_err(Error::qmp("connecting to the VM's monitor"))?;
        let ours = nix::unistd::geteuid().as_raw();
        if let Some(uid) = qmp.peer_uid() {
            if uid != ours && !opts.allow_other_user {
                return Err(Error::ForeignQemu { uid, ours });
            }
        }
        let pid = qmp.peer_pid();
        if let Some((vm, how)) = self.registered_as(&endpoint, pid).await? {
            return Err(Error::RegisterRefused {
                vm: name.to_string(),
                why: format!(
                    "this QEMU is already registered as \"{vm}\" ({how}); use that name \
                     (one QEMU under two names would have two records, two locks and two \
                     views of one set of disks)"
                ),
            });
        }
        let command = match pid {
            Some(pid) => launch_command(pid).await,
            None => None,
        };
        if let Some(c) = &command {
            refuse_throwaway(name, &c.argv)?;
        }
        let now = blocks::read(&qmp).await?;
        drop(qmp);
        self.vet(name, pid, &now).await?;
        let disks = disks_now(now);

        let _lock = self.store.lock(name, "attach").await?;
        self.store.refuse_taken(name).await?;
        let guest_agent = command
            .as_ref()
            .and_then(|c| argv::guest_agent_socket(&c.argv, &c.cwd));
        let record = VmRecord {
            schema: store::SCHEMA,
            name: name.to_string(),
            qmp: endpoint,
            origin: Origin::Attached,
            pid,
            pid_start: match pid {
                Some(p) => crate::proc::start_time(p).await,
                None => None,
            },
            command,
            current: None,
            disks,
            owned_images: Vec::new(),
            guest_agent,
            registered_at: store::now_rfc3339(),
            clone_of: None,
            standby: None,
        };
        self.store.write_record(&record).await?;
        Ok(self.vm_from(name.clone(), record))
    }

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

    /// [`Engine::run`] with a launcher of your own. A run that registers nothing leaves
    /// nothing in the store (its directory goes; an error quotes QEMU's log, which goes with
    /// it) — except what still matters: a QEMU it could not stop, serving its socket there.
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
        let lock = self.store.lock(name, "run").await?;
        match self.run_registering(name, argv, opts, launcher).await {
            Ok(r) => Ok(r),
            Err(mut e) => {
                // Under the lock: the directory is this run's (no other run of the name is
                // past its lock), unless a VM holds the name.
                let socket = self.store.vm_dir(name).join("qmp.sock");
                let abandoned = !self.store.has_vm(name).await.unwrap_or(true)
                    && !socket_answers(&socket).await;
                if abandoned {
                    // Nothing runs there: a dead socket and the log go with the folder.
                    if let Ok(None) = self.store.remove_vm_dir(name, true).await {
                        // The log is gone with the directory; its last lines are in `e`.
                        if let Error::LaunchFailed { log, .. } = &mut e {
                            *log = PathBuf::new();
                        }
                    }
                }
                drop(lock);
                Err(e)
            }
        }
    }

    /// The run itself, the name's lock held.
    async fn run_registering<L: Launcher>(
        &self,
        name: &VmName,
        argv: Vec<String>,
        opts: &RunOptions,
        launcher: &L,
    ) -> Result<RunReport> {
        self.store.refuse_taken(name).await?;
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
        // What the command line shows is refused before QEMU starts.
        refuse_throwaway(name, &argv)?;
        self.refuse_others_images(name, &argv::written_images(&argv, &cwd))
            .await?;
        let socket = self.store.vm_dir(name).join("qmp.sock");
        check_socket_path(&socket)?;
        let command = LaunchCommand { argv, cwd };
        let spec = LaunchSpec {
            vm: name.to_string(),
            command: command.clone(),
            disks: Vec::new(),
            qmp_socket: socket.clone(),
            incoming: false,
            paused: false,
            machine: None,
            log: self.store.vm_dir(name).join("qemu.log"),
            ram: None,
        };
        // A QEMU left by a `run` that was interrupted between its launch and its record (qsnap
        // killed) still serves this socket: a second QEMU would unlink it and take it over,
        // leaving the first running unseen.
        if socket_answers(&socket).await {
            // Its log stays: it is that QEMU's.
            return Err(Error::RegisterRefused {
                vm: name.to_string(),
                why: format!(
                    "a process already serves its monitor socket {} (a QEMU left by an interrupted \
                     `qsnap run`?); register it with `qsnap attach {name} --qmp {}`, or stop it first",
                    socket.display(),
                    socket.display()
                ),
            });
        }
        // A log an earlier failed attempt left is not this run's: an error quotes this one's.
        let old_log = spec.log.clone();
        store::blocking(move || store::remove_durably(&old_log)).await?;
        let launched = launcher.launch(&spec).await?;
        let mut record = VmRecord {
            schema: store::SCHEMA,
            name: name.to_string(),
            qmp: socket.display().to_string(),
            origin: Origin::Run,
            pid: launched.pid,
            pid_start: None,
            guest_agent: argv::guest_agent_socket(&command.argv, &command.cwd),
            command: Some(command),
            current: None,
            disks: Vec::new(),
            owned_images: Vec::new(),
            registered_at: store::now_rfc3339(),
            clone_of: None,
            standby: None,
        };
        let handle = self.vm_from(name.clone(), record.clone());
        let mut pid = record.pid;
        let registered = async {
            crate::failpoint::hit("run.launched", pid).await?;
            let qmp = handle.connect().await?;
            let now = blocks::read(&qmp).await?;
            pid = qmp.peer_pid().or(pid);
            drop(qmp);
            // What only QEMU can tell (a relative path a daemonized QEMU left behind, an image
            // reached through a name the command line does not show) is refused before the
            // record exists.
            self.vet(name, pid, &now).await?;
            record.disks = disks_now(now);
            super::state::record_qemu(&mut record, pid).await;
            self.store.write_record(&record).await
        }
        .await;
        if let Err(e) = registered {
            // Nothing records this QEMU: it must not outlive the refusal.
            if let Err(stop) = crate::launch::quit_or_kill(
                &socket.display().to_string(),
                pid,
                crate::launch::QUIT_TIMEOUT,
            )
            .await
            {
                warn!(error = %stop, "could not stop the QEMU started for a refused run");
            }
            return Err(e);
        }
        Ok(RunReport {
            record,
            tsc_pinned,
            log: Some(spec.log.clone()),
        })
    }

    /// What a QEMU must pass before it is registered: every image of its disks is the file
    /// QEMU has open, and no image it writes to belongs to another VM of the store.
    async fn vet(&self, name: &VmName, pid: Option<u32>, disks: &[blocks::Disk]) -> Result<()> {
        if let Err(e) = crate::snapshot::disks::check_open(pid, disks).await? {
            return Err(Error::RegisterRefused {
                vm: name.to_string(),
                why: format!("disk {}: {}", e.device, e.why),
            });
        }
        let written: Vec<PathBuf> = disks
            .iter()
            .filter_map(|d| d.medium.as_ref())
            .filter(|m| !m.read_only)
            .map(|m| m.top().to_owned())
            .collect();
        self.refuse_others_images(name, &written).await
    }

    /// Refuses images that another VM of the store froze in a snapshot, writes to, or has in
    /// a disk chain (the reference graph every delete consults): the new guest's writes would
    /// silently corrupt that VM's snapshot or disk. Compared by path and by device and inode,
    /// so another name for the same file is caught too.
    async fn refuse_others_images(&self, name: &VmName, images: &[PathBuf]) -> Result<()> {
        let refuse = |why: String| Error::RegisterRefused {
            vm: name.to_string(),
            why,
        };
        if images.is_empty() || self.store.vms().await?.iter().all(|v| v == name) {
            return Ok(());
        }
        let blank = VmRecord::blank(name.as_str());
        // From a VM with no images, every image of every other VM is someone else's.
        let graph = Graph::gather(&self.store, name, &blank, &[], None, &self.cancel)
            .await
            .map_err(|e| {
                refuse(format!(
                    "qsnap cannot tell whether another VM of the store uses its images ({e})"
                ))
            })?;
        let known: Vec<(PathBuf, String)> = graph
            .uses
            .iter()
            .filter_map(|(img, uses)| {
                uses.iter().find_map(|u| match u {
                    Use::OtherVm { vm } => Some((img.clone(), vm.clone())),
                    _ => None,
                })
            })
            .collect();
        let wanted = images.to_vec();
        let hit = store::blocking(move || {
            let id = |p: &Path| {
                use std::os::unix::fs::MetadataExt;
                std::fs::metadata(p).ok().map(|m| (m.dev(), m.ino()))
            };
            for img in &wanted {
                let mine = id(img);
                for (theirs, vm) in &known {
                    if theirs == img || (mine.is_some() && id(theirs) == mine) {
                        return Ok(Some((img.clone(), theirs.clone(), vm.clone())));
                    }
                }
            }
            Ok(None)
        })
        .await?;
        let Some((img, theirs, other)) = hit else {
            return Ok(());
        };
        let how = self.how_used(&other, &theirs).await;
        Err(refuse(format!(
            "its disk image {} is {how}: this guest's writes would corrupt it. Give it an image \
             of its own (`qsnap clone {other} SNAPSHOT NEW` starts a VM from a snapshot)",
            img.display()
        )))
    }

    /// How VM `vm` uses `image`, in words: the most binding of its uses.
    async fn how_used(&self, vm: &str, image: &Path) -> String {
        let chain =
            format!("in a disk chain of VM {vm} (an image its disks or snapshots stand on)");
        let Some(other) = VmName::parse(vm) else {
            return chain;
        };
        let graph = async {
            let rec = self.store.record(&other).await?;
            let manifests = self.store.manifests(&other).await?;
            Graph::gather(&self.store, &other, &rec, &manifests, None, &self.cancel).await
        }
        .await;
        let Ok(graph) = graph else { return chain };
        let uses = graph.uses_of(image);
        let frozen = uses.iter().find_map(|u| match u {
            Use::Frozen {
                snapshot, device, ..
            } => Some(format!(
                "frozen by snapshot {snapshot} of VM {vm} (its disk {device})"
            )),
            _ => None,
        });
        let current = uses.iter().find_map(|u| match u {
            Use::Current { device, .. } => {
                Some(format!("the image VM {vm} writes to (its disk {device})"))
            }
            _ => None,
        });
        frozen.or(current).unwrap_or(chain)
    }

    /// The VM already registered for the QEMU behind `endpoint` (process `pid`): the same
    /// monitor socket (by path, or the same socket file under another name), or the same live
    /// process (pid and start time). Says which.
    async fn registered_as(
        &self,
        endpoint: &str,
        pid: Option<u32>,
    ) -> Result<Option<(VmName, String)>> {
        let start = match pid {
            Some(p) => crate::proc::start_time(p).await,
            None => None,
        };
        for vm in self.store.vms().await? {
            let rec = self.store.record(&vm).await?;
            let (a, b) = (rec.qmp.clone(), endpoint.to_owned());
            let same_socket = store::blocking(move || Ok(same_endpoint(&a, &b))).await?;
            if same_socket {
                return Ok(Some((vm, format!("the same monitor socket, {}", rec.qmp))));
            }
            if let (Some(p), Some(theirs)) = (pid, rec.pid) {
                let same_start = rec.pid_start.is_none() || rec.pid_start == start;
                if p == theirs
                    && same_start
                    && crate::proc::is_recorded_qemu(p, rec.pid_start).await
                {
                    return Ok(Some((vm, format!("the same QEMU process, pid {p}"))));
                }
            }
        }
        Ok(None)
    }
}

/// Whether two monitor addresses reach the same socket: equal, or unix paths naming the same
/// socket file.
fn same_endpoint(a: &str, b: &str) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (Endpoint::parse(a), Endpoint::parse(b)) {
        (Endpoint::Unix(x), Endpoint::Unix(y)) => {
            x == y
                || matches!(
                    (std::fs::metadata(&x), std::fs::metadata(&y)),
                    (Ok(m), Ok(n)) if (m.dev(), m.ino()) == (n.dev(), n.ino())
                )
        }
        (x, y) => x == y,
    }
}

/// Refuses drives whose writes go to a temporary file QEMU deletes (`snapshot=on`,
/// `-snapshot`), naming them.
fn refuse_throwaway(name: &VmName, argv: &[String]) -> Result<()> {
    let found = argv::throwaway_drives(argv);
    if found.is_empty() {
        return Ok(());
    }
    Err(Error::RegisterRefused {
        vm: name.to_string(),
        why: format!(
            "{} makes QEMU write the guest's disk to a temporary file it deletes at once (in \
             $TMPDIR or /var/tmp): the writes never reach the image and are lost when QEMU \
             exits, and a snapshot of them could never be reverted or restarted. Remove \
             snapshot=on / -snapshot; qsnap's snapshots are the way back",
            found.join(" and ")
        ),
    })
}

/// Whether something accepts connections on the unix socket at `path` (a QEMU serving it, busy
/// with another client or not).
async fn socket_answers(path: &Path) -> bool {
    matches!(
        tokio::time::timeout(
            Duration::from_secs(2),
            tokio::net::UnixStream::connect(path)
        )
        .await,
        Ok(Ok(_))
    )
}

/// A unix socket path is stored absolute, so the record works from any directory.
async fn normalise_endpoint(s: &str) -> String {
    match Endpoint::parse(s) {
        Endpoint::Unix(p) if p.is_relative() => tokio::fs::canonicalize(&p)
            .await
            .map(|abs| abs.display().to_string())
            .unwrap_or_else(|_| s.to_owned()),
        _ => s.to_owned(),
    }
}

/// QEMU's command line and working directory from `/proc`, if readable.
async fn launch_command(pid: u32) -> Option<LaunchCommand> {
    let raw = tokio::fs::read(format!("/proc/{pid}/cmdline")).await.ok()?;
    let argv: Vec<String> = raw
        .split(|&b| b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    let cwd = tokio::fs::read_link(format!("/proc/{pid}/cwd"))
        .await
        .ok()?;
    (!argv.is_empty()).then_some(LaunchCommand { argv, cwd })
}

/// Each disk with a medium and its current top image, as QEMU reports it; at registration
/// the top is also what the command line names.
fn disks_now(disks: Vec<blocks::Disk>) -> Vec<CurrentDisk> {
    disks
        .into_iter()
        .filter_map(|d| {
            let top = d.top()?.to_owned();
            Some(CurrentDisk {
                device: d.device,
                launch_image: top.clone(),
                image: top,
                owned: false,
            })
        })
        .collect()
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
