//! One NVMe controller (dynamic model): created by an admin-queue Connect, joined by I/O queues,
//! gone when its admin queue goes, its keep-alive expires or its subsystem is unexported. Holds
//! the properties (CAP, VS, CC, CSTS), features, asynchronous event requests and the keep-alive
//! clock, and answers admin commands. Transport-independent.

use std::collections::{BTreeSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tokio::sync::{Notify, watch};

use super::identify;
use super::spec::{Completion, Sqe, Status, admin, fctype, feature, log, prop};
use super::subsystem::{IO_QUEUE_ENTRIES, MAX_IO_QUEUES, Namespace, Registry, Subsystem};

/// NVMe version the controllers report (1.3: namespace descriptors, no 2.0 command sets).
pub const VERSION: u32 = 0x0001_0300;
/// Asynchronous event requests a controller holds at once (Identify AERL + 1).
pub const MAX_AERS: usize = 4;
/// CC fields.
const CC_EN: u32 = 1;
const CC_SHN_SHIFT: u32 = 14;
/// CSTS fields.
const CSTS_RDY: u32 = 1;
const CSTS_CFS: u32 = 2;
const CSTS_SHST_PROCESSING: u32 = 1 << 2;
const CSTS_SHST_COMPLETE: u32 = 2 << 2;
const CSTS_SHST_MASK: u32 = 3 << 2;
/// Async event config bits we can raise.
pub const AEC_NS_ATTRIBUTE: u32 = 1 << 8;
pub const AEC_DISCOVERY_LOG: u32 = 1 << 31;

/// Features an I/O controller only records and reports back (nothing here acts on them).
const PLAIN_FEATURES: [u8; 5] = [
    feature::ARBITRATION,
    feature::TEMPERATURE_THRESHOLD,
    feature::ERROR_RECOVERY,
    feature::INTERRUPT_COALESCING,
    feature::WRITE_ATOMICITY,
];

/// How Keep Alive is enforced.
#[derive(Clone, Copy, Debug)]
pub struct KatoPolicy {
    /// KATO of a discovery controller whose host asked for none (Linux `nvme discover`
    /// does): without one a host that vanished would hold it for ever.
    pub discovery_default_ms: u32,
    /// Added to the host's KATO before a controller is declared dead: the keep-alive's own
    /// transit time (NVMe Base 7.12 allows for it).
    pub slack: Duration,
}

impl Default for KatoPolicy {
    fn default() -> Self {
        KatoPolicy {
            discovery_default_ms: 120_000,
            slack: Duration::from_secs(1),
        }
    }
}

impl KatoPolicy {
    pub(crate) fn effective(&self, kato_ms: u32, discovery: bool) -> (u32, Duration) {
        let ms = if kato_ms == 0 && discovery {
            self.discovery_default_ms
        } else {
            kato_ms
        };
        (ms, self.slack)
    }
}

#[derive(Debug)]
struct State {
    cc: u32,
    csts: u32,
    kato_ms: u32,
    aec: u32,
    /// I/O queues granted by Set Features Number of Queues.
    io_queues_granted: u16,
    io_queues: BTreeSet<u16>,
    /// Volatile write cache enabled (Set Features 06h): when off, every write is FUA.
    write_cache: bool,
    /// Command ids of held Asynchronous Event Requests.
    aers: VecDeque<u16>,
    /// Events not yet reported (completion dword 0).
    events: VecDeque<u32>,
    /// Event types reported and not yet cleared by reading their log page (masked until then).
    masked: u32,
    changed_ns: BTreeSet<u32>,
    /// Stored values of features we only record.
    plain_features: [u32; 16],
    /// The host asked for a shutdown (CC.SHN) and the flush it needs has not started.
    shutdown_requested: bool,
}

/// What an admin command came to.
#[derive(Debug)]
pub enum AdminOutcome {
    Done(Completion),
    /// An Asynchronous Event Request: answered later, when an event happens.
    Held,
}

/// Where the host reached us: what the discovery log reports when nothing is advertised.
#[derive(Clone, Debug)]
pub struct Portal {
    pub traddr: String,
    pub trsvcid: String,
}

impl Portal {
    /// From `host:port` (IPv6 in brackets).
    pub fn parse(addr: &str) -> Portal {
        match addr.rsplit_once(':') {
            Some((h, p)) => Portal {
                traddr: h.trim_start_matches('[').trim_end_matches(']').to_string(),
                trsvcid: p.to_string(),
            },
            None => Portal {
                traddr: addr.to_string(),
                trsvcid: "4420".into(),
            },
        }
    }
}

pub struct Controller {
    pub cntlid: u16,
    subsystem: Option<Arc<Subsystem>>,
    registry: Weak<Registry>,
    pub hostnqn: String,
    pub hostid: [u8; 16],
    state: Mutex<State>,
    epoch: Instant,
    /// Milliseconds since `epoch` of the last keep-alive.
    last_alive_ms: AtomicU64,
    slack: Duration,
    kill_tx: watch::Sender<Option<String>>,
    /// Woken when an event may complete a held AER.
    pub events: Notify,
}

impl std::fmt::Debug for Controller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Controller")
            .field("cntlid", &self.cntlid)
            .field("subsystem", &self.subsystem_nqn())
            .field("hostnqn", &self.hostnqn)
            .finish()
    }
}

impl Controller {
    pub(crate) fn new(
        cntlid: u16,
        subsystem: Option<Arc<Subsystem>>,
        registry: Weak<Registry>,
        hostnqn: String,
        hostid: [u8; 16],
        (kato_ms, slack): (u32, Duration),
    ) -> Controller {
        Controller {
            cntlid,
            subsystem,
            registry,
            hostnqn,
            hostid,
            state: Mutex::new(State {
                cc: 0,
                csts: 0,
                kato_ms,
                aec: 0,
                io_queues_granted: MAX_IO_QUEUES,
                io_queues: BTreeSet::new(),
                write_cache: true,
                aers: VecDeque::new(),
                events: VecDeque::new(),
                masked: 0,
                changed_ns: BTreeSet::new(),
                plain_features: [0; 16],
                shutdown_requested: false,
            }),
            epoch: Instant::now(),
            last_alive_ms: AtomicU64::new(0),
            slack,
            kill_tx: watch::channel(None).0,
            events: Notify::new(),
        }
    }

    pub fn is_discovery(&self) -> bool {
        self.subsystem.is_none()
    }

    pub fn subsystem(&self) -> Option<&Arc<Subsystem>> {
        self.subsystem.as_ref()
    }

    pub fn subsystem_nqn(&self) -> &str {
        match &self.subsystem {
            Some(s) => &s.config.nqn,
            None => super::spec::DISCOVERY_NQN,
        }
    }

    pub fn namespace(&self, nsid: u32) -> Option<&Arc<Namespace>> {
        self.subsystem.as_ref().and_then(|s| s.namespace(nsid))
    }

    pub fn write_cache(&self) -> bool {
        self.state.lock().write_cache
    }

    pub fn kato_ms(&self) -> u32 {
        self.state.lock().kato_ms
    }

    // ------------------------------------------------------------ life

    /// Ends the controller: every queue bound to it closes.
    pub fn kill(&self, why: &str) {
        self.kill_tx.send_if_modified(|k| {
            if k.is_none() {
                *k = Some(why.to_string());
                true
            } else {
                false
            }
        });
    }

    /// Why the controller ended, if it did.
    pub fn killed(&self) -> Option<String> {
        self.kill_tx.borrow().clone()
    }

    pub fn kill_watch(&self) -> watch::Receiver<Option<String>> {
        self.kill_tx.subscribe()
    }

    /// The host is alive (a Keep Alive or any other command came).
    pub fn keep_alive(&self) {
        let ms = self.epoch.elapsed().as_millis() as u64;
        self.last_alive_ms.store(ms, Ordering::Relaxed);
    }

    /// When the controller is to be declared dead unless the host shows life before; `None`
    /// when the host disabled keep-alive (KATO 0).
    pub fn keep_alive_deadline(&self) -> Option<Instant> {
        let kato = self.state.lock().kato_ms;
        (kato != 0).then(|| {
            self.epoch
                + Duration::from_millis(self.last_alive_ms.load(Ordering::Relaxed))
                + Duration::from_millis(u64::from(kato))
                + self.slack
        })
    }

    pub(crate) fn attach_io_queue(&self, qid: u16) -> Result<(), Status> {
        let mut st = self.state.lock();
        if st.csts & CSTS_RDY == 0 {
            return Err(Status::COMMAND_SEQUENCE_ERROR);
        }
        if qid == 0 || qid > st.io_queues_granted || !st.io_queues.insert(qid) {
            return Err(Status::CONNECT_INVALID_PARAMETERS);
        }
        Ok(())
    }

    pub fn detach_io_queue(&self, qid: u16) {
        self.state.lock().io_queues.remove(&qid);
    }

    // ------------------------------------------------------------ events

    pub(crate) fn namespace_changed(&self, nsid: u32) {
        let mut st = self.state.lock();
        st.changed_ns.insert(nsid);
        self.raise(
            &mut st,
            AEC_NS_ATTRIBUTE,
            // Notice (02h), namespace attribute changed (info 00h), log page 04h.
            0x02 | (u32::from(log::CHANGED_NAMESPACES) << 16),
        );
    }

    pub(crate) fn discovery_log_changed(&self) {
        let mut st = self.state.lock();
        self.raise(
            &mut st,
            AEC_DISCOVERY_LOG,
            0x02 | (0xf0 << 8) | (u32::from(log::DISCOVERY) << 16),
        );
    }

    fn raise(&self, st: &mut State, aec_bit: u32, dw0: u32) {
        if st.aec & aec_bit == 0 || st.masked & aec_bit != 0 {
            return;
        }
        st.masked |= aec_bit;
        st.events.push_back(dw0);
        self.events.notify_one();
    }

    /// Held AERs paired with pending events: (command id, completion dword 0) to send.
    pub fn take_event_completions(&self) -> Vec<(u16, u32)> {
        let mut st = self.state.lock();
        let mut out = Vec::new();
        while !st.aers.is_empty() && !st.events.is_empty() {
            if let (Some(cid), Some(ev)) = (st.aers.pop_front(), st.events.pop_front()) {
                out.push((cid, ev));
            }
        }
        out
    }

    /// AERs still held (completed with ABORT REQUESTED when the admin queue ends).
    pub fn take_held_aers(&self) -> Vec<u16> {
        self.state.lock().aers.drain(..).collect()
    }

    // ------------------------------------------------------------ admin commands

    /// Runs an admin command (or a fabrics Property Get/Set/Disconnect) that arrived on the
    /// admin queue with `_data` from the host (none of the admin commands we take carries
    /// any yet). `portal` is where the host reached us.
    pub fn admin(&self, sqe: &Sqe, _data: &[u8], portal: &Portal) -> AdminOutcome {
        self.keep_alive();
        let done = AdminOutcome::Done;
        let discovery = self.is_discovery();
        match sqe.opcode() {
            admin::FABRICS => done(self.fabrics(sqe)),
            admin::KEEP_ALIVE => done(Completion::ok()),
            admin::IDENTIFY => done(self.identify(sqe)),
            admin::GET_LOG_PAGE => done(self.get_log_page(sqe, portal)),
            admin::SET_FEATURES => done(self.set_features(sqe)),
            admin::GET_FEATURES => done(self.get_features(sqe)),
            admin::ASYNC_EVENT_REQUEST => {
                let mut st = self.state.lock();
                if st.aers.len() >= MAX_AERS {
                    return done(Completion::status(Status::AER_LIMIT_EXCEEDED));
                }
                st.aers.push_back(sqe.cid());
                if !st.events.is_empty() {
                    self.events.notify_one();
                }
                AdminOutcome::Held
            }
            // Commands are too quick to abort: "not aborted" (dword 0 bit 0).
            admin::ABORT if !discovery => done(Completion::dw0(1)),
            _ => done(Completion::status(Status::INVALID_OPCODE)),
        }
    }

    fn fabrics(&self, sqe: &Sqe) -> Completion {
        match sqe.fctype() {
            fctype::PROPERTY_GET => {
                let eight = sqe.cdw(10) & 7 == 1;
                match (sqe.cdw(11), eight) {
                    (prop::CAP, true) => {
                        let cap = self.cap();
                        Completion {
                            dw1: (cap >> 32) as u32,
                            ..Completion::dw0(cap as u32)
                        }
                    }
                    (prop::VS, false) => Completion::dw0(VERSION),
                    (prop::CC, false) => Completion::dw0(self.state.lock().cc),
                    (prop::CSTS, false) => Completion::dw0(self.state.lock().csts),
                    _ => Completion::status(Status::INVALID_FIELD),
                }
            }
            fctype::PROPERTY_SET => {
                if sqe.cdw(10) & 7 != 0 || sqe.cdw(11) != prop::CC {
                    return Completion::status(Status::INVALID_FIELD);
                }
                self.set_cc(sqe.cdw(12));
                Completion::ok()
            }
            fctype::DISCONNECT => Completion::ok(),
            // Connect twice on one queue.
            fctype::CONNECT => Completion::status(Status::COMMAND_SEQUENCE_ERROR),
            _ => Completion::status(Status::INVALID_OPCODE),
        }
    }

    fn cap(&self) -> u64 {
        let mqes = u64::from(IO_QUEUE_ENTRIES - 1);
        let cqr = 1u64 << 16;
        let timeout = 15u64 << 24; // 7.5 s, in 500 ms units
        let css_nvm = 1u64 << 37;
        mqes | cqr | timeout | css_nvm
    }

    fn set_cc(&self, cc: u32) {
        let mut st = self.state.lock();
        let was_enabled = st.cc & CC_EN != 0;
        st.cc = cc;
        if cc & CC_EN != 0 && !was_enabled {
            let iosqes = (cc >> 16) & 0xf;
            let iocqes = (cc >> 20) & 0xf;
            let mps = (cc >> 7) & 0xf;
            let css = (cc >> 4) & 7;
            let ok = mps == 0 && css == 0 && (self.is_discovery() || (iosqes == 6 && iocqes == 4));
            st.csts = if ok { CSTS_RDY } else { CSTS_CFS };
        } else if cc & CC_EN == 0 && was_enabled {
            st.csts &= !CSTS_RDY;
        }
        if (cc >> CC_SHN_SHIFT) & 3 != 0 && st.csts & CSTS_SHST_MASK == 0 {
            // A shutdown makes the volatile write cache durable first: "processing" until the
            // driver has run [`Controller::finish_shutdown`] (the host polls CSTS).
            st.csts |= CSTS_SHST_PROCESSING;
            st.shutdown_requested = true;
        }
    }

    /// Whether a shutdown flush is to be started (true once per CC.SHN).
    pub fn take_shutdown_request(&self) -> bool {
        std::mem::take(&mut self.state.lock().shutdown_requested)
    }

    /// Flushes every namespace, then reports the shutdown complete. Blocking: the driver runs
    /// it off its network task.
    pub fn finish_shutdown(&self) {
        if let Some(sub) = &self.subsystem {
            for (nsid, ns) in &sub.config.namespaces {
                if let Err(e) = ns.dev.flush() {
                    tracing::warn!(cntlid = self.cntlid, nsid, "flush at shutdown failed: {e}");
                }
            }
        }
        let mut st = self.state.lock();
        st.csts = (st.csts & !CSTS_SHST_MASK) | CSTS_SHST_COMPLETE;
    }

    #[cfg(test)]
    pub(crate) fn set_property_for_test_enable(&self) {
        self.set_cc(1 | (6 << 16) | (4 << 20));
    }

    fn identify(&self, sqe: &Sqe) -> Completion {
        let cns = (sqe.cdw(10) & 0xff) as u8;
        let nsid = sqe.nsid();
        match (cns, &self.subsystem) {
            (identify::CNS_CONTROLLER, _) => {
                let st = self.state.lock();
                Completion::data(identify::controller(self, st.aec).to_vec())
            }
            (identify::CNS_NAMESPACE, Some(sub)) => match sub.namespace(nsid) {
                Some(ns) => Completion::data(identify::namespace(ns).to_vec()),
                None if nsid == 0 || nsid == 0xffff_ffff => {
                    Completion::status(Status::INVALID_NAMESPACE)
                }
                // A valid but inactive namespace id reads as zeroes.
                None => Completion::data(vec![0; 4096]),
            },
            (identify::CNS_ACTIVE_NAMESPACES, Some(sub)) => {
                if nsid >= 0xffff_fffe {
                    return Completion::status(Status::INVALID_NAMESPACE);
                }
                Completion::data(identify::active_namespaces(sub, nsid).to_vec())
            }
            (identify::CNS_NS_DESCRIPTORS, Some(sub)) => match sub.namespace(nsid) {
                Some(ns) => Completion::data(identify::ns_descriptors(ns).to_vec()),
                None => Completion::status(Status::INVALID_NAMESPACE),
            },
            // I/O command set specific controller data: nothing beyond the NVM basics.
            (identify::CNS_CSI_CONTROLLER, Some(_)) => Completion::data(vec![0; 4096]),
            _ => Completion::status(Status::INVALID_FIELD),
        }
    }

    fn get_log_page(&self, sqe: &Sqe, portal: &Portal) -> Completion {
        let lid = (sqe.cdw(10) & 0xff) as u8;
        let retain = sqe.cdw(10) & (1 << 15) != 0;
        let dwords = ((u64::from(sqe.cdw(11) & 0xffff) << 16) | u64::from(sqe.cdw(10) >> 16)) + 1;
        let offset = u64::from(sqe.cdw(12)) | (u64::from(sqe.cdw(13)) << 32);
        let len = dwords * 4;
        if offset % 4 != 0 || len > super::MAX_TRANSFER as u64 {
            return Completion::status(Status::INVALID_FIELD);
        }
        let page: Vec<u8> = match (lid, &self.subsystem) {
            (log::DISCOVERY, None) => {
                let reg = self.registry.upgrade();
                let (generation, subs) = match &reg {
                    Some(r) => (r.generation(), r.visible_to(&self.hostnqn)),
                    None => (0, Vec::new()),
                };
                let portal = match reg.as_ref().and_then(|r| r.advertise()) {
                    Some(a) => Portal::parse(a),
                    None => portal.clone(),
                };
                if !retain {
                    self.state.lock().masked &= !AEC_DISCOVERY_LOG;
                }
                identify::discovery_log(generation, &subs, &portal)
            }
            (log::ERROR, Some(_)) => vec![0; 64],
            (log::SMART, Some(sub)) => identify::smart_log(sub),
            (log::FIRMWARE_SLOT, Some(_)) => identify::firmware_log(),
            (log::CHANGED_NAMESPACES, Some(_)) => {
                let mut st = self.state.lock();
                let page = identify::changed_ns_log(&st.changed_ns);
                if !retain {
                    st.changed_ns.clear();
                    st.masked &= !AEC_NS_ATTRIBUTE;
                }
                page
            }
            (log::COMMANDS_SUPPORTED, Some(_)) => identify::commands_supported_log(),
            _ => return Completion::status(Status::INVALID_LOG_PAGE),
        };
        if offset > page.len() as u64 {
            return Completion::status(Status::INVALID_FIELD);
        }
        let start = offset as usize;
        let mut out = page[start..page.len().min(start + len as usize)].to_vec();
        out.resize(len as usize, 0);
        Completion::data(out)
    }

    fn set_features(&self, sqe: &Sqe) -> Completion {
        if sqe.cdw(10) & (1 << 31) != 0 {
            return Completion::status(Status::FEATURE_NOT_SAVEABLE);
        }
        let fid = (sqe.cdw(10) & 0xff) as u8;
        let v = sqe.cdw(11);
        let mut st = self.state.lock();
        let discovery = self.is_discovery();
        match fid {
            feature::KEEP_ALIVE_TIMER => {
                st.kato_ms = v;
                drop(st);
                self.keep_alive();
                Completion::ok()
            }
            feature::ASYNC_EVENT_CONFIG => {
                let supported = if discovery {
                    AEC_DISCOVERY_LOG
                } else {
                    AEC_NS_ATTRIBUTE
                };
                st.aec = v & supported;
                Completion::ok()
            }
            feature::NUMBER_OF_QUEUES if !discovery => {
                let (nsqr, ncqr) = (v & 0xffff, v >> 16);
                if nsqr == 0xffff || ncqr == 0xffff {
                    return Completion::status(Status::INVALID_FIELD);
                }
                let granted = (nsqr.max(ncqr) + 1).min(u32::from(MAX_IO_QUEUES)) as u16;
                st.io_queues_granted = granted;
                let n = u32::from(granted - 1);
                Completion::dw0(n | (n << 16))
            }
            feature::VOLATILE_WRITE_CACHE if !discovery => {
                st.write_cache = v & 1 != 0;
                Completion::ok()
            }
            feature::POWER_MANAGEMENT if !discovery => {
                // One power state (NPSS 0).
                if v & 0x1f != 0 {
                    return Completion::status(Status::INVALID_FIELD);
                }
                Completion::ok()
            }
            f if PLAIN_FEATURES.contains(&f) && !discovery => {
                st.plain_features[usize::from(fid & 0x0f)] = v;
                Completion::ok()
            }
            feature::HOST_IDENTIFIER => Completion::status(Status::COMMAND_SEQUENCE_ERROR),
            _ => Completion::status(Status::INVALID_FIELD),
        }
    }

    fn get_features(&self, sqe: &Sqe) -> Completion {
        let fid = (sqe.cdw(10) & 0xff) as u8;
        let sel = (sqe.cdw(10) >> 8) & 7;
        let discovery = self.is_discovery();
        let st = self.state.lock();
        let (current, default, changeable) = match fid {
            feature::KEEP_ALIVE_TIMER => (st.kato_ms, 0, true),
            feature::ASYNC_EVENT_CONFIG => (st.aec, 0, true),
            feature::NUMBER_OF_QUEUES if !discovery => {
                let n = u32::from(st.io_queues_granted - 1);
                let m = u32::from(MAX_IO_QUEUES - 1);
                (n | (n << 16), m | (m << 16), true)
            }
            feature::VOLATILE_WRITE_CACHE if !discovery => (u32::from(st.write_cache), 1, true),
            feature::POWER_MANAGEMENT if !discovery => (0, 0, true),
            f if PLAIN_FEATURES.contains(&f) && !discovery => {
                (st.plain_features[usize::from(fid & 0x0f)], 0, true)
            }
            feature::HOST_IDENTIFIER => {
                // Only the 128-bit host identifier (EXHID) exists over fabrics.
                if sqe.cdw(11) & 1 == 0 {
                    return Completion::status(Status::INVALID_FIELD);
                }
                return Completion::data(self.hostid.to_vec());
            }
            _ => return Completion::status(Status::INVALID_FIELD),
        };
        match sel {
            0 => Completion::dw0(current),
            1 | 2 => Completion::dw0(default),
            3 => Completion::dw0(if changeable { 1 << 2 } else { 0 }),
            _ => Completion::status(Status::INVALID_FIELD),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nvme::spec::le32;
    use crate::nvme::subsystem::{ConnectRequest, NamespaceIdentity, SubsystemConfig};
    use crate::nvme::testdisk::RamDisk;
    use std::collections::BTreeMap;

    fn setup() -> (Arc<Registry>, Arc<Controller>) {
        let reg = Arc::new(Registry::new(Some("10.0.2.2:4420".into())));
        let mut namespaces = BTreeMap::new();
        namespaces.insert(
            1,
            Arc::new(Namespace::new(
                Arc::new(RamDisk::new(1 << 30)),
                false,
                NamespaceIdentity::from_volume_id("v"),
            )),
        );
        reg.add(SubsystemConfig {
            nqn: "nqn.sub".into(),
            hosts: vec!["nqn.host".into()],
            namespaces,
            serial: "serial1".into(),
            model: "MaaS".into(),
            dhchap: None,
        });
        let req = ConnectRequest {
            qid: 0,
            sqsize: 31,
            disable_sq_flow_control: false,
            kato_ms: 5000,
            hostid: [3; 16],
            cntlid: 0xffff,
            subnqn: "nqn.sub".into(),
            hostnqn: "nqn.host".into(),
        };
        let c = reg.connect(&req, KatoPolicy::default()).unwrap();
        (reg, c)
    }

    fn portal() -> Portal {
        Portal::parse("127.0.0.1:4420")
    }

    fn run(c: &Controller, sqe: &Sqe) -> Completion {
        match c.admin(sqe, &[], &portal()) {
            AdminOutcome::Done(c) => c,
            AdminOutcome::Held => panic!("held"),
        }
    }

    fn fabrics(fct: u8, cdw10: u32, cdw11: u32, cdw12: u32) -> Sqe {
        let mut s = Sqe::new(admin::FABRICS, 1, 0);
        s.0[4] = fct;
        s.set_cdw(10, cdw10);
        s.set_cdw(11, cdw11);
        s.set_cdw(12, cdw12);
        s
    }

    #[test]
    fn enable_sets_ready_and_bad_queue_entry_sizes_are_fatal() {
        let (_r, c) = setup();
        let cap = run(&c, &fabrics(fctype::PROPERTY_GET, 1, prop::CAP, 0));
        assert_eq!(cap.dw0 & 0xffff, 127);
        assert_eq!(
            run(&c, &fabrics(fctype::PROPERTY_GET, 0, prop::VS, 0)).dw0,
            VERSION
        );
        run(
            &c,
            &fabrics(fctype::PROPERTY_SET, 0, prop::CC, 1 | (6 << 16) | (4 << 20)),
        );
        assert_eq!(
            run(&c, &fabrics(fctype::PROPERTY_GET, 0, prop::CSTS, 0)).dw0,
            CSTS_RDY
        );
        // Shutdown: processing until the flush ran, then complete.
        run(
            &c,
            &fabrics(
                fctype::PROPERTY_SET,
                0,
                prop::CC,
                1 | (6 << 16) | (4 << 20) | (1 << 14),
            ),
        );
        let csts = run(&c, &fabrics(fctype::PROPERTY_GET, 0, prop::CSTS, 0)).dw0;
        assert_eq!(csts & 0xc, CSTS_SHST_PROCESSING);
        assert!(c.take_shutdown_request());
        assert!(!c.take_shutdown_request(), "once per request");
        c.finish_shutdown();
        let csts = run(&c, &fabrics(fctype::PROPERTY_GET, 0, prop::CSTS, 0)).dw0;
        assert_eq!(csts & 0xc, CSTS_SHST_COMPLETE);
        let (_r, c) = setup();
        run(&c, &fabrics(fctype::PROPERTY_SET, 0, prop::CC, 1));
        assert_eq!(
            run(&c, &fabrics(fctype::PROPERTY_GET, 0, prop::CSTS, 0)).dw0,
            CSTS_CFS
        );
        // CAP is 8 bytes, VS is 4: the wrong size is refused.
        assert_eq!(
            run(&c, &fabrics(fctype::PROPERTY_GET, 0, prop::CAP, 0)).status,
            Status::INVALID_FIELD
        );
    }

    #[test]
    fn identify_reports_what_linux_checks() {
        let (_r, c) = setup();
        let mut s = Sqe::new(admin::IDENTIFY, 1, 0);
        s.set_cdw(10, 1);
        let id = run(&c, &s).data.unwrap();
        assert_eq!(id.len(), 4096);
        assert_eq!(&id[4..11], b"serial1");
        assert_eq!(u16::from_le_bytes([id[78], id[79]]), c.cntlid);
        assert_eq!(le32(&id, 80), VERSION);
        assert_eq!(id[512], 0x66);
        assert_eq!(id[513], 0x44);
        assert_eq!(le32(&id, 516), 1, "NN");
        assert_eq!(
            u16::from_le_bytes([id[520], id[521]]) & 0x0c,
            0x0c,
            "ONCS DSM|WZ"
        );
        assert_eq!(le32(&id, 536) & 0x0010_0001, 0x0010_0001, "SGLS");
        assert_eq!(u16::from_le_bytes([id[1800], id[1801]]), 0, "ICDOFF");
        assert!(le32(&id, 1792) >= 4, "IOCCSZ");
        assert_eq!(&id[768..775], b"nqn.sub");
        // Namespace: 1 GiB of 512-byte blocks.
        let mut s = Sqe::new(admin::IDENTIFY, 2, 1);
        s.set_cdw(10, 0);
        let ns = run(&c, &s).data.unwrap();
        assert_eq!(u64::from_le_bytes(ns[..8].try_into().unwrap()), 2 << 20);
        assert_eq!(ns[130], 9);
        // Active namespace list and descriptors.
        let mut s = Sqe::new(admin::IDENTIFY, 3, 0);
        s.set_cdw(10, 2);
        let list = run(&c, &s).data.unwrap();
        assert_eq!((le32(&list, 0), le32(&list, 4)), (1, 0));
        let mut s = Sqe::new(admin::IDENTIFY, 4, 1);
        s.set_cdw(10, 3);
        let d = run(&c, &s).data.unwrap();
        assert_eq!((d[0], d[1]), (1, 8));
        let mut s = Sqe::new(admin::IDENTIFY, 5, 7);
        s.set_cdw(10, 3);
        assert_eq!(run(&c, &s).status, Status::INVALID_NAMESPACE);
    }

    #[test]
    fn features_queues_and_keep_alive() {
        let (_r, c) = setup();
        let mut s = Sqe::new(admin::SET_FEATURES, 1, 0);
        s.set_cdw(10, u32::from(feature::NUMBER_OF_QUEUES));
        s.set_cdw(11, 3 | (3 << 16));
        assert_eq!(run(&c, &s).dw0, 3 | (3 << 16));
        s.set_cdw(11, 1000 | (1000 << 16));
        let n = u32::from(MAX_IO_QUEUES - 1);
        assert_eq!(run(&c, &s).dw0, n | (n << 16));
        s.set_cdw(10, u32::from(feature::KEEP_ALIVE_TIMER));
        s.set_cdw(11, 2000);
        run(&c, &s);
        assert_eq!(c.kato_ms(), 2000);
        let d = c.keep_alive_deadline().unwrap();
        assert!(d > Instant::now() + Duration::from_millis(2500));
        let mut g = Sqe::new(admin::GET_FEATURES, 2, 0);
        g.set_cdw(10, u32::from(feature::HOST_IDENTIFIER));
        g.set_cdw(11, 1);
        assert_eq!(run(&c, &g).data.unwrap().as_slice(), &[3; 16]);
        s.set_cdw(10, u32::from(feature::KEEP_ALIVE_TIMER) | (1 << 31));
        assert_eq!(run(&c, &s).status, Status::FEATURE_NOT_SAVEABLE);
    }

    #[test]
    fn namespace_change_completes_a_held_aer_once_until_the_log_is_read() {
        let (r, c) = setup();
        let mut s = Sqe::new(admin::SET_FEATURES, 1, 0);
        s.set_cdw(10, u32::from(feature::ASYNC_EVENT_CONFIG));
        s.set_cdw(11, AEC_NS_ATTRIBUTE);
        run(&c, &s);
        for cid in 10..14 {
            assert!(matches!(
                c.admin(
                    &Sqe::new(admin::ASYNC_EVENT_REQUEST, cid, 0),
                    &[],
                    &portal()
                ),
                AdminOutcome::Held
            ));
        }
        assert_eq!(
            run(&c, &Sqe::new(admin::ASYNC_EVENT_REQUEST, 20, 0)).status,
            Status::AER_LIMIT_EXCEEDED
        );
        r.namespace_changed("nqn.sub", 1);
        r.namespace_changed("nqn.sub", 1);
        let got = c.take_event_completions();
        assert_eq!(got, vec![(10, 0x0004_0002)]);
        // Masked until the changed namespace list is read.
        r.namespace_changed("nqn.sub", 1);
        assert!(c.take_event_completions().is_empty());
        let mut lp = Sqe::new(admin::GET_LOG_PAGE, 30, 0xffff_ffff);
        lp.set_cdw(10, u32::from(log::CHANGED_NAMESPACES) | (1023 << 16));
        let page = run(&c, &lp).data.unwrap();
        assert_eq!((le32(&page, 0), le32(&page, 4)), (1, 0));
        r.namespace_changed("nqn.sub", 1);
        assert_eq!(c.take_event_completions(), vec![(11, 0x0004_0002)]);
    }
}
