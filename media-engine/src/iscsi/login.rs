//! The login phase (RFC 7143 section 6): stages, CHAP authentication, operational-key
//! negotiation, target and ACL checks. Sans-IO: feed it login request PDUs, send back the
//! responses it returns, and stop when it says the login succeeded or failed.

use std::sync::Arc;

use super::chap;
use super::params::{
    self, MAX_TEXT, Negotiated, OUR_FIRST_BURST, OUR_MAX_BURST, OUR_MAX_OUTSTANDING_R2T,
    OUR_MAX_RECV_DATA, SessionType,
};
use super::pdu::{Pdu, op};
use super::target::{Refusal, Registry, TPGT, Target};
use super::text;

/// Login status classes and details (RFC 7143 11.13.5).
pub mod status {
    pub const SUCCESS: (u8, u8) = (0, 0);
    pub const INITIATOR_ERROR: (u8, u8) = (2, 0);
    pub const AUTH_FAILED: (u8, u8) = (2, 1);
    pub const FORBIDDEN: (u8, u8) = (2, 2);
    pub const NOT_FOUND: (u8, u8) = (2, 3);
    pub const UNSUPPORTED_VERSION: (u8, u8) = (2, 5);
    pub const MISSING_PARAMETER: (u8, u8) = (2, 7);
    pub const SESSION_DOES_NOT_EXIST: (u8, u8) = (2, 0x0a);
    pub const INVALID_DURING_LOGIN: (u8, u8) = (2, 0x0b);
    pub const TARGET_ERROR: (u8, u8) = (3, 0);
    /// What an initiator is told when it may not log in to the target it names, whether the
    /// target does not exist or the initiator is not on its allow-list: the two must not be
    /// told apart (target names would be enumerable).
    pub const REFUSED_TARGET: (u8, u8) = FORBIDDEN;
}

const STAGE_SECURITY: u8 = 0;
const STAGE_OPERATIONAL: u8 = 1;
const STAGE_FULL_FEATURE: u8 = 3;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Auth {
    /// No AuthMethod agreed yet.
    Start,
    /// AuthMethod=CHAP agreed; waiting for CHAP_A.
    ChapAlgorithm,
    /// Challenge sent; waiting for CHAP_N/CHAP_R.
    ChapResponse { id: u8, challenge: Vec<u8> },
    /// Authenticated (or no authentication needed).
    Done,
}

/// What one login request led to.
#[derive(Debug)]
pub enum Step {
    /// Send the response; more login requests follow.
    Continue(Pdu),
    /// Send the response; the session enters full feature phase.
    Complete(Pdu, Box<LoggedIn>),
    /// Send the response (a failure status); then close the connection.
    Fail(Pdu, String),
}

/// A successful login.
#[derive(Debug)]
pub struct LoggedIn {
    pub params: Negotiated,
    pub target: Option<Arc<Target>>,
}

/// State of one connection's login.
#[derive(Debug)]
pub struct Login {
    n: Negotiated,
    target: Option<Arc<Target>>,
    /// Has the first request (with InitiatorName etc.) been seen?
    started: bool,
    itt: u32,
    cid: u16,
    stage: u8,
    auth: Auth,
    /// Text of a request split over several PDUs (C bit).
    partial: Vec<u8>,
    /// We declared our MaxRecvDataSegmentLength already.
    declared: bool,
    /// Our next StatSN.
    stat_sn: u32,
}

/// The answer to one key.
fn answer(out: &mut Vec<(String, String)>, k: &str, v: impl Into<String>) {
    out.push((k.to_string(), v.into()));
}

fn parse_num(v: &str) -> Option<u64> {
    if let Some(h) = v.strip_prefix("0x").or_else(|| v.strip_prefix("0X")) {
        u64::from_str_radix(h, 16).ok()
    } else {
        v.parse().ok()
    }
}

fn parse_bool(v: &str) -> Option<bool> {
    match v {
        "Yes" => Some(true),
        "No" => Some(false),
        _ => None,
    }
}

fn yes_no(b: bool) -> &'static str {
    if b { "Yes" } else { "No" }
}

impl Default for Login {
    fn default() -> Self {
        Login::new()
    }
}

impl Login {
    pub fn new() -> Login {
        Login {
            n: Negotiated::defaults(),
            target: None,
            started: false,
            itt: 0,
            cid: 0,
            stage: STAGE_SECURITY,
            auth: Auth::Start,
            partial: Vec::new(),
            declared: false,
            stat_sn: rand::random::<u32>() & 0x00ff_ffff,
        }
    }

    fn response(&self, req: &Pdu, transit: bool, nsg: u8, st: (u8, u8), data: Vec<u8>) -> Pdu {
        let mut p = Pdu::new(op::LOGIN_RESP);
        let csg = if st == status::SUCCESS {
            self.stage
        } else {
            (req.flags() >> 2) & 3
        };
        let mut flags = csg << 2;
        if transit {
            flags |= 0x80 | (nsg & 3);
        }
        p.set_flags(flags);
        p.set_u8(2, 0); // Version-max
        p.set_u8(3, 0); // Version-active
        p.bhs[8..14].copy_from_slice(&req.bhs[8..14]);
        p.set_u16(
            14,
            if transit && nsg == STAGE_FULL_FEATURE {
                self.n.tsih
            } else {
                0
            },
        );
        p.set_itt(req.itt());
        p.set_u32(24, self.stat_sn);
        let cmd_sn = req.u32_at(24);
        p.set_u32(28, cmd_sn);
        p.set_u32(32, cmd_sn.wrapping_add(params::CMD_WINDOW - 1));
        p.set_u8(36, st.0);
        p.set_u8(37, st.1);
        p.data = data;
        p
    }

    fn fail(&mut self, req: &Pdu, st: (u8, u8), why: impl Into<String>) -> Step {
        let p = self.response(req, false, 0, st, Vec::new());
        Step::Fail(p, why.into())
    }

    /// Handles one Login Request PDU.
    pub fn on_request(&mut self, req: &Pdu, reg: &Registry) -> Step {
        if req.opcode() != op::LOGIN_REQ {
            return self.fail(
                req,
                status::INVALID_DURING_LOGIN,
                "non-login PDU during login",
            );
        }
        let flags = req.flags();
        let (transit, cont) = (flags & 0x80 != 0, flags & 0x40 != 0);
        let (csg, nsg) = ((flags >> 2) & 3, flags & 3);
        if transit && cont {
            return self.fail(req, status::INITIATOR_ERROR, "T and C both set");
        }
        if req.u8_at(3) > 0 {
            // Version-min above 0: we only speak version 0.
            return self.fail(
                req,
                status::UNSUPPORTED_VERSION,
                "unsupported iSCSI version",
            );
        }
        let cid = req.u16_at(20);
        if !self.started {
            self.itt = req.itt();
            self.cid = cid;
            self.n.isid.copy_from_slice(&req.bhs[8..14]);
            self.n.cmd_sn = req.u32_at(24);
            // An initiator without authentication may start in the operational stage.
            if csg == STAGE_OPERATIONAL {
                self.stage = STAGE_OPERATIONAL;
            }
            if req.u16_at(14) != 0 {
                // Adding a connection to an existing session (MC/S) is not supported.
                return self.fail(
                    req,
                    status::SESSION_DOES_NOT_EXIST,
                    "TSIH of an unknown session",
                );
            }
        } else if req.bhs[8..14] != self.n.isid || cid != self.cid {
            return self.fail(
                req,
                status::INITIATOR_ERROR,
                "ISID or CID changed during login",
            );
        }
        if csg != self.stage || csg == 2 || (transit && (nsg == 2 || nsg <= csg)) {
            return self.fail(
                req,
                status::INITIATOR_ERROR,
                "invalid login stage transition",
            );
        }
        if self.partial.len() + req.data.len() > MAX_TEXT {
            return self.fail(req, status::INITIATOR_ERROR, "login text too long");
        }
        self.partial.extend_from_slice(&req.data);
        if cont {
            // More text follows: acknowledge with an empty response.
            self.stat_sn = self.stat_sn.wrapping_add(1);
            return Step::Continue(self.response(req, false, 0, status::SUCCESS, Vec::new()));
        }
        let data = std::mem::take(&mut self.partial);
        let pairs = match text::parse(&data) {
            Ok(p) => p,
            Err(e) => {
                return self.fail(req, status::INITIATOR_ERROR, format!("bad login text: {e}"));
            }
        };
        let mut out = Vec::new();
        if !self.started {
            self.started = true;
            if let Err(step) = self.first_request(req, &pairs, reg, &mut out) {
                return step;
            }
        }
        // Security stage is mandatory when the target has CHAP.
        if csg == STAGE_OPERATIONAL && self.auth != Auth::Done {
            if self.needs_chap() {
                return self.fail(
                    req,
                    status::AUTH_FAILED,
                    "CHAP required; security stage skipped",
                );
            }
            self.auth = Auth::Done;
        }
        if matches!(self.auth, Auth::ChapResponse { .. }) {
            if let Err(step) = self.chap_response(req, &pairs, &mut out) {
                return step;
            }
        }
        for (k, v) in &pairs {
            if let Err(step) = self.key(req, csg, k, v, &mut out) {
                return step;
            }
        }
        let mut agree = transit;
        if csg == STAGE_SECURITY && self.auth != Auth::Done {
            // Still authenticating: we do not transit yet.
            agree = false;
            if self.auth == Auth::Start && !pairs.iter().any(|(k, _)| k == "AuthMethod") {
                return self.fail(req, status::INITIATOR_ERROR, "AuthMethod missing");
            }
        }
        if !self.declared && (csg == STAGE_OPERATIONAL || (agree && nsg == STAGE_FULL_FEATURE)) {
            self.declare(&mut out);
        }
        if agree && nsg == STAGE_FULL_FEATURE {
            self.n.tsih = reg.new_tsih();
        }
        let resp = self.response(req, agree, nsg, status::SUCCESS, text::serialise(&out));
        self.stat_sn = self.stat_sn.wrapping_add(1);
        if agree {
            self.stage = nsg;
        }
        if agree && nsg == STAGE_FULL_FEATURE {
            if self.n.first_burst > self.n.max_burst {
                self.n.first_burst = self.n.max_burst;
            }
            self.n.stat_sn = self.stat_sn;
            return Step::Complete(
                resp,
                Box::new(LoggedIn {
                    params: self.n.clone(),
                    target: self.target.clone(),
                }),
            );
        }
        Step::Continue(resp)
    }

    fn needs_chap(&self) -> bool {
        self.n.session_type == SessionType::Normal
            && self.target.as_ref().is_some_and(|t| t.cfg.chap.is_some())
    }

    fn declare(&mut self, out: &mut Vec<(String, String)>) {
        self.declared = true;
        answer(
            out,
            "MaxRecvDataSegmentLength",
            OUR_MAX_RECV_DATA.to_string(),
        );
        if self.n.session_type == SessionType::Normal {
            answer(out, "TargetPortalGroupTag", TPGT.to_string());
        }
    }

    /// The first request names the initiator, the session type and (normal sessions) the target.
    fn first_request(
        &mut self,
        req: &Pdu,
        pairs: &[(String, String)],
        reg: &Registry,
        out: &mut Vec<(String, String)>,
    ) -> Result<(), Step> {
        let get = |k: &str| {
            pairs
                .iter()
                .find(|(pk, _)| pk == k)
                .map(|(_, v)| v.as_str())
        };
        let Some(initiator) = get("InitiatorName").filter(|v| !v.is_empty()) else {
            return Err(self.fail(req, status::MISSING_PARAMETER, "InitiatorName missing"));
        };
        self.n.initiator_name = initiator.to_string();
        self.n.initiator_alias = get("InitiatorAlias").map(str::to_string);
        self.n.session_type = match get("SessionType") {
            None | Some("Normal") => SessionType::Normal,
            Some("Discovery") => SessionType::Discovery,
            Some(_) => return Err(self.fail(req, status::INITIATOR_ERROR, "bad SessionType")),
        };
        if self.n.session_type == SessionType::Normal {
            let Some(name) = get("TargetName").filter(|v| !v.is_empty()) else {
                return Err(self.fail(req, status::MISSING_PARAMETER, "TargetName missing"));
            };
            // An unknown target and an initiator missing from a target's allow-list get the
            // same answer (authorization failure, no data), so that nobody can find out which
            // target names exist by trying to log in; only the log says which it was.
            let t = match reg.admit(name, initiator) {
                Ok(t) => t,
                Err(why) => {
                    let detail = match why {
                        Refusal::UnknownTarget => {
                            format!("no target {name} (initiator {initiator})")
                        }
                        Refusal::NotAllowed => {
                            format!("initiator {initiator} is not on the allow-list of {name}")
                        }
                    };
                    return Err(self.fail(req, status::REFUSED_TARGET, detail));
                }
            };
            if let Some(alias) = &t.cfg.alias {
                answer(out, "TargetAlias", alias.clone());
            }
            self.n.target_name = Some(name.to_string());
            self.target = Some(t);
        }
        if !self.needs_chap() && (req.flags() >> 2) & 3 == STAGE_OPERATIONAL {
            self.auth = Auth::Done;
        }
        Ok(())
    }

    /// Negotiates one key; appends the answer (if the key needs one) to `out`.
    fn key(
        &mut self,
        req: &Pdu,
        csg: u8,
        k: &str,
        v: &str,
        out: &mut Vec<(String, String)>,
    ) -> Result<(), Step> {
        match k {
            // Declaratives from the first request, already taken.
            "InitiatorName" | "InitiatorAlias" | "TargetName" | "SessionType" => {}
            "AuthMethod" | "CHAP_A" | "CHAP_N" | "CHAP_R" | "CHAP_I" | "CHAP_C" => {
                if csg != STAGE_SECURITY {
                    return Err(self.fail(
                        req,
                        status::INITIATOR_ERROR,
                        format!("{k} outside security stage"),
                    ));
                }
                // CHAP_N/R/I/C are handled together when CHAP_R arrives.
                if k == "AuthMethod" {
                    self.auth_method(req, v, out)?;
                } else if k == "CHAP_A" {
                    self.chap_algorithm(req, v, out)?;
                }
            }
            "HeaderDigest" | "DataDigest" => {
                let pick = v.split(',').find(|c| *c == "CRC32C" || *c == "None");
                match pick {
                    Some(c) => {
                        let on = c == "CRC32C";
                        if k == "HeaderDigest" {
                            self.n.header_digest = on;
                        } else {
                            self.n.data_digest = on;
                        }
                        answer(out, k, c);
                    }
                    None => answer(out, k, "Reject"),
                }
            }
            "MaxConnections" => match parse_num(v) {
                Some(n) if (1..=65535).contains(&n) => answer(out, k, "1"),
                _ => answer(out, k, "Reject"),
            },
            "InitialR2T" | "DataPDUInOrder" | "DataSequenceInOrder" => match parse_bool(v) {
                // OR functions: our "Yes" for the ordering keys (we assemble data in order);
                // "No" for InitialR2T (we welcome unsolicited data).
                Some(b) => {
                    let ours = k != "InitialR2T";
                    let result = b || ours;
                    if k == "InitialR2T" {
                        self.n.initial_r2t = result;
                    }
                    answer(out, k, yes_no(result));
                }
                None => answer(out, k, "Reject"),
            },
            "ImmediateData" | "IFMarker" | "OFMarker" => match parse_bool(v) {
                // AND functions: Yes to immediate data, No to markers (RFC 7143 dropped them).
                Some(b) => {
                    let result = b && k == "ImmediateData";
                    if k == "ImmediateData" {
                        self.n.immediate_data = result;
                    }
                    answer(out, k, yes_no(result));
                }
                None => answer(out, k, "Reject"),
            },
            "OFMarkInt" | "IFMarkInt" => answer(out, k, "Irrelevant"),
            "MaxRecvDataSegmentLength" => match parse_num(v) {
                Some(n) if (512..=16_777_215).contains(&n) => self.n.max_send_data = n as u32,
                _ => {
                    return Err(self.fail(
                        req,
                        status::INITIATOR_ERROR,
                        "bad MaxRecvDataSegmentLength",
                    ));
                }
            },
            "MaxBurstLength" | "FirstBurstLength" => match parse_num(v) {
                Some(n) if (512..=16_777_215).contains(&n) => {
                    let ours = if k == "MaxBurstLength" {
                        OUR_MAX_BURST
                    } else {
                        OUR_FIRST_BURST
                    };
                    let r = (n as u32).min(ours);
                    if k == "MaxBurstLength" {
                        self.n.max_burst = r;
                    } else {
                        self.n.first_burst = r;
                    }
                    answer(out, k, r.to_string());
                }
                _ => answer(out, k, "Reject"),
            },
            "MaxOutstandingR2T" => match parse_num(v) {
                Some(n) if (1..=65535).contains(&n) => {
                    let r = (n as u32).min(OUR_MAX_OUTSTANDING_R2T);
                    self.n.max_outstanding_r2t = r;
                    answer(out, k, r.to_string());
                }
                _ => answer(out, k, "Reject"),
            },
            "DefaultTime2Wait" | "DefaultTime2Retain" => match parse_num(v) {
                // Time2Wait is a max function, Time2Retain a min one; with ERL 0 we retain
                // nothing and let initiators reconnect at once.
                Some(n) if n <= 3600 => {
                    let r = if k == "DefaultTime2Wait" { n.max(2) } else { 0 };
                    answer(out, k, r.to_string());
                }
                _ => answer(out, k, "Reject"),
            },
            "ErrorRecoveryLevel" => match parse_num(v) {
                Some(n) if n <= 2 => answer(out, k, "0"),
                _ => answer(out, k, "Reject"),
            },
            "TaskReporting" => answer(out, k, "RFC3720"),
            "iSCSIProtocolLevel" => match parse_num(v) {
                Some(n) if n <= 31 => answer(out, k, n.min(1).to_string()),
                _ => answer(out, k, "Reject"),
            },
            // Target-only declaratives an initiator must not send: ignored.
            "TargetAlias" | "TargetAddress" | "TargetPortalGroupTag" => {}
            _ => answer(out, k, "NotUnderstood"),
        }
        Ok(())
    }

    fn auth_method(
        &mut self,
        req: &Pdu,
        v: &str,
        out: &mut Vec<(String, String)>,
    ) -> Result<(), Step> {
        let offered: Vec<&str> = v.split(',').collect();
        if self.needs_chap() {
            if offered.contains(&"CHAP") {
                answer(out, "AuthMethod", "CHAP");
                self.auth = Auth::ChapAlgorithm;
                return Ok(());
            }
            return Err(self.fail(req, status::AUTH_FAILED, "CHAP required but not offered"));
        }
        if offered.contains(&"None") {
            answer(out, "AuthMethod", "None");
            self.auth = Auth::Done;
            return Ok(());
        }
        Err(self.fail(
            req,
            status::AUTH_FAILED,
            "no acceptable AuthMethod (target has no CHAP)",
        ))
    }

    fn chap_algorithm(
        &mut self,
        req: &Pdu,
        v: &str,
        out: &mut Vec<(String, String)>,
    ) -> Result<(), Step> {
        if self.auth != Auth::ChapAlgorithm {
            return Err(self.fail(req, status::INITIATOR_ERROR, "CHAP_A out of order"));
        }
        if !v.split(',').any(|a| a == chap::CHAP_MD5) {
            answer(out, "CHAP_A", "Reject");
            return Err(self.fail(req, status::AUTH_FAILED, "no supported CHAP algorithm"));
        }
        let id: u8 = rand::random();
        let challenge: Vec<u8> = (0..chap::CHALLENGE_LEN)
            .map(|_| rand::random::<u8>())
            .collect();
        answer(out, "CHAP_A", chap::CHAP_MD5);
        answer(out, "CHAP_I", id.to_string());
        answer(out, "CHAP_C", chap::encode_hex(&challenge));
        self.auth = Auth::ChapResponse { id, challenge };
        Ok(())
    }

    /// Verifies CHAP_N/CHAP_R (and answers a mutual challenge). Called with all keys of the
    /// request once parsing is done.
    fn chap_response(
        &mut self,
        req: &Pdu,
        pairs: &[(String, String)],
        out: &mut Vec<(String, String)>,
    ) -> Result<(), Step> {
        let Auth::ChapResponse { id, challenge } = self.auth.clone() else {
            return Ok(());
        };
        let get = |k: &str| {
            pairs
                .iter()
                .find(|(pk, _)| pk == k)
                .map(|(_, v)| v.as_str())
        };
        let (Some(name), Some(resp)) = (get("CHAP_N"), get("CHAP_R")) else {
            return Err(self.fail(req, status::AUTH_FAILED, "CHAP_N/CHAP_R missing"));
        };
        let Some(secrets) = self.target.as_ref().and_then(|t| t.cfg.chap.clone()) else {
            return Err(self.fail(req, status::TARGET_ERROR, "CHAP state without secrets"));
        };
        let want = chap::response(id, secrets.secret.as_bytes(), &challenge);
        let ok = name == secrets.user
            && chap::decode_binary(resp).is_some_and(|r| chap::equal(&r, &want));
        if !ok {
            return Err(self.fail(
                req,
                status::AUTH_FAILED,
                format!("CHAP failed for user {name:?}"),
            ));
        }
        match (get("CHAP_I"), get("CHAP_C")) {
            (None, None) => {}
            (Some(i), Some(c)) => {
                let (Some(i), Some(c)) =
                    (parse_num(i).filter(|i| *i <= 255), chap::decode_binary(c))
                else {
                    return Err(self.fail(req, status::AUTH_FAILED, "bad mutual CHAP challenge"));
                };
                // A reflected challenge would let an attacker use us as an oracle.
                if c == challenge {
                    return Err(self.fail(
                        req,
                        status::AUTH_FAILED,
                        "mutual challenge reflects ours",
                    ));
                }
                let Some((muser, msecret)) = secrets.mutual.clone() else {
                    return Err(self.fail(req, status::AUTH_FAILED, "mutual CHAP not configured"));
                };
                let r = chap::response(i as u8, msecret.as_bytes(), &c);
                answer(out, "CHAP_N", muser);
                answer(out, "CHAP_R", chap::encode_hex(&r));
            }
            _ => return Err(self.fail(req, status::AUTH_FAILED, "CHAP_I without CHAP_C")),
        }
        self.auth = Auth::Done;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::iscsi::target::{ChapSecrets, TargetConfig};

    const OPEN: &str = "iqn.2026-11.io.maas:open";
    const GUARDED: &str = "iqn.2026-11.io.maas:guarded";
    const LISTED: &str = "iqn.2026-11.test:listed";

    fn registry() -> Registry {
        let reg = Registry::new(None);
        for (name, chap) in [
            (OPEN, None),
            (
                GUARDED,
                Some(ChapSecrets {
                    user: "u".into(),
                    secret: "0123456789ab".into(),
                    mutual: None,
                }),
            ),
        ] {
            reg.add(TargetConfig {
                name: name.into(),
                alias: Some(format!("alias of {name}")),
                initiators: vec![LISTED.into()],
                chap,
                luns: BTreeMap::new(),
            });
        }
        reg
    }

    /// The first login request of a normal session from `initiator` to `target`, starting in
    /// stage `csg` (0: security, 1: operational).
    fn first_request(initiator: &str, target: &str, csg: u8) -> Pdu {
        let mut req = Pdu::new(op::LOGIN_REQ);
        req.bhs[0] |= 0x40;
        req.set_flags(0x80 | (csg << 2) | if csg == 0 { 1 } else { 3 });
        req.bhs[8] = 0x80;
        req.set_itt(0x1234);
        req.set_u32(24, 7);
        let auth = if csg == 0 {
            "AuthMethod=CHAP,None\0"
        } else {
            ""
        };
        req.data =
            format!("InitiatorName={initiator}\0TargetName={target}\0SessionType=Normal\0{auth}")
                .into_bytes();
        req
    }

    /// The response (header and data) and the logged reason of a refused first request.
    fn refused(reg: &Registry, req: &Pdu) -> (Vec<u8>, String) {
        match Login::new().on_request(req, reg) {
            Step::Fail(mut resp, why) => {
                // StatSN starts at random for every login: the one field allowed to differ.
                resp.set_u32(24, 0);
                let mut wire = resp.bhs.to_vec();
                wire.extend_from_slice(&resp.ahs);
                wire.extend_from_slice(&resp.data);
                (wire, why)
            }
            other => panic!("login was not refused: {other:?}"),
        }
    }

    #[test]
    fn unknown_target_and_unlisted_initiator_get_the_same_answer() {
        let reg = registry();
        for csg in [0, 1] {
            let (unknown, why_unknown) = refused(
                &reg,
                &first_request(LISTED, "iqn.2026-11.io.maas:nope", csg),
            );
            assert!(why_unknown.contains("no target"), "{why_unknown}");
            assert_eq!(
                (unknown[36], unknown[37]),
                status::REFUSED_TARGET,
                "an authorization failure"
            );
            assert_eq!(unknown.len(), 48, "no text in a refusal");
            for target in [OPEN, GUARDED] {
                let (unlisted, why) = refused(&reg, &first_request("iqn.x:other", target, csg));
                assert_eq!(
                    unlisted, unknown,
                    "stage {csg}: {target} refuses an unlisted initiator exactly as an unknown target is refused"
                );
                assert!(why.contains("not on the allow-list"), "{why}");
            }
            // Neither does an unknown initiator at an unknown target stand out.
            let (both, _) = refused(&reg, &first_request("iqn.x:other", "iqn.x:nope", csg));
            assert_eq!(both, unknown);
        }
        // The listed initiator does get in (no CHAP) or on to authentication (CHAP).
        assert!(matches!(
            Login::new().on_request(&first_request(LISTED, OPEN, 1), &reg),
            Step::Complete(..)
        ));
        assert!(matches!(
            Login::new().on_request(&first_request(LISTED, GUARDED, 0), &reg),
            Step::Continue(..)
        ));
    }
}
