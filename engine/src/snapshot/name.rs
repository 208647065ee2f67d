//! Snapshot names, validated once at the edge so nothing inside ever sees a bad one.

use crate::error::{Error, Result};
use std::fmt;

/// A snapshot name safe to use in file names: 1–64 characters of letters, digits, `.`, `_`,
/// `-`, not starting with `.` or `-` (so never `..`, never a path, never an option).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub struct SnapshotName(String);

impl SnapshotName {
    /// Validates `name`.
    pub fn new(name: &str) -> Result<SnapshotName> {
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
        Ok(SnapshotName(name.to_owned()))
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for SnapshotName {
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
