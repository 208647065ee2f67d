//! A minimal QEMU guest agent client: enough to freeze and thaw the guest's filesystems around
//! a disk-only snapshot (`--quiesce`).
//!
//! The agent speaks QMP-style JSON lines over a virtio-serial port that QEMU exposes as a unix
//! socket, with no greeting and no ids: a fresh connection may hold a stale reply, so the
//! session starts with `guest-sync-delimited` (the reply is preceded by a 0xFF byte) and reads
//! until its own random token comes back. Every read has a deadline: a guest without a running
//! agent must fail the snapshot quickly, not hang it. Never used for anything but freeze/thaw,
//! and [`answers`]: whether an agent is there at all (it changes nothing in the guest).

use crate::error::{Error, Result};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;

/// Whether the QEMU guest agent on `socket` answers: connects and synchronises with it
/// (`guest-sync-delimited`), each step within `timeout`; asks nothing else and changes nothing
/// in the guest. For waiting until a booted guest's agent is up (the socket of a VM's agent is
/// its record's [`crate::VmRecord::guest_agent`]); [`Error::GuestAgent`] says why it does not
/// answer (yet).
pub async fn answers(socket: &Path, timeout: Duration) -> Result<()> {
    GuestAgent::connect(socket, timeout).await.map(drop)
}

/// A synchronised session with the guest agent.
#[derive(Debug)]
pub struct GuestAgent {
    path: PathBuf,
    read: BufReader<OwnedReadHalf>,
    write: OwnedWriteHalf,
    timeout: Duration,
}

fn agent_err(path: &Path, what: impl Into<String>) -> Error {
    Error::GuestAgent {
        socket: path.to_owned(),
        what: what.into(),
    }
}

impl GuestAgent {
    /// Connects and synchronises; every later reply must come within `timeout`.
    pub async fn connect(path: &Path, timeout: Duration) -> Result<GuestAgent> {
        let stream = tokio::time::timeout(timeout, UnixStream::connect(path))
            .await
            .map_err(|_| agent_err(path, "connecting timed out"))?
            .map_err(|e| agent_err(path, format!("cannot connect: {e}")))?;
        let (read, write) = stream.into_split();
        let mut agent = GuestAgent {
            path: path.to_owned(),
            read: BufReader::new(read),
            write,
            timeout,
        };
        agent.sync().await?;
        Ok(agent)
    }

    async fn send(&mut self, msg: &Value) -> Result<()> {
        let mut line = msg.to_string().into_bytes();
        line.push(b'\n');
        self.write
            .write_all(&line)
            .await
            .map_err(|e| agent_err(&self.path, format!("writing: {e}")))
    }

    async fn read_line(&mut self) -> Result<Vec<u8>> {
        let mut buf = Vec::new();
        let n = tokio::time::timeout(self.timeout, self.read.read_until(b'\n', &mut buf))
            .await
            .map_err(|_| {
                agent_err(
                    &self.path,
                    format!(
                        "no answer within {:?} (is qemu-ga running in the guest?)",
                        self.timeout
                    ),
                )
            })?
            .map_err(|e| agent_err(&self.path, format!("reading: {e}")))?;
        if n == 0 {
            return Err(agent_err(&self.path, "the agent closed the connection"));
        }
        Ok(buf)
    }

    /// Discards whatever a previous client left unread, up to our own token.
    async fn sync(&mut self) -> Result<()> {
        let token = u64::from(std::process::id()) << 20
            ^ (std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.subsec_nanos() as u64)
                .unwrap_or(0));
        let token = token & 0x7fff_ffff;
        self.send(&json!({"execute": "guest-sync-delimited", "arguments": {"id": token}}))
            .await?;
        loop {
            let raw = self.read_line().await?;
            // The reply follows a 0xFF delimiter; anything before it is stale.
            let text = match raw.iter().rposition(|&b| b == 0xff) {
                Some(i) => &raw[i + 1..],
                None => &raw[..],
            };
            if let Ok(v) = serde_json::from_slice::<Value>(text) {
                if v["return"].as_u64() == Some(token) {
                    return Ok(());
                }
            }
        }
    }

    /// Runs one command; its `return` value, or the agent's error.
    pub async fn execute(&mut self, command: &str) -> Result<Value> {
        self.send(&json!({ "execute": command })).await?;
        let raw = self.read_line().await?;
        let v: Value = serde_json::from_slice(&raw)
            .map_err(|e| agent_err(&self.path, format!("{command}: bad reply: {e}")))?;
        if let Some(err) = v.get("error") {
            return Err(agent_err(
                &self.path,
                format!(
                    "{command}: {} ({})",
                    err["desc"].as_str().unwrap_or("?"),
                    err["class"].as_str().unwrap_or("?")
                ),
            ));
        }
        Ok(v["return"].clone())
    }

    /// Freezes the guest's filesystems; how many.
    pub async fn freeze(&mut self) -> Result<u64> {
        let v = self.execute("guest-fsfreeze-freeze").await?;
        Ok(v.as_u64().unwrap_or(0))
    }

    /// Thaws them; how many.
    pub async fn thaw(&mut self) -> Result<u64> {
        let v = self.execute("guest-fsfreeze-thaw").await?;
        Ok(v.as_u64().unwrap_or(0))
    }

    /// `frozen` or `thawed`.
    pub async fn status(&mut self) -> Result<String> {
        let v = self.execute("guest-fsfreeze-status").await?;
        Ok(v.as_str().unwrap_or_default().to_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::UnixListener;

    #[tokio::test]
    async fn answers_once_the_agent_synchronises() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("qga.sock");
        // Nobody there: a guest-agent error naming the socket.
        match answers(&socket, Duration::from_millis(200)).await {
            Err(Error::GuestAgent { socket: s, .. }) => assert_eq!(s, socket),
            other => panic!("{other:?}"),
        }
        // An agent that first replays a stale reply, then answers the sync with its token.
        let listener = UnixListener::bind(&socket).unwrap();
        let agent = tokio::spawn(async move {
            let (stream, _) = listener.accept().await.unwrap();
            let (read, mut write) = stream.into_split();
            let mut line = String::new();
            BufReader::new(read).read_line(&mut line).await.unwrap();
            let sync: Value = serde_json::from_str(&line).unwrap();
            assert_eq!(sync["execute"], "guest-sync-delimited");
            let token = sync["arguments"]["id"].as_u64().unwrap();
            let mut out = b"{\"return\": 1}\n\xff".to_vec();
            out.extend(json!({ "return": token }).to_string().bytes());
            out.push(b'\n');
            write.write_all(&out).await.unwrap();
        });
        answers(&socket, Duration::from_secs(5)).await.unwrap();
        agent.await.unwrap();
    }
}
