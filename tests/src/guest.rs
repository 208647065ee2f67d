//! The test guest kit: where it is, and building it on first use.
//!
//! The kit is built by `tests/guest/build.sh` from Debian packages into
//! `$QSNAP_GUEST_DIR` (default `target/qsnap-guest`). Its `VERSIONS` file records the package
//! versions, so a failure report can say exactly which guest ran.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// Paths of a built guest.
#[derive(Debug, Clone)]
pub struct GuestKit {
    /// The kernel image.
    pub kernel: PathBuf,
    /// The initramfs with busybox and `/init`.
    pub initrd: PathBuf,
    /// What it was built from.
    pub versions: String,
}

fn kit_dir() -> PathBuf {
    std::env::var_os("QSNAP_GUEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| crate::repo_root().join("target/qsnap-guest"))
}

impl GuestKit {
    /// The kit, building it first if needed (once per test process; the script itself is a
    /// no-op when the cache is current). Panics with the builder's output when that fails:
    /// a test that needs the guest cannot proceed without it.
    pub fn get() -> &'static GuestKit {
        static KIT: OnceLock<GuestKit> = OnceLock::new();
        KIT.get_or_init(|| {
            let dir = kit_dir();
            if !Self::complete(&dir) {
                let script = crate::repo_root().join("tests/guest/build.sh");
                let out = std::process::Command::new("bash")
                    .arg(&script)
                    .env("QSNAP_GUEST_DIR", &dir)
                    .output()
                    .unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
                assert!(
                    out.status.success() && Self::complete(&dir),
                    "building the test guest failed:\n{}{}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            GuestKit {
                kernel: dir.join("vmlinuz"),
                initrd: dir.join("initramfs.gz"),
                versions: std::fs::read_to_string(dir.join("VERSIONS")).unwrap_or_default(),
            }
        })
    }

    fn complete(dir: &Path) -> bool {
        ["vmlinuz", "initramfs.gz", "VERSIONS"]
            .iter()
            .all(|f| dir.join(f).metadata().is_ok_and(|m| m.len() > 0))
    }
}
