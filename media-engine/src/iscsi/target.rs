//! What the iSCSI front-end exports: targets (one per export), their LUNs, who may log in,
//! CHAP secrets, and the live sessions, so an unexport can end them and a reconnecting
//! initiator can reinstate its session.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicU16, Ordering};

use parking_lot::{Mutex, RwLock};
use tokio::sync::watch;

use crate::scsi::LogicalUnit;

/// Target portal group tag of our single portal group.
pub const TPGT: u16 = 1;

/// CHAP secrets of one target. `mutual` lets initiators authenticate the target too.
#[derive(Clone)]
pub struct ChapSecrets {
    pub user: String,
    pub secret: String,
    /// (user, secret) the target answers with when the initiator asks for mutual CHAP.
    pub mutual: Option<(String, String)>,
}

impl std::fmt::Debug for ChapSecrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChapSecrets")
            .field("user", &self.user)
            .field("mutual_user", &self.mutual.as_ref().map(|m| &m.0))
            .finish_non_exhaustive()
    }
}

/// One exported target.
#[derive(Debug)]
pub struct TargetConfig {
    /// The target's IQN.
    pub name: String,
    pub alias: Option<String>,
    /// Initiator names allowed to log in; empty refuses everyone.
    pub initiators: Vec<String>,
    pub chap: Option<ChapSecrets>,
    /// LUN number -> logical unit.
    pub luns: BTreeMap<u64, Arc<LogicalUnit>>,
}

/// A target as the sessions see it. Dropping it from the registry tells its sessions to end.
#[derive(Debug)]
pub struct Target {
    pub cfg: TargetConfig,
    removed: watch::Sender<bool>,
}

impl Target {
    pub fn allows(&self, initiator: &str) -> bool {
        self.cfg
            .initiators
            .iter()
            .any(|i| i.eq_ignore_ascii_case(initiator))
    }
    pub fn lun_numbers(&self) -> Vec<u64> {
        self.cfg.luns.keys().copied().collect()
    }
    /// Resolves to `true` once the target is unexported.
    pub fn removed(&self) -> watch::Receiver<bool> {
        self.removed.subscribe()
    }
}

/// Why a login to a target was refused before authentication. Never sent to the initiator:
/// both cases get the same answer ([`crate::iscsi::login`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// No target of that name is exported.
    UnknownTarget,
    /// The target exists, but the initiator is not on its allow-list.
    NotAllowed,
}

/// Identity of a session for reinstatement (RFC 7143 6.3.5): same initiator, ISID and target.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct SessionKey {
    pub initiator: String,
    pub isid: [u8; 6],
    pub target: String,
}

/// All targets of this node and the sessions logged in to them.
#[derive(Debug)]
pub struct Registry {
    targets: RwLock<BTreeMap<String, Arc<Target>>>,
    /// Live sessions: a sender that, when fired, makes the session end (reinstatement).
    sessions: Mutex<HashMap<SessionKey, (u64, watch::Sender<bool>)>>,
    next_tsih: AtomicU16,
    next_session: std::sync::atomic::AtomicU64,
    /// host:port given in SendTargets; `None` = the address the initiator connected to.
    pub advertise: Option<String>,
}

impl Registry {
    pub fn new(advertise: Option<String>) -> Registry {
        Registry {
            targets: RwLock::new(BTreeMap::new()),
            sessions: Mutex::new(HashMap::new()),
            next_tsih: AtomicU16::new(1),
            next_session: std::sync::atomic::AtomicU64::new(1),
            advertise,
        }
    }

    /// Adds or replaces a target. Sessions of a replaced target end (they were logged in under
    /// the old ACL and secrets).
    pub fn add(&self, cfg: TargetConfig) {
        let name = cfg.name.clone();
        let (tx, _) = watch::channel(false);
        let old = self
            .targets
            .write()
            .insert(name, Arc::new(Target { cfg, removed: tx }));
        if let Some(old) = old {
            old.removed.send_replace(true);
        }
    }

    /// Removes a target; its sessions are asked to log out and then dropped.
    pub fn remove(&self, name: &str) -> bool {
        let old = self.targets.write().remove(name);
        match old {
            Some(t) => {
                t.removed.send_replace(true);
                true
            }
            None => false,
        }
    }

    pub fn get(&self, name: &str) -> Option<Arc<Target>> {
        self.targets.read().get(name).cloned()
    }

    /// The target `name` if `initiator` may log in to it. Both refusals take the same path
    /// (one lookup and one allow-list scan under the same lock) and the caller must answer
    /// them alike on the wire, so that target names cannot be enumerated by logging in; the
    /// [`Refusal`] says which it was, for the server's log only.
    pub fn admit(&self, name: &str, initiator: &str) -> Result<Arc<Target>, Refusal> {
        let targets = self.targets.read();
        let found = targets.get(name);
        let allowed: &[String] = found.map_or(&[], |t| &t.cfg.initiators);
        let listed = allowed.iter().any(|i| i.eq_ignore_ascii_case(initiator));
        match (found, listed) {
            (Some(t), true) => Ok(t.clone()),
            (Some(_), false) => Err(Refusal::NotAllowed),
            (None, _) => Err(Refusal::UnknownTarget),
        }
    }

    pub fn names(&self) -> Vec<String> {
        self.targets.read().keys().cloned().collect()
    }

    /// Targets an initiator may discover.
    pub fn visible_to(&self, initiator: &str) -> Vec<Arc<Target>> {
        self.targets
            .read()
            .values()
            .filter(|t| t.allows(initiator))
            .cloned()
            .collect()
    }

    /// A fresh nonzero TSIH.
    pub fn new_tsih(&self) -> u16 {
        loop {
            let t = self.next_tsih.fetch_add(1, Ordering::Relaxed);
            if t != 0 {
                return t;
            }
        }
    }

    /// Registers a new session, ending any older session with the same key (reinstatement).
    /// Returns the session's serial and the receiver that fires when it must end.
    pub fn register_session(&self, key: SessionKey) -> (u64, watch::Receiver<bool>) {
        let serial = self.next_session.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = watch::channel(false);
        if let Some((_, old)) = self.sessions.lock().insert(key, (serial, tx)) {
            old.send_replace(true);
        }
        (serial, rx)
    }

    /// Forgets a session when it ends (unless a newer one already replaced it).
    pub fn unregister_session(&self, key: &SessionKey, serial: u64) {
        let mut s = self.sessions.lock();
        if s.get(key).is_some_and(|(n, _)| *n == serial) {
            s.remove(key);
        }
    }

    /// Number of live sessions (for tests and metrics).
    pub fn session_count(&self) -> usize {
        self.sessions.lock().len()
    }
}
