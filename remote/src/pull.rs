//! `qsnap pull`: a remote manifest → a bundle stream built from its chunks → `import`,
//! which checks, stages and commits it as it does any bundle (same checks, same refusals,
//! nothing registered unless every byte matches the seal).
//!
//! ```text
//! manifest (refused: missing, cut short, another format, chunk lists that are no file)
//! → fetcher (async): chunks in order, from the cache or the store, at most N in flight;
//!   each hashed before use (refused, naming it: missing, damaged) → kept in the cache
//! → writer (blocking): the bundle stream (engine's TarStream) into a pipe
//! → import (engine): reads the pipe
//! ```
//! Any failure (or Ctrl-C) closes the pipe: import sees a bundle cut short and removes its
//! staging. The chunk cache keeps what was fetched, so a re-run fetches only the rest.
//!
//! Never hands import a byte whose chunk did not hash to its name; never writes a local file
//! but the chunk cache (import writes the VM); never reads more of a chunk object than a
//! chunk of its length can compress to.

use crate::cache::Cache;
use crate::chunk;
use crate::error::{RemoteError, Result};
use crate::format::{ChunkRef, RemoteManifest, RemoteName, FORMAT, MANIFEST_LIMIT, VERSION};
use crate::location::Remote;
use futures::StreamExt;
use object_store::ObjectStoreExt;
use qsnap_engine::bundle::{TarStream, MANIFEST_ENTRY, SEAL_ENTRY, SIGNATURE_ENTRY};
use qsnap_engine::{Engine, ImportOptions, ImportReport, VmName};
use serde::Serialize;
use std::sync::{Arc, Mutex};
use std::time::Instant;
use tokio_util::sync::CancellationToken;

/// How to pull.
#[derive(Debug, Clone)]
pub struct PullOptions {
    /// What `import` is told (disk directory, trust, QEMU, progress).
    pub import: ImportOptions,
    /// Chunks in flight at once.
    pub parallel: usize,
    /// Cancelled (Ctrl-C): the pull stops, import removes its staging.
    pub cancel: CancellationToken,
}

impl Default for PullOptions {
    fn default() -> Self {
        PullOptions {
            import: ImportOptions::default(),
            parallel: 8,
            cancel: CancellationToken::new(),
        }
    }
}

/// What a pull did.
#[derive(Debug, Clone, Serialize, schemars::JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub struct PullReport {
    /// The remote.
    pub url: String,
    /// `VM/SNAPSHOT` there.
    pub name: String,
    /// Chunks of the snapshot (as listed; a chunk used twice counts twice).
    pub chunks: usize,
    /// Chunks fetched from the store.
    pub downloaded_chunks: usize,
    /// Bytes fetched (compressed, as stored).
    pub downloaded_bytes: u64,
    /// Chunks found in the local cache.
    pub cached_chunks: usize,
    /// Plain bytes of the chunks found in the local cache.
    pub cached_bytes: u64,
    /// What `import` did.
    pub import: ImportReport,
    /// Wall time.
    pub total_ms: f64,
}

#[derive(Default)]
struct Tally {
    downloaded_chunks: usize,
    downloaded_bytes: u64,
    cached_chunks: usize,
    cached_bytes: u64,
}

impl Remote {
    /// Reads and checks the manifest of `name`.
    pub async fn manifest(&self, name: &RemoteName) -> Result<RemoteManifest> {
        let key = self.manifest_key(name);
        let got = match self.store.get(&key).await {
            Ok(g) => g,
            Err(object_store::Error::NotFound { .. }) => {
                return Err(RemoteError::NotFound {
                    url: self.url().to_owned(),
                    name: name.to_string(),
                })
            }
            Err(e) => return Err(self.err(format!("reading the manifest of {name}"))(e)),
        };
        let corrupt = |why: String| RemoteError::Corrupt {
            url: self.url().to_owned(),
            why: format!("the manifest of {name} ({key}) {why}"),
        };
        if got.meta.size > MANIFEST_LIMIT {
            return Err(corrupt(format!(
                "is {} bytes, too big to be one",
                got.meta.size
            )));
        }
        let bytes = got
            .bytes()
            .await
            .map_err(self.err(format!("reading the manifest of {name}")))?;
        // Format and version first, leniently: another version is said as such, not as damage.
        #[derive(serde::Deserialize)]
        struct Head {
            format: Option<String>,
            version: Option<u32>,
        }
        if let Ok(h) = serde_json::from_slice::<Head>(&bytes) {
            if h.format.as_deref() != Some(FORMAT) || h.version != Some(VERSION) {
                return Err(corrupt(format!(
                    "is format {:?} version {:?}, and this qsnap reads {FORMAT} version {VERSION}",
                    h.format.unwrap_or_default(),
                    h.version
                )));
            }
        }
        let m: RemoteManifest = serde_json::from_slice(&bytes)
            .map_err(|e| corrupt(format!("is not readable ({e}): cut short or damaged")))?;
        m.check()
            .map_err(|why| corrupt(format!("is refused: {why}")))?;
        if m.name != name.to_string() {
            return Err(corrupt(format!("names another snapshot ({})", m.name)));
        }
        Ok(m)
    }

    /// Pulls `name` into VM `into` of `engine`'s store, as `import` would a bundle.
    pub async fn pull(
        &self,
        engine: &Engine,
        name: &RemoteName,
        into: &VmName,
        opts: &PullOptions,
    ) -> Result<PullReport> {
        let started = Instant::now();
        let m = self.manifest(name).await?;
        // Into a VM that exists, only the incremental view can go (import checks that the VM
        // holds its base); a new VM takes the whole snapshot.
        let exists = engine.store().has_vm(into).await?;
        let view = match (exists, m.incremental) {
            (true, Some(i)) => i.view,
            (true, None) => {
                // Said before anything is fetched: import would refuse the whole view here.
                return Err(RemoteError::Engine(
                    qsnap_engine::BundleError::ImportRefused {
                        why: format!(
                            "VM {into} exists, and {name} has no incremental view to add to it (push it with --base SNAP, SNAP a snapshot {into} holds), so pull it into a new VM name"
                        ),
                    }
                    .into(),
                ));
            }
            (false, _) => m.whole,
        };
        let chunks = view.files.iter().map(|f| f.chunks.len()).sum::<usize>();
        let m = Arc::new(view);
        if !opts.import.trust.is_empty() {
            // Known before any chunk: an unsigned or foreign snapshot costs no download.
            qsnap_engine::bundle::check_signature(
                &opts.import.trust,
                m.seal.as_bytes(),
                m.signature.as_deref().map(str::as_bytes),
            )
            .await?;
        }
        let cache = Cache::of_store(engine.store().root());
        cache.sweep().await;
        let (reader, writer) =
            nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| RemoteError::Io {
                what: "making a pipe for the bundle stream",
                path: engine.store().root().to_owned(),
                source: e.into(),
            })?;
        let (reader, writer) = (std::fs::File::from(reader), std::fs::File::from(writer));
        let tally = Arc::new(Mutex::new(Tally::default()));
        let failed: Arc<Mutex<Option<RemoteError>>> = Arc::default();
        let parallel = opts.parallel.max(1);
        // Small: the fetch window (`buffered`) is what runs ahead; each item is a chunk.
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<u8>>(2);

        // Fetcher: every chunk of every file, in order.
        let fetcher = {
            let (remote, m, tally, failed) =
                (self.clone(), m.clone(), tally.clone(), failed.clone());
            let cancel = opts.cancel.clone();
            tokio::spawn(async move {
                let refs: Vec<(String, ChunkRef)> = m
                    .files
                    .iter()
                    .flat_map(|f| f.chunks.iter().map(|c| (f.name.clone(), c.clone())))
                    .collect();
                let fetches = futures::stream::iter(refs)
                    .map(|(file, c)| {
                        let (remote, cache, tally) = (&remote, &cache, &tally);
                        async move { remote.fetch(cache, &file, &c, tally).await }
                    })
                    .buffered(parallel);
                futures::pin_mut!(fetches);
                loop {
                    let next = tokio::select! {
                        () = cancel.cancelled() => Some(Err(RemoteError::Interrupted)),
                        n = fetches.next() => n,
                    };
                    match next {
                        None => return,
                        Some(Ok(plain)) => {
                            if tx.send(plain).await.is_err() {
                                return; // the writer stopped: import has refused
                            }
                        }
                        Some(Err(e)) => {
                            *failed.lock().expect("not poisoned") = Some(e);
                            return;
                        }
                    }
                }
            })
        };

        // Writer: the bundle stream, on a blocking thread.
        let stream_writer = {
            let m = m.clone();
            tokio::task::spawn_blocking(move || -> std::io::Result<()> {
                let mut t = TarStream::new(std::io::BufWriter::with_capacity(1 << 20, writer));
                t.add_bytes(MANIFEST_ENTRY, m.bundle.as_bytes())?;
                for f in &m.files {
                    let mut regions: Vec<(u64, u64)> = Vec::new();
                    for c in &f.chunks {
                        match regions.last_mut() {
                            Some(last) if last.0 + last.1 == c.offset => last.1 += u64::from(c.len),
                            _ => regions.push((c.offset, u64::from(c.len))),
                        }
                    }
                    t.add_sparse(&f.name, f.size, &regions, &mut |w| {
                        for c in &f.chunks {
                            let plain = rx.blocking_recv().ok_or_else(|| {
                                std::io::Error::other("the chunks stopped coming")
                            })?;
                            w(c.offset, &plain)?;
                        }
                        Ok(())
                    })?;
                }
                t.add_bytes(SEAL_ENTRY, m.seal.as_bytes())?;
                if let Some(sig) = &m.signature {
                    t.add_bytes(SIGNATURE_ENTRY, sig.as_bytes())?;
                }
                t.finish()?;
                Ok(())
            })
        };

        let imported = engine.import(Box::new(reader), into, &opts.import).await;
        if imported.is_err() {
            // Nothing more is needed: stop fetching before waiting for the writer (which
            // then sees the channel close, or the pipe's reader gone).
            fetcher.abort();
        }
        let _ = stream_writer.await;
        fetcher.abort();
        let _ = fetcher.await;
        // A chunk that could not be had (or Ctrl-C) explains an import that saw the stream
        // stop; any other refusal of import's is its own.
        if let Some(e) = failed.lock().expect("not poisoned").take() {
            if matches!(
                imported,
                Err(qsnap_engine::Error::Bundle(
                    qsnap_engine::BundleError::Corrupt { .. }
                ))
            ) {
                return Err(e);
            }
        }
        let import = imported?;
        let t = std::mem::take(&mut *tally.lock().expect("not poisoned"));
        Ok(PullReport {
            url: self.url().to_owned(),
            name: name.to_string(),
            chunks,
            downloaded_chunks: t.downloaded_chunks,
            downloaded_bytes: t.downloaded_bytes,
            cached_chunks: t.cached_chunks,
            cached_bytes: t.cached_bytes,
            import,
            total_ms: started.elapsed().as_secs_f64() * 1e3,
        })
    }

    /// One chunk's plain bytes: from the cache when it has it intact, else from the store
    /// (then cached); hashed either way before use.
    async fn fetch(
        &self,
        cache: &Cache,
        file: &str,
        c: &ChunkRef,
        tally: &Mutex<Tally>,
    ) -> Result<Vec<u8>> {
        let open = |stored: Vec<u8>, hash: String, len: u32| {
            tokio::task::spawn_blocking(move || {
                chunk::open(&stored, &hash, len).map(|p| (p, stored))
            })
        };
        if let Some(stored) = cache.get(&c.hash).await {
            match open(stored, c.hash.clone(), c.len).await.expect("no panic") {
                Ok((plain, _)) => {
                    let mut t = tally.lock().expect("not poisoned");
                    t.cached_chunks += 1;
                    t.cached_bytes += u64::from(c.len);
                    return Ok(plain);
                }
                Err(_) => cache.drop_bad(&c.hash).await,
            }
        }
        let corrupt = |why: String| RemoteError::Corrupt {
            url: self.url().to_owned(),
            why: format!(
                "{why} (file {file}, offset {}); nothing was registered",
                c.offset
            ),
        };
        let key = self.chunk_key(&c.hash);
        let stored = match self.store.get(&key).await {
            Ok(g) => {
                // No chunk of this length compresses to more: a bigger object is not it.
                let bound = zstd::zstd_safe::compress_bound(c.len as usize) as u64;
                if g.meta.size > bound {
                    return Err(corrupt(format!(
                        "chunk {} is {} bytes in the store, more than a chunk of {} bytes can be",
                        c.hash, g.meta.size, c.len
                    )));
                }
                g.bytes()
                    .await
                    .map_err(self.err(format!("fetching chunk {}", c.hash)))?
            }
            Err(object_store::Error::NotFound { .. }) => {
                return Err(corrupt(format!(
                    "chunk {} is missing from the store",
                    c.hash
                )))
            }
            Err(e) => return Err(self.err(format!("fetching chunk {}", c.hash))(e)),
        };
        let n = stored.len() as u64;
        let (plain, stored) = open(stored.to_vec(), c.hash.clone(), c.len)
            .await
            .expect("no panic")
            .map_err(corrupt)?;
        if let Err(e) = cache.put(&c.hash, &stored).await {
            // The chunk is good; only a later pull would miss it.
            tracing::warn!(error = %e, chunk = %c.hash, "a fetched chunk could not be cached");
        }
        let mut t = tally.lock().expect("not poisoned");
        t.downloaded_chunks += 1;
        t.downloaded_bytes += n;
        Ok(plain)
    }
}
