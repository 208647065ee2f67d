//! The `qsnap` binary end to end, against a real (kernel-less) QEMU.

use assert_cmd::Command;
use qsnap_testkit::serial::SerialLog;
use qsnap_testkit::{create_image, require_qemu, DiskStyle, KillRecordedQemu, VmBuilder};
use serde_json::Value;
use std::time::Duration;

fn qsnap() -> Command {
    Command::cargo_bin("qsnap").unwrap()
}

/// Runs `qsnap ARGS…` against the store at `store`.
fn in_store(store: &std::path::Path) -> impl Fn(&[&str]) -> std::process::Output + '_ {
    move |args| {
        let out = qsnap()
            .env("QSNAP_STORE", store)
            .env("NO_COLOR", "1")
            .args(args)
            .output()
            .unwrap();
        qsnap_testkit::json_output::check(args, &out);
        out
    }
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
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
    qsnap_testkit::json_output::check(&["info", &sock, "--json"], &out);
    assert!(out.status.success(), "{out:?}");
    let v = stdout_json(&out);
    assert_eq!(v["runstate"], "running");
    assert_eq!(v["migration-blockers"], serde_json::json!([]));
    assert_eq!(v["background-snapshot"], true);
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
    if !qsnap_testkit::kvm_or_skip("info_names_a_migration_blocker") {
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
            qsnap_testkit::kvm_vm_failed("info_names_a_migration_blocker", &report);
            return;
        }
    };
    let sock = vm.qmp_path.display().to_string();
    let out = qsnap().args(["info", &sock, "--json"]).output().unwrap();
    qsnap_testkit::json_output::check(&["info", &sock, "--json"], &out);
    let v = stdout_json(&out);
    let blockers = v["migration-blockers"].to_string();
    assert!(blockers.contains("invtsc"), "{v}");
    let out = qsnap().args(["info", &sock]).output().unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("BLOCKED"));
}

/// `attach`, `create` (memory and disk-only), `list` and `show`, text and `--json`, and the
/// refusals a script must be able to tell apart by exit code.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attach_create_list_show() {
    require_qemu!();
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("d.qcow2");
    create_image(&disk, "qcow2", "16M").await;
    let vm = VmBuilder::idle()
        .memory(128)
        .disk(&disk, "qcow2", DiskStyle::Drive)
        .spawn()
        .await;
    let sock = vm.qmp_path.display().to_string();
    let store = dir.path().join("store");
    let run = in_store(&store);

    // Unknown VM: exit 4 and a hint; a socket that is not there: exit 3.
    let out = run(&["create", "vm1", "s1"]);
    assert_eq!(out.status.code(), Some(4), "{out:?}");
    assert!(text(&out.stderr).contains("qsnap attach vm1"), "{out:?}");
    let out = run(&["attach", "vm1", "--qmp", "/nonexistent/qmp.sock"]);
    assert_eq!(out.status.code(), Some(3), "{out:?}");

    let out = run(&["attach", "vm1", "--qmp", &sock, "--json"]);
    assert!(out.status.success(), "{out:?}");
    let rec = stdout_json(&out);
    assert_eq!(rec["qmp"], sock.as_str());
    assert_eq!(rec["pid"], vm.pid().as_raw());
    let argv = rec["command"]["argv"].as_array().unwrap();
    assert!(argv.iter().any(|a| a == "-qmp"), "{rec}");

    let out = run(&["create", "vm1", "s1", "--json"]);
    assert!(out.status.success(), "{out:?}");
    let m = stdout_json(&out);
    assert_eq!(m["mode"], "point-in-time");
    assert_eq!(m["name"], "s1");
    let mem = m["memory"]["file"].as_str().unwrap();
    assert!(std::path::Path::new(mem).starts_with(&store), "{mem}");
    assert_eq!(
        m["disks"][0]["overlay"],
        dir.path().join("d.s1.qcow2").display().to_string()
    );
    assert!(m["pause-ms"].as_f64().unwrap() > 0.0);

    let out = run(&["create", "vm1", "s2", "--disk-only"]);
    assert!(out.status.success(), "{out:?}");
    let summary = text(&out.stdout);
    assert!(
        summary.contains("snapshot s2 of vm1 (disk-only)"),
        "{summary}"
    );
    assert!(summary.contains("parent         s1"), "{summary}");

    // Refusals: a used name (6), bad names (2), conflicting flags (2).
    let out = run(&["create", "vm1", "s1"]);
    assert_eq!(out.status.code(), Some(6));
    assert!(
        text(&out.stderr).contains("already has a snapshot named \"s1\""),
        "{out:?}"
    );
    for bad in ["a/b", "..", "../x"] {
        let out = run(&["create", "vm1", bad]);
        assert_eq!(out.status.code(), Some(2), "{bad}: {out:?}");
        assert!(
            text(&out.stderr).contains("invalid snapshot name"),
            "{out:?}"
        );
    }
    let out = run(&["create", "vm1", "s3", "--disk-only", "--mode", "precopy"]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");

    let out = run(&["list", "vm1", "--json"]);
    assert!(out.status.success(), "{out:?}");
    let l = stdout_json(&out);
    assert_eq!(l["vm"]["current"], "s2");
    let names: Vec<_> = l["snapshots"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(names, vec!["s1", "s2"]);
    let out = run(&["list", "vm1"]);
    let tree = text(&out.stdout);
    let lines: Vec<&str> = tree.lines().collect();
    // A chain: one column, however long.
    assert!(lines[0].starts_with("  s1 "), "{tree}");
    assert!(lines[1].starts_with("* s2 "), "{tree}");

    let out = run(&["show", "vm1", "s1"]);
    assert!(out.status.success(), "{out:?}");
    let shown = text(&out.stdout);
    assert!(
        shown.contains("(point-in-time)") && shown.contains("guest paused"),
        "{shown}"
    );
    let out = run(&["show", "vm1", "s1", "--json"]);
    assert_eq!(stdout_json(&out)["name"], "s1");
    let out = run(&["show", "vm1", "nope"]);
    assert_eq!(out.status.code(), Some(4));
    assert!(
        text(&out.stderr).contains("no snapshot named \"nope\""),
        "{out:?}"
    );
}

/// `run`, `status`, `stop`, `start` and `revert` from the command line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_status_stop_start_revert() {
    require_qemu!();
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("d.qcow2");
    let argv = VmBuilder::idle_with_disk(&disk, "16M", &dir.path().join("serial.log")).await;
    let store = dir.path().join("store");
    let _kill = KillRecordedQemu::new(&store, "vm1");
    let run = in_store(&store);

    let mut cmd = vec!["run", "vm1", "--json", "--"];
    cmd.extend(argv.iter().map(String::as_str));
    let out = run(&cmd);
    assert!(out.status.success(), "{out:?}");
    let rec = stdout_json(&out);
    assert_eq!(rec["origin"], "run");
    let pid = rec["pid"].as_u64().unwrap();
    // The same name again is refused (6); a QEMU that cannot start fails (1).
    let out = run(&cmd);
    assert_eq!(out.status.code(), Some(6), "{out:?}");
    assert!(
        text(&out.stderr).contains("already in the store"),
        "{out:?}"
    );
    let out = run(&["run", "bad", "--", "qemu-system-x86_64", "-no-such-option"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(text(&out.stderr).contains("QEMU did not start"), "{out:?}");

    let out = run(&["status", "vm1", "--json"]);
    let st = stdout_json(&out);
    assert_eq!(st["state"]["state"], "running", "{st}");
    assert_eq!(st["state"]["pid"].as_u64(), Some(pid));

    let out = run(&["create", "vm1", "s1"]);
    assert!(out.status.success(), "{out:?}");
    let out = run(&["create", "vm1", "q", "--disk-only", "--quiesce"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(text(&out.stderr).contains("no guest agent"), "{out:?}");
    let out = run(&["revert", "vm1", "s1", "--json"]);
    assert!(out.status.success(), "{out:?}");
    let r = stdout_json(&out);
    assert_eq!(r["memory-restored"], true);
    assert_eq!(r["resumed"], true);
    let out = run(&["revert", "vm1", "s1"]);
    assert!(text(&out.stdout).contains("vm1 reverted to s1"), "{out:?}");
    let out = run(&["revert", "vm1", "nope"]);
    assert_eq!(out.status.code(), Some(4));

    // A branch: s1 → a, back to s1, then b. `list` draws the tree and marks b as current.
    for step in [
        &["create", "vm1", "a"][..],
        &["revert", "vm1", "s1"],
        &["create", "vm1", "b"],
    ] {
        let out = run(step);
        assert!(out.status.success(), "{step:?}: {out:?}");
    }
    let out = run(&["list", "vm1"]);
    let tree = text(&out.stdout);
    let lines: Vec<&str> = tree.lines().collect();
    assert_eq!(lines.len(), 4, "{tree}");
    assert!(lines[3].starts_with("on disk: "), "{tree}");
    assert!(lines[0].starts_with("  s1 "), "{tree}");
    assert!(lines[1].starts_with("  ├─ a "), "{tree}");
    assert!(lines[2].starts_with("* └─ b "), "{tree}");

    let out = run(&["stop", "vm1"]);
    assert!(out.status.success(), "{out:?}");
    let out = run(&["status", "vm1"]);
    assert!(text(&out.stdout).starts_with("vm1: stopped"), "{out:?}");
    let out = run(&["start", "vm1"]);
    assert!(out.status.success(), "{out:?}");
    // Started again: nothing to do, said so (exit 0).
    let out = run(&["start", "vm1"]);
    assert!(out.status.success(), "{out:?}");
    assert!(text(&out.stdout).contains("running already"), "{out:?}");
    let out = run(&["status", "vm1"]);
    let shown = text(&out.stdout);
    assert!(
        shown.contains("running") && shown.contains("current snapshot: b"),
        "{shown}"
    );
    assert!(
        shown.contains("d.b.qcow2 → ") && shown.contains("d.qcow2"),
        "{shown}"
    );

    // Lazy RAM from the CLI: made right after the snapshot, idempotent, used by the revert.
    let out = run(&["revert", "vm1", "b", "--json"]);
    let r = stdout_json(&out);
    assert_eq!(r["ram"]["how"], "eager", "{r}");
    assert!(
        r["ram"]["why"]
            .as_str()
            .unwrap()
            .contains("qsnap lazy-ram vm1 b"),
        "{r}"
    );
    let out = run(&["create", "vm1", "lz", "--lazy-ram", "--json"]);
    assert!(out.status.success(), "{out:?}");
    let m = stdout_json(&out);
    assert!(
        m["memory"]["lazy"]["image"]
            .as_str()
            .unwrap_or_default()
            .ends_with("/memory/lz.ram"),
        "{m}\n{}",
        text(&out.stderr)
    );
    let out = run(&["lazy-ram", "vm1", "lz", "--json"]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(stdout_json(&out)["already"], true);
    let out = run(&["lazy-ram", "vm1", "b"]);
    assert!(out.status.success(), "{out:?}");
    assert!(text(&out.stdout).contains("memory made lazy"), "{out:?}");
    let out = run(&["revert", "vm1", "lz"]);
    assert!(out.status.success(), "{out:?}");
    assert!(text(&out.stdout).contains("RAM: mapped lazily"), "{out:?}");
    let out = run(&["lazy-ram", "vm1", "nope"]);
    assert_eq!(out.status.code(), Some(4), "{out:?}");
    let out = run(&["check", "vm1"]);
    assert!(out.status.success(), "{out:?}");
    // A lazy-ram that cannot be made (a disk-only snapshot has no memory) never fails the
    // create: the snapshot stands, a warning says so.
    let out = run(&["create", "vm1", "dz", "--disk-only", "--lazy-ram", "--json"]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(stdout_json(&out)["name"], "dz", "{out:?}");
    assert!(
        text(&out.stderr).contains("the snapshot was taken, but its memory stays a stream"),
        "{out:?}"
    );
    let out = run(&["delete", "vm1", "dz"]);
    assert!(out.status.success(), "{out:?}");

    // A clone of lz runs next to vm1, with its own console; status says where it went;
    // remove takes it away. A bad --replace and an existing name are refused.
    let _kill_clone = KillRecordedQemu::new(&store, "c1");
    let out = run(&["clone", "vm1", "lz", "c1", "--replace", "nowhere=x"]);
    assert_eq!(out.status.code(), Some(6), "{out:?}");
    assert!(text(&out.stderr).contains("appears nowhere"), "{out:?}");
    let out = run(&["clone", "vm1", "lz", "c1", "--json"]);
    assert!(out.status.success(), "{out:?}");
    let c = stdout_json(&out);
    assert_eq!(
        (c["resumed"].clone(), c["ram"]["how"].clone()),
        (true.into(), "lazy".into()),
        "{c}"
    );
    let out = run(&["clone", "vm1", "lz", "c1"]);
    assert!(
        text(&out.stderr).contains("already in the store"),
        "{out:?}"
    );
    let out = run(&["status", "c1", "--json"]);
    let st = stdout_json(&out);
    assert_eq!(st["state"]["state"], "running", "{st}");
    assert_eq!(st["clone-of"]["vm"], "vm1", "{st}");
    let console = st["clone-of"]["moved"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["option"] == "-chardev qsnapser")
        .unwrap_or_else(|| panic!("{st}"))["to"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(
        console.starts_with(store.join("vms/c1/files").to_str().unwrap()),
        "{console}"
    );
    let out = run(&["remove", "vm1"]);
    assert!(text(&out.stderr).contains("not a clone"), "{out:?}");
    let out = run(&["remove", "c1", "--json"]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(stdout_json(&out)["stopped"], true);
    assert!(!std::path::Path::new(&console).exists());

    let out = run(&["stop", "vm1"]);
    assert!(out.status.success(), "{out:?}");
}

/// `--disk-only --quiesce` through the real QEMU guest agent in the test guest: its ext2
/// filesystem is frozen while the disks switch and thawed after; the guest runs on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quiesced_disk_only_snapshot_freezes_and_thaws_the_guest_filesystems() {
    require_qemu!();
    let dir = tempfile::tempdir().unwrap();
    let (vda, vdb) = (dir.path().join("vda.qcow2"), dir.path().join("vdb.qcow2"));
    create_image(&vda, "qcow2", "64M").await;
    create_image(&vdb, "qcow2", "32M").await;
    let agent = dir.path().join("qga.sock");
    let serial = dir.path().join("serial.log");
    let argv = VmBuilder::guest()
        .disk(&vda, "qcow2", DiskStyle::Blockdev)
        .disk(&vdb, "qcow2", DiskStyle::Blockdev)
        .guest_agent(&agent)
        .command_line(&serial)
        .await;
    let store = dir.path().join("store");
    let _kill = KillRecordedQemu::new(&store, "g");
    let run = in_store(&store);
    let mut cmd = vec!["run", "g", "--json", "--"];
    cmd.extend(argv.iter().map(String::as_str));
    let out = run(&cmd);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        stdout_json(&out)["guest-agent"],
        agent.display().to_string()
    );
    let log = SerialLog::follow(&serial);
    log.wait_from(0, Duration::from_secs(120), |l| {
        l.contains("/dev/vdb mounted").then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}: {}", log.tail(20)));
    log.wait_tick_from(0, Duration::from_secs(60))
        .await
        .unwrap();

    // Without --disk-only the flag is refused by the parser.
    let out = run(&["create", "g", "q0", "--quiesce"]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");

    let out = run(&["create", "g", "q1", "--disk-only", "--quiesce", "--json"]);
    assert!(out.status.success(), "{out:?}");
    let m = stdout_json(&out);
    assert_eq!(m["mode"], "disk-only");
    assert_eq!(m["quiesced-filesystems"], 1, "{m}");
    assert_eq!(m["disks"].as_array().unwrap().len(), 2);

    // Thawed, and the guest keeps ticking.
    let mut ga = qsnap_engine::testing::GuestAgent::connect(&agent, Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(ga.status().await.unwrap(), "thawed");
    drop(ga);
    let last = *log.ticks().last().unwrap();
    log.wait_from(0, Duration::from_secs(30), |l| {
        qsnap_testkit::serial::parse_tick(l).filter(|&t| t > last + 1)
    })
    .await
    .unwrap();
    assert!(log.mismatches().is_empty());

    // The freeze ran but its answer "timed out": the snapshot fails, and the guest's
    // filesystems are thawed all the same (the guest may have frozen late).
    if qsnap_testkit::failpoints_or_skip("the freeze-timeout part of quiesced_disk_only_snapshot") {
        let out = qsnap()
            .env("QSNAP_STORE", &store)
            .env("FAILPOINTS", "create.freeze-sent=return(timeout)")
            .args(["create", "g", "q2", "--disk-only", "--quiesce"])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1), "{out:?}");
        let mut ga = qsnap_engine::testing::GuestAgent::connect(&agent, Duration::from_secs(10))
            .await
            .unwrap();
        assert_eq!(ga.status().await.unwrap(), "thawed");
        drop(ga);
        let out = run(&["check", "g"]);
        assert!(out.status.success(), "{out:?}");
        let last = *log.ticks().last().unwrap();
        log.wait_from(0, Duration::from_secs(30), |l| {
            qsnap_testkit::serial::parse_tick(l).filter(|&t| t > last + 1)
        })
        .await
        .unwrap();

        // The switch worked but the thaw after it failed: the snapshot stands (it is not
        // undone), the error says so, and the thaw is owed: a recovery that cannot thaw
        // either stops everything else with what to do, one that can ends it.
        let out = qsnap()
            .env("QSNAP_STORE", &store)
            .env("FAILPOINTS", "create.thaw=return(error)")
            .args(["create", "g", "q3", "--disk-only", "--quiesce"])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1), "{out:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("q3 of g was taken, but") && err.contains("could not be thawed"),
            "{err}"
        );
        let listed = stdout_json(&run(&["list", "g", "--json"]));
        assert!(
            listed["snapshots"]
                .as_array()
                .unwrap()
                .iter()
                .any(|m| m["name"] == "q3"),
            "{listed}"
        );
        let frozen = || async {
            let mut ga =
                qsnap_engine::testing::GuestAgent::connect(&agent, Duration::from_secs(10))
                    .await
                    .unwrap();
            ga.status().await.unwrap()
        };
        assert_eq!(frozen().await, "frozen");
        let out = qsnap()
            .env("QSNAP_STORE", &store)
            .env("FAILPOINTS", "recover.thaw=return(error)")
            .args(["create", "g", "q4", "--disk-only"])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1), "{out:?}");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("may still be frozen"),
            "{out:?}"
        );
        assert_eq!(frozen().await, "frozen");
        let out = run(&["check", "g", "--repair"]);
        assert!(out.status.success(), "{out:?}");
        assert_eq!(frozen().await, "thawed");
        let out = run(&["check", "g"]);
        assert!(out.status.success(), "{out:?}");
        let last = *log.ticks().last().unwrap();
        log.wait_from(0, Duration::from_secs(30), |l| {
            qsnap_testkit::serial::parse_tick(l).filter(|&t| t > last + 1)
        })
        .await
        .unwrap();
    }
    let out = run(&["stop", "g"]);
    assert!(out.status.success(), "{out:?}");
}

/// `delete`, `check` and `revert --keep-current` from the command line: JSON for scripts,
/// exit codes, refusals.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_check_and_keep_current() {
    require_qemu!();
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("d.qcow2");
    let argv = VmBuilder::idle_with_disk(&disk, "16M", &dir.path().join("serial.log")).await;
    let store = dir.path().join("store");
    let _kill = KillRecordedQemu::new(&store, "vm1");
    let run = in_store(&store);
    let mut cmd = vec!["run", "vm1", "--"];
    cmd.extend(argv.iter().map(String::as_str));
    assert!(run(&cmd).status.success());
    for s in ["s1", "s2", "s3"] {
        let out = run(&["create", "vm1", s]);
        assert!(out.status.success(), "{out:?}");
    }

    // Refusals: no snapshot named, neither a name nor --all, both.
    let out = run(&["delete", "vm1", "nope"]);
    assert_eq!(out.status.code(), Some(4), "{out:?}");
    assert!(
        text(&out.stderr).contains("no snapshot named \"nope\""),
        "{out:?}"
    );
    assert_eq!(run(&["delete", "vm1"]).status.code(), Some(2));
    assert_eq!(
        run(&["delete", "vm1", "s1", "--all"]).status.code(),
        Some(2)
    );
    assert_eq!(run(&["delete", "vm1", "../x"]).status.code(), Some(2));

    // A middle snapshot, as JSON: what was deleted, merged and removed.
    let out = run(&["delete", "vm1", "s2", "--json"]);
    assert!(out.status.success(), "{out:?}");
    let r = stdout_json(&out);
    assert_eq!(r["deleted"], serde_json::json!(["s2"]));
    assert_eq!(r["current"], "s3");
    assert_eq!(r["live"], true);
    let merges = r["merges"].as_array().unwrap();
    assert_eq!(merges.len(), 1, "{r}");
    assert_eq!(merges[0]["kind"], "stream");
    assert!(r["memory-removed"][0].as_str().unwrap().ends_with("s2.mem"));
    let out = run(&["list", "vm1", "--json"]);
    let names: Vec<String> = stdout_json(&out)["snapshots"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["name"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(names, ["s1", "s3"]);

    // check: clean → 0; a stray memory file → 1 and says what to do; --repair → 0.
    let out = run(&["check", "vm1", "--json"]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(stdout_json(&out)["clean"], true);
    // Files a check verified, still for 2 s before, are not read again (and it says so);
    // --full reads them.
    std::thread::sleep(std::time::Duration::from_millis(2500));
    assert!(run(&["check", "vm1"]).status.success());
    let out = run(&["check", "vm1"]);
    let said = text(&out.stdout);
    assert!(
        out.status.success() && said.contains("not read again") && said.contains("--full"),
        "{out:?}"
    );
    let out = run(&["check", "vm1", "--full", "--json"]);
    let r = stdout_json(&out);
    assert!(r["clean"] == true && r["unchanged"] == 0, "{r}");
    // (What a crash leaves: a memory file with qsnap's header that no snapshot names.)
    let mut stray = b"QSNAPMEM".to_vec();
    stray.resize(4096, 0);
    std::fs::write(store.join("vms/vm1/memory/stray.mem"), &stray).unwrap();
    let out = run(&["check", "vm1"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let said = text(&out.stdout);
    assert!(
        said.contains("orphan-memory") && said.contains("--repair"),
        "{said}"
    );
    let out = run(&["check", "vm1", "--repair"]);
    assert!(out.status.success(), "{out:?}");
    assert!(text(&out.stdout).contains("repaired"), "{out:?}");
    assert!(!store.join("vms/vm1/memory/stray.mem").exists());

    // revert says it discards the current state, unless --keep-current.
    let help = text(&run(&["revert", "--help"]).stdout);
    assert!(
        help.contains("DISCARDS") && help.contains("--keep-current"),
        "{help}"
    );
    let out = run(&["revert", "vm1", "s1", "--keep-current", "--json"]);
    assert!(out.status.success(), "{out:?}");
    let r = stdout_json(&out);
    let kept = r["kept-current"].as_str().unwrap().to_owned();
    assert!(kept.starts_with("before-revert-"), "{r}");
    let out = run(&["revert", "vm1", &kept]);
    assert!(out.status.success(), "{out:?}");

    // Everything goes: one image per disk, the original.
    let out = run(&["delete", "vm1", "--all", "--json"]);
    assert!(out.status.success(), "{out:?}");
    let out = run(&["status", "vm1", "--json"]);
    let st = stdout_json(&out);
    assert_eq!(st["state"]["state"], "running", "{st}");
    assert_eq!(
        st["disks"][0]["chain"],
        serde_json::json!([disk.display().to_string()])
    );
    let files: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "qcow2"))
        .collect();
    assert_eq!(files.len(), 1, "{files:?}");
    assert!(run(&["stop", "vm1"]).status.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn info_and_qmp_take_a_vm_name_and_pause_and_resume_say_what_they_did() {
    require_qemu!();
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let run = in_store(&store);
    let argv = VmBuilder::idle_with_disk(
        &dir.path().join("d.qcow2"),
        "16M",
        &dir.path().join("serial.log"),
    )
    .await;
    let _kill = KillRecordedQemu::new(&store, "vm1");
    let mut cmd = vec!["run", "vm1", "--"];
    cmd.extend(argv.iter().map(String::as_str));
    let out = run(&cmd);
    assert!(out.status.success(), "{}", text(&out.stderr));
    // By name: the VM's recorded monitor.
    let out = run(&["qmp", "vm1", "query-status"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(stdout_json(&out)["status"], "running");
    let out = run(&["info", "vm1", "--json"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(
        stdout_json(&out)["runstate"],
        "running",
        "{}",
        text(&out.stdout)
    );
    // pause / resume, each twice: the second says it had nothing to do (exit 0).
    let status = || stdout_json(&run(&["qmp", "vm1", "query-status"]))["status"].clone();
    for (cmd, state, says) in [
        ("pause", "paused", "paused"),
        ("pause", "paused", "was paused already"),
        ("resume", "running", "resumed"),
        ("resume", "running", "was running already"),
    ] {
        let out = run(&[cmd, "vm1"]);
        assert!(out.status.success(), "{cmd}: {}", text(&out.stderr));
        assert!(
            text(&out.stdout).contains(says),
            "{cmd}: {}",
            text(&out.stdout)
        );
        assert_eq!(status(), state, "{cmd}");
    }
    // A name that is neither a VM nor a socket: said plainly.
    let out = run(&["info", "vm2"]);
    assert_eq!(out.status.code(), Some(4), "{out:?}");
    assert!(
        text(&out.stderr).contains("neither a monitor socket nor a VM"),
        "{}",
        text(&out.stderr)
    );
    let out = run(&["stop", "vm1"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    // A stopped VM cannot be resumed: an error, not a launch.
    let out = run(&["resume", "vm1"]);
    assert_eq!(out.status.code().map(|c| c != 0), Some(true), "{out:?}");
}
