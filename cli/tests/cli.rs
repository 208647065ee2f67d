//! The `qsnap` binary end to end, against a real (kernel-less) QEMU.

use assert_cmd::Command;
use qsnap_testkit::{create_image, require_qemu, DiskStyle, VmBuilder};
use serde_json::Value;

fn qsnap() -> Command {
    Command::cargo_bin("qsnap").unwrap()
}

fn stdout_json(out: &std::process::Output) -> Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "stdout is not JSON ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

#[test]
fn help_and_version() {
    let out = qsnap().arg("--help").output().unwrap();
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(help.contains("qmp") && help.contains("info"), "{help}");
    let out = qsnap().arg("--version").output().unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("qsnap "));
}

#[tokio::test]
async fn qmp_passthrough_prints_replies_and_errors() {
    require_qemu!();
    let vm = VmBuilder::idle().args(["-name", "cli-vm"]).spawn().await;
    let sock = vm.qmp_path.display().to_string();

    let out = qsnap()
        .args(["qmp", &sock, "query-status"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let v = stdout_json(&out);
    assert_eq!(v["running"], true);
    assert_eq!(v["status"], "running");

    let out = qsnap().args(["qmp", &sock, "query-name"]).output().unwrap();
    assert_eq!(stdout_json(&out)["name"], "cli-vm");

    // Arguments travel as given.
    let out = qsnap().args(["qmp", &sock, "stop"]).output().unwrap();
    assert!(out.status.success());
    let out = qsnap()
        .args(["qmp", &sock, "query-status"])
        .output()
        .unwrap();
    assert_eq!(stdout_json(&out)["status"], "paused");

    // QEMU's refusal: exit 1, class and desc on stderr, nothing on stdout.
    let out = qsnap()
        .args(["qmp", &sock, "blockdev-del", r#"{"node-name":"nope"}"#])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("GenericError") && err.contains("nope"),
        "{err}"
    );
    assert!(out.stdout.is_empty());

    // Bad JSON: a usage error before QEMU is contacted.
    let out = qsnap()
        .args(["qmp", &sock, "stop", "{not json"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not valid JSON"));
}

#[test]
fn wrong_socket_is_a_clear_error_with_its_own_exit_code() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.sock");
    let out = qsnap()
        .args(["qmp", missing.to_str().unwrap(), "query-status"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("cannot connect") && err.contains("missing.sock"),
        "{err}"
    );
}

#[tokio::test]
async fn info_reports_state_blockers_mechanisms_and_disks() {
    require_qemu!();
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a.qcow2");
    let b = dir.path().join("b.raw");
    create_image(&a, "qcow2", "16M").await;
    create_image(&b, "raw", "16M").await;
    let vm = VmBuilder::idle()
        .disk(&a, "qcow2", DiskStyle::Drive)
        .disk(&b, "raw", DiskStyle::Blockdev)
        .spawn()
        .await;
    let sock = vm.qmp_path.display().to_string();
    let out = qsnap().args(["info", &sock, "--json"]).output().unwrap();
    assert!(out.status.success(), "{out:?}");
    let v = stdout_json(&out);
    assert_eq!(v["runstate"], "running");
    assert_eq!(v["migration_blockers"], serde_json::json!([]));
    assert_eq!(v["background_snapshot"], true);
    let disks = v["disks"].as_array().unwrap();
    assert_eq!(disks.len(), 2, "{v}");
    assert!(disks
        .iter()
        .any(|d| d["file"] == a.display().to_string() && d["format"] == "qcow2"));
    assert!(disks
        .iter()
        .any(|d| d["file"] == b.display().to_string() && d["format"] == "raw"));

    let out = qsnap().args(["info", &sock]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("memory save    possible"), "{text}");
    assert!(text.contains("b.raw [raw]"), "{text}");
}

#[tokio::test]
async fn info_names_a_migration_blocker() {
    require_qemu!();
    // invtsc is the blocker users hit; it needs KVM (a kernel-less guest is enough).
    // `-arch-capabilities` avoids an MSR some nested hosts refuse.
    if !qsnap_testkit::kvm_available() {
        eprintln!("\n*** SKIPPED info_names_a_migration_blocker: /dev/kvm is not usable here; the invtsc blocker needs KVM ***\n");
        return;
    }
    let vm = match VmBuilder::idle()
        .accel(qsnap_testkit::Accel::Kvm)
        .cpu("host,+invtsc,-arch-capabilities")
        .try_spawn()
        .await
    {
        Ok(vm) => vm,
        Err(report) => {
            eprintln!("\n*** SKIPPED info_names_a_migration_blocker: KVM cannot run -cpu host,+invtsc here:\n{report} ***\n");
            return;
        }
    };
    let sock = vm.qmp_path.display().to_string();
    let out = qsnap().args(["info", &sock, "--json"]).output().unwrap();
    let v = stdout_json(&out);
    let blockers = v["migration_blockers"].to_string();
    assert!(blockers.contains("invtsc"), "{v}");
    let out = qsnap().args(["info", &sock]).output().unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("BLOCKED"));
}
