//! Snapshots move through the store and resume; a second one moves only new chunks; a
//! name cannot be pushed twice; three stores pull one snapshot at once.

use super::*;
use qsnap_testkit::serial::{parse_tick, SerialLog};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pushed_snapshot_resumes_at_its_tick_in_another_store_and_the_next_moves_only_new_chunks()
{
    require_qemu!();
    require_weed!();
    let src = Source::boot().await;
    let sw = seaweed(&src.root.join("seaweed"));
    let (a, b) = (on(&src.store, &sw), on(&src.root.join("b"), &sw));
    let url = url(&sw);

    let s1 = src.snapshot("s1", &["--mode", "precopy"]).await;
    let out = a(&["push", "src", "s1", &url, "--json"]);
    ok(&out, "push s1");
    let first = json(&out);
    assert_eq!(first["name"], "src/s1");
    assert!(first["uploaded-chunks"].as_u64() > Some(0), "{first}");
    assert_eq!(first["uploaded-chunks"], first["chunks"], "{first}");
    let disks = src.root.join("b-disks");
    let out = b(&[
        "pull",
        &url,
        "src/s1",
        "first",
        "--disk-dir",
        disks.join("first").to_str().unwrap(),
        "--json",
    ]);
    ok(&out, "pull s1");
    let pulled = json(&out);
    // A fresh cache: every distinct chunk downloaded (one used twice comes from the cache).
    assert!(
        pulled["downloaded-chunks"].as_u64() >= first["chunks"].as_u64(),
        "{pulled}\n{first}"
    );
    assert!(pulled["downloaded-bytes"].as_u64() > Some(0), "{pulled}");
    resume(&src.root.join("b"), "first", &pulled["import"], s1).await;

    // A second snapshot: the store has most of its chunks; store B's cache has them too.
    let s2 = src.snapshot("s2", &["--mode", "precopy"]).await;
    let out = a(&["push", "src", "s2", &url, "--base", "s1", "--json"]);
    ok(&out, "push s2");
    let second = json(&out);
    assert!(second["deduplicated-chunks"].as_u64() > Some(0), "{second}");
    // Less than the first although it carries two views (whole, and incremental on s1).
    assert!(
        second["uploaded-bytes"].as_u64() < first["uploaded-bytes"].as_u64(),
        "second push {second}\nfirst push {first}"
    );
    let out = b(&[
        "pull",
        &url,
        "src/s2",
        "second",
        "--disk-dir",
        disks.join("second").to_str().unwrap(),
        "--json",
    ]);
    ok(&out, "pull s2");
    let pulled2 = json(&out);
    assert!(pulled2["cached-chunks"].as_u64() > Some(0), "{pulled2}");
    assert!(
        pulled2["downloaded-chunks"].as_u64() < pulled2["chunks"].as_u64(),
        "{pulled2}"
    );
    resume(&src.root.join("b"), "second", &pulled2["import"], s2).await;

    // Into the VM that holds s1 (pulled above): the incremental view adds s2 there.
    let out = b(&["pull", &url, "src/s2", "first", "--json"]);
    ok(&out, "pull s2 into first");
    let inc = json(&out);
    assert_eq!(inc["import"]["new-vm"], false, "{inc}");
    assert_eq!(inc["import"]["base"], "s1", "{inc}");
    let store_b = src.root.join("b");
    let run_b = in_store(&store_b);
    let listed = run_b(&["list", "first", "--json"]);
    assert!(
        text(&listed.stdout).contains("\"s2\""),
        "{}",
        text(&listed.stdout)
    );
    ok(&run_b(&["check", "first"]), "check first");
    let console = pulled["import"]["moved"][0]["to"]
        .as_str()
        .unwrap()
        .to_owned();
    let log = SerialLog::follow(&console);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let from = log.len();
    let _kill = KillRecordedQemu::new(&store_b, "first");
    ok(&run_b(&["revert", "first", "s2"]), "revert first s2");
    let (idx, tick) = log
        .wait_from(from, Duration::from_secs(60), parse_tick)
        .await
        .unwrap_or_else(|e| panic!("first: no tick after s2: {e}\n{}", log.tail(30)));
    assert!(
        tick > s2.0 && tick <= s2.1 + 1,
        "first resumed at {tick}; s2 was taken between {} and {}",
        s2.0,
        s2.1
    );
    log.wait_from(idx, Duration::from_secs(60), |l| {
        parse_tick(l).filter(|&t| t >= tick + 2)
    })
    .await
    .unwrap_or_else(|e| panic!("first stalled: {e}\n{}", log.tail(30)));
    assert!(log.mismatches().is_empty(), "{}", log.tail(30));
    ok(&run_b(&["stop", "first"]), "stop first");

    let out = b(&["remote", "list", &url, "--json"]);
    ok(&out, "remote list");
    let names: Vec<_> = json(&out)
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["name"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(names, ["src/s1", "src/s2"]);
    // Credentials never appear in what qsnap prints.
    for o in [&first, &second, &pulled, &pulled2] {
        assert!(!o.to_string().contains(sw.secret_key()));
    }
    ok(&a(&["stop", "src"]), "stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_pushes_of_one_name_at_once_one_wins_and_three_stores_pull_it_at_once() {
    require_qemu!();
    require_weed!();
    let dir = tempfile::tempdir().unwrap();
    let (_kill, store) = idle_source(dir.path(), None, 24).await;
    let sw = seaweed(&dir.path().join("seaweed"));
    let url = url(&sw);
    // Two stores push the same name at the same moment: exactly one wins, the other is told.
    let pushes: Vec<_> = (0..2)
        .map(|_| {
            command(&store, &sw)
                .args(["push", "vm1", "s1", &url, "--as", "golden/ready"])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let outs: Vec<_> = pushes.into_iter().map(|c| finish(c, 300)).collect();
    assert_eq!(
        outs.iter().filter(|o| o.status.success()).count(),
        1,
        "{outs:?}"
    );
    let lost = outs.iter().find(|o| !o.status.success()).unwrap();
    let err = text(&lost.stderr);
    assert!(
        err.contains("already has a snapshot golden/ready")
            && err.contains("nothing was overwritten"),
        "{err}"
    );
    // And a later push of the name is refused before it uploads anything.
    let out = on(&store, &sw)(&["push", "vm1", "s1", &url, "--as", "golden/ready"]);
    assert_eq!(out.status.code(), Some(6), "{out:?}");

    // Three stores pull it at once, each into a VM of its own.
    let pulls: Vec<_> = (0..3)
        .map(|i| {
            command(&dir.path().join(format!("b{i}")), &sw)
                .args(["pull", &url, "golden/ready", "fork"])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for (i, c) in pulls.into_iter().enumerate() {
        let out = finish(c, 300);
        assert!(out.status.success(), "pull {i}: {}", text(&out.stderr));
        let b = dir.path().join(format!("b{i}"));
        ok(&in_store(&b)(&["check", "fork"]), "check");
        let _k = KillRecordedQemu::new(&b, "fork");
        ok(&in_store(&b)(&["revert", "fork", "s1"]), "revert");
        ok(&in_store(&b)(&["stop", "fork"]), "stop");
    }
    ok(&in_store(&store)(&["stop", "vm1"]), "stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signed_push_pulls_only_with_a_trusted_key_and_plain_http_needs_saying_so() {
    require_qemu!();
    require_weed!();
    let dir = tempfile::tempdir().unwrap();
    let (_kill, store) = idle_source(dir.path(), None, 4).await;
    let sw = seaweed(&dir.path().join("seaweed"));
    let url = url(&sw);
    let a = on(&store, &sw);
    let keys = dir.path().join("keys");
    std::fs::create_dir_all(&keys).unwrap();
    for k in ["ours", "theirs"] {
        ok(&a(&["keygen", keys.join(k).to_str().unwrap()]), "keygen");
    }
    let key = keys.join("ours.key");
    let out = a(&[
        "push",
        "vm1",
        "s1",
        &url,
        "--sign",
        key.to_str().unwrap(),
        "--json",
    ]);
    ok(&out, "push --sign");
    assert_eq!(json(&out)["signed"], true);
    ok(
        &a(&["push", "vm1", "s1", &url, "--as", "vm1/plain"]),
        "push",
    );
    let b = dir.path().join("b");
    let pull = |name: &str, vm: &str, key: &str| {
        on(&b, &sw)(&[
            "pull",
            &url,
            name,
            vm,
            "--trust",
            keys.join(key).to_str().unwrap(),
            "--json",
        ])
    };
    let out = pull("vm1/s1", "other", "theirs.pub");
    assert_eq!(out.status.code(), Some(6), "{out:?}");
    assert!(
        text(&out.stderr).contains("not by a key you trust"),
        "{out:?}"
    );
    nothing_left(&b, "other", "signed by another key");
    let out = pull("vm1/plain", "unsigned", "ours.pub");
    assert_eq!(out.status.code(), Some(6), "{out:?}");
    assert!(text(&out.stderr).contains("not signed"), "{out:?}");
    nothing_left(&b, "unsigned", "unsigned");
    let out = pull("vm1/s1", "trusted", "ours.pub");
    ok(&out, "pull --trust");
    ok(&in_store(&b)(&["check", "trusted"]), "check");
    // Into a VM that exists, a snapshot pushed without --base is refused before any fetch.
    let before = files_under(&b.join("chunk-cache")).len();
    let out = on(&b, &sw)(&["pull", &url, "vm1/plain", "trusted"]);
    assert_eq!(out.status.code(), Some(6), "{out:?}");
    let err = text(&out.stderr);
    assert!(
        err.contains("has no incremental view") && err.contains("--base"),
        "{err}"
    );
    assert_eq!(
        files_under(&b.join("chunk-cache")).len(),
        before,
        "nothing fetched"
    );
    let out = on(&b, &sw)(&["remote", "list", &url, "--json"]);
    let list = json(&out);
    let signed: Vec<_> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["name"].as_str().unwrap().to_owned(), e["signed"] == true))
        .collect();
    assert_eq!(
        signed,
        [("vm1/plain".to_owned(), false), ("vm1/s1".to_owned(), true)]
    );

    // https unless the user says a plain-http endpoint is meant; no secret in the error.
    let out = command(&b, &sw)
        .env_remove("AWS_ALLOW_HTTP")
        .args(["remote", "list", &url])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = text(&out.stderr);
    assert!(
        err.contains(&url) && err.to_lowercase().contains("http"),
        "{err}"
    );
    assert!(!err.contains(sw.secret_key()), "{err}");
    ok(&in_store(&store)(&["stop", "vm1"]), "stop");
}
