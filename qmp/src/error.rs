//! The one error type of this crate.
//!
//! A caller must be able to tell apart "QEMU refused the command" (keeps QEMU's `class` and
//! `desc`), "the connection is gone", "no answer in time" and "we could not understand the
//! answer": each asks for a different reaction. An underlying I/O or decode error is in the
//! message (so `to_string()` says what the OS said) and kept in a field (`io`, `json`) for
//! matching, but not returned as `source()`: a printer of the whole chain shows each reason
//! once.

use std::{io, path::PathBuf, sync::Arc, time::Duration};

/// Result alias for this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong talking QMP.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The socket could not be reached (after the connect retries).
    #[error(
        "cannot connect to the QMP socket {endpoint}: {io} ({})",
        connect_hint(endpoint, io)
    )]
    Connect {
        /// Where we tried to connect.
        endpoint: String,
        /// The last error seen.
        io: io::Error,
    },

    /// Connected, but QEMU sent no greeting in time. QEMU's monitor serves one client at a
    /// time and queues a second one silently, so this is almost always another client.
    #[error("no QMP greeting from {endpoint} within {waited:?}: another client (a VM manager?) probably holds this monitor; give qsnap its own -qmp socket")]
    GreetingTimeout {
        /// Where we connected.
        endpoint: String,
        /// How long we waited.
        waited: Duration,
    },

    /// The peer does not speak QMP as we expect (bad greeting, failed negotiation).
    #[error("QMP handshake with {endpoint} failed: {reason}")]
    Handshake {
        /// Where we connected.
        endpoint: String,
        /// What was wrong.
        reason: String,
    },

    /// QEMU answered the command with an error.
    #[error("QEMU refused {command}: {desc} ({class})")]
    Qemu {
        /// The command that failed.
        command: String,
        /// QEMU's error class, e.g. `GenericError`, `CommandNotFound`, `DeviceNotFound`.
        class: String,
        /// QEMU's human-readable description.
        desc: String,
    },

    /// The connection closed (QEMU exited, crashed or the socket broke). Every pending call and
    /// every event waiter gets this at once.
    #[error("QMP connection closed: {reason}")]
    Disconnected {
        /// Why the connection ended.
        reason: Arc<str>,
    },

    /// No reply to a command within its timeout. The connection stays usable; a late reply is
    /// dropped.
    #[error("QEMU did not answer {command} within {after:?}")]
    Timeout {
        /// The command that timed out.
        command: String,
        /// The timeout.
        after: Duration,
    },

    /// No matching event within the wait's timeout.
    #[error("no {what} event within {after:?}")]
    EventTimeout {
        /// What was waited for.
        what: String,
        /// The timeout.
        after: Duration,
    },

    /// An event subscriber fell so far behind that events were dropped for it.
    #[error("event subscriber fell behind and missed {missed} events")]
    EventsLagged {
        /// How many events were lost for this subscriber.
        missed: u64,
    },

    /// QEMU dropped the command because its out-of-band queue was full (`COMMAND_DROPPED`).
    #[error("QEMU dropped {command}: {reason}")]
    CommandDropped {
        /// The command that was dropped.
        command: String,
        /// QEMU's reason, e.g. `queue-full`.
        reason: String,
    },

    /// The reply did not match the command's reply type (e.g. a QEMU newer than the schema).
    /// The raw reply is kept so the caller can fall back to `execute_raw`.
    #[error("cannot decode the reply to {command}: {json}")]
    Decode {
        /// The command.
        command: String,
        /// The serde error.
        json: serde_json::Error,
        /// The reply as QEMU sent it.
        reply: serde_json::Value,
    },

    /// QEMU answered, but the answer could not be read as JSON (e.g. it nests deeper than
    /// [`crate::codec::MAX_DEPTH`]).
    #[error("cannot read QEMU's answer to {command}: {reason}")]
    Unreadable {
        /// The command.
        command: String,
        /// Why the answer could not be read.
        reason: String,
    },

    /// A command's arguments could not be serialised into a JSON object.
    #[error("cannot encode the arguments of {command}: {reason}")]
    Encode {
        /// The command.
        command: String,
        /// What was wrong.
        reason: String,
    },

    /// File descriptors can only travel over a Unix socket.
    #[error("{command} needs a file descriptor, which only a Unix-socket QMP connection can pass")]
    FdPassingUnsupported {
        /// The command.
        command: String,
    },

    /// Writing a command to the socket failed (for a reason other than QEMU being gone, which
    /// is [`Error::Disconnected`]).
    #[error("cannot send {command} to QEMU: {io}")]
    Send {
        /// The command.
        command: String,
        /// The I/O error.
        io: io::Error,
    },

    /// A socket path that is not a socket (or does not exist after the retries).
    #[error("{path} is not a QMP socket")]
    NotASocket {
        /// The path.
        path: PathBuf,
    },
}

/// How QEMU's `-qmp` option spells an endpoint as this crate prints it: `tcp:HOST:PORT` as it
/// is, a path as `unix:PATH`.
fn qemu_form(endpoint: &str) -> String {
    if endpoint.starts_with("tcp:") || endpoint.starts_with("unix:") {
        endpoint.to_owned()
    } else {
        format!("unix:{endpoint}")
    }
}

/// What to do about a socket that could not be reached. A socket this user may not open
/// exists, and QEMU is likely behind it: asking whether QEMU runs would mislead.
fn connect_hint(endpoint: &str, io: &io::Error) -> String {
    if io.kind() == io::ErrorKind::PermissionDenied {
        "the socket or its directory is not this user's to open: run qsnap as the user that started QEMU, or as root".into()
    } else {
        format!(
            "is QEMU running with -qmp {},server=on,wait=off?",
            qemu_form(endpoint)
        )
    }
}

impl Error {
    /// QEMU's error class when QEMU refused the command.
    pub fn qemu_class(&self) -> Option<&str> {
        match self {
            Error::Qemu { class, .. } => Some(class),
            _ => None,
        }
    }

    /// True when the connection is gone and retrying on it is pointless.
    pub fn is_disconnected(&self) -> bool {
        matches!(self, Error::Disconnected { .. })
    }

    /// True when no QEMU could be reached at the endpoint: nothing listens, it is not a
    /// socket, or what listens never greeted.
    pub fn is_unreachable(&self) -> bool {
        matches!(
            self,
            Error::Connect { .. }
                | Error::NotASocket { .. }
                | Error::GreetingTimeout { .. }
                | Error::Handshake { .. }
        )
    }
}

#[cfg(test)]
mod hint_tests {
    use super::*;

    #[test]
    fn the_connect_hint_spells_the_endpoint_as_qemu_takes_it() {
        let refused = || io::Error::from(io::ErrorKind::ConnectionRefused);
        let tcp = Error::Connect {
            endpoint: "tcp:127.0.0.1:4444".into(),
            io: refused(),
        };
        assert!(tcp
            .to_string()
            .contains("-qmp tcp:127.0.0.1:4444,server=on,wait=off"));
        let unix = Error::Connect {
            endpoint: "/run/vm1/qmp.sock".into(),
            io: refused(),
        };
        assert!(unix
            .to_string()
            .contains("-qmp unix:/run/vm1/qmp.sock,server=on,wait=off"));
        // Not allowed to open it: QEMU is probably there, the user is the problem.
        let denied = Error::Connect {
            endpoint: "/run/vm1/qmp.sock".into(),
            io: io::Error::from(io::ErrorKind::PermissionDenied),
        }
        .to_string();
        assert!(
            denied.contains("run qsnap as the user that started QEMU"),
            "{denied}"
        );
        assert!(!denied.contains("is QEMU running"), "{denied}");
    }
}
