//! `qsnap push` / `qsnap pull` / `qsnap remote` against a real SeaweedFS (S3 on loopback,
//! `tests/seaweedfs/install.sh` installs it): snapshots of the real guest go from store A
//! through the object store into store B and resume at their tick; a second snapshot moves
//! only new chunks; names cannot be overwritten; damaged, missing and cut-short objects are
//! refused leaving nothing; gc keeps what a push needs; kills leave nothing half-made; a
//! replicated cluster loses a volume server under a pull.

#[path = "../bundle/kit.rs"]
mod kit;

mod faults;
mod moves;

use kit::*;
use object_store::aws::{AmazonS3, AmazonS3Builder, AmazonS3ConfigKey};
use object_store::path::Path as Key;
use qsnap_testkit::{require_qemu, require_weed, KillRecordedQemu, Seaweed};
use serde_json::Value;
use std::path::Path;
use std::time::Duration;

/// The bucket's prefix every test uses.
const PREFIX: &str = "fleet";

/// qsnap on `store`, configured for `sw` the way a user configures any S3 tool.
fn on(store: &Path, sw: &Seaweed) -> impl Fn(&[&str]) -> std::process::Output {
    let store = store.to_owned();
    let env = sw.env();
    move |args| {
        let mut c = assert_cmd::Command::cargo_bin("qsnap").unwrap();
        c.env("QSNAP_STORE", &store).env("NO_COLOR", "1");
        for (k, v) in &env {
            c.env(k, v);
        }
        let out = c
            .args(args)
            .timeout(Duration::from_secs(300))
            .output()
            .unwrap();
        qsnap_testkit::json_output::check(args, &out);
        out
    }
}

/// A std::process::Command for qsnap on `store` against `sw` (for runs the test kills).
fn command(store: &Path, sw: &Seaweed) -> std::process::Command {
    let mut c = std::process::Command::new(assert_cmd::cargo::cargo_bin("qsnap"));
    c.env("QSNAP_STORE", store).env("NO_COLOR", "1");
    for (k, v) in sw.env() {
        c.env(k, v);
    }
    c
}

fn url(sw: &Seaweed) -> String {
    format!("s3://{}/{PREFIX}", sw.bucket())
}

/// The test's own look into the bucket (to damage it, and to count chunks).
fn bucket(sw: &Seaweed) -> AmazonS3 {
    let mut b = AmazonS3Builder::new().with_bucket_name(sw.bucket());
    for (k, v) in sw.env() {
        let key: AmazonS3ConfigKey = k.to_ascii_lowercase().parse().expect("an S3 config key");
        b = b.with_config(key, v);
    }
    b.build().expect("S3 client")
}

fn key(rest: &str) -> Key {
    Key::from(format!("{PREFIX}/{rest}"))
}

/// The chunk hashes a remote snapshot's manifest names.
async fn chunks_of(s3: &AmazonS3, name: &str) -> std::collections::BTreeSet<String> {
    use object_store::ObjectStoreExt;
    let bytes = s3
        .get(&key(&format!("snapshots/{name}.json")))
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    let m: Value = serde_json::from_slice(&bytes).unwrap();
    let mut views = vec![m["whole"].clone()];
    if !m["incremental"].is_null() {
        views.push(m["incremental"]["view"].clone());
    }
    views
        .iter()
        .flat_map(|v| v["files"].as_array().unwrap().clone())
        .flat_map(|f| f["chunks"].as_array().unwrap().clone())
        .map(|c| c["hash"].as_str().unwrap().to_owned())
        .collect()
}

/// Every chunk in the bucket.
async fn all_chunks(s3: &AmazonS3) -> std::collections::BTreeSet<String> {
    use futures::TryStreamExt;
    use object_store::ObjectStore;
    let metas: Vec<_> = s3.list(Some(&key("chunks"))).try_collect().await.unwrap();
    metas
        .iter()
        .map(|m| m.location.filename().unwrap().to_owned())
        .collect()
}

/// A SeaweedFS (`weed mini`) in `dir`.
fn seaweed(dir: &Path) -> Seaweed {
    Seaweed::mini(dir).unwrap_or_else(|e| panic!("{e}"))
}

/// Nothing of a pull into `store` as `vm` is left (no VM, no staging).
fn nothing_left(store: &Path, vm: &str, what: &str) {
    assert!(
        !store.join("vms").join(vm).exists(),
        "{what}: {:?}",
        files_under(&store.join("vms").join(vm))
    );
    assert!(
        files_under(&store.join("staging")).is_empty(),
        "{what}: {:?}",
        files_under(&store.join("staging"))
    );
}

/// Waits for a child (its stdout/stderr piped or not) at most `secs`; kills it and fails the
/// test past that.
fn finish(mut child: std::process::Child, secs: u64) -> std::process::Output {
    let deadline = std::time::Instant::now() + Duration::from_secs(secs);
    while child.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!("no end within {secs} s: {}", text(&out.stderr));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    child.wait_with_output().unwrap()
}
