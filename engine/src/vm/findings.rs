//! What `qsnap check` reports: one [`Finding`] per problem, with what fixes it and whether a
//! repair can. Data only; the checks themselves live in `check.rs` and `relative.rs`.

use serde::Serialize;
use std::path::PathBuf;

/// One thing `check` found.
#[derive(Debug, Clone, Serialize, schemars::JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub struct Finding {
    /// What kind: `interrupted`, `relative-path`, `bad-memory`, `missing-image`,
    /// `unstamped-image`, `changed-image`,
    /// `broken-chain`, `store-disagrees`, `orphan-image`, `orphan-memory`, `stale-record`,
    /// `unmerged-layer`, `corrupt-image`, `unreadable-qemu`, `relative-path` (a standby that
    /// can no longer be used, or a pool whose snapshot is gone, is a `stale-record`).
    pub kind: String,
    /// What exactly.
    pub what: String,
    /// How to fix it (what `--repair` does, or what a person must do).
    pub fix: String,
    /// True when `--repair` fixed it.
    pub repaired: bool,
    /// Whether `--repair` can fix it (false: only a person can, `fix` says how).
    pub repairable: bool,
    /// The files it is about.
    pub paths: Vec<PathBuf>,
}

impl Finding {
    /// Adds a file the finding is about.
    pub(super) fn about(&mut self, p: impl Into<PathBuf>) -> &mut Finding {
        let p = p.into();
        if !self.paths.contains(&p) {
            self.paths.push(p);
        }
        self
    }

    /// Marks it as something only a person can fix.
    pub(super) fn by_hand(&mut self) -> &mut Finding {
        self.repairable = false;
        self
    }
}

/// What `check` found so far.
#[derive(Default)]
pub(super) struct Findings(pub(super) Vec<Finding>);

impl Findings {
    /// Notes a finding; whether `--repair` can fix it follows from its kind (override with
    /// [`Finding::by_hand`]).
    pub(super) fn add(
        &mut self,
        kind: &str,
        what: String,
        fix: String,
        repaired: bool,
    ) -> &mut Finding {
        self.0.push(Finding {
            kind: kind.into(),
            what,
            fix,
            repaired,
            repairable: REPAIRABLE.contains(&kind),
            paths: Vec::new(),
        });
        self.0.last_mut().expect("just pushed")
    }
}

/// The kinds `--repair` fixes; the others need a person (a missing or changed image, a
/// memory file that does not verify, a corrupt image, a QEMU whose disks cannot be read).
const REPAIRABLE: &[&str] = &[
    "interrupted",
    "store-disagrees",
    "stale-record",
    "orphan-image",
    "orphan-memory",
    "unmerged-layer",
    "unstamped-image",
];

/// What `check` found and did.
#[derive(Debug, Clone, Serialize, schemars::JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub struct CheckReport {
    /// The VM.
    pub vm: String,
    /// Everything found (repaired or not).
    pub findings: Vec<Finding>,
    /// Memory files and images not read again: an earlier check verified each, and it is
    /// unchanged since (same inode, size, mtime and ctime). `check --full` reads them.
    pub unchanged: usize,
    /// True when nothing is left to fix.
    pub clean: bool,
}
