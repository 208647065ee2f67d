//! Point-in-time memory (background-snapshot): the guest is frozen (`stop`) before QEMU
//! starts the save and before the disks switch, and resumed only once QEMU has saved the
//! device state and armed write protection for RAM; QEMU then writes RAM as it was at `stop`
//! while the guest runs.
//!
//! Every undo is pushed *before* its step: a `stop` or `transaction` that times out may still
//! have happened, and the rollback asks QEMU what did.

use super::{memory_report, start_save, Plan};
use crate::error::{Error, Result};
use crate::failpoint;
use crate::snapshot::disks;
use crate::snapshot::rollback::{Rollback, Undo};
use crate::snapshot::save::{self, Watch};
use crate::store::{CreateReport, Mode};
use qsnap_qmp::{types, Qmp};
use std::time::{Duration, Instant};
use tracing::debug;

pub(super) async fn run(
    qmp: &Qmp,
    plan: &Plan,
    uri: &str,
    watch: &Watch<'_>,
    rb: &mut Rollback<'_>,
) -> Result<CreateReport> {
    let pid = qmp.peer_pid();
    // ---- the freeze: the guest must not run from `stop` to `cont` ----
    let frozen = Instant::now();
    if plan.was_running {
        rb.push(Undo::Resume);
        qmp.execute(types::stop {})
            .await
            .map_err(Error::qmp("pausing the guest"))?;
        failpoint::hit("create.stop-sent", pid).await?;
    }
    failpoint::hit("create.frozen", pid).await?;
    let t_stop = frozen.elapsed();
    let mut events = qmp.events();
    if plan.auto_resumes {
        // QEMU < 9.0 resumes the guest itself right after arming write protection, so the
        // disks must switch before the save starts (the guest is frozen either way).
        rb.switch_sent();
        disks::switch(qmp, &plan.disks).await?;
        failpoint::hit("create.switched", pid).await?;
    }
    rb.push(Undo::CancelMigration);
    start_save(qmp, uri, rb).await?;
    let t_migrate = frozen.elapsed();
    if plan.auto_resumes {
        // Its RESUME is the signal that device state is saved and RAM write-protected.
        events
            .wait_for("QEMU to resume the guest", Duration::from_secs(30), |e| {
                e.name == "RESUME"
            })
            .await
            .map_err(Error::qmp("waiting for the background snapshot to arm"))?;
        rb.forget(|u| matches!(u, Undo::Resume));
    } else {
        // QEMU's thread stops the VM itself and saves device state, arms write protection,
        // then writes RAM: only then may the guest run again. The disks switch meanwhile (the
        // guest is frozen either way, so the order inside the window does not matter, and
        // overlapping the two shortens the pause).
        rb.switch_sent();
        let (armed, switched) = tokio::join!(
            async {
                let r = save::wait_armed(qmp, Duration::from_secs(30)).await;
                debug!(after = ?frozen.elapsed(), "armed");
                r
            },
            async {
                let r = disks::switch(qmp, &plan.disks).await;
                debug!(after = ?frozen.elapsed(), "switched");
                r
            }
        );
        switched?;
        armed?;
        failpoint::hit("create.switched", pid).await?;
    }
    let t_armed_and_switched = frozen.elapsed();
    if plan.was_running && !plan.auto_resumes {
        qmp.execute(types::cont {})
            .await
            .map_err(Error::qmp("resuming the guest"))?;
        rb.forget(|u| matches!(u, Undo::Resume));
    }
    let pause = frozen.elapsed();
    debug!(
        ?t_stop,
        ?t_migrate,
        ?t_armed_and_switched,
        ?pause,
        "pause breakdown (time since stop was sent)"
    );
    failpoint::hit("create.resumed", pid).await?;

    // ---- RAM keeps flowing to the file while the guest runs ----
    let done = watch.until_completed(qmp, |_| async { Ok(()) }).await?;
    rb.forget(|u| matches!(u, Undo::CancelMigration));
    Ok(memory_report(Mode::PointInTime, plan, &done, pause, None))
}
