//! Watching QEMU save memory: the signals the create steps wait for, progress reports, the
//! precopy deadline, and cancellation. Completion wakes the watcher through QEMU's
//! `MIGRATION` event (the `events` capability is on for every save); `query-migrate` is read
//! at each wake-up and every [`PROGRESS`] for the progress figures. Every wait is bounded.

use crate::error::{Error, Result};
use crate::qemu::{MigrateInfo, QueryMigrate};
use qsnap_qmp::Qmp;
use serde::Serialize;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// How far a memory save has got.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct SaveProgress {
    /// Bytes QEMU has written.
    pub transferred: u64,
    /// Guest RAM size.
    pub ram_total: u64,
    /// Bytes QEMU still has to write (precopy: currently dirty).
    pub remaining: u64,
    /// QEMU's current rate, Mbit/s.
    pub mbps: f64,
    /// Passes over RAM (precopy).
    pub passes: u64,
    /// Time since the save started.
    pub elapsed: Duration,
}

/// Called with progress while memory is saved (a few times a second). Must not block.
pub type ProgressFn = Arc<dyn Fn(&SaveProgress) + Send + Sync>;

/// How often progress is reported (and precopy's live limit looked at) while no event comes.
pub(crate) const PROGRESS: Duration = Duration::from_millis(100);

fn failed(info: &MigrateInfo) -> Option<Error> {
    match info.status.as_deref() {
        Some(status @ ("failed" | "cancelled")) => Some(Error::SaveFailed {
            desc: info.error_desc.clone().unwrap_or_else(|| {
                if status == "cancelled" {
                    "the save was cancelled".to_owned()
                } else {
                    // QEMU drops the reason when its last write or flush of the file fails.
                    "QEMU gave no reason; the usual one is a memory file it could not write (a full or failing filesystem where the store keeps memory)".to_owned()
                }
            }),
        }),
        _ => None,
    }
}

async fn query(qmp: &Qmp) -> Result<MigrateInfo> {
    qmp.execute(QueryMigrate {})
        .await
        .map_err(Error::qmp("polling the memory save"))
}

/// Waits until QEMU's background-snapshot thread has saved the device state and armed write
/// protection: it writes RAM pages only after both, so the first page counted is the signal.
/// Polls tightly: the guest is paused while this runs.
pub(crate) async fn wait_armed(qmp: &Qmp, timeout: Duration) -> Result<MigrateInfo> {
    let start = Instant::now();
    let deadline = start + timeout;
    let mut seen_active = false;
    loop {
        let info = query(qmp).await?;
        if !seen_active && info.status.as_deref() == Some("active") {
            seen_active = true;
            tracing::debug!(after = ?start.elapsed(), "save is active (setup done)");
        }
        if let Some(e) = failed(&info) {
            return Err(e);
        }
        let pages = info
            .ram
            .as_ref()
            .map(|r| r.normal + r.duplicate)
            .unwrap_or(0);
        if pages > 0 || info.status.as_deref() == Some("completed") {
            return Ok(info);
        }
        if Instant::now() > deadline {
            return Err(Error::SaveFailed {
                desc: format!("QEMU did not start writing RAM within {timeout:?}"),
            });
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// Waits (bounded) until QEMU has left the `finish-migrate` run state. QEMU sends the
/// `completed` event before its migration cleanup moves the VM on to `postmigrate`, and
/// refuses `cont` until then ("Migration is not finalized yet"); waking on the event, qsnap
/// gets there first.
pub(crate) async fn wait_finalized(qmp: &Qmp) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let st = qmp
            .execute(qsnap_qmp::types::query_status {})
            .await
            .map_err(Error::qmp("reading the run state after the save"))?;
        if st.status != qsnap_qmp::types::RunState::finish_migrate {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(Error::SaveFailed {
                desc: "QEMU stayed in finish-migrate for 10 s after the save completed".into(),
            });
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// What the watcher is asked to do besides waiting.
pub(crate) struct Watch<'a> {
    pub started: Instant,
    pub timeout: Duration,
    pub progress: Option<&'a ProgressFn>,
    pub cancel: &'a CancellationToken,
}

impl Watch<'_> {
    fn report(&self, info: &MigrateInfo) {
        if let (Some(cb), Some(ram)) = (self.progress, info.ram.as_ref()) {
            cb(&SaveProgress {
                transferred: ram.transferred,
                ram_total: ram.total,
                remaining: ram.remaining,
                mbps: ram.mbps,
                passes: ram.dirty_sync_count,
                elapsed: self.started.elapsed(),
            });
        }
    }

    /// Waits until the save completes: woken by QEMU's `MIGRATION` events (a status change,
    /// e.g. `completed`, is seen at once rather than at the next poll — precopy's pause ends
    /// with it) and every [`PROGRESS`]. `on_tick` runs at every wake-up with the latest
    /// figures (precopy uses it to end the live phase); it may fail the wait.
    pub(crate) async fn until_completed<F, Fut>(
        &self,
        qmp: &Qmp,
        mut on_tick: F,
    ) -> Result<MigrateInfo>
    where
        F: FnMut(MigrateInfo) -> Fut,
        Fut: std::future::Future<Output = Result<()>>,
    {
        let deadline = self.started + self.timeout;
        // Subscribed before the first query, so a status change in between is not missed.
        let mut events = qmp.events();
        loop {
            let info = query(qmp).await?;
            self.report(&info);
            if let Some(e) = failed(&info) {
                return Err(e);
            }
            if info.status.as_deref() == Some("completed") {
                return Ok(info);
            }
            if Instant::now() > deadline {
                return Err(Error::SaveFailed {
                    desc: format!("the memory save did not finish within {:?}", self.timeout),
                });
            }
            on_tick(info).await?;
            let next_status = async {
                loop {
                    match events.next().await {
                        Ok(ev) if ev.name == "MIGRATION" => return,
                        Ok(_) => {}
                        // Missed events: the query tells where the save is.
                        Err(qsnap_qmp::Error::EventsLagged { .. }) => return,
                        // Closed: the query (at the next progress tick) reports why.
                        Err(_) => return std::future::pending().await,
                    }
                }
            };
            tokio::select! {
                () = self.cancel.cancelled() => return Err(Error::Cancelled),
                () = next_status => {}
                () = tokio::time::sleep(PROGRESS) => {}
            }
        }
    }
}
