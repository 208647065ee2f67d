//! Runs the pytest example (`examples/pytest/`) against this build of qsnap: a session-scoped
//! golden VM and a clone per test, each test changing its clone's disk and memory and seeing
//! no trace of the others. Needs Debian's python3-pytest (tests/guest/install-deps.sh installs
//! it); without it the test skips loudly, and under CI it fails.

use qsnap_testkit::{require_qemu, under_ci, GuestKit, KillRecordedQemu};
use std::path::PathBuf;
use std::process::Command;

/// On drop, kills the QEMU of every VM recorded in a store under this directory (the
/// example's fixtures stop them all when pytest ends normally).
struct Leftovers(PathBuf);

impl Drop for Leftovers {
    fn drop(&mut self) {
        let Ok(entries) = std::fs::read_dir(&self.0) else {
            return;
        };
        for store in entries.flatten().map(|e| e.path()) {
            let Ok(vms) = std::fs::read_dir(store.join("vms")) else {
                continue;
            };
            for vm in vms.flatten() {
                drop(KillRecordedQemu::new(
                    &store,
                    &vm.file_name().to_string_lossy(),
                ));
            }
        }
    }
}

#[test]
fn the_pytest_example_passes() {
    require_qemu!();
    // Debian's python3-pytest is for /usr/bin/python3; PATH may hold another python3.
    let python = ["/usr/bin/python3", "python3"].into_iter().find(|p| {
        Command::new(p)
            .args(["-c", "import pytest"])
            .status()
            .is_ok_and(|s| s.success())
    });
    let Some(python) = python else {
        assert!(!under_ci(), "python3-pytest is required under CI");
        eprintln!("\n*** SKIPPED the pytest example: python3-pytest is not installed (run tests/guest/install-deps.sh) ***\n");
        return;
    };
    let kit = GuestKit::get();
    let repo = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap();
    // pytest's temp dirs (its stores among them) in one of ours: a pytest killed by its
    // timeout runs no finalizer, so what its VMs left running is killed from here.
    let base = tempfile::tempdir().unwrap();
    let _leftovers = Leftovers(base.path().to_owned());
    let out = Command::new("timeout")
        .args([
            "600",
            python,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "--basetemp",
        ])
        .arg(base.path())
        .arg(repo.join("examples/pytest"))
        .env("QSNAP", env!("CARGO_BIN_EXE_qsnap"))
        .env("QSNAP_GUEST", kit.kernel.parent().unwrap())
        .output()
        .unwrap();
    let text = format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "pytest failed:\n{text}");
    assert!(text.contains("3 passed"), "{text}");
}
