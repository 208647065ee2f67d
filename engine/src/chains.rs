//! Backing chains read once: what each image's header says, remembered under the image's
//! identity (path, device, inode, size, mtime, ctime), so that a store of a hundred snapshots
//! is not read a hundred times per command.
//!
//! [`Reader::chain`] gives exactly what [`image::chain`] would: it walks the chain from the
//! top, taking each image from what this reader read already or from the cache while that very
//! version of the file was read before, reads a plain qcow2 header itself ([`crate::qcow2`]: a
//! `pread`, where `qemu-img` costs a process, ≈ 17 ms, at each look at a running VM's top), and
//! asks `qemu-img` for the rest as soon as one is neither — the image alone, or everything
//! below it in one go (answers leave `format_specific` out, whoever read them). An answer is
//! served only for the format the image is to be read as: the one the header above names, or
//! probed (the top, or a header that names none). An image read as
//! qcow2 is what a probe finds too (its magic decides; no other format claims it), but an image
//! read as raw is never served to a probe: a guest may have written a qcow2 header into its
//! raw disk.
//!
//! An answer is remembered across operations only when the file had not changed for
//! [`SETTLED`] before it was read: a file's times come from a coarse clock, so a change right
//! after a read could keep the identity the read saw; a change after a settled read always
//! moves ctime (which no one can set back). A [`Reader`] also keeps what it read for as long
//! as it lives — one operation's view, as if each file were read once; the versions it takes
//! ahead in one batch ([`Reader::prefetch`]) are part of that look. This must never serve
//! an answer about another version of a file: the reference graph that guards every unlink is
//! built from it. (On a network file system whose server's clock lags this host's by more than
//! [`SETTLED`], that rule is weaker; qsnap's store and images are local files.)

use crate::error::Result;
use crate::image::{self, ChainImage};
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, HashSet};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};
use tokio_util::sync::CancellationToken;

/// How long a file must have stayed unchanged before a read of it is remembered.
pub(crate) const SETTLED: Duration = Duration::from_secs(2);

thread_local! {
    /// How many times this thread read an image's header, itself or through `qemu-img` (for
    /// tests: a cached chain reads nothing; per thread, so that other tests' reads do not
    /// count).
    static READS: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
    /// How many of those asked `qemu-img` (for tests: a chain of plain qcow2 images asks
    /// nothing).
    static ASKS: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

fn counted() {
    READS.with(|r| r.set(r.get() + 1));
}

fn asked() {
    counted();
    ASKS.with(|r| r.set(r.get() + 1));
}

/// What chains answer with: `format_specific` left out, whoever read the header. Nothing that
/// reads chains uses it, and [`native`] does not produce it: leaving it out everywhere keeps
/// answers alike, cached or not.
fn plain(mut e: ChainImage) -> ChainImage {
    e.format_specific = None;
    e
}

/// Whether [`native`] may answer for an image read as `format` (`None`: probed). A qcow2
/// magic decides a probe, so a probed answer that found qcow2 is what `qemu-img` finds.
fn native_reads(format: Option<&str>) -> bool {
    matches!(format, None | Some("qcow2"))
}

/// `image`'s header read by qsnap itself ([`crate::qcow2`]), as `qemu-img info` would give it
/// when read as `format`; `None` for whatever `qemu-img` must answer (another format, a
/// header out of the plain case, a relative path, a backing name with a protocol prefix).
/// Remembered like `qemu-img`'s answers when the file is settled.
async fn native(image: &Path, format: Option<&str>) -> Option<ChainImage> {
    if !native_reads(format) || !image.is_absolute() {
        return None;
    }
    let started = SystemTime::now();
    let path = image.to_owned();
    let (header, blocks) = tokio::task::spawn_blocking(move || {
        let header = crate::qcow2::read(&path)?;
        // After the header: an allocation the header read did not see is never reported.
        let md = std::fs::metadata(&path).ok()?;
        Some((header, md.blocks()))
    })
    .await
    .ok()??;
    counted();
    let full = match &header.backing {
        None => None,
        Some(b) if has_protocol(b) => return None,
        Some(b) => Some(resolve(image, b)),
    };
    let e = ChainImage {
        filename: image.to_owned(),
        format: "qcow2".into(),
        full_backing_filename: full,
        backing_filename_format: header.backing_format,
        virtual_size: header.virtual_size,
        actual_size: Some(blocks * 512),
        backing_filename: header.backing,
        format_specific: None,
    };
    learn(&e, format, started).await;
    Some(e)
}

/// QEMU's `path_has_protocol`: a `:` before any `/` (`nbd:…`, `json:{…}`).
fn has_protocol(name: &str) -> bool {
    name.find([':', '/'])
        .is_some_and(|i| name.as_bytes()[i] == b':')
}

/// QEMU's `path_combine` for a backing name in an image at an absolute path: an absolute name
/// as it is, a relative one appended to the image's directory, character for character (no
/// `..` folded: QEMU does not fold them either).
fn resolve(image: &Path, backing: &str) -> PathBuf {
    use std::os::unix::ffi::OsStrExt;
    if backing.starts_with('/') {
        return PathBuf::from(backing);
    }
    let bytes = image.as_os_str().as_bytes();
    let dir = &bytes[..bytes.iter().rposition(|&c| c == b'/').map_or(0, |i| i + 1)];
    let mut full = dir.to_vec();
    full.extend_from_slice(backing.as_bytes());
    PathBuf::from(std::ffi::OsStr::from_bytes(&full))
}

/// What one read said about one image, and the format it was read as (`None`: probed).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
struct Learnt {
    read_as: Option<String>,
    image: ChainImage,
}

/// Whether an answer read as `read_as`, which found `found`, is what a read as `want` would
/// find (see the module docs).
fn serves(read_as: Option<&str>, found: &str, want: Option<&str>) -> bool {
    match want {
        Some(f) => found == f,
        None => read_as.is_none() || found == "qcow2",
    }
}

/// `image`'s backing chain, top first: the same list [`image::chain`] reads, from the cache
/// where it can be.
pub(crate) async fn chain(top: &Path, cancel: &CancellationToken) -> Result<Vec<ChainImage>> {
    Reader::default().chain(top, cancel).await
}

/// The files of `top`'s chain, top first (see [`chain`]).
pub(crate) async fn files(top: &Path, cancel: &CancellationToken) -> Result<Vec<PathBuf>> {
    Ok(chain(top, cancel)
        .await?
        .into_iter()
        .map(|c| c.filename)
        .collect())
}

/// Reads chains for one operation, keeping what it read (each image, and the format it was
/// read as) for as long as it lives.
#[derive(Default)]
pub(crate) struct Reader {
    // One entry per image, not per chain: a store's chains share their lower images, and a
    // walk that stopped at the first known image (and kept only what lay below it) made the
    // next walk, from one image higher, go down the same path again: quadratic in N.
    read: HashMap<PathBuf, (Option<String>, ChainImage)>,
    // Images whose whole chain below a walk read without fault, each with the format it was
    // asked for: where [`Reader::chain_news`] may stop.
    walked: HashSet<(PathBuf, Option<String>)>,
    // Versions taken ahead, in one batch ([`Reader::prefetch`]), each used once by the next
    // look into the cache for its image.
    ahead: HashMap<PathBuf, Option<crate::cache::FileVersion>>,
    // Images that were not there when their version was to be taken ahead.
    gone_ahead: HashSet<PathBuf>,
}

/// What [`Reader::read_one`] read.
enum Learned {
    /// One image.
    One(ChainImage),
    /// The image and everything below it (`qemu-img info --backing-chain`).
    Rest(Vec<ChainImage>),
}

impl Reader {
    /// `top`'s backing chain, top first (see the module docs).
    pub(crate) async fn chain(
        &mut self,
        top: &Path,
        cancel: &CancellationToken,
    ) -> Result<Vec<ChainImage>> {
        self.walk(top, false, cancel).await
    }

    /// `top`'s chain down to the first image below it whose whole chain an earlier walk of
    /// this reader read without fault (asked for as the same format), that image excluded:
    /// what is new. The last image's backing then names where it stopped. A check of a
    /// hundred snapshots in one chain walks each image once, not a hundred times.
    pub(crate) async fn chain_news(
        &mut self,
        top: &Path,
        cancel: &CancellationToken,
    ) -> Result<Vec<ChainImage>> {
        self.walk(top, true, cancel).await
    }

    /// Takes the versions of `images` (those not read yet) ahead, in one trip to the blocking
    /// pool, for the cache lookups of the walks that follow: a walk of a hundred images would
    /// otherwise make a trip for each. A version taken ahead serves one lookup, as if the
    /// image had been looked at then; a file that changed since is read as it was when its
    /// version was taken, or, when the cache does not know that version, read afresh. An
    /// image taken ahead before is taken again: the latest batch is what
    /// [`Reader::there_ahead`] tells.
    pub(crate) async fn prefetch(&mut self, images: Vec<PathBuf>) {
        let reader = reader_identity().await;
        let mut want = HashSet::new();
        let files: Vec<_> = images
            .into_iter()
            .filter(|i| !self.read.contains_key(i))
            .filter(|i| want.insert(i.clone()))
            .map(|i| {
                let slot = i.display().to_string();
                (i, slot, reader.to_owned())
            })
            .collect();
        for (image, v) in crate::cache::versions_of(files).await {
            if v.as_ref()
                .is_err_and(|e| e.kind() == std::io::ErrorKind::NotFound)
            {
                self.gone_ahead.insert(image.clone());
            } else {
                self.gone_ahead.remove(&image);
            }
            self.ahead.insert(image, v.ok());
        }
    }

    /// Whether `image` was there when [`Reader::prefetch`] last looked (`None`: not known —
    /// not looked at, its version used by a walk since, or it could not be examined).
    pub(crate) fn there_ahead(&self, image: &Path) -> Option<bool> {
        if self.gone_ahead.contains(image) {
            return Some(false);
        }
        match self.ahead.get(image) {
            Some(Some(_)) => Some(true),
            _ => None,
        }
    }

    async fn walk(
        &mut self,
        top: &Path,
        stop_at_walked: bool,
        cancel: &CancellationToken,
    ) -> Result<Vec<ChainImage>> {
        let out = self.walk_all(top, stop_at_walked, cancel).await?;
        // Asked for as: the top probed, each image below as the one above names it.
        let mut asked_as: Option<String> = None;
        for e in &out {
            self.walked.insert((e.filename.clone(), asked_as.take()));
            asked_as = e.backing_filename_format.clone();
        }
        Ok(out)
    }

    async fn walk_all(
        &mut self,
        top: &Path,
        stop_at_walked: bool,
        cancel: &CancellationToken,
    ) -> Result<Vec<ChainImage>> {
        let mut out: Vec<ChainImage> = Vec::new();
        let mut at = top.to_owned();
        // What the header above names `at`'s format (None: probed, as for the top).
        let mut format: Option<String> = None;
        let mut seen = HashSet::new();
        loop {
            if !seen.insert(at.clone()) {
                // A loop: let qemu-img say what is wrong with it.
                asked();
                return Ok(image::chain(top, cancel)
                    .await?
                    .into_iter()
                    .map(plain)
                    .collect());
            }
            if stop_at_walked
                && !out.is_empty()
                && self.walked.contains(&(at.clone(), format.clone()))
            {
                return Ok(out);
            }
            let known = self
                .read
                .get(&at)
                .filter(|(read_as, e)| serves(read_as.as_deref(), &e.format, format.as_deref()))
                .map(|(_, e)| e.clone());
            let entry = match known {
                Some(e) => e,
                None => match self.read_one(&at, format.as_deref(), cancel).await? {
                    Learned::One(e) => e,
                    Learned::Rest(rest) => {
                        out.extend(rest);
                        return Ok(out);
                    }
                },
            };
            let next = entry.full_backing_filename.clone();
            format = entry.backing_filename_format.clone();
            out.push(entry);
            match next {
                None => return Ok(out),
                Some(n) => at = n,
            }
        }
    }

    /// `at`'s entry (read as `format`) from the cache, its header or `qemu-img`, now kept —
    /// or, when `qemu-img` had to read everything below it too, that whole rest.
    async fn read_one(
        &mut self,
        at: &Path,
        format: Option<&str>,
        cancel: &CancellationToken,
    ) -> Result<Learned> {
        let at = at.to_owned();
        let format = format.map(str::to_owned);
        let version = match self.ahead.remove(&at) {
            Some(v) => v,
            None => identity(&at).await,
        };
        let entry = match remembered_as(version, &at, format.as_deref()).await {
            Some(e) => e,
            None => match native(&at, format.as_deref()).await {
                Some(e) => e,
                None => {
                    // Not known: this image alone, and if what it backs onto is not known
                    // either, everything below it in one read.
                    let started = SystemTime::now();
                    asked();
                    let one = plain(match &format {
                        Some(f) => image::info_as(&at, f, cancel).await?,
                        None => image::info(&at, cancel).await?,
                    });
                    learn(&one, format.as_deref(), started).await;
                    let below_known = match &one.full_backing_filename {
                        None => true,
                        Some(b) => {
                            self.read.contains_key(b)
                                || remembered(b, one.backing_filename_format.as_deref())
                                    .await
                                    .is_some()
                                || native_reads(one.backing_filename_format.as_deref())
                        }
                    };
                    if below_known {
                        one
                    } else {
                        let started = SystemTime::now();
                        asked();
                        let rest: Vec<ChainImage> = match &format {
                            Some(f) => image::chain_as(&at, f, cancel).await?,
                            None => image::chain(&at, cancel).await?,
                        }
                        .into_iter()
                        .map(plain)
                        .collect();
                        learn_chain(&rest, format.as_deref(), started).await;
                        self.keep(&rest, format.as_deref());
                        return Ok(Learned::Rest(rest));
                    }
                }
            },
        };
        self.read.insert(at, (format, entry.clone()));
        Ok(Learned::One(entry))
    }

    /// Keeps each image of a chain read at once from its top (read as `format`; each lower
    /// image as the format the one above names) — only where its links follow each other.
    fn keep(&mut self, chain: &[ChainImage], format: Option<&str>) {
        if !linked(chain) {
            return;
        }
        let mut read_as = format.map(str::to_owned);
        for e in chain {
            self.read
                .insert(e.filename.clone(), (read_as.clone(), e.clone()));
            read_as = e.backing_filename_format.clone();
        }
    }
}

/// Each image's backing is the next one's file name, and the last backs onto nothing.
fn linked(chain: &[ChainImage]) -> bool {
    chain
        .windows(2)
        .all(|w| w[0].full_backing_filename.as_deref() == Some(w[1].filename.as_path()))
        && chain
            .last()
            .is_some_and(|l| l.full_backing_filename.is_none())
}

/// The `qemu-img` that answers (its file's identity): another build may answer otherwise.
pub(crate) async fn reader_identity() -> &'static str {
    static ID: tokio::sync::OnceCell<String> = tokio::sync::OnceCell::const_new();
    ID.get_or_init(|| async {
        match crate::cache::resolve_binary("qemu-img").await {
            Some(p) => crate::cache::file_key(&p, "").await.unwrap_or_default(),
            None => String::new(),
        }
    })
    .await
}

/// The slot (the file's path: one entry per file) and the key (this version of it, read by
/// this `qemu-img`) of an image, and when it last changed. `None` when the file cannot be
/// read.
async fn identity(image: &Path) -> Option<crate::cache::FileVersion> {
    let slot = image.display().to_string();
    crate::cache::version_of(image, slot, reader_identity().await).await
}

/// Whether what a read that began at `started` saw of a file last changed at `changed` may be
/// remembered: the file had been still for [`SETTLED`] when the read began.
pub(crate) fn settled(changed: SystemTime, started: SystemTime) -> bool {
    // (A clock set back during the read could make a fresh change look settled.)
    changed + SETTLED < started && SystemTime::now() >= started
}

/// What the cache holds about this version of `image`, if it serves a read as `format`.
async fn remembered(image: &Path, format: Option<&str>) -> Option<ChainImage> {
    remembered_as(identity(image).await, image, format).await
}

/// [`remembered`], for version `v` of `image` (taken now or a moment ago).
async fn remembered_as(
    v: Option<crate::cache::FileVersion>,
    image: &Path,
    format: Option<&str>,
) -> Option<ChainImage> {
    let v = v?;
    let l: Learnt = crate::cache::lookup_in(crate::cache::CHAIN, &v.slot, &v.key).await?;
    (l.image.filename == image && serves(l.read_as.as_deref(), &l.image.format, format))
        .then_some(l.image)
}

/// Remembers what a read (as `format`) that began at `started` said about one image, if the
/// file had been still for [`SETTLED`] before the read began.
async fn learn(e: &ChainImage, format: Option<&str>, started: SystemTime) {
    let Some(v) = identity(&e.filename).await else {
        return;
    };
    if settled(v.changed, started) {
        let l = Learnt {
            read_as: format.map(str::to_owned),
            image: e.clone(),
        };
        crate::cache::remember_in(crate::cache::CHAIN, v.slot, v.key, &l).await;
    }
}

/// [`learn`] for each image of a chain read from its top (read as `format`): each lower image
/// was read as the format the one above names. Nothing is learnt from a chain whose links do
/// not follow each other.
async fn learn_chain(chain: &[ChainImage], format: Option<&str>, started: SystemTime) {
    if !linked(chain) {
        return;
    }
    let mut as_format: Option<String> = format.map(str::to_owned);
    for e in chain {
        learn(e, as_format.as_deref(), started).await;
        as_format = e.backing_filename_format.clone();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    fn qemu_img(args: &[&str]) {
        let out = Command::new("qemu-img").args(args).output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn overlay(dir: &Path, name: &str, backing: &str) -> PathBuf {
        let p = dir.join(name);
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-u",
            "-F",
            "qcow2",
            "-b",
            backing,
            p.to_str().unwrap(),
            "64M",
        ]);
        p
    }

    /// `base.qcow2` and `n - 1` overlays on it, one on the other: the chain, base first.
    fn stack(dir: &Path, n: usize) -> Vec<PathBuf> {
        let base = dir.join("base.qcow2");
        qemu_img(&["create", "-q", "-f", "qcow2", base.to_str().unwrap(), "64M"]);
        let mut images = vec![base];
        for i in 1..n {
            let below = images[i - 1].to_str().unwrap().to_owned();
            images.push(overlay(dir, &format!("o{i}.qcow2"), &below));
        }
        images
    }

    /// What `qemu-img` reads of `top`'s chain, as chains answer it.
    async fn truth(top: PathBuf) -> Vec<ChainImage> {
        let chain = image::chain(&top, &CancellationToken::new()).await.unwrap();
        chain.into_iter().map(plain).collect()
    }

    /// Rewrites the qcow2 `image`'s header in place to back onto `onto`, read as `format`.
    fn rebase(image: &Path, onto: &Path, format: &str) {
        qemu_img(&[
            "rebase",
            "-u",
            "-f",
            "qcow2",
            "-F",
            format,
            "-b",
            onto.to_str().unwrap(),
            image.to_str().unwrap(),
        ]);
    }

    /// One reader reads each image once, in whatever order its chains are asked for: a
    /// store's snapshots freeze the images of one chain, each one higher than the last, and
    /// a check walks them all (it read 1 + 2 + … + N headers once).
    #[tokio::test]
    async fn a_reader_reads_each_image_once() {
        let dir = tempfile::tempdir().unwrap();
        let cancel = CancellationToken::new();
        let images = stack(dir.path(), 12);
        let mut reader = Reader::default();
        let before = READS.with(std::cell::Cell::get);
        for (i, top) in images.iter().enumerate() {
            let got = reader.chain(top, &cancel).await.unwrap();
            assert_eq!(got, truth(top.clone()).await);
            assert_eq!(got.len(), i + 1);
        }
        for top in images.iter().rev() {
            reader.chain(top, &cancel).await.unwrap();
        }
        assert_eq!(
            READS.with(std::cell::Cell::get) - before,
            images.len(),
            "headers read by one reader"
        );
    }

    /// `chain_news` returns what no earlier walk read in full: a chain walked bottom up
    /// yields each image once (linear, where whole chains are 1 + 2 + … + N entries), and
    /// what it returns ends at the image it stopped on. A walk that failed taught nothing:
    /// the next one through the same images fails as well.
    #[tokio::test]
    async fn news_stop_where_an_earlier_walk_read_everything_below() {
        let dir = tempfile::tempdir().unwrap();
        let cancel = CancellationToken::new();
        let images = stack(dir.path(), 8);
        let base = images[0].clone();
        let mut reader = Reader::default();
        let mut returned = 0;
        for (i, top) in images.iter().enumerate() {
            let news = reader.chain_news(top, &cancel).await.unwrap();
            assert_eq!(news[0].filename, *top);
            let stop = news.last().unwrap().full_backing_filename.clone();
            // The first image below the top was asked for as qcow2 only now: it is walked
            // once more, and the walk stops under it.
            assert!(news.len() <= 2, "{i}: {news:?}");
            assert_eq!(stop.is_none(), i < 2, "{i}: {news:?}");
            returned += news.len();
        }
        assert!(
            returned < 2 * images.len(),
            "{returned} entries for {} images",
            images.len()
        );
        // The whole chain is still what `chain` says.
        let top = images.last().unwrap();
        assert_eq!(
            reader.chain(top, &cancel).await.unwrap().len(),
            images.len()
        );

        // A chain with a missing image: every walk through it fails.
        let lost = overlay(dir.path(), "lost.qcow2", base.to_str().unwrap());
        let above = overlay(dir.path(), "above.qcow2", lost.to_str().unwrap());
        let higher = overlay(dir.path(), "higher.qcow2", above.to_str().unwrap());
        std::fs::remove_file(&lost).unwrap();
        let mut reader = Reader::default();
        assert!(reader.chain_news(&above, &cancel).await.is_err());
        assert!(reader.chain_news(&higher, &cancel).await.is_err());
    }

    /// Versions taken ahead serve the cache's answers as a walk's own look would: a settled
    /// chain is read from the cache (no header read), an image changed before they were taken
    /// is read afresh, and whether a file was there is told only where it is known.
    #[tokio::test]
    async fn versions_taken_ahead_serve_what_a_walk_would_read() {
        let dir = tempfile::tempdir().unwrap();
        crate::cache::cache_in(dir.path().join("cache"));
        let cancel = CancellationToken::new();
        let images = stack(dir.path(), 7);
        let base = images[0].clone();
        let top = images.last().unwrap().clone();
        tokio::time::sleep(SETTLED + Duration::from_millis(300)).await;
        // Learnt; then o3 backs onto o1 (its header rewritten: a new version, unknown to the
        // cache).
        chain(&top, &cancel).await.unwrap();
        rebase(&images[3], &images[1], "qcow2");
        let mut reader = Reader::default();
        let gone = dir.path().join("gone.qcow2");
        let not_a_dir = base.join("x.qcow2");
        reader
            .prefetch(
                images
                    .iter()
                    .cloned()
                    .chain([gone.clone(), not_a_dir.clone()])
                    .collect(),
            )
            .await;
        assert_eq!(reader.there_ahead(&top), Some(true));
        assert_eq!(reader.there_ahead(&gone), Some(false));
        assert_eq!(
            reader.there_ahead(&not_a_dir),
            None,
            "not NotFound: unknown"
        );
        assert_eq!(reader.there_ahead(&dir.path().join("never-asked")), None);
        // Taken again, the latest look tells: a file made since is there.
        std::fs::write(&gone, b"").unwrap();
        reader.prefetch(vec![gone.clone()]).await;
        assert_eq!(reader.there_ahead(&gone), Some(true));
        std::fs::remove_file(&gone).unwrap();
        let before = READS.with(std::cell::Cell::get);
        let got = reader.chain(&top, &cancel).await.unwrap();
        assert_eq!(got, truth(top.clone()).await);
        assert_eq!(got.len(), images.len() - 1, "o2 left the chain: {got:?}");
        assert_eq!(
            READS.with(std::cell::Cell::get) - before,
            1,
            "only the changed image is read"
        );
    }

    /// What the cache serves is what qemu-img reads, before and after what it learnt is
    /// stale: a header rewritten in place (a new backing file), a file replaced by another of
    /// the same size and times, a backing file gone. And a cached chain asks qemu-img nothing.
    #[tokio::test]
    async fn serves_what_qemu_img_reads_and_never_a_changed_file() {
        if Command::new("qemu-img").arg("--version").output().is_err() {
            panic!("qemu-img is needed for this test (Debian's qemu-utils)");
        }
        let dir = tempfile::tempdir().unwrap();
        crate::cache::cache_in(dir.path().join("cache"));
        let cancel = CancellationToken::new();
        let base = dir.path().join("base.qcow2");
        qemu_img(&["create", "-q", "-f", "qcow2", base.to_str().unwrap(), "64M"]);
        let mid = overlay(dir.path(), "mid.qcow2", "base.qcow2"); // relative backing
        let other = overlay(dir.path(), "other.qcow2", base.to_str().unwrap());
        let sub = dir.path().join("sub");
        std::fs::create_dir(&sub).unwrap();
        let top = overlay(&sub, "top.qcow2", "../mid.qcow2");

        // Fresh files are read every time (their times are too recent to trust), by qsnap
        // itself: plain qcow2 headers ask qemu-img nothing.
        let asks = ASKS.with(std::cell::Cell::get);
        assert_eq!(
            chain(&top, &cancel).await.unwrap(),
            truth(top.clone()).await
        );
        assert_eq!(
            ASKS.with(std::cell::Cell::get),
            asks,
            "a plain qcow2 chain asked qemu-img"
        );
        let before = READS.with(std::cell::Cell::get);
        assert_eq!(
            chain(&top, &cancel).await.unwrap(),
            truth(top.clone()).await
        );
        assert!(
            READS.with(std::cell::Cell::get) > before,
            "a fresh file was served from the cache"
        );

        // Settled: learnt once, then served without asking qemu-img.
        tokio::time::sleep(SETTLED + Duration::from_millis(300)).await;
        assert_eq!(
            chain(&top, &cancel).await.unwrap(),
            truth(top.clone()).await
        );
        let before = READS.with(std::cell::Cell::get);
        for _ in 0..3 {
            assert_eq!(
                chain(&top, &cancel).await.unwrap(),
                truth(top.clone()).await
            );
        }
        assert_eq!(
            READS.with(std::cell::Cell::get),
            before,
            "a settled chain asked qemu-img"
        );
        // A lower image as a top of its own (probed, not read as the format the header above
        // names: its own entry) is learnt once too.
        assert_eq!(
            chain(&mid, &cancel).await.unwrap(),
            truth(mid.clone()).await
        );
        let before = READS.with(std::cell::Cell::get);
        assert_eq!(
            chain(&mid, &cancel).await.unwrap(),
            truth(mid.clone()).await
        );
        assert_eq!(READS.with(std::cell::Cell::get), before);

        // The middle image's header rewritten in place: it now backs onto `other`.
        rebase(&mid, &other, "qcow2");
        let now = chain(&top, &cancel).await.unwrap();
        assert_eq!(now, truth(top.clone()).await);
        assert!(now.iter().any(|c| c.filename == other), "{now:?}");

        // The top replaced by another file (another backing) with the same size and times.
        let md = std::fs::metadata(&top).unwrap();
        let replacement = overlay(dir.path(), "replacement.qcow2", base.to_str().unwrap());
        assert_eq!(std::fs::metadata(&replacement).unwrap().len(), md.len());
        let times = std::fs::FileTimes::new()
            .set_modified(md.modified().unwrap())
            .set_accessed(md.accessed().unwrap());
        std::fs::File::options()
            .write(true)
            .open(&replacement)
            .unwrap()
            .set_times(times)
            .unwrap();
        std::fs::rename(&replacement, &top).unwrap();
        let now = chain(&top, &cancel).await.unwrap();
        assert_eq!(now, truth(top.clone()).await);
        assert_eq!(now[1].filename, base);

        // A raw disk whose guest wrote a qcow2 header into it: read as raw below an overlay
        // that says so, but a probe of it (as a top) must see what qemu-img sees, never the
        // raw answer.
        let raw = dir.path().join("disk.raw");
        std::fs::copy(&mid, &raw).unwrap();
        let over_raw = overlay(dir.path(), "over-raw.qcow2", raw.to_str().unwrap());
        rebase(&over_raw, &raw, "raw");
        tokio::time::sleep(SETTLED + Duration::from_millis(300)).await;
        let asks = ASKS.with(std::cell::Cell::get);
        let via = chain(&over_raw, &cancel).await.unwrap();
        assert!(
            ASKS.with(std::cell::Cell::get) > asks,
            "an image read as raw was not left to qemu-img"
        );
        assert_eq!(via, truth(over_raw.clone()).await);
        assert_eq!(via[1].format, "raw");
        let probed = chain(&raw, &cancel).await.unwrap();
        assert_eq!(probed, truth(raw.clone()).await);
        assert_eq!(probed[0].format, "qcow2");
        // And one reader that read both keeps them apart too.
        let mut reader = Reader::default();
        assert_eq!(reader.chain(&over_raw, &cancel).await.unwrap(), via);
        assert_eq!(reader.chain(&raw, &cancel).await.unwrap(), probed);

        // A backing file gone: the same error as qemu-img's, never a cached chain.
        tokio::time::sleep(SETTLED + Duration::from_millis(300)).await;
        chain(&mid, &cancel).await.unwrap();
        std::fs::remove_file(&other).unwrap();
        assert!(image::chain(&mid, &cancel).await.is_err());
        assert!(chain(&mid, &cancel).await.is_err());
    }
}
