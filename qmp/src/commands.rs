//! Convenience calls built on the typed commands: descriptor hand-over (`getfd`, `add-fd`)
//! whose descriptor must ride with the command bytes. Only QMP mechanics live here; what a
//! descriptor is *for* (a memory file, an overlay) is the engine's business.

use crate::client::Qmp;
use crate::error::Result;
use qapi_qmp as t;
use std::os::fd::AsFd;

impl Qmp {
    /// `add-fd`: puts a copy of `fd` into fdset `fdset_id` (a new set when `None`). QEMU opens
    /// `/dev/fdset/N` paths from it, so it can write files it has no path access to.
    pub async fn add_fd(
        &self,
        fd: impl AsFd,
        fdset_id: Option<i64>,
        opaque: Option<&str>,
    ) -> Result<t::AddfdInfo> {
        let cmd = t::add_fd {
            fdset_id,
            opaque: opaque.map(str::to_owned),
        };
        self.execute_with_fd(cmd, fd.as_fd()).await
    }

    /// `remove-fd`: drops one descriptor (or, with `fd` `None`, the whole set) from an fdset.
    pub async fn remove_fd(&self, fdset_id: i64, fd: Option<i64>) -> Result<()> {
        self.execute(t::remove_fd { fdset_id, fd }).await.map(drop)
    }

    /// `query-fdsets`.
    pub async fn query_fdsets(&self) -> Result<Vec<t::FdsetInfo>> {
        self.execute(t::query_fdsets {}).await
    }

    /// `getfd`: gives QEMU a copy of `fd` under `name` (for `fd:NAME` migration URIs and
    /// `-add-fd`-less device hot-plug).
    pub async fn getfd(&self, name: &str, fd: impl AsFd) -> Result<()> {
        let cmd = t::getfd {
            fdname: name.to_owned(),
        };
        self.execute_with_fd(cmd, fd.as_fd()).await.map(drop)
    }

    /// `closefd`: closes a descriptor given with [`Qmp::getfd`].
    pub async fn closefd(&self, name: &str) -> Result<()> {
        self.execute(t::closefd {
            fdname: name.to_owned(),
        })
        .await
        .map(drop)
    }
}
