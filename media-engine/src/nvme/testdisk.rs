//! A RAM disk for the NVMe layer's unit tests: 512-byte blocks, any capacity (only the first
//! 16 MiB are kept; beyond, reads see zeroes and writes are dropped), and a count of flushes.

use parking_lot::Mutex;

pub struct RamDisk {
    capacity: u64,
    pub data: Mutex<Vec<u8>>,
    pub flushes: Mutex<u32>,
}

impl RamDisk {
    pub fn new(capacity: u64) -> RamDisk {
        RamDisk {
            capacity,
            data: Mutex::new(vec![0; capacity.min(16 << 20) as usize]),
            flushes: Mutex::new(0),
        }
    }

    fn with_range(&self, off: u64, len: usize, f: impl FnOnce(&mut [u8], usize)) {
        let mut d = self.data.lock();
        let start = (off as usize).min(d.len());
        let end = (off as usize + len).min(d.len());
        f(&mut d[start..end], end - start);
    }
}

impl crate::BlockDevice for RamDisk {
    fn capacity(&self) -> u64 {
        self.capacity
    }
    fn block_size(&self) -> u32 {
        512
    }
    fn read(&self, off: u64, b: &mut [u8]) -> maas_pool::Result<()> {
        b.fill(0);
        self.with_range(off, b.len(), |d, n| b[..n].copy_from_slice(d));
        Ok(())
    }
    fn write(&self, off: u64, b: &[u8], _: bool) -> maas_pool::Result<()> {
        self.with_range(off, b.len(), |d, n| d.copy_from_slice(&b[..n]));
        Ok(())
    }
    fn flush(&self) -> maas_pool::Result<()> {
        *self.flushes.lock() += 1;
        Ok(())
    }
    fn write_zeroes(&self, off: u64, len: u64, _: bool) -> maas_pool::Result<()> {
        self.with_range(off, len as usize, |d, _| d.fill(0));
        Ok(())
    }
    fn discard(&self, off: u64, len: u64) -> maas_pool::Result<()> {
        self.write_zeroes(off, len, false)
    }
}
