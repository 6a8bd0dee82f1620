//! The NVM command set on a namespace: Read, Write, Flush, Write Zeroes and Dataset Management,
//! with range checks and the status codes hosts act on. Transport-independent; runs either
//! without waiting (on the connection's task, when the pool can answer from memory) or on a
//! blocking thread.

use std::sync::Arc;

use crate::flow::Start;
use maas_pool::{AsyncRead, PoolError};

use super::MAX_TRANSFER;
use super::spec::{Completion, Sqe, Status, io, le32, le64};
use super::subsystem::Namespace;

/// Where an I/O command goes.
#[derive(Debug, Clone)]
pub enum Target {
    One(Arc<Namespace>),
    /// Flush with NSID FFFFFFFFh: every namespace of the subsystem.
    All(Vec<Arc<Namespace>>),
}

/// An I/O command ready to run: its namespace(s), the command, and any data the host sent.
#[derive(Debug)]
pub struct IoJob {
    pub target: Target,
    pub sqe: Sqe,
    pub data: Vec<u8>,
    /// The controller's volatile write cache is on (when off, every write is FUA).
    pub write_cache: bool,
}

#[derive(Clone, Copy)]
enum Kind {
    Read,
    Write,
}

fn pool_status(e: &PoolError, kind: Kind) -> Status {
    match e {
        PoolError::OutOfRange { .. } => Status::LBA_OUT_OF_RANGE,
        PoolError::NoSpace(_) => Status::CAPACITY_EXCEEDED,
        PoolError::VolumeDeleted(_) | PoolError::VolumeNotFound(_) | PoolError::Closed => {
            Status::NAMESPACE_NOT_READY
        }
        e if e.is_integrity() || matches!(e, PoolError::Io { .. }) => match kind {
            Kind::Read => Status::UNRECOVERED_READ_ERROR,
            Kind::Write => Status::WRITE_FAULT,
        },
        _ => Status::INTERNAL_ERROR,
    }
}

fn done(r: maas_pool::Result<()>, kind: Kind) -> Completion {
    match r {
        Ok(()) => Completion::ok(),
        Err(e) => {
            tracing::warn!("I/O command failed: {e}");
            Completion::status(pool_status(&e, kind))
        }
    }
}

/// A checked block range: byte offset and length.
struct Range {
    offset: u64,
    len: u64,
}

/// SLBA (CDW10-11) and NLB (CDW12, 0-based) of a Read/Write/Write Zeroes, range-checked.
fn lba_range(ns: &Namespace, sqe: &Sqe) -> Result<Range, Status> {
    block_range(ns, sqe.slba(), sqe.blocks())
}

fn block_range(ns: &Namespace, slba: u64, nlb: u64) -> Result<Range, Status> {
    let bs = u64::from(ns.dev.block_size());
    let blocks = ns.dev.capacity() / bs;
    match slba.checked_add(nlb) {
        Some(end) if end <= blocks => Ok(Range {
            offset: slba * bs,
            len: nlb * bs,
        }),
        _ => Err(Status::LBA_OUT_OF_RANGE),
    }
}

/// FUA bit of CDW12.
fn fua(sqe: &Sqe) -> bool {
    sqe.cdw(12) & (1 << 30) != 0
}

impl IoJob {
    fn ns(&self) -> Result<&Arc<Namespace>, Status> {
        match &self.target {
            Target::One(ns) => Ok(ns),
            Target::All(_) => Err(Status::INVALID_NAMESPACE),
        }
    }

    /// Starts the command on the connection's task (see [`crate::flow::Job::start`]): a read
    /// answered from memory or a write the log takes in memory completes here, a read that
    /// waits only for the device becomes a future; everything else goes to [`IoJob::run`].
    pub fn start(&self) -> Start<Completion> {
        let Ok(ns) = self.ns() else {
            return Start::Blocking;
        };
        match self.sqe.opcode() {
            io::READ if self.sqe.fuse() == 0 => self.start_read(ns),
            io::WRITE if self.write_cache && !fua(&self.sqe) && !ns.read_only => {
                let Ok(r) = lba_range(ns, &self.sqe) else {
                    return Start::Blocking;
                };
                if r.len != self.data.len() as u64 {
                    return Start::Blocking;
                }
                match ns.dev.write_nowait(r.offset, &self.data) {
                    Ok(true) => {
                        ns.stats.wrote(self.data.len());
                        Start::Done(Completion::ok())
                    }
                    _ => Start::Blocking,
                }
            }
            _ => Start::Blocking,
        }
    }

    fn start_read(&self, ns: &Arc<Namespace>) -> Start<Completion> {
        let r = match lba_range(ns, &self.sqe) {
            Ok(r) if r.len <= MAX_TRANSFER as u64 => r,
            _ => return Start::Blocking,
        };
        let finish = |ns: &Namespace, res: maas_pool::Result<Vec<u8>>| match res {
            Ok(buf) => {
                ns.stats.read(buf.len());
                Completion::data(buf)
            }
            Err(e) => done(Err(e), Kind::Read),
        };
        // Filled whole by the read before it is sent (see bufpool).
        let buf = crate::bufpool::take(r.len as usize);
        match ns.dev.read_async(r.offset, buf) {
            AsyncRead::Done(res) => Start::Done(finish(ns, res)),
            AsyncRead::Pending(read) => {
                let ns = ns.clone();
                Start::Future(Box::pin(async move { finish(&ns, read.await) }))
            }
            AsyncRead::Blocking(buf) => {
                crate::bufpool::give(buf);
                Start::Blocking
            }
        }
    }

    /// Runs the command, waiting for the device as needed.
    pub fn run(self) -> Completion {
        match self.run_checked() {
            Ok(c) => c,
            Err(s) => Completion::status(s),
        }
    }

    fn run_checked(self) -> Result<Completion, Status> {
        if self.sqe.fuse() != 0 {
            return Err(Status::INVALID_FIELD);
        }
        match self.sqe.opcode() {
            io::FLUSH => {
                let all = match &self.target {
                    Target::One(ns) => vec![ns.clone()],
                    Target::All(v) => v.clone(),
                };
                for ns in all {
                    let c = done(ns.dev.flush(), Kind::Write);
                    if !c.status.is_success() {
                        return Ok(c);
                    }
                }
                Ok(Completion::ok())
            }
            io::READ => {
                let ns = self.ns()?;
                let r = lba_range(ns, &self.sqe)?;
                if r.len > MAX_TRANSFER as u64 {
                    return Err(Status::INVALID_FIELD);
                }
                // Filled whole by the read before it is sent (see bufpool).
                let mut buf = crate::bufpool::take(r.len as usize);
                match ns.dev.read(r.offset, &mut buf) {
                    Ok(()) => {
                        ns.stats.read(buf.len());
                        Ok(Completion::data(buf))
                    }
                    Err(e) => Ok(done(Err(e), Kind::Read)),
                }
            }
            io::WRITE => {
                let ns = self.ns()?;
                if ns.read_only {
                    return Err(Status::NAMESPACE_WRITE_PROTECTED);
                }
                let r = lba_range(ns, &self.sqe)?;
                if r.len != self.data.len() as u64 {
                    return Err(Status::SGL_LENGTH_INVALID);
                }
                let fua = fua(&self.sqe) || !self.write_cache;
                let c = done(ns.dev.write(r.offset, &self.data, fua), Kind::Write);
                if c.status.is_success() {
                    ns.stats.wrote(self.data.len());
                }
                Ok(c)
            }
            io::WRITE_ZEROES => {
                let ns = self.ns()?;
                if ns.read_only {
                    return Err(Status::NAMESPACE_WRITE_PROTECTED);
                }
                let r = lba_range(ns, &self.sqe)?;
                let deallocate = self.sqe.cdw(12) & (1 << 25) != 0;
                let fua = fua(&self.sqe) || !self.write_cache;
                // Both read back as zeroes (DLFEAT); deallocating also frees the space.
                let res = if deallocate && !fua {
                    ns.dev.discard(r.offset, r.len)
                } else {
                    ns.dev.write_zeroes(r.offset, r.len, fua)
                };
                Ok(done(res, Kind::Write))
            }
            io::DATASET_MANAGEMENT => {
                let ns = self.ns()?;
                let ranges = (self.sqe.cdw(10) & 0xff) as usize + 1;
                let deallocate = self.sqe.cdw(11) & (1 << 2) != 0;
                if self.data.len() < ranges * 16 {
                    return Err(Status::SGL_LENGTH_INVALID);
                }
                if !deallocate {
                    // Attribute hints only: nothing to do.
                    return Ok(Completion::ok());
                }
                if ns.read_only {
                    return Err(Status::NAMESPACE_WRITE_PROTECTED);
                }
                // Check every range before changing anything.
                let mut checked = Vec::with_capacity(ranges);
                for i in 0..ranges {
                    let d = &self.data[i * 16..i * 16 + 16];
                    let nlb = u64::from(le32(d, 4));
                    if nlb == 0 {
                        continue;
                    }
                    checked.push(block_range(ns, le64(d, 8), nlb)?);
                }
                for r in checked {
                    let c = done(ns.dev.discard(r.offset, r.len), Kind::Write);
                    if !c.status.is_success() {
                        return Ok(c);
                    }
                }
                Ok(Completion::ok())
            }
            _ => Err(Status::INVALID_OPCODE),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nvme::spec::put32;
    use crate::nvme::subsystem::NamespaceIdentity;
    use crate::nvme::testdisk::RamDisk;

    fn ns(read_only: bool) -> (Arc<RamDisk>, Arc<Namespace>) {
        let ram = Arc::new(RamDisk::new(1 << 20));
        let ns = Arc::new(Namespace::new(
            ram.clone(),
            read_only,
            NamespaceIdentity::from_volume_id("t"),
        ));
        (ram, ns)
    }

    fn rw(op: u8, slba: u64, nlb: u32) -> Sqe {
        Sqe::block_io(op, 1, 1, slba, nlb)
    }

    fn job(ns: &Arc<Namespace>, sqe: Sqe, data: Vec<u8>) -> IoJob {
        IoJob {
            target: Target::One(ns.clone()),
            sqe,
            data,
            write_cache: true,
        }
    }

    #[test]
    fn write_then_read_back_and_range_checks() {
        let (_ram, ns) = ns(false);
        let data: Vec<u8> = (0..4096u32).map(|i| (i * 7) as u8).collect();
        assert!(
            job(&ns, rw(io::WRITE, 8, 8), data.clone())
                .run()
                .status
                .is_success()
        );
        let c = job(&ns, rw(io::READ, 8, 8), vec![]).run();
        assert_eq!(c.data.unwrap().as_slice(), &data[..]);
        // The last block is fine, one past it is not; SLBA overflow is not a wrap.
        assert!(
            job(&ns, rw(io::READ, 2047, 1), vec![])
                .run()
                .status
                .is_success()
        );
        assert_eq!(
            job(&ns, rw(io::READ, 2047, 2), vec![]).run().status,
            Status::LBA_OUT_OF_RANGE
        );
        assert_eq!(
            job(&ns, rw(io::READ, u64::MAX, 1), vec![]).run().status,
            Status::LBA_OUT_OF_RANGE
        );
        // Data length must match NLB.
        assert_eq!(
            job(&ns, rw(io::WRITE, 0, 2), vec![0; 512]).run().status,
            Status::SGL_LENGTH_INVALID
        );
        assert_eq!(
            job(&ns, Sqe::new(0x7e, 1, 1), vec![]).run().status,
            Status::INVALID_OPCODE
        );
    }

    #[test]
    fn zeroes_deallocate_and_flush() {
        let (ram, ns) = ns(false);
        job(&ns, rw(io::WRITE, 0, 16), vec![0xff; 8192]).run();
        let mut wz = rw(io::WRITE_ZEROES, 0, 4);
        wz.set_cdw(12, 3 | (1 << 25));
        assert!(job(&ns, wz, vec![]).run().status.is_success());
        let mut dsm = Sqe::new(io::DATASET_MANAGEMENT, 1, 1);
        dsm.set_cdw(10, 1); // two ranges
        dsm.set_cdw(11, 1 << 2);
        let mut ranges = vec![0u8; 32];
        put32(&mut ranges, 4, 2);
        ranges[8] = 8; // SLBA 8, 2 blocks
        put32(&mut ranges, 16 + 4, 1);
        ranges[16 + 8] = 15; // SLBA 15, 1 block
        assert!(job(&ns, dsm, ranges.clone()).run().status.is_success());
        let d = ram.data.lock().clone();
        assert!(d[..4 * 512].iter().all(|&b| b == 0));
        assert!(d[4 * 512..8 * 512].iter().all(|&b| b == 0xff));
        assert!(d[8 * 512..10 * 512].iter().all(|&b| b == 0));
        assert!(d[10 * 512..15 * 512].iter().all(|&b| b == 0xff));
        assert!(d[15 * 512..16 * 512].iter().all(|&b| b == 0));
        // A range out of bounds fails the command and changes nothing.
        ram.data.lock()[..8192].fill(0xee);
        ranges[24..32].copy_from_slice(&(1u64 << 40).to_le_bytes());
        assert_eq!(job(&ns, dsm, ranges).run().status, Status::LBA_OUT_OF_RANGE);
        assert!(
            ram.data.lock()[8 * 512..10 * 512]
                .iter()
                .all(|&b| b == 0xee)
        );
        let all = IoJob {
            target: Target::All(vec![ns.clone(), ns.clone()]),
            sqe: Sqe::new(io::FLUSH, 1, 0xffff_ffff),
            data: vec![],
            write_cache: true,
        };
        assert!(all.run().status.is_success());
        assert_eq!(*ram.flushes.lock(), 2);
    }

    #[test]
    fn read_only_namespaces_refuse_changes() {
        let (_ram, ns) = ns(true);
        for (sqe, data) in [
            (rw(io::WRITE, 0, 1), vec![0; 512]),
            (rw(io::WRITE_ZEROES, 0, 1), vec![]),
        ] {
            assert_eq!(
                job(&ns, sqe, data).run().status,
                Status::NAMESPACE_WRITE_PROTECTED
            );
        }
        assert!(
            job(&ns, rw(io::READ, 0, 1), vec![])
                .run()
                .status
                .is_success()
        );
    }
}
