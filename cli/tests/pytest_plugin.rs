//! The pytest plugin (`python/`, issue 21 item 5) against this build of qsnap and the real
//! test guest: `pip install` of the package into a fresh virtualenv (offline: Debian's
//! setuptools builds it), `mypy --strict` over the package and its suite, then the suite
//! itself with the installed plugin — a golden per session, three forks that each change
//! disk and memory and see nothing of each other, the API, a cached golden imported in a
//! second session, and a failing inner session that leaves no QEMU behind.
//!
//! Needs Debian's python3-pytest, python3-venv, python3-setuptools and python3-mypy
//! (tests/guest/install-deps.sh installs them); without them the test skips loudly, and
//! under CI it fails.

use qsnap_testkit::{require_qemu, under_ci, GuestKit, KillRecordedQemu};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// Debian's Python: its pytest, setuptools and mypy are for /usr/bin/python3, whatever
/// else `python3` on PATH may be.
const PYTHON: &str = "/usr/bin/python3";

/// On drop, kills the QEMU of every VM recorded in any store under this directory (the
/// plugin stops them when pytest ends normally; a pytest killed by its timeout does not).
struct Leftovers(PathBuf);

impl Drop for Leftovers {
    fn drop(&mut self) {
        let mut stack = vec![self.0.clone()];
        while let Some(dir) = stack.pop() {
            let Ok(entries) = std::fs::read_dir(&dir) else {
                continue;
            };
            for e in entries.flatten() {
                let path = e.path();
                if e.file_name() == "vms" {
                    for vm in std::fs::read_dir(&path).into_iter().flatten().flatten() {
                        drop(KillRecordedQemu::new(
                            &dir,
                            &vm.file_name().to_string_lossy(),
                        ));
                    }
                } else if e.file_type().is_ok_and(|t| t.is_dir() && !t.is_symlink()) {
                    stack.push(path);
                }
            }
        }
    }
}

fn show(out: &Output) -> String {
    format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn python_has(modules: &str) -> bool {
    Command::new(PYTHON)
        .args(["-c", &format!("import {modules}")])
        .status()
        .is_ok_and(|s| s.success())
}

/// Copies `from` (the package's sources, without build output) into `to`.
fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap().flatten() {
        let name = e.file_name();
        let n = name.to_string_lossy();
        if n == "build" || n.ends_with(".egg-info") || n == "__pycache__" || n == ".mypy_cache" {
            continue;
        }
        if e.file_type().unwrap().is_dir() {
            copy_tree(&e.path(), &to.join(&name));
        } else {
            std::fs::copy(e.path(), to.join(&name)).unwrap();
        }
    }
}

#[test]
fn the_pytest_plugin_installs_type_checks_and_its_suite_passes() {
    require_qemu!();
    let needed = "pytest, venv, ensurepip, setuptools, mypy";
    if !python_has(needed) {
        assert!(
            !under_ci(),
            "{PYTHON} lacks one of {needed} under CI (tests/guest/install-deps.sh installs them)"
        );
        eprintln!("\n*** SKIPPED the pytest plugin: {PYTHON} lacks one of {needed} (run tests/guest/install-deps.sh) ***\n");
        return;
    }
    let kit = GuestKit::get();
    let repo = qsnap_testkit::repo_root();
    let base = tempfile::tempdir().unwrap();
    let _leftovers = Leftovers(base.path().to_owned());

    // Type hints first (nothing to boot): the package and its suite, strict.
    let out = Command::new("timeout")
        .args(["60", PYTHON, "-m", "mypy", "--cache-dir"])
        .arg(base.path().join("mypy-cache"))
        .current_dir(repo.join("python"))
        .output()
        .unwrap();
    assert!(out.status.success(), "mypy --strict:\n{}", show(&out));

    // `pip install ./python` into a virtualenv of its own, from a copy (pip builds in the
    // source tree). Debian's setuptools builds it, so no index is needed.
    let src = base.path().join("python");
    copy_tree(&repo.join("python"), &src);
    let venv = base.path().join("venv");
    let out = Command::new(PYTHON)
        .args(["-m", "venv", "--system-site-packages"])
        .arg(&venv)
        .output()
        .unwrap();
    assert!(out.status.success(), "venv: {}", show(&out));
    let py = venv.join("bin/python");
    let out = Command::new("timeout")
        .arg("60")
        .arg(&py)
        .args([
            "-m",
            "pip",
            "install",
            "-q",
            "--no-index",
            "--no-build-isolation",
        ])
        .arg(&src)
        .output()
        .unwrap();
    assert!(out.status.success(), "pip install ./python: {}", show(&out));
    // Installed, not imported from the checkout: the suite must see the installed plugin.
    let out = Command::new(&py)
        .args(["-c", "import qsnap; print(qsnap.__file__)"])
        .current_dir(base.path())
        .output()
        .unwrap();
    let where_ = String::from_utf8_lossy(&out.stdout);
    assert!(where_.starts_with(venv.to_str().unwrap()), "{}", show(&out));

    // The suite, with the `qsnap` of this build first on PATH.
    let bin = Path::new(env!("CARGO_BIN_EXE_qsnap")).parent().unwrap();
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    // Every step's own limit, added up, stays under nextest's 6 minutes for this test, so
    // that `Leftovers` always runs.
    let out = Command::new("timeout")
        .arg("220")
        .arg(&py)
        .args(["-m", "pytest", "-q", "-p", "no:cacheprovider", "--basetemp"])
        .arg(base.path().join("t"))
        .arg(repo.join("python/tests"))
        .env("PATH", path)
        .env("QSNAP_GUEST", kit.kernel.parent().unwrap())
        .env_remove("QSNAP_STORE")
        .env_remove("PYTEST_DISABLE_PLUGIN_AUTOLOAD")
        .output()
        .unwrap();
    let text = show(&out);
    assert!(out.status.success(), "pytest failed:\n{text}");
    assert!(text.contains("11 passed"), "{text}");
    assert!(!text.contains("skipped"), "{text}");
}
