//! Every VM at a glance (issue 21, item 1): `qsnap status` and `qsnap list` without a name,
//! in text and `--json`, against real (kernel-less) QEMUs: a running VM, a paused one, a
//! stopped one, a clone, and a VM whose record cannot be read.

use assert_cmd::Command;
use qsnap_testkit::{require_qemu, KillRecordedQemu, VmBuilder};
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
            .env_remove("FAILPOINTS")
            .args(args)
            .timeout(Duration::from_secs(120))
            .output()
            .unwrap();
        qsnap_testkit::json_output::check(args, &out);
        out
    }
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn ok(out: Output) -> Output {
    assert!(
        out.status.success(),
        "status {:?}\nstdout: {}\nstderr: {}",
        out.status,
        text(&out.stdout),
        text(&out.stderr)
    );
    out
}

fn json(out: &Output) -> Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(&out.stdout)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_and_list_without_a_name_show_every_vm() {
    require_qemu!();
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let run = in_store(&store);
    let _kill = (
        KillRecordedQemu::new(&store, "a"),
        KillRecordedQemu::new(&store, "b"),
        KillRecordedQemu::new(&store, "c"),
        KillRecordedQemu::new(&store, "a-clone"),
    );

    // An empty store: said, and an empty list in JSON.
    let said = text(&ok(run(&["status"])).stdout);
    assert!(said.contains("has no VMs"), "{said}");
    assert_eq!(json(&ok(run(&["status", "--json"]))), serde_json::json!([]));
    assert_eq!(json(&ok(run(&["list", "--json"]))), serde_json::json!([]));

    for name in ["a", "b", "c"] {
        let argv = VmBuilder::idle_with_disk(
            &dir.path().join(format!("{name}.qcow2")),
            "16M",
            &dir.path().join(format!("{name}.log")),
        )
        .await;
        let mut cmd = vec!["run", name, "--"];
        cmd.extend(argv.iter().map(String::as_str));
        ok(run(&cmd));
    }
    ok(run(&["create", "a", "s1"]));
    ok(run(&["create", "a", "s2", "--disk-only"]));
    ok(run(&["clone", "a", "s1", "a-clone"]));
    ok(run(&["pause", "b"]));
    ok(run(&["stop", "c"]));

    // JSON: the objects `status VM --json` prints, one per VM, sorted by name.
    let all = json(&ok(run(&["status", "--json"])));
    let names: Vec<&str> = all
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["vm"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["a", "a-clone", "b", "c"], "{all}");
    let one = json(&ok(run(&["status", "a", "--json"])));
    assert_eq!(all[0]["current"], one["current"]);
    assert_eq!(all[0]["snapshots"], 2, "{all}");
    assert_eq!(all[0]["state"]["state"], "running", "{all}");
    assert_eq!(all[1]["clone-of"]["vm"], "a", "{all}");
    assert_eq!(all[2]["state"]["runstate"], "paused", "{all}");
    assert_eq!(all[3]["state"]["state"], "stopped", "{all}");

    // Text: one line each, with the state a person needs.
    let said = text(&ok(run(&["status"])).stdout);
    let line = |vm: &str| {
        said.lines()
            .find(|l| l.split_whitespace().next() == Some(vm))
            .unwrap_or_else(|| panic!("no line for {vm}: {said}"))
            .to_owned()
    };
    assert!(
        line("a").contains("running") && line("a").contains(" s2 "),
        "{said}"
    );
    assert!(line("a-clone").contains("a/s1"), "{said}");
    assert!(line("b").contains("paused"), "{said}");
    assert!(line("c").contains("stopped"), "{said}");

    // list: every VM's tree; JSON, what `list VM --json` prints for each.
    let said = text(&ok(run(&["list"])).stdout);
    assert!(
        said.contains("a:") && said.contains("s1") && said.contains("b has no snapshots"),
        "{said}"
    );
    let lists = json(&ok(run(&["list", "--json"])));
    assert_eq!(lists.as_array().unwrap().len(), 4, "{lists}");
    assert_eq!(lists[0], json(&ok(run(&["list", "a", "--json"]))));

    // A VM whose record cannot be read is reported, and does not hide the others.
    let record = store.join("vms/c/vm.json");
    let good = std::fs::read(&record).unwrap();
    std::fs::write(&record, b"{ not json").unwrap();
    let all = json(&ok(run(&["status", "--json"])));
    assert_eq!(all.as_array().unwrap().len(), 4, "{all}");
    assert_eq!(all[3]["vm"], "c");
    assert!(all[3]["error"]["message"].is_string(), "{all}");
    assert_eq!(all[0]["vm"], "a", "{all}");
    let said = text(&ok(run(&["status"])).stdout);
    assert!(said.contains("cannot be read"), "{said}");
    // In `list`, `vm` stays an object (the record's place), holding the name.
    let lists = json(&ok(run(&["list", "--json"])));
    assert_eq!(lists[3]["vm"]["name"], "c", "{lists}");
    assert!(lists[3]["error"]["message"].is_string(), "{lists}");
    assert_eq!(lists[0]["vm"]["name"], "a", "{lists}");
    // (Removing anything reads every record first: an unreadable one refuses unlinks.)
    std::fs::write(&record, good).unwrap();

    ok(run(&["remove", "a-clone"]));
    for vm in ["a", "b"] {
        ok(run(&["stop", vm]));
    }
}
