//! Shell completions (issue 21, item 2): `qsnap completions SHELL` loads in bash, zsh and
//! fish, and completes subcommands and the VM and snapshot names of a real store (a VM that
//! `qsnap run` started, with a snapshot).

use qsnap_testkit::{require_qemu, KillRecordedQemu, VmBuilder};
use std::path::{Path, PathBuf};
use std::process::Output;

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// PATH with the qsnap under test first: the scripts call `qsnap` back for every Tab.
fn path_with_qsnap() -> String {
    let bin = assert_cmd::cargo::cargo_bin("qsnap");
    let dir = bin.parent().unwrap().display().to_string();
    format!("{dir}:{}", std::env::var("PATH").unwrap_or_default())
}

fn shell_or_skip(shell: &str) -> bool {
    if std::process::Command::new(shell)
        .arg("-c")
        .arg("exit 0")
        .output()
        .is_ok_and(|o| o.status.success())
    {
        return true;
    }
    assert!(
        !qsnap_testkit::under_ci(),
        "{shell} is missing under CI: tests/guest/install-deps.sh installs it"
    );
    eprintln!("\n*** SKIPPED the {shell} part of the completion test: no {shell} (apt install {shell}) ***\n");
    false
}

/// Runs `script` in `shell` with the store and PATH set.
fn in_shell(shell: &str, store: &Path, script: &str) -> Output {
    assert_cmd::Command::new(shell)
        .arg("-c")
        .arg(script)
        .env("QSNAP_STORE", store)
        .env("PATH", path_with_qsnap())
        .timeout(std::time::Duration::from_secs(60))
        .output()
        .unwrap()
}

fn words(out: &Output) -> Vec<String> {
    assert!(out.status.success(), "{out:?}");
    text(&out.stdout)
        .lines()
        .map(|l| l.split('\t').next().unwrap_or("").to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completions_load_in_bash_zsh_and_fish_and_name_the_stores_vms_and_snapshots() {
    require_qemu!();
    let dir = tempfile::tempdir().unwrap();
    let store: PathBuf = dir.path().join("store");
    let _kill = KillRecordedQemu::new(&store, "web1");
    let qsnap = |args: &[&str]| {
        let out = assert_cmd::Command::cargo_bin("qsnap")
            .unwrap()
            .env("QSNAP_STORE", &store)
            .args(args)
            .timeout(std::time::Duration::from_secs(60))
            .output()
            .unwrap();
        assert!(out.status.success(), "{args:?}: {out:?}");
        out
    };
    let argv = VmBuilder::idle_with_disk(
        &dir.path().join("d.qcow2"),
        "16M",
        &dir.path().join("serial.log"),
    )
    .await;
    let mut cmd = vec!["run", "web1", "--"];
    cmd.extend(argv.iter().map(String::as_str));
    // A name a clone must not share: `clone --replace` offers it.
    cmd.extend(["-name", "web1-guest"]);
    qsnap(&cmd);
    qsnap(&["create", "web1", "before-upgrade", "--disk-only"]);
    // A second VM's snapshot must not be offered for web1.
    std::fs::create_dir_all(store.join("vms/db/snapshots")).unwrap();
    std::fs::write(store.join("vms/db/vm.json"), b"{}").unwrap();
    std::fs::write(store.join("vms/db/snapshots/nightly.json"), b"{}").unwrap();
    for shell in ["bash", "zsh", "fish"] {
        let script = text(&qsnap(&["completions", shell]).stdout);
        std::fs::write(dir.path().join(format!("qsnap.{shell}")), script).unwrap();
    }
    let bad = assert_cmd::Command::cargo_bin("qsnap")
        .unwrap()
        .args(["completions", "tcsh"])
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(2), "{bad:?}");
    assert!(text(&bad.stderr).contains("bash"), "{bad:?}");

    let script = |shell: &str| {
        dir.path()
            .join(format!("qsnap.{shell}"))
            .display()
            .to_string()
    };

    // bash: the function the script registers, called as bash calls it on Tab.
    let bash = |line: &str| {
        let ws: Vec<&str> = line.split(' ').collect();
        let cur = ws.last().unwrap();
        let prev = ws[ws.len() - 2];
        let arr: Vec<String> = ws.iter().map(|w| format!("'{w}'")).collect();
        in_shell(
            "bash",
            &store,
            &format!(
                "source {}; fn=$(complete -p qsnap | sed -n 's/.*-F \\([^ ]*\\).*/\\1/p'); \
                 COMP_WORDS=({}); COMP_CWORD={}; COMP_LINE='{line}'; COMP_POINT=${{#COMP_LINE}}; \
                 $fn qsnap '{cur}' '{prev}'; printf '%s\\n' \"${{COMPREPLY[@]}}\"",
                script("bash"),
                arr.join(" "),
                ws.len() - 1
            ),
        )
    };
    let got = words(&bash("qsnap status w"));
    assert_eq!(got, ["web1"], "{got:?}");
    let got = words(&bash("qsnap revert web1 b"));
    assert_eq!(got, ["before-upgrade"], "{got:?}");
    // Only the named VM's snapshots (not db's nightly), also with options before it, and from
    // the store --store names.
    let got = words(&bash("qsnap --timeout 5 delete --json web1 "));
    assert!(got.contains(&"before-upgrade".to_owned()), "{got:?}");
    assert!(!got.contains(&"nightly".to_owned()), "{got:?}");
    let got = words(&bash(&format!(
        "qsnap --store {} status ",
        dir.path().join("none").display()
    )));
    assert!(!got.contains(&"web1".to_owned()), "{got:?}");
    let got = words(&bash("qsnap clone web1 before-upgrade web2 --replace "));
    assert_eq!(got, ["web1-guest="], "{got:?}");
    let got = words(&bash("qsnap sh"));
    assert!(
        got.contains(&"show".to_owned()) && got.contains(&"shutdown".to_owned()),
        "{got:?}"
    );

    // fish: its own completion query, through the loaded script.
    if shell_or_skip("fish") {
        let fish = |line: &str| {
            in_shell(
                "fish",
                &store,
                &format!("source {}; complete -C '{line}'", script("fish")),
            )
        };
        assert_eq!(words(&fish("qsnap status w")), ["web1"]);
        let got = words(&fish("qsnap delete web1 "));
        assert!(got.contains(&"before-upgrade".to_owned()), "{got:?}");
        assert!(!got.contains(&"nightly".to_owned()), "{got:?}");
    }

    // zsh: the script loads under compinit and registers its completer; the completer's call
    // back into qsnap (as the script makes it) answers with the VM's snapshots.
    if shell_or_skip("zsh") {
        let out = in_shell(
            "zsh",
            &store,
            &format!(
                "autoload -U compinit && compinit -u -D && source {} && whence -w _clap_dynamic_completer_qsnap",
                script("zsh")
            ),
        );
        assert!(out.status.success(), "{out:?}");
        assert!(text(&out.stdout).contains("function"), "{out:?}");
        let out = std::process::Command::new(assert_cmd::cargo::cargo_bin("qsnap"))
            .args(["--", "qsnap", "revert", "web1", ""])
            .env("QSNAP_STORE", &store)
            .env("QSNAP_COMPLETE", "zsh")
            .env("_CLAP_IFS", "\n")
            .env("_CLAP_COMPLETE_INDEX", "3")
            .output()
            .unwrap();
        let got = words(&out);
        assert!(
            got.iter().any(|w| w.starts_with("before-upgrade")),
            "{got:?}"
        );
        assert!(!got.iter().any(|w| w.starts_with("nightly")), "{got:?}");
    }
    qsnap(&["stop", "web1"]);
}
