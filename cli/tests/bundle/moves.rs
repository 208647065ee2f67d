//! Snapshots of every kind move to another store and resume at their tick.

use super::*;

/// `tar --zstd -tvf` lists a bundle with its real names (GNU tar and zstd must be installed;
/// the CI installs them).
fn tar_lists(bundle: &Path) -> String {
    let out = std::process::Command::new("tar")
        .args(["--zstd", "-tvf"])
        .arg(bundle)
        .output();
    match out {
        Ok(o) if o.status.success() => text(&o.stdout),
        other => {
            assert!(!under_ci(), "tar --zstd must work under CI: {other:?}");
            eprintln!("SKIPPED part: tar --zstd is not usable here ({other:?})");
            String::new()
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshots_of_every_kind_move_to_another_store_and_resume_at_their_tick() {
    require_qemu!();
    let src = Source::boot().await;
    let b = src.root.join("b");
    let disks = src.root.join("elsewhere");
    std::fs::create_dir_all(&disks).unwrap();

    // Point in time (with the guest dirtying memory), through a file.
    let pit = src.snapshot("pit", &[]).await;
    let file = src.root.join("pit.qsnap");
    let out = src.run(&["export", "src", "pit", file.to_str().unwrap(), "--json"]);
    ok(&out, "export");
    let rep = json(&out);
    assert!(rep["bundle-bytes"].as_u64().unwrap() > 0);
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&file).unwrap().permissions().mode() & 0o777,
        0o600,
        "a bundle holds guest memory"
    );
    // Never over an existing file.
    let again = src.run(&["export", "src", "pit", file.to_str().unwrap()]);
    assert_eq!(again.status.code(), Some(6), "{again:?}");
    assert!(text(&again.stderr).contains("exists"), "{again:?}");
    let listing = tar_lists(&file);
    if !listing.is_empty() {
        for name in [
            "qsnap-bundle.json",
            "memory/state.mem",
            "/0.qcow2",
            "/0.raw",
            "qsnap-seal.json",
        ] {
            assert!(listing.contains(name), "{name} not in\n{listing}");
        }
    }
    import_and_resume(&b, &file, "pit", &disks.join("pit"), pit).await;
    // The images went where asked, the memory into the store, nothing of the source's paths.
    let rec: Value =
        serde_json::from_slice(&std::fs::read(b.join("vms/pit/vm.json")).unwrap()).unwrap();
    let argv = rec["command"]["argv"].to_string();
    for theirs in ["src-disk.qcow2", "src-raw.img", "serial.log"] {
        let p = src.root.join(theirs);
        assert!(!argv.contains(p.to_str().unwrap()), "{argv}");
    }
    assert!(argv.contains(disks.join("pit").to_str().unwrap()), "{argv}");

    // Precopy (mapped-ram where QEMU has it), through a pipe.
    let pre = src.snapshot("pre", &["--mode", "precopy"]).await;
    let script = format!(
        "QSNAP_STORE={a} {q} export src pre - | QSNAP_STORE={b} {q} import - pre --disk-dir {d} --json",
        a = src.store.display(),
        b = b.display(),
        q = assert_cmd::cargo::cargo_bin("qsnap").display(),
        d = disks.join("pre").display(),
    );
    let out = std::process::Command::new("sh")
        .args(["-c", &script])
        .output()
        .unwrap();
    ok(&out, "export | import");
    qsnap_testkit::json_output::check(&["import", "-", "pre", "--json"], &out);
    resume(&b, "pre", &json(&out), pre).await;

    // Lazy RAM: the RAM image and device state travel.
    let lazy = src.snapshot("lazy", &["--mode", "precopy"]).await;
    let lazy_ok = src.run(&["lazy-ram", "src", "lazy"]);
    ok(&lazy_ok, "lazy-ram");
    let file = src.root.join("lazy.qsnap");
    ok(
        &src.run(&["export", "src", "lazy", file.to_str().unwrap()]),
        "export lazy",
    );
    import_and_resume(&b, &file, "lazy", &disks.join("lazy"), lazy).await;

    // Incremental: a snapshot taken after `pre`, shipped as what changed since; onto the VM
    // that imported `pre`. Refused where `pre` is not held.
    let later = src.snapshot("later", &["--mode", "precopy"]).await;
    let full = src.root.join("later-full.qsnap");
    ok(
        &src.run(&["export", "src", "later", full.to_str().unwrap()]),
        "export later",
    );
    let inc = src.root.join("later-inc.qsnap");
    let out = src.run(&[
        "export",
        "src",
        "later",
        inc.to_str().unwrap(),
        "--base",
        "pre",
        "--json",
    ]);
    ok(&out, "export --base");
    let (full_size, inc_size) = (
        std::fs::metadata(&full).unwrap().len(),
        std::fs::metadata(&inc).unwrap().len(),
    );
    assert!(
        inc_size < full_size / 2,
        "incremental {inc_size} bytes vs full {full_size}: {}",
        text(&out.stdout)
    );
    // Both memories are mapped-ram files (pages at fixed offsets): the memory went as a delta.
    let files = json(&out)["files"].as_array().unwrap().clone();
    let mem = files
        .iter()
        .find(|f| f["name"] == "memory/state.mem")
        .unwrap();
    assert_eq!(mem["delta"], true, "{mem}");
    assert!(mem["shipped"].as_u64() < mem["size"].as_u64(), "{mem}");
    assert!(!files
        .iter()
        .any(|f| f["name"].as_str().unwrap().starts_with("boot/")));
    let run_b = in_store(&b);
    let out = run_b(&["import", inc.to_str().unwrap(), "nobase"]);
    assert_eq!(out.status.code(), Some(6), "{out:?}");
    assert!(
        text(&out.stderr).contains("must be imported first"),
        "{out:?}"
    );
    assert!(!b.join("vms/nobase").exists());
    let out = run_b(&["import", inc.to_str().unwrap(), "pre", "--json"]);
    ok(&out, "import incremental");
    let rep = json(&out);
    assert_eq!(rep["new-vm"], false, "{rep}");
    assert_eq!(rep["base"], "pre", "{rep}");
    let console = b.join("vms/pre/files/serial.log");
    // The console file holds the earlier run's lines: only what follows them counts.
    let mark = std::fs::read_to_string(&console).unwrap().lines().count();
    let _kill = KillRecordedQemu::new(&b, "pre");
    ok(
        &run_b(&["revert", "pre", "later"]),
        "revert to the incremental snapshot",
    );
    let log = SerialLog::follow(&console);
    let (idx, first) = log
        .wait_from(mark, Duration::from_secs(60), parse_tick)
        .await
        .unwrap_or_else(|e| {
            panic!(
                "no tick after the incremental revert: {e}\n{}",
                log.tail(30)
            )
        });
    assert!(
        first > later.0 && first <= later.1 + 1,
        "resumed at {first}, taken in {later:?}"
    );
    log.wait_from(idx, Duration::from_secs(60), |l| {
        parse_tick(l).filter(|&t| t >= first + 2)
    })
    .await
    .unwrap();
    assert!(log.mismatches().is_empty(), "{}", log.tail(30));
    ok(&run_b(&["check", "pre"]), "check");
    ok(&run_b(&["stop", "pre"]), "stop");
    assert!(!b.join("staging").join("pre").exists());
}
