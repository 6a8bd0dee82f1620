#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The NVMe/TCP target over real sockets, on a real pool volume, driven by our host-side queue
//! the way the Linux host brings a controller up; plus hostile peers. (The Linux kernel's own
//! host runs against `maasd` in `tests/tests/guest_nvme_tcp.rs`.)

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use maas_engine::listener::Limits;
use maas_engine::nvme::controller::KatoPolicy;
use maas_engine::nvme::spec::{DISCOVERY_NQN, Sqe, Status, admin, feature, io, le32, log, prop};
use maas_engine::nvme::tcp::client::{Client, ClientError, ClientOptions};
use maas_engine::nvme::{
    Namespace, NamespaceIdentity, NvmeTcpServer, QueueConfig, Registry, SubsystemConfig,
};
use maas_pool::{CreateOptions, DeviceSpec, OpenOptions, Pool, Tier};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const MIB: u64 = 1 << 20;
const SUB: &str = "nqn.2026-11.io.maas:test";
const HOST: &str = "nqn.2014-08.org.nvmexpress:uuid:11111111-2222-3333-4444-555555555555";

struct Target {
    _dir: tempfile::TempDir,
    pool: Pool,
    server: NvmeTcpServer,
    addr: String,
}

fn pool(dir: &std::path::Path) -> Pool {
    Pool::create(
        dir,
        CreateOptions {
            devices: vec![DeviceSpec {
                path: dir.join("dev0"),
                tier: Tier::Ssd,
                size: 512 * MIB,
            }],
            chunk_size: 256 << 10,
            zstd_level: 1,
        },
        OpenOptions {
            cache_bytes: 16 << 20,
            log_cache_bytes: 16 << 20,
            wal_segment_bytes: 4 * MIB,
            wal_fold_threshold: 64 * MIB,
            background: true,
            ..Default::default()
        },
    )
    .unwrap()
}

async fn target(kato: KatoPolicy) -> Target {
    target_with(kato, Limits::default()).await
}

async fn target_with(kato: KatoPolicy, limits: Limits) -> Target {
    let dir = tempfile::tempdir().unwrap();
    let pool = pool(dir.path());
    let reg = Arc::new(Registry::new(Some("192.0.2.7:4420".into())));
    for (nqn, host, name) in [
        (SUB, HOST, "v1"),
        ("nqn.2026-11.io.maas:other", "nqn.other-host", "v2"),
    ] {
        let info = pool.create_volume(name, 64 * MIB, 512).unwrap();
        let vol = pool.open_volume(info.id).unwrap();
        let mut namespaces = BTreeMap::new();
        namespaces.insert(
            1,
            Arc::new(Namespace::new(
                Arc::new(vol),
                false,
                NamespaceIdentity::from_volume_id(name),
            )),
        );
        reg.add(SubsystemConfig {
            nqn: nqn.into(),
            hosts: vec![host.into()],
            namespaces,
            serial: format!("serial-{name}"),
            model: "MaaS test".into(),
            dhchap: None,
        });
    }
    let cfg = QueueConfig {
        kato,
        ..QueueConfig::default()
    };
    let server = NvmeTcpServer::bind_with("127.0.0.1:0", reg, cfg, limits)
        .await
        .unwrap();
    let addr = server.local_addr().to_string();
    Target {
        _dir: dir,
        pool,
        server,
        addr,
    }
}

fn opts(digests: bool) -> ClientOptions {
    ClientOptions {
        hostnqn: HOST.into(),
        header_digest: digests,
        data_digest: digests,
        kato_ms: 5000,
        ..ClientOptions::default()
    }
}

/// Brings a controller up as Linux does: Connect, CAP/VS, CC.EN, CSTS.RDY, Identify, queues,
/// async events, then the I/O queues.
async fn bring_up(t: &Target, o: &ClientOptions, io_queues: u16) -> (Client, Vec<Client>) {
    let mut a = Client::connect(&t.addr, SUB, 0, 0xffff, o).await.unwrap();
    let cap = a.property_get(prop::CAP, true).await.unwrap();
    assert_eq!(cap & 0xffff, 127, "MQES");
    assert_ne!(cap & (1 << 37), 0, "NVM command set");
    assert_eq!(a.property_get(prop::VS, false).await.unwrap(), 0x0001_0300);
    a.enable().await.unwrap();
    let id = a.identify(1, 0).await.unwrap();
    assert_eq!(u16::from_le_bytes([id[1800], id[1801]]), 0, "ICDOFF");
    let ioccsz = le32(&id, 1792) as usize;
    assert!(ioccsz >= 4);
    let mut sf = Sqe::new(admin::SET_FEATURES, 0, 0);
    sf.set_cdw(10, u32::from(feature::NUMBER_OF_QUEUES));
    sf.set_cdw(11, u32::from(io_queues - 1) * 0x10001);
    let got = a.exec(sf, None, 0).await.unwrap().cqe.dw0;
    assert_eq!(got & 0xffff, u32::from(io_queues - 1));
    let mut aec = Sqe::new(admin::SET_FEATURES, 0, 0);
    aec.set_cdw(10, u32::from(feature::ASYNC_EVENT_CONFIG));
    aec.set_cdw(11, 1 << 8);
    a.exec(aec, None, 0).await.unwrap();
    let mut ios = Vec::new();
    for qid in 1..=io_queues {
        let mut q = Client::connect(&t.addr, SUB, qid, a.cntlid, o)
            .await
            .unwrap();
        q.set_in_capsule(ioccsz * 16 - 64);
        ios.push(q);
    }
    (a, ios)
}

fn rw(op: u8, slba: u64, blocks: u32) -> Sqe {
    Sqe::block_io(op, 0, 1, slba, blocks)
}

fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn linux_style_bring_up_and_io_with_and_without_digests() {
    let t = target(KatoPolicy::default()).await;
    for digests in [false, true] {
        let (mut a, mut ios) = bring_up(&t, &opts(digests), 2).await;
        // Namespaces: list, identify, descriptors.
        let list = a.identify(2, 0).await.unwrap();
        assert_eq!((le32(&list, 0), le32(&list, 4)), (1, 0));
        let ns = a.identify(0, 1).await.unwrap();
        assert_eq!(
            u64::from_le_bytes(ns[..8].try_into().unwrap()),
            64 * MIB / 512
        );
        assert_eq!(ns[130], 9);
        let desc = a.identify(3, 1).await.unwrap();
        assert_eq!(
            &desc[4 + 8 + 4..4 + 8 + 4 + 16],
            &ns[104..120],
            "NGUID in both"
        );
        // 4 KiB in the capsule, 1 MiB through R2T, on two queues.
        let small = Arc::new(pattern(1 + u64::from(digests), 4096));
        let big = Arc::new(pattern(3 + u64::from(digests), MIB as usize));
        ios[0]
            .exec(rw(io::WRITE, 8, 8), Some(small.clone()), 0)
            .await
            .unwrap();
        ios[1]
            .exec(rw(io::WRITE, 4096, 2048), Some(big.clone()), 0)
            .await
            .unwrap();
        let r = ios[1].exec(rw(io::READ, 8, 8), None, 4096).await.unwrap();
        assert_eq!(r.data, *small);
        let r = ios[0]
            .exec(rw(io::READ, 4096, 2048), None, MIB as usize)
            .await
            .unwrap();
        assert!(r.data == *big, "1 MiB read back differs");
        ios[0]
            .exec(Sqe::new(io::FLUSH, 0, 1), None, 0)
            .await
            .unwrap();
        ios[0]
            .exec(Sqe::new(io::FLUSH, 0, 0xffff_ffff), None, 0)
            .await
            .unwrap();
        // Write Zeroes with deallocate, and DSM deallocate, read back as zeroes.
        let mut wz = rw(io::WRITE_ZEROES, 8, 4);
        wz.set_cdw(12, 3 | (1 << 25));
        ios[0].exec(wz, None, 0).await.unwrap();
        let mut dsm = Sqe::new(io::DATASET_MANAGEMENT, 0, 1);
        dsm.set_cdw(11, 1 << 2);
        let mut range = vec![0u8; 16];
        range[4..8].copy_from_slice(&2048u32.to_le_bytes());
        range[8..16].copy_from_slice(&4096u64.to_le_bytes());
        ios[0].exec(dsm, Some(Arc::new(range)), 0).await.unwrap();
        let r = ios[1].exec(rw(io::READ, 8, 8), None, 4096).await.unwrap();
        assert!(r.data[..2048].iter().all(|&b| b == 0));
        assert_eq!(&r.data[2048..], &small[2048..]);
        let r = ios[1]
            .exec(rw(io::READ, 4096, 2048), None, MIB as usize)
            .await
            .unwrap();
        assert!(r.data.iter().all(|&b| b == 0));
        // Errors hosts act on.
        let e = ios[0]
            .exec_status(rw(io::READ, 64 * MIB / 512 - 1, 2), None, 1024)
            .await
            .unwrap();
        assert_eq!(e.cqe.status, Status::LBA_OUT_OF_RANGE);
        let mut bad_ns = rw(io::READ, 0, 1);
        bad_ns.0[4..8].copy_from_slice(&9u32.to_le_bytes());
        let e = ios[0].exec_status(bad_ns, None, 512).await.unwrap();
        assert_eq!(e.cqe.status, Status::INVALID_NAMESPACE);
        let e = ios[0]
            .exec_status(Sqe::new(0x7e, 0, 1), None, 0)
            .await
            .unwrap();
        assert_eq!(e.cqe.status, Status::INVALID_OPCODE);
        // The SGL must describe exactly the command's transfer.
        let e = ios[0]
            .exec_status(rw(io::READ, 0, 8), None, 512)
            .await
            .unwrap();
        assert_eq!(e.cqe.status, Status::SGL_LENGTH_INVALID);
        // Logs: SMART counts what we did, commands supported lists Write.
        let mut lp = Sqe::new(admin::GET_LOG_PAGE, 0, 0xffff_ffff);
        lp.set_cdw(10, u32::from(log::SMART) | (127 << 16));
        let smart = a.exec(lp, None, 512).await.unwrap().data;
        assert!(
            u64::from_le_bytes(smart[80..88].try_into().unwrap()) >= 2,
            "host writes"
        );
        let mut lp = Sqe::new(admin::GET_LOG_PAGE, 0, 0);
        lp.set_cdw(10, u32::from(log::COMMANDS_SUPPORTED) | (1023 << 16));
        let cse = a.exec(lp, None, 4096).await.unwrap().data;
        assert_eq!(
            le32(&cse, 1024 + 4) & 3,
            3,
            "Write: supported, changes content"
        );
        a.exec(Sqe::new(admin::KEEP_ALIVE, 0, 0), None, 0)
            .await
            .unwrap();
        // Shutdown as `nvme disconnect` does it: CC.SHN, then CSTS.SHST polled to complete
        // (after the flush of every namespace).
        a.property_set(prop::CC, 1 | (6 << 16) | (4 << 20) | (1 << 14))
            .await
            .unwrap();
        let t0 = Instant::now();
        loop {
            let csts = a.property_get(prop::CSTS, false).await.unwrap();
            if csts & 0xc == 0x8 {
                break;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(5),
                "shutdown never completed: {csts:#x}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    drop(t.pool);
    t.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_commands_in_flight_on_a_queue_complete_with_the_right_data() {
    let t = target(KatoPolicy::default()).await;
    let (_a, mut ios) = bring_up(&t, &opts(false), 1).await;
    let q = &mut ios[0];
    // 64 writes of 64 KiB (in-capsule) and 16 of 128 KiB (R2T) in flight at once.
    let mut expect = BTreeMap::new();
    let mut cids = BTreeMap::new();
    for i in 0..80u64 {
        let (len, slba) = if i < 64 {
            (64 << 10, i * 128)
        } else {
            (128 << 10, 8192 + (i - 64) * 256)
        };
        let data = Arc::new(pattern(100 + i, len));
        let cid = q
            .submit(
                rw(io::WRITE, slba, (len / 512) as u32),
                Some(data.clone()),
                0,
            )
            .await
            .unwrap();
        cids.insert(cid, i);
        expect.insert(slba, data);
        if q.outstanding() >= 100 {
            let done = q.next().await.unwrap();
            assert!(done.cqe.status.is_success());
        }
    }
    while q.outstanding() > 0 {
        let done = q.next().await.unwrap();
        assert!(done.cqe.status.is_success(), "{:?}", done.cqe);
        cids.remove(&done.cqe.cid);
    }
    assert!(cids.is_empty());
    let mut reads = BTreeMap::new();
    for (slba, data) in &expect {
        let cid = q
            .submit(
                rw(io::READ, *slba, (data.len() / 512) as u32),
                None,
                data.len(),
            )
            .await
            .unwrap();
        reads.insert(cid, *slba);
    }
    while q.outstanding() > 0 {
        let done = q.next().await.unwrap();
        let slba = reads.remove(&done.cqe.cid).unwrap();
        assert!(done.data == *expect[&slba], "data at {slba}");
    }
    t.server.shutdown().await;
}

/// A connection whose commands return far more than its budget (128 reads of 128 KiB in flight
/// against 64 KiB): they run a few at a time as the host reads, and all complete, in any order,
/// with the right data, while writes interleave.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_beyond_the_connection_budget_wait_their_turn_and_complete() {
    let limits = Limits {
        in_flight_bytes: 64 << 10,
        ..Limits::default()
    };
    let t = target_with(KatoPolicy::default(), limits).await;
    let (_a, mut ios) = bring_up(&t, &opts(false), 1).await;
    let q = &mut ios[0];
    let data = Arc::new(pattern(7, 16 << 20));
    for i in 0..16u64 {
        let chunk = Arc::new(data[(i as usize) << 20..((i as usize) + 1) << 20].to_vec());
        q.exec(rw(io::WRITE, i * 2048, 2048), Some(chunk), 0)
            .await
            .unwrap();
    }
    let mut reads = BTreeMap::new();
    for i in 0..128u64 {
        let cid = q
            .submit(rw(io::READ, i * 256, 256), None, 128 << 10)
            .await
            .unwrap();
        reads.insert(cid, i);
    }
    // A write in the middle of it all (in-capsule, so it needs no R2T).
    let w = Arc::new(pattern(8, 4096));
    let wcid = q
        .submit(rw(io::WRITE, 40_000, 8), Some(w.clone()), 0)
        .await
        .unwrap();
    let got = tokio::time::timeout(Duration::from_secs(30), async {
        let mut wrote = false;
        while q.outstanding() > 0 {
            let done = q.next().await.unwrap();
            assert!(done.cqe.status.is_success(), "{:?}", done.cqe);
            if done.cqe.cid == wcid {
                wrote = true;
                continue;
            }
            let i = reads.remove(&done.cqe.cid).unwrap() as usize;
            assert!(
                done.data == data[i << 17..(i + 1) << 17],
                "read {i} returned other data"
            );
        }
        wrote
    })
    .await
    .expect("commands beyond the budget never completed");
    assert!(got && reads.is_empty());
    let back = q.exec(rw(io::READ, 40_000, 8), None, 4096).await.unwrap();
    assert!(back.data == *w);
    t.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discovery_lists_only_what_the_host_may_see_at_the_advertised_portal() {
    let t = target(KatoPolicy::default()).await;
    let mut d = Client::connect(&t.addr, DISCOVERY_NQN, 0, 0xffff, &opts(false))
        .await
        .unwrap();
    d.enable().await.unwrap();
    let id = d.identify(1, 0).await.unwrap();
    assert_eq!(id[111], 2, "CNTRLTYPE discovery");
    let mut lp = Sqe::new(admin::GET_LOG_PAGE, 0, 0);
    lp.set_cdw(10, u32::from(log::DISCOVERY) | (255 << 16));
    let head = d.exec(lp, None, 1024).await.unwrap().data;
    let numrec = u64::from_le_bytes(head[8..16].try_into().unwrap());
    assert_eq!(numrec, 1);
    let mut lp = Sqe::new(admin::GET_LOG_PAGE, 0, 0);
    lp.set_cdw(10, u32::from(log::DISCOVERY) | (511 << 16));
    let page = d.exec(lp, None, 2048).await.unwrap().data;
    let e = &page[1024..];
    assert_eq!((e[0], e[1], e[2]), (3, 1, 2), "TCP, IPv4, NVMe subsystem");
    let s = |b: &[u8]| {
        String::from_utf8_lossy(b)
            .trim_end_matches('\0')
            .to_string()
    };
    assert_eq!(s(&e[256..512]), SUB);
    assert_eq!(s(&e[512..768]), "192.0.2.7");
    assert_eq!(s(&e[32..64]), "4420");
    // I/O queues do not exist on a discovery controller.
    let err = Client::connect(&t.addr, DISCOVERY_NQN, 1, d.cntlid, &opts(false))
        .await
        .unwrap_err();
    assert!(
        matches!(err, ClientError::Status(s) if s == Status::CONNECT_INVALID_PARAMETERS),
        "{err}"
    );
    t.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unlisted_hosts_are_refused_at_connect() {
    let t = target(KatoPolicy::default()).await;
    let mut o = opts(false);
    o.hostnqn = "nqn.2014-08.org.nvmexpress:uuid:not-on-the-list".into();
    let err = Client::connect(&t.addr, SUB, 0, 0xffff, &o)
        .await
        .unwrap_err();
    assert!(
        matches!(err, ClientError::Status(s) if s == Status::CONNECT_INVALID_HOST),
        "{err}"
    );
    // Another subsystem's host is not ours either.
    o.hostnqn = "nqn.other-host".into();
    let err = Client::connect(&t.addr, SUB, 0, 0xffff, &o)
        .await
        .unwrap_err();
    assert!(
        matches!(err, ClientError::Status(s) if s == Status::CONNECT_INVALID_HOST),
        "{err}"
    );
    assert_eq!(t.server.registry().controller_count(), 0);
    t.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_host_loses_its_controller_after_kato_and_a_live_one_keeps_it() {
    let kato = KatoPolicy {
        discovery_default_ms: 120_000,
        slack: Duration::from_millis(200),
    };
    let t = target(kato).await;
    let mut o = opts(false);
    o.kato_ms = 1000;
    let (mut live, _live_io) = bring_up(&t, &o, 1).await;
    let (_silent, mut silent_io) = bring_up(&t, &o, 1).await;
    assert_eq!(t.server.registry().controller_count(), 2);
    let start = Instant::now();
    // The live host sends Keep Alive every half KATO; the silent one sends nothing.
    while start.elapsed() < Duration::from_millis(2500) {
        live.exec(Sqe::new(admin::KEEP_ALIVE, 0, 0), None, 0)
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(400)).await;
    }
    assert_eq!(t.server.registry().controller_count(), 1);
    // The silent controller's I/O queue went with it.
    let err = silent_io[0]
        .exec(rw(io::READ, 0, 1), None, 512)
        .await
        .unwrap_err();
    assert!(
        matches!(err, ClientError::Closed | ClientError::Io(_)),
        "{err}"
    );
    t.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sq_flow_control_disabled_reads_complete_on_their_last_data_pdu() {
    let t = target(KatoPolicy::default()).await;
    let mut o = opts(true);
    o.disable_sq_flow_control = true;
    let (_a, mut ios) = bring_up(&t, &o, 1).await;
    let data = Arc::new(pattern(9, 8192));
    ios[0]
        .exec(rw(io::WRITE, 0, 16), Some(data.clone()), 0)
        .await
        .unwrap();
    let r = ios[0].exec(rw(io::READ, 0, 16), None, 8192).await.unwrap();
    assert_eq!(r.cqe.sqhd, 0xffff, "completed by the C2HData SUCCESS flag");
    assert_eq!(r.data, *data);
    t.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn growing_a_namespace_raises_an_async_event() {
    let t = target(KatoPolicy::default()).await;
    let (mut a, _ios) = bring_up(&t, &opts(false), 1).await;
    let aer = a
        .submit(Sqe::new(admin::ASYNC_EVENT_REQUEST, 0, 0), None, 0)
        .await
        .unwrap();
    t.server.registry().namespace_changed(SUB, 1);
    let done = tokio::time::timeout(Duration::from_secs(5), a.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(done.cqe.cid, aer);
    assert_eq!(
        done.cqe.dw0, 0x0004_0002,
        "notice, namespace attribute changed, log 04h"
    );
    let mut lp = Sqe::new(admin::GET_LOG_PAGE, 0, 0xffff_ffff);
    lp.set_cdw(10, u32::from(log::CHANGED_NAMESPACES) | (1023 << 16));
    let page = a.exec(lp, None, 4096).await.unwrap().data;
    assert_eq!(le32(&page, 0), 1);
    t.server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unexport_ends_the_subsystems_connections() {
    let t = target(KatoPolicy::default()).await;
    let (mut a, mut ios) = bring_up(&t, &opts(false), 1).await;
    assert!(t.server.registry().remove(SUB));
    let err = ios[0]
        .exec(rw(io::READ, 0, 1), None, 512)
        .await
        .unwrap_err();
    assert!(
        matches!(err, ClientError::Closed | ClientError::Io(_)),
        "{err}"
    );
    let err = a
        .exec(Sqe::new(admin::KEEP_ALIVE, 0, 0), None, 0)
        .await
        .unwrap_err();
    assert!(
        matches!(err, ClientError::Closed | ClientError::Io(_)),
        "{err}"
    );
    t.server.shutdown().await;
}

/// Reads until the target closes; returns what it sent.
async fn until_closed(s: &mut TcpStream) -> Vec<u8> {
    let mut all = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return all,
            Ok(Ok(n)) => all.extend_from_slice(&buf[..n]),
            Err(_) => panic!("target kept a hostile connection open"),
        }
    }
}

fn ic_req() -> Vec<u8> {
    let mut b = vec![0u8; 128];
    b[0] = 0; // ICReq
    b[2] = 128;
    b[4] = 128;
    b
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_peers_lose_their_connection_and_nobody_else_notices() {
    let t = target(KatoPolicy::default()).await;
    let (_a, mut ios) = bring_up(&t, &opts(false), 1).await;
    let mut cases: Vec<(&str, Vec<u8>)> = vec![
        ("garbage", vec![0xff; 300]),
        ("a capsule before ICReq", {
            let mut b = vec![4, 0, 72, 0, 72, 0, 0, 0];
            b.resize(72, 0);
            b
        }),
    ];
    // After a proper ICReq:
    let mut huge = ic_req();
    huge.extend_from_slice(&[4, 0, 72, 72]);
    huge.extend_from_slice(&u32::MAX.to_le_bytes());
    cases.push(("a 4 GiB capsule", huge));
    let mut stray = ic_req();
    let mut h2c = vec![6, 0, 24, 24];
    h2c.extend_from_slice(&(24u32 + 8).to_le_bytes());
    h2c.extend_from_slice(&[1, 0, 1, 0, 0, 0, 0, 0, 8, 0, 0, 0, 0, 0, 0, 0]);
    h2c.extend_from_slice(&[0u8; 8]);
    stray.extend_from_slice(&h2c);
    cases.push(("H2CData nobody asked for", stray));
    let mut io_before_connect = ic_req();
    let mut cap = vec![4, 0, 72, 0, 72, 0, 0, 0];
    let mut sqe = rw(io::READ, 0, 1).0.to_vec();
    sqe[39] = 0x5a;
    cap.append(&mut sqe);
    io_before_connect.extend_from_slice(&cap);
    io_before_connect.extend_from_slice(&cap); // the same cid again while the first... ends
    cases.push(("I/O before Connect", io_before_connect));
    let mut truncated = ic_req();
    truncated.extend_from_slice(&[4, 0, 72, 0, 72, 0]);
    cases.push(("a truncated header, then silence", truncated));
    for (what, bytes) in cases {
        let mut s = TcpStream::connect(&t.addr).await.unwrap();
        s.write_all(&bytes).await.unwrap();
        if what.contains("silence") {
            // Left hanging mid-PDU: the connection stays until its connect timeout, but
            // costs nothing; check the others are served meanwhile.
            let r = ios[0].exec(rw(io::READ, 0, 1), None, 512).await;
            assert!(r.is_ok(), "{what}: {r:?}");
            continue;
        }
        let _ = s.shutdown().await;
        let got = until_closed(&mut s).await;
        if what == "I/O before Connect" {
            // ICResp, then COMMAND SEQUENCE ERROR completions, then the close.
            assert_eq!(got.first(), Some(&1), "{what}: {got:?}");
        }
        let r = ios[0].exec(rw(io::READ, 0, 1), None, 512).await;
        assert!(r.is_ok(), "{what}: the healthy queue suffered: {r:?}");
    }
    t.server.shutdown().await;
}

/// DH-HMAC-CHAP: an export with secrets asks for authentication in every Connect response and
/// lets nothing but Authentication Send/Receive through until the queue authenticated; right
/// secrets (one-way and bidirectional) open the queue, wrong ones end the controller.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dh_hmac_chap_gates_every_queue_until_it_authenticates() {
    use maas_engine::nvme::auth::{DhchapConfig, HashId, HostAuth, Secret, reason};
    const AUTH_SUB: &str = "nqn.2026-11.io.maas:auth";
    let t = target(KatoPolicy::default()).await;
    let host_secret = Secret::generate(Some(HashId::Sha256));
    let ctrl_secret = Secret::generate(None);
    let info = t.pool.create_volume("v3", 64 * MIB, 512).unwrap();
    let vol = t.pool.open_volume(info.id).unwrap();
    t.server.registry().add(SubsystemConfig {
        nqn: AUTH_SUB.into(),
        hosts: vec![HOST.into()],
        namespaces: BTreeMap::from([(
            1,
            Arc::new(Namespace::new(
                Arc::new(vol),
                false,
                NamespaceIdentity::from_volume_id("v3"),
            )),
        )]),
        serial: "serial-v3".into(),
        model: "MaaS test".into(),
        dhchap: Some(Arc::new(DhchapConfig::new(
            host_secret.clone(),
            Some(ctrl_secret.clone()),
        ))),
    });
    let o = opts(false);
    let hostauth = |tid: u16, h: &Secret, c: Option<&Secret>| {
        HostAuth::new(h.clone(), c.cloned(), HOST, AUTH_SUB, tid)
    };
    let is = |e: ClientError, s: Status| matches!(e, ClientError::Status(x) if x == s);

    // An export without secrets does not ask.
    let plain = Client::connect(&t.addr, SUB, 0, 0xffff, &o).await.unwrap();
    assert!(!plain.auth_required);
    drop(plain);

    // Before authenticating: Authentication Required for everything else.
    let mut a = Client::connect(&t.addr, AUTH_SUB, 0, 0xffff, &o)
        .await
        .unwrap();
    assert!(a.auth_required, "Connect response AUTHREQ.ATR");
    let e = a.property_get(prop::CAP, true).await.unwrap_err();
    assert!(is(e, Status::AUTH_REQUIRED));
    let e = a.identify(1, 0).await.unwrap_err();
    assert!(is(e, Status::AUTH_REQUIRED));
    let e = a
        .exec(Sqe::new(admin::KEEP_ALIVE, 0, 0), None, 0)
        .await
        .unwrap_err();
    assert!(is(e, Status::AUTH_REQUIRED));
    // An I/O queue cannot join a controller nobody could enable.
    assert!(
        Client::connect(&t.addr, AUTH_SUB, 1, a.cntlid, &o)
            .await
            .is_err()
    );
    // Authentication Send with another security protocol is refused as a command.
    let mut bad = Sqe::new(admin::FABRICS, 0, 0);
    bad.0[4] = 0x05;
    bad.set_cdw(10, (0xEA << 24) | (1 << 16) | (1 << 8));
    bad.set_cdw(11, 8);
    let d = a
        .exec_status(bad, Some(Arc::new(vec![0; 8])), 0)
        .await
        .unwrap();
    assert_eq!(d.cqe.status, Status::INVALID_FIELD);

    // Bidirectional, with the default group (ffdhe2048).
    a.authenticate(&mut hostauth(1, &host_secret, Some(&ctrl_secret)))
        .await
        .unwrap();
    a.enable().await.unwrap();
    assert_eq!(a.identify(1, 0).await.unwrap().len(), 4096);
    // The I/O queue asks again; one-way this time.
    let mut q = Client::connect(&t.addr, AUTH_SUB, 1, a.cntlid, &o)
        .await
        .unwrap();
    assert!(q.auth_required);
    let data = pattern(9, 4096);
    let e = q
        .exec(rw(io::WRITE, 0, 8), Some(Arc::new(data.clone())), 0)
        .await
        .unwrap_err();
    assert!(is(e, Status::AUTH_REQUIRED), "no I/O before authentication");
    q.authenticate(&mut hostauth(2, &host_secret, None))
        .await
        .unwrap();
    q.exec(rw(io::WRITE, 0, 8), Some(Arc::new(data.clone())), 0)
        .await
        .unwrap();
    assert_eq!(
        q.exec(rw(io::READ, 0, 8), None, 4096).await.unwrap().data,
        data
    );
    assert_eq!(t.server.registry().controller_count(), 1);

    // A wrong host secret: Failure1, and the controller is gone.
    let wrong = Secret::generate(Some(HashId::Sha256));
    let mut b = Client::connect(&t.addr, AUTH_SUB, 0, 0xffff, &o)
        .await
        .unwrap();
    let e = b
        .authenticate(&mut hostauth(1, &wrong, None))
        .await
        .unwrap_err();
    assert!(matches!(e, ClientError::Auth(reason::FAILED)), "{e}");
    assert!(b.identify(1, 0).await.is_err(), "the connection ends");
    // A wrong controller secret: the host refuses the controller (Failure2); it ends too.
    let mut c = Client::connect(&t.addr, AUTH_SUB, 0, 0xffff, &o)
        .await
        .unwrap();
    let e = c
        .authenticate(&mut hostauth(
            1,
            &host_secret,
            Some(&Secret::generate(None)),
        ))
        .await
        .unwrap_err();
    assert!(matches!(e, ClientError::Auth(reason::FAILED)), "{e}");
    assert!(c.identify(1, 0).await.is_err(), "the connection ends");
    let deadline = Instant::now() + Duration::from_secs(5);
    while t.server.registry().controller_count() != 1 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        t.server.registry().controller_count(),
        1,
        "only the good one is left"
    );
    // The authenticated controller kept working meanwhile.
    assert_eq!(
        q.exec(rw(io::READ, 0, 8), None, 4096).await.unwrap().data,
        data
    );
    t.server.shutdown().await;
}
