//! The manual pages (issue 21, item 3): `qsnap man DIR` writes `qsnap(1)` and one page per
//! subcommand from the clap definitions, and each renders with `man -l` without a warning.

use assert_cmd::Command;
use std::path::Path;

/// Text without the overstrike man uses for bold and underline into a pipe (`N\x08N`).
fn plain(s: &str) -> String {
    let mut out: Vec<char> = Vec::new();
    for c in s.chars() {
        if c == '\u{8}' {
            out.pop();
        } else {
            out.push(c);
        }
    }
    // After a backspace the next char replaces the one popped: `N\x08N` → `N`.
    out.into_iter().collect()
}

fn man_available() -> bool {
    std::process::Command::new("man")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

#[test]
fn every_page_renders_and_says_the_exit_codes() {
    if !man_available() {
        assert!(
            !qsnap_testkit::under_ci(),
            "man (man-db) is missing under CI: tests/guest/install-deps.sh installs it"
        );
        eprintln!("\n*** SKIPPED every_page_renders_and_says_the_exit_codes: no `man` (apt install man-db) ***\n");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let out = Command::cargo_bin("qsnap")
        .unwrap()
        .arg("man")
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let listed = String::from_utf8_lossy(&out.stdout).into_owned();
    let pages: Vec<&str> = listed.lines().collect();
    // The root page and one per visible subcommand, nested ones included; not the hidden
    // `man` itself.
    for name in [
        "qsnap.1",
        "qsnap-create.1",
        "qsnap-forget.1",
        "qsnap-shutdown.1",
        "qsnap-remote.1",
        "qsnap-remote-gc.1",
    ] {
        assert!(
            pages.iter().any(|p| p.ends_with(&format!("/{name}"))),
            "no {name} in {listed}"
        );
    }
    assert!(
        !pages.iter().any(|p| p.ends_with("/qsnap-man.1")),
        "{listed}"
    );
    let render = |page: &Path| {
        let out = std::process::Command::new("man")
            .args(["-l", "--warnings", "-E", "UTF-8"])
            .arg(page)
            .env("MANWIDTH", "100")
            .env("LC_ALL", "C.UTF-8")
            .env("MAN_DISABLE_SECCOMP", "1")
            .output()
            .unwrap();
        assert!(out.status.success(), "{}: {out:?}", page.display());
        let warnings = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(warnings.trim().is_empty(), "{}: {warnings}", page.display());
        plain(&String::from_utf8_lossy(&out.stdout))
    };
    for p in &pages {
        let shown = render(Path::new(p));
        assert!(shown.contains("EXIT STATUS"), "{p}: {shown}");
    }
    let root = render(&dir.path().join("qsnap.1"));
    for must in [
        "QSNAP_STORE",
        "RUST_LOG",
        "AWS_ENDPOINT_URL",
        "journal.json",
        "forget",
    ] {
        assert!(root.contains(must), "qsnap(1) lacks {must}: {root}");
    }
    let create = render(&dir.path().join("qsnap-create.1"));
    assert!(create.contains("--description"), "{create}");
}
