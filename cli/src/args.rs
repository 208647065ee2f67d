//! The command line, as clap types: one `…Args` struct per subcommand. Doc comments on the
//! fields and on the [`Command`] variants are the `--help` text.
//!
//! This module must never interpret a value beyond what clap checks (names, paths and JSON
//! become a request in `request.rs`) and never uses the engine.

use clap::{Args, Parser, Subcommand, ValueEnum};
use clap_complete::engine::ArgValueCompleter;
use std::path::PathBuf;

/// Live QEMU snapshots (memory + disks) over QMP, without libvirt.
#[derive(Debug, Parser)]
#[command(
    name = "qsnap",
    version,
    about,
    long_about = None,
    after_help = "Names (VMs and snapshots): 1-64 of letters, digits, '.', '_', '-', not starting with '.' or '-'.\n\
                  Exit codes: 0 done, 1 failed, 2 bad usage, 3 the VM's monitor cannot be reached, 4 no such VM or\n\
                  snapshot, 5 busy (another operation holds the VM: retry, or --wait), 6 refused (nothing changed),\n\
                  130/143 interrupted (Ctrl-C/SIGTERM). With --json, an error is also {\"format\": 1, \"error\": {\"kind\", \"message\", \"fix\"}} on stdout (on stderr for export to -); every --json output carries \"format\" (schemas: docs/json/)."
)]
pub struct Cli {
    /// More log output on stderr (-v: info, -vv: debug, -vvv: QMP wire trace). RUST_LOG wins.
    #[arg(short, long, action = clap::ArgAction::Count, global = true, help_heading = "Global options")]
    pub verbose: u8,

    /// Seconds to wait for each QMP command (and for the monitor's greeting).
    #[arg(
        long,
        global = true,
        default_value_t = 30,
        value_name = "SECS",
        help_heading = "Global options"
    )]
    pub timeout: u64,

    /// When another qsnap operation holds the VM, wait up to SECS for it to finish instead
    /// of failing at once with exit code 5.
    #[arg(
        long,
        global = true,
        value_name = "SECS",
        help_heading = "Global options"
    )]
    pub wait: Option<u64>,

    /// Where qsnap keeps VM records, snapshot manifests and memory files. Default:
    /// /var/lib/qsnap for root, else $XDG_STATE_HOME/qsnap or ~/.local/state/qsnap.
    #[arg(
        long,
        global = true,
        env = "QSNAP_STORE",
        value_name = "DIR",
        help_heading = "Global options"
    )]
    pub store: Option<PathBuf>,

    #[command(subcommand)]
    pub command: Command,
}

/// The memory capture mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ModeArg {
    /// point-in-time where QEMU and the host support it, else precopy.
    Auto,
    /// Memory as at the request; the guest pauses for milliseconds (QEMU ≥ 6.0 with
    /// userfaultfd write-protect; before 9.0, a running guest only).
    PointInTime,
    /// Live copy; memory as at the end of the copy.
    Precopy,
}

/// A shell `qsnap completions` writes a script for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ShellArg {
    /// GNU bash.
    Bash,
    /// zsh.
    Zsh,
    /// fish.
    Fish,
    /// elvish.
    Elvish,
    /// PowerShell.
    Powershell,
}

impl ShellArg {
    /// The shell's name, as the completion engine knows it.
    pub fn name(self) -> &'static str {
        match self {
            ShellArg::Bash => "bash",
            ShellArg::Zsh => "zsh",
            ShellArg::Fish => "fish",
            ShellArg::Elvish => "elvish",
            ShellArg::Powershell => "powershell",
        }
    }
}

/// What to do.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Register a running QEMU under NAME (its QMP socket, pid and command line).
    ///
    /// Give qsnap its own monitor if another manager uses the first one:
    /// qemu … -qmp unix:/run/vm1/qsnap.sock,server=on,wait=off
    Attach(AttachArgs),
    /// Take a live snapshot: memory and all writable disks at one instant, guest running.
    Create(CreateArgs),
    /// Start a new VM from a snapshot, next to the running one: its own overlays over the
    /// snapshot's frozen images (never written), its own monitor, log and per-VM files.
    ///
    /// Sockets and files the command line names (-chardev/-qmp/-monitor/-serial paths,
    /// -pidfile, -D) are moved into the clone's store directory; `status NEW --json` lists
    /// where each went. What must differ between VMs but qsnap cannot choose (a hostfwd port,
    /// a tap device, a VNC/SPICE display, -name) is refused, naming the option, unless
    /// --replace gives the clone its own.
    Clone(CloneArgs),
    /// Write a snapshot as one bundle file (or to stdout with -) that `qsnap import` turns
    /// into a VM on another host: its disk chains down to the base images, its memory, the
    /// files its command line boots from, and its command line with host paths made relative.
    ///
    /// A tar archive, zstd-compressed (`tar --zstd -tvf FILE` lists it); holes and zero blocks
    /// are not shipped; every file's BLAKE3 hash is in it. Holds guest memory: written 0600,
    /// never over an existing file. The VM may be running.
    Export(ExportArgs),
    /// Make a VM (stopped) from a bundle `qsnap export` wrote (- reads stdin); `qsnap revert
    /// NAME SNAP` then starts it from the snapshot.
    ///
    /// Nothing is trusted until checked: every byte against its hash before anything is
    /// registered (a damaged or cut-short bundle leaves nothing behind); the bundle's command
    /// line may not reach the host (host paths, tap/bridge networks, host devices, plugins,
    /// …) unless --trust-command-line; what must differ between hosts (a hostfwd port) is
    /// refused unless --replace gives it. An incremental bundle (export --base) adds its
    /// snapshot to the VM NAME that holds its base.
    Import(ImportArgs),
    /// Make a key pair for signing bundles: PREFIX.key (secret, 0600, unencrypted) and
    /// PREFIX.pub (give it to importers: `import --trust PREFIX.pub`). minisign-compatible.
    Keygen(KeygenArgs),
    /// Upload a snapshot to an object store (s3://BUCKET/PREFIX, file:///DIR) as
    /// content-addressed chunks: only chunks the store lacks are sent, so a snapshot of a VM
    /// pushed before costs little. The VM may be running.
    ///
    /// S3 is configured as every S3 tool is: AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID,
    /// AWS_SECRET_ACCESS_KEY, AWS_REGION, and AWS_ALLOW_HTTP=true for a plain-http endpoint.
    /// The snapshot appears in the store only once whole (its manifest is written last, only
    /// if the name is free: two hosts pushing one name cannot overwrite each other).
    Push(PushArgs),
    /// Download a snapshot from an object store into a new VM NAME (stopped), exactly as
    /// `import` makes one from a bundle: same checks, same staging, same refusals. Into an
    /// existing VM NAME, a snapshot pushed with --base adds itself where NAME holds its base.
    ///
    /// Every chunk is hashed before its bytes are used; a missing or damaged chunk stops the
    /// pull, naming it, with nothing registered. Chunks are kept in the store's chunk cache:
    /// a re-run, or a pull of a related snapshot, fetches only what it lacks.
    Pull(PullArgs),
    /// What an object store holds: list, rm, gc.
    #[command(subcommand)]
    Remote(RemoteCommand),
    /// Remove a clone: stop it, delete its snapshots, overlays, files and record. Only for
    /// clones (another VM's overlays hold its data: `delete --all` merges them).
    Remove(RemoveArgs),
    /// Make a snapshot's memory lazy: reverts then map its RAM copy-on-write (pages load as
    /// the guest touches them) instead of loading all of it first.
    ///
    /// Its memory stream is replaced by a RAM image (sparse: zero pages take no space) and a
    /// small device-state file; a helper QEMU, cut off from everything the VM reaches (sockets,
    /// networks, displays, its disks), does the conversion while the VM runs on. Needs QEMU
    /// ≥ 8.2; RAM from -m or from named RAM/memfd backends (-machine memory-backend=, -numa
    /// node,memdev=), not -mem-path, huge pages, shared or preallocated backends, virtio-mem,
    /// vhost-user or balloon free-page reporting. A VM reverted lazily takes precopy memory snapshots
    /// (QEMU cannot write-protect a private file mapping for point-in-time ones).
    LazyRam(LazyRamArgs),
    /// Start QEMU under qsnap: detached, with a monitor socket in the store, registered as NAME.
    ///
    /// Example: qsnap run vm1 -- qemu-system-x86_64 -m 512 -drive file=/vm/disk.qcow2,if=virtio
    Run(RunArgs),
    /// Stop the VM's QEMU (QMP quit, then SIGKILL after 10 s). The guest gets no warning:
    /// `shutdown` lets it power off cleanly.
    Stop(StopArgs),
    /// Power the guest off cleanly: press its ACPI power button (system_powerdown), wait for
    /// QEMU to exit, and stop QEMU as `stop` does if the guest has not powered off in time.
    Shutdown(ShutdownArgs),
    /// Take a VM out of the store (as `virsh undefine`): its record, and with
    /// --with-snapshots its snapshots' manifests and memory files. Every disk image stays
    /// where it is, and the output names the image each disk is on now (boot from that one).
    ///
    /// Refused while its QEMU runs (unless --stop), while it has snapshots (unless
    /// --with-snapshots; `delete --all` first merges them into its images), and while a
    /// clone runs on one of its images. For a clone, `remove` deletes its overlays instead.
    Forget(ForgetArgs),
    /// Keep N standbys of a snapshot ready: clones made ahead of time (QEMU started, memory
    /// loaded or mapped, overlays made), paused before their guest ever runs. `qsnap clone
    /// VM SNAP NEW` then claims one (it becomes NEW and resumes) instead of starting a QEMU,
    /// and the pool refills in the background. Returns when N are ready; --size 0 stops and
    /// removes them all.
    ///
    /// A standby is a VM in the store (sb-…, shown by `status`); one that can no longer be
    /// used (the snapshot deleted or taken again, the VM's command line changed, the QEMU
    /// binary replaced, its QEMU gone) is discarded, never handed out. Deleting the snapshot
    /// removes its pool.
    Pool(PoolArgs),
    /// Give a snapshot another name (its memory files follow; its disk images keep theirs).
    Rename(RenameArgs),
    /// Start a stopped VM again on its current disks (never on a snapshot's frozen images).
    Start(StartArgs),
    /// Pause the guest (its CPUs stop; QEMU keeps running, memory and devices as they are).
    Pause(StartArgs),
    /// Resume a paused guest (after pause, revert --paused, or clone --paused).
    Resume(StartArgs),
    /// Is the VM running, which snapshot is current, and each disk's chain; without a name,
    /// every VM of the store at a glance (as `virsh list --all`).
    Status(StatusArgs),
    /// Go back to a snapshot (or the newest one, --latest): the VM comes back with the memory
    /// and disks it had then.
    ///
    /// The current QEMU is stopped and relaunched on new overlays over the snapshot's images
    /// (the snapshot stays revertible); a disk-only snapshot boots from its disks.
    ///
    /// This DISCARDS the current state: whatever the guest did since its last snapshot is
    /// lost, unless --keep-current saves it as a snapshot first.
    Revert(RevertArgs),
    /// Delete snapshots (one, several, one with its children, or all), the VM running or
    /// stopped.
    ///
    /// The snapshot's memory file and manifest go; disk layers that no remaining snapshot
    /// needs are merged (live block jobs in a running VM, qemu-img otherwise). The VM's
    /// current state is kept; images the VM had before its first snapshot are never removed.
    Delete(DeleteArgs),
    /// Verify a VM's snapshots and disks against the files and QEMU.
    ///
    /// Exit 0: all is well (or was repaired); 1: problems remain (each with what to do).
    Check(CheckArgs),
    /// List a VM's snapshots as a tree (parent → children); `*` marks the current one: the
    /// snapshot the VM's present state descends from (the parent of the next one taken).
    List(ListArgs),
    /// Show one snapshot.
    Show(ShowArgs),
    /// Send one raw QMP command and print QEMU's reply as JSON.
    ///
    /// Example: qsnap qmp vm1 query-status
    ///          qsnap qmp /run/vm1/qmp.sock query-status
    ///          qsnap qmp /run/vm1/qmp.sock human-monitor-command '{"command-line":"info block"}'
    Qmp(QmpArgs),
    /// Show what a running VM is and whether qsnap can snapshot it.
    Info(InfoArgs),
    /// Print the script that makes SHELL complete qsnap's commands, options, and the VM and
    /// snapshot names of the store (bash, zsh, fish, elvish, powershell).
    ///
    /// bash: qsnap completions bash > ~/.local/share/bash-completion/completions/qsnap
    /// zsh:  qsnap completions zsh > ~/.zfunc/_qsnap (a directory on $fpath)
    /// fish: qsnap completions fish > ~/.config/fish/completions/qsnap.fish
    Completions {
        /// The shell.
        #[arg(value_enum)]
        shell: ShellArg,
    },
    /// Write the manual pages (qsnap.1 and one per subcommand) into DIR.
    #[command(hide = true)]
    Man {
        /// Where the pages go (created if missing).
        dir: PathBuf,
    },
    /// Write the JSON Schema of every --json output (NAME.schema.json) into DIR.
    #[command(hide = true, name = "json-schema")]
    JsonSchema {
        /// Where the schemas go (created if missing).
        dir: PathBuf,
    },
}

/// `qsnap attach`.
#[derive(Debug, Args)]
pub struct AttachArgs {
    /// The name to use for the VM.
    pub name: String,
    /// The QMP socket (a path, unix:PATH or tcp:HOST:PORT).
    #[arg(long, value_name = "SOCKET")]
    pub qmp: String,
    /// Accept a QEMU that runs as another user. qsnap records its command line and runs it
    /// again on start and revert, as qsnap's user: think before doing this as root.
    #[arg(long)]
    pub allow_other_user: bool,
    /// Print the record as JSON.
    #[arg(long)]
    pub json: bool,
}

/// `qsnap create`.
#[derive(Debug, Args)]
pub struct CreateArgs {
    /// The VM's name.
    #[arg(add = ArgValueCompleter::new(crate::complete::vm_names))]
    pub name: String,
    /// The snapshot's name: 1-64 of letters, digits, '.', '_', '-', not starting with '.'
    /// or '-'. Default: snap-YYYYMMDDTHHMMSSZ, the UTC time (printed; -2, -3… added if taken).
    pub snapshot: Option<String>,
    /// A line saying what the snapshot is for (shown by list and show).
    #[arg(long, value_name = "TEXT")]
    pub description: Option<String>,
    /// Disks only, no memory (crash-consistent; the guest never pauses).
    #[arg(long, conflicts_with = "mode")]
    pub disk_only: bool,
    /// With --disk-only: freeze the guest's filesystems through the QEMU guest agent
    /// while the disks switch (needs a virtserialport named org.qemu.guest_agent.0 on a
    /// -chardev socket in the VM's command line; always thawed).
    #[arg(long, requires = "disk_only")]
    pub quiesce: bool,
    /// How memory is captured.
    #[arg(long, value_enum, default_value_t = ModeArg::Auto)]
    pub mode: ModeArg,
    /// Put overlays here instead of next to each image.
    #[arg(long, value_name = "DIR")]
    pub overlay_dir: Option<PathBuf>,
    /// Precopy: seconds the guest may run while memory is copied before qsnap pauses it
    /// so the save finishes.
    #[arg(
        long,
        default_value_t = 30,
        value_name = "SECS",
        conflicts_with = "disk_only"
    )]
    pub live_limit: u64,
    /// Precopy: write QEMU's plain migration stream instead of its mapped-ram format
    /// (which QEMU ≥ 9.0 writes and loads with several threads, zero pages as holes;
    /// such a snapshot needs QEMU ≥ 9.0 to revert).
    #[arg(long)]
    pub no_mapped_ram: bool,
    /// Give up on the memory save after this many seconds (everything is rolled back).
    #[arg(long, default_value_t = 600, value_name = "SECS")]
    pub save_timeout: u64,
    /// Then make its memory lazy (as `qsnap lazy-ram` does), while the guest runs on: later
    /// reverts map its RAM instead of loading it. If the VM cannot use lazy RAM, the
    /// snapshot stays as taken and a warning says why.
    #[arg(long)]
    pub lazy_ram: bool,
    /// Print the snapshot's manifest as JSON (no progress bar).
    #[arg(long)]
    pub json: bool,
}

/// `qsnap clone`.
#[derive(Debug, Args)]
pub struct CloneArgs {
    /// The source VM.
    #[arg(add = ArgValueCompleter::new(crate::complete::vm_names))]
    pub name: String,
    /// The snapshot to start from.
    #[arg(add = ArgValueCompleter::new(crate::complete::snapshot_names))]
    pub snapshot: String,
    /// The new VM's name.
    pub new: String,
    /// Leave the clone's guest paused.
    #[arg(long)]
    pub paused: bool,
    /// Never take a standby of the snapshot's pool (`qsnap pool`): start a QEMU of its own.
    #[arg(long)]
    pub cold: bool,
    /// Replace text in the recorded command line for the clone (repeatable), e.g.
    /// --replace tcp::2222-:22=tcp::2223-:22. OLD and NEW may hold '=': the split taken
    /// is the one whose OLD is in the command line (the middle '=' when several are).
    #[arg(long, value_name = "OLD=NEW", add = ArgValueCompleter::new(crate::complete::replace_values))]
    pub replace: Vec<String>,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

/// `qsnap export`.
#[derive(Debug, Args)]
pub struct ExportArgs {
    /// The VM.
    #[arg(add = ArgValueCompleter::new(crate::complete::vm_names))]
    pub name: String,
    /// The snapshot.
    #[arg(add = ArgValueCompleter::new(crate::complete::snapshot_names))]
    pub snapshot: String,
    /// The bundle to write (must not exist), or - for stdout.
    pub file: PathBuf,
    /// Incremental: only what changed since this snapshot, for a receiver that imported it
    /// already (disk layers above it; memory as a delta where both are mapped-ram or lazy).
    #[arg(long, value_name = "SNAP", add = ArgValueCompleter::new(crate::complete::snapshot_names))]
    pub base: Option<String>,
    /// zstd level (1-19).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(i32).range(1..=19))]
    pub level: i32,
    /// Compression threads (0: one per CPU).
    #[arg(long, default_value_t = 0)]
    pub threads: u32,
    /// Sign the bundle with this secret key (`qsnap keygen`).
    #[arg(long, value_name = "KEY")]
    pub sign: Option<PathBuf>,
    /// Print the report as JSON (on stderr when the bundle goes to stdout).
    #[arg(long)]
    pub json: bool,
}

/// `qsnap push`.
#[derive(Debug, Args)]
pub struct PushArgs {
    /// The VM.
    #[arg(add = ArgValueCompleter::new(crate::complete::vm_names))]
    pub name: String,
    /// The snapshot.
    #[arg(add = ArgValueCompleter::new(crate::complete::snapshot_names))]
    pub snapshot: String,
    /// The store: s3://BUCKET/PREFIX or file:///DIR.
    pub url: String,
    /// The name in the store (default: NAME/SNAPSHOT).
    #[arg(long = "as", value_name = "VM/SNAP")]
    pub as_name: Option<String>,
    /// Sign the snapshot's seal with this secret key (`qsnap keygen`); `pull --trust` checks it.
    #[arg(long, value_name = "KEY")]
    pub sign: Option<PathBuf>,
    /// Also as an incremental on this earlier snapshot (pushed before): a pull into the VM
    /// that holds it adds the snapshot there, fetching what changed since.
    #[arg(long, value_name = "SNAP", add = ArgValueCompleter::new(crate::complete::snapshot_names))]
    pub base: Option<String>,
    /// Chunks uploaded at once.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u16).range(1..=256))]
    pub parallel: u16,
    /// A chunk the store has that is older than this is uploaded again (its time then says
    /// it is in use; `remote gc`'s grace must exceed this plus the longest push).
    #[arg(long, default_value = "1h", value_parser = humantime::parse_duration, hide = true)]
    pub refresh: std::time::Duration,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

/// `qsnap pull`.
#[derive(Debug, Args)]
pub struct PullArgs {
    /// The store: s3://BUCKET/PREFIX or file:///DIR.
    pub url: String,
    /// The snapshot there: VM/SNAP (`qsnap remote list URL`).
    pub remote_name: String,
    /// The VM to make (or, for a snapshot pushed with --base, the VM holding that base).
    pub name: String,
    #[command(flatten)]
    pub import: ImportFlags,
    /// Chunks downloaded at once.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u16).range(1..=256))]
    pub parallel: u16,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

/// `qsnap remote …`.
#[derive(Debug, clap::Subcommand)]
pub enum RemoteCommand {
    /// The snapshots a store holds.
    List {
        /// The store: s3://BUCKET/PREFIX or file:///DIR.
        url: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Forget a snapshot in a store (its chunks go at the next gc unless another uses them).
    Rm {
        /// The store.
        url: String,
        /// The snapshot there: VM/SNAP.
        remote_name: String,
    },
    /// Remove the chunks no snapshot uses and older than the grace period (a push in
    /// progress is younger: its chunks stay).
    Gc {
        /// The store.
        url: String,
        /// Keep unused chunks younger than this (e.g. 24h, 30m, 0s). It must exceed the
        /// longest push plus one hour for a concurrent push to be safe.
        #[arg(long, default_value = "24h", value_parser = humantime::parse_duration)]
        grace: std::time::Duration,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
}

/// `qsnap keygen`.
#[derive(Debug, Args)]
pub struct KeygenArgs {
    /// Where the keys go: PREFIX.key and PREFIX.pub (neither may exist).
    pub prefix: PathBuf,
}

/// `qsnap import`.
#[derive(Debug, Args)]
pub struct ImportArgs {
    /// The bundle, or - for stdin.
    pub file: PathBuf,
    /// The VM to make (or, for an incremental bundle, the VM holding its base).
    pub name: String,
    #[command(flatten)]
    pub import: ImportFlags,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

/// What `import` and `pull` tell the import.
#[derive(Debug, Args)]
pub struct ImportFlags {
    /// Where the disk images go (default: the VM's directory in the store).
    #[arg(long, value_name = "DIR")]
    pub disk_dir: Option<PathBuf>,
    /// Replace text in the snapshot's command line (repeatable), e.g.
    /// --replace tcp::2222-:22=tcp::2223-:22.
    #[arg(long, value_name = "OLD=NEW")]
    pub replace: Vec<String>,
    /// Run the snapshot's command line even where it reaches host resources (you trust its
    /// author).
    #[arg(long)]
    pub trust_command_line: bool,
    /// Accept only a snapshot signed by this public key (repeatable: any of them); its
    /// command line is then trusted.
    #[arg(long, value_name = "PUBKEY")]
    pub trust: Vec<PathBuf>,
    /// The QEMU binary to run the VM with (default: the snapshot's, found in PATH).
    #[arg(long, value_name = "PATH")]
    pub qemu: Option<String>,
}

/// `qsnap remove`.
#[derive(Debug, Args)]
pub struct RemoveArgs {
    /// The clone.
    #[arg(add = ArgValueCompleter::new(crate::complete::vm_names))]
    pub name: String,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

/// `qsnap lazy-ram`.
#[derive(Debug, Args)]
pub struct LazyRamArgs {
    /// The VM's name.
    #[arg(add = ArgValueCompleter::new(crate::complete::vm_names))]
    pub name: String,
    /// The snapshot's name.
    #[arg(add = ArgValueCompleter::new(crate::complete::snapshot_names))]
    pub snapshot: String,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// `qsnap run`.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// The name to use for the VM.
    pub name: String,
    /// Do not add tsc-frequency=HOST_HZ to a -cpu that asks for invtsc (memory snapshots
    /// of such a VM are then refused by QEMU).
    #[arg(long)]
    pub no_tsc_fix: bool,
    /// Print the record as JSON.
    #[arg(long)]
    pub json: bool,
    /// The QEMU command line.
    #[arg(last = true, required = true, value_name = "QEMU ARGS")]
    pub qemu: Vec<String>,
}

/// `qsnap stop`.
#[derive(Debug, Args)]
pub struct StopArgs {
    /// The VM's name.
    #[arg(add = ArgValueCompleter::new(crate::complete::vm_names))]
    pub name: String,
}

/// `qsnap shutdown`.
#[derive(Debug, Args)]
pub struct ShutdownArgs {
    /// The VM's name.
    #[arg(add = ArgValueCompleter::new(crate::complete::vm_names))]
    pub name: String,
    /// Seconds the guest has to power off before QEMU is stopped.
    #[arg(long = "grace", default_value_t = 60, value_name = "SECS")]
    pub grace: u64,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// `qsnap forget`.
#[derive(Debug, Args)]
pub struct ForgetArgs {
    /// The VM's name.
    #[arg(add = ArgValueCompleter::new(crate::complete::vm_names))]
    pub name: String,
    /// Stop its QEMU first (quit, SIGKILL after 10 s) instead of refusing.
    #[arg(long)]
    pub stop: bool,
    /// Forget its snapshots too: their manifests and memory files are removed (disk images
    /// stay).
    #[arg(long)]
    pub with_snapshots: bool,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// `qsnap pool`.
#[derive(Debug, Args)]
pub struct PoolArgs {
    /// The source VM.
    #[arg(add = ArgValueCompleter::new(crate::complete::vm_names))]
    pub name: String,
    /// The snapshot its standbys hold.
    #[arg(add = ArgValueCompleter::new(crate::complete::snapshot_names))]
    pub snapshot: String,
    /// How many standbys to keep ready (0: none, and the pool is removed).
    #[arg(long, value_name = "N", required_unless_present = "refill")]
    pub size: Option<usize>,
    /// Bring the pool back to its recorded size (what a clone that took a standby starts in
    /// the background).
    #[arg(long, conflicts_with = "size")]
    pub refill: bool,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// `qsnap rename`.
#[derive(Debug, Args)]
pub struct RenameArgs {
    /// The VM's name.
    #[arg(add = ArgValueCompleter::new(crate::complete::vm_names))]
    pub name: String,
    /// The snapshot's name now.
    #[arg(add = ArgValueCompleter::new(crate::complete::snapshot_names))]
    pub old: String,
    /// Its new name.
    pub new: String,
}

/// `qsnap start`.
#[derive(Debug, Args)]
pub struct StartArgs {
    /// The VM's name.
    #[arg(add = ArgValueCompleter::new(crate::complete::vm_names))]
    pub name: String,
}

/// `qsnap status`.
#[derive(Debug, Args)]
pub struct StatusArgs {
    /// The VM's name (none: every VM of the store, one line each).
    #[arg(add = ArgValueCompleter::new(crate::complete::vm_names))]
    pub name: Option<String>,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// `qsnap revert`.
#[derive(Debug, Args)]
pub struct RevertArgs {
    /// The VM's name.
    #[arg(add = ArgValueCompleter::new(crate::complete::vm_names))]
    pub name: String,
    /// The snapshot's name.
    #[arg(
        required_unless_present = "latest",
        conflicts_with = "latest",
        add = ArgValueCompleter::new(crate::complete::snapshot_names)
    )]
    pub snapshot: Option<String>,
    /// The newest snapshot (by when it was taken).
    #[arg(long)]
    pub latest: bool,
    /// Leave the guest paused after loading its memory.
    #[arg(long)]
    pub paused: bool,
    /// Save the current state as a snapshot first (named NAME, default
    /// `before-revert-<UTC time>`), so that it can be reverted to later.
    #[arg(long, value_name = "NAME", num_args = 0..=1, default_missing_value = "")]
    pub keep_current: Option<String>,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// `qsnap delete`.
#[derive(Debug, Args)]
pub struct DeleteArgs {
    /// The VM's name.
    #[arg(add = ArgValueCompleter::new(crate::complete::vm_names))]
    pub name: String,
    /// The snapshots to delete (all in one operation; an unknown name deletes none).
    #[arg(
        required_unless_present = "all",
        conflicts_with = "all",
        add = ArgValueCompleter::new(crate::complete::snapshot_names)
    )]
    pub snapshots: Vec<String>,
    /// And every snapshot descending from them.
    #[arg(long, conflicts_with = "all")]
    pub children: bool,
    /// Delete every snapshot: the VM ends on one image per disk.
    #[arg(long)]
    pub all: bool,
    /// Print what was deleted, merged and removed as JSON (no progress bar).
    #[arg(long)]
    pub json: bool,
}

/// `qsnap check`.
#[derive(Debug, Args)]
pub struct CheckArgs {
    /// The VM's name.
    #[arg(add = ArgValueCompleter::new(crate::complete::vm_names))]
    pub name: String,
    /// Finish or roll back an interrupted operation, make the record follow QEMU, remove
    /// files qsnap made that nothing uses, and merge leftover layers.
    #[arg(long)]
    pub repair: bool,
    /// Read every memory file and check every image, even those an earlier check verified
    /// that are unchanged since (same inode, size, mtime and ctime: not written since).
    #[arg(long)]
    pub full: bool,
    /// Print the findings as JSON.
    #[arg(long)]
    pub json: bool,
}

/// `qsnap list`.
#[derive(Debug, Args)]
pub struct ListArgs {
    /// The VM's name (none: every VM's tree).
    #[arg(add = ArgValueCompleter::new(crate::complete::vm_names))]
    pub name: Option<String>,
    /// Print JSON: the VM record and every manifest.
    #[arg(long)]
    pub json: bool,
}

/// `qsnap show`.
#[derive(Debug, Args)]
pub struct ShowArgs {
    /// The VM's name.
    #[arg(add = ArgValueCompleter::new(crate::complete::vm_names))]
    pub name: String,
    /// The snapshot's name.
    #[arg(add = ArgValueCompleter::new(crate::complete::snapshot_names))]
    pub snapshot: String,
    /// Print the manifest as JSON.
    #[arg(long)]
    pub json: bool,
}

/// `qsnap qmp`.
#[derive(Debug, Args)]
pub struct QmpArgs {
    /// The VM (its name in the store), or a QMP socket (a path, unix:PATH or tcp:HOST:PORT).
    #[arg(add = ArgValueCompleter::new(crate::complete::vm_names))]
    pub socket: String,
    /// The QMP command name, e.g. query-status.
    pub command: String,
    /// The arguments as a JSON object.
    pub arguments: Option<String>,
}

/// `qsnap info`.
#[derive(Debug, Args)]
pub struct InfoArgs {
    /// The VM (its name in the store), or a QMP socket (a path, unix:PATH or tcp:HOST:PORT).
    #[arg(add = ArgValueCompleter::new(crate::complete::vm_names))]
    pub socket: String,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}
