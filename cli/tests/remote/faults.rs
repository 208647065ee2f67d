//! What can go wrong in a store, and with the commands: a damaged, missing or cut-short
//! object; gc beside a push; kills at random moments; a volume server dying under a pull.

use super::*;
use object_store::{ObjectStoreExt, PutPayload};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_or_missing_chunk_and_a_cut_short_manifest_are_refused_leaving_nothing() {
    require_qemu!();
    require_weed!();
    let dir = tempfile::tempdir().unwrap();
    let (_kill, store) = idle_source(dir.path(), None, 8).await;
    let sw = seaweed(&dir.path().join("seaweed"));
    let url = url(&sw);
    ok(&on(&store, &sw)(&["push", "vm1", "s1", &url]), "push");
    ok(&in_store(&store)(&["stop", "vm1"]), "stop");
    let s3 = bucket(&sw);
    let b = dir.path().join("b");
    let pull = |vm: &str| on(&b, &sw)(&["pull", &url, "vm1/s1", vm]);
    let chunks = chunks_of(&s3, "vm1/s1").await;
    let victim = chunks.iter().next().unwrap().clone();
    let chunk_key = key(&format!("chunks/{}/{victim}", &victim[..2]));
    let original = s3.get(&chunk_key).await.unwrap().bytes().await.unwrap();

    // A chunk overwritten with garbage (compressed garbage, and garbage that is not zstd).
    let garbage = zstd::bulk::compress(&vec![7u8; 4096], 3).unwrap();
    for (i, bad) in [garbage, b"not a chunk".to_vec()].into_iter().enumerate() {
        s3.put(&chunk_key, PutPayload::from(bad)).await.unwrap();
        let vm = format!("g{i}");
        let out = pull(&vm);
        assert_eq!(out.status.code(), Some(6), "{out:?}");
        let err = text(&out.stderr);
        assert!(err.contains(&format!("chunk {victim}")), "{err}");
        assert!(err.contains("nothing was registered"), "{err}");
        nothing_left(&b, &vm, "a damaged chunk");
        // The cache did not keep it.
        assert!(!b
            .join("chunk-cache")
            .join(&victim[..2])
            .join(&victim)
            .exists());
    }
    // A chunk deleted.
    s3.delete(&chunk_key).await.unwrap();
    let out = pull("gone");
    assert_eq!(out.status.code(), Some(6), "{out:?}");
    let err = text(&out.stderr);
    assert!(err.contains(&format!("chunk {victim} is missing")), "{err}");
    nothing_left(&b, "gone", "a missing chunk");
    // Put back: the pull goes through.
    s3.put(&chunk_key, PutPayload::from(original))
        .await
        .unwrap();
    let out = on(&b, &sw)(&["pull", &url, "vm1/s1", "whole", "--json"]);
    ok(&out, "pull");
    let r = json(&out);
    // Only what the failed pulls had not fetched (and cached) comes from the store.
    assert!(r["downloaded-chunks"].as_u64() >= Some(1), "{r}");
    assert!(r["cached-chunks"].as_u64() > Some(0), "{r}");
    ok(&in_store(&b)(&["check", "whole"]), "check");

    // The manifest cut short.
    let mkey = key("snapshots/vm1/s1.json");
    let m = s3.get(&mkey).await.unwrap().bytes().await.unwrap();
    s3.put(&mkey, PutPayload::from(m.slice(..m.len() / 2)))
        .await
        .unwrap();
    let out = pull("cut");
    assert_eq!(out.status.code(), Some(6), "{out:?}");
    let err = text(&out.stderr);
    assert!(
        err.contains("is not readable") && err.contains("cut short"),
        "{err}"
    );
    nothing_left(&b, "cut", "a cut-short manifest");
    // A snapshot the store does not have.
    let out = pull("none");
    assert_eq!(out.status.code(), Some(6));
    let out = on(&b, &sw)(&["pull", &url, "vm1/nope", "none"]);
    assert!(
        text(&out.stderr).contains("has no snapshot vm1/nope"),
        "{out:?}"
    );
    // A bad URL, and a name that is not VM/SNAP, are refused plainly.
    let out = on(&b, &sw)(&["pull", "ftp://x/y", "vm1/s1", "none"]);
    assert!(text(&out.stderr).contains("s3://BUCKET/PREFIX"), "{out:?}");
    let out = on(&b, &sw)(&["pull", &url, "../s1", "none"]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gc_beside_a_push_removes_nothing_it_needs_and_after_it_exactly_the_unused_chunks() {
    require_qemu!();
    require_weed!();
    let dir = tempfile::tempdir().unwrap();
    let (one, two) = (dir.path().join("one"), dir.path().join("two"));
    std::fs::create_dir_all(&one).unwrap();
    std::fs::create_dir_all(&two).unwrap();
    let (_k1, store1) = idle_source(&one, None, 24).await;
    let (_k2, store2) = idle_source(&two, None, 48).await;
    let sw = seaweed(&dir.path().join("seaweed"));
    let url = url(&sw);
    let s3 = bucket(&sw);
    ok(
        &on(&store1, &sw)(&["push", "vm1", "s1", &url, "--as", "x/one"]),
        "push one",
    );
    let c1 = chunks_of(&s3, "x/one").await;
    ok(&on(&store1, &sw)(&["remote", "rm", &url, "x/one"]), "rm");
    assert_eq!(all_chunks(&s3).await, c1, "rm leaves the chunks to gc");

    // A push, and gc (default grace) running beside it until it is done.
    let mut push = command(&store2, &sw)
        .args(["push", "vm1", "s1", &url, "--as", "y/two"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut gcs = 0;
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while push.try_wait().unwrap().is_none() {
        assert!(std::time::Instant::now() < deadline, "the push did not end");
        let out = on(&store1, &sw)(&["remote", "gc", &url, "--json"]);
        ok(&out, "gc beside a push");
        assert_eq!(json(&out)["removed"], 0, "{}", text(&out.stdout));
        gcs += 1;
    }
    let out = push.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(gcs > 0, "gc never ran beside the push");
    let c2 = chunks_of(&s3, "y/two").await;

    // After it: grace 0 removes exactly the chunks only x/one used.
    let out = on(&store1, &sw)(&["remote", "gc", &url, "--grace", "0s", "--json"]);
    ok(&out, "gc");
    let r = json(&out);
    let unused: Vec<_> = c1.difference(&c2).collect();
    assert_eq!(r["removed"].as_u64(), Some(unused.len() as u64), "{r}");
    assert!(!unused.is_empty());
    assert_eq!(all_chunks(&s3).await, c2);
    let b = dir.path().join("b");
    ok(
        &on(&b, &sw)(&["pull", &url, "y/two", "two"]),
        "pull after gc",
    );
    ok(&in_store(&b)(&["check", "two"]), "check");

    // Chunks in the store but old, and no manifest naming them: a push relying on them puts
    // them again (its refresh age), so a gc beside it, with a grace period longer than that,
    // cannot take them.
    ok(
        &on(&store1, &sw)(&["remote", "rm", &url, "y/two"]),
        "rm two",
    );
    std::thread::sleep(Duration::from_secs(3));
    let push = command(&store2, &sw)
        .args([
            "push",
            "vm1",
            "s1",
            &url,
            "--as",
            "y/again",
            "--refresh",
            "1s",
            "--json",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let pid = push.id();
    let gc = std::thread::spawn({
        let (store1, url, env) = (store1.clone(), url.clone(), sw.env());
        move || {
            let mut removed = 0;
            while std::path::Path::new(&format!("/proc/{pid}")).exists() {
                let mut c = assert_cmd::Command::cargo_bin("qsnap").unwrap();
                c.env("QSNAP_STORE", &store1)
                    .envs(env.iter().map(|(k, v)| (k, v)));
                let args = ["remote", "gc", &url, "--grace", "2s", "--json"];
                let out = c
                    .args(args)
                    .timeout(Duration::from_secs(120))
                    .output()
                    .unwrap();
                qsnap_testkit::json_output::check(&args, &out);
                if let Ok(v) = serde_json::from_slice::<Value>(&out.stdout) {
                    removed += v["removed"].as_u64().unwrap_or(0);
                }
            }
            removed
        }
    });
    let out = finish(push, 300);
    assert!(out.status.success(), "{}", text(&out.stderr));
    qsnap_testkit::json_output::check(&["push", "vm1", "s1", &url, "--json"], &out);
    let removed = gc.join().unwrap();
    let r = json(&out);
    assert_eq!(
        r["uploaded-chunks"], r["chunks"],
        "every old chunk put again: {r}"
    );
    eprintln!("gc beside the refreshing push removed {removed} chunks");
    ok(
        &on(&b, &sw)(&["pull", &url, "y/again", "again"]),
        "pull after gc",
    );
    ok(&in_store(&b)(&["check", "again"]), "check");
    for s in [&store1, &store2] {
        ok(&in_store(s)(&["stop", "vm1"]), "stop");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn push_and_pull_killed_at_random_moments_leave_nothing_half_made_and_a_rerun_finishes() {
    require_qemu!();
    require_weed!();
    let dir = tempfile::tempdir().unwrap();
    let (_kill, store) = idle_source(dir.path(), None, 48).await;
    let sw = seaweed(&dir.path().join("seaweed"));
    let url = url(&sw);
    let kill_after = |mut c: std::process::Command, ms: u64| {
        let mut child = c
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(ms));
        let _ = child.kill();
        child.wait().unwrap()
    };
    let listed = || {
        let out = on(&store, &sw)(&["remote", "list", &url, "--json"]);
        ok(&out, "list");
        json(&out)
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["name"].as_str().unwrap().to_owned())
            .collect::<Vec<_>>()
    };
    let mut completed = 0;
    for (i, ms) in [20u64, 80, 200, 400, 700].into_iter().enumerate() {
        let name = format!("k/p{i}");
        let mut c = command(&store, &sw);
        c.args(["push", "vm1", "s1", &url, "--as", &name]);
        let status = kill_after(c, ms);
        let there = listed().contains(&name);
        // A manifest is there only if the push finished (its exit was not the kill).
        if there {
            completed += 1;
            assert!(status.success() || status.code().is_none(), "{status:?}");
            let b = dir.path().join(format!("check{i}"));
            ok(
                &on(&b, &sw)(&["pull", &url, &name, "whole"]),
                "a listed push pulls",
            );
        } else {
            ok(
                &on(&store, &sw)(&["push", "vm1", "s1", &url, "--as", &name]),
                "re-run",
            );
            assert!(listed().contains(&name));
        }
    }
    eprintln!("{completed} of 5 pushes finished before their kill");
    assert!(
        completed < 5,
        "no kill landed inside a push: the test proved nothing"
    );
    let b = dir.path().join("b");
    let mut cut = 0;
    for (i, ms) in [20u64, 80, 200, 400, 700].into_iter().enumerate() {
        let vm = format!("v{i}");
        let mut c = command(&b, &sw);
        c.args(["pull", &url, "k/p0", &vm]);
        kill_after(c, ms);
        if b.join("vms").join(&vm).join("vm.json").exists() {
            // A kill after the commit may have left the import's note: --repair sweeps it.
            ok(&in_store(&b)(&["check", &vm, "--repair"]), "repair");
            ok(&in_store(&b)(&["check", &vm]), "a registered pull is whole");
        } else {
            cut += 1;
            ok(&on(&b, &sw)(&["pull", &url, "k/p0", &vm]), "re-run");
            ok(&in_store(&b)(&["check", &vm]), "check");
        }
        assert!(files_under(&b.join("staging")).is_empty());
    }
    assert!(
        cut > 0,
        "no kill landed inside a pull: the test proved nothing"
    );
    ok(&in_store(&store)(&["stop", "vm1"]), "stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pull_from_a_replicated_cluster_survives_a_volume_server_dying() {
    require_qemu!();
    require_weed!();
    let dir = tempfile::tempdir().unwrap();
    let (_kill, store) = idle_source(dir.path(), None, 24).await;
    let mut sw = Seaweed::cluster(dir.path().join("seaweed")).unwrap_or_else(|e| panic!("{e}"));
    let url = url(&sw);
    ok(&on(&store, &sw)(&["push", "vm1", "s1", &url]), "push");
    ok(&in_store(&store)(&["stop", "vm1"]), "stop");
    let b = dir.path().join("b");
    let pull = command(&b, &sw)
        .args(["pull", &url, "vm1/s1", "vm2", "--parallel", "2"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(100));
    sw.kill_volume(0).unwrap();
    let out = finish(pull, 300);
    if out.status.success() {
        eprintln!("the pull completed from the replica");
    } else {
        // Told plainly, nothing registered; the re-run completes from the replica.
        let err = text(&out.stderr);
        assert!(err.contains(&url), "{err}\n{}", sw.report());
        nothing_left(&b, "vm2", "a failed pull");
        let again = on(&b, &sw)(&["pull", &url, "vm1/s1", "vm2"]);
        assert!(
            again.status.success(),
            "{}\n{}",
            text(&again.stderr),
            sw.report()
        );
    }
    ok(&in_store(&b)(&["check", "vm2"]), "check");
    let _k = KillRecordedQemu::new(&b, "vm2");
    ok(&in_store(&b)(&["revert", "vm2", "s1"]), "revert");
    ok(&in_store(&b)(&["stop", "vm2"]), "stop");
}
