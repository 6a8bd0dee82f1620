//! What the NVMe target exports and who is connected: subsystems (one per export, each with
//! its namespaces and host allow-list), the live controllers, and Fabrics Connect, which binds
//! a queue to a new or existing controller. Transport-independent (TCP now, RDMA later).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use md5::{Digest, Md5};
use parking_lot::{Mutex, RwLock};
use tokio::sync::watch;

use super::controller::{Controller, KatoPolicy};
use super::spec::{DISCOVERY_NQN, Sqe, Status, get_str};
use crate::BlockDevice;

/// One namespace: a pool volume (or anything else that is a block device).
pub struct Namespace {
    pub dev: Arc<dyn BlockDevice>,
    pub read_only: bool,
    pub ident: NamespaceIdentity,
    /// What hosts did with it (the SMART log's counters).
    pub stats: IoStats,
}

impl Namespace {
    pub fn new(dev: Arc<dyn BlockDevice>, read_only: bool, ident: NamespaceIdentity) -> Namespace {
        Namespace {
            dev,
            read_only,
            ident,
            stats: IoStats::default(),
        }
    }
}

/// Commands and bytes served, for the SMART / Health log.
#[derive(Debug, Default)]
pub struct IoStats {
    pub reads: AtomicU64,
    pub writes: AtomicU64,
    pub bytes_read: AtomicU64,
    pub bytes_written: AtomicU64,
}

impl IoStats {
    pub fn read(&self, bytes: usize) {
        self.reads.fetch_add(1, Ordering::Relaxed);
        self.bytes_read.fetch_add(bytes as u64, Ordering::Relaxed);
    }
    pub fn wrote(&self, bytes: usize) {
        self.writes.fetch_add(1, Ordering::Relaxed);
        self.bytes_written
            .fetch_add(bytes as u64, Ordering::Relaxed);
    }
}

impl std::fmt::Debug for Namespace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Namespace")
            .field("capacity", &self.dev.capacity())
            .field("read_only", &self.read_only)
            .finish()
    }
}

/// The names by which hosts recognise a namespace across controllers, paths and restarts
/// (Identify Namespace NGUID/EUI64 and the namespace identification descriptors).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NamespaceIdentity {
    pub nguid: [u8; 16],
    pub eui64: [u8; 8],
    pub uuid: [u8; 16],
}

impl NamespaceIdentity {
    /// Derived from the volume id alone, so every node exporting the volume reports the same.
    pub fn from_volume_id(volume_id: &str) -> NamespaceIdentity {
        let d = |tag: &[u8]| -> [u8; 16] {
            Md5::new_with_prefix(tag)
                .chain_update(volume_id.as_bytes())
                .finalize()
                .into()
        };
        let nguid = d(b"maas-nvme-nguid\0");
        let mut uuid = d(b"maas-nvme-uuid\0");
        // RFC 4122 version 4 layout (name-derived, but shaped like any random UUID).
        uuid[6] = (uuid[6] & 0x0f) | 0x40;
        uuid[8] = (uuid[8] & 0x3f) | 0x80;
        let mut eui64 = [0u8; 8];
        eui64.copy_from_slice(&nguid[8..]);
        NamespaceIdentity { nguid, eui64, uuid }
    }
}

/// What an export is: a subsystem NQN, its namespaces and the hosts allowed in.
#[derive(Clone, Debug)]
pub struct SubsystemConfig {
    pub nqn: String,
    /// Host NQNs allowed to connect; empty refuses everyone.
    pub hosts: Vec<String>,
    /// Namespace id (1-based) -> namespace.
    pub namespaces: BTreeMap<u32, Arc<Namespace>>,
    /// Identify Controller serial number (20 ASCII characters at most).
    pub serial: String,
    pub model: String,
    /// DH-HMAC-CHAP in-band authentication every queue of every host must pass (None: no
    /// authentication beyond the allow-list).
    pub dhchap: Option<Arc<super::auth::DhchapConfig>>,
}

#[derive(Debug)]
pub struct Subsystem {
    pub config: SubsystemConfig,
    removed: watch::Sender<bool>,
}

impl Subsystem {
    /// Fires once the subsystem is unexported.
    pub fn removed(&self) -> watch::Receiver<bool> {
        self.removed.subscribe()
    }
    pub fn allows(&self, hostnqn: &str) -> bool {
        self.config.hosts.iter().any(|h| h == hostnqn)
    }
    pub fn namespace(&self, nsid: u32) -> Option<&Arc<Namespace>> {
        self.config.namespaces.get(&nsid)
    }
}

/// Parameters of a Fabrics Connect command and its 1 KiB of data.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConnectRequest {
    pub qid: u16,
    /// Submission queue size, 0-based.
    pub sqsize: u16,
    pub disable_sq_flow_control: bool,
    pub kato_ms: u32,
    pub hostid: [u8; 16],
    pub cntlid: u16,
    pub subnqn: String,
    pub hostnqn: String,
}

/// Connect data offsets (for the invalid-parameter location in a refusal).
const CD_CNTLID: u32 = 16;
const CD_SUBNQN: u32 = 256;
const CD_HOSTNQN: u32 = 512;
/// SQE byte offsets of Connect fields.
const SQE_QID: u32 = 42;
const SQE_SQSIZE: u32 = 44;

/// Why a Connect failed: the status, and dword 0 naming the invalid parameter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConnectRefusal {
    pub status: Status,
    pub dw0: u32,
    /// For the log only, where the wire answer is deliberately vaguer.
    logged_reason: Option<&'static str>,
}

impl ConnectRefusal {
    /// Why, in words an operator can act on (for the log: the host may have been told less).
    pub fn why(&self) -> &'static str {
        if let Some(r) = self.logged_reason {
            return r;
        }
        let in_data = self.dw0 & (1 << 16) != 0;
        let offset = self.dw0 & 0xffff;
        match (self.status, in_data, offset) {
            (s, _, _) if s == Status::CONNECT_INVALID_HOST => {
                "the host NQN is not on the export's allow-list"
            }
            (s, true, CD_SUBNQN) if s == Status::CONNECT_INVALID_PARAMETERS => {
                "no subsystem with this NQN is exported here"
            }
            (s, true, CD_CNTLID) if s == Status::CONNECT_INVALID_PARAMETERS => {
                "no such controller for this host and subsystem"
            }
            (s, false, SQE_SQSIZE) if s == Status::CONNECT_INVALID_PARAMETERS => {
                "queue size out of range"
            }
            (s, false, SQE_QID) if s == Status::CONNECT_INVALID_PARAMETERS => {
                "queue id not granted, already connected, or not allowed here"
            }
            (s, _, _) if s == Status::COMMAND_SEQUENCE_ERROR => "the controller is not enabled yet",
            (s, _, _) if s == Status::CONNECT_CONTROLLER_BUSY => "too many controllers",
            (s, _, _) if s == Status::CONNECT_INCOMPATIBLE_FORMAT => {
                "unknown Connect record format"
            }
            _ => "malformed Connect",
        }
    }

    fn in_data(status: Status, offset: u32) -> ConnectRefusal {
        ConnectRefusal {
            status,
            dw0: (1 << 16) | offset,
            logged_reason: None,
        }
    }
    fn in_sqe(status: Status, offset: u32) -> ConnectRefusal {
        ConnectRefusal {
            status,
            dw0: offset,
            logged_reason: None,
        }
    }
    /// An unknown subsystem and a host not on a subsystem's allow-list get the same answer
    /// (Connect Invalid Host, naming the host NQN), so that nobody can find out by connecting
    /// which subsystems exist — as the discovery log lists only the subsystems a host may use,
    /// and as iSCSI login answers unknown targets and unlisted initiators alike.
    fn not_yours(reason: &'static str) -> ConnectRefusal {
        ConnectRefusal {
            logged_reason: Some(reason),
            ..ConnectRefusal::in_data(Status::CONNECT_INVALID_HOST, CD_HOSTNQN)
        }
    }
}

impl ConnectRequest {
    pub fn parse(sqe: &Sqe, data: &[u8]) -> Result<ConnectRequest, ConnectRefusal> {
        if sqe.cdw(10) & 0xffff != 0 {
            // Record format 0 is the only one there is.
            return Err(ConnectRefusal::in_sqe(
                Status::CONNECT_INCOMPATIBLE_FORMAT,
                40,
            ));
        }
        if data.len() < 1024 {
            return Err(ConnectRefusal::in_sqe(Status::SGL_LENGTH_INVALID, 24));
        }
        let mut hostid = [0u8; 16];
        hostid.copy_from_slice(&data[..16]);
        Ok(ConnectRequest {
            qid: (sqe.cdw(10) >> 16) as u16,
            sqsize: sqe.cdw(11) as u16,
            disable_sq_flow_control: (sqe.cdw(11) >> 16) & 0x04 != 0,
            kato_ms: sqe.cdw(12),
            hostid,
            cntlid: super::spec::le16(data, 16),
            subnqn: get_str(&data[256..512]),
            hostnqn: get_str(&data[512..768]),
        })
    }
}

/// Largest admin queue (entries): what Linux asks for.
pub const ADMIN_QUEUE_ENTRIES: u32 = 32;
/// Largest I/O queue (entries); also Identify's MAXCMD.
pub const IO_QUEUE_ENTRIES: u32 = 128;
/// I/O queues a controller grants.
pub const MAX_IO_QUEUES: u16 = 64;

/// Every subsystem and controller of one target.
#[derive(Debug)]
pub struct Registry {
    subsystems: RwLock<BTreeMap<String, Arc<Subsystem>>>,
    controllers: Mutex<HashMap<u16, Arc<Controller>>>,
    next_cntlid: Mutex<u16>,
    /// `host:port` the discovery log page reports (empty: the address the host reached).
    advertise: Option<String>,
    /// Discovery log generation: bumped whenever the set of subsystems changes.
    generation: AtomicU64,
    generation_tx: watch::Sender<u64>,
}

impl Registry {
    pub fn new(advertise: Option<String>) -> Registry {
        Registry {
            subsystems: RwLock::new(BTreeMap::new()),
            controllers: Mutex::new(HashMap::new()),
            next_cntlid: Mutex::new(1),
            advertise: advertise.filter(|a| !a.is_empty()),
            generation: AtomicU64::new(1),
            generation_tx: watch::channel(1).0,
        }
    }

    pub fn advertise(&self) -> Option<&str> {
        self.advertise.as_deref()
    }

    /// Exports a subsystem (replacing one of the same NQN, whose controllers end).
    pub fn add(&self, config: SubsystemConfig) {
        let nqn = config.nqn.clone();
        let sub = Arc::new(Subsystem {
            config,
            removed: watch::channel(false).0,
        });
        if let Some(old) = self.subsystems.write().insert(nqn, sub) {
            old.removed.send_replace(true);
        }
        self.bump_generation();
    }

    /// Unexports a subsystem; its controllers end. False if there was none.
    pub fn remove(&self, nqn: &str) -> bool {
        let old = self.subsystems.write().remove(nqn);
        match old {
            Some(s) => {
                s.removed.send_replace(true);
                self.bump_generation();
                true
            }
            None => false,
        }
    }

    fn bump_generation(&self) {
        let g = self.generation.fetch_add(1, Ordering::SeqCst) + 1;
        self.generation_tx.send_replace(g);
        for c in self.controllers.lock().values() {
            if c.is_discovery() {
                c.discovery_log_changed();
            }
        }
    }

    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::SeqCst)
    }

    pub fn subsystem(&self, nqn: &str) -> Option<Arc<Subsystem>> {
        self.subsystems.read().get(nqn).cloned()
    }

    /// The subsystems `hostnqn` may see, in NQN order.
    pub fn visible_to(&self, hostnqn: &str) -> Vec<Arc<Subsystem>> {
        self.subsystems
            .read()
            .values()
            .filter(|s| s.allows(hostnqn))
            .cloned()
            .collect()
    }

    /// Tells the controllers of `nqn` that namespace `nsid` changed (e.g. it grew).
    pub fn namespace_changed(&self, nqn: &str, nsid: u32) {
        for c in self.controllers.lock().values() {
            if c.subsystem_nqn() == nqn {
                c.namespace_changed(nsid);
            }
        }
    }

    pub fn controller_count(&self) -> usize {
        self.controllers.lock().len()
    }

    /// Fabrics Connect: an admin queue creates a controller, an I/O queue joins one.
    pub fn connect(
        self: &Arc<Self>,
        req: &ConnectRequest,
        kato: KatoPolicy,
    ) -> Result<Arc<Controller>, ConnectRefusal> {
        let discovery = req.subnqn == DISCOVERY_NQN;
        let sub = if discovery {
            None
        } else {
            let sub = self.subsystem(&req.subnqn).ok_or_else(|| {
                ConnectRefusal::not_yours("no subsystem with this NQN is exported here")
            })?;
            if !sub.allows(&req.hostnqn) {
                return Err(ConnectRefusal::not_yours(
                    "the host NQN is not on the export's allow-list",
                ));
            }
            Some(sub)
        };
        if req.qid == 0 {
            if req.sqsize == 0 || u32::from(req.sqsize) >= ADMIN_QUEUE_ENTRIES {
                return Err(ConnectRefusal::in_sqe(
                    Status::CONNECT_INVALID_PARAMETERS,
                    SQE_SQSIZE,
                ));
            }
            if req.cntlid != 0xffff && req.cntlid != 0xfffe {
                // Static controllers only exist in the static controller model; ours is dynamic.
                return Err(ConnectRefusal::in_data(
                    Status::CONNECT_INVALID_PARAMETERS,
                    CD_CNTLID,
                ));
            }
            let mut ctrls = self.controllers.lock();
            if ctrls.len() >= 0xffef {
                return Err(ConnectRefusal::in_sqe(Status::CONNECT_CONTROLLER_BUSY, 0));
            }
            let cntlid = {
                let mut next = self.next_cntlid.lock();
                loop {
                    let id = *next;
                    *next = if id >= 0xffef { 1 } else { id + 1 };
                    if !ctrls.contains_key(&id) {
                        break id;
                    }
                }
            };
            let ctrl = Arc::new(Controller::new(
                cntlid,
                sub,
                Arc::downgrade(self),
                req.hostnqn.clone(),
                req.hostid,
                kato.effective(req.kato_ms, discovery),
            ));
            ctrls.insert(cntlid, ctrl.clone());
            Ok(ctrl)
        } else {
            if discovery {
                return Err(ConnectRefusal::in_sqe(
                    Status::CONNECT_INVALID_PARAMETERS,
                    SQE_QID,
                ));
            }
            let ctrl = self
                .controllers
                .lock()
                .get(&req.cntlid)
                .cloned()
                .filter(|c| c.subsystem_nqn() == req.subnqn && c.hostnqn == req.hostnqn)
                .ok_or_else(|| {
                    ConnectRefusal::in_data(Status::CONNECT_INVALID_PARAMETERS, CD_CNTLID)
                })?;
            if req.sqsize == 0 || u32::from(req.sqsize) >= IO_QUEUE_ENTRIES {
                return Err(ConnectRefusal::in_sqe(
                    Status::CONNECT_INVALID_PARAMETERS,
                    SQE_SQSIZE,
                ));
            }
            match ctrl.attach_io_queue(req.qid) {
                Ok(()) => Ok(ctrl),
                Err(status) => Err(ConnectRefusal::in_sqe(status, SQE_QID)),
            }
        }
    }

    /// Ends a controller (its queues close); idempotent.
    pub fn remove_controller(&self, cntlid: u16, why: &str) {
        let c = self.controllers.lock().remove(&cntlid);
        if let Some(c) = c {
            c.kill(why);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nvme::spec::{admin, fctype, put_str, put16};

    fn connect_sqe(qid: u16, sqsize: u16, kato: u32) -> Sqe {
        let mut s = Sqe::new(admin::FABRICS, 1, 0);
        s.0[4] = fctype::CONNECT;
        s.set_cdw(10, u32::from(qid) << 16);
        s.set_cdw(11, u32::from(sqsize));
        s.set_cdw(12, kato);
        s
    }

    pub(crate) fn connect_data(cntlid: u16, subnqn: &str, hostnqn: &str) -> Vec<u8> {
        let mut d = vec![0u8; 1024];
        d[..16].copy_from_slice(&[7; 16]);
        put16(&mut d, 16, cntlid);
        put_str(&mut d, 256, 256, subnqn, 0);
        put_str(&mut d, 512, 256, hostnqn, 0);
        d
    }

    #[test]
    fn connect_parses_the_command_and_its_data() {
        let mut sqe = connect_sqe(3, 127, 5000);
        sqe.set_cdw(11, 127 | (0x04 << 16));
        let r = ConnectRequest::parse(&sqe, &connect_data(9, "nqn.sub", "nqn.host")).unwrap();
        assert_eq!(r.qid, 3);
        assert_eq!(r.sqsize, 127);
        assert!(r.disable_sq_flow_control);
        assert_eq!(r.kato_ms, 5000);
        assert_eq!(r.cntlid, 9);
        assert_eq!(r.subnqn, "nqn.sub");
        assert_eq!(r.hostnqn, "nqn.host");
        assert!(ConnectRequest::parse(&sqe, &[0u8; 100]).is_err());
    }

    #[test]
    fn unlisted_hosts_and_unknown_subsystems_are_refused() {
        let reg = Arc::new(Registry::new(None));
        reg.add(SubsystemConfig {
            nqn: "nqn.sub".into(),
            hosts: vec!["nqn.good".into()],
            namespaces: BTreeMap::new(),
            serial: "s".into(),
            model: "m".into(),
            dhchap: None,
        });
        let k = KatoPolicy::default();
        let req = |sub: &str, host: &str| {
            ConnectRequest::parse(&connect_sqe(0, 31, 5000), &connect_data(0xffff, sub, host))
                .unwrap()
        };
        let e = reg.connect(&req("nqn.sub", "nqn.bad"), k).unwrap_err();
        assert_eq!(e.status, Status::CONNECT_INVALID_HOST);
        assert!(e.why().contains("allow-list"));
        assert_eq!(e.dw0, (1 << 16) | 512);
        let unknown = reg.connect(&req("nqn.nope", "nqn.good"), k).unwrap_err();
        assert!(unknown.why().contains("no subsystem"));
        // The same answer on the wire: subsystem names cannot be probed.
        assert_eq!((unknown.status, unknown.dw0), (e.status, e.dw0));
        let c = reg.connect(&req("nqn.sub", "nqn.good"), k).unwrap();
        assert_eq!(reg.controller_count(), 1);
        // I/O queues join the controller by cntlid, only for the same host and subsystem.
        let io = |cntlid: u16, host: &str, qid: u16| {
            ConnectRequest::parse(
                &connect_sqe(qid, 127, 0),
                &connect_data(cntlid, "nqn.sub", host),
            )
            .unwrap()
        };
        assert!(reg.connect(&io(c.cntlid, "nqn.bad", 1), k).is_err());
        assert!(reg.connect(&io(c.cntlid + 1, "nqn.good", 1), k).is_err());
        // The controller must be enabled (CC.EN) first.
        assert!(reg.connect(&io(c.cntlid, "nqn.good", 1), k).is_err());
        c.set_property_for_test_enable();
        assert!(reg.connect(&io(c.cntlid, "nqn.good", 1), k).is_ok());
        // The same queue twice is refused.
        assert!(reg.connect(&io(c.cntlid, "nqn.good", 1), k).is_err());
        reg.remove_controller(c.cntlid, "test");
        assert_eq!(reg.controller_count(), 0);
        assert!(c.killed().is_some());
    }

    #[test]
    fn discovery_is_open_to_every_host_and_lists_only_allowed_subsystems() {
        let reg = Arc::new(Registry::new(None));
        for (nqn, host) in [("nqn.a", "nqn.h1"), ("nqn.b", "nqn.h2")] {
            reg.add(SubsystemConfig {
                nqn: nqn.into(),
                hosts: vec![host.into()],
                namespaces: BTreeMap::new(),
                serial: "s".into(),
                model: "m".into(),
                dhchap: None,
            });
        }
        let names = |h: &str| {
            reg.visible_to(h)
                .iter()
                .map(|s| s.config.nqn.clone())
                .collect::<Vec<_>>()
        };
        assert_eq!(names("nqn.h1"), ["nqn.a"]);
        assert_eq!(names("nqn.h2"), ["nqn.b"]);
        assert!(names("nqn.other").is_empty());
        let req = ConnectRequest::parse(
            &connect_sqe(0, 31, 0),
            &connect_data(0xffff, DISCOVERY_NQN, "nqn.other"),
        )
        .unwrap();
        let c = reg.connect(&req, KatoPolicy::default()).unwrap();
        assert!(c.is_discovery());
        let g = reg.generation();
        assert!(reg.remove("nqn.a"));
        assert!(reg.generation() > g);
        assert!(!reg.remove("nqn.a"));
    }

    #[test]
    fn identities_are_stable_and_distinct() {
        let a = NamespaceIdentity::from_volume_id("vol-1");
        assert_eq!(a, NamespaceIdentity::from_volume_id("vol-1"));
        assert_ne!(a.nguid, NamespaceIdentity::from_volume_id("vol-2").nguid);
        assert_eq!(a.uuid[6] >> 4, 4);
    }
}
