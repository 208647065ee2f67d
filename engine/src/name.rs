//! Names of VMs and snapshots, validated once at the edge so nothing inside ever sees a bad
//! one. They become file names in the store and parts of overlay file names, so the rules are
//! strict. A VM name and a snapshot name are distinct types: one cannot be passed for the other.

use crate::error::{Error, Result};
use std::fmt;

/// The rule both kinds of name follow: 1–64 characters of letters, digits, `.`, `_`, `-`, not
/// starting with `.` or `-` (so never `..`, never a path, never an option).
fn validate(kind: &str, name: &str) -> Result<()> {
    let bad = |why: &str| Error::InvalidName {
        name: format!("{kind} name \"{}\"", name.escape_debug()),
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
            "{c:?} is not allowed (use letters, digits, '.', '_' and '-')"
        )));
    }
    Ok(())
}

macro_rules! name_type {
    ($(#[$doc:meta])* $name:ident, $kind:literal) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
        #[serde(transparent)]
        pub struct $name(String);

        impl $name {
            /// Validates `name` (letters, digits, `.`, `_`, `-`; 1–64 characters; not starting
            /// with `.` or `-`).
            pub fn new(name: &str) -> Result<$name> {
                validate($kind, name).map(|()| $name(name.to_owned()))
            }

            /// Like `new`, for names read back from the store (re-validated: a hand-edited
            /// store must not smuggle a path in).
            pub fn parse(name: &str) -> Option<$name> {
                Self::new(name).ok()
            }

            /// The name.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl std::str::FromStr for $name {
            type Err = Error;
            fn from_str(s: &str) -> Result<$name> {
                $name::new(s)
            }
        }
    };
}

name_type!(
    /// A VM's name in the store.
    VmName,
    "VM"
);
name_type!(
    /// A snapshot's name.
    SnapshotName,
    "snapshot"
);

/// The longest snapshot description, in characters.
pub const DESCRIPTION_MAX: usize = 1024;

/// Checks a snapshot's description: one line of at most 1024 characters, no
/// control characters (it is printed by `list` and `show` as it is).
pub fn check_description(text: &str) -> Result<()> {
    let bad = |why: String| Error::InvalidName {
        name: "description".into(),
        why,
    };
    if text.chars().count() > DESCRIPTION_MAX {
        return Err(bad(format!(
            "it is longer than {DESCRIPTION_MAX} characters"
        )));
    }
    if let Some(c) = text.chars().find(|c| c.is_control()) {
        return Err(bad(format!(
            "{c:?} is not allowed (one line, no control characters)"
        )));
    }
    Ok(())
}

impl SnapshotName {
    /// `NAME-N` for N ≥ 2: the names tried when a generated name is taken.
    pub fn numbered(&self, n: u32) -> Result<SnapshotName> {
        let suffix = format!("-{n}");
        let mut base = self.0.clone();
        base.truncate(64 - suffix.len());
        SnapshotName::new(&format!("{base}{suffix}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptions_are_one_plain_line() {
        assert!(check_description("before the upgrade to 2.1 — ok").is_ok());
        assert!(check_description("two\nlines").is_err());
        assert!(check_description(&"x".repeat(DESCRIPTION_MAX + 1)).is_err());
        let n = SnapshotName::new(&"a".repeat(64)).unwrap();
        assert_eq!(n.numbered(12).unwrap().as_str().len(), 64);
        assert!(n.numbered(12).unwrap().as_str().ends_with("-12"));
    }

    #[test]
    fn accepts_plain_names_and_refuses_paths_and_control_characters() {
        for ok in ["s1", "before-upgrade", "2026.11.29_a"] {
            assert!(SnapshotName::new(ok).is_ok(), "{ok}");
            assert!(VmName::new(ok).is_ok(), "{ok}");
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
            assert!(VmName::parse(bad).is_none(), "{bad:?} accepted");
        }
        let err = SnapshotName::new("a/b").unwrap_err().to_string();
        assert!(err.contains("snapshot name \"a/b\""), "{err}");
    }
}
