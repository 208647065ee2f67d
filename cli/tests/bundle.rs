//! `qsnap export` / `qsnap import` end to end: snapshots of the real guest leave one store
//! (standing for one host) as a bundle and come back in another, with its disks elsewhere, and
//! resume at their tick; damaged, cut-short and host-reaching bundles are refused leaving
//! nothing behind; an import killed at any moment never leaves a VM with missing data.

use assert_cmd::Command;
use qsnap_testkit::serial::{parse_tick, SerialLog};
use qsnap_testkit::{create_image, require_qemu, under_ci, DiskStyle, KillRecordedQemu, VmBuilder};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

fn qsnap() -> Command {
    Command::cargo_bin("qsnap").unwrap()
}

fn in_store(store: &Path) -> impl Fn(&[&str]) -> std::process::Output + '_ {
    move |args| {
        qsnap()
            .env("QSNAP_STORE", store)
            .env("NO_COLOR", "1")
            .args(args)
            .timeout(Duration::from_secs(300))
            .output()
            .unwrap()
    }
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn ok(out: &std::process::Output, what: &str) {
    assert!(
        out.status.success(),
        "{what}: {out:?}\n{}",
        text(&out.stderr)
    );
}

fn json(out: &std::process::Output) -> Value {
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", text(&out.stdout)))
}

/// Every file under `dir` (recursively), for "nothing was left behind".
fn files_under(dir: &Path) -> Vec<PathBuf> {
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
struct Source {
    // Dropped first: it reads the VM's record, which goes with the directory.
    _kill: KillRecordedQemu,
    root: PathBuf,
    store: PathBuf,
    serial: SerialLog,
    _dir: tempfile::TempDir,
}

impl Source {
    async fn boot() -> Source {
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

    fn run(&self, args: &[&str]) -> std::process::Output {
        in_store(&self.store)(args)
    }

    /// Takes snapshot `name` (extra args: mode) and returns the ticks around it.
    async fn snapshot(&self, name: &str, extra: &[&str]) -> (u64, u64) {
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

    fn last_tick(&self) -> u64 {
        self.serial.ticks().last().copied().unwrap_or(0)
    }
}

/// Imports `bundle` into `store` as `vm` (disks in `disks`), reverts it and checks the guest
/// resumes within `(before, after]` and goes on with memory and disk agreeing.
async fn import_and_resume(store: &Path, bundle: &Path, vm: &str, disks: &Path, ticks: (u64, u64)) {
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

async fn resume(store: &Path, vm: &str, report: &Value, (before, after): (u64, u64)) {
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
    assert_eq!(json(&out)["running"], false);
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
    assert_eq!(again.status.code(), Some(1), "{again:?}");
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
    assert_eq!(out.status.code(), Some(1), "{out:?}");
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn damaged_cut_short_and_host_reaching_bundles_are_refused_and_leave_nothing() {
    require_qemu!();
    let dir = tempfile::tempdir().unwrap();
    let bundle = small_bundle(dir.path()).await;
    let bytes = std::fs::read(&bundle).unwrap();
    let b = dir.path().join("b");
    let disks = dir.path().join("disks");
    std::fs::create_dir_all(&disks).unwrap();
    let run = in_store(&b);
    let vm_name = std::cell::RefCell::new("vm2".to_owned());
    let try_import = |data: &[u8], extra: &[&str]| {
        let f = dir.path().join("try.qsnap");
        std::fs::write(&f, data).unwrap();
        let vm = vm_name.borrow().clone();
        let d = if vm == "vm2" {
            disks.clone()
        } else {
            disks.join(&vm)
        };
        let mut args = vec![
            "import",
            f.to_str().unwrap(),
            &vm,
            "--disk-dir",
            d.to_str().unwrap(),
        ];
        args.extend(extra);
        let out = run(&args);
        std::fs::remove_file(&f).unwrap();
        out
    };

    // One flipped byte anywhere: at the start (the manifest), the middle, near the end (the
    // seal) — and a bundle cut short at several points.
    for at in [40, bytes.len() / 3, bytes.len() / 2, bytes.len() - 40] {
        let mut d = bytes.clone();
        d[at] ^= 0x20;
        let out = try_import(&d, &["--trust-command-line"]);
        assert_eq!(out.status.code(), Some(1), "flip at {at}: {out:?}");
        assert!(
            text(&out.stderr).contains("not intact"),
            "flip at {at}: {}",
            text(&out.stderr)
        );
        nothing_left(&b, "vm2", &disks, &format!("flip at {at}"));
    }
    for cut in [100, bytes.len() / 2, bytes.len() - 10] {
        let out = try_import(&bytes[..cut], &["--trust-command-line"]);
        assert_eq!(out.status.code(), Some(1), "cut at {cut}: {out:?}");
        assert!(
            text(&out.stderr).contains("not intact"),
            "cut at {cut}: {}",
            text(&out.stderr)
        );
        nothing_left(&b, "vm2", &disks, &format!("cut at {cut}"));
    }

    // Its command line reads a host file into the guest: refused by name unless trusted.
    let out = try_import(&bytes, &[]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = text(&out.stderr);
    assert!(
        err.contains("-fw_cfg")
            && err.contains("names the host path /etc/hostname")
            && err.contains("--trust-command-line"),
        "{err}"
    );
    nothing_left(&b, "vm2", &disks, "untrusted");
    let out = try_import(&bytes, &["--trust-command-line", "--json"]);
    ok(&out, "trusted import");
    let rep = json(&out);
    assert!(rep["notes"].to_string().contains("/etc/hostname"), "{rep}");
    // Guest memory 0600 in 0700 directories; disk images 0600.
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&b.join("vms/vm2/memory/s1.mem")), 0o600);
    assert_eq!(mode(&b.join("vms/vm2/memory")), 0o700);
    for f in files_under(&disks) {
        assert_eq!(mode(&f), 0o600, "{}", f.display());
    }
    // A file where the new VM's overlay would go is never overwritten: refused, left as it
    // was, and nothing else made.
    let theirs = dir.path().join("theirs");
    std::fs::create_dir_all(&theirs).unwrap();
    std::fs::write(theirs.join("d.s1.qcow2"), b"someone's file").unwrap();
    let out = run(&[
        "import",
        bundle.to_str().unwrap(),
        "vm5",
        "--trust-command-line",
        "--disk-dir",
        theirs.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(text(&out.stderr).contains("already exists"), "{out:?}");
    assert_eq!(
        std::fs::read(theirs.join("d.s1.qcow2")).unwrap(),
        b"someone's file"
    );
    assert_eq!(files_under(&theirs).len(), 1, "{:?}", files_under(&theirs));
    assert!(!b.join("vms/vm5").exists());
    // A name in use is refused, writing nothing.
    let before = files_under(&disks).len();
    let out = try_import(&bytes, &["--trust-command-line"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(text(&out.stderr).contains("exists"), "{out:?}");
    assert_eq!(files_under(&disks).len(), before);
    // The imported VM starts from its snapshot.
    let _kill = KillRecordedQemu::new(&b, "vm2");
    ok(&run(&["revert", "vm2", "s1"]), "revert");
    ok(&run(&["check", "vm2"]), "check");
    ok(&run(&["stop", "vm2"]), "stop");
    // A bundle re-packed by hand: bytes changed inside a file, or the manifest changed, with
    // the compression intact — only the seal's BLAKE3 hashes can tell.
    *vm_name.borrow_mut() = "r1".to_owned();
    if let Some(tar) = unzstd(&bytes) {
        let mem = find(&tar, b"memory/state.mem").expect("the memory entry");
        let mut t = tar.clone();
        // The memory file's first data block follows its header block(s); its first bytes
        // are qsnap's header magic.
        let data = find(&t[mem..], b"QSNAPMEM").expect("memory data") + mem;
        t[data] ^= 1;
        let out = try_import(&rezstd(&t), &["--trust-command-line"]);
        assert_eq!(out.status.code(), Some(1), "{out:?}");
        assert!(
            text(&out.stderr).contains("does not match its hash"),
            "{}",
            text(&out.stderr)
        );
        nothing_left(&b, "r1", &disks.join("r1"), "a file changed");
        let mut t = tar.clone();
        let at = find(&t, b"\"created-at\": \"2").expect("created-at") + 15;
        t[at] = b'1';
        let out = try_import(&rezstd(&t), &["--trust-command-line"]);
        assert_eq!(out.status.code(), Some(1), "{out:?}");
        assert!(
            text(&out.stderr).contains("manifest does not match"),
            "{}",
            text(&out.stderr)
        );
        nothing_left(&b, "r1", &disks.join("r1"), "the manifest changed");
    }

    // Signed bundles: --trust takes only a bundle signed by a trusted key, and trusts its
    // command line then; an unsigned one, or one signed by another key, is refused.
    let a = dir.path().join("a");
    *vm_name.borrow_mut() = "vm3".to_owned();
    let keys = dir.path().join("keys");
    std::fs::create_dir_all(&keys).unwrap();
    for k in ["ours", "theirs"] {
        ok(&run(&["keygen", keys.join(k).to_str().unwrap()]), "keygen");
    }
    let again = run(&["keygen", keys.join("ours").to_str().unwrap()]);
    assert_eq!(again.status.code(), Some(1), "keygen over a key: {again:?}");
    let signed = dir.path().join("signed.qsnap");
    let key = keys.join("ours.key");
    ok(
        &in_store(&a)(&[
            "export",
            "vm1",
            "s1",
            signed.to_str().unwrap(),
            "--sign",
            key.to_str().unwrap(),
        ]),
        "export --sign",
    );
    let signed_bytes = std::fs::read(&signed).unwrap();
    let ours = keys.join("ours.pub");
    let theirs = keys.join("theirs.pub");
    let trust = |k: &Path| ["--trust".to_owned(), k.to_str().unwrap().to_owned()];
    let t = trust(&theirs);
    let out = try_import(&signed_bytes, &[&t[0], &t[1]]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        text(&out.stderr).contains("not by a key you trust"),
        "{out:?}"
    );
    nothing_left(&b, "vm3", &disks.join("vm3"), "signed by another key");
    let o = trust(&ours);
    let out = try_import(&bytes, &[&o[0], &o[1]]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(text(&out.stderr).contains("not signed"), "{out:?}");
    let out = try_import(&signed_bytes, &[&o[0], &o[1], "--json"]);
    ok(&out, "import --trust");
    assert!(json(&out)["notes"]
        .to_string()
        .contains("signed by a key you trust"));
    // Not a bundle at all.
    let out = try_import(b"hello", &[]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(text(&out.stderr).contains("not intact"), "{out:?}");
}

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
