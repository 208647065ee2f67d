//! The TSC frequency to pin for a `-cpu …,+invtsc` VM, so QEMU can save its memory.
//!
//! Asked from QEMU itself: a short-lived `-S` QEMU with the VM's own accelerator and CPU model
//! reports `tsc-frequency` on its CPU (KVM's TSC rate). Only if that fails, the host's
//! *nominal* frequency is used (and the caller says so) — never the current `cpu MHz` of a
//! CPU that scales its clock. This is the one TSC helper of the engine.

use crate::qemu::QueryCpusFast;
use qsnap_qmp::{types, ConnectOptions, Qmp};
use std::process::Stdio;
use std::time::Duration;

/// Where the frequency came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TscSource {
    /// A probe QEMU with the VM's CPU model reported it.
    Qemu,
    /// The kernel's own TSC frequency (`tsc_freq_khz`).
    Kernel,
    /// The CPU's nominal frequency from its model name (`@ 2.20GHz`) or `base_frequency`.
    Nominal,
    /// `cpu MHz` on a host whose kernel knows the TSC rate (`tsc_known_freq`) and reports it.
    KnownFreq,
    /// `cpu MHz` with nothing better (approximate).
    CpuMhz,
}

/// The TSC frequency for the VM whose command line is `argv`.
pub async fn tsc_frequency_for(argv: &[String]) -> Option<(u64, TscSource)> {
    if let Some(hz) = probe(argv).await {
        return Some((hz, TscSource::Qemu));
    }
    host_nominal_hz().await
}

/// The host's TSC frequency from what the kernel exposes, best source first.
pub async fn host_nominal_hz() -> Option<(u64, TscSource)> {
    let read = |p: &'static str| async move { tokio::fs::read_to_string(p).await.ok() };
    let khz = |s: Option<String>| {
        s.and_then(|t| t.trim().parse::<u64>().ok())
            .map(|k| k * 1000)
    };
    if let Some(hz) = khz(read("/sys/devices/system/cpu/cpu0/tsc_freq_khz").await) {
        return Some((hz, TscSource::Kernel));
    }
    let cpuinfo = read("/proc/cpuinfo").await.unwrap_or_default();
    if let Some(hz) = model_name_hz(&cpuinfo) {
        return Some((hz, TscSource::Nominal));
    }
    if let Some(hz) = khz(read("/sys/devices/system/cpu/cpu0/cpufreq/base_frequency").await) {
        return Some((hz, TscSource::Nominal));
    }
    let mhz = cpu_mhz(&cpuinfo)?;
    let known = cpuinfo
        .lines()
        .find(|l| l.starts_with("flags"))
        .is_some_and(|l| l.split_whitespace().any(|f| f == "tsc_known_freq"));
    Some((
        mhz,
        if known {
            TscSource::KnownFreq
        } else {
            TscSource::CpuMhz
        },
    ))
}

/// `model name : Intel(R) Xeon(R) CPU E5-2680 v4 @ 2.40GHz` → 2.4 GHz.
fn model_name_hz(cpuinfo: &str) -> Option<u64> {
    let name = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))?
        .split_once(':')?
        .1;
    let at = name.rsplit_once('@')?.1.trim();
    let ghz: f64 = at.strip_suffix("GHz")?.trim().parse().ok()?;
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    Some((ghz * 1e9).round() as u64)
}

fn cpu_mhz(cpuinfo: &str) -> Option<u64> {
    let mhz: f64 = cpuinfo
        .lines()
        .find(|l| l.starts_with("cpu MHz"))?
        .split_once(':')?
        .1
        .trim()
        .parse()
        .ok()?;
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    Some((mhz * 1e6).round() as u64)
}

async fn probe(argv: &[String]) -> Option<u64> {
    let binary = argv.first()?;
    // A private directory (mkdtemp, 0700): never a predictable path another user could
    // squat or point elsewhere.
    let dir = tokio::task::spawn_blocking(|| {
        tempfile::Builder::new().prefix("qsnap-tsc-").tempdir().ok()
    })
    .await
    .ok()??;
    let sock = dir.path().join("probe.sock");
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
        command_timeout: Duration::from_secs(5),
        ..ConnectOptions::default()
    };
    let hz = tokio::time::timeout(Duration::from_secs(15), async {
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
    })
    .await
    .ok()
    .flatten();
    let _ = child.start_kill();
    let _ = tokio::time::timeout(Duration::from_secs(5), child.wait()).await;
    drop(dir);
    hz
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nominal_frequency_comes_from_the_model_name_not_the_current_clock() {
        let intel =
            "model name\t: Intel(R) Xeon(R) CPU E5-2680 v4 @ 2.40GHz\ncpu MHz\t\t: 1200.000\n";
        assert_eq!(model_name_hz(intel), Some(2_400_000_000));
        assert_eq!(cpu_mhz(intel), Some(1_200_000_000));
        let amd = "model name\t: AMD EPYC\ncpu MHz\t\t: 2445.404\nflags\t\t: tsc tsc_known_freq\n";
        assert_eq!(model_name_hz(amd), None);
        assert_eq!(cpu_mhz(amd), Some(2_445_404_000));
    }

    #[tokio::test]
    async fn the_probe_never_uses_a_predictable_directory() {
        // The old code used /tmp/qsnap-tsc-<pid> with create_dir_all: a squatter's symlink
        // there would have been followed. The probe must not touch it.
        let squat = std::env::temp_dir().join(format!("qsnap-tsc-{}", std::process::id()));
        let target = tempfile::tempdir().unwrap();
        let _ = std::fs::remove_file(&squat);
        std::os::unix::fs::symlink(target.path(), &squat).unwrap();
        let _ = probe(&["/nonexistent/qemu-system-x86_64".to_owned()]).await;
        assert!(std::fs::read_dir(target.path()).unwrap().next().is_none());
        std::fs::remove_file(&squat).unwrap();
    }
}
