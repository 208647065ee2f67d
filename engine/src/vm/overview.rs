//! Every VM of the store at a glance: the status of each (`qsnap status` without a name) and
//! the snapshot tree of each (`qsnap list` without a name).
//!
//! Reads only, as `status` and `list` of one VM do: no lock is taken and nothing is settled.
//! A VM whose record cannot be read is reported with its error; it never hides the others.

use super::{Engine, Status, Usage, Vm};
use crate::error::{Error, Result};
use crate::name::VmName;
use crate::store::{Manifest, VmRecord};
use serde::Serialize;

/// One VM's record, its snapshots (oldest first) and what they take on disk: what `list`
/// shows.
#[derive(Debug, Clone, Serialize, schemars::JsonSchema)]
pub struct Listing {
    /// The VM's record.
    pub vm: VmRecord,
    /// Its snapshots, oldest first.
    pub snapshots: Vec<Manifest>,
    /// What they take on disk.
    pub usage: Usage,
}

impl Vm {
    /// Its record, snapshots and their disk usage.
    pub async fn listing(&self) -> Result<Listing> {
        let snapshots = self.snapshots().await?;
        let usage = self.usage(&snapshots).await?;
        Ok(Listing {
            vm: self.record().clone(),
            snapshots,
            usage,
        })
    }
}

impl Engine {
    /// The status of every VM of the store, by name (an error for one whose record or state
    /// cannot be read).
    pub async fn status_all(&self) -> Result<Vec<(VmName, Result<Status>)>> {
        let mut all = Vec::new();
        for name in self.vms().await? {
            let st = match self.vm(&name).await {
                Ok(vm) => vm.status().await,
                Err(e) => Err(e),
            };
            all.push((name, st));
        }
        Ok(all)
    }

    /// The listing of every VM of the store, by name (an error for one that cannot be read).
    pub async fn listings(&self) -> Result<Vec<(VmName, Result<Listing>)>> {
        let mut all = Vec::new();
        for name in self.vms().await? {
            let l = match self.vm(&name).await {
                Ok(vm) => vm.listing().await,
                Err(e) => Err::<Listing, Error>(e),
            };
            all.push((name, l));
        }
        Ok(all)
    }
}
