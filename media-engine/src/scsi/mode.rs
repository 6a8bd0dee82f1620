//! MODE SENSE and MODE SELECT (SPC-4 6.11-6.14) over three mode pages: Caching (08h, with
//! a changeable WCE bit), Control (0Ah, with a changeable SWP bit) and Informational
//! Exceptions Control (1Ch). Parameters cannot be saved.

use super::cdb::{be16, u8_at};
use super::sense::{Asc, Sense};

/// The changeable mode parameters of a logical unit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct ModeParams {
    /// Write cache enabled: writes are acknowledged before they are durable, until the next
    /// SYNCHRONIZE CACHE or FUA write. With WCE cleared every write is made durable.
    pub wce: bool,
    /// Software write protect: the medium refuses writes.
    pub swp: bool,
}

impl Default for ModeParams {
    fn default() -> ModeParams {
        ModeParams {
            wce: true,
            swp: false,
        }
    }
}

const CACHING: u8 = 0x08;
const CONTROL: u8 = 0x0A;
const INFORMATIONAL_EXCEPTIONS: u8 = 0x1C;
const ALL_PAGES: u8 = 0x3F;
/// Pages in ascending order, as "return all pages" lists them.
const PAGES: [u8; 3] = [CACHING, CONTROL, INFORMATIONAL_EXCEPTIONS];

/// Page control field of MODE SENSE.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum PageControl {
    Current,
    Changeable,
    Default,
}

/// A mode page as MODE SENSE returns it (page code and page length included).
fn page(code: u8, pc: PageControl, current: &ModeParams) -> Option<Vec<u8>> {
    let params = match pc {
        PageControl::Current => *current,
        PageControl::Default => ModeParams::default(),
        // Changeable values: a mask with a one for every bit MODE SELECT may change.
        PageControl::Changeable => ModeParams {
            wce: true,
            swp: true,
        },
    };
    let changeable = pc == PageControl::Changeable;
    let mut p = match code {
        CACHING => vec![0u8; 20],
        CONTROL => vec![0u8; 12],
        INFORMATIONAL_EXCEPTIONS => vec![0u8; 12],
        _ => return None,
    };
    p[0] = code;
    p[1] = (p.len() - 2) as u8;
    match code {
        CACHING => {
            if params.wce {
                p[2] |= 0x04;
            }
        }
        CONTROL => {
            if params.swp {
                p[4] |= 0x08;
            }
            if !changeable {
                // GLTSD: no log parameters are saved. QUEUE ALGORITHM MODIFIER 1: commands
                // run concurrently and may complete in any order. No busy timeout limit.
                p[2] |= 0x02;
                p[3] |= 0x10;
                p[8..10].copy_from_slice(&0xFFFFu16.to_be_bytes());
            }
        }
        _ => {
            if !changeable {
                // DEXCPT: no informational exceptions are reported.
                p[2] |= 0x08;
            }
        }
    }
    Some(p)
}

/// What MODE SENSE reports besides the pages.
pub(crate) struct ModeSenseContext {
    pub params: ModeParams,
    pub block_size: u32,
    pub blocks: u64,
    pub write_protected: bool,
}

/// MODE SENSE (6) when `ten` is false, MODE SENSE (10) otherwise. Data-In is cut to the
/// allocation length.
pub(crate) fn mode_sense(cdb: &[u8], ten: bool, ctx: &ModeSenseContext) -> Result<Vec<u8>, Sense> {
    let dbd = u8_at(cdb, 1) & 0x08 != 0;
    let llbaa = ten && u8_at(cdb, 1) & 0x10 != 0;
    let pc = match u8_at(cdb, 2) >> 6 {
        0 => PageControl::Current,
        1 => PageControl::Changeable,
        2 => PageControl::Default,
        _ => {
            return Err(Sense::illegal_request(Asc::SAVING_PARAMETERS_NOT_SUPPORTED)
                .with_field_pointer(true, 2, Some(7)));
        }
    };
    let code = u8_at(cdb, 2) & 0x3F;
    let subpage = u8_at(cdb, 3);
    let allocation_length = if ten {
        usize::from(be16(cdb, 7))
    } else {
        usize::from(u8_at(cdb, 4))
    };
    // None of our pages has subpages: subpage 0 is the page itself, FFh "and all subpages".
    if subpage != 0 && subpage != 0xFF {
        return Err(Sense::invalid_cdb_field(3, None));
    }
    let codes = match code {
        ALL_PAGES => PAGES.to_vec(),
        c if PAGES.contains(&c) => vec![c],
        _ => return Err(Sense::invalid_cdb_field(2, Some(5))),
    };
    let mut pages = Vec::new();
    for c in codes {
        pages.extend(page(c, pc, &ctx.params).unwrap_or_default());
    }

    let mut descriptor = Vec::new();
    if !dbd {
        // Nothing in the block descriptor is changeable.
        let (blocks, block_size) = match pc {
            PageControl::Changeable => (0, 0),
            _ => (ctx.blocks, ctx.block_size),
        };
        if llbaa {
            descriptor.extend_from_slice(&blocks.to_be_bytes());
            descriptor.extend_from_slice(&[0; 4]);
            descriptor.extend_from_slice(&block_size.to_be_bytes());
        } else {
            let short = u32::try_from(blocks).unwrap_or(u32::MAX);
            descriptor.extend_from_slice(&short.to_be_bytes());
            descriptor.push(0);
            descriptor.extend_from_slice(&block_size.to_be_bytes()[1..]);
        }
    }
    // Device-specific parameter: WP, DPOFUA (DPO and FUA are accepted).
    let device_specific = if ctx.write_protected { 0x80 } else { 0 } | 0x10;
    let mut data = Vec::new();
    let total = descriptor.len() + pages.len() + if ten { 8 } else { 4 };
    if ten {
        data.extend_from_slice(&((total - 2) as u16).to_be_bytes());
        data.extend_from_slice(&[0, device_specific, u8::from(llbaa), 0]);
        data.extend_from_slice(&(descriptor.len() as u16).to_be_bytes());
    } else {
        // At most 4 + 8 + 44 bytes: always fits the one-byte length.
        data.extend_from_slice(&[
            (total - 1) as u8,
            0,
            device_specific,
            descriptor.len() as u8,
        ]);
    }
    data.extend_from_slice(&descriptor);
    data.extend_from_slice(&pages);
    data.truncate(allocation_length);
    Ok(data)
}

/// MODE SELECT (6) when `ten` is false, MODE SELECT (10) otherwise. `data` is the parameter
/// list as received. Returns the parameters to apply; nothing changes unless every page is
/// valid.
pub(crate) fn mode_select(
    cdb: &[u8],
    ten: bool,
    data: &[u8],
    current: &ModeParams,
    block_size: u32,
    blocks: u64,
) -> Result<ModeParams, Sense> {
    if u8_at(cdb, 1) & 0x10 == 0 {
        // Only the page format is defined for direct-access devices.
        return Err(Sense::invalid_cdb_field(1, Some(4)));
    }
    if u8_at(cdb, 1) & 0x01 != 0 {
        // SP: saving parameters is not supported.
        return Err(Sense::invalid_cdb_field(1, Some(0)));
    }
    let list_len = if ten {
        usize::from(be16(cdb, 7))
    } else {
        usize::from(u8_at(cdb, 4))
    };
    if list_len == 0 {
        return Ok(*current);
    }
    let data = data.get(..list_len).unwrap_or(data);
    let header = if ten { 8 } else { 4 };
    if data.len() < header {
        return Err(Sense::param_list_length_error());
    }
    let medium_type_at = if ten { 2 } else { 1 };
    if u8_at(data, medium_type_at) != 0 {
        return Err(Sense::invalid_param_field(medium_type_at, None));
    }
    let long_lba = ten && u8_at(data, 4) & 0x01 != 0;
    let (bd_len, bd_len_at) = if ten {
        (usize::from(be16(data, 6)), 6)
    } else {
        (usize::from(u8_at(data, 3)), 3)
    };
    let expected_bd = if long_lba { 16 } else { 8 };
    if bd_len != 0 && bd_len != expected_bd {
        return Err(Sense::invalid_param_field(bd_len_at, None));
    }
    if data.len() < header + bd_len {
        return Err(Sense::param_list_length_error());
    }
    if bd_len != 0 {
        check_block_descriptor(
            &data[header..header + bd_len],
            header,
            long_lba,
            block_size,
            blocks,
        )?;
    }

    let mut next = *current;
    let mut at = header + bd_len;
    while at < data.len() {
        let Some(&[code_byte, len]) = data
            .get(at..at + 2)
            .and_then(|s| <&[u8; 2]>::try_from(s).ok())
        else {
            return Err(Sense::param_list_length_error());
        };
        if code_byte & 0x40 != 0 {
            // SPF: none of our pages has subpages.
            return Err(Sense::invalid_param_field(at, Some(6)));
        }
        let code = code_byte & 0x3F;
        let Some(ours) = page(code, PageControl::Current, current) else {
            return Err(Sense::invalid_param_field(at, Some(5)));
        };
        let changeable = page(code, PageControl::Changeable, current).unwrap_or_default();
        if usize::from(len) != ours.len() - 2 {
            return Err(Sense::invalid_param_field(at + 1, None));
        }
        let Some(theirs) = data.get(at..at + ours.len()) else {
            return Err(Sense::param_list_length_error());
        };
        for (i, ((&t, &o), &c)) in theirs
            .iter()
            .zip(&ours)
            .zip(&changeable)
            .enumerate()
            .skip(2)
        {
            let stray = (t ^ o) & !c;
            if stray != 0 {
                return Err(Sense::invalid_param_field(
                    at + i,
                    Some(7 - stray.leading_zeros() as u8),
                ));
            }
        }
        match code {
            CACHING => next.wce = theirs[2] & 0x04 != 0,
            CONTROL => next.swp = theirs[4] & 0x08 != 0,
            _ => {}
        }
        at += ours.len();
    }
    Ok(next)
}

/// A block descriptor in MODE SELECT may only restate the current geometry (or leave the
/// number of blocks zero): formatting to another block size is not supported.
fn check_block_descriptor(
    bd: &[u8],
    at: usize,
    long_lba: bool,
    block_size: u32,
    blocks: u64,
) -> Result<(), Sense> {
    let (count, count_ok, len, len_at) = if long_lba {
        let count = super::cdb::be64(bd, 0);
        (count, count == blocks, super::cdb::be32(bd, 12), at + 12)
    } else {
        let count = u64::from(super::cdb::be32(bd, 0));
        let capped = blocks.min(u64::from(u32::MAX));
        (count, count == capped, super::cdb::be24(bd, 5), at + 5)
    };
    if count != 0 && !count_ok {
        return Err(Sense::invalid_param_field(at, None));
    }
    if len != block_size {
        return Err(Sense::invalid_param_field(len_at, None));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx() -> ModeSenseContext {
        ModeSenseContext {
            params: ModeParams::default(),
            block_size: 512,
            blocks: 1 << 33,
            write_protected: false,
        }
    }

    fn sense6(dbd: bool, pc: u8, page: u8, sub: u8, alloc: u8) -> Result<Vec<u8>, Sense> {
        mode_sense(
            &[
                0x1A,
                if dbd { 8 } else { 0 },
                (pc << 6) | page,
                sub,
                alloc,
                0,
            ],
            false,
            &ctx(),
        )
    }

    #[test]
    fn all_pages_with_block_descriptor() {
        let d = sense6(false, 0, 0x3F, 0, 255).unwrap();
        assert_eq!(usize::from(d[0]), d.len() - 1);
        assert_eq!(d[2], 0x10);
        assert_eq!(d[3], 8);
        assert_eq!(&d[4..8], &[0xFF; 4]);
        assert_eq!(&d[9..12], &[0, 2, 0]);
        assert_eq!((d[12], d[13], d[14] & 0x04), (0x08, 0x12, 0x04));
        assert_eq!((d[32], d[44]), (0x0A, 0x1C));
        assert_eq!(d.len(), 4 + 8 + 20 + 12 + 12);
        assert_eq!(sense6(false, 0, 0x3F, 0xFF, 255).unwrap(), d);
        assert_eq!(sense6(false, 0, 0x3F, 0, 4).unwrap(), d[..4].to_vec());
    }

    #[test]
    fn page_control_and_errors() {
        let d = sense6(true, 1, 0x0A, 0, 255).unwrap();
        assert_eq!(d.len(), 4 + 12);
        assert_eq!(d[4 + 4], 0x08);
        assert_eq!(d[4 + 2], 0);
        assert_eq!(
            sense6(true, 3, 0x0A, 0, 255).unwrap_err().asc,
            Asc::SAVING_PARAMETERS_NOT_SUPPORTED
        );
        assert_eq!(
            sense6(true, 0, 0x0A, 1, 255).unwrap_err().asc,
            Asc::INVALID_FIELD_IN_CDB
        );
        assert_eq!(
            sense6(true, 0, 0x19, 0, 255).unwrap_err().asc,
            Asc::INVALID_FIELD_IN_CDB
        );
    }

    #[test]
    fn mode_sense_10_long_lba() {
        let d = mode_sense(&[0x5A, 0x10, 0x08, 0, 0, 0, 0, 1, 0, 0], true, &ctx()).unwrap();
        assert_eq!(usize::from(be16(&d, 0)), d.len() - 2);
        assert_eq!(d[4], 1);
        assert_eq!(be16(&d, 6), 16);
        assert_eq!(super::super::cdb::be64(&d, 8), 1 << 33);
        assert_eq!(d[24], 0x08);
    }

    fn select(page: &[u8], bd: &[u8]) -> Result<ModeParams, Sense> {
        let mut data = vec![0, 0, 0, bd.len() as u8];
        data.extend_from_slice(bd);
        data.extend_from_slice(page);
        let cdb = [0x15, 0x10, 0, 0, data.len() as u8, 0];
        mode_select(&cdb, false, &data, &ModeParams::default(), 512, 1000)
    }

    #[test]
    fn select_changes_only_changeable_bits() {
        let mut control = page(CONTROL, PageControl::Current, &ModeParams::default()).unwrap();
        control[4] |= 0x08;
        assert!(select(&control, &[]).unwrap().swp);
        let mut caching = page(CACHING, PageControl::Current, &ModeParams::default()).unwrap();
        caching[2] &= !0x04;
        assert!(!select(&caching, &[]).unwrap().wce);
        caching[2] |= 0x01; // RCD is not changeable
        let e = select(&caching, &[]).unwrap_err();
        assert_eq!(e.asc, Asc::INVALID_FIELD_IN_PARAMETER_LIST);
        assert_eq!(e.key_specific, Some([0x88, 0, 4 + 2]));
        let bd = [0, 0, 0x03, 0xE8, 0, 0, 2, 0];
        assert!(select(&control, &bd).is_ok());
        let bd = [0, 0, 0, 0, 0, 0, 0x10, 0];
        assert!(select(&control, &bd).is_err());
        assert!(select(&control[..5], &[]).is_err());
        assert!(select(&[0x19, 0x02, 0, 0], &[]).is_err());
    }

    #[test]
    fn select_cdb_checks() {
        let p = ModeParams::default();
        assert!(mode_select(&[0x15, 0x00, 0, 0, 0, 0], false, &[], &p, 512, 1).is_err());
        assert!(mode_select(&[0x15, 0x11, 0, 0, 0, 0], false, &[], &p, 512, 1).is_err());
        assert_eq!(
            mode_select(&[0x15, 0x10, 0, 0, 0, 0], false, &[], &p, 512, 1).unwrap(),
            p
        );
        let e = mode_select(&[0x15, 0x10, 0, 0, 3, 0], false, &[0, 0, 0], &p, 512, 1).unwrap_err();
        assert_eq!(e.asc, Asc::PARAMETER_LIST_LENGTH_ERROR);
    }
}
