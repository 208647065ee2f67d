//! QEMU's command line as data: find and rewrite disk image paths, pin the TSC frequency, add
//! the monitor qsnap uses, start paused and incoming. Pure functions over `Vec<String>`; no
//! process is started here.
//!
//! Disk rewrites cover the forms people write: `-drive file=…[,format=…]` and `-blockdev` in
//! both `key=value` and JSON syntax, with the image's format node switched to `qcow2` when the
//! new image is a qcow2 overlay over a raw base.

use crate::error::{Error, Result};
use serde_json::Value;
use std::path::{Path, PathBuf};

/// Replace one disk image with another (always a qcow2 overlay).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskSubstitution {
    /// The image path as the command line names it (resolved against the working directory).
    pub from: PathBuf,
    /// The qcow2 image to open instead.
    pub to: PathBuf,
}

/// `key=value,key=value` with QEMU's `,,` escape.
pub(crate) fn split_opts(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == ',' {
            if chars.peek() == Some(&',') {
                chars.next();
                cur.push(',');
            } else {
                out.push(std::mem::take(&mut cur));
            }
        } else {
            cur.push(c);
        }
    }
    out.push(cur);
    out
}

pub(crate) fn join_opts(parts: &[String]) -> String {
    parts
        .iter()
        .map(|p| p.replace(',', ",,"))
        .collect::<Vec<_>>()
        .join(",")
}

pub(crate) fn get<'a>(parts: &'a [String], key: &str) -> Option<&'a str> {
    parts
        .iter()
        .find_map(|p| p.strip_prefix(key).and_then(|r| r.strip_prefix('=')))
}

fn set(parts: &mut Vec<String>, key: &str, value: &str) {
    let kv = format!("{key}={value}");
    match parts
        .iter_mut()
        .find(|p| p.strip_prefix(key).is_some_and(|r| r.starts_with('=')))
    {
        Some(p) => *p = kv,
        None => parts.push(kv),
    }
}

/// `p` as an absolute, plain path (resolved against `cwd`; `..` taken lexically, as the
/// store records paths: `store::plain_path`).
fn resolve(cwd: &Path, p: &str) -> PathBuf {
    crate::store::plain_path(&cwd.join(p))
}

/// One `-blockdev`, in whichever syntax it was written.
enum Blockdev {
    Keys(Vec<String>),
    Json(Value),
}

impl Blockdev {
    fn parse(s: &str) -> Blockdev {
        match serde_json::from_str::<Value>(s) {
            Ok(v @ Value::Object(_)) => Blockdev::Json(v),
            _ => Blockdev::Keys(split_opts(s)),
        }
    }

    fn render(&self) -> String {
        match self {
            Blockdev::Keys(k) => join_opts(k),
            Blockdev::Json(v) => v.to_string(),
        }
    }

    fn field(&self, key: &str) -> Option<String> {
        match self {
            Blockdev::Keys(k) => get(k, key).map(str::to_owned),
            Blockdev::Json(v) => v.get(key).and_then(Value::as_str).map(str::to_owned),
        }
    }

    /// A boolean field: `key=on` (or yes/true/y) in key=value syntax, `true` or `"on"` in JSON.
    fn flag(&self, key: &str) -> bool {
        match self {
            Blockdev::Keys(k) => flag_on(k, key),
            Blockdev::Json(v) => match v.get(key) {
                Some(Value::Bool(b)) => *b,
                Some(Value::String(s)) => is_on(s),
                _ => false,
            },
        }
    }

    fn set_field(&mut self, key: &str, value: &str) {
        match self {
            Blockdev::Keys(k) => set(k, key, value),
            Blockdev::Json(v) => {
                v[key] = Value::String(value.to_owned());
            }
        }
    }
}

/// Rewrites disk paths; fails naming the disk that could not be found, so a relaunch never
/// silently opens the wrong image.
pub fn substitute_disks(
    argv: &[String],
    cwd: &Path,
    subs: &[DiskSubstitution],
) -> Result<Vec<String>> {
    let mut out = argv.to_vec();
    let mut done = vec![false; subs.len()];
    // File nodes whose image changed: their format node must read qcow2.
    let mut switched_nodes: Vec<String> = Vec::new();
    let find = |path: &str| subs.iter().position(|s| s.from == resolve(cwd, path));

    let mut i = 1;
    while i + 1 < out.len() {
        let flag = out[i].trim_start_matches('-').to_owned();
        match flag.as_str() {
            "drive" => {
                let mut parts = split_opts(&out[i + 1]);
                if let Some(k) = get(&parts, "file").and_then(find) {
                    set(&mut parts, "file", &subs[k].to.display().to_string());
                    set(&mut parts, "format", "qcow2");
                    out[i + 1] = join_opts(&parts);
                    done[k] = true;
                }
            }
            "blockdev" => {
                let mut bd = Blockdev::parse(&out[i + 1]);
                if bd.field("driver").as_deref() == Some("file") {
                    if let Some(k) = bd.field("filename").as_deref().and_then(find) {
                        bd.set_field("filename", &subs[k].to.display().to_string());
                        if let Some(n) = bd.field("node-name") {
                            switched_nodes.push(n);
                        }
                        done[k] = true;
                    }
                } else if let Blockdev::Json(v) = &mut bd {
                    // Inline protocol node: {"driver":"raw","file":{"driver":"file","filename":…}}
                    let inline = v["file"]["filename"].as_str().map(str::to_owned);
                    if let Some(k) = inline.as_deref().and_then(find) {
                        v["file"]["filename"] = Value::String(subs[k].to.display().to_string());
                        v["driver"] = Value::String("qcow2".into());
                        done[k] = true;
                    }
                }
                out[i + 1] = bd.render();
            }
            _ => {}
        }
        i += 1;
    }
    // Second pass: format nodes over a switched file node become qcow2.
    let mut i = 1;
    while i + 1 < out.len() {
        if out[i].trim_start_matches('-') == "blockdev" {
            let mut bd = Blockdev::parse(&out[i + 1]);
            let over_switched = bd
                .field("file")
                .is_some_and(|f| switched_nodes.contains(&f));
            if over_switched && bd.field("driver").as_deref() != Some("qcow2") {
                bd.set_field("driver", "qcow2");
                out[i + 1] = bd.render();
            }
        }
        i += 1;
    }
    if let Some(k) = done.iter().position(|d| !d) {
        return Err(Error::CommandLine {
            why: format!(
                "the disk image {} does not appear in QEMU's command line as -drive file=… or -blockdev …filename=…",
                subs[k].from.display()
            ),
        });
    }
    Ok(out)
}

/// Renames files the command line reads — disk images (`-drive file=`, `-blockdev` in both
/// syntaxes) and boot files (`-kernel`, `-initrd`, `-dtb`) — after `names` (each file as
/// resolved against `cwd`, and its new name). Formats are left as they are. Returns the
/// rewritten command line and the files of `names` it did not find.
pub(crate) fn rename_files(
    argv: &[String],
    cwd: &Path,
    names: &[(PathBuf, String)],
) -> (Vec<String>, Vec<PathBuf>) {
    let mut out = argv.to_vec();
    let mut found = vec![false; names.len()];
    let mut rename = |p: &str| -> Option<String> {
        let k = names
            .iter()
            .position(|(from, _)| *from == resolve(cwd, p))?;
        found[k] = true;
        Some(names[k].1.clone())
    };
    let mut i = 1;
    while i + 1 < out.len() {
        let flag = out[i].trim_start_matches('-').to_owned();
        let v = &out[i + 1];
        let new = match flag.as_str() {
            "kernel" | "initrd" | "dtb" => rename(v),
            "drive" | "blockdev" => match serde_json::from_str::<Value>(v) {
                Ok(mut j @ Value::Object(_)) => {
                    rename_json(&mut j, &mut rename).then(|| j.to_string())
                }
                _ => {
                    let mut parts = split_opts(v);
                    let mut changed = false;
                    for p in &mut parts {
                        if let Some((k, x)) = p.split_once('=') {
                            let key = k.rsplit('.').next().unwrap_or(k);
                            if matches!(key, "file" | "filename") {
                                if let Some(n) = rename(x) {
                                    *p = format!("{k}={n}");
                                    changed = true;
                                }
                            }
                        }
                    }
                    changed.then(|| join_opts(&parts))
                }
            },
            _ => None,
        };
        if let Some(n) = new {
            out[i + 1] = n;
            i += 2;
        } else {
            i += 1;
        }
    }
    let missing = names
        .iter()
        .zip(found)
        .filter(|(_, f)| !f)
        .map(|((p, _), _)| p.clone())
        .collect();
    (out, missing)
}

fn rename_json(v: &mut Value, rename: &mut dyn FnMut(&str) -> Option<String>) -> bool {
    let mut changed = false;
    if let Value::Object(m) = v {
        for (k, x) in m.iter_mut() {
            match x {
                Value::String(s) if k == "filename" => {
                    if let Some(n) = rename(s) {
                        *s = n;
                        changed = true;
                    }
                }
                Value::Object(_) => changed |= rename_json(x, rename),
                _ => {}
            }
        }
    }
    changed
}

/// QEMU's boolean option values (`on`, `yes`, `true`, `y`).
fn is_on(v: &str) -> bool {
    matches!(v, "on" | "yes" | "true" | "y")
}

/// A boolean key set: `key=on` (or yes/true/y), or the short form `key` alone.
fn flag_on(parts: &[String], key: &str) -> bool {
    parts.iter().any(|p| p == key) || get(parts, key).is_some_and(is_on)
}

/// Where the command line makes QEMU write a disk to a throwaway temporary file instead of its
/// image: every `-drive …,snapshot=on` (as written) and a global `-snapshot`. QEMU deletes
/// that file as soon as it has opened it, so the guest's writes never reach the image and a
/// snapshot of them could never be reverted or restarted.
pub(crate) fn throwaway_drives(argv: &[String]) -> Vec<String> {
    let mut out = Vec::new();
    for (i, a) in argv.iter().enumerate().skip(1) {
        if !a.starts_with('-') {
            continue;
        }
        match a.trim_start_matches('-') {
            "snapshot" => out.push("-snapshot".to_owned()),
            "drive" => {
                if let Some(v) = argv.get(i + 1) {
                    if flag_on(&split_opts(v), "snapshot") {
                        out.push(format!("-drive {v}"));
                    }
                }
            }
            _ => {}
        }
    }
    out
}

/// The images the command line has QEMU open for writing, resolved: each `-drive file=…`
/// that is not `readonly` or a CD-ROM, `-hda`…`-hdd`, and each `-blockdev` file (in either
/// syntax) unless it, or the format node over it, is `read-only` or another node's
/// `backing`. Names that are not plain paths (`json:`, network URLs) come back as they are:
/// only QEMU can say what they open.
pub(crate) fn written_images(argv: &[String], cwd: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut blockdevs = Vec::new();
    for w in argv.windows(2) {
        match w[0].trim_start_matches('-') {
            "drive" => {
                let parts = split_opts(&w[1]);
                let read_only =
                    flag_on(&parts, "readonly") || get(&parts, "media") == Some("cdrom");
                if let (false, Some(f)) = (read_only, get(&parts, "file")) {
                    out.push(resolve(cwd, f));
                }
            }
            "hda" | "hdb" | "hdc" | "hdd" => out.push(resolve(cwd, &w[1])),
            "blockdev" => blockdevs.push(Blockdev::parse(&w[1])),
            _ => {}
        }
    }
    let backing: Vec<String> = blockdevs
        .iter()
        .filter_map(|b| b.field("backing"))
        .collect();
    let not_written = |b: &Blockdev| {
        b.flag("read-only") || b.field("node-name").is_some_and(|n| backing.contains(&n))
    };
    for b in &blockdevs {
        if not_written(b) {
            continue;
        }
        if let Some(f) = b.field("filename") {
            let node = b.field("node-name");
            let over = blockdevs
                .iter()
                .find(|p| node.is_some() && p.field("file") == node);
            if !over.is_some_and(not_written) {
                out.push(resolve(cwd, &f));
            }
        } else if let Blockdev::Json(v) = b {
            if let Some(f) = v["file"]["filename"].as_str() {
                out.push(resolve(cwd, f));
            }
        }
    }
    out
}

/// The unix socket of the QEMU guest agent, if the command line has one: a `virtserialport`
/// named `org.qemu.guest_agent.0` on a `-chardev socket` with a path.
pub(crate) fn guest_agent_socket(argv: &[String], cwd: &Path) -> Option<PathBuf> {
    let chardev_id = argv.windows(2).find_map(|w| {
        if w[0].trim_start_matches('-') != "device" {
            return None;
        }
        let parts = split_opts(&w[1]);
        (parts.first().map(String::as_str) == Some("virtserialport")
            && get(&parts, "name") == Some("org.qemu.guest_agent.0"))
        .then(|| get(&parts, "chardev").map(str::to_owned))
        .flatten()
    })?;
    argv.windows(2).find_map(|w| {
        if w[0].trim_start_matches('-') != "chardev" {
            return None;
        }
        let parts = split_opts(&w[1]);
        (parts.first().map(String::as_str) == Some("socket")
            && get(&parts, "id") == Some(chardev_id.as_str()))
        .then(|| get(&parts, "path").map(|p| resolve(cwd, p)))
        .flatten()
    })
}

/// The file a command line's serial console writes: see [`serial_file`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SerialFile {
    /// The option that names the file, as a clone reports it among the paths it gave its own
    /// copy of ([`MovedPath::option`](crate::store::MovedPath::option)): `-serial` for
    /// `-serial file:P`, `-chardev ID` for a `-chardev file,id=ID,path=P`. With it a clone's
    /// console is found in [`CloneReport::moved`](crate::CloneReport::moved).
    pub option: String,
    /// The file, as the command line names it (not resolved against any directory).
    pub path: PathBuf,
}

/// Where the guest's first serial port writes, if the command line sends it to a file: the
/// first `-serial` is `file:P`, or `chardev:ID` with a `-chardev file,id=ID,path=P`
/// (`key=value` options with QEMU's `,,` escape). `None` for anything else (a socket, `stdio`,
/// no `-serial`).
pub fn serial_file(argv: &[String]) -> Option<SerialFile> {
    let i = argv.iter().position(|a| a == "-serial")?;
    let v = argv.get(i + 1)?;
    if let Some(p) = v.strip_prefix("file:") {
        return Some(SerialFile {
            option: "-serial".into(),
            path: PathBuf::from(p),
        });
    }
    let id = v.strip_prefix("chardev:")?;
    argv.windows(2).find_map(|w| {
        let parts = split_opts(&w[1]);
        let is_it = w[0] == "-chardev"
            && parts.first().map(String::as_str) == Some("file")
            && get(&parts, "id") == Some(id);
        is_it
            .then(|| get(&parts, "path").map(PathBuf::from))
            .flatten()
            .map(|path| SerialFile {
                option: format!("-chardev {id}"),
                path,
            })
    })
}

/// Removes `flag` and its value (e.g. an old `-incoming tcp:…`).
pub fn remove_flag(argv: &[String], flag: &str) -> Vec<String> {
    let mut out = Vec::with_capacity(argv.len());
    let mut skip = false;
    for a in argv {
        if skip {
            skip = false;
            continue;
        }
        if a.trim_start_matches('-') == flag && a.starts_with('-') {
            skip = true;
            continue;
        }
        out.push(a.clone());
    }
    out
}

/// Whether the command line already has a QMP monitor on `socket`.
pub(crate) fn has_qmp_socket(argv: &[String], socket: &Path) -> bool {
    let s = socket.display().to_string();
    argv.windows(2).any(|w| {
        let flag = w[0].trim_start_matches('-');
        (flag == "qmp" || flag == "qmp-pretty")
            && split_opts(&w[1])
                .first()
                .is_some_and(|p| p == &format!("unix:{s}") || p == &s)
    })
}

/// The `-cpu` model asks for an invariant TSC without pinning its frequency: QEMU will then
/// refuse to save the VM's memory.
pub(crate) fn needs_tsc_frequency(argv: &[String]) -> bool {
    argv.windows(2)
        .filter(|w| w[0].trim_start_matches('-') == "cpu")
        .any(|w| {
            let parts = split_opts(&w[1]);
            let invtsc = parts
                .iter()
                .any(|p| p == "+invtsc" || p == "invtsc=on" || p == "invtsc=true" || p == "invtsc");
            invtsc && get(&parts, "tsc-frequency").is_none()
        })
}

/// Appends `tsc-frequency=HZ` to every `-cpu` that asks for invtsc without it.
pub fn pin_tsc_frequency(argv: &[String], hz: u64) -> Vec<String> {
    let mut out = argv.to_vec();
    for i in 1..out.len() {
        if out[i - 1].trim_start_matches('-') == "cpu" && needs_tsc_frequency(&out[i - 1..=i]) {
            out[i] = format!("{},tsc-frequency={hz}", out[i]);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(s: &[&str]) -> Vec<String> {
        s.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn rewrites_drive_and_both_blockdev_syntaxes() {
        let argv = v(&[
            "qemu",
            "-drive",
            "file=a.img,format=raw,if=virtio,id=d0",
            "-blockdev",
            "driver=file,filename=/x/b.raw,node-name=f1",
            "-blockdev",
            "driver=raw,file=f1,node-name=d1",
            "-blockdev",
            r#"{"driver":"raw","node-name":"d2","file":{"driver":"file","filename":"/x/c.raw"}}"#,
            "-drive",
            "file=keep,,me.img,if=virtio",
        ]);
        let subs = [
            ("/cwd/a.img", "/o/a.s1.qcow2"),
            ("/x/b.raw", "/o/b.s1.qcow2"),
            ("/x/c.raw", "/o/c.s1.qcow2"),
        ]
        .map(|(f, t)| DiskSubstitution {
            from: f.into(),
            to: t.into(),
        });
        let out = substitute_disks(&argv, Path::new("/cwd"), &subs).unwrap();
        assert_eq!(out[2], "file=/o/a.s1.qcow2,format=qcow2,if=virtio,id=d0");
        assert_eq!(out[4], "driver=file,filename=/o/b.s1.qcow2,node-name=f1");
        assert_eq!(out[6], "driver=qcow2,file=f1,node-name=d1");
        let j: Value = serde_json::from_str(&out[8]).unwrap();
        assert_eq!(j["driver"], "qcow2");
        assert_eq!(j["file"]["filename"], "/o/c.s1.qcow2");
        assert_eq!(out[10], "file=keep,,me.img,if=virtio");

        let missing = [DiskSubstitution {
            from: "/nowhere.img".into(),
            to: "/o/n.qcow2".into(),
        }];
        assert!(substitute_disks(&argv, Path::new("/cwd"), &missing).is_err());
    }

    #[test]
    fn finds_throwaway_drives_and_written_images() {
        let argv = v(&[
            "qemu",
            "-drive",
            "file=a.img,if=virtio,snapshot=on",
            "-drive",
            "file=b.img,if=virtio,snapshot",
            "-drive",
            "file=c.img,snapshot=off",
            "-drive",
            "file=ro.img,readonly=on",
            "-drive",
            "file=cd.iso,media=cdrom",
            "-hda",
            "h.img",
            "-blockdev",
            "driver=file,filename=/x/base.qcow2,node-name=fb",
            "-blockdev",
            "driver=qcow2,file=fb,node-name=base",
            "-blockdev",
            "driver=file,filename=/x/top.qcow2,node-name=ft",
            "-blockdev",
            "driver=qcow2,file=ft,backing=base,node-name=top",
            "-blockdev",
            "driver=file,filename=/x/ro.raw,node-name=fr,read-only=on",
            "-blockdev",
            r#"{"driver":"raw","node-name":"j","file":{"driver":"file","filename":"/x/j.raw"}}"#,
            "-blockdev",
            r#"{"driver":"raw","read-only":true,"file":{"driver":"file","filename":"/x/jr.raw"}}"#,
        ]);
        assert_eq!(
            throwaway_drives(&argv),
            [
                "-drive file=a.img,if=virtio,snapshot=on",
                "-drive file=b.img,if=virtio,snapshot"
            ]
        );
        assert_eq!(
            throwaway_drives(&v(&["qemu", "-m", "64", "-snapshot"])),
            ["-snapshot"]
        );
        assert!(throwaway_drives(&v(&["qemu", "-append", "snapshot=on"])).is_empty());
        assert_eq!(
            written_images(&argv, Path::new("/cwd")),
            [
                "/cwd/a.img",
                "/cwd/b.img",
                "/cwd/c.img",
                "/cwd/h.img",
                "/x/top.qcow2",
                "/x/j.raw"
            ]
            .map(PathBuf::from)
        );
    }

    #[test]
    fn pins_tsc_only_where_invtsc_lacks_a_frequency() {
        let argv = v(&["qemu", "-cpu", "host,+invtsc", "-m", "64"]);
        assert!(needs_tsc_frequency(&argv));
        let out = pin_tsc_frequency(&argv, 2_000_000_000);
        assert_eq!(out[2], "host,+invtsc,tsc-frequency=2000000000");
        assert!(!needs_tsc_frequency(&out));
        assert!(!needs_tsc_frequency(&v(&["qemu", "-cpu", "host"])));
        assert!(!needs_tsc_frequency(&v(&["qemu", "-m", "64"])));
    }

    #[test]
    fn finds_the_guest_agent_socket() {
        let argv = v(&[
            "qemu",
            "-chardev",
            "socket,id=other,path=/x/o.sock,server=on",
            "-chardev",
            "socket,id=qga0,path=qga.sock,server=on,wait=off",
            "-device",
            "virtio-serial-pci",
            "-device",
            "virtserialport,chardev=qga0,name=org.qemu.guest_agent.0",
        ]);
        assert_eq!(
            guest_agent_socket(&argv, Path::new("/vm")),
            Some(PathBuf::from("/vm/qga.sock"))
        );
        assert_eq!(guest_agent_socket(&argv[..5], Path::new("/vm")), None);
    }

    #[test]
    fn finds_the_serial_console_file() {
        let chardev = v(&[
            "qemu",
            "-chardev",
            "file,id=other,path=/x/other.log",
            "-chardev",
            "file,id=con,path=/x/a,,b.log,append=on",
            "-serial",
            "chardev:con",
        ]);
        assert_eq!(
            serial_file(&chardev),
            Some(SerialFile {
                option: "-chardev con".into(),
                path: PathBuf::from("/x/a,b.log"),
            })
        );
        assert_eq!(
            serial_file(&v(&["qemu", "-serial", "file:con.log"])),
            Some(SerialFile {
                option: "-serial".into(),
                path: PathBuf::from("con.log"),
            })
        );
        // A socket, stdio, a chardev that is not a file, or no -serial at all: no file.
        for argv in [
            v(&["qemu", "-serial", "stdio"]),
            v(&["qemu", "-serial", "unix:/x/s.sock,server=on"]),
            v(&[
                "qemu",
                "-chardev",
                "socket,id=con,path=/x/s",
                "-serial",
                "chardev:con",
            ]),
            v(&["qemu", "-chardev", "file,id=con,path=/x/a.log"]),
        ] {
            assert_eq!(serial_file(&argv), None, "{argv:?}");
        }
    }

    #[test]
    fn flags_and_monitors() {
        let argv = v(&[
            "qemu",
            "-incoming",
            "tcp:0:4444",
            "-qmp",
            "unix:/s/q.sock,server=on,wait=off",
        ]);
        assert_eq!(
            remove_flag(&argv, "incoming"),
            v(&["qemu", "-qmp", "unix:/s/q.sock,server=on,wait=off"])
        );
        assert!(has_qmp_socket(&argv, Path::new("/s/q.sock")));
        assert!(!has_qmp_socket(&argv, Path::new("/s/other.sock")));
    }
}
