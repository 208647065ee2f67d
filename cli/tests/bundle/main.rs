//! `qsnap export` / `qsnap import` end to end: snapshots of the real guest leave one store
//! (standing for one host) as a bundle and come back in another, with its disks elsewhere, and
//! resume at their tick; damaged, cut-short and host-reaching bundles are refused leaving
//! nothing behind; an import killed at any moment never leaves a VM with missing data.

use kit::*;
use qsnap_testkit::serial::{parse_tick, SerialLog};
use qsnap_testkit::{require_qemu, under_ci, KillRecordedQemu, VmBuilder};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

/// A kernel-less VM whose command line reads a host file into the guest (`-fw_cfg file=`),
/// snapshotted and exported: the bundle the refusal tests start from.
async fn small_bundle(root: &Path) -> PathBuf {
    let store = root.join("a");
    let disk = root.join("d.qcow2");
    let mut argv = VmBuilder::idle_with_disk(&disk, "16M", &root.join("serial.log")).await;
    argv.extend([
        "-fw_cfg".into(),
        "name=opt/qsnap/host,file=/etc/hostname".into(),
    ]);
    let _kill = KillRecordedQemu::new(&store, "vm1");
    let run = in_store(&store);
    let mut cmd = vec!["run", "vm1", "--"];
    cmd.extend(argv.iter().map(String::as_str));
    ok(&run(&cmd), "run");
    ok(&run(&["create", "vm1", "s1"]), "create");
    let bundle = root.join("s1.qsnap");
    ok(
        &run(&["export", "vm1", "s1", bundle.to_str().unwrap()]),
        "export",
    );
    ok(&run(&["stop", "vm1"]), "stop");
    bundle
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// A bundle's tar, through the zstd tool (`None`, loudly, where it is missing outside CI).
fn unzstd(bundle: &[u8]) -> Option<Vec<u8>> {
    zstd_tool(&["-d", "-c"], bundle)
}

fn rezstd(tar: &[u8]) -> Vec<u8> {
    zstd_tool(&["-q", "-c"], tar).expect("zstd ran a moment ago")
}

fn zstd_tool(args: &[&str], input: &[u8]) -> Option<Vec<u8>> {
    use std::io::Write;
    let child = std::process::Command::new("zstd")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) => {
            assert!(!under_ci(), "the zstd tool must be installed under CI: {e}");
            eprintln!("SKIPPED part: no zstd tool here ({e})");
            return None;
        }
    };
    let mut stdin = child.stdin.take().unwrap();
    let data = input.to_vec();
    let feeder = std::thread::spawn(move || stdin.write_all(&data));
    let out = child.wait_with_output().unwrap();
    feeder.join().unwrap().unwrap();
    assert!(out.status.success(), "zstd {args:?} failed");
    Some(out.stdout)
}

/// Nothing of an import into `store` (VM `vm`, disks in `disks`) is left.
fn nothing_left(store: &Path, vm: &str, disks: &Path, what: &str) {
    assert!(
        !store.join("vms").join(vm).exists(),
        "{what}: {:?}",
        files_under(&store.join("vms"))
    );
    assert!(
        files_under(&store.join("staging")).is_empty(),
        "{what}: {:?}",
        files_under(&store.join("staging"))
    );
    assert!(
        files_under(disks).is_empty(),
        "{what}: {:?}",
        files_under(disks)
    );
}

mod compat;
mod kills;
mod kit;
mod moves;
mod refusals;
