//! Clone figures (issues 11 and 22): how long from asking for a clone to the clone's first
//! console line, for 1, 4 and 8 clones of a 256 MiB test guest started at once, and how much
//! memory (PSS) each clone costs — cold (a QEMU started per clone) and from a pool of
//! standbys (`Golden::pool`: claimed, then refilled in the background); `qsnap clone` from the
//! CLI with and without a standby; the PSS of an idle standby; and a sustained "fork, wait for
//! a console line, drop" loop on two workers, in forks per second by pool size. Built on the
//! harness API, as a test suite would use it. Asserts nothing.
//!
//! ```text
//! ./scripts/bench.sh --only clone   # or: cargo run --release -p qsnap-harness --example bench_clone [--json FILE] [--qsnap BIN]
//! ```

use qsnap_harness::{console_prints, Fork, Golden};
use qsnap_testkit::{DiskStyle, VmBuilder};
use serde_json::json;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

type Res<T> = Result<T, Box<dyn std::error::Error>>;

/// Waits (bounded) for the first `tick` line in a fork's console.
async fn first_line(f: &Fork) -> Res<()> {
    let console = f.console().ok_or("no console")?.to_owned();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let text = tokio::fs::read_to_string(&console)
            .await
            .unwrap_or_default();
        if text.lines().any(|l| l.trim().starts_with("tick ")) {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!("{} printed no tick within 120 s", f.vm().name()).into());
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// PSS of a process, MiB.
fn pss_mib(pid: u32) -> Res<f64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))?;
    let kb: f64 = text
        .lines()
        .find_map(|l| l.strip_prefix("Pss:"))
        .and_then(|v| v.split_whitespace().next())
        .ok_or("no Pss line")?
        .parse()?;
    Ok(kb / 1024.0)
}

/// The figures with a pool of standbys.
async fn pool_figures(golden: &Golden, qsnap: Option<&Path>) -> Res<serde_json::Value> {
    println!(
        "\nfrom a pool of standbys (Golden::pool; refilled in the background after each claim)"
    );
    let t = Instant::now();
    golden.pool(8).await?;
    let fill_s = t.elapsed().as_secs_f64();
    // An idle standby's memory: its guest never ran.
    let mut pss = Vec::new();
    for p in golden.vm().pools().await? {
        for sb in &p.standbys {
            let vm = golden
                .vm()
                .engine()
                .vm(&qsnap_engine::VmName::new(sb)?)
                .await?;
            if let Some(pid) = vm.status().await?.pid {
                pss.push(pss_mib(pid)?);
            }
        }
    }
    let standby_pss = median(&mut pss);
    println!("pool of 8 made in {fill_s:.1} s; PSS of an idle standby (median of {}): {standby_pss:.1} MiB", pss.len());
    println!(
        "{:<10} {:>22} {:>22} {:>28}",
        "forks", "fork() ms, med / max", "running after, ms", "first console line, med / max"
    );
    let mut rows = Vec::new();
    for n in [1usize, 4, 8] {
        golden.pool(8).await?; // full again (waits for the refill's standbys)
        let started = Instant::now();
        let forks = futures::future::join_all((0..n).map(|_| async {
            let t = Instant::now();
            let f = golden.fork().await?;
            let fork_ms = t.elapsed().as_secs_f64() * 1e3;
            let running_ms = started.elapsed().as_secs_f64() * 1e3;
            first_line(&f).await?;
            Ok::<_, Box<dyn std::error::Error>>((
                f,
                fork_ms,
                running_ms,
                t.elapsed().as_secs_f64() * 1e3,
            ))
        }))
        .await
        .into_iter()
        .collect::<Res<Vec<_>>>()?;
        let claimed = forks
            .iter()
            .filter(|f| f.0.report().standby.is_some())
            .count();
        let mut fork_ms: Vec<f64> = forks.iter().map(|f| f.1).collect();
        let all_running = forks.iter().map(|f| f.2).fold(0.0, f64::max);
        let mut first: Vec<f64> = forks.iter().map(|f| f.3).collect();
        let (fm, fx) = (median(&mut fork_ms), fork_ms[fork_ms.len() - 1]);
        let (lm, lx) = (median(&mut first), first[first.len() - 1]);
        println!(
            "{n:<10} {:>22} {:>22} {:>28}   ({claimed} of {n} from standbys)",
            format!("{fm:.1} / {fx:.1}"),
            format!("{all_running:.0}"),
            format!("{lm:.0} / {lx:.0}")
        );
        rows.push(json!({
            "forks": n, "from_standbys": claimed, "fork_ms_median": fm, "fork_ms_max": fx,
            "all_running_ms": all_running, "first_line_ms_median": lm, "first_line_ms_max": lx,
        }));
        drop(forks);
    }
    let cli = match qsnap {
        Some(bin) => cli_figures(golden, bin).await?,
        None => {
            println!("\n(no --qsnap BIN: the CLI's figures are not measured)");
            serde_json::Value::Null
        }
    };
    // Sustained: two workers, each forking, waiting for a console line, dropping, for 15 s.
    println!("\nsustained, 2 workers, 15 s each: fork → first console line → drop");
    let mut sustained = Vec::new();
    for size in [0usize, 1, 2, 4] {
        golden.pool(size).await?;
        let until = Instant::now() + Duration::from_secs(15);
        let counts = futures::future::join_all((0..2).map(|_| async {
            let mut done = 0u32;
            while Instant::now() < until {
                let f = golden.fork().await?;
                first_line(&f).await?;
                drop(f);
                done += 1;
            }
            Ok::<_, Box<dyn std::error::Error>>(done)
        }))
        .await
        .into_iter()
        .collect::<Res<Vec<_>>>()?;
        let total: u32 = counts.iter().sum();
        let per_s = f64::from(total) / 15.0;
        println!("pool of {size}: {per_s:.2} forks/s");
        sustained.push(json!({ "pool": size, "forks_per_s": per_s }));
    }
    golden.pool(0).await?;
    Ok(json!({
        "fill_8_s": fill_s, "standby_pss_mib": standby_pss, "rows": rows, "cli": cli,
        "sustained": sustained,
    }))
}

/// `qsnap clone` as a command, with and without a standby (5 rounds each): the command's
/// wall time, and its own figure from the request to the guest running (`total-ms`).
async fn cli_figures(golden: &Golden, bin: &Path) -> Res<serde_json::Value> {
    let store = golden.dir().join("store");
    let mut out = Vec::new();
    println!("\n`qsnap clone` (5 rounds): wall, and request → guest running (its total-ms)");
    for (label, cold) in [("from a standby", false), ("cold", true)] {
        let (mut wall, mut engine) = (Vec::new(), Vec::new());
        for i in 0..5 {
            golden.pool(if cold { 0 } else { 2 }).await?;
            let name = format!("cli{}{i}", if cold { "c" } else { "s" });
            let t = Instant::now();
            let mut cmd = tokio::process::Command::new(bin);
            cmd.arg("--store")
                .arg(&store)
                .args(["clone", "golden", "ready", &name, "--json"]);
            let o = cmd.output().await?;
            wall.push(t.elapsed().as_secs_f64() * 1e3);
            if !o.status.success() {
                return Err(format!("qsnap clone: {}", String::from_utf8_lossy(&o.stderr)).into());
            }
            let r: serde_json::Value = serde_json::from_slice(&o.stdout)?;
            if r["standby"].is_string() == cold {
                return Err(format!("qsnap clone {label}: {r}").into());
            }
            engine.push(r["total-ms"].as_f64().unwrap_or(f64::NAN));
            let mut rm = tokio::process::Command::new(bin);
            rm.arg("--store").arg(&store).args(["remove", &name]);
            rm.output().await?;
        }
        let (w, e) = (median(&mut wall), median(&mut engine));
        println!("{label:<16} wall {w:>6.0} ms   request → running {e:>6.1} ms");
        out.push(json!({ "how": label, "wall_ms_median": w, "total_ms_median": e }));
    }
    Ok(serde_json::Value::Array(out))
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

#[tokio::main]
async fn main() -> Res<()> {
    let mut args = std::env::args().skip(1);
    let mut json_out: Option<PathBuf> = None;
    let mut qsnap_bin: Option<PathBuf> = None;
    while let Some(a) = args.next() {
        match a.as_str() {
            "--json" => json_out = args.next().map(PathBuf::from),
            "--qsnap" => qsnap_bin = args.next().map(PathBuf::from),
            other => return Err(format!("unknown argument {other}").into()),
        }
    }
    let argv = VmBuilder::guest()
        .memory(256)
        .disk("{dir}/disk.qcow2", "qcow2", DiskStyle::Blockdev)
        .command_line(Path::new("{dir}/console.log"))
        .await;
    let t0 = Instant::now();
    let golden = Golden::boot(argv)
        .disk("disk.qcow2", 64 << 20)
        .ready_when(console_prints("tick 3"))
        .snapshot("ready")
        .await?;
    let golden_s = t0.elapsed().as_secs_f64();
    println!("qsnap bench_clone: 256 MiB test guest, TCG; golden booted and snapshotted in {golden_s:.1} s\n");
    println!(
        "{:<10} {:>28} {:>28} {:>14}",
        "clones", "to first console line, ms", "  (median / max)", "PSS each, MiB"
    );
    let mut rows = Vec::new();
    for n in [1usize, 4, 8] {
        let started = Instant::now();
        let forks = futures::future::join_all((0..n).map(|_| async {
            let t = Instant::now();
            let f = golden.fork().await?;
            first_line(&f).await?;
            Ok::<_, Box<dyn std::error::Error>>((f, t.elapsed().as_secs_f64() * 1e3))
        }))
        .await
        .into_iter()
        .collect::<Res<Vec<_>>>()?;
        let wall_ms = started.elapsed().as_secs_f64() * 1e3;
        // Let every guest run a little before its memory is measured.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let mut times: Vec<f64> = forks.iter().map(|(_, t)| *t).collect();
        let mut pss = Vec::new();
        for (f, _) in &forks {
            if let Some(pid) = f.vm().status().await?.pid {
                pss.push(pss_mib(pid)?);
            }
        }
        let (med, max) = (median(&mut times), times[times.len() - 1]);
        let pss_med = median(&mut pss);
        println!(
            "{n:<10} {:>28} {:>28} {:>14.1}",
            format!("all running after {wall_ms:.0}"),
            format!("{med:.0} / {max:.0}"),
            pss_med
        );
        rows.push(json!({
            "clones": n, "wall_ms": wall_ms, "first_line_ms_median": med,
            "first_line_ms_max": max, "pss_mib_median": pss_med, "ram": format!("{}", forks[0].0.report().ram),
        }));
        drop(forks);
    }
    let pooled = pool_figures(&golden, qsnap_bin.as_deref()).await?;
    if let Some(out) = json_out {
        let doc = json!({ "guest_mib": 256, "golden_s": golden_s, "rows": rows, "pool": pooled });
        std::fs::write(&out, serde_json::to_string_pretty(&doc)? + "\n")?;
        println!("\nfigures written to {}", out.display());
    }
    Ok(())
}
