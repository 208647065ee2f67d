//! Embedding qsnap-engine in a VMM: the two ways to revert when you start QEMU yourself.
//!
//! ```text
//! cargo run -p qsnap-engine --example embed -- launcher STORE VM SNAPSHOT
//! cargo run -p qsnap-engine --example embed -- two-step STORE VM SNAPSHOT
//! ```
//! `STORE`/`VM` are a store and a VM created with `qsnap run` or `qsnap attach` (or the
//! `Engine` API), `SNAPSHOT` one of its snapshots.
//!
//! 1. **A `Launcher`**: qsnap drives the revert (validation, stopping the old QEMU, new
//!    overlays, loading memory, updating the store) and calls you to start QEMU. Here the
//!    launcher tags the process and delegates to qsnap's own `ProcessLauncher`; a VMM would
//!    start QEMU in its cgroup/jail, from its own config, with the disk paths the spec gives.
//! 2. **Two steps**, for a VMM that owns the whole QEMU lifecycle and keeps its own records:
//!    `revert::prepare` (check the snapshot, make new overlays) → start QEMU your way with
//!    those overlays and `-incoming defer` → `revert::restore` over QMP.

use qsnap_engine::launch::{argv, machine, LaunchSpec, Launched, Launcher, ProcessLauncher};
use qsnap_engine::snapshot::revert;
use qsnap_engine::{Engine, RevertOptions, SnapshotName, Store, VmName};
use qsnap_qmp::{ConnectOptions, Qmp};
use std::time::Duration;

/// A launcher that adds a process name and hands over to qsnap's process launcher.
struct TaggingLauncher {
    inner: ProcessLauncher,
}

impl Launcher for TaggingLauncher {
    async fn launch(&self, spec: &LaunchSpec) -> qsnap_engine::Result<Launched> {
        let mut spec = spec.clone();
        spec.command.argv = argv::remove_flag(&spec.command.argv, "name");
        spec.command.argv.extend([
            "-name".into(),
            format!("{},process=qemu-{}", spec.vm, spec.vm),
        ]);
        eprintln!(
            "launching {} with {} disk substitution(s){}",
            spec.vm,
            spec.disks.len(),
            if spec.incoming { ", incoming" } else { "" }
        );
        self.inner.launch(&spec).await
    }
}

async fn with_launcher(store: &str, vm: &str, snap: &str) -> anyhow_like::Result {
    let engine = Engine::new(Store::new(store));
    let vm = engine.vm(&VmName::new(vm)?).await?;
    let launcher = TaggingLauncher {
        inner: ProcessLauncher::default(),
    };
    let report = vm
        .revert_with(
            &SnapshotName::new(snap)?,
            &RevertOptions::default(),
            &launcher,
        )
        .await?;
    println!(
        "reverted to {} in {:.0} ms, guest {}",
        report.snapshot,
        report.total_ms,
        if report.resumed { "running" } else { "paused" }
    );
    Ok(())
}

async fn two_step(store: &str, vm: &str, snap: &str) -> anyhow_like::Result {
    let engine = Engine::new(Store::new(store));
    let vm = engine.vm(&VmName::new(vm)?).await?;
    let manifest = vm.snapshot(&SnapshotName::new(snap)?).await?;

    // 1. Check the snapshot and make new overlays over its frozen images.
    let prepared = revert::prepare(&manifest.name, &manifest.snapshot, None).await?;

    // 2. Start QEMU your way: here, the recorded command line with the disks swapped for the
    //    new overlays, a private monitor and -incoming defer. (Stop the VM's current QEMU
    //    first if it still runs: `vm.stop().await?`.)
    let command = vm
        .record()
        .command
        .clone()
        .ok_or("no recorded command line")?;
    let socket = std::env::temp_dir().join(format!("embed-{}.sock", std::process::id()));
    let subs = vm
        .record()
        .disks
        .iter()
        .filter_map(|d| {
            let p = prepared.disks.iter().find(|p| p.device == d.device)?;
            Some(argv::DiskSubstitution {
                from: d.launch_image.clone(),
                to: p.overlay.clone(),
            })
        })
        .collect::<Vec<_>>();
    let mut args = argv::substitute_disks(&command.argv, &command.cwd, &subs)?;
    // The snapshot's exact machine type: an alias like `pc` may mean a newer one by now.
    if let Some(m) = &manifest.machine {
        args = machine::pin(&args, m)?;
    }
    // A lazy snapshot: guest RAM is mapped from its image; the load brings device state only.
    // (Appended for `-m` RAM; the command line's own RAM backends are swapped in place.)
    if let Some(ram) = &prepared.ram {
        args = ram.apply(&args)?;
    }
    args.extend([
        "-qmp".into(),
        format!("unix:{},server=on,wait=off", socket.display()),
        "-incoming".into(),
        "defer".into(),
        "-S".into(),
    ]);
    let mut child = tokio::process::Command::new(&args[0])
        .args(&args[1..])
        .current_dir(&command.cwd)
        .spawn()?;

    // 3. Load the memory and resume.
    let opts = ConnectOptions {
        connect_retry: Duration::from_secs(10),
        ..ConnectOptions::default()
    };
    let qmp = Qmp::connect_with(socket.clone(), &opts).await?;
    let restored = revert::restore(&qmp, &prepared, true, Duration::from_secs(300)).await?;
    println!(
        "restored {} into pid {:?} (memory loaded in {:.0} ms); Ctrl-C ends it",
        prepared.snapshot,
        child.id(),
        restored.load_ms
    );
    tokio::signal::ctrl_c().await?;
    child.kill().await?;
    revert::discard(&prepared).await;
    Ok(())
}

/// Just enough error plumbing for an example.
mod anyhow_like {
    pub type Result = std::result::Result<(), Box<dyn std::error::Error>>;
}

#[tokio::main]
async fn main() -> anyhow_like::Result {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.iter().map(String::as_str).collect::<Vec<_>>()[..] {
        ["launcher", store, vm, snap] => with_launcher(store, vm, snap).await,
        ["two-step", store, vm, snap] => two_step(store, vm, snap).await,
        _ => Err("usage: embed launcher|two-step STORE VM SNAPSHOT".into()),
    }
}
