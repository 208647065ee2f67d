//! Names of VMs and snapshots, validated once at the edge so nothing inside ever sees a bad
//! one. They become file names in the store and in overlay names, so the rules are strict.

use crate::error::{Error, Result};
use std::fmt;

/// A VM or snapshot name safe to use in file names: 1–64 characters of letters, digits, `.`, `_`,
/// `-`, not starting with `.` or `-` (so never `..`, never a path, never an option).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(transparent)]
pub struct Name(String);

/// A snapshot's name.
pub type SnapshotName = Name;
/// A VM's name in the store.
pub type VmName = Name;

impl Name {
    /// Validates `name`.
    pub fn new(name: &str) -> Result<Name> {
        let bad = |why: &str| Error::InvalidName {
            name: name.escape_debug().to_string(),
            why: why.to_owned(),
        };
        if name.is_empty() || name.len() > 64 {
            return Err(bad("it must be 1 to 64 characters long"));
        }
        if name.starts_with('.') || name.starts_with('-') {
            return Err(bad("it must not start with '.' or '-'"));
        }
        if let Some(c) = name
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
        {
            return Err(bad(&format!(
                "{:?} is not allowed (use letters, digits, '.', '_' and '-')",
                c
            )));
        }
        Ok(Name(name.to_owned()))
    }

    /// Like [`Name::new`], for names read back from the store (re-validated: a hand-edited
    /// store must not smuggle a path in).
    pub fn parse(name: &str) -> Option<Name> {
        Name::new(name).ok()
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_plain_names_and_refuses_paths_and_control_characters() {
        for ok in ["s1", "before-upgrade", "2026.11.29_a"] {
            assert!(SnapshotName::new(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "..",
            ".hidden",
            "-x",
            "a/b",
            "../x",
            "a\nb",
            "tab\t",
            "ü",
            &"x".repeat(65),
        ] {
            assert!(SnapshotName::new(bad).is_err(), "{bad:?} accepted");
        }
    }
}
