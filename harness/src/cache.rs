//! The golden cache shared by processes ([`GoldenBuilder::cache_in`]): the key a cached golden
//! is found by — everything it depends on: the command line, the disks, the ready condition,
//! the store's layout version, this crate's version and the identity of every file it reads
//! (the QEMU binary, the kernel …) — and the lock one builder holds while the others wait.
//!
//! What it must never do: leave out of the key something a golden depends on (a rebuilt
//! kernel or QEMU must make a new golden, never reuse a stale one), or let a file the golden
//! itself writes into the key (the cache would never hit).

use crate::error::Result;
use crate::ready::Ready;
use qsnap_engine::{file_identity, resolve_binary, SnapshotName};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// What makes a cached golden the same: its command line (`argv`), disks, ready condition,
/// lazy or not, snapshot name, the store's layout version, this crate's version, and the
/// identity of each file the command line reads (relative names resolved against `cwd`).
pub(crate) async fn key(
    argv: &[String],
    disks: &[(String, u64)],
    ready: Option<&Ready>,
    lazy: bool,
    snapshot: &SnapshotName,
    cwd: Option<&Path>,
) -> u64 {
    let mut text = format!(
        "{argv:?}|{disks:?}|{ready:?}|lazy {lazy}|{snapshot}|schema {}|qsnap {}",
        qsnap_engine::store::SCHEMA,
        env!("CARGO_PKG_VERSION")
    );
    let binary = resolve_binary(argv.first().map_or("", String::as_str)).await;
    // Every absolute path counts; a relative one (from this process's directory) only as
    // the value of an option that reads it: a relative file the golden writes (a log,
    // a disk) would change with every build and the cache would never hit.
    let mut files: Vec<PathBuf> = Vec::new();
    for (i, a) in argv.iter().enumerate().skip(1) {
        let reads = matches!(
            argv[i - 1].trim_start_matches('-'),
            "kernel" | "initrd" | "bios" | "dtb"
        );
        for p in a.split([',', '=']).filter(|p| !p.is_empty()) {
            if Path::new(p).is_absolute() {
                files.push(PathBuf::from(p));
            } else if let (true, Some(cwd)) = (reads, cwd) {
                files.push(cwd.join(p));
            }
        }
    }
    files.extend(binary);
    for f in files {
        if let Some(k) = file_identity(&f).await {
            text.push('|');
            text.push_str(&k);
        }
    }
    xxhash_rust::xxh3::xxh3_64(text.as_bytes())
}

/// Takes the exclusive lock on `path` (created if missing), waiting at most `timeout` for
/// another process that holds it.
pub(crate) async fn lock_exclusive(
    path: PathBuf,
    timeout: Duration,
) -> Result<nix::fcntl::Flock<std::fs::File>> {
    let deadline = Instant::now() + timeout;
    loop {
        let p = path.clone();
        let got = crate::blocking(move || {
            let f = std::fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(&p)
                .map_err(crate::io("opening the golden cache lock", &p))?;
            Ok(nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusiveNonblock).ok())
        })
        .await?;
        if let Some(locked) = got {
            return Ok(locked);
        }
        if Instant::now() > deadline {
            return Err(qsnap_engine::Error::Timeout {
                what: format!(
                    "another process building the golden VM ({})",
                    path.display()
                ),
                after: timeout,
            }
            .into());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[cfg(test)]
mod tests {
    use crate::Golden;
    use qsnap_engine::SnapshotName;

    #[tokio::test]
    async fn the_cache_key_follows_files_named_relatively_or_absolutely() {
        let dir = tempfile::tempdir().unwrap();
        let kernel = dir.path().join("vmlinuz");
        std::fs::write(&kernel, b"one").unwrap();
        let snap = SnapshotName::new("ready").unwrap();
        let relative = Golden::boot(["qemu-system-x86_64", "-kernel", "vmlinuz", "-D", "qemu.log"]);
        // A file the golden writes, named relatively, never counts.
        std::fs::write(dir.path().join("qemu.log"), b"").unwrap();
        let absolute = Golden::boot(["qemu-system-x86_64", "-kernel", kernel.to_str().unwrap()]);
        let (r1, a1) = (
            relative.key(&snap, Some(dir.path())).await,
            absolute.key(&snap, None).await,
        );
        // Same contents, same key; a rebuilt file, a new key — whichever way it is named.
        assert_eq!(r1, relative.key(&snap, Some(dir.path())).await);
        std::fs::write(dir.path().join("qemu.log"), b"written by QEMU").unwrap();
        assert_eq!(r1, relative.key(&snap, Some(dir.path())).await);
        std::fs::remove_file(&kernel).unwrap();
        std::fs::write(&kernel, b"two, longer").unwrap();
        assert_ne!(r1, relative.key(&snap, Some(dir.path())).await);
        assert_ne!(a1, absolute.key(&snap, None).await);
    }
}
