//! Where a remote is: a URL → an object store client and a key prefix, and the keys of its
//! objects. Credentials come from the environment (`AWS_*`, as every S3 tool reads them) and
//! never appear in anything this module formats: store errors go through [`redact`].

use crate::error::{RemoteError, Result};
use crate::format::RemoteName;
use object_store::path::Path as Key;
use object_store::ObjectStore;
use std::sync::Arc;

/// An object store holding qsnap snapshots under a prefix.
#[derive(Clone)]
pub struct Remote {
    pub(crate) store: Arc<dyn ObjectStore>,
    prefix: Key,
    url: String,
}

impl std::fmt::Debug for Remote {
    // The client's own Debug could show configuration; the URL is all a reader needs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Remote").field("url", &self.url).finish()
    }
}

impl Remote {
    /// Opens `s3://BUCKET[/PREFIX]` (any S3-compatible store: `AWS_ENDPOINT_URL`,
    /// `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_REGION`; `AWS_ALLOW_HTTP=true` for
    /// a plain-http endpoint) or `file:///DIR` (a shared directory, which must exist).
    /// Nothing is contacted yet.
    pub fn open(url: &str) -> Result<Remote> {
        let bad = |why: &str| RemoteError::BadUrl {
            url: url.to_owned(),
            why: why.to_owned(),
        };
        let (store, prefix): (Arc<dyn ObjectStore>, &str) =
            if let Some(rest) = url.strip_prefix("s3://") {
                let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
                if bucket.is_empty() {
                    return Err(bad("no bucket (s3://BUCKET/PREFIX)"));
                }
                use object_store::aws::AmazonS3ConfigKey as K;
                use object_store::ClientConfigKey as C;
                // Bounded: a store that stops answering fails the command in about a minute
                // (retried meanwhile), not after object_store's default three.
                let mut b = object_store::aws::AmazonS3Builder::from_env()
                    .with_bucket_name(bucket)
                    .with_retry(object_store::RetryConfig {
                        max_retries: 5,
                        retry_timeout: std::time::Duration::from_secs(60),
                        ..object_store::RetryConfig::default()
                    });
                if std::env::var_os("AWS_CONNECT_TIMEOUT").is_none() {
                    b = b.with_config(K::Client(C::ConnectTimeout), "5s");
                }
                // A stalled transfer fails in a minute; a slow one may take its time (an
                // 8 MiB chunk on a slow link), so the whole request gets half an hour.
                if std::env::var_os("AWS_READ_TIMEOUT").is_none() {
                    b = b.with_config(K::Client(C::ReadTimeout), "60s");
                }
                if std::env::var_os("AWS_TIMEOUT").is_none() {
                    b = b.with_config(K::Client(C::Timeout), "30m");
                }
                // Said the way the other AWS_* variables are; https otherwise.
                if std::env::var("AWS_ALLOW_HTTP").is_ok_and(|v| v == "true" || v == "1") {
                    b = b.with_allow_http(true);
                }
                if std::env::var_os("AWS_REGION").is_none()
                    && std::env::var_os("AWS_DEFAULT_REGION").is_none()
                {
                    b = b.with_region("us-east-1");
                }
                let s3 = b.build().map_err(|e| bad(&e.to_string()))?;
                (Arc::new(s3), prefix)
            } else if let Some(dir) = url.strip_prefix("file://") {
                if !dir.starts_with('/') {
                    return Err(bad("a file URL names an absolute directory (file:///DIR)"));
                }
                if !std::path::Path::new(dir).is_dir() {
                    return Err(bad("no such directory (create it first)"));
                }
                let fs = object_store::local::LocalFileSystem::new_with_prefix(dir)
                    .map_err(|e| bad(&e.to_string()))?;
                (Arc::new(fs), "")
            } else {
                return Err(bad("qsnap knows s3://BUCKET/PREFIX and file:///DIR"));
            };
        let prefix = Key::parse(prefix.trim_matches('/')).map_err(|e| bad(&e.to_string()))?;
        Ok(Remote {
            store,
            prefix,
            url: url.trim_end_matches('/').to_owned(),
        })
    }

    /// A remote in memory, for unit tests of what does not need a real store.
    #[cfg(test)]
    pub(crate) fn in_memory() -> Remote {
        Remote {
            store: Arc::new(object_store::memory::InMemory::new()),
            prefix: Key::from("p"),
            url: "memory://p".into(),
        }
    }

    /// The URL, as given (credentials never are part of one).
    pub fn url(&self) -> &str {
        &self.url
    }

    fn key(&self, parts: &[&str]) -> Key {
        let mut k = self.prefix.clone();
        for p in parts {
            k = k.clone().join(*p);
        }
        k
    }

    /// `chunks/ab/<hash>`: a chunk, zstd-compressed, named by the BLAKE3 of its plain bytes.
    pub(crate) fn chunk_key(&self, hash: &str) -> Key {
        self.key(&["chunks", &hash[..2], hash])
    }

    /// Where the chunks are.
    pub(crate) fn chunks_prefix(&self) -> Key {
        self.key(&["chunks"])
    }

    /// `snapshots/VM/SNAP.json`.
    pub(crate) fn manifest_key(&self, name: &RemoteName) -> Key {
        self.key(&[
            "snapshots",
            name.vm.as_str(),
            &format!("{}.json", name.snapshot),
        ])
    }

    /// Where the manifests are.
    pub(crate) fn manifests_prefix(&self) -> Key {
        self.key(&["snapshots"])
    }

    /// The chunk hash a chunk key names (`None` for anything else under `chunks/`).
    pub(crate) fn hash_of(&self, key: &Key) -> Option<String> {
        let h = key.filename()?;
        (h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit())).then(|| h.to_owned())
    }

    /// The snapshot name a manifest key names.
    pub(crate) fn name_of(&self, key: &Key) -> Option<RemoteName> {
        let parts: Vec<_> = key.parts().collect();
        let n = parts.len();
        if n < 2 {
            return None;
        }
        let snap = parts[n - 1].as_ref().strip_suffix(".json")?;
        RemoteName::parse(&format!("{}/{snap}", parts[n - 2].as_ref())).ok()
    }

    /// A store error, with what was being done; the message names objects, not keys.
    pub(crate) fn err(
        &self,
        what: impl Into<String>,
    ) -> impl FnOnce(object_store::Error) -> RemoteError + '_ {
        let what = what.into();
        move |e| RemoteError::Store {
            url: self.url.clone(),
            what,
            message: redact(&e.to_string()),
        }
    }
}

/// A store's error message as qsnap may show it: a store's response body can echo the
/// request (an S3 `SignatureDoesNotMatch` carries the access key id and the canonical
/// request, session token included), so the credentials' values are cut out, and the rest
/// is cut short.
pub(crate) fn redact(message: &str) -> String {
    let mut m = message.to_owned();
    for var in [
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
    ] {
        if let Ok(v) = std::env::var(var) {
            if v.len() >= 4 {
                m = m.replace(&v, &format!("<{var}>"));
            }
        }
    }
    if m.len() > 2000 {
        let mut end = 2000;
        while !m.is_char_boundary(end) {
            end -= 1;
        }
        m.truncate(end);
        m.push_str(" …");
    }
    m
}
