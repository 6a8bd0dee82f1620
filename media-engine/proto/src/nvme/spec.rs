//! NVMe command and completion layouts (NVMe Base 1.4, NVMe-oF 1.1): the 64-byte submission
//! queue entry, the 16-byte completion, status codes and opcodes. Transport-independent.

/// A submission queue entry, as the host sent it.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Sqe(pub [u8; 64]);

impl std::fmt::Debug for Sqe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sqe")
            .field("opcode", &format_args!("{:#04x}", self.opcode()))
            .field("cid", &self.cid())
            .field("nsid", &self.nsid())
            .finish()
    }
}

pub fn le16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}
pub fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}
pub fn le64(b: &[u8], at: usize) -> u64 {
    u64::from(le32(b, at)) | (u64::from(le32(b, at + 4)) << 32)
}
pub fn put16(b: &mut [u8], at: usize, v: u16) {
    b[at..at + 2].copy_from_slice(&v.to_le_bytes());
}
pub fn put32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}
pub fn put64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_le_bytes());
}
/// Copies an ASCII string into a fixed field, padded with `pad`.
pub fn put_str(b: &mut [u8], at: usize, len: usize, s: &str, pad: u8) {
    let field = &mut b[at..at + len];
    field.fill(pad);
    let n = s.len().min(len);
    field[..n].copy_from_slice(&s.as_bytes()[..n]);
}
/// A NUL-padded ASCII field as a string (up to the first NUL, trailing spaces trimmed).
pub fn get_str(b: &[u8]) -> String {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    String::from_utf8_lossy(&b[..end]).trim_end().to_string()
}

/// Where a command's data is (the SGL descriptor in DPTR; NVMe over fabrics uses SGLs only).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DataPointer {
    /// No data.
    None,
    /// In the capsule, at this offset, this long.
    InCapsule { offset: u64, len: u32 },
    /// Moved by the transport (TCP: H2CData after R2T, or C2HData), this long.
    Transport { len: u32 },
    /// A descriptor this target does not take.
    Unsupported,
}

/// SGL identifier: Data Block descriptor, offset subtype (in-capsule data).
pub const SGL_DATA_OFFSET: u8 = 0x01;
/// SGL identifier: Transport SGL Data Block, transport-specific subtype A (NVMe/TCP).
pub const SGL_TRANSPORT_DATA: u8 = 0x5A;

impl Sqe {
    pub fn new(opcode: u8, cid: u16, nsid: u32) -> Sqe {
        let mut b = [0u8; 64];
        b[0] = opcode;
        put16(&mut b, 2, cid);
        put32(&mut b, 4, nsid);
        Sqe(b)
    }
    /// A Read, Write or Write Zeroes of `blocks` (1 to 65536) blocks from `slba` (host side).
    pub fn block_io(opcode: u8, cid: u16, nsid: u32, slba: u64, blocks: u32) -> Sqe {
        let mut s = Sqe::new(opcode, cid, nsid);
        s.set_cdw(10, slba as u32);
        s.set_cdw(11, (slba >> 32) as u32);
        s.set_cdw(12, blocks.saturating_sub(1) & 0xffff);
        s
    }
    /// Starting LBA of a Read, Write or Write Zeroes (CDW10-11).
    pub fn slba(&self) -> u64 {
        u64::from(self.cdw(10)) | (u64::from(self.cdw(11)) << 32)
    }
    /// Number of blocks of a Read, Write or Write Zeroes (CDW12 bits 15:0 are 0-based).
    pub fn blocks(&self) -> u64 {
        u64::from(self.cdw(12) & 0xffff) + 1
    }
    pub fn opcode(&self) -> u8 {
        self.0[0]
    }
    /// FUSE bits (0 = normal; fused operations are refused).
    pub fn fuse(&self) -> u8 {
        self.0[1] & 0x03
    }
    pub fn cid(&self) -> u16 {
        le16(&self.0, 2)
    }
    pub fn set_cid(&mut self, cid: u16) {
        put16(&mut self.0, 2, cid);
    }
    pub fn nsid(&self) -> u32 {
        le32(&self.0, 4)
    }
    /// Fabrics command type (byte 4, where other commands have the NSID).
    pub fn fctype(&self) -> u8 {
        self.0[4]
    }
    /// Command dword `n` (10..=15).
    pub fn cdw(&self, n: usize) -> u32 {
        le32(&self.0, n * 4)
    }
    pub fn set_cdw(&mut self, n: usize, v: u32) {
        put32(&mut self.0, n * 4, v);
    }
    pub fn data_pointer(&self) -> DataPointer {
        let addr = le64(&self.0, 24);
        let len = le32(&self.0, 32);
        if len == 0 {
            return DataPointer::None;
        }
        match self.0[39] {
            SGL_DATA_OFFSET => DataPointer::InCapsule { offset: addr, len },
            SGL_TRANSPORT_DATA => DataPointer::Transport { len },
            _ => DataPointer::Unsupported,
        }
    }
    /// Sets DPTR to an SGL descriptor (host side).
    pub fn set_data_pointer(&mut self, dp: DataPointer) {
        let b = &mut self.0;
        b[24..40].fill(0);
        match dp {
            DataPointer::None => {
                b[39] = SGL_TRANSPORT_DATA;
            }
            DataPointer::InCapsule { offset, len } => {
                put64(b, 24, offset);
                put32(b, 32, len);
                b[39] = SGL_DATA_OFFSET;
            }
            DataPointer::Transport { len } => {
                put32(b, 32, len);
                b[39] = SGL_TRANSPORT_DATA;
            }
            DataPointer::Unsupported => b[39] = 0xff,
        }
    }
    /// Which way the command's data goes, from the opcode (fabrics: from the fctype).
    pub fn direction(&self) -> Direction {
        let bits = if self.opcode() == admin::FABRICS {
            self.fctype()
        } else {
            self.opcode()
        };
        match bits & 0x03 {
            0 => Direction::None,
            1 => Direction::HostToController,
            2 => Direction::ControllerToHost,
            _ => Direction::Both,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    None,
    HostToController,
    ControllerToHost,
    Both,
}

/// A completion status: status code type, status code and Do Not Retry.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Status {
    pub sct: u8,
    pub sc: u8,
    pub dnr: bool,
}

impl std::fmt::Debug for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Status({:#x}/{:#04x}", self.sct, self.sc)?;
        if self.dnr {
            write!(f, " dnr")?;
        }
        write!(f, ")")
    }
}

impl Status {
    const fn generic(sc: u8) -> Status {
        Status {
            sct: 0,
            sc,
            dnr: true,
        }
    }
    const fn specific(sc: u8) -> Status {
        Status {
            sct: 1,
            sc,
            dnr: true,
        }
    }
    const fn media(sc: u8) -> Status {
        Status {
            sct: 2,
            sc,
            dnr: true,
        }
    }
    pub const SUCCESS: Status = Status {
        sct: 0,
        sc: 0,
        dnr: false,
    };
    pub const INVALID_OPCODE: Status = Status::generic(0x01);
    pub const INVALID_FIELD: Status = Status::generic(0x02);
    pub const CID_CONFLICT: Status = Status::generic(0x03);
    pub const DATA_TRANSFER_ERROR: Status = Status::generic(0x04);
    pub const INTERNAL_ERROR: Status = Status {
        dnr: false,
        ..Status::generic(0x06)
    };
    pub const ABORT_REQUESTED: Status = Status::generic(0x07);
    pub const INVALID_NAMESPACE: Status = Status::generic(0x0B);
    pub const COMMAND_SEQUENCE_ERROR: Status = Status::generic(0x0C);
    pub const SGL_LENGTH_INVALID: Status = Status::generic(0x0F);
    pub const SGL_TYPE_INVALID: Status = Status::generic(0x11);
    pub const NAMESPACE_WRITE_PROTECTED: Status = Status::generic(0x20);
    pub const LBA_OUT_OF_RANGE: Status = Status::generic(0x80);
    pub const CAPACITY_EXCEEDED: Status = Status::generic(0x81);
    pub const NAMESPACE_NOT_READY: Status = Status {
        dnr: false,
        ..Status::generic(0x82)
    };
    pub const AER_LIMIT_EXCEEDED: Status = Status::specific(0x05);
    pub const INVALID_LOG_PAGE: Status = Status::specific(0x09);
    pub const FEATURE_NOT_SAVEABLE: Status = Status::specific(0x0D);
    pub const FEATURE_NOT_CHANGEABLE: Status = Status::specific(0x0E);
    pub const CONNECT_INCOMPATIBLE_FORMAT: Status = Status::specific(0x80);
    pub const CONNECT_CONTROLLER_BUSY: Status = Status::specific(0x81);
    pub const CONNECT_INVALID_PARAMETERS: Status = Status::specific(0x82);
    pub const CONNECT_INVALID_HOST: Status = Status::specific(0x84);
    /// A command other than Authentication Send/Receive on a queue that must authenticate
    /// first (NVMe over Fabrics: Authentication Required).
    pub const AUTH_REQUIRED: Status = Status::specific(0x91);
    pub const WRITE_FAULT: Status = Status::media(0x80);
    pub const UNRECOVERED_READ_ERROR: Status = Status::media(0x81);

    pub fn is_success(&self) -> bool {
        self.sct == 0 && self.sc == 0
    }
    /// The status field of a completion (bits 15:1; phase bit 0 is always 0 over fabrics).
    pub fn to_field(self) -> u16 {
        (u16::from(self.sc) << 1) | (u16::from(self.sct & 7) << 9) | (u16::from(self.dnr) << 15)
    }
    pub fn from_field(f: u16) -> Status {
        Status {
            sc: (f >> 1) as u8,
            sct: ((f >> 9) & 7) as u8,
            dnr: f & 0x8000 != 0,
        }
    }
}

/// A completion queue entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cqe {
    pub dw0: u32,
    pub dw1: u32,
    pub sqhd: u16,
    pub sqid: u16,
    pub cid: u16,
    pub status: Status,
}

impl Cqe {
    pub fn encode(&self) -> [u8; 16] {
        let mut b = [0u8; 16];
        put32(&mut b, 0, self.dw0);
        put32(&mut b, 4, self.dw1);
        put16(&mut b, 8, self.sqhd);
        put16(&mut b, 10, self.sqid);
        put16(&mut b, 12, self.cid);
        put16(&mut b, 14, self.status.to_field());
        b
    }
    pub fn decode(b: &[u8; 16]) -> Cqe {
        Cqe {
            dw0: le32(b, 0),
            dw1: le32(b, 4),
            sqhd: le16(b, 8),
            sqid: le16(b, 10),
            cid: le16(b, 12),
            status: Status::from_field(le16(b, 14)),
        }
    }
}

/// What a command produced: its status, the completion's dwords 0 and 1, and data for the
/// host (a read, an Identify, a log page), never longer than the command asked for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Completion {
    pub status: Status,
    pub dw0: u32,
    pub dw1: u32,
    pub data: Option<std::sync::Arc<Vec<u8>>>,
}

impl Completion {
    pub fn status(status: Status) -> Completion {
        Completion {
            status,
            dw0: 0,
            dw1: 0,
            data: None,
        }
    }
    pub fn ok() -> Completion {
        Completion::status(Status::SUCCESS)
    }
    pub fn dw0(dw0: u32) -> Completion {
        Completion {
            dw0,
            ..Completion::ok()
        }
    }
    pub fn data(data: Vec<u8>) -> Completion {
        Completion {
            data: Some(std::sync::Arc::new(data)),
            ..Completion::ok()
        }
    }
}

/// Admin command opcodes.
pub mod admin {
    pub const GET_LOG_PAGE: u8 = 0x02;
    pub const IDENTIFY: u8 = 0x06;
    pub const ABORT: u8 = 0x08;
    pub const SET_FEATURES: u8 = 0x09;
    pub const GET_FEATURES: u8 = 0x0A;
    pub const ASYNC_EVENT_REQUEST: u8 = 0x0C;
    pub const KEEP_ALIVE: u8 = 0x18;
    pub const FABRICS: u8 = 0x7F;
}

/// NVM command set opcodes.
pub mod io {
    pub const FLUSH: u8 = 0x00;
    pub const WRITE: u8 = 0x01;
    pub const READ: u8 = 0x02;
    pub const WRITE_ZEROES: u8 = 0x08;
    pub const DATASET_MANAGEMENT: u8 = 0x09;
}

/// Fabrics command types (byte 4 of a fabrics command).
pub mod fctype {
    pub const PROPERTY_SET: u8 = 0x00;
    pub const CONNECT: u8 = 0x01;
    pub const PROPERTY_GET: u8 = 0x04;
    pub const AUTH_SEND: u8 = 0x05;
    pub const AUTH_RECEIVE: u8 = 0x06;
    pub const DISCONNECT: u8 = 0x08;
}

/// Controller properties (register offsets).
pub mod prop {
    pub const CAP: u32 = 0x00;
    pub const VS: u32 = 0x08;
    pub const CC: u32 = 0x14;
    pub const CSTS: u32 = 0x1C;
    pub const NSSR: u32 = 0x20;
}

/// Feature identifiers.
pub mod feature {
    pub const ARBITRATION: u8 = 0x01;
    pub const POWER_MANAGEMENT: u8 = 0x02;
    pub const TEMPERATURE_THRESHOLD: u8 = 0x04;
    pub const ERROR_RECOVERY: u8 = 0x05;
    pub const VOLATILE_WRITE_CACHE: u8 = 0x06;
    pub const NUMBER_OF_QUEUES: u8 = 0x07;
    pub const INTERRUPT_COALESCING: u8 = 0x08;
    pub const WRITE_ATOMICITY: u8 = 0x0A;
    pub const ASYNC_EVENT_CONFIG: u8 = 0x0B;
    pub const KEEP_ALIVE_TIMER: u8 = 0x0F;
    pub const HOST_IDENTIFIER: u8 = 0x81;
}

/// Log page identifiers.
pub mod log {
    pub const ERROR: u8 = 0x01;
    pub const SMART: u8 = 0x02;
    pub const FIRMWARE_SLOT: u8 = 0x03;
    pub const CHANGED_NAMESPACES: u8 = 0x04;
    pub const COMMANDS_SUPPORTED: u8 = 0x05;
    pub const DISCOVERY: u8 = 0x70;
}

/// The well-known NQN of discovery controllers.
pub const DISCOVERY_NQN: &str = "nqn.2014-08.org.nvmexpress.discovery";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_field_round_trips() {
        for s in [
            Status::SUCCESS,
            Status::INVALID_FIELD,
            Status::CONNECT_INVALID_HOST,
            Status::UNRECOVERED_READ_ERROR,
            Status::INTERNAL_ERROR,
        ] {
            assert_eq!(Status::from_field(s.to_field()), s);
        }
        // Connect Invalid Host: SCT 1, SC 0x84, DNR.
        assert_eq!(
            Status::CONNECT_INVALID_HOST.to_field(),
            0x8000 | (1 << 9) | (0x84 << 1)
        );
    }

    #[test]
    fn cqe_round_trips() {
        let c = Cqe {
            dw0: 0xdead_beef,
            dw1: 7,
            sqhd: 3,
            sqid: 1,
            cid: 0x1234,
            status: Status::LBA_OUT_OF_RANGE,
        };
        assert_eq!(Cqe::decode(&c.encode()), c);
    }

    #[test]
    fn data_pointer_round_trips_and_direction_follows_the_opcode() {
        let mut s = Sqe::new(io::WRITE, 9, 1);
        for dp in [
            DataPointer::None,
            DataPointer::InCapsule {
                offset: 0,
                len: 4096,
            },
            DataPointer::Transport { len: 1 << 20 },
        ] {
            s.set_data_pointer(dp);
            assert_eq!(s.data_pointer(), dp);
        }
        assert_eq!(s.direction(), Direction::HostToController);
        assert_eq!(
            Sqe::new(io::READ, 1, 1).direction(),
            Direction::ControllerToHost
        );
        assert_eq!(Sqe::new(io::FLUSH, 1, 1).direction(), Direction::None);
        let mut connect = Sqe::new(admin::FABRICS, 1, 0);
        connect.0[4] = fctype::CONNECT;
        assert_eq!(connect.direction(), Direction::HostToController);
    }
}
