//! A clone's command line: the source VM's, with every per-VM file and socket moved into the
//! clone's own directory, and a refusal for what must differ between running copies but that
//! qsnap cannot choose (a host port, a tap device, a display, the VM's name).
//!
//! An allow-list, like the lazy-RAM helper's (`ram.rs`): a clone runs next to its source, so an
//! option qsnap does not know could share a socket, a port or a file with it — that is refused
//! with the option named, never copied on a guess. The user may rewrite the recorded command
//! line first (`--replace OLD=NEW`); an option a replacement changed counts as given a value of
//! its own. Pure functions; nothing is started or created here.

use super::argv::{join_opts, split_opts};
use super::options::{flag, parsed, prop, DROP_BARE, KEEP_BARE, KEEP_OBJECTS, KEEP_VALUE};
use super::replace::example;
use crate::store::MovedPath;
use std::path::{Path, PathBuf};

/// The rewritten command line and where each per-VM path went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloneArgv {
    /// `argv[0]` first.
    pub argv: Vec<String>,
    /// Each path moved into the clone's directory.
    pub moved: Vec<MovedPath>,
    /// What the user must know about what they gave the clone (printed with its report).
    pub notes: Vec<String>,
}

/// Why a network the user gave a clone of its own still looks like its source's.
const SAME_MAC: &str = "the clone's network card keeps the snapshot's MAC address (QEMU restores it with the device state, whatever a mac= on the command line says, and the guest has it in memory): give the clone's network a segment of its own, or change the MAC inside the guest";

/// Network backends whose host side is one per VM (a tap, a bridge port, a socket address).
const NET_MUST_DIFFER: &[&str] = &[
    "tap",
    "bridge",
    "vhost-user",
    "vhost-vdpa",
    "socket",
    "stream",
    "dgram",
    "vde",
    "l2tpv3",
    "netmap",
    "af-xdp",
];

/// Chardev backends that are a file or socket of the VM's own (moved), or nothing outside
/// QEMU (kept). Anything else (a host tty, a parallel port, a UDP peer, SPICE) is refused.
const CHARDEV_KEEP: &[&str] = &[
    "null", "pty", "stdio", "vc", "ringbuf", "memory", "msmouse", "wctablet", "braille", "testdev",
];

/// What a command line is rewritten for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Purpose {
    /// A clone, running next to its source on this host: what must differ between the two
    /// (a port, a tap, the VM's name) is refused unless replaced.
    Clone,
    /// A bundle's portable command line: per-VM paths moved under a placeholder directory,
    /// nothing refused for differing (the importing host decides).
    Export,
    /// A VM imported from a bundle, on a host where its source does not run: what must differ
    /// between hosts (a port, a tap, a bridge) is refused unless replaced; its name need not.
    Import,
}

/// Rewrites `argv` (run from `cwd`) for a clone whose files go in `files`. The source's own
/// monitor socket `source_qmp`, if the command line names it, becomes `clone_qmp`.
/// `replace` (applied first, to every argument) lets the user give what must differ.
pub fn clone_argv(
    argv: &[String],
    cwd: &Path,
    files: &Path,
    source_qmp: Option<&Path>,
    clone_qmp: &Path,
    replace: &[(String, String)],
    purpose: Purpose,
) -> Result<CloneArgv, String> {
    let mut replaced = argv.to_vec();
    for (old, new) in replace {
        if old.is_empty() {
            return Err("--replace needs a non-empty text to replace".into());
        }
        if !replaced.iter().any(|a| a.contains(old.as_str())) {
            return Err(format!(
                "--replace {old}={new}: {old:?} appears nowhere in the recorded command line"
            ));
        }
        for a in &mut replaced {
            *a = a.replace(old.as_str(), new);
        }
    }
    let mut mover = Mover {
        purpose,
        cwd,
        files,
        source_qmp,
        clone_qmp,
        moved: Vec::new(),
    };
    let mut out = vec![replaced.first().cloned().unwrap_or_default()];
    let mut notes = Vec::new();
    let mut i = 1;
    while i < replaced.len() {
        let a = &replaced[i];
        let Some(f) = flag(a) else {
            return Err(format!("qsnap cannot read the command line at {a:?}"));
        };
        if f == "S" {
            i += 1; // the launch decides whether the clone starts paused
            continue;
        }
        if f == "s" {
            return Err(
                "-s: a gdb server on tcp::1234 must differ between a VM and its clones; write it as -gdb tcp::PORT and give the clone its own with --replace".into(),
            );
        }
        if f == "daemonize" || f == "preconfig" {
            return Err(format!(
                "-{f}: qsnap starts clones itself and cannot clone a VM started with it"
            ));
        }
        if KEEP_BARE.contains(&f) || DROP_BARE.contains(&f) || f == "nographic" {
            out.push(a.clone());
            i += 1;
            continue;
        }
        let Some(v) = replaced.get(i + 1) else {
            return Err(format!("-{f} lacks its value"));
        };
        // A value the user's --replace changed is theirs: it may differ per clone. Its
        // `id=` alone does not count (that names the option inside QEMU, not what it uses
        // on the host).
        let overridden = argv
            .get(i + 1)
            .is_some_and(|was| without_id(was) != without_id(v));
        let differ = |what: &str| -> Result<(), String> {
            if overridden || purpose == Purpose::Export {
                Ok(())
            } else {
                Err(format!(
                    "-{f} {v}: {what} must differ between a VM and its clones, and qsnap cannot choose it; give the clone its own with --replace OLD=NEW (e.g. --replace {})",
                    example(f, v)
                ))
            }
        };
        let (kind, props) = parsed(v);
        let value = match f {
            "name" => {
                if purpose == Purpose::Clone {
                    differ("the VM's name")?;
                }
                v.clone()
            }
            "incoming" | "loadvm" => {
                i += 2; // the clone loads the snapshot's memory itself
                continue;
            }
            _ if KEEP_VALUE.contains(&f) => v.clone(),
            "qmp" | "qmp-pretty" | "monitor" | "serial" | "parallel" | "debugcon" => {
                mover.legacy_chardev(f, v, &differ)?
            }
            "mon" | "runas" | "chroot" | "run-with" => v.clone(),
            "pidfile" | "D" => mover.path(&format!("-{f}"), v, false)?,
            "trace" => match prop(&props, "file") {
                Some(p) => {
                    let to = mover.path("-trace file", p, false)?;
                    set_prop(v, "file", &to)?
                }
                None => v.clone(),
            },
            "chardev" => mover.chardev(v, &kind, &props, &differ)?,
            "audiodev" => match prop(&props, "path") {
                Some(p) => {
                    let to = mover.path("-audiodev path", p, false)?;
                    set_prop(v, "path", &to)?
                }
                None => v.clone(),
            },
            "vnc" if v == "none" => v.clone(),
            "vnc" => {
                differ("a VNC display")?;
                v.clone()
            }
            "spice" => {
                differ("a SPICE port")?;
                v.clone()
            }
            "display" if v.starts_with("vnc") || v.starts_with("spice") => {
                differ("a remote display")?;
                v.clone()
            }
            "display" => v.clone(),
            "gdb" => {
                differ("a gdb server address")?;
                v.clone()
            }
            "netdev" | "nic" | "net" => {
                if NET_MUST_DIFFER.contains(&kind.as_str()) {
                    differ(&format!("a {kind} network backend"))?;
                    if purpose == Purpose::Export {
                        out.extend([a.clone(), v.clone()]);
                        i += 2;
                        continue;
                    }
                    let note = format!("-{f} {v}: {SAME_MAC}");
                    if !notes.contains(&note) {
                        notes.push(note);
                    }
                } else if props.iter().any(|(k, _)| k == "hostfwd") {
                    differ("a hostfwd host port")?;
                } else if props.iter().any(|(k, _)| k == "smb") {
                    differ("an smb share of a host directory (writable by both VMs)")?;
                } else if !matches!(kind.as_str(), "user" | "nic" | "none") {
                    return Err(format!(
                        "-{f} {v}: qsnap does not know whether a {kind:?} network may be shared with a clone"
                    ));
                }
                v.clone()
            }
            "device" => {
                let host = [
                    "vfio",
                    "usb-host",
                    "vhost-",
                    "tpm-",
                    "spapr-vio",
                    "usb-mtp",
                    "u2f-passthru",
                    "virtio-9p",
                    "virtiofs",
                ]
                .iter()
                .any(|p| kind.starts_with(p));
                if host || kind.is_empty() {
                    return Err(format!(
                        "-device {v}: a host device or directory cannot be given to a clone as well"
                    ));
                }
                v.clone()
            }
            // A RAM file two QEMUs map is one guest memory (share=on), or one file whose
            // holes either may punch (balloon, discard): only a read-only one is safe.
            "object" if kind == "memory-backend-file" => {
                let yes = |k: &str| {
                    prop(&props, k).is_some_and(|s| matches!(s, "on" | "true" | "yes" | "y"))
                };
                if !yes("readonly") {
                    return Err(format!(
                        "-object {v}: a clone would map the same guest RAM file as its source; qsnap clones only read-only RAM files"
                    ));
                }
                v.clone()
            }
            "fsdev" | "virtfs" => {
                return Err(format!(
                    "-{f} {v}: a host directory shared with the guest would be shared by the clone as well"
                ));
            }
            "object"
                if KEEP_OBJECTS.contains(&kind.as_str())
                    || kind.starts_with("tls-creds")
                    || kind == "memory-backend-ram"
                    || kind == "memory-backend-memfd" =>
            {
                v.clone()
            }
            "object" => {
                return Err(format!(
                    "-object {kind}: qsnap does not know whether it may be duplicated into a clone"
                ));
            }
            _ => {
                return Err(format!(
                    "-{f}: qsnap does not know whether it may be duplicated into a clone (--replace can rewrite it)"
                ));
            }
        };
        out.extend([a.clone(), value]);
        i += 2;
    }
    Ok(CloneArgv {
        argv: out,
        moved: mover.moved,
        notes,
    })
}

/// `v` without its `id=` property.
fn without_id(v: &str) -> Vec<String> {
    split_opts(v)
        .into_iter()
        .filter(|p| !p.starts_with("id="))
        .collect()
}

fn set_prop(v: &str, key: &str, value: &str) -> Result<String, String> {
    if v.trim_start().starts_with('{') {
        return Err(format!(
            "{v}: qsnap rewrites paths in key=value options only; write this option as key=value"
        ));
    }
    let parts: Vec<String> = split_opts(v)
        .into_iter()
        .map(|p| match p.split_once('=') {
            Some((k, _)) if k == key => format!("{key}={value}"),
            _ => p,
        })
        .collect();
    Ok(join_opts(&parts))
}

struct Mover<'a> {
    purpose: Purpose,
    cwd: &'a Path,
    files: &'a Path,
    source_qmp: Option<&'a Path>,
    clone_qmp: &'a Path,
    moved: Vec<MovedPath>,
}

impl Mover<'_> {
    /// The clone's own copy of `path` (named `option` in the report): its monitor socket if
    /// it is the source's, else `files/<name>` (a suffix when two paths share a name).
    fn path(&mut self, option: &str, path: &str, socket: bool) -> Result<String, String> {
        let from = if Path::new(path).is_absolute() {
            PathBuf::from(path)
        } else {
            self.cwd.join(path)
        };
        if let Some(m) = self.moved.iter().find(|m| m.from == from) {
            if self.purpose == Purpose::Import {
                // Two listeners on one path: the second takes the socket from the first (a
                // guest's serial port could stand where qsnap expects the monitor).
                return Err(format!(
                    "{option} and {} name the same file {}; give each its own",
                    m.option,
                    from.display()
                ));
            }
            return Ok(m.to.display().to_string());
        }
        let to = if self.source_qmp == Some(from.as_path()) {
            if self.purpose == Purpose::Import && option != "-qmp" {
                return Err(format!(
                    "{option} names the path of the VM's monitor socket, which only -qmp may"
                ));
            }
            self.clone_qmp.to_owned()
        } else {
            let name = from
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| "file".into());
            let mut to = self.files.join(&name);
            let mut k = 2;
            while self.moved.iter().any(|m| m.to == to) || to == self.clone_qmp {
                to = self.files.join(format!("{k}-{name}"));
                k += 1;
            }
            to
        };
        if socket && to.as_os_str().len() > 107 {
            return Err(format!(
                "{option}: the clone's socket {} is longer than a unix socket allows (107 bytes); use a shorter --store",
                to.display()
            ));
        }
        self.moved.push(MovedPath {
            option: option.to_owned(),
            from,
            to: to.clone(),
        });
        Ok(to.display().to_string())
    }

    /// `-chardev BACKEND,…`.
    fn chardev(
        &mut self,
        v: &str,
        kind: &str,
        props: &[(String, String)],
        differ: &dyn Fn(&str) -> Result<(), String>,
    ) -> Result<String, String> {
        let id = prop(props, "id").unwrap_or("?");
        let mut out = v.to_owned();
        if let Some(log) = prop(props, "logfile") {
            let to = self.path(&format!("-chardev {id} logfile"), log, false)?;
            out = set_prop(&out, "logfile", &to)?;
        }
        match kind {
            "socket" => match prop(props, "path") {
                Some(p) => {
                    let to = self.path(&format!("-chardev {id}"), p, true)?;
                    set_prop(&out, "path", &to)
                }
                None => {
                    differ("a TCP port")?;
                    Ok(out)
                }
            },
            "file" | "pipe" => match prop(props, "path") {
                Some(p) => {
                    let to = self.path(&format!("-chardev {id}"), p, false)?;
                    set_prop(&out, "path", &to)
                }
                None => Err(format!("-chardev {v}: a {kind} chardev without a path")),
            },
            k if CHARDEV_KEEP.contains(&k) => Ok(out),
            _ => Err(format!(
                "-chardev {v}: a {kind:?} chardev reaches the host and cannot be given to a clone as well"
            )),
        }
    }

    /// The short forms: `-serial file:P`, `-qmp unix:P,server=on`, `-monitor stdio`, …
    fn legacy_chardev(
        &mut self,
        f: &str,
        v: &str,
        differ: &dyn Fn(&str) -> Result<(), String>,
    ) -> Result<String, String> {
        if matches!(v, "stdio" | "null" | "none" | "vc" | "pty" | "mon:stdio")
            || v.starts_with("chardev:")
        {
            return Ok(v.to_owned());
        }
        for scheme in ["unix:", "file:", "pipe:"] {
            if let Some(rest) = v.strip_prefix(scheme) {
                let (path, opts) = match rest.split_once(',') {
                    Some((p, o)) => (p, Some(o)),
                    None => (rest, None),
                };
                let to = self.path(&format!("-{f}"), path, scheme == "unix:")?;
                return Ok(match opts {
                    Some(o) => format!("{scheme}{to},{o}"),
                    None => format!("{scheme}{to}"),
                });
            }
        }
        if ["tcp:", "telnet:", "udp:", "websocket:"]
            .iter()
            .any(|s| v.starts_with(s))
        {
            differ("a TCP/UDP port")?;
            return Ok(v.to_owned());
        }
        Err(format!(
            "-{f} {v}: qsnap does not know whether this may be given to a clone as well"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(s: &[&str]) -> Vec<String> {
        s.iter().map(|x| (*x).to_owned()).collect()
    }

    fn run(argv: &[&str], replace: &[(&str, &str)]) -> Result<CloneArgv, String> {
        let r: Vec<(String, String)> = replace
            .iter()
            .map(|(a, b)| ((*a).to_owned(), (*b).to_owned()))
            .collect();
        clone_argv(
            &v(argv),
            Path::new("/vm"),
            Path::new("/store/vms/c1/files"),
            Some(Path::new("/run/vm1/qsnap.sock")),
            Path::new("/store/vms/c1/qmp.sock"),
            &r,
            Purpose::Clone,
        )
    }

    #[test]
    fn per_vm_paths_move_into_the_clone() {
        let c = run(
            &[
                "qemu",
                "-m",
                "256",
                "-chardev",
                "file,id=ser,path=serial.log,append=on",
                "-serial",
                "chardev:ser",
                "-chardev",
                "socket,id=qga,path=/run/vm1/qga.sock,server=on,wait=off",
                "-qmp",
                "unix:/run/vm1/qsnap.sock,server=on,wait=off",
                "-monitor",
                "unix:/run/vm1/hmp.sock,server=on,wait=off",
                "-pidfile",
                "/run/vm1/qemu.pid",
                "-D",
                "/var/log/vm1.log",
                "-serial",
                "file:/var/log/serial.log",
                "-S",
                "-incoming",
                "defer",
                "-netdev",
                "user,id=n0",
                "-device",
                "virtio-net-pci,netdev=n0",
            ],
            &[],
        )
        .unwrap();
        let a = c.argv.join(" ");
        assert!(
            a.contains("file,id=ser,path=/store/vms/c1/files/serial.log,append=on"),
            "{a}"
        );
        assert!(a.contains("path=/store/vms/c1/files/qga.sock"), "{a}");
        assert!(
            a.contains("-qmp unix:/store/vms/c1/qmp.sock,server=on,wait=off"),
            "{a}"
        );
        assert!(
            a.contains("-monitor unix:/store/vms/c1/files/hmp.sock,server=on"),
            "{a}"
        );
        assert!(a.contains("-pidfile /store/vms/c1/files/qemu.pid"), "{a}");
        assert!(a.contains("-D /store/vms/c1/files/vm1.log"), "{a}");
        // Two files named serial.log: the second gets a prefix.
        assert!(
            a.contains("-serial file:/store/vms/c1/files/2-serial.log"),
            "{a}"
        );
        assert!(!a.contains("-S") && !a.contains("-incoming"), "{a}");
        assert!(!a.contains("/run/vm1") && !a.contains("/var/log"), "{a}");
        assert_eq!(c.moved[0].from, Path::new("/vm/serial.log"));
        assert_eq!(c.moved[0].option, "-chardev ser");
        assert_eq!(c.moved.len(), 7);
    }

    #[test]
    fn what_must_differ_is_refused_by_name_unless_replaced() {
        let argv = [
            "qemu",
            "-netdev",
            "user,id=n0,hostfwd=tcp::2222-:22",
            "-device",
            "e1000,netdev=n0",
        ];
        let err = run(&argv, &[]).unwrap_err();
        assert!(
            err.contains("hostfwd") && err.contains("--replace"),
            "{err}"
        );
        assert!(err.contains("tcp::2222-:22=tcp::2223-:22"), "{err}");
        let c = run(&argv, &[("tcp::2222-:22", "tcp::2223-:22")]).unwrap();
        assert_eq!(c.argv[2], "user,id=n0,hostfwd=tcp::2223-:22");
        for (flag, val, word) in [
            ("-netdev", "tap,id=t0,ifname=tap0", "tap"),
            ("-vnc", ":1", "VNC"),
            ("-spice", "port=5900", "SPICE"),
            ("-display", "vnc=:2", "display"),
            ("-name", "vm1", "name"),
            (
                "-chardev",
                "socket,id=s,host=0.0.0.0,port=4444,server=on",
                "TCP",
            ),
            ("-serial", "tcp::4444,server=on", "port"),
            ("-gdb", "tcp::1234", "gdb"),
        ] {
            let err = run(&["qemu", flag, val], &[]).unwrap_err();
            assert!(err.contains(word) && err.contains(flag), "{flag}: {err}");
        }
        assert!(run(&["qemu", "-name", "vm1"], &[("vm1", "vm1-c1")]).is_ok());
        // Renaming only the option's id gives it nothing of its own on the host.
        let tap = ["qemu", "-netdev", "tap,id=t0,ifname=tap0"];
        let err = run(&tap, &[("id=t0", "id=t1")]).unwrap_err();
        assert!(err.contains("tap"), "{err}");
        let c = run(&tap, &[("tap0", "tap1")]).unwrap();
        assert!(
            c.notes.len() == 1 && c.notes[0].contains("MAC") && c.notes[0].contains("tap1"),
            "{:?}",
            c.notes
        );
        assert!(run(&argv, &[("tcp::2222-:22", "tcp::2223-:22")])
            .unwrap()
            .notes
            .is_empty());
        let err = run(&["qemu", "-m", "1"], &[("nowhere", "x")]).unwrap_err();
        assert!(err.contains("appears nowhere"), "{err}");
    }

    #[test]
    fn an_imported_command_line_cannot_stand_a_second_listener_on_the_monitor() {
        let import = |argv: &[&str]| {
            clone_argv(
                &v(argv),
                Path::new("/store/vms/i1"),
                Path::new("/store/vms/i1/files"),
                Some(Path::new("/@qsnap-vm/qmp.sock")),
                Path::new("/store/vms/i1/qmp.sock"),
                &[],
                Purpose::Import,
            )
        };
        let qmp = ["-qmp", "unix:/@qsnap-vm/qmp.sock,server=on,wait=off"];
        let serial = [
            "-chardev",
            "socket,id=s,path=/@qsnap-vm/qmp.sock,server=on,wait=off",
        ];
        let twice = ["-chardev", "file,id=a,path=/@qsnap-vm/files/x.log"];
        let twice2 = ["-chardev", "file,id=b,path=/@qsnap-vm/files/x.log"];
        assert!(import(&["qemu", qmp[0], qmp[1]]).is_ok());
        let err = import(&["qemu", qmp[0], qmp[1], serial[0], serial[1]]).unwrap_err();
        assert!(err.contains("same file"), "{err}");
        let err = import(&["qemu", serial[0], serial[1]]).unwrap_err();
        assert!(err.contains("only -qmp"), "{err}");
        let err = import(&["qemu", twice[0], twice[1], twice2[0], twice2[1]]).unwrap_err();
        assert!(err.contains("same file"), "{err}");
        // A clone keeps sharing as before (one path named twice is one file of its own).
        assert!(run(&["qemu", twice[0], twice[1], twice2[0], twice2[1]], &[]).is_ok());
    }

    #[test]
    fn unknown_or_host_things_are_refused() {
        for (flag, val) in [
            ("-device", "vfio-pci,host=01:00.0"),
            ("-chardev", "tty,id=t,path=/dev/ttyS0"),
            (
                "-object",
                "memory-backend-file,id=m,mem-path=/dev/shm/x,share=on,size=1G",
            ),
            ("-object", "something-new,id=x"),
            (
                "-object",
                "memory-backend-file,id=m,mem-path=/dev/shm/x,share=yes,size=1G",
            ),
            (
                "-object",
                "memory-backend-file,id=m,mem-path=/dev/shm/x,size=1G",
            ),
            ("-device", "usb-mtp,rootdir=/srv,readonly=off"),
            ("-netdev", "user,id=n0,smb=/srv"),
            ("-virtfs", "local,path=/srv,mount_tag=h"),
            ("-s", "-m"),
            ("-frobnicate", "1"),
        ] {
            assert!(run(&["qemu", flag, val], &[]).is_err(), "{flag} {val}");
        }
        assert!(run(&["qemu", "-daemonize"], &[]).is_err());
        assert!(run(
            &["qemu", "-vnc", "none", "-display", "none", "-nographic"],
            &[]
        )
        .is_ok());
    }
}
