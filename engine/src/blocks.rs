//! What QEMU's block layer looks like right now: the one reader of `query-block`,
//! `query-named-block-nodes` and `x-debug-query-block-graph`, so that every part of the engine
//! (snapshot planning, the VM record, rollback, delete, `info`) sees disks, image paths,
//! chains and nodes the same way.
//!
//! Image paths are made absolute here: QEMU reports a path as its command line gave it, so a
//! relative one is resolved against QEMU's working directory, and QEMU's `json:{…}` name for
//! a format node over a plain file is read through.
//!
//! A pure reader: it never sends a command that changes anything. The node list is asked for
//! through `snapshot::jobs::list_nodes_of`, which first dismisses an ended stream job a killed
//! qsnap left (QEMU crashes on the listing otherwise).

use crate::error::{Error, Result};
use crate::qemu::{
    BlockGraph, BlockInfo, ImageInfo, QueryBlock, QueryNamedBlockNodes, XDebugQueryBlockGraph,
};
use qsnap_qmp::Qmp;
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

/// The longest backing chain qsnap lets a snapshot make. QEMU's `query-block` nests one
/// object per image, four levels deep above the top image (the answer's list, the device,
/// `inserted`, `image`) and up to five below the base (`format-specific`, `data`, a dirty
/// bitmap's or an encryption slot's details); qsnap reads answers nested up to
/// [`qsnap_qmp::codec::MAX_DEPTH`] (512). Past this, no look at the running VM could read
/// QEMU's answer — not even the delete that would shorten the chain.
pub(crate) const MAX_CHAIN: usize = qsnap_qmp::codec::MAX_DEPTH - 16;

/// One guest disk as QEMU runs it now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Disk {
    /// The name qsnap uses for it: the `-drive` id, else the guest device's id.
    pub device: String,
    /// The `-drive` id / legacy device name (empty for `-blockdev` disks).
    pub drive: String,
    /// The guest device's id or QOM path.
    pub qdev: Option<String>,
    /// The medium, or `None` for an empty drive.
    pub medium: Option<Medium>,
}

/// What is inserted in a disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Medium {
    /// The top node's name (QEMU's `#block123` for `-drive`).
    pub node: Option<String>,
    /// The top image as QEMU names it (a path, maybe relative, or `json:{…}`).
    pub raw_file: String,
    /// Read-only.
    pub read_only: bool,
    /// Virtual size in bytes.
    pub size: u64,
    /// The chain, top (the image written) first.
    pub chain: Vec<Layer>,
}

/// One image of a disk's chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layer {
    /// The image, absolute when it is a local file.
    pub image: PathBuf,
    /// Its format.
    pub format: String,
}

impl Medium {
    /// The top image (what the VM writes to).
    pub fn top(&self) -> &Path {
        &self.chain[0].image
    }

    /// The top image's format.
    pub fn format(&self) -> &str {
        &self.chain[0].format
    }
}

impl Disk {
    /// The top image, if a medium is inserted.
    pub fn top(&self) -> Option<&Path> {
        self.medium.as_ref().map(Medium::top)
    }
}

/// Every block device, in QEMU's order.
pub async fn read(qmp: &Qmp) -> Result<Vec<Disk>> {
    let blocks = qmp
        .execute(QueryBlock {})
        .await
        .map_err(Error::qmp("listing block devices"))?;
    let cwd = qemu_cwd(qmp).await;
    Ok(blocks
        .into_iter()
        .map(|b| disk(b, cwd.as_deref()))
        .collect())
}

fn disk(b: BlockInfo, cwd: Option<&Path>) -> Disk {
    let device = device_label(
        &b.device,
        b.qdev.as_deref(),
        b.inserted.as_ref().and_then(|i| i.node_name.as_deref()),
    );
    let medium = b.inserted.map(|ins| {
        let mut chain = Vec::new();
        let mut at: Option<&ImageInfo> = ins.image.as_ref();
        while let Some(img) = at {
            chain.push(Layer {
                image: absolute(&img.filename, cwd),
                format: img.format.clone(),
            });
            at = img.backing_image.as_deref();
        }
        if chain.is_empty() {
            chain.push(Layer {
                image: absolute(&ins.file, cwd),
                format: ins.drv.clone(),
            });
        }
        Medium {
            node: ins.node_name,
            raw_file: ins.file,
            read_only: ins.ro,
            size: ins
                .image
                .as_ref()
                .map_or(0, |i| u64::try_from(i.virtual_size).unwrap_or(0)),
            chain,
        }
    });
    Disk {
        device,
        drive: b.device,
        qdev: b.qdev,
        medium,
    }
}

/// A named node and the image it opens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    /// Its node name.
    pub name: String,
    /// Its image, absolute when it is a local file.
    pub image: PathBuf,
    /// Its driver (`qcow2`, `raw`, `file`, …).
    pub driver: String,
}

/// Every named node (format and protocol nodes alike).
///
/// Never call this directly: QEMU (10.0.2) crashes when asked while a `block-stream` job has
/// ended undismissed. [`crate::snapshot::jobs::list_nodes_of`] settles such jobs first, then
/// calls this.
pub(crate) async fn nodes_unguarded(qmp: &Qmp) -> Result<Vec<Node>> {
    let all = qmp
        .execute(QueryNamedBlockNodes { flat: true })
        .await
        .map_err(Error::qmp("listing block nodes"))?;
    let cwd = qemu_cwd(qmp).await;
    Ok(all
        .into_iter()
        .filter_map(|n| {
            Some(Node {
                name: n.node_name?,
                image: absolute(&n.file, cwd.as_deref()),
                driver: n.drv,
            })
        })
        .collect())
}

/// Every node, as [`nodes_unguarded`] lists them, told from QEMU's block graph and the chains
/// `disks` (just read) hold, or `None` when the graph holds anything those chains do not
/// explain — then the caller lists the nodes in full.
///
/// Why: `query-named-block-nodes` describes every image of every node and costs ≈ 22 ms at a
/// chain of 100 on this machine; the graph (names and edges only) costs ≈ 2 ms, and the
/// chains already name each node's image. It is trusted only where it adds nothing new: every
/// driver node must be a layer of a disk's chain (reached from the disk's top node through
/// `backing` links, one per layer, no more) or the `file` node under one, over a regular local
/// file. A job's filter, a `data-file`, a node no disk uses, a block device, a network image,
/// a missing or changed command (it is QEMU's unstable `x-` interface): `None`. Like
/// [`nodes_unguarded`], never call this while a `block-stream` job may have ended undismissed.
///
/// The same nodes, names, images and format drivers as the full listing, in another order
/// (disk by disk, top down); a protocol node is said to be `file` (what QEMU calls a regular
/// file's). Each node's image is the one `disks` named for that place in its chain: a node
/// another monitor client replaced in place, under the same name, between the two reads
/// would be misnamed — as any look is out of date once another client acts.
#[cfg(any(test, feature = "testing"))]
pub(crate) async fn nodes_from_graph(qmp: &Qmp, disks: &[Disk]) -> Option<Vec<Node>> {
    nodes_and_shape(qmp, disks).await.0
}

/// [`nodes_from_graph`], and the [`Shape`] of the graph it read (`None` when it read none).
pub(crate) async fn nodes_and_shape(
    qmp: &Qmp,
    disks: &[Disk],
) -> (Option<Vec<Node>>, Option<Shape>) {
    let graph = match qmp.execute(XDebugQueryBlockGraph {}).await {
        Ok(g) => g,
        Err(e) => {
            tracing::debug!(error = %e, "no block graph: the nodes are listed in full");
            return (None, None);
        }
    };
    let paths: Vec<PathBuf> = disks
        .iter()
        .filter_map(|d| d.medium.as_ref())
        .flat_map(|m| m.chain.iter().map(|l| l.image.clone()))
        .filter(|p| p.is_absolute())
        .collect();
    let shape = Shape::of(&graph);
    let Ok(regular) = tokio::task::spawn_blocking(move || {
        paths
            .into_iter()
            .filter(|p| std::fs::metadata(p).is_ok_and(|m| m.file_type().is_file()))
            .collect::<HashSet<PathBuf>>()
    })
    .await
    else {
        return (None, Some(shape));
    };
    let nodes = explain(&graph, disks, &regular);
    if nodes.is_none() {
        tracing::debug!("the block graph holds more than the disks' chains: nodes listed in full");
    }
    (nodes, Some(shape))
}

/// What QEMU's block graph looked like at one look: every node (its number in that answer,
/// kind and name) and every link (parent, child, role), sorted. Two looks at one QEMU with
/// the same shape saw the same named structure: no node added, removed, renamed or relinked
/// in between. What it cannot see: a node replaced under the same name in the same place, and
/// what is not a link — a node reopened read-only, resized, or given a new file name without
/// a new child. Nothing in qsnap does either between two looks of one operation; as with any
/// look, another monitor client's acts are not followed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Shape {
    nodes: Vec<(u64, String, String)>,
    edges: Vec<(u64, u64, String)>,
}

impl Shape {
    fn of(graph: &BlockGraph) -> Shape {
        let mut nodes: Vec<_> = graph
            .nodes
            .iter()
            .map(|n| (n.id, n.kind.clone(), n.name.clone()))
            .collect();
        let mut edges: Vec<_> = graph
            .edges
            .iter()
            .map(|e| (e.parent, e.child, e.name.clone()))
            .collect();
        nodes.sort();
        edges.sort();
        Shape { nodes, edges }
    }
}

/// The [`Shape`] of QEMU's block graph now (`None` when it cannot be read). Like
/// [`nodes_unguarded`], never call this while a `block-stream` job may have ended undismissed.
pub(crate) async fn shape(qmp: &Qmp) -> Option<Shape> {
    match qmp.execute(XDebugQueryBlockGraph {}).await {
        Ok(g) => Some(Shape::of(&g)),
        Err(e) => {
            tracing::debug!(error = %e, "no block graph");
            None
        }
    }
}

/// The nodes `graph` holds, if the chains of `disks` explain every one of them (see
/// [`nodes_from_graph`]); `regular` holds the chains' images that are regular files.
fn explain(graph: &BlockGraph, disks: &[Disk], regular: &HashSet<PathBuf>) -> Option<Vec<Node>> {
    let drivers = driver_names(graph);
    let by_name: HashMap<&str, u64> = drivers.iter().map(|(id, name)| (*name, *id)).collect();
    if drivers.values().any(|n| n.is_empty()) || by_name.len() != drivers.len() {
        return None;
    }
    let mut children: HashMap<u64, Vec<(&str, u64)>> = HashMap::new();
    for e in &graph.edges {
        if drivers.contains_key(&e.parent) {
            children
                .entry(e.parent)
                .or_default()
                .push((e.name.as_str(), e.child));
        }
    }
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    for m in disks.iter().filter_map(|d| d.medium.as_ref()) {
        let mut at = *by_name.get(m.node.as_deref()?)?;
        for (i, layer) in m.chain.iter().enumerate() {
            if !regular.contains(&layer.image) || !seen.insert(at) {
                return None;
            }
            out.push(Node {
                name: (*drivers.get(&at)?).to_owned(),
                image: layer.image.clone(),
                driver: layer.format.clone(),
            });
            let mut backing = None;
            for &(role, child) in children.get(&at).map(Vec::as_slice).unwrap_or_default() {
                match role {
                    // The protocol node: a plain file, with nothing below it.
                    "file" if layer.format != "file" => {
                        let name = drivers.get(&child)?;
                        if children.contains_key(&child) || !seen.insert(child) {
                            return None;
                        }
                        out.push(Node {
                            name: (*name).to_owned(),
                            image: layer.image.clone(),
                            driver: "file".into(),
                        });
                    }
                    "backing" if backing.is_none() && drivers.contains_key(&child) => {
                        backing = Some(child);
                    }
                    _ => return None,
                }
            }
            let last = i + 1 == m.chain.len();
            match (backing, last) {
                (Some(next), false) => at = next,
                (None, true) => {}
                _ => return None,
            }
        }
    }
    (seen.len() == drivers.len()).then_some(out)
}

/// Which of `held` — nodes an earlier look named, here all opening one image — QEMU still has
/// and no longer uses: each is in its block graph, and nothing but another of them sits above
/// it (no disk, job or other node). `None` when the graph cannot be read; the caller then
/// looks in full.
///
/// Why: after a merge the layer that left the chains keeps its nodes, loose, until they are
/// released; a full look would list every node of every chain (≈ 57 ms at a chain of 100,
/// because loose nodes are what [`nodes_from_graph`] cannot explain), where the graph costs
/// ≈ 3 ms. Names are the ones the earlier look read: a node another monitor client deleted
/// and added again under the same name since then would be taken for the earlier one, as
/// any look is out of date once another client acts. Like [`nodes_unguarded`], never call
/// this while a `block-stream` job may have ended undismissed.
pub(crate) async fn loose_among(qmp: &Qmp, held: &[Node]) -> Option<Vec<Node>> {
    let graph = match qmp.execute(XDebugQueryBlockGraph {}).await {
        Ok(g) => g,
        Err(e) => {
            tracing::debug!(error = %e, "no block graph: the nodes are listed in full");
            return None;
        }
    };
    loose(&graph, held)
}

/// The image each disk of `disks` writes to now — `(device, top image)` — told from QEMU's
/// block graph and `nodes`, the node names an earlier look of this operation read; `None`
/// when the graph cannot be read or a disk's top node is not one of `nodes` (the caller then
/// reads the chains, `query-block`).
///
/// Why: after a merge's jobs finalize, the record must follow the image each disk writes to
/// before the guest runs again, with the guest paused; `query-block` describes every layer of
/// every chain (≈ 16 ms at a chain of 100) where the graph costs ≈ 3 ms. A disk's backend is
/// found by the name the graph gives it, its `-drive` id or else its device's QOM path, as
/// `query-block` names it; its top node by the backend's `root` link. The same caveat as
/// [`loose_among`]: a node replaced in place, under the same name, by another client since
/// the earlier look would be misnamed.
pub(crate) async fn tops_from_graph(
    qmp: &Qmp,
    disks: &[Disk],
    nodes: &[Node],
) -> Option<Vec<(String, PathBuf)>> {
    let graph = match qmp.execute(XDebugQueryBlockGraph {}).await {
        Ok(g) => g,
        Err(e) => {
            tracing::debug!(error = %e, "no block graph: the chains are read in full");
            return None;
        }
    };
    let tops = tops(&graph, disks, nodes);
    if tops.is_none() {
        tracing::debug!("the block graph does not tell every disk's top: chains read in full");
    }
    tops
}

/// See [`tops_from_graph`].
fn tops(graph: &BlockGraph, disks: &[Disk], nodes: &[Node]) -> Option<Vec<(String, PathBuf)>> {
    let mut backends: HashMap<&str, u64> = HashMap::new();
    // (Unnamed backends — a block export's, a job's — are no disk's.)
    for n in graph
        .nodes
        .iter()
        .filter(|n| n.kind == "block-backend" && !n.name.is_empty())
    {
        if backends.insert(n.name.as_str(), n.id).is_some() {
            return None;
        }
    }
    let drivers = driver_names(graph);
    let mut out = Vec::new();
    for d in disks.iter().filter(|d| d.medium.is_some()) {
        let name = if d.drive.is_empty() {
            d.qdev.as_deref()?
        } else {
            d.drive.as_str()
        };
        let backend = *backends.get(name)?;
        let mut roots = graph
            .edges
            .iter()
            .filter(|e| e.parent == backend && e.name == "root");
        let (root, None) = (roots.next()?, roots.next()) else {
            return None;
        };
        let top = drivers.get(&root.child)?;
        let mut named = nodes.iter().filter(|n| n.name == *top);
        let (node, None) = (named.next()?, named.next()) else {
            return None;
        };
        if node.driver == "file" || !node.image.is_absolute() {
            return None;
        }
        out.push((d.device.clone(), node.image.clone()));
    }
    Some(out)
}

/// The nodes of `held` that `graph` holds with no parent outside them (see [`loose_among`]),
/// format nodes before the protocol nodes under them.
fn loose(graph: &BlockGraph, held: &[Node]) -> Option<Vec<Node>> {
    let mut present: HashMap<u64, &Node> = HashMap::new();
    for n in graph.nodes.iter().filter(|n| n.kind == "block-driver") {
        if let Some(h) = held.iter().find(|h| h.name == n.name) {
            if present.insert(n.id, h).is_some() {
                return None;
            }
        }
    }
    if present.len()
        != present
            .values()
            .map(|h| &h.name)
            .collect::<HashSet<_>>()
            .len()
    {
        return None; // two graph nodes of one name: not QEMU as we know it
    }
    // Used: a parent outside the held nodes, or a used one (a file node under a format node
    // that a disk still reads).
    let mut used: HashSet<u64> = HashSet::new();
    loop {
        let before = used.len();
        for e in &graph.edges {
            if present.contains_key(&e.child)
                && (!present.contains_key(&e.parent) || used.contains(&e.parent))
            {
                used.insert(e.child);
            }
        }
        if used.len() == before {
            break;
        }
    }
    let mut out: Vec<Node> = present
        .iter()
        .filter(|(id, _)| !used.contains(id))
        .map(|(_, h)| (*h).clone())
        .collect();
    out.sort_by_key(|n| (n.driver == "file", n.name.clone()));
    Some(out)
}

/// The graph's driver nodes: number in this answer → node name.
fn driver_names(graph: &BlockGraph) -> HashMap<u64, &str> {
    graph
        .nodes
        .iter()
        .filter(|n| n.kind == "block-driver")
        .map(|n| (n.id, n.name.as_str()))
        .collect()
}

/// The chain of disk `device` (top first), empty for an unknown or empty disk.
pub fn chain_of(disks: &[Disk], device: &str) -> Vec<PathBuf> {
    disks
        .iter()
        .find(|d| d.device == device)
        .and_then(|d| d.medium.as_ref())
        .map(|m| m.chain.iter().map(|l| l.image.clone()).collect())
        .unwrap_or_default()
}

/// The format node that opens `image`, if QEMU has one.
pub fn format_node_for<'a>(nodes: &'a [Node], image: &Path) -> Option<&'a Node> {
    nodes
        .iter()
        .find(|n| n.image == image && n.driver != "file" && n.driver != "host_device")
}

/// QEMU's working directory (relative image paths are relative to it).
async fn qemu_cwd(qmp: &Qmp) -> Option<PathBuf> {
    let pid = qmp.peer_pid()?;
    tokio::fs::read_link(format!("/proc/{pid}/cwd")).await.ok()
}

/// An image name as QEMU reports it, made absolute. Network and `json:` names that are not a
/// plain file are returned as they are (callers refuse them).
fn absolute(file: &str, cwd: Option<&Path>) -> PathBuf {
    let plain = file
        .strip_prefix("json:")
        .and_then(|j| serde_json::from_str::<serde_json::Value>(j).ok())
        .and_then(|v| {
            // A format node over a plain file: {"driver":"qcow2","file":{"driver":"file","filename":…}}
            if v["file"]["driver"] == "file" {
                v["file"]["filename"].as_str().map(str::to_owned)
            } else if v["driver"] == "file" {
                v["filename"].as_str().map(str::to_owned)
            } else {
                None
            }
        });
    let file = plain.as_deref().unwrap_or(file);
    let image = PathBuf::from(file);
    if file.starts_with("json:") || file.contains("://") {
        return image;
    }
    if image.is_absolute() {
        return crate::store::plain_path(&image);
    }
    match cwd {
        Some(cwd) => crate::store::plain_path(&cwd.join(image)),
        None => image,
    }
}

/// The stable name qsnap gives a disk: the `-drive` id, else the guest device's id
/// (`-device …,id=vd0` of a `-blockdev` disk), else QEMU's paths. Not the node name: that
/// changes with every snapshot.
pub fn device_label(device: &str, qdev: Option<&str>, node: Option<&str>) -> String {
    if !device.is_empty() {
        return device.to_owned();
    }
    match qdev {
        Some(q) => q
            .strip_prefix("/machine/peripheral/")
            .and_then(|rest| rest.split('/').next())
            .unwrap_or(q)
            .to_owned(),
        None => node.unwrap_or_default().to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A graph of driver nodes `(id, name)` and edges `(parent, child, role)`, with backend 0.
    fn graph(nodes: &[(u64, &str)], edges: &[(u64, u64, &str)]) -> BlockGraph {
        let mut g: BlockGraph = serde_json::from_value(serde_json::json!({
            "nodes": [{ "id": 0, "type": "block-backend", "name": "drive0" }],
            "edges": [],
        }))
        .unwrap();
        for (id, name) in nodes {
            g.nodes.push(
                serde_json::from_value(
                    serde_json::json!({ "id": id, "type": "block-driver", "name": name }),
                )
                .unwrap(),
            );
        }
        for (parent, child, role) in edges {
            g.edges.push(serde_json::from_value(serde_json::json!({ "parent": parent, "child": child, "name": role, "perm": [], "shared-perm": [] })).unwrap());
        }
        g
    }

    fn disk(top: &str, layers: &[&str]) -> Disk {
        Disk {
            device: "drive0".into(),
            drive: "drive0".into(),
            qdev: None,
            medium: Some(Medium {
                node: Some(top.into()),
                raw_file: layers[0].into(),
                read_only: false,
                size: 0,
                chain: layers
                    .iter()
                    .map(|l| Layer {
                        image: PathBuf::from(l),
                        format: "qcow2".into(),
                    })
                    .collect(),
            }),
        }
    }

    /// Loose: in the graph, with nothing above but each other.
    #[test]
    fn held_nodes_are_loose_only_when_nothing_else_uses_them() {
        let node = |name: &str, driver: &str| Node {
            name: name.into(),
            image: PathBuf::from(format!("/s/{}", name.trim_end_matches('f'))),
            driver: driver.into(),
        };
        // drive0 → t → b, and the merged-away m (with its file node mf) hanging loose
        let g = graph(
            &[
                (1, "t"),
                (2, "tf"),
                (3, "b"),
                (4, "bf"),
                (5, "m"),
                (6, "mf"),
            ],
            &[
                (0, 1, "root"),
                (1, 2, "file"),
                (1, 3, "backing"),
                (3, 4, "file"),
                (5, 6, "file"),
            ],
        );
        let names = |nodes: Option<Vec<Node>>| {
            nodes
                .unwrap()
                .into_iter()
                .map(|n| n.name)
                .collect::<Vec<_>>()
        };
        // the format node first, then the protocol node under it
        let m = [node("mf", "file"), node("m", "qcow2")];
        assert_eq!(names(loose(&g, &m)), ["m", "mf"]);
        // in a chain: the format node and, through it, its file node are used
        assert!(names(loose(&g, &[node("b", "qcow2"), node("bf", "file")])).is_empty());
        assert!(names(loose(&g, &[node("bf", "file")])).is_empty());
        // a file node alone whose format node is not held: used by it
        assert!(names(loose(&g, &[node("mf", "file")])).is_empty());
        // gone already
        assert!(names(loose(&g, &[node("x", "qcow2")])).is_empty());
        // a job or another node over a held one: used
        let mut g2 = graph(
            &[(5, "m"), (6, "mf"), (7, "filter")],
            &[(5, 6, "file"), (7, 5, "backing")],
        );
        assert!(names(loose(&g2, &m)).is_empty());
        g2.edges.retain(|e| e.parent != 7);
        assert_eq!(names(loose(&g2, &m)), ["m", "mf"]);
        // one name twice: not QEMU as we know it
        let twice = graph(&[(5, "m"), (8, "m")], &[]);
        assert!(loose(&twice, &m).is_none());
    }

    /// Any node added, removed, renamed or relinked changes the shape; the order of the
    /// answer does not.
    #[test]
    fn a_shape_changes_with_any_node_or_link() {
        let drivers = [(1, "t"), (2, "tf"), (3, "b"), (4, "bf")];
        let links = [
            (0, 1, "root"),
            (1, 2, "file"),
            (1, 3, "backing"),
            (3, 4, "file"),
        ];
        let base = Shape::of(&graph(&drivers, &links));
        let mut reordered = graph(&drivers, &links);
        reordered.nodes.reverse();
        reordered.edges.reverse();
        assert_eq!(Shape::of(&reordered), base);
        let added = graph(
            &[(1, "t"), (2, "tf"), (3, "b"), (4, "bf"), (5, "x")],
            &links,
        );
        assert_ne!(Shape::of(&added), base);
        let renamed = graph(&[(1, "t"), (2, "tf"), (3, "b2"), (4, "bf")], &links);
        assert_ne!(Shape::of(&renamed), base);
        let relinked = graph(&drivers, &[(0, 3, "root"), (1, 2, "file"), (3, 4, "file")]);
        assert_ne!(Shape::of(&relinked), base);
        let role = graph(
            &drivers,
            &[
                (0, 1, "root"),
                (1, 2, "file"),
                (1, 3, "cow"),
                (3, 4, "file"),
            ],
        );
        assert_ne!(Shape::of(&role), base);
        let mut job = graph(&drivers, &links);
        job.nodes.push(
            serde_json::from_value(
                serde_json::json!({ "id": 9, "type": "block-job", "name": "j" }),
            )
            .unwrap(),
        );
        assert_ne!(Shape::of(&job), base);
    }

    /// A disk's top told from its backend's `root` link and the node names a look read.
    #[test]
    fn tops_are_told_by_the_backends_root_and_known_names() {
        let node = |name: &str, image: &str, driver: &str| Node {
            name: name.into(),
            image: PathBuf::from(image),
            driver: driver.into(),
        };
        let known = [
            node("t", "/s/top", "qcow2"),
            node("tf", "/s/top", "file"),
            node("b", "/s/base", "qcow2"),
        ];
        let d = disk("t", &["/s/top", "/s/base"]);
        let drivers = [(1, "t"), (2, "tf"), (3, "b")];
        let on = |child: u64| graph(&drivers, &[(0, child, "root"), (1, 2, "file")]);
        let top = |g: &BlockGraph, d: &Disk| {
            tops(g, std::slice::from_ref(d), &known).map(|t| t[0].1.clone())
        };
        assert_eq!(top(&on(1), &d), Some(PathBuf::from("/s/top")));
        // after an active commit the backend's root is the base
        assert_eq!(top(&on(3), &d), Some(PathBuf::from("/s/base")));
        // a top no look named, a protocol node, no root or two: not told
        assert_eq!(top(&graph(&[(9, "new")], &[(0, 9, "root")]), &d), None);
        assert_eq!(top(&on(2), &d), None);
        assert_eq!(top(&graph(&drivers, &[]), &d), None);
        assert_eq!(
            top(&graph(&drivers, &[(0, 1, "root"), (0, 3, "root")]), &d),
            None
        );
        // a `-blockdev` disk: its backend is named by the device's QOM path
        let mut bd = d.clone();
        bd.drive.clear();
        bd.qdev = Some("drive0".into()); // (the test graph's backend name)
        assert_eq!(top(&on(1), &bd), Some(PathBuf::from("/s/top")));
        bd.qdev = Some("/machine/peripheral/vd1/virtio-backend".into());
        assert_eq!(top(&on(1), &bd), None);
        // an unnamed backend (a block export's) is no disk's, and no reason not to tell
        let mut export = on(1);
        export.nodes.push(
            serde_json::from_value(
                serde_json::json!({ "id": 7, "type": "block-backend", "name": "" }),
            )
            .unwrap(),
        );
        export.nodes.push(
            serde_json::from_value(
                serde_json::json!({ "id": 8, "type": "block-backend", "name": "" }),
            )
            .unwrap(),
        );
        assert_eq!(top(&export, &d), Some(PathBuf::from("/s/top")));
        // an empty drive has no top to tell, and is no reason not to tell the others
        let mut empty = d.clone();
        empty.medium = None;
        assert_eq!(
            tops(&on(1), &[empty, d.clone()], &known).map(|t| t.len()),
            Some(1)
        );
    }

    /// The graph is trusted only where the chains explain every driver node in it.
    #[test]
    fn a_graph_is_explained_by_the_chains_or_not_at_all() {
        let regular: HashSet<PathBuf> = ["/s/top", "/s/base"].iter().map(PathBuf::from).collect();
        let two = [(1, "t"), (2, "tf"), (3, "b"), (4, "bf")];
        let links = [
            (0, 1, "root"),
            (1, 2, "file"),
            (1, 3, "backing"),
            (3, 4, "file"),
        ];
        let d = disk("t", &["/s/top", "/s/base"]);
        let nodes = explain(&graph(&two, &links), std::slice::from_ref(&d), &regular).unwrap();
        let got: Vec<_> = nodes
            .iter()
            .map(|n| (n.name.as_str(), n.driver.as_str()))
            .collect();
        assert_eq!(
            got,
            [
                ("t", "qcow2"),
                ("tf", "file"),
                ("b", "qcow2"),
                ("bf", "file")
            ]
        );
        assert_eq!(nodes[3].image, PathBuf::from("/s/base"));
        // A chain of another depth than the graph's.
        assert!(explain(&graph(&two, &links), &[disk("t", &["/s/top"])], &regular).is_none());
        let three = disk("t", &["/s/top", "/s/base", "/s/base"]);
        assert!(explain(&graph(&two, &links), &[three], &regular).is_none());
        // A node no chain reaches.
        let loose = [(1, "t"), (2, "tf"), (3, "b"), (4, "bf"), (5, "loose")];
        assert!(explain(&graph(&loose, &links), std::slice::from_ref(&d), &regular).is_none());
        // A child of another role (a data file), or below a protocol node.
        let data = [
            (0, 1, "root"),
            (1, 2, "file"),
            (1, 3, "backing"),
            (3, 4, "data-file"),
        ];
        assert!(explain(&graph(&two, &data), std::slice::from_ref(&d), &regular).is_none());
        let under = [
            (0, 1, "root"),
            (1, 2, "file"),
            (2, 3, "file"),
            (3, 4, "file"),
        ];
        assert!(explain(&graph(&two, &under), &[disk("t", &["/s/top"])], &regular).is_none());
        // An image that is not a regular file (a block device, a network name).
        let only_top: HashSet<PathBuf> = [PathBuf::from("/s/top")].into();
        assert!(explain(&graph(&two, &links), &[d], &only_top).is_none());
    }

    #[test]
    fn names_are_made_absolute_and_json_names_read_through() {
        let cwd = Path::new("/vm");
        assert_eq!(absolute("d.qcow2", Some(cwd)), PathBuf::from("/vm/d.qcow2"));
        assert_eq!(
            absolute("/x/d.qcow2", Some(cwd)),
            PathBuf::from("/x/d.qcow2")
        );
        let j = r#"json:{"driver":"qcow2","file":{"driver":"file","filename":"o.qcow2"}}"#;
        assert_eq!(absolute(j, Some(cwd)), PathBuf::from("/vm/o.qcow2"));
        let net = "nbd://host/export";
        assert_eq!(absolute(net, Some(cwd)), PathBuf::from(net));
        assert_eq!(
            device_label("", Some("/machine/peripheral/vd0/virtio-backend"), None),
            "vd0"
        );
        assert_eq!(device_label("drive0", None, Some("#block1")), "drive0");
    }
}
