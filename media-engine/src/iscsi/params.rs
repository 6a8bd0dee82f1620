//! Operational parameters: our limits, RFC defaults, and the negotiated result of one session.

/// Our MaxRecvDataSegmentLength: the largest data segment we accept in one PDU.
pub const OUR_MAX_RECV_DATA: u32 = 262_144;
/// Largest MaxBurstLength we agree to (2^24 - 1024, the largest multiple of 1 KiB allowed).
pub const OUR_MAX_BURST: u32 = 16_776_192;
/// Largest FirstBurstLength we agree to: unsolicited data we must buffer without asking.
pub const OUR_FIRST_BURST: u32 = 262_144;
/// Most R2Ts outstanding per task that we agree to.
pub const OUR_MAX_OUTSTANDING_R2T: u32 = 8;
/// Commands an initiator may have queued per session (the CmdSN window).
pub const CMD_WINDOW: u32 = 128;
/// Longest login or text negotiation (all continuation PDUs together).
pub const MAX_TEXT: usize = 65_536;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SessionType {
    Discovery,
    Normal,
}

/// The result of login negotiation for one session (with its single connection).
#[derive(Clone, Debug)]
pub struct Negotiated {
    pub session_type: SessionType,
    pub initiator_name: String,
    pub initiator_alias: Option<String>,
    pub target_name: Option<String>,
    pub isid: [u8; 6],
    pub tsih: u16,
    pub header_digest: bool,
    pub data_digest: bool,
    /// The initiator's MaxRecvDataSegmentLength: bounds every data segment we send.
    pub max_send_data: u32,
    pub max_burst: u32,
    pub first_burst: u32,
    pub initial_r2t: bool,
    pub immediate_data: bool,
    pub max_outstanding_r2t: u32,
    /// CmdSN of the login request: the session's first CmdSN.
    pub cmd_sn: u32,
    /// StatSN the first full-feature response carries.
    pub stat_sn: u32,
}

impl Negotiated {
    /// RFC 7143 defaults (section 13), before any key is exchanged.
    pub fn defaults() -> Negotiated {
        Negotiated {
            session_type: SessionType::Normal,
            initiator_name: String::new(),
            initiator_alias: None,
            target_name: None,
            isid: [0; 6],
            tsih: 0,
            header_digest: false,
            data_digest: false,
            max_send_data: 8192,
            max_burst: 262_144,
            first_burst: 65_536,
            initial_r2t: true,
            immediate_data: true,
            max_outstanding_r2t: 1,
            cmd_sn: 0,
            stat_sn: 0,
        }
    }
}
