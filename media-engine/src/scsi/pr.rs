//! Reservations: persistent reservations (SPC-4 5.9, PERSISTENT RESERVE IN/OUT 6.15-6.16)
//! and the older RESERVE(6)/RELEASE(6) (SPC-2 7.21), plus the rules that decide whether a
//! command from an I_T nexus conflicts with them (SPC-4 5.9.1 table 52, SBC-3 4.17 table 13).
//!
//! State lives in memory: registrations survive the end of the I_T nexus that made them (as
//! SPC-4 requires) but not a restart of the target, so APTPL is refused.

use super::Nexus;
use super::cdb::{be16, be32, be64, u8_at};
use super::sense::{Asc, Sense};

/// Registrations one logical unit keeps at most; more are refused with INSUFFICIENT
/// REGISTRATION RESOURCES (each needs its own I_T nexus, so this only stops abuse).
const MAX_REGISTRATIONS: usize = 256;

/// Persistent reservation types (SPC-4 table 165).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum PrType {
    WriteExclusive,
    ExclusiveAccess,
    WriteExclusiveRegistrantsOnly,
    ExclusiveAccessRegistrantsOnly,
    WriteExclusiveAllRegistrants,
    ExclusiveAccessAllRegistrants,
}

impl PrType {
    fn from_code(code: u8) -> Option<PrType> {
        Some(match code {
            0x1 => PrType::WriteExclusive,
            0x3 => PrType::ExclusiveAccess,
            0x5 => PrType::WriteExclusiveRegistrantsOnly,
            0x6 => PrType::ExclusiveAccessRegistrantsOnly,
            0x7 => PrType::WriteExclusiveAllRegistrants,
            0x8 => PrType::ExclusiveAccessAllRegistrants,
            _ => return None,
        })
    }

    fn code(self) -> u8 {
        match self {
            PrType::WriteExclusive => 0x1,
            PrType::ExclusiveAccess => 0x3,
            PrType::WriteExclusiveRegistrantsOnly => 0x5,
            PrType::ExclusiveAccessRegistrantsOnly => 0x6,
            PrType::WriteExclusiveAllRegistrants => 0x7,
            PrType::ExclusiveAccessAllRegistrants => 0x8,
        }
    }

    /// Every registrant holds an all-registrants reservation.
    fn all_registrants(self) -> bool {
        matches!(
            self,
            PrType::WriteExclusiveAllRegistrants | PrType::ExclusiveAccessAllRegistrants
        )
    }

    /// Registered I_T nexuses have full access (registrants-only and all-registrants types).
    fn registrants_have_access(self) -> bool {
        !matches!(self, PrType::WriteExclusive | PrType::ExclusiveAccess)
    }

    /// Reads from other I_T nexuses conflict too.
    fn exclusive_access(self) -> bool {
        matches!(
            self,
            PrType::ExclusiveAccess
                | PrType::ExclusiveAccessRegistrantsOnly
                | PrType::ExclusiveAccessAllRegistrants
        )
    }
}

/// How reservations restrict a command.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Access {
    /// Never conflicts: INQUIRY, REPORT LUNS, REQUEST SENSE, RELEASE(6), PREVENT ALLOW MEDIUM
    /// REMOVAL with PREVENT 0.
    Unrestricted,
    /// Allowed through persistent reservations but not through another I_T nexus's RESERVE(6):
    /// PERSISTENT RESERVE IN/OUT, TEST UNIT READY, READ CAPACITY, REPORT SUPPORTED OPERATION
    /// CODES.
    PrAllowed,
    /// Reads or reports on the medium: allowed through Write Exclusive reservations.
    Read,
    /// Changes the medium or the logical unit's state: allowed to reservation holders only.
    Write,
}

#[derive(Clone, Debug)]
struct Registration {
    nexus: Nexus,
    key: u64,
}

#[derive(Clone, Debug)]
struct Reservation {
    /// The I_T nexus that made the reservation (for all-registrants types every registrant is
    /// a holder).
    holder: Nexus,
    ty: PrType,
}

/// Result of a reservation command that does not return data.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Outcome {
    Good,
    Conflict,
    Error(Sense),
}

/// Unit attentions to establish after a reservation change.
pub(crate) type Notices = Vec<(Nexus, Asc)>;

/// Reservation state of one logical unit.
#[derive(Debug, Default)]
pub(crate) struct Reservations {
    registrations: Vec<Registration>,
    reservation: Option<Reservation>,
    /// PRGENERATION: counts registration changes (SPC-4 6.15.2).
    generation: u32,
    /// The I_T nexus holding a RESERVE(6) reservation.
    reserve6: Option<Nexus>,
}

/// PERSISTENT RESERVE OUT service actions (SPC-4 table 171).
mod prout {
    pub const REGISTER: u8 = 0x00;
    pub const RESERVE: u8 = 0x01;
    pub const RELEASE: u8 = 0x02;
    pub const CLEAR: u8 = 0x03;
    pub const PREEMPT: u8 = 0x04;
    pub const PREEMPT_AND_ABORT: u8 = 0x05;
    pub const REGISTER_AND_IGNORE_EXISTING_KEY: u8 = 0x06;
}

/// Length of the basic PERSISTENT RESERVE OUT parameter list.
const PROUT_PARAMETER_LIST_LEN: u32 = 24;

impl Reservations {
    fn key_of(&self, nexus: &Nexus) -> Option<u64> {
        self.registrations
            .iter()
            .find(|r| &r.nexus == nexus)
            .map(|r| r.key)
    }

    fn is_holder(&self, nexus: &Nexus) -> bool {
        match &self.reservation {
            Some(res) if res.ty.all_registrants() => self.key_of(nexus).is_some(),
            Some(res) => &res.holder == nexus,
            None => false,
        }
    }

    /// True when a command of class `access` from `nexus` must end in RESERVATION CONFLICT.
    pub fn conflicts(&self, nexus: &Nexus, access: Access) -> bool {
        if access == Access::Unrestricted {
            return false;
        }
        if self.reserve6.as_ref().is_some_and(|holder| holder != nexus) {
            return true;
        }
        let Some(res) = &self.reservation else {
            return false;
        };
        if access == Access::PrAllowed || self.is_holder(nexus) {
            return false;
        }
        if res.ty.registrants_have_access() && self.key_of(nexus).is_some() {
            return false;
        }
        access == Access::Write || res.ty.exclusive_access()
    }

    /// RESERVE(6). With a persistent reservation in place only its holder may issue it, and it
    /// changes nothing (SPC-4 5.9.3, CRH = 1).
    pub fn reserve6(&mut self, nexus: &Nexus) -> Outcome {
        if self.reservation.is_some() {
            return if self.is_holder(nexus) {
                Outcome::Good
            } else {
                Outcome::Conflict
            };
        }
        match &self.reserve6 {
            Some(holder) if holder != nexus => Outcome::Conflict,
            _ => {
                self.reserve6 = Some(nexus.clone());
                Outcome::Good
            }
        }
    }

    /// RELEASE(6): releases the caller's reservation; from anyone else it is a no-op.
    pub fn release6(&mut self, nexus: &Nexus) {
        if self.reserve6.as_ref() == Some(nexus) {
            self.reserve6 = None;
        }
    }

    /// The I_T nexus is gone: its RESERVE(6) reservation ends, its registration stays.
    pub fn nexus_gone(&mut self, nexus: &Nexus) {
        self.release6(nexus);
    }

    /// A logical unit or target reset ends RESERVE(6) reservations (SPC-2 5.5.1); persistent
    /// reservations are unaffected.
    pub fn reset(&mut self) {
        self.reserve6 = None;
    }

    /// PERSISTENT RESERVE IN; Data-In cut to the allocation length.
    pub fn persistent_reserve_in(&self, cdb: &[u8]) -> Result<Vec<u8>, Sense> {
        let allocation_length = usize::from(be16(cdb, 7));
        let mut d = Vec::new();
        match u8_at(cdb, 1) & 0x1F {
            // READ KEYS
            0x00 => {
                d.extend_from_slice(&self.generation.to_be_bytes());
                d.extend_from_slice(&(self.registrations.len() as u32 * 8).to_be_bytes());
                for r in &self.registrations {
                    d.extend_from_slice(&r.key.to_be_bytes());
                }
            }
            // READ RESERVATION
            0x01 => {
                d.extend_from_slice(&self.generation.to_be_bytes());
                match &self.reservation {
                    Some(res) => {
                        d.extend_from_slice(&16u32.to_be_bytes());
                        // All-registrants reservations have no single key: report zero.
                        let key = if res.ty.all_registrants() {
                            0
                        } else {
                            self.key_of(&res.holder).unwrap_or(0)
                        };
                        d.extend_from_slice(&key.to_be_bytes());
                        d.extend_from_slice(&[0, 0, 0, 0, 0, res.ty.code(), 0, 0]);
                    }
                    None => d.extend_from_slice(&0u32.to_be_bytes()),
                }
            }
            // REPORT CAPABILITIES: CRH; TMV with ALLOW COMMANDS 001b (TEST UNIT READY passes
            // every reservation); all six reservation types.
            0x02 => d.extend_from_slice(&[0, 8, 0x10, 0x80 | 0x10, 0xEA, 0x01, 0, 0]),
            // READ FULL STATUS
            0x03 => {
                d.extend_from_slice(&self.generation.to_be_bytes());
                d.extend_from_slice(&[0; 4]);
                for r in &self.registrations {
                    let holder = self.is_holder(&r.nexus);
                    d.extend_from_slice(&r.key.to_be_bytes());
                    d.extend_from_slice(&[0; 4]);
                    d.push(u8::from(holder));
                    d.push(match (&self.reservation, holder) {
                        (Some(res), true) => res.ty.code(),
                        _ => 0,
                    });
                    d.extend_from_slice(&[0; 4]);
                    d.extend_from_slice(&r.nexus.relative_target_port.to_be_bytes());
                    let id = transport_id(&r.nexus.initiator_port);
                    d.extend_from_slice(&(id.len() as u32).to_be_bytes());
                    d.extend_from_slice(&id);
                }
                let len = u32::try_from(d.len() - 8).unwrap_or(u32::MAX).to_be_bytes();
                d[4..8].copy_from_slice(&len);
            }
            _ => return Err(Sense::invalid_cdb_field(1, Some(4))),
        }
        d.truncate(allocation_length);
        Ok(d)
    }

    /// PERSISTENT RESERVE OUT with the basic 24-byte parameter list. Returns the outcome and
    /// the unit attentions to establish for other I_T nexuses.
    pub fn persistent_reserve_out(
        &mut self,
        nexus: &Nexus,
        cdb: &[u8],
        data: &[u8],
    ) -> (Outcome, Notices) {
        let mut notices = Notices::new();
        let outcome = match self.prout(nexus, cdb, data, &mut notices) {
            Ok(outcome) => outcome,
            Err(sense) => Outcome::Error(sense),
        };
        (outcome, notices)
    }

    fn prout(
        &mut self,
        nexus: &Nexus,
        cdb: &[u8],
        data: &[u8],
        notices: &mut Notices,
    ) -> Result<Outcome, Sense> {
        let service_action = u8_at(cdb, 1) & 0x1F;
        let scope = u8_at(cdb, 2) >> 4;
        let type_code = u8_at(cdb, 2) & 0x0F;
        if be32(cdb, 5) != PROUT_PARAMETER_LIST_LEN
            || data.len() < PROUT_PARAMETER_LIST_LEN as usize
        {
            return Err(Sense::param_list_length_error());
        }
        let key = be64(data, 0);
        let sa_key = be64(data, 8);
        let flags = u8_at(data, 20);
        if flags & 0x08 != 0 {
            // SPEC_I_PT: registering other initiator ports is not supported.
            return Err(Sense::invalid_param_field(20, Some(3)));
        }
        let registering = matches!(
            service_action,
            prout::REGISTER | prout::REGISTER_AND_IGNORE_EXISTING_KEY
        );
        if registering && flags & 0x04 != 0 {
            // ALL_TG_PT: registrations are per target port.
            return Err(Sense::invalid_param_field(20, Some(2)));
        }
        if registering && flags & 0x01 != 0 {
            // APTPL: registrations do not persist through a power loss (PTPL_C = 0).
            return Err(Sense::invalid_param_field(20, Some(0)));
        }

        if registering {
            let current = self.key_of(nexus);
            if service_action == prout::REGISTER && key != current.unwrap_or(0) {
                return Ok(Outcome::Conflict);
            }
            match (current, sa_key) {
                (None, 0) => {}
                (None, _) => {
                    if self.registrations.len() >= MAX_REGISTRATIONS {
                        return Err(Sense::illegal_request(
                            Asc::INSUFFICIENT_REGISTRATION_RESOURCES,
                        ));
                    }
                    self.registrations.push(Registration {
                        nexus: nexus.clone(),
                        key: sa_key,
                    });
                    self.bump_generation();
                }
                (Some(_), 0) => {
                    self.unregister(nexus, notices);
                    self.bump_generation();
                }
                (Some(_), _) => {
                    for r in self.registrations.iter_mut().filter(|r| &r.nexus == nexus) {
                        r.key = sa_key;
                    }
                    self.bump_generation();
                }
            }
            return Ok(Outcome::Good);
        }

        // Every other service action needs a registered I_T nexus quoting its own key.
        if self.key_of(nexus) != Some(key) {
            return Ok(Outcome::Conflict);
        }
        let checked_type = || -> Result<PrType, Sense> {
            if scope != 0 {
                return Err(Sense::invalid_cdb_field(2, Some(7)));
            }
            PrType::from_code(type_code).ok_or(Sense::invalid_cdb_field(2, Some(3)))
        };
        match service_action {
            prout::RESERVE => {
                let ty = checked_type()?;
                match &self.reservation {
                    Some(res) if self.is_holder(nexus) && res.ty == ty => Ok(Outcome::Good),
                    Some(_) => Ok(Outcome::Conflict),
                    None => {
                        self.reservation = Some(Reservation {
                            holder: nexus.clone(),
                            ty,
                        });
                        Ok(Outcome::Good)
                    }
                }
            }
            prout::RELEASE => {
                let Some(res) = self.reservation.clone() else {
                    return Ok(Outcome::Good);
                };
                if !self.is_holder(nexus) {
                    return Ok(Outcome::Good);
                }
                if scope != 0 || type_code != res.ty.code() {
                    return Err(Sense::illegal_request(
                        Asc::INVALID_RELEASE_OF_PERSISTENT_RESERVATION,
                    ));
                }
                self.reservation = None;
                if res.ty.registrants_have_access() {
                    self.notify_registrants(nexus, Asc::RESERVATIONS_RELEASED, notices);
                }
                Ok(Outcome::Good)
            }
            prout::CLEAR => {
                self.notify_registrants(nexus, Asc::RESERVATIONS_PREEMPTED, notices);
                self.registrations.clear();
                self.reservation = None;
                self.bump_generation();
                Ok(Outcome::Good)
            }
            prout::PREEMPT | prout::PREEMPT_AND_ABORT => {
                self.preempt(nexus, sa_key, &checked_type, notices)
            }
            _ => Err(Sense::invalid_cdb_field(1, Some(4))),
        }
    }

    /// PREEMPT (and PREEMPT AND ABORT, whose task aborting is the transport's): removes the
    /// registrations holding `sa_key` and, when they hold the reservation, takes it over
    /// (SPC-4 5.9.11.4).
    fn preempt(
        &mut self,
        nexus: &Nexus,
        sa_key: u64,
        checked_type: &dyn Fn() -> Result<PrType, Sense>,
        notices: &mut Notices,
    ) -> Result<Outcome, Sense> {
        let Some(res) = self.reservation.clone() else {
            // No reservation: only registrations are removed; type and scope are ignored.
            if sa_key == 0 {
                return Err(Sense::invalid_param_field(8, None));
            }
            return Ok(self.remove_registrations(nexus, Some(sa_key), notices));
        };
        let ty = checked_type()?;
        if res.ty.all_registrants() {
            if sa_key != 0 {
                return Ok(self.remove_registrations(nexus, Some(sa_key), notices));
            }
            self.remove_registrations(nexus, None, notices);
            self.reservation = Some(Reservation {
                holder: nexus.clone(),
                ty,
            });
            return Ok(Outcome::Good);
        }
        if sa_key == 0 {
            return Err(Sense::invalid_param_field(8, None));
        }
        if self.key_of(&res.holder) != Some(sa_key) {
            // Preempting registrations that do not hold the reservation leaves it in place.
            return Ok(self.remove_registrations(nexus, Some(sa_key), notices));
        }
        self.remove_registrations(nexus, Some(sa_key), notices);
        self.reservation = Some(Reservation {
            holder: nexus.clone(),
            ty,
        });
        if ty != res.ty {
            self.notify_registrants(nexus, Asc::RESERVATIONS_RELEASED, notices);
        }
        Ok(Outcome::Good)
    }

    /// Removes the registrations of every I_T nexus but `keep` whose key is `key` (all of them
    /// when `key` is None), notifying each. RESERVATION CONFLICT when a key matched nothing.
    fn remove_registrations(
        &mut self,
        keep: &Nexus,
        key: Option<u64>,
        notices: &mut Notices,
    ) -> Outcome {
        let before = self.registrations.len();
        self.registrations.retain(|r| {
            let remove = &r.nexus != keep && key.is_none_or(|k| r.key == k);
            if remove {
                notices.push((r.nexus.clone(), Asc::REGISTRATIONS_PREEMPTED));
            }
            !remove
        });
        if key.is_some() && self.registrations.len() == before {
            return Outcome::Conflict;
        }
        self.bump_generation();
        Outcome::Good
    }

    /// Drops the registration of `nexus`; a reservation it held ends with it, an all-registrants
    /// reservation with the last registrant (SPC-4 5.9.11.2.3).
    fn unregister(&mut self, nexus: &Nexus, notices: &mut Notices) {
        self.registrations.retain(|r| &r.nexus != nexus);
        let Some(res) = self.reservation.clone() else {
            return;
        };
        if res.ty.all_registrants() {
            if self.registrations.is_empty() {
                self.reservation = None;
            }
        } else if &res.holder == nexus {
            self.reservation = None;
            if res.ty.registrants_have_access() {
                self.notify_registrants(nexus, Asc::RESERVATIONS_RELEASED, notices);
            }
        }
    }

    fn notify_registrants(&self, except: &Nexus, asc: Asc, notices: &mut Notices) {
        notices.extend(
            self.registrations
                .iter()
                .filter(|r| &r.nexus != except)
                .map(|r| (r.nexus.clone(), asc)),
        );
    }

    fn bump_generation(&mut self) {
        self.generation = self.generation.wrapping_add(1);
    }
}

/// iSCSI TransportID of an initiator port (SPC-4 7.6.4.6): format 01b when the port name
/// carries its ISID (`<name>,i,0x<ISID>`), format 00b otherwise. Null terminated and padded
/// to a multiple of four bytes, at least 24 bytes in all.
fn transport_id(initiator_port: &str) -> Vec<u8> {
    const ISCSI: u8 = 0x05;
    let format = if initiator_port.contains(",i,0x") {
        0x40
    } else {
        0x00
    };
    let name = initiator_port.as_bytes();
    let name = name.get(..name.len().min(1000)).unwrap_or(name);
    let mut id = vec![format | ISCSI, 0, 0, 0];
    id.extend_from_slice(name);
    id.push(0);
    id.resize((id.len().div_ceil(4) * 4).max(24), 0);
    let additional = (id.len() - 4) as u16;
    id[2..4].copy_from_slice(&additional.to_be_bytes());
    id
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nexus(i: u8) -> Nexus {
        Nexus {
            initiator_port: format!("iqn.2007-10.test:init{i},i,0x23d00000000{i}"),
            target_port: "iqn.2026-11.io.maas:t,t,0x0001".into(),
            relative_target_port: 1,
        }
    }

    fn out(r: &mut Reservations, n: &Nexus, sa: u8, ty: u8, key: u64, sa_key: u64) -> Outcome {
        let cdb = [0x5F, sa, ty, 0, 0, 0, 0, 0, 24, 0];
        let mut data = [0u8; 24];
        data[..8].copy_from_slice(&key.to_be_bytes());
        data[8..16].copy_from_slice(&sa_key.to_be_bytes());
        r.persistent_reserve_out(n, &cdb, &data).0
    }

    fn keys(r: &Reservations) -> (u32, Vec<u64>) {
        let d = r
            .persistent_reserve_in(&[0x5E, 0, 0, 0, 0, 0, 0, 0x40, 0, 0])
            .unwrap();
        (be32(&d, 0), d[8..].chunks(8).map(|c| be64(c, 0)).collect())
    }

    #[test]
    fn register_unregister_and_reregister_conflict() {
        let mut r = Reservations::default();
        let a = nexus(1);
        assert_eq!(out(&mut r, &a, 6, 0, 0, 0xA), Outcome::Good);
        assert_eq!(keys(&r), (1, vec![0xA]));
        // REGISTER quoting a wrong current key conflicts.
        assert_eq!(out(&mut r, &a, 0, 0, 0, 0xB), Outcome::Conflict);
        assert_eq!(out(&mut r, &a, 0, 0, 0xA, 0xB), Outcome::Good);
        assert_eq!(keys(&r), (2, vec![0xB]));
        assert_eq!(out(&mut r, &a, 0, 0, 0xB, 0), Outcome::Good);
        assert_eq!(keys(&r), (3, vec![]));
        // Unregistered REGISTER with key 0 and service action key 0 changes nothing.
        assert_eq!(out(&mut r, &a, 0, 0, 0, 0), Outcome::Good);
        assert_eq!(keys(&r).0, 3);
    }

    #[test]
    fn access_rules_per_type() {
        // (type, registered reader, registered writer, unregistered reader, unregistered writer)
        let table = [
            (1, true, false, true, false),
            (3, false, false, false, false),
            (5, true, true, true, false),
            (6, true, true, false, false),
            (7, true, true, true, false),
            (8, true, true, false, false),
        ];
        for (ty, rr, rw, ur, uw) in table {
            let mut r = Reservations::default();
            let (a, b, c) = (nexus(1), nexus(2), nexus(3));
            out(&mut r, &a, 6, 0, 0, 1);
            out(&mut r, &b, 6, 0, 0, 2);
            assert_eq!(out(&mut r, &a, 1, ty, 1, 0), Outcome::Good, "type {ty}");
            assert!(!r.conflicts(&a, Access::Write));
            assert_eq!(!r.conflicts(&b, Access::Read), rr, "type {ty}");
            assert_eq!(!r.conflicts(&b, Access::Write), rw, "type {ty}");
            assert_eq!(!r.conflicts(&c, Access::Read), ur, "type {ty}");
            assert_eq!(!r.conflicts(&c, Access::Write), uw, "type {ty}");
            assert!(!r.conflicts(&c, Access::PrAllowed));
            let d = r
                .persistent_reserve_in(&[0x5E, 1, 0, 0, 0, 0, 0, 0, 64, 0])
                .unwrap();
            assert_eq!(d[21], ty);
            assert_eq!(be64(&d, 8), if ty >= 7 { 0 } else { 1 });
            // Releasing with the wrong type is an error; the right type releases.
            let wrong = if ty == 1 { 3 } else { 1 };
            assert!(matches!(out(&mut r, &a, 2, wrong, 1, 0), Outcome::Error(_)));
            assert_eq!(out(&mut r, &a, 2, ty, 1, 0), Outcome::Good);
            assert!(!r.conflicts(&c, Access::Write));
        }
    }

    #[test]
    fn holder_unregistering_releases_unless_all_registrants() {
        for (ty, stays) in [
            (1, false),
            (3, false),
            (5, false),
            (6, false),
            (7, true),
            (8, true),
        ] {
            let mut r = Reservations::default();
            let (a, b) = (nexus(1), nexus(2));
            out(&mut r, &a, 6, 0, 0, 1);
            out(&mut r, &b, 6, 0, 0, 2);
            out(&mut r, &a, 1, ty, 1, 0);
            out(&mut r, &a, 0, 0, 1, 0);
            assert_eq!(r.reservation.is_some(), stays, "type {ty}");
            if stays {
                assert_eq!(out(&mut r, &b, 2, ty, 2, 0), Outcome::Good);
                assert!(r.reservation.is_none());
            }
        }
    }

    #[test]
    fn preempt_and_clear() {
        let mut r = Reservations::default();
        let (a, b) = (nexus(1), nexus(2));
        out(&mut r, &a, 6, 0, 0, 1);
        out(&mut r, &b, 6, 0, 0, 2);
        let generation = keys(&r).0;
        // b preempts a's registration (no reservation).
        let cdb = [0x5F, 4, 3, 0, 0, 0, 0, 0, 24, 0];
        let mut data = [0u8; 24];
        data[..8].copy_from_slice(&2u64.to_be_bytes());
        data[8..16].copy_from_slice(&1u64.to_be_bytes());
        let (o, notices) = r.persistent_reserve_out(&b, &cdb, &data);
        assert_eq!(o, Outcome::Good);
        assert_eq!(notices, vec![(a.clone(), Asc::REGISTRATIONS_PREEMPTED)]);
        assert_eq!(keys(&r), (generation + 1, vec![2]));
        // Preempting a key nobody holds conflicts.
        assert_eq!(out(&mut r, &b, 4, 3, 2, 9), Outcome::Conflict);
        // Taking over a reservation.
        out(&mut r, &a, 6, 0, 0, 1);
        out(&mut r, &a, 1, 1, 1, 0);
        assert_eq!(out(&mut r, &b, 4, 3, 2, 1), Outcome::Good);
        assert!(r.is_holder(&b));
        assert!(r.conflicts(&a, Access::Read));
        // CLEAR drops everything.
        assert_eq!(out(&mut r, &b, 3, 0, 2, 0), Outcome::Good);
        assert_eq!(keys(&r).1, Vec::<u64>::new());
        assert!(r.reservation.is_none());
    }

    #[test]
    fn reserve6_interplay() {
        let mut r = Reservations::default();
        let (a, b) = (nexus(1), nexus(2));
        assert_eq!(r.reserve6(&a), Outcome::Good);
        assert_eq!(r.reserve6(&a), Outcome::Good);
        assert_eq!(r.reserve6(&b), Outcome::Conflict);
        assert!(r.conflicts(&b, Access::Read));
        assert!(r.conflicts(&b, Access::PrAllowed));
        assert!(!r.conflicts(&b, Access::Unrestricted));
        r.release6(&b);
        assert!(r.conflicts(&b, Access::Read));
        r.nexus_gone(&a);
        assert_eq!(r.reserve6(&b), Outcome::Good);
        r.reset();
        assert!(!r.conflicts(&a, Access::Write));
        // A persistent reservation blocks RESERVE(6) for everyone but its holder.
        out(&mut r, &a, 6, 0, 0, 1);
        out(&mut r, &a, 1, 1, 1, 0);
        assert_eq!(r.reserve6(&b), Outcome::Conflict);
        assert_eq!(r.reserve6(&a), Outcome::Good);
        assert!(r.reserve6.is_none());
    }

    #[test]
    fn parameter_checks() {
        let mut r = Reservations::default();
        let a = nexus(1);
        let cdb = [0x5F, 6, 0, 0, 0, 0, 0, 0, 20, 0];
        let (o, _) = r.persistent_reserve_out(&a, &cdb, &[0; 20]);
        assert_eq!(o, Outcome::Error(Sense::param_list_length_error()));
        let mut data = [0u8; 24];
        data[15] = 1;
        data[20] = 0x01; // APTPL
        let cdb = [0x5F, 6, 0, 0, 0, 0, 0, 0, 24, 0];
        assert!(matches!(
            r.persistent_reserve_out(&a, &cdb, &data).0,
            Outcome::Error(_)
        ));
        out(&mut r, &a, 6, 0, 0, 1);
        assert!(matches!(out(&mut r, &a, 1, 0x12, 1, 0), Outcome::Error(_)));
        assert!(matches!(out(&mut r, &a, 1, 2, 1, 0), Outcome::Error(_)));
        assert!(
            r.persistent_reserve_in(&[0x5E, 4, 0, 0, 0, 0, 0, 0, 64, 0])
                .is_err()
        );
    }

    #[test]
    fn capabilities_and_full_status() {
        let mut r = Reservations::default();
        let a = nexus(1);
        let caps = r
            .persistent_reserve_in(&[0x5E, 2, 0, 0, 0, 0, 0, 0, 64, 0])
            .unwrap();
        assert_eq!(be16(&caps, 0), 8);
        assert_eq!((caps[3] >> 4) & 7, 1);
        assert_eq!(be16(&caps, 4), 0xEA01);
        out(&mut r, &a, 6, 0, 0, 7);
        out(&mut r, &a, 1, 3, 7, 0);
        let d = r
            .persistent_reserve_in(&[0x5E, 3, 0, 0, 0, 0, 0, 0x10, 0, 0])
            .unwrap();
        assert_eq!(be32(&d, 4) as usize, d.len() - 8);
        assert_eq!(be64(&d, 8), 7);
        assert_eq!((d[8 + 12], d[8 + 13]), (1, 3));
        let id_len = be32(&d, 8 + 20) as usize;
        assert_eq!(id_len % 4, 0);
        assert_eq!(d[8 + 24], 0x45);
        assert_eq!(d.len(), 8 + 24 + id_len);
    }
}
