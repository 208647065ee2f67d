//! Protocol corner cases against an in-process fake QMP peer on a real Unix socket. These prove
//! the client's wire handling only; QEMU's own behaviour is proven in tests/tests/qmp_client.rs.

use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags, UnixAddr};
use qsnap_qmp::{types, ConnectOptions, Error, Qmp};
use serde_json::{json, Value};
use std::io::IoSliceMut;
use std::os::fd::{AsRawFd, RawFd};
use std::time::Duration;
use tokio::io::{AsyncWriteExt, BufReader};
use tokio::net::UnixListener;

mod common;
use common::{peer, read_cmd, reply};

#[tokio::test]
async fn out_of_order_replies_events_garbage_and_unknown_ids() {
    let (_dir, path) = peer(|mut s| async move {
        let a = read_cmd(&mut s).await;
        let b = read_cmd(&mut s).await;
        // Garbage, an unknown id and an event, then the replies in reverse order, the second
        // one split across two writes.
        s.get_mut()
            .write_all(b"this is not json\r\n")
            .await
            .unwrap();
        reply(&mut s, json!({"return": {}, "id": 999})).await;
        reply(
            &mut s,
            json!({"event": "STOP", "data": {}, "timestamp": {"seconds": 5, "microseconds": 6}}),
        )
        .await;
        reply(&mut s, json!({"return": {"name": "b"}, "id": b["id"]})).await;
        let line = json!({"return": {"name": "a"}, "id": a["id"]}).to_string();
        let (x, y) = line.split_at(7);
        s.get_mut().write_all(x.as_bytes()).await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        s.get_mut()
            .write_all(format!("{y}\r\n").as_bytes())
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_secs(5)).await;
    })
    .await;
    let qmp = Qmp::connect(path).await.unwrap();
    let mut events = qmp.events();
    let (a, b) = tokio::join!(
        qmp.execute(types::query_name {}),
        qmp.execute(types::query_name {})
    );
    assert_eq!(a.unwrap().name.as_deref(), Some("a"));
    assert_eq!(b.unwrap().name.as_deref(), Some("b"));
    let ev = events.next().await.unwrap();
    assert_eq!((ev.name.as_str(), ev.timestamp.seconds), ("STOP", 5));
}

#[tokio::test]
async fn eof_mid_reply_fails_the_pending_call() {
    let (_dir, path) = peer(|mut s| async move {
        let _ = read_cmd(&mut s).await;
        s.get_mut().write_all(b"{\"return\": {\"na").await.unwrap();
        // dropping the stream here closes it in the middle of the frame
    })
    .await;
    let qmp = Qmp::connect(path).await.unwrap();
    let err = qmp.execute(types::query_name {}).await.unwrap_err();
    match err {
        Error::Disconnected { reason } => assert!(reason.contains("middle"), "{reason}"),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn command_dropped_event_fails_that_call() {
    let (_dir, path) = peer(|mut s| async move {
        let c = read_cmd(&mut s).await;
        reply(
            &mut s,
            json!({"event": "COMMAND_DROPPED", "data": {"id": c["id"], "reason": "queue-full"},
                   "timestamp": {"seconds": 1, "microseconds": 0}}),
        )
        .await;
        tokio::time::sleep(Duration::from_secs(5)).await;
    })
    .await;
    let qmp = Qmp::connect(path).await.unwrap();
    let err = qmp.execute(types::query_status {}).await.unwrap_err();
    assert!(
        matches!(&err, Error::CommandDropped { reason, .. } if reason == "queue-full"),
        "{err:?}"
    );
}

#[tokio::test]
async fn reply_of_the_wrong_shape_is_a_decode_error_with_the_raw_reply() {
    let (_dir, path) = peer(|mut s| async move {
        let c = read_cmd(&mut s).await;
        reply(&mut s, json!({"return": {"running": "yes"}, "id": c["id"]})).await;
        tokio::time::sleep(Duration::from_secs(5)).await;
    })
    .await;
    let qmp = Qmp::connect(path).await.unwrap();
    match qmp.execute(types::query_status {}).await.unwrap_err() {
        Error::Decode { command, reply, .. } => {
            assert_eq!(command, "query-status");
            assert_eq!(reply["running"], "yes");
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn no_greeting_is_a_timeout_not_a_hang() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("silent.sock");
    let listener = UnixListener::bind(&path).unwrap();
    tokio::spawn(async move {
        let _held = listener.accept().await.unwrap();
        tokio::time::sleep(Duration::from_secs(10)).await;
    });
    let opts = ConnectOptions {
        greeting_timeout: Duration::from_millis(200),
        ..ConnectOptions::default()
    };
    let err = Qmp::connect_with(path, &opts).await.unwrap_err();
    assert!(matches!(err, Error::GreetingTimeout { .. }), "{err:?}");
}

#[tokio::test]
async fn descriptor_arrives_with_the_command_that_consumes_it() {
    let (tx, rx) = tokio::sync::oneshot::channel::<(Value, RawFd)>();
    let (_dir, path) = peer(|s| async move {
        let stream = s.into_inner();
        stream.readable().await.unwrap();
        let mut buf = vec![0u8; 4096];
        let mut cmsg = nix::cmsg_space!([RawFd; 1]);
        let (n, fd) = {
            let mut iov = [IoSliceMut::new(&mut buf)];
            let msg = recvmsg::<UnixAddr>(
                stream.as_raw_fd(),
                &mut iov,
                Some(&mut cmsg),
                MsgFlags::empty(),
            )
            .unwrap();
            let fd = msg
                .cmsgs()
                .unwrap()
                .find_map(|c| match c {
                    ControlMessageOwned::ScmRights(fds) => fds.first().copied(),
                    _ => None,
                })
                .expect("a descriptor came with the command bytes");
            (msg.bytes, fd)
        };
        let cmd: Value = serde_json::from_slice(&buf[..n]).unwrap();
        let mut s = BufReader::new(stream);
        reply(
            &mut s,
            json!({"return": {"fd": 7, "fdset-id": 3}, "id": cmd["id"]}),
        )
        .await;
        let _ = tx.send((cmd, fd));
        tokio::time::sleep(Duration::from_secs(5)).await;
    })
    .await;
    let qmp = Qmp::connect(path).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let ours = dir.path().join("f");
    let file = std::fs::File::create(&ours).unwrap();
    let info = qmp.add_fd(&file, None, Some("x")).await.unwrap();
    assert_eq!((info.fd, info.fdset_id), (7, 3));
    let (cmd, fd) = rx.await.unwrap();
    assert_eq!(cmd["execute"], "add-fd");
    assert_eq!(cmd["arguments"]["opaque"], "x");
    // The received descriptor names our file (without unsafe: look it up in /proc).
    let target = std::fs::read_link(format!("/proc/self/fd/{fd}")).unwrap();
    assert_eq!(target, ours.canonicalize().unwrap());
    nix::unistd::close(fd).unwrap();
}

#[tokio::test]
async fn a_reply_too_deep_to_read_fails_its_call_at_once() {
    let (_dir, path) = peer(|mut s| async move {
        let c = read_cmd(&mut s).await;
        let depth = qsnap_qmp::codec::MAX_DEPTH + 10;
        let line = format!(
            "{{\"return\": {}1{}, \"id\": {}}}\r\n",
            "[".repeat(depth),
            "]".repeat(depth),
            c["id"]
        );
        s.get_mut().write_all(line.as_bytes()).await.unwrap();
        tokio::time::sleep(Duration::from_secs(30)).await;
    })
    .await;
    let qmp = Qmp::connect(path).await.unwrap();
    let started = std::time::Instant::now();
    let err = qmp.execute(types::query_name {}).await.unwrap_err();
    match &err {
        Error::Unreadable { command, reason } => {
            assert_eq!(command, "query-name");
            assert!(reason.contains("levels deep"), "{reason}");
        }
        other => panic!("{other:?}"),
    }
    // not after the command's timeout: at once
    assert!(started.elapsed() < Duration::from_secs(5), "{err}");
}
