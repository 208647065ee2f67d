//! # qsnap-qmp — an async QMP client for production use
//!
//! Talks the QEMU Machine Protocol over a Unix socket (or TCP): greeting and capability
//! negotiation (out-of-band when offered), many commands in flight matched by `id`, per-call
//! timeouts, events with timestamps, file-descriptor passing, and feature probing from QEMU's
//! own schema. It knows nothing of snapshots: that is `qsnap-engine`'s job.
//!
//! Code map: `codec` (line framing), `connect` (transport and retries), `client` (the handle:
//! reader/writer tasks, calls), `session` (state the handle, the reader and event
//! subscriptions share), `events`, `fd` (SCM_RIGHTS), `probe` (schema
//! lookups), `commands` (typed commands newer than the bundled schema), `error`.
//!
//! ```no_run
//! # async fn demo() -> qsnap_qmp::Result<()> {
//! use qsnap_qmp::{types, Qmp};
//! let qmp = Qmp::connect("/run/vm1/qmp.sock").await?;
//! let mut events = qmp.events();                 // subscribe first…
//! qmp.execute(types::stop {}).await?;            // …then act
//! events.wait_named("STOP", std::time::Duration::from_secs(5)).await?;
//! let status = qmp.execute(types::query_status {}).await?;
//! assert!(!status.running);
//! # Ok(()) }
//! ```
#![deny(missing_docs)]

mod client;
pub mod codec;
pub mod commands;
mod connect;
mod error;
mod events;
mod fd;
pub mod probe;
mod session;
mod transcript;

pub use client::{ConnectOptions, Qmp};
pub use codec::{Event, Greeting, QemuVersion, Timestamp, VersionTriple};
pub use connect::Endpoint;
pub use error::{Error, Result};
pub use events::EventStream;
pub use probe::Schema;
/// Typed QMP commands, replies and events generated from QEMU's schema (via `qapi-qmp`).
pub use qapi_qmp as types;
/// The `Command` trait: a command type knows its wire name and its reply type.
pub use qapi_spec::Command;
