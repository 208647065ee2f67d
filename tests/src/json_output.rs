//! qsnap's `--json` outputs checked against their published schemas (`docs/json/`): every
//! test helper that runs the CLI hands its output to [`check`], so an output that drifts from
//! its schema fails the test that printed it, whatever that test asserts about it.
//!
//! The schema is picked from the command line (the subcommand; `-all` when `status`/`list`
//! printed a list; `error` when the command failed). Nothing here runs qsnap.

use jsonschema::Validator;
use serde_json::Value;
use std::collections::HashMap;
use std::ffi::OsStr;
use std::process::Output;
use std::sync::{Arc, Mutex, OnceLock};

/// Global options that take a value (the word after them is not the subcommand).
const VALUED_GLOBALS: &[&str] = &["--store", "--wait", "--timeout"];

/// The schema file name (without `.schema.json`) for a successful run of `args`, or None
/// when `args` asks for no JSON (no `--json` before `--`).
pub fn schema_name<S: AsRef<OsStr>>(args: &[S]) -> Option<String> {
    let words: Vec<String> = args
        .iter()
        .map(|a| a.as_ref().to_string_lossy().into_owned())
        .take_while(|a| a != "--")
        .collect();
    if !words.iter().any(|a| a == "--json") {
        return None;
    }
    let mut positional = Vec::new();
    let mut skip = false;
    for w in &words {
        if skip {
            skip = false;
        } else if VALUED_GLOBALS.contains(&w.as_str()) {
            skip = true;
        } else if !w.starts_with('-') {
            positional.push(w.as_str());
        }
    }
    match positional.as_slice() {
        ["remote", sub, ..] => Some(format!("remote-{sub}")),
        [command, ..] => Some((*command).to_owned()),
        [] => None,
    }
}

fn validator(name: &str) -> Arc<Validator> {
    static CACHE: OnceLock<Mutex<HashMap<String, Arc<Validator>>>> = OnceLock::new();
    let mut cache = CACHE
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    cache
        .entry(name.to_owned())
        .or_insert_with(|| {
            let path = crate::repo_root()
                .join("docs/json")
                .join(format!("{name}.schema.json"));
            let text = std::fs::read_to_string(&path).unwrap_or_else(|e| {
                panic!(
                    "no schema for `{name}` --json output ({}: {e}): add the output to cli/src/output/json.rs and run `qsnap json-schema docs/json`",
                    path.display()
                )
            });
            let schema: Value = serde_json::from_str(&text)
                .unwrap_or_else(|e| panic!("{} is not JSON: {e}", path.display()));
            Arc::new(
                jsonschema::draft202012::new(&schema)
                    .unwrap_or_else(|e| panic!("{} is not a valid schema: {e}", path.display())),
            )
        })
        .clone()
}

/// Where the names of the outputs checked are appended (one per line), when set: the test
/// command lists the outputs no test produced.
pub const CHECKED_LOG: &str = "QSNAP_JSON_CHECKED";

/// Validates `value` against the schema `name`; panics naming every violation.
pub fn validate(name: &str, value: &Value) {
    let validator = validator(name);
    let problems: Vec<String> = validator
        .iter_errors(value)
        .map(|e| format!("  at {}: {e}", e.instance_path()))
        .collect();
    assert!(
        problems.is_empty(),
        "the `{name}` --json output does not match docs/json/{name}.schema.json:\n{}\noutput: {}",
        problems.join("\n"),
        serde_json::to_string_pretty(value).unwrap_or_default()
    );
}

/// Notes that a real output of `name` was checked (an empty list proves nothing).
fn log_checked(name: &str, value: &Value) {
    if value.as_array().is_some_and(Vec::is_empty) {
        return;
    }
    if let Some(log) = std::env::var_os(CHECKED_LOG) {
        use std::io::Write;
        // One short O_APPEND write per line: lines from parallel tests do not interleave.
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
        {
            let _ = f.write_all(format!("{name}\n").as_bytes());
        }
    }
}

/// The pretty-printed JSON object in `text` (from a line `{` to the last line `}`, the
/// latest `{` that makes one): what `export … - --json` prints on stderr among its other
/// lines, the bundle having stdout.
fn object_in(text: &str) -> Option<Value> {
    let lines: Vec<&str> = text.lines().collect();
    let end = lines.iter().rposition(|l| *l == "}")?;
    (0..end)
        .rev()
        .filter(|&i| lines[i] == "{")
        .find_map(|i| serde_json::from_str(&lines[i..=end].join("\n")).ok())
}

/// Checks what qsnap printed for `args` against its schema, when `args` asked for JSON: the
/// command's schema, or `error` for a failure (`check` prints its report, not an error, when
/// problems remain). A failed command must have printed its error object. Output of a qsnap
/// killed by a signal (no exit code), or that a signal made exit (130, 143: a second
/// interrupt exits at once), is not checked: it may be cut short.
pub fn check<S: AsRef<OsStr>>(args: &[S], out: &Output) {
    let Some(mut name) = schema_name(args) else {
        return;
    };
    if matches!(out.status.code(), None | Some(130 | 143)) {
        return;
    }
    let printed = match serde_json::from_slice::<Value>(&out.stdout) {
        Ok(v) => Some(v),
        // `export … -`: the bundle went to stdout, the report (or error) to stderr.
        Err(_) if name == "export" => object_in(&String::from_utf8_lossy(&out.stderr)),
        Err(_) => None,
    };
    let Some(value) = printed else {
        panic!(
            "qsnap {name} --json (exit {:?}) printed no JSON:\nstdout: {}\nstderr: {}",
            out.status.code(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    };
    if !out.status.success() && value.get("error").is_some() {
        name = "error".to_owned();
    } else if value.is_array() && (name == "status" || name == "list") {
        name.push_str("-all");
    }
    validate(&name, &value);
    log_checked(&name, &value);
}

#[cfg(test)]
mod tests {
    use super::schema_name;

    #[test]
    fn the_schema_follows_the_subcommand() {
        assert_eq!(schema_name(&["status", "vm1"]), None);
        assert_eq!(
            schema_name(&["--store", "s", "status", "vm1", "--json"]).as_deref(),
            Some("status")
        );
        assert_eq!(
            schema_name(&["--wait", "5", "remote", "list", "s3://b", "--json"]).as_deref(),
            Some("remote-list")
        );
        assert_eq!(
            schema_name(&["run", "vm1", "--", "qemu", "--json"]).as_deref(),
            None
        );
        assert_eq!(
            schema_name(&["-v", "lazy-ram", "vm1", "s1", "--json"]).as_deref(),
            Some("lazy-ram")
        );
    }
}
