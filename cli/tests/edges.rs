//! Input at the edge, through the real `qsnap` binary against real (kernel-less) QEMUs: what
//! `run`, `attach` and `create` must refuse before anything changes, and the old stores
//! `check --repair` must still be able to fix.
//!
//! - a relative `--overlay-dir` is resolved where the user typed it; a store an older qsnap
//!   wrote with relative paths is reported by `check` and repaired by `check --repair` — and
//!   left alone when qsnap cannot tell which file a path means;
//! - a drive that writes to a throwaway temporary file (`snapshot=on`, `-snapshot`) is refused
//!   at `run`, `attach` and `create`;
//! - an image path that is not the file QEMU has open (a daemonized QEMU's relative paths, an
//!   image replaced under a running VM) is refused at `attach`, `run` and `create`;
//! - an image another VM of the store froze or writes to is refused at `run` and `attach`;
//! - one QEMU is registered under one name only;
//! - an overlay or memory directory that cannot take the files is refused in preflight.

use qsnap_qmp::{ConnectOptions, Qmp};
use qsnap_testkit::disk_io::{check, write, Disk};
use qsnap_testkit::{create_image, qemu_binary, require_qemu, VmBuilder};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::{Duration, Instant};

fn qsnap_bin() -> PathBuf {
    assert_cmd::cargo::cargo_bin("qsnap")
}

fn show(out: &Output) -> String {
    format!(
        "status {:?}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn json(out: &Output) -> Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", show(out)))
}

/// Pids of the QEMUs whose command line names `needle` (a path of this test's own).
fn qemus_naming(needle: &str) -> Vec<u32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(cmd) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let cmd = String::from_utf8_lossy(&cmd);
        if cmd.split('\0').next().is_some_and(|a| a.contains("qemu")) && cmd.contains(needle) {
            out.push(pid);
        }
    }
    out
}

/// Waits (at most 15 s) until no QEMU names `needle`; panics naming the survivors.
fn no_qemu_naming(needle: &str, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let left = qemus_naming(needle);
        if left.is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: QEMU still running (pids {left:?})"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn kill(pid: u32) {
    let _ = std::process::Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status();
}

/// A test's directory and store. Every QEMU whose command line names the directory is killed
/// when the test ends, pass or fail (`qsnap run` detaches its QEMUs, `-daemonize` too).
struct Rig {
    dir: tempfile::TempDir,
}

impl Drop for Rig {
    fn drop(&mut self) {
        for pid in qemus_naming(&self.dir.path().display().to_string()) {
            kill(pid);
        }
    }
}

impl Rig {
    fn new() -> Rig {
        Rig {
            dir: tempfile::tempdir().unwrap(),
        }
    }

    /// A rig with VM `g` started by `qsnap run` (one qcow2 disk `vd0` at `disk.qcow2`, run
    /// from the test's directory).
    async fn with_vm() -> Rig {
        let rig = Rig::new();
        let argv =
            VmBuilder::idle_with_disk(&rig.path("disk.qcow2"), "32M", &rig.path("g.log")).await;
        rig.run("g", &argv).expect_ok("run g");
        rig
    }

    fn path(&self, p: &str) -> PathBuf {
        self.dir.path().join(p)
    }

    fn store(&self) -> PathBuf {
        self.path("store")
    }

    /// `qsnap ARGS…` from the test's directory, against its store.
    fn qsnap(&self, args: &[&str]) -> Output {
        let out = std::process::Command::new(qsnap_bin())
            .current_dir(self.dir.path())
            .env("QSNAP_STORE", self.store())
            .env("NO_COLOR", "1")
            .env_remove("FAILPOINTS")
            .args(args)
            .output()
            .unwrap();
        qsnap_testkit::json_output::check(args, &out);
        out
    }

    fn run(&self, vm: &str, argv: &[String]) -> Output {
        let mut args = vec!["run", vm, "--"];
        args.extend(argv.iter().map(String::as_str));
        self.qsnap(&args)
    }

    async fn qmp(&self, vm: &str) -> Qmp {
        connect(&self.store().join("vms").join(vm).join("qmp.sock")).await
    }

    /// Writes pattern `step` (64 KiB at `step` × 64 KiB) on `g`'s disk, flushed.
    async fn put(&self, step: u8) {
        let qmp = self.qmp("g").await;
        write(&qmp, &vd0(), 0x40 + step, u64::from(step) * 64, 64).await;
    }

    /// Whether `g`'s disk holds exactly the patterns 1..=upto.
    async fn holds(&self, upto: u8) {
        let qmp = self.qmp("g").await;
        for step in 1..=upto {
            check(&qmp, &vd0(), 0x40 + step, u64::from(step) * 64, 64)
                .await
                .unwrap_or_else(|e| panic!("step {step}: {e}"));
        }
    }

    fn has_record(&self, vm: &str) -> bool {
        self.store().join("vms").join(vm).join("vm.json").exists()
    }

    /// The image files (`*.qcow2`) in `dir` of the test's directory.
    fn images_in(&self, dir: &str) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(self.path(dir))
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".qcow2"))
            .collect();
        names.sort();
        names
    }
}

trait Expect {
    fn expect_ok(&self, what: &str);
    /// Exit 6 (refused: nothing changed) with every one of `words` on stderr.
    fn expect_refused(&self, what: &str, words: &[&str]);
    /// Exit 1 (failed) with every one of `words` on stderr.
    fn expect_failed(&self, what: &str, words: &[&str]);
}

impl Expect for Output {
    fn expect_ok(&self, what: &str) {
        assert!(self.status.success(), "{what}: {}", show(self));
    }

    fn expect_failed(&self, what: &str, words: &[&str]) {
        assert_eq!(self.status.code(), Some(1), "{what}: {}", show(self));
        let err = stderr(self);
        for w in words {
            assert!(err.contains(w), "{what}: no {w:?} in: {}", show(self));
        }
    }

    fn expect_refused(&self, what: &str, words: &[&str]) {
        assert_eq!(self.status.code(), Some(6), "{what}: {}", show(self));
        let err = stderr(self);
        for w in words {
            assert!(err.contains(w), "{what}: no {w:?} in: {}", show(self));
        }
    }
}

fn vd0() -> Disk {
    Disk::Device("vd0".into())
}

async fn connect(socket: &Path) -> Qmp {
    let opts = ConnectOptions {
        connect_retry: Duration::from_secs(10),
        ..ConnectOptions::default()
    };
    Qmp::connect_with(socket.to_owned(), &opts)
        .await
        .unwrap_or_else(|e| panic!("{}: {e}", socket.display()))
}

/// A kernel-less QEMU started outside qsnap (for `attach`), from `cwd`, with a monitor at
/// `socket`, its temp files (`snapshot=on`) in `cwd` too. Killed by the rig.
async fn external_qemu(cwd: &Path, socket: &Path, extra: &[&str]) {
    let mut c = std::process::Command::new(qemu_binary());
    c.current_dir(cwd)
        .env("TMPDIR", cwd)
        .args([
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-accel",
            "tcg",
            "-m",
            "64",
            "-qmp",
        ])
        .arg(format!("unix:{},server=on,wait=off", socket.display()))
        .args(extra)
        .stdin(std::process::Stdio::null())
        .stdout(std::fs::File::create(cwd.join("external.log")).unwrap())
        .stderr(std::fs::File::create(cwd.join("external.err")).unwrap());
    if extra.contains(&"-daemonize") {
        // The parent returns once QEMU is set up (or failed).
        let status = c.status().unwrap();
        assert!(
            status.success(),
            "QEMU did not daemonize: {}",
            std::fs::read_to_string(cwd.join("external.err")).unwrap_or_default()
        );
    } else {
        let mut child = c.spawn().unwrap();
        // Reaped whenever it ends (the rig kills it).
        std::thread::spawn(move || child.wait());
    }
    drop(connect(socket).await);
}

/// Item 14: `create --overlay-dir ovl` records where the user meant (their directory), the
/// engine refuses a relative overlay directory outright, and a store an older qsnap wrote
/// with relative paths (which every command refused to read) is reported by `check` and
/// repaired by `check --repair`, after which `delete --all` merges everything back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relative_overlay_dir_is_resolved_and_an_old_store_is_repaired() {
    require_qemu!();
    let rig = Rig::with_vm().await;
    let dir = rig.dir.path().display().to_string();
    std::fs::create_dir(rig.path("ovl")).unwrap();
    rig.put(1).await;

    // The CLI resolves it against its own directory.
    let out = rig.qsnap(&["create", "g", "s1", "--overlay-dir", "ovl", "--json"]);
    out.expect_ok("create --overlay-dir ovl");
    let overlay = rig.path("ovl/disk.s1.qcow2");
    assert_eq!(
        json(&out)["disks"][0]["overlay"],
        overlay.display().to_string()
    );
    rig.qsnap(&["list", "g"]).expect_ok("list");
    rig.put(2).await;

    // An embedder's relative overlay directory is refused before anything changes.
    let engine = qsnap_engine::Engine::new(qsnap_engine::Store::new(rig.store()));
    let vm = engine
        .vm(&qsnap_engine::VmName::new("g").unwrap())
        .await
        .unwrap();
    let mut opts = vm.create_options(qsnap_engine::SnapshotName::new("s2").unwrap());
    opts.overlay_dir = Some("ovl".into());
    let refused = vm.create_snapshot(opts).await.unwrap_err();
    assert!(
        matches!(refused, qsnap_engine::Error::UnusableDirectory { .. }),
        "{refused:?}"
    );
    assert!(refused.to_string().contains("relative"), "{refused}");
    drop(vm);

    // What an older qsnap wrote for `--overlay-dir ovl`: the overlay by a relative path, in
    // the manifest and in the record.
    let manifest = rig.store().join("vms/g/snapshots/s1.json");
    let record = rig.store().join("vms/g/vm.json");
    for f in [&manifest, &record] {
        let text = std::fs::read_to_string(f).unwrap();
        let old = text.replace(&format!("\"{dir}/ovl/"), "\"ovl/");
        assert_ne!(text, old, "{}", f.display());
        std::fs::write(f, old).unwrap();
    }
    rig.qsnap(&["list", "g"]).expect_failed(
        "list of an old store",
        &["relative image path", "qsnap check g --repair"],
    );

    let out = rig.qsnap(&["check", "g", "--json"]);
    assert_eq!(out.status.code(), Some(1), "{}", show(&out));
    let findings = json(&out)["findings"].as_array().unwrap().clone();
    assert_eq!(findings.len(), 2, "{findings:?}");
    for (f, file) in findings.iter().zip([&manifest, &record]) {
        assert_eq!(f["kind"], "relative-path", "{f}");
        let what = f["what"].as_str().unwrap();
        assert!(what.contains(&file.display().to_string()), "{f}");
        assert!(what.contains("ovl/disk.s1.qcow2"), "{f}");
        let fix = f["fix"].as_str().unwrap();
        assert!(
            fix.contains(&overlay.display().to_string()) && fix.contains("--repair"),
            "{f}"
        );
        assert_eq!(f["repaired"], false, "{f}");
    }

    rig.qsnap(&["check", "g", "--repair"])
        .expect_ok("check --repair");
    let out = rig.qsnap(&["check", "g", "--json"]);
    out.expect_ok("check after the repair");
    assert_eq!(json(&out)["findings"], Value::Array(Vec::new()));
    let out = rig.qsnap(&["show", "g", "s1", "--json"]);
    out.expect_ok("show");
    assert_eq!(
        json(&out)["disks"][0]["overlay"],
        overlay.display().to_string()
    );

    // Everything works on it again: the layers merge back, no data is lost.
    rig.qsnap(&["delete", "g", "--all"])
        .expect_ok("delete --all");
    rig.holds(2).await;
    assert!(
        rig.images_in("ovl").is_empty(),
        "{:?}",
        rig.images_in("ovl")
    );
    let out = rig.qsnap(&["check", "g", "--json"]);
    out.expect_ok("check after delete --all");
}

/// Item 14: a relative path qsnap cannot place (no file there backs onto the image it must)
/// is reported with what to do, and `--repair` leaves the file as it is; once the file is
/// back where the path leads, the repair resolves it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relative_paths_qsnap_cannot_place_are_reported_never_guessed() {
    require_qemu!();
    let rig = Rig::with_vm().await;
    let dir = rig.dir.path().display().to_string();
    std::fs::create_dir(rig.path("ovl")).unwrap();
    rig.qsnap(&[
        "create",
        "g",
        "s1",
        "--overlay-dir",
        &rig.path("ovl").display().to_string(),
    ])
    .expect_ok("create");
    let manifest = rig.store().join("vms/g/snapshots/s1.json");
    let record = rig.store().join("vms/g/vm.json");
    for f in [&manifest, &record] {
        let text = std::fs::read_to_string(f).unwrap();
        std::fs::write(f, text.replace(&format!("\"{dir}/ovl/"), "\"ovl/")).unwrap();
    }
    // The overlay is elsewhere now (QEMU keeps writing to it by its open descriptor); a
    // decoy qcow2 over another image sits where the path leads.
    std::fs::rename(rig.path("ovl"), rig.path("moved")).unwrap();
    std::fs::create_dir(rig.path("ovl")).unwrap();
    create_image(&rig.path("other.qcow2"), "qcow2", "32M").await;
    let decoy = std::process::Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b"])
        .arg(rig.path("other.qcow2"))
        .arg(rig.path("ovl/disk.s1.qcow2"))
        .status()
        .unwrap();
    assert!(decoy.success());
    let before = std::fs::read(&manifest).unwrap();

    let out = rig.qsnap(&["check", "g", "--repair", "--json"]);
    assert_eq!(out.status.code(), Some(1), "{}", show(&out));
    let findings = json(&out)["findings"].as_array().unwrap().clone();
    let f = findings
        .iter()
        .find(|f| {
            f["what"]
                .as_str()
                .is_some_and(|w| w.contains(&manifest.display().to_string()))
        })
        .unwrap_or_else(|| panic!("{findings:?}"));
    assert_eq!(f["kind"], "relative-path");
    assert_eq!(f["repaired"], false);
    let fix = f["fix"].as_str().unwrap();
    assert!(
        fix.contains("cannot tell") && fix.contains("absolute path") && fix.contains("disk.qcow2"),
        "{fix}"
    );
    assert_eq!(
        std::fs::read(&manifest).unwrap(),
        before,
        "the manifest was rewritten"
    );
    rig.qsnap(&["list", "g"])
        .expect_failed("list", &["relative image path"]);

    // The real overlay back where the path leads (the decoy out of the way): resolved.
    std::fs::remove_dir_all(rig.path("ovl")).unwrap();
    std::fs::rename(rig.path("moved"), rig.path("ovl")).unwrap();
    rig.qsnap(&["check", "g", "--repair"])
        .expect_ok("check --repair");
    rig.qsnap(&["check", "g"]).expect_ok("check");
    rig.qsnap(&["delete", "g", "s1"]).expect_ok("delete");
}

/// Item 15: a drive with `snapshot=on` (or QEMU's `-snapshot`) writes to a temporary file
/// QEMU deletes at once. `run` refuses it before QEMU starts, `attach` refuses such a QEMU,
/// and `create` refuses a VM that gained such a drive — naming it, changing nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_on_drives_are_refused_at_run_attach_and_create() {
    require_qemu!();
    let rig = Rig::new();
    let disk = rig.path("d.qcow2");
    create_image(&disk, "qcow2", "16M").await;
    let base = VmBuilder::idle()
        .memory(64)
        .command_line(&rig.path("t.log"))
        .await;
    let drive = format!("file={},if=virtio,id=drive0", disk.display());

    let mut argv = base.clone();
    argv.extend(["-drive".to_owned(), format!("{drive},snapshot=on")]);
    rig.run("t", &argv).expect_refused(
        "run with snapshot=on",
        &[
            "snapshot=on",
            "temporary file",
            "reverted",
            "Remove snapshot=on",
        ],
    );
    let mut argv = base.clone();
    argv.extend(["-drive".to_owned(), drive.clone(), "-snapshot".to_owned()]);
    rig.run("t", &argv)
        .expect_refused("run with -snapshot", &["-snapshot", "temporary file"]);
    assert!(!rig.has_record("t"));
    no_qemu_naming(&rig.path("t.log").display().to_string(), "refused runs");

    // A QEMU started elsewhere with such a drive.
    let sock = rig.path("ext.sock");
    external_qemu(
        rig.dir.path(),
        &sock,
        &["-drive", &format!("{drive},snapshot=on")],
    )
    .await;
    rig.qsnap(&["attach", "t", "--qmp", &sock.display().to_string()])
        .expect_refused("attach", &["snapshot=on", "temporary file"]);
    assert!(!rig.has_record("t"));

    // A VM that gains such a drive after it was registered: create refuses to freeze it.
    let sock2 = rig.path("ext2.sock");
    let e = rig.path("e.qcow2");
    create_image(&e, "qcow2", "16M").await;
    let h = rig.path("h.qcow2");
    create_image(&h, "qcow2", "16M").await;
    let drive_e = format!("file={},if=virtio,id=drive0", e.display());
    external_qemu(rig.dir.path(), &sock2, &["-drive", &drive_e]).await;
    rig.qsnap(&["attach", "u", "--qmp", &sock2.display().to_string()])
        .expect_ok("attach u");
    let qmp = connect(&sock2).await;
    let hot = format!(
        "drive_add 0 file={},snapshot=on,if=none,id=tmp0",
        h.display()
    );
    qmp.execute_raw(
        "human-monitor-command",
        Some(serde_json::json!({ "command-line": hot })),
    )
    .await
    .unwrap();
    drop(qmp);
    let before = rig.images_in(".");
    rig.qsnap(&["create", "u", "s1"]).expect_refused(
        "create with a snapshot=on drive",
        &[
            "disk tmp0 cannot be snapshotted",
            "temporary file",
            "snapshot=on",
        ],
    );
    assert_eq!(rig.images_in("."), before, "create left files");
    let out = rig.qsnap(&["list", "u", "--json"]);
    out.expect_ok("list u");
    assert_eq!(json(&out)["snapshots"], Value::Array(Vec::new()));
}

/// Item 16: a daemonized QEMU moves to `/`, so its relative image names no longer lead to the
/// files it has open. `attach` refuses it and `run` stops the QEMU it started (nothing left
/// running, no record); `create` refuses an image path that no longer is the file QEMU has
/// open (replaced under the running VM) before it freezes anything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn image_paths_that_are_not_what_qemu_has_open_are_refused() {
    require_qemu!();
    let rig = Rig::with_vm().await;
    create_image(&rig.path("disk7.qcow2"), "qcow2", "16M").await;
    let sock = rig.path("d7.sock");
    external_qemu(
        rig.dir.path(),
        &sock,
        &[
            "-drive",
            "file=disk7.qcow2,if=virtio,id=drive0",
            "-daemonize",
            "-pidfile",
            &rig.path("d7.pid").display().to_string(),
        ],
    )
    .await;
    rig.qsnap(&["attach", "d7", "--qmp", &sock.display().to_string()])
        .expect_refused(
            "attach of a daemonized QEMU with a relative path",
            &[
                "disk drive0",
                "\"disk7.qcow2\"",
                "relative path",
                "/disk7.qcow2",
                "absolute image paths",
            ],
        );
    assert!(!rig.has_record("d7"));
    assert!(!Path::new("/disk7.a.qcow2").exists());

    create_image(&rig.path("disk8.qcow2"), "qcow2", "16M").await;
    let mut argv = VmBuilder::idle()
        .memory(64)
        .command_line(&rig.path("d8.log"))
        .await;
    argv.extend(
        [
            "-drive",
            "file=disk8.qcow2,if=virtio,id=drive0",
            "-daemonize",
        ]
        .map(String::from),
    );
    rig.run("d8", &argv).expect_refused(
        "run -daemonize with a relative path",
        &["\"disk8.qcow2\"", "absolute image paths"],
    );
    assert!(!rig.has_record("d8"));
    no_qemu_naming(
        &rig.path("d8.log").display().to_string(),
        "the refused run's QEMU",
    );

    // g's image replaced under it: its path now names another file.
    rig.put(1).await;
    std::fs::rename(rig.path("disk.qcow2"), rig.path("moved.qcow2")).unwrap();
    create_image(&rig.path("disk.qcow2"), "qcow2", "32M").await;
    let before = rig.images_in(".");
    rig.qsnap(&["create", "g", "s1"]).expect_refused(
        "create over a replaced image",
        &[
            "disk vd0 cannot be snapshotted",
            "disk.qcow2 is not the file QEMU has open",
        ],
    );
    assert_eq!(rig.images_in("."), before, "create left files");
    let out = rig.qsnap(&["list", "g", "--json"]);
    assert_eq!(json(&out)["snapshots"], Value::Array(Vec::new()));
    // Put back, the same create goes through, and the data is there.
    std::fs::rename(rig.path("moved.qcow2"), rig.path("disk.qcow2")).unwrap();
    rig.qsnap(&["create", "g", "s1"]).expect_ok("create");
    rig.holds(1).await;
}

/// Item 17: a disk that is another VM's frozen snapshot image, or the image it writes to, is
/// refused by `run` (before QEMU starts when the command line shows it, else before the
/// record is written, stopping the QEMU) and by `attach`, naming the VM and snapshot. An
/// overlay of one's own over the frozen image (only read) is fine.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_vms_images_are_refused_at_run_and_attach() {
    require_qemu!();
    let rig = Rig::with_vm().await;
    rig.put(1).await;
    rig.qsnap(&["create", "g", "s1"]).expect_ok("create");
    rig.qsnap(&["stop", "g"]).expect_ok("stop");
    let frozen = rig.path("disk.qcow2");
    let current = rig.path("disk.s1.qcow2");
    let frozen_sum = std::fs::read(&frozen).unwrap();
    let h_log = rig.path("h.log").display().to_string();
    let argv_on = |drive: String| {
        let log = rig.path("h.log");
        async move {
            let mut a = VmBuilder::idle().memory(64).command_line(&log).await;
            a.extend(["-drive".to_owned(), drive]);
            a
        }
    };

    let out = rig.run(
        "h",
        &argv_on(format!("file={},if=virtio", frozen.display())).await,
    );
    out.expect_refused(
        "run on g's frozen image",
        &["frozen by snapshot s1 of VM g", "its own"],
    );
    let out = rig.run(
        "h",
        &argv_on(format!("file={},if=virtio", current.display())).await,
    );
    out.expect_refused("run on g's current image", &["the image VM g writes to"]);
    std::os::unix::fs::symlink(&frozen, rig.path("link.qcow2")).unwrap();
    let out = rig.run("h", &argv_on("file=link.qcow2,if=virtio".into()).await);
    out.expect_refused("run on a symlink to it", &["frozen by snapshot s1 of VM g"]);
    // Refused before QEMU started: QEMU never ran, so no log.
    assert!(
        !rig.path("h.log").exists(),
        "QEMU was started for a refused run"
    );
    // A name only QEMU resolves (json:): refused once QEMU runs, and that QEMU is stopped.
    let json_name = format!(
        "file=json:{{\"driver\":\"qcow2\",,\"file\":{{\"driver\":\"file\",,\"filename\":\"{}\"}}}},if=virtio",
        frozen.display()
    );
    let out = rig.run("h", &argv_on(json_name).await);
    out.expect_refused(
        "run on a json: name of it",
        &["frozen by snapshot s1 of VM g"],
    );
    no_qemu_naming(&h_log, "the refused run's QEMU");
    assert!(!rig.has_record("h"));

    let sock = rig.path("ext.sock");
    external_qemu(
        rig.dir.path(),
        &sock,
        &["-drive", &format!("file={},if=virtio", frozen.display())],
    )
    .await;
    rig.qsnap(&["attach", "h", "--qmp", &sock.display().to_string()])
        .expect_refused(
            "attach on g's frozen image",
            &["frozen by snapshot s1 of VM g"],
        );
    assert!(!rig.has_record("h"));
    for pid in qemus_naming(&sock.display().to_string()) {
        kill(pid);
    }
    no_qemu_naming(&sock.display().to_string(), "the external QEMU");
    assert_eq!(
        std::fs::read(&frozen).unwrap(),
        frozen_sum,
        "the frozen image changed"
    );

    // Reading g's frozen image through an overlay of one's own is not writing to it.
    let mine = rig.path("mine.qcow2");
    let made = std::process::Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b"])
        .arg(&frozen)
        .arg(&mine)
        .status()
        .unwrap();
    assert!(made.success());
    let out = rig.run(
        "h",
        &argv_on(format!("file={},if=virtio", mine.display())).await,
    );
    out.expect_ok("run on an overlay of one's own");
    rig.qsnap(&["stop", "h"]).expect_ok("stop h");
    rig.qsnap(&["start", "g"]).expect_ok("start g");
    rig.holds(1).await;
}

/// Item 18: one QEMU is registered once. `attach` refuses it under a second name, by the same
/// socket (also through another path to it) or by the same live process (another monitor of
/// it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_qemu_is_registered_under_one_name() {
    require_qemu!();
    let rig = Rig::with_vm().await;
    let g_sock = rig.store().join("vms/g/qmp.sock");
    rig.qsnap(&["attach", "h", "--qmp", &g_sock.display().to_string()])
        .expect_refused(
            "attach g's socket as h",
            &["already registered as \"g\"", "same monitor socket"],
        );
    std::os::unix::fs::symlink(&g_sock, rig.path("alias.sock")).unwrap();
    rig.qsnap(&[
        "attach",
        "h",
        "--qmp",
        &rig.path("alias.sock").display().to_string(),
    ])
    .expect_refused(
        "attach through another path",
        &["already registered as \"g\""],
    );

    let (one, two) = (rig.path("one.sock"), rig.path("two.sock"));
    let second = format!("unix:{},server=on,wait=off", two.display());
    external_qemu(rig.dir.path(), &one, &["-qmp", &second]).await;
    rig.qsnap(&["attach", "vm1", "--qmp", &one.display().to_string()])
        .expect_ok("attach vm1");
    rig.qsnap(&["attach", "vm2", "--qmp", &two.display().to_string()])
        .expect_refused(
            "attach its second monitor",
            &["already registered as \"vm1\"", "same QEMU process"],
        );
    assert!(!rig.has_record("h") && !rig.has_record("vm2"));
    rig.qsnap(&["check", "vm1"]).expect_ok("check vm1");
    rig.qsnap(&["check", "g"]).expect_ok("check g");
}

/// Item 21: a missing, non-directory or unwritable overlay directory, and a memory directory
/// that cannot be made, are refused in preflight — before the journal, so before the guest
/// is touched (a crash injected right after the journal never fires) — naming the directory
/// and pointing at `--overlay-dir`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unusable_overlay_and_memory_directories_are_refused_in_preflight() {
    require_qemu!();
    let rig = Rig::with_vm().await;
    std::fs::write(rig.path("afile"), b"").unwrap();
    let afile = rig.path("afile").display().to_string();
    let cases: [(&str, &[&str]); 3] = [
        (
            "/nonexistent-qsnap-dir",
            &[
                "overlay directory /nonexistent-qsnap-dir",
                "does not exist",
                "--overlay-dir",
            ],
        ),
        (afile.as_str(), &["not a directory", "--overlay-dir"]),
        // Root may write anywhere but here.
        (
            "/sys",
            &[
                "overlay directory /sys",
                "cannot create files in it",
                "--overlay-dir",
            ],
        ),
    ];
    let create = |extra: &[&str]| {
        let mut args = vec!["create", "g", "s1"];
        args.extend(extra);
        std::process::Command::new(qsnap_bin())
            .current_dir(rig.dir.path())
            .env("QSNAP_STORE", rig.store())
            .env("FAILPOINTS", "create.journaled=return(crash)")
            .args(args)
            .output()
            .unwrap()
    };
    for (dir, words) in cases {
        create(&["--overlay-dir", dir]).expect_refused(dir, words);
    }
    // The memory directory, which a create makes when missing, cannot be: a file is in the way.
    let memory = rig.store().join("vms/g/memory");
    std::fs::write(&memory, b"").unwrap();
    create(&[]).expect_refused(
        "memory directory",
        &[
            &format!("memory directory {}", memory.display()),
            "not a directory",
        ],
    );
    std::fs::remove_file(&memory).unwrap();
    assert!(!rig.store().join("vms/g/journal.json").exists());
    let out = rig.qsnap(&["status", "g", "--json"]);
    assert_eq!(json(&out)["state"]["runstate"], "running", "{}", show(&out));
    assert!(
        rig.images_in(".") == ["disk.qcow2"],
        "{:?}",
        rig.images_in(".")
    );
    rig.qsnap(&["create", "g", "s1"])
        .expect_ok("create once the directories are fine");
}

/// A monitor socket this user may not open (QEMU started by root, qsnap run as `nobody`): the
/// error says so and what to do, instead of asking whether QEMU runs, exits 3 (unreachable)
/// and registers nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_socket_this_user_may_not_open_is_said_to_be_someone_elses() {
    require_qemu!();
    if !qsnap_testkit::root_or_skip("a_socket_this_user_may_not_open_is_said_to_be_someone_elses") {
        return;
    }
    use std::os::unix::fs::PermissionsExt;
    // (The rig kills the QEMU when the test ends, passed or not.)
    let dir = Rig::new();
    let dir = &dir.dir;
    let open_to_all = |p: &Path, mode: u32| {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
    };
    open_to_all(dir.path(), 0o755);
    // (The binary copied where `nobody` may run it: the checkout may be under /root.)
    let bin = dir.path().join("qsnap");
    std::fs::copy(qsnap_bin(), &bin).unwrap();
    open_to_all(&bin, 0o755);
    let store = dir.path().join("store");
    std::fs::create_dir(&store).unwrap();
    open_to_all(&store, 0o777);
    let qemu_dir = dir.path().join("qemu");
    std::fs::create_dir(&qemu_dir).unwrap();
    open_to_all(&qemu_dir, 0o755);
    let sock = qemu_dir.join("q.sock");
    external_qemu(&qemu_dir, &sock, &[]).await;
    let mode = std::fs::metadata(&sock).unwrap().permissions().mode();
    assert_eq!(mode & 0o002, 0, "the socket is writable by all ({mode:o})");

    let out = std::process::Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(&bin)
        .arg("--store")
        .arg(&store)
        .args(["attach", "t", "--qmp"])
        .arg(&sock)
        .output()
        .expect("setpriv (util-linux) runs qsnap as nobody");
    assert_eq!(out.status.code(), Some(3), "{}", show(&out));
    let err = stderr(&out);
    assert!(err.contains("Permission denied"), "{err}");
    assert!(
        err.contains("run qsnap as the user that started QEMU"),
        "{err}"
    );
    assert!(!err.contains("is QEMU running"), "{err}");
    assert!(!store.join("vms").join("t").join("vm.json").exists());
    // The same socket, by its owner: reachable.
    let qmp = connect(&sock).await;
    drop(qmp);
}
