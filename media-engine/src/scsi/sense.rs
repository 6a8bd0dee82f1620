//! Sense data (SPC-4 4.5): why a command ended in CHECK CONDITION, in the fixed format the
//! transport sends with the status, or the descriptor format REQUEST SENSE may ask for.

/// Sense keys (SPC-4 table 27).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum SenseKey {
    NoSense = 0x0,
    RecoveredError = 0x1,
    NotReady = 0x2,
    MediumError = 0x3,
    HardwareError = 0x4,
    IllegalRequest = 0x5,
    UnitAttention = 0x6,
    DataProtect = 0x7,
    BlankCheck = 0x8,
    VendorSpecific = 0x9,
    CopyAborted = 0xA,
    AbortedCommand = 0xB,
    VolumeOverflow = 0xD,
    Miscompare = 0xE,
}

/// An additional sense code and its qualifier (ASC/ASCQ, SPC-4 table D.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Asc(pub u8, pub u8);

impl Asc {
    pub const NO_ADDITIONAL_SENSE: Asc = Asc(0x00, 0x00);
    pub const LUN_NOT_READY: Asc = Asc(0x04, 0x00);
    pub const SANITIZE_IN_PROGRESS: Asc = Asc(0x04, 0x1B);
    pub const UNREACHABLE_COPY_TARGET: Asc = Asc(0x08, 0x04);
    pub const WRITE_ERROR: Asc = Asc(0x0C, 0x00);
    pub const COPY_TARGET_DEVICE_NOT_REACHABLE: Asc = Asc(0x0D, 0x02);
    pub const INVALID_FIELD_IN_INFORMATION_UNIT: Asc = Asc(0x0E, 0x03);
    pub const UNRECOVERED_READ_ERROR: Asc = Asc(0x11, 0x00);
    pub const PARAMETER_LIST_LENGTH_ERROR: Asc = Asc(0x1A, 0x00);
    pub const MISCOMPARE_DURING_VERIFY: Asc = Asc(0x1D, 0x00);
    pub const INVALID_COMMAND_OPERATION_CODE: Asc = Asc(0x20, 0x00);
    pub const LBA_OUT_OF_RANGE: Asc = Asc(0x21, 0x00);
    pub const INVALID_FIELD_IN_CDB: Asc = Asc(0x24, 0x00);
    pub const LUN_NOT_SUPPORTED: Asc = Asc(0x25, 0x00);
    pub const INVALID_FIELD_IN_PARAMETER_LIST: Asc = Asc(0x26, 0x00);
    pub const INVALID_RELEASE_OF_PERSISTENT_RESERVATION: Asc = Asc(0x26, 0x04);
    pub const TOO_MANY_TARGET_DESCRIPTORS: Asc = Asc(0x26, 0x06);
    pub const UNSUPPORTED_TARGET_DESCRIPTOR_TYPE_CODE: Asc = Asc(0x26, 0x07);
    pub const TOO_MANY_SEGMENT_DESCRIPTORS: Asc = Asc(0x26, 0x08);
    pub const UNSUPPORTED_SEGMENT_DESCRIPTOR_TYPE_CODE: Asc = Asc(0x26, 0x09);
    pub const WRITE_PROTECTED: Asc = Asc(0x27, 0x00);
    pub const SOFTWARE_WRITE_PROTECTED: Asc = Asc(0x27, 0x02);
    pub const SPACE_ALLOCATION_FAILED_WRITE_PROTECT: Asc = Asc(0x27, 0x07);
    pub const POWER_ON_RESET_OR_BUS_DEVICE_RESET: Asc = Asc(0x29, 0x00);
    pub const BUS_DEVICE_RESET_FUNCTION_OCCURRED: Asc = Asc(0x29, 0x03);
    pub const MODE_PARAMETERS_CHANGED: Asc = Asc(0x2A, 0x01);
    pub const RESERVATIONS_PREEMPTED: Asc = Asc(0x2A, 0x03);
    pub const RESERVATIONS_RELEASED: Asc = Asc(0x2A, 0x04);
    pub const REGISTRATIONS_PREEMPTED: Asc = Asc(0x2A, 0x05);
    pub const CAPACITY_DATA_HAS_CHANGED: Asc = Asc(0x2A, 0x09);
    pub const SANITIZE_COMMAND_FAILED: Asc = Asc(0x31, 0x03);
    pub const SAVING_PARAMETERS_NOT_SUPPORTED: Asc = Asc(0x39, 0x00);
    pub const MEDIUM_NOT_PRESENT: Asc = Asc(0x3A, 0x00);
    pub const INTERNAL_TARGET_FAILURE: Asc = Asc(0x44, 0x00);
    pub const MEDIUM_REMOVAL_PREVENTED: Asc = Asc(0x53, 0x02);
    pub const INSUFFICIENT_REGISTRATION_RESOURCES: Asc = Asc(0x55, 0x04);
}

/// One sense condition. Serialise it with [`Sense::to_fixed`] (what CHECK CONDITION carries)
/// or [`Sense::to_descriptor`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sense {
    pub key: SenseKey,
    pub asc: Asc,
    /// INFORMATION field: the first failing LBA or, for a miscompare, the byte offset.
    pub information: Option<u64>,
    /// Sense-key specific bytes (SKSV already set), e.g. the field pointer of an invalid field.
    pub key_specific: Option<[u8; 3]>,
}

/// Fixed-format sense data is 18 bytes long (additional sense length 10).
pub const FIXED_SENSE_LEN: usize = 18;

impl Sense {
    pub const fn new(key: SenseKey, asc: Asc) -> Sense {
        Sense {
            key,
            asc,
            information: None,
            key_specific: None,
        }
    }

    pub const fn with_information(mut self, information: u64) -> Sense {
        self.information = Some(information);
        self
    }

    /// Points at the offending byte (and bit, when the field does not start at bit 0) of the
    /// CDB (`in_cdb`) or of the parameter list (SPC-4 4.5.2.4.2).
    pub const fn with_field_pointer(mut self, in_cdb: bool, byte: usize, bit: Option<u8>) -> Sense {
        let mut flags = 0x80; // SKSV
        if in_cdb {
            flags |= 0x40; // C/D
        }
        if let Some(bit) = bit {
            flags |= 0x08 | (bit & 0x07); // BPV + bit pointer
        }
        let byte = if byte > 0xFFFF { 0xFFFF } else { byte as u16 };
        self.key_specific = Some([flags, (byte >> 8) as u8, byte as u8]);
        self
    }

    /// Progress indication (SPC-4 4.5.2.4.4): `done` of 65536, e.g. of a sanitize operation.
    pub const fn with_progress(mut self, done: u16) -> Sense {
        let [hi, lo] = done.to_be_bytes();
        self.key_specific = Some([0x80, hi, lo]);
        self
    }

    pub const fn illegal_request(asc: Asc) -> Sense {
        Sense::new(SenseKey::IllegalRequest, asc)
    }

    pub const fn invalid_opcode() -> Sense {
        Sense::illegal_request(Asc::INVALID_COMMAND_OPERATION_CODE)
            .with_field_pointer(true, 0, None)
    }

    /// INVALID FIELD IN CDB pointing at `byte` (and `bit`) of the CDB.
    pub const fn invalid_cdb_field(byte: usize, bit: Option<u8>) -> Sense {
        Sense::illegal_request(Asc::INVALID_FIELD_IN_CDB).with_field_pointer(true, byte, bit)
    }

    /// INVALID FIELD IN PARAMETER LIST pointing at `byte` (and `bit`) of the parameter data.
    pub const fn invalid_param_field(byte: usize, bit: Option<u8>) -> Sense {
        Sense::illegal_request(Asc::INVALID_FIELD_IN_PARAMETER_LIST)
            .with_field_pointer(false, byte, bit)
    }

    pub const fn param_list_length_error() -> Sense {
        Sense::illegal_request(Asc::PARAMETER_LIST_LENGTH_ERROR)
    }

    pub const fn lba_out_of_range() -> Sense {
        Sense::illegal_request(Asc::LBA_OUT_OF_RANGE)
    }

    pub const fn lun_not_supported() -> Sense {
        Sense::illegal_request(Asc::LUN_NOT_SUPPORTED)
    }

    /// A compare failed; `offset` is the offset of the first differing byte.
    pub const fn miscompare(offset: u64) -> Sense {
        Sense::new(SenseKey::Miscompare, Asc::MISCOMPARE_DURING_VERIFY).with_information(offset)
    }

    pub const fn unit_attention(asc: Asc) -> Sense {
        Sense::new(SenseKey::UnitAttention, asc)
    }

    pub const fn no_sense() -> Sense {
        Sense::new(SenseKey::NoSense, Asc::NO_ADDITIONAL_SENSE)
    }

    /// Fixed-format sense data (response code 70h, SPC-4 4.5.3). The INFORMATION field holds
    /// 4 bytes; a larger value is reported with VALID cleared (the descriptor format has room).
    pub fn to_fixed(&self) -> [u8; FIXED_SENSE_LEN] {
        let mut out = [0u8; FIXED_SENSE_LEN];
        out[0] = 0x70;
        if let Some(info) = self.information
            && let Ok(info) = u32::try_from(info)
        {
            out[0] |= 0x80; // VALID
            out[3..7].copy_from_slice(&info.to_be_bytes());
        }
        out[2] = self.key as u8;
        out[7] = (FIXED_SENSE_LEN - 8) as u8;
        out[12] = self.asc.0;
        out[13] = self.asc.1;
        if let Some(sks) = self.key_specific {
            out[15..18].copy_from_slice(&sks);
        }
        out
    }

    /// Descriptor-format sense data (response code 72h, SPC-4 4.5.2) with an information
    /// descriptor and a sense-key specific descriptor when those are present.
    pub fn to_descriptor(&self) -> Vec<u8> {
        let mut out = vec![0x72, self.key as u8, self.asc.0, self.asc.1, 0, 0, 0, 0];
        if let Some(info) = self.information {
            out.extend_from_slice(&[0x00, 0x0A, 0x80, 0x00]);
            out.extend_from_slice(&info.to_be_bytes());
        }
        if let Some(sks) = self.key_specific {
            out.extend_from_slice(&[0x02, 0x06, 0x00, 0x00]);
            out.extend_from_slice(&sks);
            out.push(0);
        }
        // At most 8 + 12 + 8 bytes, so the additional length always fits.
        out[7] = (out.len() - 8) as u8;
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fixed_format_layout() {
        let s = Sense::invalid_cdb_field(2, Some(5)).with_information(0x1234);
        let b = s.to_fixed();
        assert_eq!(b[0], 0xF0);
        assert_eq!(b[2], 0x05);
        assert_eq!(&b[3..7], &[0, 0, 0x12, 0x34]);
        assert_eq!(b[7], 10);
        assert_eq!((b[12], b[13]), (0x24, 0x00));
        assert_eq!(&b[15..18], &[0x80 | 0x40 | 0x08 | 5, 0, 2]);
    }

    #[test]
    fn fixed_format_clears_valid_for_wide_information() {
        let b = Sense::miscompare(1 << 40).to_fixed();
        assert_eq!(b[0], 0x70);
        assert_eq!(b[2], 0x0E);
        assert_eq!((b[12], b[13]), (0x1D, 0x00));
    }

    #[test]
    fn descriptor_format_layout() {
        let d = Sense::miscompare(7).to_descriptor();
        assert_eq!(&d[..4], &[0x72, 0x0E, 0x1D, 0x00]);
        assert_eq!(d[7] as usize, d.len() - 8);
        assert_eq!(&d[8..12], &[0x00, 0x0A, 0x80, 0x00]);
        assert_eq!(d[19], 7);
        let d = Sense::invalid_param_field(300, None).to_descriptor();
        assert_eq!(&d[8..15], &[0x02, 0x06, 0, 0, 0x80, 0x01, 0x2C]);
    }
}
