//! iSCSI PDU framing (RFC 7143 section 11): the 48-byte Basic Header Segment, additional header
//! segments, the data segment with its padding, and the optional CRC32C digests.
//!
//! Sans-IO: [`Framer::decode`] takes whatever bytes have arrived and either asks for more or
//! returns one PDU and how many bytes it used; [`Framer::encode`] appends a PDU's wire form to a
//! buffer. Every length a peer sends is checked against the negotiated limits before anything
//! is allocated.

use std::ops::Range;
use std::sync::Arc;

use thiserror::Error;

use crate::outq::{OutQueue, SHARE_AT};

pub const BHS_LEN: usize = 48;
/// Reserved tag value ("no task" / "no transfer").
pub const RESERVED_TAG: u32 = 0xffff_ffff;

/// Initiator opcodes.
pub mod op {
    pub const NOP_OUT: u8 = 0x00;
    pub const SCSI_CMD: u8 = 0x01;
    pub const TMF_REQ: u8 = 0x02;
    pub const LOGIN_REQ: u8 = 0x03;
    pub const TEXT_REQ: u8 = 0x04;
    pub const DATA_OUT: u8 = 0x05;
    pub const LOGOUT_REQ: u8 = 0x06;
    pub const SNACK: u8 = 0x10;
    // Target opcodes.
    pub const NOP_IN: u8 = 0x20;
    pub const SCSI_RESP: u8 = 0x21;
    pub const TMF_RESP: u8 = 0x22;
    pub const LOGIN_RESP: u8 = 0x23;
    pub const TEXT_RESP: u8 = 0x24;
    pub const DATA_IN: u8 = 0x25;
    pub const LOGOUT_RESP: u8 = 0x26;
    pub const R2T: u8 = 0x31;
    pub const ASYNC: u8 = 0x32;
    pub const REJECT: u8 = 0x3f;
}

/// Reject reasons (RFC 7143 11.17.1).
pub mod reject {
    pub const DATA_DIGEST: u8 = 0x02;
    pub const PROTOCOL_ERROR: u8 = 0x04;
    pub const NOT_SUPPORTED: u8 = 0x05;
    pub const IMMEDIATE_REJECT: u8 = 0x06;
    pub const TASK_IN_PROGRESS: u8 = 0x07;
    pub const INVALID_PDU_FIELD: u8 = 0x09;
    pub const OUT_OF_RESOURCES: u8 = 0x0a;
    pub const WAITING_FOR_LOGOUT: u8 = 0x0c;
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum PduError {
    #[error("header digest mismatch")]
    HeaderDigest,
    #[error("data digest mismatch")]
    DataDigest,
    #[error("data segment of {len} bytes exceeds the negotiated maximum of {max}")]
    DataTooLong { len: usize, max: usize },
    #[error("additional header segments of {0} bytes exceed the maximum")]
    AhsTooLong(usize),
    #[error("opcode {0:#04x} is not an initiator opcode")]
    BadOpcode(u8),
}

/// One PDU: the raw BHS plus its additional header segments and data segment (without padding).
/// Field accessors name the RFC's fields; opcode-specific meaning is up to the caller.
#[derive(Clone, PartialEq, Eq)]
pub struct Pdu {
    pub bhs: [u8; BHS_LEN],
    pub ahs: Vec<u8>,
    pub data: Vec<u8>,
}

impl std::fmt::Debug for Pdu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pdu")
            .field("opcode", &format_args!("{:#04x}", self.opcode()))
            .field("flags", &format_args!("{:#04x}", self.flags()))
            .field("itt", &format_args!("{:#x}", self.itt()))
            .field("ahs", &self.ahs.len())
            .field("data", &self.data.len())
            .finish()
    }
}

impl Pdu {
    /// A PDU with the given opcode and every other field zero.
    pub fn new(opcode: u8) -> Pdu {
        let mut bhs = [0u8; BHS_LEN];
        bhs[0] = opcode & 0x3f;
        Pdu {
            bhs,
            ahs: Vec::new(),
            data: Vec::new(),
        }
    }

    pub fn opcode(&self) -> u8 {
        self.bhs[0] & 0x3f
    }
    pub fn immediate(&self) -> bool {
        self.bhs[0] & 0x40 != 0
    }
    /// Byte 1: the F bit and opcode-specific flags.
    pub fn flags(&self) -> u8 {
        self.bhs[1]
    }
    pub fn set_flags(&mut self, f: u8) {
        self.bhs[1] = f;
    }
    pub fn final_bit(&self) -> bool {
        self.bhs[1] & 0x80 != 0
    }
    pub fn u8_at(&self, off: usize) -> u8 {
        self.bhs[off]
    }
    pub fn set_u8(&mut self, off: usize, v: u8) {
        self.bhs[off] = v;
    }
    pub fn u16_at(&self, off: usize) -> u16 {
        u16::from_be_bytes([self.bhs[off], self.bhs[off + 1]])
    }
    pub fn set_u16(&mut self, off: usize, v: u16) {
        self.bhs[off..off + 2].copy_from_slice(&v.to_be_bytes());
    }
    pub fn u32_at(&self, off: usize) -> u32 {
        let mut b = [0u8; 4];
        b.copy_from_slice(&self.bhs[off..off + 4]);
        u32::from_be_bytes(b)
    }
    pub fn set_u32(&mut self, off: usize, v: u32) {
        self.bhs[off..off + 4].copy_from_slice(&v.to_be_bytes());
    }
    pub fn lun_raw(&self) -> u64 {
        let mut b = [0u8; 8];
        b.copy_from_slice(&self.bhs[8..16]);
        u64::from_be_bytes(b)
    }
    pub fn set_lun_raw(&mut self, v: u64) {
        self.bhs[8..16].copy_from_slice(&v.to_be_bytes());
    }
    pub fn itt(&self) -> u32 {
        self.u32_at(16)
    }
    pub fn set_itt(&mut self, v: u32) {
        self.set_u32(16, v);
    }
    /// TotalAHSLength in bytes as the header declares it.
    pub fn declared_ahs_len(&self) -> usize {
        self.bhs[4] as usize * 4
    }
    /// DataSegmentLength as the header declares it.
    pub fn declared_data_len(&self) -> usize {
        (self.bhs[5] as usize) << 16 | (self.bhs[6] as usize) << 8 | self.bhs[7] as usize
    }
}

/// Decodes LUN field bytes (SAM-5 addressing) into a flat LUN number: peripheral (00b) and
/// flat (01b) single-level addressing, which is what every initiator sends for LUNs < 16384.
pub fn lun_from_raw(raw: u64) -> u64 {
    let b = raw.to_be_bytes();
    match b[0] >> 6 {
        0b00 => b[1] as u64 | ((b[0] as u64 & 0x3f) << 8),
        0b01 => ((b[0] as u64 & 0x3f) << 8) | b[1] as u64,
        _ => u64::MAX,
    }
}

/// Encodes a LUN number < 16384 as the initiator would (peripheral for < 256, flat above).
pub fn lun_to_raw(lun: u64) -> u64 {
    let bytes: [u8; 2] = if lun < 256 {
        [0, lun as u8]
    } else {
        [0x40 | ((lun >> 8) as u8 & 0x3f), lun as u8]
    };
    (u64::from(bytes[0]) << 56) | (u64::from(bytes[1]) << 48)
}

/// The result of offering bytes to the decoder.
#[derive(Debug, PartialEq, Eq)]
pub enum Decoded {
    /// At least this many bytes in total are needed before a PDU can be decoded.
    NeedMore(usize),
    /// One PDU and the number of input bytes it used.
    Pdu(Pdu, usize),
}

/// As [`Decoded`], with the data segment left in the input: the PDU (its `data` empty), where
/// its data is in the input, and the number of input bytes it used.
#[derive(Debug, PartialEq, Eq)]
pub enum DecodedRef {
    NeedMore(usize),
    Pdu(Pdu, std::ops::Range<usize>, usize),
}

/// A Data-Out header whose data is still arriving (see [`Framer::data_out_head`]).
#[derive(Debug, PartialEq, Eq)]
pub struct DataOutHead {
    pub pdu: Pdu,
    /// Where the data starts in the input (every byte from there on is data).
    pub data_start: usize,
    pub data_len: usize,
    /// Padding bytes after the data, to be skipped.
    pub pad: usize,
}

/// Maximum TotalAHSLength we accept (an extended CDB and a bidi length fit easily).
pub const MAX_AHS: usize = 512;

/// Framing parameters of one connection (digests switch on after login).
#[derive(Clone, Copy, Debug)]
pub struct Framer {
    pub header_digest: bool,
    pub data_digest: bool,
    /// The largest data segment we accept (our MaxRecvDataSegmentLength, or the login limit).
    pub max_recv_data: usize,
}

fn pad4(n: usize) -> usize {
    (4 - n % 4) % 4
}

impl Framer {
    pub fn login() -> Framer {
        Framer {
            header_digest: false,
            data_digest: false,
            max_recv_data: 8192,
        }
    }

    /// Total wire length of the PDU whose BHS starts `input`, checked against the limits.
    fn wire_len(&self, bhs: &[u8]) -> Result<(usize, usize, usize), PduError> {
        let ahs = bhs[4] as usize * 4;
        let data = (bhs[5] as usize) << 16 | (bhs[6] as usize) << 8 | bhs[7] as usize;
        if ahs > MAX_AHS {
            return Err(PduError::AhsTooLong(ahs));
        }
        if data > self.max_recv_data {
            return Err(PduError::DataTooLong {
                len: data,
                max: self.max_recv_data,
            });
        }
        let mut total = BHS_LEN + ahs;
        if self.header_digest {
            total += 4;
        }
        if data > 0 {
            total += data + pad4(data);
            if self.data_digest {
                total += 4;
            }
        }
        Ok((total, ahs, data))
    }

    /// Decodes one PDU from the front of `input`.
    pub fn decode(&self, input: &[u8]) -> Result<Decoded, PduError> {
        Ok(match self.decode_ref(input)? {
            DecodedRef::Pdu(mut pdu, data, total) => {
                pdu.data = input[data].to_vec();
                Decoded::Pdu(pdu, total)
            }
            DecodedRef::NeedMore(n) => Decoded::NeedMore(n),
        })
    }

    /// As [`Framer::decode`], but leaves the data segment in `input` (checked, digest and all)
    /// and returns where it is, so a Data-Out can be copied once, straight to its command's
    /// buffer.
    pub fn decode_ref(&self, input: &[u8]) -> Result<DecodedRef, PduError> {
        if input.len() < BHS_LEN {
            return Ok(DecodedRef::NeedMore(BHS_LEN));
        }
        let (total, ahs_len, data_len) = self.wire_len(&input[..BHS_LEN])?;
        if input.len() < total {
            return Ok(DecodedRef::NeedMore(total));
        }
        let opcode = input[0] & 0x3f;
        if !matches!(
            opcode,
            op::NOP_OUT
                | op::SCSI_CMD
                | op::TMF_REQ
                | op::LOGIN_REQ
                | op::TEXT_REQ
                | op::DATA_OUT
                | op::LOGOUT_REQ
                | op::SNACK
        ) {
            return Err(PduError::BadOpcode(opcode));
        }
        let mut pos = BHS_LEN + ahs_len;
        if self.header_digest {
            let want = crc32c::crc32c(&input[..pos]);
            let got = read_le32(&input[pos..pos + 4]);
            if want != got {
                return Err(PduError::HeaderDigest);
            }
            pos += 4;
        }
        let data_start = pos;
        if data_len > 0 {
            let padded = data_len + pad4(data_len);
            if self.data_digest {
                let want = crc32c::crc32c(&input[data_start..data_start + padded]);
                let got = read_le32(&input[data_start + padded..data_start + padded + 4]);
                if want != got {
                    return Err(PduError::DataDigest);
                }
            }
        }
        let mut bhs = [0u8; BHS_LEN];
        bhs.copy_from_slice(&input[..BHS_LEN]);
        let pdu = Pdu {
            bhs,
            ahs: input[BHS_LEN..BHS_LEN + ahs_len].to_vec(),
            data: Vec::new(),
        };
        Ok(DecodedRef::Pdu(
            pdu,
            data_start..data_start + data_len,
            total,
        ))
    }

    /// The header of a Data-Out PDU at the front of `input` whose data segment has not fully
    /// arrived: the PDU without data, where its data starts in `input`, the data's length and
    /// its padding. With it a driver can read the rest of a large payload straight into its
    /// command's buffer. `None` for anything else (another opcode, a complete PDU, not yet a
    /// whole header, or data digests, which need the data in one place), which then goes
    /// through [`Framer::decode_ref`] as usual; errors are that function's.
    pub fn data_out_head(&self, input: &[u8]) -> Result<Option<DataOutHead>, PduError> {
        if self.data_digest || input.len() < BHS_LEN || input[0] & 0x3f != op::DATA_OUT {
            return Ok(None);
        }
        let (total, ahs_len, data_len) = self.wire_len(&input[..BHS_LEN])?;
        let head_len = BHS_LEN + ahs_len + if self.header_digest { 4 } else { 0 };
        if input.len() < head_len || input.len() >= head_len + data_len || input.len() >= total {
            return Ok(None);
        }
        if self.header_digest {
            let pos = BHS_LEN + ahs_len;
            let want = crc32c::crc32c(&input[..pos]);
            if want != read_le32(&input[pos..pos + 4]) {
                return Err(PduError::HeaderDigest);
            }
        }
        let mut bhs = [0u8; BHS_LEN];
        bhs.copy_from_slice(&input[..BHS_LEN]);
        Ok(Some(DataOutHead {
            pdu: Pdu {
                bhs,
                ahs: input[BHS_LEN..BHS_LEN + ahs_len].to_vec(),
                data: Vec::new(),
            },
            data_start: head_len,
            data_len,
            pad: pad4(data_len),
        }))
    }

    /// Appends the wire form of `pdu` to `out`, filling in the two length fields.
    pub fn encode(&self, pdu: &Pdu, out: &mut Vec<u8>) {
        self.encode_parts(&pdu.bhs, &pdu.ahs, &pdu.data, out);
    }

    /// Appends a PDU given as parts (so a Data-In can borrow its data from a larger buffer).
    pub fn encode_parts(&self, bhs: &[u8; BHS_LEN], ahs: &[u8], data: &[u8], out: &mut Vec<u8>) {
        out.reserve(BHS_LEN + ahs.len() + data.len() + 12);
        self.encode_head(bhs, ahs, data.len(), out);
        if !data.is_empty() {
            out.extend_from_slice(data);
            self.encode_trailer(data, out);
        }
    }

    /// As [`Framer::encode_parts`] (no AHS) with the data segment `data[range]` queued by
    /// reference when it is large: only the header and the trailer are copied.
    pub fn encode_shared(
        &self,
        bhs: &[u8; BHS_LEN],
        data: &Arc<Vec<u8>>,
        range: Range<usize>,
        out: &mut OutQueue,
    ) {
        let Some(payload) = data.get(range.clone()) else {
            return;
        };
        if payload.len() < SHARE_AT {
            self.encode_parts(bhs, &[], payload, out.tail());
            return;
        }
        self.encode_head(bhs, &[], payload.len(), out.tail());
        out.push_shared(data, range);
        self.encode_trailer(payload, out.tail());
    }

    /// The BHS (with the AHS and data lengths filled in), the AHS and the header digest.
    fn encode_head(&self, bhs: &[u8; BHS_LEN], ahs: &[u8], data_len: usize, out: &mut Vec<u8>) {
        let mut bhs = *bhs;
        bhs[4] = (ahs.len() / 4) as u8;
        bhs[5] = (data_len >> 16) as u8;
        bhs[6] = (data_len >> 8) as u8;
        bhs[7] = data_len as u8;
        let start = out.len();
        out.extend_from_slice(&bhs);
        out.extend_from_slice(ahs);
        if self.header_digest {
            let crc = crc32c::crc32c(&out[start..]);
            out.extend_from_slice(&crc.to_le_bytes());
        }
    }

    /// What follows a data segment: padding to 4 bytes, and the data digest (over the data
    /// and the padding).
    fn encode_trailer(&self, data: &[u8], out: &mut Vec<u8>) {
        let pad = pad4(data.len());
        out.resize(out.len() + pad, 0);
        if self.data_digest {
            let crc = crc32c::crc32c_append(crc32c::crc32c(data), &[0u8; 3][..pad]);
            out.extend_from_slice(&crc.to_le_bytes());
        }
    }
}

/// Digests go on the wire in the byte order CRC32C produces (RFC 7143 13.1, little-endian).
fn read_le32(b: &[u8]) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[..4]);
    u32::from_le_bytes(a)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn framer(hd: bool, dd: bool) -> Framer {
        Framer {
            header_digest: hd,
            data_digest: dd,
            max_recv_data: 65536,
        }
    }

    #[test]
    fn roundtrip_with_and_without_digests() {
        for (hd, dd) in [(false, false), (true, false), (false, true), (true, true)] {
            let f = framer(hd, dd);
            let mut p = Pdu::new(op::SCSI_CMD);
            p.set_flags(0x81);
            p.set_itt(7);
            p.data = vec![1, 2, 3, 4, 5];
            let mut wire = Vec::new();
            f.encode(&p, &mut wire);
            assert_eq!(wire.len() % 4, 0);
            // Every prefix asks for more; the whole decodes to the same PDU.
            for cut in 0..wire.len() {
                assert!(matches!(f.decode(&wire[..cut]), Ok(Decoded::NeedMore(n)) if n > cut));
            }
            let Ok(Decoded::Pdu(q, used)) = f.decode(&wire) else {
                panic!("decode")
            };
            assert_eq!(used, wire.len());
            assert_eq!(q.data, p.data);
            assert_eq!(q.itt(), 7);
            assert_eq!(q.declared_data_len(), 5);
        }
    }

    /// A Data-Out's header is offered for direct reading exactly while its data is still
    /// arriving, and what it reports is what `decode_ref` finds once the PDU is whole.
    #[test]
    fn data_out_head_while_its_data_arrives() {
        for (hd, dd) in [(false, false), (true, false), (false, true)] {
            let f = framer(hd, dd);
            let mut p = Pdu::new(op::DATA_OUT);
            p.set_itt(9);
            p.data = (0..40_001u32).map(|i| i as u8).collect();
            let mut wire = Vec::new();
            f.encode(&p, &mut wire);
            let Ok(DecodedRef::Pdu(_, data, _)) = f.decode_ref(&wire) else {
                panic!("decode_ref")
            };
            for cut in 0..wire.len() {
                let head = f.data_out_head(&wire[..cut]).unwrap();
                let expect = !dd && cut >= data.start && cut < data.end;
                assert_eq!(head.is_some(), expect, "cut {cut} digests {hd}/{dd}");
                if let Some(h) = head {
                    assert_eq!((h.data_start, h.data_len, h.pad), (data.start, 40_001, 3));
                    assert_eq!(h.pdu.itt(), 9);
                    assert!(h.pdu.data.is_empty());
                }
            }
            // Other opcodes are not offered.
            let mut cmd = Pdu::new(op::SCSI_CMD);
            cmd.data = vec![0; 4096];
            let mut wire = Vec::new();
            f.encode(&cmd, &mut wire);
            assert_eq!(f.data_out_head(&wire[..BHS_LEN + 8 + 100]), Ok(None));
        }
        // A damaged header is an error, as decode_ref says.
        let f = framer(true, false);
        let mut p = Pdu::new(op::DATA_OUT);
        p.data = vec![1; 8192];
        let mut wire = Vec::new();
        f.encode(&p, &mut wire);
        wire[20] ^= 1;
        assert_eq!(f.data_out_head(&wire[..100]), Err(PduError::HeaderDigest));
    }

    #[test]
    fn digest_errors_are_detected() {
        let f = framer(true, true);
        let mut p = Pdu::new(op::NOP_OUT);
        p.data = vec![9; 10];
        let mut wire = Vec::new();
        f.encode(&p, &mut wire);
        let mut bad = wire.clone();
        bad[20] ^= 1;
        assert_eq!(f.decode(&bad), Err(PduError::HeaderDigest));
        let mut bad = wire.clone();
        bad[BHS_LEN + 4 + 2] ^= 1;
        assert_eq!(f.decode(&bad), Err(PduError::DataDigest));
    }

    #[test]
    fn lengths_are_bounded_before_allocation() {
        let f = framer(false, false);
        let mut bhs = [0u8; BHS_LEN];
        bhs[5] = 0xff; // 16 MiB data segment
        assert!(matches!(f.decode(&bhs), Err(PduError::DataTooLong { .. })));
        let mut bhs = [0u8; BHS_LEN];
        bhs[4] = 0xff;
        assert!(matches!(f.decode(&bhs), Err(PduError::AhsTooLong(_))));
        let mut bhs = [0u8; BHS_LEN];
        bhs[0] = op::SCSI_RESP;
        assert_eq!(f.decode(&bhs), Err(PduError::BadOpcode(op::SCSI_RESP)));
    }

    #[test]
    fn lun_encoding() {
        for lun in [0u64, 1, 255, 256, 16383] {
            assert_eq!(lun_from_raw(lun_to_raw(lun)), lun);
        }
    }

    proptest::proptest! {
        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..400),
                               hd: bool, dd: bool) {
            let f = Framer { header_digest: hd, data_digest: dd, max_recv_data: 256 };
            let _ = f.decode(&bytes);
        }
    }
}
