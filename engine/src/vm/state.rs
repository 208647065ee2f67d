//! The one place that says what state a VM is in — derived from its record, `/proc` and its
//! monitor — and which operations each state allows (after Cloud Hypervisor's
//! `VmState::valid_transition`).
//!
//! ```text
//!              start / revert                    stop
//!   Stopped ─────────────────────▶ Running ─────────────────▶ Stopped
//!      ▲                            │  ▲ create, revert, delete (live)
//!      │ stop (kills it)            ▼  │ monitor answers again
//!      └──────────────────────── Unreachable
//! ```
//! `Unreachable` — the recorded QEMU is alive, or someone serves its monitor socket, but the
//! monitor does not answer — is never taken for `Stopped`: qsnap must not start a second QEMU
//! beside a live one (it would unlink and steal the first one's monitor socket). While another
//! qsnap operation holds the VM its monitor is that operation's, and the state comes from the
//! record and `/proc` alone (`from_record`), never from a monitor that would look unreachable.

use super::Vm;
use crate::error::{Error, Result};
use crate::launch;
use crate::store::VmRecord;
use qsnap_qmp::types;
use serde::Serialize;

/// What a VM is doing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, schemars::JsonSchema)]
#[serde(tag = "state", rename_all = "kebab-case")]
pub enum VmState {
    /// QEMU answers on its monitor; or another qsnap operation holds the VM (its monitor
    /// is that operation's) and the recorded QEMU is alive.
    Running {
        /// QEMU's pid (from the socket's peer credentials), when known.
        pid: Option<u32>,
        /// QEMU's run state (`running`, `paused`, …); `unknown` when its monitor was not
        /// asked (another operation holds it) or did not say.
        runstate: String,
    },
    /// A QEMU is there but its monitor does not answer.
    Unreachable {
        /// Its pid, when known.
        pid: Option<u32>,
        /// What the monitor did instead.
        why: String,
    },
    /// No QEMU runs for this VM.
    Stopped,
}

/// The run state of a [`VmState::Running`] whose monitor was not asked
/// ([`VmState::from_record`]) or did not say.
pub(crate) const RUNSTATE_UNKNOWN: &str = "unknown";

/// What an operation is about to do to a VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operation {
    /// Take a snapshot (needs QEMU's monitor).
    Create,
    /// Go back to a snapshot (relaunches QEMU).
    Revert,
    /// Delete snapshots and merge layers (live or offline).
    Delete,
    /// Start QEMU.
    Start,
    /// Stop QEMU.
    Stop,
}

/// Records which QEMU runs the VM: its pid and when that process started (so a reused pid is
/// never taken for it), or neither.
pub(crate) async fn record_qemu(record: &mut VmRecord, pid: Option<u32>) {
    record.pid_start = match pid {
        Some(p) => crate::proc::start_time(p).await,
        None => None,
    };
    record.pid = pid;
}

impl VmState {
    /// Looks: the monitor first, then the recorded process.
    pub async fn observe(vm: &Vm, record: &VmRecord) -> VmState {
        match vm.connect_quick(record).await {
            Ok(qmp) => {
                let runstate = qmp
                    .execute(types::query_status {})
                    .await
                    .ok()
                    .and_then(|s| serde_json::to_value(s.status).ok())
                    .and_then(|v| v.as_str().map(str::to_owned))
                    .unwrap_or_else(|| RUNSTATE_UNKNOWN.into());
                VmState::Running {
                    pid: qmp.peer_pid().or(record.pid),
                    runstate,
                }
            }
            Err(e) => {
                let why = e.to_string();
                if let Some(pid) = record.pid {
                    if crate::proc::is_recorded_qemu(pid, record.pid_start).await {
                        return VmState::Unreachable {
                            pid: Some(pid),
                            why,
                        };
                    }
                }
                // Stopped only when nobody serves the socket. Connected but no greeting, a
                // listen queue full of clients that gave up, a TCP connect nobody answers:
                // something may serve it (a QEMU whose pid we do not know, another client on
                // its monitor), and "cannot tell" is never "stopped".
                match &e {
                    Error::Qmp { source, .. } if launch::nobody_serves(source) => VmState::Stopped,
                    _ => VmState::Unreachable { pid: None, why },
                }
            }
        }
    }

    /// What the record and `/proc` alone say, for when the monitor must not be asked (another
    /// qsnap operation holds it): the recorded QEMU (same pid and start time) runs (run state
    /// `unknown`) or it does not. `None` when no pid is recorded (a TCP monitor): then only
    /// the monitor can tell.
    pub async fn from_record(record: &VmRecord) -> Option<VmState> {
        let pid = record.pid?;
        Some(
            if crate::proc::is_recorded_qemu(pid, record.pid_start).await {
                VmState::Running {
                    pid: Some(pid),
                    runstate: RUNSTATE_UNKNOWN.into(),
                }
            } else {
                VmState::Stopped
            },
        )
    }

    /// True when QEMU answers.
    pub fn is_running(&self) -> bool {
        matches!(self, VmState::Running { .. })
    }

    /// QEMU's pid, when known.
    pub fn pid(&self) -> Option<u32> {
        match self {
            VmState::Running { pid, .. } | VmState::Unreachable { pid, .. } => *pid,
            VmState::Stopped => None,
        }
    }

    /// Whether `op` may start from this state; the refusal says why and what to do.
    pub fn allows(&self, vm: &str, op: Operation) -> Result<()> {
        use Operation as O;
        match (self, op) {
            (VmState::Running { .. }, O::Create | O::Revert | O::Delete | O::Stop) => Ok(()),
            (VmState::Running { pid, .. }, O::Start) => Err(Error::AlreadyRunning {
                vm: vm.into(),
                pid: pid.unwrap_or(0),
            }),
            (VmState::Stopped, O::Start | O::Revert | O::Delete | O::Stop) => Ok(()),
            (VmState::Stopped, O::Create) => Err(Error::NotRunning { vm: vm.into() }),
            (VmState::Unreachable { .. }, O::Stop) => Ok(()),
            (VmState::Unreachable { pid, why }, O::Create | O::Revert | O::Delete | O::Start) => {
                Err(Error::Unreachable {
                    vm: vm.into(),
                    pid: *pid,
                    why: why.clone(),
                })
            }
        }
    }
}

/// `pid` if it may be signalled as this VM's QEMU: only while it is still the recorded QEMU
/// (its start time checked when it is the recorded pid), never a pid the kernel has since
/// given to another process.
pub(crate) async fn signallable_pid(pid: Option<u32>, record: &VmRecord) -> Option<u32> {
    let p = pid?;
    crate::proc::is_recorded_qemu(p, record.pid_start.filter(|_| record.pid == Some(p)))
        .await
        .then_some(p)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transitions() {
        let running = VmState::Running {
            pid: Some(7),
            runstate: "running".into(),
        };
        let hung = VmState::Unreachable {
            pid: Some(7),
            why: "no greeting".into(),
        };
        let stopped = VmState::Stopped;
        for op in [
            Operation::Create,
            Operation::Revert,
            Operation::Delete,
            Operation::Stop,
        ] {
            assert!(running.allows("v", op).is_ok(), "{op:?}");
        }
        assert!(matches!(
            running.allows("v", Operation::Start),
            Err(Error::AlreadyRunning { pid: 7, .. })
        ));
        assert!(matches!(
            stopped.allows("v", Operation::Create),
            Err(Error::NotRunning { .. })
        ));
        for op in [
            Operation::Start,
            Operation::Revert,
            Operation::Delete,
            Operation::Stop,
        ] {
            assert!(stopped.allows("v", op).is_ok(), "{op:?}");
        }
        // A live QEMU that does not answer is never "stopped": no second QEMU beside it.
        for op in [
            Operation::Start,
            Operation::Create,
            Operation::Revert,
            Operation::Delete,
        ] {
            assert!(
                matches!(hung.allows("v", op), Err(Error::Unreachable { .. })),
                "{op:?}"
            );
        }
        assert!(hung.allows("v", Operation::Stop).is_ok());
    }
}
