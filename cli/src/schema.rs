//! The JSON Schemas of the `--json` outputs (docs/json/), written by the hidden `qsnap
//! json-schema DIR` from the types that print them (`output::json::OUTPUTS`), so a script's
//! author reads the shape the binary really prints. A test regenerates them and fails when
//! docs/json/ differs.
//!
//! This module must never touch the store or a VM: it only writes files into a directory.

use crate::output::json::OUTPUTS;
use std::path::{Path, PathBuf};

/// Writes one `NAME.schema.json` per output into `dir` (created if missing) and returns
/// their paths. It writes only those names, replacing what they held.
pub fn write_all(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir)?;
    let mut written = Vec::new();
    for output in OUTPUTS {
        let path = dir.join(format!("{}.schema.json", output.name));
        std::fs::write(&path, output.schema())?;
        written.push(path);
    }
    Ok(written)
}
