//! VMs by name: registering a running QEMU with the store, and running snapshot operations on
//! it under the VM's lock with the store kept in step (manifest written, record updated).
//!
//! This is the layer that joins QMP work ([`crate::snapshot`]) and files ([`crate::store`]);
//! it holds no QMP connection between calls (QEMU's monitor serves one client at a time).

use crate::error::{Error, Result};
use crate::launch;
use crate::name::{SnapshotName, VmName};
use crate::snapshot::{self, disks, CreateOptions};
use crate::store::{self, CurrentDisk, LaunchCommand, Manifest, Origin, Store, VmRecord};
use qsnap_qmp::{types, ConnectOptions, Endpoint, Qmp};
use std::path::PathBuf;
use std::time::Duration;

/// The entry point: a store and how to reach VMs.
#[derive(Debug, Clone)]
pub struct Engine {
    store: Store,
    connect: ConnectOptions,
}

impl Engine {
    /// An engine over `store`, with default connection options.
    pub fn new(store: Store) -> Engine {
        Engine {
            store,
            connect: ConnectOptions {
                // A VM that is starting may not have its socket yet.
                connect_retry: Duration::from_secs(2),
                ..ConnectOptions::default()
            },
        }
    }

    /// Replaces the QMP connection options (timeouts).
    pub fn with_connect_options(mut self, opts: ConnectOptions) -> Engine {
        self.connect = opts;
        self
    }

    /// The store.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Registers a QEMU that something else started: records its monitor socket and, from the
    /// socket's peer credentials, its pid, command line and working directory (what a later
    /// relaunch needs). Refuses a name already in use.
    pub async fn attach(&self, name: &VmName, qmp_socket: &str) -> Result<Vm> {
        if self.store.has_vm(name).await {
            return Err(Error::VmExists {
                vm: name.to_string(),
            });
        }
        let endpoint = normalise_endpoint(qmp_socket).await;
        let qmp = Qmp::connect_with(Endpoint::parse(&endpoint), &self.connect)
            .await
            .map_err(Error::qmp("connecting to the VM's monitor"))?;
        let pid = qmp.peer_pid();
        let command = match pid {
            Some(pid) => launch_command(pid).await,
            None => None,
        };
        let disks = merge_disks(&[], disks_now(&qmp).await?);
        drop(qmp);

        let _lock = self.store.lock(name, "attach").await?;
        if self.store.has_vm(name).await {
            return Err(Error::VmExists {
                vm: name.to_string(),
            });
        }
        let guest_agent = command
            .as_ref()
            .and_then(|c| launch::argv::guest_agent_socket(&c.argv, &c.cwd));
        let record = VmRecord {
            schema: store::SCHEMA,
            name: name.to_string(),
            qmp: endpoint,
            origin: Origin::Attached,
            pid,
            command,
            current: None,
            disks,
            guest_agent,
            registered_at: store::now_rfc3339(),
        };
        self.store.write_record(&record).await?;
        Ok(self.vm_from(name.clone(), record))
    }

    /// A VM in the store.
    pub async fn vm(&self, name: &VmName) -> Result<Vm> {
        let record = self.store.record(name).await?;
        Ok(self.vm_from(name.clone(), record))
    }

    pub(crate) fn vm_from(&self, name: VmName, record: VmRecord) -> Vm {
        Vm {
            name,
            record,
            store: self.store.clone(),
            connect: self.connect.clone(),
        }
    }
}

/// A unix socket path is stored absolute, so the record works from any directory.
async fn normalise_endpoint(s: &str) -> String {
    match Endpoint::parse(s) {
        Endpoint::Unix(p) if p.is_relative() => tokio::fs::canonicalize(&p)
            .await
            .map(|abs| abs.display().to_string())
            .unwrap_or_else(|_| s.to_owned()),
        _ => s.to_owned(),
    }
}

/// QEMU's command line and working directory from `/proc`, if readable.
async fn launch_command(pid: u32) -> Option<LaunchCommand> {
    let raw = tokio::fs::read(format!("/proc/{pid}/cmdline")).await.ok()?;
    let argv: Vec<String> = raw
        .split(|&b| b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    let cwd = tokio::fs::read_link(format!("/proc/{pid}/cwd"))
        .await
        .ok()?;
    (!argv.is_empty()).then_some(LaunchCommand { argv, cwd })
}

/// Each disk's current top image, as QEMU reports it.
pub(crate) async fn disks_now(qmp: &Qmp) -> Result<Vec<(String, PathBuf)>> {
    let blocks = qmp
        .execute(types::query_block {})
        .await
        .map_err(Error::qmp("listing block devices"))?;
    let mut out = Vec::new();
    for b in blocks {
        let Some(ins) = b.inserted else { continue };
        let device = disks::device_label(&b.device, b.qdev.as_deref(), ins.node_name.as_deref());
        out.push((device, disks::absolute_image(qmp, &ins.file).await));
    }
    Ok(out)
}

/// The record's disks updated to what QEMU runs on now: a disk whose image changed is on an
/// overlay qsnap made; its command-line image stays what the recorded command line names.
pub(crate) fn merge_disks(prev: &[CurrentDisk], now: Vec<(String, PathBuf)>) -> Vec<CurrentDisk> {
    now.into_iter()
        .map(
            |(device, image)| match prev.iter().find(|p| p.device == device) {
                Some(p) => CurrentDisk {
                    owned: p.owned || p.image != image,
                    launch_image: p.launch_image.clone(),
                    device,
                    image,
                },
                None => CurrentDisk {
                    launch_image: image.clone(),
                    owned: false,
                    device,
                    image,
                },
            },
        )
        .collect()
}

/// A VM in the store.
#[derive(Debug, Clone)]
pub struct Vm {
    name: VmName,
    record: VmRecord,
    store: Store,
    connect: ConnectOptions,
}

impl Vm {
    /// Its name.
    pub fn name(&self) -> &VmName {
        &self.name
    }

    /// Its record as last read.
    pub fn record(&self) -> &VmRecord {
        &self.record
    }

    /// The store it lives in.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Connects without waiting for a socket to appear: "is it up?".
    pub(crate) async fn connect_quick(&self) -> Result<Qmp> {
        let opts = ConnectOptions {
            connect_retry: Duration::ZERO,
            greeting_timeout: Duration::from_secs(2),
            ..self.connect.clone()
        };
        Qmp::connect_with(Endpoint::parse(&self.record.qmp), &opts)
            .await
            .map_err(Error::qmp("connecting to the VM's monitor"))
    }

    /// Connects to its monitor. Drop the client soon: QEMU serves one monitor client at a time.
    pub async fn connect(&self) -> Result<Qmp> {
        Qmp::connect_with(Endpoint::parse(&self.record.qmp), &self.connect)
            .await
            .map_err(Error::qmp("connecting to the VM's monitor"))
    }

    /// Default options for a snapshot of this VM: memory goes into the store.
    pub fn create_options(&self, snap: SnapshotName) -> CreateOptions {
        let mut opts = CreateOptions::new(snap, self.store.memory_dir(&self.name));
        opts.overlay_stems = self
            .record
            .disks
            .iter()
            .filter_map(|d| {
                let stem = d.launch_image.file_stem()?.to_string_lossy().into_owned();
                Some((d.device.clone(), stem))
            })
            .collect();
        opts
    }

    /// Takes a snapshot and records it: the manifest is written, the VM's record notes the
    /// new current snapshot and disk images. Refuses when another operation holds the VM or
    /// the name is taken.
    pub async fn create_snapshot(&self, opts: CreateOptions) -> Result<Manifest> {
        let snap = opts.name.clone();
        let _lock = self
            .store
            .lock(&self.name, &format!("create {snap}"))
            .await?;
        if self.store.has_snapshot(&self.name, &snap).await {
            return Err(Error::SnapshotExists {
                vm: self.name.to_string(),
                snapshot: snap.to_string(),
            });
        }
        let mut record = self.store.record(&self.name).await?;
        let created_at = store::now_rfc3339();
        let qmp = self.connect().await?;
        let report = match snapshot::create(&qmp, &opts).await {
            Ok(r) => r,
            Err(e) => {
                // QEMU died after the disks switched: its overlays hold the guest's last
                // writes, so a restart must open them, not the images below.
                if !e.kept_overlays().is_empty() {
                    for (device, overlay) in e.kept_overlays() {
                        if let Some(d) = record.disks.iter_mut().find(|d| &d.device == device) {
                            d.image = overlay.clone();
                            d.owned = true;
                        }
                    }
                    record.pid = None;
                    self.store.write_record(&record).await?;
                }
                return Err(e);
            }
        };
        let machine = machine_type(&qmp).await;
        let manifest = Manifest {
            schema: store::SCHEMA,
            vm: self.name.to_string(),
            name: snap.to_string(),
            parent: record.current.clone(),
            created_at,
            qemu_version: qmp.greeting().version.qemu.to_string(),
            machine,
            snapshot: report,
        };
        record.current = Some(snap.to_string());
        // The switched disks write to their overlays now (named by qsnap's own paths: QEMU may
        // describe an overlay over a relative path as json:{…}).
        for d in &manifest.snapshot.disks {
            match record.disks.iter_mut().find(|r| r.device == d.device) {
                Some(r) => {
                    r.image = d.overlay.clone();
                    r.owned = true;
                }
                None => record.disks.push(CurrentDisk {
                    device: d.device.clone(),
                    image: d.overlay.clone(),
                    launch_image: d.image.clone(),
                    owned: true,
                }),
            }
        }
        record.pid = qmp.peer_pid().or(record.pid);
        drop(qmp);
        self.store.write_manifest(&manifest).await?;
        self.store.write_record(&record).await?;
        Ok(manifest)
    }

    /// Its snapshots, oldest first.
    pub async fn snapshots(&self) -> Result<Vec<Manifest>> {
        self.store.manifests(&self.name).await
    }

    /// One snapshot.
    pub async fn snapshot(&self, snap: &SnapshotName) -> Result<Manifest> {
        self.store.manifest(&self.name, snap).await
    }
}

/// The machine type (`pc-i440fx-10.0`), for checking a restore target later.
async fn machine_type(qmp: &Qmp) -> Option<String> {
    let v = qmp
        .execute(types::qom_get {
            path: "/machine".into(),
            property: "type".into(),
        })
        .await
        .ok()?;
    v.as_str()
        .map(|t| t.strip_suffix("-machine").unwrap_or(t).to_owned())
}
