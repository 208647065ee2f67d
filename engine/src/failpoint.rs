//! Named points between the steps of create, revert, delete, lazy-ram, clone and remove
//! where a test can make things go wrong on cue: qsnap dies there (`crash`: SIGKILL to
//! itself, as a host crash or `kill -9` would), QEMU dies there (`kill-qemu`), the step fails
//! (`error`), a QMP command that did run is reported as timed out (`timeout`, at the
//! points after such a command), or the step is merely slow (`delay:MS`: the operation waits
//! that long there, asynchronously, and goes on — time for a test to interrupt it; or
//! `until-file:PATH`: it waits there until the test creates PATH, at most a minute).
//!
//! Built on the `fail` crate, and only in builds with the `failpoints` feature (the test
//! suite turns it on; release builds leave it off, and then every point compiles to nothing).
//! Points are configured with `FAILPOINTS="create.switched=return(crash)"` in the
//! environment (read by [`setup_from_env`], which the CLI calls) or with `fail::cfg` in a
//! test.

use crate::error::Result;

/// Every failpoint, by operation, in the order an operation passes them. Tests walk this
/// list, so a new step gets fault-injected as soon as it is named here.
#[cfg_attr(not(feature = "testing"), allow(dead_code))] // read by the tests
pub const POINTS: &[&str] = &[
    // create
    "create.journaled",
    "create.prepared",
    "create.frozen",
    "create.switched",
    "create.resumed",
    "create.saved",
    "create.committed",
    "create.recorded",
    // revert
    "revert.journaled",
    "revert.prepared",
    "revert.stopped",
    "revert.launched",
    "revert.loaded",
    "revert.resumed",
    "revert.recorded",
    // delete
    "delete.journaled",
    "delete.removed",
    "delete.unlinking-memory",
    "delete.merge-started",
    "delete.merge-ready",
    "delete.concluded",
    "delete.finalized",
    "delete.merged",
    "delete.rebased",
    "delete.consolidated",
    // run: QEMU launched, nothing recorded yet
    "run.launched",
    // lazy-ram (kill-qemu kills the helper QEMU while it exists)
    "lazy.helper-up",
    "lazy.converted",
    "lazy.made",
    "lazy.switched",
    // clone (kill-qemu kills the clone's QEMU once it exists)
    "clone.recorded",
    "clone.overlays-made",
    "clone.launched",
    "clone.loaded",
    // claim of a standby by a clone (`qsnap pool`); kill-qemu kills the standby's QEMU
    "claim.journaled",
    "claim.moved",
    "claim.recorded",
    "claim.record-released",
    "claim.released",
    "claim.resumed",
    // import (files staged → placed → overlays → manifest → record, the commit)
    "import.planned",
    "import.staged",
    "import.placed",
    "import.overlays-made",
    "import.manifest-written",
    "import.committed",
    // remove (of a clone; its QEMU is stopped from the first point on)
    "remove.stopped",
    "remove.snapshots-removed",
    "remove.images-removed",
];

/// Points after a QMP command that ran, where `timeout` pretends it did not answer in time.
#[cfg_attr(not(feature = "testing"), allow(dead_code))] // read by the tests
pub const TIMEOUT_POINTS: &[&str] = &[
    "create.stop-sent",
    "create.switch-sent",
    "create.freeze-sent",
    // a create's recovery asking whether the guest runs
    "recover.status-sent",
    // a delete's finalize of a merge job (`delete.finalize`, before it is sent, with `error`
    // stands for QEMU refusing it)
    "delete.finalize-sent",
    // a delete: a merge job started, an active one completed, the guest paused and resumed
    // around a disk switch
    "delete.job-sent",
    "delete.complete-sent",
    "delete.pause-sent",
    "delete.resume-sent",
    // loading a memory file (revert, clone, the lazy-RAM helper): capabilities set, the load
    // started; resuming the loaded guest (revert, clone)
    "load.caps-sent",
    "load.incoming-sent",
    "load.cont-sent",
    // lazy-ram: the helper's capabilities for the device-state save, the save started
    "lazy.caps-sent",
    "lazy.save-sent",
];

/// Other points: a create's rollback merging a switched disk back (`error` makes the merge
/// fail, so the disk stays on its overlay), and the lazy-ram switch's write and read-back.
#[cfg_attr(not(feature = "testing"), allow(dead_code))] // read by the tests
pub const OTHER_POINTS: &[&str] = &[
    "rollback.merge-back",
    // a delete's finalize of one merge job refused (`error`; `timeout` at
    // `delete.finalize-sent` for one that ran but did not answer)
    "delete.finalize",
    // a delete reading QEMU's chains after a disk switch, with the guest paused (`error`)
    "delete.chains-read",
    // a create stamping the images it froze, past its point of no return (`error`)
    "create.stamp",
    // a delete restamping the snapshots whose frozen image a merge wrote into (`error`)
    "delete.restamp",
    // a `--quiesce` create's thaw after the switch, and a recovery's retry of it (`error`)
    "create.thaw",
    "recover.thaw",
    // lazy-ram: the manifest switch written but reported as failed, and reading it back
    // failing (`error`)
    "lazy.switch-written",
    "lazy.read-back",
    // an offline disk-only create (stopped VM) after each overlay it made (`error`: rolled
    // back; `crash`: the journal lets the next command remove them)
    "create.offline-overlay",
];

/// Whether this build has failpoints (tests that need them check this first).
#[cfg_attr(not(feature = "testing"), allow(dead_code))] // read by the tests
pub fn enabled() -> bool {
    cfg!(feature = "failpoints")
}

/// Keeps the failpoints configured from the environment until dropped.
pub struct Scenario {
    #[cfg(feature = "failpoints")]
    _inner: Option<fail::FailScenario<'static>>,
}

/// Reads `FAILPOINTS` (a `failpoints` build; otherwise does nothing).
pub fn setup_from_env() -> Scenario {
    #[cfg(feature = "failpoints")]
    {
        if std::env::var_os("FAILPOINTS").is_some() {
            return Scenario {
                _inner: Some(fail::FailScenario::setup()),
            };
        }
        Scenario { _inner: None }
    }
    #[cfg(not(feature = "failpoints"))]
    Scenario {}
}

/// Passes the point `name`; `qemu` is the pid of the QEMU the operation works on (for
/// `kill-qemu`).
#[cfg(feature = "failpoints")]
pub(crate) async fn hit(name: &'static str, qemu: Option<u32>) -> Result<()> {
    use crate::error::Error;
    use nix::sys::signal::{kill, Signal};
    use nix::unistd::Pid;
    let Some(action) = fail::eval(name, |arg| arg.unwrap_or_default()) else {
        return Ok(());
    };
    tracing::warn!(point = name, %action, "failpoint");
    if let Some(path) = action.strip_prefix("until-file:") {
        // Held until the test says go (it creates the file), however loaded the machine:
        // bounded at a minute, so a test that forgets fails rather than hangs.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        while !std::path::Path::new(path).exists() && std::time::Instant::now() < deadline {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        return Ok(());
    }
    if let Some(ms) = action.strip_prefix("delay:").and_then(|ms| ms.parse().ok()) {
        // The fail crate's own `sleep(…)` would block a runtime worker; this waits on the
        // timer, so signal handlers and other tasks run meanwhile.
        tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
        return Ok(());
    }
    match action.as_str() {
        "crash" => {
            let _ = kill(Pid::this(), Signal::SIGKILL);
            // SIGKILL to ourselves does not return; make sure nothing runs on regardless.
            std::process::abort()
        }
        "kill-qemu" => {
            if let Some(pid) = qemu.and_then(|p| i32::try_from(p).ok()) {
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
                // Wait until it is gone (bounded), so the next step sees a dead QEMU.
                for _ in 0..500 {
                    if !crate::proc::alive(pid.unsigned_abs()).await {
                        break;
                    }
                    tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                }
            }
            Ok(())
        }
        "timeout" => Err(Error::Qmp {
            step: "an injected timeout",
            source: qsnap_qmp::Error::Timeout {
                command: name.to_owned(),
                after: std::time::Duration::ZERO,
            },
        }),
        _ => Err(Error::Injected {
            point: name.to_owned(),
        }),
    }
}

/// Passes the point `name` (a build without failpoints: nothing happens).
#[cfg(not(feature = "failpoints"))]
#[inline(always)]
pub(crate) async fn hit(_name: &'static str, _qemu: Option<u32>) -> Result<()> {
    Ok(())
}
