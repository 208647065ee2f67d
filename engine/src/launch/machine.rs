//! Machine types: a snapshot's memory stream loads only into the exact machine type that
//! saved it (`pc-i440fx-10.0`), while command lines usually name an alias (`pc`) that a newer
//! QEMU resolves to a newer type. A revert therefore relaunches with the snapshot's versioned
//! type, and first checks that the QEMU binary still offers it.

use crate::error::Result;
use crate::tool;
use std::path::Path;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Refuses (with why) when the QEMU binary cannot run the machine type `machine`. The
/// binary's list is asked once per binary (path, size, mtime) and cached: starting QEMU just to
/// list its machines costs tens of milliseconds, on a revert's critical path.
pub async fn check(
    binary: &str,
    machine: &str,
    cancel: &CancellationToken,
) -> std::result::Result<(), String> {
    if types(binary, cancel).await?.iter().any(|t| t == machine) {
        Ok(())
    } else {
        Err(format!(
            "{binary} does not offer the machine type {machine} the snapshot was taken with"
        ))
    }
}

/// Refuses (with why) when the QEMU binary is older than `major.minor`, told by the newest
/// versioned machine type it offers (`pc-q35-10.0` → 10.0), from the same cached list.
pub async fn check_version(
    binary: &str,
    (major, minor): (u32, u32),
    what: &str,
    cancel: &CancellationToken,
) -> std::result::Result<(), String> {
    let newest = types(binary, cancel)
        .await?
        .iter()
        .filter_map(|t| {
            let (maj, min) = t.rsplit_once('-')?.1.split_once('.')?;
            Some((maj.parse::<u32>().ok()?, min.parse::<u32>().ok()?))
        })
        .max();
    match newest {
        Some(v) if v >= (major, minor) => Ok(()),
        Some((a, b)) => Err(format!(
            "{what} needs QEMU ≥ {major}.{minor}, and {binary} is {a}.{b}"
        )),
        None => Err(format!(
            "{what} needs QEMU ≥ {major}.{minor}, and {binary}'s version cannot be told from its machine types"
        )),
    }
}

/// The binary's machine types: asked once per binary (path, size, mtime) and cached.
async fn types(
    binary: &str,
    cancel: &CancellationToken,
) -> std::result::Result<Vec<String>, String> {
    let key = match crate::cache::resolve_binary(binary).await {
        Some(p) => crate::cache::file_key(&p, "machines").await,
        None => None,
    };
    match &key {
        Some(k) => match crate::cache::lookup(k).await {
            Some(t) => Ok(t),
            None => {
                let t = list(binary, cancel).await?;
                crate::cache::remember(k.clone(), &t).await;
                Ok(t)
            }
        },
        None => list(binary, cancel).await,
    }
}

/// The machine types `binary -machine help` lists.
async fn list(
    binary: &str,
    cancel: &CancellationToken,
) -> std::result::Result<Vec<String>, String> {
    let mut cmd = tokio::process::Command::new(binary);
    cmd.args(["-machine", "help"]);
    let out = tool::run(
        cmd,
        "qemu -machine help",
        Path::new(binary),
        Duration::from_secs(20),
        cancel,
    )
    .await
    .map_err(|e| format!("cannot ask {binary} for its machine types: {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    Ok(text
        .lines()
        .skip(1)
        .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
        .collect())
}

/// The command line with its machine type set to `machine` (in `-machine`/`-M`, keeping the
/// other machine options, or added when there is none).
pub fn pin(argv: &[String], machine: &str) -> Result<Vec<String>> {
    let mut out = argv.to_vec();
    let mut found = false;
    let mut i = 1;
    while i + 1 < out.len() {
        let flag = out[i].trim_start_matches('-');
        if out[i].starts_with('-') && (flag == "machine" || flag == "M") {
            out[i + 1] = with_type(&out[i + 1], machine);
            found = true;
        }
        i += 1;
    }
    if !found {
        out.extend(["-machine".into(), machine.into()]);
    }
    Ok(out)
}

/// `pc,accel=tcg` → `pc-i440fx-7.2,accel=tcg`; `accel=kvm,type=q35` → `accel=kvm,type=…`.
fn with_type(opts: &str, machine: &str) -> String {
    let mut parts: Vec<String> = opts.split(',').map(str::to_owned).collect();
    if let Some(p) = parts.iter_mut().find(|p| p.starts_with("type=")) {
        *p = format!("type={machine}");
    } else if parts.first().is_some_and(|p| !p.contains('=')) {
        parts[0] = machine.to_owned();
    } else {
        parts.insert(0, machine.to_owned());
    }
    parts.join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(s: &[&str]) -> Vec<String> {
        s.iter().map(|x| (*x).to_owned()).collect()
    }

    #[test]
    fn the_snapshot_machine_type_replaces_an_alias_or_is_added() {
        let m = "pc-i440fx-7.2";
        assert_eq!(
            pin(&v(&["qemu", "-machine", "pc,accel=tcg"]), m).unwrap(),
            v(&["qemu", "-machine", "pc-i440fx-7.2,accel=tcg"])
        );
        assert_eq!(
            pin(&v(&["qemu", "-M", "accel=kvm,type=pc"]), m).unwrap(),
            v(&["qemu", "-M", "accel=kvm,type=pc-i440fx-7.2"])
        );
        assert_eq!(
            pin(&v(&["qemu", "-machine", "accel=tcg"]), m).unwrap(),
            v(&["qemu", "-machine", "pc-i440fx-7.2,accel=tcg"])
        );
        assert_eq!(
            pin(&v(&["qemu", "-m", "64"]), m).unwrap(),
            v(&["qemu", "-m", "64", "-machine", "pc-i440fx-7.2"])
        );
    }
}
