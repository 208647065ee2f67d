//! Signed bundles: minisign-compatible ed25519 keys (`qsnap keygen`), a signature over the
//! bundle's seal (`export --sign KEY`, the entry `qsnap-seal.json.minisig`), checked against
//! the keys the user trusts (`import --trust PUBKEY`). The seal holds the manifest's hash and
//! every file's, so one signature over it covers every byte of the bundle; `minisign -Vm
//! qsnap-seal.json -p KEY.pub` checks it too, once extracted.
//!
//! A secret key is written unencrypted, 0600, never over an existing file (like an ssh key
//! without a passphrase: fleets sign unattended). Never reads a password.

use crate::error::{BundleError, Error, Result};
use crate::store::{self, blocking};
use minisign::{KeyPair, PublicKey, PublicKeyBox, SecretKey, SecretKeyBox, SignatureBox};
use std::io::{Cursor, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// The entry holding the seal's signature (after the seal).
pub const SIGNATURE: &str = "qsnap-seal.json.minisig";

/// Makes a key pair: `<prefix>.key` (secret, 0600) and `<prefix>.pub`; neither may exist.
/// Returns their paths.
pub async fn keygen(prefix: &Path) -> Result<(PathBuf, PathBuf)> {
    let (sk_path, pk_path) = (with_suffix(prefix, "key"), with_suffix(prefix, "pub"));
    let (s, p) = (sk_path.clone(), pk_path.clone());
    blocking(move || {
        let KeyPair { pk, sk } = KeyPair::generate_unencrypted_keypair().map_err(bad_key(&s))?;
        let sk_text = sk
            .to_box(Some("qsnap bundle signing key"))
            .map_err(bad_key(&s))?
            .to_string();
        let pk_text = pk.to_box().map_err(bad_key(&p))?.to_string();
        write_new(&s, sk_text.as_bytes(), 0o600)?;
        if let Err(e) = write_new(&p, pk_text.as_bytes(), 0o644) {
            let _ = std::fs::remove_file(&s);
            return Err(e);
        }
        Ok(())
    })
    .await?;
    Ok((sk_path, pk_path))
}

fn with_suffix(prefix: &Path, ext: &str) -> PathBuf {
    let mut s = prefix.as_os_str().to_owned();
    s.push(".");
    s.push(ext);
    PathBuf::from(s)
}

fn write_new(path: &Path, data: &[u8], mode: u32) -> Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(|source| {
            if source.kind() == std::io::ErrorKind::AlreadyExists {
                Error::TargetExists {
                    path: path.to_owned(),
                }
            } else {
                store::io("writing a key", path)(source)
            }
        })?;
    f.write_all(data)
        .and_then(|()| f.sync_all())
        .map_err(store::io("writing a key", path))
}

fn bad_key(path: &Path) -> impl FnOnce(minisign::PError) -> Error + '_ {
    move |e| {
        BundleError::BadKey {
            path: path.to_owned(),
            why: format!("not a minisign key qsnap can use ({e}); `qsnap keygen` makes one"),
        }
        .into()
    }
}

/// A secret key read from its file (unencrypted: qsnap never asks for a password).
pub(crate) fn read_secret(path: &Path) -> Result<SecretKey> {
    let text = std::fs::read_to_string(path).map_err(store::io("reading the signing key", path))?;
    let sk = SecretKeyBox::from_string(&text)
        .and_then(SecretKeyBox::into_unencrypted_secret_key)
        .map_err(bad_key(path))?;
    Ok(sk)
}

/// A public key from its file (`<prefix>.pub`, or minisign's own format).
pub(crate) fn read_public(path: &Path) -> Result<PublicKey> {
    let text = std::fs::read_to_string(path).map_err(store::io("reading a trusted key", path))?;
    PublicKeyBox::from_string(&text)
        .and_then(PublicKeyBox::into_public_key)
        .or_else(|_| PublicKey::from_base64(text.trim()))
        .map_err(bad_key(path))
}

/// The signature of `seal` (the seal entry's bytes) by `sk`, as minisign writes it.
pub(crate) fn sign(sk: &SecretKey, seal: &[u8], what: &str) -> Result<Vec<u8>> {
    let comment = format!("qsnap bundle {what} seal {}", super::hash_bytes(seal));
    minisign::sign(None, sk, Cursor::new(seal), Some(&comment), None)
        .map(|s| s.into_string().into_bytes())
        .map_err(|e| Error::Io {
            what: "signing the bundle",
            path: PathBuf::from("(the bundle)"),
            source: std::io::Error::other(e.to_string()),
        })
}

/// Whether `signature` is a valid signature of `seal` by one of `keys`.
pub(crate) fn verify(keys: &[PublicKey], seal: &[u8], signature: Option<&[u8]>) -> Result<()> {
    let Some(sig) = signature else {
        return Err(BundleError::Corrupt {
            why: "it is not signed, and --trust asks for a bundle signed by a trusted key".into(),
        }
        .into());
    };
    let sig = std::str::from_utf8(sig)
        .ok()
        .and_then(|s| SignatureBox::from_string(s).ok())
        .ok_or_else(|| {
            Error::from(BundleError::Corrupt {
                why: "its signature is unreadable".into(),
            })
        })?;
    if keys
        .iter()
        .any(|k| minisign::verify(k, &sig, Cursor::new(seal), true, false, false).is_ok())
    {
        Ok(())
    } else {
        Err(BundleError::Corrupt {
            why: "its signature is not by a key you trust (or the bundle was changed after it was signed)".into(),
        }
        .into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_signature_verifies_only_with_its_key_and_only_for_its_seal() {
        let dir = tempfile::tempdir().unwrap();
        let (sk, pk) = keygen(&dir.path().join("k")).await.unwrap();
        let (_, other) = keygen(&dir.path().join("o")).await.unwrap();
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&sk).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert!(matches!(
            keygen(&dir.path().join("k")).await,
            Err(Error::TargetExists { .. })
        ));
        let sig = sign(&read_secret(&sk).unwrap(), b"seal", "vm/s1").unwrap();
        let key = read_public(&pk).unwrap();
        verify(std::slice::from_ref(&key), b"seal", Some(&sig)).unwrap();
        assert!(verify(std::slice::from_ref(&key), b"seaL", Some(&sig)).is_err());
        assert!(verify(&[read_public(&other).unwrap()], b"seal", Some(&sig)).is_err());
        assert!(verify(std::slice::from_ref(&key), b"seal", None).is_err());
        assert!(verify(&[key], b"seal", Some(b"garbage")).is_err());
    }
}
