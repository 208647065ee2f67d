//! Asynchronous QMP events: what they look like and how to wait for them.
//!
//! Subscribe *before* issuing the command whose events you want ([`crate::Qmp::events`]): a
//! subscription sees every event that arrives after it was made, none before. Every wait takes
//! a timeout, and a closed connection ends every wait at once with
//! [`Error::Disconnected`](crate::Error::Disconnected).

use crate::codec::Event;
use crate::error::{Error, Result};
use crate::session::Shared;

use std::sync::Arc;
use std::time::Duration;
use tokio::sync::broadcast;

/// A subscription to the connection's events.
pub struct EventStream {
    rx: broadcast::Receiver<Arc<Event>>,
    shared: Arc<Shared>,
}

impl EventStream {
    pub(crate) fn new(rx: broadcast::Receiver<Arc<Event>>, shared: Arc<Shared>) -> Self {
        Self { rx, shared }
    }

    /// The next event, however long it takes (until the connection closes).
    pub async fn next(&mut self) -> Result<Arc<Event>> {
        match self.rx.recv().await {
            Ok(ev) => Ok(ev),
            Err(broadcast::error::RecvError::Closed) => Err(self.shared.disconnected_error()),
            Err(broadcast::error::RecvError::Lagged(missed)) => Err(Error::EventsLagged { missed }),
        }
    }

    /// An event already received, without waiting.
    pub fn try_next(&mut self) -> Option<Arc<Event>> {
        self.rx.try_recv().ok()
    }

    /// Waits up to `timeout` for an event for which `matches` is true; `what` names it in the
    /// timeout error. Events that do not match are skipped.
    pub async fn wait_for(
        &mut self,
        what: &str,
        timeout: Duration,
        mut matches: impl FnMut(&Event) -> bool,
    ) -> Result<Arc<Event>> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            match tokio::time::timeout_at(deadline, self.next()).await {
                Ok(Ok(ev)) if matches(&ev) => return Ok(ev),
                Ok(Ok(_)) => continue,
                Ok(Err(e)) => return Err(e),
                Err(_) => {
                    return Err(Error::EventTimeout {
                        what: what.to_owned(),
                        after: timeout,
                    })
                }
            }
        }
    }

    /// Waits up to `timeout` for the next event called `name`.
    pub async fn wait_named(&mut self, name: &str, timeout: Duration) -> Result<Arc<Event>> {
        self.wait_for(name, timeout, |ev| ev.name == name).await
    }
}
