//! The requests of the commands that move snapshots between hosts: `export`, `import`,
//! `keygen`, `push`, `pull`, `remote …`. Like the rest of `request`: names validated, paths made
//! absolute, the engine's and the remote crate's option structs built — no I/O.

use super::{absolute, snap_name, vm_name, Action, Usage};
use crate::args::{
    ExportArgs, ImportArgs, ImportFlags, KeygenArgs, PullArgs, PushArgs, RemoteCommand,
};
use qsnap_engine::{ExportOptions, ImportOptions, Replacement, SnapshotName, VmName};
use qsnap_remote::{PullOptions, PushOptions, RemoteName};
use std::path::PathBuf;

/// Where a bundle goes or comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stream {
    /// Standard output or input (`-`).
    Std,
    /// A file (absolute).
    File(PathBuf),
}

/// `export`: a snapshot as a bundle.
#[derive(Debug)]
pub struct ExportRequest {
    /// The VM.
    pub vm: VmName,
    /// The snapshot.
    pub snapshot: SnapshotName,
    /// Where the bundle goes.
    pub to: Stream,
    /// The engine's options.
    pub opts: ExportOptions,
    /// Print the report as JSON.
    pub json: bool,
}

/// `import`: a VM from a bundle.
#[derive(Debug)]
pub struct ImportRequest {
    /// Where the bundle comes from.
    pub from: Stream,
    /// The VM.
    pub vm: VmName,
    /// The engine's options.
    pub opts: ImportOptions,
    /// Print the report as JSON.
    pub json: bool,
}

/// `push`.
#[derive(Debug)]
pub struct PushRequest {
    /// The VM.
    pub vm: VmName,
    /// The snapshot.
    pub snapshot: SnapshotName,
    /// The store's URL.
    pub url: String,
    /// How.
    pub opts: PushOptions,
    /// Print JSON.
    pub json: bool,
}

/// `pull`.
#[derive(Debug)]
pub struct PullRequest {
    /// The store's URL.
    pub url: String,
    /// The snapshot there.
    pub name: RemoteName,
    /// The VM to make.
    pub vm: VmName,
    /// How.
    pub opts: PullOptions,
    /// Print JSON.
    pub json: bool,
}

pub(super) fn stream(p: PathBuf) -> anyhow::Result<Stream> {
    Ok(if p.as_os_str() == "-" {
        Stream::Std
    } else {
        Stream::File(absolute(p)?)
    })
}

pub(super) fn export(a: ExportArgs) -> anyhow::Result<Action> {
    Ok(Action::Export(ExportRequest {
        vm: vm_name(&a.name)?,
        snapshot: snap_name(&a.snapshot)?,
        to: stream(a.file)?,
        opts: ExportOptions {
            base: a.base.as_deref().map(snap_name).transpose()?,
            level: a.level,
            threads: a.threads,
            sign: a.sign.map(absolute).transpose()?,
            progress: None,
        },
        json: a.json,
    }))
}

pub(super) fn import(a: ImportArgs) -> anyhow::Result<Action> {
    Ok(Action::Import(ImportRequest {
        from: stream(a.file)?,
        vm: vm_name(&a.name)?,
        opts: import_options(a.import)?,
        json: a.json,
    }))
}

/// The import's options, from `import`'s and `pull`'s flags.
fn import_options(f: ImportFlags) -> anyhow::Result<ImportOptions> {
    Ok(ImportOptions {
        disk_dir: f.disk_dir.map(absolute).transpose()?,
        replace: f.replace.into_iter().map(Replacement::Text).collect(),
        trust_command_line: f.trust_command_line,
        trust: f
            .trust
            .into_iter()
            .map(absolute)
            .collect::<anyhow::Result<_>>()?,
        qemu: f.qemu,
        progress: None,
    })
}

pub(super) fn remote_name(s: &str) -> anyhow::Result<RemoteName> {
    RemoteName::parse(s).map_err(|e| Usage(e.to_string()).into())
}

pub(super) fn push(a: PushArgs) -> anyhow::Result<Action> {
    Ok(Action::Push(PushRequest {
        vm: vm_name(&a.name)?,
        snapshot: snap_name(&a.snapshot)?,
        url: a.url,
        opts: PushOptions {
            as_name: a.as_name.as_deref().map(remote_name).transpose()?,
            sign: a.sign.map(absolute).transpose()?,
            base: a.base.as_deref().map(snap_name).transpose()?,
            parallel: usize::from(a.parallel),
            refresh: a.refresh,
            ..PushOptions::default()
        },
        json: a.json,
    }))
}

pub(super) fn pull(a: PullArgs) -> anyhow::Result<Action> {
    Ok(Action::Pull(PullRequest {
        url: a.url,
        name: remote_name(&a.remote_name)?,
        vm: vm_name(&a.name)?,
        opts: PullOptions {
            import: import_options(a.import)?,
            parallel: usize::from(a.parallel),
            ..PullOptions::default()
        },
        json: a.json,
    }))
}

pub(super) fn remote(c: RemoteCommand) -> anyhow::Result<Action> {
    Ok(match c {
        RemoteCommand::List { url, json } => Action::RemoteList { url, json },
        RemoteCommand::Rm {
            url,
            remote_name: n,
        } => Action::RemoteRm {
            url,
            name: remote_name(&n)?,
        },
        RemoteCommand::Gc { url, grace, json } => Action::RemoteGc { url, grace, json },
    })
}

pub(super) fn keygen(a: KeygenArgs) -> anyhow::Result<Action> {
    Ok(Action::Keygen(absolute(a.prefix)?))
}
