//! Files inside a sealed snapshot, read in place: the ext4 (or ext2/3) filesystem a file-tree
//! backup left on the volume, opened read-only straight from the pool's chunks through
//! [`maas_pool::SnapshotReader`] — no clone, no export, no kernel mount. The server side of
//! fine-grained restore: list a directory, read one file.
//!
//! The snapshot's bytes were written by a protected host and are untrusted. `ext4-view` (no
//! `unsafe`, checksums verified) still trusts some superblock fields with allocations and
//! arithmetic, and unwraps after a failed seek: so the superblock is checked here first
//! ([`check_superblock`]: block size, group geometry, descriptor size, size within the
//! snapshot), and every call into the reader runs under `catch_unwind`, a panic becoming a
//! [`FilesError::Filesystem`]. Directory listings are bounded ([`MAX_DIR_ENTRIES`]), and
//! damage found by the pool (a chunk failing its checksum) is reported as such, never returned
//! as data. `Ext4` is neither `Send` nor `Sync`: a [`SnapshotFiles`] lives on the one
//! (blocking) thread that opened it.

use ext4_view::{Ext4, Ext4Error, Ext4Read, FileType};
use maas_pool::{PoolError, SnapshotReader};

/// Largest directory listed (entries); a bigger one is refused rather than held in memory.
pub const MAX_DIR_ENTRIES: usize = 2_000_000;

#[derive(Debug, thiserror::Error)]
pub enum FilesError {
    #[error("the snapshot holds no filesystem that can be browsed (ext2/3/4 only): {0}")]
    NoFilesystem(String),
    #[error("{0}: no such file or directory in the snapshot")]
    NotFound(String),
    #[error("{0} is not a directory")]
    NotADirectory(String),
    #[error("{0} is not a regular file")]
    NotAFile(String),
    #[error("invalid path {0:?}: {1}")]
    InvalidPath(String, String),
    #[error("directory {0} has more than {MAX_DIR_ENTRIES} entries")]
    DirectoryTooLarge(String),
    #[error("the snapshot's filesystem is damaged or uses features this reader lacks: {0}")]
    Filesystem(String),
    /// The pool could not read the snapshot's bytes: damage found by its checksums, an
    /// archive that cannot be reached, the snapshot deleted meanwhile...
    #[error("reading the snapshot failed: {0}")]
    Pool(#[from] PoolError),
    #[error("reading the snapshot failed: {0}")]
    Read(String),
}

/// One entry of a directory listing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileEntry {
    /// The name, with bytes that are not UTF-8 replaced (see `name_is_utf8`).
    pub name: String,
    pub name_is_utf8: bool,
    /// The name's bytes as stored (what [`SnapshotFiles::list`]'s `after` takes).
    pub raw_name: Vec<u8>,
    /// `file`, `dir`, `symlink`, `fifo`, `socket`, `char` or `block` (as in file manifests).
    pub kind: &'static str,
    pub size: u64,
    /// Permission bits (`0o7777`).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    /// Where a symlink points (lossy UTF-8), for symlinks.
    pub link_target: Option<String>,
}

/// A page of a directory listing, entries sorted by name.
#[derive(Clone, Debug)]
pub struct Listing {
    pub entries: Vec<FileEntry>,
    /// Whether entries after the last one returned exist.
    pub more: bool,
}

/// The filesystem of one snapshot, opened for reading.
pub struct SnapshotFiles {
    fs: Ext4,
}

impl std::fmt::Debug for SnapshotFiles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SnapshotFiles").finish_non_exhaustive()
    }
}

/// A regular file of a snapshot, opened for reading from any position.
pub struct SnapshotFile {
    file: ext4_view::File,
    len: u64,
}

impl std::fmt::Debug for SnapshotFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SnapshotFile")
            .field("len", &self.len)
            .finish_non_exhaustive()
    }
}

/// The pool reader as ext4-view's byte source.
struct Source(SnapshotReader);

impl Ext4Read for Source {
    fn read(
        &mut self,
        start_byte: u64,
        dst: &mut [u8],
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync + 'static>> {
        self.0.read_at(start_byte, dst).map_err(Into::into)
    }
}

fn kind_of(t: FileType) -> &'static str {
    match t {
        FileType::Regular => "file",
        FileType::Directory => "dir",
        FileType::Symlink => "symlink",
        FileType::Fifo => "fifo",
        FileType::Socket => "socket",
        FileType::CharacterDevice => "char",
        FileType::BlockDevice => "block",
    }
}

/// Maps a reader error, telling the pool's damage reports apart from filesystem trouble.
fn map_err(path: &str, e: Ext4Error) -> FilesError {
    match e {
        Ext4Error::NotFound => FilesError::NotFound(path.into()),
        Ext4Error::NotADirectory => FilesError::NotADirectory(path.into()),
        Ext4Error::IsADirectory | Ext4Error::IsASpecialFile => FilesError::NotAFile(path.into()),
        Ext4Error::NotAbsolute | Ext4Error::MalformedPath | Ext4Error::PathTooLong => {
            FilesError::InvalidPath(path.into(), e.to_string())
        }
        Ext4Error::Io(io) => match io.downcast::<PoolError>() {
            // A block pointer past the end of the snapshot: the filesystem is wrong.
            Ok(p) if matches!(*p, PoolError::OutOfRange { .. }) => {
                FilesError::Filesystem(format!("{path}: {p}"))
            }
            Ok(p) => FilesError::Pool(*p),
            Err(io) => FilesError::Read(io.to_string()),
        },
        other => FilesError::Filesystem(other.to_string()),
    }
}

/// Runs a call into the ext4 reader; a panic in it (hostile metadata) is an error, not the
/// end of the thread's work.
fn guarded<T>(what: &str, f: impl FnOnce() -> Result<T, FilesError>) -> Result<T, FilesError> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(_) => {
            tracing::warn!(what, "the ext4 reader failed on this snapshot's metadata");
            Err(FilesError::Filesystem(format!(
                "{what}: the filesystem's metadata is inconsistent"
            )))
        }
    }
}

fn le16(b: &[u8], at: usize) -> u64 {
    u64::from(u16::from_le_bytes([b[at], b[at + 1]]))
}

fn le32(b: &[u8], at: usize) -> u64 {
    u64::from(u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]))
}

/// Largest block-group count accepted (a 16 TiB ext4 of 4 KiB blocks has 131072).
const MAX_GROUPS: u64 = 1 << 20;

/// Checks the fields of an ext2/3/4 superblock (the 1024 bytes at offset 1024) that the reader
/// sizes allocations and divides by, against themselves and the snapshot's size.
fn check_superblock(sb: &[u8], device_size: u64) -> Result<(), FilesError> {
    let bad = |why: String| Err(FilesError::NoFilesystem(why));
    if sb.len() < 1024 || le16(sb, 56) != 0xEF53 {
        return bad("no ext2/3/4 superblock at offset 1024".into());
    }
    let log = le32(sb, 24);
    if log > 6 {
        return bad(format!("block size 1024 << {log} is beyond 64 KiB"));
    }
    let bs = 1024u64 << log;
    let incompat = le32(sb, 96);
    let is_64bit = incompat & 0x80 != 0;
    let blocks = le32(sb, 4) | if is_64bit { le32(sb, 0x150) << 32 } else { 0 };
    let first = le32(sb, 20);
    let per_group = le32(sb, 32);
    let inodes_per_group = le32(sb, 40);
    if per_group < 8 || per_group > 8 * bs {
        return bad(format!("{per_group} blocks per group"));
    }
    if inodes_per_group == 0 || inodes_per_group > 8 * bs {
        return bad(format!("{inodes_per_group} inodes per group"));
    }
    if blocks == 0 || first >= blocks || blocks.checked_mul(bs).is_none_or(|b| b > device_size) {
        return bad(format!(
            "{blocks} blocks of {bs} bytes do not fit in the snapshot ({device_size} bytes)"
        ));
    }
    let groups = (blocks - first).div_ceil(per_group);
    if groups > MAX_GROUPS {
        return bad(format!("{groups} block groups"));
    }
    if is_64bit {
        let d = le16(sb, 0xFE);
        if !(64..=1024).contains(&d) || !d.is_power_of_two() {
            return bad(format!("group descriptors of {d} bytes"));
        }
    }
    let rev = le32(sb, 76);
    if rev >= 1 {
        let inode = le16(sb, 88);
        if !(128..=bs).contains(&inode) || !inode.is_power_of_two() {
            return bad(format!("inodes of {inode} bytes"));
        }
    }
    Ok(())
}

/// Checks a path from a request: absolute, no NUL, at most 4096 bytes. `..` and symlinks are
/// resolved inside the snapshot's filesystem, which is all there is to reach.
fn check_path(path: &str) -> Result<(), FilesError> {
    if !path.starts_with('/') {
        return Err(FilesError::InvalidPath(
            path.into(),
            "paths are absolute".into(),
        ));
    }
    if path.len() > 4096 || path.contains('\0') {
        return Err(FilesError::InvalidPath(
            path.into(),
            "at most 4096 bytes, no NUL".into(),
        ));
    }
    Ok(())
}

impl SnapshotFiles {
    /// Opens the filesystem at the start of the snapshot (the probe makes it on the whole
    /// volume, without a partition table).
    pub fn open(reader: SnapshotReader) -> Result<Self, FilesError> {
        let size = reader.size();
        Self::load(Box::new(Source(reader)), size)
    }

    fn load(mut source: Box<dyn Ext4Read>, size: u64) -> Result<Self, FilesError> {
        // Too small to hold even a superblock: say so rather than "out of range".
        if size < 2048 {
            return Err(FilesError::NoFilesystem(format!(
                "the snapshot is only {size} bytes"
            )));
        }
        let mut sb = vec![0u8; 1024];
        source
            .read(1024, &mut sb)
            .map_err(|e| map_err("/", Ext4Error::Io(e)))?;
        check_superblock(&sb, size)?;
        guarded("/", || match Ext4::load(source) {
            Ok(fs) => Ok(SnapshotFiles { fs }),
            // Damage or a failed read is that, not "no filesystem".
            Err(Ext4Error::Io(io)) => Err(map_err("/", Ext4Error::Io(io))),
            Err(e) => Err(FilesError::NoFilesystem(e.to_string())),
        })
    }

    /// Lists directory `dir` (symlinks in the path are followed within the snapshot), sorted
    /// by the names' bytes; `after` (a name's raw bytes) skips names up to and including it,
    /// `limit` caps the page.
    pub fn list(
        &self,
        dir: &str,
        after: Option<&[u8]>,
        limit: usize,
    ) -> Result<Listing, FilesError> {
        check_path(dir)?;
        guarded(dir, || self.list_unguarded(dir, after, limit))
    }

    fn list_unguarded(
        &self,
        dir: &str,
        after: Option<&[u8]>,
        limit: usize,
    ) -> Result<Listing, FilesError> {
        let rd = self.fs.read_dir(dir).map_err(|e| map_err(dir, e))?;
        let base = ext4_view::PathBuf::try_from(dir)
            .map_err(|e| FilesError::InvalidPath(dir.into(), e.to_string()))?;
        let mut names: Vec<Vec<u8>> = Vec::new();
        for entry in rd {
            let entry = entry.map_err(|e| map_err(dir, e))?;
            let name = entry.file_name();
            let bytes = name.as_ref().to_vec();
            if bytes == b"." || bytes == b".." {
                continue;
            }
            if names.len() >= MAX_DIR_ENTRIES {
                return Err(FilesError::DirectoryTooLarge(dir.into()));
            }
            names.push(bytes);
        }
        names.sort_unstable();
        let start = match after {
            Some(a) => names.partition_point(|n| n.as_slice() <= a),
            None => 0,
        };
        let end = start.saturating_add(limit).min(names.len());
        let mut entries = Vec::with_capacity(end - start);
        for bytes in &names[start..end] {
            let shown = String::from_utf8_lossy(bytes).into_owned();
            let path = base.join(bytes);
            let md = self
                .fs
                .symlink_metadata(&path)
                .map_err(|e| map_err(&shown, e))?;
            let kind = kind_of(md.file_type());
            let link_target = if kind == "symlink" {
                let t = self.fs.read_link(&path).map_err(|e| map_err(&shown, e))?;
                Some(String::from_utf8_lossy(t.as_ref()).into_owned())
            } else {
                None
            };
            entries.push(FileEntry {
                raw_name: bytes.clone(),
                name_is_utf8: std::str::from_utf8(bytes).is_ok(),
                name: shown,
                kind,
                size: md.len(),
                mode: u32::from(md.mode()),
                uid: md.uid(),
                gid: md.gid(),
                link_target,
            });
        }
        Ok(Listing {
            entries,
            more: end < names.len(),
        })
    }

    /// Opens regular file `path` (symlinks followed within the snapshot).
    pub fn open_file(&self, path: &str) -> Result<SnapshotFile, FilesError> {
        check_path(path)?;
        guarded(path, || {
            let file = self.fs.open(path).map_err(|e| map_err(path, e))?;
            let md = file.metadata();
            if md.file_type() != FileType::Regular {
                return Err(FilesError::NotAFile(path.into()));
            }
            let len = md.len();
            Ok(SnapshotFile { file, len })
        })
    }
}

impl SnapshotFile {
    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Moves to byte `pos` (at most the length).
    pub fn seek(&mut self, pos: u64) -> Result<(), FilesError> {
        let len = self.len;
        guarded("file", || {
            self.file
                .seek_to(pos.min(len))
                .map_err(|e| map_err("file", e))
        })
    }

    /// Fills as much of `buf` as it can from the current position; 0 at the end.
    pub fn read(&mut self, buf: &mut [u8]) -> Result<usize, FilesError> {
        guarded("file", || self.read_unguarded(buf))
    }

    fn read_unguarded(&mut self, buf: &mut [u8]) -> Result<usize, FilesError> {
        let mut done = 0;
        while done < buf.len() {
            let n = self
                .file
                .read_bytes(&mut buf[done..])
                .map_err(|e| map_err("file", e))?;
            if n == 0 {
                break;
            }
            done += n;
        }
        Ok(done)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    /// An ext4 image made by mke2fs from a folder (no mount needed).
    fn image() -> Vec<u8> {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        std::fs::create_dir_all(src.join("d/e")).unwrap();
        std::fs::write(src.join("d/e/f.txt"), b"hello").unwrap();
        for i in 0..300 {
            std::fs::write(src.join(format!("d/n{i:03}")), vec![i as u8; i * 37]).unwrap();
        }
        std::os::unix::fs::symlink("d/e/f.txt", src.join("link")).unwrap();
        let img = dir.path().join("img");
        let st = std::process::Command::new("mkfs.ext4")
            .args(["-q", "-F", "-b", "1024", "-d"])
            .arg(&src)
            .arg(&img)
            .arg("4M")
            .status()
            .expect("mkfs.ext4 (e2fsprogs) runs");
        assert!(st.success());
        std::fs::read(img).unwrap()
    }

    #[test]
    fn lists_pages_and_reads() {
        let img = image();
        let n = img.len() as u64;
        let fs = SnapshotFiles::load(Box::new(img), n).unwrap();
        let root = fs.list("/", None, 100).unwrap();
        let names: Vec<_> = root.entries.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(names, ["d", "link", "lost+found"]);
        assert_eq!(root.entries[1].kind, "symlink");
        assert_eq!(root.entries[1].link_target.as_deref(), Some("d/e/f.txt"));
        // Pages of a directory larger than one page, in name order, none lost or repeated.
        let mut seen = Vec::new();
        let mut after: Option<Vec<u8>> = None;
        loop {
            let page = fs.list("/d", after.as_deref(), 64).unwrap();
            seen.extend(page.entries.iter().map(|e| e.name.clone()));
            after = page.entries.last().map(|e| e.raw_name.clone());
            if !page.more {
                break;
            }
        }
        assert_eq!(seen.len(), 301);
        assert!(seen.windows(2).all(|w| w[0] < w[1]));
        let mut f = fs.open_file("/link").unwrap();
        let mut buf = vec![0u8; 64];
        let n = f.read(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"hello");
        let mut f = fs.open_file("/d/n299").unwrap();
        assert_eq!(f.len(), 299 * 37);
        f.seek(10000).unwrap();
        let mut buf = vec![0u8; 4096];
        let n = f.read(&mut buf).unwrap();
        assert_eq!(n, 299 * 37 - 10000);
        assert!(buf[..n].iter().all(|&b| b == 299u32 as u8));
        assert!(matches!(
            fs.list("/nope", None, 1),
            Err(FilesError::NotFound(_))
        ));
        assert!(matches!(
            fs.list("/link", None, 1),
            Err(FilesError::NotADirectory(_))
        ));
        assert!(matches!(fs.open_file("/d"), Err(FilesError::NotAFile(_))));
        assert!(matches!(
            fs.list("d", None, 1),
            Err(FilesError::InvalidPath(..))
        ));
    }

    #[test]
    fn not_a_filesystem_is_said_so() {
        let r = SnapshotFiles::load(Box::new(vec![0u8; 1 << 20]), 1 << 20);
        assert!(matches!(r, Err(FilesError::NoFilesystem(_))));
        // Superblocks whose fields would make the reader allocate gigabytes or divide by zero
        // are refused before it sees them.
        let good = image();
        let n = good.len() as u64;
        let set32 = |img: &mut Vec<u8>, at: usize, v: u32| {
            img[1024 + at..1024 + at + 4].copy_from_slice(&v.to_le_bytes())
        };
        for (at, v) in [
            (24usize, 21u32),
            (32, 0),
            (32, 1 << 30),
            (4, u32::MAX),
            (40, 0),
        ] {
            let mut img = good.clone();
            set32(&mut img, at, v);
            let r = SnapshotFiles::load(Box::new(img), n);
            assert!(
                matches!(r, Err(FilesError::NoFilesystem(_))),
                "field {at} = {v}"
            );
        }
    }

    /// A host can write anything into its volume: flipped bytes anywhere in the metadata give
    /// errors or (wrong but bounded) listings, never a panic or a hang.
    #[test]
    fn hostile_images_never_panic() {
        let good = image();
        let mut x = 0x1234_5678_9abc_def1u64;
        for _ in 0..300 {
            let mut img = good.clone();
            for _ in 0..8 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                // The first 256 KiB hold the superblock, group descriptors, bitmaps, inode
                // tables and the first directories.
                let at = (x % (256 << 10)) as usize;
                img[at] ^= (x >> 32) as u8 | 1;
            }
            let n = img.len() as u64;
            let Ok(fs) = SnapshotFiles::load(Box::new(img), n) else {
                continue;
            };
            for dir in ["/", "/d", "/d/e"] {
                let _ = fs.list(dir, None, 1000);
            }
            if let Ok(mut f) = fs.open_file("/d/e/f.txt") {
                let mut buf = vec![0u8; 4096];
                let _ = f.read(&mut buf);
            }
        }
    }
}
