//! The engine's one error type. Variants say which step failed and carry what a caller needs
//! to react; QEMU's own refusals keep QEMU's class and description (inside [`Error::Qmp`]).

/// Result alias for the engine.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What can go wrong in the engine.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Talking to QEMU failed (connection, timeout, or QEMU refused a command).
    #[error("{step}")]
    Qmp {
        /// What the engine was doing.
        step: &'static str,
        /// The QMP error (keeps QEMU's `class` and `desc` when QEMU refused).
        source: qsnap_qmp::Error,
    },
}

impl Error {
    pub(crate) fn qmp(step: &'static str) -> impl FnOnce(qsnap_qmp::Error) -> Error {
        move |source| Error::Qmp { step, source }
    }
}
