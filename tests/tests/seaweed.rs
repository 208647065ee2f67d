//! The SeaweedFS fixture, proved with the S3 client qsnap's object-store support will use
//! (`object_store`): signed requests only, put/get/list/delete, `PutMode::Create` refused on an
//! existing key (`If-None-Match: *`), `PutMode::Update` refused on a stale ETag (`If-Match`),
//! the last-modified time gc will read; and a replicated cluster read after one of its two
//! volume servers is killed. No QEMU here. Every wait is bounded.

use futures::TryStreamExt;
use object_store::aws::{AmazonS3, AmazonS3Builder, AmazonS3ConfigKey};
use object_store::local::LocalFileSystem;
use object_store::path::Path as Key;
use object_store::{
    ClientOptions, ObjectStore, ObjectStoreExt, PutMode, PutPayload, RetryConfig, UpdateVersion,
};
use qsnap_testkit::{require_weed, Seaweed};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Bound on every S3 call (object_store retries 5xx and timeouts by itself within it).
const CALL: Duration = Duration::from_secs(30);

/// A client configured like `AmazonS3Builder::from_env()` would be with the fixture's
/// environment, without touching the test process's environment. Retries bounded: a wedged
/// server fails the call in seconds, not object_store's default three minutes.
fn client(sw: &Seaweed) -> AmazonS3Builder {
    // Client options first: `with_client_options` replaces all of them, `AWS_ALLOW_HTTP` too.
    let mut b = AmazonS3Builder::new()
        .with_client_options(
            ClientOptions::new()
                .with_timeout(Duration::from_secs(10))
                .with_connect_timeout(Duration::from_secs(2)),
        )
        .with_retry(RetryConfig {
            max_retries: 3,
            retry_timeout: Duration::from_secs(20),
            ..RetryConfig::default()
        })
        .with_bucket_name(sw.bucket());
    for (k, v) in sw.env() {
        let key: AmazonS3ConfigKey = k.to_ascii_lowercase().parse().expect("an S3 config key");
        b = b.with_config(key, v);
    }
    b
}

fn store(sw: &Seaweed) -> AmazonS3 {
    client(sw).build().expect("S3 client")
}

async fn bounded<T>(what: &str, f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(CALL, f)
        .await
        .unwrap_or_else(|_| panic!("{what}: no answer within {CALL:?}"))
}

fn tempdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("qsnap-seaweed-")
        .tempdir()
        .expect("temp dir")
}

#[tokio::test]
async fn mini_serves_signed_s3_with_conditional_puts() {
    qsnap_testkit::init_logging();
    require_weed!();
    let dir = tempdir();
    let t0 = Instant::now();
    let sw = Seaweed::mini(dir.path()).unwrap_or_else(|e| panic!("{e}"));
    eprintln!("weed mini ready in {:?} at {}", t0.elapsed(), sw.endpoint());
    eprintln!("memory (KiB): {:?}", sw.memory_kib());
    assert!(sw.endpoint().starts_with("http://127.0.0.1:"));
    let s3 = store(&sw);

    // Put, get back, head: size, ETag, last-modified (what gc's grace period reads).
    let chunk = Key::from("chunks/ab/ab01");
    let before = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
    let t = Instant::now();
    let put = bounded(
        "put",
        s3.put(&chunk, PutPayload::from_static(b"chunk bytes")),
    )
    .await
    .unwrap();
    eprintln!("first put in {:?}", t.elapsed());
    assert!(put.e_tag.is_some(), "no ETag from a put: {put:?}");
    let got = bounded("get", s3.get(&chunk)).await.unwrap();
    let meta = got.meta.clone();
    assert_eq!(
        &bounded("read", got.bytes()).await.unwrap()[..],
        b"chunk bytes"
    );
    assert_eq!(meta.size, 11);
    assert_eq!(meta.e_tag, put.e_tag);
    let modified = meta.last_modified.timestamp();
    assert!(
        (modified - i64::try_from(before.as_secs()).unwrap()).abs() <= 60,
        "last_modified {} is not now",
        meta.last_modified
    );
    let head = bounded("head", s3.head(&chunk)).await.unwrap();
    assert_eq!(
        (head.size, head.e_tag.clone(), head.last_modified),
        (meta.size, meta.e_tag.clone(), meta.last_modified)
    );

    // PutMode::Create: the first wins, the second is AlreadyExists and changes nothing.
    let head_ref = Key::from("refs/vm1/head");
    bounded(
        "create",
        s3.put_opts(&head_ref, "one".into(), PutMode::Create.into()),
    )
    .await
    .expect("first PutMode::Create");
    let second = bounded(
        "create again",
        s3.put_opts(&head_ref, "two".into(), PutMode::Create.into()),
    )
    .await;
    assert!(
        matches!(second, Err(object_store::Error::AlreadyExists { .. })),
        "second PutMode::Create on one key: {second:?}"
    );
    let now = bounded("get ref", s3.get(&head_ref)).await.unwrap();
    let v1 = now.meta.clone();
    assert_eq!(&now.bytes().await.unwrap()[..], b"one");

    // PutMode::Update: with the current ETag it replaces; with the old one it is refused.
    let update = |m: &object_store::ObjectMeta| {
        PutMode::Update(UpdateVersion {
            e_tag: m.e_tag.clone(),
            version: m.version.clone(),
        })
    };
    bounded(
        "update",
        s3.put_opts(&head_ref, "three".into(), update(&v1).into()),
    )
    .await
    .expect("PutMode::Update with the current ETag");
    let stale = bounded(
        "stale update",
        s3.put_opts(&head_ref, "four".into(), update(&v1).into()),
    )
    .await;
    assert!(
        matches!(stale, Err(object_store::Error::Precondition { .. })),
        "PutMode::Update with a stale ETag: {stale:?}"
    );
    let now = bounded("get ref", s3.get(&head_ref)).await.unwrap();
    assert_eq!(&now.bytes().await.unwrap()[..], b"three");

    // Racing: of 8 concurrent creates of one key exactly one wins, and of 8 concurrent
    // updates from one ETag exactly one wins (the atomicity refs will rely on).
    let raced = Key::from("refs/vm1/raced");
    let creates = (0..8u8).map(|i| s3.put_opts(&raced, vec![i].into(), PutMode::Create.into()));
    let results = bounded("racing creates", futures::future::join_all(creates)).await;
    let won = results.iter().filter(|r| r.is_ok()).count();
    assert_eq!(won, 1, "racing PutMode::Create: {results:?}");
    assert!(results
        .iter()
        .all(|r| matches!(r, Ok(_) | Err(object_store::Error::AlreadyExists { .. }))));
    let base = bounded("head raced", s3.head(&raced)).await.unwrap();
    let updates = (0..8u8).map(|i| s3.put_opts(&raced, vec![i, i].into(), update(&base).into()));
    let results = bounded("racing updates", futures::future::join_all(updates)).await;
    let won = results.iter().filter(|r| r.is_ok()).count();
    assert_eq!(won, 1, "racing PutMode::Update: {results:?}");

    // List (recursive, by prefix) and delete.
    for i in 0..3 {
        bounded(
            "put",
            s3.put(&Key::from(format!("chunks/cd/cd0{i}")), vec![i; 100].into()),
        )
        .await
        .unwrap();
    }
    let mut listed: Vec<String> = bounded(
        "list",
        s3.list(Some(&Key::from("chunks"))).try_collect::<Vec<_>>(),
    )
    .await
    .unwrap()
    .into_iter()
    .map(|m| m.location.to_string())
    .collect();
    listed.sort();
    assert_eq!(
        listed,
        [
            "chunks/ab/ab01",
            "chunks/cd/cd00",
            "chunks/cd/cd01",
            "chunks/cd/cd02"
        ]
    );
    let all = bounded("list all", s3.list(None).try_collect::<Vec<_>>())
        .await
        .unwrap();
    assert_eq!(all.len(), 6, "{all:?}");
    bounded("delete", s3.delete(&chunk)).await.unwrap();
    let gone = bounded("get deleted", s3.get(&chunk)).await;
    assert!(
        matches!(gone, Err(object_store::Error::NotFound { .. })),
        "{gone:?}"
    );
    let listed = bounded(
        "list after delete",
        s3.list(Some(&Key::from("chunks/ab")))
            .try_collect::<Vec<_>>(),
    )
    .await
    .unwrap();
    assert!(listed.is_empty(), "{listed:?}");

    // Only signed requests with the fixture's secret get in.
    let unsigned = client(&sw).with_skip_signature(true).build().unwrap();
    let r = bounded("unsigned get", unsigned.get(&head_ref)).await;
    assert!(r.is_err(), "an unsigned get was served");
    let r = bounded("unsigned put", unsigned.put(&Key::from("x"), "x".into())).await;
    assert!(r.is_err(), "an unsigned put was accepted");
    let wrong = client(&sw)
        .with_secret_access_key("not-the-secret")
        .build()
        .unwrap();
    let r = bounded("get with a wrong secret", wrong.get(&head_ref)).await;
    assert!(r.is_err(), "a get signed with the wrong secret was served");
    eprintln!("refused as expected: {}", r.unwrap_err());
    eprintln!("mini test done after {:?}", t0.elapsed());
}

/// What the engine's local store would do for `PutMode::Create`: object_store's
/// `LocalFileSystem` supports it (a hard link, refused when the name exists).
#[tokio::test]
async fn local_filesystem_supports_put_mode_create() {
    let dir = tempdir();
    let fs = LocalFileSystem::new_with_prefix(dir.path()).unwrap();
    let key = Key::from("refs/vm1/head");
    fs.put_opts(&key, "one".into(), PutMode::Create.into())
        .await
        .unwrap();
    let again = fs
        .put_opts(&key, "two".into(), PutMode::Create.into())
        .await;
    assert!(
        matches!(again, Err(object_store::Error::AlreadyExists { .. })),
        "{again:?}"
    );
    let meta = fs.head(&key).await.unwrap();
    assert_eq!(meta.size, 3);
    let update = fs
        .put_opts(
            &key,
            "three".into(),
            PutMode::Update(UpdateVersion {
                e_tag: meta.e_tag.clone(),
                version: None,
            })
            .into(),
        )
        .await;
    assert!(
        matches!(update, Err(object_store::Error::NotImplemented { .. })),
        "LocalFileSystem and PutMode::Update: {update:?}"
    );
}

/// Reads survive the loss of one of the two volume servers. Writes do not (not tested here,
/// it takes 30 s): with replication `001` and one volume server killed, every PUT was answered
/// 500 Internal Server Error after 30 s, still two minutes after the kill (SeaweedFS 4.48).
#[tokio::test]
async fn cluster_reads_a_replicated_object_with_one_volume_server_killed() {
    qsnap_testkit::init_logging();
    require_weed!();
    let dir = tempdir();
    let t0 = Instant::now();
    let mut sw = Seaweed::cluster(dir.path()).unwrap_or_else(|e| panic!("{e}"));
    eprintln!(
        "weed cluster (master, 2 volume servers, filer + S3) ready in {:?}",
        t0.elapsed()
    );
    assert_eq!(sw.volume_servers(), 2);
    let s3 = store(&sw);

    // Bigger than the filer keeps inline: the data is on the volume servers, and with
    // replication 001 on both of them.
    let body = |seed: u32| -> Vec<u8> {
        (0..3u32 << 20)
            .map(|i| u8::try_from((i + seed) % 251).expect("below 251"))
            .collect()
    };
    let (read_before, unread) = (Key::from("chunks/ef/ef01"), Key::from("chunks/ef/ef02"));
    let t = Instant::now();
    for (key, seed) in [(&read_before, 0), (&unread, 1)] {
        bounded("put", s3.put(key, body(seed).into()))
            .await
            .unwrap_or_else(|e| panic!("put: {e}\n{}", sw.report()));
    }
    eprintln!("two 3 MiB puts in {:?}", t.elapsed());
    let back = bounded("get", async { s3.get(&read_before).await?.bytes().await })
        .await
        .unwrap();
    assert!(back[..] == body(0)[..], "read back differs");
    for i in 0..2 {
        let held = volume_bytes(&sw.dir().join(format!("volume{i}")));
        assert!(
            held >= 6 << 20,
            "volume server {i} holds {held} bytes, not both objects"
        );
    }
    eprintln!("memory (KiB): {:?}", sw.memory_kib());

    sw.kill_volume(0).unwrap();
    let t = Instant::now();
    // The object read before the kill and one never read (nothing of it cached anywhere).
    for (key, seed) in [(&read_before, 0), (&unread, 1)] {
        let back = bounded("get with volume0 dead", async {
            s3.get(key).await?.bytes().await
        })
        .await
        .unwrap_or_else(|e| {
            panic!(
                "get {key} with volume server 0 killed: {e}\n{}",
                sw.report()
            )
        });
        assert!(back[..] == body(seed)[..], "{key} differs after the kill");
    }
    eprintln!(
        "both read back with volume server 0 killed in {:?}",
        t.elapsed()
    );
}

/// Bytes in a volume server's data files (`*.dat`).
fn volume_bytes(dir: &std::path::Path) -> u64 {
    std::fs::read_dir(dir)
        .unwrap()
        .filter_map(Result::ok)
        .filter(|e| e.path().extension().is_some_and(|x| x == "dat"))
        .filter_map(|e| e.metadata().ok())
        .map(|m| m.len())
        .sum()
}
