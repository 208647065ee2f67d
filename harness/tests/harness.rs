//! The harness API against real QEMU and the real guest: forks of a golden snapshot resume at
//! its instant and stay apart (disk and memory), a fork dropped during a panic leaves no QEMU
//! and no files, `reset` brings a fork back, a cached golden is reused by the next process,
//! and a process that dies without running a destructor leaves nothing behind either.

mod common;

use common::golden;
use qsnap_engine::{SnapshotName, VmName};
use qsnap_harness::Fork;
use qsnap_testkit::disk_io::{self, Disk};
use qsnap_testkit::serial::{parse_tick, SerialLog};
use qsnap_testkit::{init_logging, require_qemu};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Processes whose command line contains `needle`.
fn processes_naming(needle: &str) -> Vec<String> {
    let me = std::process::id().to_string();
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .chars()
                .all(|c| c.is_ascii_digit())
        })
        .filter(|e| e.file_name().to_string_lossy() != me)
        .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
        .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
        .filter(|c| c.contains(needle))
        .collect()
}

fn dir_of(f: &Fork) -> PathBuf {
    f.vm().store().vm_dir(f.vm().name())
}

async fn first_tick(f: &Fork) -> (SerialLog, u64) {
    let log = SerialLog::follow(f.console().expect("the console is captured"));
    let (_, t) = log
        .wait_from(0, Duration::from_secs(60), parse_tick)
        .await
        .unwrap_or_else(|e| panic!("{}: no tick: {e}\n{}", f.vm().name(), log.tail(20)));
    (log, t)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forks_resume_at_the_golden_instant_and_stay_apart() {
    require_qemu!();
    init_logging();
    let g = golden().await;
    let forks: Vec<Fork> = futures::future::join_all((0..3).map(|_| g.fork()))
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect();
    let mut logs = Vec::new();
    let mut firsts = Vec::new();
    for f in &forks {
        assert!(f.report().resumed);
        let (log, t) = first_tick(f).await;
        logs.push(log);
        firsts.push(t);
    }
    // One instant: every fork goes on from the same tick.
    assert!(
        firsts.iter().all(|&t| t == firsts[0] && t >= 4),
        "{firsts:?}"
    );
    // Disk: what one fork writes, the others do not see.
    let q0 = forks[0].qmp().await.unwrap();
    disk_io::write(&q0, &Disk::Device("vd0".into()), 0x5a, 8192, 64).await;
    drop(q0);
    for f in &forks[1..] {
        let q = f.qmp().await.unwrap();
        assert!(
            disk_io::check(&q, &Disk::Device("vd0".into()), 0x5a, 8192, 64)
                .await
                .is_err()
        );
    }
    let q0 = forks[0].qmp().await.unwrap();
    disk_io::check(&q0, &Disk::Device("vd0".into()), 0x5a, 8192, 64)
        .await
        .unwrap();
    drop(q0);
    // Memory: stop one fork's guest; the others tick on, each its own counter and disk.
    let q1 = forks[1].qmp().await.unwrap();
    q1.execute(qsnap_qmp::types::stop {}).await.unwrap();
    drop(q1);
    // The follower reads the console file every 50 ms: a tick the guest printed just before
    // `stop` may not be read yet. The stopped guest prints nothing more, so a few of its
    // polls later the log holds everything it will ever hold.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let stopped_at = logs[1].ticks().last().copied().unwrap();
    for log in [&logs[0], &logs[2]] {
        let from = log.len();
        log.wait_from(from, Duration::from_secs(30), |l| {
            parse_tick(l).filter(|&t| t >= stopped_at + 3)
        })
        .await
        .unwrap();
    }
    assert_eq!(logs[1].ticks().last().copied().unwrap(), stopped_at);
    for log in &logs {
        assert!(log.mismatches().is_empty(), "{}", log.tail(20));
    }
    // Dropped: no QEMU, no files.
    let dirs: Vec<PathBuf> = forks.iter().map(dir_of).collect();
    drop(forks);
    for d in &dirs {
        assert!(!d.exists(), "{} left", d.display());
        let p = processes_naming(&format!("{}/", d.display()));
        assert!(p.is_empty(), "{p:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_test_that_panics_leaves_no_qemu_and_no_files() {
    require_qemu!();
    init_logging();
    let g = std::sync::Arc::new(golden().await);
    let seen = std::sync::Arc::new(std::sync::Mutex::new(None));
    let (g2, seen2) = (g.clone(), seen.clone());
    let task = tokio::spawn(async move {
        let f = g2.fork().await.unwrap();
        first_tick(&f).await;
        // The test also made a clone of its fork, which stands on the fork's files.
        let vm = f.vm();
        vm.create_snapshot(vm.create_options(SnapshotName::new("s").unwrap()))
            .await
            .unwrap();
        let name = VmName::new(&format!("{}x", vm.name())).unwrap();
        vm.clone_snapshot(&SnapshotName::new("s").unwrap(), &name, &Default::default())
            .await
            .unwrap();
        *seen2.lock().unwrap() = Some(vec![dir_of(&f), vm.store().vm_dir(&name)]);
        panic!("a failing test, its fork and the fork's clone still running");
    });
    assert!(task.await.unwrap_err().is_panic());
    let dirs = seen.lock().unwrap().clone().unwrap();
    for dir in dirs {
        assert!(!dir.exists(), "{} left", dir.display());
        let p = processes_naming(&format!("{}/", dir.display()));
        assert!(p.is_empty(), "{p:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reset_brings_a_fork_back_to_the_golden_instant() {
    require_qemu!();
    init_logging();
    let g = golden().await;
    let mut f = g.fork().await.unwrap();
    let (log, first) = first_tick(&f).await;
    log.wait_from(0, Duration::from_secs(30), |l| {
        parse_tick(l).filter(|&t| t >= first + 3)
    })
    .await
    .unwrap();
    let q = f.qmp().await.unwrap();
    disk_io::write(&q, &Disk::Device("vd0".into()), 0x33, 8192, 64).await;
    drop(q);
    f.reset().await.unwrap();
    let (_, again) = first_tick(&f).await;
    assert_eq!(again, first, "reset resumed elsewhere");
    let q = f.qmp().await.unwrap();
    assert!(
        disk_io::check(&q, &Disk::Device("vd0".into()), 0x33, 8192, 64)
            .await
            .is_err()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_process_killed_without_destructors_leaves_nothing_behind() {
    require_qemu!();
    init_logging();
    // The example binary, built next to this test by cargo.
    let exe = std::env::current_exe().unwrap();
    let example = exe
        .parent()
        .and_then(Path::parent)
        .map(|d| d.join("examples/harness"))
        .unwrap();
    assert!(
        example.exists(),
        "{} is missing: `cargo test` builds the examples",
        example.display()
    );
    let out = tokio::time::timeout(
        Duration::from_secs(240),
        tokio::process::Command::new(&example)
            .arg("2")
            .env(
                "QSNAP_HARNESS_CACHE",
                PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("golden"),
            )
            .env("QSNAP_HARNESS_ABORT", "1")
            .output(),
    )
    .await
    .expect("the example hung")
    .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(!out.status.success(), "it was to abort: {text}");
    let dirs: Vec<PathBuf> = text
        .lines()
        .filter_map(|l| l.strip_prefix("fork dir: "))
        .map(PathBuf::from)
        .collect();
    assert_eq!(
        dirs.len(),
        2,
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The watchdog notices within half a second; give it a few.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let left: Vec<&PathBuf> = dirs
            .iter()
            .filter(|d| d.exists() || !processes_naming(&format!("{}/", d.display())).is_empty())
            .collect();
        if left.is_empty() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "left behind after the process died: {left:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The golden itself stays, for the next process.
    assert!(golden().await.dir().join("complete").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forks_claim_standbys_of_the_pool_and_the_pool_refills_behind_them() {
    require_qemu!();
    init_logging();
    // A golden of its own (not the shared cached one): its standbys are this test's alone.
    let argv = qsnap_testkit::VmBuilder::guest()
        .disk(
            "{dir}/disk.qcow2",
            "qcow2",
            qsnap_testkit::DiskStyle::Blockdev,
        )
        .command_line(Path::new("{dir}/console.log"))
        .await;
    let g = qsnap_harness::Golden::boot(argv)
        .disk("disk.qcow2", 64 << 20)
        .ready_when(qsnap_harness::console_prints("tick 3"))
        .snapshot("ready")
        .await
        .unwrap();
    let dir = g.dir().to_owned();
    let pool = g.pool(2).await.unwrap();
    assert_eq!(pool.ready.len(), 2, "{pool:?}");
    let a = g.fork().await.unwrap();
    let mut b = g.fork().await.unwrap();
    let (sa, sb) = (
        a.report().standby.clone().unwrap(),
        b.report().standby.clone().unwrap(),
    );
    assert_ne!(sa, sb);
    assert!(
        pool.ready.contains(&sa) && pool.ready.contains(&sb),
        "{pool:?}"
    );
    // Both at the golden instant; then apart (each disk holds only its own write).
    let (_, first) = first_tick(&a).await;
    assert_eq!(first_tick(&b).await.1, first);
    let vd0 = Disk::Device("vd0".into());
    for (f, pattern) in [(&a, 0x51), (&b, 0x52)] {
        let q = f.qmp().await.unwrap();
        disk_io::write(&q, &vd0, pattern, 4096, 64).await;
    }
    for (f, pattern, other) in [(&a, 0x51, 0x52), (&b, 0x52, 0x51)] {
        let q = f.qmp().await.unwrap();
        disk_io::check(&q, &vd0, pattern, 4096, 64).await.unwrap();
        assert!(disk_io::check(&q, &vd0, other, 4096, 64).await.is_err());
    }
    // The pool refills in the background, without either fork waiting for it.
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    loop {
        let pools = g.vm().pools().await.unwrap();
        let ready: Vec<&String> = pools[0]
            .standbys
            .iter()
            .filter(|s| **s != sa && **s != sb)
            .collect();
        if ready.len() == 2 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the pool did not refill: {pools:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The refill made them, not the call below (which finds the pool full).
    assert!(g.pool(2).await.unwrap().made.is_empty());
    // A reset swaps in a fresh standby, back at the golden instant.
    b.reset().await.unwrap();
    let fresh = b.report().standby.clone().unwrap();
    assert_ne!(fresh, sb);
    assert_eq!(first_tick(&b).await.1, first);
    // Nothing is left once all is dropped: no QEMU of the golden's store.
    drop(a);
    drop(b);
    drop(g);
    let left = processes_naming(&format!("{}/", dir.display()));
    assert!(left.is_empty(), "{left:?}");
    assert!(!dir.exists(), "{} left", dir.display());
}
