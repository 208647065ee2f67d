//! `--replace OLD=NEW`: what a clone's user rewrites in the recorded command line so that the
//! clone differs from its source where qsnap cannot choose (a host port, a tap device, the
//! VM's name) — splitting the argument against the command line, and the example a refusal
//! shows. Pure functions.

use super::argv::split_opts;

/// Splits a `--replace OLD=NEW` for the command line `argv`. OLD and NEW may hold `=`
/// themselves: the split taken is the one whose OLD appears in `argv`; when several do, the
/// middle `=` if OLD and NEW hold as many. Anything else is refused as ambiguous, never
/// guessed.
pub(crate) fn split_replacement(r: &str, argv: &[String]) -> Result<(String, String), String> {
    let splits: Vec<(&str, &str)> = r
        .match_indices('=')
        .map(|(i, _)| (&r[..i], &r[i + 1..]))
        .collect();
    if splits.is_empty() {
        return Err(format!("--replace {r}: expected OLD=NEW"));
    }
    let found: Vec<(&str, &str)> = splits
        .iter()
        .copied()
        .filter(|(old, _)| !old.is_empty() && argv.iter().any(|a| a.contains(old)))
        .collect();
    let middle = (splits.len() % 2 == 1).then(|| splits[splits.len() / 2]);
    let (old, new) = match found.as_slice() {
        [] if splits.len() == 1 => {
            return Err(format!(
                "--replace {r}: {:?} appears nowhere in the recorded command line",
                splits[0].0
            ))
        }
        [] => {
            return Err(format!(
                "--replace {r}: the text before each of its '=' appears nowhere in the recorded command line"
            ))
        }
        [one] => *one,
        several => match middle.filter(|m| several.contains(m)) {
            Some(m) => m,
            None => {
                return Err(format!(
                    "--replace {r}: ambiguous, {} could each be OLD; write OLD and NEW with as many '=' each",
                    several
                        .iter()
                        .map(|(o, _)| format!("{o:?}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                ))
            }
        },
    };
    Ok((old.to_owned(), new.to_owned()))
}

/// What a clone's `--replace` would rewrite in `argv` (`qsnap` first): the texts two VMs
/// cannot share that `clone` refuses until replaced — each hostfwd rule, a tap or bridge
/// `ifname=`, the VM's `-name`, a VNC display, a SPICE `port=`, a gdb address. For shell
/// completion (`OLD=` offered, the user types NEW), so it errs towards offering.
pub fn candidates(argv: &[String]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for pair in argv.windows(2) {
        let (Some(f), v) = (pair[0].strip_prefix('-'), &pair[1]) else {
            continue;
        };
        let f = f.trim_start_matches('-');
        let parts = split_opts(v);
        let found: Vec<String> = match f {
            "netdev" | "nic" | "net" => parts
                .iter()
                .filter(|p| p.starts_with("hostfwd=") || p.starts_with("ifname="))
                .map(|p| p.strip_prefix("hostfwd=").unwrap_or(p).to_owned())
                .collect(),
            "name" => parts
                .iter()
                .find_map(|p| match p.split_once('=') {
                    Some(("guest", n)) => Some(n.to_owned()),
                    None => Some(p.clone()),
                    _ => None,
                })
                .into_iter()
                .collect(),
            "vnc" if v != "none" => vec![v.clone()],
            "gdb" => vec![v.clone()],
            "spice" => parts
                .iter()
                .filter(|p| p.starts_with("port=") || p.starts_with("tls-port="))
                .cloned()
                .collect(),
            _ => Vec::new(),
        };
        for c in found {
            if !c.is_empty() && !out.contains(&c) {
                out.push(c);
            }
        }
    }
    out
}

/// How a user could override `-f v` (shown in the refusal).
pub(super) fn example(f: &str, v: &str) -> String {
    match f {
        "netdev" | "nic" | "net" if v.contains("hostfwd=") => {
            let fwd = v
                .split(',')
                .find_map(|p| p.strip_prefix("hostfwd="))
                .unwrap_or("tcp::2222-:22");
            format!("'{fwd}={}'", bump_port(fwd))
        }
        // `-name guest=vm1,…` or `-name vm1`: replace the name itself.
        "name" => {
            let name = split_opts(v)
                .into_iter()
                .find_map(|p| match p.split_once('=') {
                    Some(("guest", n)) => Some(n.to_owned()),
                    None => Some(p),
                    _ => None,
                })
                .unwrap_or_else(|| v.to_owned());
            format!("'{name}={name}-clone1'")
        }
        _ => format!("'{v}=…'"),
    }
}

/// `tcp::2222-:22` → `tcp::2223-:22` (the first port plus one), for an example.
fn bump_port(fwd: &str) -> String {
    let Some((host, guest)) = fwd.split_once('-') else {
        return fwd.to_owned();
    };
    match host.rsplit_once(':') {
        Some((pre, port)) => match port.parse::<u32>() {
            Ok(p) => format!("{pre}:{}-{guest}", p + 1),
            Err(_) => fwd.to_owned(),
        },
        None => fwd.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn candidates_are_what_a_clone_must_not_share() {
        let argv: Vec<String> = [
            "qemu",
            "-name",
            "guest=vm1,debug-threads=on",
            "-netdev",
            "user,id=n0,hostfwd=tcp::2222-:22,hostfwd=tcp::8080-:80",
            "-netdev",
            "tap,id=t0,ifname=tap0",
            "-vnc",
            ":1",
            "-spice",
            "port=5930,disable-ticketing=on",
            "-display",
            "none",
            "-m",
            "64",
        ]
        .map(String::from)
        .to_vec();
        assert_eq!(
            candidates(&argv),
            [
                "vm1",
                "tcp::2222-:22",
                "tcp::8080-:80",
                "ifname=tap0",
                ":1",
                "port=5930"
            ]
        );
        let plain: Vec<String> = ["qemu", "-name", "vm2", "-vnc", "none"]
            .map(String::from)
            .to_vec();
        assert_eq!(candidates(&plain), ["vm2"]);
    }

    #[test]
    fn a_replacement_splits_where_its_old_text_is_found() {
        let argv: Vec<String> = ["qemu", "-netdev", "tap,id=t0,ifname=tap0", "-name", "vm1"]
            .map(String::from)
            .to_vec();
        let split = |r: &str| split_replacement(r, &argv);
        let pair = |a: &str, b: &str| Ok((a.to_owned(), b.to_owned()));
        assert_eq!(split("vm1=vm2"), pair("vm1", "vm2"));
        assert_eq!(split("tap0=tap1,script=no"), pair("tap0", "tap1,script=no"));
        assert_eq!(
            split("ifname=tap0=ifname=tap1"),
            pair("ifname=tap0", "ifname=tap1")
        );
        assert_eq!(split("vm1="), pair("vm1", ""));
        assert!(split("vm1").unwrap_err().contains("expected OLD=NEW"));
        assert!(split("nowhere=x").unwrap_err().contains("appears nowhere"));
        assert!(split("zq=b=c").unwrap_err().contains("appears nowhere"));
        // `ifname` and `ifname=tap0` both appear: the middle '=' settles it when there is one.
        assert_eq!(split("ifname=tap0=x=y"), pair("ifname=tap0", "x=y"));
        let err = split("ifname=tap0=x").unwrap_err();
        assert!(err.contains("ambiguous"), "{err}");
    }
}
