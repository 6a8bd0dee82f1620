//! The data structures a controller returns: Identify (controller, namespace, active namespace
//! list, namespace descriptors) and the log pages (SMART, firmware slot, changed namespaces,
//! commands supported, discovery). Byte layouts follow NVMe Base 1.4 and NVMe-oF 1.1.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use super::controller::{
    AEC_DISCOVERY_LOG, AEC_NS_ATTRIBUTE, Controller, MAX_AERS, Portal, VERSION,
};
use super::spec::{admin, io, put_str, put16, put32, put64};
use super::subsystem::{ADMIN_QUEUE_ENTRIES, IO_QUEUE_ENTRIES, Namespace, Subsystem};
use super::{IN_CAPSULE_DATA, MDTS};

pub const CNS_NAMESPACE: u8 = 0x00;
pub const CNS_CONTROLLER: u8 = 0x01;
pub const CNS_ACTIVE_NAMESPACES: u8 = 0x02;
pub const CNS_NS_DESCRIPTORS: u8 = 0x03;
pub const CNS_CSI_CONTROLLER: u8 = 0x06;

/// Firmware revision: the crate version.
fn firmware_revision() -> String {
    env!("CARGO_PKG_VERSION").to_string()
}

/// Identify Controller (CNS 01h).
pub fn controller(c: &Controller, _aec: u32) -> Box<[u8; 4096]> {
    let mut b = Box::new([0u8; 4096]);
    let discovery = c.is_discovery();
    let (serial, model, nqn, nn) = match c.subsystem() {
        Some(s) => (
            s.config.serial.clone(),
            s.config.model.clone(),
            s.config.nqn.clone(),
            s.config.namespaces.keys().next_back().copied().unwrap_or(0),
        ),
        None => (
            "maas-discovery".to_string(),
            "MaaS discovery controller".to_string(),
            super::spec::DISCOVERY_NQN.to_string(),
            0,
        ),
    };
    put_str(&mut b[..], 4, 20, &serial, b' ');
    put_str(&mut b[..], 24, 40, &model, b' ');
    put_str(&mut b[..], 64, 8, &firmware_revision(), b' ');
    b[72] = 6; // RAB
    // IEEE OUI: the same company-id shape the SCSI NAA designators use ("MA").
    b[73..76].copy_from_slice(&[0x41, 0x4d, 0x0a]);
    // CMIC: the subsystem may have more controllers (several hosts, several paths).
    b[76] = if discovery { 0 } else { 0x02 };
    b[77] = MDTS;
    put16(&mut b[..], 78, c.cntlid);
    put32(&mut b[..], 80, VERSION);
    // OAES: the events this controller can raise.
    put32(
        &mut b[..],
        92,
        if discovery {
            AEC_DISCOVERY_LOG
        } else {
            AEC_NS_ATTRIBUTE
        },
    );
    // CTRATT: 128-bit host identifier.
    put32(&mut b[..], 96, 1);
    b[111] = if discovery { 2 } else { 1 }; // CNTRLTYPE
    b[258] = 3; // ACL (0-based)
    b[259] = (MAX_AERS - 1) as u8; // AERL (0-based)
    b[260] = 0x03; // FRMW: slot 1 read-only, one slot
    // LPA: commands supported and effects log, extended data for Get Log Page.
    b[261] = if discovery { 0x04 } else { 0x06 };
    b[262] = 0; // ELPE: one error log entry
    put16(&mut b[..], 320, 10); // KAS: 100 ms units -> 1 s granularity
    if !discovery {
        b[512] = 0x66; // SQES
        b[513] = 0x44; // CQES
    }
    // MAXCMD: Linux clamps its queue size to it (and says so for a discovery controller that
    // reports less than the 128 it asks for; its admin queue is 32 deep whatever this says).
    put16(&mut b[..], 514, IO_QUEUE_ENTRIES as u16);
    put32(&mut b[..], 516, nn);
    if !discovery {
        put16(&mut b[..], 520, 0x04 | 0x08); // ONCS: Dataset Management, Write Zeroes
        // VWC: present, Flush with NSID FFFFFFFFh supported.
        b[525] = 0x07;
        b[530] = 1; // NVSCC
    }
    // SGLS: SGLs without alignment rules; the address may be an offset (in-capsule data).
    put32(&mut b[..], 536, (1 << 0) | (1 << 20));
    put_str(&mut b[..], 768, 256, &nqn, 0);
    // NVMe over Fabrics attributes.
    let ioccsz = if discovery {
        0
    } else {
        ((64 + IN_CAPSULE_DATA) / 16) as u32
    };
    put32(&mut b[..], 1792, ioccsz);
    put32(&mut b[..], 1796, 1); // IORCSZ: 16-byte completions
    put16(&mut b[..], 1800, 0); // ICDOFF
    b[1802] = 0; // FCATT: dynamic controller model
    b[1803] = 1; // MSDBD
    put16(&mut b[..], 1804, 1); // OFCS: Disconnect supported
    b
}

/// Identify Namespace (CNS 00h).
pub fn namespace(ns: &Namespace) -> Box<[u8; 4096]> {
    let mut b = Box::new([0u8; 4096]);
    let bs = u64::from(ns.dev.block_size().max(512));
    let blocks = ns.dev.capacity() / bs;
    put64(&mut b[..], 0, blocks); // NSZE
    put64(&mut b[..], 8, blocks); // NCAP
    put64(&mut b[..], 16, blocks); // NUSE
    // NSFEAT: thin provisioned, NPWG and friends valid, NGUID/EUI64 never reused.
    b[24] = 0x01 | 0x10 | 0x08;
    b[25] = 0; // NLBAF: one format
    b[26] = 0; // FLBAS
    b[30] = 1; // NMIC: may be attached to several controllers
    // DLFEAT: deallocated blocks read as zeroes; Write Zeroes may deallocate.
    b[33] = 0x09;
    // Preferred granularities: the pool's 4 KiB block for writes and deallocation.
    let per4k = (4096 / bs).max(1) as u16 - 1;
    put16(&mut b[..], 64, per4k); // NPWG
    put16(&mut b[..], 66, per4k); // NPWA
    put16(&mut b[..], 68, per4k); // NPDG
    put16(&mut b[..], 70, per4k); // NPDA
    put16(&mut b[..], 72, ((1u64 << 20) / bs).max(1) as u16 - 1); // NOWS: 1 MiB
    b[99] = u8::from(ns.read_only); // NSATTR: write protected
    b[104..120].copy_from_slice(&ns.ident.nguid);
    b[120..128].copy_from_slice(&ns.ident.eui64);
    b[130] = bs.trailing_zeros() as u8; // LBAF0.LBADS
    b
}

/// Active Namespace ID list (CNS 02h): ids above `after`, ascending.
pub fn active_namespaces(sub: &Subsystem, after: u32) -> Box<[u8; 4096]> {
    let mut b = Box::new([0u8; 4096]);
    for (i, nsid) in sub
        .config
        .namespaces
        .keys()
        .filter(|&&n| n > after)
        .take(1024)
        .enumerate()
    {
        put32(&mut b[..], i * 4, *nsid);
    }
    b
}

/// Namespace Identification Descriptor list (CNS 03h): EUI64, NGUID, UUID, command set.
pub fn ns_descriptors(ns: &Namespace) -> Box<[u8; 4096]> {
    let mut b = Box::new([0u8; 4096]);
    let mut at = 0;
    let mut put = |kind: u8, id: &[u8]| {
        b[at] = kind;
        b[at + 1] = id.len() as u8;
        b[at + 4..at + 4 + id.len()].copy_from_slice(id);
        at += 4 + id.len();
    };
    put(1, &ns.ident.eui64);
    put(2, &ns.ident.nguid);
    put(3, &ns.ident.uuid);
    put(4, &[0]); // NVM command set
    b
}

/// Discovery log page (70h): a 1 KiB header and a 1 KiB record per subsystem.
pub fn discovery_log(generation: u64, subs: &[Arc<Subsystem>], portal: &Portal) -> Vec<u8> {
    let mut b = vec![0u8; 1024 * (1 + subs.len())];
    put64(&mut b, 0, generation);
    put64(&mut b, 8, subs.len() as u64);
    let ipv6 = portal.traddr.contains(':');
    for (i, s) in subs.iter().enumerate() {
        let e = &mut b[1024 * (i + 1)..1024 * (i + 2)];
        e[0] = 3; // TRTYPE: TCP
        e[1] = if ipv6 { 2 } else { 1 }; // ADRFAM
        e[2] = 2; // SUBTYPE: NVMe subsystem
        e[3] = 0x04; // TREQ: secure channel not specified; SQ flow control may be disabled
        put16(e, 4, 1); // PORTID
        put16(e, 6, 0xffff); // CNTLID: dynamic
        put16(e, 8, ADMIN_QUEUE_ENTRIES as u16); // ASQSZ
        put_str(e, 32, 32, &portal.trsvcid, 0);
        put_str(e, 256, 256, &s.config.nqn, 0);
        put_str(e, 512, 256, &portal.traddr, 0);
        e[768] = 0; // TSAS.SECTYPE: none
    }
    b
}

/// SMART / Health Information (02h), summed over the subsystem's namespaces.
pub fn smart_log(sub: &Subsystem) -> Vec<u8> {
    let mut b = vec![0u8; 512];
    let (mut rd, mut wr, mut brd, mut bwr) = (0u64, 0u64, 0u64, 0u64);
    for ns in sub.config.namespaces.values() {
        rd += ns.stats.reads.load(Ordering::Relaxed);
        wr += ns.stats.writes.load(Ordering::Relaxed);
        brd += ns.stats.bytes_read.load(Ordering::Relaxed);
        bwr += ns.stats.bytes_written.load(Ordering::Relaxed);
    }
    b[3] = 100; // available spare
    b[4] = 10; // available spare threshold
    // Data units: thousands of 512-byte units, rounded up.
    let units = |bytes: u64| bytes.div_ceil(512 * 1000);
    put64(&mut b, 32, units(brd));
    put64(&mut b, 48, units(bwr));
    put64(&mut b, 64, rd);
    put64(&mut b, 80, wr);
    b
}

/// Firmware Slot Information (03h): slot 1 active, holding this build.
pub fn firmware_log() -> Vec<u8> {
    let mut b = vec![0u8; 512];
    b[0] = 1;
    put_str(&mut b, 8, 8, &firmware_revision(), b' ');
    b
}

/// Changed Namespace List (04h).
pub fn changed_ns_log(changed: &BTreeSet<u32>) -> Vec<u8> {
    let mut b = vec![0u8; 4096];
    if changed.len() > 1024 {
        put32(&mut b, 0, 0xffff_ffff);
    } else {
        for (i, n) in changed.iter().enumerate() {
            put32(&mut b, i * 4, *n);
        }
    }
    b
}

/// Commands Supported and Effects (05h).
pub fn commands_supported_log() -> Vec<u8> {
    let mut b = vec![0u8; 4096];
    const CSUPP: u32 = 1;
    const LBCC: u32 = 2;
    for op in [
        admin::GET_LOG_PAGE,
        admin::IDENTIFY,
        admin::ABORT,
        admin::SET_FEATURES,
        admin::GET_FEATURES,
        admin::ASYNC_EVENT_REQUEST,
        admin::KEEP_ALIVE,
    ] {
        put32(&mut b, usize::from(op) * 4, CSUPP);
    }
    for (op, fx) in [
        (io::FLUSH, CSUPP),
        (io::WRITE, CSUPP | LBCC),
        (io::READ, CSUPP),
        (io::WRITE_ZEROES, CSUPP | LBCC),
        (io::DATASET_MANAGEMENT, CSUPP | LBCC),
    ] {
        put32(&mut b, 1024 + usize::from(op) * 4, fx);
    }
    b
}
