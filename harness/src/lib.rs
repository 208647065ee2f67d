//! # qsnap-harness — a test harness on qsnap clones
//!
//! Boot a guest once, snapshot it when it is ready, then give every test its own running copy
//! of it — in parallel, each with its own disks, console and monitor, gone when the test is
//! done (also when it panics).
//!
//! ```no_run
//! # async fn demo() -> qsnap_harness::Result<()> {
//! use qsnap_harness::{console_prints, Golden};
//! let golden = Golden::boot([
//!     "qemu-system-x86_64", "-m", "256", "-accel", "tcg", "-display", "none",
//!     "-kernel", "vmlinuz", "-initrd", "initramfs.gz", "-append", "console=ttyS0",
//!     "-drive", "file=disk.qcow2,if=virtio",
//! ])
//! .ready_when(console_prints("login:"))
//! .snapshot("ready")
//! .await?;
//! let vm = golden.fork().await?; // running, from the "ready" instant
//! let qmp = vm.qmp().await?; // its own monitor
//! println!("{}", vm.console_text()); // its own console
//! drop(qmp);
//! drop(vm); // QEMU killed, overlays and files removed
//! # Ok(()) }
//! ```
//!
//! With [`Golden::pool`], standbys of the snapshot (clones made ahead of time, their QEMU
//! started and memory loaded, paused before their guest runs) wait for the forks: a fork
//! claims one in milliseconds, and the pool refills in the background.
//!
//! Everything lives in one private temporary store (`$TMPDIR/qsnap-h-…`), or in a cache
//! directory shared by processes ([`GoldenBuilder::cache_in`]). The golden VM's snapshot is
//! made lazy where QEMU allows it, so forks map its RAM copy-on-write and share the pages — and,
//! like a lazily reverted VM, take precopy snapshots only (QEMU cannot write-protect a private
//! file mapping for point-in-time ones). A [`Fork`] kills its QEMU and removes its directory
//! when dropped; a [`Golden`] does the same for everything on drop, and — for a golden kept in
//! a `static` that is never dropped — a watchdog process does it when the test process exits,
//! however it exits.
//!
//! Built on qsnap-engine's public API only ([`qsnap_engine::Engine`], [`qsnap_engine::Vm`],
//! clones). The modules, one concern each:
//! - `ready.rs` — when a booted guest counts as ready ([`Ready`]), and waiting for it;
//! - `golden.rs` — [`Golden`] and [`GoldenBuilder`]: booting, snapshotting, reusing;
//! - `cache.rs` — the cross-process golden cache: its key and its lock;
//! - `fork.rs` — [`Fork`]: one running copy, and its removal on drop;
//! - `pool.rs` — the golden's pool of standbys ([`Golden::pool`]) and its background refill;
//! - `watchdog.rs` — killing the QEMUs of the harness's VMs (by pid *and* start time), in
//!   process and from a watchdog process after a death without destructors.
//!
//! What this crate must never do: touch anything outside its own store, or kill a process
//! that is not a QEMU its store records (by pid and start time: never by command line).
#![deny(missing_docs)]

mod cache;
mod error;
mod fork;
mod golden;
mod pool;
mod ready;
mod watchdog;

pub use error::{Error, Result};
pub use fork::Fork;
pub use golden::{Golden, GoldenBuilder};
pub use ready::{agent_answers, console_prints, when, Ready};

use std::path::Path;

/// Runs blocking file work off the async threads (a panic in it is this caller's panic).
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()))
}

/// An I/O error as the engine's [`qsnap_engine::Error::Io`]: what was being done, on which
/// file.
fn io<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> Error + 'a {
    move |source| {
        qsnap_engine::Error::Io {
            what,
            path: path.to_owned(),
            source,
        }
        .into()
    }
}
