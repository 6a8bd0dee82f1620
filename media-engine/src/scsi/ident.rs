//! Who a logical unit says it is: INQUIRY strings, the unit serial number (VPD 80h) and the
//! NAA designator (VPD 83h) by which multipath software and `/dev/disk/by-id` recognise the
//! same volume across sessions, paths and target restarts.

use md5::{Digest, Md5};

/// IEEE company identifier placed in NAA-6 designators. This value has the shape of a Company
/// ID (CID, second nibble Ah) and spells "MA"; a deployment that owns an IEEE OUI/CID should
/// pass its own to [`LuIdentity::from_volume_id_with_company`].
pub const DEFAULT_COMPANY_ID: u32 = 0x0A_4D_41;

/// Longest unit serial number we report; longer volume ids are replaced by their hash.
const MAX_SERIAL_LEN: usize = 64;

/// Identity and export options of one logical unit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LuIdentity {
    /// T10 vendor identification (INQUIRY bytes 8..16, space padded, at most 8 characters).
    pub vendor: String,
    /// Product identification (at most 16 characters).
    pub product: String,
    /// Product revision level (at most 4 characters).
    pub revision: String,
    /// Unit serial number (VPD page 80h): printable ASCII.
    pub serial: String,
    /// NAA IEEE Registered Extended designator (NAA 6h) of the logical unit (VPD page 83h).
    pub naa: [u8; 16],
    /// Report a removable medium (RMB): START STOP UNIT can then eject and load it and
    /// PREVENT ALLOW MEDIUM REMOVAL guards that. Off for ordinary disks: some hosts treat
    /// removable disks differently (no paging files, automounting, media polling).
    pub removable: bool,
    /// Refuse every command that changes the medium (DATA PROTECT, WRITE PROTECTED), e.g. for
    /// a snapshot mounted read-only.
    pub read_only: bool,
}

impl LuIdentity {
    /// Identity of the volume with id `volume_id`: serial and NAA designator are derived from
    /// the id alone, so every target node exporting the volume reports the same identity.
    pub fn from_volume_id(volume_id: &str) -> LuIdentity {
        LuIdentity::from_volume_id_with_company(volume_id, DEFAULT_COMPANY_ID)
    }

    /// As [`LuIdentity::from_volume_id`], with the 24-bit IEEE company identifier `company_id`.
    pub fn from_volume_id_with_company(volume_id: &str, company_id: u32) -> LuIdentity {
        let digest: [u8; 16] = Md5::new_with_prefix(b"maas-lu-identity\0")
            .chain_update(volume_id.as_bytes())
            .finalize()
            .into();
        LuIdentity {
            vendor: "MAAS".to_string(),
            product: "mosaic volume".to_string(),
            revision: format!(
                "{}.{}",
                env!("CARGO_PKG_VERSION_MAJOR"),
                env!("CARGO_PKG_VERSION_MINOR")
            ),
            serial: serial_for(volume_id, &digest),
            naa: naa6(company_id, &digest),
            removable: false,
            read_only: false,
        }
    }
}

/// The volume id itself when it is short printable ASCII without spaces (readable in
/// `lsscsi`/`udevadm` output), otherwise the hex digest.
fn serial_for(volume_id: &str, digest: &[u8; 16]) -> String {
    let printable = volume_id.bytes().all(|b| b.is_ascii_graphic());
    if printable && !volume_id.is_empty() && volume_id.len() <= MAX_SERIAL_LEN {
        volume_id.to_string()
    } else {
        hex::encode(digest)
    }
}

/// NAA 6h: 4-bit NAA, 24-bit company id, then 100 bits of vendor-specific identifier and
/// extension taken from the digest (SPC-4 7.8.6.6.4).
fn naa6(company_id: u32, digest: &[u8; 16]) -> [u8; 16] {
    let cid = company_id & 0x00FF_FFFF;
    let mut naa = [0u8; 16];
    naa[0] = 0x60 | (cid >> 20) as u8;
    naa[1] = (cid >> 12) as u8;
    naa[2] = (cid >> 4) as u8;
    naa[3] = ((cid as u8 & 0x0F) << 4) | (digest[0] & 0x0F);
    naa[4..].copy_from_slice(&digest[1..13]);
    naa
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_is_deterministic_and_distinct() {
        let a = LuIdentity::from_volume_id("vol-1");
        assert_eq!(a, LuIdentity::from_volume_id("vol-1"));
        let b = LuIdentity::from_volume_id("vol-2");
        assert_ne!(a.naa, b.naa);
        assert_eq!(a.serial, "vol-1");
        assert_eq!(a.naa[0] >> 4, 6);
        assert_eq!(&a.naa[..3], &[0x60, 0xA4, 0xD4]);
        assert_eq!(a.naa[3] >> 4, 0x1);
    }

    #[test]
    fn odd_volume_ids_get_a_hashed_serial() {
        for id in ["", "with space", "é", &"x".repeat(65)] {
            let s = LuIdentity::from_volume_id(id).serial;
            assert_eq!(s.len(), 32, "{id:?}");
            assert!(s.bytes().all(|b| b.is_ascii_hexdigit()));
        }
    }
}
