//! The block commands (SBC-3/SBC-4): reads, writes, verification, WRITE SAME, UNMAP, COMPARE
//! AND WRITE, ORWRITE, WRITE ATOMIC, cache synchronisation and the capacity and provisioning
//! reports.

use std::sync::Arc;

use super::cdb::{
    BlockRange, be16, be32, be64, bit, block_range, check_range, op, sa, truncate, u8_at,
};
use super::limits::{
    MAX_LBA_STATUS_DESCRIPTORS, MAX_UNMAP_DESCRIPTORS, MAX_UNMAP_LBA_COUNT, OPTIMAL_TRANSFER_BYTES,
};
use super::lu::{IoKind, LogicalUnit};
use super::opcodes::CommandInfo;
use super::sense::{Asc, Sense};
use super::{Command, Response};
use maas_pool::{AsyncRead, PoolError};

use crate::flow::Start;

/// FUA bit of READ/WRITE (10/12/16), COMPARE AND WRITE and ORWRITE.
const FUA: u8 = 3;

impl LogicalUnit {
    pub(super) fn block_command(
        &self,
        info: &CommandInfo,
        cmd: &Command<'_>,
        capacity: u64,
    ) -> Result<Response, Sense> {
        let cdb = cmd.cdb;
        let data = cmd.data_out;
        match info.op {
            op::READ_6 | op::READ_10 | op::READ_12 | op::READ_16 => self.read(cdb, capacity),
            op::WRITE_6 | op::WRITE_10 | op::WRITE_12 | op::WRITE_16 => {
                self.write(cdb, data, capacity, false)
            }
            op::WRITE_AND_VERIFY_10 | op::WRITE_AND_VERIFY_12 | op::WRITE_AND_VERIFY_16 => {
                self.write(cdb, data, capacity, true)
            }
            op::VERIFY_10 | op::VERIFY_12 | op::VERIFY_16 => self.verify(cdb, data, capacity),
            op::PRE_FETCH_10 | op::PRE_FETCH_16 => {
                let r = block_range(cdb);
                self.check_transfer(cdb, r, capacity)?;
                // Nothing is cached ahead of use, so GOOD rather than CONDITION MET.
                Ok(Response::good())
            }
            op::SYNCHRONIZE_CACHE_10 | op::SYNCHRONIZE_CACHE_16 => {
                self.synchronize_cache(cdb, capacity)
            }
            op::WRITE_SAME_10 | op::WRITE_SAME_16 => self.write_same(cdb, data, capacity),
            op::UNMAP => self.unmap(cdb, data, capacity),
            op::COMPARE_AND_WRITE => self.compare_and_write(cdb, data, capacity),
            op::ORWRITE_16 => self.orwrite(cdb, data, capacity),
            op::WRITE_ATOMIC_16 => self.write_atomic(cdb, data, capacity),
            op::READ_CAPACITY_10 => read_capacity_10(cdb, capacity, self.limits.block_size),
            op::SERVICE_ACTION_IN_16 => match info.sa {
                Some(sa::READ_CAPACITY_16) => Ok(self.read_capacity_16(cdb, capacity)),
                Some(sa::GET_LBA_STATUS) => self.get_lba_status(cdb, capacity),
                _ => Err(Sense::invalid_cdb_field(1, Some(4))),
            },
            op::READ_DEFECT_DATA_10 | op::READ_DEFECT_DATA_12 => read_defect_data(cdb),
            _ => Err(Sense::invalid_opcode()),
        }
    }

    /// Whether a write must be durable before GOOD: its FUA bit (WRITE (6) has none), or a
    /// disabled write cache.
    fn wants_fua(&self, cdb: &[u8]) -> bool {
        (u8_at(cdb, 0) != op::WRITE_6 && bit(cdb, 1, FUA)) || !self.write_cache_enabled()
    }

    /// Checks the transfer length against the Block Limits maximum and the range against the
    /// capacity.
    fn check_transfer(&self, cdb: &[u8], r: BlockRange, capacity: u64) -> Result<(), Sense> {
        if r.blocks > self.limits.max_transfer {
            return Err(Sense::invalid_cdb_field(transfer_length_at(cdb), None));
        }
        check_range(r.lba, u64::from(r.blocks), capacity)
    }

    fn offset_and_len(&self, lba: u64, blocks: u64) -> Result<(u64, usize), Sense> {
        match (self.limits.offset(lba), self.limits.bytes(blocks)) {
            (Some(offset), Some(len)) => Ok((offset, len)),
            _ => Err(Sense::lba_out_of_range()),
        }
    }

    fn read_blocks(&self, lba: u64, blocks: u64) -> Result<Vec<u8>, Sense> {
        let (offset, len) = self.offset_and_len(lba, blocks)?;
        // Filled whole by the read before it is sent (see bufpool).
        let mut buf = crate::bufpool::take(len);
        self.dev
            .read(offset, &mut buf)
            .map_err(|e| self.io_sense(&e, IoKind::Read))?;
        Ok(buf)
    }

    fn write_blocks(&self, lba: u64, data: &[u8], fua: bool) -> Result<(), Sense> {
        let offset = self
            .limits
            .offset(lba)
            .ok_or_else(Sense::lba_out_of_range)?;
        self.dev
            .write(offset, data, fua)
            .map_err(|e| self.io_sense(&e, IoKind::Write))
    }

    /// READ (6/10/12/16). DPO is a caching hint we have no use for; FUA on a read asks for
    /// data from the medium, which is where every read comes from.
    fn read(&self, cdb: &[u8], capacity: u64) -> Result<Response, Sense> {
        let r = block_range(cdb);
        self.check_transfer(cdb, r, capacity)?;
        if r.blocks == 0 {
            return Ok(Response::good());
        }
        self.read_blocks(r.lba, u64::from(r.blocks))
            .map(Response::data)
    }

    /// READ as [`LogicalUnit::read`] if the blocks are in memory; None (nothing done) if the
    /// device would have to be read.
    pub(super) fn read_nowait(&self, cdb: &[u8], capacity: u64) -> Option<Result<Response, Sense>> {
        let r = block_range(cdb);
        if let Err(s) = self.check_transfer(cdb, r, capacity) {
            return Some(Err(s));
        }
        if r.blocks == 0 {
            return Some(Ok(Response::good()));
        }
        let (offset, len) = match self.offset_and_len(r.lba, u64::from(r.blocks)) {
            Ok(x) => x,
            Err(s) => return Some(Err(s)),
        };
        // Filled whole by the read before it is sent (see bufpool).
        let mut buf = crate::bufpool::take(len);
        match self.dev.read_nowait(offset, &mut buf) {
            Ok(true) => Some(Ok(Response::data(buf))),
            Ok(false) => {
                crate::bufpool::give(buf);
                None
            }
            Err(e) => Some(Err(self.io_sense(&e, IoKind::Read))),
        }
    }

    /// READ as [`LogicalUnit::read`], started on the caller's thread: answered here from
    /// memory (or with an error found before any I/O), a future that waits for the device
    /// without a blocking thread (see [`maas_pool::BlockDevice::read_async`]), or
    /// [`Start::Blocking`] (nothing done) if it cannot be done either way.
    pub(super) fn read_start(
        self: &Arc<Self>,
        cdb: &[u8],
        capacity: u64,
    ) -> Start<Result<Response, Sense>> {
        let r = block_range(cdb);
        if let Err(s) = self.check_transfer(cdb, r, capacity) {
            return Start::Done(Err(s));
        }
        if r.blocks == 0 {
            return Start::Done(Ok(Response::good()));
        }
        let (offset, len) = match self.offset_and_len(r.lba, u64::from(r.blocks)) {
            Ok(x) => x,
            Err(s) => return Start::Done(Err(s)),
        };
        // Filled whole by the read before it is sent (see bufpool).
        match self.dev.read_async(offset, crate::bufpool::take(len)) {
            AsyncRead::Done(Ok(buf)) => Start::Done(Ok(Response::data(buf))),
            AsyncRead::Done(Err(e)) => Start::Done(Err(self.io_sense(&e, IoKind::Read))),
            AsyncRead::Pending(read) => {
                let lu = self.clone();
                Start::Future(Box::pin(async move {
                    read.await
                        .map(Response::data)
                        .map_err(|e| lu.io_sense(&e, IoKind::Read))
                }))
            }
            AsyncRead::Blocking(buf) => {
                crate::bufpool::give(buf);
                Start::Blocking
            }
        }
    }

    /// WRITE as [`LogicalUnit::write`] if the write cache takes it without waiting; None
    /// (nothing written) for FUA, a disabled write cache, or a write that would wait.
    pub(super) fn write_nowait(
        &self,
        cdb: &[u8],
        data: &[u8],
        capacity: u64,
    ) -> Option<Result<Response, Sense>> {
        let (r, data) = match self.write_range(cdb, data, capacity) {
            Ok(x) => x,
            Err(s) => return Some(Err(s)),
        };
        if data.is_empty() {
            return Some(Ok(Response::good()));
        }
        if self.wants_fua(cdb) {
            return None;
        }
        let _order = match self.try_write_shared()? {
            Ok(guard) => guard,
            Err(s) => return Some(Err(s)),
        };
        let Some(offset) = self.limits.offset(r.lba) else {
            return Some(Err(Sense::lba_out_of_range()));
        };
        match self.dev.write_nowait(offset, data) {
            Ok(true) => Some(Ok(Response::good())),
            Ok(false) => None,
            Err(e) => Some(Err(self.io_sense(&e, IoKind::Write))),
        }
    }

    /// The whole blocks of `data` up to `blocks` blocks. When the initiator sent less Data-Out
    /// than the CDB asks for (its expected transfer length was short), only the blocks that
    /// arrived are written and the transport reports the residual (RFC 7143 11.4.5.1).
    fn whole_blocks<'d>(&self, data: &'d [u8], blocks: u32) -> &'d [u8] {
        let block_size = self.limits.block_size as usize;
        let want = self.limits.bytes(u64::from(blocks)).unwrap_or(usize::MAX);
        let usable = data.len().min(want) / block_size * block_size;
        data.get(..usable).unwrap_or_default()
    }

    /// The checks of a write that carries data, in order (transfer length, write protection,
    /// LBA range), and the whole blocks of the Data-Out it may write.
    fn write_range<'d>(
        &self,
        cdb: &[u8],
        data: &'d [u8],
        capacity: u64,
    ) -> Result<(BlockRange, &'d [u8]), Sense> {
        let r = block_range(cdb);
        if r.blocks > self.limits.max_transfer {
            return Err(Sense::invalid_cdb_field(transfer_length_at(cdb), None));
        }
        self.check_writable()?;
        check_range(r.lba, u64::from(r.blocks), capacity)?;
        Ok((r, self.whole_blocks(data, r.blocks)))
    }

    /// WRITE (6/10/12/16) and WRITE AND VERIFY (10/12/16). FUA (and WRITE AND VERIFY, and a
    /// disabled write cache) make the data durable before GOOD.
    fn write(
        &self,
        cdb: &[u8],
        data: &[u8],
        capacity: u64,
        verify: bool,
    ) -> Result<Response, Sense> {
        let (r, data) = self.write_range(cdb, data, capacity)?;
        if data.is_empty() {
            return Ok(Response::good());
        }
        let fua = verify || self.wants_fua(cdb);
        {
            let _order = self.write_shared()?;
            self.write_blocks(r.lba, data, fua)?;
        }
        if verify {
            // Read back what is now on the medium and compare it with what was sent.
            let blocks = (data.len() / self.limits.block_size as usize) as u64;
            let stored = self.read_blocks(r.lba, blocks)?;
            if let Some(at) = first_difference(&stored, data) {
                return Err(Sense::miscompare(at as u64));
            }
        }
        Ok(Response::good())
    }

    /// VERIFY (10/12/16): BYTCHK 00b reads the blocks (to surface medium errors), 01b compares
    /// them with the Data-Out, 11b compares each of them with the single block sent.
    fn verify(&self, cdb: &[u8], data: &[u8], capacity: u64) -> Result<Response, Sense> {
        let bytchk = (u8_at(cdb, 1) >> 1) & 0x03;
        if bytchk == 0b10 {
            return Err(Sense::invalid_cdb_field(1, Some(2)));
        }
        let r = block_range(cdb);
        self.check_transfer(cdb, r, capacity)?;
        if r.blocks == 0 {
            return Ok(Response::good());
        }
        let block_size = self.limits.block_size as usize;
        let expected: Vec<u8> = match bytchk {
            0b00 => Vec::new(),
            0b01 => self.whole_blocks(data, r.blocks).to_vec(),
            _ => match data.get(..block_size) {
                Some(block) => block.repeat(r.blocks as usize),
                None => {
                    return Err(Sense::illegal_request(
                        Asc::INVALID_FIELD_IN_INFORMATION_UNIT,
                    ));
                }
            },
        };
        let stored = self.read_blocks(r.lba, u64::from(r.blocks))?;
        if bytchk != 0
            && let Some(at) = first_difference(&stored, &expected)
        {
            return Err(Sense::miscompare(at as u64));
        }
        Ok(Response::good())
    }

    /// SYNCHRONIZE CACHE (10/16): the pool flushes the whole volume, which covers any range.
    fn synchronize_cache(&self, cdb: &[u8], capacity: u64) -> Result<Response, Sense> {
        let r = block_range(cdb);
        check_range(r.lba, u64::from(r.blocks), capacity)?;
        self.dev
            .flush()
            .map_err(|e| self.io_sense(&e, IoKind::Write))?;
        Ok(Response::good())
    }

    /// WRITE SAME (10/16). Zero blocks means "to the end of the medium" (WSNZ = 0). A block of
    /// zeros (or NDOB) is stored as deallocated space, whatever the UNMAP bit: deallocated
    /// blocks read back as zeros (LBPRZ = 1), so the two cannot be told apart.
    fn write_same(&self, cdb: &[u8], data: &[u8], capacity: u64) -> Result<Response, Sense> {
        let sixteen = u8_at(cdb, 0) == op::WRITE_SAME_16;
        let ndob = sixteen && bit(cdb, 1, 0);
        let r = block_range(cdb);
        self.check_writable()?;
        if r.lba > capacity {
            return Err(Sense::lba_out_of_range());
        }
        let blocks = if r.blocks == 0 {
            capacity - r.lba
        } else {
            u64::from(r.blocks)
        };
        check_range(r.lba, blocks, capacity)?;
        if blocks > self.limits.max_write_same {
            return Err(Sense::invalid_cdb_field(transfer_length_at(cdb), None));
        }
        let block_size = self.limits.block_size as usize;
        let block = if ndob {
            None
        } else if data.len() == block_size {
            Some(data)
        } else {
            // WRITE SAME transfers exactly one block; anything else leaves its content unknown.
            return Err(Sense::illegal_request(
                Asc::INVALID_FIELD_IN_INFORMATION_UNIT,
            ));
        };
        if blocks == 0 {
            return Ok(Response::good());
        }
        let fua = !self.write_cache_enabled();
        let (offset, len) = self.offset_and_len(r.lba, blocks)?;
        let _order = self.write_shared()?;
        // UNMAP = 1 asks for deallocation whatever the data block holds (SBC-4 5.48): on a
        // thin LU with LBPRZ the range then reads back as zeros.
        let unmap = bit(cdb, 1, 3);
        match block {
            Some(block) if !unmap && block.iter().any(|&b| b != 0) => {
                // Write the pattern a chunk at a time to keep the buffer bounded.
                let chunk_blocks = (OPTIMAL_TRANSFER_BYTES as usize / block_size).max(1) as u64;
                let mut pattern = block.repeat(blocks.min(chunk_blocks) as usize);
                let mut lba = r.lba;
                let end = r.lba + blocks;
                while lba < end {
                    let n = (end - lba).min(chunk_blocks);
                    pattern.truncate(n as usize * block_size);
                    self.write_blocks(lba, &pattern, fua)?;
                    lba += n;
                }
            }
            _ => {
                let len = len as u64;
                let stored = if unmap {
                    // UNMAP: deallocate (the pool stores nothing for deallocated blocks).
                    self.dev
                        .discard(offset, len)
                        .and_then(|()| if fua { self.dev.flush() } else { Ok(()) })
                } else {
                    self.dev.write_zeroes(offset, len, fua)
                };
                stored.map_err(|e| self.io_sense(&e, IoKind::Write))?;
            }
        }
        Ok(Response::good())
    }

    /// UNMAP (SBC-3 5.28): every descriptor is checked before any block is deallocated.
    fn unmap(&self, cdb: &[u8], data: &[u8], capacity: u64) -> Result<Response, Sense> {
        self.check_writable()?;
        let list_len = usize::from(be16(cdb, 7));
        if list_len == 0 {
            return Ok(Response::good());
        }
        let data = data.get(..list_len).unwrap_or(data);
        if data.len() < 8 {
            return Err(Sense::param_list_length_error());
        }
        let descriptors_len = usize::from(be16(data, 2));
        if descriptors_len > data.len() - 8 {
            return Err(Sense::param_list_length_error());
        }
        // A trailing partial descriptor is ignored (SBC-3 5.28.2).
        let count = descriptors_len / 16;
        if count > MAX_UNMAP_DESCRIPTORS as usize {
            return Err(Sense::invalid_param_field(2, None));
        }
        let mut ranges = Vec::with_capacity(count);
        let mut total = 0u64;
        for i in 0..count {
            let at = 8 + 16 * i;
            let lba = be64(data, at);
            let blocks = u64::from(be32(data, at + 8));
            check_range(lba, blocks, capacity)?;
            total += blocks;
            if total > u64::from(MAX_UNMAP_LBA_COUNT) {
                return Err(Sense::invalid_param_field(at + 8, None));
            }
            if blocks > 0 {
                ranges.push(self.offset_and_len(lba, blocks)?);
            }
        }
        {
            let _order = self.write_shared()?;
            for (offset, len) in ranges {
                self.dev
                    .discard(offset, len as u64)
                    .map_err(|e| self.io_sense(&e, IoKind::Write))?;
            }
        }
        if !self.write_cache_enabled() {
            self.dev
                .flush()
                .map_err(|e| self.io_sense(&e, IoKind::Write))?;
        }
        Ok(Response::good())
    }

    /// COMPARE AND WRITE (SBC-3 5.2): the Data-Out holds the blocks to compare followed by the
    /// blocks to write; the write happens only if every byte matched, atomically with respect
    /// to other writes through this logical unit.
    fn compare_and_write(&self, cdb: &[u8], data: &[u8], capacity: u64) -> Result<Response, Sense> {
        let lba = be64(cdb, 2);
        let blocks = u64::from(u8_at(cdb, 13));
        self.check_writable()?;
        check_range(lba, blocks, capacity)?;
        let (_, half) = self.offset_and_len(lba, blocks)?;
        if data.len() != 2 * half {
            // The length in the CDB and the Data-Out disagree: no safe reading of either.
            return Err(Sense::invalid_cdb_field(13, None));
        }
        if blocks == 0 {
            return Ok(Response::good());
        }
        let (compare, write) = data.split_at(half);
        let fua = self.wants_fua(cdb);
        let _exclusive = self.write_exclusive()?;
        let stored = self.read_blocks(lba, blocks)?;
        if let Some(at) = first_difference(&stored, compare) {
            return Err(Sense::miscompare(at as u64));
        }
        self.write_blocks(lba, write, fua)?;
        Ok(Response::good())
    }

    /// ORWRITE (16) (SBC-3 5.9): ORs the Data-Out into the stored blocks, atomically with
    /// respect to other writes through this logical unit.
    fn orwrite(&self, cdb: &[u8], data: &[u8], capacity: u64) -> Result<Response, Sense> {
        let (r, data) = self.write_range(cdb, data, capacity)?;
        if data.is_empty() {
            return Ok(Response::good());
        }
        let blocks = (data.len() / self.limits.block_size as usize) as u64;
        let fua = self.wants_fua(cdb);
        let _exclusive = self.write_exclusive()?;
        let mut stored = self.read_blocks(r.lba, blocks)?;
        for (s, d) in stored.iter_mut().zip(data) {
            *s |= d;
        }
        self.write_blocks(r.lba, &stored, fua)?;
        Ok(Response::good())
    }

    /// WRITE ATOMIC (16) (SBC-4 5.48): the blocks are written all-or-nothing, for concurrent
    /// readers and across a crash (the pool's atomic write). No alignment or granularity
    /// requirement and no atomic boundaries (ATOMIC BOUNDARY must be zero: the CDB table
    /// rejects anything else). FUA, or a disabled write cache, makes the data durable before
    /// GOOD.
    fn write_atomic(&self, cdb: &[u8], data: &[u8], capacity: u64) -> Result<Response, Sense> {
        let lba = be64(cdb, 2);
        let blocks = u32::from(be16(cdb, 12));
        if blocks > self.limits.max_atomic {
            return Err(Sense::invalid_cdb_field(12, None));
        }
        self.check_writable()?;
        check_range(lba, u64::from(blocks), capacity)?;
        if blocks == 0 {
            return Ok(Response::good());
        }
        let data = self.whole_blocks(data, blocks);
        if data.len() / self.limits.block_size as usize != blocks as usize {
            // Unlike a plain write, writing the blocks that did arrive would not be the write
            // the initiator asked to be atomic.
            return Err(Sense::invalid_cdb_field(12, None));
        }
        let fua = self.wants_fua(cdb);
        let offset = self
            .limits
            .offset(lba)
            .ok_or_else(Sense::lba_out_of_range)?;
        let _order = self.write_shared()?;
        self.dev
            .write_atomic(offset, data, fua)
            .map_err(|e| match e {
                // The advertised limit comes from the device, so neither should happen.
                PoolError::AtomicWriteTooLarge { .. } => Sense::invalid_cdb_field(12, None),
                PoolError::Unsupported(_) => Sense::invalid_opcode(),
                e => self.io_sense(&e, IoKind::Write),
            })?;
        Ok(Response::good())
    }

    /// GET LBA STATUS (SBC-3 5.7): the provisioning status of the blocks from the starting LBA,
    /// as far as the device reports in one call and the allocation length holds descriptors.
    fn get_lba_status(&self, cdb: &[u8], capacity: u64) -> Result<Response, Sense> {
        let lba = be64(cdb, 2);
        if lba >= capacity {
            return Err(Sense::lba_out_of_range());
        }
        let allocation_length = be32(cdb, 10);
        let wanted = (allocation_length.saturating_sub(8) / 16) as usize;
        let max = wanted.clamp(1, MAX_LBA_STATUS_DESCRIPTORS);
        let block_size = u64::from(self.limits.block_size);
        let (Some(offset), Some(len)) = (
            self.limits.offset(lba),
            (capacity - lba).checked_mul(block_size),
        ) else {
            return Err(Sense::lba_out_of_range());
        };
        let runs = self
            .dev
            .provisioning_status(offset, len)
            .map_err(|e| self.io_sense(&e, IoKind::Read))?;
        let mut descriptors: Vec<(u64, u32, bool)> = Vec::new();
        let mut next = lba;
        'runs: for run in runs {
            let mut left = run.len / block_size;
            while left > 0 {
                if descriptors.len() == max {
                    break 'runs;
                }
                let n = u32::try_from(left).unwrap_or(u32::MAX);
                descriptors.push((next, n, run.mapped));
                next += u64::from(n);
                left -= u64::from(n);
            }
        }
        if descriptors.is_empty() {
            // A device that reported nothing: say mapped, which is always safe.
            let n = u32::try_from(capacity - lba).unwrap_or(u32::MAX);
            descriptors.push((lba, n, true));
        }
        let mut d = Vec::with_capacity(8 + 16 * descriptors.len());
        d.extend_from_slice(&((4 + 16 * descriptors.len()) as u32).to_be_bytes());
        d.extend_from_slice(&[0; 4]);
        for (start, n, mapped) in descriptors {
            d.extend_from_slice(&start.to_be_bytes());
            d.extend_from_slice(&n.to_be_bytes());
            // Provisioning status: 0 mapped, 1 deallocated.
            d.push(u8::from(!mapped));
            d.extend_from_slice(&[0; 3]);
        }
        Ok(Response::data(truncate(d, allocation_length)))
    }

    /// READ CAPACITY (16) (SBC-3 5.16): thin provisioned (LBPME) with deallocated blocks
    /// reading as zeros (LBPRZ), and the physical block exponent.
    fn read_capacity_16(&self, cdb: &[u8], capacity: u64) -> Response {
        let mut d = Vec::with_capacity(32);
        d.extend_from_slice(&capacity.saturating_sub(1).to_be_bytes());
        d.extend_from_slice(&self.limits.block_size.to_be_bytes());
        d.push(0); // no protection information
        d.push(self.limits.lbppbe);
        d.push(0x80 | 0x40); // LBPME, LBPRZ; lowest aligned LBA 0
        d.resize(32, 0);
        Response::data(truncate(d, be32(cdb, 10)))
    }
}

/// Byte offset of the transfer length field of a block command, for field pointers.
fn transfer_length_at(cdb: &[u8]) -> usize {
    match u8_at(cdb, 0) {
        op::READ_6 | op::WRITE_6 => 4,
        opcode => match opcode >> 5 {
            1 | 2 => 7,
            5 => 6,
            _ => 10,
        },
    }
}

fn first_difference(a: &[u8], b: &[u8]) -> Option<usize> {
    a.iter().zip(b).position(|(x, y)| x != y)
}

/// READ CAPACITY (10) (SBC-3 5.15): the last LBA, or FFFFFFFFh when it does not fit.
fn read_capacity_10(cdb: &[u8], capacity: u64, block_size: u32) -> Result<Response, Sense> {
    if u8_at(cdb, 8) & 0x01 == 0 && be32(cdb, 2) != 0 {
        return Err(Sense::invalid_cdb_field(2, None));
    }
    let last = u32::try_from(capacity.saturating_sub(1)).unwrap_or(u32::MAX);
    let mut d = Vec::with_capacity(8);
    d.extend_from_slice(&last.to_be_bytes());
    d.extend_from_slice(&block_size.to_be_bytes());
    Ok(Response::data(d))
}

/// READ DEFECT DATA (10/12) (SBC-3 5.12-5.13): a pool volume has no defect list, so the
/// requested lists are returned empty in the requested format.
fn read_defect_data(cdb: &[u8]) -> Result<Response, Sense> {
    let ten = u8_at(cdb, 0) == op::READ_DEFECT_DATA_10;
    let flags_at = if ten { 2 } else { 1 };
    let flags = u8_at(cdb, flags_at) & 0x1F;
    if flags & 0x07 == 0x07 {
        // Defect list format 111b is reserved.
        return Err(Sense::invalid_cdb_field(flags_at, Some(2)));
    }
    let (d, allocation_length) = if ten {
        (vec![0, flags, 0, 0], u32::from(be16(cdb, 7)))
    } else {
        (vec![0, flags, 0, 0, 0, 0, 0, 0], be32(cdb, 6))
    };
    Ok(Response::data(truncate(d, allocation_length)))
}
