//! The golden's pool of standbys ([`crate::Golden::pool`]): a fork claims a standby (its QEMU
//! started and its memory loaded before the test asked), and one refill at a time brings the
//! pool back to its size in the background, without holding up the fork that took one.
//!
//! What it must never do: run two refills of one pool at once (they would overfill it), or
//! outlive the golden (dropping it aborts the refill; the golden then kills its standbys).

use crate::watchdog::launcher;
use qsnap_engine::{SnapshotName, Vm};
use std::sync::{Arc, Mutex};
use tokio::task::JoinHandle;

/// Refills one pool, one refill at a time.
#[derive(Debug)]
pub(crate) struct Refiller {
    vm: Vm,
    snapshot: SnapshotName,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    /// The refill under way.
    task: Option<JoinHandle<()>>,
    /// Standbys were taken while it ran: it goes round once more before it ends.
    again: bool,
}

impl Refiller {
    pub(crate) fn new(vm: Vm, snapshot: SnapshotName) -> Arc<Refiller> {
        Arc::new(Refiller {
            vm,
            snapshot,
            state: Mutex::new(State::default()),
        })
    }

    /// A standby was taken (or none was ready): the pool refills in the background.
    pub(crate) fn poke(self: &Arc<Self>) {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if st.task.as_ref().is_some_and(|t| !t.is_finished()) {
            st.again = true;
            return;
        }
        let me = Arc::clone(self);
        st.task = Some(tokio::spawn(async move {
            loop {
                if let Err(e) = me.vm.refill_with(&me.snapshot, &launcher()).await {
                    tracing::warn!(error = %e, "the golden's pool could not be refilled");
                }
                let mut st = me.state.lock().unwrap_or_else(|e| e.into_inner());
                if !std::mem::take(&mut st.again) {
                    // Under the lock: a poke from now on starts a refill of its own.
                    st.task = None;
                    break;
                }
            }
        }));
    }

    /// Stops the refill under way (the golden is going).
    pub(crate) fn abort(&self) {
        let st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(t) = &st.task {
            t.abort();
        }
    }
}
