//! Lazy RAM on the command line: whether a VM's RAM can live in a mapped image file, the RAM
//! backend that does it, and the command line of the *helper* QEMU that turns a snapshot's
//! memory stream into such an image.
//!
//! Why these rules: QEMU's `x-ignore-shared` skips exactly the RAM blocks that are `share=on`
//! and backed by a named file, and a destination must name its RAM block as the source did
//! (`pc.ram` for `-m` on pc/q35). A VM with several RAM blocks (`-numa`, its own
//! `memory-backend-*`, DIMMs, virtio-mem) or whose RAM some other process maps (vhost-user),
//! or that hands pages back to the host (free-page reporting), keeps its memory in the
//! stream and reverts by copying it.
//!
//! The helper must not disturb the VM it mirrors: every socket, file, port, display, tap or
//! host device in the command line is replaced by an inert stand-in with the same id (so the
//! device set — and so the device state — stays the same), or refused. Pure functions; no
//! process is started here.

use super::argv::{get, join_opts, split_opts};
use super::options::{
    flag, parsed, prop, DROP_BARE, DROP_VALUE, KEEP_BARE, KEEP_OBJECTS, KEEP_VALUE,
};
use std::path::PathBuf;

/// How a QEMU maps a RAM image.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case", tag = "mapping")]
pub enum RamMapping {
    /// The converting helper: `share=on`, so the loaded pages land in the image and
    /// `x-ignore-shared` leaves them out of the device-state stream.
    Writable {
        /// RAM block / backend id.
        backend: String,
        /// The image.
        image: PathBuf,
        /// Guest RAM size.
        size: u64,
    },
    /// A revert: a private, read-only mapping (`share=off,readonly=on,rom=off`): pages fault
    /// in lazily and copy on write; the image is never written, and VMs mapping one image
    /// share its unwritten pages.
    Private {
        /// RAM block / backend id.
        backend: String,
        /// The image.
        image: PathBuf,
        /// Guest RAM size.
        size: u64,
    },
}

impl RamMapping {
    /// The arguments that give QEMU this RAM (appended; `-machine` options merge).
    pub fn args(&self) -> Vec<String> {
        let (backend, image, size, how) = match self {
            RamMapping::Writable {
                backend,
                image,
                size,
            } => (backend, image, size, "share=on"),
            RamMapping::Private {
                backend,
                image,
                size,
            } => (backend, image, size, "share=off,readonly=on,rom=off"),
        };
        let path = image.display().to_string().replace(',', ",,");
        vec![
            "-object".into(),
            format!("memory-backend-file,id={backend},mem-path={path},size={size},{how}"),
            "-machine".into(),
            format!("memory-backend={backend}"),
        ]
    }
}

/// Why this command line's RAM cannot be mapped from an image, or `None` when it can.
pub fn obstacle(argv: &[String]) -> Option<String> {
    for w in argv.windows(2) {
        let Some(f) = flag(&w[0]) else { continue };
        let (first, props) = parsed(&w[1]);
        let first = first.as_str();
        let why = match f {
            "mem-path" => Some("its RAM comes from -mem-path".to_owned()),
            "numa" => Some("it has NUMA nodes (-numa), so several RAM blocks".to_owned()),
            "object" if first.starts_with("memory-backend-") => {
                Some(format!("it has its own memory backend (-object {first})"))
            }
            "machine" | "M" if prop(&props, "memory-backend").is_some() => {
                Some("its machine names a memory backend (memory-backend=…)".to_owned())
            }
            "device" if first.starts_with("virtio-mem") || first.starts_with("virtio-pmem") => {
                Some(format!("it has a {first} device (more guest memory)"))
            }
            "device" if first == "pc-dimm" || first == "nvdimm" || first.starts_with("ivshmem") => {
                Some(format!("it has a {first} device (more guest memory)"))
            }
            "device" if first.starts_with("vhost-user") => Some(format!(
                "a vhost-user device ({first}) maps its RAM from another process"
            )),
            "netdev" | "chardev" if first.starts_with("vhost-user") => {
                Some("a vhost-user backend maps its RAM from another process".to_owned())
            }
            "device"
                if first.starts_with("virtio-balloon")
                    && matches!(prop(&props, "free-page-reporting"), Some("on" | "true")) =>
            {
                Some("its balloon reports free pages (free-page-reporting=on)".to_owned())
            }
            _ => None,
        };
        if why.is_some() {
            return why;
        }
    }
    None
}

/// The guest's RAM size as `-m` sets it (QEMU's default 128 MiB without one): the size the
/// RAM backend must have. Bare numbers are MiB, as QEMU reads them.
pub fn ram_size(argv: &[String]) -> Result<u64, String> {
    let mut size = 128u64 << 20;
    for w in argv.windows(2) {
        if flag(&w[0]) != Some("m") {
            continue;
        }
        let parts = split_opts(&w[1]);
        let v = get(&parts, "size")
            .map(str::to_owned)
            .or_else(|| parts.first().filter(|p| !p.contains('=')).cloned());
        let Some(v) = v else { continue };
        let v = v.trim();
        let (num, unit) = v.split_at(v.find(|c: char| !c.is_ascii_digit()).unwrap_or(v.len()));
        let n: u64 = num
            .parse()
            .map_err(|_| format!("cannot read the RAM size -m {v}"))?;
        let shift = match unit.to_ascii_uppercase().trim_end_matches(['B', 'I']) {
            "" | "M" => 20,
            "K" => 10,
            "G" => 30,
            "T" => 40,
            _ => return Err(format!("cannot read the RAM size -m {v}")),
        };
        size = n
            .checked_shl(shift)
            .ok_or_else(|| format!("-m {v} is too large"))?;
    }
    Ok(size)
}

/// The RAM block id of `-m` memory for the machine type: `pc.ram` on pc and q35 (QEMU's
/// `default-ram-id`), `microvm.ram` on microvm. Other machines are not known here.
pub fn backend_id(machine: Option<&str>) -> Result<String, String> {
    // No machine type: qemu-system-x86_64's default, pc.
    let m = machine.unwrap_or("pc");
    if m == "pc" || m == "q35" || m.starts_with("pc-") {
        Ok("pc.ram".into())
    } else if m == "microvm" {
        Ok("microvm.ram".into())
    } else {
        Err(format!(
            "qsnap knows the RAM block name only for the pc, q35 and microvm machines, not {m}"
        ))
    }
}

/// The helper's command line: `argv` with everything that reaches outside QEMU replaced by an
/// inert stand-in of the same id (sockets and files → `null` chardevs, networks → a
/// restricted user network, audio → none, displays off, no monitor, pidfile, log or daemon),
/// or an error naming what qsnap cannot make inert — including any option it does not know:
/// an allow-list, because a helper that shared a socket or file with the running VM would
/// take it over. Disks are the caller's to substitute.
pub fn helper_argv(argv: &[String]) -> Result<Vec<String>, String> {
    let mut out = vec![argv.first().cloned().unwrap_or_default()];
    let mut i = 1;
    while i < argv.len() {
        let a = &argv[i];
        let Some(f) = flag(a) else {
            return Err(format!("qsnap cannot read the command line at {a:?}"));
        };
        if KEEP_BARE.contains(&f) {
            out.push(a.clone());
            i += 1;
            continue;
        }
        if DROP_BARE.contains(&f) {
            i += 1;
            continue;
        }
        if f == "nographic" {
            out.extend(["-display".into(), "none".into()]);
            i += 1;
            continue;
        }
        let Some(v) = argv.get(i + 1) else {
            return Err(format!("-{f} lacks its value"));
        };
        let (kind, props) = parsed(v);
        let keep = |kind: &str, keys: &[&str]| -> String {
            let mut p = vec![kind.to_owned()];
            for k in keys {
                if let Some(x) = prop(&props, k) {
                    p.push(format!("{k}={x}"));
                }
            }
            join_opts(&p)
        };
        match f {
            _ if DROP_VALUE.contains(&f) => {}
            _ if KEEP_VALUE.contains(&f) => out.extend([a.clone(), v.clone()]),
            "display" => out.extend(["-display".into(), "none".into()]),
            "chardev" => out.extend(["-chardev".into(), keep("null", &["id", "mux"])]),
            "audiodev" => out.extend(["-audiodev".into(), keep("none", &["id"])]),
            "serial" | "parallel" | "debugcon" => {
                let inert = v == "none" || v == "null" || v.starts_with("chardev:");
                out.extend([a.clone(), if inert { v.clone() } else { "null".into() }]);
            }
            "netdev" => out.extend([
                "-netdev".into(),
                format!("{},restrict=on", keep("user", &["id"])),
            ]),
            "nic" | "net" if kind == "nic" || kind == "none" => out.extend([a.clone(), v.clone()]),
            "nic" | "net" => out.extend([
                a.clone(),
                format!(
                    "{},restrict=on",
                    keep("user", &["id", "name", "model", "mac", "netdev"])
                ),
            ]),
            "device" => {
                let host = ["vfio", "usb-host", "vhost-", "tpm-", "spapr-vio"]
                    .iter()
                    .any(|p| kind.starts_with(p));
                if host || kind.is_empty() {
                    return Err(format!(
                        "its device {kind:?} reaches the host (a helper QEMU cannot share it)"
                    ));
                }
                out.extend([a.clone(), v.clone()]);
            }
            "object" if KEEP_OBJECTS.contains(&kind.as_str()) || kind.starts_with("tls-creds") => {
                out.extend([a.clone(), v.clone()]);
            }
            "object" => {
                return Err(format!(
                    "qsnap does not know whether -object {kind} is safe to copy into a helper QEMU"
                ));
            }
            _ => {
                return Err(format!(
                    "qsnap does not know whether -{f} is safe to copy into a helper QEMU"
                ));
            }
        }
        i += 2;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(s: &[&str]) -> Vec<String> {
        s.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn refuses_what_has_several_or_foreign_ram() {
        assert_eq!(obstacle(&v(&["q", "-m", "512", "-accel", "tcg"])), None);
        for (args, word) in [
            (&["q", "-mem-path", "/dev/hugepages"][..], "-mem-path"),
            (&["q", "-numa", "node,memdev=m0"], "NUMA"),
            (
                &["q", "-object", "memory-backend-ram,id=m0,size=1G"],
                "memory-backend-ram",
            ),
            (
                &["q", "-machine", "q35,memory-backend=m0"],
                "memory-backend",
            ),
            (&["q", "-device", "virtio-mem-pci,memdev=m1"], "virtio-mem"),
            (
                &["q", "-device", "vhost-user-fs-pci,chardev=c"],
                "vhost-user",
            ),
            (
                &["q", "-device", "virtio-balloon-pci,free-page-reporting=on"],
                "free-page",
            ),
        ] {
            let why = obstacle(&v(args)).expect("refused");
            assert!(why.contains(word), "{why}");
        }
    }

    #[test]
    fn reads_the_ram_size() {
        assert_eq!(ram_size(&v(&["q"])).unwrap(), 128 << 20);
        assert_eq!(ram_size(&v(&["q", "-m", "256"])).unwrap(), 256 << 20);
        assert_eq!(ram_size(&v(&["q", "-m", "2G"])).unwrap(), 2 << 30);
        assert_eq!(ram_size(&v(&["q", "-m", "512M"])).unwrap(), 512 << 20);
        assert_eq!(
            ram_size(&v(&["q", "-m", "size=1g,slots=2,maxmem=4G"])).unwrap(),
            1 << 30
        );
        assert!(ram_size(&v(&["q", "-m", "lots"])).is_err());
    }

    #[test]
    fn names_the_ram_block() {
        assert_eq!(backend_id(Some("pc-i440fx-10.0")).unwrap(), "pc.ram");
        assert_eq!(backend_id(Some("pc-q35-7.2")).unwrap(), "pc.ram");
        assert_eq!(backend_id(None).unwrap(), "pc.ram");
        assert_eq!(backend_id(Some("microvm")).unwrap(), "microvm.ram");
        assert!(backend_id(Some("virt-9.0")).is_err());
    }

    #[test]
    fn the_helper_reaches_nothing_outside() {
        let argv = v(&[
            "qemu",
            "-qmp",
            "unix:/vm/qmp.sock,server=on,wait=off",
            "-chardev",
            "socket,id=qga,path=/vm/qga.sock,server=on,wait=off",
            "-chardev",
            "file,id=ser,path=/vm/serial.log",
            "-serial",
            "chardev:ser",
            "-serial",
            "file:/vm/ser2.log",
            "-netdev",
            "user,id=n0,hostfwd=tcp::2222-:22",
            "-netdev",
            "tap,id=n1,ifname=tap0",
            "-nic",
            "user,model=virtio,hostfwd=tcp::2223-:22",
            "-vnc",
            ":1",
            "-pidfile",
            "/vm/pid",
            "-daemonize",
            "-nographic",
            "-m",
            "512",
        ]);
        let out = helper_argv(&argv).unwrap();
        assert_eq!(
            out,
            v(&[
                "qemu",
                "-chardev",
                "null,id=qga",
                "-chardev",
                "null,id=ser",
                "-serial",
                "chardev:ser",
                "-serial",
                "null",
                "-netdev",
                "user,id=n0,restrict=on",
                "-netdev",
                "user,id=n1,restrict=on",
                "-nic",
                "user,model=virtio,restrict=on",
                "-display",
                "none",
                "-m",
                "512",
            ])
        );
        assert!(helper_argv(&v(&["q", "-device", "vfio-pci,host=01:00.0"])).is_err());
        assert!(helper_argv(&v(&[
            "q",
            "-device",
            r#"{"driver":"vfio-pci","host":"01:00.0"}"#
        ]))
        .is_err());
        assert!(helper_argv(&v(&["q", "-fsdev", "local,path=/x,id=f"])).is_err());
        assert!(helper_argv(&v(&["q", "-object", "input-linux,id=i,evdev=/dev/input/e"])).is_err());

        // A flag without a value never makes the next one look like its value.
        let argv = v(&[
            "qemu",
            "-enable-kvm",
            "-qmp",
            "unix:/run/vm.sock,server=on,wait=off",
            "-no-shutdown",
            "-chardev",
            "socket,id=c,path=/run/c.sock,server=on",
            "-s",
            "-D",
            "/vm/qemu.log",
            "-snapshot",
            "-serial",
            "file:/vm/ser.log",
        ]);
        let out = helper_argv(&argv).unwrap();
        assert_eq!(
            out,
            v(&[
                "qemu",
                "-enable-kvm",
                "-no-shutdown",
                "-chardev",
                "null,id=c",
                "-snapshot",
                "-serial",
                "null"
            ])
        );
        assert!(!out
            .iter()
            .any(|a| a.contains("/run/") || a.contains("/vm/")));
    }

    #[test]
    fn mappings_render() {
        let m = RamMapping::Private {
            backend: "pc.ram".into(),
            image: "/s/a,b.ram".into(),
            size: 512 << 20,
        };
        assert_eq!(
            m.args(),
            v(&[
                "-object",
                "memory-backend-file,id=pc.ram,mem-path=/s/a,,b.ram,size=536870912,share=off,readonly=on,rom=off",
                "-machine",
                "memory-backend=pc.ram"
            ])
        );
    }
}
