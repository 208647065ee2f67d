//! JSON as an interface (issue 21, item 6): the schemas in docs/json/ are the ones the binary
//! generates from its output types, every output object carries `"format": 1`, and the
//! schema check the other tests run on every `--json` output (`qsnap_testkit::json_output`)
//! catches an output that drifts. The outputs of real VMs are checked where the tests that
//! produce them run (the test command fails when some output was checked by none).

use assert_cmd::Command;
use qsnap_testkit::json_output;
use serde_json::Value;
use std::collections::BTreeSet;
use std::path::Path;

fn qsnap(store: &Path, args: &[&str]) -> std::process::Output {
    let out = Command::cargo_bin("qsnap")
        .unwrap()
        .env("QSNAP_STORE", store)
        .args(args)
        .output()
        .unwrap();
    json_output::check(args, &out);
    out
}

fn schemas_in(dir: &Path) -> BTreeSet<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".schema.json"))
        .collect()
}

#[test]
fn docs_json_holds_the_schemas_the_binary_generates() {
    let fresh = tempfile::tempdir().unwrap();
    let out = Command::cargo_bin("qsnap")
        .unwrap()
        .arg("json-schema")
        .arg(fresh.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let docs = qsnap_testkit::repo_root().join("docs/json");
    let regenerate = "regenerate them: cargo run -p qsnap -- json-schema docs/json";
    let made = schemas_in(fresh.path());
    assert_eq!(
        made,
        schemas_in(&docs),
        "docs/json/ names other outputs than the binary: {regenerate}"
    );
    assert!(made.len() >= 20, "{made:?}");
    for name in &made {
        let want = std::fs::read_to_string(fresh.path().join(name)).unwrap();
        let have = std::fs::read_to_string(docs.join(name)).unwrap();
        assert!(
            want == have,
            "docs/json/{name} is not what this build generates: {regenerate}"
        );
        let schema: Value = serde_json::from_str(&have).unwrap();
        assert_eq!(
            schema["$schema"], "https://json-schema.org/draft/2020-12/schema",
            "{name}"
        );
        // Every output object, or every element of a list output, requires its format.
        let object = if schema["type"] == "array" {
            let items = schema["items"]["$ref"].as_str().unwrap_or_default();
            let def = items.trim_start_matches("#/$defs/");
            schema["$defs"][def].clone()
        } else {
            schema.clone()
        };
        assert_eq!(object["properties"]["format"]["const"], 1, "{name}");
        assert!(
            object["required"]
                .as_array()
                .is_some_and(|r| r.contains(&"format".into())),
            "{name}: format is not required"
        );
    }
}

#[test]
fn an_output_that_drifts_from_its_schema_is_caught() {
    let store = tempfile::tempdir().unwrap();
    // A real output: the error object of a VM that is not there (exit code 4).
    let out = qsnap(store.path(), &["status", "nosuch", "--json"]);
    assert_eq!(out.status.code(), Some(4), "{out:?}");
    let good: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(good["format"], 1, "{good}");
    assert_eq!(good["error"]["kind"], "not-found", "{good}");
    json_output::validate("error", &good);

    let drifted = |change: &dyn Fn(&mut Value)| {
        let mut v = good.clone();
        change(&mut v);
        std::panic::catch_unwind(|| json_output::validate("error", &v)).is_err()
    };
    assert!(drifted(&|v| {
        v.as_object_mut().unwrap().remove("format");
    }));
    assert!(drifted(&|v| v["format"] = 2.into()));
    assert!(drifted(&|v| v["error"]["kind"] = "sad".into()));
    assert!(drifted(&|v| {
        v["error"].as_object_mut().unwrap().remove("message");
    }));
    // A field the schema does not name is an addition, not a break.
    assert!(!drifted(&|v| v["later"] = true.into()));

    // `export … -` gives stdout to the bundle: its error object goes to stderr.
    let out = qsnap(store.path(), &["export", "nosuch", "s1", "-", "--json"]);
    assert_eq!(out.status.code(), Some(4), "{out:?}");
    assert!(out.stdout.is_empty(), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    let object = &err[err.find("\n{").map_or(0, |i| i + 1)..];
    let v: Value = serde_json::from_str(object).unwrap_or_else(|e| panic!("{e}: {err}"));
    assert_eq!(v["error"]["kind"], "not-found", "{v}");

    // A failure before the command is even parsed (an empty QSNAP_STORE) is an object too.
    let args = ["status", "--json"];
    let out = Command::cargo_bin("qsnap")
        .unwrap()
        .env("QSNAP_STORE", "")
        .args(args)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    json_output::check(&args, &out);
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["error"]["kind"], "usage", "{v}");

    // The outputs over every VM are lists (empty here) whose elements carry the format.
    for command in ["status", "list"] {
        let out = qsnap(store.path(), &[command, "--json"]);
        assert!(out.status.success(), "{out:?}");
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(v, Value::Array(vec![]), "{command}");
    }
    json_output::validate(
        "status-all",
        &serde_json::json!([{
            "format": 1,
            "vm": "broken",
            "error": {"kind": "failed", "message": "its record is damaged", "fix": null},
        }]),
    );
}
