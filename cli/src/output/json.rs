//! The JSON interface: every shape `--json` prints, and its schema.
//!
//! Each object printed carries `"format": FORMAT`; an output that is a list (`status` and
//! `list` without a name, `remote list`) carries it in each element. A change a reader could
//! trip over (a field removed or renamed, a type or a meaning changed, a value of a closed
//! set added) bumps [`FORMAT`] and gets an entry in CHANGELOG.md; a new field does not.
//!
//! [`OUTPUTS`] names every output with the type that prints it, and `qsnap json-schema DIR`
//! writes their schemas (docs/json/) from those types, so the schemas cannot drift from what
//! is printed. This module must never print JSON that has no entry in [`OUTPUTS`], and never
//! reads or decides anything: it shapes what it is handed.

use qsnap_engine::launch::{KillSignal, StopOutcome};
use qsnap_engine::{ErrorKind, Manifest, ShutdownOutcome, SnapshotUsage};
use schemars::generate::SchemaSettings;
use schemars::{JsonSchema, Schema};
use serde::Serialize;

/// The version of every `--json` shape (CHANGELOG.md says what changed in each).
pub const FORMAT: u32 = 1;

/// An output object: its format, then its own fields.
#[derive(Serialize, JsonSchema)]
struct Versioned<T> {
    /// The version of this output's shape; it changes only when a change could break a
    /// reader (CHANGELOG.md lists them). Readers should refuse a format they do not know.
    #[schemars(extend("const" = FORMAT))]
    format: u32,
    #[serde(flatten)]
    body: T,
}

fn write(text: &str) {
    println!("{text}");
}

fn pretty<T: Serialize>(v: &T) -> String {
    serde_json::to_string_pretty(v).expect("output types serialise")
}

/// The output object for `body`, as text.
pub fn render<T: Serialize>(body: &T) -> String {
    pretty(&Versioned {
        format: FORMAT,
        body,
    })
}

/// Prints `body` as one output object.
pub fn print<T: Serialize>(body: &T) {
    write(&render(body));
}

/// Prints a list output: each element an output object.
pub fn print_each<T: Serialize>(items: &[T]) {
    let items: Vec<Versioned<&T>> = items
        .iter()
        .map(|body| Versioned {
            format: FORMAT,
            body,
        })
        .collect();
    write(&pretty(&items));
}

/// A snapshot, after `create` and from `show`: its manifest, and what it takes on disk.
#[derive(Serialize, JsonSchema)]
pub struct Shown<'a> {
    #[serde(flatten)]
    pub manifest: &'a Manifest,
    /// What the snapshot takes on disk (`show` only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<&'a SnapshotUsage>,
}

/// Why a command failed: `{"error": {…}}`, printed instead of the command's output.
#[derive(Serialize, JsonSchema)]
pub struct Failed {
    /// What went wrong.
    pub error: Failure,
}

/// A failure, as the exit code and the message on stderr tell it.
#[derive(Serialize, JsonSchema)]
pub struct Failure {
    /// What kind of failure; the exit code follows from it.
    pub kind: ErrorKind,
    /// The message qsnap printed on stderr.
    pub message: String,
    /// The one command that is the way on, when there is one.
    pub fix: Option<String>,
}

/// One VM in an output over every VM: what the one-VM command prints, or why it could not.
/// `vm` has the one-VM output's type either way (`status`: the name; `list`: an object
/// with the `name`, as the record is).
#[derive(Serialize, JsonSchema)]
#[serde(untagged)]
pub enum ForVm<T, V> {
    /// What `status VM --json` (or `list VM --json`) prints.
    Read(T),
    /// A VM whose state could not be read.
    Unreadable {
        /// The VM.
        vm: V,
        /// Why.
        error: Failure,
    },
}

/// A VM `list` could not read, named as its record would name it.
#[derive(Serialize, JsonSchema)]
pub struct Named {
    /// The VM.
    pub name: String,
}

/// What `shutdown` did.
#[derive(Serialize, JsonSchema)]
pub struct ShutDown<'a> {
    /// The VM.
    pub vm: &'a str,
    #[serde(flatten)]
    pub outcome: Shutdown,
}

/// How the VM went down.
#[derive(Serialize, JsonSchema)]
#[serde(tag = "outcome", rename_all = "kebab-case")]
pub enum Shutdown {
    /// The guest powered off when the power button was pressed.
    PoweredOff {
        /// From the button press to QEMU gone.
        seconds: f64,
    },
    /// The guest did not power off in time: QEMU was stopped as `stop` does.
    #[serde(rename_all = "kebab-case")]
    Forced {
        /// How long the guest was given.
        waited_seconds: f64,
        /// How QEMU went.
        stopped_by: StoppedBy,
    },
    /// No QEMU was running.
    AlreadyStopped,
}

/// How QEMU was stopped after the grace period.
#[derive(Serialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum StoppedBy {
    /// It quit when asked on its monitor.
    Quit,
    /// SIGTERM ended it.
    Sigterm,
    /// SIGKILL ended it.
    Sigkill,
    /// It was gone already.
    None,
}

impl From<&ShutdownOutcome> for Shutdown {
    fn from(outcome: &ShutdownOutcome) -> Self {
        match outcome {
            ShutdownOutcome::PoweredOff { after } => Self::PoweredOff {
                seconds: after.as_secs_f64(),
            },
            ShutdownOutcome::Forced { waited, stop } => Self::Forced {
                waited_seconds: waited.as_secs_f64(),
                stopped_by: match stop {
                    StopOutcome::Quit { .. } => StoppedBy::Quit,
                    StopOutcome::Killed {
                        signal: KillSignal::Term,
                        ..
                    } => StoppedBy::Sigterm,
                    StopOutcome::Killed { .. } => StoppedBy::Sigkill,
                    StopOutcome::AlreadyStopped => StoppedBy::None,
                },
            },
            ShutdownOutcome::AlreadyStopped => Self::AlreadyStopped,
        }
    }
}

/// One `--json` output: the command that prints it, and the type it prints.
pub struct Output {
    /// Its schema's file name, without `.schema.json`: the command (`remote list` is
    /// `remote-list`), `-all` for the form over every VM, `error` for a failure.
    pub name: &'static str,
    /// What prints it, for the schema's description.
    pub what: &'static str,
    schema: fn() -> Schema,
}

/// The schema of an output object holding a `T`.
fn one<T: JsonSchema>() -> Schema {
    generator().into_root_schema_for::<Versioned<T>>()
}

/// The schema of a list output of `T`s.
fn each<T: JsonSchema>() -> Schema {
    generator().into_root_schema_for::<Vec<Versioned<T>>>()
}

fn generator() -> schemars::SchemaGenerator {
    SchemaSettings::draft2020_12()
        .for_serialize()
        .into_generator()
}

type Status = qsnap_engine::Status;
type Listing = qsnap_engine::Listing;

/// Every `--json` output.
pub const OUTPUTS: &[Output] = &[
    Output {
        name: "attach",
        what: "qsnap attach --json: the VM's record",
        schema: one::<qsnap_engine::VmRecord>,
    },
    Output {
        name: "check",
        what: "qsnap check --json: what is wrong in the store, and what --repair did",
        schema: one::<qsnap_engine::CheckReport>,
    },
    Output {
        name: "clone",
        what: "qsnap clone --json: the new VM",
        schema: one::<qsnap_engine::CloneReport>,
    },
    Output {
        name: "pool",
        what: "qsnap pool --json: the standbys ready, made and discarded",
        schema: one::<qsnap_engine::PoolReport>,
    },
    Output {
        name: "create",
        what: "qsnap create --json: the snapshot taken",
        schema: one::<Shown<'static>>,
    },
    Output {
        name: "delete",
        what: "qsnap delete --json: what was deleted and merged",
        schema: one::<qsnap_engine::DeleteReport>,
    },
    Output {
        name: "error",
        what: "any command with --json that fails (exit code other than 0)",
        schema: one::<Failed>,
    },
    Output {
        name: "export",
        what: "qsnap export --json: the bundle written (on stderr when the bundle goes to stdout)",
        schema: one::<qsnap_engine::ExportReport>,
    },
    Output {
        name: "forget",
        what: "qsnap forget --json: what was forgotten and what stays on disk",
        schema: one::<qsnap_engine::ForgetReport>,
    },
    Output {
        name: "import",
        what: "qsnap import --json: the snapshot imported",
        schema: one::<qsnap_engine::ImportReport>,
    },
    Output {
        name: "info",
        what: "qsnap info --json: what QEMU says about the VM",
        schema: one::<qsnap_engine::VmInfo>,
    },
    Output {
        name: "lazy-ram",
        what: "qsnap lazy-ram --json: the snapshot's memory made mappable",
        schema: one::<qsnap_engine::LazyReport>,
    },
    Output {
        name: "list",
        what: "qsnap list VM --json: the VM's snapshot tree",
        schema: one::<Listing>,
    },
    Output {
        name: "list-all",
        what: "qsnap list --json: every VM's snapshot tree",
        schema: each::<ForVm<Listing, Named>>,
    },
    Output {
        name: "pull",
        what: "qsnap pull --json: the snapshot fetched from a remote",
        schema: one::<qsnap_remote::PullReport>,
    },
    Output {
        name: "push",
        what: "qsnap push --json: the snapshot sent to a remote",
        schema: one::<qsnap_remote::PushReport>,
    },
    Output {
        name: "remote-gc",
        what: "qsnap remote gc --json: what was collected",
        schema: one::<qsnap_remote::GcReport>,
    },
    Output {
        name: "remote-list",
        what: "qsnap remote list --json: the snapshots on a remote",
        schema: each::<qsnap_remote::RemoteEntry>,
    },
    Output {
        name: "remove",
        what: "qsnap remove --json: the clone removed",
        schema: one::<qsnap_engine::RemoveReport>,
    },
    Output {
        name: "revert",
        what: "qsnap revert --json: how the VM went back",
        schema: one::<qsnap_engine::RevertReport>,
    },
    Output {
        name: "run",
        what: "qsnap run --json: the VM's record",
        schema: one::<qsnap_engine::VmRecord>,
    },
    Output {
        name: "show",
        what: "qsnap show --json: the snapshot and what it takes on disk",
        schema: one::<Shown<'static>>,
    },
    Output {
        name: "shutdown",
        what: "qsnap shutdown --json: how the VM went down",
        schema: one::<ShutDown<'static>>,
    },
    Output {
        name: "status",
        what: "qsnap status VM --json: the VM's state",
        schema: one::<Status>,
    },
    Output {
        name: "status-all",
        what: "qsnap status --json: every VM's state",
        schema: each::<ForVm<Status, String>>,
    },
];

impl Output {
    /// Its schema as pretty JSON, with a title and a description.
    pub fn schema(&self) -> String {
        let mut schema = (self.schema)();
        schema.insert(
            "title".into(),
            format!("qsnap {} output, format {FORMAT}", self.name).into(),
        );
        schema.insert("description".into(), self.what.into());
        let mut value = schema.to_value();
        unwrap_descriptions(&mut value);
        let mut text = pretty(&value);
        text.push('\n');
        text
    }
}

/// Joins the lines of every description into one paragraph each: the doc comments they come
/// from are wrapped at 100 columns, which means nothing to a schema's reader.
fn unwrap_descriptions(v: &mut serde_json::Value) {
    use serde_json::Value;
    match v {
        Value::Object(map) => {
            for (key, item) in map.iter_mut() {
                match item {
                    Value::String(text) if key == "description" => {
                        *text = text
                            .split("\n\n")
                            .map(|para| para.split('\n').collect::<Vec<_>>().join(" "))
                            .collect::<Vec<_>>()
                            .join("\n\n");
                    }
                    _ => unwrap_descriptions(item),
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(unwrap_descriptions),
        _ => {}
    }
}
