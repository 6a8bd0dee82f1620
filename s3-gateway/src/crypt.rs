//! Client-side encryption of a target's objects (optional, per target): with it the bucket
//! holds only ciphertext — pool objects, pack indexes (and so the chunk digests), snapshot
//! manifests (volume names, sizes) and the writers' digest keys — and the provider learns
//! nothing but object sizes and the times they were written.
//!
//! One random 256-bit *archive key* per encrypted prefix. It never goes to the bucket; the
//! manager keeps it sealed in its catalog and hands it to the user once, as a *recovery key*
//! (`maasrk1-` + 64 hex digits of the key + 8 of a checksum), which a new installation gives
//! back to read the bucket after a disaster. The bucket's manifest names the key by its *key
//! id* (a BLAKE3 derivation that reveals nothing of the key), so a wrong key is refused at
//! once instead of every object later failing its tag.
//!
//! Everything is sealed with XChaCha20-Poly1305 under a fresh random 192-bit nonce (random
//! nonces of this size cannot collide in practice, so no counter must survive crashes),
//! written before the ciphertext and its 16-byte tag. Two subkeys are derived from the
//! archive key (objects; documents and indexes) and each sealed thing carries associated data
//! naming what it is (an object its digest, a manifest its snapshot id), so nothing can be
//! swapped for another without failing its tag.

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};

use crate::error::{ArchiveError, Result};

/// The algorithm as the API and the bucket's manifest name it.
pub const ALGORITHM: &str = "xchacha20-poly1305";
pub const NONCE_LEN: usize = 24;
pub const TAG_LEN: usize = 16;
/// Bytes a sealed thing takes beyond its plaintext.
pub const OVERHEAD: usize = NONCE_LEN + TAG_LEN;

const RECOVERY_PREFIX: &str = "maasrk1-";

/// A target's archive key. Not `Clone`, and `Debug` shows only its id: the key itself is
/// shown to nobody but the user, once.
pub struct ArchiveKey([u8; 32]);

impl ArchiveKey {
    /// A new random key.
    pub fn generate() -> ArchiveKey {
        let mut k = [0u8; 32];
        rand::Rng::fill(&mut rand::thread_rng(), &mut k[..]);
        ArchiveKey(k)
    }

    pub fn from_bytes(k: [u8; 32]) -> ArchiveKey {
        ArchiveKey(k)
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// Names the key without revealing it (32 hex digits).
    pub fn key_id(&self) -> String {
        let id = blake3::derive_key("maas archive 2026-12 key id", &self.0);
        hex::encode(&id[..16])
    }

    /// The key as a user writes it down: `maasrk1-<64 hex digits><8 hex digits of checksum>`.
    pub fn recovery_key(&self) -> String {
        format!(
            "{RECOVERY_PREFIX}{}{}",
            hex::encode(self.0),
            hex::encode(checksum(&self.0))
        )
    }

    /// Reads a recovery key back; spaces and dashes between digits are ignored, a typo is
    /// caught by the checksum.
    pub fn from_recovery_key(s: &str) -> Result<ArchiveKey> {
        let bad = |why: &str| {
            ArchiveError::Invalid(format!(
                "recovery_key: {why} (expected {RECOVERY_PREFIX} and 72 hex digits, as given when the target was created)"
            ))
        };
        let rest = s
            .trim()
            .strip_prefix(RECOVERY_PREFIX)
            .ok_or_else(|| bad("not a MaaS recovery key"))?;
        let digits: String = rest
            .chars()
            .filter(|c| !c.is_whitespace() && *c != '-')
            .collect();
        if digits.len() != 72 {
            return Err(bad("wrong length"));
        }
        let mut raw = [0u8; 36];
        hex::decode_to_slice(&digits, &mut raw).map_err(|_| bad("not hex"))?;
        let mut k = [0u8; 32];
        k.copy_from_slice(&raw[..32]);
        if raw[32..] != checksum(&k) {
            return Err(bad("checksum does not match: a digit is wrong"));
        }
        Ok(ArchiveKey(k))
    }
}

impl std::fmt::Debug for ArchiveKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ArchiveKey(id {})", self.key_id())
    }
}

impl Drop for ArchiveKey {
    fn drop(&mut self) {
        // Best effort: the key does not outlive its use in this buffer.
        self.0 = [0u8; 32];
    }
}

fn checksum(k: &[u8; 32]) -> [u8; 4] {
    let h = blake3::derive_key("maas archive 2026-12 recovery key checksum", k);
    [h[0], h[1], h[2], h[3]]
}

/// What a sealed thing is: its associated data.
#[derive(Debug, Clone, Copy)]
pub enum Sealed<'a> {
    /// A pool object in a pack, bound to its digest.
    Object(&'a [u8; 32]),
    /// A pack's index.
    PackIndex,
    /// A snapshot's manifest, bound to the snapshot id.
    SnapshotManifest(&'a str),
    /// A pool's digest keys, bound to the pool id.
    DigestKeys(&'a str),
}

impl Sealed<'_> {
    fn aad(&self) -> Vec<u8> {
        let (what, name): (&[u8], &[u8]) = match self {
            Sealed::Object(d) => (b"maas-object-v1:", &d[..]),
            Sealed::PackIndex => (b"maas-pack-index-v1:", b""),
            Sealed::SnapshotManifest(id) => (b"maas-snapshot-manifest-v1:", id.as_bytes()),
            Sealed::DigestKeys(pool) => (b"maas-digest-keys-v1:", pool.as_bytes()),
        };
        [what, name].concat()
    }

    fn is_object(&self) -> bool {
        matches!(self, Sealed::Object(_))
    }
}

/// Seals and opens a target's objects and documents.
pub struct Cipher {
    objects: XChaCha20Poly1305,
    documents: XChaCha20Poly1305,
    key_id: String,
}

impl std::fmt::Debug for Cipher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cipher")
            .field("algorithm", &ALGORITHM)
            .field("key_id", &self.key_id)
            .finish_non_exhaustive()
    }
}

impl Cipher {
    pub fn new(key: &ArchiveKey) -> Cipher {
        let sub = |ctx: &str| {
            let k = blake3::derive_key(ctx, key.as_bytes());
            XChaCha20Poly1305::new(chacha20poly1305::Key::from_slice(&k))
        };
        Cipher {
            objects: sub("maas archive 2026-12 object encryption"),
            documents: sub("maas archive 2026-12 document encryption"),
            key_id: key.key_id(),
        }
    }

    pub fn key_id(&self) -> &str {
        &self.key_id
    }

    fn aead(&self, what: &Sealed<'_>) -> &XChaCha20Poly1305 {
        if what.is_object() {
            &self.objects
        } else {
            &self.documents
        }
    }

    /// `nonce || ciphertext || tag`.
    pub fn seal(&self, what: Sealed<'_>, plain: &[u8]) -> Vec<u8> {
        let mut nonce = [0u8; NONCE_LEN];
        rand::Rng::fill(&mut rand::thread_rng(), &mut nonce[..]);
        let aad = what.aad();
        let mut out = Vec::with_capacity(plain.len() + OVERHEAD);
        out.extend_from_slice(&nonce);
        match self.aead(&what).encrypt(
            XNonce::from_slice(&nonce),
            Payload {
                msg: plain,
                aad: &aad,
            },
        ) {
            Ok(ct) => out.extend_from_slice(&ct),
            // Only inputs beyond 256 GiB fail; none of ours come near.
            Err(_) => out.clear(),
        }
        out
    }

    /// Opens what [`Cipher::seal`] sealed as `what`; None when it is not (damaged, another
    /// key, or something else).
    pub fn open(&self, what: Sealed<'_>, sealed: &[u8]) -> Option<Vec<u8>> {
        if sealed.len() < OVERHEAD {
            return None;
        }
        let (nonce, ct) = sealed.split_at(NONCE_LEN);
        let aad = what.aad();
        self.aead(&what)
            .decrypt(XNonce::from_slice(nonce), Payload { msg: ct, aad: &aad })
            .ok()
    }
}

/// A JSON document of the bucket (snapshot manifest, digest keys) as stored: sealed in an
/// envelope that says so when the target encrypts, as is otherwise.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct Envelope {
    format: String,
    version: u32,
    algorithm: String,
    key_id: String,
    /// Hex of `nonce || ciphertext || tag`.
    sealed: String,
}

const ENVELOPE_FORMAT: &str = "maas-sealed";

/// The stored form of document `plain`.
pub fn seal_document(cipher: Option<&Cipher>, what: Sealed<'_>, plain: Vec<u8>) -> Vec<u8> {
    let Some(c) = cipher else { return plain };
    let env = Envelope {
        format: ENVELOPE_FORMAT.into(),
        version: 1,
        algorithm: ALGORITHM.into(),
        key_id: c.key_id.clone(),
        sealed: hex::encode(c.seal(what, &plain)),
    };
    serde_json::to_vec_pretty(&env).unwrap_or_default()
}

/// A document read from the bucket, opened: a sealed one needs the target's key (and the
/// right one), a target with a key reads only sealed documents.
pub fn open_document(
    cipher: Option<&Cipher>,
    what: Sealed<'_>,
    stored: &[u8],
    key: &str,
) -> Result<Vec<u8>> {
    let env: Option<Envelope> = serde_json::from_slice::<Envelope>(stored)
        .ok()
        .filter(|e| e.format == ENVELOPE_FORMAT);
    match (cipher, env) {
        (None, None) => Ok(stored.to_vec()),
        (None, Some(e)) => Err(ArchiveError::KeyRequired {
            detail: format!(
                "{key} is encrypted (key id {}): create the target with its recovery key",
                e.key_id
            ),
        }),
        (Some(_), None) => Err(ArchiveError::Damaged {
            key: key.into(),
            detail: "not encrypted, but the target is: it was not written by this archive".into(),
        }),
        (Some(c), Some(e)) => {
            if e.version != 1 || e.algorithm != ALGORITHM {
                return Err(ArchiveError::Unsupported {
                    what: key.into(),
                    detail: format!(
                        "sealed with {:?} version {} (this build reads {ALGORITHM} version 1)",
                        e.algorithm, e.version
                    ),
                });
            }
            if e.key_id != c.key_id {
                return Err(ArchiveError::KeyMismatch {
                    detail: format!(
                        "{key} is sealed with key {}, the target's key is {}",
                        e.key_id, c.key_id
                    ),
                });
            }
            let damaged = |detail: &str| ArchiveError::Damaged {
                key: key.into(),
                detail: detail.into(),
            };
            let sealed = hex::decode(&e.sealed).map_err(|_| damaged("sealed data is not hex"))?;
            c.open(what, &sealed)
                .ok_or_else(|| damaged("failed its authentication tag"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recovery_keys_round_trip_and_typos_are_caught() {
        let k = ArchiveKey::generate();
        let rk = k.recovery_key();
        assert!(rk.starts_with("maasrk1-"));
        let back = ArchiveKey::from_recovery_key(&rk).unwrap();
        assert_eq!(back.as_bytes(), k.as_bytes());
        assert_eq!(back.key_id(), k.key_id());
        // Grouped as a user may write it.
        let digits = &rk[8..];
        let grouped: Vec<&str> = (0..digits.len())
            .step_by(8)
            .map(|i| &digits[i..(i + 8).min(digits.len())])
            .collect();
        let spaced = format!("maasrk1-{}", grouped.join(" - "));
        assert!(ArchiveKey::from_recovery_key(&spaced).is_ok());
        // Every single changed digit is caught.
        for i in 8..rk.len() {
            let mut b = rk.clone().into_bytes();
            b[i] = if b[i] == b'0' { b'1' } else { b'0' };
            let s = String::from_utf8(b).unwrap();
            assert!(ArchiveKey::from_recovery_key(&s).is_err(), "digit {i}");
        }
        assert!(ArchiveKey::from_recovery_key("").is_err());
        assert!(ArchiveKey::from_recovery_key("maasrk1-zz").is_err());
        // The id says nothing a user could mistake for the key.
        assert!(!rk.contains(&k.key_id()));
    }

    #[test]
    fn sealed_things_open_only_as_what_they_are_with_their_key() {
        let k = ArchiveKey::generate();
        let c = Cipher::new(&k);
        let d = [7u8; 32];
        let s = c.seal(Sealed::Object(&d), b"chunk bytes");
        assert_eq!(s.len(), b"chunk bytes".len() + OVERHEAD);
        assert!(!s.windows(5).any(|w| w == b"chunk"));
        assert_eq!(c.open(Sealed::Object(&d), &s).unwrap(), b"chunk bytes");
        // Another digest, another kind of thing, another key, a flipped bit: refused.
        assert!(c.open(Sealed::Object(&[8u8; 32]), &s).is_none());
        assert!(c.open(Sealed::PackIndex, &s).is_none());
        assert!(
            Cipher::new(&ArchiveKey::generate())
                .open(Sealed::Object(&d), &s)
                .is_none()
        );
        for i in 0..s.len() {
            let mut b = s.clone();
            b[i] ^= 1;
            assert!(c.open(Sealed::Object(&d), &b).is_none(), "bit at {i}");
        }
        assert!(c.open(Sealed::Object(&d), &s[..OVERHEAD - 1]).is_none());
        // Two seals of the same bytes differ (fresh nonces).
        assert_ne!(s, c.seal(Sealed::Object(&d), b"chunk bytes"));
    }

    #[test]
    fn documents_need_the_right_key_and_a_keyed_target_reads_only_sealed_ones() {
        let k = ArchiveKey::generate();
        let c = Cipher::new(&k);
        let what = Sealed::SnapshotManifest("snap-1");
        // (A name of no hex digits: the sealed bytes are written in hex.)
        let stored = seal_document(Some(&c), what, b"{\"volume\":\"payroll\"}".to_vec());
        assert!(!stored.windows(7).any(|w| w == b"payroll"));
        assert_eq!(
            open_document(Some(&c), what, &stored, "k").unwrap(),
            b"{\"volume\":\"payroll\"}"
        );
        let e = open_document(None, what, &stored, "k").unwrap_err();
        assert_eq!(e.code(), "ARCHIVE_KEY_REQUIRED");
        let other = Cipher::new(&ArchiveKey::generate());
        let e = open_document(Some(&other), what, &stored, "k").unwrap_err();
        assert_eq!(e.code(), "ARCHIVE_KEY_MISMATCH");
        // Moved to another snapshot's name: refused.
        let e =
            open_document(Some(&c), Sealed::SnapshotManifest("snap-2"), &stored, "k").unwrap_err();
        assert_eq!(e.code(), "ARCHIVE_OBJECT_DAMAGED");
        // A plain document where a sealed one belongs: refused, not trusted.
        let e = open_document(Some(&c), what, b"{\"volume\":\"payroll\"}", "k").unwrap_err();
        assert_eq!(e.code(), "ARCHIVE_OBJECT_DAMAGED");
        assert_eq!(
            open_document(None, what, b"{}", "k").unwrap(),
            b"{}".to_vec()
        );
    }
}
