//! `qsnap`: the command-line glue over `qsnap-engine`. Parses arguments, runs one engine call,
//! prints the result (`output`, `progress`), and maps errors to exit codes: 1 the operation
//! failed, 2 bad usage (including bad names), 3 the VM could not be reached, 128 + the signal
//! (130 for Ctrl-C, 143 for SIGTERM) an operation that an interrupt stopped.

mod args;
mod output;
mod progress;

use anyhow::Context;
use args::{Cli, Command, ModeArg};
use clap::Parser;
use qsnap_engine::launch::clone::split_replacement;
use qsnap_engine::snapshot::Mode;
use qsnap_engine::{
    AttachOptions, DeleteOptions, Engine, RevertOptions, SnapshotName, Store, VmName,
};
use qsnap_qmp::{ConnectOptions, Endpoint, Qmp};
use std::process::ExitCode;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// `println!` that does not panic when stdout is closed early (`qsnap list | head -1`): the
/// reader has what it wanted.
macro_rules! println {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($t)*);
    }};
}

/// Exit code when the VM's monitor cannot be reached.
const EXIT_UNREACHABLE: u8 = 3;
/// Exit code for bad usage (clap uses 2 as well).
const EXIT_USAGE: u8 = 2;

/// A usage error found after parsing (e.g. arguments that are not JSON).
#[derive(Debug)]
struct Usage(String);

impl std::fmt::Display for Usage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Usage {}

fn init_logging(verbose: u8) {
    let default = match verbose {
        0 => "warn",
        1 => "info",
        2 => "debug",
        _ => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

async fn connect(socket: &str, timeout: u64) -> anyhow::Result<Qmp> {
    let opts = ConnectOptions {
        command_timeout: Duration::from_secs(timeout),
        // A user naming a socket expects it to be there; wait briefly in case QEMU is starting.
        connect_retry: Duration::from_secs(2),
        ..ConnectOptions::default()
    };
    Ok(Qmp::connect_with(Endpoint::parse(socket), &opts).await?)
}

/// The engine every command uses: the store, QMP timeouts, Ctrl-C, and a word on stderr
/// when an operation settles one that was interrupted.
fn engine(cli: &Cli, cancel: CancellationToken) -> anyhow::Result<Engine> {
    let mut root = cli.store.clone().unwrap_or_else(Store::default_root);
    if root.is_relative() {
        // Paths in the store are kept absolute: the same store from any directory.
        root = std::env::current_dir()
            .context("reading the working directory")?
            .join(root);
    }
    Ok(Engine::new(Store::new(root))
        .with_connect_options(ConnectOptions {
            command_timeout: Duration::from_secs(cli.timeout),
            connect_retry: Duration::from_secs(2),
            ..ConnectOptions::default()
        })
        .with_cancel(cancel)
        .on_recovery(Arc::new(|r: &qsnap_engine::Recovery| {
            eprintln!(
                "qsnap: an interrupted {} (qsnap pid {}, started {}) was settled first: {}",
                r.operation, r.qsnap_pid, r.started_at, r.outcome
            );
        })))
}

/// A VM name from the command line; a bad one is a usage error.
fn vm_name(s: &str) -> anyhow::Result<VmName> {
    VmName::new(s).map_err(|e| Usage(e.to_string()).into())
}

/// A snapshot name from the command line; a bad one is a usage error.
fn snap_name(s: &str) -> anyhow::Result<SnapshotName> {
    SnapshotName::new(s).map_err(|e| Usage(e.to_string()).into())
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

async fn run(cli: Cli) -> anyhow::Result<()> {
    let cancel = CancellationToken::new();
    cancel_on_signal(cancel.clone())?;
    let engine = engine(&cli, cancel)?;
    match cli.command {
        Command::Attach {
            name: vm,
            qmp,
            allow_other_user,
            json,
        } => {
            let opts = AttachOptions { allow_other_user };
            let vm = engine
                .attach_with(&vm_name(&vm)?, &qmp, &opts)
                .await
                .with_context(|| format!("attaching {vm}"))?;
            output::attached(vm.record(), json);
        }
        Command::Create {
            name: vm,
            snapshot,
            disk_only,
            quiesce,
            mode,
            overlay_dir,
            live_limit,
            no_mapped_ram,
            save_timeout,
            lazy_ram,
            json,
        } => {
            let (vm_id, snap) = (vm_name(&vm)?, snap_name(&snapshot)?);
            let handle = engine.vm(&vm_id).await?;
            let mut opts = handle.create_options(snap);
            opts.mode = match (disk_only, mode) {
                (true, _) => Some(Mode::DiskOnly),
                (false, ModeArg::Auto) => None,
                (false, ModeArg::PointInTime) => Some(Mode::PointInTime),
                (false, ModeArg::Precopy) => Some(Mode::Precopy),
            };
            // Resolved here, against qsnap's own directory, as the user meant it: QEMU would
            // resolve a relative one against its own, and the store records absolute paths.
            opts.overlay_dir = match overlay_dir {
                Some(d) => Some(qsnap_engine::store::plain_path(
                    &std::env::current_dir()
                        .context("reading the working directory")?
                        .join(d),
                )),
                None => None,
            };
            if quiesce {
                opts.quiesce = Some(handle.record().guest_agent.clone().ok_or_else(|| {
                    anyhow::anyhow!(
                        "{vm} has no guest agent in its command line (a virtserialport named \
                         org.qemu.guest_agent.0 on a -chardev socket,path=…); cannot --quiesce"
                    )
                })?);
            }
            opts.live_limit = Duration::from_secs(live_limit);
            opts.mapped_ram = !no_mapped_ram;
            opts.save_timeout = Duration::from_secs(save_timeout);
            let bar = progress::SaveBar::new(json);
            opts.progress = bar.callback();
            let result = handle.create_snapshot(opts).await;
            bar.finish();
            let manifest =
                result.with_context(|| format!("creating snapshot {snapshot} of {vm}"))?;
            let lazy = if lazy_ram {
                match handle.make_lazy(&snap_name(&snapshot)?).await {
                    Ok(r) => Some(r),
                    Err(e) => {
                        eprintln!("qsnap: warning: the snapshot was taken, but its memory stays a stream (reverts load it): {e}");
                        None
                    }
                }
            } else {
                None
            };
            let manifest = match lazy {
                Some(_) => {
                    handle
                        .store()
                        .manifest(&vm_id, &snap_name(&snapshot)?)
                        .await?
                }
                None => manifest,
            };
            output::snapshot(&manifest, json);
        }
        Command::LazyRam {
            name: vm,
            snapshot,
            json,
        } => {
            let report = engine
                .vm(&vm_name(&vm)?)
                .await?
                .make_lazy(&snap_name(&snapshot)?)
                .await
                .with_context(|| format!("making the memory of {vm}/{snapshot} lazy"))?;
            output::lazy(&vm, &report, json);
        }
        Command::Clone {
            name: vm,
            snapshot,
            new,
            paused,
            replace,
            json,
        } => {
            let source = engine.vm(&vm_name(&vm)?).await?;
            let argv = source
                .record()
                .command
                .as_ref()
                .map(|c| c.argv.clone())
                .unwrap_or_default();
            let replace = replace
                .iter()
                .map(|r| split_replacement(r, &argv).map_err(anyhow::Error::msg))
                .collect::<anyhow::Result<Vec<_>>>()?;
            let opts = qsnap_engine::CloneOptions { paused, replace };
            let report = source
                .clone_snapshot(&snap_name(&snapshot)?, &vm_name(&new)?, &opts)
                .await
                .with_context(|| format!("cloning {vm}/{snapshot} to {new}"))?;
            output::cloned(&report, json);
        }
        Command::Remove { name: vm, json } => {
            let report = engine
                .vm(&vm_name(&vm)?)
                .await?
                .remove()
                .await
                .with_context(|| format!("removing {vm}"))?;
            output::removed(&report, json);
        }
        Command::Run {
            name: vm,
            no_tsc_fix,
            json,
            qemu,
        } => {
            let opts = qsnap_engine::RunOptions {
                no_tsc_fix,
                cwd: None,
            };
            let report = engine
                .run(&vm_name(&vm)?, qemu, &opts)
                .await
                .with_context(|| format!("starting {vm}"))?;
            if let Some((hz, source)) = &report.tsc_pinned {
                eprintln!(
                    "qsnap: the CPU asks for invtsc: added tsc-frequency={hz} (from {source}) so memory snapshots work; --no-tsc-fix turns this off"
                );
            }
            output::attached(&report.record, json);
        }
        Command::Stop { name: vm } => {
            let outcome = engine
                .vm(&vm_name(&vm)?)
                .await?
                .stop()
                .await
                .with_context(|| format!("stopping {vm}"))?;
            output::stopped(&vm, &outcome);
        }
        Command::Start { name: vm } => {
            let launched = engine
                .vm(&vm_name(&vm)?)
                .await?
                .start()
                .await
                .with_context(|| format!("starting {vm}"))?;
            match launched.pid {
                Some(pid) => println!("{vm} started (pid {pid})"),
                None => println!("{vm} started"),
            }
        }
        Command::Status { name: vm, json } => {
            let st = engine.vm(&vm_name(&vm)?).await?.status().await?;
            output::status(&st, json);
        }
        Command::Revert {
            name: vm,
            snapshot,
            paused,
            keep_current,
            json,
        } => {
            let handle = engine.vm(&vm_name(&vm)?).await?;
            let keep_current = match keep_current.as_deref() {
                None => None,
                Some("") => Some(snap_name(&format!("before-revert-{}", humantime_stamp()))?),
                Some(n) => Some(snap_name(n)?),
            };
            let opts = RevertOptions {
                paused,
                keep_current,
            };
            let report = handle
                .revert_with(
                    &snap_name(&snapshot)?,
                    &opts,
                    &qsnap_engine::launch::ProcessLauncher::default(),
                )
                .await
                .with_context(|| format!("reverting {vm} to {snapshot}"))?;
            output::reverted(&vm, &report, json);
        }
        Command::Delete {
            name: vm,
            snapshot,
            all,
            json,
        } => {
            let handle = engine.vm(&vm_name(&vm)?).await?;
            let bar = progress::MergeBar::new(json);
            let opts = DeleteOptions {
                progress: bar.callback(),
            };
            let result = match (&snapshot, all) {
                (Some(s), false) => handle.delete_snapshot(&snap_name(s)?, &opts).await,
                _ => handle.delete_all(&opts).await,
            };
            bar.finish();
            let what = snapshot.unwrap_or_else(|| "all snapshots".into());
            let report = result.with_context(|| format!("deleting {what} of {vm}"))?;
            output::deleted(&vm, &report, json);
        }
        Command::Check {
            name: vm,
            repair,
            json,
        } => {
            let handle = engine.vm(&vm_name(&vm)?).await?;
            let report = handle
                .check(repair)
                .await
                .with_context(|| format!("checking {vm}"))?;
            output::checked(&report, repair, json);
            if !report.clean {
                return Err(Unclean.into());
            }
        }
        Command::List { name: vm, json } => {
            let handle = engine.vm(&vm_name(&vm)?).await?;
            let all = handle.snapshots().await?;
            output::list(handle.record(), &all, json);
        }
        Command::Show {
            name: vm,
            snapshot,
            json,
        } => {
            let handle = engine.vm(&vm_name(&vm)?).await?;
            let m = handle.snapshot(&snap_name(&snapshot)?).await?;
            output::snapshot(&m, json);
        }
        Command::Qmp {
            socket,
            command,
            arguments,
        } => {
            let args = match arguments {
                None => None,
                Some(text) => match serde_json::from_str(&text) {
                    Ok(v @ serde_json::Value::Object(_)) => Some(v),
                    Ok(_) => {
                        return Err(Usage(
                            "arguments must be a JSON object, e.g. '{\"device\":\"drive0\"}'"
                                .into(),
                        )
                        .into())
                    }
                    Err(e) => {
                        return Err(Usage(format!("arguments are not valid JSON: {e}")).into())
                    }
                },
            };
            let qmp = connect(&socket, cli.timeout).await?;
            let reply = qmp
                .execute_raw(&command, args)
                .await
                .with_context(|| format!("running {command} on {socket}"))?;
            output::qmp_reply(&reply);
        }
        Command::Info { socket, json } => {
            let qmp = connect(&socket, cli.timeout).await?;
            let info = qsnap_engine::VmInfo::read(&qmp)
                .await
                .with_context(|| format!("inspecting the VM at {socket}"))?;
            output::vm_info(&info, json);
        }
    }
    Ok(())
}

/// `20261130T051016Z`: a snapshot name part that sorts by time.
fn humantime_stamp() -> String {
    humantime::format_rfc3339_seconds(std::time::SystemTime::now())
        .to_string()
        .replace(['-', ':'], "")
}

/// The error chain on one line, joined with ": ". Engine and QMP errors say their causes in
/// their own message and return none as `source()`, so each reason is printed once.
fn render(err: &anyhow::Error) -> String {
    err.chain()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(": ")
}

fn exit_code(err: &anyhow::Error) -> u8 {
    for cause in err.chain() {
        if cause.downcast_ref::<Usage>().is_some() {
            return EXIT_USAGE;
        }
        if let Some(qsnap_engine::Error::InvalidName { .. }) = cause.downcast_ref() {
            return EXIT_USAGE;
        }
        // A QMP error comes bare (the CLI's own connections) or inside the engine's
        // `Error::Qmp` (which does not return it as `source()`).
        let qmp = match cause.downcast_ref() {
            Some(qsnap_engine::Error::Qmp { source, .. }) => Some(source),
            _ => cause.downcast_ref::<qsnap_qmp::Error>(),
        };
        if let Some(
            qsnap_qmp::Error::Connect { .. }
            | qsnap_qmp::Error::NotASocket { .. }
            | qsnap_qmp::Error::GreetingTimeout { .. }
            | qsnap_qmp::Error::Handshake { .. },
        ) = qmp
        {
            return EXIT_UNREACHABLE;
        }
        if let Some(qsnap_engine::Error::Unreachable { .. }) = cause.downcast_ref() {
            return EXIT_UNREACHABLE;
        }
    }
    1
}

fn main() -> ExitCode {
    let cli = Cli::parse();
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
            eprintln!("qsnap: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => {
            if interrupted_exit().is_some() {
                eprintln!("qsnap: the interrupt came too late to stop it: the command completed");
            }
            ExitCode::SUCCESS
        }
        Err(err) => {
            if err.downcast_ref::<Unclean>().is_none() {
                eprintln!("qsnap: {}", render(&err));
            }
            // Whatever the error (the rollback's "cancelled", or a step the interrupt cut
            // short), an interrupted command says so the way a shell expects.
            ExitCode::from(interrupted_exit().unwrap_or_else(|| exit_code(&err)))
        }
    }
}
