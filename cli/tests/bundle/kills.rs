//! An import killed at any moment, or dying at any step, leaves no VM with missing data.

use super::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_import_killed_at_any_moment_leaves_no_vm_with_missing_data() {
    require_qemu!();
    let dir = tempfile::tempdir().unwrap();
    let bundle = std::fs::read(small_bundle(dir.path()).await).unwrap();
    let b = dir.path().join("b");
    let disks = dir.path().join("disks");
    std::fs::create_dir_all(&disks).unwrap();
    let bin = assert_cmd::cargo::cargo_bin("qsnap");
    // The bundle trickles in (so a kill lands in every phase: manifest, files, seal, commit).
    for (i, kill_ms) in [5u64, 40, 120, 250, 400, 600, 900, 1500].iter().enumerate() {
        let vm = format!("k{i}");
        let mut child = std::process::Command::new(&bin)
            .env("QSNAP_STORE", &b)
            .args(["import", "-", &vm, "--trust-command-line", "--disk-dir"])
            .arg(disks.join(&vm))
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut stdin = child.stdin.take().unwrap();
        let data = bundle.clone();
        let feeder = std::thread::spawn(move || {
            use std::io::Write;
            for chunk in data.chunks(data.len() / 50 + 1) {
                if stdin.write_all(chunk).is_err() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(15));
            }
        });
        std::thread::sleep(Duration::from_millis(*kill_ms));
        let _ = child.kill();
        let _ = child.wait();
        feeder.join().unwrap();
        let registered = b.join("vms").join(&vm).join("vm.json").exists();
        if registered {
            // Committed before the kill: everything it names is there and checks out.
            let out = in_store(&b)(&["check", &vm]);
            ok(&out, &format!("check after kill at {kill_ms} ms"));
        }
        // The next import (of another name) sweeps whatever the killed one left.
        let next = format!("n{i}");
        let f = dir.path().join("whole.qsnap");
        std::fs::write(&f, &bundle).unwrap();
        let out = in_store(&b)(&[
            "import",
            f.to_str().unwrap(),
            &next,
            "--trust-command-line",
            "--disk-dir",
            disks.join(&next).to_str().unwrap(),
        ]);
        ok(&out, "the next import");
        if !registered {
            nothing_left(&b, &vm, &disks.join(&vm), &format!("kill at {kill_ms} ms"));
        }
        assert!(
            !b.join("staging").join(&vm).exists(),
            "kill at {kill_ms} ms"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_import_that_dies_at_any_step_is_swept_by_check_repair_or_is_whole() {
    require_qemu!();
    if !qsnap_testkit::failpoints_or_skip(
        "an_import_that_dies_at_any_step_is_swept_by_check_repair_or_is_whole",
    ) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let bundle = small_bundle(dir.path()).await;
    let b = dir.path().join("b");
    let disks = dir.path().join("disks");
    let run = in_store(&b);
    let points: Vec<&str> = qsnap_engine::testing::failpoint::POINTS
        .iter()
        .copied()
        .filter(|p| p.starts_with("import."))
        .collect();
    assert!(points.len() >= 5, "{points:?}");
    for (i, point) in points.iter().enumerate() {
        let vm = format!("f{i}");
        let d = disks.join(&vm);
        std::fs::create_dir_all(&d).unwrap();
        let out = qsnap()
            .env("QSNAP_STORE", &b)
            .env("FAILPOINTS", format!("{point}=return(crash)"))
            .args([
                "import",
                bundle.to_str().unwrap(),
                &vm,
                "--trust-command-line",
                "--disk-dir",
            ])
            .arg(&d)
            .timeout(Duration::from_secs(120))
            .output()
            .unwrap();
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(out.status.signal(), Some(9), "{point}: {out:?}");
        let committed = *point == "import.committed";
        assert_eq!(
            b.join("vms").join(&vm).join("vm.json").exists(),
            committed,
            "{point}"
        );
        let out = run(&["check", &vm, "--repair"]);
        if committed {
            ok(&out, point);
            let out = run(&["check", &vm]);
            ok(&out, point);
        } else {
            assert!(
                text(&out.stderr).contains("no VM named"),
                "{point}: {out:?}"
            );
            nothing_left(&b, &vm, &d, point);
        }
        assert!(!b.join("staging").join(&vm).exists(), "{point}");
    }
}
