//! [`Error`]'s messages: each says its causes (see the module docs of [`crate::error`]),
//! word for word what users and tests grep for.

use super::{Error, ForgetRefusal, QemuFeature, RemoveRefusal};

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Error::QemuLacks { feature, version } => match feature {
                QemuFeature::BackgroundSnapshot => write!(f, "point-in-time snapshots need background-snapshot, which QEMU {version} lacks; use --mode precopy"),
                QemuFeature::PausedBackgroundSnapshot => write!(f, "QEMU {version} (< 9.0) would resume this paused VM during a point-in-time snapshot; use --mode precopy"),
                QemuFeature::MappedRam { snapshot } => write!(f, "loading snapshot {snapshot}: it was saved in QEMU's mapped-ram format, which this QEMU ({version}) cannot read; start the VM with QEMU ≥ 9.0 (snapshots taken with --no-mapped-ram load on any QEMU)"),
                QemuFeature::LazyRam => write!(f, "lazy RAM needs QEMU ≥ 8.2 (x-ignore-shared, file: migration, a read-only private RAM mapping); this is QEMU {version}"),
            },
            Error::ForeignJob { job } => write!(f, "block-stream job {job} has ended but is not dismissed, and QEMU crashes when asked for its block nodes in that state (a QEMU bug); its owner should dismiss it (`job-dismiss`), then run qsnap again"),
            Error::RemoveRefused { vm, reason } => match reason {
                RemoveRefusal::NotAClone => write!(f, "removing {vm}: it is not a clone, and its overlays hold what its guest wrote; `qsnap delete {vm} --all` merges them into its images"),
                RemoveRefusal::InUse { by, image } => write!(f, "removing {vm}: {by} runs on {} (a clone of one of its snapshots); remove {by} first", image.display()),
            },
            Error::ForgetRefused { vm, reason } => match reason {
                ForgetRefusal::Running { pid } => write!(f, "forgetting {vm}: its QEMU runs{}; `qsnap forget {vm} --stop` stops it first (or `qsnap shutdown {vm}`, then forget)", pid.map(|p| format!(" (pid {p})")).unwrap_or_default()),
                ForgetRefusal::HasSnapshots { snapshots } => write!(f, "forgetting {vm}: it has {} snapshot{} ({}); `qsnap delete {vm} --all` merges them into its images first, or `--with-snapshots` forgets them too (their memory files are removed; every disk image stays)", snapshots.len(), if snapshots.len() == 1 { "" } else { "s" }, snapshots.join(", ")),
                ForgetRefusal::Clone { of } => write!(f, "forgetting {vm}: it is a clone of {of}, and its overlays back onto {of}'s snapshot images, which qsnap keeps only while a registered VM uses them; `qsnap remove {vm}` removes it with its overlays (`qsnap export` first keeps a copy)"),
                ForgetRefusal::InUse { by, image } => write!(f, "forgetting {vm}: {by} runs on {} (a clone of one of its snapshots); remove {by} first", image.display()),
            },
            Error::Unsettled { vm } => write!(f, "an interrupted operation on {vm} must be finished or rolled back first: `qsnap check {vm} --repair`"),
            Error::GuestPaused { vm, runstate } => write!(f, "the guest of {vm} is {runstate}: it cannot act on the power button; `qsnap resume {vm}` first, or `qsnap stop {vm}` to quit QEMU"),
            Error::Create(e) => std::fmt::Display::fmt(e, f),
            Error::Revert(e) => std::fmt::Display::fmt(e, f),
            Error::Delete(e) => std::fmt::Display::fmt(e, f),
            Error::LazyRam(e) => std::fmt::Display::fmt(e, f),
            Error::Bundle(e) => std::fmt::Display::fmt(e, f),
            Error::Qmp { step, source } => write!(f, "{step}: {source}"),
            Error::InvalidName { name, why } => write!(f, "invalid {name}: {why}"),
            Error::BadRunState { state } => write!(f, "the VM is {state}; a snapshot needs it running or paused"),
            Error::Busy { what } => write!(f, "the VM is busy: {what}; try again when it is done"),
            Error::DiskNotSnapshottable { device, why } => write!(f, "disk {device} cannot be snapshotted: {why}"),
            Error::UnusableDirectory { what, path, why } => write!(f, "the {what} {} cannot be used: {why}", path.display()),
            Error::RegisterRefused { vm, why } => write!(f, "cannot register VM \"{vm}\": {why}; nothing was recorded"),
            Error::TargetExists { path } => write!(f, "{} already exists; qsnap never overwrites (pick another snapshot name or remove it)", path.display()),
            Error::Io { what, path, source } => write!(f, "{what} ({}): {source}", path.display()),
            Error::Tool { tool, path, why } => write!(f, "{tool} failed on {}: {why}", path.display()),
            Error::SaveFailed { desc } => write!(f, "saving memory failed: {desc}"),
            Error::StoreBehind { vm, cause, problem } => write!(f, "{cause}; and the store could not be updated ({problem}): run `qsnap check {vm} --repair`"),
            Error::Injected { point } => write!(f, "injected fault at {point}"),
            Error::Cancelled => write!(f, "cancelled; everything was rolled back"),
            Error::BlockJob { job, desc } => write!(f, "block job {job} failed: {desc}"),
            Error::UnknownVm { vm, store, known } => match known {
                None => write!(f, "no VM named \"{vm}\": the store {} does not exist (no VM was ever registered there; is --store or QSNAP_STORE right? `qsnap run {vm} -- qemu-system-…` or `qsnap attach {vm} --qmp SOCKET` registers one)", store.display()),
                Some(k) if k.is_empty() => write!(f, "no VM named \"{vm}\": the store {} has no VMs (`qsnap run {vm} -- qemu-system-…` or `qsnap attach {vm} --qmp SOCKET` registers one)", store.display()),
                Some(k) => match super::kind::closest(vm, k) {
                    Some(near) => write!(f, "no VM named \"{vm}\" in the store {}; did you mean \"{near}\"? (its VMs: {})", store.display(), k.join(", ")),
                    None => write!(f, "no VM named \"{vm}\" in the store {} (its VMs: {}; `qsnap attach {vm} --qmp SOCKET` registers a running QEMU)", store.display(), k.join(", ")),
                },
            },
            Error::VmExists { vm, leftovers: None } => write!(f, "a VM named \"{vm}\" is already in the store"),
            Error::VmExists { vm, leftovers: Some(dir) } => write!(f, "the name \"{vm}\" is held by the files a forgotten VM left in {} (its disk images; its FORGOTTEN file says what they are): move out what you want to keep and remove the folder, or pick another name", dir.display()),
            Error::UnknownSnapshot { vm, snapshot } => write!(f, "VM \"{vm}\" has no snapshot named \"{snapshot}\" (see `qsnap list {vm}`)"),
            Error::SnapshotExists { vm, snapshot } => write!(f, "VM \"{vm}\" already has a snapshot named \"{snapshot}\"; pick another name"),
            Error::Locked { vm, holder } => write!(f, "VM \"{vm}\" is busy with another qsnap operation (pid and operation: {holder}); wait for it to finish"),
            Error::CorruptStore { path, why } => write!(f, "the store file {} is unreadable: {why}", path.display()),
            Error::CommandLine { why } => write!(f, "cannot relaunch from the recorded command line: {why}"),
            Error::LaunchFailed { why, log, tail } => write!(f, "QEMU did not start: {why}{}{}", if log.as_os_str().is_empty() { String::new() } else { format!(" (log {})", log.display()) }, if tail.is_empty() { String::new() } else { format!(":\n{tail}") }),
            Error::AlreadyRunning { vm, pid } => write!(f, "VM \"{vm}\" is running (pid {pid}); stop it first with `qsnap stop {vm}`"),
            Error::NotRunning { vm } => write!(f, "VM \"{vm}\" is not running; start it with `qsnap start {vm}`"),
            Error::Unreachable { vm, pid, why } => write!(f, "VM \"{vm}\"'s QEMU{} is alive but its monitor does not answer ({why}); if another client holds the monitor, give qsnap its own -qmp socket; `qsnap stop {vm}` kills a hung QEMU", pid.map(|p| format!(" (pid {p})")).unwrap_or_default()),
            Error::StopFailed { endpoint, pid, why } => write!(f, "could not stop the QEMU{} at {endpoint}: {why}", pid.map(|p| format!(" (pid {p})")).unwrap_or_default()),
            Error::ForeignQemu { uid, ours } => write!(f, "the QEMU behind this socket runs as uid {uid}, qsnap as uid {ours}; re-running another user's command line is refused unless you ask for it (--allow-other-user)"),
            Error::NeedsDecision { vm, operation, what } => write!(f, "VM \"{vm}\" has an interrupted {operation} that qsnap cannot finish by itself: {what}"),
            Error::UnlinkRefused { path, why } => write!(f, "kept {}: {why}", path.display()),
            Error::Timeout { what, after } => write!(f, "timed out after {after:?} waiting for {what}"),
            Error::StandbyUntouchable { vm, operation } => write!(f, "{vm} is a standby of a pool (`qsnap pool`): its guest must not run before a clone claims it, so `{operation}` is refused; nothing was changed. Clone the snapshot for a VM of your own"),
            Error::CloneRefused { snapshot, why } => write!(f, "cannot clone {snapshot}: {why}; nothing was changed"),
            Error::GuestAgent { socket, what } => write!(f, "guest agent at {}: {what}", socket.display()),
            Error::LeftPaused { what, cause, fix } => write!(f, "{what} ({cause}); the guest is left paused: {fix}"),
            Error::BadMemoryFile { path, why } => write!(f, "{} is not usable: {why}", path.display()),
        }
    }
}
