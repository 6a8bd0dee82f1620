//! The file manifest of a file-tree backup: every entry of the volume's tree as the backup
//! left it (path, kind, size, mode, owner, mtime, BLAKE3 of each file's content, symlink
//! targets), recorded with the snapshot in maasd's catalog for browsing, drills and audit.
//!
//! It describes the volume, not the source: the tree is walked on the mounted volume. Contents
//! are hashed from the source where the source file still has the size and mtime the volume's
//! copy has (before and after hashing: a file changing meanwhile is hashed from the volume
//! instead), and not at all where the previous backup's manifest has the same path, size and
//! mtime — rsync's own test of "unchanged".

use std::collections::HashMap;
use std::io::Read;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use maas_api::ManifestEntry;

fn kind_of(ft: &std::fs::FileType) -> &'static str {
    if ft.is_dir() {
        "dir"
    } else if ft.is_symlink() {
        "symlink"
    } else if ft.is_fifo() {
        "fifo"
    } else if ft.is_socket() {
        "socket"
    } else if ft.is_char_device() {
        "char"
    } else if ft.is_block_device() {
        "block"
    } else {
        "file"
    }
}

fn mtime_ns(m: &std::fs::Metadata) -> i64 {
    m.mtime()
        .saturating_mul(1_000_000_000)
        .saturating_add(m.mtime_nsec())
}

fn hash_file(p: &Path) -> std::io::Result<String> {
    let mut f = std::fs::File::open(p)?;
    let mut h = blake3::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finalize().to_hex().to_string())
}

/// What building a manifest did.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct ManifestStats {
    pub entries: u64,
    /// Files hashed now (the others' hashes came from the previous manifest).
    pub files_hashed: u64,
    pub bytes_hashed: u64,
}

/// Walks the mounted volume `mnt` (leaving out its `/lost+found`) and builds the manifest,
/// sorted by path.
pub fn build(
    mnt: &Path,
    src: &Path,
    previous: &HashMap<String, ManifestEntry>,
) -> std::io::Result<(Vec<ManifestEntry>, ManifestStats)> {
    let mut entries = Vec::new();
    let mut to_hash: Vec<usize> = Vec::new();
    let mut stack: Vec<PathBuf> = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let full = mnt.join(&rel);
        let m = std::fs::symlink_metadata(&full)?;
        let ft = m.file_type();
        let path = format!("/{}", rel.to_string_lossy());
        let kind = kind_of(&ft);
        let mut e = ManifestEntry {
            path,
            kind: kind.to_string(),
            size: if ft.is_dir() { 0 } else { m.len() },
            mode: m.mode() & 0o7777,
            uid: m.uid(),
            gid: m.gid(),
            mtime_ns: mtime_ns(&m),
            blake3: None,
            target: None,
        };
        if ft.is_symlink() {
            e.target = Some(std::fs::read_link(&full)?.to_string_lossy().into_owned());
        }
        if kind == "file" {
            match previous.get(&e.path) {
                Some(p) if p.kind == "file" && p.size == e.size && p.mtime_ns == e.mtime_ns => {
                    e.blake3 = p.blake3.clone();
                }
                _ => {}
            }
            if e.blake3.is_none() {
                to_hash.push(entries.len());
            }
        }
        entries.push(e);
        if ft.is_dir() {
            let mut children: Vec<PathBuf> = std::fs::read_dir(&full)?
                .filter_map(|d| d.ok())
                .map(|d| rel.join(d.file_name()))
                .filter(|c| c.as_os_str() != "lost+found")
                .collect();
            children.sort();
            stack.extend(children.into_iter().rev());
        }
    }
    let stats = Mutex::new(ManifestStats::default());
    let next = AtomicUsize::new(0);
    let hashes: Vec<Mutex<Option<std::io::Result<String>>>> =
        to_hash.iter().map(|_| Mutex::new(None)).collect();
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2)
        .clamp(1, 8);
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(&idx) = to_hash.get(i) else { break };
                    let e = &entries[idx];
                    let rel = e.path.trim_start_matches('/');
                    let r = hash_one(&mnt.join(rel), &src.join(rel), e);
                    if let Ok(mut st) = stats.lock() {
                        st.files_hashed += 1;
                        st.bytes_hashed += e.size;
                    }
                    if let Ok(mut slot) = hashes[i].lock() {
                        *slot = Some(r);
                    }
                }
            });
        }
    });
    for (i, idx) in to_hash.iter().enumerate() {
        let r = hashes[i]
            .lock()
            .ok()
            .and_then(|mut s| s.take())
            .unwrap_or_else(|| Err(std::io::Error::other("not hashed")));
        entries[*idx].blake3 = Some(r?);
    }
    entries.sort_by(|a, b| a.path.cmp(&b.path));
    let mut stats = stats.into_inner().unwrap_or_default();
    stats.entries = entries.len() as u64;
    Ok((entries, stats))
}

/// The content hash of the volume's file `vol`: from the source `src` when it provably holds
/// the same bytes (same size and mtime before and after reading it), else from the volume.
fn hash_one(vol: &Path, src: &Path, e: &ManifestEntry) -> std::io::Result<String> {
    let same =
        |m: &std::fs::Metadata| m.is_file() && m.len() == e.size && mtime_ns(m) == e.mtime_ns;
    if let Ok(before) = std::fs::symlink_metadata(src)
        && same(&before)
        && let Ok(h) = hash_file(src)
        && std::fs::symlink_metadata(src).is_ok_and(|after| same(&after))
    {
        return Ok(h);
    }
    hash_file(vol)
}

/// JSON lines, as the API takes and gives them.
pub fn to_ndjson(entries: &[ManifestEntry]) -> Vec<u8> {
    let mut out = Vec::with_capacity(entries.len() * 160);
    for e in entries {
        if let Ok(line) = serde_json::to_vec(e) {
            out.extend_from_slice(&line);
            out.push(b'\n');
        }
    }
    out
}

pub fn from_ndjson(text: &[u8]) -> HashMap<String, ManifestEntry> {
    text.split(|&b| b == b'\n')
        .filter(|l| !l.is_empty())
        .filter_map(|l| serde_json::from_slice::<ManifestEntry>(l).ok())
        .map(|e| (e.path.clone(), e))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manifest_lists_the_tree_and_reuses_unchanged_hashes() {
        let d = tempfile::tempdir().expect("tempdir");
        let vol = d.path().join("vol");
        let src = d.path().join("src");
        for root in [&vol, &src] {
            std::fs::create_dir_all(root.join("sub")).expect("mkdir");
            std::fs::write(root.join("sub/a"), b"hello").expect("write");
            std::os::unix::fs::symlink("sub/a", root.join("link")).expect("symlink");
        }
        std::fs::create_dir_all(vol.join("lost+found")).expect("mkdir");
        // Same mtimes on both sides, as rsync leaves them.
        let t = std::fs::metadata(vol.join("sub/a"))
            .expect("meta")
            .modified()
            .expect("mtime");
        std::fs::File::options()
            .write(true)
            .open(src.join("sub/a"))
            .expect("open")
            .set_modified(t)
            .expect("set mtime");
        let (e, st) = build(&vol, &src, &HashMap::new()).expect("build");
        let paths: Vec<&str> = e.iter().map(|x| x.path.as_str()).collect();
        assert_eq!(paths, vec!["/", "/link", "/sub", "/sub/a"]);
        let a = &e[3];
        assert_eq!(
            a.blake3.as_deref(),
            Some(blake3::hash(b"hello").to_hex().as_str())
        );
        assert_eq!(e[1].target.as_deref(), Some("sub/a"));
        assert_eq!(st.files_hashed, 1);
        // Unchanged: nothing hashed again.
        let prev = from_ndjson(&to_ndjson(&e));
        let (e2, st2) = build(&vol, &src, &prev).expect("build");
        assert_eq!(e2, e);
        assert_eq!(st2.files_hashed, 0);
        // The source differs from the volume (changed after the copy): hashed from the volume.
        std::fs::write(src.join("sub/a"), b"HELLO, changed").expect("write");
        let (e3, _) = build(&vol, &src, &HashMap::new()).expect("build");
        assert_eq!(e3[3].blake3, a.blake3);
    }
}
