//! Internals qsnap's own test suite reaches for (the `testing` feature, which the
//! `failpoints` feature turns on). Not part of the API an embedder may rely on: everything here
//! bypasses the VM lock, the journal or the reference guard — exactly what a test that plants
//! damage needs, and what an embedder must never do.

use crate::error::Result;
use crate::name::VmName;
use crate::store::{Intent, Store, VmRecord};
use std::future::Future;

/// The block-layer readers (`query-block`, the node list as qsnap asks for it).
pub mod blocks {
    pub use crate::blocks::{chain_of, format_node_for, read, Disk, Node};
    pub use crate::snapshot::jobs::list_nodes as nodes;
    pub use crate::snapshot::jobs::list_nodes_of as nodes_of;

    /// The nodes told from QEMU's block graph, or `None` where qsnap would list them in full.
    pub async fn nodes_from_graph(qmp: &qsnap_qmp::Qmp, disks: &[Disk]) -> Option<Vec<Node>> {
        crate::blocks::nodes_from_graph(qmp, disks).await
    }
}

/// `qemu-img` as qsnap runs it.
pub mod image {
    pub use crate::image::{chain, check, create_overlay, info, ChainImage, ImageCheck};
}

/// The named failpoints between steps.
pub mod failpoint {
    pub use crate::failpoint::{enabled, OTHER_POINTS, POINTS, TIMEOUT_POINTS};
}

/// The guest agent client qsnap freezes and thaws with.
pub use crate::guest_agent::GuestAgent;

/// The store's writers, called directly (no lock, no journal).
pub trait StoreWriters {
    /// Writes a VM's record.
    fn write_record(&self, rec: &VmRecord) -> impl Future<Output = Result<()>> + Send;
    /// Writes a VM's journal, as an interrupted operation would have left it.
    fn write_journal(
        &self,
        vm: &VmName,
        intent: &Intent,
    ) -> impl Future<Output = Result<()>> + Send;
    /// Removes a VM's journal.
    fn clear_journal(&self, vm: &VmName) -> impl Future<Output = Result<()>> + Send;
}

impl StoreWriters for Store {
    fn write_record(&self, rec: &VmRecord) -> impl Future<Output = Result<()>> + Send {
        Store::write_record(self, rec)
    }
    fn write_journal(
        &self,
        vm: &VmName,
        intent: &Intent,
    ) -> impl Future<Output = Result<()>> + Send {
        Store::write_journal(self, vm, intent)
    }
    fn clear_journal(&self, vm: &VmName) -> impl Future<Output = Result<()>> + Send {
        Store::clear_journal(self, vm)
    }
}
