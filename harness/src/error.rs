//! The harness's error: what the engine refused or failed at, or a harness set up in a way it
//! cannot follow (asked to wait for something the command line does not provide).

/// Result alias for the harness.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What can go wrong in the harness.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The engine failed (booting, snapshotting, cloning, reverting).
    #[error(transparent)]
    Engine(#[from] qsnap_engine::Error),
    /// Asked to wait for console text, but the command line sends the console elsewhere.
    #[error("waiting for console text: the command line sends the console elsewhere (-serial); leave it out and the harness captures it")]
    NoConsole,
    /// A pool of standbys for a golden in a cache shared by processes: standbys are QEMUs of
    /// one process's run, which another process could neither account for nor clean up.
    #[error("a pool of standbys needs a golden of this process's own (without cache_in): standbys in a shared cache would outlive the process that made them")]
    PoolInSharedCache,
    /// Asked to wait for the guest agent, but the command line has none.
    #[error("waiting for the guest agent: the command line has none (a virtserialport named org.qemu.guest_agent.0 on a -chardev socket,path=…)")]
    NoGuestAgent,
}
