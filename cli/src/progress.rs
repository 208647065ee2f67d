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
                "saving memory [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} ETA {eta}",
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
            bar.set_length(p.ram_total.max(p.transferred));
            bar.set_position(p.transferred);
        }))
    }

    /// Removes the bar before the summary prints.
    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
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
