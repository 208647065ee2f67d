//! The guest's serial console as timestamped lines, with bounded waits.
//!
//! The test guest prints `qsnap-guest: ready counter=N`, then `tick N` for every counter step
//! and `MISMATCH disk=X mem=Y` if memory and disk ever disagree. Lines end `\r\n`; the `\r` is
//! stripped here.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::sync::watch;

/// One console line and when the test read it.
#[derive(Debug, Clone)]
pub struct Line {
    /// When it was read (monotonic).
    pub at: Instant,
    /// The text, without the line ending.
    pub text: String,
}

/// A growing, shared record of a console.
#[derive(Clone)]
pub struct SerialLog {
    lines: Arc<Mutex<Vec<Line>>>,
    count: watch::Receiver<usize>,
}

/// Appends one raw console line (ending stripped) and announces the new count.
fn record(sink: &Mutex<Vec<Line>>, tx: &watch::Sender<usize>, raw: &[u8]) {
    let text = String::from_utf8_lossy(raw)
        .trim_end_matches(['\r', '\n'])
        .to_owned();
    let n = {
        let mut l = sink.lock().unwrap();
        l.push(Line {
            at: Instant::now(),
            text,
        });
        l.len()
    };
    let _ = tx.send(n);
}

impl SerialLog {
    /// Starts a task that records every line of `reader` until EOF.
    pub fn spawn(reader: impl AsyncRead + Unpin + Send + 'static) -> SerialLog {
        let lines = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = watch::channel(0usize);
        let sink = lines.clone();
        tokio::spawn(async move {
            let mut reader = BufReader::new(reader);
            let mut buf = Vec::new();
            loop {
                buf.clear();
                match reader.read_until(b'\n', &mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(_) => record(&sink, &tx, &buf),
                }
            }
        });
        SerialLog { lines, count: rx }
    }

    /// Follows a file QEMU appends the console to (`-chardev file,append=on`), across QEMU
    /// restarts. The task ends when every `SerialLog` clone is dropped.
    pub fn follow(path: impl Into<std::path::PathBuf>) -> SerialLog {
        let path = path.into();
        let lines = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = watch::channel(0usize);
        let weak = Arc::downgrade(&lines);
        tokio::spawn(async move {
            let mut offset = 0usize;
            let mut partial = Vec::new();
            while let Some(sink) = weak.upgrade() {
                if let Ok(bytes) = tokio::fs::read(&path).await {
                    if bytes.len() > offset {
                        partial.extend_from_slice(&bytes[offset..]);
                        offset = bytes.len();
                        while let Some(i) = partial.iter().position(|&b| b == b'\n') {
                            let line: Vec<u8> = partial.drain(..=i).collect();
                            record(&sink, &tx, &line);
                        }
                    }
                }
                drop(sink);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        });
        SerialLog { lines, count: rx }
    }

    /// All lines so far.
    pub fn lines(&self) -> Vec<Line> {
        self.lines.lock().unwrap().clone()
    }

    /// The last `n` lines as text, for failure reports.
    pub fn tail(&self, n: usize) -> String {
        let l = self.lines.lock().unwrap();
        l[l.len().saturating_sub(n)..]
            .iter()
            .map(|l| l.text.as_str())
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Waits up to `timeout` for a line (from index `from` on) for which `f` gives `Some`.
    /// Returns the line's index and `f`'s value; `Err` says what was seen instead.
    pub async fn wait_from<T>(
        &self,
        from: usize,
        timeout: Duration,
        mut f: impl FnMut(&str) -> Option<T>,
    ) -> Result<(usize, T), String> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut count = self.count.clone();
        let mut next = from;
        loop {
            {
                let l = self.lines.lock().unwrap();
                while next < l.len() {
                    if let Some(v) = f(&l[next].text) {
                        return Ok((next, v));
                    }
                    next += 1;
                }
            }
            match tokio::time::timeout_at(deadline, count.changed()).await {
                Ok(Ok(())) => continue,
                Ok(Err(_)) => {
                    // The console closed (QEMU exited): one last scan above, then give up.
                    let l = self.lines.lock().unwrap();
                    if let Some((i, v)) = l[next..]
                        .iter()
                        .enumerate()
                        .find_map(|(i, line)| f(&line.text).map(|v| (next + i, v)))
                    {
                        return Ok((i, v));
                    }
                    return Err(format!("console closed; last lines:\n{}", self.tail(20)));
                }
                Err(_) => {
                    return Err(format!(
                        "nothing matched within {timeout:?}; last lines:\n{}",
                        self.tail(20)
                    ))
                }
            }
        }
    }

    /// Waits for the next `tick N` line after line index `from`; returns (index, N).
    pub async fn wait_tick_from(
        &self,
        from: usize,
        timeout: Duration,
    ) -> Result<(usize, u64), String> {
        self.wait_from(from, timeout, parse_tick).await
    }

    /// Waits for the next `tick N` printed from now on; returns N. After a snapshot returns,
    /// that tick bounds the snapshot's instant from above (it was printed after it) — the way
    /// to learn "the last tick before the snapshot" without sleeping.
    pub async fn wait_new_tick(&self, timeout: Duration) -> Result<u64, String> {
        self.wait_tick_from(self.len(), timeout)
            .await
            .map(|(_, n)| n)
    }

    /// Number of lines so far (an index to wait from).
    pub fn len(&self) -> usize {
        self.lines.lock().unwrap().len()
    }

    /// True when nothing was printed yet.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Every `tick N` value so far, in order.
    pub fn ticks(&self) -> Vec<u64> {
        self.lines
            .lock()
            .unwrap()
            .iter()
            .filter_map(|l| parse_tick(&l.text))
            .collect()
    }

    /// Every `MISMATCH …` line so far.
    pub fn mismatches(&self) -> Vec<String> {
        self.lines
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.text.contains("MISMATCH"))
            .map(|l| l.text.clone())
            .collect()
    }
}

/// `tick N` → N.
pub fn parse_tick(line: &str) -> Option<u64> {
    line.trim().strip_prefix("tick ")?.trim().parse().ok()
}
