//! Running external programs (`qemu-img`, `qemu-system-* -machine help`) the way every call
//! must: bounded by a deadline, stopped by cancellation (Ctrl-C), killed rather than left
//! behind when either happens, and with what the program said kept for the error.
//!
//! Nothing here knows what the programs do; `image.rs` and `launch/` build the commands.

use crate::error::{Error, Result};
use std::path::Path;
use std::process::{Output, Stdio};
use std::time::Duration;
use tokio::io::AsyncReadExt;
use tokio_util::sync::CancellationToken;

/// Runs `cmd` to completion within `timeout`. A non-zero exit is an [`Error::Tool`] with the
/// program's stderr; `what` names the call (`qemu-img create`) and `subject` the file it was
/// about, for the message.
pub(crate) async fn run(
    cmd: tokio::process::Command,
    what: &str,
    subject: &Path,
    timeout: Duration,
    cancel: &CancellationToken,
) -> Result<Output> {
    let out = output(cmd, what, subject, timeout, cancel).await?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr).trim().to_owned();
        return Err(Error::Tool {
            tool: what.to_owned(),
            path: subject.to_owned(),
            why: if stderr.is_empty() {
                format!("it exited with {}", out.status)
            } else {
                stderr
            },
        });
    }
    Ok(out)
}

/// Like [`run`], for a program whose exit status is part of its answer (`qemu-img check`
/// exits non-zero when it finds something): its output whatever the status.
pub(crate) async fn output(
    mut cmd: tokio::process::Command,
    what: &str,
    subject: &Path,
    timeout: Duration,
    cancel: &CancellationToken,
) -> Result<Output> {
    let fail = |why: String| Error::Tool {
        tool: what.to_owned(),
        path: subject.to_owned(),
        why,
    };
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let child = cmd
        .spawn()
        .map_err(|e| fail(format!("cannot start it: {e}")))?;
    let out = tokio::select! {
        out = tokio::time::timeout(timeout, child.wait_with_output()) => match out {
            Ok(Ok(out)) => out,
            Ok(Err(e)) => return Err(fail(format!("waiting for it: {e}"))),
            // Dropping the future kills the child (kill_on_drop).
            Err(_) => return Err(fail(format!("no result within {timeout:?}; it was stopped"))),
        },
        () = cancel.cancelled() => return Err(Error::Cancelled),
    };
    Ok(out)
}

/// Like [`run`], for a long job whose stdout reports progress as `(NN.NN/100%)` (`qemu-img
/// … -p`): `progress` is called with the fraction done as it moves.
pub(crate) async fn run_with_progress(
    mut cmd: tokio::process::Command,
    what: &str,
    subject: &Path,
    timeout: Duration,
    cancel: &CancellationToken,
    progress: &(dyn Fn(f64) + Send + Sync),
) -> Result<()> {
    let fail = |why: String| Error::Tool {
        tool: what.to_owned(),
        path: subject.to_owned(),
        why,
    };
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = cmd
        .spawn()
        .map_err(|e| fail(format!("cannot start it: {e}")))?;
    let mut stdout = child.stdout.take().expect("piped");
    let mut stderr = child.stderr.take().expect("piped");
    let work = async {
        let err_text = tokio::spawn(async move {
            let mut s = String::new();
            let _ = stderr.read_to_string(&mut s).await;
            s
        });
        let mut buf = [0u8; 256];
        let mut line = Vec::new();
        loop {
            let n = stdout.read(&mut buf).await.unwrap_or(0);
            if n == 0 {
                break;
            }
            for &b in &buf[..n] {
                if b == b'\r' || b == b'\n' {
                    if let Some(f) = parse_progress(&line) {
                        progress(f);
                    }
                    line.clear();
                } else {
                    line.push(b);
                }
            }
        }
        let status = child.wait().await;
        (status, err_text.await.unwrap_or_default())
    };
    let (status, err_text) = tokio::select! {
        r = tokio::time::timeout(timeout, work) => match r {
            Ok(x) => x,
            Err(_) => return Err(fail(format!("no result within {timeout:?}; it was stopped"))),
        },
        () = cancel.cancelled() => return Err(Error::Cancelled),
    };
    match status {
        Ok(s) if s.success() => Ok(()),
        Ok(s) => Err(fail(if err_text.trim().is_empty() {
            format!("it exited with {s}")
        } else {
            err_text.trim().to_owned()
        })),
        Err(e) => Err(fail(format!("waiting for it: {e}"))),
    }
}

/// `    (42.17/100%)` → 0.4217.
fn parse_progress(line: &[u8]) -> Option<f64> {
    let text = std::str::from_utf8(line).ok()?.trim();
    let inner = text.strip_prefix('(')?.strip_suffix("/100%)")?;
    inner
        .parse::<f64>()
        .ok()
        .map(|p| (p / 100.0).clamp(0.0, 1.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_qemu_img_progress_lines() {
        assert_eq!(parse_progress(b"    (42.00/100%)"), Some(0.42));
        assert_eq!(parse_progress(b"(100.00/100%)"), Some(1.0));
        assert_eq!(parse_progress(b"Image committed."), None);
    }

    #[tokio::test]
    async fn a_hung_program_is_stopped_at_its_deadline_and_by_cancellation() {
        let mut cmd = tokio::process::Command::new("sleep");
        cmd.arg("30");
        let started = std::time::Instant::now();
        let err = run(
            cmd,
            "sleep",
            Path::new("/"),
            Duration::from_millis(100),
            &CancellationToken::new(),
        )
        .await
        .unwrap_err();
        assert!(err.to_string().contains("no result within"), "{err}");
        assert!(started.elapsed() < Duration::from_secs(5));

        let token = CancellationToken::new();
        token.cancel();
        let mut cmd = tokio::process::Command::new("sleep");
        cmd.arg("30");
        let err = run(
            cmd,
            "sleep",
            Path::new("/"),
            Duration::from_secs(60),
            &token,
        )
        .await
        .unwrap_err();
        assert!(matches!(err, Error::Cancelled), "{err}");

        let cmd = tokio::process::Command::new("false");
        let err = run(
            cmd,
            "false",
            Path::new("/x"),
            Duration::from_secs(5),
            &CancellationToken::new(),
        )
        .await
        .unwrap_err();
        assert!(err.to_string().contains("false failed on /x"), "{err}");
    }
}
