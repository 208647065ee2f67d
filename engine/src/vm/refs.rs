//! Who uses which image: the guard in front of every unlink and every merge.
//!
//! A [`Graph`] is gathered from the whole store — every VM's record (current disks, the
//! images its command line names) and every manifest (frozen images) — with each image's
//! backing chain read from the files (`qemu-img info --backing-chain`) or, for the running
//! VM, from QEMU itself. Nothing is unlinked unless qsnap made it for this VM, no record or
//! manifest names it, no image backs onto it and no running QEMU has it open
//! ([`safe_unlink`]); a doubt ends in a refusal that says what uses the file, never in a
//! deleted image.

use crate::blocks::{self, Disk, Node};
use crate::chains;
use crate::error::{Error, Result};
use crate::name::VmName;
use crate::store::{self, Manifest, Store, VmRecord};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use tokio_util::sync::CancellationToken;

/// One reason an image must stay as it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Use {
    /// A snapshot froze it.
    Frozen {
        vm: String,
        snapshot: String,
        device: String,
    },
    /// A VM writes to it.
    Current { vm: String, device: String },
    /// Some VM's command line names it (an image from before qsnap).
    Original { vm: String },
    /// In a chain another VM uses: never changed from here.
    OtherVm { vm: String },
}

impl std::fmt::Display for Use {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Use::Frozen {
                vm,
                snapshot,
                device,
            } => write!(f, "snapshot {snapshot} of {vm} ({device})"),
            Use::Current { vm, device } => write!(f, "the current disk {device} of {vm}"),
            Use::Original { vm } => write!(f, "{vm}'s command line"),
            Use::OtherVm { vm } => write!(f, "a disk chain of {vm}"),
        }
    }
}

/// What QEMU runs now, for a running VM.
#[derive(Debug, Clone)]
pub(crate) struct Live {
    /// Its disks with their chains.
    pub disks: Vec<Disk>,
    /// Its named nodes.
    pub nodes: Vec<Node>,
    /// The QEMU that answered (its pid, when the socket says).
    pub pid: Option<u32>,
    /// Its block graph's shape at this look, if the graph could be read.
    pub shape: Option<blocks::Shape>,
}

impl Live {
    pub(crate) async fn read(qmp: &qsnap_qmp::Qmp) -> Result<Live> {
        let disks = blocks::read(qmp).await?;
        let (nodes, shape) = crate::snapshot::jobs::list_nodes_shaped(qmp, &disks).await?;
        Ok(Live {
            disks,
            nodes,
            pid: qmp.peer_pid(),
            shape,
        })
    }

    /// A look as fresh as [`Live::read`], from `earlier` (a look at this QEMU in this
    /// operation) when QEMU's block graph has kept its shape since; read again otherwise.
    /// Why: a full look describes every layer of every chain (≈ 20 ms at a chain of 100),
    /// the graph's shape costs ≈ 3 ms — and a step that is about to change QEMU must not act
    /// on a look that is out of date.
    pub(crate) async fn refresh(qmp: &qsnap_qmp::Qmp, earlier: Live) -> Result<Live> {
        if earlier.shape.is_some() && earlier.pid.is_some() && earlier.pid == qmp.peer_pid() {
            let now = crate::snapshot::jobs::graph_shape(qmp).await?;
            if now == earlier.shape {
                // Test builds insist that the look it stands for is what QEMU says.
                #[cfg(feature = "testing")]
                {
                    let read = Live::read(qmp).await?;
                    assert_eq!(
                        (&read.disks, &read.nodes),
                        (&earlier.disks, &earlier.nodes),
                        "the block graph kept its shape, but QEMU's disks or nodes changed"
                    );
                }
                return Ok(earlier);
            }
            tracing::debug!("the block graph changed since the earlier look: read again");
        }
        Live::read(qmp).await
    }

    /// The live chain of `device`, top first.
    pub(crate) fn chain(&self, device: &str) -> Vec<PathBuf> {
        blocks::chain_of(&self.disks, device)
    }

    /// Whether `image` is a layer of any disk's chain.
    pub(crate) fn in_chain(&self, image: &Path) -> bool {
        self.disks
            .iter()
            .filter_map(|d| d.medium.as_ref())
            .any(|m| m.chain.iter().any(|l| l.image == image))
    }

    /// Whether QEMU has `image` open in any node.
    pub(crate) fn has_open(&self, image: &Path) -> bool {
        self.nodes.iter().any(|n| n.image == image)
    }
}

/// What every other VM of the store holds: whatever its chains touch stays as it is.
async fn read_others(
    reader: &mut chains::Reader,
    store: &Store,
    vm: &VmName,
    cancel: &CancellationToken,
) -> Result<Others> {
    // (An image once per VM that holds it: a chain of a hundred snapshots passes through
    // its lower images a hundred times.)
    let mut held = BTreeSet::new();
    // Records and manifests first, all in one go (a store of fifty VMs is a hundred small
    // reads), then the versions of every image they name.
    let others: Vec<VmName> = store
        .vms()
        .await?
        .into_iter()
        .filter(|other| other != vm)
        .collect();
    let read = store.records_and_manifests(others).await?;
    reader
        .prefetch(
            read.iter()
                .flat_map(|(_, rec, manifests)| named_by(rec, manifests))
                .collect(),
        )
        .await;
    for (other, rec, manifests) in read {
        let mut tops: Vec<PathBuf> = rec.disks.iter().map(|d| d.image.clone()).collect();
        for m in manifests {
            tops.extend(m.snapshot.disks.iter().map(|d| d.image.clone()));
        }
        tops.extend(rec.disks.iter().map(|d| d.launch_image.clone()));
        for top in tops {
            // An overlay that VM is about to make (a clone records its overlays before
            // creating them) backs onto nothing yet: nothing to protect.
            if rec.owned_images.contains(&top) {
                let there = match reader.there_ahead(&top) {
                    Some(there) => there,
                    None => tokio::fs::try_exists(&top).await.unwrap_or(true),
                };
                if !there {
                    continue;
                }
            }
            // What another VM's chain holds cannot be guessed: a chain that cannot be read
            // stops the operation rather than leave its lower images unprotected.
            let chain: Vec<PathBuf> = reader
                .chain(&top, cancel)
                .await
                .map_err(|e| Error::from(crate::error::DeleteError::Refused {
                    snapshot: top.display().to_string(),
                    why: format!(
                        "the chain of VM {other}'s image cannot be read ({e}), so qsnap cannot tell what it uses"
                    ),
                }))?
                .into_iter()
                .map(|c| c.filename)
                .collect();
            for img in chain {
                held.insert((img, other.to_string()));
            }
        }
    }
    Ok(Others(std::sync::Arc::new(held.into_iter().collect())))
}

/// Every image a VM's record and manifests name: its disks (now and at launch), what its
/// snapshots froze, what qsnap made for it.
pub(crate) fn named_by<'a>(
    record: &'a VmRecord,
    manifests: &'a [Manifest],
) -> impl Iterator<Item = PathBuf> + 'a {
    record
        .disks
        .iter()
        .flat_map(|d| [d.image.clone(), d.launch_image.clone()])
        .chain(
            manifests
                .iter()
                .flat_map(|m| m.snapshot.disks.iter().map(|d| d.image.clone())),
        )
        .chain(record.owned_images.iter().cloned())
}

/// The images of the store, their backing files and their uses.
#[derive(Debug, Default)]
pub(crate) struct Graph {
    /// Each known image and its backing file.
    pub backing: BTreeMap<PathBuf, Option<PathBuf>>,
    /// Each known image's format.
    pub format: BTreeMap<PathBuf, String>,
    /// What names each image.
    pub uses: BTreeMap<PathBuf, Vec<Use>>,
    /// This VM's images, per disk.
    pub by_device: BTreeMap<String, BTreeSet<PathBuf>>,
    /// Chains that could not be read: `(image, why)`.
    pub broken: Vec<(PathBuf, String)>,
    /// Per disk, the images whose whole chain is in its set.
    complete: BTreeMap<String, std::collections::HashSet<PathBuf>>,
    /// Walk every chain whole (test builds compare the two ways).
    whole_chains: bool,
    /// What the other VMs' chains reach, as this gather read them (or was given them).
    others: Others,
}

/// What the store's other VMs hold: each image their chains reach, and which VM's it is.
/// Read once per gather — a record, the manifests and a chain per image of each VM, ≈ 0.4 ms
/// a VM — and handed on to the next gather of the same operation where only planning reads
/// it (see [`Graph::gather_reusing`]).
#[derive(Debug, Clone, Default)]
pub(crate) struct Others(std::sync::Arc<Vec<(PathBuf, String)>>);

impl Graph {
    /// Gathers the graph for VM `vm` (whose record and manifests are given, so that an
    /// operation can pass what it is about to write) and every other VM in the store.
    pub(crate) async fn gather(
        store: &Store,
        vm: &VmName,
        record: &VmRecord,
        manifests: &[Manifest],
        live: Option<&Live>,
        cancel: &CancellationToken,
    ) -> Result<Graph> {
        let mut reader = chains::Reader::default();
        Self::gather_with(&mut reader, store, vm, record, manifests, live, cancel).await
    }

    /// [`Graph::gather`], with what the other VMs hold taken from `others` (an earlier gather
    /// of this operation) rather than read again. For planning rounds that only stream, in an
    /// operation that holds this VM's lock: that keeps clones and standbys — the ways qsnap
    /// makes another VM use this VM's images — from starting meanwhile (they hold their
    /// source's lock), and whatever another VM stops using stays protected a little longer.
    /// A VM registered meanwhile (`run`, `attach`) over one of this VM's images is not seen:
    /// a stream does not change what an image reads as, so that VM reads on unharmed; a round
    /// with a commit, which writes into the lower image, is planned again from a fresh read
    /// (`merge::run`). The reference guard in front of an unlink gathers afresh.
    pub(crate) async fn gather_reusing(
        store: &Store,
        vm: &VmName,
        record: &VmRecord,
        manifests: &[Manifest],
        live: Option<&Live>,
        others: &Others,
        cancel: &CancellationToken,
    ) -> Result<Graph> {
        let started = std::time::Instant::now();
        let mut reader = chains::Reader::default();
        let mut g = Graph::default();
        g.fill_own(&mut reader, vm, record, manifests, live, cancel)
            .await?;
        g.take_others(others.clone());
        // Test builds insist that what the reuse protects is enough: every image of this VM
        // that another VM holds now was held by another VM then. (Other VMs come and go in
        // the shared test stores meanwhile — forks of the golden snapshot — so only this.)
        #[cfg(feature = "testing")]
        if let Ok(fresh) = read_others(&mut chains::Reader::default(), store, vm, cancel).await {
            let then: BTreeSet<&PathBuf> = others.0.iter().map(|(img, _)| img).collect();
            let mine: BTreeSet<&PathBuf> = g.by_device.values().flatten().collect();
            for (img, holder) in fresh.0.iter() {
                assert!(
                    !mine.contains(img) || then.contains(img),
                    "{} of VM {vm} is held by VM {holder}, which the reused look did not see",
                    img.display()
                );
            }
        }
        #[cfg(not(feature = "testing"))]
        let _ = store;
        tracing::debug!(
            images = g.uses.len(),
            ms = started.elapsed().as_secs_f64() * 1e3,
            "reference graph gathered (the other VMs' part as read before)"
        );
        Ok(g)
    }

    /// What the other VMs hold, as this graph has it (for [`Graph::gather_reusing`]).
    pub(crate) fn others(&self) -> Others {
        self.others.clone()
    }

    fn take_others(&mut self, others: Others) {
        for (img, vm) in others.0.iter() {
            self.add_use(img, Use::OtherVm { vm: vm.clone() });
        }
        self.others = others;
    }

    /// [`Graph::gather`] through `reader`, which may hold chains the caller read already in
    /// this operation (while nothing changed any image: what it holds is not read again).
    pub(crate) async fn gather_with(
        reader: &mut chains::Reader,
        store: &Store,
        vm: &VmName,
        record: &VmRecord,
        manifests: &[Manifest],
        live: Option<&Live>,
        cancel: &CancellationToken,
    ) -> Result<Graph> {
        let started = std::time::Instant::now();
        let mut g = Graph::default();
        g.fill(reader, store, vm, record, manifests, live, cancel)
            .await?;
        // Test builds gather again with whole chains, and insist on the same graph of this
        // VM: where `add_chain` takes a walk's news only, it must lose nothing.
        #[cfg(feature = "testing")]
        {
            let mut whole = Graph {
                whole_chains: true,
                ..Graph::default()
            };
            let mut fresh = chains::Reader::default();
            if whole
                .fill(&mut fresh, store, vm, record, manifests, live, cancel)
                .await
                .is_ok()
            {
                assert_eq!(
                    g.own(),
                    whole.own(),
                    "a walk's news lost part of VM {vm}'s graph"
                );
            }
        }
        tracing::debug!(
            images = g.uses.len(),
            ms = started.elapsed().as_secs_f64() * 1e3,
            "reference graph gathered"
        );
        Ok(g)
    }

    /// This VM's part of the graph: its disks' sets, their images' backing and format, and
    /// what could not be read.
    #[cfg(feature = "testing")]
    #[allow(clippy::type_complexity)]
    fn own(
        &self,
    ) -> (
        &BTreeMap<String, BTreeSet<PathBuf>>,
        BTreeMap<&PathBuf, (&Option<PathBuf>, Option<&String>)>,
        &Vec<(PathBuf, String)>,
    ) {
        let images = self
            .by_device
            .values()
            .flatten()
            .filter_map(|i| Some((i, (self.backing.get(i)?, self.format.get(i)))))
            .collect();
        (&self.by_device, images, &self.broken)
    }

    #[allow(clippy::too_many_arguments)]
    async fn fill(
        &mut self,
        reader: &mut chains::Reader,
        store: &Store,
        vm: &VmName,
        record: &VmRecord,
        manifests: &[Manifest],
        live: Option<&Live>,
        cancel: &CancellationToken,
    ) -> Result<()> {
        self.fill_own(reader, vm, record, manifests, live, cancel)
            .await?;
        let others = read_others(reader, store, vm, cancel).await?;
        self.take_others(others);
        Ok(())
    }

    /// This VM's part: its snapshots, its disks, the images it owns.
    async fn fill_own(
        &mut self,
        reader: &mut chains::Reader,
        vm: &VmName,
        record: &VmRecord,
        manifests: &[Manifest],
        live: Option<&Live>,
        cancel: &CancellationToken,
    ) -> Result<()> {
        let g = self;
        // Every image this VM names, its version taken in one go (the walks below look each
        // up in the cache: one trip to the blocking pool rather than one per image).
        reader.prefetch(named_by(record, manifests).collect()).await;
        // Each file read once: the current disks' chains first (the deepest: they hold the
        // frozen images below them).
        for d in &record.disks {
            let _ = reader.chain(&d.image, cancel).await;
        }
        // This VM.
        for m in manifests {
            for d in &m.snapshot.disks {
                g.add_use(
                    &d.image,
                    Use::Frozen {
                        vm: vm.to_string(),
                        snapshot: m.name.clone(),
                        device: d.device.clone(),
                    },
                );
                g.add_chain(reader, &d.device, &d.image, None, cancel).await;
            }
        }
        for d in &record.disks {
            g.add_use(
                &d.image,
                Use::Current {
                    vm: vm.to_string(),
                    device: d.device.clone(),
                },
            );
            g.add_use(&d.launch_image, Use::Original { vm: vm.to_string() });
            let live_chain = live.map(|l| l.chain(&d.device)).filter(|c| !c.is_empty());
            g.add_chain(reader, &d.device, &d.image, live_chain, cancel)
                .await;
        }
        // Images qsnap made for this VM that nothing above reaches (what a deleted snapshot
        // froze, say): placed under the disk whose chain they back onto, so that a removal
        // or merge can see them.
        for owned in &record.owned_images {
            if g.by_device.values().any(|set| set.contains(owned)) {
                continue;
            }
            let Ok(chain) = reader.chain(owned, cancel).await else {
                continue; // gone; `check` reports it
            };
            let device = chain.iter().find_map(|c| {
                g.by_device
                    .iter()
                    .find(|(_, set)| set.contains(&c.filename))
                    .map(|(d, _)| d.clone())
            });
            let Some(device) = device else { continue };
            let set = g.by_device.entry(device).or_default();
            for c in &chain {
                set.insert(c.filename.clone());
                g.format
                    .entry(c.filename.clone())
                    .or_insert_with(|| c.format.clone());
                g.backing
                    .entry(c.filename.clone())
                    .or_insert_with(|| c.full_backing_filename.clone());
            }
        }
        Ok(())
    }

    fn add_use(&mut self, image: &Path, u: Use) {
        let list = self.uses.entry(image.to_owned()).or_default();
        if !list.contains(&u) {
            list.push(u);
        }
    }

    /// Adds `top`'s chain (from QEMU when given, else from the files) under `device`.
    async fn add_chain(
        &mut self,
        reader: &mut chains::Reader,
        device: &str,
        top: &Path,
        live: Option<Vec<PathBuf>>,
        cancel: &CancellationToken,
    ) {
        let set = self.by_device.entry(device.to_owned()).or_default();
        set.insert(top.to_owned());
        let complete = self.complete.entry(device.to_owned()).or_default();
        // Down to an image whose chain is in this disk's set already (a hundred snapshots of
        // one chain: each image added once), unless QEMU's view is compared with all of it.
        let mut chain = match live {
            None if !self.whole_chains => reader.chain_news(top, cancel).await,
            _ => reader.chain(top, cancel).await,
        };
        let stopped_at = chain
            .as_ref()
            .ok()
            .and_then(|c| c.last())
            .and_then(|c| c.full_backing_filename.clone());
        if stopped_at.is_some_and(|s| !complete.contains(&s)) {
            chain = reader.chain(top, cancel).await;
        }
        match chain {
            Ok(chain) => {
                for c in &chain {
                    complete.insert(c.filename.clone());
                    set.insert(c.filename.clone());
                    self.format
                        .entry(c.filename.clone())
                        .or_insert_with(|| c.format.clone());
                    // The header is the truth about a backing file; QEMU's view (for the
                    // running VM) is checked against it below.
                    self.backing
                        .insert(c.filename.clone(), c.full_backing_filename.clone());
                }
                if let Some(live) = live {
                    let files: Vec<PathBuf> = chain.iter().map(|c| c.filename.clone()).collect();
                    if files != live {
                        self.broken.push((
                            top.to_owned(),
                            format!(
                                "QEMU runs the chain {} but the image files say {}",
                                show(&live),
                                show(&files)
                            ),
                        ));
                    }
                }
            }
            Err(e) => self.broken.push((top.to_owned(), e.to_string())),
        }
    }

    /// Takes an image that was just unlinked out of the graph (it no longer backs anything,
    /// names nothing, is in no disk's set).
    pub(crate) fn forget(&mut self, image: &Path) {
        self.backing.remove(image);
        self.format.remove(image);
        self.uses.remove(image);
        for set in self.by_device.values_mut() {
            set.remove(image);
        }
        for set in self.complete.values_mut() {
            set.remove(image);
        }
    }

    /// The images that back onto `image`.
    pub(crate) fn children(&self, image: &Path) -> Vec<PathBuf> {
        self.backing
            .iter()
            .filter(|(_, b)| b.as_deref() == Some(image))
            .map(|(c, _)| c.clone())
            .collect()
    }

    /// What names `image` (empty: nothing).
    pub(crate) fn uses_of(&self, image: &Path) -> &[Use] {
        self.uses.get(image).map(Vec::as_slice).unwrap_or(&[])
    }

    /// Whether another VM's chains touch `image`.
    pub(crate) fn pinned_elsewhere(&self, image: &Path) -> bool {
        self.uses_of(image)
            .iter()
            .any(|u| matches!(u, Use::OtherVm { .. }))
    }
}

fn show(chain: &[PathBuf]) -> String {
    chain
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(" → ")
}

/// Unlinks `image` if, and only if, nothing could need it: qsnap made it for this VM, it is
/// a qcow2 regular file, no record or manifest names it, no image backs onto it, and the
/// running QEMU does not have it open. Refuses (changing nothing) otherwise; a file already
/// gone is fine (an interrupted operation got this far).
pub(crate) async fn safe_unlink(
    image: &Path,
    graph: &Graph,
    record: &VmRecord,
    live: Option<&Live>,
) -> Result<()> {
    if !record.owned_images.iter().any(|o| o == image) {
        let p = image.to_owned();
        if store::blocking(move || store::exists(&p)).await? {
            return Err(refused(image, "qsnap did not create it for this VM".into()));
        }
    }
    unused(image, graph, live)?;
    crate::unlink::checked(image, crate::unlink::Kind::Image).await
}

/// Unlinks `image`, which an operation made and is giving up (an interrupted one, read back
/// from its journal), if, and only if, nothing names it — no record or manifest of any VM,
/// no image backing onto it, no open node in the running QEMU — and it holds no data of its
/// own (the guest may have written there). Refuses (changing nothing) otherwise.
pub(crate) async fn unlink_made(image: &Path, graph: &Graph, live: Option<&Live>) -> Result<()> {
    unused(image, graph, live)?;
    crate::unlink::made_by_this_operation(
        image,
        crate::unlink::Kind::Image,
        crate::unlink::Data::MustBeEmpty,
    )
    .await
}

/// Nothing uses `image`: no record or manifest names it, no image backs onto it, the running
/// QEMU has no node on it.
fn unused(image: &Path, graph: &Graph, live: Option<&Live>) -> Result<()> {
    if let Some(u) = graph.uses_of(image).first() {
        return Err(refused(image, format!("{u} uses it")));
    }
    if let Some(c) = graph.children(image).first() {
        return Err(refused(image, format!("{} backs onto it", c.display())));
    }
    if live.is_some_and(|l| l.has_open(image)) {
        return Err(refused(image, "the running QEMU has it open".into()));
    }
    Ok(())
}

fn refused(image: &Path, why: String) -> Error {
    Error::UnlinkRefused {
        path: image.to_owned(),
        why,
    }
}
