//! Every wait of the client is bounded: a peer that stops reading, a host that drops SYNs and a
//! listener that never greets all end in an error, not a hang. Also: connect and send errors
//! name the underlying I/O error. In-process fake peers on real sockets, like fake_peer.rs.

use futures::future::join_all;
use qsnap_qmp::{ConnectOptions, Error, Qmp};
use serde_json::json;
use std::time::{Duration, Instant};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::oneshot;
use tokio::time::timeout;

mod common;
use common::{peer, SETUP};

/// A peer that completes the handshake and then never reads its socket again (a wedged QEMU):
/// the writer task blocks in `write_all`, its 64-slot queue fills, and further calls used to
/// wait in `send` forever. Every call must end with its own timeout.
///
/// The first call carries a 1 MiB argument, far more than a socket buffer holds (208 KiB by
/// default), and is queued before the others, so the writer is stuck on it whatever the others
/// carry. The other 99 carry 1 KiB each: encoding 1 MiB of JSON takes about 70 ms in a debug
/// build, and 100 of them would make this test take seconds for nothing.
#[tokio::test]
async fn peer_that_stops_reading_times_out_every_call_even_with_a_full_queue() {
    // The peer keeps the socket open (unread) until the test ends and drops `_hold`.
    let (_hold, release) = oneshot::channel::<()>();
    let (_dir, path) = peer(|s| async move {
        let _ = release.await;
        drop(s);
    })
    .await;
    let qmp = timeout(SETUP, Qmp::connect(path)).await.unwrap().unwrap();

    const CALLS: usize = 100; // more than the writer's queue (64) plus the one being written
    const PER_CALL: Duration = Duration::from_millis(500);
    let started = Instant::now();
    // Poll the big call once: its line is then first in the writer's queue.
    let mut big = Box::pin(qmp.execute_raw_timeout(
        "x-big",
        Some(json!({ "blob": "x".repeat(1 << 20) })),
        PER_CALL,
    ));
    assert!(futures::poll!(big.as_mut()).is_pending());
    let small = "y".repeat(1 << 10);
    let rest = (1..CALLS).map(|_| {
        qmp.execute_raw_timeout("x-big", Some(json!({ "blob": small.clone() })), PER_CALL)
    });
    let (first, others) = timeout(
        Duration::from_secs(20),
        futures::future::join(big, join_all(rest)),
    )
    .await
    .expect("calls hung behind a peer that stopped reading");
    let elapsed = started.elapsed();

    let results: Vec<_> = std::iter::once(first).chain(others).collect();
    assert_eq!(results.len(), CALLS);
    for (i, r) in results.into_iter().enumerate() {
        match r {
            Err(Error::Timeout { command, after }) => {
                assert_eq!(command, "x-big", "call {i}");
                assert_eq!(after, PER_CALL, "call {i}");
            }
            other => panic!("call {i}: expected Error::Timeout, got {other:?}"),
        }
    }
    // The calls run concurrently, so together they take about one timeout, not 100.
    assert!(elapsed < Duration::from_secs(5), "took {elapsed:?}");
    // A timeout does not close the connection.
    assert!(qmp.is_connected());
}

/// An unroutable address: where packets to it are dropped, only the 5 s per-attempt bound ends
/// the connect (the kernel alone would take about two minutes). Where the network rejects it at
/// once (no route), the connect fails at once; either way it ends in time. This depends on the
/// network it runs on; the test below builds a black hole locally.
#[tokio::test]
async fn tcp_connect_to_an_unroutable_address_ends_in_time() {
    let opts = ConnectOptions {
        connect_retry: Duration::ZERO,
        greeting_timeout: Duration::from_secs(1),
        ..Default::default()
    };
    let result = timeout(
        Duration::from_secs(10),
        Qmp::connect_with("tcp:10.255.255.1:4444", &opts),
    )
    .await
    .expect("TCP connect to a black hole was not bounded");
    let err = result.expect_err("10.255.255.1:4444 answered QMP");
    // Where a transparent proxy accepts every TCP connect (as in some sandboxes), the connect
    // succeeds and the greeting timeout ends it instead: still bounded.
    assert!(
        matches!(
            err,
            Error::Connect { .. } | Error::GreetingTimeout { .. } | Error::Handshake { .. }
        ),
        "{err:?}"
    );
}

/// A local black hole that does not depend on the network: a listener whose accept queue is
/// full drops new SYNs, so a connect to it hangs until something gives up. The client must give
/// up after its per-attempt bound (5 s) with a `TimedOut` connect error.
#[tokio::test]
async fn tcp_connect_to_a_host_dropping_syns_times_out_after_the_per_attempt_bound() {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let listener = socket.listen(0).unwrap(); // never accepted: the queue fills at once
    let addr = listener.local_addr().unwrap();

    // Fill the accept queue: connect until a connect does not complete promptly.
    let mut fillers: Vec<TcpStream> = Vec::new();
    let mut full = false;
    for _ in 0..16 {
        match timeout(Duration::from_millis(300), TcpStream::connect(addr)).await {
            Ok(Ok(s)) => fillers.push(s),
            Ok(Err(e)) => panic!("filler connect failed: {e}"),
            Err(_) => {
                full = true;
                break;
            }
        }
    }
    assert!(
        full,
        "the accept queue never filled ({} fillers)",
        fillers.len()
    );

    let opts = ConnectOptions {
        connect_retry: Duration::ZERO,
        ..Default::default()
    };
    let started = Instant::now();
    let result = timeout(
        Duration::from_secs(10),
        Qmp::connect_with(format!("tcp:{addr}").as_str(), &opts),
    )
    .await
    .expect("TCP connect to a host dropping SYNs was not bounded");
    let elapsed = started.elapsed();
    match result {
        Err(Error::Connect { endpoint, io }) => {
            assert_eq!(endpoint, format!("tcp:{addr}"));
            assert_eq!(io.kind(), std::io::ErrorKind::TimedOut, "{io}");
        }
        other => panic!("expected Error::Connect (timed out), got {other:?}"),
    }
    // It really waited for the bound: the SYN was dropped, not refused.
    assert!(elapsed >= Duration::from_secs(4), "ended after {elapsed:?}");
    drop(fillers);
}

/// A TCP listener that accepts but never greets (e.g. the monitor is held by another client):
/// the connect ends with `GreetingTimeout` after the greeting timeout.
#[tokio::test]
async fn tcp_listener_that_never_greets_is_a_greeting_timeout() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (_hold, release) = oneshot::channel::<()>();
    tokio::spawn(async move {
        let accepted = timeout(SETUP, listener.accept()).await;
        let _ = release.await; // keep the connection open, silent, until the test ends
        drop(accepted);
    });

    const GREETING_TIMEOUT: Duration = Duration::from_millis(300);
    let opts = ConnectOptions {
        connect_retry: Duration::ZERO,
        greeting_timeout: GREETING_TIMEOUT,
        ..Default::default()
    };
    let started = Instant::now();
    let result = timeout(
        Duration::from_secs(5),
        Qmp::connect_with(format!("tcp:{addr}").as_str(), &opts),
    )
    .await
    .expect("a silent TCP peer made connect hang");
    let elapsed = started.elapsed();
    match result {
        Err(Error::GreetingTimeout { endpoint, waited }) => {
            assert_eq!(endpoint, format!("tcp:{addr}"));
            assert_eq!(waited, GREETING_TIMEOUT);
        }
        other => panic!("expected Error::GreetingTimeout, got {other:?}"),
    }
    assert!(elapsed >= GREETING_TIMEOUT, "ended after {elapsed:?}");
    assert!(elapsed < Duration::from_secs(3), "ended after {elapsed:?}");
}

/// `Error::Connect` says why: the path and the OS error text.
#[tokio::test]
async fn connect_error_message_names_the_path_and_the_os_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("missing.sock");
    let opts = ConnectOptions {
        connect_retry: Duration::ZERO,
        ..Default::default()
    };
    let err = timeout(SETUP, Qmp::connect_with(path.as_path(), &opts))
        .await
        .expect("connect to a missing socket hung")
        .expect_err("a missing socket connected");
    assert!(matches!(err, Error::Connect { .. }), "{err:?}");
    let msg = err.to_string();
    let enoent = std::io::Error::from(nix::errno::Errno::ENOENT).to_string();
    assert!(msg.contains(&path.display().to_string()), "{msg}");
    assert!(msg.contains(&enoent), "{msg:?} lacks {enoent:?}");
    assert!(msg.contains("No such file"), "{msg}");
}

/// A write that fails because QEMU is gone (EPIPE: here a peer that shut down its receiving
/// side, so the client's reader sees no end of file) ends the connection: the call fails as
/// `Disconnected`, like one whose reply never comes, and the reason carries the OS error text.
/// (A QEMU SIGKILLed before the writer reached the socket ends this way; callers that check
/// `is_disconnected` must not see a different error for it.)
#[tokio::test]
async fn a_write_to_a_gone_peer_is_a_disconnect_naming_the_os_error() {
    let (ready_tx, ready) = oneshot::channel::<()>();
    let (_hold, release) = oneshot::channel::<()>();
    let (_dir, path) = peer(|s| async move {
        let stream = s.into_inner();
        nix::sys::socket::shutdown(
            std::os::fd::AsRawFd::as_raw_fd(&stream),
            nix::sys::socket::Shutdown::Read,
        )
        .unwrap();
        let _ = ready_tx.send(());
        let _ = release.await; // keep the write side open: the client must not see EOF
        drop(stream);
    })
    .await;
    let qmp = timeout(SETUP, Qmp::connect(path)).await.unwrap().unwrap();
    timeout(SETUP, ready).await.unwrap().unwrap();

    let err = timeout(
        SETUP,
        qmp.execute_raw_timeout("query-status", None, Duration::from_secs(3)),
    )
    .await
    .expect("the call hung")
    .expect_err("a write to a peer that shut down reading succeeded");
    assert!(err.is_disconnected(), "{err:?}");
    let msg = err.to_string();
    let epipe = std::io::Error::from(nix::errno::Errno::EPIPE).to_string();
    assert!(msg.contains(&epipe), "{msg:?} lacks {epipe:?}");
    assert!(!qmp.is_connected());
    let again = qmp.execute_raw("query-status", None).await.unwrap_err();
    assert!(again.is_disconnected(), "{again:?}");
}
