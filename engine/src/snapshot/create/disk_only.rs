//! Disk-only: one `transaction`, no memory (crash-consistent), the guest never pauses; with
//! `--quiesce` the guest's filesystems are frozen through the guest agent around the switch
//! and **always** thawed afterwards — also when the freeze itself failed or timed out (the
//! guest may have frozen late), on a fresh agent connection if the first one is broken.

use super::Plan;
use crate::error::Result;
use crate::failpoint;
use crate::guest_agent::GuestAgent;
use crate::snapshot::disks;
use crate::snapshot::rollback::Rollback;
use qsnap_qmp::Qmp;
use std::path::Path;
use std::time::Duration;
use tracing::warn;

/// How long each guest agent call may take.
const AGENT_TIMEOUT: Duration = Duration::from_secs(10);

/// Switches the disks; returns how many filesystems were frozen (with `quiesce`).
pub(super) async fn run(
    qmp: &Qmp,
    plan: &Plan,
    quiesce: Option<&Path>,
    rb: &mut Rollback<'_>,
) -> Result<Option<u64>> {
    let pid = qmp.peer_pid();
    let Some(socket) = quiesce else {
        rb.switch_sent();
        disks::switch(qmp, &plan.disks).await?;
        failpoint::hit("create.switched", pid).await?;
        return Ok(None);
    };
    let mut agent = GuestAgent::connect(socket, AGENT_TIMEOUT).await?;
    let frozen = async {
        let n = agent.freeze().await?;
        failpoint::hit("create.freeze-sent", pid).await?;
        Ok::<_, crate::Error>(n)
    }
    .await;
    let frozen = match frozen {
        Ok(n) => n,
        Err(e) => {
            // The freeze may still have happened (a late answer): thaw regardless.
            let _ = thaw(socket, Some(agent)).await;
            return Err(e);
        }
    };
    rb.switch_sent();
    let switched = disks::switch(qmp, &plan.disks).await;
    let thawed = thaw(socket, Some(agent)).await;
    switched?;
    failpoint::hit("create.switched", pid).await?;
    thawed?;
    Ok(Some(frozen))
}

/// Thaws the guest's filesystems: on `agent` if it still answers, else on a new connection
/// (whose sync skips any late reply the first one left).
async fn thaw(socket: &Path, agent: Option<GuestAgent>) -> Result<u64> {
    if let Some(mut a) = agent {
        match a.thaw().await {
            Ok(n) => return Ok(n),
            Err(e) => warn!(error = %e, "thawing on the first agent connection failed; retrying"),
        }
    }
    let r = async {
        let mut fresh = GuestAgent::connect(socket, AGENT_TIMEOUT).await?;
        fresh.thaw().await
    }
    .await;
    if let Err(e) = &r {
        warn!(error = %e, "thawing the guest's filesystems failed");
    }
    r
}
