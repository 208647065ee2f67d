//! When a booted golden VM counts as ready to be snapshotted: its console printed a text, its
//! guest agent answers, or a check of the caller's returns true — and waiting for it, bounded.
//! It only reads (the console file, the agent, the caller's check): it must never change the
//! VM, and never wait without a deadline.

use crate::error::{Error, Result};
use qsnap_engine::{guest_agent_answers, Vm};
use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

type Check = Arc<dyn Fn(Vm) -> Pin<Box<dyn Future<Output = bool> + Send>> + Send + Sync>;

/// When a booted guest counts as ready to be snapshotted.
#[derive(Clone)]
pub struct Ready(ReadyKind);

#[derive(Clone)]
enum ReadyKind {
    Console(String),
    Agent,
    Check(Check),
}

impl std::fmt::Debug for Ready {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.0 {
            ReadyKind::Console(t) => write!(f, "console_prints({t:?})"),
            ReadyKind::Agent => f.write_str("agent_answers()"),
            ReadyKind::Check(_) => f.write_str("when(…)"),
        }
    }
}

/// Ready once the guest's console has printed `text`.
pub fn console_prints(text: impl Into<String>) -> Ready {
    Ready(ReadyKind::Console(text.into()))
}

/// Ready once the QEMU guest agent in the guest answers (needs a `virtserialport` named
/// `org.qemu.guest_agent.0` on a `-chardev socket,path=…`).
pub fn agent_answers() -> Ready {
    Ready(ReadyKind::Agent)
}

/// Ready once `check` returns true (asked every 100 ms with the VM; ask its monitor, its
/// disks, a port it forwards …).
pub fn when<F, Fut>(check: F) -> Ready
where
    F: Fn(Vm) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = bool> + Send + 'static,
{
    Ready(ReadyKind::Check(Arc::new(move |vm| Box::pin(check(vm)))))
}

/// Waits until `vm` (whose console file is `console`, if captured) is `ready`, at most
/// `timeout`; a timeout's error ends with the console's last lines.
pub(crate) async fn wait_ready(
    vm: &Vm,
    console: Option<&Path>,
    ready: &Ready,
    timeout: Duration,
) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let ok = match &ready.0 {
            ReadyKind::Console(text) => match console {
                Some(p) => tokio::fs::read_to_string(p)
                    .await
                    .map(|t| t.contains(text.as_str()))
                    .unwrap_or(false),
                None => return Err(Error::NoConsole),
            },
            ReadyKind::Agent => match &vm.record().guest_agent {
                Some(sock) => guest_agent_answers(sock, Duration::from_secs(1))
                    .await
                    .is_ok(),
                None => return Err(Error::NoGuestAgent),
            },
            ReadyKind::Check(f) => f(vm.clone()).await,
        };
        if ok {
            return Ok(());
        }
        if Instant::now() > deadline {
            let tail = match console {
                Some(p) => {
                    let t = tokio::fs::read_to_string(p).await.unwrap_or_default();
                    let lines: Vec<&str> = t.lines().collect();
                    lines[lines.len().saturating_sub(10)..].join("\n")
                }
                None => String::new(),
            };
            return Err(qsnap_engine::Error::Timeout {
                what: format!("the golden VM to be ready ({ready:?}); console:\n{tail}"),
                after: timeout,
            }
            .into());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
