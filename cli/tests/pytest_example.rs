//! Runs the pytest example (`examples/pytest/`) against this build of qsnap: a session-scoped
//! golden VM and a clone per test, each test changing its clone's disk and memory and seeing
//! no trace of the others. Needs Debian's python3-pytest (tests/guest/install-deps.sh installs
//! it); without it the test skips loudly, and under CI it fails.

use qsnap_testkit::{require_qemu, under_ci, GuestKit};
use std::process::Command;

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
    let out = Command::new("timeout")
        .args([
            "600",
            python,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
        ])
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
