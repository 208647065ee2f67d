//! What each QEMU command-line option is, for the two rewrites that must not let a second QEMU
//! reach what the first one owns: a clone's command line (`clone_argv.rs`) and the lazy-RAM helper's
//! (`ram.rs`). Option values are read in both syntaxes (`a,b=c` and JSON). Pure data and
//! parsing: no rewrite policy lives here, only the tables both rewrites start from — an
//! option in none of them is unknown, and each rewrite refuses what it does not know.

use super::argv::split_opts;

/// The option name of a command-line word (`-m` and `--m` → `m`), `None` for a value.
pub(super) fn flag(a: &str) -> Option<&str> {
    a.strip_prefix('-').map(|f| f.trim_start_matches('-'))
}

/// An option value as `(type, properties)`, in either syntax: `virtio-mem-pci,memdev=m1` or
/// `{"driver":"virtio-mem-pci","memdev":"m1"}` (the type is the first bare word, or the JSON
/// `driver` / `qom-type` / `type`).
pub(super) fn parsed(v: &str) -> (String, Vec<(String, String)>) {
    if let Ok(serde_json::Value::Object(map)) = serde_json::from_str::<serde_json::Value>(v) {
        let kind = ["driver", "qom-type", "type"]
            .iter()
            .find_map(|k| map.get(*k).and_then(|x| x.as_str()))
            .unwrap_or("")
            .to_owned();
        let props = map
            .iter()
            .map(|(k, x)| {
                let v = match x {
                    serde_json::Value::String(s) => s.clone(),
                    other => other.to_string(),
                };
                (k.clone(), v)
            })
            .collect();
        return (kind, props);
    }
    let parts = split_opts(v);
    let kind = parts
        .first()
        .filter(|p| !p.contains('='))
        .cloned()
        .unwrap_or_default();
    let props = parts
        .iter()
        .filter_map(|p| p.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    (kind, props)
}

/// The value of property `key`, if given.
pub(super) fn prop<'a>(props: &'a [(String, String)], key: &str) -> Option<&'a str> {
    props
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
}

/// Flags without a value that are harmless in a helper whose guest never runs.
pub(super) const KEEP_BARE: &[&str] = &[
    "enable-kvm",
    "no-reboot",
    "no-shutdown",
    "nodefaults",
    "no-user-config",
    "snapshot",
    "usb",
    "mem-prealloc",
    "no-hpet",
    "no-acpi",
    "win2k-hack",
    "no-fd-bootchk",
    "rtc-td-hack",
    "no-kvm-pit-reinjection",
    "only-migratable",
    "enable-fips",
    "old-param",
    "semihosting",
];

/// Flags without a value to leave out (they start, show, wait for or open something).
pub(super) const DROP_BARE: &[&str] = &[
    "S",
    "s",
    "daemonize",
    "preconfig",
    "sdl",
    "curses",
    "full-screen",
    "alt-grab",
    "ctrl-grab",
    "no-frame",
    "no-quit",
    "portrait",
    "perfmap",
    "jitdump",
];

/// Flags whose value is copied as it is: they shape the machine (and so the device state)
/// and reach nothing outside QEMU but files it only reads.
pub(super) const KEEP_VALUE: &[&str] = &[
    "machine",
    "M",
    "cpu",
    "smp",
    "m",
    "accel",
    "kernel",
    "initrd",
    "append",
    "dtb",
    "bios",
    "L",
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
    // NUMA topology: nodes, distances, CPUs (a node's memory backend is an -object).
    "numa",
    "icount",
    "action",
    "watchdog-action",
    "d",
    "option-rom",
    "prom-env",
    "drive",
    "blockdev",
];

/// Flags whose value is left out with the flag (monitors, files, displays, daemons).
pub(super) const DROP_VALUE: &[&str] = &[
    "qmp",
    "qmp-pretty",
    "monitor",
    "mon",
    "pidfile",
    "D",
    "vnc",
    "spice",
    "incoming",
    "loadvm",
    "runas",
    "chroot",
    "gdb",
    "trace",
    "run-with",
    "writeconfig",
];

/// `-object` types a helper may keep: they reach nothing outside QEMU (chardevs they name
/// are made null).
pub(super) const KEEP_OBJECTS: &[&str] = &[
    "iothread",
    "main-loop",
    "thread-context",
    "rng-random",
    "rng-builtin",
    "rng-egd",
    "secret",
    "secret_keyring",
    "throttle-group",
    "tls-cipher-suites",
    "filter-buffer",
    "filter-mirror",
    "filter-redirector",
    "filter-rewriter",
    "cryptodev-backend-builtin",
];
