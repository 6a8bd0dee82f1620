//! NVMe/TCP PDU framing (NVMe/TCP transport 1.0): the common header, every PDU type, and the
//! optional CRC32C header and data digests. Sans-IO and shared by target and host: `decode`
//! takes bytes and returns a PDU or how many bytes it still needs; `encode_*` append to a
//! buffer. Every length the peer sends is checked before anything is allocated.

use std::sync::Arc;

use crate::nvme::spec::{Cqe, Sqe, le16, le32, put16, put32};
use crate::outq::{OutQueue, SHARE_AT};

/// PDU types.
pub mod kind {
    pub const IC_REQ: u8 = 0x00;
    pub const IC_RESP: u8 = 0x01;
    pub const H2C_TERM_REQ: u8 = 0x02;
    pub const C2H_TERM_REQ: u8 = 0x03;
    pub const CAPSULE_CMD: u8 = 0x04;
    pub const CAPSULE_RESP: u8 = 0x05;
    pub const H2C_DATA: u8 = 0x06;
    pub const C2H_DATA: u8 = 0x07;
    pub const R2T: u8 = 0x09;
}

/// Common header flags.
pub mod flag {
    pub const HDGSTF: u8 = 0x01;
    pub const DDGSTF: u8 = 0x02;
    /// Data PDUs: the last of a transfer.
    pub const LAST_PDU: u8 = 0x04;
    /// C2HData: the command succeeded; no CapsuleResp follows (only when SQ flow control is
    /// disabled).
    pub const SUCCESS: u8 = 0x08;
}

/// Fatal error status of a termination request.
pub mod fes {
    pub const INVALID_HEADER_FIELD: u16 = 0x01;
    pub const PDU_SEQUENCE_ERROR: u16 = 0x02;
    pub const HEADER_DIGEST_ERROR: u16 = 0x03;
    pub const DATA_OUT_OF_RANGE: u16 = 0x04;
    pub const DATA_LIMIT_EXCEEDED: u16 = 0x05;
    pub const UNSUPPORTED_PARAMETER: u16 = 0x06;
}

const CH_LEN: usize = 8;
pub const IC_LEN: usize = 128;
const TERM_HLEN: usize = 24;
const CAPSULE_CMD_HLEN: usize = CH_LEN + 64;
const CAPSULE_RESP_HLEN: usize = CH_LEN + 16;
const DATA_HLEN: usize = 24;
const R2T_HLEN: usize = 24;
/// A termination request carries at most this much of the offending PDU's header.
const MAX_TERM_DATA: usize = 152;

/// The header length each PDU type must declare.
fn header_len(t: u8) -> Option<usize> {
    Some(match t {
        kind::IC_REQ | kind::IC_RESP => IC_LEN,
        kind::H2C_TERM_REQ | kind::C2H_TERM_REQ => TERM_HLEN,
        kind::CAPSULE_CMD => CAPSULE_CMD_HLEN,
        kind::CAPSULE_RESP => CAPSULE_RESP_HLEN,
        kind::H2C_DATA | kind::C2H_DATA => DATA_HLEN,
        kind::R2T => R2T_HLEN,
        _ => return None,
    })
}

/// Whether a PDU type may carry data.
fn may_carry_data(t: u8) -> bool {
    matches!(
        t,
        kind::CAPSULE_CMD
            | kind::H2C_DATA
            | kind::C2H_DATA
            | kind::H2C_TERM_REQ
            | kind::C2H_TERM_REQ
    )
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IcReq {
    pub pfv: u16,
    /// Host PDU data alignment (dwords, 0-based).
    pub hpda: u8,
    pub header_digest: bool,
    pub data_digest: bool,
    /// Outstanding R2Ts per command the host takes (0-based).
    pub maxr2t: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IcResp {
    pub pfv: u16,
    /// Controller PDU data alignment (dwords, 0-based).
    pub cpda: u8,
    pub header_digest: bool,
    pub data_digest: bool,
    /// Largest H2CData payload the controller takes (bytes; not 0-based).
    pub maxh2cdata: u32,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TermReq {
    pub fes: u16,
    pub fei: u32,
    /// The start of the PDU that caused it.
    pub header: Vec<u8>,
}

/// H2CData or C2HData.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DataPdu {
    pub cccid: u16,
    /// H2CData: the transfer tag of the R2T it answers.
    pub ttag: u16,
    pub offset: u32,
    pub last: bool,
    pub success: bool,
    pub data: Vec<u8>,
    /// False when the data digest did not match (the command fails; the connection lives).
    pub digest_ok: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct R2t {
    pub cccid: u16,
    pub ttag: u16,
    pub offset: u32,
    pub len: u32,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Pdu {
    IcReq(IcReq),
    IcResp(IcResp),
    H2CTermReq(TermReq),
    C2HTermReq(TermReq),
    CapsuleCmd {
        sqe: Sqe,
        data: Vec<u8>,
        digest_ok: bool,
    },
    CapsuleResp(Cqe),
    H2CData(DataPdu),
    C2HData(DataPdu),
    R2t(R2t),
}

/// A PDU the peer must not have sent: the connection ends (with a termination request
/// carrying `fes` and the offset `fei` of the offending field).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{what} (fes {fes:#x}, field at {fei})")]
pub struct PduError {
    pub fes: u16,
    pub fei: u32,
    pub what: String,
    /// The offending header, for the termination request.
    pub header: Vec<u8>,
}

#[derive(Debug, PartialEq, Eq)]
pub enum Decoded {
    Pdu(Pdu, usize),
    /// At least this many bytes in all are needed.
    NeedMore(usize),
}

/// Framing state of one connection: digests (after the IC exchange) and the largest data a PDU
/// may carry.
#[derive(Clone, Copy, Debug)]
pub struct Framer {
    pub header_digest: bool,
    pub data_digest: bool,
    pub max_data: usize,
    /// Alignment of the data we send (the peer's PDA + 1 dwords, in bytes).
    pub data_align: usize,
}

impl Framer {
    /// Before ICReq/ICResp: no digests.
    pub fn initial(max_data: usize) -> Framer {
        Framer {
            header_digest: false,
            data_digest: false,
            max_data,
            data_align: 4,
        }
    }

    /// Decodes the PDU at the start of `input`.
    pub fn decode(&self, input: &[u8]) -> Result<Decoded, PduError> {
        if input.len() < CH_LEN {
            return Ok(Decoded::NeedMore(CH_LEN));
        }
        let head = &input[..CH_LEN];
        let err = |fes: u16, fei: u32, what: String| PduError {
            fes,
            fei,
            what,
            header: input[..input.len().min(MAX_TERM_DATA)].to_vec(),
        };
        let (t, flags, hlen, pdo) = (head[0], head[1], head[2] as usize, head[3] as usize);
        let plen = le32(head, 4) as usize;
        let want_hlen = header_len(t).ok_or_else(|| {
            err(
                fes::INVALID_HEADER_FIELD,
                0,
                format!("unknown PDU type {t:#x}"),
            )
        })?;
        if hlen != want_hlen {
            return Err(err(
                fes::INVALID_HEADER_FIELD,
                2,
                format!("PDU type {t:#x} with header length {hlen}"),
            ));
        }
        let ic_or_term = matches!(
            t,
            kind::IC_REQ | kind::IC_RESP | kind::H2C_TERM_REQ | kind::C2H_TERM_REQ
        );
        let hd = if ic_or_term {
            if flags & (flag::HDGSTF | flag::DDGSTF) != 0
                && !matches!(t, kind::H2C_TERM_REQ | kind::C2H_TERM_REQ)
            {
                return Err(err(
                    fes::INVALID_HEADER_FIELD,
                    1,
                    "digest flags on an IC PDU".into(),
                ));
            }
            0
        } else {
            if (flags & flag::HDGSTF != 0) != self.header_digest {
                return Err(err(
                    fes::INVALID_HEADER_FIELD,
                    1,
                    "header digest flag does not match the negotiated digests".into(),
                ));
            }
            if self.header_digest { 4 } else { 0 }
        };
        let header_end = hlen + hd;
        let max_plen = header_end + 4 + self.max_data.max(MAX_TERM_DATA);
        if plen < header_end || plen > max_plen {
            return Err(err(
                fes::DATA_LIMIT_EXCEEDED,
                4,
                format!(
                    "PDU length {plen} (header {header_end}, data limit {})",
                    self.max_data
                ),
            ));
        }
        if input.len() < plen {
            return Ok(Decoded::NeedMore(plen));
        }
        let pdu = &input[..plen];
        if hd == 4 {
            let want = crc32c::crc32c(&pdu[..hlen]);
            if want != le32(pdu, hlen) {
                return Err(err(
                    fes::HEADER_DIGEST_ERROR,
                    hlen as u32,
                    "header digest mismatch".into(),
                ));
            }
        }
        // The data segment, if any: from PDO to the data digest.
        let (data, digest_ok) = if plen > header_end {
            if !may_carry_data(t) {
                return Err(err(
                    fes::INVALID_HEADER_FIELD,
                    4,
                    format!("PDU type {t:#x} with data"),
                ));
            }
            if ic_or_term {
                (&pdu[hlen..], true)
            } else {
                let dd = if flags & flag::DDGSTF != 0 { 4 } else { 0 };
                if (dd == 4) != self.data_digest {
                    return Err(err(
                        fes::INVALID_HEADER_FIELD,
                        1,
                        "data digest flag does not match the negotiated digests".into(),
                    ));
                }
                if pdo < header_end || pdo + dd > plen {
                    return Err(err(
                        fes::INVALID_HEADER_FIELD,
                        3,
                        format!("data offset {pdo}"),
                    ));
                }
                let data = &pdu[pdo..plen - dd];
                if data.is_empty() || data.len() > self.max_data {
                    return Err(err(
                        fes::DATA_LIMIT_EXCEEDED,
                        4,
                        format!("{} bytes of data", data.len()),
                    ));
                }
                let ok = dd == 0 || crc32c::crc32c(data) == le32(pdu, plen - 4);
                (data, ok)
            }
        } else {
            (&[][..], true)
        };
        let p = match t {
            kind::IC_REQ => Pdu::IcReq(IcReq {
                pfv: le16(pdu, 8),
                hpda: pdu[10],
                header_digest: pdu[11] & 1 != 0,
                data_digest: pdu[11] & 2 != 0,
                maxr2t: le32(pdu, 12),
            }),
            kind::IC_RESP => Pdu::IcResp(IcResp {
                pfv: le16(pdu, 8),
                cpda: pdu[10],
                header_digest: pdu[11] & 1 != 0,
                data_digest: pdu[11] & 2 != 0,
                maxh2cdata: le32(pdu, 12),
            }),
            kind::H2C_TERM_REQ | kind::C2H_TERM_REQ => {
                let tr = TermReq {
                    fes: le16(pdu, 8),
                    fei: le32(pdu, 10),
                    header: data[..data.len().min(MAX_TERM_DATA)].to_vec(),
                };
                if t == kind::H2C_TERM_REQ {
                    Pdu::H2CTermReq(tr)
                } else {
                    Pdu::C2HTermReq(tr)
                }
            }
            kind::CAPSULE_CMD => {
                let mut sqe = [0u8; 64];
                sqe.copy_from_slice(&pdu[CH_LEN..CH_LEN + 64]);
                Pdu::CapsuleCmd {
                    sqe: Sqe(sqe),
                    data: data.to_vec(),
                    digest_ok,
                }
            }
            kind::CAPSULE_RESP => {
                let mut cqe = [0u8; 16];
                cqe.copy_from_slice(&pdu[CH_LEN..CH_LEN + 16]);
                Pdu::CapsuleResp(Cqe::decode(&cqe))
            }
            kind::H2C_DATA | kind::C2H_DATA => {
                let datal = le32(pdu, 16) as usize;
                if datal != data.len() {
                    return Err(err(
                        fes::INVALID_HEADER_FIELD,
                        16,
                        format!("DATAL {datal} but {} bytes of data", data.len()),
                    ));
                }
                let d = DataPdu {
                    cccid: le16(pdu, 8),
                    ttag: le16(pdu, 10),
                    offset: le32(pdu, 12),
                    last: flags & flag::LAST_PDU != 0,
                    success: flags & flag::SUCCESS != 0,
                    data: data.to_vec(),
                    digest_ok,
                };
                if t == kind::H2C_DATA {
                    Pdu::H2CData(d)
                } else {
                    Pdu::C2HData(d)
                }
            }
            _ => Pdu::R2t(R2t {
                cccid: le16(pdu, 8),
                ttag: le16(pdu, 10),
                offset: le32(pdu, 12),
                len: le32(pdu, 16),
            }),
        };
        Ok(Decoded::Pdu(p, plen))
    }

    /// Appends the common and specific header (with its digest, if negotiated) of a PDU whose
    /// data segment is `data_len` bytes.
    fn encode_head(
        &self,
        t: u8,
        mut flags: u8,
        specific: &[u8],
        data_len: usize,
        out: &mut Vec<u8>,
    ) {
        let hlen = CH_LEN + specific.len();
        let ic = matches!(
            t,
            kind::IC_REQ | kind::IC_RESP | kind::H2C_TERM_REQ | kind::C2H_TERM_REQ
        );
        let hd = !ic && self.header_digest;
        let dd = !ic && self.data_digest && data_len > 0;
        if hd {
            flags |= flag::HDGSTF;
        }
        if dd {
            flags |= flag::DDGSTF;
        }
        let header_end = hlen + if hd { 4 } else { 0 };
        let pdo = if data_len > 0 && !ic {
            header_end.next_multiple_of(self.data_align.max(4))
        } else {
            0
        };
        let plen = pdo.max(header_end) + data_len + if dd { 4 } else { 0 };
        let start = out.len();
        out.extend_from_slice(&[t, flags, hlen as u8, pdo as u8]);
        out.extend_from_slice(&(plen as u32).to_le_bytes());
        out.extend_from_slice(specific);
        if hd {
            let crc = crc32c::crc32c(&out[start..]);
            out.extend_from_slice(&crc.to_le_bytes());
        }
        // Padding up to the data offset the peer asked for.
        out.resize(out.len() + pdo.saturating_sub(header_end), 0);
    }

    fn encode_trailer(&self, data: &[u8], out: &mut Vec<u8>) {
        if self.data_digest && !data.is_empty() {
            out.extend_from_slice(&crc32c::crc32c(data).to_le_bytes());
        }
    }

    fn encode_with_data(&self, t: u8, flags: u8, specific: &[u8], data: &[u8], out: &mut Vec<u8>) {
        self.encode_head(t, flags, specific, data.len(), out);
        out.extend_from_slice(data);
        self.encode_trailer(data, out);
    }

    pub fn encode(&self, pdu: &Pdu, out: &mut Vec<u8>) {
        match pdu {
            Pdu::IcReq(r) => {
                let mut s = [0u8; IC_LEN - CH_LEN];
                put16(&mut s, 0, r.pfv);
                s[2] = r.hpda;
                s[3] = u8::from(r.header_digest) | (u8::from(r.data_digest) << 1);
                put32(&mut s, 4, r.maxr2t);
                self.encode_head(kind::IC_REQ, 0, &s, 0, out);
            }
            Pdu::IcResp(r) => {
                let mut s = [0u8; IC_LEN - CH_LEN];
                put16(&mut s, 0, r.pfv);
                s[2] = r.cpda;
                s[3] = u8::from(r.header_digest) | (u8::from(r.data_digest) << 1);
                put32(&mut s, 4, r.maxh2cdata);
                self.encode_head(kind::IC_RESP, 0, &s, 0, out);
            }
            Pdu::H2CTermReq(tr) | Pdu::C2HTermReq(tr) => {
                let t = if matches!(pdu, Pdu::H2CTermReq(_)) {
                    kind::H2C_TERM_REQ
                } else {
                    kind::C2H_TERM_REQ
                };
                let mut s = [0u8; TERM_HLEN - CH_LEN];
                put16(&mut s, 0, tr.fes);
                put32(&mut s, 2, tr.fei);
                let data = &tr.header[..tr.header.len().min(MAX_TERM_DATA)];
                self.encode_head(t, 0, &s, data.len(), out);
                out.extend_from_slice(data);
            }
            Pdu::CapsuleCmd { sqe, data, .. } => {
                self.encode_with_data(kind::CAPSULE_CMD, 0, &sqe.0, data, out);
            }
            Pdu::CapsuleResp(cqe) => self.encode_head(kind::CAPSULE_RESP, 0, &cqe.encode(), 0, out),
            Pdu::H2CData(d) | Pdu::C2HData(d) => {
                let t = if matches!(pdu, Pdu::H2CData(_)) {
                    kind::H2C_DATA
                } else {
                    kind::C2H_DATA
                };
                self.encode_with_data(
                    t,
                    data_flags(d.last, d.success),
                    &data_header(d.cccid, d.ttag, d.offset, d.data.len()),
                    &d.data,
                    out,
                );
            }
            Pdu::R2t(r) => {
                let mut s = [0u8; R2T_HLEN - CH_LEN];
                put16(&mut s, 0, r.cccid);
                put16(&mut s, 2, r.ttag);
                put32(&mut s, 4, r.offset);
                put32(&mut s, 8, r.len);
                self.encode_head(kind::R2T, 0, &s, 0, out);
            }
        }
    }

    /// Appends a CapsuleCmd carrying `data` in the capsule (without an intermediate copy).
    pub fn encode_capsule(&self, sqe: &Sqe, data: &[u8], out: &mut Vec<u8>) {
        self.encode_with_data(kind::CAPSULE_CMD, 0, &sqe.0, data, out);
    }

    /// Appends an H2CData PDU carrying `data` at transfer offset `offset`.
    pub fn encode_h2c(
        &self,
        cccid: u16,
        ttag: u16,
        offset: u32,
        data: &[u8],
        last: bool,
        out: &mut Vec<u8>,
    ) {
        let head = data_header(cccid, ttag, offset, data.len());
        self.encode_with_data(kind::H2C_DATA, data_flags(last, false), &head, data, out);
    }

    /// Appends C2HData PDUs carrying `data[range]` at transfer offset `range.start`, at most
    /// `max_pdu` bytes each; the last one carries LAST_PDU (and SUCCESS if `success`). Large
    /// payloads are queued by reference to `data`, not copied.
    pub fn encode_c2h(
        &self,
        cccid: u16,
        data: &Arc<Vec<u8>>,
        len: usize,
        max_pdu: usize,
        success: bool,
        out: &mut OutQueue,
    ) {
        let len = len.min(data.len());
        let max_pdu = max_pdu.max(4096);
        let mut off = 0;
        while off < len {
            let n = (len - off).min(max_pdu);
            let last = off + n == len;
            let chunk = &data[off..off + n];
            let head = data_header(cccid, 0, off as u32, n);
            self.encode_head(
                kind::C2H_DATA,
                data_flags(last, last && success),
                &head,
                n,
                out.tail(),
            );
            if n >= SHARE_AT {
                out.push_shared(data, off..off + n);
            } else {
                out.tail().extend_from_slice(chunk);
            }
            self.encode_trailer(chunk, out.tail());
            off += n;
        }
    }
}

fn data_flags(last: bool, success: bool) -> u8 {
    (if last { flag::LAST_PDU } else { 0 }) | (if success { flag::SUCCESS } else { 0 })
}

fn data_header(cccid: u16, ttag: u16, offset: u32, len: usize) -> [u8; DATA_HLEN - CH_LEN] {
    let mut s = [0u8; DATA_HLEN - CH_LEN];
    put16(&mut s, 0, cccid);
    put16(&mut s, 2, ttag);
    put32(&mut s, 4, offset);
    put32(&mut s, 8, len as u32);
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nvme::spec::{Status, io};
    use proptest::prelude::*;

    fn framers() -> Vec<Framer> {
        let mut v = Vec::new();
        for hd in [false, true] {
            for dd in [false, true] {
                v.push(Framer {
                    header_digest: hd,
                    data_digest: dd,
                    max_data: 1 << 20,
                    data_align: if hd { 4 } else { 32 },
                });
            }
        }
        v
    }

    fn samples() -> Vec<Pdu> {
        vec![
            Pdu::IcReq(IcReq {
                pfv: 0,
                hpda: 0,
                header_digest: true,
                data_digest: false,
                maxr2t: 0,
            }),
            Pdu::IcResp(IcResp {
                pfv: 0,
                cpda: 0,
                header_digest: false,
                data_digest: true,
                maxh2cdata: 0x40000,
            }),
            Pdu::C2HTermReq(TermReq {
                fes: fes::PDU_SEQUENCE_ERROR,
                fei: 0,
                header: vec![4, 0, 72, 0],
            }),
            Pdu::CapsuleCmd {
                sqe: Sqe::new(io::WRITE, 7, 1),
                data: vec![0xab; 4096],
                digest_ok: true,
            },
            Pdu::CapsuleCmd {
                sqe: Sqe::new(io::READ, 8, 1),
                data: vec![],
                digest_ok: true,
            },
            Pdu::CapsuleResp(Cqe {
                dw0: 1,
                dw1: 2,
                sqhd: 3,
                sqid: 4,
                cid: 5,
                status: Status::INVALID_FIELD,
            }),
            Pdu::H2CData(DataPdu {
                cccid: 3,
                ttag: 9,
                offset: 8192,
                last: true,
                success: false,
                data: vec![1, 2, 3, 4],
                digest_ok: true,
            }),
            Pdu::C2HData(DataPdu {
                cccid: 3,
                ttag: 0,
                offset: 0,
                last: true,
                success: true,
                data: vec![9; 100],
                digest_ok: true,
            }),
            Pdu::R2t(R2t {
                cccid: 1,
                ttag: 2,
                offset: 0,
                len: 1 << 20,
            }),
        ]
    }

    #[test]
    fn every_pdu_round_trips_with_and_without_digests() {
        for f in framers() {
            for p in samples() {
                let mut out = Vec::new();
                f.encode(&p, &mut out);
                assert_eq!(
                    f.decode(&out).unwrap(),
                    Decoded::Pdu(p.clone(), out.len()),
                    "{p:?} with {f:?}"
                );
                // Every strict prefix asks for more, never errs.
                for cut in 0..out.len() {
                    assert!(
                        matches!(f.decode(&out[..cut]), Ok(Decoded::NeedMore(n)) if n > cut),
                        "{p:?} cut at {cut}"
                    );
                }
            }
        }
    }

    #[test]
    fn digests_catch_corruption() {
        let f = Framer {
            header_digest: true,
            data_digest: true,
            max_data: 1 << 20,
            data_align: 4,
        };
        let p = &samples()[3];
        let mut out = Vec::new();
        f.encode(p, &mut out);
        // A flipped SQE byte: a fatal header digest error.
        let mut bad = out.clone();
        bad[20] ^= 1;
        assert_eq!(f.decode(&bad).unwrap_err().fes, fes::HEADER_DIGEST_ERROR);
        // A flipped data byte: the command is marked, the connection survives.
        let mut bad = out.clone();
        bad[100] ^= 1;
        match f.decode(&bad).unwrap() {
            Decoded::Pdu(Pdu::CapsuleCmd { digest_ok, .. }, _) => assert!(!digest_ok),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn lengths_the_peer_lies_about_are_refused_before_allocation() {
        let f = Framer::initial(8192);
        // plen far above the data limit.
        let mut h = vec![kind::CAPSULE_CMD, 0, 72, 72];
        h.extend_from_slice(&(1u32 << 31).to_le_bytes());
        assert_eq!(f.decode(&h).unwrap_err().fes, fes::DATA_LIMIT_EXCEEDED);
        // Wrong header length for the type.
        let h = [kind::CAPSULE_RESP, 0, 72, 0, 72, 0, 0, 0];
        assert_eq!(f.decode(&h).unwrap_err().fes, fes::INVALID_HEADER_FIELD);
        // Unknown type.
        let h = [0x0f, 0, 24, 0, 24, 0, 0, 0];
        assert!(f.decode(&h).is_err());
        // plen shorter than the header.
        let h = [kind::R2T, 0, 24, 0, 8, 0, 0, 0];
        assert!(f.decode(&h).is_err());
        // Header digest flag without negotiated digests.
        let h = [kind::R2T, flag::HDGSTF, 24, 0, 28, 0, 0, 0];
        assert!(f.decode(&h).is_err());
    }

    #[test]
    fn c2h_splits_and_flags_the_last_pdu() {
        let f = Framer {
            header_digest: true,
            data_digest: true,
            max_data: 1 << 20,
            data_align: 4,
        };
        let data = Arc::new((0..100_000u32).map(|i| i as u8).collect::<Vec<u8>>());
        let mut q = OutQueue::new();
        f.encode_c2h(5, &data, 90_000, 32768, true, &mut q);
        let bytes = q.take_all();
        let mut at = 0;
        let mut got = Vec::new();
        let mut lasts = Vec::new();
        while at < bytes.len() {
            match f.decode(&bytes[at..]).unwrap() {
                Decoded::Pdu(Pdu::C2HData(d), n) => {
                    assert_eq!(d.offset as usize, got.len());
                    assert!(d.digest_ok);
                    got.extend_from_slice(&d.data);
                    lasts.push((d.last, d.success));
                    at += n;
                }
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(got, data[..90_000]);
        assert_eq!(lasts.len(), 3);
        assert_eq!(lasts.last(), Some(&(true, true)));
        assert!(lasts[..2].iter().all(|&(l, s)| !l && !s));
    }

    proptest! {
        #[test]
        fn decode_never_panics_on_garbage(bytes in proptest::collection::vec(any::<u8>(), 0..600), hd: bool, dd: bool) {
            let f = Framer { header_digest: hd, data_digest: dd, max_data: 8192, data_align: 4 };
            let _ = f.decode(&bytes);
        }

        #[test]
        fn decode_never_panics_on_mutated_pdus(idx in 0usize..9, pos in 0usize..200, val: u8, hd: bool, dd: bool) {
            let f = Framer { header_digest: hd, data_digest: dd, max_data: 8192, data_align: 4 };
            let mut out = Vec::new();
            f.encode(&samples()[idx], &mut out);
            if !out.is_empty() {
                let p = pos % out.len();
                out[p] = val;
            }
            let _ = f.decode(&out);
        }
    }
}
