//! A MaaS volume as a block device in this process, over the userspace NVMe/TCP host of
//! `maas-proto`: one admin queue (kept alive) and a few I/O queues, each owned by a task that
//! keeps up to its depth of commands in flight. Callers (the FUSE file, restores) see
//! `read`/`write`/`flush` on byte ranges aligned to the namespace's block size.
//!
//! Durability is the target's: a write's completion says the controller has it, a Flush's
//! completion says everything completed before it is durable (NVMe Base 6.8). Whoever
//! acknowledges a flush upwards (the FUSE `fsync`) waits for [`NvmeDisk::flush`].

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use maas_proto::nvme::spec::{Sqe, admin, io, le32, le64};
use maas_proto::nvme::tcp::client::{Client, ClientError, ClientOptions};
use tokio::sync::{mpsc, oneshot};

/// What a disk operation failed with.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    #[error("NVMe/TCP connection to {addr}: {source}")]
    Connect {
        addr: String,
        #[source]
        source: ClientError,
    },
    #[error("the controller failed the command: {0}")]
    Command(String),
    #[error("{0}")]
    Invalid(String),
    #[error("the connection to the target is gone: {0}")]
    Gone(String),
}

/// Where the volume is exported.
#[derive(Clone, Debug)]
pub struct Target {
    /// `host:port` of the NVMe/TCP portal.
    pub addr: String,
    /// Subsystem NQN.
    pub subnqn: String,
    /// Namespace id.
    pub nsid: u32,
    /// This host's NQN (the export's allow-list holds it).
    pub hostnqn: String,
    /// This host's id (16 bytes, stable per host).
    pub hostid: [u8; 16],
}

enum Op {
    Read {
        lba: u64,
        blocks: u32,
        len: usize,
    },
    Write {
        lba: u64,
        blocks: u32,
        data: Arc<Vec<u8>>,
    },
    /// Write Zeroes with Deallocate: the range reads as zeros and holds no space.
    Zeroes {
        lba: u64,
        blocks: u32,
    },
    Flush,
}

struct Request {
    op: Op,
    done: oneshot::Sender<Result<Vec<u8>, DiskError>>,
}

/// Commands in flight per I/O queue.
const QUEUE_DEPTH: usize = 32;
/// I/O queues (connections) per disk: two keep both of this machine's cores busy.
const IO_QUEUES: u16 = 2;
/// Keep Alive timeout asked for; the probe sends a Keep Alive every third of it.
const KATO_MS: u32 = 30_000;

/// One attached namespace.
#[derive(Debug)]
pub struct NvmeDisk {
    queues: Vec<mpsc::Sender<Request>>,
    next: AtomicUsize,
    block_size: u32,
    blocks: u64,
    /// Largest transfer of one command (MDTS), bytes.
    max_transfer: usize,
    /// Bytes read and written through this disk (for reports and the three-party proof).
    pub bytes_read: AtomicU64,
    pub bytes_written: AtomicU64,
    /// Set by any failed write, zeroing or flush, and never cleared: the filesystem above may
    /// have met the error in background writeback, where nobody reports it, so whoever seals
    /// the volume asks this first ([`NvmeDisk::write_failure`]).
    write_failed: std::sync::Mutex<Option<String>>,
    keepalive: tokio::task::JoinHandle<()>,
}

impl Drop for NvmeDisk {
    fn drop(&mut self) {
        self.keepalive.abort();
    }
}

fn status_error(e: ClientError) -> DiskError {
    match e {
        ClientError::Status(s) => DiskError::Command(format!("{s:?}")),
        ClientError::Io(_) | ClientError::Closed => DiskError::Gone(e.to_string()),
        other => DiskError::Gone(other.to_string()),
    }
}

impl NvmeDisk {
    /// Connects the admin queue (enables the controller, reads Identify) and the I/O queues.
    pub async fn connect(t: &Target) -> Result<NvmeDisk, DiskError> {
        let opts = ClientOptions {
            hostnqn: t.hostnqn.clone(),
            hostid: t.hostid,
            header_digest: true,
            data_digest: true,
            kato_ms: KATO_MS,
            sqsize: (QUEUE_DEPTH * 2) as u16 - 1,
            disable_sq_flow_control: false,
        };
        let conn_err = |source| DiskError::Connect {
            addr: t.addr.clone(),
            source,
        };
        let mut admin_q = Client::connect(&t.addr, &t.subnqn, 0, 0xffff, &opts)
            .await
            .map_err(conn_err)?;
        if admin_q.auth_required {
            return Err(DiskError::Invalid(format!(
                "{} asks for DH-HMAC-CHAP authentication, which the probe does not configure yet",
                t.subnqn
            )));
        }
        admin_q.enable().await.map_err(conn_err)?;
        let ctrl = admin_q.identify(1, 0).await.map_err(conn_err)?;
        let ns = admin_q.identify(0, t.nsid).await.map_err(conn_err)?;
        if ctrl.len() < 4096 || ns.len() < 4096 {
            return Err(DiskError::Invalid("short Identify data".into()));
        }
        let mdts = ctrl[77];
        let max_transfer = if mdts == 0 {
            1 << 20
        } else {
            (4096usize << mdts.min(12)).min(4 << 20)
        };
        let in_capsule = (le32(&ctrl, 1792) as usize * 16).saturating_sub(64);
        let blocks = le64(&ns, 0);
        let flbas = usize::from(ns[26] & 0x0f);
        let lbads = ns[128 + flbas * 4 + 2];
        if !(9..=16).contains(&lbads) || blocks == 0 {
            return Err(DiskError::Invalid(format!(
                "namespace {} of {} is not usable (LBADS {lbads}, {blocks} blocks)",
                t.nsid, t.subnqn
            )));
        }
        let block_size = 1u32 << lbads;
        let mut queues = Vec::new();
        for qid in 1..=IO_QUEUES {
            let mut q = Client::connect(&t.addr, &t.subnqn, qid, admin_q.cntlid, &opts)
                .await
                .map_err(conn_err)?;
            q.set_in_capsule(in_capsule);
            let (tx, rx) = mpsc::channel(QUEUE_DEPTH * 2);
            tokio::spawn(run_queue(q, rx, t.nsid));
            queues.push(tx);
        }
        let keepalive = tokio::spawn(keep_alive(admin_q));
        Ok(NvmeDisk {
            queues,
            next: AtomicUsize::new(0),
            block_size,
            blocks,
            max_transfer,
            bytes_read: AtomicU64::new(0),
            bytes_written: AtomicU64::new(0),
            write_failed: std::sync::Mutex::new(None),
            keepalive,
        })
    }

    pub fn size(&self) -> u64 {
        self.blocks.saturating_mul(u64::from(self.block_size))
    }

    pub fn block_size(&self) -> u32 {
        self.block_size
    }

    /// Largest byte range one `read`/`write` may cover.
    pub fn max_transfer(&self) -> usize {
        self.max_transfer
    }

    fn check(&self, offset: u64, len: usize) -> Result<(u64, u32), DiskError> {
        let bs = u64::from(self.block_size);
        if offset % bs != 0 || len as u64 % bs != 0 || len == 0 || len > self.max_transfer {
            return Err(DiskError::Invalid(format!(
                "I/O of {len} bytes at {offset} is not aligned to {bs} or too large"
            )));
        }
        let end = offset
            .checked_add(len as u64)
            .filter(|&e| e <= self.size())
            .ok_or_else(|| {
                DiskError::Invalid(format!("I/O at {offset} beyond the end ({})", self.size()))
            })?;
        let _ = end;
        Ok((offset / bs, (len as u64 / bs) as u32))
    }

    async fn submit(&self, op: Op) -> Result<Vec<u8>, DiskError> {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.queues.len();
        let (tx, rx) = oneshot::channel();
        self.queues[i]
            .send(Request { op, done: tx })
            .await
            .map_err(|_| DiskError::Gone("I/O queue closed".into()))?;
        rx.await
            .map_err(|_| DiskError::Gone("I/O queue closed".into()))?
    }

    /// Reads `len` bytes at `offset` (both block-aligned, `len` at most `max_transfer`).
    pub async fn read(&self, offset: u64, len: usize) -> Result<Vec<u8>, DiskError> {
        let (lba, blocks) = self.check(offset, len)?;
        let data = self.submit(Op::Read { lba, blocks, len }).await?;
        if data.len() != len {
            return Err(DiskError::Command(format!(
                "read of {len} bytes returned {}",
                data.len()
            )));
        }
        self.bytes_read.fetch_add(len as u64, Ordering::Relaxed);
        Ok(data)
    }

    /// Writes `data` at `offset` (block-aligned, at most `max_transfer`).
    pub async fn write(&self, offset: u64, data: Vec<u8>) -> Result<(), DiskError> {
        let (lba, blocks) = self.check(offset, data.len())?;
        let n = data.len() as u64;
        self.submit(Op::Write {
            lba,
            blocks,
            data: Arc::new(data),
        })
        .await
        .map_err(|e| self.failed("write", e))?;
        self.bytes_written.fetch_add(n, Ordering::Relaxed);
        Ok(())
    }

    fn failed(&self, what: &str, e: DiskError) -> DiskError {
        if let Ok(mut f) = self.write_failed.lock()
            && f.is_none()
        {
            *f = Some(format!("a {what} failed: {e}"));
        }
        e
    }

    /// The first write, zeroing or flush that failed since the disk was connected, if any.
    pub fn write_failure(&self) -> Option<String> {
        self.write_failed.lock().ok().and_then(|f| f.clone())
    }

    /// Zeroes `len` bytes at `offset` (block-aligned) without sending data, and lets the pool
    /// drop the space (NVMe Write Zeroes with DEAC), in commands of at most 65536 blocks.
    pub async fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), DiskError> {
        let bs = u64::from(self.block_size);
        if offset % bs != 0
            || len % bs != 0
            || offset.checked_add(len).is_none_or(|e| e > self.size())
        {
            return Err(DiskError::Invalid(format!(
                "zeroing {len} bytes at {offset}: not aligned to {bs} or beyond the end"
            )));
        }
        let mut lba = offset / bs;
        let mut left = len / bs;
        while left > 0 {
            let blocks = left.min(65536) as u32;
            self.submit(Op::Zeroes { lba, blocks })
                .await
                .map_err(|e| self.failed("zeroing", e))?;
            lba += u64::from(blocks);
            left -= u64::from(blocks);
        }
        Ok(())
    }

    /// Makes every completed write durable: a Flush on every I/O queue (each queue's writes are
    /// flushed by a Flush on that queue, after they completed).
    pub async fn flush(&self) -> Result<(), DiskError> {
        let mut waits = Vec::new();
        for q in &self.queues {
            let (tx, rx) = oneshot::channel();
            q.send(Request {
                op: Op::Flush,
                done: tx,
            })
            .await
            .map_err(|_| DiskError::Gone("I/O queue closed".into()))?;
            waits.push(rx);
        }
        for w in waits {
            w.await
                .map_err(|_| DiskError::Gone("I/O queue closed".into()))
                .and_then(|r| r.map(|_| ()))
                .map_err(|e| self.failed("flush", e))?;
        }
        Ok(())
    }
}

/// Owns one I/O queue: takes requests while fewer than `QUEUE_DEPTH` are in flight, and routes
/// each completion back to its caller. A Flush is only sent once the queue has no command in
/// flight, so it covers every write completed before it (NVMe does not order commands).
///
/// The client's `next` is not cancel-safe (a PDU half written would be written again), so this
/// loop never races it against the channel: it takes what is queued without waiting, then
/// waits for a completion if anything is in flight, else for a request.
async fn run_queue(mut q: Client, mut rx: mpsc::Receiver<Request>, nsid: u32) {
    type Waiter = oneshot::Sender<Result<Vec<u8>, DiskError>>;
    let mut waiting: std::collections::HashMap<u16, Waiter> = std::collections::HashMap::new();
    let mut held_flush: Option<Request> = None;
    let mut closed = false;
    let failure = 'run: loop {
        if held_flush.is_some() && q.outstanding() == 0 {
            if let Some(f) = held_flush.take() {
                match q.submit(Sqe::new(io::FLUSH, 0, nsid), None, 0).await {
                    Ok(cid) => {
                        waiting.insert(cid, f.done);
                    }
                    Err(e) => {
                        let _ = f.done.send(Err(status_error(e)));
                        break 'run "flush not sent";
                    }
                }
            }
        }
        while !closed && held_flush.is_none() && q.outstanding() < QUEUE_DEPTH {
            let req = if q.outstanding() == 0 {
                match rx.recv().await {
                    Some(r) => r,
                    None => {
                        closed = true;
                        break;
                    }
                }
            } else {
                match rx.try_recv() {
                    Ok(r) => r,
                    Err(mpsc::error::TryRecvError::Empty) => break,
                    Err(mpsc::error::TryRecvError::Disconnected) => {
                        closed = true;
                        break;
                    }
                }
            };
            let sent = match req.op {
                Op::Flush => {
                    held_flush = Some(req);
                    break;
                }
                Op::Read { lba, blocks, len } => {
                    q.submit(Sqe::block_io(io::READ, 0, nsid, lba, blocks), None, len)
                        .await
                }
                Op::Zeroes { lba, blocks } => {
                    let mut sqe = Sqe::block_io(io::WRITE_ZEROES, 0, nsid, lba, blocks);
                    // DEAC: deallocate what is zeroed.
                    sqe.set_cdw(12, sqe.cdw(12) | (1 << 25));
                    q.submit(sqe, None, 0).await
                }
                Op::Write {
                    lba,
                    blocks,
                    ref data,
                } => {
                    q.submit(
                        Sqe::block_io(io::WRITE, 0, nsid, lba, blocks),
                        Some(data.clone()),
                        0,
                    )
                    .await
                }
            };
            match sent {
                Ok(cid) => {
                    waiting.insert(cid, req.done);
                }
                Err(e) => {
                    let _ = req.done.send(Err(status_error(e)));
                    break 'run "command not sent";
                }
            }
        }
        if q.outstanding() == 0 {
            if closed && held_flush.is_none() {
                return;
            }
            continue;
        }
        match q.next().await {
            Ok(c) => {
                if let Some(tx) = waiting.remove(&c.cqe.cid) {
                    let r = if c.cqe.status.is_success() {
                        Ok(c.data)
                    } else {
                        Err(DiskError::Command(format!("{:?}", c.cqe.status)))
                    };
                    let _ = tx.send(r);
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "NVMe/TCP I/O queue failed");
                break 'run "connection lost";
            }
        }
    };
    // The connection is gone: everything in flight or queued fails (never silently succeeds).
    let gone = || DiskError::Gone(format!("I/O queue: {failure}"));
    for (_, tx) in waiting.drain() {
        let _ = tx.send(Err(gone()));
    }
    if let Some(f) = held_flush {
        let _ = f.done.send(Err(gone()));
    }
    rx.close();
    while let Some(r) = rx.recv().await {
        let _ = r.done.send(Err(gone()));
    }
}

/// Sends Keep Alive on the admin queue so the controller does not drop the association while
/// the disk is idle (a host waiting for a user's restore can be idle for long).
async fn keep_alive(mut admin_q: Client) {
    let period = Duration::from_millis(u64::from(KATO_MS / 3));
    loop {
        tokio::time::sleep(period).await;
        if let Err(e) = admin_q
            .exec(Sqe::new(admin::KEEP_ALIVE, 0, 0), None, 0)
            .await
        {
            tracing::warn!(error = %e, "NVMe/TCP keep-alive failed");
            return;
        }
    }
}
