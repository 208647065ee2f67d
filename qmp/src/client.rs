//! The QMP client: handshake, id-matched commands, events, disconnect handling.
//!
//! One reader task owns the read half of the socket: it routes replies by `id` to the waiting
//! call and fans events out to subscribers. One writer task owns the write half, so a command
//! line (and the descriptor riding with it) is written whole even when the caller's future is
//! dropped half-way. When the socket closes, the reader fails every pending call and ends every
//! event subscription with [`Error::Disconnected`]: nothing waits forever.
//!
//! This module must never interpret what a command means; typed commands and probing sit on top.
//!
//! ```text
//! caller ──execute──▶ pending[id] ─▶ writer task ──line(+fd)──▶ QEMU
//! caller ◀──oneshot── reader task ◀────────reply/event──────────┘
//!                         └──broadcast──▶ EventStream(s)
//! ```

use crate::codec::{encode_command, Frame, Greeting, QmpCodec};
use crate::connect::{self, Endpoint, Transport};
use crate::error::{Error, Result};
use crate::events::EventStream;
use crate::probe::Schema;
use crate::session::{Pending, Shared, State};
use crate::transcript::Transcript;
use futures::StreamExt;
use nix::sys::socket::Shutdown;
use qapi_spec::Command;
use serde_json::Value;
use std::collections::HashMap;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncWriteExt};
use tokio::sync::{broadcast, mpsc, oneshot, OnceCell};
use tokio::task::JoinHandle;
use tokio_util::codec::FramedRead;
use tracing::{debug, trace, Instrument};

/// How a connection is made and how long things may take.
#[derive(Debug, Clone)]
pub struct ConnectOptions {
    /// How long to keep retrying while the socket does not exist or refuses (QEMU starting).
    pub connect_retry: Duration,
    /// How long to wait for QEMU's greeting once connected.
    pub greeting_timeout: Duration,
    /// Default timeout of each command.
    pub command_timeout: Duration,
    /// Enable QMP out-of-band execution when the server offers it.
    pub enable_oob: bool,
    /// How many recent wire lines to keep for [`Qmp::transcript`] (0: none).
    pub transcript_lines: usize,
    /// Capacity of each event subscription before a slow subscriber starts losing events.
    pub event_buffer: usize,
}

impl Default for ConnectOptions {
    fn default() -> Self {
        Self {
            connect_retry: Duration::from_secs(5),
            greeting_timeout: Duration::from_secs(5),
            command_timeout: Duration::from_secs(30),
            enable_oob: true,
            transcript_lines: 200,
            event_buffer: 4096,
        }
    }
}

enum WriteHalf {
    Unix(tokio::net::unix::OwnedWriteHalf),
    Tcp(tokio::net::tcp::OwnedWriteHalf),
}

impl WriteHalf {
    async fn write(&mut self, bytes: &[u8], fd: Option<&OwnedFd>) -> std::io::Result<()> {
        match (self, fd) {
            (WriteHalf::Unix(w), Some(fd)) => crate::fd::write_with_fd(w, bytes, fd).await,
            (WriteHalf::Unix(w), None) => w.write_all(bytes).await,
            (WriteHalf::Tcp(w), None) => w.write_all(bytes).await,
            (WriteHalf::Tcp(_), Some(_)) => Err(std::io::Error::new(
                std::io::ErrorKind::Unsupported,
                "descriptors cannot travel over TCP",
            )),
        }
    }
}

struct WriteRequest {
    line: Vec<u8>,
    fd: Option<OwnedFd>,
    done: oneshot::Sender<std::io::Result<()>>,
}

/// A connected, negotiated QMP session.
///
/// All methods take `&self`: many commands may be in flight at once from different tasks
/// (wrap it in an `Arc` to share it). Dropping it closes the connection, which frees QEMU's
/// monitor for its next client.
pub struct Qmp {
    shared: Arc<Shared>,
    greeting: Greeting,
    oob: bool,
    is_unix: bool,
    next_id: AtomicU64,
    command_timeout: Duration,
    writer: mpsc::Sender<WriteRequest>,
    reader: JoinHandle<()>,
    schema: OnceCell<Arc<Schema>>,
    /// A duplicate of the socket, so that dropping the client closes the connection at once,
    /// even when the runtime does not get to run the aborted tasks soon (QEMU serves the next
    /// monitor client only when this one is gone).
    socket: OwnedFd,
}

impl Drop for Qmp {
    fn drop(&mut self) {
        self.shared.close("the QMP client was dropped");
        let _ = nix::sys::socket::shutdown(self.socket.as_raw_fd(), Shutdown::Both);
        self.reader.abort();
    }
}

impl std::fmt::Debug for Qmp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Qmp")
            .field("endpoint", &self.shared.endpoint)
            .field("qemu", &self.greeting.version.qemu)
            .field("oob", &self.oob)
            .finish()
    }
}

impl Qmp {
    /// Connects with default options. `endpoint` may be a path, `unix:PATH` or `tcp:HOST:PORT`.
    pub async fn connect(endpoint: impl Into<Endpoint>) -> Result<Qmp> {
        Self::connect_with(endpoint, &ConnectOptions::default()).await
    }

    /// Connects, reads the greeting and negotiates capabilities.
    pub async fn connect_with(endpoint: impl Into<Endpoint>, opts: &ConnectOptions) -> Result<Qmp> {
        let endpoint = endpoint.into();
        let name = endpoint.to_string();
        let span = tracing::debug_span!("qmp_connect", endpoint = %name);
        async move {
            match connect::open(&endpoint, opts.connect_retry).await? {
                Transport::Unix(s) => {
                    let dup = s
                        .as_fd()
                        .try_clone_to_owned()
                        .map_err(|e| connect_err(&name, e))?;
                    let (r, w) = s.into_split();
                    Self::handshake(name, r, WriteHalf::Unix(w), dup, opts).await
                }
                Transport::Tcp(s) => {
                    let dup = s
                        .as_fd()
                        .try_clone_to_owned()
                        .map_err(|e| connect_err(&name, e))?;
                    let (r, w) = s.into_split();
                    Self::handshake(name, r, WriteHalf::Tcp(w), dup, opts).await
                }
            }
        }
        .instrument(span)
        .await
    }

    async fn handshake<R: AsyncRead + Unpin + Send + 'static>(
        endpoint: String,
        read: R,
        mut write: WriteHalf,
        socket: OwnedFd,
        opts: &ConnectOptions,
    ) -> Result<Qmp> {
        let is_unix = matches!(write, WriteHalf::Unix(_));
        let transcript = Transcript::new(opts.transcript_lines);
        let mut frames = FramedRead::new(read, QmpCodec::default());
        let handshake_err = |reason: String| Error::Handshake {
            endpoint: endpoint.clone(),
            reason,
        };

        let greeting = match tokio::time::timeout(opts.greeting_timeout, frames.next()).await {
            Err(_) => {
                return Err(Error::GreetingTimeout {
                    endpoint: endpoint.clone(),
                    waited: opts.greeting_timeout,
                })
            }
            Ok(None) => return Err(handshake_err("closed before the greeting".into())),
            Ok(Some(Err(e))) => return Err(handshake_err(format!("reading the greeting: {e}"))),
            Ok(Some(Ok(Frame::Greeting(g)))) => {
                transcript.push("<-", || Frame::Greeting(g.clone()).to_string());
                g
            }
            Ok(Some(Ok(other))) => {
                return Err(handshake_err(format!("expected a greeting, got {other}")))
            }
        };
        debug!(qemu = %greeting.version.qemu, caps = ?greeting.capabilities, "QMP greeting");

        let oob = opts.enable_oob && greeting.capabilities.iter().any(|c| c == "oob");
        let args = oob.then(|| serde_json::json!({ "enable": ["oob"] }));
        let line = encode_command("qmp_capabilities", args.as_ref(), 0, false);
        transcript.push("->", || {
            String::from_utf8_lossy(&line).trim_end().to_owned()
        });
        write
            .write(&line, None)
            .await
            .map_err(|e| handshake_err(format!("sending qmp_capabilities: {e}")))?;
        let deadline = tokio::time::Instant::now() + opts.greeting_timeout;
        loop {
            let frame = match tokio::time::timeout_at(deadline, frames.next()).await {
                Err(_) => return Err(handshake_err("no answer to qmp_capabilities".into())),
                Ok(None) => return Err(handshake_err("closed during negotiation".into())),
                Ok(Some(Err(e))) => return Err(handshake_err(e.to_string())),
                Ok(Some(Ok(f))) => f,
            };
            transcript.push("<-", || frame.to_string());
            match frame {
                Frame::Return { .. } => break,
                Frame::Error { class, desc, .. } => {
                    return Err(handshake_err(format!("qmp_capabilities: {desc} ({class})")))
                }
                _ => continue,
            }
        }

        let (events, _) = broadcast::channel(opts.event_buffer.max(16));
        let shared = Arc::new(Shared {
            endpoint: endpoint.clone(),
            state: Mutex::new(State {
                pending: HashMap::new(),
                closed: None,
                events: Some(events),
            }),
            transcript,
        });
        let (wtx, wrx) = mpsc::channel(64);
        tokio::spawn(writer_task(write, wrx));
        let reader = tokio::spawn(reader_task(frames, shared.clone()));
        Ok(Qmp {
            shared,
            greeting,
            oob,
            is_unix,
            next_id: AtomicU64::new(1),
            command_timeout: opts.command_timeout,
            writer: wtx,
            reader,
            schema: OnceCell::new(),
            socket,
        })
    }

    /// QEMU's greeting (version and offered capabilities).
    pub fn greeting(&self) -> &Greeting {
        &self.greeting
    }

    /// True when out-of-band execution was negotiated.
    pub fn oob_enabled(&self) -> bool {
        self.oob
    }

    /// The endpoint this client is connected to.
    pub fn endpoint(&self) -> &str {
        &self.shared.endpoint
    }

    /// The pid of the process serving a Unix socket (QEMU), from the socket's peer credentials.
    /// `None` for TCP or when the kernel does not say.
    pub fn peer_pid(&self) -> Option<u32> {
        if !self.is_unix {
            return None;
        }
        nix::sys::socket::getsockopt(&self.socket, nix::sys::socket::sockopt::PeerCredentials)
            .ok()
            .and_then(|c| u32::try_from(c.pid()).ok())
            .filter(|&pid| pid > 0)
    }

    /// The uid the process serving a Unix socket ran as when it opened the socket, from the
    /// peer credentials. `None` for TCP.
    pub fn peer_uid(&self) -> Option<u32> {
        if !self.is_unix {
            return None;
        }
        nix::sys::socket::getsockopt(&self.socket, nix::sys::socket::sockopt::PeerCredentials)
            .ok()
            .map(|c| c.uid())
    }

    /// False once the connection has closed.
    pub fn is_connected(&self) -> bool {
        self.shared.lock().closed.is_none()
    }

    /// The last lines sent (`->`) and received (`<-`), oldest first.
    pub fn transcript(&self) -> Vec<String> {
        self.shared.transcript.snapshot()
    }

    /// Subscribes to events. Subscribe before issuing the command whose events you await.
    pub fn events(&self) -> EventStream {
        let rx = match &self.shared.lock().events {
            Some(tx) => tx.subscribe(),
            None => broadcast::channel(1).1, // closed: the first read reports Disconnected
        };
        EventStream::new(rx, self.shared.clone())
    }

    /// Runs a typed command (e.g. `qapi_qmp::query_status {}`) with the default timeout.
    pub async fn execute<C: Command>(&self, command: C) -> Result<C::Ok> {
        self.execute_opts(command, None, self.command_timeout, false)
            .await
    }

    /// Runs a typed command with its own timeout.
    pub async fn execute_timeout<C: Command>(
        &self,
        command: C,
        timeout: Duration,
    ) -> Result<C::Ok> {
        self.execute_opts(command, None, timeout, false).await
    }

    /// Runs a typed command out of band (`exec-oob`) when OOB was negotiated and the command
    /// allows it; in band otherwise.
    pub async fn execute_oob<C: Command>(&self, command: C) -> Result<C::Ok> {
        let oob = self.oob && C::ALLOW_OOB;
        self.execute_opts(command, None, self.command_timeout, oob)
            .await
    }

    /// Runs a typed command with a file descriptor attached (`getfd`, `add-fd`). QEMU gets its
    /// own copy of the descriptor; the caller's stays open.
    pub async fn execute_with_fd<C: Command>(
        &self,
        command: C,
        fd: BorrowedFd<'_>,
    ) -> Result<C::Ok> {
        self.execute_opts(command, Some(fd), self.command_timeout, false)
            .await
    }

    /// Runs any command by name with raw JSON arguments: the escape hatch for commands newer
    /// than the bundled schema. `arguments` must be a JSON object or `None`.
    pub async fn execute_raw(&self, name: &str, arguments: Option<Value>) -> Result<Value> {
        self.call(name, arguments, None, self.command_timeout, false)
            .await
    }

    /// [`Qmp::execute_raw`] with its own timeout.
    pub async fn execute_raw_timeout(
        &self,
        name: &str,
        arguments: Option<Value>,
        timeout: Duration,
    ) -> Result<Value> {
        self.call(name, arguments, None, timeout, false).await
    }

    async fn execute_opts<C: Command>(
        &self,
        command: C,
        fd: Option<BorrowedFd<'_>>,
        timeout: Duration,
        oob: bool,
    ) -> Result<C::Ok> {
        let args = match serde_json::to_value(&command) {
            Ok(Value::Object(m)) if m.is_empty() => None,
            Ok(v @ Value::Object(_)) => Some(v),
            Ok(Value::Null) => None,
            Ok(other) => {
                return Err(Error::Encode {
                    command: C::NAME.into(),
                    reason: format!("arguments are not an object: {other}"),
                })
            }
            Err(e) => {
                return Err(Error::Encode {
                    command: C::NAME.into(),
                    reason: e.to_string(),
                })
            }
        };
        let reply = self.call(C::NAME, args, fd, timeout, oob).await?;
        serde_json::from_value(reply.clone()).map_err(|json| Error::Decode {
            command: C::NAME.into(),
            json,
            reply,
        })
    }

    async fn call(
        &self,
        name: &str,
        arguments: Option<Value>,
        fd: Option<BorrowedFd<'_>>,
        timeout: Duration,
        oob: bool,
    ) -> Result<Value> {
        if fd.is_some() && !self.is_unix {
            return Err(Error::FdPassingUnsupported {
                command: name.into(),
            });
        }
        let fd = fd
            .map(|fd| fd.try_clone_to_owned())
            .transpose()
            .map_err(|io| Error::Send {
                command: name.into(),
                io,
            })?;
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let line = encode_command(name, arguments.as_ref(), id, oob);
        let span = tracing::debug_span!("qmp", command = name, id);
        async move {
            let (tx, rx) = oneshot::channel();
            {
                let mut st = self.shared.lock();
                if let Some(reason) = &st.closed {
                    return Err(Error::Disconnected {
                        reason: reason.clone(),
                    });
                }
                st.pending.insert(
                    id,
                    Pending {
                        command: name.to_owned(),
                        reply: tx,
                    },
                );
            }
            // Forget the entry if this future is dropped or times out.
            let _guard = PendingGuard {
                shared: &self.shared,
                id,
            };
            trace!(line = %String::from_utf8_lossy(&line).trim_end(), "->");
            self.shared.transcript.push("->", || {
                String::from_utf8_lossy(&line).trim_end().to_owned()
            });
            let (done_tx, done_rx) = oneshot::channel();
            let request = WriteRequest {
                line,
                fd,
                done: done_tx,
            };
            let started = Instant::now();
            // The send is inside the deadline too: a QEMU that stopped reading its socket
            // fills the writer's queue, and a caller must not wait for it forever.
            let outcome = tokio::time::timeout(timeout, async {
                if self.writer.send(request).await.is_err() {
                    return Err(self.shared.disconnected_error());
                }
                match done_rx.await {
                    Ok(Ok(())) => {}
                    // QEMU went away before the command was written: the connection is gone,
                    // like one whose reply never comes (a SIGKILLed QEMU ends in either).
                    Ok(Err(source))
                        if matches!(
                            source.kind(),
                            std::io::ErrorKind::BrokenPipe
                                | std::io::ErrorKind::ConnectionReset
                                | std::io::ErrorKind::NotConnected
                        ) =>
                    {
                        self.shared
                            .close(&format!("QEMU closed the connection ({source})"));
                        return Err(self.shared.disconnected_error());
                    }
                    Ok(Err(io)) => {
                        return Err(Error::Send {
                            command: name.into(),
                            io,
                        })
                    }
                    Err(_) => return Err(self.shared.disconnected_error()),
                }
                match rx.await {
                    Ok(result) => result,
                    Err(_) => Err(self.shared.disconnected_error()),
                }
            })
            .await;
            let result = outcome.unwrap_or_else(|_| {
                Err(Error::Timeout {
                    command: name.into(),
                    after: timeout,
                })
            });
            debug!(
                elapsed_us = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX),
                ok = result.is_ok(),
                "done"
            );
            result
        }
        .instrument(span)
        .await
    }

    /// The schema of this QEMU (`query-qmp-schema`), fetched once per connection.
    pub async fn schema(&self) -> Result<Arc<Schema>> {
        self.schema
            .get_or_try_init(|| async {
                let raw = self.execute_raw("query-qmp-schema", None).await?;
                Schema::from_value(raw).map(Arc::new)
            })
            .await
            .cloned()
    }

    /// Waits until the connection closes (QEMU quit or the socket broke); returns why.
    pub async fn closed(&self) -> Arc<str> {
        let mut events = self.events();
        loop {
            if let Err(Error::Disconnected { reason }) = events.next().await {
                return reason;
            }
        }
    }
}

fn connect_err(endpoint: &str, io: std::io::Error) -> Error {
    Error::Connect {
        endpoint: endpoint.to_owned(),
        io,
    }
}

struct PendingGuard<'a> {
    shared: &'a Shared,
    id: u64,
}

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        self.shared.lock().pending.remove(&self.id);
    }
}

async fn writer_task(mut write: WriteHalf, mut requests: mpsc::Receiver<WriteRequest>) {
    while let Some(req) = requests.recv().await {
        let result = write.write(&req.line, req.fd.as_ref()).await;
        drop(req.fd); // QEMU holds its own copy now
        let _ = req.done.send(result);
    }
}

async fn reader_task<R: AsyncRead + Unpin>(
    mut frames: FramedRead<R, QmpCodec>,
    shared: Arc<Shared>,
) {
    let reason = loop {
        match frames.next().await {
            Some(Ok(frame)) => {
                trace!(line = %frame, "<-");
                shared.transcript.push("<-", || frame.to_string());
                shared.dispatch(frame);
            }
            Some(Err(e)) => break format!("read error: {e}"),
            None => break "QEMU closed the connection (did it exit?)".to_owned(),
        }
    };
    shared.close(&reason);
}
