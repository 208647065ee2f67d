//! Lazy RAM against a real QEMU and the real guest: a snapshot's memory stream made into a RAM
//! image + device state (`Vm::make_lazy`), reverts that map the image instead of loading it,
//! resuming at exactly the tick an eager revert of the same snapshot resumed at, again and
//! again and across branches; a lazily reverted VM still snapshots (precopy) and its snapshots
//! go lazy too; deleting the snapshot a running VM maps; a leftover file is never overwritten;
//! VMs that name their own RAM backends (libvirt's `-machine memory-backend=`, two NUMA
//! nodes) revert lazily too; and a VM whose command line rules lazy RAM out reverts eagerly
//! and says why.

use qsnap_engine::snapshot::Mode;
use qsnap_engine::{
    CreateError, Error, LazyRamError, LazyRamRefusal, RamRestore, RevertError, RevertOptions,
};
use qsnap_testkit::{init_logging, require_qemu, VmBuilder};
use std::os::unix::fs::PermissionsExt;

mod common;
use common::{n, Guest};

fn mode_of(path: &std::path::Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lazy_reverts_resume_where_eager_ones_do_again_and_across_branches() {
    require_qemu!();
    init_logging();
    // A monitor and a socket chardev of the VM's own, after a flag without a value: the
    // helper QEMU must take neither.
    let side = tempfile::tempdir().unwrap();
    let obs = side.path().join("obs.sock");
    let extra = side.path().join("extra.sock");
    let builder = VmBuilder::guest().dirty_mb(16).args([
        "-no-shutdown".to_owned(),
        "-qmp".to_owned(),
        format!("unix:{},server=on,wait=off", obs.display()),
        "-chardev".to_owned(),
        format!(
            "socket,id=extra,path={},server=on,wait=off",
            extra.display()
        ),
    ]);
    let g = Guest::start(builder, "qcow2").await;
    g.tick_above(0, 3).await;
    let s1 = g.snapshot("s1").await;
    g.tick_above(0, s1.1 + 3).await;
    let inode =
        |p: &std::path::Path| std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(p).unwrap());

    // Eager first: the tick a revert of s1 resumes at.
    let (r, eager_tick) = g.revert_first_tick("s1", s1).await;
    assert!(
        matches!(&r.ram, RamRestore::Eager { why } if why.contains("lazy-ram")),
        "{:?}",
        r.ram
    );

    // A leftover file where the RAM image goes is never overwritten; check --repair removes it.
    let mem_dir = g.dir.join("store/vms/g/memory");
    // (What a crash leaves: a device-state file with qsnap's header, incomplete.)
    let mut left_over = b"QSNAPMEM".to_vec();
    left_over.resize(4096, 0);
    std::fs::write(mem_dir.join("s1.dev"), &left_over).unwrap();
    let err = g.vm.make_lazy(&n("s1")).await.unwrap_err();
    assert!(err.to_string().contains("check g --repair"), "{err}");
    assert_eq!(std::fs::read(mem_dir.join("s1.dev")).unwrap(), left_over);
    assert!(mem_dir.join("s1.mem").exists());
    let fixed = g.vm.check(true).await.unwrap();
    assert!(fixed.clean, "{:?}", fixed.findings);
    assert!(!mem_dir.join("s1.dev").exists());

    // (The eager revert relaunched QEMU, which made its sockets anew.)
    let (obs_ino, extra_ino) = (inode(&obs), inode(&extra));
    let lazy = g.vm.make_lazy(&n("s1")).await.unwrap();
    eprintln!(
        "lazy-ram s1: {:.0} ms, image {} MiB ({} MiB allocated), device state {} KiB, stream was {} MiB",
        lazy.total_ms,
        lazy.image_bytes >> 20,
        lazy.image_allocated >> 20,
        lazy.devices_bytes >> 10,
        lazy.stream_bytes >> 20
    );
    assert!(!lazy.already);
    assert_eq!(lazy.image_bytes, 256 << 20);
    assert!(
        lazy.image_allocated < lazy.image_bytes,
        "the RAM image is sparse"
    );
    assert!(lazy.devices_bytes < 8 << 20, "device state only");
    assert!(!mem_dir.join("s1.mem").exists(), "the stream is replaced");
    for f in ["s1.dev", "s1.ram"] {
        assert_eq!(mode_of(&mem_dir.join(f)), 0o600, "{f}");
    }
    assert_eq!(mode_of(&mem_dir), 0o700);
    // Idempotent.
    assert!(g.vm.make_lazy(&n("s1")).await.unwrap().already);
    // The helper QEMU took none of the VM's sockets: the same socket files, and the VM's own
    // monitor answers on its own socket.
    assert_eq!((inode(&obs), inode(&extra)), (obs_ino, extra_ino));
    let q = qsnap_qmp::Qmp::connect(obs.clone()).await.unwrap();
    assert_eq!(q.peer_pid(), g.vm.status().await.unwrap().pid);
    drop(q);
    assert!(g.vm.status().await.unwrap().running);

    // Ten lazy reverts in a row: every one resumes at the eager revert's tick.
    for i in 0..10 {
        let (r, first) = g.revert_first_tick("s1", s1).await;
        assert_eq!(r.ram, RamRestore::Lazy, "revert {i}");
        assert_eq!(
            first,
            eager_tick,
            "lazy revert {i} resumed at {first}, the eager one at {eager_tick}\n{}",
            g.report()
        );
        eprintln!("lazy revert {i}: {:.0} ms to running", r.total_ms);
    }

    // A lazily reverted VM snapshots (precopy: QEMU cannot write-protect a private file
    // mapping), and that snapshot reverts and goes lazy too.
    let mut pit = g.vm.create_options(n("pit"));
    pit.mode = Some(Mode::PointInTime);
    let err = g.vm.create_snapshot(pit).await.unwrap_err();
    assert!(
        matches!(&err, Error::Create(CreateError::CannotWriteProtect { .. }))
            && err.to_string().contains("--mode precopy"),
        "{err}"
    );
    let s2 = g.snapshot("s2").await;
    let m2 = g.vm.snapshot(&n("s2")).await.unwrap();
    assert_eq!(m2.snapshot.mode, Mode::Precopy);
    // …saved in the mapped-ram format (QEMU ≥ 9.0), which the conversion below loads.
    let caps = &m2.snapshot.memory.as_ref().unwrap().capabilities;
    assert!(caps.iter().any(|c| c == "mapped-ram"), "{caps:?}");
    assert_eq!(m2.parent.as_deref(), Some("s1"));
    let (r, s2_eager) = g.revert_first_tick("s2", s2).await;
    assert!(matches!(r.ram, RamRestore::Eager { .. }));
    g.vm.make_lazy(&n("s2")).await.unwrap();
    let (r, first) = g.revert_first_tick("s2", s2).await;
    assert_eq!((r.ram, first), (RamRestore::Lazy, s2_eager));
    let (r, first) = g.revert_first_tick("s1", s1).await;
    assert_eq!((r.ram, first), (RamRestore::Lazy, eager_tick));

    // The VM maps s1's image right now; deleting s1 leaves it running on its pages.
    let st = g.vm.status().await.unwrap();
    g.vm.delete_snapshot(&n("s1"), &Default::default())
        .await
        .unwrap_or_else(|e| panic!("delete s1: {e}\n{}", g.report()));
    assert!(!mem_dir.join("s1.ram").exists() && !mem_dir.join("s1.dev").exists());
    let mark = g.serial().len();
    g.tick_above(mark, g.last_tick() + 3).await;
    assert!(g.serial().mismatches().is_empty(), "{}", g.report());
    assert_eq!(
        g.vm.status().await.unwrap().pid,
        st.pid,
        "same QEMU, still running"
    );
    let (r, first) = g.revert_first_tick("s2", s2).await;
    assert_eq!((r.ram, first), (RamRestore::Lazy, s2_eager));

    // (A revert does not merge: the layer s1 left with one child is check's to merge.)
    let check = g.vm.check(true).await.unwrap();
    assert!(check.clean, "{:?}", check.findings);
    assert!(
        check.findings.iter().all(|f| f.kind == "unmerged-layer"),
        "{:?}",
        check.findings
    );
    let mut left: Vec<String> = std::fs::read_dir(&mem_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    left.sort();
    assert_eq!(left, ["s2.dev", "s2.ram"]);

    // A RAM image changed behind qsnap's back is refused, the VM left running.
    let ram = mem_dir.join("s2.ram");
    let f = std::fs::OpenOptions::new().write(true).open(&ram).unwrap();
    std::os::unix::fs::FileExt::write_at(&f, b"x", 4096).unwrap();
    drop(f);
    let err =
        g.vm.revert_with(&n("s2"), &RevertOptions::default(), &g.launcher)
            .await
            .unwrap_err();
    assert!(
        matches!(&err, Error::Revert(RevertError::Refused { why, .. }) if why.contains("RAM image")),
        "{err}"
    );
    assert!(g.vm.status().await.unwrap().running);
    let check = g.vm.check(false).await.unwrap();
    assert!(
        check.findings.iter().any(|f| f.kind == "bad-memory"),
        "{:?}",
        check.findings
    );
}

/// A VM started with `args` (its own RAM backends) snapshots, goes lazy and reverts lazily at
/// the tick an eager revert resumes at; the manifest maps `blocks` (id, offset, size) of the
/// image.
async fn named_backends_revert_lazily(args: &[&str], blocks: &[(&str, u64, u64)]) {
    let builder = VmBuilder::guest().dirty_mb(16).args(args.iter().copied());
    let g = Guest::start(builder, "qcow2").await;
    g.tick_above(0, 3).await;
    let s1 = g.snapshot("s1").await;
    g.tick_above(0, s1.1 + 3).await;
    let (r, eager_tick) = g.revert_first_tick("s1", s1).await;
    assert!(
        matches!(&r.ram, RamRestore::Eager { why } if why.contains("lazy-ram")),
        "{:?}",
        r.ram
    );
    let lazy = g.vm.make_lazy(&n("s1")).await.unwrap();
    assert_eq!(
        lazy.image_bytes,
        blocks.iter().map(|b| b.1 + b.2).max().unwrap()
    );
    let m = g.vm.snapshot(&n("s1")).await.unwrap();
    let l = m.snapshot.memory.unwrap().lazy.unwrap();
    let got: Vec<(&str, u64, u64)> = l
        .blocks
        .iter()
        .map(|b| (b.id.as_str(), b.offset, b.size))
        .collect();
    assert_eq!(got, blocks);
    // A manifest whose block lies past the image's end is refused when read (an edited or
    // imported one would map zeros into the guest), and read again once it is put back.
    let path = g.dir.join("store/vms/g/snapshots/s1.json");
    let text = std::fs::read_to_string(&path).unwrap();
    let mut bad: serde_json::Value = serde_json::from_str(&text).unwrap();
    // (Schema 2: a qsnap that reads only schema 1 refuses it rather than map it wrongly.)
    assert_eq!(bad["schema"], 2);
    let last = bad["memory"]["lazy"]["blocks"]
        .as_array_mut()
        .unwrap()
        .last_mut()
        .unwrap();
    last["offset"] = serde_json::json!(l.size);
    std::fs::write(&path, serde_json::to_string(&bad).unwrap()).unwrap();
    let err = g.vm.snapshot(&n("s1")).await.unwrap_err();
    assert!(err.to_string().contains("does not fit"), "{err}");
    std::fs::write(&path, text).unwrap();
    g.vm.snapshot(&n("s1")).await.unwrap();
    for i in 0..3 {
        let (r, first) = g.revert_first_tick("s1", s1).await;
        assert_eq!(r.ram, RamRestore::Lazy, "revert {i}");
        assert_eq!(
            first,
            eager_tick,
            "lazy revert {i} resumed at {first}, the eager one at {eager_tick}\n{}",
            g.report()
        );
    }
    let check = g.vm.check(false).await.unwrap();
    assert!(check.clean, "{:?}", check.findings);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn libvirts_named_memory_backend_reverts_lazily_where_an_eager_revert_resumes() {
    require_qemu!();
    init_logging();
    // What libvirt 11 writes: the machine names its RAM backend, given as JSON.
    named_backends_revert_lazily(
        &[
            "-machine",
            "pc,memory-backend=pc.ram",
            "-object",
            r#"{"qom-type":"memory-backend-ram","id":"pc.ram","size":268435456}"#,
        ],
        &[("pc.ram", 0, 256 << 20)],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_numa_nodes_revert_lazily_where_an_eager_revert_resumes() {
    require_qemu!();
    init_logging();
    // Two nodes of unequal size, a RAM and a memfd backend: each its own RAM block, each at
    // its own offset in the one image.
    named_backends_revert_lazily(
        &[
            "-smp",
            "2",
            "-object",
            "memory-backend-ram,id=node0,size=96M",
            "-numa",
            "node,nodeid=0,cpus=0,memdev=node0",
            "-object",
            "memory-backend-memfd,id=node1,size=160M",
            "-numa",
            "node,nodeid=1,cpus=1,memdev=node1",
        ],
        &[("node0", 0, 96 << 20), ("node1", 96 << 20, 160 << 20)],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_memory_backend_a_file_cannot_stand_in_for_reverts_eagerly_and_says_why() {
    require_qemu!();
    init_logging();
    // Preallocation would read the whole image before the guest runs: refused, by name.
    let builder = VmBuilder::guest().args([
        "-object",
        "memory-backend-ram,id=mem0,size=256M,prealloc=on",
        "-machine",
        "memory-backend=mem0",
    ]);
    let g = Guest::start(builder, "qcow2").await;
    g.tick_above(0, 3).await;
    let s1 = g.snapshot("s1").await;
    let before = g.vm.snapshot(&n("s1")).await.unwrap();

    let err = g.vm.make_lazy(&n("s1")).await.unwrap_err();
    assert!(
        matches!(
            &err,
            Error::LazyRam(LazyRamError::Refused {
                reason: LazyRamRefusal::CommandLine { why },
                ..
            }) if why.contains("mem0") && why.contains("prealloc=on")
        ),
        "{err}"
    );
    // Nothing changed.
    assert_eq!(g.vm.snapshot(&n("s1")).await.unwrap(), before);
    let mem_dir = g.dir.join("store/vms/g/memory");
    let files: Vec<_> = std::fs::read_dir(&mem_dir).unwrap().collect();
    assert_eq!(files.len(), 1, "only the stream: {files:?}");

    let (r, _) = g.revert_first_tick("s1", s1).await;
    match &r.ram {
        RamRestore::Eager { why } => assert!(why.contains("prealloc=on"), "{why}"),
        other => panic!("expected an eager revert, got {other:?}"),
    }
    assert!(r.ram.to_string().contains("prealloc=on"));
}
