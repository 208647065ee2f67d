//! Installing qsnap (issue 21, item 4): `scripts/install.sh PREFIX` puts the binary, the
//! manual pages and the bash/zsh/fish completions where those tools look, and
//! `scripts/deb.sh` makes a Debian package of the same files that installs into a throwaway
//! root (`dpkg --root`) and removes cleanly. The binary under test stands in for a release
//! build (`QSNAP_BIN`).

use std::path::{Path, PathBuf};
use std::process::Command;

fn repo() -> PathBuf {
    qsnap_testkit::repo_root()
}

fn qsnap_bin() -> PathBuf {
    assert_cmd::cargo::cargo_bin("qsnap")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "{cmd:?}: {out:?}");
    text(&out.stdout)
}

/// The pages `qsnap man` writes, by file name.
fn page_names() -> Vec<String> {
    let dir = tempfile::tempdir().unwrap();
    let listed = run(Command::new(qsnap_bin()).arg("man").arg(dir.path()));
    let mut names: Vec<String> = listed
        .lines()
        .map(|l| {
            Path::new(l)
                .file_name()
                .unwrap()
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    names.sort();
    names
}

#[test]
fn install_sh_puts_binary_pages_and_completions_under_prefix() {
    let dir = tempfile::tempdir().unwrap();
    let prefix = dir.path().join("usr-local");
    run(Command::new("bash")
        .arg(repo().join("scripts/install.sh"))
        .arg(&prefix)
        .env("QSNAP_BIN", qsnap_bin()));
    let version = run(Command::new(prefix.join("bin/qsnap")).arg("--version"));
    assert!(version.starts_with("qsnap "), "{version}");
    let mut pages: Vec<String> = std::fs::read_dir(prefix.join("share/man/man1"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    pages.sort();
    assert_eq!(pages, page_names());
    assert!(pages.contains(&"qsnap.1".to_owned()) && pages.contains(&"qsnap-create.1".to_owned()));
    for (f, must) in [
        ("share/bash-completion/completions/qsnap", "complete"),
        ("share/zsh/site-functions/_qsnap", "#compdef qsnap"),
        ("share/fish/vendor_completions.d/qsnap.fish", "complete"),
    ] {
        let script = std::fs::read_to_string(prefix.join(f)).unwrap();
        assert!(script.contains(must), "{f}: {script}");
    }
    // A relative PREFIX is refused, with nothing installed.
    let out = Command::new("bash")
        .arg(repo().join("scripts/install.sh"))
        .arg("relative/prefix")
        .env("QSNAP_BIN", qsnap_bin())
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(!dir.path().join("relative").exists());
}

#[test]
fn the_debian_package_installs_into_a_throwaway_root_and_removes_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let deb = run(Command::new("bash")
        .arg(repo().join("scripts/deb.sh"))
        .arg(dir.path().join("out"))
        .env("QSNAP_BIN", qsnap_bin())
        .env("QSNAP_DEB_COMPRESS", "none"));
    let deb = PathBuf::from(deb.trim());
    assert!(
        deb.file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with("qsnap_"),
        "{deb:?}"
    );
    let depends = run(Command::new("dpkg-deb").arg("-f").arg(&deb).arg("Depends"));
    assert!(
        depends.contains("qemu-system-x86 (>= 1:7.2)") && depends.contains("qemu-utils"),
        "{depends}"
    );
    let listing = run(Command::new("dpkg-deb").arg("-c").arg(&deb));
    let mut expected = vec![
        "./usr/bin/qsnap".to_owned(),
        "./usr/share/bash-completion/completions/qsnap".to_owned(),
        "./usr/share/zsh/vendor-completions/_qsnap".to_owned(),
        "./usr/share/fish/vendor_completions.d/qsnap.fish".to_owned(),
    ];
    expected.extend(
        page_names()
            .iter()
            .map(|p| format!("./usr/share/man/man1/{p}.gz")),
    );
    for f in &expected {
        assert!(
            listing.lines().any(|l| l.ends_with(f.as_str())),
            "no {f} in {listing}"
        );
    }

    if !nix::unistd::geteuid().is_root() {
        assert!(
            !qsnap_testkit::under_ci(),
            "CI runs as root: the throwaway-root install must run there"
        );
        eprintln!("\n*** SKIPPED the dpkg --root install of the .deb: needs root ***\n");
        return;
    }
    // A throwaway root with an empty dpkg database; the package's dependencies are the host
    // system's business, not this root's.
    let root = dir.path().join("root");
    for d in [
        "var/lib/dpkg/info",
        "var/lib/dpkg/updates",
        "var/lib/dpkg/triggers",
    ] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    std::fs::write(root.join("var/lib/dpkg/status"), b"").unwrap();
    std::fs::write(root.join("var/lib/dpkg/available"), b"").unwrap();
    let dpkg = |args: &[&str]| {
        let mut cmd = Command::new("dpkg");
        cmd.arg(format!("--root={}", root.display()))
            .arg("--force-script-chrootless")
            .args(args);
        cmd
    };
    run(dpkg(&["--force-depends", "-i"]).arg(&deb));
    for f in &expected {
        let p = root.join(f.trim_start_matches("./"));
        assert!(p.exists(), "not installed: {}", p.display());
    }
    let status = run(&mut dpkg(&["-s", "qsnap"]));
    assert!(status.contains("Status: install ok installed"), "{status}");
    run(&mut dpkg(&["-r", "qsnap"]));
    let left: Vec<PathBuf> = walk(&root)
        .into_iter()
        .filter(|p| !p.starts_with(root.join("var/lib/dpkg")))
        .collect();
    assert!(left.is_empty(), "left after removal: {left:?}");
}

/// Every file under `dir`.
fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            files.extend(walk(&p));
        } else {
            files.push(p);
        }
    }
    files
}
