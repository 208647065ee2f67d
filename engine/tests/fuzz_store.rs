//! Property tests (proptest) for the store's readers: whatever is in a store file, `record`,
//! `manifest`, `manifests` and `journal` answer `Ok` or `Err` and never panic, and what they
//! accept is sound.
//!
//! * Arbitrary bytes (and pathologically nested JSON) in `vm.json`, `snapshots/s1.json` and
//!   `journal.json`: every reader returns, none panics.
//! * Hand-built valid record, manifest and journal (schema 1), mutated (a key deleted, a value
//!   replaced by a random scalar, the schema number changed, the text truncated, a byte
//!   flipped): every reader returns, and whatever a reader accepts has schema 1, names the right
//!   VM (and snapshot), and a manifest it accepts has its memory file at the store's own path.
//! * Stray files with arbitrary names in `snapshots/`: `manifests` returns, never panics.
//! * The unmutated files read back `Ok`; a schema other than 1 is refused with an error that
//!   says "schema"; a manifest whose memory `file` is anything but the store's own file for that
//!   snapshot (`/etc/passwd`, a relative path, `..`, another VM's or snapshot's file) is refused.
//! * `manifest(vm, s1)` refuses an `s1.json` that names another snapshot, as `manifests`
//!   does (this test found that it did not).

use proptest::collection::vec;
use proptest::prelude::*;
use proptest::sample::Index;
use qsnap_engine::{Error, SnapshotName, Store, VmName};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};

/// Modest case counts so the file runs in seconds; no regression files are written into the
/// source tree.
fn config(cases: u32) -> ProptestConfig {
    ProptestConfig {
        cases,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

const VM: &str = "vm1";
const SNAP: &str = "s1";

fn vm() -> VmName {
    VmName::new(VM).expect("valid VM name")
}

fn snap() -> SnapshotName {
    SnapshotName::new(SNAP).expect("valid snapshot name")
}

fn vm_dir(root: &Path) -> PathBuf {
    root.join("vms").join(VM)
}

/// The memory file the store accepts for `s1`.
fn memory_file(root: &Path) -> PathBuf {
    vm_dir(root).join("memory").join(format!("{SNAP}.mem"))
}

/// The three files the readers read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Target {
    Record,
    Manifest,
    Journal,
}

impl Target {
    fn path(self, root: &Path) -> PathBuf {
        match self {
            Target::Record => vm_dir(root).join("vm.json"),
            Target::Manifest => vm_dir(root).join("snapshots").join(format!("{SNAP}.json")),
            Target::Journal => vm_dir(root).join("journal.json"),
        }
    }
}

fn target() -> impl Strategy<Value = Target> {
    prop_oneof![
        Just(Target::Record),
        Just(Target::Manifest),
        Just(Target::Journal)
    ]
}

fn write(root: &Path, target: Target, bytes: &[u8]) {
    let path = target.path(root);
    std::fs::create_dir_all(path.parent().expect("a store file has a directory"))
        .expect("creating store directories");
    std::fs::write(&path, bytes).expect("writing a store file");
}

// ---- valid documents (engine/src/store/schema.rs, schema 1) ------------------------------

fn current_disk() -> Value {
    json!({
        "device": "drive0",
        "image": "/images/vm1.s1.qcow2",
        "launch-image": "/images/vm1.qcow2",
        "owned": true
    })
}

fn valid_record() -> Value {
    json!({
        "schema": 1,
        "name": VM,
        "qmp": "unix:/run/qsnap/vm1/qmp.sock",
        "origin": "run",
        "pid": 4242,
        "pid-start": 123_456,
        "command": {
            "argv": ["qemu-system-x86_64", "-m", "1024", "-drive", "file=/images/vm1.qcow2,id=drive0"],
            "cwd": "/"
        },
        "current": SNAP,
        "disks": [current_disk()],
        "owned-images": ["/images/vm1.s1.qcow2"],
        "guest-agent": "/run/qsnap/vm1/qga.sock",
        "registered-at": "2025-01-02T03:04:05.678Z"
    })
}

fn valid_manifest(root: &Path) -> Value {
    json!({
        "schema": 1,
        "vm": VM,
        "name": SNAP,
        "parent": null,
        "created-at": "2025-01-02T03:04:05.678Z",
        "qemu-version": "10.0.2",
        "machine": "pc-q35-10.0",
        "mode": "point-in-time",
        "was-running": true,
        "memory": {
            "file": memory_file(root),
            "bytes": 1_048_576,
            "ram-bytes": 1_073_741_824_u64,
            "capabilities": ["background-snapshot"],
            "checksum": "xxh3-128:0123456789abcdef0123456789abcdef"
        },
        "disks": [{
            "device": "drive0",
            "node": "#block123",
            "image": "/images/vm1.qcow2",
            "format": "qcow2",
            "size": 10_737_418_240_u64,
            "overlay": "/images/vm1.s1.qcow2",
            "overlay-node": "qsnap-s1-drive0",
            "frozen": {"bytes": 196_616, "mtime-ns": 1_735_787_045_678_000_000_u64}
        }],
        "skipped": [{"device": "cd0", "reason": "empty"}],
        "pause-ms": 12.5,
        "qemu-downtime-ms": 9,
        "live-phase": {"live-ms": 1500.0, "passes": 3, "forced-pause": false},
        "quiesced-filesystems": null,
        "total-ms": 2048.25
    })
}

/// A journal, of each kind of operation in turn (`kind` modulo 5).
fn valid_journal(root: &Path, kind: usize) -> Value {
    let intent = match kind % 5 {
        0 => json!({
            "operation": "create",
            "snapshot": SNAP,
            "memory-file": memory_file(root),
            "overlays": [{
                "device": "drive0",
                "image": "/images/vm1.qcow2",
                "overlay": "/images/vm1.s1.qcow2",
                "overlay-node": "qsnap-s1-drive0"
            }],
            "was-running": true,
            "qemu-pid": 4242,
            "settings": {"capabilities": [["background-snapshot", false], ["events", true]], "max-bandwidth": null},
            "committed": valid_manifest(root)
        }),
        1 => json!({
            "operation": "revert",
            "snapshot": SNAP,
            "phase": "relaunching",
            "new-overlays": ["/images/vm1.s1.r1.qcow2"],
            "old-disks": [current_disk()],
            "new-disks": [{
                "device": "drive0",
                "image": "/images/vm1.s1.r1.qcow2",
                "launch-image": "/images/vm1.qcow2",
                "owned": true
            }],
            "resume": true,
            "old-pid": 4242,
            "new-pid": null,
            "kept-current": null
        }),
        2 => json!({
            "operation": "delete",
            "snapshots": [SNAP],
            "manifests": [valid_manifest(root)],
            "phase": "consolidating",
            "merges": [{
                "device": "drive0",
                "kind": "commit",
                "lower": "/images/vm1.qcow2",
                "upper": "/images/vm1.s1.qcow2",
                "lower-backing": null,
                "lower-backing-format": null,
                "lower-format": "qcow2",
                "upper-children": ["/images/vm1.s2.qcow2"],
                "live": true,
                "job": "qsnap-merge-drive0"
            }],
            "guest-was-running": true
        }),
        3 => json!({"operation": "start", "argv": ["qemu-system-x86_64", "-m", "1024"]}),
        _ => json!({"operation": "stop", "pid": 4242}),
    };
    json!({
        "schema": 1,
        "pid": 777,
        "started-at": "2025-01-02T03:04:05.678Z",
        "intent": intent
    })
}

fn valid_doc(root: &Path, target: Target, kind: usize) -> Value {
    match target {
        Target::Record => valid_record(),
        Target::Manifest => valid_manifest(root),
        Target::Journal => valid_journal(root, kind),
    }
}

// ---- mutations ---------------------------------------------------------------------------

#[derive(Debug, Clone)]
enum Step {
    Key(String),
    At(usize),
}

/// Every node below the root, as a path of steps.
fn paths(v: &Value) -> Vec<Vec<Step>> {
    fn walk(v: &Value, here: &mut Vec<Step>, out: &mut Vec<Vec<Step>>) {
        let children: Vec<(Step, &Value)> = match v {
            Value::Object(m) => m.iter().map(|(k, c)| (Step::Key(k.clone()), c)).collect(),
            Value::Array(a) => a
                .iter()
                .enumerate()
                .map(|(i, c)| (Step::At(i), c))
                .collect(),
            _ => Vec::new(),
        };
        for (step, child) in children {
            here.push(step);
            out.push(here.clone());
            walk(child, here, out);
            here.pop();
        }
    }
    let mut out = Vec::new();
    walk(v, &mut Vec::new(), &mut out);
    out
}

fn node_mut<'a>(v: &'a mut Value, path: &[Step]) -> Option<&'a mut Value> {
    path.iter().try_fold(v, |node, step| match step {
        Step::Key(k) => node.get_mut(k.as_str()),
        Step::At(i) => node.get_mut(*i),
    })
}

/// A change to a valid document.
#[derive(Debug, Clone)]
enum Mutation {
    /// Remove an object member or array element.
    Delete(Index),
    /// Replace any node (the root too) by a random JSON value.
    Replace(Index, Value),
    /// Set the top-level `schema` to a random value.
    Schema(Value),
}

/// A change to the serialised text.
#[derive(Debug, Clone)]
enum TextMutation {
    None,
    Truncate(Index),
    Flip(Index, u8),
    Insert(Index, u8),
}

fn apply(doc: &mut Value, m: &Mutation) {
    match m {
        Mutation::Delete(i) => {
            let all = paths(doc);
            if all.is_empty() {
                return;
            }
            let mut path = all[i.index(all.len())].clone();
            let last = path.pop().expect("paths below the root are not empty");
            match (node_mut(doc, &path), last) {
                (Some(Value::Object(m)), Step::Key(k)) => {
                    m.remove(&k);
                }
                (Some(Value::Array(a)), Step::At(i)) => {
                    a.remove(i);
                }
                _ => {}
            }
        }
        Mutation::Replace(i, value) => {
            let mut all = paths(doc);
            all.push(Vec::new()); // the root itself
            let path = &all[i.index(all.len())];
            if let Some(node) = node_mut(doc, path) {
                *node = value.clone();
            }
        }
        Mutation::Schema(value) => {
            if let Some(m) = doc.as_object_mut() {
                m.insert("schema".into(), value.clone());
            }
        }
    }
}

fn apply_text(text: &mut Vec<u8>, m: &TextMutation) {
    match m {
        TextMutation::None => {}
        TextMutation::Truncate(i) => text.truncate(i.index(text.len() + 1)),
        TextMutation::Flip(i, bit) => {
            if !text.is_empty() {
                let at = i.index(text.len());
                text[at] ^= 1 << (bit % 8);
            }
        }
        TextMutation::Insert(i, b) => {
            let at = i.index(text.len() + 1);
            text.insert(at, *b);
        }
    }
}

/// A JSON scalar (or empty container), biased towards values that matter to the store.
fn scalar() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>().prop_map(Value::from),
        prop_oneof![Just(0), Just(1), Just(2), Just(u32::MAX)].prop_map(Value::from),
        prop_oneof![
            Just(""),
            Just("/etc/passwd"),
            Just("../../../etc/passwd"),
            Just("s1.mem"),
            Just(VM),
            Just(SNAP),
            Just(".."),
            Just("vm2"),
            Just("point-in-time"),
            Just("create"),
            Just("\u{0}"),
        ]
        .prop_map(Value::from),
        "\\PC{0,16}".prop_map(Value::from),
        Just(json!([])),
        Just(json!({})),
    ]
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        3 => any::<Index>().prop_map(Mutation::Delete),
        4 => (any::<Index>(), scalar()).prop_map(|(i, v)| Mutation::Replace(i, v)),
        1 => scalar().prop_map(Mutation::Schema),
    ]
}

fn text_mutation() -> impl Strategy<Value = TextMutation> {
    prop_oneof![
        4 => Just(TextMutation::None),
        2 => any::<Index>().prop_map(TextMutation::Truncate),
        2 => (any::<Index>(), any::<u8>()).prop_map(|(i, b)| TextMutation::Flip(i, b)),
        1 => (any::<Index>(), any::<u8>()).prop_map(|(i, b)| TextMutation::Insert(i, b)),
    ]
}

// ---- running the readers -----------------------------------------------------------------

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime")
}

/// Calls every reader on the store at `root` (a panic in any of them fails the case) and checks
/// that whatever they accept is sound: a schema it knows, the right VM and snapshot, and a memory file
/// that is the store's own file for that snapshot.
async fn read_all(root: &Path) -> Result<(), TestCaseError> {
    let store = Store::new(root);
    let (vm, snap) = (vm(), snap());
    let expected_memory = memory_file(root);

    if let Ok(rec) = store.record(&vm).await {
        prop_assert_eq!(rec.schema, 1);
        prop_assert_eq!(rec.name.as_str(), VM);
    }
    if let Ok(m) = store.manifest(&vm, &snap).await {
        // Schema 2 is a manifest whose lazy RAM maps named backends (SCHEMA_NAMED_RAM).
        prop_assert!(
            m.schema == 1 || m.schema == 2,
            "accepted schema {}",
            m.schema
        );
        prop_assert_eq!(m.vm.as_str(), VM);
        prop_assert!(
            SnapshotName::new(&m.name).is_ok(),
            "accepted name {:?}",
            m.name
        );
        if let Some(mem) = &m.snapshot.memory {
            let own = vm_dir(root).join("memory").join(format!("{}.mem", m.name));
            prop_assert_eq!(&mem.file, &own);
        }
        for d in &m.snapshot.disks {
            prop_assert!(d.image.is_absolute() && d.overlay.is_absolute());
        }
    }
    if let Ok(all) = store.manifests(&vm).await {
        for m in &all {
            // As for `manifest` above: schema 2 is a manifest of named RAM backends.
            prop_assert!(
                m.schema == 1 || m.schema == 2,
                "accepted schema {}",
                m.schema
            );
            prop_assert_eq!(m.vm.as_str(), VM);
            if m.name == SNAP {
                if let Some(mem) = &m.snapshot.memory {
                    prop_assert_eq!(&mem.file, &expected_memory);
                }
            }
        }
    }
    if let Ok(Some(j)) = store.journal(&vm).await {
        prop_assert_eq!(j.schema, 1);
    }
    Ok(())
}

fn read_all_blocking(root: &Path) -> Result<(), TestCaseError> {
    runtime().block_on(read_all(root))
}

fn why(e: &Error) -> Option<&str> {
    match e {
        Error::CorruptStore { why, .. } => Some(why),
        _ => None,
    }
}

// ---- properties --------------------------------------------------------------------------

#[test]
fn valid_files_read_back_ok() {
    for kind in 0..5 {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        for t in [Target::Record, Target::Manifest, Target::Journal] {
            let text = serde_json::to_vec_pretty(&valid_doc(root, t, kind)).unwrap();
            write(root, t, &text);
        }
        runtime().block_on(async {
            let store = Store::new(root);
            let rec = store.record(&vm()).await.expect("valid record");
            assert_eq!(rec.name, VM);
            let m = store
                .manifest(&vm(), &snap())
                .await
                .expect("valid manifest");
            assert_eq!(m.name, SNAP);
            assert_eq!(m.snapshot.memory.unwrap().file, memory_file(root));
            let all = store.manifests(&vm()).await.expect("valid manifests");
            assert_eq!(all.len(), 1);
            let j = store.journal(&vm()).await.expect("valid journal");
            assert!(j.is_some());
        });
    }
}

/// A manifest of schema 2 (named RAM backends) is read by both manifest readers, and what
/// they accept passes `read_all`'s checks (the property below once found `manifests`' check
/// still asking for schema 1 alone).
#[test]
fn a_schema_2_manifest_is_read_by_every_reader() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let mut doc = valid_manifest(root);
    doc["schema"] = json!(2);
    write(root, Target::Manifest, &serde_json::to_vec(&doc).unwrap());
    runtime().block_on(async {
        let store = Store::new(root);
        assert_eq!(store.manifest(&vm(), &snap()).await.unwrap().schema, 2);
        assert_eq!(store.manifests(&vm()).await.unwrap()[0].schema, 2);
    });
    read_all_blocking(root).unwrap();
}

/// `manifest(vm, s1)` reads `snapshots/s1.json`; a file there that names another snapshot
/// (and that snapshot's memory file) is not what its place says, and `manifests` already
/// refuses it.
#[test]
fn manifest_that_names_another_snapshot_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let mut doc = valid_manifest(root);
    doc["name"] = json!("s2");
    doc["memory"]["file"] = json!(vm_dir(root).join("memory/s2.mem"));
    write(root, Target::Manifest, &serde_json::to_vec(&doc).unwrap());
    runtime().block_on(async {
        let store = Store::new(root);
        assert!(store.manifests(&vm()).await.is_err());
        let one = store.manifest(&vm(), &snap()).await;
        assert!(one.is_err(), "s1.json naming s2 was accepted: {one:?}");
    });
}

proptest! {
    #![proptest_config(config(200))]

    /// Arbitrary bytes in any store file (or all three): every reader returns.
    #[test]
    fn arbitrary_bytes_never_panic(
        bytes in vec(any::<u8>(), 0..2048),
        which in proptest::option::of(target()),
    ) {
        let dir = tempfile::tempdir().unwrap();
        match which {
            Some(t) => write(dir.path(), t, &bytes),
            None => {
                for t in [Target::Record, Target::Manifest, Target::Journal] {
                    write(dir.path(), t, &bytes);
                }
            }
        }
        read_all_blocking(dir.path())?;
    }

    /// Deeply nested JSON (serde_json's recursion limit, not the stack, must stop it).
    #[test]
    fn deeply_nested_json_never_panics(
        depth in 0usize..20_000,
        opener in prop_oneof![Just("["), Just("{\"schema\":"), Just("{\"intent\":")],
        closed in any::<bool>(),
        t in target(),
    ) {
        let mut text = opener.repeat(depth);
        if closed {
            let closer = if opener == "[" { "]" } else { "}" };
            text.push('1');
            text.push_str(&closer.repeat(depth));
        }
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), t, text.as_bytes());
        read_all_blocking(dir.path())?;
    }

    /// Valid documents mutated (structure, then text), written to their own file or to
    /// another one: every reader returns, and what it accepts is sound.
    #[test]
    fn mutated_documents_never_panic(
        t in target(),
        kind in 0usize..5,
        mutations in vec(mutation(), 0..4),
        text_mutation in text_mutation(),
        elsewhere in proptest::option::weighted(0.2, target()),
        pretty in any::<bool>(),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let mut doc = valid_doc(root, t, kind);
        for m in &mutations {
            apply(&mut doc, m);
        }
        let mut text = if pretty {
            serde_json::to_vec_pretty(&doc).unwrap()
        } else {
            serde_json::to_vec(&doc).unwrap()
        };
        apply_text(&mut text, &text_mutation);
        write(root, elsewhere.unwrap_or(t), &text);
        read_all_blocking(root)?;
    }

    /// A schema number other than 1 is refused, by every reader, with an error about the
    /// schema.
    #[test]
    fn other_schema_is_refused(
        schema in any::<u32>().prop_filter("not the current schema", |s| *s != 1),
        kind in 0usize..5,
    ) {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        for t in [Target::Record, Target::Manifest, Target::Journal] {
            let mut doc = valid_doc(root, t, kind);
            doc["schema"] = json!(schema);
            write(root, t, &serde_json::to_vec(&doc).unwrap());
        }
        runtime().block_on(async {
            let store = Store::new(root);
            let errors = [
                ("record", store.record(&vm()).await.err()),
                ("manifest", store.manifest(&vm(), &snap()).await.err()),
                ("manifests", store.manifests(&vm()).await.err()),
                ("journal", store.journal(&vm()).await.err()),
            ];
            for (reader, err) in errors {
                let err = err.ok_or_else(|| {
                    TestCaseError::fail(format!("{reader} accepted schema {schema}"))
                })?;
                prop_assert!(
                    why(&err).is_some_and(|w| w.contains("schema")),
                    "{} refused schema {} with {:?}", reader, schema, err
                );
            }
            Ok::<(), TestCaseError>(())
        })?;
    }

    /// A manifest's memory file is accepted only when it is the store's own file for that
    /// snapshot; anything else (outside the store, relative, `..`, another VM's or snapshot's
    /// file, random text) is refused by `manifest` and `manifests`.
    #[test]
    fn memory_file_outside_the_store_is_refused(
        pick in 0usize..12,
        random in "\\PC{0,24}",
        suffix in prop_oneof![Just(""), Just("/"), Just("/."), Just("x"), Just(".bak")],
    ) {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let own = memory_file(root);
        let candidate: PathBuf = match pick {
            0 => "/etc/passwd".into(),
            1 => "/proc/self/mem".into(),
            2 => "s1.mem".into(),
            3 => "memory/s1.mem".into(),
            4 => vm_dir(root).join("memory/../memory/s1.mem"),
            5 => vm_dir(root).join("memory/s2.mem"),
            6 => root.join("vms/vm2/memory/s1.mem"),
            7 => root.join("vms/vm1/snapshots/s1.json"),
            8 => own.join("../../../../../etc/passwd"),
            9 => random.clone().into(),
            10 => root.join(&random),
            _ => own.clone(),
        };
        let candidate = PathBuf::from(format!("{}{suffix}", candidate.display()));
        let mut doc = valid_manifest(root);
        doc["memory"]["file"] = json!(candidate);
        write(root, Target::Manifest, &serde_json::to_vec(&doc).unwrap());
        // Path equality compares components: `a//b` and `a/./b` are the same file as `a/b`;
        // and a store path is read plain (`memory/../memory/s1.mem` is `memory/s1.mem`).
        let is_own = qsnap_engine::store::plain_path(&candidate) == own;
        runtime().block_on(async {
            let store = Store::new(root);
            let one = store.manifest(&vm(), &snap()).await;
            let all = store.manifests(&vm()).await;
            if is_own {
                prop_assert!(one.is_ok(), "own memory file refused: {:?}", one);
                prop_assert!(all.is_ok(), "own memory file refused: {:?}", all);
            } else {
                prop_assert!(
                    one.as_ref().err().and_then(why).is_some_and(|w| w.contains("memory file")),
                    "memory file {} accepted or refused for the wrong reason: {:?}",
                    candidate.display(), one
                );
                prop_assert!(all.is_err(), "memory file {} accepted: {:?}", candidate.display(), all);
            }
            Ok::<(), TestCaseError>(())
        })?;
    }

}

proptest! {
    // Up to a dozen files per case: fewer cases.
    #![proptest_config(config(100))]

    /// Stray files with arbitrary names and contents in `snapshots/`: `manifests` returns.
    #[test]
    fn stray_snapshot_files_never_panic(
        files in vec((r"[^/\x00]{1,24}", prop_oneof![
            vec(any::<u8>(), 0..64),
            Just(b"{}".to_vec()),
            Just(Vec::new()),
        ]), 0..6),
        with_valid in any::<bool>(),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let snapshots = vm_dir(root).join("snapshots");
        std::fs::create_dir_all(&snapshots).unwrap();
        if with_valid {
            write(root, Target::Manifest, &serde_json::to_vec(&valid_manifest(root)).unwrap());
        }
        for (name, bytes) in &files {
            // `.`, `..` and over-long names cannot be created; skip them.
            let _ = std::fs::write(snapshots.join(name), bytes);
            let _ = std::fs::write(snapshots.join(format!("{name}.json")), bytes);
        }
        read_all_blocking(root)?;
    }
}
