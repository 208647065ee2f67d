//! Reaching a QMP endpoint: Unix socket or TCP, with a bounded retry while QEMU is still
//! creating its socket. Opens the transport only; the QMP handshake lives in `client`.

use crate::error::{Error, Result};
use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::net::{TcpStream, UnixStream};

/// Where QEMU's monitor listens (`-qmp unix:PATH,server=on,wait=off` or `-qmp tcp:HOST:PORT,…`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// A Unix socket path. The only transport that can pass file descriptors.
    Unix(PathBuf),
    /// A TCP `host:port`.
    Tcp(String),
}

impl Endpoint {
    /// Parses `unix:PATH`, `tcp:HOST:PORT`, or a bare path.
    pub fn parse(s: &str) -> Endpoint {
        if let Some(addr) = s.strip_prefix("tcp:") {
            Endpoint::Tcp(addr.to_owned())
        } else {
            Endpoint::Unix(PathBuf::from(s.strip_prefix("unix:").unwrap_or(s)))
        }
    }
}

impl From<&str> for Endpoint {
    fn from(s: &str) -> Self {
        Endpoint::parse(s)
    }
}

impl From<&Path> for Endpoint {
    fn from(p: &Path) -> Self {
        Endpoint::Unix(p.to_owned())
    }
}

impl From<PathBuf> for Endpoint {
    fn from(p: PathBuf) -> Self {
        Endpoint::Unix(p)
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Endpoint::Unix(p) => write!(f, "{}", p.display()),
            Endpoint::Tcp(a) => write!(f, "tcp:{a}"),
        }
    }
}

pub(crate) enum Transport {
    Unix(UnixStream),
    Tcp(TcpStream),
}

/// Errors that mean "not there yet": the socket file is missing, nobody listens yet, or the
/// listen queue is full (QEMU accepts one monitor client at a time; clients that gave up
/// waiting stay queued until it gets to them, and a full queue answers EAGAIN).
fn is_transient(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused | io::ErrorKind::WouldBlock
    )
}

/// How long one TCP connect may take: a host that drops SYNs would otherwise hold the caller
/// for the kernel's two minutes.
const TCP_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Connects, retrying transient failures every 50 ms until `retry_for` has passed.
pub(crate) async fn open(endpoint: &Endpoint, retry_for: Duration) -> Result<Transport> {
    let deadline = tokio::time::Instant::now() + retry_for;
    loop {
        let attempt = match endpoint {
            Endpoint::Unix(path) => UnixStream::connect(path).await.map(Transport::Unix),
            Endpoint::Tcp(addr) => {
                match tokio::time::timeout(TCP_CONNECT_TIMEOUT, TcpStream::connect(addr.as_str()))
                    .await
                {
                    Ok(r) => r.map(Transport::Tcp),
                    Err(_) => Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!("no answer within {TCP_CONNECT_TIMEOUT:?}"),
                    )),
                }
            }
        };
        match attempt {
            Ok(t) => return Ok(t),
            Err(e) if is_transient(&e) && tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => {
                if let Endpoint::Unix(path) = endpoint {
                    let not_socket = match tokio::fs::metadata(path).await {
                        Ok(m) => !std::os::unix::fs::FileTypeExt::is_socket(&m.file_type()),
                        Err(_) => false,
                    };
                    if not_socket {
                        return Err(Error::NotASocket { path: path.clone() });
                    }
                }
                return Err(Error::Connect {
                    endpoint: endpoint.to_string(),
                    io: e,
                });
            }
        }
    }
}
