//! The progress bars shown on a terminal while memory is saved and while layers merge
//! (bytes, rate, ETA). They draw on stderr and only when stderr is a terminal, so stdout
//! stays clean for scripts.
//!
//! This module must never print anything but the bars, nor change what a command does: a bar
//! is only a callback the engine calls.

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use qsnap_engine::snapshot::{ProgressFn, SaveProgress};
use qsnap_engine::MergeProgress;
use std::io::IsTerminal;
use std::sync::Arc;

/// A bar that exists only on a terminal.
pub struct SaveBar {
    bar: Option<ProgressBar>,
}

impl SaveBar {
    /// A bar, unless stderr is not a terminal or `quiet`.
    pub fn new(quiet: bool) -> SaveBar {
        if quiet || !std::io::stderr().is_terminal() {
            return SaveBar { bar: None };
        }
        let bar = ProgressBar::with_draw_target(Some(0), ProgressDrawTarget::stderr());
        bar.set_style(
            ProgressStyle::with_template(
                "saving memory [{bar:30}] {percent:>3}% of RAM, {msg} written, ETA {eta}",
            )
            .expect("valid template")
            .progress_chars("=> "),
        );
        SaveBar { bar: Some(bar) }
    }

    /// The callback for the engine.
    pub fn callback(&self) -> Option<ProgressFn> {
        let bar = self.bar.clone()?;
        Some(Arc::new(move |p: &SaveProgress| {
            let (done, of) = save_fraction(p);
            bar.set_length(of);
            bar.set_position(done);
            bar.set_message(indicatif::HumanBytes(p.transferred).to_string());
        }))
    }

    /// Removes the bar before the summary prints.
    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

/// How far a save is, as (done, of): the RAM it has been over — its size less what QEMU still
/// has to write — out of the RAM. Not the stream's bytes against the RAM's: zero pages are
/// not written (a mapped-ram file leaves holes), so those stop short of the end, and a
/// precopy pass that re-sends dirty pages would run past it.
fn save_fraction(p: &SaveProgress) -> (u64, u64) {
    let of = p.ram_total.max(1);
    (of.saturating_sub(p.remaining), of)
}

/// The bar of a delete's merges.
pub struct MergeBar {
    bar: Option<ProgressBar>,
}

impl MergeBar {
    /// A bar, unless stderr is not a terminal or `quiet`.
    pub fn new(quiet: bool) -> MergeBar {
        if quiet || !std::io::stderr().is_terminal() {
            return MergeBar { bar: None };
        }
        let bar = ProgressBar::with_draw_target(Some(0), ProgressDrawTarget::stderr());
        bar.set_style(
            ProgressStyle::with_template(
                "merging {msg} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} ETA {eta}",
            )
            .expect("valid template")
            .progress_chars("=> "),
        );
        MergeBar { bar: Some(bar) }
    }

    /// The callback for the engine.
    pub fn callback(&self) -> Option<qsnap_engine::MergeProgressFn> {
        let bar = self.bar.clone()?;
        Some(Arc::new(move |p: &MergeProgress| {
            if bar.length() != Some(p.bytes) {
                bar.reset();
                bar.set_length(p.bytes.max(1));
                bar.set_message(p.what.clone());
            }
            #[allow(
                clippy::cast_possible_truncation,
                clippy::cast_sign_loss,
                clippy::cast_precision_loss
            )]
            bar.set_position((p.fraction * p.bytes as f64) as u64);
        }))
    }

    /// Removes the bar before the summary prints.
    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

/// The bar of an export or import (bytes of the files).
pub struct BytesBar {
    bar: Option<ProgressBar>,
}

impl BytesBar {
    /// A bar labelled `what`, unless stderr is not a terminal or `quiet`.
    pub fn new(what: &str, quiet: bool) -> BytesBar {
        if quiet || !std::io::stderr().is_terminal() {
            return BytesBar { bar: None };
        }
        let bar = ProgressBar::with_draw_target(Some(0), ProgressDrawTarget::stderr());
        bar.set_style(
            ProgressStyle::with_template(&format!(
                "{what} [{{bar:30}}] {{bytes}}/{{total_bytes}} {{binary_bytes_per_sec}} ETA {{eta}}"
            ))
            .expect("valid template")
            .progress_chars("=> "),
        );
        BytesBar { bar: Some(bar) }
    }

    /// The callback for the engine.
    pub fn callback(&self) -> Option<qsnap_engine::BundleProgressFn> {
        let bar = self.bar.clone()?;
        Some(Arc::new(move |done: u64, total: u64| {
            bar.set_length(total.max(done));
            bar.set_position(done);
        }))
    }

    /// Removes the bar before the summary prints.
    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn at(transferred: u64, remaining: u64) -> SaveProgress {
        SaveProgress {
            transferred,
            ram_total: 1000,
            remaining,
            mbps: 0.0,
            passes: 1,
            elapsed: Duration::ZERO,
        }
    }

    #[test]
    fn a_save_reaches_the_end_when_nothing_remains_whatever_was_written() {
        // Mostly zero pages: little written, all of RAM gone over.
        assert_eq!(save_fraction(&at(650, 0)), (1000, 1000));
        // Halfway through the first pass.
        assert_eq!(save_fraction(&at(400, 500)), (500, 1000));
        // A second precopy pass re-sends dirty pages: never past the end.
        assert_eq!(save_fraction(&at(1300, 100)), (900, 1000));
    }
}
