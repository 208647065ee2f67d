//! What an export or an import ([`crate::Vm::export`], [`crate::Engine::import`]) did when it
//! failed. Every import failure left nothing behind: no VM, no snapshot, no file, no staging.

/// How an export or import failed (inside [`super::Error::Bundle`]).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BundleError {
    /// The snapshot cannot be exported as asked; nothing was written.
    #[error("cannot export {snapshot}: {why}")]
    ExportRefused {
        /// The snapshot.
        snapshot: String,
        /// Why.
        why: String,
    },
    /// The bundle is well-formed, but this host or store cannot take it (a name in use, a
    /// QEMU that lacks what it needs, a base snapshot missing); nothing was imported.
    #[error("cannot import: {why}; nothing was imported")]
    ImportRefused {
        /// Why.
        why: String,
    },
    /// The bundle's command line reaches outside the VM's own files; nothing was imported.
    #[error("cannot import: the bundle's command line reaches host resources, and a bundle can come from anyone: {}. If you trust its author, pass --trust-command-line (or --trust KEY for a bundle signed with KEY); nothing was imported", refusals.join("; "))]
    Untrusted {
        /// Each option refused, by name, and why.
        refusals: Vec<String>,
    },
    /// A signing or trusted key that cannot be used.
    #[error("the key {} is not usable: {why}", path.display())]
    BadKey {
        /// The key file.
        path: std::path::PathBuf,
        /// Why.
        why: String,
    },
    /// The input is not a whole, intact bundle (damaged, cut short, tampered with, or not a
    /// bundle at all); nothing was imported.
    #[error("the bundle is not intact: {why}; nothing was imported")]
    Corrupt {
        /// What was found.
        why: String,
    },
}
