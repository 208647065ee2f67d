//! The remote crate's one error type: what went wrong, in words a user can act on. Never
//! carries a credential: object-store errors are kept as their messages, which name the
//! object, never the keys.

use thiserror::Error;

/// A remote operation's failure.
#[derive(Debug, Error)]
pub enum RemoteError {
    /// The URL is not one qsnap can use.
    #[error("remote {url}: {why}")]
    BadUrl {
        /// The URL as given.
        url: String,
        /// Why it cannot be used.
        why: String,
    },
    /// A remote snapshot name is not `VM/SNAPSHOT`.
    #[error("remote snapshot name {name:?}: {why}")]
    BadName {
        /// The name as given.
        name: String,
        /// Why.
        why: String,
    },
    /// The store has no such snapshot.
    #[error("{url} has no snapshot {name} (`qsnap remote list {url}` lists what it has)")]
    NotFound {
        /// The remote.
        url: String,
        /// The snapshot.
        name: String,
    },
    /// Another push made this name first (the conditional put lost).
    #[error("{url} already has a snapshot {name}: nothing was overwritten; push under another name (--as VM/SNAP), or remove it first (`qsnap remote rm`)")]
    Exists {
        /// The remote.
        url: String,
        /// The snapshot.
        name: String,
    },
    /// What the store holds is not what its manifest promised: a chunk whose bytes do not
    /// hash to its name, a chunk missing, a manifest that does not parse.
    #[error("{url}: {why}")]
    Corrupt {
        /// The remote.
        url: String,
        /// What is wrong, naming the object.
        why: String,
    },
    /// Talking to the store failed (network, permissions, the store's own error).
    #[error("{url}: {what}: {message}")]
    Store {
        /// The remote.
        url: String,
        /// What qsnap was doing.
        what: String,
        /// The store client's message.
        message: String,
    },
    /// Reading or writing a local file (a snapshot's file, the chunk cache) failed.
    #[error("{what} {path}: {source}")]
    Io {
        /// What qsnap was doing.
        what: &'static str,
        /// The file.
        path: std::path::PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The engine refused or failed (export's checks, import's checks and refusals).
    #[error(transparent)]
    Engine(#[from] qsnap_engine::Error),
    /// Interrupted (Ctrl-C); a re-run goes on where this one stopped.
    #[error("interrupted; run the same command again to go on where it stopped")]
    Interrupted,
}

/// This crate's result.
pub type Result<T, E = RemoteError> = std::result::Result<T, E>;
