//! What the tests of snapshots leaving the host share (the `bundle` and `remote` test
//! binaries both include this file): running qsnap on a store, and the source side — the
//! real guest under `qsnap run` — with the check that a moved snapshot resumes at its tick.
// Each binary uses part of it.
#![allow(dead_code)]

use assert_cmd::Command;
use qsnap_testkit::serial::{parse_tick, SerialLog};
use qsnap_testkit::{create_image, DiskStyle, KillRecordedQemu, VmBuilder};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub fn qsnap() -> Command {
    Command::cargo_bin("qsnap").unwrap()
}

pub fn in_store(store: &Path) -> impl Fn(&[&str]) -> std::process::Output + '_ {
    move |args| {
        let out = qsnap()
            .env("QSNAP_STORE", store)
            .env("NO_COLOR", "1")
            .args(args)
            .timeout(Duration::from_secs(300))
            .output()
            .unwrap();
        qsnap_testkit::json_output::check(args, &out);
        out
    }
}

pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

pub fn ok(out: &std::process::Output, what: &str) {
    assert!(
        out.status.success(),
        "{what}: {out:?}\n{}",
        text(&out.stderr)
    );
}

pub fn json(out: &std::process::Output) -> Value {
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", text(&out.stdout)))
}

/// Every file under `dir` (recursively), for "nothing was left behind".
pub fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir(dir) else {
        return out;
    };
    for e in rd.flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(files_under(&p));
            out.push(p);
        } else {
            out.push(p);
        }
    }
    out
}

/// The source side: the test guest under `qsnap run` with a qcow2 disk (-blockdev) and a raw
/// one (-drive), its console in a file.
pub struct Source {
    // Dropped first: it reads the VM's record, which goes with the directory.
    _kill: KillRecordedQemu,
    pub root: PathBuf,
    pub store: PathBuf,
    pub serial: SerialLog,
    _dir: tempfile::TempDir,
}

impl Source {
    pub async fn boot() -> Source {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().to_owned();
        let store = root.join("a");
        let qcow = root.join("src-disk.qcow2");
        let raw = root.join("src-raw.img");
        create_image(&qcow, "qcow2", "64M").await;
        create_image(&raw, "raw", "16M").await;
        let serial = root.join("serial.log");
        let argv = VmBuilder::guest()
            .dirty_mb(8)
            .disk(&qcow, "qcow2", DiskStyle::Blockdev)
            .disk(&raw, "raw", DiskStyle::Drive)
            .command_line(&serial)
            .await;
        let kill = KillRecordedQemu::new(&store, "src");
        let mut cmd = vec!["run", "src", "--"];
        cmd.extend(argv.iter().map(String::as_str));
        ok(&in_store(&store)(&cmd), "run");
        let serial = SerialLog::follow(&serial);
        serial
            .wait_from(0, Duration::from_secs(120), |l| {
                parse_tick(l).filter(|&t| t >= 3)
            })
            .await
            .unwrap_or_else(|e| panic!("the guest did not tick: {e}\n{}", serial.tail(30)));
        Source {
            _dir: dir,
            root,
            store,
            serial,
            _kill: kill,
        }
    }

    pub fn run(&self, args: &[&str]) -> std::process::Output {
        in_store(&self.store)(args)
    }

    /// Takes snapshot `name` (extra args: mode) and returns the ticks around it.
    pub async fn snapshot(&self, name: &str, extra: &[&str]) -> (u64, u64) {
        let before = self.last_tick();
        let mut args = vec!["create", "src", name];
        args.extend(extra);
        ok(&self.run(&args), name);
        let after = self
            .serial
            .wait_new_tick(Duration::from_secs(30))
            .await
            .unwrap();
        (before, after)
    }

    pub fn last_tick(&self) -> u64 {
        self.serial.ticks().last().copied().unwrap_or(0)
    }
}

/// Imports `bundle` into `store` as `vm` (disks in `disks`), reverts it and checks the guest
/// resumes within `(before, after]` and goes on with memory and disk agreeing.
pub async fn import_and_resume(
    store: &Path,
    bundle: &Path,
    vm: &str,
    disks: &Path,
    ticks: (u64, u64),
) {
    let run = in_store(store);
    let out = run(&[
        "import",
        bundle.to_str().unwrap(),
        vm,
        "--disk-dir",
        disks.to_str().unwrap(),
        "--json",
    ]);
    ok(&out, "import");
    resume(store, vm, &json(&out), ticks).await;
}

pub async fn resume(store: &Path, vm: &str, report: &Value, (before, after): (u64, u64)) {
    let run = in_store(store);
    assert_eq!(report["new-vm"], true, "{report}");
    let console = report["moved"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["option"] == "-chardev qsnapser")
        .unwrap_or_else(|| panic!("no console moved: {report}"))["to"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(console.starts_with(store.to_str().unwrap()), "{console}");
    let out = run(&["status", vm, "--json"]);
    ok(&out, "status");
    assert_eq!(json(&out)["state"]["state"], "stopped");
    let snap = report["snapshot"].as_str().unwrap().to_owned();
    let _kill = KillRecordedQemu::new(store, vm);
    ok(&run(&["revert", vm, &snap]), "revert");
    let log = SerialLog::follow(&console);
    let (idx, first) = log
        .wait_from(0, Duration::from_secs(60), parse_tick)
        .await
        .unwrap_or_else(|e| panic!("{vm}: no tick: {e}\n{}", log.tail(30)));
    assert!(
        first > before && first <= after + 1,
        "{vm} resumed at {first}; the snapshot was taken between {before} and {after}"
    );
    log.wait_from(idx, Duration::from_secs(60), |l| {
        parse_tick(l).filter(|&t| t >= first + 2)
    })
    .await
    .unwrap_or_else(|e| panic!("{vm}: stalled: {e}\n{}", log.tail(30)));
    assert!(log.mismatches().is_empty(), "{vm}: {}", log.tail(30));
    let out = run(&["check", vm]);
    ok(&out, "check");
    ok(&run(&["stop", vm]), "stop");
}

/// A kernel-less VM `vm1` in store `root/a`, its one qcow2 disk holding `random_mib` MiB of
/// random data (so that a push or export has something to cut) or, with 0, an empty 16 MiB;
/// pinned to `machine` when given; snapshotted with precopy as `s1` (a mapped-ram memory
/// file on this QEMU) and left running. Its killer comes first: drop it before `root`.
pub async fn idle_source(
    root: &Path,
    machine: Option<&str>,
    random_mib: u32,
) -> (KillRecordedQemu, PathBuf) {
    let store = root.join("a");
    let disk = root.join("d.qcow2");
    if random_mib == 0 {
        create_image(&disk, "qcow2", "16M").await;
    } else {
        let raw = root.join("seed.raw");
        let dd = std::process::Command::new("dd")
            .args(["if=/dev/urandom", "bs=1M", "status=none"])
            .arg(format!("count={random_mib}"))
            .arg(format!("of={}", raw.display()))
            .status()
            .unwrap();
        assert!(dd.success());
        let st = std::process::Command::new("qemu-img")
            .args(["convert", "-q", "-f", "raw", "-O", "qcow2"])
            .arg(&raw)
            .arg(&disk)
            .status()
            .unwrap();
        assert!(st.success());
        std::fs::remove_file(&raw).unwrap();
    }
    let mut argv = VmBuilder::idle()
        .memory(64)
        .disk(&disk, "qcow2", DiskStyle::Blockdev)
        .command_line(&root.join("serial.log"))
        .await;
    if let Some(m) = machine {
        argv.extend(["-machine".into(), m.into()]);
    }
    let kill = KillRecordedQemu::new(&store, "vm1");
    let run = in_store(&store);
    let mut cmd = vec!["run", "vm1", "--"];
    cmd.extend(argv.iter().map(String::as_str));
    ok(&run(&cmd), "run");
    ok(
        &run(&["create", "vm1", "s1", "--mode", "precopy"]),
        "create",
    );
    drop(run);
    (kill, store)
}
