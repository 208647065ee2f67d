//! `qsnap`: the command-line glue over `qsnap-engine`. `main` parses the arguments (`args`),
//! turns them into a request (`request`: names validated, paths resolved, options built),
//! makes one engine call per command, prints the result (`output`, `progress`), and maps
//! errors to exit codes ([`Kind`]): 1 the operation failed, 2 bad usage (including bad
//! names), 3 the VM could not be reached, 4 no such VM or snapshot, 5 busy (another operation
//! holds the VM: retry, or `--wait`), 6 refused (nothing changed; retrying will not help),
//! 128 + the signal (130 for Ctrl-C, 143 for SIGTERM) an operation that an interrupt stopped.
//! With `--json` an error is also a JSON object on stdout. It also owns the process: logging, the runtime, Ctrl-C → the
//! engine's cancel token.
//!
//! This file must never interpret an argument (that is `request`'s), build engine options
//! beyond plugging a progress bar into them, chain engine operations (a command is its VM
//! looked up and one operation on it; what follows an operation belongs in the engine), or
//! format a result (that is `output`'s).

mod args;
mod complete;
mod man;
mod output;
mod progress;
mod request;
mod schema;

use anyhow::Context;
use args::Cli;
use clap::Parser;
use qsnap_engine::launch::ProcessLauncher;
use qsnap_engine::{CheckOptions, DeleteOptions, Engine, Store, VmName};
use qsnap_qmp::{ConnectOptions, Endpoint, Qmp};
use request::{Action, Request, Usage};
use std::process::ExitCode;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// What kind of failure ended a command: the engine's [`ErrorKind`], for errors of the
/// CLI's own and of the remote crate too.
use qsnap_engine::ErrorKind as Kind;

/// The exit code of each kind of failure (documented in the module docs and `--help`).
fn exit_code_of(kind: Kind) -> u8 {
    match kind {
        Kind::Failed | Kind::Cancelled => 1,
        Kind::Usage => 2,
        Kind::Unreachable => 3,
        Kind::NotFound => 4,
        Kind::Busy => 5,
        Kind::Refused => 6,
    }
}

/// An error of the CLI's own that is not a plain failure.
#[derive(Debug)]
struct Plain {
    kind: Kind,
    message: String,
}

impl std::fmt::Display for Plain {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Plain {}

fn init_logging(verbose: u8) {
    let default = match verbose {
        0 => "warn",
        1 => "info",
        2 => "debug",
        _ => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    use std::io::IsTerminal;
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        // Colour codes only for a person at a terminal, never into a file or a pipe.
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .init();
}

async fn connect(socket: &str, timeout: Duration) -> anyhow::Result<Qmp> {
    let opts = ConnectOptions {
        command_timeout: timeout,
        greeting_timeout: timeout,
        // A user naming a socket expects it to be there; wait briefly in case QEMU is starting.
        connect_retry: Duration::from_secs(2),
        ..ConnectOptions::default()
    };
    Ok(Qmp::connect_with(Endpoint::parse(socket), &opts).await?)
}

/// The monitor `target` names: a socket (a path that exists or has a `/`, `unix:…`,
/// `tcp:…`), else the VM of that name in the store, whose recorded socket is used.
async fn monitor(engine: &Engine, target: &str, timeout: Duration) -> anyhow::Result<Qmp> {
    let path_like = target.contains('/')
        || target.starts_with("unix:")
        || target.starts_with("tcp:")
        || std::path::Path::new(target).exists();
    if !path_like {
        if let Ok(name) = VmName::new(target) {
            if engine.store().has_vm(&name).await? {
                let vm = engine.vm(&name).await?;
                return vm
                    .connect()
                    .await
                    .with_context(|| format!("connecting to VM {name}'s monitor"));
            }
            return Err(Plain {
                kind: Kind::NotFound,
                message: format!(
                    "{target} is neither a monitor socket nor a VM in the store {} (`qsnap status`)",
                    engine.store().root().display()
                ),
            }
            .into());
        }
    }
    connect(target, timeout).await
}

/// Starts `qsnap pool VM SNAP --refill` on its own (its own session: a Ctrl-C meant for
/// this command does not reach it; output nowhere), and does not wait for it. Best effort:
/// a refill that cannot start leaves the pool short until the next clone or `qsnap pool`.
fn refill_in_background(store: &std::path::Path, vm: &VmName, snap: &qsnap_engine::SnapshotName) {
    use std::os::unix::process::CommandExt;
    let Ok(me) = std::env::current_exe() else {
        return;
    };
    let started = std::process::Command::new(me)
        .args(["--store".as_ref(), store.as_os_str()])
        .args(["pool", vm.as_str(), snap.as_str(), "--refill"])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .process_group(0)
        .spawn();
    if let Err(e) = started {
        tracing::warn!(error = %e, "the pool's refill could not be started");
    }
}

/// The engine every command uses: the store, QMP timeouts, Ctrl-C, and a word on stderr
/// when an operation settles one that was interrupted.
fn engine(req: &Request, cancel: CancellationToken) -> Engine {
    Engine::new(Store::new(&req.store).with_lock_wait(req.lock_wait))
        .with_connect_options(ConnectOptions {
            command_timeout: req.timeout,
            greeting_timeout: req.timeout,
            connect_retry: Duration::from_secs(2),
            ..ConnectOptions::default()
        })
        .with_cancel(cancel)
        .on_recovery(Arc::new(output::recovered))
}

/// A check that found problems it could not fix: exit 1, after the report was printed.
#[derive(Debug)]
struct Unclean;

impl std::fmt::Display for Unclean {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("problems remain (see above)")
    }
}

impl std::error::Error for Unclean {}

/// Signals this close to the first are that same interrupt: `timeout -s INT` signals qsnap
/// and then its whole process group, so one interrupt arrives twice within microseconds.
const ONE_INTERRUPT: Duration = Duration::from_secs(1);

/// The signal of the first interrupt, once one came (0 before).
static INTERRUPTED: AtomicI32 = AtomicI32::new(0);

/// The exit code after an interrupt: 128 + its signal, as a shell reports a process the signal
/// ended (130 for Ctrl-C); `None` when none came.
fn interrupted_exit() -> Option<u8> {
    match INTERRUPTED.load(Ordering::SeqCst) {
        0 => None,
        sig => u8::try_from(128 + sig).ok(),
    }
}

/// Cancels `token` on the first Ctrl-C (SIGINT) or SIGTERM, so the engine rolls back cleanly.
/// More signals within [`ONE_INTERRUPT`] of it are the same interrupt; one after that quits at
/// once (the journal lets the next command finish the rest). The handlers are installed before
/// the command starts: a signal with none installed would end qsnap in the middle of a step.
fn cancel_on_signal(token: CancellationToken) -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let (int, term) = (SignalKind::interrupt(), SignalKind::terminate());
    let mut on_int = signal(int).context("installing the SIGINT handler")?;
    let mut on_term = signal(term).context("installing the SIGTERM handler")?;
    tokio::spawn(async move {
        let first = tokio::select! {
            _ = on_int.recv() => int,
            _ = on_term.recv() => term,
        };
        INTERRUPTED.store(first.as_raw_value(), Ordering::SeqCst);
        let at = Instant::now();
        eprintln!(
            "qsnap: interrupted; stopping cleanly (rolling back what is not done)… \
             (interrupt again to quit at once: the journal lets the next command finish the rest)"
        );
        token.cancel();
        loop {
            tokio::select! {
                _ = on_int.recv() => {}
                _ = on_term.recv() => {}
            }
            if at.elapsed() >= ONE_INTERRUPT {
                break;
            }
        }
        eprintln!("qsnap: interrupted again; quitting now (the next command on the VM finishes or rolls back what was left)");
        std::process::exit(i32::from(interrupted_exit().unwrap_or(130)));
    });
    Ok(())
}

async fn run(req: Request) -> anyhow::Result<()> {
    let cancel = CancellationToken::new();
    cancel_on_signal(cancel.clone())?;
    let engine = engine(&req, cancel);
    let req_store = req.store.clone();
    match req.action {
        Action::Attach(r) => {
            let vm = engine
                .attach_with(&r.vm, &r.qmp, &r.opts)
                .await
                .with_context(|| format!("attaching {}", r.vm))?;
            output::attached(vm.record(), r.json);
        }
        Action::Create(r) => {
            let vm = engine.vm(&r.vm).await?;
            let mut opts = r.options(&vm)?;
            let bar = progress::SaveBar::new(r.json);
            opts.create.progress = bar.callback();
            let result = vm.create_snapshot_with(opts).await;
            bar.finish();
            let created =
                result.with_context(|| format!("creating snapshot {} of {}", r.snapshot, r.vm))?;
            output::created(&created, r.json);
        }
        Action::LazyRam(r) => {
            let report = engine
                .vm(&r.vm)
                .await?
                .make_lazy(&r.snapshot)
                .await
                .with_context(|| format!("making the memory of {}/{} lazy", r.vm, r.snapshot))?;
            output::lazy(r.vm.as_str(), &report, r.json);
        }
        Action::Clone(r) => {
            let report = engine
                .vm(&r.vm)
                .await?
                .clone_snapshot(&r.snapshot, &r.new, &r.opts)
                .await
                .with_context(|| format!("cloning {}/{} to {}", r.vm, r.snapshot, r.new))?;
            // A standby taken (or none ready): the pool refills behind this command's back.
            if report.standby.is_some() || report.cold_because.is_some() {
                refill_in_background(&req_store, &r.vm, &r.snapshot);
            }
            output::cloned(&report, r.json);
        }
        Action::Pool(r) => {
            let vm = engine.vm(&r.vm).await?;
            let report = match r.size {
                Some(n) => vm.pool(&r.snapshot, n).await,
                None => vm.refill_pool(&r.snapshot).await,
            }
            .with_context(|| format!("filling the pool of {}/{}", r.vm, r.snapshot))?;
            output::pooled(&report, r.json);
        }
        Action::Export(mut r) => {
            let vm = engine.vm(&r.vm).await?;
            let to_stdout = r.to == request::Stream::Std;
            let (out, file): (Box<dyn std::io::Write + Send>, _) = match &r.to {
                request::Stream::Std => (Box::new(std::io::stdout()), None),
                request::Stream::File(p) => {
                    use std::os::unix::fs::OpenOptionsExt;
                    // Guest memory: 0600, and never over an existing file.
                    let f = std::fs::OpenOptions::new()
                        .write(true)
                        .create_new(true)
                        .mode(0o600)
                        .open(p)
                        .map_err(|e| -> anyhow::Error {
                            if e.kind() == std::io::ErrorKind::AlreadyExists {
                                Plain {
                                    kind: Kind::Refused,
                                    message: format!(
                                        "{} already exists; qsnap never overwrites a file (name another, or remove it)",
                                        p.display()
                                    ),
                                }
                                .into()
                            } else {
                                anyhow::Error::new(e).context(format!("creating {}", p.display()))
                            }
                        })?;
                    (
                        Box::new(std::io::BufWriter::with_capacity(1 << 20, f)),
                        Some(p.clone()),
                    )
                }
            };
            let bar = progress::BytesBar::new("exporting", r.json);
            r.opts.progress = bar.callback();
            let result = vm.export(&r.snapshot, out, &r.opts).await;
            bar.finish();
            if result.is_err() {
                if let Some(p) = &file {
                    // Ours, and unfinished: an import would refuse it anyway.
                    let _ = std::fs::remove_file(p);
                }
            }
            let report = result.with_context(|| format!("exporting {}/{}", r.vm, r.snapshot))?;
            output::exported(&report, file.as_deref(), r.json, to_stdout);
        }
        Action::Import(mut r) => {
            let input: Box<dyn std::io::Read + Send> = match &r.from {
                request::Stream::Std => Box::new(std::io::stdin()),
                request::Stream::File(p) => Box::new(
                    std::fs::File::open(p).with_context(|| format!("opening {}", p.display()))?,
                ),
            };
            let bar = progress::BytesBar::new("importing", r.json);
            r.opts.progress = bar.callback();
            let result = engine.import(input, &r.vm, &r.opts).await;
            bar.finish();
            let report = result.with_context(|| format!("importing {}", r.vm))?;
            output::imported(&report, r.json);
        }
        Action::Push(mut r) => {
            let remote = qsnap_remote::Remote::open(&r.url)?;
            let vm = engine.vm(&r.vm).await?;
            let bar = progress::BytesBar::new("pushing", r.json);
            r.opts.progress = bar.callback();
            r.opts.cancel = engine.cancel_token().clone();
            let result = remote.push(&vm, &r.snapshot, &r.opts).await;
            bar.finish();
            let report = result.with_context(|| format!("pushing {}/{}", r.vm, r.snapshot))?;
            output::pushed(&report, r.json);
        }
        Action::Pull(mut r) => {
            let remote = qsnap_remote::Remote::open(&r.url)?;
            let bar = progress::BytesBar::new("pulling", r.json);
            r.opts.import.progress = bar.callback();
            r.opts.cancel = engine.cancel_token().clone();
            let result = remote.pull(&engine, &r.name, &r.vm, &r.opts).await;
            bar.finish();
            let report = result.with_context(|| format!("pulling {} into {}", r.name, r.vm))?;
            output::pulled(&report, r.json);
        }
        Action::RemoteList { url, json } => {
            let list = qsnap_remote::Remote::open(&url)?.list().await?;
            output::remote_list(&url, &list, json);
        }
        Action::RemoteRm { url, name } => {
            qsnap_remote::Remote::open(&url)?.remove(&name).await?;
            println!("removed {name} from {url} (its chunks go at the next `qsnap remote gc` unless another snapshot uses them)");
        }
        Action::RemoteGc { url, grace, json } => {
            let report = qsnap_remote::Remote::open(&url)?.gc(grace).await?;
            output::collected(&report, json);
        }
        Action::Keygen(prefix) => {
            let (sk, pk) = qsnap_engine::keygen(&prefix)
                .await
                .context("making a signing key")?;
            output::keys(&sk, &pk);
        }
        Action::Remove(r) => {
            let report = engine
                .vm(&r.vm)
                .await?
                .remove()
                .await
                .with_context(|| format!("removing {}", r.vm))?;
            output::removed(&report, r.json);
        }
        Action::Run(r) => {
            let report = engine
                .run(&r.vm, r.qemu, &r.opts)
                .await
                .with_context(|| format!("starting {}", r.vm))?;
            output::ran(&report, r.json);
        }
        Action::Stop(vm) => {
            let outcome = engine
                .vm(&vm)
                .await?
                .stop()
                .await
                .with_context(|| format!("stopping {vm}"))?;
            output::stopped(vm.as_str(), &outcome);
        }
        Action::Shutdown { vm, grace, json } => {
            let outcome = engine
                .vm(&vm)
                .await?
                .shutdown(grace)
                .await
                .with_context(|| format!("shutting down {vm}"))?;
            output::shut_down(vm.as_str(), &outcome, json);
        }
        Action::Forget { vm, opts, json } => {
            let report = engine
                .vm(&vm)
                .await?
                .forget(opts)
                .await
                .with_context(|| format!("forgetting {vm}"))?;
            output::forgotten(&report, json);
        }
        Action::Rename { vm, old, new } => {
            engine
                .vm(&vm)
                .await?
                .rename_snapshot(&old, &new)
                .await
                .with_context(|| format!("renaming {vm}/{old}"))?;
            println!("{vm}: snapshot {old} is now {new}");
        }
        Action::Start(vm) => {
            match engine.vm(&vm).await?.start().await {
                Ok(launched) => output::started(vm.as_str(), launched.pid),
                // Asked for what is already so: said, and not an error.
                Err(qsnap_engine::Error::AlreadyRunning { pid, .. }) => {
                    output::already_running(vm.as_str(), pid);
                }
                Err(e) => return Err(anyhow::Error::new(e).context(format!("starting {vm}"))),
            }
        }
        Action::Pause(vm) => {
            let outcome = engine
                .vm(&vm)
                .await?
                .pause()
                .await
                .with_context(|| format!("pausing {vm}"))?;
            output::paused(vm.as_str(), outcome, false);
        }
        Action::Resume(vm) => {
            let outcome = engine
                .vm(&vm)
                .await?
                .resume()
                .await
                .with_context(|| format!("resuming {vm}"))?;
            output::paused(vm.as_str(), outcome, true);
        }
        Action::Status(r) => {
            let st = engine.vm(&r.vm).await?.status().await?;
            output::status(&st, r.json);
        }
        Action::Revert(r) => {
            let vm = engine.vm(&r.vm).await?;
            let snapshot = match r.snapshot {
                Some(s) => s,
                None => vm.latest_snapshot().await?,
            };
            let report = vm
                .revert_with(&snapshot, &r.opts, &ProcessLauncher::default())
                .await
                .with_context(|| format!("reverting {} to {snapshot}", r.vm))?;
            output::reverted(r.vm.as_str(), &report, r.json);
        }
        Action::Delete(r) => {
            let vm = engine.vm(&r.vm).await?;
            let bar = progress::MergeBar::new(r.json);
            let opts = DeleteOptions {
                progress: bar.callback(),
            };
            let result = if r.snapshots.is_empty() {
                vm.delete_all(&opts).await
            } else {
                vm.delete_snapshots(&r.snapshots, r.children, &opts).await
            };
            bar.finish();
            let what = if r.snapshots.is_empty() {
                "all snapshots".to_owned()
            } else {
                let names: Vec<String> = r.snapshots.iter().map(ToString::to_string).collect();
                names.join(", ")
            };
            let report = result.with_context(|| format!("deleting {what} of {}", r.vm))?;
            output::deleted(r.vm.as_str(), &report, r.json);
        }
        Action::Check(r) => {
            if r.repair {
                for p in engine
                    .sweep_imports()
                    .await
                    .context("removing what interrupted imports left")?
                {
                    eprintln!("removed {} (left by an interrupted import)", p.display());
                }
                let stale = qsnap_engine::sweep_cache().await;
                if stale > 0 {
                    eprintln!(
                        "removed {stale} cache entr{} about files that are gone or replaced",
                        if stale == 1 { "y" } else { "ies" }
                    );
                }
            }
            let report = engine
                .vm(&r.vm)
                .await?
                .check_with(CheckOptions {
                    repair: r.repair,
                    full: r.full,
                })
                .await
                .with_context(|| format!("checking {}", r.vm))?;
            output::checked(&report, r.repair, r.json);
            if !report.clean {
                return Err(Unclean.into());
            }
        }
        Action::List(r) => {
            let listing = engine.vm(&r.vm).await?.listing().await?;
            output::list(&listing, r.json);
        }
        Action::ListAll { json } => {
            let all = engine.listings().await?;
            output::list_all(engine.store().root(), &all, json);
        }
        Action::StatusAll { json } => {
            let all = engine.status_all().await?;
            output::status_all(engine.store().root(), &all, json);
        }
        Action::Show(r) => {
            let vm = engine.vm(&r.vm).await?;
            let m = vm.snapshot(&r.snapshot).await?;
            let usage = vm.usage(std::slice::from_ref(&m)).await?;
            output::snapshot(&m, usage.snapshots.first(), r.json);
        }
        Action::Qmp(r) => {
            let qmp = monitor(&engine, &r.socket, req.timeout).await?;
            let reply = qmp
                .execute_raw(&r.command, r.arguments)
                .await
                .with_context(|| format!("running {} on {}", r.command, r.socket))?;
            output::qmp_reply(&reply);
        }
        Action::Completions(shell) => {
            let mut script = Vec::new();
            complete::script(&shell, &mut script)?;
            use std::io::Write;
            std::io::stdout()
                .write_all(&script)
                .context("writing the script")?;
        }
        Action::Man(dir) => {
            let pages = tokio::task::spawn_blocking(move || man::write_all(&dir))
                .await?
                .context("writing the manual pages")?;
            for p in pages {
                println!("{}", p.display());
            }
        }
        Action::JsonSchema(dir) => {
            let files = tokio::task::spawn_blocking(move || schema::write_all(&dir))
                .await?
                .context("writing the JSON schemas")?;
            for f in files {
                println!("{}", f.display());
            }
        }
        Action::Info(r) => {
            let qmp = monitor(&engine, &r.socket, req.timeout).await?;
            let info = qsnap_engine::VmInfo::read(&qmp)
                .await
                .with_context(|| format!("inspecting the VM at {}", r.socket))?;
            output::vm_info(&info, r.json);
        }
    }
    Ok(())
}

/// The error chain on one line, joined with ": ". Engine and QMP errors say their causes in
/// their own message and return none as `source()`, so each reason is printed once.
fn render(err: &anyhow::Error) -> String {
    err.chain()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(": ")
}

/// What kind of failure `err` is, and the one command that is the way on when there is one:
/// the first cause in the chain that says.
fn classify(err: &anyhow::Error) -> (Kind, Option<String>) {
    for cause in err.chain() {
        if cause.downcast_ref::<Usage>().is_some() {
            return (Kind::Usage, None);
        }
        if cause.downcast_ref::<Unclean>().is_some() {
            return (Kind::Failed, None);
        }
        if let Some(p) = cause.downcast_ref::<Plain>() {
            return (p.kind, None);
        }
        if let Some(e) = cause.downcast_ref::<qsnap_engine::Error>() {
            return (e.kind(), e.fix());
        }
        if let Some(e) = cause.downcast_ref::<qsnap_qmp::Error>() {
            if e.is_unreachable() {
                return (Kind::Unreachable, None);
            }
            return (Kind::Failed, None);
        }
        if let Some(e) = cause.downcast_ref::<qsnap_remote::RemoteError>() {
            use qsnap_remote::RemoteError as R;
            return match e {
                R::Engine(inner) => (inner.kind(), inner.fix()),
                R::NotFound { .. } => (Kind::NotFound, None),
                R::Exists { .. } | R::Corrupt { .. } => (Kind::Refused, None),
                R::BadUrl { .. } | R::BadName { .. } => (Kind::Usage, None),
                R::Interrupted => (Kind::Cancelled, None),
                _ => (Kind::Failed, None),
            };
        }
    }
    (Kind::Failed, None)
}

fn main() -> ExitCode {
    // A Tab in a shell that loaded `qsnap completions SHELL` (`QSNAP_COMPLETE=SHELL qsnap --
    // WORDS…`): answered, and nothing else runs (nothing may be printed before). The variable
    // left set by accident in an environment must not turn every command into a no-op.
    if std::env::var_os(complete::VAR).is_some_and(|v| !v.is_empty() && v != "0") {
        if std::env::args_os().nth(1).is_some_and(|a| a == "--") {
            use clap::CommandFactory;
            clap_complete::CompleteEnv::with_factory(Cli::command)
                .var(complete::VAR)
                .complete();
        } else {
            eprintln!(
                "qsnap: warning: {} is set (it is for shell completion); ignored",
                complete::VAR
            );
        }
    }
    // The command's own --json, before `--` (after it, the words are QEMU's). As OS strings:
    // an argument need not be UTF-8 (a path).
    let args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
    let json = args
        .iter()
        .take_while(|a| *a != "--")
        .any(|a| a == "--json");
    if std::env::var_os("QSNAP_STORE").is_some_and(|v| v.is_empty()) {
        let message = format!(
            "QSNAP_STORE is set but empty: unset it to use the default store ({}), or set it to a directory",
            Store::default_root().display()
        );
        eprintln!("qsnap: {message}");
        if json {
            output::error(Kind::Usage, &message, None, false);
        }
        return ExitCode::from(2);
    }
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let shown = matches!(
                e.kind(),
                clap::error::ErrorKind::DisplayHelp | clap::error::ErrorKind::DisplayVersion
            );
            let is_run = args
                .iter()
                .find(|a| !a.to_string_lossy().starts_with('-'))
                .is_some_and(|a| a == "run");
            let hint = is_run && !args.iter().any(|a| a == "--") && !shown;
            let code = e.exit_code();
            let _ = e.print();
            if hint {
                eprintln!("\nhint: the QEMU command line goes after `--`: qsnap run NAME -- qemu-system-x86_64 …");
            }
            if json && !shown {
                // clap's message without its usage lines and hints: the first paragraph.
                let what = e.to_string();
                let first = what.split("\n\n").next().unwrap_or("bad usage");
                let one_line: Vec<&str> = first.lines().map(str::trim).collect();
                output::error(
                    Kind::Usage,
                    one_line.join(" ").trim_start_matches("error: "),
                    None,
                    false,
                );
            }
            return ExitCode::from(u8::try_from(code).unwrap_or(2));
        }
    };
    // `export … -` writes the bundle on stdout: its report, and its error, go to stderr.
    let stdout_is_data =
        matches!(&cli.command, args::Command::Export(a) if a.file.as_os_str() == "-");
    init_logging(cli.verbose);
    // Test builds only: FAILPOINTS in the environment makes steps fail on cue.
    let _failpoints = qsnap_engine::failpoints_from_env();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            let message = format!("cannot start the async runtime: {e}");
            eprintln!("qsnap: {message}");
            if json {
                output::error(Kind::Failed, &message, None, stdout_is_data);
            }
            return ExitCode::from(1);
        }
    };
    match Request::from_cli(cli).and_then(|req| runtime.block_on(run(req))) {
        Ok(()) => {
            if interrupted_exit().is_some() {
                eprintln!("qsnap: the interrupt came too late to stop it: the command completed");
            }
            ExitCode::SUCCESS
        }
        Err(err) => {
            let (kind, fix) = classify(&err);
            let message = render(&err);
            if err.downcast_ref::<Unclean>().is_none() {
                eprintln!("qsnap: {message}");
                if json {
                    output::error(kind, &message, fix.as_deref(), stdout_is_data);
                }
            }
            // Whatever the error (the rollback's "cancelled", or a step the interrupt cut
            // short), an interrupted command says so the way a shell expects.
            ExitCode::from(interrupted_exit().unwrap_or_else(|| exit_code_of(kind)))
        }
    }
}
