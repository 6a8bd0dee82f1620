//! Whole commands through [`LogicalUnit::execute`] over an in-memory block device: each
//! command family's happy path and main errors, the interplay of sessions (reservations, unit
//! attentions), and a property test that no CDB or Data-Out can make `execute` panic or return
//! unbounded Data-In.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use maas_pool::{BlockDevice, PoolError, ProvisioningRun, Result as PoolResult};
use parking_lot::Mutex;
use proptest::prelude::*;

use super::cdb::{be16, be32, be64, op};
use super::limits::MAX_TRANSFER_BYTES;
use super::opcodes::COMMANDS;
use super::sense::{Asc, SenseKey};
use super::{Command, LogicalUnit, LuIdentity, Nexus, Response, Status};

/// Builds the error an I/O fails with.
type MakeError = fn() -> PoolError;

/// A volume in memory. `fail_with` makes every I/O fail with the given error;
/// `claimed_capacity` reports a larger capacity than is backed (I/O there fails). Blocks start
/// mapped; discard and write-zeroes deallocate them. Writes wait while `hold` is locked (to
/// catch a sanitize operation running). `atomic_max` is its atomic write limit (0: none).
struct MemDisk {
    data: Mutex<Vec<u8>>,
    claimed_capacity: Option<u64>,
    block_size: u32,
    flushes: AtomicUsize,
    fua_writes: AtomicUsize,
    atomic_writes: AtomicUsize,
    atomic_max: u64,
    unmapped: Mutex<std::collections::BTreeSet<u64>>,
    hold: Mutex<()>,
    fail_with: Mutex<Option<MakeError>>,
    /// Whether `read_nowait`/`write_nowait` complete (true) or report that they would block.
    nowait_ok: AtomicBool,
}

impl MemDisk {
    fn new(blocks: u64, block_size: u32) -> MemDisk {
        MemDisk {
            data: Mutex::new(vec![0; (blocks * u64::from(block_size)) as usize]),
            claimed_capacity: None,
            block_size,
            flushes: AtomicUsize::new(0),
            fua_writes: AtomicUsize::new(0),
            atomic_writes: AtomicUsize::new(0),
            atomic_max: 64 << 10,
            unmapped: Mutex::new(Default::default()),
            hold: Mutex::new(()),
            fail_with: Mutex::new(None),
            nowait_ok: AtomicBool::new(true),
        }
    }

    fn set_mapped(&self, r: &std::ops::Range<usize>, mapped: bool) {
        let bs = self.block_size as usize;
        let mut unmapped = self.unmapped.lock();
        for b in r.start / bs..r.end / bs {
            if mapped {
                unmapped.remove(&(b as u64));
            } else {
                unmapped.insert(b as u64);
            }
        }
    }

    fn check(&self, offset: u64, len: u64) -> PoolResult<std::ops::Range<usize>> {
        if let Some(make) = *self.fail_with.lock() {
            return Err(make());
        }
        let size = self.data.lock().len() as u64;
        match offset.checked_add(len) {
            Some(end) if end <= size => Ok(offset as usize..end as usize),
            _ => Err(PoolError::OutOfRange { offset, len, size }),
        }
    }

    fn bytes(&self, offset: u64, len: usize) -> Vec<u8> {
        self.data.lock()[offset as usize..offset as usize + len].to_vec()
    }
}

impl BlockDevice for MemDisk {
    fn capacity(&self) -> u64 {
        self.claimed_capacity
            .unwrap_or_else(|| self.data.lock().len() as u64)
    }

    fn block_size(&self) -> u32 {
        self.block_size
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> PoolResult<()> {
        let r = self.check(offset, buf.len() as u64)?;
        buf.copy_from_slice(&self.data.lock()[r]);
        Ok(())
    }

    fn write(&self, offset: u64, data: &[u8], fua: bool) -> PoolResult<()> {
        drop(self.hold.lock());
        let r = self.check(offset, data.len() as u64)?;
        self.data.lock()[r.clone()].copy_from_slice(data);
        self.set_mapped(&r, true);
        if fua {
            self.fua_writes.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    }

    fn flush(&self) -> PoolResult<()> {
        self.check(0, 0)?;
        self.flushes.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    fn write_zeroes(&self, offset: u64, len: u64, fua: bool) -> PoolResult<()> {
        let r = self.check(offset, len)?;
        self.data.lock()[r.clone()].fill(0);
        self.set_mapped(&r, false);
        if fua {
            self.fua_writes.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    }

    fn discard(&self, offset: u64, len: u64) -> PoolResult<()> {
        self.write_zeroes(offset, len, false)
    }

    fn read_nowait(&self, offset: u64, buf: &mut [u8]) -> PoolResult<bool> {
        if !self.nowait_ok.load(Ordering::Relaxed) {
            return Ok(false);
        }
        self.read(offset, buf).map(|()| true)
    }

    fn write_nowait(&self, offset: u64, data: &[u8]) -> PoolResult<bool> {
        if !self.nowait_ok.load(Ordering::Relaxed) {
            return Ok(false);
        }
        self.write(offset, data, false).map(|()| true)
    }

    fn atomic_write_max(&self) -> u64 {
        self.atomic_max
    }

    /// Atomic by construction: the whole copy happens under the data lock.
    fn write_atomic(&self, offset: u64, data: &[u8], fua: bool) -> PoolResult<()> {
        let len = data.len() as u64;
        if self.atomic_max == 0 {
            return Err(PoolError::Unsupported("atomic writes".into()));
        }
        if len > self.atomic_max {
            return Err(PoolError::AtomicWriteTooLarge {
                len,
                max: self.atomic_max,
            });
        }
        self.write(offset, data, fua)?;
        self.atomic_writes.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    fn provisioning_status(&self, offset: u64, len: u64) -> PoolResult<Vec<ProvisioningRun>> {
        let r = self.check(offset, len)?;
        let bs = self.block_size as usize;
        let unmapped = self.unmapped.lock();
        let mut runs: Vec<ProvisioningRun> = Vec::new();
        for b in r.start / bs..r.end / bs {
            let mapped = !unmapped.contains(&(b as u64));
            match runs.last_mut() {
                Some(last) if last.mapped == mapped => last.len += bs as u64,
                _ => runs.push(ProvisioningRun {
                    len: bs as u64,
                    mapped,
                }),
            }
        }
        Ok(runs)
    }
}

const BLOCKS: u64 = 4096;

fn setup_with(blocks: u64, block_size: u32, ident: LuIdentity) -> (Arc<MemDisk>, LogicalUnit) {
    let disk = Arc::new(MemDisk::new(blocks, block_size));
    let lu = LogicalUnit::new(disk.clone(), ident);
    (disk, lu)
}

fn setup() -> (Arc<MemDisk>, LogicalUnit) {
    setup_with(BLOCKS, 512, LuIdentity::from_volume_id("vol-test"))
}

fn nexus(i: u8) -> Nexus {
    Nexus {
        initiator_port: format!("iqn.2007-10.com.example:init{i},i,0x80000000000{i}"),
        target_port: "iqn.2026-11.io.maas:exp-1,t,0x0001".into(),
        relative_target_port: 1,
    }
}

fn exec(lu: &LogicalUnit, n: &Nexus, cdb: &[u8], data_out: &[u8]) -> Response {
    lu.execute(&Command {
        cdb,
        nexus: n,
        data_out,
        expected_in: 1 << 24,
    })
}

fn run(lu: &LogicalUnit, cdb: &[u8], data_out: &[u8]) -> Response {
    exec(lu, &nexus(1), cdb, data_out)
}

#[track_caller]
fn assert_good(r: &Response) {
    assert_eq!(r.status, Status::Good, "sense {:?}", r.sense);
}

#[track_caller]
fn assert_check(r: &Response, key: SenseKey, asc: Asc) {
    assert_eq!(r.status, Status::CheckCondition, "expected {key:?} {asc:?}");
    let sense = r.sense.expect("CHECK CONDITION carries sense");
    assert_eq!((sense.key, sense.asc), (key, asc));
}

#[track_caller]
fn assert_illegal(r: &Response, asc: Asc) {
    assert_check(r, SenseKey::IllegalRequest, asc);
}

fn cdb10(op: u8, flags: u8, lba: u32, len: u16) -> Vec<u8> {
    let mut c = vec![0u8; 10];
    c[0] = op;
    c[1] = flags;
    c[2..6].copy_from_slice(&lba.to_be_bytes());
    c[7..9].copy_from_slice(&len.to_be_bytes());
    c
}

fn cdb16(op: u8, flags: u8, lba: u64, len: u32) -> Vec<u8> {
    let mut c = vec![0u8; 16];
    c[0] = op;
    c[1] = flags;
    c[2..10].copy_from_slice(&lba.to_be_bytes());
    c[10..14].copy_from_slice(&len.to_be_bytes());
    c
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

fn nowait(lu: &LogicalUnit, n: &Nexus, cdb: &[u8], data_out: &[u8]) -> Option<Response> {
    lu.execute_nowait(&Command {
        cdb,
        nexus: n,
        data_out,
        expected_in: 1 << 24,
    })
}

/// The network-thread fast path answers exactly what `execute` would, for reads and cached
/// writes only, and declines (changing nothing) whatever would block.
#[test]
fn execute_nowait_matches_execute_and_declines_what_would_block() {
    let (disk, lu) = setup();
    let n = nexus(1);
    // Only READ and WRITE take the fast path.
    assert!(nowait(&lu, &n, &[0u8; 6], &[]).is_none(), "TEST UNIT READY");
    assert!(nowait(&lu, &n, &cdb10(op::SYNCHRONIZE_CACHE_10, 0, 0, 0), &[]).is_none());
    // A write the cache takes, then a read of it: same data as the blocking path.
    let data = pattern(8 * 512, 7);
    let w = nowait(&lu, &n, &cdb10(op::WRITE_10, 0, 16, 8), &data).expect("cached write");
    assert_good(&w);
    assert_eq!(w.spdtl_out, data.len() as u32);
    assert_eq!(disk.bytes(16 * 512, data.len()), data);
    let r = nowait(&lu, &n, &cdb10(op::READ_10, 0, 16, 8), &[]).expect("read from memory");
    assert_good(&r);
    assert_eq!(
        r.data_in,
        run(&lu, &cdb10(op::READ_10, 0, 16, 8), &[]).data_in
    );
    // FUA must reach the medium: declined, nothing written.
    let other = pattern(8 * 512, 9);
    assert!(nowait(&lu, &n, &cdb10(op::WRITE_10, 0x08, 16, 8), &other).is_none());
    assert_eq!(disk.bytes(16 * 512, data.len()), data);
    // Errors found before any I/O are final answers, as from execute.
    let oor = nowait(&lu, &n, &cdb10(op::READ_10, 0, BLOCKS as u32, 1), &[]).expect("answered");
    assert_illegal(&oor, Asc::LBA_OUT_OF_RANGE);
    // A device that would block: declined, and the blocking path still works afterwards.
    disk.nowait_ok.store(false, Ordering::Relaxed);
    assert!(nowait(&lu, &n, &cdb10(op::READ_10, 0, 16, 8), &[]).is_none());
    assert!(nowait(&lu, &n, &cdb10(op::WRITE_10, 0, 16, 8), &other).is_none());
    assert_eq!(disk.bytes(16 * 512, data.len()), data);
    assert_eq!(run(&lu, &cdb10(op::READ_10, 0, 16, 8), &[]).data_in, data);
    // A pending unit attention is the answer, taken once, whichever path sees it.
    disk.nowait_ok.store(true, Ordering::Relaxed);
    lu.reset();
    let ua = nowait(&lu, &n, &cdb10(op::READ_10, 0, 16, 8), &[]).expect("unit attention");
    assert_check(
        &ua,
        SenseKey::UnitAttention,
        Asc::BUS_DEVICE_RESET_FUNCTION_OCCURRED,
    );
    assert_good(&nowait(&lu, &n, &cdb10(op::READ_10, 0, 16, 8), &[]).expect("read"));
}

#[test]
fn test_unit_ready_and_unknown_opcodes() {
    let (_, lu) = setup();
    assert_good(&run(&lu, &[0x00, 0, 0, 0, 0, 0], &[]));
    assert_illegal(
        &run(&lu, &[0xC0, 0, 0, 0, 0, 0], &[]),
        Asc::INVALID_COMMAND_OPERATION_CODE,
    );
    assert_illegal(&run(&lu, &[], &[]), Asc::INVALID_COMMAND_OPERATION_CODE);
    assert_illegal(&run(&lu, &[0x28, 0, 0], &[]), Asc::INVALID_FIELD_IN_CDB);
}

/// Every command in the REPORT SUPPORTED OPERATION CODES table is dispatched, and every
/// operation code outside it is refused as unknown.
#[test]
fn supported_opcodes_match_dispatch() {
    let (_, lu) = setup();
    for opcode in 0..=255u8 {
        let mut cdb = [0u8; 16];
        cdb[0] = opcode;
        let listed: Vec<_> = COMMANDS.iter().filter(|c| c.op == opcode).collect();
        if listed.is_empty() {
            assert_illegal(&run(&lu, &cdb, &[]), Asc::INVALID_COMMAND_OPERATION_CODE);
            continue;
        }
        for c in listed {
            cdb[1] = c.sa.unwrap_or(0);
            let r = run(&lu, &cdb, &[]);
            let unknown = r
                .sense
                .is_some_and(|s| s.asc == Asc::INVALID_COMMAND_OPERATION_CODE);
            // REPORT LUNS is the transport's; everything else must be implemented here.
            assert_eq!(
                unknown,
                opcode == 0xA0,
                "opcode {opcode:#04x} sa {:?}",
                c.sa
            );
        }
    }
}

#[test]
fn inquiry_through_execute() {
    let (_, lu) = setup();
    let r = run(&lu, &[0x12, 0, 0, 0, 96, 0], &[]);
    assert_good(&r);
    assert_eq!(r.data_in.len(), 96);
    assert_eq!(r.data_in[5] & 0x08, 0x08, "3PC");
    let r = run(&lu, &[0x12, 1, 0x83, 1, 0, 0], &[]);
    let text = String::from_utf8_lossy(&r.data_in);
    assert!(text.contains("iqn.2026-11.io.maas:exp-1,t,0x0001"));
    assert_illegal(
        &run(&lu, &[0x12, 0, 1, 0, 255, 0], &[]),
        Asc::INVALID_FIELD_IN_CDB,
    );
    assert_illegal(
        &run(&lu, &[0x12, 2, 0, 0, 255, 0], &[]),
        Asc::INVALID_FIELD_IN_CDB,
    );
}

#[test]
fn read_capacity() {
    let (_, lu) = setup();
    let r = run(&lu, &cdb10(0x25, 0, 0, 0), &[]);
    assert_good(&r);
    assert_eq!(
        (be32(&r.data_in, 0), be32(&r.data_in, 4)),
        (BLOCKS as u32 - 1, 512)
    );
    assert_illegal(
        &run(&lu, &cdb10(0x25, 0, 5, 0), &[]),
        Asc::INVALID_FIELD_IN_CDB,
    );
    let mut rc16 = cdb16(0x9E, 0x10, 0, 32);
    rc16[2..10].fill(0);
    let r = run(&lu, &rc16, &[]);
    assert_good(&r);
    assert_eq!(r.data_in.len(), 32);
    assert_eq!(be64(&r.data_in, 0), BLOCKS - 1);
    assert_eq!(r.data_in[13] & 0x0F, 3, "4 KiB physical blocks");
    assert_eq!(r.data_in[14] & 0xC0, 0xC0, "LBPME and LBPRZ");
    for alloc in 0..16u32 {
        rc16[10..14].copy_from_slice(&alloc.to_be_bytes());
        assert_eq!(run(&lu, &rc16, &[]).data_in.len(), alloc as usize);
    }
    // Past 2 TiB READ CAPACITY (10) points to READ CAPACITY (16).
    let mut big = MemDisk::new(1, 512);
    big.claimed_capacity = Some(4 << 40);
    let lu = LogicalUnit::new(Arc::new(big), LuIdentity::from_volume_id("big"));
    let r = run(&lu, &cdb10(0x25, 0, 0, 0), &[]);
    assert_eq!(be32(&r.data_in, 0), u32::MAX);
    let r = run(&lu, &rc16, &[]);
    assert_eq!(be64(&r.data_in, 0), (4 << 40) / 512 - 1);
}

#[test]
fn write_then_read_in_every_size() {
    let (disk, lu) = setup();
    let data = pattern(8 * 512, 1);
    assert_good(&run(&lu, &cdb10(0x2A, 0, 10, 8), &data));
    assert_eq!(disk.bytes(10 * 512, data.len()), data);
    let r = run(&lu, &cdb10(0x28, 0, 10, 8), &[]);
    assert_good(&r);
    assert_eq!(r.data_in, data);
    // READ (6): a transfer length of zero means 256 blocks.
    let r = run(&lu, &[0x08, 0, 0, 0, 0, 0], &[]);
    assert_eq!(r.data_in.len(), 256 * 512);
    // READ (12) and (16), WRITE (16) with FUA.
    let mut c12 = vec![0xA8, 0, 0, 0, 0, 10, 0, 0, 0, 8, 0, 0];
    assert_eq!(run(&lu, &c12, &[]).data_in, data);
    c12[0] = 0xAA;
    assert_good(&run(&lu, &c12, &data));
    let before = disk.fua_writes.load(Ordering::Relaxed);
    assert_good(&run(&lu, &cdb16(0x8A, 0x08, 20, 8), &data));
    assert_eq!(disk.fua_writes.load(Ordering::Relaxed), before + 1);
    assert_eq!(run(&lu, &cdb16(0x88, 0x18, 20, 8), &[]).data_in, data);
    // Zero blocks is fine, also at the end of the medium.
    assert_good(&run(&lu, &cdb10(0x28, 0, BLOCKS as u32, 0), &[]));
    assert_eq!(run(&lu, &cdb10(0x2A, 0, 0, 1), &data[..512]).spdtl_out, 512);
}

#[test]
fn block_command_errors() {
    let (_, lu) = setup();
    let lba_oob = Asc::LBA_OUT_OF_RANGE;
    assert_illegal(
        &run(&lu, &cdb10(0x28, 0, BLOCKS as u32 - 1, 2), &[]),
        lba_oob,
    );
    assert_illegal(
        &run(&lu, &cdb10(0x28, 0, BLOCKS as u32 + 1, 0), &[]),
        lba_oob,
    );
    assert_illegal(&run(&lu, &cdb16(0x88, 0, u64::MAX, 1), &[]), lba_oob);
    assert_illegal(&run(&lu, &cdb16(0x8A, 0, u64::MAX, 1), &[0; 512]), lba_oob);
    // Beyond the maximum transfer length.
    let r = run(&lu, &cdb16(0x88, 0, 0, MAX_TRANSFER_BYTES / 512 + 1), &[]);
    assert_illegal(&r, Asc::INVALID_FIELD_IN_CDB);
    // RDPROTECT / WRPROTECT are not supported.
    for flags in [0x20, 0x40, 0xE0] {
        assert_illegal(
            &run(&lu, &cdb10(0x28, flags, 0, 1), &[]),
            Asc::INVALID_FIELD_IN_CDB,
        );
        assert_illegal(
            &run(&lu, &cdb10(0x2A, flags, 0, 1), &[0; 512]),
            Asc::INVALID_FIELD_IN_CDB,
        );
    }
    // DPO, FUA, FUA_NV are accepted.
    assert_good(&run(&lu, &cdb10(0x2A, 0x1A, 0, 1), &[0; 512]));
}

/// When the initiator sends less Data-Out than the CDB asks for, only the whole blocks that
/// arrived are written; the transport reports the residual from `spdtl_out`.
#[test]
fn short_and_long_data_out() {
    let (disk, lu) = setup();
    let a = vec![b'a'; 1024];
    assert_good(&run(&lu, &cdb10(0x2A, 0, 0, 2), &a));
    let b = vec![b'b'; 1024];
    let r = run(&lu, &cdb10(0x2A, 0, 0, 2), &b[..512]);
    assert_good(&r);
    assert_eq!(r.spdtl_out, 1024);
    assert_eq!(disk.bytes(0, 1024), [&b[..512], &a[..512]].concat());
    // Half a block writes nothing; more than asked for writes what was asked for.
    assert_good(&run(&lu, &cdb10(0x2A, 0, 4, 1), &b[..200]));
    assert_eq!(disk.bytes(4 * 512, 512), vec![0; 512]);
    assert_good(&run(&lu, &cdb10(0x2A, 0, 8, 1), &vec![b'c'; 10_000]));
    assert_eq!(disk.bytes(9 * 512, 512), vec![0; 512]);
}

#[test]
fn verify_compares_and_reports_offset() {
    let (_, lu) = setup();
    let data = pattern(4 * 512, 7);
    assert_good(&run(&lu, &cdb10(0x2A, 0, 100, 4), &data));
    // BYTCHK 0: medium check only.
    assert_good(&run(&lu, &cdb10(0x2F, 0x10, 100, 4), &[]));
    // BYTCHK 1: compare.
    assert_good(&run(&lu, &cdb10(0x2F, 0x02, 100, 4), &data));
    let mut bad = data.clone();
    bad[1234] ^= 0x58;
    let r = run(&lu, &cdb16(0x8F, 0x02, 100, 4), &bad);
    assert_check(&r, SenseKey::Miscompare, Asc::MISCOMPARE_DURING_VERIFY);
    assert_eq!(r.sense.and_then(|s| s.information), Some(1234));
    assert_eq!(r.spdtl_out, 4 * 512);
    // BYTCHK 11b: every block against one block.
    assert_good(&run(&lu, &cdb10(0x2A, 0, 200, 3), &vec![9; 3 * 512]));
    assert_good(&run(&lu, &cdb10(0x2F, 0x06, 200, 3), &[9; 512]));
    assert_illegal(
        &run(&lu, &cdb10(0x2F, 0x04, 200, 3), &[]),
        Asc::INVALID_FIELD_IN_CDB,
    );
    assert_illegal(
        &run(&lu, &cdb10(0x2F, 0x02, BLOCKS as u32, 1), &[0; 512]),
        Asc::LBA_OUT_OF_RANGE,
    );
    // WRITE AND VERIFY writes durably and checks.
    assert_good(&run(&lu, &cdb10(0x2E, 0x02, 300, 4), &data));
    assert_good(&run(&lu, &cdb10(0x2F, 0x02, 300, 4), &data));
    assert_illegal(
        &run(&lu, &cdb10(0x2E, 0x20, 300, 1), &data),
        Asc::INVALID_FIELD_IN_CDB,
    );
}

#[test]
fn synchronize_cache_and_prefetch() {
    let (disk, lu) = setup();
    assert_good(&run(&lu, &cdb10(0x35, 0, 0, 0), &[]));
    assert_good(&run(&lu, &cdb16(0x91, 0x02, 10, 10), &[]));
    assert_eq!(disk.flushes.load(Ordering::Relaxed), 2);
    assert_illegal(
        &run(&lu, &cdb10(0x35, 0, BLOCKS as u32, 1), &[]),
        Asc::LBA_OUT_OF_RANGE,
    );
    assert_good(&run(&lu, &cdb10(0x34, 0x02, 0, 256), &[]));
    assert_good(&run(&lu, &cdb16(0x90, 0, BLOCKS - 1, 1), &[]));
    assert_illegal(
        &run(&lu, &cdb16(0x90, 0, BLOCKS - 1, 2), &[]),
        Asc::LBA_OUT_OF_RANGE,
    );
}

#[test]
fn write_same() {
    let (disk, lu) = setup();
    let block = pattern(512, 3);
    assert_good(&run(&lu, &cdb10(0x41, 0, 10, 300), &block));
    assert_eq!(disk.bytes(10 * 512, 512), block);
    assert_eq!(disk.bytes(309 * 512, 512), block);
    assert_eq!(disk.bytes(310 * 512, 512), vec![0; 512]);
    // UNMAP with zeros deallocates; NDOB needs no Data-Out.
    assert_good(&run(&lu, &cdb10(0x41, 0x08, 10, 100), &[0; 512]));
    assert_eq!(disk.bytes(10 * 512, 512), vec![0; 512]);
    assert_good(&run(&lu, &cdb16(0x93, 0x09, 200, 100), &[]));
    assert_eq!(disk.bytes(200 * 512, 512), vec![0; 512]);
    // Zero blocks: to the end of the medium.
    assert_good(&run(&lu, &cdb16(0x93, 0, BLOCKS - 5, 0), &block));
    assert_eq!(disk.bytes((BLOCKS - 1) * 512, 512), block);
    // ANCHOR is not supported; Data-Out must be exactly one block.
    assert_illegal(
        &run(&lu, &cdb10(0x41, 0x10, 0, 1), &block),
        Asc::INVALID_FIELD_IN_CDB,
    );
    let r = run(&lu, &cdb10(0x41, 0x08, 0, 1), &block[..256]);
    assert_check(
        &r,
        SenseKey::IllegalRequest,
        Asc::INVALID_FIELD_IN_INFORMATION_UNIT,
    );
    let r = run(&lu, &cdb10(0x41, 0x08, 0, 1), &[0; 1024]);
    assert_eq!(r.sense.map(|s| s.key), Some(SenseKey::IllegalRequest));
    assert_eq!(r.spdtl_out, 512);
    assert_illegal(
        &run(&lu, &cdb10(0x41, 0, BLOCKS as u32 - 1, 2), &block),
        Asc::LBA_OUT_OF_RANGE,
    );
    assert_illegal(
        &run(&lu, &cdb10(0x41, 0, BLOCKS as u32 + 1, 0), &block),
        Asc::LBA_OUT_OF_RANGE,
    );
}

#[test]
fn write_same_longer_than_the_limit() {
    // 3 GiB of 512-byte blocks, more than the 1 GiB WRITE SAME limit (only lengths are checked).
    let mut big = MemDisk::new(1, 512);
    big.claimed_capacity = Some(3 << 30);
    let lu = LogicalUnit::new(Arc::new(big), LuIdentity::from_volume_id("big"));
    assert_illegal(
        &run(&lu, &cdb16(0x93, 0x08, 0, 0), &[0; 512]),
        Asc::INVALID_FIELD_IN_CDB,
    );
    let r = run(&lu, &cdb16(0x93, 0x08, 0, (1 << 30) / 512 + 1), &[0; 512]);
    assert_illegal(&r, Asc::INVALID_FIELD_IN_CDB);
}

fn unmap_list(ranges: &[(u64, u32)]) -> Vec<u8> {
    let mut d = vec![0u8; 8];
    for &(lba, n) in ranges {
        d.extend_from_slice(&lba.to_be_bytes());
        d.extend_from_slice(&n.to_be_bytes());
        d.extend_from_slice(&[0; 4]);
    }
    let len = d.len() as u16;
    d[0..2].copy_from_slice(&(len - 2).to_be_bytes());
    d[2..4].copy_from_slice(&(len - 8).to_be_bytes());
    d
}

fn unmap_cdb(len: usize) -> Vec<u8> {
    let mut c = vec![0x42, 0, 0, 0, 0, 0, 0, 0, 0, 0];
    c[7..9].copy_from_slice(&(len as u16).to_be_bytes());
    c
}

#[test]
fn unmap() {
    let (disk, lu) = setup();
    assert_good(&run(&lu, &cdb10(0x2A, 0, 0, 16), &vec![0xAA; 16 * 512]));
    let list = unmap_list(&[(0, 4), (8, 2), (BLOCKS, 0)]);
    let r = run(&lu, &unmap_cdb(list.len()), &list);
    assert_good(&r);
    assert_eq!(r.spdtl_out as usize, list.len());
    assert_eq!(disk.bytes(0, 512), vec![0; 512]);
    assert_eq!(disk.bytes(4 * 512, 512), vec![0xAA; 512]);
    assert_eq!(disk.bytes(9 * 512, 512), vec![0; 512]);
    assert_good(&run(&lu, &unmap_cdb(0), &[]));
    let empty = unmap_list(&[]);
    assert_good(&run(&lu, &unmap_cdb(empty.len()), &empty));
    // Nothing is unmapped when any descriptor is out of range.
    let list = unmap_list(&[(12, 1), (BLOCKS - 1, 2)]);
    assert_illegal(
        &run(&lu, &unmap_cdb(list.len()), &list),
        Asc::LBA_OUT_OF_RANGE,
    );
    assert_eq!(disk.bytes(12 * 512, 512), vec![0xAA; 512]);
    // Length errors.
    assert_illegal(
        &run(&lu, &unmap_cdb(4), &list[..4]),
        Asc::PARAMETER_LIST_LENGTH_ERROR,
    );
    let r = run(&lu, &unmap_cdb(list.len() - 8), &list[..list.len() - 8]);
    assert_illegal(&r, Asc::PARAMETER_LIST_LENGTH_ERROR);
    let many: Vec<_> = (0..257).map(|i| (i, 1)).collect();
    let list = unmap_list(&many);
    assert_illegal(
        &run(&lu, &unmap_cdb(list.len()), &list),
        Asc::INVALID_FIELD_IN_PARAMETER_LIST,
    );
    // ANCHOR is not supported.
    let mut c = unmap_cdb(0);
    c[1] = 1;
    assert_illegal(&run(&lu, &c, &[]), Asc::INVALID_FIELD_IN_CDB);
}

fn caw_cdb(lba: u64, blocks: u8, flags: u8) -> Vec<u8> {
    let mut c = cdb16(0x89, flags, lba, 0);
    c[13] = blocks;
    c
}

#[test]
fn compare_and_write() {
    let (disk, lu) = setup();
    let old = vec![b'A'; 2 * 512];
    assert_good(&run(&lu, &cdb10(0x2A, 0, 50, 2), &old));
    let new = vec![b'B'; 2 * 512];
    let r = run(
        &lu,
        &caw_cdb(50, 2, 0x08),
        &[old.clone(), new.clone()].concat(),
    );
    assert_good(&r);
    assert_eq!(r.spdtl_out, 4 * 512);
    assert_eq!(disk.bytes(50 * 512, 1024), new);
    // Miscompare: nothing written, information is the offset of the first difference.
    let mut compare = new.clone();
    compare[700] = b'C';
    let r = run(&lu, &caw_cdb(50, 2, 0), &[compare, old.clone()].concat());
    assert_check(&r, SenseKey::Miscompare, Asc::MISCOMPARE_DURING_VERIFY);
    assert_eq!(r.sense.and_then(|s| s.information), Some(700));
    assert_eq!(disk.bytes(50 * 512, 1024), new);
    // The Data-Out must be exactly twice the blocks (256 blocks encode as 0).
    let r = run(
        &lu,
        &caw_cdb(50, 1, 0),
        &[old.clone(), new.clone()].concat(),
    );
    assert_illegal(&r, Asc::INVALID_FIELD_IN_CDB);
    assert_illegal(
        &run(&lu, &caw_cdb(0, 0, 0), &vec![0; 512 * 512]),
        Asc::INVALID_FIELD_IN_CDB,
    );
    assert_good(&run(&lu, &caw_cdb(0, 0, 0), &[]));
    assert_illegal(
        &run(&lu, &caw_cdb(BLOCKS - 1, 2, 0), &[0; 2048]),
        Asc::LBA_OUT_OF_RANGE,
    );
}

#[test]
fn orwrite() {
    let (disk, lu) = setup();
    assert_good(&run(&lu, &cdb10(0x2A, 0, 7, 1), &[0xA5; 512]));
    assert_good(&run(&lu, &cdb16(0x8B, 0, 7, 1), &[0x5A; 512]));
    assert_eq!(disk.bytes(7 * 512, 512), vec![0xFF; 512]);
    assert_illegal(
        &run(&lu, &cdb16(0x8B, 0x20, 7, 1), &[0; 512]),
        Asc::INVALID_FIELD_IN_CDB,
    );
    assert_illegal(
        &run(&lu, &cdb16(0x8B, 0, BLOCKS, 1), &[0; 512]),
        Asc::LBA_OUT_OF_RANGE,
    );
}

#[test]
fn get_lba_status() {
    let (_, lu) = setup();
    let mut c = cdb16(0x9E, 0x12, 100, 24);
    let r = run(&lu, &c, &[]);
    assert_good(&r);
    assert_eq!(r.data_in.len(), 24);
    assert_eq!(be32(&r.data_in, 0), 20);
    assert_eq!(be64(&r.data_in, 8), 100);
    assert_eq!(be32(&r.data_in, 16) as u64, BLOCKS - 100);
    assert_eq!(r.data_in[20] & 0x0F, 0);
    c[2..10].copy_from_slice(&BLOCKS.to_be_bytes());
    assert_illegal(&run(&lu, &c, &[]), Asc::LBA_OUT_OF_RANGE);
}

#[test]
fn read_defect_data() {
    let (_, lu) = setup();
    let r = run(&lu, &[0x37, 0, 0x18, 0, 0, 0, 0, 0, 32, 0], &[]);
    assert_good(&r);
    assert_eq!(r.data_in, vec![0, 0x18, 0, 0]);
    let r = run(&lu, &[0xB7, 0x05, 0, 0, 0, 0, 0, 0, 0, 32, 0, 0], &[]);
    assert_eq!(r.data_in.len(), 8);
    assert_illegal(
        &run(&lu, &[0x37, 0, 0x07, 0, 0, 0, 0, 0, 32, 0], &[]),
        Asc::INVALID_FIELD_IN_CDB,
    );
}

fn mode_select_control(lu: &LogicalUnit, n: &Nexus, swp: bool) -> Response {
    let r = exec(lu, n, &[0x1A, 0x08, 0x0A, 0, 255, 0], &[]);
    let mut data = r.data_in.clone();
    data[0] = 0;
    if swp {
        data[4 + 4] |= 0x08;
    } else {
        data[4 + 4] &= !0x08;
    }
    exec(lu, n, &[0x15, 0x10, 0, 0, data.len() as u8, 0], &data)
}

#[test]
fn software_write_protect_and_mode_change_attention() {
    let (_, lu) = setup();
    let (a, b) = (nexus(1), nexus(2));
    assert_good(&exec(&lu, &b, &[0x00, 0, 0, 0, 0, 0], &[]));
    assert_good(&mode_select_control(&lu, &a, true));
    let r = exec(&lu, &a, &cdb10(0x2A, 0, 0, 1), &[0; 512]);
    assert_check(&r, SenseKey::DataProtect, Asc::SOFTWARE_WRITE_PROTECTED);
    assert_good(&exec(&lu, &a, &cdb10(0x28, 0, 0, 1), &[]));
    let ms = exec(&lu, &a, &[0x1A, 0, 0x3F, 0, 255, 0], &[]);
    assert_eq!(ms.data_in[2] & 0x80, 0x80, "WP");
    // The other nexus hears about the change once.
    let r = exec(&lu, &b, &[0x00, 0, 0, 0, 0, 0], &[]);
    assert_check(&r, SenseKey::UnitAttention, Asc::MODE_PARAMETERS_CHANGED);
    assert_good(&exec(&lu, &b, &[0x00, 0, 0, 0, 0, 0], &[]));
    assert_good(&mode_select_control(&lu, &a, false));
    assert_good(&exec(&lu, &a, &cdb10(0x2A, 0, 0, 1), &[0; 512]));
}

#[test]
fn write_through_when_cache_disabled() {
    let (disk, lu) = setup();
    let r = run(&lu, &[0x1A, 0x08, 0x08, 0, 255, 0], &[]);
    let mut data = r.data_in;
    data[0] = 0;
    data[4 + 2] &= !0x04;
    assert_good(&run(&lu, &[0x15, 0x10, 0, 0, data.len() as u8, 0], &data));
    let before = disk.fua_writes.load(Ordering::Relaxed);
    assert_good(&run(&lu, &cdb10(0x2A, 0, 0, 1), &[1; 512]));
    assert_eq!(disk.fua_writes.load(Ordering::Relaxed), before + 1);
    // A reset restores the default (write cache enabled).
    lu.reset();
    let _ = run(&lu, &[0x00, 0, 0, 0, 0, 0], &[]);
    assert_good(&run(&lu, &cdb10(0x2A, 0, 0, 1), &[1; 512]));
    assert_eq!(disk.fua_writes.load(Ordering::Relaxed), before + 1);
}

#[test]
fn read_only_identity() {
    let mut ident = LuIdentity::from_volume_id("snap");
    ident.read_only = true;
    let (_, lu) = setup_with(64, 4096, ident);
    for (cdb, data) in [
        (cdb10(0x2A, 0, 0, 1), vec![0; 4096]),
        (cdb10(0x41, 0x08, 0, 1), vec![]),
        (unmap_cdb(24), unmap_list(&[(0, 1)])),
        (caw_cdb(0, 1, 0), vec![0; 8192]),
        (cdb16(0x8B, 0, 0, 1), vec![0; 4096]),
    ] {
        assert_check(
            &run(&lu, &cdb, &data),
            SenseKey::DataProtect,
            Asc::WRITE_PROTECTED,
        );
    }
    assert_good(&run(&lu, &cdb10(0x28, 0, 0, 1), &[]));
}

#[test]
fn reserve6_between_nexuses() {
    let (_, lu) = setup();
    let (a, b) = (nexus(1), nexus(2));
    let reserve = [0x16, 0, 0, 0, 0, 0];
    let release = [0x17, 0, 0, 0, 0, 0];
    assert_good(&exec(&lu, &a, &reserve, &[]));
    assert_good(&exec(&lu, &a, &reserve, &[]));
    assert_eq!(
        exec(&lu, &b, &reserve, &[]).status,
        Status::ReservationConflict
    );
    assert_good(&exec(&lu, &b, &release, &[]));
    assert_eq!(
        exec(&lu, &b, &[0x1A, 0, 0x3F, 0, 255, 0], &[]).status,
        Status::ReservationConflict
    );
    assert_good(&exec(&lu, &b, &[0x12, 0, 0, 0, 36, 0], &[]));
    assert_good(&exec(&lu, &a, &[0x1A, 0, 0x3F, 0, 255, 0], &[]));
    // The holder's nexus ends: the reservation goes with it.
    lu.nexus_gone(&a);
    assert_good(&exec(&lu, &b, &reserve, &[]));
    assert_good(&exec(&lu, &b, &release, &[]));
}

#[test]
fn reset_clears_reserve6_and_raises_unit_attention() {
    let (_, lu) = setup();
    let (a, b) = (nexus(1), nexus(2));
    assert_good(&exec(&lu, &a, &[0x16, 0, 0, 0, 0, 0], &[]));
    lu.reset();
    // INQUIRY does not consume the unit attention; REQUEST SENSE returns it as data.
    assert_good(&exec(&lu, &a, &[0x12, 0, 0, 0, 36, 0], &[]));
    let r = exec(&lu, &a, &[0x03, 0, 0, 0, 18, 0], &[]);
    assert_good(&r);
    assert_eq!(
        (r.data_in[2], r.data_in[12], r.data_in[13]),
        (0x06, 0x29, 0x03)
    );
    assert_good(&exec(&lu, &a, &[0x00, 0, 0, 0, 0, 0], &[]));
    // A nexus first seen after the reset has nothing pending and is not blocked.
    assert_good(&exec(&lu, &b, &[0x16, 0, 0, 0, 0, 0], &[]));
    // REQUEST SENSE without a condition: NO SENSE, in descriptor format on request.
    let r = exec(&lu, &a, &[0x03, 1, 0, 0, 252, 0], &[]);
    assert_eq!(&r.data_in[..4], &[0x72, 0, 0, 0]);
}

#[test]
fn capacity_change_raises_unit_attention() {
    let (disk, lu) = setup();
    assert_good(&run(&lu, &[0x00, 0, 0, 0, 0, 0], &[]));
    disk.data.lock().resize((BLOCKS as usize + 8) * 512, 0);
    let r = run(&lu, &[0x00, 0, 0, 0, 0, 0], &[]);
    assert_check(&r, SenseKey::UnitAttention, Asc::CAPACITY_DATA_HAS_CHANGED);
    let r = run(&lu, &cdb10(0x25, 0, 0, 0), &[]);
    assert_eq!(be32(&r.data_in, 0) as u64, BLOCKS + 7);
}

fn prout(lu: &LogicalUnit, n: &Nexus, sa: u8, ty: u8, key: u64, sa_key: u64) -> Response {
    let mut data = vec![0u8; 24];
    data[..8].copy_from_slice(&key.to_be_bytes());
    data[8..16].copy_from_slice(&sa_key.to_be_bytes());
    exec(lu, n, &[0x5F, sa, ty, 0, 0, 0, 0, 0, 24, 0], &data)
}

#[test]
fn persistent_reservations_gate_io() {
    let (_, lu) = setup();
    let (a, b, c) = (nexus(1), nexus(2), nexus(3));
    assert_good(&prout(&lu, &a, 6, 0, 0, 0xA));
    assert_good(&prout(&lu, &b, 6, 0, 0, 0xB));
    // Exclusive Access - Registrants Only held by a.
    assert_good(&prout(&lu, &a, 1, 6, 0xA, 0));
    let read = cdb10(0x28, 0, 1, 1);
    let write = cdb10(0x2A, 0, 1, 1);
    assert_good(&exec(&lu, &b, &read, &[]));
    assert_good(&exec(&lu, &b, &write, &[0; 512]));
    assert_eq!(
        exec(&lu, &c, &read, &[]).status,
        Status::ReservationConflict
    );
    assert_eq!(
        exec(&lu, &c, &write, &[0; 512]).status,
        Status::ReservationConflict
    );
    assert_good(&exec(&lu, &c, &[0x00, 0, 0, 0, 0, 0], &[]));
    assert_good(&exec(&lu, &c, &cdb10(0x25, 0, 0, 0), &[]));
    let rr = exec(&lu, &c, &[0x5E, 1, 0, 0, 0, 0, 0, 0, 64, 0], &[]);
    assert_eq!(rr.data_in[21], 6);
    // Wrong key: RESERVATION CONFLICT; PREEMPT by b takes over and notifies a.
    assert_eq!(
        prout(&lu, &b, 1, 6, 0xA, 0).status,
        Status::ReservationConflict
    );
    assert_good(&prout(&lu, &b, 4, 3, 0xB, 0xA));
    let r = exec(&lu, &a, &read, &[]);
    assert_check(&r, SenseKey::UnitAttention, Asc::REGISTRATIONS_PREEMPTED);
    assert_eq!(
        exec(&lu, &a, &read, &[]).status,
        Status::ReservationConflict
    );
    // Registrations outlive their I_T nexus.
    lu.nexus_gone(&b);
    assert_eq!(
        exec(&lu, &a, &read, &[]).status,
        Status::ReservationConflict
    );
    assert_good(&prout(&lu, &b, 3, 0, 0xB, 0));
    assert_good(&exec(&lu, &a, &read, &[]));
    let bad = exec(&lu, &a, &[0x5F, 0, 0, 0, 0, 0, 0, 0, 24, 0], &[0; 10]);
    assert_illegal(&bad, Asc::PARAMETER_LIST_LENGTH_ERROR);
}

#[test]
fn removable_medium() {
    let mut ident = LuIdentity::from_volume_id("usb");
    ident.removable = true;
    let (_, lu) = setup_with(64, 512, ident);
    let (a, b) = (nexus(1), nexus(2));
    let eject = [0x1B, 0, 0, 0, 0x02, 0];
    let load = [0x1B, 0, 0, 0, 0x03, 0];
    assert_eq!(exec(&lu, &a, &[0x12, 0, 0, 0, 36, 0], &[]).data_in[1], 0x80);
    assert_good(&exec(&lu, &a, &[0x1E, 0, 0, 0, 1, 0], &[]));
    assert_illegal(&exec(&lu, &b, &eject, &[]), Asc::MEDIUM_REMOVAL_PREVENTED);
    assert_good(&exec(&lu, &a, &[0x1E, 0, 0, 0, 0, 0], &[]));
    assert_good(&exec(&lu, &a, &eject, &[]));
    let not_present = |r: &Response| assert_check(r, SenseKey::NotReady, Asc::MEDIUM_NOT_PRESENT);
    not_present(&exec(&lu, &a, &[0x00, 0, 0, 0, 0, 0], &[]));
    not_present(&exec(&lu, &a, &cdb10(0x28, 0, 0, 1), &[]));
    not_present(&exec(&lu, &a, &cdb10(0x25, 0, 0, 0), &[]));
    assert_good(&exec(&lu, &a, &load, &[]));
    assert_good(&exec(&lu, &a, &[0x00, 0, 0, 0, 0, 0], &[]));
    // Prevention ends with the nexus (and with a reset).
    assert_good(&exec(&lu, &a, &[0x1E, 0, 0, 0, 1, 0], &[]));
    lu.nexus_gone(&a);
    assert_good(&exec(&lu, &b, &eject, &[]));
    assert_good(&exec(&lu, &b, &load, &[]));
    // Power conditions are accepted and change nothing.
    assert_good(&exec(&lu, &b, &[0x1B, 1, 0, 0, 0x32, 0], &[]));
    assert_good(&exec(&lu, &b, &[0x00, 0, 0, 0, 0, 0], &[]));
    // A fixed disk refuses to eject but may be stopped and started.
    let (_, fixed) = setup();
    assert_illegal(&run(&fixed, &eject, &[]), Asc::INVALID_FIELD_IN_CDB);
    assert_good(&run(&fixed, &[0x1B, 0, 0, 0, 0, 0], &[]));
    assert_good(&run(&fixed, &[0x1B, 0, 0, 0, 1, 0], &[]));
}

#[test]
fn pool_errors_map_to_sense() {
    let (disk, lu) = setup();
    let cases: [(MakeError, SenseKey, Asc); 4] = [
        (
            || PoolError::NoSpace("full".into()),
            SenseKey::DataProtect,
            Asc::SPACE_ALLOCATION_FAILED_WRITE_PROTECT,
        ),
        (
            || PoolError::Checksum {
                what: "chunk".into(),
            },
            SenseKey::MediumError,
            Asc::WRITE_ERROR,
        ),
        (
            || PoolError::VolumeDeleted(maas_pool::VolumeId(1)),
            SenseKey::NotReady,
            Asc::LUN_NOT_SUPPORTED,
        ),
        (
            || PoolError::Meta("boom".into()),
            SenseKey::HardwareError,
            Asc::INTERNAL_TARGET_FAILURE,
        ),
    ];
    for (make, key, asc) in cases {
        *disk.fail_with.lock() = Some(make);
        assert_check(&run(&lu, &cdb10(0x2A, 0, 0, 1), &[0; 512]), key, asc);
    }
    *disk.fail_with.lock() = Some(|| PoolError::Checksum {
        what: "chunk".into(),
    });
    let r = run(&lu, &cdb10(0x28, 0, 0, 1), &[]);
    assert_check(&r, SenseKey::MediumError, Asc::UNRECOVERED_READ_ERROR);
}

#[test]
fn report_supported_operation_codes_through_execute() {
    let (_, lu) = setup();
    let mut cdb = vec![0xA3, 0x0C, 0x00, 0, 0, 0, 0, 0, 0xFF, 0xFF, 0, 0];
    let r = run(&lu, &cdb, &[]);
    assert_good(&r);
    let mut at = 4;
    while at + 8 <= r.data_in.len() {
        let (opcode, sa, servactv) = (
            r.data_in[at],
            be16(&r.data_in, at + 2),
            r.data_in[at + 5] & 1,
        );
        cdb[2] = if servactv == 1 { 2 } else { 1 };
        cdb[3] = opcode;
        cdb[4..6].copy_from_slice(&sa.to_be_bytes());
        let one = run(&lu, &cdb, &[]);
        assert_good(&one);
        assert_eq!(one.data_in[4], opcode);
        cdb[2] = if servactv == 1 { 1 } else { 2 };
        let wrong = run(&lu, &cdb, &[]);
        // Not byte 1: libiscsi would take a field pointer on byte 1 for "not implemented".
        assert_eq!(
            wrong.sense.and_then(|s| s.key_specific).map(|k| k[2]),
            Some(2)
        );
        at += 8;
    }
}

fn xcopy_param(
    lu: &LogicalUnit,
    list_id: u8,
    usage: u8,
    segments: &[(u16, u16, u16, u64, u64)],
) -> Vec<u8> {
    let mut d = vec![0u8; 16];
    d[0] = list_id;
    d[1] = usage << 3;
    // One identification target descriptor naming the logical unit by its NAA designator.
    let mut target = vec![0xE4, 0, 0, 0, 0x01, 0x03, 0, 16];
    target.extend_from_slice(&lu.identity().naa);
    target.resize(28, 0);
    target.extend_from_slice(&lu.block_size().to_be_bytes());
    d[2..4].copy_from_slice(&(target.len() as u16).to_be_bytes());
    d.extend_from_slice(&target);
    let mut segs = Vec::new();
    for &(src, dst, blocks, src_lba, dst_lba) in segments {
        segs.extend_from_slice(&[0x02, 0, 0, 0x18]);
        segs.extend_from_slice(&src.to_be_bytes());
        segs.extend_from_slice(&dst.to_be_bytes());
        segs.extend_from_slice(&[0, 0]);
        segs.extend_from_slice(&blocks.to_be_bytes());
        segs.extend_from_slice(&src_lba.to_be_bytes());
        segs.extend_from_slice(&dst_lba.to_be_bytes());
    }
    d[8..12].copy_from_slice(&(segs.len() as u32).to_be_bytes());
    d.extend_from_slice(&segs);
    d
}

fn xcopy_cdb(len: usize) -> Vec<u8> {
    let mut c = vec![0u8; 16];
    c[0] = 0x83;
    c[10..14].copy_from_slice(&(len as u32).to_be_bytes());
    c
}

#[test]
fn extended_copy_within_the_logical_unit() {
    let (disk, lu) = setup();
    let data = pattern(64 * 512, 9);
    assert_good(&run(&lu, &cdb10(0x2A, 0, 0, 64), &data));
    let param = xcopy_param(&lu, 1, 0, &[(0, 0, 64, 0, 1000)]);
    let r = run(&lu, &xcopy_cdb(param.len()), &param);
    assert_good(&r);
    assert_eq!(r.spdtl_out as usize, param.len());
    assert_eq!(disk.bytes(1000 * 512, data.len()), data);
    // Overlapping forward copy behaves like memmove.
    let param = xcopy_param(&lu, 2, 2, &[(0, 0, 64, 0, 16)]);
    assert_good(&run(&lu, &xcopy_cdb(param.len()), &param));
    assert_eq!(disk.bytes(16 * 512, data.len()), data);
    // Copy status is held for list id 1 (usage 00b) and only for this nexus.
    let rcr = |list_id: u8, sa: u8| {
        let mut c = vec![0x84, sa, list_id, 0, 0, 0, 0, 0, 0, 0, 0, 0, 4, 0, 0, 0];
        c[10..14].copy_from_slice(&1024u32.to_be_bytes());
        c
    };
    let r = run(&lu, &rcr(1, 0), &[]);
    assert_good(&r);
    assert_eq!(
        (be32(&r.data_in, 0), r.data_in[4], be16(&r.data_in, 5)),
        (8, 0, 1)
    );
    assert_illegal(&run(&lu, &rcr(2, 0), &[]), Asc::INVALID_FIELD_IN_CDB);
    assert_illegal(
        &exec(&lu, &nexus(2), &rcr(1, 0), &[]),
        Asc::INVALID_FIELD_IN_CDB,
    );
    let op = run(&lu, &rcr(0, 3), &[]);
    assert!(be32(&op.data_in, 0) >= 40);
    assert_eq!((be16(&op.data_in, 8), be16(&op.data_in, 10)), (2, 8));
    assert_eq!(&op.data_in[43..], &[2, 0x02, 0xE4]);
    // An empty parameter list does nothing.
    assert_good(&run(&lu, &xcopy_cdb(0), &[]));
}

#[test]
fn extended_copy_errors() {
    let (_, lu) = setup();
    let good = xcopy_param(&lu, 1, 0, &[(0, 0, 8, 0, 100)]);
    // Truncated parameter lists.
    for cut in [20, good.len() - 1] {
        assert_illegal(
            &run(&lu, &xcopy_cdb(cut), &good[..cut]),
            Asc::PARAMETER_LIST_LENGTH_ERROR,
        );
    }
    // Unknown target descriptor type and segment type.
    let mut bad = good.clone();
    bad[16] = 0xE0;
    assert_illegal(
        &run(&lu, &xcopy_cdb(bad.len()), &bad),
        Asc::UNSUPPORTED_TARGET_DESCRIPTOR_TYPE_CODE,
    );
    let mut bad = good.clone();
    bad[48] = 0x03;
    assert_illegal(
        &run(&lu, &xcopy_cdb(bad.len()), &bad),
        Asc::UNSUPPORTED_SEGMENT_DESCRIPTOR_TYPE_CODE,
    );
    // Another logical unit, a missing target index, a range past the end: COPY ABORTED.
    let mut bad = good.clone();
    bad[16 + 8] ^= 0xFF;
    assert_eq!(
        run(&lu, &xcopy_cdb(bad.len()), &bad).sense.map(|s| s.key),
        Some(SenseKey::CopyAborted)
    );
    let bad = xcopy_param(&lu, 1, 0, &[(0, 1, 8, 0, 100)]);
    assert_eq!(
        run(&lu, &xcopy_cdb(bad.len()), &bad).sense.map(|s| s.key),
        Some(SenseKey::CopyAborted)
    );
    let bad = xcopy_param(&lu, 1, 0, &[(0, 0, 8, 0, BLOCKS - 1)]);
    assert_eq!(
        run(&lu, &xcopy_cdb(bad.len()), &bad).sense.map(|s| s.key),
        Some(SenseKey::CopyAborted)
    );
    // Too many segment descriptors.
    let many: Vec<_> = (0..9).map(|i| (0, 0, 1, i, 100 + i)).collect();
    let bad = xcopy_param(&lu, 1, 0, &many);
    assert_illegal(
        &run(&lu, &xcopy_cdb(bad.len()), &bad),
        Asc::TOO_MANY_SEGMENT_DESCRIPTORS,
    );
}

#[test]
fn four_kib_blocks() {
    let (disk, lu) = setup_with(256, 4096, LuIdentity::from_volume_id("v4k"));
    let data = pattern(2 * 4096, 5);
    assert_good(&run(&lu, &cdb16(0x8A, 0, 254, 2), &data));
    assert_eq!(disk.bytes(254 * 4096, data.len()), data);
    let r = run(&lu, &cdb16(0x9E, 0x10, 0, 32), &[]);
    assert_eq!(r.sense, None);
    let mut rc16 = cdb16(0x9E, 0x10, 0, 32);
    rc16[2..10].fill(0);
    let r = run(&lu, &rc16, &[]);
    assert_eq!((be32(&r.data_in, 8), r.data_in[13]), (4096, 0));
    // 512 bytes of Data-Out for a 4 KiB block write nothing (and fail nothing).
    assert_good(&run(&lu, &cdb10(0x2A, 0, 1, 1), &[7; 512]));
    assert_eq!(disk.bytes(4096, 4096), vec![0; 4096]);
}

fn write_atomic_cdb(flags: u8, lba: u64, blocks: u16) -> Vec<u8> {
    let mut c = cdb16(0x9C, flags, lba, 0);
    c[12..14].copy_from_slice(&blocks.to_be_bytes());
    c
}

#[test]
fn write_atomic_16() {
    let (disk, lu) = setup();
    // Advertised: the device's limit in blocks; no alignment, granularity or boundaries.
    let b0 = run(&lu, &[0x12, 1, 0xB0, 0, 255, 0], &[]);
    assert_eq!(be32(&b0.data_in, 44), 128);
    assert_eq!(&b0.data_in[48..64], &[0; 16]);
    let data = pattern(8 * 512, 4);
    let r = run(&lu, &write_atomic_cdb(0, 10, 8), &data);
    assert_good(&r);
    assert_eq!(r.spdtl_out, 8 * 512);
    assert_eq!(disk.bytes(10 * 512, data.len()), data);
    assert_eq!(disk.atomic_writes.load(Ordering::Relaxed), 1);
    // DPO and FUA are accepted; FUA makes it durable.
    let before = disk.fua_writes.load(Ordering::Relaxed);
    assert_good(&run(&lu, &write_atomic_cdb(0x18, 10, 8), &data));
    assert_eq!(disk.fua_writes.load(Ordering::Relaxed), before + 1);
    // The largest atomic write, at the end of the medium; one block more is refused.
    assert_good(&run(
        &lu,
        &write_atomic_cdb(0, BLOCKS - 128, 128),
        &[7; 128 * 512],
    ));
    assert_eq!(disk.bytes((BLOCKS - 1) * 512, 512), vec![7; 512]);
    let r = run(&lu, &write_atomic_cdb(0, 0, 129), &[7; 129 * 512]);
    assert_illegal(&r, Asc::INVALID_FIELD_IN_CDB);
    assert_eq!(r.sense.and_then(|s| s.key_specific), Some([0xC0, 0, 12]));
    // Zero blocks: fine up to the end of the medium, out of range past it.
    assert_good(&run(&lu, &write_atomic_cdb(0, 0, 0), &[]));
    assert_good(&run(&lu, &write_atomic_cdb(0, BLOCKS, 0), &[]));
    for lba in [BLOCKS + 1, 1 << 63, u64::MAX] {
        assert_illegal(
            &run(&lu, &write_atomic_cdb(0, lba, 0), &[]),
            Asc::LBA_OUT_OF_RANGE,
        );
        assert_illegal(
            &run(&lu, &write_atomic_cdb(0, lba, 1), &[0; 512]),
            Asc::LBA_OUT_OF_RANGE,
        );
    }
    assert_illegal(
        &run(&lu, &write_atomic_cdb(0, BLOCKS - 1, 2), &[0; 2048]),
        Asc::LBA_OUT_OF_RANGE,
    );
    // WRPROTECT, an atomic boundary: not supported.
    for wrprotect in 1..8u8 {
        assert_illegal(
            &run(&lu, &write_atomic_cdb(wrprotect << 5, 0, 1), &[0; 512]),
            Asc::INVALID_FIELD_IN_CDB,
        );
    }
    let mut c = write_atomic_cdb(0, 0, 1);
    c[11] = 1;
    assert_illegal(&run(&lu, &c, &[0; 512]), Asc::INVALID_FIELD_IN_CDB);
    // Less Data-Out than the CDB names: nothing is written.
    let writes = disk.atomic_writes.load(Ordering::Relaxed);
    let r = run(&lu, &write_atomic_cdb(0, 200, 4), &[1; 3 * 512]);
    assert_illegal(&r, Asc::INVALID_FIELD_IN_CDB);
    assert_eq!(disk.atomic_writes.load(Ordering::Relaxed), writes);
    assert_eq!(disk.bytes(200 * 512, 512), vec![0; 512]);
    // Pool errors map as for other writes.
    *disk.fail_with.lock() = Some(|| PoolError::NoSpace("full".into()));
    assert_check(
        &run(&lu, &write_atomic_cdb(0, 0, 1), &[0; 512]),
        SenseKey::DataProtect,
        Asc::SPACE_ALLOCATION_FAILED_WRITE_PROTECT,
    );
    *disk.fail_with.lock() = None;
    // REPORT SUPPORTED OPERATION CODES: DPO and FUA in the usage data.
    let r = run(&lu, &[0xA3, 0x0C, 1, 0x9C, 0, 0, 0, 0, 1, 0, 0, 0], &[]);
    assert_good(&r);
    assert_eq!(
        (r.data_in[1] & 7, r.data_in[4], r.data_in[5]),
        (3, 0x9C, 0x18)
    );
}

#[test]
fn write_atomic_16_read_only_and_unsupported() {
    let mut ident = LuIdentity::from_volume_id("ro");
    ident.read_only = true;
    let (_, lu) = setup_with(64, 4096, ident);
    assert_check(
        &run(&lu, &write_atomic_cdb(0, 0, 1), &[0; 4096]),
        SenseKey::DataProtect,
        Asc::WRITE_PROTECTED,
    );
    // A device without atomic writes: not advertised, not listed, not implemented.
    let mut disk = MemDisk::new(64, 512);
    disk.atomic_max = 0;
    let lu = LogicalUnit::new(Arc::new(disk), LuIdentity::from_volume_id("plain"));
    let b0 = run(&lu, &[0x12, 1, 0xB0, 0, 255, 0], &[]);
    assert_eq!(&b0.data_in[44..64], &[0; 20]);
    assert_illegal(
        &run(&lu, &write_atomic_cdb(0, 0, 1), &[0; 512]),
        Asc::INVALID_COMMAND_OPERATION_CODE,
    );
    let r = run(&lu, &[0xA3, 0x0C, 1, 0x9C, 0, 0, 0, 0, 1, 0, 0, 0], &[]);
    assert_eq!(r.data_in, vec![0, 1, 0, 0]);
    let all = run(&lu, &[0xA3, 0x0C, 0, 0, 0, 0, 0, 0, 0xFF, 0xFF, 0, 0], &[]);
    assert!(all.data_in[4..].chunks(8).all(|c| c[0] != 0x9C));
}

fn lba_status(lu: &LogicalUnit, lba: u64, alloc: u32) -> Vec<(u64, u32, u8)> {
    let r = run(lu, &cdb16(0x9E, 0x12, lba, alloc), &[]);
    assert_good(&r);
    let d = &r.data_in;
    assert_eq!(
        be32(d, 0) as usize,
        d.len() - 4,
        "whole list within {alloc}"
    );
    d[8..]
        .chunks(16)
        .map(|c| (be64(c, 0), be32(c, 8), c[12] & 0x0F))
        .collect()
}

#[test]
fn get_lba_status_reports_provisioning() {
    let (_, lu) = setup();
    let list = unmap_list(&[(8, 8), (32, 100)]);
    assert_good(&run(&lu, &unmap_cdb(list.len()), &list));
    assert_eq!(
        lba_status(&lu, 0, 1024),
        vec![
            (0, 8, 0),
            (8, 8, 1),
            (16, 16, 0),
            (32, 100, 1),
            (132, BLOCKS as u32 - 132, 0)
        ]
    );
    assert_eq!(lba_status(&lu, 10, 1024)[0], (10, 6, 1));
    // As many descriptors as the allocation length holds (at least one).
    assert_eq!(lba_status(&lu, 0, 40).len(), 2);
    let r = run(&lu, &cdb16(0x9E, 0x12, 0, 8), &[]);
    assert_eq!(r.data_in.len(), 8);
    assert_eq!(be32(&r.data_in, 0), 20);
}

fn sanitize_cdb(immed: bool, ause: bool, sa: u8, param_len: u16) -> Vec<u8> {
    let mut c = vec![0x48, sa, 0, 0, 0, 0, 0, 0, 0, 0];
    if immed {
        c[1] |= 0x80;
    }
    if ause {
        c[1] |= 0x20;
    }
    c[7..9].copy_from_slice(&param_len.to_be_bytes());
    c
}

fn overwrite_list(flags: u8, pattern: &[u8]) -> Vec<u8> {
    let mut d = vec![flags, 0];
    d.extend_from_slice(&(pattern.len() as u16).to_be_bytes());
    d.extend_from_slice(pattern);
    d
}

fn overwrite(lu: &LogicalUnit, immed: bool, ause: bool, list: &[u8]) -> Response {
    run(lu, &sanitize_cdb(immed, ause, 1, list.len() as u16), list)
}

#[test]
fn sanitize_overwrite_and_block_erase() {
    let (disk, lu) = setup();
    assert_good(&run(&lu, &cdb10(0x2A, 0, 0, 4), &[b'a'; 2048]));
    // One full block of pattern: every block holds it once the command completes (IMMED=0).
    let r = overwrite(&lu, false, false, &overwrite_list(0x01, &[0xAA; 512]));
    assert_good(&r);
    assert_eq!(r.spdtl_out, 516);
    assert_eq!(*disk.data.lock(), vec![0xAA; BLOCKS as usize * 512]);
    assert!(disk.flushes.load(Ordering::Relaxed) >= 1);
    assert_eq!(lba_status(&lu, 0, 1024), vec![(0, BLOCKS as u32, 0)]);
    // A 3-byte pattern restarts at each block; INVERT with an even count ends on the pattern.
    assert_good(&overwrite(
        &lu,
        false,
        false,
        &overwrite_list(0x82, &[1, 2, 3]),
    ));
    let block: Vec<u8> = [1, 2, 3].iter().copied().cycle().take(512).collect();
    assert_eq!(disk.bytes(0, 512), block);
    assert_eq!(disk.bytes((BLOCKS - 1) * 512, 512), block);
    // An all-zero pattern deallocates the medium.
    assert_good(&overwrite(
        &lu,
        false,
        false,
        &overwrite_list(0x01, &[0; 4]),
    ));
    assert_eq!(*disk.data.lock(), vec![0; BLOCKS as usize * 512]);
    assert_eq!(lba_status(&lu, 0, 1024), vec![(0, BLOCKS as u32, 1)]);
    // BLOCK ERASE: deallocated, reads GOOD (zeroes).
    assert_good(&run(&lu, &cdb10(0x2A, 0, 100, 2), &[b'a'; 1024]));
    assert_good(&run(&lu, &sanitize_cdb(false, false, 2, 0), &[]));
    assert_eq!(lba_status(&lu, 0, 1024), vec![(0, BLOCKS as u32, 1)]);
    let r = run(&lu, &cdb10(0x28, 0, 100, 2), &[]);
    assert_good(&r);
    assert_eq!(r.data_in, vec![0; 1024]);
    // With IMMED the command completes at once; TEST UNIT READY says when it is done.
    let r = overwrite(&lu, true, false, &overwrite_list(0x01, &[0x5A; 512]));
    assert_good(&r);
    wait_ready(&lu);
    assert_eq!(disk.bytes(7 * 512, 512), vec![0x5A; 512]);
    // Sanitize-capable device: block erase leaves reads working (WABEREQ 01b).
    let b1 = run(&lu, &[0x12, 1, 0xB1, 0, 255, 0], &[]);
    assert_eq!(b1.data_in[7] >> 4, 0b0100);
}

fn wait_ready(lu: &LogicalUnit) {
    for _ in 0..500 {
        if run(lu, &[0x00, 0, 0, 0, 0, 0], &[]).status == Status::Good {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    panic!("the sanitize operation never finished");
}

#[test]
fn sanitize_field_checks() {
    let (disk, lu) = setup();
    assert_good(&run(&lu, &cdb10(0x2A, 0, 0, 1), &[b'a'; 512]));
    let good = overwrite_list(0x01, &[0xAA; 512]);
    // Parameter list length: 5..=block size + 4 for OVERWRITE, 0 for the others.
    for len in [0u16, 1, 4, 517] {
        let r = run(
            &lu,
            &sanitize_cdb(false, false, 1, len),
            &[&good[..], &[0; 8]].concat(),
        );
        assert_illegal(&r, Asc::INVALID_FIELD_IN_CDB);
    }
    for sa in [2, 0x1F] {
        let r = run(&lu, &sanitize_cdb(false, false, sa, 8), &[0; 8]);
        assert_illegal(&r, Asc::INVALID_FIELD_IN_CDB);
        assert_eq!(r.sense.and_then(|s| s.key_specific), Some([0xC0, 0, 7]));
    }
    // OVERWRITE COUNT 0, pattern length 0 or beyond the block: the parameter list is wrong.
    let mut no_pattern = overwrite_list(0x01, &[0xAA; 512]);
    no_pattern[2..4].fill(0);
    for list in [
        overwrite_list(0x00, &[0xAA; 512]),
        no_pattern,
        overwrite_list(0x01, &[0xAA; 513]),
    ] {
        let len = list.len().min(516);
        let r = run(
            &lu,
            &sanitize_cdb(false, false, 1, len as u16),
            &list[..len],
        );
        assert_illegal(&r, Asc::INVALID_FIELD_IN_PARAMETER_LIST);
    }
    // Service actions other than 01h, 02h and 1Fh, CRYPTOGRAPHIC ERASE included.
    for sa in (0..0x1Fu8).filter(|sa| !matches!(sa, 1 | 2)) {
        let r = run(&lu, &sanitize_cdb(false, false, sa, 0), &[]);
        assert_illegal(&r, Asc::INVALID_FIELD_IN_CDB);
    }
    // ZNR and the reserved bytes.
    let mut c = sanitize_cdb(false, false, 2, 0);
    c[1] |= 0x40;
    assert_illegal(&run(&lu, &c, &[]), Asc::INVALID_FIELD_IN_CDB);
    for at in 2..7 {
        let mut c = sanitize_cdb(false, false, 2, 0);
        c[at] = at as u8;
        assert_illegal(&run(&lu, &c, &[]), Asc::INVALID_FIELD_IN_CDB);
    }
    // Nothing was sanitized by any of them.
    assert_eq!(disk.bytes(0, 512), vec![b'a'; 512]);
    // EXIT FAILURE MODE outside a failure: nothing to do.
    assert_good(&run(&lu, &sanitize_cdb(false, false, 0x1F, 0), &[]));
    // Listed: OVERWRITE, BLOCK ERASE, EXIT FAILURE MODE; not CRYPTOGRAPHIC ERASE.
    let rsoc = |sa: u8| run(&lu, &[0xA3, 0x0C, 2, 0x48, 0, sa, 0, 0, 1, 0, 0, 0], &[]);
    for sa in [1, 2, 0x1F] {
        assert_eq!(rsoc(sa).data_in[1] & 7, 3, "service action {sa:#x}");
    }
    assert_eq!(
        rsoc(super::cdb::sa::SANITIZE_CRYPTO_ERASE).data_in,
        vec![0, 1, 0, 0]
    );
}

#[test]
fn sanitize_reservations_and_write_protect() {
    let (disk, lu) = setup();
    let (a, b) = (nexus(1), nexus(2));
    let list = overwrite_list(0x01, &[0xAA; 512]);
    let ow = sanitize_cdb(false, false, 1, list.len() as u16);
    let be = sanitize_cdb(false, false, 2, 0);
    assert_good(&exec(&lu, &b, &[0x16, 0, 0, 0, 0, 0], &[]));
    assert_eq!(
        exec(&lu, &a, &ow, &list).status,
        Status::ReservationConflict
    );
    assert_eq!(exec(&lu, &a, &be, &[]).status, Status::ReservationConflict);
    assert_good(&exec(&lu, &b, &[0x17, 0, 0, 0, 0, 0], &[]));
    assert_good(&mode_select_control(&lu, &b, true));
    let _ = exec(&lu, &a, &[0x00, 0, 0, 0, 0, 0], &[]);
    for (cdb, data) in [(&ow, &list[..]), (&be, &[][..])] {
        assert_check(
            &exec(&lu, &a, cdb, data),
            SenseKey::DataProtect,
            Asc::SOFTWARE_WRITE_PROTECTED,
        );
    }
    assert_eq!(disk.flushes.load(Ordering::Relaxed), 0);
}

/// While an operation runs only INQUIRY, REPORT LUNS and REQUEST SENSE (with progress) are
/// served; it survives a reset, and ends on its own.
#[test]
fn sanitize_in_progress() {
    let (disk, lu) = setup();
    let hold = disk.hold.lock();
    assert_good(&overwrite(
        &lu,
        true,
        false,
        &overwrite_list(0x01, &[0x77; 512]),
    ));
    let in_progress = |r: &Response| assert_check(r, SenseKey::NotReady, Asc::SANITIZE_IN_PROGRESS);
    in_progress(&run(&lu, &[0x00, 0, 0, 0, 0, 0], &[]));
    in_progress(&run(&lu, &cdb10(0x28, 0, 0, 1), &[]));
    in_progress(&run(&lu, &cdb10(0x2A, 0, 0, 1), &[0; 512]));
    in_progress(&run(&lu, &[0x1B, 1, 0, 0, 0x12, 0], &[]));
    in_progress(&run(&lu, &sanitize_cdb(false, false, 2, 0), &[]));
    in_progress(&run(&lu, &sanitize_cdb(false, false, 0x1F, 0), &[]));
    assert_good(&run(&lu, &[0x12, 0, 0, 0, 96, 0], &[]));
    let r = run(&lu, &[0x03, 0, 0, 0, 18, 0], &[]);
    assert_good(&r);
    assert_eq!(
        (r.data_in[2], r.data_in[12], r.data_in[13]),
        (0x02, 0x04, 0x1B)
    );
    assert_eq!(r.data_in[15] & 0x80, 0x80, "progress indication");
    lu.reset();
    let r = run(&lu, &[0x00, 0, 0, 0, 0, 0], &[]);
    assert_check(
        &r,
        SenseKey::UnitAttention,
        Asc::BUS_DEVICE_RESET_FUNCTION_OCCURRED,
    );
    in_progress(&run(&lu, &[0x00, 0, 0, 0, 0, 0], &[]));
    drop(hold);
    wait_ready(&lu);
    assert_eq!(*disk.data.lock(), vec![0x77; BLOCKS as usize * 512]);
    assert_good(&run(&lu, &cdb10(0x2A, 0, 0, 1), &[0; 512]));
}

#[test]
fn sanitize_failure_modes() {
    let (disk, lu) = setup();
    let list = overwrite_list(0x01, &[0x11; 512]);
    let failed =
        |r: &Response| assert_check(r, SenseKey::MediumError, Asc::SANITIZE_COMMAND_FAILED);
    let efm = sanitize_cdb(false, false, 0x1F, 0);
    // Restricted (AUSE=0): only a successful sanitize without AUSE clears the failure.
    *disk.fail_with.lock() = Some(|| PoolError::Io {
        what: "disk".into(),
        source: std::io::Error::other("gone"),
    });
    failed(&overwrite(&lu, false, false, &list));
    failed(&run(&lu, &cdb10(0x28, 0, 0, 1), &[]));
    failed(&run(&lu, &[0x00, 0, 0, 0, 0, 0], &[]));
    assert_good(&run(&lu, &[0x12, 0, 0, 0, 96, 0], &[]));
    let r = run(&lu, &[0x03, 0, 0, 0, 18, 0], &[]);
    assert_eq!(
        (r.data_in[2], r.data_in[12], r.data_in[13]),
        (0x03, 0x31, 0x03)
    );
    assert_illegal(&run(&lu, &efm, &[]), Asc::INVALID_FIELD_IN_CDB);
    assert_illegal(
        &overwrite(&lu, false, true, &list),
        Asc::INVALID_FIELD_IN_CDB,
    );
    *disk.fail_with.lock() = None;
    assert_good(&run(&lu, &sanitize_cdb(false, false, 2, 0), &[]));
    assert_good(&run(&lu, &cdb10(0x28, 0, 0, 1), &[]));
    // Unrestricted (AUSE=1): EXIT FAILURE MODE makes the medium accessible again.
    *disk.fail_with.lock() = Some(|| PoolError::Closed);
    failed(&overwrite(&lu, false, true, &list));
    *disk.fail_with.lock() = None;
    failed(&run(&lu, &cdb10(0x2A, 0, 0, 1), &[0; 512]));
    assert_good(&run(&lu, &efm, &[]));
    assert_good(&run(&lu, &cdb10(0x2A, 0, 0, 1), &[0; 512]));
}

/// CDBs that look like real commands often enough to reach the handlers: a known operation
/// code (and service action) with random values in the fields it uses, mostly of its own
/// length, sometimes padded to 16 bytes as iSCSI carries it, sometimes one byte short.
fn cdb_strategy() -> impl Strategy<Value = Vec<u8>> {
    let known = (
        0..COMMANDS.len(),
        proptest::collection::vec(any::<u8>(), 16),
        0u8..8,
    )
        .prop_map(|(i, mut bytes, shape)| {
            let info = &COMMANDS[i];
            for (b, mask) in bytes.iter_mut().zip(info.usage) {
                *b &= mask;
            }
            bytes[0] = info.op;
            if let Some(sa) = info.sa {
                bytes[1] = (bytes[1] & !0x1F) | sa;
            }
            let len = match shape {
                0 => info.usage.len() - 1,
                1 => 16,
                _ => info.usage.len(),
            };
            bytes.truncate(len);
            bytes
        });
    prop_oneof![4 => known, 1 => proptest::collection::vec(any::<u8>(), 0..32)]
}

fn data_out_strategy() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        Just(Vec::new()),
        proptest::collection::vec(any::<u8>(), 0..600),
        (1usize..4).prop_map(|n| vec![0u8; n * 512]),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn execute_never_panics_and_bounds_data_in(
        cdbs in proptest::collection::vec((cdb_strategy(), data_out_strategy(), 0u8..3), 1..6),
    ) {
        let mut ident = LuIdentity::from_volume_id("fuzz");
        ident.removable = true;
        let (_, lu) = setup_with(256, 512, ident);
        let nexuses = [nexus(1), nexus(2), nexus(3)];
        for (cdb, data_out, who) in &cdbs {
            let r = exec(&lu, &nexuses[usize::from(*who)], cdb, data_out);
            prop_assert!(r.data_in.len() <= MAX_TRANSFER_BYTES as usize);
            prop_assert_eq!(r.sense.is_some(), r.status == Status::CheckCondition);
            if r.status != Status::Good {
                prop_assert!(r.data_in.is_empty());
            }
        }
        lu.reset();
        lu.nexus_gone(&nexuses[0]);
    }
}
