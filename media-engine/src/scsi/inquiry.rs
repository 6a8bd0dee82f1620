//! INQUIRY (SPC-4 6.6): standard data and the vital product data pages a thin-provisioned
//! disk reports (SPC-4 7.8, SBC-3 6.6).

use super::Nexus;
use super::cdb::{be16, u8_at};
use super::ident::LuIdentity;
use super::limits::{
    Limits, MAX_COMPARE_AND_WRITE_BLOCKS, MAX_UNMAP_DESCRIPTORS, MAX_UNMAP_LBA_COUNT,
};
use super::sense::Sense;

/// Peripheral device type of a direct-access block device.
const SBC_DEVICE: u8 = 0x00;
/// Peripheral qualifier 011b, device type 1Fh: no logical unit at this LUN.
pub(crate) const NO_LOGICAL_UNIT: u8 = 0x7F;

/// Version descriptors (SPC-4 table 30): SAM-5, iSCSI, SPC-4, SBC-3.
const VERSION_DESCRIPTORS: [u16; 4] = [0x00A0, 0x0960, 0x0460, 0x04C0];

/// VPD pages, in ascending order as page 00h must list them.
const VPD_PAGES: [u8; 6] = [0x00, 0x80, 0x83, 0xB0, 0xB1, 0xB2];

/// Protocol identifier of iSCSI (SPC-4 table 362).
const PROTOCOL_ISCSI: u8 = 0x5;

/// What INQUIRY reports about a logical unit and the port the command came through.
pub(crate) struct InquiryContext<'a> {
    pub ident: &'a LuIdentity,
    pub limits: &'a Limits,
    pub nexus: &'a Nexus,
    /// EXTENDED COPY is supported (3PC bit).
    pub third_party_copy: bool,
}

/// Executes INQUIRY; returns Data-In already cut to the allocation length.
pub(crate) fn inquiry(cdb: &[u8], ctx: &InquiryContext<'_>) -> Result<Vec<u8>, Sense> {
    let evpd = u8_at(cdb, 1) & 0x01 != 0;
    let page = u8_at(cdb, 2);
    let allocation_length = usize::from(be16(cdb, 3));
    let mut data = if evpd {
        vpd_page(page, ctx)?
    } else if page != 0 {
        return Err(Sense::invalid_cdb_field(2, None));
    } else {
        standard(ctx.ident, ctx.third_party_copy)
    };
    data.truncate(allocation_length);
    Ok(data)
}

/// Pads or cuts `s` to exactly `len` bytes of printable ASCII (SPC-4 4.4.1).
fn ascii_field(s: &str, len: usize) -> impl Iterator<Item = u8> + '_ {
    s.bytes()
        .map(|b| if (0x20..0x7F).contains(&b) { b } else { b'_' })
        .chain(std::iter::repeat(b' '))
        .take(len)
}

/// Standard INQUIRY data (SPC-4 6.6.2), 96 bytes.
fn standard(ident: &LuIdentity, third_party_copy: bool) -> Vec<u8> {
    let mut d = Vec::with_capacity(96);
    d.push(SBC_DEVICE);
    d.push(if ident.removable { 0x80 } else { 0 });
    d.push(0x06); // SPC-4
    d.push(0x12); // HISUP, response data format 2
    d.push(96 - 5); // additional length
    d.push(if third_party_copy { 0x08 } else { 0 });
    d.push(0);
    d.push(0x02); // CMDQUE
    d.extend(ascii_field(&ident.vendor, 8));
    d.extend(ascii_field(&ident.product, 16));
    d.extend(ascii_field(&ident.revision, 4));
    d.resize(58, 0); // vendor specific, clocking, reserved
    for v in VERSION_DESCRIPTORS {
        d.extend_from_slice(&v.to_be_bytes());
    }
    d.resize(96, 0);
    d
}

/// Standard INQUIRY data of a LUN that has no logical unit: peripheral qualifier 011b.
pub(crate) fn no_logical_unit() -> Vec<u8> {
    let mut d = vec![NO_LOGICAL_UNIT, 0, 0x06, 0x12, 36 - 5, 0, 0, 0x02];
    d.resize(36, 0);
    d
}

fn vpd_page(page: u8, ctx: &InquiryContext<'_>) -> Result<Vec<u8>, Sense> {
    let body = match page {
        0x00 => VPD_PAGES.to_vec(),
        0x80 => ctx
            .ident
            .serial
            .bytes()
            .filter(u8::is_ascii_graphic)
            .take(252)
            .collect(),
        0x83 => device_identification(ctx),
        0xB0 => block_limits(ctx.limits),
        0xB1 => block_device_characteristics(),
        0xB2 => logical_block_provisioning(),
        _ => return Err(Sense::invalid_cdb_field(2, None)),
    };
    let mut d = vec![SBC_DEVICE, page];
    d.extend_from_slice(&(body.len() as u16).to_be_bytes());
    d.extend_from_slice(&body);
    Ok(d)
}

/// One designation descriptor (SPC-4 7.8.6.1).
fn designator(out: &mut Vec<u8>, protocol: Option<u8>, code_set: u8, assoc: u8, ty: u8, id: &[u8]) {
    let piv = if protocol.is_some() { 0x80 } else { 0 };
    out.push((protocol.unwrap_or(0) << 4) | code_set);
    out.push(piv | (assoc << 4) | ty);
    out.push(0);
    out.push(id.len() as u8);
    out.extend_from_slice(id);
}

/// A SCSI name string designator value: UTF-8, null terminated, padded to a multiple of four
/// bytes (SPC-4 7.8.6.11). None when the name does not fit in a designator.
fn scsi_name(name: &str) -> Option<Vec<u8>> {
    let mut v = name.as_bytes().to_vec();
    v.push(0);
    v.resize(v.len().div_ceil(4) * 4, 0);
    (v.len() <= 252 && !name.is_empty()).then_some(v)
}

/// Device Identification VPD page (83h): the logical unit's NAA and T10 vendor designators,
/// the relative port and SCSI name of the target port the command came through, and the name
/// of the target device.
fn device_identification(ctx: &InquiryContext<'_>) -> Vec<u8> {
    const BINARY: u8 = 1;
    const ASCII: u8 = 2;
    const UTF8: u8 = 3;
    const LU: u8 = 0;
    const PORT: u8 = 1;
    const TARGET: u8 = 2;
    let mut d = Vec::new();
    designator(&mut d, None, BINARY, LU, 0x3, &ctx.ident.naa);
    let t10: Vec<u8> = ascii_field(&ctx.ident.vendor, 8)
        .chain(
            ctx.ident
                .serial
                .bytes()
                .filter(u8::is_ascii_graphic)
                .take(200),
        )
        .collect();
    designator(&mut d, None, ASCII, LU, 0x1, &t10);
    let rel = [
        0,
        0,
        (ctx.nexus.relative_target_port >> 8) as u8,
        ctx.nexus.relative_target_port as u8,
    ];
    designator(&mut d, Some(PROTOCOL_ISCSI), BINARY, PORT, 0x4, &rel);
    if let Some(name) = scsi_name(&ctx.nexus.target_port) {
        designator(&mut d, Some(PROTOCOL_ISCSI), UTF8, PORT, 0x8, &name);
    }
    // The target port name is "<target name>,t,0x<TPGT>"; the target device is the name.
    let target = ctx
        .nexus
        .target_port
        .split(",t,")
        .next()
        .unwrap_or_default();
    if let Some(name) = scsi_name(target) {
        designator(&mut d, Some(PROTOCOL_ISCSI), UTF8, TARGET, 0x8, &name);
    }
    d
}

/// Block Limits VPD page (B0h, SBC-3 6.6.4), 60 bytes of body.
fn block_limits(l: &Limits) -> Vec<u8> {
    let mut d = vec![0u8; 0x3C];
    // WSNZ = 0: WRITE SAME with zero blocks means "to the end of the medium".
    d[1] = MAX_COMPARE_AND_WRITE_BLOCKS;
    d[2..4].copy_from_slice(&(l.blocks_per_physical() as u16).to_be_bytes());
    d[4..8].copy_from_slice(&l.max_transfer.to_be_bytes());
    d[8..12].copy_from_slice(&l.optimal_transfer.to_be_bytes());
    // Maximum prefetch length: PRE-FETCH is accepted up to the maximum transfer length.
    d[12..16].copy_from_slice(&l.max_transfer.to_be_bytes());
    d[16..20].copy_from_slice(&MAX_UNMAP_LBA_COUNT.to_be_bytes());
    d[20..24].copy_from_slice(&MAX_UNMAP_DESCRIPTORS.to_be_bytes());
    d[24..28].copy_from_slice(&l.blocks_per_physical().to_be_bytes());
    d[28] = 0x80; // UGAVALID, unmap granularity alignment 0
    d[32..40].copy_from_slice(&l.max_write_same.to_be_bytes());
    // Maximum atomic transfer length (0 when WRITE ATOMIC is not supported). Atomic alignment
    // and granularity stay 0 (no requirement), as do the maximum atomic transfer length with
    // atomic boundary and the maximum atomic boundary size (atomic boundaries unsupported).
    d[40..44].copy_from_slice(&l.max_atomic.to_be_bytes());
    d
}

/// Block Device Characteristics VPD page (B1h): solid state (rotation rate 1). WABEREQ 01b:
/// after a sanitize block erase, reads complete with GOOD status (returning zeroes, as every
/// deallocated block does). WACEREQ 00b: cryptographic erase is not supported.
fn block_device_characteristics() -> Vec<u8> {
    let mut d = vec![0u8; 0x3C];
    d[1] = 0x01;
    d[3] = 0b01 << 6;
    d
}

/// Logical Block Provisioning VPD page (B2h): thin provisioned, UNMAP and WRITE SAME (10/16)
/// with UNMAP supported, deallocated blocks read as zeros.
fn logical_block_provisioning() -> Vec<u8> {
    // threshold exponent; LBPU | LBPWS | LBPWS10 | LBPRZ; provisioning type 010b (thin)
    vec![0, 0x80 | 0x40 | 0x20 | 0x04, 0x02, 0]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scsi::cdb::be32;

    fn ctx_parts() -> (LuIdentity, Limits, Nexus) {
        (
            LuIdentity::from_volume_id("vol-7"),
            Limits::new(512),
            Nexus {
                initiator_port: "iqn.1993-08.org.debian:01:abc,i,0x23d000000001".into(),
                target_port: "iqn.2026-11.io.maas:exp-1,t,0x0001".into(),
                relative_target_port: 3,
            },
        )
    }

    fn run(evpd: bool, page: u8, alloc: u16) -> Result<Vec<u8>, Sense> {
        let (ident, limits, nexus) = ctx_parts();
        let ctx = InquiryContext {
            ident: &ident,
            limits: &limits,
            nexus: &nexus,
            third_party_copy: true,
        };
        let a = alloc.to_be_bytes();
        inquiry(&[0x12, u8::from(evpd), page, a[0], a[1], 0], &ctx)
    }

    #[test]
    fn standard_data() {
        let d = run(false, 0, 255).unwrap();
        assert_eq!(d.len(), 96);
        assert_eq!(usize::from(d[4]), d.len() - 5);
        assert_eq!((d[0], d[2], d[3] & 0x0F, d[7] & 0x02), (0, 6, 2, 2));
        assert_eq!(&d[8..16], b"MAAS    ");
        assert_eq!(&d[16..32], b"mosaic volume   ");
        assert!(d[58..66].chunks(2).any(|c| c == [0x04, 0xC0]));
        assert_eq!(run(false, 0, 5).unwrap().len(), 5);
        assert_eq!(run(false, 0, 511).unwrap(), run(false, 0, 512).unwrap());
        assert_eq!(
            run(false, 1, 255).unwrap_err().asc,
            Sense::invalid_cdb_field(2, None).asc
        );
    }

    #[test]
    fn every_listed_page_is_readable_and_sorted() {
        let d = run(true, 0, 255).unwrap();
        let pages = &d[4..];
        assert!(pages.windows(2).all(|w| w[0] < w[1]));
        for &p in pages {
            let v = run(true, p, 255).unwrap();
            assert_eq!(v[1], p);
            assert_eq!(usize::from(be16(&v, 2)), v.len() - 4);
        }
        assert!(run(true, 0x86, 255).is_err());
    }

    #[test]
    fn block_limits_and_provisioning() {
        let d = run(true, 0xB0, 255).unwrap();
        assert_eq!(d[3], 0x3C);
        assert_eq!(d[5], 255);
        assert_eq!(be32(&d, 8), 32768);
        assert_eq!(be32(&d, 20), 1 << 20);
        assert_eq!(be32(&d, 44), 0, "no atomic writes on these limits");
        assert_eq!(&d[48..64], &[0; 16]);
        let d = run(true, 0xB2, 255).unwrap();
        assert_eq!(d[5] & 0xE4, 0xE4);
        assert_eq!(d[6] & 0x07, 2);
        let d = run(true, 0xB1, 255).unwrap();
        assert_eq!(be16(&d, 4), 1);
        assert_eq!(d[7] >> 4, 0b0100, "WABEREQ 01b, WACEREQ 00b");
    }

    #[test]
    fn device_identification_designators() {
        let (ident, ..) = ctx_parts();
        let d = run(true, 0x83, 1024).unwrap();
        // First designator: NAA, binary, LU association.
        assert_eq!(&d[4..8], &[0x01, 0x03, 0x00, 16]);
        assert_eq!(&d[8..24], &ident.naa);
        let mut at = 4;
        let mut kinds = Vec::new();
        while at + 4 <= d.len() {
            kinds.push((d[at + 1] >> 4) & 0x3 | (d[at + 1] & 0x0F) << 4);
            at += 4 + usize::from(d[at + 3]);
        }
        assert_eq!(at, d.len());
        // (association, type): NAA, T10, relative port, port name, target name.
        assert_eq!(kinds, vec![0x30, 0x10, 0x41, 0x81, 0x82]);
    }
}
