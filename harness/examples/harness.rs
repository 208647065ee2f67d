//! The test-harness API end to end: boot the test guest once, snapshot it when it ticks, then
//! start four forks of it at once and show each one's first console line. Asserts nothing.
//!
//! ```text
//! cargo run -p qsnap-harness --example harness [FORKS]
//! ```
//! `QSNAP_HARNESS_CACHE=DIR` keeps the golden snapshot in DIR for the next run. With
//! `QSNAP_HARNESS_ABORT=1` the process aborts while its forks run (no destructor runs): the
//! harness's watchdog must still remove them — the harness test uses this.

use qsnap_harness::{console_prints, Golden};
use qsnap_testkit::{DiskStyle, VmBuilder};
use std::path::Path;
use std::time::Instant;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let forks: usize = std::env::args()
        .nth(1)
        .map(|n| n.parse())
        .transpose()?
        .unwrap_or(4);
    // The test guest's command line, its disk and console in the golden's own directory.
    let argv = VmBuilder::guest()
        .disk("{dir}/disk.qcow2", "qcow2", DiskStyle::Blockdev)
        .command_line(Path::new("{dir}/console.log"))
        .await;
    let t0 = Instant::now();
    let mut builder = Golden::boot(argv)
        .disk("disk.qcow2", 64 << 20)
        .ready_when(console_prints("tick 3"));
    if let Some(dir) = std::env::var_os("QSNAP_HARNESS_CACHE") {
        builder = builder.cache_in(dir);
    }
    let golden = builder.snapshot("ready").await?;
    println!(
        "golden ready in {:.2} s ({})",
        t0.elapsed().as_secs_f64(),
        golden.dir().display()
    );

    let t1 = Instant::now();
    let started = futures_join(&golden, forks).await?;
    println!(
        "{forks} forks running in {:.0} ms",
        t1.elapsed().as_secs_f64() * 1e3
    );
    for f in &started {
        println!(
            "fork dir: {}",
            f.vm().store().vm_dir(f.vm().name()).display()
        );
    }
    if std::env::var_os("QSNAP_HARNESS_ABORT").is_some() {
        std::process::abort();
    }
    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    for f in &started {
        let first = f
            .console_text()
            .lines()
            .find(|l| l.starts_with("tick"))
            .unwrap_or("")
            .trim()
            .to_owned();
        println!("{}: {} ({:?})", f.vm().name(), first, f.report().ram);
    }
    Ok(())
}

async fn futures_join(
    golden: &Golden,
    n: usize,
) -> qsnap_harness::Result<Vec<qsnap_harness::Fork>> {
    futures::future::join_all((0..n).map(|_| golden.fork()))
        .await
        .into_iter()
        .collect()
}
