//! Precopy memory: the guest runs while QEMU copies RAM; QEMU pauses it to finish (qsnap
//! pauses it itself if the live phase outlasts its limit), and the disks switch while it is
//! paused. The memory is the state at the end of the copy.

use super::{memory_report, start_save, Plan};
use crate::error::{Error, Result};
use crate::failpoint;
use crate::qemu::BlockdevSetActive;
use crate::snapshot::disks;
use crate::snapshot::rollback::{Rollback, Undo};
use crate::snapshot::save::{self, Watch};
use crate::store::{CreateReport, LivePhase, Mode};
use qsnap_qmp::{types, Qmp};
use std::time::{Duration, Instant};
use tracing::info;

pub(super) async fn run(
    qmp: &Qmp,
    plan: &Plan,
    uri: &str,
    watch: &Watch<'_>,
    live_limit: Duration,
    rb: &mut Rollback<'_>,
) -> Result<CreateReport> {
    let pid = qmp.peer_pid();
    let mut events = qmp.events();
    if plan.was_running {
        // QEMU pauses the guest to finish; a failure at any point must resume it.
        rb.push(Undo::Resume);
    }
    rb.push(Undo::CancelMigration);
    start_save(qmp, uri, rb).await?;
    let live_started = Instant::now();
    let mut forced_at: Option<Instant> = None;
    let mut passes = 0;
    let done = watch
        .until_completed(qmp, |info| {
            passes = info.ram.as_ref().map_or(passes, |r| r.dirty_sync_count);
            let force =
                plan.was_running && forced_at.is_none() && live_started.elapsed() > live_limit;
            if force {
                forced_at = Some(Instant::now());
            }
            async move {
                if force {
                    info!(
                        ?live_limit,
                        "precopy did not converge; pausing the guest to finish"
                    );
                    qmp.execute(types::stop {})
                        .await
                        .map_err(Error::qmp("pausing the guest to finish the save"))?;
                }
                Ok(())
            }
        })
        .await?;
    rb.forget(|u| matches!(u, Undo::CancelMigration));
    save::wait_finalized(qmp).await?;
    failpoint::hit("create.frozen", pid).await?;
    let live_ms = super::ms(forced_at.unwrap_or_else(Instant::now) - live_started);
    // The pause began when QEMU (or qsnap) stopped the vCPUs.
    let mut paused_at = forced_at;
    while let Some(ev) = events.try_next() {
        if ev.name == "STOP" && paused_at.is_none() {
            paused_at = Some(ev.received);
        }
    }
    rb.switch_sent();
    disks::switch(qmp, &plan.disks).await?;
    failpoint::hit("create.switched", pid).await?;
    if plan.was_running {
        qmp.execute(types::cont {})
            .await
            .map_err(Error::qmp("resuming the guest"))?;
        rb.forget(|u| matches!(u, Undo::Resume));
    } else if crate::features::Features::of(qmp)
        .await
        .is_ok_and(|f| f.blockdev_set_active)
    {
        // A paused VM stays paused, but its disks must not stay inactive.
        qmp.execute(BlockdevSetActive { active: true })
            .await
            .map_err(Error::qmp("reactivating the disks"))?;
    }
    let pause = paused_at.map(|t| t.elapsed()).unwrap_or_default();
    failpoint::hit("create.resumed", pid).await?;
    let live = LivePhase {
        live_ms,
        passes: done.ram.as_ref().map_or(passes, |r| r.dirty_sync_count),
        forced_pause: forced_at.is_some(),
    };
    Ok(memory_report(Mode::Precopy, plan, &done, pause, Some(live)))
}
