//! The commands a virsh user reaches for, and what scripts read: `forget`, `shutdown`,
//! snapshot names (generated, described, renamed), `delete` of several and of a subtree,
//! `revert --latest`, exit codes by kind with JSON errors, `--wait`, and the errors that
//! point the right way. The real binary against real QEMUs (kernel-less, and the test guest
//! where the guest must act: the power button).

use assert_cmd::Command;
use qsnap_testkit::serial::SerialLog;
use qsnap_testkit::{create_image, require_qemu, DiskStyle, KillRecordedQemu, VmBuilder};
use serde_json::Value;
use std::path::Path;
use std::process::Output;
use std::time::Duration;

/// Runs `qsnap ARGS…` against the store at `store`.
fn in_store(store: &Path) -> impl Fn(&[&str]) -> Output + '_ {
    move |args| {
        let out = Command::cargo_bin("qsnap")
            .unwrap()
            .env("QSNAP_STORE", store)
            .env("NO_COLOR", "1")
            .env_remove("FAILPOINTS")
            .args(args)
            .timeout(Duration::from_secs(180))
            .output()
            .unwrap();
        qsnap_testkit::json_output::check(args, &out);
        out
    }
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn show(out: &Output) -> String {
    format!(
        "status {:?}\nstdout: {}\nstderr: {}",
        out.status,
        text(&out.stdout),
        text(&out.stderr)
    )
}

fn json(out: &Output) -> Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", show(out)))
}

fn ok(out: Output) -> Output {
    assert!(out.status.success(), "{}", show(&out));
    out
}

/// The error object `--json` prints for a failed command, with its exit code checked.
fn json_error(out: &Output, code: i32, kind: &str) -> Value {
    assert_eq!(out.status.code(), Some(code), "{}", show(out));
    let v = json(out);
    assert_eq!(v["error"]["kind"], kind, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "{v}"
    );
    v
}

/// Starts a kernel-less VM `name` with one 16 MiB disk under `qsnap run`.
async fn run_idle(store: &Path, dir: &Path, name: &str) -> std::path::PathBuf {
    let disk = dir.join(format!("{name}.qcow2"));
    let argv =
        VmBuilder::idle_with_disk(&disk, "16M", &dir.join(format!("{name}.serial.log"))).await;
    let mut cmd = vec!["run", name, "--"];
    cmd.extend(argv.iter().map(String::as_str));
    ok(in_store(store)(&cmd));
    disk
}

fn pid_alive(pid: u64) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forget_keeps_every_image_and_refuses_what_would_lose_data() {
    require_qemu!();
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let _kill = (
        KillRecordedQemu::new(&store, "vm1"),
        KillRecordedQemu::new(&store, "c1"),
    );
    let run = in_store(&store);
    let disk = run_idle(&store, dir.path(), "vm1").await;
    let pid = json(&ok(run(&["status", "vm1", "--json"])))["state"]["pid"]
        .as_u64()
        .unwrap();
    ok(run(&["create", "vm1", "s1"]));

    // Snapshots: refused, naming them and both ways on.
    let out = run(&["forget", "vm1"]);
    assert_eq!(out.status.code(), Some(6), "{}", show(&out));
    let said = text(&out.stderr);
    assert!(
        said.contains("1 snapshot (s1)")
            && said.contains("delete vm1 --all")
            && said.contains("--with-snapshots"),
        "{said}"
    );
    // Running: refused, pointing at --stop.
    let out = run(&["forget", "vm1", "--with-snapshots", "--json"]);
    let e = json_error(&out, 6, "refused");
    assert!(
        e["error"]["message"].as_str().unwrap().contains("--stop"),
        "{e}"
    );
    // A clone runs on one of its images: refused until the clone is gone.
    ok(run(&["clone", "vm1", "s1", "c1"]));
    let out = run(&["forget", "vm1", "--stop", "--with-snapshots"]);
    assert_eq!(out.status.code(), Some(6), "{}", show(&out));
    assert!(text(&out.stderr).contains("c1 runs on"), "{}", show(&out));
    // The clone itself: refused, pointing at `remove`.
    let e = json_error(&run(&["forget", "c1", "--stop", "--json"]), 6, "refused");
    assert_eq!(e["error"]["fix"], "qsnap remove c1", "{e}");
    assert!(pid_alive(pid), "a refused forget stopped the VM");
    assert!(store.join("vms/vm1/vm.json").exists());
    ok(run(&["remove", "c1"]));
    assert!(!store.join("vms/c1").exists(), "remove left vms/c1 behind");

    let out = ok(run(&[
        "forget",
        "vm1",
        "--stop",
        "--with-snapshots",
        "--json",
    ]));
    let r = json(&out);
    assert_eq!(r["stopped"], true, "{r}");
    assert_eq!(r["snapshots"], serde_json::json!(["s1"]));
    assert_eq!(r["memory-removed"].as_array().unwrap().len(), 1, "{r}");
    for p in r["memory-removed"].as_array().unwrap() {
        assert!(
            !Path::new(p.as_str().unwrap()).exists(),
            "{p} is still there"
        );
    }
    // Every image stays, and the current one still opens down its whole chain.
    let top = r["disks"][0]["image"].as_str().unwrap().to_owned();
    assert_ne!(top, disk.display().to_string(), "{r}");
    assert!(disk.exists());
    for p in r["kept-images"].as_array().unwrap() {
        assert!(Path::new(p.as_str().unwrap()).exists(), "{p} was removed");
    }
    let info = std::process::Command::new("qemu-img")
        .args(["info", "--backing-chain", "-U", &top])
        .output()
        .unwrap();
    assert!(info.status.success(), "{}", text(&info.stderr));
    assert!(text(&info.stdout).contains(&disk.display().to_string()));
    // Gone from the store, its QEMU stopped, nothing left in its folder.
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while pid_alive(pid) && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(!pid_alive(pid), "its QEMU still runs");
    assert!(!store.join("vms/vm1").exists(), "vms/vm1 was left behind");
    let out = run(&["status", "vm1", "--json"]);
    json_error(&out, 4, "not-found");
    // The name is free again.
    let argv = VmBuilder::idle()
        .memory(64)
        .disk(&top, "qcow2", DiskStyle::Blockdev)
        .command_line(&dir.path().join("again.log"))
        .await;
    let mut cmd = vec!["run", "vm1", "--"];
    cmd.extend(argv.iter().map(String::as_str));
    ok(run(&cmd));
    ok(run(&["stop", "vm1"]));

    // A VM whose disk lives in the store's folder (as an import's does): the folder stays,
    // marked, and holds the name until the user has moved the disk out.
    let inside = store.join("vms/imp/disks");
    std::fs::create_dir_all(&inside).unwrap();
    let disk_in = inside.join("d.qcow2");
    create_image(&disk_in, "qcow2", "16M").await;
    let argv = VmBuilder::idle()
        .memory(64)
        .disk(&disk_in, "qcow2", DiskStyle::Blockdev)
        .command_line(&dir.path().join("imp.log"))
        .await;
    let _kill_imp = KillRecordedQemu::new(&store, "imp");
    let mut cmd = vec!["run", "imp", "--"];
    cmd.extend(argv.iter().map(String::as_str));
    ok(run(&cmd));
    let r = json(&ok(run(&["forget", "imp", "--stop", "--json"])));
    let left = store.join("vms/imp");
    assert_eq!(r["left-in-store"], left.display().to_string(), "{r}");
    let note = std::fs::read_to_string(left.join("FORGOTTEN")).unwrap();
    assert!(note.contains(&disk_in.display().to_string()), "{note}");
    assert!(disk_in.exists());
    assert!(!left.join("vm.json").exists() && !left.join("qmp.sock").exists());
    let out = run(&cmd);
    assert_eq!(out.status.code(), Some(6), "{}", show(&out));
    assert!(
        text(&out.stderr).contains("forgotten VM left"),
        "{}",
        show(&out)
    );
    // Moved out and the folder removed: the name is free.
    let moved = dir.path().join("imp-d.qcow2");
    std::fs::rename(&disk_in, &moved).unwrap();
    std::fs::remove_dir_all(&left).unwrap();
    let argv = VmBuilder::idle()
        .memory(64)
        .disk(&moved, "qcow2", DiskStyle::Blockdev)
        .command_line(&dir.path().join("imp.log"))
        .await;
    let mut cmd = vec!["run", "imp", "--"];
    cmd.extend(argv.iter().map(String::as_str));
    ok(run(&cmd));
    ok(run(&["forget", "imp", "--stop"]));
    assert!(
        !left.exists(),
        "nothing of it was in the store: {}",
        left.display()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_powers_the_guest_off_and_stops_one_that_ignores_the_button() {
    require_qemu!();
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let _kill = (
        KillRecordedQemu::new(&store, "g"),
        KillRecordedQemu::new(&store, "idle"),
    );
    let run = in_store(&store);

    // The test guest powers off on the ACPI button.
    let vda = dir.path().join("vda.qcow2");
    create_image(&vda, "qcow2", "64M").await;
    let serial = dir.path().join("g.log");
    let argv = VmBuilder::guest()
        .disk(&vda, "qcow2", DiskStyle::Blockdev)
        .command_line(&serial)
        .await;
    let mut cmd = vec!["run", "g", "--"];
    cmd.extend(argv.iter().map(String::as_str));
    ok(run(&cmd));
    let log = SerialLog::follow(&serial);
    log.wait_from(0, Duration::from_secs(120), |l| {
        l.contains("power button on").then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}: {}", log.tail(20)));
    log.wait_tick_from(0, Duration::from_secs(60))
        .await
        .unwrap();
    let r = json(&ok(run(&["shutdown", "g", "--json"])));
    assert_eq!(r["outcome"], "powered-off", "{r}");
    assert!(
        log.lines()
            .iter()
            .any(|l| l.text.contains("power button pressed")),
        "{}",
        log.tail(10)
    );
    let st = json(&ok(run(&["status", "g", "--json"])));
    assert_eq!(st["state"]["state"], "stopped", "{st}");
    let out = ok(run(&["shutdown", "g"]));
    assert!(
        text(&out.stdout).contains("was not running"),
        "{}",
        show(&out)
    );

    // A guest that ignores the button (no OS at all) is stopped after the grace period.
    run_idle(&store, dir.path(), "idle").await;
    // Paused, it could not see the button: refused, nothing sent.
    ok(run(&["pause", "idle"]));
    let said = text(&ok(run(&["status", "idle"])).stdout);
    assert!(
        said.contains("QEMU up") && said.contains("the guest is PAUSED"),
        "{said}"
    );
    let out = run(&["shutdown", "idle", "--json"]);
    let e = json_error(&out, 6, "refused");
    assert_eq!(e["error"]["fix"], "qsnap resume idle", "{e}");
    ok(run(&["resume", "idle"]));
    let out = ok(run(&["shutdown", "idle", "--grace", "1"]));
    let said = text(&out.stdout);
    assert!(
        said.contains("did not power off within 1 s") && said.contains("quit when asked"),
        "{said}"
    );
    let st = json(&ok(run(&["status", "idle", "--json"])));
    assert_eq!(st["state"]["state"], "stopped", "{st}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_names_descriptions_rename_delete_many_and_latest() {
    require_qemu!();
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let _kill = KillRecordedQemu::new(&store, "vm1");
    let run = in_store(&store);
    run_idle(&store, dir.path(), "vm1").await;

    // A generated name that is taken gets -2, also for --lazy-ram, which then converts the
    // new snapshot (not the one whose name it first tried). The names of the next seconds are
    // taken first, so the collision happens whatever the clock does meanwhile.
    let stamp = |ahead: u64| -> String {
        let at = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
            + ahead;
        let out = std::process::Command::new("date")
            .args(["-u", "-d", &format!("@{at}"), "+snap-%Y%m%dT%H%M%SZ"])
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        text(&out.stdout).trim().to_owned()
    };
    // Half a minute of names: the creates below take seconds even on a loaded machine.
    let taken: Vec<String> = (0..30).map(stamp).collect();
    for t in &taken {
        ok(run(&["create", "vm1", t, "--disk-only"]));
    }
    let lz = json(&ok(run(&["create", "vm1", "--lazy-ram", "--json"])));
    let lz_name = lz["name"].as_str().unwrap().to_owned();
    assert!(
        lz_name.ends_with("-2") && taken.contains(&lz_name[..lz_name.len() - 2].to_owned()),
        "{lz_name} (taken: {taken:?})"
    );
    assert!(
        lz["memory"]["lazy"].is_object(),
        "the new snapshot was not made lazy: {lz}"
    );
    let mut all: Vec<&str> = taken.iter().map(String::as_str).collect();
    all.push(&lz_name);
    let mut cmd = vec!["delete", "vm1"];
    cmd.extend(all);
    let d = json(&ok(run(&[cmd.as_slice(), &["--json"]].concat())));
    assert_eq!(d["deleted"].as_array().unwrap().len(), 31, "{d}");

    // No name: one is made up and printed; two in the same second do not collide.
    let a = json(&ok(run(&[
        "create",
        "vm1",
        "--description",
        "before the upgrade",
        "--json",
    ])));
    let b = json(&ok(run(&["create", "vm1", "--disk-only", "--json"])));
    let c = json(&ok(run(&["create", "vm1", "--disk-only", "--json"])));
    let names: Vec<String> = [&a, &b, &c]
        .iter()
        .map(|m| m["name"].as_str().unwrap().to_owned())
        .collect();
    assert!(names.iter().all(|n| n.starts_with("snap-")), "{names:?}");
    assert!(
        names[0] != names[1] && names[1] != names[2] && names[0] != names[2],
        "{names:?}"
    );
    assert_eq!(a["description"], "before the upgrade");
    let out = ok(run(&["create", "vm1", "--disk-only"]));
    assert!(
        text(&out.stdout).contains("snapshot snap-"),
        "{}",
        show(&out)
    );
    let fourth = json(&ok(run(&["list", "vm1", "--json"])))["snapshots"][3]["name"]
        .as_str()
        .unwrap()
        .to_owned();
    // A description is one line.
    let out = run(&["create", "vm1", "x", "--description", "two\nlines"]);
    assert_eq!(out.status.code(), Some(2), "{}", show(&out));
    // --live-limit belongs to precopy: refused with --disk-only.
    let out = run(&["create", "vm1", "y", "--disk-only", "--live-limit", "5"]);
    assert_eq!(out.status.code(), Some(2), "{}", show(&out));
    let listed = text(&ok(run(&["list", "vm1"])).stdout);
    assert!(listed.contains("before the upgrade"), "{listed}");

    // Rename: the memory file follows, the children and `current` too; it still reverts.
    ok(run(&["rename", "vm1", &names[0], "base"]));
    let mem = store.join("vms/vm1/memory");
    assert!(mem.join("base.mem").exists());
    assert!(!mem.join(format!("{}.mem", names[0])).exists());
    let m = json(&ok(run(&["show", "vm1", "base", "--json"])));
    assert_eq!(m["description"], "before the upgrade");
    assert_eq!(
        m["memory"]["file"],
        mem.join("base.mem").display().to_string()
    );
    let child = json(&ok(run(&["show", "vm1", &names[1], "--json"])));
    assert_eq!(child["parent"], "base", "{child}");
    let out = run(&["rename", "vm1", "base", &names[1]]);
    assert_eq!(out.status.code(), Some(6), "{}", show(&out));
    let out = run(&["rename", "vm1", "nope", "other"]);
    assert_eq!(out.status.code(), Some(4), "{}", show(&out));
    let r = json(&ok(run(&["revert", "vm1", "base", "--json"])));
    assert_eq!(r["memory-restored"], true, "{r}");

    // --latest: the newest.
    let r = json(&ok(run(&["revert", "vm1", "--latest", "--json"])));
    assert_eq!(r["snapshot"], fourth.as_str(), "{r}");
    // --keep-current twice within a second: two snapshots, not a refusal.
    ok(run(&["revert", "vm1", "base"]));
    let k1 = json(&ok(run(&[
        "revert",
        "vm1",
        "base",
        "--keep-current",
        "--json",
    ])));
    let k2 = json(&ok(run(&[
        "revert",
        "vm1",
        "base",
        "--keep-current",
        "--json",
    ])));
    assert_ne!(k1["kept-current"], k2["kept-current"], "{k1} {k2}");

    // Several at once, and a subtree; an unknown name deletes none.
    let out = run(&["delete", "vm1", &names[2], "nope"]);
    assert_eq!(out.status.code(), Some(4), "{}", show(&out));
    assert!(json(&ok(run(&["show", "vm1", &names[2], "--json"])))["name"].is_string());
    let d = json(&ok(run(&[
        "delete",
        "vm1",
        &names[1],
        "--children",
        "--json",
    ])));
    let mut deleted: Vec<String> = d["deleted"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_owned())
        .collect();
    deleted.sort();
    let mut expected = vec![names[1].clone(), names[2].clone(), fourth.clone()];
    expected.sort();
    assert_eq!(deleted, expected, "{d}");
    let kept: Vec<String> = [&k1, &k2]
        .iter()
        .map(|k| k["kept-current"].as_str().unwrap().to_owned())
        .collect();
    let d = json(&ok(run(&["delete", "vm1", &kept[0], &kept[1], "--json"])));
    assert_eq!(d["deleted"].as_array().unwrap().len(), 2, "{d}");
    let left = json(&ok(run(&["list", "vm1", "--json"])))["snapshots"].clone();
    assert_eq!(left.as_array().unwrap().len(), 1, "{left}");
    assert_eq!(left[0]["name"], "base");
    ok(run(&["check", "vm1"]));

    // The clone of a disk-only snapshot boots: its guest runs, and the report says so.
    let _kill_clone = KillRecordedQemu::new(&store, "dc");
    ok(run(&["create", "vm1", "d1", "--disk-only"]));
    let c = json(&ok(run(&["clone", "vm1", "d1", "dc", "--json"])));
    assert_eq!(c["resumed"], true, "{c}");
    ok(run(&["remove", "dc"]));

    // The store's cache forgets what it knew of files that are gone: a reverted snapshot's
    // memory checksum is remembered; once the snapshot is deleted, check --repair drops it.
    ok(run(&["create", "vm1", "last"]));
    ok(run(&["revert", "vm1", "last"]));
    let about_last = || {
        std::fs::read_dir(store.join("cache"))
            .map(|d| {
                d.flatten()
                    .filter(|e| {
                        std::fs::read_to_string(e.path()).is_ok_and(|t| t.contains("last.mem"))
                    })
                    .count()
            })
            .unwrap_or(0)
    };
    assert!(
        about_last() >= 1,
        "the revert left no cache entry for last.mem"
    );
    ok(run(&["delete", "vm1", "last"]));
    let out = ok(run(&["check", "vm1", "--repair"]));
    assert!(text(&out.stderr).contains("cache entr"), "{}", show(&out));
    assert_eq!(about_last(), 0, "a cache entry about a deleted file stayed");

    // A VM reverted lazily maps its RAM from a file QEMU cannot write-protect: auto mode
    // takes precopy instead, and says so in one plain sentence (no log line).
    ok(run(&["create", "vm1", "lz", "--lazy-ram"]));
    let r = json(&ok(run(&["revert", "vm1", "lz", "--json"])));
    assert!(
        r["ram"].to_string().contains("lazy") || r["ram"].to_string().contains("mapped"),
        "{r}"
    );
    let out = ok(run(&["create", "vm1", "after", "--json"]));
    assert_eq!(json(&out)["mode"], "precopy");
    let said = text(&out.stderr);
    assert!(
        said.contains("point-in-time snapshot was not possible"),
        "{said}"
    );
    assert_eq!(said.trim().lines().count(), 1, "{said}");

    // Renaming a lazy snapshot moves every memory file of its name — its device state, its
    // RAM image, and a stream a cut-short conversion left beside them — and it still reverts.
    let mem = store.join("vms/vm1/memory");
    std::fs::write(mem.join("lz.mem"), b"leftover").unwrap();
    ok(run(&["rename", "vm1", "lz", "lazy1"]));
    for f in ["lazy1.dev", "lazy1.ram", "lazy1.mem"] {
        assert!(mem.join(f).exists(), "{f} is missing");
    }
    for f in ["lz.dev", "lz.ram", "lz.mem"] {
        assert!(!mem.join(f).exists(), "{f} stayed");
    }
    std::fs::remove_file(mem.join("lazy1.mem")).unwrap();
    let r = json(&ok(run(&["revert", "vm1", "lazy1", "--json"])));
    assert_eq!(r["memory-restored"], true, "{r}");
    ok(run(&["stop", "vm1"]));

    // Offline: a disk-only snapshot of the stopped VM, with qemu-img; `start` opens its
    // overlay. A memory snapshot of a stopped VM is refused.
    let out = run(&["create", "vm1", "mem-off"]);
    assert_eq!(out.status.code(), Some(6), "{}", show(&out));
    let m = json(&ok(run(&[
        "create",
        "vm1",
        "off1",
        "--disk-only",
        "--json",
    ])));
    assert_eq!(m["mode"], "disk-only", "{m}");
    let overlay = m["disks"][0]["overlay"].as_str().unwrap().to_owned();
    assert!(overlay.ends_with("vm1.off1.qcow2"), "{m}");
    let st = json(&ok(run(&["status", "vm1", "--json"])));
    assert_eq!(st["current"], "off1", "{st}");
    assert_eq!(st["disks"][0]["chain"][0], overlay.as_str(), "{st}");
    assert!(
        st["disks"][0]["chain"].as_array().unwrap().len() >= 2,
        "the whole chain: {st}"
    );
    ok(run(&["start", "vm1"]));
    let st = json(&ok(run(&["status", "vm1", "--json"])));
    assert_eq!(st["disks"][0]["chain"][0], overlay.as_str(), "{st}");
    ok(run(&["stop", "vm1"]));
    ok(run(&["check", "vm1"]));
    if qsnap_testkit::failpoints_or_skip("the failing part of the offline create") {
        let with = |point: &str, args: &[&str]| {
            Command::cargo_bin("qsnap")
                .unwrap()
                .env("QSNAP_STORE", &store)
                .env("FAILPOINTS", point)
                .args(args)
                .timeout(Duration::from_secs(60))
                .output()
                .unwrap()
        };
        // An error after the overlay was made: rolled back, nothing left.
        let out = with(
            "create.offline-overlay=return(error)",
            &["create", "vm1", "off2", "--disk-only"],
        );
        assert_eq!(out.status.code(), Some(1), "{}", show(&out));
        let expected = Path::new(&overlay).with_file_name("vm1.off2.qcow2");
        assert!(
            !expected.exists(),
            "a failed offline create left {}",
            expected.display()
        );
        // Killed after it: the journal lets the next command remove it.
        let out = with(
            "create.offline-overlay=return(crash)",
            &["create", "vm1", "off3", "--disk-only"],
        );
        assert!(!out.status.success(), "{}", show(&out));
        let left = Path::new(&overlay).with_file_name("vm1.off3.qcow2");
        assert!(left.exists(), "the crash came after the overlay was made");
        ok(run(&["check", "vm1", "--repair"]));
        assert!(
            !left.exists(),
            "the interrupted offline create's overlay stayed"
        );
        let listed = json(&ok(run(&["list", "vm1", "--json"])));
        assert!(
            !listed["snapshots"].to_string().contains("off3"),
            "{listed}"
        );
        ok(run(&["check", "vm1"]));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_say_their_kind_in_the_exit_code_and_in_json() {
    require_qemu!();
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let _kill = KillRecordedQemu::new(&store, "web1");
    let run = in_store(&store);

    // A store that does not exist, then an empty QSNAP_STORE.
    let out = run(&["status", "web1", "--json"]);
    let e = json_error(&out, 4, "not-found");
    assert!(
        e["error"]["message"]
            .as_str()
            .unwrap()
            .contains("does not exist"),
        "{e}"
    );
    let out = Command::cargo_bin("qsnap")
        .unwrap()
        .env("QSNAP_STORE", "")
        .args(["status", "web1"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", show(&out));
    assert!(
        text(&out.stderr).contains("QSNAP_STORE is set but empty"),
        "{}",
        show(&out)
    );
    // `run` without `--`: a hint.
    let out = run(&["run", "x", "qemu-system-x86_64", "-m", "64"]);
    assert_eq!(out.status.code(), Some(2), "{}", show(&out));
    assert!(
        text(&out.stderr).contains("goes after `--`"),
        "{}",
        show(&out)
    );

    // A QEMU that does not start: its error quotes QEMU, and nothing is left in the store.
    for _ in 0..2 {
        let out = run(&["run", "bad", "--", "qemu-system-x86_64", "-no-such-option"]);
        assert_eq!(out.status.code(), Some(1), "{}", show(&out));
        let said = text(&out.stderr);
        assert!(
            said.contains("QEMU did not start") && said.contains("no-such-option"),
            "{said}"
        );
        assert_eq!(said.matches("invalid option").count(), 1, "{said}");
        assert!(!store.join("vms/bad").exists(), "a failed run left vms/bad");
    }

    // `run` says it started the VM and where its console and QEMU's messages go.
    let disk = dir.path().join("web1.qcow2");
    let serial = dir.path().join("web1.serial.log");
    let argv = VmBuilder::idle_with_disk(&disk, "16M", &serial).await;
    let mut cmd = vec!["run", "web1", "--"];
    cmd.extend(argv.iter().map(String::as_str));
    let said = text(&ok(run(&cmd)).stdout);
    assert!(said.starts_with("started web1"), "{said}");
    assert!(
        said.contains(&format!("console goes to {}", serial.display())),
        "{said}"
    );
    assert!(said.contains("qemu.log"), "{said}");
    ok(run(&["create", "web1", "s1", "--disk-only"]));
    // A typo: "did you mean".
    let out = run(&["status", "wbe1"]);
    assert_eq!(out.status.code(), Some(4), "{}", show(&out));
    assert!(
        text(&out.stderr).contains("did you mean \"web1\""),
        "{}",
        show(&out)
    );
    // Unknown snapshot: not found, with the command that lists them.
    let e = json_error(&run(&["revert", "web1", "nope", "--json"]), 4, "not-found");
    assert_eq!(e["error"]["fix"], "qsnap list web1", "{e}");
    // A clone named as its source: the name is taken (not "busy").
    let out = run(&["clone", "web1", "s1", "web1"]);
    assert_eq!(out.status.code(), Some(6), "{}", show(&out));
    assert!(
        text(&out.stderr).contains("already in the store"),
        "{}",
        show(&out)
    );
    // `start` on a running VM: says so, exit 0.
    let out = ok(run(&["start", "web1"]));
    assert!(
        text(&out.stdout).contains("running already"),
        "{}",
        show(&out)
    );
    // An error is printed once, as one line, without a log line repeating it.
    let out = run(&["create", "web1", "s1"]);
    assert_eq!(out.status.code(), Some(6), "{}", show(&out));
    assert_eq!(
        text(&out.stderr).trim().lines().count(),
        1,
        "{}",
        show(&out)
    );

    // Busy: another operation holds the VM. At once: exit 5; with --wait, queued.
    let engine_store = qsnap_engine::Store::new(&store);
    let name = qsnap_engine::VmName::new("web1").unwrap();
    let lock = engine_store.lock(&name, "a test holding it").await.unwrap();
    let out = run(&["create", "web1", "s2", "--disk-only", "--json"]);
    let e = json_error(&out, 5, "busy");
    assert!(
        e["error"]["message"]
            .as_str()
            .unwrap()
            .contains("a test holding it"),
        "{e}"
    );
    // Queued: still waiting while the lock is held (however slow the machine), done once
    // it is released.
    let mut waiting = std::process::Command::new(assert_cmd::cargo::cargo_bin("qsnap"))
        .env("QSNAP_STORE", &store)
        .env_remove("FAILPOINTS")
        .args(["create", "web1", "s2", "--disk-only", "--wait", "60"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let held = std::time::Instant::now();
    while held.elapsed() < Duration::from_secs(2) {
        assert!(
            waiting.try_wait().unwrap().is_none(),
            "--wait gave up while the lock was held"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(!store.join("vms/web1/snapshots/s2.json").exists());
    drop(lock);
    let waited = tokio::task::spawn_blocking(move || waiting.wait_with_output().unwrap())
        .await
        .unwrap();
    ok(waited);
    let out = run(&["show", "web1", "s2", "--json"]);
    assert_eq!(json(&ok(out))["name"], "s2");
    ok(run(&["stop", "web1"]));
    // `stop` twice: the second says it had nothing to do.
    let out = ok(run(&["stop", "web1"]));
    assert!(
        text(&out.stdout).contains("was not running"),
        "{}",
        show(&out)
    );
}
