//! `qsnap`: the command-line glue over `qsnap-engine`. Parses arguments, runs one engine call,
//! prints the result (`output`), and maps errors to exit codes: 1 the operation failed,
//! 2 bad usage, 3 the VM could not be reached.

mod args;
mod output;

use anyhow::Context;
use args::{Cli, Command};
use clap::Parser;
use qsnap_qmp::{ConnectOptions, Endpoint, Qmp};
use std::process::ExitCode;
use std::time::Duration;

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

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
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

fn exit_code(err: &anyhow::Error) -> u8 {
    if err.downcast_ref::<Usage>().is_some() {
        return EXIT_USAGE;
    }
    match err.downcast_ref::<qsnap_qmp::Error>() {
        Some(
            qsnap_qmp::Error::Connect { .. }
            | qsnap_qmp::Error::NotASocket { .. }
            | qsnap_qmp::Error::GreetingTimeout { .. }
            | qsnap_qmp::Error::Handshake { .. },
        ) => EXIT_UNREACHABLE,
        _ => 1,
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.verbose);
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
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("qsnap: {err:#}");
            ExitCode::from(exit_code(&err))
        }
    }
}
