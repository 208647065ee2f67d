//! Shell completions: `qsnap completions SHELL` prints the script a shell loads (bash, zsh,
//! fish, elvish, powershell; `clap_complete`'s dynamic engine), which calls qsnap back with
//! `QSNAP_COMPLETE=SHELL` set for every Tab: subcommands and options come from the clap
//! definitions, VM and snapshot names from the store (`QSNAP_STORE`, else the default).
//!
//! This module must never write, lock or connect to anything: completing only lists the
//! store's directories, and a store it cannot read completes nothing.

use clap_complete::engine::CompletionCandidate;
use std::ffi::OsStr;
use std::path::PathBuf;

/// The environment variable that turns a run of qsnap into a completion request.
pub const VAR: &str = "QSNAP_COMPLETE";

/// The script that makes `shell` complete qsnap, written to `out`.
pub fn script(shell: &str, out: &mut dyn std::io::Write) -> anyhow::Result<()> {
    let shells = clap_complete::env::Shells::builtins();
    let Some(completer) = shells.completer(shell) else {
        let known: Vec<&str> = shells.names().collect();
        anyhow::bail!(
            "no completions for the shell {shell:?} (these: {})",
            known.join(", ")
        );
    };
    completer.write_registration(VAR, "qsnap", "qsnap", "qsnap", out)?;
    Ok(())
}

/// The store a completion reads: `QSNAP_STORE`, else the default.
fn store() -> PathBuf {
    std::env::var_os("QSNAP_STORE")
        .filter(|s| !s.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(qsnap_engine::Store::default_root)
}

/// The VMs of the store, sorted.
fn vms() -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(store().join("vms")) else {
        return Vec::new();
    };
    let mut names: Vec<String> = entries
        .flatten()
        .filter(|e| e.path().join("vm.json").is_file())
        .filter_map(|e| e.file_name().into_string().ok())
        .collect();
    names.sort();
    names
}

/// The snapshots of `vm`, sorted.
fn snapshots(vm: &str) -> Vec<String> {
    let dir = store().join("vms").join(vm).join("snapshots");
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut names: Vec<String> = entries
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .filter_map(|n| n.strip_suffix(".json").map(str::to_owned))
        .filter(|n| !n.starts_with('.'))
        .collect();
    names.sort();
    names
}

fn matching(all: Vec<String>, current: &OsStr) -> Vec<CompletionCandidate> {
    let current = current.to_string_lossy();
    all.into_iter()
        .filter(|n| n.starts_with(current.as_ref()))
        .map(CompletionCandidate::new)
        .collect()
}

/// Completes a VM name.
pub fn vm_names(current: &OsStr) -> Vec<CompletionCandidate> {
    matching(vms(), current)
}

/// Completes a snapshot name: of the VM named earlier on the line (the words being completed
/// follow `--` in qsnap's own arguments), else of every VM.
pub fn snapshot_names(current: &OsStr) -> Vec<CompletionCandidate> {
    let known = vms();
    let words: Vec<String> = std::env::args_os()
        .skip_while(|a| a != "--")
        .skip(1)
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    let vm = words.iter().find(|w| known.contains(w));
    let mut all: Vec<String> = match vm {
        Some(vm) => snapshots(vm),
        None => known.iter().flat_map(|v| snapshots(v)).collect(),
    };
    all.sort();
    all.dedup();
    matching(all, current)
}
