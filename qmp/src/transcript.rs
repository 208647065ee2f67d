//! A bounded record of the last lines sent and received, for error reports and test failures.
//! It never grows past its capacity and never blocks: it is a debugging aid, not a log.

use std::collections::VecDeque;
use std::sync::Mutex;

pub(crate) struct Transcript {
    cap: usize,
    lines: Mutex<VecDeque<String>>,
}

impl Transcript {
    pub(crate) fn new(cap: usize) -> Self {
        Self {
            cap,
            lines: Mutex::new(VecDeque::with_capacity(cap.min(1024))),
        }
    }

    pub(crate) fn push(&self, direction: &str, line: impl FnOnce() -> String) {
        if self.cap == 0 {
            return;
        }
        let mut lines = self.lines.lock().unwrap_or_else(|p| p.into_inner());
        if lines.len() == self.cap {
            lines.pop_front();
        }
        let mut text = line();
        if text.len() > 2000 {
            let mut cut = 2000;
            while !text.is_char_boundary(cut) {
                cut -= 1;
            }
            text.truncate(cut);
            text.push('…');
        }
        lines.push_back(format!("{direction} {text}"));
    }

    pub(crate) fn snapshot(&self) -> Vec<String> {
        let lines = self.lines.lock().unwrap_or_else(|p| p.into_inner());
        lines.iter().cloned().collect()
    }
}
