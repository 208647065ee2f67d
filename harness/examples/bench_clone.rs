//! Clone figures (issue 11): how long from asking for a clone to the clone's first console
//! line, for 1, 4 and 8 clones of a 256 MiB test guest started at once, and how much memory
//! (PSS) each clone costs. Built on the harness API (`Golden::fork`), as a test suite would
//! use it. Asserts nothing.
//!
//! ```text
//! ./scripts/bench.sh --only clone   # or: cargo run --release -p qsnap-harness --example bench_clone [--json FILE]
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

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

#[tokio::main]
async fn main() -> Res<()> {
    let mut args = std::env::args().skip(1);
    let mut json_out: Option<PathBuf> = None;
    while let Some(a) = args.next() {
        match a.as_str() {
            "--json" => json_out = args.next().map(PathBuf::from),
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
    if let Some(out) = json_out {
        let doc = json!({ "guest_mib": 256, "golden_s": golden_s, "rows": rows });
        std::fs::write(&out, serde_json::to_string_pretty(&doc)? + "\n")?;
        println!("\nfigures written to {}", out.display());
    }
    Ok(())
}
