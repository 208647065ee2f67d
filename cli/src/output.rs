//! Everything the binary prints about what a command did: results on stdout (human text or
//! `--json`), notes and non-fatal warnings from the engine's reports on stderr. Nothing else
//! writes to stdout (`main` writes only the error line and the interrupt messages to stderr).
//!
//! This module must never decide anything: it takes what the engine returned and formats it,
//! calling no engine operation and reading no file.

use qsnap_engine::launch::{KillSignal, StopOutcome};
use qsnap_engine::snapshot::Mode;
use qsnap_engine::{
    CheckReport, CreateOutcome, DeleteReport, LazyReport, Manifest, Recovery, RevertReport,
    RunReport, Status, VmInfo, VmRecord, VmState,
};
use serde::Serialize;

/// `println!` that does not panic when stdout is closed early (`qsnap list | head -1`): the
/// reader has what it wanted.
macro_rules! println {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($t)*);
    }};
}
use serde_json::Value;
use std::collections::BTreeMap;

// After the `println!` above: the child uses it too.
pub mod json;
mod transfer;
pub use transfer::{collected, exported, imported, keys, pulled, pushed, remote_list};

#[allow(clippy::cast_precision_loss)]
fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}

/// A file's size as `du` sees it, and as `ls -l` does when that differs (a sparse file).
fn sized(s: qsnap_engine::Size) -> String {
    if s.apparent > s.allocated && s.apparent - s.allocated >= 1 << 20 {
        format!(
            "{} ({} apparent, sparse)",
            mib(s.allocated),
            mib(s.apparent)
        )
    } else {
        mib(s.allocated)
    }
}

/// Prints a QMP reply as pretty JSON.
///
/// QEMU's own reply, as QEMU shaped it: not one of qsnap's versioned outputs (`json`).
pub fn qmp_reply(reply: &Value) {
    println!(
        "{}",
        serde_json::to_string_pretty(reply).expect("a JSON value serialises")
    );
}

/// Prints a VM summary.
pub fn vm_info(info: &VmInfo, as_json: bool) {
    if as_json {
        return json::print(info);
    }
    let yes_no = |b: bool| if b { "yes" } else { "no" };
    println!(
        "QEMU           {} ({})",
        info.qemu_version, info.qemu_package
    );
    println!(
        "state          {}{}",
        info.runstate,
        if info.running { " (vCPUs running)" } else { "" }
    );
    if let Some(m) = &info.migration_status {
        println!("migration      {m}");
    }
    if info.migration_blockers.is_empty() {
        println!("memory save    possible");
    } else {
        println!("memory save    BLOCKED:");
        for b in &info.migration_blockers {
            println!("               - {b}");
        }
    }
    println!(
        "mechanisms     background-snapshot: {}, file: migration to an fdset: {}",
        yes_no(info.background_snapshot),
        yes_no(info.file_migration)
    );
    println!("disks          {}", info.disks.len());
    for d in &info.disks {
        let name = &d.name;
        match &d.file {
            Some(file) => println!(
                "  {name:<12} {} [{}]{}",
                file,
                d.format.as_deref().unwrap_or("?"),
                if d.read_only { " read-only" } else { "" }
            ),
            None => println!("  {name:<12} (empty)"),
        }
    }
}

/// Prints a freshly attached VM.
pub fn attached(rec: &VmRecord, as_json: bool) {
    if as_json {
        return json::print(rec);
    }
    println!("attached {} (QMP {})", rec.name, rec.qmp);
    match (&rec.pid, &rec.command) {
        (Some(pid), Some(_)) => println!("  QEMU pid {pid}; command line recorded for relaunch"),
        (Some(pid), None) => println!("  QEMU pid {pid}; its command line could not be read"),
        _ => println!("  QEMU's pid is unknown (TCP monitor); relaunch will not be possible"),
    }
    for d in &rec.disks {
        println!("  disk {:<10} {}", d.device, d.image.display());
    }
}

/// Prints what `run` did: a note on stderr when it pinned the TSC frequency, then the record.
pub fn ran(r: &RunReport, as_json: bool) {
    if let Some((hz, source)) = &r.tsc_pinned {
        eprintln!(
            "qsnap: the CPU asks for invtsc: added tsc-frequency={hz} (from {source}) so memory snapshots work; --no-tsc-fix turns this off"
        );
    }
    if as_json {
        return json::print(&r.record);
    }
    let rec = &r.record;
    match rec.pid {
        Some(pid) => println!("started {} (QEMU pid {pid}; QMP {})", rec.name, rec.qmp),
        None => println!("started {} (QMP {})", rec.name, rec.qmp),
    }
    if let Some(cmd) = &rec.command {
        match qsnap_engine::launch::argv::serial_file(&cmd.argv) {
            Some(s) => println!(
                "  the guest's console goes to {}",
                cmd.cwd.join(&s.path).display()
            ),
            None => println!("  the guest's console is not in a file (its first -serial is not file: or a -chardev file)"),
        }
    }
    if let Some(log) = &r.log {
        println!("  QEMU's own messages go to {}", log.display());
    }
    for d in &rec.disks {
        println!("  disk {:<10} {}", d.device, d.image.display());
    }
}

/// Prints a VM `start` started.
pub fn started(vm: &str, pid: Option<u32>) {
    match pid {
        Some(pid) => println!("{vm} started (pid {pid})"),
        None => println!("{vm} started"),
    }
}

/// Says that `start` found the VM running: nothing to do.
pub fn already_running(vm: &str, pid: u32) {
    println!("{vm} is running already (pid {pid}); nothing to start");
}

/// Says what `pause` (or, `resumed`, `resume`) did.
pub fn paused(vm: &str, outcome: qsnap_engine::PauseOutcome, resumed: bool) {
    use qsnap_engine::PauseOutcome::{Already, Done};
    match (outcome, resumed) {
        (Done, false) => println!("{vm} paused (QEMU runs on; `qsnap resume {vm}` goes on)"),
        (Already, false) => println!("{vm} was paused already"),
        (Done, true) => println!("{vm} resumed: the guest is running"),
        (Already, true) => println!("{vm} was running already"),
    }
}

/// Says on stderr that an operation found an interrupted one and settled it first.
pub fn recovered(r: &Recovery) {
    eprintln!(
        "qsnap: an interrupted {} (qsnap pid {}, started {}) was settled first: {}",
        r.operation, r.qsnap_pid, r.started_at, r.outcome
    );
}

/// Prints what `create` did: a warning on stderr when the memory could not be made lazy
/// (the snapshot was taken all the same), then the snapshot.
pub fn created(c: &CreateOutcome, as_json: bool) {
    if let Some(why) = &c.manifest.snapshot.fell_back {
        eprintln!("qsnap: note: a point-in-time snapshot was not possible here ({why}); this one was taken with precopy (memory as at the end of the copy)");
    }
    if let Some(e) = &c.lazy_ram_failed {
        eprintln!("qsnap: warning: the snapshot was taken, but its memory stays a stream (reverts load it): {e}");
    }
    snapshot(&c.manifest, None, as_json);
}

/// Prints a snapshot: the summary after `create`, or `show` (with what it takes on disk).
pub fn snapshot(m: &Manifest, usage: Option<&qsnap_engine::SnapshotUsage>, as_json: bool) {
    if as_json {
        return json::print(&json::Shown { manifest: m, usage });
    }
    let s = &m.snapshot;
    println!("snapshot {} of {} ({})", m.name, m.vm, s.mode);
    if let Some(d) = &m.description {
        println!("  description    {d}");
    }
    println!("  taken          {}", m.created_at);
    if let Some(p) = &m.parent {
        println!("  parent         {p}");
    }
    println!(
        "  guest          {}",
        match (s.was_running, s.mode) {
            (true, _) => "running",
            // A disk-only snapshot of a VM that was not running: paused, or stopped (offline).
            (false, Mode::DiskOnly) => "not running",
            (false, _) => "paused",
        }
    );
    if s.mode != Mode::DiskOnly {
        let qemu = s
            .qemu_downtime_ms
            .map(|d| format!(" (QEMU says {d} ms)"))
            .unwrap_or_default();
        println!("  guest paused   {:.1} ms{qemu}", s.pause_ms);
    }
    if let Some(live) = &s.live_phase {
        println!(
            "  live copy      {:.0} ms, {} passes{}",
            live.live_ms,
            live.passes,
            if live.forced_pause {
                " — did not converge in time, qsnap paused the guest to finish"
            } else {
                ""
            }
        );
    }
    match &s.memory {
        Some(mem) => {
            let kind = if mem.lazy.is_some() {
                "lazy: a RAM image reverts map, and device state"
            } else {
                "QEMU's stream"
            };
            println!(
                "  memory         {} ({kind}; the guest had {} RAM)",
                mem.file.display(),
                mib(mem.ram_bytes)
            );
            if let Some(size) = usage.and_then(|u| u.memory) {
                println!("  memory on disk {}", sized(size));
            }
        }
        None => match s.quiesced_filesystems {
            Some(n) => println!(
                "  memory         none (disk-only; {n} guest filesystem(s) frozen for the switch)"
            ),
            None => println!("  memory         none (disk-only, crash-consistent)"),
        },
    }
    for d in &s.disks {
        println!("  disk {:<9} {} (frozen)", d.device, d.image.display());
    }
    if let Some(u) = usage.filter(|u| u.layers.apparent > 0) {
        println!(
            "  layers         {} (disk layers qsnap made that it froze)",
            sized(u.layers)
        );
    }
    for d in &s.skipped {
        println!("  skipped        {} ({})", d.device, d.reason);
    }
    println!("  took           {:.0} ms", s.total_ms);
}

/// Prints a VM's snapshots as a tree.
pub fn list(l: &qsnap_engine::Listing, as_json: bool) {
    if as_json {
        return json::print(l);
    }
    tree(l);
}

/// `list` without a name: every VM's tree, one after the other (`--json`: a list of what
/// `list VM --json` prints, or `{"vm", "error"}` for a VM that cannot be read).
pub fn list_all(
    store: &std::path::Path,
    all: &[(
        qsnap_engine::VmName,
        qsnap_engine::Result<qsnap_engine::Listing>,
    )],
    as_json: bool,
) {
    if answered_for_all(store, all, as_json, NAMED) {
        return;
    }
    for (i, (name, l)) in all.iter().enumerate() {
        if i > 0 {
            println!();
        }
        match l {
            Ok(l) => {
                println!("{name}:");
                tree(l);
            }
            Err(e) => println!("{name}: cannot be read: {e}"),
        }
    }
}

/// How `status` over every VM names a VM it could not read: as `status VM` does, a string.
const NAME: fn(&qsnap_engine::VmName) -> String = |n| n.to_string();
/// How `list` over every VM names one it could not read: as `list VM` does, an object with
/// its `name` (`vm` is the record there).
const NAMED: fn(&qsnap_engine::VmName) -> json::Named = |n| json::Named {
    name: n.to_string(),
};

/// What every command "on all VMs" prints before its text: with `--json`, the list of the
/// one-VM objects (`{"vm", "error"}` for a VM that cannot be read); without, that the store
/// has no VMs. True when that was the whole answer.
fn answered_for_all<T: Serialize, V: Serialize>(
    store: &std::path::Path,
    all: &[(qsnap_engine::VmName, qsnap_engine::Result<T>)],
    as_json: bool,
    vm: fn(&qsnap_engine::VmName) -> V,
) -> bool {
    if as_json {
        let items: Vec<json::ForVm<&T, V>> = all
            .iter()
            .map(|(name, one)| match one {
                Ok(one) => json::ForVm::Read(one),
                Err(e) => json::ForVm::Unreadable {
                    vm: vm(name),
                    error: json::Failure {
                        kind: e.kind(),
                        message: e.to_string(),
                        fix: e.fix(),
                    },
                },
            })
            .collect();
        json::print_each(&items);
        return true;
    }
    if all.is_empty() {
        println!("the store {} has no VMs", store.display());
        return true;
    }
    false
}

/// A VM's snapshots as a tree, and what they take on disk.
fn tree(l: &qsnap_engine::Listing) {
    let (rec, all, usage) = (&l.vm, &l.snapshots, &l.usage);
    if all.is_empty() {
        println!("{} has no snapshots", rec.name);
        return;
    }
    let mut children: BTreeMap<Option<&str>, Vec<&Manifest>> = BTreeMap::new();
    for m in all {
        // A parent that was deleted makes its children roots.
        let parent = m
            .parent
            .as_deref()
            .filter(|p| all.iter().any(|o| o.name == *p));
        children.entry(parent).or_default().push(m);
    }
    // A snapshot with one child goes on in the same column (a chain of a hundred stays as
    // wide as a chain of two); where there are several, each branch is drawn.
    fn walk(
        node: Option<&str>,
        prefix: &str,
        children: &BTreeMap<Option<&str>, Vec<&Manifest>>,
        current: Option<&str>,
        usage: &qsnap_engine::Usage,
    ) {
        let kids = children.get(&node).map(Vec::as_slice).unwrap_or_default();
        for (i, m) in kids.iter().enumerate() {
            let (head, rest) = match (kids.len() > 1, i + 1 == kids.len()) {
                (false, _) => ("", ""),
                (true, false) => ("├─ ", "│  "),
                (true, true) => ("└─ ", "   "),
            };
            let mark = if current == Some(m.name.as_str()) {
                "*"
            } else {
                " "
            };
            let own = usage.snapshots.iter().find(|u| u.name == m.name);
            // What it takes on disk (allocated, as `du`): memory files and the layers it froze.
            let taken = own.map_or(0, |u| {
                u.memory.map_or(0, |s| s.allocated) + u.layers.allocated
            });
            let mem = match (&m.snapshot.memory, own) {
                (None, _) => format!("{:>10} disk only", mib(taken)),
                (Some(x), _) if x.lazy.is_some() => format!("{:>10} lazy RAM", mib(taken)),
                (Some(_), _) => format!("{:>10}", mib(taken)),
            };
            let about = m
                .description
                .as_deref()
                .map(|d| format!("  {d}"))
                .unwrap_or_default();
            println!(
                "{mark} {prefix}{head}{:<20} {}  {:<13} {}{about}",
                m.name,
                m.created_at,
                m.snapshot.mode.to_string(),
                mem,
            );
            walk(
                Some(m.name.as_str()),
                &format!("{prefix}{rest}"),
                children,
                current,
                usage,
            );
        }
    }
    walk(None, "", &children, rec.current.as_deref(), usage);
    println!(
        "on disk: {} in all (snapshots' memory and the layers qsnap made; {} of them written since the current snapshot)",
        sized(usage.total),
        mib(usage.current.allocated)
    );
}

/// Prints a VM's status.
pub fn status(st: &Status, as_json: bool) {
    if as_json {
        return json::print(st);
    }
    match &st.state {
        VmState::Running { pid: Some(pid), .. } if st.busy.is_some() => println!(
            "{}: QEMU up (pid {pid}); the guest's state is not asked while an operation holds its monitor",
            st.vm
        ),
        VmState::Running {
            pid: Some(pid),
            runstate,
        } => println!(
            "{}: QEMU up (pid {pid}); {}",
            st.vm,
            guest_state(runstate, &st.vm)
        ),
        VmState::Running { runstate, .. } => {
            println!("{}: QEMU up; {}", st.vm, guest_state(runstate, &st.vm));
        }
        VmState::Unreachable { pid, why } => println!(
            "{}: running but UNREACHABLE — its QEMU{} is alive, but its monitor does not answer ({why})",
            st.vm,
            pid.map(|p| format!(" (pid {p})")).unwrap_or_default()
        ),
        VmState::Stopped => println!("{}: stopped", st.vm),
    }
    if let Some(b) = &st.busy {
        println!(
            "busy: {} in progress (qsnap pid {}{}); the VM's monitor is that operation's until it ends",
            b.operation,
            b.pid,
            b.since
                .as_deref()
                .map(|t| format!(", since {t}"))
                .unwrap_or_default()
        );
    }
    println!(
        "current snapshot: {}",
        st.current.as_deref().unwrap_or("(none)")
    );
    for d in &st.disks {
        println!("  {:<10} {}", d.device, chain_line(&d.chain));
    }
    if let Some(s) = &st.standby_of {
        println!(
            "standby of {} at snapshot {} (`qsnap pool`): its guest has not run; `qsnap clone {} {} NEW` claims it",
            s.vm, s.snapshot, s.vm, s.snapshot
        );
    } else if let Some(c) = &st.clone_of {
        println!(
            "clone of {} at snapshot {}{}; its own copies:",
            c.vm,
            c.snapshot,
            c.standby
                .as_ref()
                .map(|s| format!(" (from standby {s})"))
                .unwrap_or_default()
        );
        moved(&c.moved);
    }
    for p in &st.pools {
        println!(
            "pool of snapshot {}: {} of {} standby(s) there{}{}",
            p.snapshot,
            p.standbys.len(),
            p.size,
            if p.standbys.is_empty() { "" } else { ": " },
            p.standbys.join(", ")
        );
    }
    if let Some(i) = &st.interrupted {
        println!(
            "interrupted: {} (qsnap pid {}, started {}) did not finish, and that qsnap is gone; \
             the next command on {vm} (or `qsnap check {vm} --repair`) finishes or rolls it back",
            i.operation,
            i.qsnap_pid,
            i.started_at,
            vm = st.vm
        );
    }
}

/// `status` without a name: one line per VM (`--json`: a list of what `status VM --json`
/// prints, or `{"vm", "error"}` for a VM that cannot be read).
pub fn status_all(
    store: &std::path::Path,
    all: &[(qsnap_engine::VmName, qsnap_engine::Result<Status>)],
    as_json: bool,
) {
    if answered_for_all(store, all, as_json, NAME) {
        return;
    }
    println!(
        "{:<20} {:<12} {:>8}  {:<20} {:>9}  CLONE OF",
        "VM", "STATE", "PID", "CURRENT", "SNAPSHOTS"
    );
    for (name, st) in all {
        let st = match st {
            Ok(st) => st,
            Err(e) => {
                println!("{name:<20} cannot be read: {e}");
                continue;
            }
        };
        let mut state = match (&st.state, &st.busy) {
            (_, Some(b)) => format!("busy: {}", b.operation),
            (VmState::Running { runstate, .. }, None) => runstate.clone(),
            (VmState::Unreachable { .. }, None) => "unreachable".into(),
            (VmState::Stopped, None) => "stopped".into(),
        };
        if st.interrupted.is_some() {
            state.push_str(" (interrupted)");
        }
        if st.standby_of.is_some() && st.busy.is_none() {
            state = "standby".into();
        }
        println!(
            "{:<20} {:<12} {:>8}  {:<20} {:>9}  {}",
            name.as_str(),
            state,
            st.pid.map(|p| p.to_string()).unwrap_or_else(|| "-".into()),
            st.current.as_deref().unwrap_or("-"),
            st.snapshots,
            st.clone_of
                .as_ref()
                .map(|c| format!("{}/{}", c.vm, c.snapshot))
                .unwrap_or_else(|| "-".into())
        );
    }
}

/// What QEMU's run state means for the guest, in words.
fn guest_state(runstate: &str, vm: &str) -> String {
    match runstate {
        "running" => "the guest is running".into(),
        "paused" => format!("the guest is PAUSED (`qsnap resume {vm}`)"),
        "shutdown" => "the guest has powered off (QEMU stays: -no-shutdown)".into(),
        "inmigrate" => "the guest waits for its state to load".into(),
        other => format!("the guest is not running (QEMU's run state: {other})"),
    }
}

/// Prints how `stop` stopped a VM.
pub fn stopped(vm: &str, outcome: &StopOutcome) {
    match outcome {
        StopOutcome::Quit { pid: Some(pid) } => {
            println!("{vm} stopped: its QEMU (pid {pid}) quit when asked")
        }
        StopOutcome::Quit { pid: None } => println!("{vm} stopped: its QEMU quit when asked"),
        StopOutcome::Killed {
            pid,
            signal: KillSignal::Term,
            why,
        } => println!("{vm} stopped: {why}; its QEMU (pid {pid}) was terminated (SIGTERM)"),
        StopOutcome::Killed { pid, signal, why } => {
            println!("{vm} stopped: {why}; its QEMU (pid {pid}) was killed ({signal})")
        }
        StopOutcome::AlreadyStopped => println!("{vm} was not running; nothing to stop"),
    }
}

/// An error as JSON (`--json`): `{"format": 1, "error": {"kind", "message", "fix"}}`, on
/// stdout so that a script reading it gets an object either way, or on stderr when stdout
/// carries data (`export … -`).
pub fn error(kind: qsnap_engine::ErrorKind, message: &str, fix: Option<&str>, on_stderr: bool) {
    let failed = json::Failed {
        error: json::Failure {
            kind,
            message: message.to_owned(),
            fix: fix.map(str::to_owned),
        },
    };
    if on_stderr {
        eprintln!("{}", json::render(&failed));
    } else {
        json::print(&failed);
    }
}

/// Says how `shutdown` ended the VM.
pub fn shut_down(vm: &str, outcome: &qsnap_engine::ShutdownOutcome, as_json: bool) {
    use qsnap_engine::ShutdownOutcome as S;
    if as_json {
        return json::print(&json::ShutDown {
            vm,
            outcome: outcome.into(),
        });
    }
    match outcome {
        S::PoweredOff { after } => println!(
            "{vm} shut down: the guest powered off {:.1} s after the power button",
            after.as_secs_f64()
        ),
        S::Forced { waited, stop } => {
            println!(
                "{vm}: the guest did not power off within {:.0} s of the power button; stopping its QEMU",
                waited.as_secs_f64()
            );
            stopped(vm, stop);
        }
        S::AlreadyStopped => println!("{vm} was not running; nothing to shut down"),
    }
}

/// Says what `forget` did and what it left on disk.
pub fn forgotten(r: &qsnap_engine::ForgetReport, as_json: bool) {
    if as_json {
        return json::print(r);
    }
    println!(
        "{} forgotten{}{}",
        r.vm,
        if r.stopped {
            " (its QEMU was stopped first)"
        } else {
            ""
        },
        if r.snapshots.is_empty() {
            String::new()
        } else {
            format!(
                ", with its snapshot{} {} (memory files removed)",
                if r.snapshots.len() == 1 { "" } else { "s" },
                r.snapshots.join(", ")
            )
        }
    );
    println!("its disks, kept (boot from these):");
    for d in &r.disks {
        println!("  {:<16} {}", d.device, d.image.display());
    }
    let extra: Vec<_> = r
        .kept_images
        .iter()
        .filter(|p| !r.disks.iter().any(|d| &d.image == *p))
        .collect();
    if !extra.is_empty() {
        println!("images qsnap had made for it, kept (each needs its backing file):");
        for p in extra {
            println!("  {}", p.display());
        }
    }
    if let Some(dir) = &r.left_in_store {
        println!(
            "left in the store: {} (its disk images live there; no VM can be called {} until you move them out and remove the folder)",
            dir.display(),
            r.vm
        );
    }
}

fn moved(list: &[qsnap_engine::store::MovedPath]) {
    for m in list {
        println!(
            "  {:<16} {} (was {})",
            m.option,
            m.to.display(),
            m.from.display()
        );
    }
}

/// Prints what a clone did.
pub fn cloned(r: &qsnap_engine::CloneReport, as_json: bool) {
    if as_json {
        return json::print(r);
    }
    println!(
        "{} cloned from {} at snapshot {} in {:.0} ms ({}; guest {})",
        r.vm,
        r.source,
        r.snapshot,
        r.total_ms,
        r.ram,
        if r.resumed { "running" } else { "paused" }
    );
    match (&r.standby, &r.cold_because) {
        (Some(sb), _) => println!(
            "  {:<16} {sb} (started and loaded ahead of time; the pool refills in the background)",
            "from standby"
        ),
        (None, Some(why)) => println!("  {:<16} none: {why}", "from standby"),
        (None, None) => {}
    }
    for d in &r.disks {
        println!("  {:<16} {}", d.device, d.overlay.display());
    }
    moved(&r.moved);
    println!("  {:<16} {}", "monitor", r.qmp.display());
    println!("  {:<16} {}", "QEMU log", r.log.display());
    for n in &r.notes {
        eprintln!("note: {n}");
    }
}

/// Prints what `pool` did.
pub fn pooled(r: &qsnap_engine::PoolReport, as_json: bool) {
    if as_json {
        return json::print(r);
    }
    if r.size == 0 {
        println!("{}/{}: no pool", r.vm, r.snapshot);
    } else {
        println!(
            "{}/{}: {} of {} standby(s) ready in {:.0} ms ({} made now)",
            r.vm,
            r.snapshot,
            r.ready.len(),
            r.size,
            r.total_ms,
            r.made.len()
        );
    }
    for sb in &r.ready {
        println!("  ready      {sb}");
    }
    for d in &r.discarded {
        println!("  discarded  {}: {}", d.standby, d.why);
    }
}

/// Prints what removing a clone did.
pub fn removed(r: &qsnap_engine::RemoveReport, as_json: bool) {
    if as_json {
        return json::print(r);
    }
    println!(
        "{} removed{}: {} image(s), {} snapshot(s)",
        r.vm,
        if r.stopped { " (its QEMU stopped)" } else { "" },
        r.removed.len(),
        r.snapshots.len()
    );
    for m in &r.source_merges {
        println!(
            "  merged {} of the source ({}: only the clone had kept it)",
            m.lower.display(),
            m.kind
        );
    }
    if let Some(n) = &r.source_note {
        eprintln!("note: {n}");
    }
}

/// Prints what a revert did.
pub fn reverted(vm: &str, r: &RevertReport, as_json: bool) {
    if as_json {
        return json::print(r);
    }
    if let Some(k) = &r.kept_current {
        println!("the state before the revert was saved as snapshot {k}");
    }
    if r.memory_restored {
        println!(
            "{vm} reverted to {} in {:.0} ms (memory checked in {:.0} ms{}, loaded in {:.0} ms); the guest is {}",
            r.snapshot,
            r.total_ms,
            r.verify_ms,
            if r.memory_verified_before {
                ": unchanged since an earlier revert read it"
            } else {
                ""
            },
            r.load_ms,
            if r.resumed { "running" } else { "paused" }
        );
        println!("  RAM: {}", r.ram);
    } else {
        println!(
            "{vm} reverted to disk-only snapshot {} in {:.0} ms: it booted from the snapshot's disks (no memory was saved)",
            r.snapshot, r.total_ms
        );
    }
    for d in &r.disks {
        println!(
            "  disk {:<9} {} (new overlay over {})",
            d.device,
            d.overlay.display(),
            d.image.display()
        );
    }
    if r.removed.is_empty() && r.kept_current.is_none() {
        println!("  the state since the last snapshot was discarded");
    }
    for p in &r.removed {
        println!(
            "  discarded the state since the last snapshot: removed {}",
            p.display()
        );
    }
    for m in &r.merges {
        println!(
            "  merged {} ({}: {})",
            m.lower.display(),
            m.kind,
            if r.kept_current.is_some() {
                "a layer no snapshot needs any more"
            } else {
                "a layer no snapshot needs once the discarded state was gone"
            }
        );
    }
    if let Some(p) = &r.merge_problem {
        eprintln!("qsnap: warning: the revert is done, but merging the layers it left unneeded did not finish: {p}");
    }
}

/// Prints what a delete did.
pub fn deleted(vm: &str, r: &DeleteReport, as_json: bool) {
    if as_json {
        return json::print(r);
    }
    println!(
        "{vm}: deleted {} in {:.0} ms{}",
        r.deleted.join(", "),
        r.total_ms,
        if r.live { " (VM running)" } else { "" }
    );
    for m in &r.memory_removed {
        println!("  removed memory file {}", m.display());
    }
    for m in &r.merges {
        match (&m.upper, m.kind.as_str()) {
            (Some(upper), "stream") => println!(
                "  {}: merged {} into {} ({}, {:.0} ms)",
                m.device,
                m.lower.display(),
                upper.display(),
                if m.live { "live" } else { "offline" },
                m.ms
            ),
            (Some(upper), _) => println!(
                "  {}: merged {} down into {} ({}, {:.0} ms)",
                m.device,
                upper.display(),
                m.lower.display(),
                if m.live { "live" } else { "offline" },
                m.ms
            ),
            (None, _) => println!("  {}: removed unused layer {}", m.device, m.lower.display()),
        }
    }
    println!(
        "  current snapshot: {}",
        r.current.as_deref().unwrap_or("(none)")
    );
}

/// Prints what `check` found.
pub fn checked(r: &CheckReport, repair: bool, as_json: bool) {
    if as_json {
        return json::print(r);
    }
    // (Said first: it qualifies every line after it.)
    if r.unchanged > 0 {
        println!(
            "{} file{} verified by an earlier check and unchanged since, not read again (`--full` reads {})",
            r.unchanged,
            if r.unchanged == 1 { "" } else { "s" },
            if r.unchanged == 1 { "it" } else { "them" }
        );
    }
    if r.findings.is_empty() {
        println!("{}: all good", r.vm);
        return;
    }
    for f in &r.findings {
        let mark = if f.repaired { "repaired" } else { "PROBLEM " };
        println!("{mark} [{}] {}\n         → {}", f.kind, f.what, f.fix);
    }
    // `--repair` is offered only for what it can fix; the rest says what a person must do.
    let repairable = r.findings.iter().any(|f| !f.repaired && f.repairable);
    if r.clean {
        println!("{}: everything found was repaired", r.vm);
    } else if repair || !repairable {
        println!(
            "{}: problems remain that need a person; each says what to do (→)",
            r.vm
        );
    } else {
        println!(
            "{}: problems found; `qsnap check {} --repair` fixes those it can (the others say what to do)",
            r.vm, r.vm
        );
    }
}

pub fn lazy(vm: &str, r: &LazyReport, as_json: bool) {
    if as_json {
        return json::print(r);
    }
    if r.already {
        println!(
            "{vm}/{}: memory is lazy already ({})",
            r.snapshot,
            r.image.display()
        );
        return;
    }
    println!(
        "{vm}/{}: memory made lazy in {:.0} ms; reverts now map its RAM",
        r.snapshot, r.total_ms
    );
    println!(
        "  RAM image     {} ({} on disk, {} apparent: zero pages are holes)",
        r.image.display(),
        mib(r.image_allocated),
        mib(r.image_bytes)
    );
    println!(
        "  device state  {} ({})",
        r.devices.display(),
        mib(r.devices_bytes)
    );
    println!("  removed the memory stream ({})", mib(r.stream_bytes));
}

/// A disk's chain on one line, top first. A long one (a hundred snapshots in a row) keeps its
/// top three images and its last two, and says how many are left out (`--json` has them all).
fn chain_line(chain: &[std::path::PathBuf]) -> String {
    const HEAD: usize = 3;
    const TAIL: usize = 2;
    let shown = |p: &[std::path::PathBuf]| -> Vec<String> {
        p.iter().map(|p| p.display().to_string()).collect()
    };
    if chain.len() <= HEAD + TAIL + 1 {
        return shown(chain).join(" → ");
    }
    let mut parts = shown(&chain[..HEAD]);
    parts.push(format!("… {} more …", chain.len() - HEAD - TAIL));
    parts.extend(shown(&chain[chain.len() - TAIL..]));
    parts.join(" → ")
}

#[cfg(test)]
mod chain_line_tests {
    use super::chain_line;
    use std::path::PathBuf;

    #[test]
    fn a_long_chain_keeps_its_ends_and_counts_the_rest() {
        let chain = |n: usize| -> Vec<PathBuf> {
            (0..n).map(|i| PathBuf::from(format!("/d/{i}"))).collect()
        };
        assert_eq!(chain_line(&chain(1)), "/d/0");
        assert_eq!(
            chain_line(&chain(6)),
            "/d/0 → /d/1 → /d/2 → /d/3 → /d/4 → /d/5"
        );
        assert_eq!(
            chain_line(&chain(7)),
            "/d/0 → /d/1 → /d/2 → … 2 more … → /d/5 → /d/6"
        );
        assert_eq!(
            chain_line(&chain(101)),
            "/d/0 → /d/1 → /d/2 → … 96 more … → /d/99 → /d/100"
        );
    }
}
