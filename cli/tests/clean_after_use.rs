//! `qsnap check` is clean after any sequence of successful commands: a monitoring script that
//! runs it must never alert after normal use. A delete can make a layer elsewhere in the tree
//! mergeable, and so can a revert that abandons an overlay (the second child of a base no
//! snapshot names any more); whichever command made it mergeable merges it.
//!
//! Kernel-less VMs with two disks (`-drive` qcow2 + `-drive` raw), running; their contents
//! written and checked with QEMU's own `qemu-io`.

use qsnap_qmp::{ConnectOptions, Qmp};
use qsnap_testkit::disk_io::{check, write, Disk};
use qsnap_testkit::{create_image, require_qemu, DiskStyle, KillRecordedQemu, VmBuilder};
use serde_json::Value;
use std::path::PathBuf;
use std::process::Output;
use std::time::Duration;

struct Rig {
    _kill: KillRecordedQemu,
    dir: tempfile::TempDir,
}

fn show(out: &Output) -> String {
    format!(
        "status {:?}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

impl Rig {
    async fn two_disks() -> Rig {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a.qcow2"), dir.path().join("b.raw"));
        create_image(&a, "qcow2", "32M").await;
        create_image(&b, "raw", "32M").await;
        let argv = VmBuilder::idle()
            .memory(64)
            .disk(&a, "qcow2", DiskStyle::Drive)
            .disk(&b, "raw", DiskStyle::Drive)
            .command_line(&dir.path().join("serial.log"))
            .await;
        let rig = Rig {
            _kill: KillRecordedQemu::new(&dir.path().join("store"), "vm"),
            dir,
        };
        let mut args = vec!["run", "vm", "--"];
        args.extend(argv.iter().map(String::as_str));
        rig.ok(&args);
        rig
    }

    fn qsnap(&self, args: &[&str]) -> Output {
        let out = std::process::Command::new(assert_cmd::cargo::cargo_bin("qsnap"))
            .env("QSNAP_STORE", self.dir.path().join("store"))
            .env_remove("FAILPOINTS")
            .args(args)
            .output()
            .unwrap();
        qsnap_testkit::json_output::check(args, &out);
        out
    }

    fn ok(&self, args: &[&str]) -> Output {
        let out = self.qsnap(args);
        assert!(
            out.status.success(),
            "qsnap {}: {}",
            args.join(" "),
            show(&out)
        );
        out
    }

    /// `qsnap check vm` exits 0 and finds nothing.
    fn clean(&self, after: &str) {
        let out = self.qsnap(&["check", "vm", "--json"]);
        assert!(out.status.success(), "check after {after}: {}", show(&out));
        let report: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(
            report["findings"],
            Value::Array(Vec::new()),
            "after {after}: {report}"
        );
    }

    /// Runs `qsnap ARGS`, which must succeed, then `check`, which must be clean.
    fn step(&self, args: &[&str]) {
        self.ok(args);
        self.clean(&format!("qsnap {}", args.join(" ")));
    }

    async fn qmp(&self) -> Qmp {
        let opts = ConnectOptions {
            connect_retry: Duration::from_secs(5),
            ..ConnectOptions::default()
        };
        Qmp::connect_with(self.dir.path().join("store/vms/vm/qmp.sock"), &opts)
            .await
            .unwrap()
    }

    /// Writes `tag`'s pattern on both disks at the tag's own offset.
    async fn put(&self, tag: u8) {
        let qmp = self.qmp().await;
        for d in disks() {
            write(&qmp, &d, tag, u64::from(tag) * 64, 64).await;
        }
    }

    /// Both disks hold exactly `tags` (of 1..=max).
    async fn holds(&self, tags: &[u8], max: u8, what: &str) {
        let qmp = self.qmp().await;
        for d in disks() {
            for t in 1..=max {
                let p = if tags.contains(&t) { t } else { 0 };
                check(&qmp, &d, p, u64::from(t) * 64, 64)
                    .await
                    .unwrap_or_else(|e| panic!("{what}: {d:?} tag {t}: {e}"));
            }
        }
    }

    fn images(&self) -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = std::fs::read_dir(self.dir.path())
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "qcow2" || x == "raw"))
            .collect();
        v.sort();
        v
    }
}

fn disks() -> [Disk; 2] {
    [Disk::Drive("drive0".into()), Disk::Drive("drive1".into())]
}

/// The tree `s0 → {s1, s2 → s3*}`, then `delete s2`, `delete s0`, `delete s3`, `revert s1`:
/// each succeeds, and `check` is clean after each (it used to find two unmerged layers after
/// the revert: once s3's branch was gone, the original images each had a single child and no
/// snapshot of their own).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_is_clean_after_every_command_of_a_branched_tree() {
    require_qemu!();
    let rig = Rig::two_disks().await;
    rig.put(1).await;
    rig.step(&["create", "vm", "s0"]);
    rig.put(2).await;
    rig.step(&["create", "vm", "s1"]);
    rig.step(&["revert", "vm", "s0"]);
    rig.holds(&[1], 4, "revert s0").await;
    rig.put(3).await;
    rig.step(&["create", "vm", "s2"]);
    rig.put(4).await;
    rig.step(&["create", "vm", "s3"]);
    rig.step(&["delete", "vm", "s2"]);
    rig.step(&["delete", "vm", "s0"]);
    rig.step(&["delete", "vm", "s3"]);
    rig.holds(&[1, 3, 4], 4, "after the deletes").await;
    rig.step(&["revert", "vm", "s1"]);
    rig.holds(&[1, 2], 4, "revert s1").await;
    // What is left is what s1 and the running VM need: per disk the original (now holding
    // s1's data, the layer between merged into it) and the VM's overlay over it.
    let out = rig.ok(&["list", "vm", "--json"]);
    let listing: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        listing["snapshots"].as_array().unwrap().len(),
        1,
        "{listing}"
    );
    assert_eq!(rig.images().len(), 4, "{:?}", rig.images());
    // And the state goes on behaving: stop, start, revert, delete all.
    rig.step(&["stop", "vm"]);
    rig.step(&["start", "vm"]);
    rig.holds(&[1, 2], 4, "start").await;
    rig.step(&["revert", "vm", "s1"]);
    rig.step(&["delete", "vm", "--all"]);
    rig.holds(&[1, 2], 4, "delete --all").await;
    assert_eq!(
        rig.images(),
        vec![rig.dir.path().join("a.qcow2"), rig.dir.path().join("b.raw")]
    );
    rig.step(&["stop", "vm"]);
}

/// A clone's chains keep a layer of its source from merging (the source deleted the snapshot
/// the clone stood on); removing the clone merges it, so the source's `check` stays clean.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_is_clean_after_a_clone_outlives_the_snapshot_it_came_from() {
    require_qemu!();
    let rig = Rig::two_disks().await;
    let _clone = KillRecordedQemu::new(&rig.dir.path().join("store"), "c");
    rig.put(1).await;
    rig.step(&["create", "vm", "s1"]);
    rig.put(2).await;
    rig.ok(&["clone", "vm", "s1", "c"]);
    rig.clean("clone");
    rig.step(&["delete", "vm", "s1"]);
    let out = rig.qsnap(&["check", "c"]);
    assert!(out.status.success(), "{}", show(&out));
    // The originals stay (the clone stands on them) and the source's overlays over them too.
    assert_eq!(rig.images().len(), 4, "{:?}", rig.images());
    rig.step(&["remove", "c"]);
    // The source's layers merged into its originals: one image per disk.
    assert_eq!(
        rig.images(),
        vec![rig.dir.path().join("a.qcow2"), rig.dir.path().join("b.raw")]
    );
    rig.holds(&[1, 2], 2, "after removing the clone").await;
    rig.step(&["stop", "vm"]);
}

/// `check`'s advice never points in a circle: a frozen image that is missing is to be restored
/// (a delete of its snapshot is refused while the layers above back onto it, and sends the
/// user to `check`), `--repair` is not offered when nothing it lists can be repaired, and each
/// finding names the files it is about.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_advice_never_points_in_a_circle() {
    require_qemu!();
    let rig = Rig::two_disks().await;
    rig.put(1).await;
    rig.ok(&["create", "vm", "s1"]);
    rig.put(2).await;
    rig.ok(&["create", "vm", "s2"]);
    rig.ok(&["stop", "vm"]);
    let frozen = rig.dir.path().join("a.s1.qcow2");
    let aside = rig.dir.path().join("aside");
    std::fs::rename(&frozen, &aside).unwrap();
    let out = rig.qsnap(&["check", "vm", "--json"]);
    assert_eq!(out.status.code(), Some(1), "{}", show(&out));
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    let findings = report["findings"].as_array().unwrap();
    let missing = findings
        .iter()
        .find(|f| f["kind"] == "missing-image")
        .unwrap_or_else(|| panic!("{report}"));
    assert_eq!(
        missing["paths"],
        serde_json::json!([frozen.display().to_string()]),
        "{report}"
    );
    assert_eq!(missing["repairable"], false, "{report}");
    for f in findings {
        assert!(
            !f["paths"].as_array().unwrap().is_empty(),
            "a finding names no file: {f}"
        );
        let fix = f["fix"].as_str().unwrap();
        assert!(
            !(f["kind"] == "missing-image" || f["kind"] == "broken-chain")
                || !fix.contains("qsnap delete"),
            "{f}"
        );
    }
    let out = rig.qsnap(&["check", "vm"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        !text.contains("--repair"),
        "nothing here is repairable: {text}"
    );
    // The delete a user might try instead is refused, and sends them to check, which says
    // to restore the file.
    let out = rig.qsnap(&["delete", "vm", "s1"]);
    assert_eq!(out.status.code(), Some(6), "{}", show(&out));
    std::fs::rename(&aside, &frozen).unwrap();
    rig.clean("restoring the file");
    rig.step(&["start", "vm"]);
    rig.holds(&[1, 2], 2, "after restoring").await;
    rig.step(&["stop", "vm"]);
}

/// Paths with `..` — a drive named relatively from a working directory below the image, an
/// `--overlay-dir` of `../ovl` — are recorded plainly: every command reads the store back, and
/// `check` is clean after each (a `..` in a recorded path used to make the store unreadable).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paths_with_dot_dot_are_recorded_plainly() {
    require_qemu!();
    let dir = tempfile::tempdir().unwrap();
    let work = dir.path().join("work");
    std::fs::create_dir(&work).unwrap();
    std::fs::create_dir(dir.path().join("ovl")).unwrap();
    let disk = dir.path().join("a.qcow2");
    create_image(&disk, "qcow2", "32M").await;
    let argv: Vec<String> = VmBuilder::idle()
        .memory(64)
        .disk(&disk, "qcow2", DiskStyle::Drive)
        .command_line(&dir.path().join("serial.log"))
        .await
        .into_iter()
        .map(|a| a.replace(disk.to_str().unwrap(), "../a.qcow2"))
        .collect();
    assert!(argv.iter().any(|a| a.contains("../a.qcow2")), "{argv:?}");
    let rig = Rig {
        _kill: KillRecordedQemu::new(&dir.path().join("store"), "vm"),
        dir,
    };
    let in_work = |args: &[&str]| {
        let out = std::process::Command::new(assert_cmd::cargo::cargo_bin("qsnap"))
            .env("QSNAP_STORE", rig.dir.path().join("store"))
            .env_remove("FAILPOINTS")
            .current_dir(&work)
            .args(args)
            .output()
            .unwrap();
        qsnap_testkit::json_output::check(args, &out);
        assert!(
            out.status.success(),
            "qsnap {}: {}",
            args.join(" "),
            show(&out)
        );
        rig.clean(&format!("qsnap {}", args.join(" ")));
    };
    let mut run = vec!["run", "vm", "--"];
    run.extend(argv.iter().map(String::as_str));
    in_work(&run);
    in_work(&["create", "vm", "s1"]);
    // (Written through QEMU's own qemu-io, and read back offline at the end: the test kit's
    // readers open images by QEMU's name for them, which is relative here.)
    let qmp = rig.qmp().await;
    qmp.execute_raw(
        "human-monitor-command",
        Some(serde_json::json!({"command-line": "qemu-io drive0 \"write -P 1 64k 64k\""})),
    )
    .await
    .unwrap();
    drop(qmp);
    in_work(&["create", "vm", "s2", "--overlay-dir", "../ovl"]);
    let out = rig.ok(&["show", "vm", "s2", "--json"]);
    let m: Value = serde_json::from_slice(&out.stdout).unwrap();
    let overlay = m["disks"][0]["overlay"].as_str().unwrap().to_owned();
    assert_eq!(
        PathBuf::from(&overlay),
        rig.dir.path().join("ovl/a.s2.qcow2"),
        "{m}"
    );
    assert!(!overlay.contains(".."), "{m}");
    in_work(&["revert", "vm", "s2"]);
    in_work(&["stop", "vm"]);
    in_work(&["start", "vm"]);
    in_work(&["delete", "vm", "--all"]);
    in_work(&["stop", "vm"]);
    // Everything merged into the original image, written on s1's overlay: still there.
    let read = std::process::Command::new("qemu-io")
        .args(["-r", "-f", "qcow2", "-c", "read -P 1 64k 64k"])
        .arg(&disk)
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&read.stdout);
    assert!(
        read.status.success()
            && said.contains("read 65536/65536")
            && !said.contains("Pattern verification failed"),
        "{read:?}"
    );
}

/// A revert interrupted once its journal says `running` (qsnap killed after the record) is
/// finished by the repair, which also merges the layer the revert left unneeded; if that
/// merge fails, its own journal stays for the next repair (the settle of the revert must not
/// clear it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_settled_revert_merges_what_it_left_and_keeps_the_merge_journal_on_failure() {
    require_qemu!();
    if !qsnap_testkit::failpoints_or_skip(
        "a_settled_revert_merges_what_it_left_and_keeps_the_merge_journal_on_failure",
    ) {
        return;
    }
    let rig = Rig::two_disks().await;
    rig.put(1).await;
    rig.ok(&["create", "vm", "s0"]);
    rig.put(2).await;
    rig.ok(&["create", "vm", "s1"]);
    rig.ok(&["revert", "vm", "s0"]);
    rig.put(3).await;
    rig.ok(&["create", "vm", "s2"]);
    rig.ok(&["delete", "vm", "s2"]);
    rig.ok(&["delete", "vm", "s0"]);
    // Reverting to s1 abandons the other branch: the original images are left with one
    // child each and no snapshot of their own.
    let with = |fp: &str, args: &[&str]| {
        let out = std::process::Command::new(assert_cmd::cargo::cargo_bin("qsnap"))
            .env("QSNAP_STORE", rig.dir.path().join("store"))
            .env("FAILPOINTS", fp)
            .args(args)
            .output()
            .unwrap();
        qsnap_testkit::json_output::check(args, &out);
        out
    };
    let out = with("revert.recorded=return(crash)", &["revert", "vm", "s1"]);
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&out.status),
        Some(9),
        "{}",
        show(&out)
    );
    // The repair settles the revert; the merge after it fails.
    let out = with(
        "delete.merge-started=return(error)",
        &["check", "vm", "--repair", "--json"],
    );
    assert_eq!(out.status.code(), Some(1), "{}", show(&out));
    let st: Value = serde_json::from_slice(&rig.ok(&["status", "vm", "--json"]).stdout).unwrap();
    assert!(
        !st["interrupted"].is_null(),
        "the merge's journal was cleared: {st}"
    );
    rig.ok(&["check", "vm", "--repair"]);
    rig.clean("the second repair");
    rig.holds(&[1, 2], 3, "after the repairs").await;
    rig.step(&["stop", "vm"]);
}
