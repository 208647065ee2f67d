//! `forget`: takes a VM out of the store (`virsh undefine`) and hands its disks to the user.
//!
//! Its record goes, and with `--with-snapshots` its snapshots' manifests and memory files;
//! every disk image stays where it is — the images the user brought and the overlays qsnap
//! made, which hold what the guest wrote since (the report names the image each disk is on
//! now, the one to boot from). Images that live in the store's VM directory (an imported VM's
//! disks) stay there, under a `FORGOTTEN` note, and hold the name until the user moves them.
//!
//! This module must never unlink a disk image, and never forget a VM while its QEMU runs or
//! while another VM runs on one of its images.

use super::state::VmState;
use super::Vm;
use crate::error::{Error, ForgetRefusal, Result};
use crate::name::SnapshotName;
use serde::Serialize;
use std::path::PathBuf;

/// What `forget` may do besides forgetting.
#[derive(Debug, Clone, Copy, Default)]
pub struct ForgetOptions {
    /// Stop a running QEMU first (`quit`, SIGKILL after 10 s) instead of refusing.
    pub stop: bool,
    /// Forget its snapshots too (their memory files are removed) instead of refusing.
    pub with_snapshots: bool,
}

/// What `forget` did and what it left on disk.
#[derive(Debug, Clone, Serialize, schemars::JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub struct ForgetReport {
    /// The VM.
    pub vm: String,
    /// Whether its QEMU was stopped first.
    pub stopped: bool,
    /// The snapshots forgotten with it.
    pub snapshots: Vec<String>,
    /// Their memory files, removed.
    pub memory_removed: Vec<PathBuf>,
    /// Each disk and the image it is on now: what to boot the VM from later.
    pub disks: Vec<ForgottenDisk>,
    /// Every image qsnap had made for the VM, left in place (overlays that current disks
    /// chain through, and the frozen images of forgotten snapshots): yours now.
    pub kept_images: Vec<PathBuf>,
    /// The VM's store directory, when files of it stay there (its `FORGOTTEN` note says
    /// what they are; the name is taken until it is gone).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub left_in_store: Option<PathBuf>,
}

/// One disk of a forgotten VM.
#[derive(Debug, Clone, Serialize, schemars::JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub struct ForgottenDisk {
    /// The device.
    pub device: String,
    /// The image the VM wrote to last (top of its chain).
    pub image: PathBuf,
    /// The image its command line named.
    pub command_line_image: PathBuf,
}

impl Vm {
    /// Forgets the VM (see the module docs). Refused — nothing changed — while its QEMU runs
    /// (unless `stop`), while it has snapshots (unless `with_snapshots`), and while another
    /// VM runs on one of its images.
    pub async fn forget(&self, opts: ForgetOptions) -> Result<ForgetReport> {
        let op = self.begin("forget").await?;
        let mut record = op.record.clone();
        let refuse = |reason| Error::ForgetRefused {
            vm: self.name().to_string(),
            reason,
        };
        if let Some(of) = &record.clone_of {
            // Its overlays back onto its source's frozen images, which qsnap keeps only while
            // a registered VM uses them: forgotten, the source's next delete could merge them
            // away from under the files left behind.
            return Err(refuse(ForgetRefusal::Clone { of: of.vm.clone() }));
        }
        let manifests = self.store().manifests(self.name()).await?;
        // Every image of its chains, its snapshots' frozen ones included: once forgotten, qsnap
        // no longer guards them, so none may be under another VM (a clone of a snapshot).
        let mut images = record.owned_images.clone();
        images.extend(
            record
                .disks
                .iter()
                .flat_map(|d| [d.image.clone(), d.launch_image.clone()]),
        );
        images.extend(
            manifests
                .iter()
                .flat_map(|m| m.snapshot.disks.iter().map(|d| d.image.clone())),
        );
        if let Some((by, image)) = self.used_elsewhere_of(&record, &images).await? {
            return Err(refuse(ForgetRefusal::InUse { by, image }));
        }
        if !manifests.is_empty() && !opts.with_snapshots {
            return Err(refuse(ForgetRefusal::HasSnapshots {
                snapshots: manifests.iter().map(|m| m.name.clone()).collect(),
            }));
        }
        let state = VmState::observe(self, &record).await;
        let running = !matches!(state, VmState::Stopped);
        if running && !opts.stop {
            return Err(refuse(ForgetRefusal::Running { pid: state.pid() }));
        }
        // Its standbys stand on its snapshots: they go first (their guests never ran), and a
        // busy one refuses the forget before the VM stops.
        self.drop_all_pools().await?;
        if running {
            self.stop_before_discarding(&mut record, &state, "forget it")
                .await?;
        }
        let disks: Vec<ForgottenDisk> = record
            .disks
            .iter()
            .map(|d| ForgottenDisk {
                device: d.device.clone(),
                image: d.image.clone(),
                command_line_image: d.launch_image.clone(),
            })
            .collect();
        // Images that live in the store's folder of the VM (an import's): the folder stays,
        // marked before the record goes, so that it is never unregistered and unmarked.
        let vm_dir = self.store().vm_dir(self.name());
        let inside: Vec<PathBuf> = images
            .iter()
            .filter(|p| p.starts_with(&vm_dir))
            .cloned()
            .collect();
        let images_inside =
            crate::store::blocking(move || Ok(inside.iter().any(|p| p.exists()))).await?;
        if images_inside {
            let note = forgotten_note(self.name().as_str(), &disks, &record.owned_images);
            self.store().mark_forgotten(self.name(), &note).await?;
        }
        // Snapshots first, the record last: cut short, the VM is still there with fewer
        // snapshots, and forgetting again finishes.
        let mut memory_removed = Vec::new();
        for m in &manifests {
            let snap = SnapshotName::new(&m.name)?;
            memory_removed.extend(self.store().remove_snapshot(self.name(), &snap).await?);
        }
        self.store().forget_vm(self.name()).await?;
        // Its QEMU is stopped: the monitor socket is a dead one.
        let left_in_store = self.store().remove_vm_dir(self.name(), true).await?;
        drop(op);
        Ok(ForgetReport {
            vm: self.name().to_string(),
            stopped: running,
            snapshots: manifests.into_iter().map(|m| m.name).collect(),
            memory_removed,
            disks,
            kept_images: record.owned_images,
            left_in_store,
        })
    }
}

/// The `FORGOTTEN` note: what the files left in a forgotten VM's store directory are.
fn forgotten_note(vm: &str, disks: &[ForgottenDisk], kept: &[PathBuf]) -> String {
    let mut s = format!(
        "qsnap forgot the VM \"{vm}\" at {}. The files here are its disks, kept: qsnap never\n\
         deletes a forgotten VM's images. Move out what you want to keep, then remove this\n\
         folder; until then no new VM can be called \"{vm}\".\n\nIts disks, and the image each was on:\n",
        crate::store::now_rfc3339()
    );
    for d in disks {
        s.push_str(&format!("  {}: {}\n", d.device, d.image.display()));
    }
    if !kept.is_empty() {
        s.push_str("\nImages qsnap had made for it (overlays: each needs its backing file):\n");
        for p in kept {
            s.push_str(&format!("  {}\n", p.display()));
        }
    }
    s
}
