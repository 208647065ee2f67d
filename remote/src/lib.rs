//! Fleets: qsnap snapshots kept in an object store that every host reaches, as
//! content-addressed chunks (the layout is a public format: `format.rs`, docs/remotes.md).
//!
//! - `location.rs` — a URL (`s3://…`, `file:///…`) → the store client, and object keys.
//! - `format.rs` — the remote manifest and names; `chunk.rs` — cutting, naming, checking.
//! - `push.rs` — a snapshot → chunks → its manifest, last, only if absent.
//! - `pull.rs` — a manifest → chunks (checked, cached: `cache.rs`) → `import`.
//! - `manage.rs` — list, remove, and `gc` (why it never removes what a push needs).
//!
//! Never trusts what it reads from a store: every chunk is hashed before its bytes are
//! used, every pulled snapshot goes through `import`'s checks. Never writes a local file
//! but the chunk cache (import writes the VM). Never formats a credential.

mod cache;
mod chunk;
mod error;
mod format;
mod location;
mod manage;
mod pull;
mod push;

pub use error::{RemoteError, Result};
pub use format::{
    ChunkRef, Incremental, RemoteFile, RemoteManifest, RemoteName, View, FORMAT, VERSION,
};
pub use location::Remote;
pub use manage::{GcReport, RemoteEntry};
pub use pull::{PullOptions, PullReport};
pub use push::{PushOptions, PushReport};

/// Told the bytes done so far and the total.
pub type ProgressFn = std::sync::Arc<dyn Fn(u64, u64) + Send + Sync>;
