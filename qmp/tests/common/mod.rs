//! The in-process fake QMP peer the wire tests share: a real Unix socket, QEMU's greeting and
//! handshake, then a script of the test's own. Every set-up wait is bounded.
#![allow(dead_code)] // each test binary uses part of this

use serde_json::{json, Value};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::time::timeout;

/// What QEMU 10 says first (offering out-of-band execution).
pub const GREETING: &str = r#"{"QMP": {"version": {"qemu": {"micro": 0, "minor": 0, "major": 10}, "package": ""}, "capabilities": ["oob"]}}"#;

/// Upper bound of any single wait in the fake peer's set-up.
pub const SETUP: Duration = Duration::from_secs(5);

/// Accepts one client, sends the greeting, answers `qmp_capabilities` (checking that the
/// client asked for OOB, which it was offered), then hands the stream to `script`.
pub async fn peer<F, Fut>(script: F) -> (tempfile::TempDir, std::path::PathBuf)
where
    F: FnOnce(BufReader<UnixStream>) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("fake.sock");
    let listener = UnixListener::bind(&path).unwrap();
    tokio::spawn(async move {
        let (stream, _) = timeout(SETUP, listener.accept()).await.unwrap().unwrap();
        let mut s = BufReader::new(stream);
        s.get_mut()
            .write_all(format!("{GREETING}\r\n").as_bytes())
            .await
            .unwrap();
        let caps = timeout(SETUP, read_cmd(&mut s)).await.unwrap();
        assert_eq!(caps["execute"], "qmp_capabilities");
        assert_eq!(caps["arguments"]["enable"], json!(["oob"]));
        reply(&mut s, json!({"return": {}, "id": caps["id"]})).await;
        script(s).await;
    });
    (dir, path)
}

/// Reads one command line from the client.
pub async fn read_cmd(s: &mut BufReader<UnixStream>) -> Value {
    let mut line = String::new();
    s.read_line(&mut line).await.unwrap();
    serde_json::from_str(&line).unwrap()
}

/// Sends one line to the client.
pub async fn reply(s: &mut BufReader<UnixStream>, v: Value) {
    s.get_mut()
        .write_all(format!("{v}\r\n").as_bytes())
        .await
        .unwrap();
}
