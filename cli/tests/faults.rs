//! Fault injection at every step boundary of create, revert and delete, through the real
//! `qsnap` binary: at each failpoint (`qsnap_engine::testing::failpoint::POINTS`) either qsnap itself
//! dies there (SIGKILL, as `kill -9` or a host crash would) or QEMU is killed there. Then
//! `qsnap check --repair` must leave the VM and its store consistent (`qsnap check` clean, no
//! orphan file, every image checking clean), no data the VM had made durable may be lost,
//! and every snapshot that exists must still revert to exactly its disk contents. A last test
//! SIGKILLs real `qsnap delete` processes after random delays, 30 rounds.
//!
//! The VMs are kernel-less (instant to start); their disk contents are written and checked
//! with QEMU's own `qemu-io` (a pattern per step, flushed).

use qsnap_engine::testing::failpoint::POINTS;
use qsnap_qmp::{ConnectOptions, Qmp};
use qsnap_testkit::accounting;
use qsnap_testkit::disk_io::{check, write, Disk};
use qsnap_testkit::{require_qemu, KillRecordedQemu, VmBuilder};
use serde_json::Value;
use std::collections::BTreeSet;
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::Output;
use std::time::Duration;

fn qsnap_bin() -> PathBuf {
    assert_cmd::cargo::cargo_bin("qsnap")
}

/// One VM `g` under qsnap with one qcow2 disk (`vd0`), in its own directory and store.
struct Rig {
    // Fields drop in order: the QEMU must be killed while its record (in `dir`) still exists.
    _kill: KillRecordedQemu,
    dir: tempfile::TempDir,
}

impl Rig {
    async fn new() -> Rig {
        let dir = tempfile::tempdir().unwrap();
        let disk = dir.path().join("disk.qcow2");
        let argv = VmBuilder::idle_with_disk(&disk, "32M", &dir.path().join("serial.log")).await;
        std::fs::create_dir(dir.path().join("tmp")).unwrap();
        let rig = Rig {
            _kill: KillRecordedQemu::new(&dir.path().join("store"), "g"),
            dir,
        };
        let mut args = vec!["run".to_owned(), "g".into(), "--".into()];
        args.extend(argv);
        let out = rig.qsnap(&args.iter().map(String::as_str).collect::<Vec<_>>());
        assert!(out.status.success(), "{}", show(&out));
        rig
    }

    fn store(&self) -> PathBuf {
        self.dir.path().join("store")
    }

    fn command(&self, args: &[&str]) -> std::process::Command {
        let mut c = std::process::Command::new(qsnap_bin());
        // A temp dir of the rig's own: what a killed qsnap leaves there is this test's.
        c.env("QSNAP_STORE", self.store())
            .env("TMPDIR", self.tmp())
            .env_remove("FAILPOINTS")
            .args(args);
        c
    }

    fn tmp(&self) -> PathBuf {
        self.dir.path().join("tmp")
    }

    /// The lazy-RAM helper directories (`$TMPDIR/qsnap-lazy-<pid>-*`) in the rig's temp dir.
    fn helper_dirs(&self) -> Vec<PathBuf> {
        std::fs::read_dir(self.tmp())
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .filter(|p| {
                p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("qsnap-lazy-"))
            })
            .collect()
    }

    fn qsnap(&self, args: &[&str]) -> Output {
        let out = self.command(args).output().unwrap();
        qsnap_testkit::json_output::check(args, &out);
        out
    }

    /// Runs qsnap with a failpoint set (`point=return(action)`).
    fn qsnap_failing(&self, point: &str, action: &str, args: &[&str]) -> Output {
        let out = self
            .command(args)
            .env("FAILPOINTS", format!("{point}=return({action})"))
            .output()
            .unwrap();
        qsnap_testkit::json_output::check(args, &out);
        out
    }

    async fn qmp(&self) -> Qmp {
        self.qmp_of("g").await
    }

    async fn qmp_of(&self, vm: &str) -> Qmp {
        let opts = ConnectOptions {
            connect_retry: Duration::from_secs(5),
            ..ConnectOptions::default()
        };
        Qmp::connect_with(self.store().join("vms").join(vm).join("qmp.sock"), &opts)
            .await
            .unwrap()
    }

    /// Writes step `step`'s pattern (64 KiB at `step` × 64 KiB), flushed.
    async fn put(&self, step: u8) {
        write(
            &self.qmp().await,
            &vd0(),
            0x40 + step,
            u64::from(step) * 64,
            64,
        )
        .await;
    }

    /// Step 1 written, snapshot `s1` made, step 2 written: the start of most fault tests.
    async fn snapshot_between_two_writes(&self) {
        self.put(1).await;
        assert!(self.qsnap(&["create", "g", "s1"]).status.success());
        self.put(2).await;
    }

    /// Whether the disk holds exactly steps 1..=upto (later ones not written).
    async fn holds(&self, upto: u8, steps: u8) -> Result<(), String> {
        self.holds_on("g", upto, steps).await
    }

    /// [`Rig::holds`] for VM `vm` of the store (a clone).
    async fn holds_on(&self, vm: &str, upto: u8, steps: u8) -> Result<(), String> {
        let qmp = self.qmp_of(vm).await;
        for step in 1..=steps {
            let pattern = if step <= upto { 0x40 + step } else { 0 };
            check(&qmp, &vd0(), pattern, u64::from(step) * 64, 64).await?;
        }
        Ok(())
    }

    /// What a failure report needs beyond qsnap's output: the end of QEMU's log and of the
    /// log of the last qsnap this test killed (`killed.log`, when it wrote one).
    fn evidence(&self) -> String {
        let tail = |p: PathBuf| {
            let text = std::fs::read_to_string(&p).unwrap_or_else(|e| format!("({e})"));
            let lines: Vec<&str> = text.lines().collect();
            format!(
                "--- {} (last 40 lines)\n{}",
                p.display(),
                lines[lines.len().saturating_sub(40)..].join("\n")
            )
        };
        format!(
            "{}\n{}",
            tail(self.store().join("vms/g/qemu.log")),
            tail(self.dir.path().join("killed.log"))
        )
    }

    /// The pid of the VM's QEMU (`None` when it is not running).
    fn qemu_pid(&self) -> Option<u64> {
        let st = json(&self.qsnap(&["status", "g", "--json"]));
        st["state"]["pid"].as_u64()
    }

    fn running(&self) -> bool {
        let out = self.qsnap(&["status", "g", "--json"]);
        assert!(out.status.success(), "status: {}", show(&out));
        json(&out)["state"]["state"] != "stopped"
    }

    fn snapshots(&self) -> Vec<String> {
        let l = json(&self.qsnap(&["list", "g", "--json"]));
        l["snapshots"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["name"].as_str().unwrap().to_owned())
            .collect()
    }

    /// Repair, then the invariants: a clean check, every file accounted for, every image
    /// clean, the VM running.
    fn repair_and_check(&self, what: &str) {
        let out = self.qsnap(&["check", "g", "--repair", "-vv"]);
        assert!(
            out.status.success(),
            "{what}: check --repair: {}\n{}",
            show(&out),
            self.evidence()
        );
        let out = self.qsnap(&["check", "g", "--json"]);
        assert!(
            out.status.success(),
            "{what}: check after repair: {}",
            show(&out)
        );
        let report = json(&out);
        assert_eq!(
            report["findings"],
            Value::Array(Vec::new()),
            "{what}: {report}"
        );
        self.files_accounted_for(what);
        if !self.running() {
            let out = self.qsnap(&["start", "g"]);
            assert!(out.status.success(), "{what}: start: {}", show(&out));
        }
    }

    /// Every image file in the directory is one the store needs, and every one it needs is
    /// there and checks clean.
    fn files_accounted_for(&self, what: &str) {
        let listing = json(&self.qsnap(&["list", "g", "--json"]));
        let mut needed = BTreeSet::new();
        for t in accounting::chain_tops(&listing) {
            let out = std::process::Command::new("qemu-img")
                .args(["info", "-U", "--backing-chain", "--output=json", &t])
                .output()
                .unwrap();
            assert!(out.status.success(), "{what}: chain of {t}: {out:?}");
            for img in serde_json::from_slice::<Vec<Value>>(&out.stdout).unwrap() {
                needed.insert(PathBuf::from(img["filename"].as_str().unwrap()));
            }
        }
        let files: BTreeSet<PathBuf> = std::fs::read_dir(self.dir.path())
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "qcow2"))
            .collect();
        assert_eq!(files, needed, "{what}: image files vs what the store needs");
        for f in &files {
            let out = std::process::Command::new("qemu-img")
                .args(["check", "-U", "-q"])
                .arg(f)
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{what}: qemu-img check {}: {out:?}",
                f.display()
            );
        }
        // Each snapshot's own: its stream, or (lazy) its device state and RAM image.
        assert_eq!(
            accounting::file_names(&self.store().join("vms/g/memory")),
            accounting::memory_files_named(&listing),
            "{what}: memory files"
        );
    }

    /// Every snapshot reverts, to exactly the steps it holds.
    async fn all_revert(&self, what: &str, step_of: impl Fn(&str) -> u8, steps: u8) {
        for s in self.snapshots() {
            let out = self.qsnap(&["revert", "g", &s]);
            assert!(out.status.success(), "{what}: revert {s}: {}", show(&out));
            self.holds(step_of(&s), steps)
                .await
                .unwrap_or_else(|e| panic!("{what}: after revert {s}: {e}"));
        }
    }

    fn stop(&self) {
        let _ = self.qsnap(&["stop", "g"]);
    }
}

fn vd0() -> Disk {
    Disk::Device("vd0".into())
}

fn show(out: &Output) -> String {
    format!(
        "status {:?}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn json(out: &Output) -> Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", show(out)))
}

/// What a faulted run must look like: killed by SIGKILL for `crash`; an error for `error`;
/// for `kill-qemu`, a clean exit or an error message (never a crash of qsnap itself).
fn faulted(out: &Output, action: &str, what: &str) {
    match action {
        "crash" => assert_eq!(out.status.signal(), Some(9), "{what}: {}", show(out)),
        "error" => assert!(
            out.status.code().is_some_and(|c| c != 0),
            "{what}: {}",
            show(out)
        ),
        _ => assert!(out.status.code().is_some(), "{what}: {}", show(out)),
    }
}

fn points(prefix: &str) -> Vec<&'static str> {
    POINTS
        .iter()
        .copied()
        .filter(|p| p.starts_with(prefix))
        .collect()
}

fn step_of(s: &str) -> u8 {
    s.trim_start_matches('s').parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_survives_qsnap_or_qemu_dying_at_every_step() {
    require_qemu!();
    if !qsnap_testkit::failpoints_or_skip("create_survives_qsnap_or_qemu_dying_at_every_step") {
        return;
    }
    for point in points("create.") {
        for action in ["crash", "kill-qemu"] {
            let what = format!("create, {action} at {point}");
            eprintln!("--- {what}");
            let rig = Rig::new().await;
            rig.snapshot_between_two_writes().await;
            let out = rig.qsnap_failing(point, action, &["create", "g", "s2"]);
            faulted(&out, action, &what);
            rig.repair_and_check(&what);
            // Whatever became of s2, the disk kept what was written before.
            rig.holds(2, 2)
                .await
                .unwrap_or_else(|e| panic!("{what}: the current disk lost data: {e}"));
            rig.all_revert(&what, step_of, 2).await;
            rig.stop();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revert_survives_qsnap_or_qemu_dying_at_every_step() {
    require_qemu!();
    if !qsnap_testkit::failpoints_or_skip("revert_survives_qsnap_or_qemu_dying_at_every_step") {
        return;
    }
    for point in points("revert.") {
        for action in ["crash", "kill-qemu"] {
            let what = format!("revert, {action} at {point}");
            eprintln!("--- {what}");
            let rig = Rig::new().await;
            rig.snapshot_between_two_writes().await;
            assert!(rig.qsnap(&["create", "g", "s2"]).status.success());
            rig.put(3).await;
            let out = rig.qsnap_failing(point, action, &["revert", "g", "s1"]);
            faulted(&out, action, &what);
            rig.repair_and_check(&what);
            // Either the revert happened (s1's disk) or it did not (the disk as it was); once
            // the journal said the new QEMU runs, it happened.
            let forward =
                action == "crash" && matches!(point, "revert.resumed" | "revert.recorded");
            let now = if forward {
                rig.holds(1, 3).await
            } else {
                rig.holds(1, 3).await.or(rig.holds(3, 3).await)
            };
            now.unwrap_or_else(|e| panic!("{what}: the disk is neither s1 nor as it was: {e}"));
            rig.all_revert(&what, step_of, 3).await;
            rig.stop();
        }
    }
}

/// qsnap dies once the reverted guest can run (or, at `revert.loaded`, someone resumes it by
/// hand, as an older qsnap or an embedder that resumes first would), the guest writes, and
/// then its QEMU dies too: whatever settles the revert afterwards must keep those writes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reverted_guest_s_writes_survive_qsnap_and_then_its_qemu_dying() {
    require_qemu!();
    if !qsnap_testkit::failpoints_or_skip(
        "a_reverted_guest_s_writes_survive_qsnap_and_then_its_qemu_dying",
    ) {
        return;
    }
    for point in ["revert.loaded", "revert.resumed", "revert.recorded"] {
        let what = format!("revert, crash at {point}, the guest writes, QEMU killed");
        eprintln!("--- {what}");
        let rig = Rig::new().await;
        rig.snapshot_between_two_writes().await;
        assert!(rig.qsnap(&["create", "g", "s2"]).status.success());
        rig.put(3).await;
        let out = rig.qsnap_failing(point, "crash", &["revert", "g", "s1"]);
        faulted(&out, "crash", &what);
        if point == "revert.loaded" {
            // The new QEMU holds s1 but its guest was never resumed: resume it by hand.
            let qmp = rig.qmp().await;
            qmp.execute_raw("cont", None).await.unwrap();
        }
        rig.put(4).await;
        let pid = rig.qemu_pid().expect("the reverted QEMU runs");
        let killed = std::process::Command::new("kill")
            .args(["-KILL", &pid.to_string()])
            .status()
            .unwrap();
        assert!(killed.success(), "{what}: kill {pid}");
        for _ in 0..200 {
            if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        rig.repair_and_check(&what);
        // s1's disk plus what the reverted guest wrote: steps 1 and 4, not 2 or 3.
        let qmp = rig.qmp().await;
        for (step, pattern) in [(1u8, 0x41u8), (2, 0), (3, 0), (4, 0x44)] {
            check(&qmp, &vd0(), pattern, u64::from(step) * 64, 64)
                .await
                .unwrap_or_else(|e| panic!("{what}: step {step}: {e}\n{}", rig.evidence()));
        }
        drop(qmp);
        rig.all_revert(&what, step_of, 3).await;
        rig.stop();
    }
}

/// A create's recovery that cannot ask QEMU whether the guest runs does not report a clean
/// rollback over a guest that may be left paused: `check --repair` says so, with the command
/// that resumes it, and is not clean.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_create_recovery_that_cannot_read_the_run_state_says_the_guest_may_be_paused() {
    require_qemu!();
    if !qsnap_testkit::failpoints_or_skip(
        "a_create_recovery_that_cannot_read_the_run_state_says_the_guest_may_be_paused",
    ) {
        return;
    }
    let rig = Rig::new().await;
    rig.snapshot_between_two_writes().await;
    // qsnap dies with the guest paused for the switch.
    let out = rig.qsnap_failing("create.frozen", "crash", &["create", "g", "s2"]);
    faulted(&out, "crash", "create, crash at create.frozen");
    let st = json(&rig.qsnap(&["status", "g", "--json"]));
    assert_eq!(st["state"]["runstate"], "paused", "{st}");
    let out = rig.qsnap_failing(
        "recover.status-sent",
        "timeout",
        &["check", "g", "--repair", "--json"],
    );
    assert_eq!(out.status.code(), Some(1), "{}", show(&out));
    let report = json(&out);
    let interrupted = report["findings"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["kind"] == "interrupted")
        .unwrap_or_else(|| panic!("{report}"))
        .clone();
    assert_eq!(interrupted["repaired"], false, "{report}");
    let fix = interrupted["fix"].as_str().unwrap();
    assert!(
        fix.contains("may be left paused") && fix.contains("cont"),
        "{report}"
    );
    // The advice works.
    let sock = rig.store().join("vms/g/qmp.sock");
    let out = rig.qsnap(&["qmp", sock.to_str().unwrap(), "cont"]);
    assert!(out.status.success(), "{}", show(&out));
    rig.repair_and_check("after resuming by hand");
    rig.holds(2, 2).await.unwrap();
    rig.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_survives_qsnap_or_qemu_dying_at_every_step() {
    require_qemu!();
    if !qsnap_testkit::failpoints_or_skip("delete_survives_qsnap_or_qemu_dying_at_every_step") {
        return;
    }
    for (i, point) in points("delete.").into_iter().enumerate() {
        for (j, action) in ["crash", "kill-qemu"].into_iter().enumerate() {
            // Take turns: a middle snapshot (its layer streams into its child), the root (the
            // child's layer is committed into the original image), and all of them (which
            // ends with an active commit: the image the VM writes to switches).
            // `delete.concluded` is there for the stream (see `snapshot::jobs::list_nodes`): it gets s2.
            let victim = if point == "delete.concluded" {
                "s2"
            } else {
                ["s2", "s1", "--all"][(2 * i + j) % 3]
            };
            let what = format!("delete {victim}, {action} at {point}");
            eprintln!("--- {what}");
            let rig = Rig::new().await;
            for step in 1..=3u8 {
                rig.put(step).await;
                let name = format!("s{step}");
                assert!(rig.qsnap(&["create", "g", &name]).status.success());
            }
            rig.put(4).await;
            let qemu = rig.qemu_pid();
            let out = rig.qsnap_failing(point, action, &["delete", "g", victim]);
            faulted(&out, action, &what);
            if point == "delete.unlinking-memory" && action == "crash" {
                // Killed with the manifests gone and the memory files not yet: the next
                // operation's recovery (not a repair) removes them.
                let victims: Vec<String> = if victim == "--all" {
                    (1..=3).map(|k| format!("s{k}")).collect()
                } else {
                    vec![victim.to_owned()]
                };
                let memory = |what: &str| -> Vec<String> {
                    std::fs::read_dir(rig.store().join("vms").join("g").join("memory"))
                        .unwrap_or_else(|e| panic!("{what}: {e}"))
                        .flatten()
                        .map(|e| e.file_name().to_string_lossy().into_owned())
                        .filter(|n| victims.iter().any(|v| n.starts_with(&format!("{v}."))))
                        .collect()
                };
                assert!(!memory(&what).is_empty(), "{what}: no memory file was left");
                let out = rig.qsnap(&["create", "g", "after", "--disk-only"]);
                assert!(out.status.success(), "{what}: create: {}", show(&out));
                let left = memory(&what);
                assert!(left.is_empty(), "{what}: the recovery left {left:?}");
                let out = rig.qsnap(&["delete", "g", "after"]);
                assert!(out.status.success(), "{what}: delete: {}", show(&out));
            }
            rig.repair_and_check(&what);
            if action == "crash" {
                // Only qsnap died: the repair must not have taken QEMU with it.
                assert_eq!(
                    rig.qemu_pid(),
                    qemu,
                    "{what}: QEMU did not survive the repair"
                );
            }
            let left = rig.snapshots();
            assert!(
                !left.iter().any(|s| s == victim) && (victim != "--all" || left.is_empty()),
                "{what}: the delete was not finished: {left:?}"
            );
            rig.holds(4, 4)
                .await
                .unwrap_or_else(|e| panic!("{what}: the current disk lost data: {e}"));
            rig.all_revert(&what, step_of, 4).await;
            rig.stop();
        }
    }
}

/// A delete that paused the guest to switch a disk's image and then cannot read QEMU's chains
/// leaves the guest paused (it must not write where the record does not say) and says so,
/// with the command that resumes it; that command does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delete_that_leaves_the_guest_paused_says_so_and_the_repair_resumes_it() {
    require_qemu!();
    if !qsnap_testkit::failpoints_or_skip(
        "a_delete_that_leaves_the_guest_paused_says_so_and_the_repair_resumes_it",
    ) {
        return;
    }
    let rig = Rig::new().await;
    rig.snapshot_between_two_writes().await;
    // Deleting the only snapshot commits the active layer into the original: a pivot.
    let out = rig.qsnap_failing("delete.chains-read", "error", &["delete", "g", "--all"]);
    assert_eq!(out.status.code(), Some(1), "{}", show(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("left paused") && err.contains("qsnap check g --repair"),
        "{}",
        show(&out)
    );
    let st = json(&rig.qsnap(&["status", "g", "--json"]));
    assert_eq!(st["state"]["runstate"], "paused", "{st}");
    rig.repair_and_check("after the chain read failed");
    let st = json(&rig.qsnap(&["status", "g", "--json"]));
    assert_eq!(st["state"]["runstate"], "running", "{st}");
    assert!(rig.snapshots().is_empty());
    rig.holds(2, 2).await.unwrap();
    rig.stop();
}

/// A snapshot whose frozen image could not be stamped (past the point of no return) stands,
/// but `check` says its tamper check is missing, and `--repair` stamps it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unstamped_frozen_image_is_reported_and_stamped_by_the_repair() {
    require_qemu!();
    if !qsnap_testkit::failpoints_or_skip(
        "an_unstamped_frozen_image_is_reported_and_stamped_by_the_repair",
    ) {
        return;
    }
    let rig = Rig::new().await;
    rig.put(1).await;
    let out = rig.qsnap_failing("create.stamp", "error", &["create", "g", "s1"]);
    assert!(out.status.success(), "{}", show(&out));
    rig.put(2).await;
    let out = rig.qsnap(&["check", "g", "--json"]);
    assert_eq!(out.status.code(), Some(1), "{}", show(&out));
    let report = json(&out);
    assert!(
        report["findings"]
            .as_array()
            .unwrap()
            .iter()
            .any(|f| f["kind"] == "unstamped-image"),
        "{report}"
    );
    rig.repair_and_check("after stamping");
    let shown = json(&rig.qsnap(&["show", "g", "s1", "--json"]));
    assert!(shown["disks"][0]["frozen"].is_object(), "{shown}");
    rig.all_revert("after stamping", step_of, 2).await;
    rig.stop();
}

/// At every state-changing QMP command of revert, delete, clone and lazy-ram, the command ran
/// but its answer "timed out" (a timeout is not a no): the operation ends cleanly either way,
/// `check --repair` leaves the store clean and nothing the VM had is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_qmp_command_that_ran_but_timed_out_is_survived_at_every_point() {
    require_qemu!();
    if !qsnap_testkit::failpoints_or_skip(
        "a_qmp_command_that_ran_but_timed_out_is_survived_at_every_point",
    ) {
        return;
    }
    let ops = |point: &str| -> Vec<&'static str> {
        match point.split('.').next().unwrap() {
            "load" if point == "load.cont-sent" => vec!["revert", "clone"],
            "load" => vec!["revert", "clone", "lazy-ram"],
            "lazy" => vec!["lazy-ram"],
            "delete" => vec!["delete"],
            _ => Vec::new(),
        }
    };
    let points: Vec<&str> = qsnap_engine::testing::failpoint::TIMEOUT_POINTS
        .iter()
        .copied()
        .filter(|p| !ops(p).is_empty())
        .collect();
    assert!(points.len() >= 10, "{points:?}");
    for point in points {
        for op in ops(point) {
            let what = format!("{op}, a timeout at {point}");
            eprintln!("--- {what}");
            let rig = Rig::new().await;
            let _clone = KillRecordedQemu::new(&rig.store(), "c");
            rig.snapshot_between_two_writes().await;
            assert!(rig.qsnap(&["create", "g", "s2"]).status.success());
            rig.put(3).await;
            let args: Vec<&str> = match op {
                "revert" => vec!["revert", "g", "s1"],
                "clone" => vec!["clone", "g", "s1", "c"],
                "lazy-ram" => vec!["lazy-ram", "g", "s1"],
                // A pivot (the active layer committed into the original) passes every delete
                // point but the stream's: --all; the job start also for a stream (s1's layer
                // streams into s2's frozen image).
                _ if point == "delete.job-sent" => vec!["delete", "g", "s1"],
                _ => vec!["delete", "g", "--all"],
            };
            let out = rig.qsnap_failing(point, "timeout", &args);
            assert!(out.status.code().is_some(), "{what}: {}", show(&out));
            // Where QEMU's state says what happened, the operation reads it and succeeds.
            if matches!(
                point,
                "load.cont-sent"
                    | "delete.resume-sent"
                    | "delete.finalize-sent"
                    | "delete.complete-sent"
            ) {
                assert!(out.status.success(), "{what}: {}", show(&out));
            }
            rig.repair_and_check(&what);
            match op {
                "revert" => {
                    let now = rig.holds(1, 3).await.or(rig.holds(3, 3).await);
                    now.unwrap_or_else(|e| panic!("{what}: neither s1 nor as it was: {e}"));
                }
                "clone" => {
                    if rig.qsnap(&["status", "c"]).status.success() {
                        if out.status.success() {
                            rig.holds_on("c", 1, 3)
                                .await
                                .unwrap_or_else(|e| panic!("{what}: the clone's disk: {e}"));
                        }
                        let out = rig.qsnap(&["remove", "c"]);
                        assert!(out.status.success(), "{what}: remove: {}", show(&out));
                    }
                    rig.clone_is_gone("c", true, &what).await;
                    rig.holds(3, 3)
                        .await
                        .unwrap_or_else(|e| panic!("{what}: the source's disk: {e}"));
                }
                "lazy-ram" => {
                    rig.holds(3, 3)
                        .await
                        .unwrap_or_else(|e| panic!("{what}: the disk: {e}"));
                    let out = rig.qsnap(&["lazy-ram", "g", "s1"]);
                    assert!(
                        out.status.success(),
                        "{what}: lazy-ram again: {}",
                        show(&out)
                    );
                }
                _ => {
                    rig.holds(3, 3)
                        .await
                        .unwrap_or_else(|e| panic!("{what}: the current disk lost data: {e}"));
                    // Whether the delete finished or was rolled forward, the snapshot is gone.
                    let left = rig.snapshots();
                    assert!(
                        !left.iter().any(|s| args.contains(&s.as_str()))
                            && (args[2] != "--all" || left.is_empty()),
                        "{what}: {left:?}"
                    );
                }
            }
            rig.all_revert(&what, step_of, 3).await;
            rig.stop();
        }
    }
}

/// Whether every one of `names` is in `dir`.
fn files_in(dir: &std::path::Path, names: &[&str]) -> bool {
    names.iter().all(|n| dir.join(n).exists())
}

/// Kills a process when dropped (a QEMU no record names yet).
struct KillPid(Option<u32>);

impl Drop for KillPid {
    fn drop(&mut self) {
        if let Some(pid) = self.0 {
            let _ = std::process::Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
        }
    }
}

/// `run` has no journal: a failure after the launch stops the QEMU it started (nothing runs
/// that no record names), and a QEMU left by a `run` that qsnap died in is never taken over by
/// a second `run` (its socket would be unlinked and stolen): the retry is refused and says to
/// attach it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interrupted_run_leaves_nothing_a_retry_could_take_over() {
    require_qemu!();
    if !qsnap_testkit::failpoints_or_skip(
        "an_interrupted_run_leaves_nothing_a_retry_could_take_over",
    ) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.qcow2");
    let argv = VmBuilder::idle_with_disk(&disk, "32M", &dir.path().join("serial.log")).await;
    let store = dir.path().join("store");
    let _recorded = KillRecordedQemu::new(&store, "g");
    let socket = store.join("vms/g/qmp.sock");
    let qsnap = |failpoint: Option<&str>, args: &[&str]| {
        let mut c = std::process::Command::new(qsnap_bin());
        c.env("QSNAP_STORE", &store)
            .env_remove("FAILPOINTS")
            .args(args);
        if let Some(f) = failpoint {
            c.env("FAILPOINTS", f);
        }
        let out = c.output().unwrap();
        qsnap_testkit::json_output::check(args, &out);
        out
    };
    let mut run = vec!["run", "g", "--"];
    run.extend(argv.iter().map(String::as_str));
    let serving_pid = || async {
        let opts = ConnectOptions {
            connect_retry: Duration::ZERO,
            ..ConnectOptions::default()
        };
        Qmp::connect_with(socket.clone(), &opts)
            .await
            .ok()
            .and_then(|q| q.peer_pid())
    };

    // A step after the launch fails: the QEMU goes with the error.
    let out = qsnap(Some("run.launched=return(error)"), &run);
    assert_eq!(out.status.code(), Some(1), "{}", show(&out));
    assert_eq!(serving_pid().await, None, "a QEMU outlived the failed run");
    assert!(!qsnap(None, &["status", "g"]).status.success());

    // qsnap dies between the launch and the record: its QEMU runs on, unrecorded.
    let out = qsnap(Some("run.launched=return(crash)"), &run);
    faulted(&out, "crash", "run, crash at run.launched");
    let orphan = serving_pid()
        .await
        .expect("the launched QEMU serves its socket");
    let _orphan = KillPid(Some(orphan));
    assert!(!qsnap(None, &["status", "g"]).status.success());
    // A retry does not start a second QEMU over it.
    let out = qsnap(None, &run);
    assert_eq!(out.status.code(), Some(6), "{}", show(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("already serves its monitor socket") && err.contains("qsnap attach g"),
        "{err}"
    );
    assert_eq!(
        serving_pid().await,
        Some(orphan),
        "the socket changed hands"
    );
    // The advice works.
    let out = qsnap(None, &["attach", "g", "--qmp", socket.to_str().unwrap()]);
    assert!(out.status.success(), "{}", show(&out));
    let st = json(&qsnap(None, &["status", "g", "--json"]));
    assert_eq!(st["state"]["pid"].as_u64(), Some(u64::from(orphan)), "{st}");
    assert!(qsnap(None, &["stop", "g"]).status.success());
}

/// A small deterministic generator (xorshift), seeded and printed for reproduction.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkilled_deletes_at_random_moments_lose_nothing() {
    require_qemu!();
    let rig = Rig::new().await;
    let seed = std::env::var("QSNAP_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .subsec_nanos();
            u64::from(nanos) | 1
        });
    eprintln!("seed {seed} (QSNAP_SEED={seed} repeats this run)");
    let mut rng = Rng(seed);
    const ROUNDS: u8 = 30;
    // Which steps' data a state holds: each step writes 1 MiB of its own byte at its own
    // offset (so merges take a moment to kill into).
    let holds = |state: &BTreeSet<u8>| {
        let rig = &rig;
        let state = state.clone();
        async move {
            let qmp = rig.qmp().await;
            for s in 1..=ROUNDS {
                let p = if state.contains(&s) { s } else { 0 };
                check(&qmp, &vd0(), p, u64::from(s) * 1024, 1024).await?;
            }
            Ok::<(), String>(())
        }
    };
    let mut current: BTreeSet<u8> = BTreeSet::new();
    let mut snaps: Vec<(String, BTreeSet<u8>)> = Vec::new();
    for round in 1..=ROUNDS {
        write(
            &rig.qmp().await,
            &vd0(),
            round,
            u64::from(round) * 1024,
            1024,
        )
        .await;
        current.insert(round);
        let name = format!("r{round}");
        let out = rig.qsnap(&["create", "g", &name]);
        assert!(out.status.success(), "round {round}: {}", show(&out));
        snaps.push((name, current.clone()));
        // Delete one snapshot at random (or, now and then, all of them), and kill qsnap after
        // a random moment.
        let args: Vec<String> = if rng.next() % 6 == 0 {
            vec!["delete".into(), "g".into(), "--all".into()]
        } else {
            let i = usize::try_from(rng.next() % snaps.len() as u64).unwrap();
            vec!["delete".into(), "g".into(), snaps[i].0.clone()]
        };
        let delay = Duration::from_millis(rng.next() % 500);
        let qemu = rig.qemu_pid();
        // Its debug log is kept for the failure report.
        let log = std::fs::File::create(rig.dir.path().join("killed.log")).unwrap();
        let mut child = tokio::process::Command::new(qsnap_bin())
            .env("QSNAP_STORE", rig.store())
            .env("RUST_LOG", "qsnap=debug,qsnap_engine=debug,qsnap_qmp=debug")
            .env_remove("FAILPOINTS")
            .args(&args)
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let finished = tokio::time::timeout(delay, child.wait()).await.is_ok();
        if !finished {
            let _ = child.start_kill();
            let _ = child.wait().await;
        }
        let what = format!(
            "round {round} (`qsnap {}` killed after {delay:?}: {})",
            args.join(" "),
            if finished {
                "it had finished"
            } else {
                "it was running"
            }
        );
        eprintln!("--- {what}");
        rig.repair_and_check(&what);
        // Only qsnap was killed: QEMU runs on, through the repair too.
        assert_eq!(rig.qemu_pid(), qemu, "{what}: QEMU did not survive");
        // A delete never changes the VM's data; whether it finished or was rolled forward,
        // the snapshot it targeted is gone.
        holds(&current)
            .await
            .unwrap_or_else(|e| panic!("{what}: the current disk lost data: {e}"));
        let left = rig.snapshots();
        snaps.retain(|(n, _)| left.contains(n));
        assert_eq!(left.len(), snaps.len(), "{what}: {left:?}");
        for (name, state) in &snaps {
            let out = rig.qsnap(&["revert", "g", name]);
            assert!(
                out.status.success(),
                "{what}: revert {name}: {}",
                show(&out)
            );
            holds(state)
                .await
                .unwrap_or_else(|e| panic!("{what}: after revert {name}: {e}"));
            current = state.clone();
        }
    }
    rig.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lazy_ram_survives_qsnap_or_its_helper_dying_at_every_step() {
    require_qemu!();
    if !qsnap_testkit::failpoints_or_skip(
        "lazy_ram_survives_qsnap_or_its_helper_dying_at_every_step",
    ) {
        return;
    }
    for point in points("lazy.") {
        for action in ["crash", "kill-qemu"] {
            let what = format!("lazy-ram, {action} at {point}");
            eprintln!("--- {what}");
            let rig = Rig::new().await;
            rig.snapshot_between_two_writes().await;
            let out = rig.qsnap_failing(point, action, &["lazy-ram", "g", "s1"]);
            faulted(&out, action, &what);
            // The helper QEMU never outlives qsnap (parent-death signal).
            let image = rig.store().join("vms/g/memory/s1.ram");
            let mut helpers = Vec::new();
            for _ in 0..100 {
                helpers = qemu_mapping(&image);
                if helpers.is_empty() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            assert!(
                helpers.is_empty(),
                "{what}: helper QEMU left running: {helpers:?}"
            );
            rig.repair_and_check(&what);
            rig.holds(2, 2)
                .await
                .unwrap_or_else(|e| panic!("{what}: the current disk lost data: {e}"));
            // A qsnap killed while its helper's directory exists leaves it; the next
            // lazy-ram sweeps it once it is older than a minute (made so here).
            let left = rig.helper_dirs();
            if action == "crash" && point != "lazy.switched" {
                assert!(!left.is_empty(), "{what}: no helper directory was left");
            }
            for d in &left {
                std::fs::File::open(d)
                    .unwrap()
                    .set_modified(std::time::SystemTime::now() - Duration::from_secs(120))
                    .unwrap();
            }
            // Whatever the crash left, the snapshot converts (or is converted) and reverts.
            let out = rig.qsnap(&["lazy-ram", "g", "s1"]);
            assert!(
                out.status.success(),
                "{what}: lazy-ram again: {}",
                show(&out)
            );
            let stale = rig.helper_dirs();
            assert!(stale.is_empty(), "{what}: helper dirs left: {stale:?}");
            rig.all_revert(&what, step_of, 2).await;
            let out = rig.qsnap(&["revert", "g", "s1"]);
            assert!(
                String::from_utf8_lossy(&out.stdout).contains("RAM: mapped lazily"),
                "{what}: {}",
                show(&out)
            );
            rig.repair_and_check(&what);
            rig.stop();
        }
    }
}

/// A lazy-ram switch whose manifest write reports an error, and whose manifest then cannot be
/// read back, keeps every memory file (either copy may be the one the manifest names); `check
/// --repair` then keeps what the manifest names and removes the other; and `check` never
/// removes a stream while the lazy files that replaced it do not verify.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lazy_ram_keeps_every_memory_file_when_it_cannot_tell_which_one_counts() {
    require_qemu!();
    if !qsnap_testkit::failpoints_or_skip(
        "lazy_ram_keeps_every_memory_file_when_it_cannot_tell_which_one_counts",
    ) {
        return;
    }
    let rig = Rig::new().await;
    rig.snapshot_between_two_writes().await;
    let mem = rig.store().join("vms/g/memory");
    let files = |names: &[&str]| names.iter().all(|n| mem.join(n).exists());
    // The switch was written (the rename happened) but reported as failed, and the read-back
    // fails too: nothing may go.
    let out = rig
        .command(&["lazy-ram", "g", "s1"])
        .env(
            "FAILPOINTS",
            "lazy.switch-written=return(error);lazy.read-back=return(error)",
        )
        .output()
        .unwrap();
    assert!(!out.status.success(), "{}", show(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("is kept"),
        "{}",
        show(&out)
    );
    assert!(files(&["s1.mem", "s1.dev", "s1.ram"]), "{}", show(&out));
    // The manifest names the RAM image: the stream is the orphan.
    rig.repair_and_check("after the unreadable switch");
    assert!(files(&["s1.dev", "s1.ram"]) && !files(&["s1.mem"]));
    rig.all_revert("after the unreadable switch", step_of, 2)
        .await;

    // The switch written and read back, but its write reported an error (a directory sync
    // that failed: a power cut could still undo it), and so did writing it again: the
    // command fails (it must not say done what is not durable), the stream stays until the
    // repair.
    let rig = Rig::new().await;
    rig.snapshot_between_two_writes().await;
    let mem = rig.store().join("vms/g/memory");
    let out = rig
        .command(&["lazy-ram", "g", "s1"])
        .env("FAILPOINTS", "lazy.switch-written=return(error)")
        .output()
        .unwrap();
    assert!(!out.status.success(), "{}", show(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("could not be made durable"),
        "{}",
        show(&out)
    );
    assert!(
        files_in(&mem, &["s1.mem", "s1.dev", "s1.ram"]),
        "the stream went before the switch was durable: {}",
        show(&out)
    );
    rig.repair_and_check("after a switch not known durable");
    assert!(!mem.join("s1.mem").exists());
    rig.all_revert("after a switch not known durable", step_of, 2)
        .await;
    rig.stop();

    // A stream left beside lazy files that no longer verify is the last good copy: kept.
    let rig = Rig::new().await;
    rig.snapshot_between_two_writes().await;
    let mem = rig.store().join("vms/g/memory");
    std::fs::copy(mem.join("s1.mem"), rig.dir.path().join("s1.mem.saved")).unwrap();
    assert!(rig.qsnap(&["lazy-ram", "g", "s1"]).status.success());
    std::fs::copy(rig.dir.path().join("s1.mem.saved"), mem.join("s1.mem")).unwrap();
    let ram = std::fs::OpenOptions::new()
        .write(true)
        .open(mem.join("s1.ram"))
        .unwrap();
    std::os::unix::fs::FileExt::write_all_at(&ram, b"\xff", 4096).unwrap();
    drop(ram);
    let out = rig.qsnap(&["check", "g", "--repair", "--json"]);
    assert_eq!(out.status.code(), Some(1), "{}", show(&out));
    assert!(mem.join("s1.mem").exists(), "{}", show(&out));
    let report = json(&out);
    assert!(
        report["findings"]
            .as_array()
            .unwrap()
            .iter()
            .any(|f| f["kind"] == "orphan-memory"
                && f["repaired"] == false
                && f["fix"].as_str().unwrap().contains("only good copy")),
        "{report}"
    );
    rig.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clone_and_remove_survive_qsnap_or_qemu_dying_at_every_step() {
    require_qemu!();
    if !qsnap_testkit::failpoints_or_skip(
        "clone_and_remove_survive_qsnap_or_qemu_dying_at_every_step",
    ) {
        return;
    }
    for point in points("clone.") {
        for action in ["crash", "kill-qemu", "error"] {
            // Before the launch there is no QEMU of the clone's to kill.
            if action == "kill-qemu" && matches!(point, "clone.recorded" | "clone.overlays-made") {
                continue;
            }
            let what = format!("clone, {action} at {point}");
            eprintln!("--- {what}");
            let rig = Rig::new().await;
            // Declared after the rig: dropped first, while the store still exists.
            let _clone = KillRecordedQemu::new(&rig.store(), "c");
            rig.snapshot_between_two_writes().await;
            let out = rig.qsnap_failing(point, action, &["clone", "g", "s1", "c"]);
            faulted(&out, action, &what);
            // Whatever the fault left of the clone, `remove` takes all of it away (or the
            // failed clone already did).
            let still_known = rig.qsnap(&["status", "c"]).status.success();
            // A step that fails (rather than qsnap dying) is undone by the clone itself.
            assert!(
                !(action == "error" && still_known),
                "{what}: the failed clone left its record"
            );
            if still_known {
                // A QEMU left loading, its monitor held by someone else: told apart by the
                // pid and start time its record names.
                let _busy = (action == "crash" && point == "clone.launched").then(|| {
                    std::os::unix::net::UnixStream::connect(rig.store().join("vms/c/qmp.sock"))
                        .unwrap()
                });
                let out = rig.qsnap(&["remove", "c"]);
                assert!(out.status.success(), "{what}: remove: {}", show(&out));
            }
            // A clone that failed by itself keeps QEMU's log: its error points there.
            rig.clone_is_gone("c", !still_known, &what).await;
            // The source never noticed.
            rig.repair_and_check(&what);
            rig.holds(2, 2)
                .await
                .unwrap_or_else(|e| panic!("{what}: the source's disk lost data: {e}"));
            // And the name is free: a clone made now starts from s1's disk.
            let out = rig.qsnap(&["clone", "g", "s1", "c"]);
            assert!(out.status.success(), "{what}: clone again: {}", show(&out));
            rig.holds_on("c", 1, 2)
                .await
                .unwrap_or_else(|e| panic!("{what}: the clone's disk: {e}"));
            let out = rig.qsnap(&["remove", "c"]);
            assert!(out.status.success(), "{what}: remove: {}", show(&out));
            rig.clone_is_gone("c", false, &what).await;
            rig.all_revert(&what, step_of, 2).await;
            rig.stop();
        }
    }
    for point in points("remove.") {
        let what = format!("remove, crash at {point}");
        eprintln!("--- {what}");
        let rig = Rig::new().await;
        let _clone = KillRecordedQemu::new(&rig.store(), "c");
        rig.snapshot_between_two_writes().await;
        let out = rig.qsnap(&["clone", "g", "s1", "c"]);
        assert!(out.status.success(), "{what}: clone: {}", show(&out));
        // The clone's own snapshot: remove takes it too.
        assert!(rig.qsnap(&["create", "c", "cs"]).status.success());
        let out = rig.qsnap_failing(point, "crash", &["remove", "c"]);
        faulted(&out, "crash", &what);
        let out = rig.qsnap(&["remove", "c"]);
        assert!(out.status.success(), "{what}: remove again: {}", show(&out));
        rig.clone_is_gone("c", false, &what).await;
        rig.repair_and_check(&what);
        rig.holds(2, 2)
            .await
            .unwrap_or_else(|e| panic!("{what}: the source's disk lost data: {e}"));
        rig.all_revert(&what, step_of, 2).await;
        rig.stop();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_of_a_standby_survives_qsnap_dying_at_every_step() {
    require_qemu!();
    if !qsnap_testkit::failpoints_or_skip("a_claim_of_a_standby_survives_qsnap_dying_at_every_step")
    {
        return;
    }
    // Past `claim.recorded` the clone exists: the claim can only be finished.
    let committed = |p: &str| !matches!(p, "claim.journaled" | "claim.moved");
    let mut cases: Vec<(&str, &str)> = points("claim.").into_iter().map(|p| (p, "crash")).collect();
    cases.extend(
        points("claim.")
            .into_iter()
            .filter(|p| !committed(p))
            .map(|p| (p, "error")),
    );
    for (point, action) in cases {
        let what = format!("claim, {action} at {point}");
        eprintln!("--- {what}");
        let rig = Rig::new().await;
        let _clone = KillRecordedQemu::new(&rig.store(), "c");
        rig.snapshot_between_two_writes().await;
        let out = rig.qsnap(&["pool", "g", "s1", "--size", "1", "--json"]);
        assert!(out.status.success(), "{what}: pool: {}", show(&out));
        let sb = json(&out)["ready"][0].as_str().unwrap().to_owned();
        // Every standby's QEMU (refills make more) dies with a failing test.
        let _standbys = KillStandbys(rig.store());
        let out = rig.qsnap_failing(point, action, &["clone", "g", "s1", "c", "--json"]);
        faulted(&out, action, &what);
        // Either one standby or one clone, never both or neither.
        let clone = rig.qsnap(&["status", "c", "--json"]);
        assert_eq!(
            clone.status.success(),
            committed(point),
            "{what}: {}",
            show(&clone)
        );
        if point == "claim.record-released" {
            // The standby's record went, its journal stayed: no listing of VMs shows it, but
            // `check` of the source does, and `--repair` clears it (the clone stays whole).
            let leftover = rig.store().join("vms").join(&sb);
            assert!(leftover.join("journal.json").exists(), "{what}");
            let out = rig.qsnap(&["check", "g", "--json"]);
            let reported = json(&out)["findings"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|f| {
                    f["kind"] == "interrupted"
                        && f["what"].as_str().is_some_and(|w| w.contains(&sb))
                        && f["repaired"] == false
                });
            assert!(
                !out.status.success() && reported,
                "{what}: check: {}",
                show(&out)
            );
            let out = rig.qsnap(&["check", "g", "--repair"]);
            assert!(out.status.success(), "{what}: repair: {}", show(&out));
            assert!(!leftover.exists(), "{what}: {} stayed", leftover.display());
            let out = rig.qsnap(&["status", "c", "--json"]);
            assert!(out.status.success(), "{what}: the clone: {}", show(&out));
        }
        // The same clone asked for again (with no repair in between, but for the case
        // above): it settles the claim cut short first — then takes the standby (back whole),
        // or finds the clone made.
        let retry = rig.qsnap(&["clone", "g", "s1", "c", "--json"]);
        if committed(point) {
            assert_eq!(
                retry.status.code(),
                Some(6),
                "{what}: retry: {}",
                show(&retry)
            );
        } else {
            assert!(retry.status.success(), "{what}: retry: {}", show(&retry));
            assert_eq!(
                json(&retry)["standby"],
                sb.as_str(),
                "{what}: {}",
                show(&retry)
            );
        }
        // Another clone beside it (cold, or from the refill's standby), then the repair.
        let _other = KillRecordedQemu::new(&rig.store(), "c2");
        let out = rig.qsnap(&["clone", "g", "s1", "c2"]);
        assert!(
            out.status.success(),
            "{what}: another clone: {}",
            show(&out)
        );
        let out = rig.qsnap(&["check", "g", "--repair"]);
        assert!(
            out.status.success(),
            "{what}: check --repair: {}",
            show(&out)
        );
        let standby = rig.qsnap(&["status", &sb, "--json"]);
        assert!(
            !standby.status.success(),
            "{what}: {sb} is still a standby: {}",
            show(&standby)
        );
        let dir = rig.store().join("vms").join(&sb);
        assert!(!dir.exists(), "{what}: {} is left", dir.display());
        let st = json(&rig.qsnap(&["status", "c", "--json"]));
        assert_eq!(st["clone-of"]["standby"], sb.as_str(), "{what}: {st}");
        if st["state"]["runstate"] != "running" {
            let out = rig.qsnap(&["resume", "c"]);
            assert!(out.status.success(), "{what}: resume: {}", show(&out));
        }
        // Nothing lost: each clone holds the snapshot's disk, and writes on.
        for vm in ["c", "c2"] {
            rig.holds_on(vm, 1, 2)
                .await
                .unwrap_or_else(|e| panic!("{what}: {vm}'s disk: {e}"));
            let out = rig.qsnap(&["remove", vm]);
            assert!(out.status.success(), "{what}: remove {vm}: {}", show(&out));
            rig.clone_is_gone(vm, false, &what).await;
        }
        // The pool goes with every standby (a refill started by the clone included).
        let out = rig.qsnap(&["pool", "g", "s1", "--size", "0"]);
        assert!(
            out.status.success(),
            "{what}: pool --size 0: {}",
            show(&out)
        );
        let left: Vec<_> = std::fs::read_dir(rig.store().join("standbys"))
            .map(|rd| rd.flatten().map(|e| e.file_name()).collect())
            .unwrap_or_default();
        assert!(left.is_empty(), "{what}: standbys left: {left:?}");
        rig.repair_and_check(&what);
        rig.holds(2, 2)
            .await
            .unwrap_or_else(|e| panic!("{what}: the source's disk lost data: {e}"));
        rig.stop();
    }
}

/// Kills, when dropped, the QEMU of every standby (`sb-*`) the store records.
struct KillStandbys(PathBuf);

impl Drop for KillStandbys {
    fn drop(&mut self) {
        for e in std::fs::read_dir(self.0.join("vms"))
            .into_iter()
            .flatten()
            .flatten()
        {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with("sb-") {
                drop(KillRecordedQemu::new(&self.0, &name));
            }
        }
    }
}

impl Rig {
    /// Nothing of clone `vm` is left: no record, no QEMU, none of its files or images (but
    /// QEMU's log when `log_may_stay`).
    async fn clone_is_gone(&self, vm: &str, log_may_stay: bool, what: &str) {
        let out = self.qsnap(&["status", vm]);
        assert!(!out.status.success(), "{what}: {vm} is still known");
        let dir = self.store().join("vms").join(vm);
        let socket = dir.join("qmp.sock");
        let mut left = Vec::new();
        for _ in 0..100 {
            left = qemu_mapping(&socket);
            if left.is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(left.is_empty(), "{what}: {vm}'s QEMU runs on: {left:?}");
        // The lock file stays (removing a lock others may be opening is a race); the
        // monitor socket of a QEMU killed with SIGKILL stays too, harmless.
        let files: Vec<String> = std::fs::read_dir(&dir)
            .map(|rd| {
                rd.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| n != "lock" && n != "qmp.sock")
                    .filter(|n| !(log_may_stay && n == "qemu.log"))
                    .collect()
            })
            .unwrap_or_default();
        assert!(
            files.is_empty(),
            "{what}: left in {}: {files:?}",
            dir.display()
        );
    }
}

/// Pids of processes whose command line names `image` (a helper QEMU mapping it).
fn qemu_mapping(image: &std::path::Path) -> Vec<u32> {
    let needle = image.display().to_string();
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| String::from_utf8_lossy(&c).contains(&needle))
        })
        .filter(|pid| *pid != std::process::id())
        .collect()
}
