//! File-descriptor passing over the QMP Unix socket (SCM_RIGHTS).
//!
//! QEMU takes a descriptor from the ancillary data of the bytes that carry the command which
//! consumes it (`getfd`, `add-fd`), so the descriptor is sent in the same `sendmsg` as the
//! first bytes of that command. This module only moves bytes and descriptors; it must never
//! decide which command gets a descriptor, and never hand a bare `RawFd` across an `await`:
//! callers pass an [`OwnedFd`] that stays open until the kernel has queued it.

use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags, UnixAddr};
use std::io::{self, IoSlice};
use std::os::fd::{AsRawFd, OwnedFd};
use tokio::io::{AsyncWriteExt, Interest};
use tokio::net::unix::OwnedWriteHalf;

/// Writes `bytes` to the socket with `fd` attached to the first chunk, then the rest.
pub(crate) async fn write_with_fd(
    half: &mut OwnedWriteHalf,
    bytes: &[u8],
    fd: &OwnedFd,
) -> io::Result<()> {
    let fds = [fd.as_raw_fd()];
    let sent = loop {
        let stream = half.as_ref();
        stream.writable().await?;
        let attempt = stream.try_io(Interest::WRITABLE, || {
            let iov = [IoSlice::new(bytes)];
            let cmsg = [ControlMessage::ScmRights(&fds)];
            sendmsg::<UnixAddr>(
                stream.as_raw_fd(),
                &iov,
                &cmsg,
                MsgFlags::MSG_NOSIGNAL,
                None,
            )
            .map_err(io::Error::from)
        });
        match attempt {
            Ok(n) => break n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    };
    // The descriptor travelled with the first chunk; a short write only leaves plain bytes.
    half.write_all(&bytes[sent..]).await
}
