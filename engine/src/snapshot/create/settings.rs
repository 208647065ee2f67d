//! The migration settings a memory save needs, each with its undo: capabilities (`events`,
//! and `background-snapshot` for point-in-time, `mapped-ram` + `multifd` for precopy where
//! QEMU has them; everything incompatible off) and a raised
//! `max-bandwidth` (QEMU's default 128 MiB/s would throttle a save to a local file). The undo
//! puts back exactly what preflight read.

use crate::error::{CreateError, Error, Result};
use crate::qemu::{Capability, MigrateSetCapabilities, SetMaxBandwidth};
use crate::snapshot::rollback::{Rollback, Undo};
use crate::store::{Mode, SavedSettings};
use qsnap_qmp::Qmp;

/// Switches on what the save needs and off everything else (postcopy, compression, … are
/// incompatible with a file save or with background-snapshot). Precopy uses `mapped-ram` and
/// `multifd` when the plan allows: measured here, a 512 MiB guest's save took 0.25 s with
/// them and 0.33 s without, its load 0.46 s against 0.66 s (`mapped-ram` alone, one thread,
/// was slower than the plain stream; `docs/performance.md`). In auto mode a host that
/// refuses background-snapshot (no userfaultfd write-protect) falls back to precopy. Returns
/// the mode that will run, the capabilities that are on for it, and why point-in-time was
/// not possible when auto mode fell back (QEMU's words).
pub(super) async fn set_capabilities(
    qmp: &Qmp,
    saved: &SavedSettings,
    mode: Mode,
    plan: &super::Plan,
    rb: &mut Rollback<'_>,
) -> Result<(Mode, Vec<String>, Option<String>)> {
    rb.push(Undo::RestoreSettings(saved.clone()));
    let auto = plan.auto;
    let mut try_mode = mode;
    let mut fell_back = None;
    loop {
        let on: &[&str] = match try_mode {
            Mode::PointInTime => &["events", "background-snapshot"],
            _ if plan.mapped_ram => &["events", "mapped-ram", "multifd"],
            _ => &["events"],
        };
        let want: Vec<Capability> = saved
            .capabilities
            .iter()
            .filter(|(name, state)| *state || on.contains(&name.as_str()))
            .map(|(name, _)| Capability {
                capability: name.clone(),
                state: on.contains(&name.as_str()),
            })
            .collect();
        match qmp
            .execute(MigrateSetCapabilities { capabilities: want })
            .await
        {
            Ok(_) => {
                let on = on.iter().map(|s| (*s).to_owned()).collect();
                return Ok((try_mode, on, fell_back));
            }
            Err(e) if auto && try_mode == Mode::PointInTime => {
                // Said once, by the caller, in the create's report.
                tracing::info!(error = %e, "background-snapshot refused; falling back to precopy");
                fell_back = Some(e.to_string());
                try_mode = Mode::Precopy;
            }
            Err(e)
                if try_mode == Mode::PointInTime
                    && e.to_string().contains("guest memory configuration") =>
            {
                return Err(CreateError::CannotWriteProtect { qemu: e }.into());
            }
            Err(e) => return Err(Error::qmp("setting migration capabilities")(e)),
        }
    }
}

/// Raises `max-bandwidth` so the save runs at disk speed (put back by the settings undo).
pub(super) async fn raise_bandwidth(qmp: &Qmp, saved: &SavedSettings) -> Result<()> {
    if saved.max_bandwidth.is_some() {
        qmp.execute(SetMaxBandwidth {
            max_bandwidth: u64::MAX >> 1,
        })
        .await
        .map_err(Error::qmp("raising max-bandwidth"))?;
    }
    Ok(())
}
