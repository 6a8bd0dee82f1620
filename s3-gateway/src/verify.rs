//! Reading archived objects back, always checked: one object with one ranged GET (what lazy
//! reads of an archive-only clone will use), and a whole snapshot end to end (the verify
//! job). A missing or damaged object is an error naming its bucket object — never data.

use std::collections::{BTreeMap, HashMap};

use maas_pool::Pool;
use maas_pool::archive::PackRec;
use maas_pool::import::DigestKeys;
use maas_pool::object::ObjectKind;
use maas_pool::types::Digest;

use crate::Archive;
use crate::bucket::Bucket;
use crate::error::{ArchiveError, Result};
use crate::manifest::SnapshotManifest;
use crate::pack;

/// One archived object's raw (decoded) bytes, fetched with a ranged GET and checked.
pub async fn fetch_object(
    bucket: &Bucket,
    pool: &Pool,
    target: &str,
    d: &Digest,
) -> Result<(ObjectKind, Vec<u8>)> {
    fetch_object_from(bucket, pool, target, d, None).await
}

/// As [`fetch_object`], for objects written by the pool whose keys are `source`.
pub async fn fetch_object_from(
    bucket: &Bucket,
    pool: &Pool,
    target: &str,
    d: &Digest,
    source: Option<&DigestKeys>,
) -> Result<(ObjectKind, Vec<u8>)> {
    let (loc, pack) = pool
        .archive_locate(target, d)?
        .ok_or_else(|| ArchiveError::Missing {
            key: format!("object {d} (no pack of this target holds it)"),
        })?;
    let bytes = bucket
        .get_range(&pack.key, loc.offset, u64::from(loc.len))
        .await
        .map_err(|e| missing_is_pack(e, bucket, &pack))?;
    let stored =
        pack::open_object(bucket.cipher(), d, &bytes).map_err(|e| e.at(bucket.key(&pack.key)))?;
    let raw = check(pool, source, d, loc.kind, &stored, bucket, &pack.key)?;
    Ok((loc.kind, raw))
}

fn missing_is_pack(e: ArchiveError, bucket: &Bucket, pack: &PackRec) -> ArchiveError {
    match e {
        ArchiveError::Missing { .. } => ArchiveError::Missing {
            key: bucket.key(&pack.key),
        },
        other => other,
    }
}

pub(crate) fn check(
    pool: &Pool,
    source: Option<&DigestKeys>,
    d: &Digest,
    kind: ObjectKind,
    bytes: &[u8],
    bucket: &Bucket,
    pack_key: &str,
) -> Result<Vec<u8>> {
    pool.check_stored_object(source, d, kind, bytes, &format!("object {d}"))
        .map_err(|e| ArchiveError::Damaged {
            key: bucket.key(pack_key),
            detail: e.to_string(),
        })
}

/// What a verify found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VerifyReport {
    pub objects: u64,
    pub packs: u64,
    pub bytes_read: u64,
}

/// Checks an archived snapshot end to end: its manifest, then every pack it names (whole,
/// one GET each: header, index and trailer checked, the index compared with the pool's
/// records) and every object of the snapshot in them (every CRC, and the digest).
pub fn verify_snapshot(
    archive: &Archive,
    pool: &Pool,
    bucket: &Bucket,
    target: &str,
    snapshot_id: &str,
    progress: &mut dyn FnMut(f64),
) -> Result<VerifyReport> {
    let key = SnapshotManifest::key(snapshot_id);
    let manifest = crate::restore::read_manifest(archive, bucket, snapshot_id)?;
    // What to check: the objects the pool records for this snapshot's packs, by pack.
    let mut by_pack: BTreeMap<String, Vec<(Digest, u64, u32, ObjectKind)>> = BTreeMap::new();
    let mut objects = 0u64;
    if let Some(root) = &manifest.root {
        let root = parse_digest(root, &key)?;
        // The pool's own index names the objects (the manifest names only the root).
        let image = pool_objects_from_archive(archive, pool, bucket, target, &root, None)?;
        for (d, _) in image {
            let (loc, pack) =
                pool.archive_locate(target, &d)?
                    .ok_or_else(|| ArchiveError::Missing {
                        key: format!("object {d} (no pack of this target holds it)"),
                    })?;
            if !manifest.packs.contains(&pack.key) {
                return Err(ArchiveError::Damaged {
                    key: bucket.key(&key),
                    detail: format!("does not list pack {} that holds object {d}", pack.key),
                });
            }
            by_pack
                .entry(pack.key)
                .or_default()
                .push((d, loc.offset, loc.len, loc.kind));
            objects += 1;
        }
    }
    let mut report = VerifyReport {
        objects,
        ..Default::default()
    };
    let total = by_pack.len().max(1) as f64;
    for (i, (pack_key, objs)) in by_pack.iter().enumerate() {
        let bytes =
            archive
                .block_on(bucket.get(pack_key))?
                .ok_or_else(|| ArchiveError::Missing {
                    key: bucket.key(pack_key),
                })?;
        report.bytes_read += bytes.len() as u64;
        report.packs += 1;
        check_pack(pool, bucket, pack_key, &bytes, objs, |_| None)?;
        progress((i + 1) as f64 / total);
    }
    Ok(report)
}

/// Checks a whole pack read from the bucket: its header, index and trailer, that its index
/// places each of `objs` (digest, offset, length, kind) where the pool recorded it, and each
/// of them (opened, for an encrypted target) against its digest with the keys `keys` gives
/// for it (None: this pool's). Returns them as the pool stores them.
pub(crate) fn check_pack<'k>(
    pool: &Pool,
    bucket: &Bucket,
    pack_key: &str,
    bytes: &[u8],
    objs: &[(Digest, u64, u32, ObjectKind)],
    keys: impl Fn(&Digest) -> Option<&'k DigestKeys>,
) -> Result<Vec<(Digest, ObjectKind, Vec<u8>)>> {
    let index: HashMap<Digest, (u64, u32)> = pack::parse_pack(bytes, bucket.cipher())
        .map_err(|e| e.at(bucket.key(pack_key)))?
        .iter()
        .map(|e| (e.digest, (e.offset, e.len)))
        .collect();
    let mut out = Vec::with_capacity(objs.len());
    for (d, off, len, kind) in objs {
        if index.get(d) != Some(&(*off, *len)) {
            return Err(ArchiveError::Damaged {
                key: bucket.key(pack_key),
                detail: format!("its index does not place object {d} where it was recorded"),
            });
        }
        let b = &bytes[*off as usize..(*off + u64::from(*len)) as usize];
        let stored =
            pack::open_object(bucket.cipher(), d, b).map_err(|e| e.at(bucket.key(pack_key)))?;
        check(pool, keys(d), d, *kind, &stored, bucket, pack_key)?;
        out.push((*d, *kind, stored));
    }
    Ok(out)
}

pub(crate) fn parse_digest(hex_digest: &str, key: &str) -> Result<Digest> {
    let mut d = [0u8; 32];
    hex::decode_to_slice(hex_digest, &mut d).map_err(|e| ArchiveError::Damaged {
        key: key.into(),
        detail: format!("root digest: {e}"),
    })?;
    Ok(Digest(d))
}

/// The objects of the image under `root`, walking index nodes fetched from the archive
/// (checked, with the keys of the pool that wrote them: `source`, None for this pool), so
/// that a verify does not depend on the pool still holding the snapshot.
pub(crate) fn pool_objects_from_archive(
    archive: &Archive,
    pool: &Pool,
    bucket: &Bucket,
    target: &str,
    root: &Digest,
    source: Option<&DigestKeys>,
) -> Result<Vec<(Digest, ObjectKind)>> {
    let mut out = vec![(*root, ObjectKind::Node)];
    let mut seen = std::collections::HashSet::from([*root]);
    let node = |d: &Digest| -> Result<maas_pool::index::Node> {
        let (_, raw) = archive.block_on(fetch_object_from(bucket, pool, target, d, source))?;
        maas_pool::index::Node::decode(&raw).map_err(|e| ArchiveError::Damaged {
            key: format!("index node {d}"),
            detail: e.to_string(),
        })
    };
    let root_node = node(root)?;
    let mut chunks = Vec::new();
    for leaf in root_node.children() {
        if !seen.insert(*leaf) {
            continue; // a leaf repeated in the root: its chunks are listed already
        }
        out.push((*leaf, ObjectKind::Node));
        for c in node(leaf)?.children() {
            if seen.insert(*c) {
                chunks.push((*c, ObjectKind::Chunk));
            }
        }
    }
    out.extend(chunks);
    Ok(out)
}
