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

/// What a disk-only switch did.
pub(super) struct Switched {
    /// With `quiesce`: how many filesystems were frozen.
    pub frozen: Option<u64>,
    /// With `quiesce`: why the thaw after a good switch failed (the snapshot stands).
    pub thaw_failed: Option<String>,
}

/// Switches the disks; with `quiesce`, around a freeze of the guest's filesystems. Once the
/// switch is done the snapshot stands: a thaw that fails then does not undo it, it is
/// reported (`thaw_failed`) so that the caller keeps retrying it.
pub(super) async fn run(
    qmp: &Qmp,
    plan: &Plan,
    quiesce: Option<&Path>,
    rb: &mut Rollback<'_>,
) -> Result<Switched> {
    let pid = qmp.peer_pid();
    let Some(socket) = quiesce else {
        rb.switch_sent();
        disks::switch(qmp, &plan.disks).await?;
        failpoint::hit("create.switched", pid).await?;
        return Ok(Switched {
            frozen: None,
            thaw_failed: None,
        });
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
    let thawed = match failpoint::hit("create.thaw", pid).await {
        Ok(()) => thaw(socket, Some(agent)).await,
        Err(e) => Err(e),
    };
    switched?;
    failpoint::hit("create.switched", pid).await?;
    Ok(Switched {
        frozen: Some(frozen),
        thaw_failed: thawed.err().map(|e| e.to_string()),
    })
}

/// Thaws the guest's filesystems on a new agent connection (a thaw a failed create still
/// owes them).
pub(crate) async fn thaw_guest(socket: &Path) -> Result<u64> {
    thaw(socket, None).await
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
