//! Speed figures on this machine: how long the guest is paused by a live snapshot (idle and
//! while it rewrites memory), how long a snapshot takes, how long a revert takes until the
//! guest runs again (and how much of it is checking the memory file), and how long deleting a
//! snapshot takes when 256 MiB of data must merge, live and offline; a revert to a snapshot
//! reverted to before (its checksum remembered), a lazy-RAM conversion and lazy reverts;
//! precopy in QEMU's mapped-ram format and in the plain stream; the same with libvirt's RAM
//! layout (a named memory backend). Boots the test guest
//! (TCG, 512 MiB like the libvirt yardstick in the README) under `Engine::run`.
//!
//! ```text
//! ./scripts/bench.sh            # or: cargo run --release -p qsnap-engine --example bench [ROUNDS]
//! ```
//! Prints a table; asserts nothing (the tests assert behaviour, this measures it).

use qsnap_engine::snapshot::Mode;
use qsnap_engine::{DeleteOptions, Engine, RunOptions, SnapshotName, Store, VmName};
use qsnap_testkit::disk_io::{write, Disk};
use qsnap_testkit::serial::{parse_tick, SerialLog};
use qsnap_testkit::{create_image, DiskStyle, VmBuilder};
use std::time::Duration;

struct Figures {
    label: String,
    values: Vec<f64>,
}

impl Figures {
    fn print(&self) {
        let mut v = self.values.clone();
        v.sort_by(f64::total_cmp);
        if v.is_empty() {
            return;
        }
        println!(
            "{:<46} min {:>7.1}  median {:>7.1}  max {:>7.1}  (n={})",
            self.label,
            v[0],
            v[v.len() / 2],
            v[v.len() - 1],
            v.len()
        );
    }
}

/// The test guest (512 MiB, a 64 MiB qcow2 disk, `extra` arguments) under `Engine::run`,
/// once its third tick is out; the directory holds the store and the files.
async fn boot(
    dirty_mb: u32,
    extra: &[&str],
) -> Result<(tempfile::TempDir, qsnap_engine::Vm), Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    let disk = dir.path().join("disk.qcow2");
    create_image(&disk, "qcow2", "64M").await;
    let serial = dir.path().join("serial.log");
    let argv = VmBuilder::guest()
        .memory(512)
        .dirty_mb(dirty_mb)
        .args(extra.iter().copied())
        .disk(&disk, "qcow2", DiskStyle::Blockdev)
        .command_line(&serial)
        .await;
    let engine = Engine::new(Store::new(dir.path().join("store")));
    let name = VmName::new("bench")?;
    engine.run(&name, argv, &RunOptions::default()).await?;
    let vm = engine.vm(&name).await?;
    SerialLog::follow(&serial)
        .wait_from(0, Duration::from_secs(120), |l| {
            parse_tick(l).filter(|&n| n >= 3)
        })
        .await?;
    Ok((dir, vm))
}

async fn measure(dirty_mb: u32, rounds: usize) -> Result<Vec<Figures>, Box<dyn std::error::Error>> {
    let (_dir, vm) = boot(dirty_mb, &[]).await?;

    let load = if dirty_mb > 0 {
        format!("guest rewriting {dirty_mb} MiB")
    } else {
        "idle guest".to_owned()
    };
    let mut pit_pause = Figures {
        label: format!("point-in-time pause, ms ({load})"),
        values: vec![],
    };
    let mut pit_total = Figures {
        label: format!("point-in-time snapshot total, ms ({load})"),
        values: vec![],
    };
    // Precopy in QEMU's mapped-ram format (the default) and in the plain stream, to keep
    // the one that wins: pause, snapshot total, and the eager revert's load.
    let fig = |what: &str, fmt: &str| Figures {
        label: format!("precopy {what}, {fmt}, ms ({load})"),
        values: vec![],
    };
    let mut pre = [("c", true), ("d", false)].map(|(prefix, mapped)| {
        let fmt = if mapped { "mapped-ram" } else { "stream" };
        (
            prefix,
            mapped,
            [
                fig("pause", fmt),
                fig("total", fmt),
                fig("revert load", fmt),
            ],
        )
    });
    let mut revert = Figures {
        label: format!("revert until running, ms ({load})"),
        values: vec![],
    };
    let mut verify = Figures {
        label: format!("  of which memory-file checksum, ms ({load})"),
        values: vec![],
    };
    for i in 0..rounds {
        let m = vm
            .create_snapshot(vm.create_options(SnapshotName::new(&format!("p{i}"))?))
            .await?;
        pit_pause.values.push(m.snapshot.pause_ms);
        pit_total.values.push(m.snapshot.total_ms);
        for (prefix, mapped, [pause, total, _]) in &mut pre {
            let mut opts = vm.create_options(SnapshotName::new(&format!("{prefix}{i}"))?);
            opts.mode = Some(Mode::Precopy);
            opts.mapped_ram = *mapped;
            let m = vm.create_snapshot(opts).await?;
            pause.values.push(m.snapshot.pause_ms);
            total.values.push(m.snapshot.total_ms);
        }
    }
    let mut again = Figures {
        label: format!("revert again (checksum remembered), ms ({load})"),
        values: vec![],
    };
    for i in 0..rounds {
        let snap = SnapshotName::new(&format!("p{i}"))?;
        let r = vm.revert(&snap, false).await?;
        revert.values.push(r.total_ms);
        verify.values.push(r.verify_ms);
        again.values.push(vm.revert(&snap, false).await?.total_ms);
        for (prefix, _, [_, _, load]) in &mut pre {
            let snap = SnapshotName::new(&format!("{prefix}{i}"))?;
            load.values.push(vm.revert(&snap, false).await?.load_ms);
        }
    }
    // Lazy RAM last: a lazily reverted VM takes only precopy snapshots.
    let mut convert = Figures {
        label: format!("lazy-ram conversion, ms ({load})"),
        values: vec![],
    };
    let mut lazy = Figures {
        label: format!("lazy revert until running, ms ({load})"),
        values: vec![],
    };
    let p0 = SnapshotName::new("p0")?;
    convert.values.push(vm.make_lazy(&p0).await?.total_ms);
    for _ in 0..rounds {
        lazy.values.push(vm.revert(&p0, false).await?.total_ms);
    }
    vm.stop().await?;
    let mut all = vec![pit_pause, pit_total, revert, verify, again, convert, lazy];
    all.extend(pre.into_iter().flat_map(|(_, _, f)| f));
    Ok(all)
}

/// Deleting the root snapshot when its child layer holds 256 MiB: the layer is committed
/// into the original image (a live block job, or qemu-img with the VM stopped).
async fn measure_delete(rounds: usize) -> Result<Vec<Figures>, Box<dyn std::error::Error>> {
    let mut live = Figures {
        label: "delete, 256 MiB layer merged live, ms".into(),
        values: vec![],
    };
    let mut offline = Figures {
        label: "delete, 256 MiB layer merged offline, ms".into(),
        values: vec![],
    };
    for i in 0..rounds * 2 {
        let stopped = i % 2 == 1;
        let dir = tempfile::tempdir()?;
        let disk = dir.path().join("disk.qcow2");
        let argv = VmBuilder::idle_with_disk(&disk, "512M", &dir.path().join("serial.log")).await;
        let engine = Engine::new(Store::new(dir.path().join("store")));
        let name = VmName::new("del")?;
        engine.run(&name, argv, &RunOptions::default()).await?;
        let vm = engine.vm(&name).await?;
        vm.create_snapshot(vm.create_options(SnapshotName::new("s1")?))
            .await?;
        {
            let qmp = vm.connect().await?;
            write(&qmp, &Disk::Device("vd0".into()), 0x5a, 0, 256 * 1024).await;
        }
        vm.create_snapshot(vm.create_options(SnapshotName::new("s2")?))
            .await?;
        if stopped {
            vm.stop().await?;
        }
        let r = vm
            .delete_snapshot(&SnapshotName::new("s1")?, &DeleteOptions::default())
            .await?;
        if stopped {
            offline.values.push(r.total_ms);
        } else {
            live.values.push(r.total_ms);
            vm.stop().await?;
        }
    }
    Ok(vec![live, offline])
}

/// libvirt's RAM layout (`-machine …,memory-backend=pc.ram` and a JSON `memory-backend-ram`,
/// what libvirt 11 writes), idle: the precopy pause, the eager revert, the lazy-RAM
/// conversion (a file backend stands in for the named one) and lazy reverts.
async fn measure_libvirt_ram(rounds: usize) -> Result<Vec<Figures>, Box<dyn std::error::Error>> {
    let (_dir, vm) = boot(
        0,
        &[
            "-machine",
            "pc,memory-backend=pc.ram",
            "-object",
            r#"{"qom-type":"memory-backend-ram","id":"pc.ram","size":536870912}"#,
        ],
    )
    .await?;
    let fig = |label: &str| Figures {
        label: format!("{label} (libvirt's RAM layout, idle)"),
        values: vec![],
    };
    let (mut pause, mut eager, mut convert, mut lazy) = (
        fig("precopy pause, ms"),
        fig("eager revert, ms"),
        fig("lazy-ram conversion, ms"),
        fig("lazy revert until running, ms"),
    );
    let s = SnapshotName::new("s")?;
    let mut opts = vm.create_options(s.clone());
    opts.mode = Some(Mode::Precopy);
    pause
        .values
        .push(vm.create_snapshot(opts).await?.snapshot.pause_ms);
    for i in 1..rounds {
        let mut opts = vm.create_options(SnapshotName::new(&format!("s{i}"))?);
        opts.mode = Some(Mode::Precopy);
        pause
            .values
            .push(vm.create_snapshot(opts).await?.snapshot.pause_ms);
    }
    for _ in 0..rounds {
        eager.values.push(vm.revert(&s, false).await?.total_ms);
    }
    convert.values.push(vm.make_lazy(&s).await?.total_ms);
    for _ in 0..rounds {
        lazy.values.push(vm.revert(&s, false).await?.total_ms);
    }
    vm.stop().await?;
    Ok(vec![pause, eager, convert, lazy])
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let rounds: usize = std::env::args()
        .nth(1)
        .map(|r| r.parse())
        .transpose()?
        .unwrap_or(5);
    println!("qsnap bench: test guest, 512 MiB, TCG, {rounds} rounds per figure\n");
    for dirty in [0, 64] {
        for f in measure(dirty, rounds).await? {
            f.print();
        }
    }
    for f in measure_delete(rounds.min(3)).await? {
        f.print();
    }
    for f in measure_libvirt_ram(rounds).await? {
        f.print();
    }
    println!("\nyardstick (README): libvirt 11.3 pauses 97 ms (279 ms busy), reverts in ~2 s, deletes a small active-chain layer in 0.05-0.11 s");
    Ok(())
}
