//! Reading and replaying the log of Linux's `dm-log-writes` target, for the power-loss test
//! through a real kernel (`tests/tests/guest_powerloss.rs`).
//!
//! `dm-log-writes` sits between a filesystem and its device and records every write, discard
//! and flush the kernel sends down, plus marks that userspace inserts (`dmsetup message DEV 0
//! mark NAME`). It logs a plain write only once a later flush covers it (a FUA write as soon as
//! it completes), in completion order, so the log is the order in which data reached stable
//! storage. Replaying entries `[0, F]`, where `F` is a flush, gives the device as a power cut
//! right after that flush leaves it; the writes logged after `F` and before the next flush were
//! still in the device's volatile cache and may each have reached the medium or not.
//!
//! On-disk layout (`drivers/md/dm-log-writes.c`, format version 1): block 0 holds the
//! superblock (magic, version, number of entries, sector size); then each entry is one block
//! holding its header (sector, number of sectors, flags, length of private data) and the mark
//! text if any, followed, for a write, by its data. Sector numbers and counts are in units of
//! the sector size.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

const MAGIC: u64 = 0x006a_7366_7773_6872;
const VERSION: u64 = 1;
pub const FLUSH: u64 = 1 << 0;
pub const FUA: u64 = 1 << 1;
pub const DISCARD: u64 = 1 << 2;
pub const MARK: u64 = 1 << 3;
/// Entries a log may claim: far beyond any test's, small enough to bound what we allocate.
const MAX_ENTRIES: u64 = 16 << 20;

/// One logged request.
#[derive(Clone, Debug)]
pub struct Entry {
    /// First sector written or discarded, in `sector_size` units.
    pub sector: u64,
    pub nr_sectors: u64,
    pub flags: u64,
    /// The mark's name, for a mark.
    pub mark: Option<String>,
    /// Where this entry's data starts in the log file (writes only).
    pub data_offset: u64,
}

impl Entry {
    pub fn is_flush(&self) -> bool {
        self.flags & FLUSH != 0
    }
    pub fn is_fua(&self) -> bool {
        self.flags & FUA != 0
    }
    pub fn is_discard(&self) -> bool {
        self.flags & DISCARD != 0
    }
    /// Whether replaying this entry changes the device.
    pub fn changes_data(&self) -> bool {
        self.nr_sectors > 0 && self.flags & MARK == 0
    }
}

/// A parsed log: its entries, with the log file kept open to read their data.
#[derive(Debug)]
pub struct Log {
    file: File,
    pub sector_size: u64,
    pub entries: Vec<Entry>,
    /// Bytes of the log file the entries use (superblock included).
    pub used_bytes: u64,
}

fn le64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

fn invalid(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

impl Log {
    /// Parses the log at `path` (a file, or the log device itself).
    pub fn open(path: &Path) -> io::Result<Log> {
        let file = File::open(path)?;
        let mut sb = [0u8; 28];
        file.read_exact_at(&mut sb, 0)?;
        if le64(&sb, 0) != MAGIC || le64(&sb, 8) != VERSION {
            return Err(invalid(format!(
                "{}: not a dm-log-writes log (version 1)",
                path.display()
            )));
        }
        let nr_entries = le64(&sb, 16);
        let sector_size = u64::from(u32::from_le_bytes([sb[24], sb[25], sb[26], sb[27]]));
        if !(512..=65536).contains(&sector_size) || !sector_size.is_power_of_two() {
            return Err(invalid(format!("log sector size {sector_size}")));
        }
        if nr_entries > MAX_ENTRIES {
            return Err(invalid(format!("log claims {nr_entries} entries")));
        }
        let mut entries = Vec::with_capacity(nr_entries as usize);
        let mut pos = sector_size;
        let mut block = vec![0u8; sector_size as usize];
        for i in 0..nr_entries {
            file.read_exact_at(&mut block, pos)?;
            let (sector, nr_sectors, flags, data_len) = (
                le64(&block, 0),
                le64(&block, 8),
                le64(&block, 16),
                le64(&block, 24),
            );
            if flags == 0 && nr_sectors == 0 {
                return Err(invalid(format!("entry {i} at byte {pos} is empty")));
            }
            let mark = if flags & MARK != 0 {
                let len = (data_len as usize).min(block.len() - 32);
                Some(String::from_utf8_lossy(&block[32..32 + len]).into_owned())
            } else {
                None
            };
            pos += sector_size;
            let data_offset = pos;
            if flags & (DISCARD | MARK) == 0 {
                pos += nr_sectors * sector_size;
            }
            entries.push(Entry {
                sector,
                nr_sectors,
                flags,
                mark,
                data_offset,
            });
        }
        Ok(Log {
            file,
            sector_size,
            entries,
            used_bytes: pos,
        })
    }

    /// Index of the mark named `name`.
    pub fn mark(&self, name: &str) -> Option<usize> {
        self.entries
            .iter()
            .position(|e| e.mark.as_deref() == Some(name))
    }

    /// Applies entry `i` to `image`: its first `sectors` sectors (all of them if `None`), as a
    /// write torn by the power cut would land. A discard reads back as zeroes.
    pub fn apply(&self, i: usize, image: &File, sectors: Option<u64>) -> io::Result<()> {
        let e = &self.entries[i];
        if !e.changes_data() {
            return Ok(());
        }
        let n = sectors.unwrap_or(e.nr_sectors).min(e.nr_sectors);
        let (ss, mut done) = (self.sector_size, 0u64);
        let mut buf = vec![0u8; (1 << 20).min(n * ss) as usize];
        while done < n {
            let step = (n - done).min(buf.len() as u64 / ss);
            let chunk = &mut buf[..(step * ss) as usize];
            if e.is_discard() {
                chunk.fill(0);
            } else {
                self.file.read_exact_at(chunk, e.data_offset + done * ss)?;
            }
            image.write_all_at(chunk, (e.sector + done) * ss)?;
            done += step;
        }
        Ok(())
    }
}

/// Copies the used part of the log on `device` to `out` (a log device is mostly empty).
pub fn extract(device: &Path, out: &Path) -> io::Result<u64> {
    let log = Log::open(device)?;
    let src = File::open(device)?;
    let dst = File::create(out)?;
    let mut buf = vec![0u8; 1 << 20];
    let mut off = 0u64;
    while off < log.used_bytes {
        let n = (log.used_bytes - off).min(buf.len() as u64) as usize;
        src.read_exact_at(&mut buf[..n], off)?;
        dst.write_all_at(&buf[..n], off)?;
        off += n as u64;
    }
    dst.sync_all()?;
    Ok(log.used_bytes)
}
