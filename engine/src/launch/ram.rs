//! Lazy RAM on the command line: whether a VM's RAM can live in a mapped image file, the RAM
//! backend that does it, and the command line of the *helper* QEMU that turns a snapshot's
//! memory stream into such an image.
//!
//! Why these rules: QEMU's `x-ignore-shared` skips exactly the RAM blocks that are `share=on`
//! and backed by a named file, and a destination must name its RAM blocks as the source did
//! (`pc.ram` for `-m` on pc/q35; a backend's id when the command line names its own, with
//! `-machine memory-backend=` as libvirt does, or one per NUMA node with `-numa
//! node,memdev=`). Such a named backend is swapped for a file backend with the same id and
//! size, each at its own offset in the one image ([`layout`]): the guest cannot tell a
//! backend's kind. A backend whose properties a file backend cannot keep (huge pages,
//! `share=on`, preallocation), RAM that is not the machine's (DIMMs, virtio-mem), RAM some
//! other process maps (vhost-user), or a guest that hands pages back to the host (free-page
//! reporting) keeps its memory in the stream and reverts by copying it.
//!
//! The helper must not disturb the VM it mirrors: every socket, file, port, display, tap or
//! host device in the command line is replaced by an inert stand-in with the same id (so the
//! device set — and so the device state — stays the same), or refused. Pure functions; no
//! process is started here.

use super::argv::{get, join_opts, split_opts};
use super::options::{
    flag, parsed, prop, DROP_BARE, DROP_VALUE, KEEP_BARE, KEEP_OBJECTS, KEEP_VALUE,
};
pub use crate::store::RamBlock;
use std::path::{Path, PathBuf};

/// How a QEMU maps a RAM image.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case", tag = "mapping")]
pub enum RamMapping {
    /// The converting helper: `share=on`, so the loaded pages land in the image and
    /// `x-ignore-shared` leaves them out of the device-state stream.
    Writable {
        /// RAM block / backend id (the first block's, when `blocks` are given).
        backend: String,
        /// The image.
        image: PathBuf,
        /// Guest RAM size (the image's size).
        size: u64,
        /// The command line's own RAM backends, each mapped from its part of the image
        /// (empty: the machine's RAM from `-m`, one block `backend` of `size`).
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        blocks: Vec<RamBlock>,
    },
    /// A revert: a private, read-only mapping (`share=off,readonly=on,rom=off`): pages fault
    /// in lazily and copy on write; the image is never written, and VMs mapping one image
    /// share its unwritten pages.
    Private {
        /// RAM block / backend id (the first block's, when `blocks` are given).
        backend: String,
        /// The image.
        image: PathBuf,
        /// Guest RAM size (the image's size).
        size: u64,
        /// As for [`RamMapping::Writable`].
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        blocks: Vec<RamBlock>,
    },
}

impl RamMapping {
    /// The mapping of a RAM image laid out as `layout`.
    pub fn new(layout: &RamLayout, image: PathBuf, writable: bool) -> RamMapping {
        let backend = layout
            .blocks
            .first()
            .map(|b| b.id.clone())
            .unwrap_or_default();
        let size = layout.size();
        let blocks = if layout.named {
            layout.blocks.clone()
        } else {
            Vec::new()
        };
        if writable {
            RamMapping::Writable {
                backend,
                image,
                size,
                blocks,
            }
        } else {
            RamMapping::Private {
                backend,
                image,
                size,
                blocks,
            }
        }
    }

    fn parts(&self) -> (&str, &Path, u64, &'static str, &[RamBlock]) {
        match self {
            RamMapping::Writable {
                backend,
                image,
                size,
                blocks,
            } => (backend, image, *size, "share=on", blocks),
            RamMapping::Private {
                backend,
                image,
                size,
                blocks,
            } => (
                backend,
                image,
                *size,
                "share=off,readonly=on,rom=off",
                blocks,
            ),
        }
    }

    /// The image.
    pub fn image(&self) -> &Path {
        self.parts().1
    }

    /// The RAM blocks it maps: each backend's id, offset and size.
    pub fn blocks(&self) -> Vec<RamBlock> {
        let (backend, _, size, _, blocks) = self.parts();
        if blocks.is_empty() {
            vec![RamBlock {
                id: backend.to_owned(),
                offset: 0,
                size,
            }]
        } else {
            blocks.to_vec()
        }
    }

    /// `argv` with this RAM: the machine's RAM given a file backend (appended; `-machine`
    /// options merge), or each of the command line's own RAM backends swapped in place for a
    /// file backend with the same id, size and kept properties. Refuses a command line that
    /// lacks a backend the image maps.
    pub fn apply(&self, argv: &[String]) -> Result<Vec<String>, String> {
        let (backend, image, size, how, blocks) = self.parts();
        let path = image.display().to_string();
        if blocks.is_empty() {
            let mut out = argv.to_vec();
            out.extend([
                "-object".into(),
                format!(
                    "memory-backend-file,id={backend},mem-path={},size={size},{how}",
                    path.replace(',', ",,")
                ),
                "-machine".into(),
                format!("memory-backend={backend}"),
            ]);
            return Ok(out);
        }
        let mut out = argv.to_vec();
        for b in blocks {
            let at = backend_objects(argv)
                .into_iter()
                .find(|(_, _, props)| prop(props, "id") == Some(b.id.as_str()))
                .map(|(i, _, _)| i)
                .ok_or_else(|| {
                    format!(
                        "the RAM image maps memory backend {:?}, which the command line does not have",
                        b.id
                    )
                })?;
            out[at + 1] = file_backend(&argv[at + 1], b, &path, how);
        }
        Ok(out)
    }
}

/// One `-object memory-backend-*` of a command line: the index of its `-object`, its type
/// and its properties.
type BackendObject = (usize, String, Vec<(String, String)>);

/// The `-object memory-backend-*` options of a command line.
fn backend_objects(argv: &[String]) -> Vec<BackendObject> {
    let mut out = Vec::new();
    let mut i = 0;
    while i + 1 < argv.len() {
        if flag(&argv[i]) == Some("object") {
            let (kind, props) = parsed(&argv[i + 1]);
            if kind.starts_with("memory-backend-") {
                out.push((i, kind, props));
            }
            i += 2;
        } else {
            i += 1;
        }
    }
    out
}

/// Properties of a RAM backend a file backend keeps as they are (host-side placement and
/// bookkeeping the guest never sees).
const KEPT_BACKEND_PROPS: &[&str] = &[
    "id",
    "merge",
    "dump",
    "host-nodes",
    "policy",
    "reserve",
    "x-use-canonical-path-for-ramblock-id",
];

/// A memory backend option (`v`, either syntax) rewritten as a file backend mapping `b` from
/// the image at `path`, mapped as `how`.
fn file_backend(v: &str, b: &RamBlock, path: &str, how: &str) -> String {
    let (kind, props) = parsed(v);
    let kept = props
        .iter()
        .filter(|(k, _)| KEPT_BACKEND_PROPS.contains(&k.as_str()));
    // Old machine types (≤ 3.1) name a file or memfd backend's RAM block by its QOM path, a
    // RAM backend's by its id: a file standing in for a RAM backend keeps the id's name.
    const CANONICAL: &str = "x-use-canonical-path-for-ramblock-id";
    let pin_name = kind == "memory-backend-ram" && prop(&props, CANONICAL).is_none();
    if let Ok(serde_json::Value::Object(orig)) = serde_json::from_str::<serde_json::Value>(v) {
        let mut m = serde_json::Map::new();
        m.insert("qom-type".into(), "memory-backend-file".into());
        for (k, _) in kept {
            if let Some(x) = orig.get(k) {
                m.insert(k.clone(), x.clone());
            }
        }
        if pin_name {
            m.insert(CANONICAL.into(), false.into());
        }
        m.insert("mem-path".into(), path.into());
        m.insert("offset".into(), b.offset.into());
        m.insert("size".into(), b.size.into());
        for kv in how.split(',') {
            let (k, x) = kv.split_once('=').unwrap_or((kv, "on"));
            let x: serde_json::Value = match x {
                "on" => true.into(),
                "off" if k != "rom" => false.into(),
                other => other.into(),
            };
            m.insert(k.into(), x);
        }
        return serde_json::Value::Object(m).to_string();
    }
    let mut parts = vec!["memory-backend-file".to_owned()];
    parts.extend(kept.map(|(k, x)| format!("{k}={x}")));
    if pin_name {
        parts.push(format!("{CANONICAL}=off"));
    }
    parts.push(format!("mem-path={path}"));
    parts.push(format!("offset={}", b.offset));
    parts.push(format!("size={}", b.size));
    parts.extend(how.split(',').map(str::to_owned));
    join_opts(&parts)
}

/// Where a VM's RAM blocks lie in a RAM image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RamLayout {
    /// The blocks, in the image's order.
    pub blocks: Vec<RamBlock>,
    /// True when the command line names its own backends (they are swapped in place);
    /// false for the machine's RAM from `-m` (one block; a backend is added).
    pub named: bool,
}

impl RamLayout {
    /// The image's size: up to the end of the last block, page-aligned (QEMU maps a file
    /// backend's size rounded up to a page, and refuses a shorter file).
    pub fn size(&self) -> u64 {
        self.blocks
            .iter()
            .map(|b| b.offset + b.size)
            .max()
            .unwrap_or(0)
            .div_ceil(4096)
            * 4096
    }
}

/// Blocks start at 2 MiB boundaries in the image (a file backend's offset must be
/// page-aligned, and huge-page aligned keeps transparent huge pages possible).
const BLOCK_ALIGN: u64 = 2 << 20;

/// How a VM with this command line and machine type lays out its RAM in a RAM image, or why
/// it cannot: the machine's RAM from `-m` (one block named after the machine type), or the
/// backends the command line names for it (`-machine memory-backend=`, or one per `-numa
/// node,memdev=`), each of which must be a RAM or memfd backend whose properties a file
/// backend can keep.
pub fn layout(argv: &[String], machine: Option<&str>) -> Result<RamLayout, String> {
    let mut machine_backend: Option<String> = None;
    let mut node_backends: Vec<String> = Vec::new();
    for w in argv.windows(2) {
        let Some(f) = flag(&w[0]) else { continue };
        let (kind, props) = parsed(&w[1]);
        match f {
            "machine" | "M" => {
                if let Some(b) = prop(&props, "memory-backend") {
                    machine_backend = Some(b.to_owned());
                }
            }
            "numa" if kind == "node" => {
                if prop(&props, "mem").is_some() {
                    return Err(
                        "a NUMA node sizes its memory with mem= rather than a memory backend (memdev=)".into(),
                    );
                }
                if let Some(m) = prop(&props, "memdev") {
                    node_backends.push(m.to_owned());
                }
            }
            _ => {}
        }
    }
    let objects = backend_objects(argv);
    let named: Vec<String> = match (machine_backend, node_backends.is_empty()) {
        (Some(_), false) => {
            return Err("it names a machine memory backend and NUMA node backends both".into())
        }
        (Some(b), true) => vec![b],
        (None, false) => node_backends,
        (None, true) => {
            if let Some((_, kind, props)) = objects.first() {
                return Err(format!(
                    "its memory backend {} ({kind}) is not the machine's RAM (a device's?)",
                    prop(props, "id").unwrap_or("without an id")
                ));
            }
            return Ok(RamLayout {
                blocks: vec![RamBlock {
                    id: backend_id(machine)?,
                    offset: 0,
                    size: ram_size(argv)?,
                }],
                named: false,
            });
        }
    };
    for (_, kind, props) in &objects {
        let id = prop(props, "id").unwrap_or("");
        if !named.iter().any(|n| n == id) {
            return Err(format!(
                "its memory backend {id} ({kind}) is not the machine's RAM (a device's?)"
            ));
        }
    }
    let mut blocks = Vec::new();
    let mut offset = 0u64;
    for id in &named {
        if blocks.iter().any(|b: &RamBlock| &b.id == id) {
            return Err(format!("its memory backend {id} is named twice"));
        }
        let (_, kind, props) = objects
            .iter()
            .find(|(_, _, p)| prop(p, "id") == Some(id.as_str()))
            .ok_or_else(|| format!("it names memory backend {id}, but has no -object for it"))?;
        let size = backend_size(id, kind, props)?;
        blocks.push(RamBlock {
            id: id.clone(),
            offset,
            size,
        });
        offset = (offset + size).div_ceil(BLOCK_ALIGN) * BLOCK_ALIGN;
    }
    Ok(RamLayout {
        blocks,
        named: true,
    })
}

/// The size of RAM backend `id` of type `kind`, or the property that keeps it from being
/// swapped for a file backend.
fn backend_size(id: &str, kind: &str, props: &[(String, String)]) -> Result<u64, String> {
    let memfd = match kind {
        "memory-backend-ram" => false,
        "memory-backend-memfd" => true,
        "memory-backend-file" => {
            return Err(format!(
                "its RAM backend {id} is a file already (mem-path={})",
                prop(props, "mem-path").unwrap_or("?")
            ))
        }
        other => return Err(format!("its RAM backend {id} is {other}")),
    };
    let on = |v: &str| matches!(v, "on" | "true" | "yes" | "y");
    for (k, v) in props {
        let fine = match k.as_str() {
            "qom-type" | "size" => true,
            k if KEPT_BACKEND_PROPS.contains(&k) => true,
            "share" => memfd || !on(v),
            "prealloc" => !on(v),
            "prealloc-threads" | "prealloc-context" => true,
            "hugetlb" => !on(v),
            "hugetlbsize" | "seal" => memfd,
            _ => false,
        };
        if !fine {
            let why = match k.as_str() {
                "share" => " (another process may map it)",
                "prealloc" => " (it would read the whole image before the guest runs)",
                "hugetlb" => " (huge pages, which an image on a file system cannot give)",
                _ => "",
            };
            return Err(format!(
                "its RAM backend {id} has {k}={v}{why}, which a file backend cannot keep"
            ));
        }
    }
    let v = prop(props, "size").ok_or_else(|| format!("its RAM backend {id} has no size"))?;
    parse_size(v, 0).map_err(|e| format!("its RAM backend {id}: {e}"))
}

/// Why this command line's RAM cannot be mapped from an image, or `None` when it can.
pub fn obstacle(argv: &[String]) -> Option<String> {
    for w in argv.windows(2) {
        let Some(f) = flag(&w[0]) else { continue };
        let (first, props) = parsed(&w[1]);
        let first = first.as_str();
        let why = match f {
            "mem-path" => Some("its RAM comes from -mem-path".to_owned()),
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
        size = parse_size(&v, 20).map_err(|e| format!("-m: {e}"))?;
    }
    Ok(size)
}

/// A size as QEMU reads it (`512M`, `2G`, `1024k`); a bare number is shifted by `bare_shift`
/// (MiB for `-m`, bytes for a backend's `size=`).
fn parse_size(v: &str, bare_shift: u32) -> Result<u64, String> {
    let v = v.trim();
    let (num, unit) = v.split_at(v.find(|c: char| !c.is_ascii_digit()).unwrap_or(v.len()));
    let n: u64 = num
        .parse()
        .map_err(|_| format!("cannot read the size {v}"))?;
    let shift = match unit.to_ascii_uppercase().trim_end_matches(['B', 'I']) {
        "" => bare_shift,
        "K" => 10,
        "M" => 20,
        "G" => 30,
        "T" => 40,
        _ => return Err(format!("cannot read the size {v}")),
    };
    n.checked_shl(shift)
        .filter(|x| x >> shift == n)
        .ok_or_else(|| format!("the size {v} is too large"))
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
            // Anonymous memory: the caller swaps it for the RAM image ([`RamMapping::apply`]).
            "object" if kind == "memory-backend-ram" || kind == "memory-backend-memfd" => {
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
            blocks: vec![],
        };
        assert_eq!(
            m.apply(&v(&["q"])).unwrap(),
            v(&[
                "q",
                "-object",
                "memory-backend-file,id=pc.ram,mem-path=/s/a,,b.ram,size=536870912,share=off,readonly=on,rom=off",
                "-machine",
                "memory-backend=pc.ram"
            ])
        );
    }

    /// libvirt's command line for a 512 MiB guest.
    fn libvirt() -> Vec<String> {
        v(&[
            "q",
            "-machine",
            "pc-q35-10.0,usb=off,dump-guest-core=off,memory-backend=pc.ram",
            "-m",
            "size=524288k",
            "-object",
            r#"{"qom-type":"memory-backend-ram","id":"pc.ram","size":536870912}"#,
        ])
    }

    #[test]
    fn a_named_backend_is_swapped_for_a_file_backend_with_its_id_and_size() {
        let l = layout(&libvirt(), Some("pc-q35-10.0")).unwrap();
        assert!(l.named);
        assert_eq!(
            l.blocks,
            vec![RamBlock {
                id: "pc.ram".into(),
                offset: 0,
                size: 512 << 20
            }]
        );
        let m = RamMapping::new(&l, "/s/x.ram".into(), false);
        let out = m.apply(&libvirt()).unwrap();
        assert_eq!(
            out.len(),
            libvirt().len(),
            "swapped in place, nothing added"
        );
        let obj: serde_json::Value = serde_json::from_str(&out[6]).unwrap();
        assert_eq!(
            obj,
            serde_json::json!({"qom-type": "memory-backend-file", "id": "pc.ram",
                "x-use-canonical-path-for-ramblock-id": false,
                "mem-path": "/s/x.ram", "offset": 0, "size": 536870912u64,
                "share": false, "readonly": true, "rom": "off"})
        );
        // A command line without the backend the image maps is refused, not given empty RAM.
        let bare = v(&["q", "-machine", "q35,memory-backend=pc.ram"]);
        assert!(m.apply(&bare).unwrap_err().contains("pc.ram"));
    }

    #[test]
    fn numa_nodes_lie_one_after_another_in_the_image() {
        let argv = v(&[
            "q",
            "-m",
            "384M",
            "-object",
            "memory-backend-ram,id=ram-node0,size=128M,host-nodes=0,policy=bind",
            "-numa",
            "node,nodeid=0,cpus=0,memdev=ram-node0",
            "-object",
            "memory-backend-memfd,id=ram-node1,size=255M,seal=on",
            "-numa",
            "node,nodeid=1,cpus=1,memdev=ram-node1",
            "-numa",
            "dist,src=0,dst=1,val=20",
        ]);
        let l = layout(&argv, None).unwrap();
        assert_eq!(
            l.blocks,
            vec![
                RamBlock {
                    id: "ram-node0".into(),
                    offset: 0,
                    size: 128 << 20
                },
                RamBlock {
                    id: "ram-node1".into(),
                    offset: 128 << 20,
                    size: 255 << 20
                }
            ]
        );
        assert_eq!(l.size(), 383 << 20);
        let out = RamMapping::new(&l, "/s/x.ram".into(), true)
            .apply(&argv)
            .unwrap();
        assert_eq!(
            out[4],
            "memory-backend-file,id=ram-node0,host-nodes=0,policy=bind,x-use-canonical-path-for-ramblock-id=off,mem-path=/s/x.ram,offset=0,size=134217728,share=on"
        );
        assert_eq!(
            out[8],
            "memory-backend-file,id=ram-node1,mem-path=/s/x.ram,offset=134217728,size=267386880,share=on"
        );
    }

    #[test]
    fn says_which_property_keeps_a_backend_from_being_swapped() {
        for (object, word) in [
            ("memory-backend-ram,id=pc.ram,size=1G,share=on", "share=on"),
            (
                "memory-backend-ram,id=pc.ram,size=1G,prealloc=on",
                "prealloc=on",
            ),
            (
                "memory-backend-memfd,id=pc.ram,size=1G,hugetlb=on",
                "hugetlb=on",
            ),
            (
                "memory-backend-file,id=pc.ram,size=1G,mem-path=/dev/hugepages",
                "file already",
            ),
            ("memory-backend-ram,id=pc.ram,size=1G,frob=1", "frob=1"),
            ("memory-backend-ram,id=other,size=1G", "other"),
        ] {
            let argv = v(&[
                "q",
                "-machine",
                "q35,memory-backend=pc.ram",
                "-object",
                object,
            ]);
            let why = layout(&argv, None).unwrap_err();
            assert!(why.contains(word), "{object}: {why}");
        }
        // A backend that is not the machine's RAM (a DIMM's) is refused.
        let dimm = v(&["q", "-object", "memory-backend-ram,id=d0,size=1G"]);
        assert!(layout(&dimm, None).unwrap_err().contains("d0"));
        let legacy = v(&["q", "-numa", "node,mem=512"]);
        assert!(layout(&legacy, None).unwrap_err().contains("mem="));
        // Plain -m: one block named after the machine type, a backend added.
        let plain = layout(&v(&["q", "-m", "256"]), Some("pc-q35-10.0")).unwrap();
        assert!(!plain.named);
        assert_eq!(plain.blocks[0].id, "pc.ram");
        assert_eq!(plain.size(), 256 << 20);
    }
}
