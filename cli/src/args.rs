//! The command line, as clap types. Doc comments here are the `--help` text.

use clap::{Parser, Subcommand};

/// Live QEMU snapshots (memory + disks) over QMP, without libvirt.
#[derive(Debug, Parser)]
#[command(name = "qsnap", version, about, long_about = None)]
pub struct Cli {
    /// More log output on stderr (-v: info, -vv: debug, -vvv: QMP wire trace). RUST_LOG wins.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,

    /// Seconds to wait for each QMP command.
    #[arg(long, global = true, default_value_t = 30, value_name = "SECS")]
    pub timeout: u64,

    #[command(subcommand)]
    pub command: Command,
}

/// What to do.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Send one raw QMP command and print QEMU's reply as JSON.
    ///
    /// Example: qsnap qmp /run/vm1/qmp.sock query-status
    ///          qsnap qmp /run/vm1/qmp.sock human-monitor-command '{"command-line":"info block"}'
    Qmp {
        /// The QMP socket (a path, unix:PATH or tcp:HOST:PORT).
        socket: String,
        /// The QMP command name, e.g. query-status.
        command: String,
        /// The arguments as a JSON object.
        arguments: Option<String>,
    },
    /// Show what a running VM is and whether qsnap can snapshot it.
    Info {
        /// The QMP socket (a path, unix:PATH or tcp:HOST:PORT).
        socket: String,
        /// Print one JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
}
