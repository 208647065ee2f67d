//! The TSC frequency to pin for a `-cpu …,+invtsc` VM, so QEMU can save its memory.
//!
//! Asked from QEMU itself: a short-lived `-S` QEMU with the VM's own accelerator and CPU model
//! reports `tsc-frequency` on its CPU (KVM's TSC rate). Only if that fails, the host's nominal
//! frequency from `/proc/cpuinfo` is used (and the caller says so).

use crate::qemu::QueryCpusFast;
use qsnap_qmp::{types, ConnectOptions, Qmp};
use std::process::Stdio;
use std::time::Duration;

/// Where the frequency came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TscSource {
    /// A probe QEMU with the VM's CPU model reported it.
    Qemu,
    /// `/proc/cpuinfo`'s nominal frequency (less exact).
    CpuInfo,
}

/// The TSC frequency for the VM whose command line is `argv`.
pub async fn tsc_frequency_for(argv: &[String]) -> Option<(u64, TscSource)> {
    if let Some(hz) = probe(argv).await {
        return Some((hz, TscSource::Qemu));
    }
    crate::snapshot::host_tsc_hz()
        .await
        .map(|hz| (hz, TscSource::CpuInfo))
}

async fn probe(argv: &[String]) -> Option<u64> {
    let binary = argv.first()?;
    let dir = std::env::temp_dir().join(format!("qsnap-tsc-{}", std::process::id()));
    tokio::fs::create_dir_all(&dir).await.ok()?;
    let sock = dir.join("probe.sock");
    let mut args: Vec<String> = Vec::new();
    // Only what decides the CPU: accelerator, machine, CPU model.
    for w in argv.windows(2) {
        match w[0].trim_start_matches('-') {
            "accel" | "machine" | "M" | "cpu" => args.extend([w[0].clone(), w[1].clone()]),
            _ => {}
        }
    }
    if argv.iter().any(|a| a == "-enable-kvm") {
        args.push("-enable-kvm".into());
    }
    let mut child = tokio::process::Command::new(binary)
        .args(&args)
        .args(["-nodefaults", "-display", "none", "-S", "-m", "16", "-qmp"])
        .arg(format!("unix:{},server=on,wait=off", sock.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .ok()?;
    let opts = ConnectOptions {
        connect_retry: Duration::from_secs(5),
        ..ConnectOptions::default()
    };
    let hz = async {
        let qmp = Qmp::connect_with(sock.clone(), &opts).await.ok()?;
        let cpus = qmp.execute(QueryCpusFast {}).await.ok()?;
        let v = qmp
            .execute(types::qom_get {
                path: cpus.first()?.qom_path.clone(),
                property: "tsc-frequency".into(),
            })
            .await
            .ok()?;
        v.as_u64().filter(|&hz| hz > 0)
    }
    .await;
    let _ = child.start_kill();
    let _ = tokio::time::timeout(Duration::from_secs(5), child.wait()).await;
    let _ = tokio::fs::remove_dir_all(&dir).await;
    hz
}
