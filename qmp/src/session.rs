//! The state one QMP session shares between the client handle, its reader task and every
//! event subscription: calls waiting for their reply (by `id`), the event broadcast, and
//! whether the connection has closed (and why). The reader routes frames here; `client`
//! registers calls and `events` subscribes. It must never do I/O itself.

use crate::codec::Event;
use crate::codec::Frame;
use crate::error::{Error, Result};
use crate::transcript::Transcript;
use serde_json::Value;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;
use tokio::sync::{broadcast, oneshot};
use tracing::{debug, warn};

pub(crate) struct Pending {
    pub(crate) command: String,
    pub(crate) reply: oneshot::Sender<Result<Value>>,
}

pub(crate) struct State {
    pub(crate) pending: HashMap<u64, Pending>,
    /// Set once, when the reader sees the connection end.
    pub(crate) closed: Option<Arc<str>>,
    /// Dropped on close so that every subscription ends.
    pub(crate) events: Option<broadcast::Sender<Arc<Event>>>,
}

/// State shared by the client handle, its reader task and event subscriptions.
pub(crate) struct Shared {
    pub(crate) endpoint: String,
    pub(crate) state: Mutex<State>,
    pub(crate) transcript: Transcript,
}

impl Shared {
    pub(crate) fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding the lock leaves plain data behind; keep going.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn disconnected_error(&self) -> Error {
        let reason = self
            .lock()
            .closed
            .clone()
            .unwrap_or_else(|| Arc::from("the connection was closed"));
        Error::Disconnected { reason }
    }

    pub(crate) fn close(&self, reason: &str) {
        let mut st = self.lock();
        if st.closed.is_some() {
            return;
        }
        let reason: Arc<str> = Arc::from(reason);
        debug!(endpoint = %self.endpoint, %reason, "QMP connection closed");
        st.closed = Some(reason.clone());
        st.events = None;
        for (_, p) in st.pending.drain() {
            let _ = p.reply.send(Err(Error::Disconnected {
                reason: reason.clone(),
            }));
        }
    }

    fn complete(&self, id: &Option<Value>, result: impl FnOnce(&str) -> Result<Value>) {
        let Some(num) = id.as_ref().and_then(Value::as_u64) else {
            warn!(endpoint = %self.endpoint, ?id, "QMP reply without a usable id; dropped");
            return;
        };
        let pending = self.lock().pending.remove(&num);
        match pending {
            Some(p) => {
                let _ = p.reply.send(result(&p.command));
            }
            None => debug!(id = num, "reply for a call that already gave up; dropped"),
        }
    }

    pub(crate) fn dispatch(&self, frame: Frame) {
        match frame {
            Frame::Return { id, value } => self.complete(&id, |_| Ok(value)),
            Frame::Error { id, class, desc } => {
                if id.is_none() {
                    warn!(%class, %desc, "QEMU could not parse a command we sent");
                }
                self.complete(&id, |command| {
                    Err(Error::Qemu {
                        command: command.to_owned(),
                        class,
                        desc,
                    })
                })
            }
            Frame::Event {
                name,
                data,
                timestamp,
            } => {
                if name == "COMMAND_DROPPED" {
                    let reason = data
                        .get("reason")
                        .and_then(Value::as_str)
                        .unwrap_or("dropped")
                        .to_owned();
                    let id = data.get("id").cloned();
                    self.complete(&id, |command| {
                        Err(Error::CommandDropped {
                            command: command.to_owned(),
                            reason,
                        })
                    });
                }
                let ev = Arc::new(Event {
                    name,
                    data,
                    timestamp,
                    received: Instant::now(),
                });
                if let Some(tx) = &self.lock().events {
                    let _ = tx.send(ev); // no subscriber is fine
                }
            }
            Frame::Greeting(_) => warn!("unexpected second QMP greeting; ignored"),
            Frame::Invalid { line, reason, id } => {
                match id {
                    Some(id) => {
                        warn!(endpoint = %self.endpoint, %reason, id, line = %truncate(&line), "a reply that cannot be read fails its command")
                    }
                    None => {
                        warn!(endpoint = %self.endpoint, %reason, line = %truncate(&line), "ignoring a line that is not QMP")
                    }
                }
                if let Some(id) = id {
                    self.complete(&Some(Value::from(id)), |command| {
                        Err(Error::Unreadable {
                            command: command.to_owned(),
                            reason,
                        })
                    });
                }
            }
        }
    }
}

fn truncate(s: &str) -> &str {
    match s.char_indices().nth(200) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}
