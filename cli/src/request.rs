//! The command line turned into what the engine is asked, in one place and before anything
//! else happens (after hyperfine's `Options::from_cli_arguments`): one function per
//! subcommand takes its clap arguments (`args.rs`) to a typed request — validated names
//! ([`VmName`], [`SnapshotName`]; a bad one is a usage error, exit 2), the engine's option
//! structs, paths made absolute against qsnap's working directory, JSON arguments parsed.
//!
//! This module must never do I/O beyond reading the working directory and the clock: it reads
//! no store, connects to nothing, calls no engine operation, and prints nothing. The one step
//! that needs a VM, [`CreateRequest::options`], only combines the request with the engine's
//! defaults for that VM and the record already read.

use crate::args::{
    AttachArgs, CheckArgs, Cli, CloneArgs, Command, CreateArgs, DeleteArgs, ForgetArgs, InfoArgs,
    LazyRamArgs, ListArgs, ModeArg, PoolArgs, QmpArgs, RemoveArgs, RenameArgs, RevertArgs, RunArgs,
    ShowArgs, ShutdownArgs, StartArgs, StatusArgs, StopArgs,
};
use anyhow::Context;
use qsnap_engine::snapshot::Mode;
use qsnap_engine::{
    AttachOptions, CloneOptions, ForgetOptions, Replacement, RevertOptions, RunOptions,
    SnapshotName, Store, Vm, VmCreateOptions, VmName,
};
use qsnap_remote::RemoteName;
use serde_json::Value;

mod transfer;
use std::path::PathBuf;
use std::time::Duration;
use transfer::{export, import, keygen, pull, push, remote};
pub use transfer::{ExportRequest, ImportRequest, PullRequest, PushRequest, Stream};

/// A usage error found after parsing (a bad name, arguments that are not JSON): exit 2.
#[derive(Debug, schemars::JsonSchema)]
pub struct Usage(pub String);

impl std::fmt::Display for Usage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Usage {}

/// Everything one `qsnap` invocation asks for.
#[derive(Debug)]
pub struct Request {
    /// The store's root, absolute: paths in the store are kept absolute, so the same store
    /// works from any directory.
    pub store: PathBuf,
    /// How long each QMP command may take.
    pub timeout: Duration,
    /// How long to wait for a VM another operation holds (`--wait`).
    pub lock_wait: Duration,
    /// The subcommand.
    pub action: Action,
}

/// One subcommand, ready for its engine call.
#[derive(Debug)]
pub enum Action {
    /// `attach`.
    Attach(AttachRequest),
    /// `create`.
    Create(CreateRequest),
    /// `lazy-ram`.
    LazyRam(SnapshotRequest),
    /// `clone`.
    Clone(CloneRequest),
    /// `pool`: keep standbys of a snapshot ready.
    Pool(PoolRequest),
    /// `export`.
    Export(ExportRequest),
    /// `import`.
    Import(ImportRequest),
    /// `push`.
    Push(PushRequest),
    /// `pull`.
    Pull(PullRequest),
    /// `remote list`.
    RemoteList {
        /// The store's URL.
        url: String,
        /// Print JSON.
        json: bool,
    },
    /// `remote rm`.
    RemoteRm {
        /// The store's URL.
        url: String,
        /// The snapshot there.
        name: RemoteName,
    },
    /// `remote gc`.
    RemoteGc {
        /// The store's URL.
        url: String,
        /// Unused chunks younger than this stay.
        grace: Duration,
        /// Print JSON.
        json: bool,
    },
    /// `keygen`: the keys' path prefix (absolute).
    Keygen(PathBuf),
    /// `remove`.
    Remove(VmRequest),
    /// `run`.
    Run(RunRequest),
    /// `stop`.
    Stop(VmName),
    /// `shutdown`.
    Shutdown {
        /// The VM.
        vm: VmName,
        /// How long the guest has to power off.
        grace: Duration,
        /// Print JSON.
        json: bool,
    },
    /// `forget`.
    Forget {
        /// The VM.
        vm: VmName,
        /// What forget may do besides.
        opts: ForgetOptions,
        /// Print JSON.
        json: bool,
    },
    /// `rename`.
    Rename {
        /// The VM.
        vm: VmName,
        /// The snapshot's name now.
        old: SnapshotName,
        /// Its new name.
        new: SnapshotName,
    },
    /// `pause`.
    Pause(VmName),
    /// `resume`.
    Resume(VmName),
    /// `start`.
    Start(VmName),
    /// `status`.
    Status(VmRequest),
    /// `revert`.
    Revert(RevertRequest),
    /// `delete`.
    Delete(DeleteRequest),
    /// `check`.
    Check(CheckRequest),
    /// `list`.
    List(VmRequest),
    /// `list` without a name: every VM.
    ListAll {
        /// Print JSON.
        json: bool,
    },
    /// `status` without a name: every VM.
    StatusAll {
        /// Print JSON.
        json: bool,
    },
    /// `show`.
    Show(SnapshotRequest),
    /// `qmp`.
    Qmp(QmpRequest),
    /// `info`.
    Info(InfoRequest),
    /// `man`: the directory the pages go to (absolute).
    Man(PathBuf),
    /// `json-schema`: the directory the schemas go to (absolute).
    JsonSchema(PathBuf),
    /// `completions`: the shell.
    Completions(String),
}

/// A subcommand on one VM.
#[derive(Debug)]
pub struct VmRequest {
    /// The VM.
    pub vm: VmName,
    /// Print JSON.
    pub json: bool,
}

/// A subcommand on one snapshot of a VM.
#[derive(Debug)]
pub struct SnapshotRequest {
    /// The VM.
    pub vm: VmName,
    /// The snapshot.
    pub snapshot: SnapshotName,
    /// Print JSON.
    pub json: bool,
}

/// `attach`: register a running QEMU.
#[derive(Debug)]
pub struct AttachRequest {
    /// The name it is registered under.
    pub vm: VmName,
    /// Its monitor socket, as given.
    pub qmp: String,
    /// The engine's options.
    pub opts: AttachOptions,
    /// Print the record as JSON.
    pub json: bool,
}

/// `create`: what the snapshot is to be. The engine's options need the VM (its memory
/// directory, disks and cancel token): [`CreateRequest::options`].
#[derive(Debug)]
pub struct CreateRequest {
    /// The VM.
    pub vm: VmName,
    /// The new snapshot's name.
    pub snapshot: SnapshotName,
    /// The name was made up (none given): the engine picks a free variant if it is taken.
    pub generated: bool,
    /// What it is for.
    pub description: Option<String>,
    /// `None`: the best mode this QEMU and host support.
    pub mode: Option<Mode>,
    /// Where overlays go, absolute (resolved against qsnap's working directory).
    pub overlay_dir: Option<PathBuf>,
    /// Precopy's live phase.
    pub live_limit: Duration,
    /// The memory save's limit.
    pub save_timeout: Duration,
    /// Precopy in `mapped-ram` format where QEMU has it.
    pub mapped_ram: bool,
    /// Freeze the guest's filesystems through its guest agent (disk-only).
    pub quiesce: bool,
    /// Make its memory lazy once taken.
    pub lazy_ram: bool,
    /// Print the manifest as JSON.
    pub json: bool,
}

impl CreateRequest {
    /// The engine's options for a snapshot of `vm` (its defaults, then what was asked; no
    /// progress callback yet). Fails when `--quiesce` was asked of a VM whose record names no
    /// guest agent.
    pub fn options(&self, vm: &Vm) -> anyhow::Result<VmCreateOptions> {
        let mut create = vm.create_options(self.snapshot.clone());
        create.mode = self.mode;
        create.overlay_dir.clone_from(&self.overlay_dir);
        if self.quiesce {
            create.quiesce = Some(vm.record().guest_agent.clone().ok_or_else(|| {
                anyhow::anyhow!(
                    "{} has no guest agent in its command line (a virtserialport named \
                     org.qemu.guest_agent.0 on a -chardev socket,path=…); cannot --quiesce",
                    self.vm
                )
            })?);
        }
        create.live_limit = self.live_limit;
        create.mapped_ram = self.mapped_ram;
        create.save_timeout = self.save_timeout;
        create.description.clone_from(&self.description);
        create.unique_name = self.generated;
        Ok(VmCreateOptions {
            create,
            lazy_ram: self.lazy_ram,
        })
    }
}

/// `clone`: a new VM from a snapshot.
#[derive(Debug)]
pub struct CloneRequest {
    /// The source VM.
    pub vm: VmName,
    /// The snapshot to start from.
    pub snapshot: SnapshotName,
    /// The new VM.
    pub new: VmName,
    /// The engine's options (`--replace` as typed: the engine splits it against the source's
    /// recorded command line).
    pub opts: CloneOptions,
    /// Print the report as JSON.
    pub json: bool,
}

/// `pool`: standbys of a snapshot.
#[derive(Debug)]
pub struct PoolRequest {
    /// The source VM.
    pub vm: VmName,
    /// The snapshot.
    pub snapshot: SnapshotName,
    /// The size to set; `None`: refill to the recorded size.
    pub size: Option<usize>,
    /// Print JSON.
    pub json: bool,
}

/// `run`: start QEMU under qsnap.
#[derive(Debug)]
pub struct RunRequest {
    /// The name it is registered under.
    pub vm: VmName,
    /// The QEMU command line.
    pub qemu: Vec<String>,
    /// The engine's options.
    pub opts: RunOptions,
    /// Print the record as JSON.
    pub json: bool,
}

/// `revert`: back to a snapshot.
#[derive(Debug)]
pub struct RevertRequest {
    /// The VM.
    pub vm: VmName,
    /// The snapshot; `None`: the newest (`--latest`).
    pub snapshot: Option<SnapshotName>,
    /// The engine's options (`--keep-current` named: given, or `before-revert-<UTC time>`).
    pub opts: RevertOptions,
    /// Print JSON.
    pub json: bool,
}

/// `delete`: one snapshot or all of them.
#[derive(Debug)]
pub struct DeleteRequest {
    /// The VM.
    pub vm: VmName,
    /// The snapshots; none: all of them (`--all`).
    pub snapshots: Vec<SnapshotName>,
    /// And their descendants.
    pub children: bool,
    /// Print JSON (no progress bar).
    pub json: bool,
}

/// `check`: verify, perhaps repair.
#[derive(Debug)]
pub struct CheckRequest {
    /// The VM.
    pub vm: VmName,
    /// Repair what can be.
    pub repair: bool,
    /// Read everything, trusting no earlier check.
    pub full: bool,
    /// Print JSON.
    pub json: bool,
}

/// `qmp`: one raw command.
#[derive(Debug)]
pub struct QmpRequest {
    /// The monitor socket, as given.
    pub socket: String,
    /// The command's name.
    pub command: String,
    /// Its arguments: a JSON object.
    pub arguments: Option<Value>,
}

/// `info`: what a running VM is.
#[derive(Debug)]
pub struct InfoRequest {
    /// The monitor socket, as given.
    pub socket: String,
    /// Print JSON.
    pub json: bool,
}

impl Request {
    /// The request `cli` makes. Errors are usage errors (bad names, bad JSON), or the working
    /// directory being unreadable when a relative path needs it.
    pub fn from_cli(cli: Cli) -> anyhow::Result<Request> {
        let action = match cli.command {
            Command::Attach(a) => attach(a)?,
            Command::Create(a) => create(a)?,
            Command::LazyRam(a) => lazy_ram(a)?,
            Command::Clone(a) => clone(a)?,
            Command::Pool(a) => pool(a)?,
            Command::Export(a) => export(a)?,
            Command::Import(a) => import(a)?,
            Command::Keygen(a) => keygen(a)?,
            Command::Push(a) => push(a)?,
            Command::Pull(a) => pull(a)?,
            Command::Remote(c) => remote(c)?,
            Command::Remove(a) => remove(a)?,
            Command::Run(a) => run(a)?,
            Command::Stop(a) => stop(a)?,
            Command::Shutdown(a) => shutdown(a)?,
            Command::Forget(a) => forget(a)?,
            Command::Rename(a) => rename(a)?,
            Command::Pause(a) => Action::Pause(vm_name(&a.name)?),
            Command::Resume(a) => Action::Resume(vm_name(&a.name)?),
            Command::Start(a) => start(a)?,
            Command::Status(a) => status(a)?,
            Command::Revert(a) => revert(a)?,
            Command::Delete(a) => delete(a)?,
            Command::Check(a) => check(a)?,
            Command::List(a) => list(a)?,
            Command::Show(a) => show(a)?,
            Command::Qmp(a) => qmp(a)?,
            Command::Info(a) => info(a),
            Command::Man { dir } => Action::Man(absolute(dir)?),
            Command::JsonSchema { dir } => Action::JsonSchema(absolute(dir)?),
            Command::Completions { shell } => Action::Completions(shell.name().to_owned()),
        };
        let store = cli.store.unwrap_or_else(Store::default_root);
        Ok(Request {
            store: absolute(store)?,
            timeout: Duration::from_secs(cli.timeout),
            lock_wait: Duration::from_secs(cli.wait.unwrap_or(0)),
            action,
        })
    }
}

/// A VM name from the command line; a bad one is a usage error.
fn vm_name(s: &str) -> anyhow::Result<VmName> {
    VmName::new(s).map_err(|e| Usage(e.to_string()).into())
}

/// A snapshot name from the command line; a bad one is a usage error.
fn snap_name(s: &str) -> anyhow::Result<SnapshotName> {
    SnapshotName::new(s).map_err(|e| Usage(e.to_string()).into())
}

/// `path` against qsnap's own working directory, as the user meant it (QEMU would resolve a
/// relative one against its own).
fn absolute(path: PathBuf) -> anyhow::Result<PathBuf> {
    if path.is_absolute() {
        return Ok(path);
    }
    Ok(std::env::current_dir()
        .context("reading the working directory")?
        .join(path))
}

fn attach(a: AttachArgs) -> anyhow::Result<Action> {
    Ok(Action::Attach(AttachRequest {
        vm: vm_name(&a.name)?,
        qmp: a.qmp,
        opts: AttachOptions {
            allow_other_user: a.allow_other_user,
        },
        json: a.json,
    }))
}

fn create(a: CreateArgs) -> anyhow::Result<Action> {
    let vm = vm_name(&a.name)?;
    let (snapshot, generated) = match &a.snapshot {
        Some(s) => (snap_name(s)?, false),
        None => (snap_name(&format!("snap-{}", humantime_stamp()))?, true),
    };
    if let Some(d) = &a.description {
        qsnap_engine::check_description(d).map_err(|e| Usage(e.to_string()))?;
    }
    let mode = match (a.disk_only, a.mode) {
        (true, _) => Some(Mode::DiskOnly),
        (false, ModeArg::Auto) => None,
        (false, ModeArg::PointInTime) => Some(Mode::PointInTime),
        (false, ModeArg::Precopy) => Some(Mode::Precopy),
    };
    // Resolved here, against qsnap's own directory, as the user meant it (QEMU would resolve
    // a relative one against its own); the store records plain absolute paths.
    let overlay_dir = match a.overlay_dir {
        Some(d) => Some(qsnap_engine::store::plain_path(&absolute(d)?)),
        None => None,
    };
    Ok(Action::Create(CreateRequest {
        vm,
        snapshot,
        generated,
        description: a.description,
        mode,
        overlay_dir,
        live_limit: Duration::from_secs(a.live_limit),
        save_timeout: Duration::from_secs(a.save_timeout),
        mapped_ram: !a.no_mapped_ram,
        quiesce: a.quiesce,
        lazy_ram: a.lazy_ram,
        json: a.json,
    }))
}

fn lazy_ram(a: LazyRamArgs) -> anyhow::Result<Action> {
    Ok(Action::LazyRam(SnapshotRequest {
        vm: vm_name(&a.name)?,
        snapshot: snap_name(&a.snapshot)?,
        json: a.json,
    }))
}

fn clone(a: CloneArgs) -> anyhow::Result<Action> {
    Ok(Action::Clone(CloneRequest {
        vm: vm_name(&a.name)?,
        snapshot: snap_name(&a.snapshot)?,
        new: vm_name(&a.new)?,
        opts: CloneOptions {
            paused: a.paused,
            replace: a.replace.into_iter().map(Replacement::Text).collect(),
            cold: a.cold,
        },
        json: a.json,
    }))
}

fn pool(a: PoolArgs) -> anyhow::Result<Action> {
    Ok(Action::Pool(PoolRequest {
        vm: vm_name(&a.name)?,
        snapshot: snap_name(&a.snapshot)?,
        size: if a.refill { None } else { a.size },
        json: a.json,
    }))
}

fn remove(a: RemoveArgs) -> anyhow::Result<Action> {
    Ok(Action::Remove(VmRequest {
        vm: vm_name(&a.name)?,
        json: a.json,
    }))
}

fn run(a: RunArgs) -> anyhow::Result<Action> {
    Ok(Action::Run(RunRequest {
        vm: vm_name(&a.name)?,
        qemu: a.qemu,
        opts: RunOptions {
            no_tsc_fix: a.no_tsc_fix,
            cwd: None,
        },
        json: a.json,
    }))
}

fn stop(a: StopArgs) -> anyhow::Result<Action> {
    Ok(Action::Stop(vm_name(&a.name)?))
}

fn shutdown(a: ShutdownArgs) -> anyhow::Result<Action> {
    Ok(Action::Shutdown {
        vm: vm_name(&a.name)?,
        grace: Duration::from_secs(a.grace),
        json: a.json,
    })
}

fn forget(a: ForgetArgs) -> anyhow::Result<Action> {
    Ok(Action::Forget {
        vm: vm_name(&a.name)?,
        opts: ForgetOptions {
            stop: a.stop,
            with_snapshots: a.with_snapshots,
        },
        json: a.json,
    })
}

fn rename(a: RenameArgs) -> anyhow::Result<Action> {
    Ok(Action::Rename {
        vm: vm_name(&a.name)?,
        old: snap_name(&a.old)?,
        new: snap_name(&a.new)?,
    })
}

fn start(a: StartArgs) -> anyhow::Result<Action> {
    Ok(Action::Start(vm_name(&a.name)?))
}

fn status(a: StatusArgs) -> anyhow::Result<Action> {
    Ok(match &a.name {
        None => Action::StatusAll { json: a.json },
        Some(n) => Action::Status(VmRequest {
            vm: vm_name(n)?,
            json: a.json,
        }),
    })
}

fn revert(a: RevertArgs) -> anyhow::Result<Action> {
    let vm = vm_name(&a.name)?;
    let keep_current = match a.keep_current.as_deref() {
        None => None,
        Some("") => Some(snap_name(&format!("before-revert-{}", humantime_stamp()))?),
        Some(n) => Some(snap_name(n)?),
    };
    let keep_current_unique = a.keep_current.as_deref() == Some("");
    Ok(Action::Revert(RevertRequest {
        vm,
        snapshot: a.snapshot.as_deref().map(snap_name).transpose()?,
        opts: RevertOptions {
            paused: a.paused,
            keep_current,
            keep_current_unique,
        },
        json: a.json,
    }))
}

/// `20261130T051016Z`: a snapshot name part that sorts by time.
fn humantime_stamp() -> String {
    humantime::format_rfc3339_seconds(std::time::SystemTime::now())
        .to_string()
        .replace(['-', ':'], "")
}

fn delete(a: DeleteArgs) -> anyhow::Result<Action> {
    let vm = vm_name(&a.name)?;
    // clap allows exactly one of SNAPSHOT… and --all.
    let snapshots = a
        .snapshots
        .iter()
        .map(|s| snap_name(s))
        .collect::<anyhow::Result<Vec<_>>>()?;
    Ok(Action::Delete(DeleteRequest {
        vm,
        snapshots,
        children: a.children,
        json: a.json,
    }))
}

fn check(a: CheckArgs) -> anyhow::Result<Action> {
    Ok(Action::Check(CheckRequest {
        vm: vm_name(&a.name)?,
        repair: a.repair,
        full: a.full,
        json: a.json,
    }))
}

fn list(a: ListArgs) -> anyhow::Result<Action> {
    Ok(match &a.name {
        None => Action::ListAll { json: a.json },
        Some(n) => Action::List(VmRequest {
            vm: vm_name(n)?,
            json: a.json,
        }),
    })
}

fn show(a: ShowArgs) -> anyhow::Result<Action> {
    Ok(Action::Show(SnapshotRequest {
        vm: vm_name(&a.name)?,
        snapshot: snap_name(&a.snapshot)?,
        json: a.json,
    }))
}

fn qmp(a: QmpArgs) -> anyhow::Result<Action> {
    let arguments = match a.arguments {
        None => None,
        Some(text) => Some(json_object(&text)?),
    };
    Ok(Action::Qmp(QmpRequest {
        socket: a.socket,
        command: a.command,
        arguments,
    }))
}

/// `text` as a JSON object; anything else is a usage error.
fn json_object(text: &str) -> anyhow::Result<Value> {
    match serde_json::from_str(text) {
        Ok(v @ Value::Object(_)) => Ok(v),
        Ok(_) => Err(Usage(
            "arguments must be a JSON object, e.g. '{\"device\":\"drive0\"}'".into(),
        )
        .into()),
        Err(e) => Err(Usage(format!("arguments are not valid JSON: {e}")).into()),
    }
}

fn info(a: InfoArgs) -> Action {
    Action::Info(InfoRequest {
        socket: a.socket,
        json: a.json,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn request(args: &[&str]) -> anyhow::Result<Request> {
        let cli = Cli::try_parse_from(std::iter::once("qsnap").chain(args.iter().copied()))?;
        Request::from_cli(cli)
    }

    fn is_usage(r: anyhow::Result<Request>) -> bool {
        r.is_err_and(|e| e.downcast_ref::<Usage>().is_some())
    }

    #[test]
    fn names_are_checked_before_anything_runs() {
        assert!(is_usage(request(&["create", "vm1", "a/b"])));
        assert!(is_usage(request(&["create", "../vm", "s"])));
        assert!(is_usage(request(&["clone", "vm1", "s", "../c"])));
        assert!(is_usage(request(&[
            "revert",
            "vm1",
            "s",
            "--keep-current",
            ".."
        ])));
        assert!(is_usage(request(&["delete", "vm1", "../x"])));
        assert!(request(&["delete", "vm1", "--all"]).is_ok());
    }

    #[test]
    fn paths_are_made_absolute_where_qsnap_runs() {
        let cwd = std::env::current_dir().unwrap();
        let r = request(&[
            "--store",
            "st",
            "create",
            "vm1",
            "s",
            "--overlay-dir",
            "a/../ovl",
        ])
        .unwrap();
        assert_eq!(r.store, cwd.join("st"));
        let Action::Create(c) = r.action else {
            panic!("{:?}", r.action)
        };
        assert_eq!(c.overlay_dir, Some(cwd.join("ovl")));
        assert_eq!(c.mode, None);
        assert!(c.mapped_ram);
    }

    #[test]
    fn qmp_arguments_must_be_a_json_object() {
        assert!(is_usage(request(&["qmp", "s", "stop", "{not json"])));
        assert!(is_usage(request(&["qmp", "s", "stop", "[1]"])));
        let r = request(&["qmp", "s", "stop", "{\"a\":1}"]).unwrap();
        assert!(matches!(
            r.action,
            Action::Qmp(QmpRequest {
                arguments: Some(_),
                ..
            })
        ));
    }

    #[test]
    fn keep_current_without_a_name_is_stamped() {
        let r = request(&["revert", "vm1", "s", "--keep-current"]).unwrap();
        let Action::Revert(rv) = r.action else {
            panic!("{:?}", r.action)
        };
        let name = rv.opts.keep_current.unwrap();
        assert!(name.as_str().starts_with("before-revert-"), "{name}");
    }
}
