//! The manual pages: `qsnap(1)` and one page per subcommand (`qsnap-create(1)`, …,
//! `qsnap-remote-gc(1)`), rendered by `clap_mangen` from the same clap definitions as
//! `--help`, so the two cannot drift; `qsnap(1)` adds what `--help` has no room for: the exit
//! codes, the environment and the store's layout.
//!
//! This module must never touch the store or a VM: it only writes the pages into a directory.

use crate::args::Cli;
use clap::CommandFactory;
use std::io::Write;
use std::path::{Path, PathBuf};

/// The exit codes, for every page.
const EXIT_STATUS: &str = r#".SH "EXIT STATUS"
.TP
\fB0\fR
Done (also when there was nothing to do: \fBstart\fR of a running VM, \fBstop\fR of a stopped one).
.TP
\fB1\fR
The operation failed; the message says what state things are in (for \fBcheck\fR: problems remain).
.TP
\fB2\fR
Bad usage: an unknown option, a name that breaks the rules.
.TP
\fB3\fR
The VM's monitor could not be reached.
.TP
\fB4\fR
No such VM or snapshot.
.TP
\fB5\fR
Busy: another qsnap operation holds the VM (retry, or \fB\-\-wait\fR \fISECS\fR), or a block job runs.
.TP
\fB6\fR
Refused: nothing was changed, and retrying as it is will not help.
.TP
\fB130\fR, \fB143\fR
Interrupted by SIGINT (Ctrl\-C) or SIGTERM; what was not done was rolled back.
.PP
With \fB\-\-json\fR a failure also prints {"format": 1, "error": {"kind", "message", "fix"}} on standard output (on standard error for \fBexport\fR to \-). Every \fB\-\-json\fR output carries "format" (its JSON Schemas are in qsnap's docs/json/; CHANGELOG.md says what changes a format).
"#;

/// The environment and the store, for `qsnap(1)`.
const ENVIRONMENT_AND_FILES: &str = r#".SH ENVIRONMENT
.TP
\fBQSNAP_STORE\fR
The store (as \fB\-\-store\fR). Default: \fI/var/lib/qsnap\fR for root, else \fI$XDG_STATE_HOME/qsnap\fR or \fI~/.local/state/qsnap\fR.
.TP
\fBRUST_LOG\fR
Log filter for standard error (wins over \fB\-v\fR); e.g. \fIqsnap_engine=debug\fR.
.TP
\fBAWS_ENDPOINT_URL\fR, \fBAWS_ACCESS_KEY_ID\fR, \fBAWS_SECRET_ACCESS_KEY\fR, \fBAWS_REGION\fR, \fBAWS_ALLOW_HTTP\fR
An S3 object store for \fBpush\fR, \fBpull\fR and \fBremote\fR (\fBAWS_ALLOW_HTTP=true\fR for a plain\-http endpoint).
.SH FILES
.TP
\fISTORE\fR/vms/\fIVM\fR/vm.json
The VM's record: its monitor, pid, command line, current snapshot and disks.
.TP
\fISTORE\fR/vms/\fIVM\fR/snapshots/\fISNAP\fR.json
One manifest per snapshot.
.TP
\fISTORE\fR/vms/\fIVM\fR/memory/
Memory files (0600 in a 0700 directory: they hold the guest's secrets).
.TP
\fISTORE\fR/vms/\fIVM\fR/journal.json
The operation in progress; the next command finishes or rolls back one that was interrupted.
.TP
\fISTORE\fR/vms/\fIVM\fR/qemu.log
QEMU's own output for a VM qsnap started.
.PP
Overlays go next to each disk image (\fIdisk.SNAP.qcow2\fR) unless \fB\-\-overlay\-dir\fR says otherwise.
"#;

/// Writes every page into `dir` (created if missing) and returns their paths.
pub fn write_all(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir)?;
    let mut root = Cli::command().disable_help_subcommand(true);
    root.build();
    let mut written = Vec::new();
    write_page(dir, &root, true, &mut written)?;
    Ok(written)
}

/// The page of `cmd` (and, under it, of each of its visible subcommands).
fn write_page(
    dir: &Path,
    cmd: &clap::Command,
    root: bool,
    written: &mut Vec<PathBuf>,
) -> std::io::Result<()> {
    let man = clap_mangen::Man::new(cmd.clone()).manual("qsnap manual");
    let path = dir.join(man.get_filename());
    let mut page = Vec::new();
    man.render(&mut page)?;
    page.extend_from_slice(EXIT_STATUS.as_bytes());
    if root {
        page.extend_from_slice(ENVIRONMENT_AND_FILES.as_bytes());
    } else {
        page.extend_from_slice(b".SH \"SEE ALSO\"\n\\fBqsnap\\fR(1)\n");
    }
    let mut f = std::fs::File::create(&path)?;
    f.write_all(&page)?;
    written.push(path);
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        write_page(dir, sub, false, written)?;
    }
    Ok(())
}
