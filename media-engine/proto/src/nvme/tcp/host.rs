//! One NVMe/TCP queue on the host side, sans-IO: submits commands (data in the capsule when it
//! fits, else on the controller's R2T), answers R2Ts with H2CData, gathers C2HData, and reports
//! completions. Used by our load generator and tests; the client probe can build on it.

use std::collections::HashMap;
use std::sync::Arc;

use super::pdu::{Framer, IcReq, IcResp, Pdu};
use crate::nvme::spec::{Cqe, DataPointer, Sqe, Status};

/// A finished command.
#[derive(Debug)]
pub struct HostCompletion {
    pub cqe: Cqe,
    /// What the controller sent (C2HData), for commands that read.
    pub data: Vec<u8>,
}

#[derive(Debug)]
struct Pending {
    data_out: Option<Arc<Vec<u8>>>,
    data_in: Vec<u8>,
    want_in: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum HostError {
    #[error("controller protocol error: {0}")]
    Protocol(String),
    #[error("controller terminated the connection (fes {0:#x})")]
    Terminated(u16),
}

/// Host side of one queue.
#[derive(Debug)]
pub struct HostQueue {
    framer: Framer,
    max_h2c_data: usize,
    in_capsule: usize,
    pending: HashMap<u16, Pending>,
    next_cid: u16,
}

impl HostQueue {
    /// `in_capsule`: the data bytes a capsule may carry on this queue (admin: 8 KiB; I/O:
    /// IOCCSZ * 16 - 64).
    pub fn new(in_capsule: usize, max_pdu_data: usize) -> HostQueue {
        HostQueue {
            framer: Framer::initial(max_pdu_data),
            max_h2c_data: 4096,
            in_capsule,
            pending: HashMap::new(),
            next_cid: 0,
        }
    }

    pub fn ic_req(header_digest: bool, data_digest: bool) -> Pdu {
        Pdu::IcReq(IcReq {
            pfv: 0,
            hpda: 0,
            header_digest,
            data_digest,
            maxr2t: 0,
        })
    }

    pub fn framer(&self) -> &Framer {
        &self.framer
    }

    /// Applies the controller's ICResp, with the checks Linux applies.
    pub fn on_ic_resp(&mut self, req: &Pdu, resp: &IcResp) -> Result<(), HostError> {
        let Pdu::IcReq(req) = req else {
            return Err(HostError::Protocol("not an ICReq".into()));
        };
        if resp.pfv != 0
            || resp.cpda != 0
            || resp.header_digest != req.header_digest
            || resp.data_digest != req.data_digest
            || resp.maxh2cdata < 4096
            || resp.maxh2cdata % 4 != 0
        {
            return Err(HostError::Protocol(format!("bad ICResp {resp:?}")));
        }
        self.framer.header_digest = resp.header_digest;
        self.framer.data_digest = resp.data_digest;
        self.max_h2c_data = resp.maxh2cdata as usize;
        Ok(())
    }

    pub fn set_in_capsule(&mut self, bytes: usize) {
        self.in_capsule = bytes;
    }

    pub fn outstanding(&self) -> usize {
        self.pending.len()
    }

    /// Queues a command for sending (its command id is assigned here and returned).
    /// `data_out`: data for the controller; `data_in`: bytes expected back.
    pub fn submit(
        &mut self,
        mut sqe: Sqe,
        data_out: Option<Arc<Vec<u8>>>,
        data_in: usize,
        out: &mut Vec<u8>,
    ) -> u16 {
        let mut cid = self.next_cid;
        while self.pending.contains_key(&cid) {
            cid = cid.wrapping_add(1);
        }
        self.next_cid = cid.wrapping_add(1);
        sqe.set_cid(cid);
        let mut capsule_data: &[u8] = &[];
        match &data_out {
            Some(d) if d.len() <= self.in_capsule => {
                sqe.set_data_pointer(DataPointer::InCapsule {
                    offset: 0,
                    len: d.len() as u32,
                });
                capsule_data = d;
            }
            Some(d) => sqe.set_data_pointer(DataPointer::Transport {
                len: d.len() as u32,
            }),
            None if data_in > 0 => sqe.set_data_pointer(DataPointer::Transport {
                len: data_in as u32,
            }),
            None => sqe.set_data_pointer(DataPointer::None),
        }
        self.framer.encode_capsule(&sqe, capsule_data, out);
        let in_capsule = capsule_data.len() == data_out.as_ref().map_or(0, |d| d.len());
        self.pending.insert(
            cid,
            Pending {
                data_out: if in_capsule { None } else { data_out },
                data_in: Vec::new(),
                want_in: data_in,
            },
        );
        cid
    }

    /// Handles a PDU from the controller; returns a completion when one finished.
    pub fn on_pdu(
        &mut self,
        pdu: Pdu,
        out: &mut Vec<u8>,
    ) -> Result<Option<HostCompletion>, HostError> {
        match pdu {
            Pdu::R2t(r) => {
                let p = self.pending.get(&r.cccid).ok_or_else(|| {
                    HostError::Protocol(format!("R2T for unknown cid {}", r.cccid))
                })?;
                let data = p
                    .data_out
                    .clone()
                    .ok_or_else(|| HostError::Protocol("R2T for a command without data".into()))?;
                let (start, len) = (r.offset as usize, r.len as usize);
                if start.checked_add(len).is_none_or(|e| e > data.len()) {
                    return Err(HostError::Protocol(format!("R2T beyond the data: {r:?}")));
                }
                let mut off = start;
                while off < start + len {
                    let n = (start + len - off).min(self.max_h2c_data);
                    self.framer.encode_h2c(
                        r.cccid,
                        r.ttag,
                        off as u32,
                        &data[off..off + n],
                        off + n == start + len,
                        out,
                    );
                    off += n;
                }
                Ok(None)
            }
            Pdu::C2HData(d) => {
                if !d.digest_ok {
                    return Err(HostError::Protocol("C2HData digest mismatch".into()));
                }
                let p = self.pending.get_mut(&d.cccid).ok_or_else(|| {
                    HostError::Protocol(format!("C2HData for unknown cid {}", d.cccid))
                })?;
                if d.offset as usize != p.data_in.len()
                    || p.data_in.len() + d.data.len() > p.want_in
                {
                    return Err(HostError::Protocol(format!(
                        "C2HData at {} (+{}) for {} expected",
                        d.offset,
                        d.data.len(),
                        p.want_in
                    )));
                }
                if p.data_in.is_empty() && d.data.len() == p.want_in {
                    p.data_in = d.data;
                } else {
                    p.data_in.extend_from_slice(&d.data);
                }
                if d.success {
                    let p = self
                        .pending
                        .remove(&d.cccid)
                        .ok_or_else(|| HostError::Protocol("vanished".into()))?;
                    return Ok(Some(HostCompletion {
                        cqe: Cqe {
                            dw0: 0,
                            dw1: 0,
                            sqhd: 0xffff,
                            sqid: 0,
                            cid: d.cccid,
                            status: Status::SUCCESS,
                        },
                        data: p.data_in,
                    }));
                }
                Ok(None)
            }
            Pdu::CapsuleResp(cqe) => {
                let p = self.pending.remove(&cqe.cid).ok_or_else(|| {
                    HostError::Protocol(format!("completion for unknown cid {}", cqe.cid))
                })?;
                Ok(Some(HostCompletion {
                    cqe,
                    data: p.data_in,
                }))
            }
            Pdu::C2HTermReq(t) => Err(HostError::Terminated(t.fes)),
            other => Err(HostError::Protocol(format!("unexpected PDU {other:?}"))),
        }
    }
}
