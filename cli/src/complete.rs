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

/// Options that take the next word as their value (so that word is no VM name).
const WITH_VALUE: &[&str] = &[
    "--store",
    "--timeout",
    "--wait",
    "--mode",
    "--overlay-dir",
    "--live-limit",
    "--save-timeout",
    "--description",
    "--replace",
    "--base",
    "--level",
    "--threads",
    "--sign",
    "--as",
    "--parallel",
    "--disk-dir",
    "--trust",
    "--qemu",
    "--grace",
];

/// The words of the line being completed (they follow `--` in qsnap's own arguments), the
/// one under the cursor last.
fn line() -> Vec<String> {
    std::env::args_os()
        .skip_while(|a| a != "--")
        .skip(1)
        .map(|a| a.to_string_lossy().into_owned())
        .collect()
}

/// The store a completion reads: the line's `--store`, else `QSNAP_STORE`, else the default.
fn store() -> PathBuf {
    let words = line();
    let given = words.iter().enumerate().find_map(|(i, w)| {
        if w == "--store" {
            words.get(i + 1).cloned()
        } else {
            w.strip_prefix("--store=").map(str::to_owned)
        }
    });
    given
        .filter(|s| !s.is_empty())
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("QSNAP_STORE")
                .filter(|s| !s.is_empty())
                .map(PathBuf::from)
        })
        .unwrap_or_else(qsnap_engine::Store::default_root)
}

/// The words before the cursor that are neither options nor option values: the binary, the
/// subcommand, then its positional arguments.
fn positionals() -> Vec<String> {
    let mut words = line();
    words.pop(); // the word under the cursor
    let mut out = Vec::new();
    let mut skip = false;
    for w in words {
        if skip {
            skip = false;
        } else if w.starts_with('-') {
            skip = WITH_VALUE.contains(&w.as_str());
        } else {
            out.push(w);
        }
    }
    out
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

/// The recorded command line of `vm` (empty when it cannot be read).
fn recorded_argv(vm: &str) -> Vec<String> {
    let path = store().join("vms").join(vm).join("vm.json");
    let Ok(text) = std::fs::read_to_string(path) else {
        return Vec::new();
    };
    let Ok(record) = serde_json::from_str::<serde_json::Value>(&text) else {
        return Vec::new();
    };
    record["command"]["argv"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|w| w.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
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

/// Completes `clone`'s `--replace OLD=NEW`: `OLD=` for each text of the source VM's
/// recorded command line that a clone must not share (a hostfwd rule, the VM's name, …).
pub fn replace_values(current: &OsStr) -> Vec<CompletionCandidate> {
    let Some(vm) = positionals().get(2).cloned() else {
        return Vec::new();
    };
    let olds = qsnap_engine::launch::replace_candidates(&recorded_argv(&vm))
        .into_iter()
        .map(|old| format!("{old}="))
        .collect();
    matching(olds, current)
}

/// Completes a snapshot name: of the VM the line names (the first argument after the
/// subcommand; `remote`'s own subcommands have none), else of every VM.
pub fn snapshot_names(current: &OsStr) -> Vec<CompletionCandidate> {
    let known = vms();
    let vm = positionals().get(2).filter(|w| known.contains(w)).cloned();
    let mut all: Vec<String> = match &vm {
        Some(vm) => snapshots(vm),
        None => known.iter().flat_map(|v| snapshots(v)).collect(),
    };
    all.sort();
    all.dedup();
    matching(all, current)
}
