//! Revert and the VM lifecycle against a real QEMU: VMs started by `Engine::run` from a
//! recorded command line, snapshots, reverts (memory and disk together, again and again, across
//! a branching tree), refusals that leave the VM alone, and stop/start that never opens a
//! frozen image read-write.

use qsnap_engine::launch::{LaunchSpec, Launched, Launcher, ProcessLauncher};
use qsnap_engine::snapshot::{revert, Mode};
use qsnap_engine::{
    CreateError, Engine, Error, RevertError, RevertOptions, RunOptions, SnapshotName, Store, VmName,
};
use qsnap_testkit::{init_logging, require_qemu, Accel, DiskStyle, KillRecordedQemu, VmBuilder};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

mod common;
use common::Guest;
use std::time::Duration;

fn n(s: &str) -> SnapshotName {
    SnapshotName::new(s).unwrap()
}

fn v(s: &str) -> VmName {
    VmName::new(s).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revert_brings_memory_and_disk_back_repeatedly_and_across_branches() {
    require_qemu!();
    init_logging();
    let g = Guest::start(VmBuilder::guest().dirty_mb(16), "qcow2").await;
    g.tick_above(0, 3).await;

    let s1 = g.snapshot("s1").await;
    g.tick_above(0, s1.1 + 5).await;
    let s2 = g.snapshot("s2").await;
    g.tick_above(0, s2.1 + 3).await;

    // Back to s1 five times: the snapshot stays revertible, the guest forgets what came after.
    for _ in 0..5 {
        g.revert_and_check("s1", s1).await;
    }
    // A branch: s3's parent is s1, not s2.
    let mark = g.serial().len();
    let now = g.last_tick();
    g.tick_above(mark, now + 3).await;
    let s3 = g.snapshot("s3").await;
    let m3 = g.vm.snapshot(&n("s3")).await.unwrap();
    assert_eq!(m3.parent.as_deref(), Some("s1"));
    g.revert_and_check("s2", s2).await;
    g.revert_and_check("s3", s3).await;

    // The two-step API an embedder uses: prepare, start QEMU yourself, restore.
    let m2 = g.vm.snapshot(&n("s2")).await.unwrap();
    std::fs::create_dir_all(g.dir.join("mine")).unwrap();
    let prepared = revert::prepare("s2", &m2.snapshot, Some(&g.dir.join("mine")))
        .await
        .unwrap();
    let own = VmBuilder::guest()
        .dirty_mb(16)
        .disk(&prepared.disks[0].overlay, "qcow2", DiskStyle::Blockdev)
        .args(["-incoming", "defer"])
        .spawn()
        .await;
    let restored = revert::restore(&own.qmp().await, &prepared, true, Duration::from_secs(120))
        .await
        .unwrap();
    assert!(restored.resumed);
    let first = own.wait_booted(Duration::from_secs(60)).await;
    assert!(
        first > s2.0 && first <= s2.1 + 1,
        "two-step restore resumed at {first}, s2 is {s2:?}\n{}",
        own.report()
    );
    drop(own);
    revert::discard(&prepared).await;

    // Abandoned overlays were removed; frozen images and the current overlay remain.
    let st = g.vm.status().await.unwrap();
    let chain = &st.disks[0].chain;
    assert_eq!(chain.last().unwrap(), &g.dir.join("disk.qcow2"));
    assert!(
        chain[0]
            .file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with("disk.s3.r"),
        "{chain:?}"
    );
    let mut images: Vec<String> = std::fs::read_dir(&g.dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|f| f.ends_with(".qcow2"))
        .collect();
    images.sort();
    // disk.qcow2 (frozen by s1), the s1-branch overlays frozen by s2 and s3, and the current one.
    assert_eq!(images.len(), 4, "{images:?}");

    // A revert discards the current state, unless --keep-current saves it first: the state
    // before the revert is a snapshot, and going back to it finds the guest where it was.
    let now = g.last_tick();
    g.tick_above(g.serial().len(), now + 2).await;
    let before = g.last_tick();
    let old_console = g.launcher.path();
    let opts = RevertOptions {
        paused: false,
        keep_current: Some(n("kept")),
        ..RevertOptions::default()
    };
    let r =
        g.vm.revert_with(&n("s1"), &opts, &g.launcher)
            .await
            .unwrap_or_else(|e| panic!("revert --keep-current: {e}\n{}", g.report()));
    assert_eq!(r.kept_current.as_deref(), Some("kept"));
    let kept = g.vm.snapshot(&n("kept")).await.unwrap();
    assert_eq!(kept.parent.as_deref(), Some("s3"));
    // The state it froze stays; only the empty overlay the VM had been on since goes.
    assert!(kept.snapshot.disks[0].image.exists());
    assert!(!r.removed.contains(&kept.snapshot.disks[0].image));
    // The old QEMU is gone: its console's last tick bounds the kept snapshot from above.
    let after = std::fs::read_to_string(&old_console)
        .unwrap()
        .lines()
        .rev()
        .find_map(qsnap_testkit::serial::parse_tick)
        .unwrap();
    g.revert_and_check("kept", (before, after)).await;

    // Precopy saves in QEMU's mapped-ram format (several threads; zero pages are holes in a
    // file as large as RAM) when QEMU has it, else, or when asked, in the plain stream. Both
    // revert to their own instant.
    let mapped_ram = g.qemu_at_least(9, 0).await;
    for (name, mapped) in [("pm", true), ("pp", false)] {
        let range = g
            .snapshot_with(name, |o| {
                o.mode = Some(Mode::Precopy);
                o.mapped_ram = mapped;
            })
            .await;
        // The save's capabilities are off again afterwards (as preflight found them).
        let qmp = g.vm.connect().await.unwrap();
        let caps = qmp
            .execute_raw("query-migrate-capabilities", None)
            .await
            .unwrap();
        drop(qmp);
        for c in caps.as_array().unwrap() {
            if matches!(c["capability"].as_str(), Some("mapped-ram" | "multifd")) {
                assert_eq!(c["state"], false, "{c} left on after {name}");
            }
        }
        let m = g.vm.snapshot(&n(name)).await.unwrap();
        let mem = m.snapshot.memory.as_ref().unwrap();
        let caps = &mem.capabilities;
        let meta = std::fs::metadata(&mem.file).unwrap();
        let ram = mem.ram_bytes;
        if mapped && mapped_ram {
            assert!(caps.iter().any(|c| c == "mapped-ram"), "{caps:?}");
            assert!(caps.iter().any(|c| c == "multifd"), "{caps:?}");
            // Bounded by RAM size, and sparse: the idle pages of a 256 MiB guest are holes.
            assert!(meta.len() > ram, "{} vs RAM {ram}", meta.len());
            assert!(meta.blocks() * 512 < meta.len() / 2, "{meta:?}");
        } else {
            assert_eq!(caps, &["events".to_owned()], "{name}");
            assert!(meta.len() < ram, "a plain stream leaves zero pages out");
        }
        g.revert_and_check(name, range).await;
    }
    g.vm.stop().await.unwrap();
}

/// Flips one bit in the middle of `snap`'s memory stream; a revert must refuse it.
async fn flip_and_revert(g: &Guest, snap: &str) {
    let m = g.vm.snapshot(&n(snap)).await.unwrap();
    let mem = m.snapshot.memory.as_ref().unwrap();
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&mem.file)
            .unwrap();
        let at = 4096 + mem.bytes / 2;
        let mut b = [0u8; 1];
        f.read_exact_at(&mut b, at).unwrap();
        f.write_all_at(&[b[0] ^ 0x10], at).unwrap();
    }
    let err = g.vm.revert(&n(snap), false).await.unwrap_err();
    assert!(
        matches!(err, Error::Revert(RevertError::Refused { .. })),
        "{snap}: {err}"
    );
    assert!(
        err.to_string().contains("contents changed"),
        "{snap}: {err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_snapshot_is_refused_before_the_vm_is_touched() {
    require_qemu!();
    init_logging();
    let g = Guest::start(VmBuilder::idle().memory(128), "qcow2").await;
    let pid = g.vm.status().await.unwrap().pid.unwrap();
    g.take("s1").await;
    g.take("s2").await;
    g.take("s3").await;

    // One bit flipped inside the memory stream (the length is right): caught by the checksum
    // before anything is touched.
    flip_and_revert(&g, "s3").await;

    // A truncated memory file.
    let m1 = g.vm.snapshot(&n("s1")).await.unwrap();
    let mem = m1.snapshot.memory.as_ref().unwrap().file.clone();
    let f = std::fs::OpenOptions::new().write(true).open(&mem).unwrap();
    f.set_len(std::fs::metadata(&mem).unwrap().len() / 2)
        .unwrap();
    let err = g.vm.revert(&n("s1"), false).await.unwrap_err();
    assert!(
        matches!(err, Error::Revert(RevertError::Refused { .. })),
        "{err}"
    );
    assert!(err.to_string().contains("truncated"), "{err}");

    // A frozen image someone wrote to.
    let m2 = g.vm.snapshot(&n("s2")).await.unwrap();
    let frozen = &m2.snapshot.disks[0].image;
    let f = std::fs::OpenOptions::new()
        .append(true)
        .open(frozen)
        .unwrap();
    f.set_len(std::fs::metadata(frozen).unwrap().len() + 512)
        .unwrap();
    let err = g.vm.revert(&n("s2"), false).await.unwrap_err();
    assert!(
        matches!(err, Error::Revert(RevertError::Refused { .. })),
        "{err}"
    );
    assert!(
        err.to_string().contains("changed since the snapshot"),
        "{err}"
    );

    // Unknown snapshot.
    let err = g.vm.revert(&n("nope"), false).await.unwrap_err();
    assert!(matches!(err, Error::UnknownSnapshot { .. }), "{err}");

    // The VM was never touched: same QEMU, still running, still current = s3, no stray overlay.
    let st = g.vm.status().await.unwrap();
    assert_eq!(st.pid, Some(pid));
    assert_eq!(st.runstate.as_deref(), Some("running"));
    assert_eq!(st.current.as_deref(), Some("s3"));
    let strays: Vec<_> = std::fs::read_dir(&g.dir)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().contains(".r1."))
        .collect();
    assert!(strays.is_empty(), "{strays:?}");

    // A snapshot reverted to twice is read once (its checksum remembered for this very file);
    // flipped after that, it is read again and refused.
    g.take("s4").await;
    let r = g.vm.revert(&n("s4"), false).await.unwrap();
    assert!(!r.memory_verified_before, "{r:?}");
    let again = g.vm.revert(&n("s4"), false).await.unwrap();
    assert!(again.memory_verified_before, "{again:?}");
    flip_and_revert(&g, "s4").await;
    g.vm.stop().await.unwrap();
}

/// An embedder's launcher: counts calls and delegates.
struct Counting {
    calls: AtomicUsize,
    incoming: AtomicUsize,
}

impl Launcher for Counting {
    async fn launch(&self, spec: &LaunchSpec) -> qsnap_engine::Result<Launched> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        if spec.incoming {
            self.incoming.fetch_add(1, Ordering::SeqCst);
        }
        ProcessLauncher::default().launch(spec).await
    }
}

/// A launcher whose QEMU never comes up.
struct Failing;

impl Launcher for Failing {
    async fn launch(&self, _spec: &LaunchSpec) -> qsnap_engine::Result<Launched> {
        Err(Error::LaunchFailed {
            why: "the test's launcher refuses".into(),
            log: PathBuf::new(),
            tail: String::new(),
        })
    }
}

fn sha(path: &Path) -> Vec<u8> {
    // The image bytes themselves: any write, even of the same size, shows.
    std::fs::read(path).unwrap()
}

fn qemu_argv(pid: u32) -> String {
    String::from_utf8_lossy(&std::fs::read(format!("/proc/{pid}/cmdline")).unwrap())
        .replace('\0', " ")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_and_start_keep_the_chain_and_never_open_a_frozen_image_read_write() {
    require_qemu!();
    init_logging();
    let g = Guest::start(VmBuilder::idle().memory(64), "raw").await;
    let base = g.dir.join("disk.raw");
    g.take("s1").await;
    let mut opts = g.vm.create_options(n("d1"));
    opts.mode = Some(Mode::DiskOnly);
    g.vm.create_snapshot(opts).await.unwrap();
    let s1_overlay = g.dir.join("disk.s1.qcow2");
    let frozen = [
        (base.clone(), sha(&base)),
        (s1_overlay.clone(), sha(&s1_overlay)),
    ];

    for round in 0..2 {
        let stopped = g.vm.stop().await.unwrap();
        assert!(
            matches!(
                stopped,
                qsnap_engine::launch::StopOutcome::Quit { pid: Some(_) }
            ),
            "QEMU had to be killed: {stopped:?}"
        );
        let st = g.vm.status().await.unwrap();
        assert!(!st.running);
        let err = g.vm.revert(&n("zzz"), false).await.unwrap_err();
        assert!(matches!(err, Error::UnknownSnapshot { .. }));

        let launched = g.vm.start().await.unwrap();
        let pid = launched.pid.unwrap();
        let argv = qemu_argv(pid);
        // The relaunch opens the current overlay, as qcow2, never the raw base directly.
        assert!(argv.contains("disk.d1.qcow2"), "round {round}: {argv}");
        assert!(
            !argv.contains(&format!("filename={},", base.display())),
            "{argv}"
        );
        let st = g.vm.status().await.unwrap();
        assert!(st.running);
        assert_eq!(st.current.as_deref(), Some("d1"));
        assert_eq!(
            st.disks[0].chain,
            vec![
                g.dir.join("disk.d1.qcow2"),
                s1_overlay.clone(),
                base.clone()
            ]
        );
        let err = g.vm.start().await.unwrap_err();
        assert!(matches!(err, Error::AlreadyRunning { .. }), "{err}");
    }
    // A disk-only snapshot reverts by booting from its disks (through an embedder's launcher).
    let launcher = Counting {
        calls: AtomicUsize::new(0),
        incoming: AtomicUsize::new(0),
    };
    let r =
        g.vm.revert_with(&n("d1"), &RevertOptions::default(), &launcher)
            .await
            .unwrap();
    assert!(!r.memory_restored);
    assert_eq!(launcher.calls.load(Ordering::SeqCst), 1);
    assert_eq!(launcher.incoming.load(Ordering::SeqCst), 0);
    assert!(g.vm.status().await.unwrap().running);
    // And a memory one after it.
    let r = g.vm.revert(&n("s1"), false).await.unwrap();
    assert!(r.memory_restored);

    // A relaunch that fails: the error says where the VM stands and how to get back, the new
    // overlays are gone, and `start` brings the VM back on its previous disks.
    let before = g.vm.status().await.unwrap().disks[0].chain.clone();
    let err =
        g.vm.revert_with(&n("s1"), &RevertOptions::default(), &Failing)
            .await
            .unwrap_err();
    let text = err.to_string();
    assert!(
        matches!(err, Error::Revert(RevertError::Failed { .. })),
        "{text}"
    );
    assert!(
        text.contains("The VM is stopped") && text.contains("qsnap start g"),
        "{text}"
    );
    assert!(text.contains(&before[0].display().to_string()), "{text}");
    assert!(!g.dir.join("disk.s1.r2.qcow2").exists());
    assert!(!g.vm.status().await.unwrap().running);
    g.vm.start().await.unwrap();
    assert_eq!(g.vm.status().await.unwrap().disks[0].chain, before);
    g.vm.stop().await.unwrap();
    for (img, bytes) in &frozen {
        assert!(sha(img) == *bytes, "{} was written to", img.display());
    }
}

#[tokio::test]
async fn run_pins_the_tsc_frequency_of_an_invtsc_cpu_so_memory_snapshots_work() {
    require_qemu!();
    init_logging();
    if !qsnap_testkit::kvm_or_skip("run_pins_the_tsc_frequency") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let engine = Engine::new(Store::new(dir.path().join("store")));
    let builder = VmBuilder::idle()
        .accel(Accel::Kvm)
        .cpu("host,+invtsc,-arch-capabilities");
    if let Err(report) = builder.clone().try_spawn().await {
        qsnap_testkit::kvm_vm_failed("run_pins_the_tsc_frequency", &report);
        return;
    }
    let argv = builder.command_line(&dir.path().join("serial.log")).await;

    let _kill = (
        KillRecordedQemu::new(&dir.path().join("store"), "plain"),
        KillRecordedQemu::new(&dir.path().join("store"), "fixed"),
    );
    // Without the fix: QEMU refuses to save memory, and the error gives the way out.
    engine
        .run(
            &v("plain"),
            argv.clone(),
            &RunOptions {
                no_tsc_fix: true,
                cwd: None,
            },
        )
        .await
        .unwrap();
    let plain = engine.vm(&v("plain")).await.unwrap();
    let err = plain
        .create_snapshot(plain.create_options(n("s1")))
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::Create(CreateError::MigrationBlocked { .. })),
        "{err}"
    );
    plain.stop().await.unwrap();

    // With it: the Hz is added to -cpu, recorded, and a memory snapshot works.
    let report = engine
        .run(&v("fixed"), argv, &RunOptions::default())
        .await
        .unwrap();
    let (hz, source) = report.tsc_pinned.clone().expect("tsc-frequency pinned");
    eprintln!("pinned tsc-frequency={hz} from {source}");
    assert!(hz > 100_000_000);
    let cmd = report.record.command.as_ref().unwrap();
    assert!(
        cmd.argv
            .iter()
            .any(|a| a.contains(&format!("tsc-frequency={hz}"))),
        "{:?}",
        cmd.argv
    );
    let fixed = engine.vm(&v("fixed")).await.unwrap();
    let m = fixed
        .create_snapshot(fixed.create_options(n("s1")))
        .await
        .unwrap();
    assert!(m.snapshot.memory.is_some());
    fixed.stop().await.unwrap();
}
