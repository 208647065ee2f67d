//! A SeaweedFS (`weed mini`) for the benchmarks: started in DIR on loopback ports, its S3
//! settings printed as `export AWS_…=…` lines (and `export QSNAP_BUCKET=…`), kept until stdin
//! closes, then killed. `scripts/bench_remote.sh` runs it.
//! Usage: cargo run -p qsnap-testkit --example seaweed -- DIR

use std::io::{Read, Write};

fn main() {
    let dir = std::env::args().nth(1).expect("usage: seaweed DIR");
    let sw = qsnap_testkit::Seaweed::mini(&dir).unwrap_or_else(|e| {
        eprintln!("{e}");
        std::process::exit(1)
    });
    let mut out = std::io::stdout().lock();
    for (k, v) in sw.env() {
        writeln!(out, "export {k}={v}").unwrap();
    }
    writeln!(out, "export QSNAP_BUCKET={}", sw.bucket()).unwrap();
    writeln!(out, "ready").unwrap();
    out.flush().unwrap();
    drop(out);
    let _ = std::io::stdin().read_to_end(&mut Vec::new());
    drop(sw);
}
