//! Scale figures on this machine: what restored VMs cost in memory, and how snapshots of many
//! VMs at once compare with taking them one after another.
//!
//! 1. **Memory of restored VMs.** Boots the test guest (TCG, 512 MiB, idle) under `Engine::run`,
//!    takes snapshot `s1` and stops the VM. Then restores `s1` with the two-step API
//!    ([`revert::prepare`] into a directory of its own → a QEMU started here on the new
//!    overlays with `-incoming defer` → [`revert::restore`]) into 1 QEMU, then into 8 at once:
//!    first eagerly (the whole memory stream is loaded), then — after [`Vm::make_lazy`] — lazily
//!    (each QEMU maps the snapshot's RAM image private and copy-on-write, with
//!    `PreparedRevert::ram`'s arguments). Each restore is timed from `prepare` until `restore`
//!    returned and until the guest's console prints its first tick; once every guest has ticked
//!    twice more, each QEMU's PSS and RSS are read from `/proc/PID/smaps_rollup` (and, from
//!    `/proc/PID/smaps`, how much of it is the guest RAM mapping and the TCG translation
//!    buffer). Reports the PSS of one, the total PSS of 8, their ratio, the wall time until all
//!    8 ticked, and whether "8 QEMUs restored lazily from one snapshot use ≤ 2× the memory of
//!    one" holds.
//! 2. **Scale.** Boots 8 test guests (TCG, 256 MiB, idle, each under its own `Engine` and
//!    store) in parallel, then snapshots all 8 one at a time and all 8 concurrently: the wall
//!    time of each, the guest pause of every snapshot (`snapshot.pause_ms` from its manifest)
//!    and the speed-up.
//!
//! ```text
//! cargo run --release -p qsnap-engine --example bench_scale -- [--json OUT] [--vms N]
//! ```
//! Prints a table (and with `--json` writes the figures: median, min and max where a figure was
//! measured several times). Asserts nothing (the tests assert behaviour, this measures it).
//! Every file of a run — stores, images, the restored QEMUs' own directories (`TMPDIR` points
//! into it) — lives in one temp dir removed at the end; every wait is bounded; every QEMU is
//! killed on the way out, on error too (drop guards).

use qsnap_engine::snapshot::revert::{self, PreparedRevert};
use qsnap_engine::store::CreateReport;
use qsnap_engine::{Engine, RunOptions, SnapshotName, Store, Vm, VmName};
use qsnap_testkit::serial::{parse_tick, SerialLog};
use qsnap_testkit::{create_image, DiskStyle, KillRecordedQemu, VmBuilder};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tokio::task::JoinSet;

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type Res<T> = Result<T, BoxError>;

/// Guest RAM of the memory measurements (MiB).
const RESTORE_MIB: u32 = 512;
/// Guest RAM of the scale measurements (MiB).
const SCALE_MIB: u32 = 256;
/// A boot: from `Engine::run` until the guest printed `tick 3` (several boot at once on 2 cores).
const BOOT_TIMEOUT: Duration = Duration::from_secs(300);
/// Loading a memory file into a fresh QEMU (8 at once on 2 cores).
const RESTORE_TIMEOUT: Duration = Duration::from_secs(300);
/// A restored guest's next tick.
const TICK_TIMEOUT: Duration = Duration::from_secs(180);
/// Ticks a restored guest prints after its first before its memory is read.
const SETTLE_TICKS: u64 = 2;

fn ms_since(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e3
}

fn mib(kb: f64) -> f64 {
    kb / 1024.0
}

// ---------------------------------------------------------------- figures

/// min, median, max (`None` when empty).
fn spread(values: &[f64]) -> Option<(f64, f64, f64)> {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n == 0 {
        return None;
    }
    let median = if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    };
    Some((v[0], median, v[n - 1]))
}

/// One value as it is, several as `median (min–max)`.
fn cell(values: &[f64]) -> String {
    match (values, spread(values)) {
        ([one], _) => format!("{one:.1}"),
        (_, Some((min, median, max))) => format!("{median:.1} ({min:.1}–{max:.1})"),
        (_, None) => "-".into(),
    }
}

/// One value as a number, several as `{median, min, max, n, values}`.
fn figure(values: &[f64]) -> Value {
    match (values, spread(values)) {
        ([one], _) => json!(one),
        (_, Some((min, median, max))) => json!({
            "median": median, "min": min, "max": max, "n": values.len(), "values": values,
        }),
        (_, None) => Value::Null,
    }
}

fn row(label: &str, cells: &[String]) {
    print!("{label:<46}");
    for c in cells {
        print!(" {c:>26}");
    }
    println!();
}

// ---------------------------------------------------------------- process memory

/// A process's memory, in kB: totals from `/proc/PID/smaps_rollup`, and from
/// `/proc/PID/smaps` the two big mappings of a TCG QEMU — the guest's RAM (the one mapping of
/// exactly its size: anonymous when eager, the RAM image when lazy) and the TCG translation
/// buffer (the big anonymous executable one).
#[derive(Debug, Clone, Copy, Default)]
struct ProcMem {
    rss: f64,
    pss: f64,
    pss_anon: f64,
    pss_file: f64,
    /// PSS of the guest RAM mapping.
    ram_pss: f64,
    /// Its anonymous pages: loaded (eager) or written since the restore (lazy, copy-on-write).
    ram_anon: f64,
    /// PSS of the TCG translation buffer.
    tcg_pss: f64,
}

/// The key and kB figure of a `Key:   123 kB` line.
fn kb_field(line: &str) -> Option<(&str, f64)> {
    let mut words = line.split_whitespace();
    let key = words.next()?;
    let kb = words.next()?.parse().ok()?;
    Some((key, kb))
}

fn proc_mem(pid: i32, ram_kb: f64) -> Res<ProcMem> {
    let read = |what: &str| {
        let path = format!("/proc/{pid}/{what}");
        std::fs::read_to_string(&path).map_err(|e| format!("reading {path}: {e} (QEMU gone?)"))
    };
    let mut m = ProcMem::default();
    for (key, kb) in read("smaps_rollup")?.lines().filter_map(kb_field) {
        match key {
            "Rss:" => m.rss += kb,
            "Pss:" => m.pss += kb,
            "Pss_Anon:" => m.pss_anon += kb,
            "Pss_File:" => m.pss_file += kb,
            _ => {}
        }
    }
    #[derive(PartialEq)]
    enum Kind {
        Ram,
        Tcg,
        Other,
    }
    let (mut kind, mut anon_exec) = (Kind::Other, false);
    for line in read("smaps")?.lines() {
        let mut words = line.split_whitespace();
        let first = words.next().unwrap_or("");
        if first.contains('-') && first.chars().all(|c| c == '-' || c.is_ascii_hexdigit()) {
            // A mapping's header: range, perms, offset, device, inode, [path].
            let perms = words.next().unwrap_or("");
            let path = words.nth(3);
            anon_exec = perms.contains('x') && path.is_none();
            kind = Kind::Other;
            continue;
        }
        match kb_field(line) {
            Some(("Size:", kb)) if kb == ram_kb => kind = Kind::Ram,
            Some(("Size:", kb)) if anon_exec && kb >= 64.0 * 1024.0 => kind = Kind::Tcg,
            Some(("Pss:", kb)) if kind == Kind::Ram => m.ram_pss += kb,
            Some(("Anonymous:", kb)) if kind == Kind::Ram => m.ram_anon += kb,
            Some(("Pss:", kb)) if kind == Kind::Tcg => m.tcg_pss += kb,
            _ => {}
        }
    }
    Ok(m)
}

// ---------------------------------------------------------------- 1. restored VMs

/// A QEMU restored from a snapshot by this bench (killed when dropped).
struct Restored {
    vm: qsnap_testkit::Vm,
    prepared: PreparedRevert,
    /// `prepare` → `restore` returned.
    restore_ms: f64,
    /// Of which `prepare` checking the memory file.
    verify_ms: f64,
    /// `prepare` → the first tick on its console.
    tick_ms: f64,
    tick_at: Instant,
    first_tick: u64,
}

/// The two-step revert into a QEMU of our own: prepare (new overlays in `dir`), start QEMU on
/// them with `-incoming defer` (and the lazy RAM mapping, if the snapshot has one), restore,
/// then wait for the guest's first tick.
async fn restore_one(snapshot: String, report: CreateReport, dir: PathBuf) -> Res<Restored> {
    let started = Instant::now();
    tokio::fs::create_dir_all(&dir).await?;
    let prepared = revert::prepare(&snapshot, &report, Some(&dir)).await?;
    let mut builder = VmBuilder::guest().memory(RESTORE_MIB);
    for d in &prepared.disks {
        builder = builder.disk(&d.overlay, "qcow2", DiskStyle::Blockdev);
    }
    builder = builder.args(["-incoming", "defer"]);
    if let Some(ram) = &prepared.ram {
        // (The guest's RAM is `-m`: the mapping's arguments are appended.)
        builder = builder.args(ram.apply(&[]).map_err(std::io::Error::other)?);
    }
    let vm = match builder.try_spawn().await {
        Ok(vm) => vm,
        Err(report) => {
            revert::discard(&prepared).await;
            return Err(report.into());
        }
    };
    let restored = {
        let qmp = vm.qmp().await;
        revert::restore(&qmp, &prepared, true, RESTORE_TIMEOUT).await
    };
    if let Err(e) = restored {
        return Err(format!("restoring {snapshot}: {e}\n{}", vm.report()).into());
    }
    let restore_ms = ms_since(started);
    let (idx, first_tick) = vm
        .serial
        .wait_tick_from(0, TICK_TIMEOUT)
        .await
        .map_err(|e| format!("no tick after restoring {snapshot}: {e}\n{}", vm.report()))?;
    let tick_at = vm.serial.lines()[idx].at;
    Ok(Restored {
        restore_ms,
        verify_ms: prepared.verify_ms,
        tick_ms: tick_at.duration_since(started).as_secs_f64() * 1e3,
        tick_at,
        first_tick,
        vm,
        prepared,
    })
}

/// What `count` QEMUs restored at once from one snapshot cost.
struct RestoreSet {
    restore_ms: Vec<f64>,
    verify_ms: Vec<f64>,
    tick_ms: Vec<f64>,
    /// Start → the last of them printed its first tick.
    wall_ms: f64,
    mem: Vec<ProcMem>,
}

impl RestoreSet {
    fn of(&self, f: impl Fn(&ProcMem) -> f64) -> Vec<f64> {
        self.mem.iter().map(f).collect()
    }

    fn total_pss(&self) -> f64 {
        self.mem.iter().map(|m| m.pss).sum()
    }

    fn json(&self) -> Value {
        json!({
            "qemus": self.mem.len(),
            "restore_ms": figure(&self.restore_ms),
            "memory_file_check_ms": figure(&self.verify_ms),
            "first_tick_ms": figure(&self.tick_ms),
            "wall_until_all_tick_ms": self.wall_ms,
            "pss_kb": figure(&self.of(|m| m.pss)),
            "pss_anon_kb": figure(&self.of(|m| m.pss_anon)),
            "pss_file_kb": figure(&self.of(|m| m.pss_file)),
            "rss_kb": figure(&self.of(|m| m.rss)),
            "guest_ram_pss_kb": figure(&self.of(|m| m.ram_pss)),
            "guest_ram_private_kb": figure(&self.of(|m| m.ram_anon)),
            "tcg_buffer_pss_kb": figure(&self.of(|m| m.tcg_pss)),
            "total_pss_kb": self.total_pss(),
        })
    }
}

/// Restores `count` QEMUs from `snapshot` concurrently (each with its own overlay directory
/// under `dir`), lets each tick [`SETTLE_TICKS`] more times, reads their memory, kills them.
async fn restore_set(
    snapshot: &str,
    report: &CreateReport,
    count: usize,
    dir: &Path,
) -> Res<RestoreSet> {
    let started = Instant::now();
    let mut set = JoinSet::new();
    for i in 0..count {
        set.spawn(restore_one(
            snapshot.to_owned(),
            report.clone(),
            dir.join(format!("r{i}")),
        ));
    }
    let mut restored = Vec::new();
    let mut failed: Option<BoxError> = None;
    while let Some(joined) = set.join_next().await {
        match joined {
            Ok(Ok(r)) => restored.push(r),
            Ok(Err(e)) => {
                failed.get_or_insert(e);
            }
            Err(e) => {
                failed.get_or_insert(format!("a restore task failed: {e}").into());
            }
        }
    }
    let measured = async {
        if let Some(e) = failed {
            return Err(e);
        }
        let wall_ms = restored
            .iter()
            .map(|r| r.tick_at.duration_since(started).as_secs_f64() * 1e3)
            .fold(0.0, f64::max);
        for r in &restored {
            let above = r.first_tick + SETTLE_TICKS - 1;
            r.vm.serial
                .wait_from(0, TICK_TIMEOUT, |l| parse_tick(l).filter(|&n| n > above))
                .await
                .map_err(|e| format!("restored guest stopped ticking: {e}\n{}", r.vm.report()))?;
        }
        let mut mem = Vec::new();
        for r in &restored {
            mem.push(proc_mem(
                r.vm.pid().as_raw(),
                f64::from(RESTORE_MIB) * 1024.0,
            )?);
        }
        Ok(RestoreSet {
            restore_ms: restored.iter().map(|r| r.restore_ms).collect(),
            verify_ms: restored.iter().map(|r| r.verify_ms).collect(),
            tick_ms: restored.iter().map(|r| r.tick_ms).collect(),
            wall_ms,
            mem,
        })
    }
    .await;
    for mut r in restored {
        r.vm.kill().await;
        revert::discard(&r.prepared).await;
    }
    measured
}

struct MemoryFigures {
    stream_bytes: u64,
    eager: (RestoreSet, RestoreSet),
    lazy: (RestoreSet, RestoreSet),
    lazy_ms: f64,
    image_allocated: u64,
}

async fn measure_memory(root: &Path, count: usize) -> Res<MemoryFigures> {
    let dir = root.join("memory");
    tokio::fs::create_dir_all(&dir).await?;
    let disk = dir.join("disk.qcow2");
    create_image(&disk, "qcow2", "64M").await;
    let serial = dir.join("serial.log");
    let argv = VmBuilder::guest()
        .memory(RESTORE_MIB)
        .disk(&disk, "qcow2", DiskStyle::Blockdev)
        .command_line(&serial)
        .await;
    let store = dir.join("store");
    let _kill = KillRecordedQemu::new(&store, "src");
    let engine = Engine::new(Store::new(&store));
    let name = VmName::new("src")?;
    engine.run(&name, argv, &RunOptions::default()).await?;
    let vm = engine.vm(&name).await?;
    SerialLog::follow(&serial)
        .wait_from(0, BOOT_TIMEOUT, |l| parse_tick(l).filter(|&n| n >= 3))
        .await?;
    let s1 = SnapshotName::new("s1")?;
    let m = vm.create_snapshot(vm.create_options(s1.clone())).await?;
    let stream_bytes = m.snapshot.memory.as_ref().map_or(0, |mem| mem.bytes);
    // The source's vCPU would compete with the restored ones for the 2 cores.
    vm.stop().await?;

    eprintln!("restoring s1 eagerly into 1, then {count} QEMUs …");
    let one = restore_set("s1", &m.snapshot, 1, &dir.join("eager-1")).await?;
    let many = restore_set("s1", &m.snapshot, count, &dir.join("eager-n")).await?;
    let eager = (one, many);

    let lazy = vm.make_lazy(&s1).await?;
    let m = vm.snapshot(&s1).await?;
    eprintln!("restoring s1 lazily into 1, then {count} QEMUs …");
    let one = restore_set("s1", &m.snapshot, 1, &dir.join("lazy-1")).await?;
    let many = restore_set("s1", &m.snapshot, count, &dir.join("lazy-n")).await?;
    Ok(MemoryFigures {
        stream_bytes,
        eager,
        lazy: (one, many),
        lazy_ms: lazy.total_ms,
        image_allocated: lazy.image_allocated,
    })
}

// ---------------------------------------------------------------- 2. scale

/// Boots test guest `i` under an engine and store of its own in `dir`.
async fn boot(dir: PathBuf, i: usize) -> Res<Vm> {
    tokio::fs::create_dir_all(&dir).await?;
    let disk = dir.join("disk.qcow2");
    create_image(&disk, "qcow2", "64M").await;
    let serial = dir.join("serial.log");
    let argv = VmBuilder::guest()
        .memory(SCALE_MIB)
        .disk(&disk, "qcow2", DiskStyle::Blockdev)
        .command_line(&serial)
        .await;
    let engine = Engine::new(Store::new(dir.join("store")));
    let name = VmName::new(&format!("v{i}"))?;
    engine.run(&name, argv, &RunOptions::default()).await?;
    SerialLog::follow(&serial)
        .wait_from(0, BOOT_TIMEOUT, |l| parse_tick(l).filter(|&n| n >= 3))
        .await
        .map_err(|e| format!("VM v{i} did not boot: {e}"))?;
    Ok(engine.vm(&name).await?)
}

/// (pause_ms, total_ms) of one snapshot.
async fn snap(vm: Vm, name: &'static str) -> Res<(f64, f64)> {
    let m = vm
        .create_snapshot(vm.create_options(SnapshotName::new(name)?))
        .await?;
    Ok((m.snapshot.pause_ms, m.snapshot.total_ms))
}

struct Batch {
    wall_ms: f64,
    pause_ms: Vec<f64>,
    total_ms: Vec<f64>,
}

impl Batch {
    fn json(&self) -> Value {
        json!({
            "wall_ms": self.wall_ms,
            "pause_ms": figure(&self.pause_ms),
            "total_ms": figure(&self.total_ms),
        })
    }
}

struct ScaleFigures {
    boot_wall_ms: f64,
    sequential: Batch,
    concurrent: Batch,
}

async fn measure_scale(root: &Path, count: usize) -> Res<ScaleFigures> {
    // Guards first: dropped last, they kill whatever QEMU each store still records.
    let dirs: Vec<PathBuf> = (0..count)
        .map(|i| root.join("scale").join(format!("vm{i}")))
        .collect();
    let _kill: Vec<KillRecordedQemu> = dirs
        .iter()
        .enumerate()
        .map(|(i, d)| KillRecordedQemu::new(&d.join("store"), &format!("v{i}")))
        .collect();

    eprintln!("booting {count} VMs in parallel …");
    let started = Instant::now();
    let mut set = JoinSet::new();
    for (i, d) in dirs.iter().enumerate() {
        let d = d.clone();
        set.spawn(async move { (i, boot(d, i).await) });
    }
    // Every boot finishes (each wait is bounded) before a failure returns: no QEMU is being
    // launched while the guards kill the recorded ones.
    let mut vms: Vec<Option<Vm>> = vec![None; count];
    let mut failed: Option<BoxError> = None;
    while let Some(joined) = set.join_next().await {
        match joined {
            Ok((i, Ok(vm))) => vms[i] = Some(vm),
            Ok((_, Err(e))) => {
                failed.get_or_insert(e);
            }
            Err(e) => {
                failed.get_or_insert(format!("a boot task failed: {e}").into());
            }
        }
    }
    let boot_wall_ms = ms_since(started);
    let vms: Vec<Vm> = vms.into_iter().flatten().collect();
    if let Some(e) = failed {
        for vm in &vms {
            let _ = vm.stop().await;
        }
        return Err(e);
    }

    let measured = async {
        eprintln!("snapshotting {count} VMs one at a time …");
        let started = Instant::now();
        let (mut pause_ms, mut total_ms) = (Vec::new(), Vec::new());
        for vm in &vms {
            let (p, t) = snap(vm.clone(), "seq").await?;
            pause_ms.push(p);
            total_ms.push(t);
        }
        let sequential = Batch {
            wall_ms: ms_since(started),
            pause_ms,
            total_ms,
        };

        eprintln!("snapshotting {count} VMs concurrently …");
        let started = Instant::now();
        let mut set = JoinSet::new();
        for vm in &vms {
            set.spawn(snap(vm.clone(), "conc"));
        }
        let (mut pause_ms, mut total_ms) = (Vec::new(), Vec::new());
        while let Some(joined) = set.join_next().await {
            let (p, t) = joined??;
            pause_ms.push(p);
            total_ms.push(t);
        }
        let concurrent = Batch {
            wall_ms: ms_since(started),
            pause_ms,
            total_ms,
        };
        Ok::<_, BoxError>(ScaleFigures {
            boot_wall_ms,
            sequential,
            concurrent,
        })
    }
    .await;
    for vm in &vms {
        if let Err(e) = vm.stop().await {
            eprintln!("stopping {}: {e} (the drop guard kills it)", vm.name());
        }
    }
    measured
}

// ---------------------------------------------------------------- main

struct Args {
    json: Option<PathBuf>,
    vms: usize,
}

fn parse_args() -> Res<Args> {
    let mut args = Args { json: None, vms: 8 };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--json" => args.json = Some(it.next().ok_or("--json needs a file")?.into()),
            "--vms" => args.vms = it.next().ok_or("--vms needs a number")?.parse()?,
            other => {
                return Err(format!(
                    "unknown argument {other}; usage: bench_scale [--json OUT] [--vms N]"
                )
                .into())
            }
        }
    }
    if args.vms < 1 {
        return Err("--vms must be at least 1".into());
    }
    Ok(args)
}

fn qemu_version() -> String {
    std::process::Command::new(qsnap_testkit::qemu_binary())
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.lines().next().map(str::to_owned))
        .unwrap_or_else(|| "unknown QEMU".into())
}

fn print_memory(m: &MemoryFigures, count: usize) -> (f64, f64) {
    println!(
        "1. restored VMs: test guest, {RESTORE_MIB} MiB, idle; snapshot s1's memory stream {:.1} MiB",
        m.stream_bytes as f64 / 1048576.0
    );
    println!(
        "   (1 QEMU, then {count} restored at once; memory read once every guest ticked {SETTLE_TICKS} more times)\n"
    );
    row("", &["eager".into(), "lazy (mapped RAM image)".into()]);
    let n = count;
    let (eager, lazy) = (&m.eager, &m.lazy);
    let one = |label: &str, f: &dyn Fn(&RestoreSet) -> String| {
        row(label, &[f(&eager.0), f(&lazy.0)]);
    };
    let many = |label: &str, f: &dyn Fn(&RestoreSet) -> String| {
        row(label, &[f(&eager.1), f(&lazy.1)]);
    };
    let mem = |f: fn(&ProcMem) -> f64| {
        move |s: &RestoreSet| cell(&s.of(f).into_iter().map(mib).collect::<Vec<_>>())
    };
    one("1 QEMU: prepare → restore returned, ms", &|s| {
        cell(&s.restore_ms)
    });
    one("  of which memory-file check, ms", &|s| cell(&s.verify_ms));
    one("1 QEMU: prepare → first tick, ms", &|s| cell(&s.tick_ms));
    one("1 QEMU: PSS, MiB", &mem(|m| m.pss));
    one("  of which anonymous, MiB", &mem(|m| m.pss_anon));
    one("  of which file-backed, MiB", &mem(|m| m.pss_file));
    one("  guest RAM mapping, MiB", &mem(|m| m.ram_pss));
    one("    its private pages, MiB", &mem(|m| m.ram_anon));
    one("  TCG translation buffer, MiB", &mem(|m| m.tcg_pss));
    one("1 QEMU: RSS, MiB", &mem(|m| m.rss));
    many(
        &format!("{n} QEMUs: prepare → restore returned, ms"),
        &|s| cell(&s.restore_ms),
    );
    many("  of which memory-file check, ms", &|s| cell(&s.verify_ms));
    many(&format!("{n} QEMUs: prepare → first tick, ms"), &|s| {
        cell(&s.tick_ms)
    });
    many(&format!("{n} QEMUs: wall until all ticked, ms"), &|s| {
        format!("{:.1}", s.wall_ms)
    });
    many(&format!("{n} QEMUs: PSS per QEMU, MiB"), &mem(|m| m.pss));
    many("  of which anonymous, MiB", &mem(|m| m.pss_anon));
    many("  of which file-backed, MiB", &mem(|m| m.pss_file));
    many("  guest RAM mapping, MiB", &mem(|m| m.ram_pss));
    many("    its private pages, MiB", &mem(|m| m.ram_anon));
    many("  TCG translation buffer, MiB", &mem(|m| m.tcg_pss));
    many(&format!("{n} QEMUs: RSS per QEMU, MiB"), &mem(|m| m.rss));
    many(&format!("{n} QEMUs: total PSS, MiB"), &|s| {
        format!("{:.1}", mib(s.total_pss()))
    });
    let ratio = |p: &(RestoreSet, RestoreSet)| p.1.total_pss() / p.0.total_pss();
    let (eager_ratio, lazy_ratio) = (ratio(eager), ratio(lazy));
    row(
        &format!("ratio total PSS({n}) / PSS(1)"),
        &[format!("{eager_ratio:.2}"), format!("{lazy_ratio:.2}")],
    );
    println!(
        "\nmake_lazy s1: {:.0} ms; RAM image {RESTORE_MIB} MiB, {:.1} MiB allocated",
        m.lazy_ms,
        m.image_allocated as f64 / 1048576.0
    );
    (eager_ratio, lazy_ratio)
}

fn print_scale(s: &ScaleFigures, count: usize) -> f64 {
    println!("\n2. scale: {count} test guests, {SCALE_MIB} MiB, idle, each under its own engine and store\n");
    println!(
        "{:<46} {:>26}",
        format!("boot {count} in parallel, until all tick 3, s"),
        format!("{:.1}", s.boot_wall_ms / 1e3)
    );
    row("", &["one at a time".into(), "concurrently".into()]);
    let both = |f: &dyn Fn(&Batch) -> String| [f(&s.sequential), f(&s.concurrent)];
    row(
        &format!("wall time for {count} snapshots, ms"),
        &both(&|b| format!("{:.1}", b.wall_ms)),
    );
    row("guest pause per VM, ms", &both(&|b| cell(&b.pause_ms)));
    row("snapshot total per VM, ms", &both(&|b| cell(&b.total_ms)));
    let speedup = s.sequential.wall_ms / s.concurrent.wall_ms;
    println!(
        "{:<46} {:>26}",
        "speed-up (one at a time / concurrently)",
        format!("{speedup:.2}×")
    );
    speedup
}

async fn run(root: &Path, args: &Args) -> Res<()> {
    let count = args.vms;
    println!(
        "qsnap bench_scale: {}, TCG, {} cores\n",
        qemu_version(),
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    let memory = measure_memory(root, count).await?;
    let (eager_ratio, lazy_ratio) = print_memory(&memory, count);
    let holds = lazy_ratio <= 2.0;
    println!(
        "target \"{count} QEMUs restored lazily from one snapshot use ≤ 2× the memory of one\": {} (ratio {lazy_ratio:.2})",
        if holds { "HOLDS" } else { "DOES NOT HOLD" }
    );

    let scale = measure_scale(root, count).await?;
    let speedup = print_scale(&scale, count);

    if let Some(out) = &args.json {
        let doc = json!({
            "qemu": qemu_version(),
            "cores": std::thread::available_parallelism().map_or(0, |n| n.get()),
            "memory": {
                "guest_mib": RESTORE_MIB,
                "stream_bytes": memory.stream_bytes,
                "settle_ticks": SETTLE_TICKS,
                "eager": {
                    "one": memory.eager.0.json(),
                    "many": memory.eager.1.json(),
                    "ratio": eager_ratio,
                },
                "lazy": {
                    "make_lazy_ms": memory.lazy_ms,
                    "image_allocated_bytes": memory.image_allocated,
                    "one": memory.lazy.0.json(),
                    "many": memory.lazy.1.json(),
                    "ratio": lazy_ratio,
                },
                "target": {
                    "claim": format!("{count} QEMUs restored lazily from one snapshot use <= 2x the memory of one"),
                    "ratio": lazy_ratio,
                    "holds": holds,
                },
            },
            "scale": {
                "vms": count,
                "guest_mib": SCALE_MIB,
                "boot_wall_ms": scale.boot_wall_ms,
                "sequential": scale.sequential.json(),
                "concurrent": scale.concurrent.json(),
                "speedup": speedup,
            },
        });
        std::fs::write(out, serde_json::to_string_pretty(&doc)? + "\n")?;
        println!("\nfigures written to {}", out.display());
    }
    Ok(())
}

fn main() -> Res<()> {
    let args = parse_args()?;
    // One directory for the whole run. The restored QEMUs' own directories (the testkit makes
    // them in TMPDIR) and the lazy-RAM helper's go in it too: set before any thread starts.
    let root = tempfile::Builder::new()
        .prefix("qsnap-bench-scale-")
        .tempdir()?;
    std::env::set_var("TMPDIR", root.path());
    qsnap_testkit::init_logging();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let started = Instant::now();
    let result = runtime.block_on(run(root.path(), &args));
    // Tasks still holding QEMUs (after an error) are dropped here, killing them.
    drop(runtime);
    eprintln!("bench_scale took {:.0} s", started.elapsed().as_secs_f64());
    result
}
