//! Reading a command line that came from someone else — an imported bundle's — before QEMU is
//! ever started with it: an allow-list of options and properties that keep the VM inside its
//! own files. Whatever reaches the host (a host path, a device, a host network side, a TCP
//! port, a daemon, a plugin, a directory shared with the guest) is named, one refusal each.
//!
//! In a bundle's command line the VM's own files are written under [`VM_TOKEN`] (its sockets,
//! logs, console) and the bundle's files under [`BUNDLE_TOKEN`] (disks, kernel, initrd);
//! every other path is the exporting host's and refused. Pure: reads strings, nothing else.
//! Never decides whether the user trusts the author (the caller does).

use super::argv::split_opts;
use super::options::{flag, parsed, prop};

/// Where a path of the VM's own directory stands in a bundle's command line.
pub(crate) const VM_TOKEN: &str = "/@qsnap-vm";
/// Where a file of the bundle stands in a bundle's command line (`/@qsnap-bundle/<name>`).
pub(crate) const BUNDLE_TOKEN: &str = "/@qsnap-bundle";

/// Flags without a value that reach nothing outside QEMU.
const BARE_OK: &[&str] = &[
    "enable-kvm",
    "no-reboot",
    "no-shutdown",
    "nodefaults",
    "no-user-config",
    "nographic",
    "usb",
    "no-hpet",
    "no-acpi",
    "no-fd-bootchk",
    "only-migratable",
    "S",
    "snapshot",
    "mem-prealloc",
    "win2k-hack",
    "rtc-td-hack",
    "no-kvm-pit-reinjection",
];

/// Flags without a value that reach the host (named in the refusal).
const BARE_HOST: &[(&str, &str)] = &[
    ("daemonize", "detaches QEMU from qsnap"),
    ("s", "opens a gdb server on a host TCP port"),
    ("semihosting", "lets the guest open host files"),
    ("sdl", "opens a window on the host"),
    ("curses", "takes over the terminal"),
    ("full-screen", "opens a window on the host"),
    ("preconfig", "waits for a monitor client"),
];

/// Options whose value shapes the machine and names nothing on the host (a path-looking
/// property in them is still checked).
const VALUE_OK: &[&str] = &[
    "machine",
    "M",
    "cpu",
    "smp",
    "m",
    "accel",
    "boot",
    "global",
    "rtc",
    "name",
    "uuid",
    "smbios",
    "fw_cfg",
    "vga",
    "k",
    "sandbox",
    "msg",
    "overcommit",
    "icount",
    "action",
    "watchdog-action",
    "d",
    "prom-env",
    "bios",
    "L",
    "option-rom",
    "mon",
];

/// Options refused whatever their value, and why.
const VALUE_HOST: &[(&str, &str)] = &[
    ("fsdev", "shares a host directory with the guest"),
    ("virtfs", "shares a host directory with the guest"),
    ("plugin", "loads a host library into QEMU"),
    ("run-with", "changes QEMU's user or root directory"),
    ("runas", "changes QEMU's user"),
    ("chroot", "changes QEMU's root directory"),
    ("pidfile", "writes a host file"),
    ("add-fd", "hands QEMU a host file descriptor"),
    ("loadvm", "loads state from a disk image"),
    ("incoming", "loads state from a host source"),
    ("D", "writes a host log file"),
    ("readconfig", "reads a host configuration file"),
    ("writeconfig", "writes a host file"),
    ("mem-path", "maps guest RAM from a host path"),
    ("gdb", "opens a gdb server"),
    ("vnc", "opens a VNC server on a host port"),
    ("spice", "opens a SPICE server on a host port"),
    ("iscsi", "reaches an iSCSI target"),
    ("semihosting-config", "lets the guest open host files"),
    ("usbdevice", "may pass a host USB device through"),
];

/// Devices that hand the guest something of the host's.
const HOST_DEVICES: &[&str] = &[
    "vfio",
    "usb-host",
    "vhost-",
    "tpm-",
    "virtio-9p",
    "virtiofs",
    "usb-mtp",
    "u2f-passthru",
    "loader",
    "scsi-generic",
    "scsi-block",
    "pci-assign",
    "ccid-card-passthru",
    "ivshmem",
    "nvdimm",
    "spapr-vio",
];

/// `-object` types that reach nothing outside QEMU (or only the VM's own chardevs).
const OBJECTS_OK: &[&str] = &[
    "memory-backend-ram",
    "memory-backend-memfd",
    "iothread",
    "main-loop",
    "thread-context",
    "throttle-group",
    "rng-builtin",
    "rng-egd",
    "rng-random",
    "secret",
    "filter-buffer",
    "filter-rewriter",
    "filter-mirror",
    "filter-redirector",
    "cryptodev-backend-builtin",
    "can-bus",
    "tls-cipher-suites",
];

/// Chardev backends that are the VM's own (a file or unix socket in its directory) or
/// nothing outside QEMU.
const CHARDEVS_OK: &[&str] = &[
    "null", "stdio", "vc", "ringbuf", "memory", "msmouse", "wctablet", "braille", "testdev",
    "file", "socket",
];

/// `-netdev user` properties that reach the host.
const USER_NET_HOST: &[(&str, &str)] = &[
    ("smb", "shares a host directory over SMB"),
    ("tftp", "serves a host directory over TFTP"),
    ("bootfile", "serves a host file over TFTP"),
    (
        "guestfwd",
        "forwards guest connections to a host address or command",
    ),
];

/// Properties whose value holds `/` without being a path.
const NOT_PATHS: &[&str] = &[
    "net",
    "ipv6-net",
    "ipv6-prefix",
    "dnssearch",
    "domainname",
    "name",
];

/// Whether `p` is one of the VM's own files or one of the bundle's (and nothing more).
pub(crate) fn own(p: &str) -> bool {
    [VM_TOKEN, BUNDLE_TOKEN].iter().any(|t| {
        p.strip_prefix(t)
            .and_then(|r| r.strip_prefix('/'))
            .is_some_and(|r| {
                !r.is_empty() && r.split('/').all(|c| !c.is_empty() && c != "." && c != "..")
            })
    })
}

/// Every option of `argv` (`argv[0]` is not looked at) that reaches outside the VM's own
/// files, one refusal each naming the option and why. Empty: nothing does.
pub(crate) fn host_reaching(argv: &[String]) -> Vec<String> {
    let mut out = Vec::new();
    let mut i = 1;
    while i < argv.len() {
        let a = &argv[i];
        let Some(f) = flag(a) else {
            out.push(format!("{a:?}: not an option qsnap can read"));
            break;
        };
        if BARE_OK.contains(&f) {
            i += 1;
            continue;
        }
        if let Some((_, why)) = BARE_HOST.iter().find(|(n, _)| *n == f) {
            out.push(format!("-{f} {why}"));
            i += 1;
            continue;
        }
        let Some(v) = argv.get(i + 1) else {
            out.push(format!("-{f} lacks its value"));
            break;
        };
        i += 2;
        if let Some((_, why)) = VALUE_HOST.iter().find(|(n, _)| *n == f) {
            out.push(format!("-{f} {v} {why}"));
            continue;
        }
        // The guest kernel's command line holds words for the guest, not host paths; the
        // short chardev forms are read whole by `legacy_chardev`.
        let no_paths = matches!(
            f,
            "append" | "serial" | "parallel" | "debugcon" | "monitor" | "qmp" | "qmp-pretty"
        );
        if f == "append" {
            continue;
        }
        if v.contains("json:") {
            out.push(format!(
                "-{f} {v}: a json: filename opens what it describes"
            ));
            continue;
        }
        if let Some(why) = option_refusal(f, v) {
            out.push(why);
            continue;
        }
        // rng-random's device is the one host file an untrusted VM may read (entropy).
        let (kind, _) = parsed(v);
        let allowed: &[&str] = if f == "object" && kind == "rng-random" {
            &["/dev/urandom", "/dev/random"]
        } else {
            &[]
        };
        if no_paths {
            continue;
        }
        if let Some(p) = host_path(v, allowed) {
            out.push(format!("-{f} {v} names the host path {p}"));
        }
    }
    out
}

/// Why option `-f v` reaches the host, apart from the paths it names (checked after).
fn option_refusal(f: &str, v: &str) -> Option<String> {
    let (kind, props) = parsed(v);
    let whole_path = |what: &str| {
        (!v.starts_with("/@qsnap-bundle/boot/") || !own(v))
            .then(|| format!("-{f} {v}: {what} must be one the bundle carries"))
    };
    match f {
        "kernel" | "initrd" | "dtb" => whole_path("the file"),
        "bios" | "L" | "option-rom" if v.contains('/') => whole_path("a firmware file"),
        _ if VALUE_OK.contains(&f) => None,
        "drive" => drive_refusal(v),
        "blockdev" => blockdev_refusal(v),
        "chardev" if !CHARDEVS_OK.contains(&kind.as_str()) => Some(format!(
            "-chardev {v}: a {kind} chardev reaches the host"
        )),
        "chardev" if kind == "socket" && prop(&props, "path").is_none() => Some(format!(
            "-chardev {v}: a TCP socket listens on or connects to a host port"
        )),
        "chardev" => None,
        "serial" | "parallel" | "debugcon" | "monitor" | "qmp" | "qmp-pretty" => {
            legacy_chardev(f, v)
        }
        "netdev" | "nic" | "net" => match kind.as_str() {
            "user" => USER_NET_HOST
                .iter()
                .find(|(k, _)| prop(&props, k).is_some())
                .map(|(k, why)| format!("-{f} {v}: {k}= {why}")),
            "none" | "nic" => None,
            _ => Some(format!(
                "-{f} {v}: a {kind} network backend has a host side (a tap, bridge or socket)"
            )),
        },
        "device" => HOST_DEVICES
            .iter()
            .any(|p| kind.starts_with(p))
            .then(|| format!("-device {v}: hands the guest a host device, file or directory"))
            .or_else(|| {
                kind.is_empty()
                    .then(|| format!("-device {v}: qsnap cannot tell its type"))
            }),
        "object" if kind == "rng-random" => prop(&props, "filename")
            .filter(|p| !matches!(*p, "/dev/urandom" | "/dev/random"))
            .map(|p| format!("-object {v}: reads the host file {p}")),
        "object" if OBJECTS_OK.contains(&kind.as_str()) => None,
        "object" => Some(format!(
            "-object {v}: a {kind} object may reach the host (a memory backend with a host mem-path, TLS credentials, a keyring…)"
        )),
        "display" if v == "none" => None,
        "display" => Some(format!("-display {v}: opens a display on the host")),
        "audiodev" if kind == "none" => None,
        "audiodev" => Some(format!("-audiodev {v}: reaches host audio")),
        "trace" if prop(&props, "file").is_some() => {
            Some(format!("-trace {v}: writes a host trace file"))
        }
        "trace" => None,
        _ => Some(format!(
            "-{f} {v}: not an option qsnap lets an untrusted command line use"
        )),
    }
}

/// Where the bundle's disks stand in its command line.
const DISKS: &str = "/@qsnap-bundle/disks/";

fn bundle_disk(p: &str) -> bool {
    p.starts_with(DISKS) && own(p)
}

/// The keys a `-drive` may have (anything else — `driver=`, `file.*`, another protocol — is
/// refused: QEMU would open what it names).
const DRIVE_KEYS: &[&str] = &[
    "file",
    "if",
    "format",
    "id",
    "index",
    "media",
    "cache",
    "aio",
    "discard",
    "detect-zeroes",
    "readonly",
    "werror",
    "rerror",
    "bus",
    "unit",
    "serial",
    "snapshot",
    "copy-on-read",
];

/// The keys a `-blockdev` node may have, whatever its syntax.
const NODE_KEYS: &[&str] = &[
    "driver",
    "node-name",
    "file",
    "filename",
    "discard",
    "cache.direct",
    "cache.no-flush",
    "read-only",
    "auto-read-only",
    "detect-zeroes",
    "force-share",
    "locking",
    "aio",
    "lazy-refcounts",
    "backing",
    "discard-no-unref",
    "pass-discard-request",
    "pass-discard-snapshot",
    "pass-discard-other",
];

/// `key=value` parts, refusing a repeated key (QEMU takes the last one, a reader the first:
/// the two would disagree on what is opened) and a bare word.
fn pairs(f: &str, v: &str) -> Result<Vec<(String, String)>, String> {
    let mut out: Vec<(String, String)> = Vec::new();
    for p in split_opts(v) {
        let Some((k, x)) = p.split_once('=') else {
            return Err(format!(
                "-{f} {v}: qsnap reads only key=value parts here, not {p:?}"
            ));
        };
        if out.iter().any(|(seen, _)| seen == k) {
            return Err(format!("-{f} {v}: repeats the key {k}"));
        }
        out.push((k.to_owned(), x.to_owned()));
    }
    Ok(out)
}

/// `-drive`: one of the bundle's disks, with plain keys only.
fn drive_refusal(v: &str) -> Option<String> {
    let parts = match pairs("drive", v) {
        Ok(p) => p,
        Err(e) => return Some(e),
    };
    if let Some((k, _)) = parts
        .iter()
        .find(|(k, _)| !DRIVE_KEYS.contains(&k.as_str()))
    {
        return Some(format!(
            "-drive {v}: the key {k} is not one qsnap lets an untrusted command line use"
        ));
    }
    let get = |k: &str| parts.iter().find(|(x, _)| x == k).map(|(_, x)| x.as_str());
    if get("format").is_some_and(|f| !matches!(f, "qcow2" | "raw")) {
        return Some(format!("-drive {v}: only qcow2 and raw images"));
    }
    match get("file") {
        Some(file) if bundle_disk(file) => None,
        Some(file) => Some(format!(
            "-drive {v}: the image {file} is not one of the bundle's disks"
        )),
        None => Some(format!(
            "-drive {v}: a drive that is not one of the bundle's disks"
        )),
    }
}

/// `-blockdev`: file, qcow2 and raw nodes only, over the bundle's disks, in either syntax.
fn blockdev_refusal(v: &str) -> Option<String> {
    match serde_json::from_str::<serde_json::Value>(v) {
        Ok(j @ serde_json::Value::Object(_)) => json_node(v, &j),
        _ => {
            let parts = match pairs("blockdev", v) {
                Ok(p) => p,
                Err(e) => return Some(e),
            };
            if let Some((k, _)) = parts.iter().find(|(k, _)| !NODE_KEYS.contains(&k.as_str())) {
                return Some(format!(
                    "-blockdev {v}: the key {k} is not one qsnap lets an untrusted command line use (write each node as its own -blockdev)"
                ));
            }
            let get = |k: &str| parts.iter().find(|(x, _)| x == k).map(|(_, x)| x.as_str());
            node(
                v,
                get("driver"),
                get("filename"),
                get("file"),
                get("backing"),
            )
        }
    }
}

/// One node in JSON syntax (and its inline `file`, recursively).
fn json_node(v: &str, j: &serde_json::Value) -> Option<String> {
    let serde_json::Value::Object(m) = j else {
        return Some(format!("-blockdev {v}: a node that is not an object"));
    };
    for (k, x) in m {
        let ok = match k.as_str() {
            "cache" => x.as_object().is_some_and(|c| {
                c.keys()
                    .all(|k| matches!(k.as_str(), "direct" | "no-flush"))
            }),
            "file" => x.is_string() || x.is_object(),
            "backing" => x.is_string() || x.is_null(),
            k => NODE_KEYS.contains(&k) && !x.is_object() && !x.is_array(),
        };
        if !ok {
            return Some(format!(
                "-blockdev {v}: the key {k} is not one qsnap lets an untrusted command line use"
            ));
        }
    }
    let s = |k: &str| m.get(k).and_then(|x| x.as_str());
    if let Some(inner @ serde_json::Value::Object(_)) = m.get("file") {
        if let Some(r) = json_node(v, inner) {
            return Some(r);
        }
    }
    node(v, s("driver"), s("filename"), s("file"), s("backing"))
}

/// The rules every node follows: its driver, its file, its references.
fn node(
    v: &str,
    driver: Option<&str>,
    filename: Option<&str>,
    file: Option<&str>,
    backing: Option<&str>,
) -> Option<String> {
    let reference =
        |r: Option<&str>| r.is_some_and(|r| r.contains(['/', ':', '.', '{']) || r.is_empty());
    if reference(file) || backing.is_some_and(|b| b != "null" && reference(Some(b))) {
        return Some(format!(
            "-blockdev {v}: a node reference that is not a node name"
        ));
    }
    match driver.unwrap_or_default() {
        "file" => match filename {
            Some(p) if bundle_disk(p) => None,
            other => Some(format!(
                "-blockdev {v}: the file {} is not one of the bundle's disks",
                other.unwrap_or("(none)")
            )),
        },
        "qcow2" | "raw" if filename.is_none() => None,
        "qcow2" | "raw" => Some(format!("-blockdev {v}: a format node with a filename")),
        other => Some(format!(
            "-blockdev {v}: a {other:?} node reaches storage outside the bundle"
        )),
    }
}

/// The short forms: `stdio`, `chardev:ID`, `unix:OWN,…`, `file:OWN`.
fn legacy_chardev(f: &str, v: &str) -> Option<String> {
    if matches!(v, "stdio" | "null" | "none" | "vc" | "mon:stdio") || v.starts_with("chardev:") {
        return None;
    }
    for scheme in ["unix:", "file:"] {
        if let Some(rest) = v.strip_prefix(scheme) {
            let path = rest.split(',').next().unwrap_or_default();
            return (!own(path)).then(|| format!("-{f} {v}: the host path {path}"));
        }
    }
    Some(format!(
        "-{f} {v}: reaches the host (a port, pipe or device)"
    ))
}

/// The first property value of `v` that is a path outside the VM's own files.
fn host_path(v: &str, allowed: &[&str]) -> Option<String> {
    let mut values: Vec<(String, String)> = Vec::new();
    match serde_json::from_str::<serde_json::Value>(v) {
        Ok(j @ serde_json::Value::Object(_)) => flatten("", &j, &mut values),
        _ => {
            for p in split_opts(v) {
                match p.split_once('=') {
                    Some((k, x)) => values.push((k.to_owned(), x.to_owned())),
                    None => values.push((String::new(), p)),
                }
            }
        }
    }
    values
        .into_iter()
        .filter(|(k, _)| !NOT_PATHS.contains(&k.rsplit('.').next().unwrap_or_default()))
        .find(|(_, x)| x.contains('/') && !own(x) && !allowed.contains(&x.as_str()))
        .map(|(_, x)| x)
}

fn flatten(prefix: &str, v: &serde_json::Value, out: &mut Vec<(String, String)>) {
    match v {
        serde_json::Value::Object(m) => {
            for (k, x) in m {
                flatten(&format!("{prefix}{k}."), x, out);
            }
        }
        serde_json::Value::Array(a) => a.iter().for_each(|x| flatten(prefix, x, out)),
        serde_json::Value::String(s) => {
            out.push((prefix.trim_end_matches('.').to_owned(), s.clone()));
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(args: &[&str]) -> Vec<String> {
        let mut a = vec!["qemu-system-x86_64".to_owned()];
        a.extend(args.iter().map(|s| (*s).to_owned()));
        host_reaching(&a)
    }

    #[test]
    fn the_test_guests_command_line_stays_inside_its_files() {
        let ok = check(&[
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-accel",
            "tcg",
            "-m",
            "256",
            "-no-reboot",
            "-kernel",
            "/@qsnap-bundle/boot/0-vmlinuz",
            "-initrd",
            "/@qsnap-bundle/boot/1-initrd.img",
            "-append",
            "console=ttyS0 root=/dev/vda quiet",
            "-drive",
            "file=/@qsnap-bundle/disks/0/0.qcow2,if=virtio,format=qcow2,id=drive0",
            "-blockdev",
            "driver=file,filename=/@qsnap-bundle/disks/1/0.raw,node-name=file1",
            "-blockdev",
            "driver=raw,file=file1,node-name=disk1",
            "-blockdev",
            r#"{"driver":"qcow2","file":{"driver":"file","filename":"/@qsnap-bundle/disks/2/0.qcow2"},"node-name":"d2"}"#,
            "-device",
            "virtio-blk-pci,drive=disk1,id=vd1",
            "-chardev",
            "file,id=ser,path=/@qsnap-vm/files/serial.log,append=on",
            "-serial",
            "chardev:ser",
            "-chardev",
            "socket,id=qga0,path=/@qsnap-vm/files/qga.sock,server=on,wait=off",
            "-qmp",
            "unix:/@qsnap-vm/qmp.sock,server=on,wait=off",
            "-netdev",
            "user,id=n0,net=10.0.2.0/24,hostfwd=tcp::2222-:22",
            "-device",
            "virtio-net-pci,netdev=n0",
            "-object",
            "rng-random,id=rng0,filename=/dev/urandom",
            "-cpu",
            "max,tsc-frequency=2000000000",
        ]);
        assert!(ok.is_empty(), "{ok:?}");
    }

    #[test]
    fn whatever_reaches_the_host_is_refused_by_name() {
        for (args, word) in [
            (
                &["-drive", "file=/var/lib/images/other.qcow2,if=virtio"][..],
                "/var/lib/images/other.qcow2",
            ),
            (
                &["-drive", "file=nbd:host:10809"],
                "not one of the bundle's disks",
            ),
            (
                &["-blockdev", "driver=file,filename=/etc/shadow,node-name=f"],
                "/etc/shadow",
            ),
            (
                &[
                    "-blockdev",
                    "driver=host_device,filename=/dev/sda,node-name=f",
                ],
                "host_device",
            ),
            (
                &[
                    "-blockdev",
                    r#"{"driver":"qcow2","file":{"driver":"file","filename":"/etc/x"}}"#,
                ],
                "/etc/x",
            ),
            (
                &["-blockdev", "driver=qcow2,file=f,data-file=g,node-name=q"],
                "data-file",
            ),
            (&["-kernel", "/boot/vmlinuz"], "-kernel"),
            (&["-kernel", "/@qsnap-bundle/../../etc/shadow"], "-kernel"),
            (
                &[
                    "-object",
                    "memory-backend-file,id=m,mem-path=/dev/shm/x,size=1G",
                ],
                "mem-path",
            ),
            (&["-netdev", "tap,id=t0,ifname=tap0"], "tap"),
            (&["-netdev", "bridge,id=b0,br=br0"], "bridge"),
            (&["-netdev", "vhost-user,id=v,chardev=c"], "vhost-user"),
            (&["-netdev", "user,id=n,smb=/srv"], "smb"),
            (
                &["-netdev", "user,id=n,guestfwd=tcp:10.0.2.100:1-cmd:sh"],
                "guestfwd",
            ),
            (&["-virtfs", "local,path=/srv,mount_tag=h"], "-virtfs"),
            (&["-fsdev", "local,id=f,path=/srv"], "-fsdev"),
            (&["-plugin", "/usr/lib/x.so"], "-plugin"),
            (&["-run-with", "user=root"], "-run-with"),
            (&["-pidfile", "/run/x.pid"], "-pidfile"),
            (&["-add-fd", "fd=3,set=1"], "-add-fd"),
            (&["-loadvm", "s1"], "-loadvm"),
            (&["-incoming", "exec:sh"], "-incoming"),
            (&["-trace", "events=x,file=/tmp/t"], "-trace"),
            (&["-D", "/tmp/log"], "-D"),
            (&["-chardev", "file,id=c,path=/var/log/x"], "/var/log/x"),
            (&["-chardev", "pipe,id=c,path=/tmp/p"], "pipe"),
            (&["-chardev", "serial,id=c,path=/dev/ttyS0"], "serial"),
            (
                &["-chardev", "socket,id=c,host=0.0.0.0,port=4444,server=on"],
                "TCP",
            ),
            (&["-serial", "/dev/ttyS0"], "-serial"),
            (&["-serial", "file:/etc/passwd"], "/etc/passwd"),
            (&["-monitor", "tcp::4444,server=on"], "-monitor"),
            (&["-device", "vfio-pci,host=01:00.0"], "vfio"),
            (
                &["-device", "loader,file=/etc/shadow,addr=0x1000"],
                "loader",
            ),
            (
                &["-device", "virtio-net-pci,romfile=/etc/shadow"],
                "/etc/shadow",
            ),
            (&["-global", "virtio-net-pci.romfile=/root/x"], "/root/x"),
            (&["-bios", "/tmp/evil.bin"], "-bios"),
            (&["-daemonize"], "-daemonize"),
            (&["-frobnicate", "1"], "-frobnicate"),
            (&["-display", "vnc=:1"], "-display"),
            (&["-vnc", ":1"], "-vnc"),
            (&["-smbios", "file=/etc/shadow"], "/etc/shadow"),
        ] {
            let r = check(args);
            assert!(
                r.len() == 1 && r[0].contains(word),
                "{args:?}: {r:?} should name {word}"
            );
        }
        // What QEMU reads differently from a first glance: a later key wins, nested keys
        // open nodes of their own, a bundle file that is not a disk is no disk.
        for args in [
            &["-drive", "file=/@qsnap-bundle/boot/0-vmlinuz,if=virtio"][..],
            &["-drive", "file=/@qsnap-bundle/disks/0/0.qcow2,file=/etc/x"],
            &[
                "-drive",
                r#"file=/@qsnap-bundle/disks/0/0.qcow2,file=json:{"driver":"file",,"filename":"x"}"#,
            ],
            &["-drive", "driver=vvfat,dir=..,if=virtio"],
            &["-drive", "file.driver=nbd,file.host=evil"],
            &["-drive", "if=virtio"],
            &[
                "-blockdev",
                "driver=qcow2,file=f,backing.driver=vvfat,backing.dir=..,node-name=q",
            ],
            &[
                "-blockdev",
                "driver=qcow2,file=f,data-file.driver=nbd,node-name=q",
            ],
            &[
                "-blockdev",
                "driver=file,filename=/@qsnap-bundle/disks/0/0.qcow2,driver=vvfat",
            ],
            &[
                "-blockdev",
                r#"{"driver":"qcow2","file":"f","backing":{"driver":"vvfat","dir":".."}}"#,
            ],
            &[
                "-blockdev",
                r#"{"driver":"qcow2","file":"f","data-file":"g"}"#,
            ],
            &[
                "-blockdev",
                "driver=file,filename=relative.qcow2,node-name=f",
            ],
            &["-blockdev", "driver=qcow2,file=json:{},node-name=q"],
            &["-initrd", "/@qsnap-bundle/disks/0/0.qcow2"],
        ] {
            assert_eq!(check(args).len(), 1, "{args:?}: {:?}", check(args));
        }
        assert!(check(&["-fw_cfg", "name=opt/qsnap/x,string=hello"]).is_empty());
        assert!(check(&[
            "-blockdev",
            "driver=qcow2,file=f,backing=null,node-name=q,cache.direct=on"
        ])
        .is_empty());
        // A bare firmware name is looked up in QEMU's own data directory.
        assert!(check(&["-bios", "bios-256k.bin"]).is_empty());
        assert_eq!(check(&["-daemonize", "-pidfile", "/x", "-m", "1"]).len(), 2);
    }
}
