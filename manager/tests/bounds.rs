#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Bounded resources under hostile or broken peers, against the real `maasd`: peers that send
//! thousands of reads and never read their socket (the server's memory stays bounded and a
//! healthy session beside them keeps its speed), and floods of idle connections (refused
//! beyond the caps, dropped after the login / ICReq timeout, the REST API answering all the
//! while, a normal session logging in afterwards). iSCSI peers come from
//! `scripts/iscsi-peers.sh`.

mod common;

use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpStream};
use std::process::Command;
use std::time::{Duration, Instant};

use common::iscsi::*;
use common::{MAASD, Maasd, free_port};
use maas_engine::nvme::spec::{Sqe, io};
use maas_engine::nvme::tcp::client::{Client, ClientOptions};
use maas_tests::bench::{FioJob, fio_bin, fio_iscsi};

const MIB: u64 = 1 << 20;
const NVME_HOST: &str = "nqn.2014-08.org.nvmexpress:uuid:0a0b0c0d-0000-4000-8000-0000000000b1";
const NVME_HOSTILE: &str = "nqn.2014-08.org.nvmexpress:uuid:0a0b0c0d-0000-4000-8000-0000000000b2";

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// A `/proc/<pid>/status` field given in kB (VmRSS, VmHWM: the peak RSS), in bytes.
fn proc_status(pid: u32, field: &str) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = text
        .lines()
        .find(|l| l.starts_with(&format!("{field}:")))
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"));
    let kb: u64 = line
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap();
    kb << 10
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / MIB as f64
}

// ------------------------------------------------------------------ peers that never read

/// Logs in to `target` as `initiator` with one Login Request (no authentication, operational
/// stage straight to full feature phase); returns the connection, ready for commands from
/// CmdSN 0.
fn iscsi_login(port: u16, initiator: &str, target: &str, isid: u8) -> TcpStream {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let text = format!(
        "InitiatorName={initiator}\0TargetName={target}\0SessionType=Normal\0\
         HeaderDigest=None\0DataDigest=None\0MaxRecvDataSegmentLength=262144\0"
    );
    let mut p = vec![0u8; 48];
    p[0] = 0x43; // immediate Login Request
    p[1] = 0x87; // T, CSG 1 -> NSG 3
    p[5..8].copy_from_slice(&(text.len() as u32).to_be_bytes()[1..]);
    p[8] = 0x40; // ISID: random format
    p[13] = isid;
    p.extend_from_slice(text.as_bytes());
    while p.len() % 4 != 0 {
        p.push(0);
    }
    s.write_all(&p).unwrap();
    let mut bhs = [0u8; 48];
    s.read_exact(&mut bhs).unwrap();
    assert_eq!(bhs[0] & 0x3f, 0x23, "not a Login Response");
    assert_eq!((bhs[36], bhs[37]), (0, 0), "login refused");
    assert_eq!(bhs[1] & 0x83, 0x83, "no transit to full feature phase");
    let len = u32::from_be_bytes([0, bhs[5], bhs[6], bhs[7]]) as usize;
    let mut data = vec![0u8; len.div_ceil(4) * 4];
    s.read_exact(&mut data).unwrap();
    s
}

/// A READ (16) of `blocks` at `lba`, expecting all of it.
fn iscsi_read16(itt: u32, cmd_sn: u32, lba: u64, blocks: u32, block_size: u32) -> [u8; 48] {
    let mut p = [0u8; 48];
    p[0] = 0x01; // SCSI Command
    p[1] = 0xc1; // F, R, simple task
    p[16..20].copy_from_slice(&itt.to_be_bytes());
    p[20..24].copy_from_slice(&(blocks * block_size).to_be_bytes());
    p[24..28].copy_from_slice(&cmd_sn.to_be_bytes());
    p[32] = 0x88;
    p[34..42].copy_from_slice(&lba.to_be_bytes());
    p[42..46].copy_from_slice(&blocks.to_be_bytes());
    p
}

/// Before the bound, each of these sessions made maasd hold its 128-command window of 2 MiB
/// reads (256 MiB; 1 GiB for the four; 2 GiB for a session of 16 MiB READs).
#[test]
fn iscsi_sessions_that_never_read_hold_bounded_memory_beside_a_healthy_one() {
    let dir = tempfile::tempdir().unwrap();
    let m = Maasd::builder(MAASD, dir.path())
        .device_size(4 << 30)
        .env(
            "MAAS_ISCSI_WRITE_STALL_TIMEOUT_MS",
            &STALL.as_millis().to_string(),
        )
        .start();
    let pid = m.pid().unwrap();
    let (healthy, hostile) = ("iqn.2026-11.test:healthy", "iqn.2026-11.test:hostile");
    let vh = volume(&m, "healthy", 256 * MIB, 512);
    let vx = volume(&m, "hostile", 256 * MIB, 512);
    let eh = export(&m, &vh, &[healthy], None);
    let ex = export(&m, &vx, &[hostile], None);
    let fio = fio_bin().unwrap();
    let job = FioJob {
        rw: "read",
        bs: "1m",
        depth: 8,
        seconds: 4,
        size: 256 * MIB,
    };
    let u = url(&eh, None);
    fio_iscsi(&fio, &u, healthy, FioJob { seconds: 1, ..job }).unwrap();
    let alone = fio_iscsi(&fio, &u, healthy, job).unwrap().mib_s;
    let (rss0, hwm0) = (proc_status(pid, "VmRSS"), proc_status(pid, "VmHWM"));

    // Four sessions send 1024 READs of 2 MiB each (4096 in all), and never read.
    let target = ex["target"].as_str().unwrap();
    let peers: Vec<TcpStream> = (0..4u8)
        .map(|i| {
            let mut s = iscsi_login(m.iscsi_port, hostile, target, i);
            let mut burst = Vec::new();
            for k in 0..1024u32 {
                let lba = u64::from(k % 128) * 4096;
                burst.extend_from_slice(&iscsi_read16(k, k, lba, 4096, 512));
            }
            s.write_all(&burst).unwrap();
            s
        })
        .collect();
    let stalled = Instant::now();
    std::thread::sleep(Duration::from_secs(2));
    let beside = fio_iscsi(&fio, &u, healthy, job).unwrap().mib_s;
    bounded_beside_a_healthy_one(
        pid,
        (rss0, hwm0),
        (alone, beside),
        "healthy session",
        "4 sessions",
    );
    // And only for so long: the server closes them once they read nothing for STALL.
    closed_for_not_reading(peers, stalled, &m, "the initiator read none of our output");
    assert!(!m.log().contains("panicked"), "{}", m.log());
}

/// maasd's peak RSS grew by less than 96 MiB since `(rss0, hwm0)` while peers that never read
/// were connected, and the healthy one kept at least half of the speed it had alone (MiB/s).
fn bounded_beside_a_healthy_one(
    pid: u32,
    (rss0, hwm0): (u64, u64),
    (alone, beside): (f64, f64),
    healthy: &str,
    hostile: &str,
) {
    let (rss1, hwm1) = (proc_status(pid, "VmRSS"), proc_status(pid, "VmHWM"));
    eprintln!(
        "maasd RSS {:.0} -> {:.0} MiB (peak {:.0} -> {:.0} MiB); {healthy} {alone:.0} MiB/s \
         alone, {beside:.0} MiB/s beside {hostile} that never read",
        mib(rss0),
        mib(rss1),
        mib(hwm0),
        mib(hwm1)
    );
    assert!(
        hwm1.saturating_sub(hwm0) < 96 * MIB,
        "maasd's peak RSS grew by {:.0} MiB",
        mib(hwm1 - hwm0)
    );
    assert!(
        beside >= alone * 0.5,
        "{healthy}: {beside:.0} MiB/s beside the hostile ones, {alone:.0} MiB/s alone"
    );
}

/// How long the targets wait for a peer that reads nothing (`write_stall_timeout_ms`).
const STALL: Duration = Duration::from_secs(10);

/// The server closes `peers` (which never read) about STALL after they stopped reading, and
/// logs `why`: reading drains what was queued before the close, then finds the end.
fn closed_for_not_reading(peers: Vec<TcpStream>, stalled: Instant, m: &Maasd, why: &str) {
    // Reading before the server gave up would be progress: wait.
    std::thread::sleep(
        (stalled + STALL + Duration::from_secs(2)).saturating_duration_since(Instant::now()),
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut buf = vec![0u8; 1 << 20];
    for mut s in peers {
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "a session that never read is still open {STALL:?} after it stopped reading"
            );
            s.set_read_timeout(Some(left)).unwrap();
            match s.read(&mut buf) {
                Ok(0) => break,
                Ok(_) => continue,
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
                Err(e)
                    if e.kind() == std::io::ErrorKind::WouldBlock
                        || e.kind() == std::io::ErrorKind::TimedOut =>
                {
                    continue;
                }
                Err(e) => panic!("reading a hostile session: {e}"),
            }
        }
    }
    let log = m.log();
    assert!(
        log.contains(why),
        "maasd did not log why it closed the sessions:\n{log}"
    );
}

fn nvme_opts(hostnqn: &str) -> ClientOptions {
    ClientOptions {
        hostnqn: hostnqn.into(),
        ..ClientOptions::default()
    }
}

/// 1 MiB reads (256 blocks of 4 KiB) at queue depth 8 for `secs`: MiB/s.
async fn nvme_read_rate(q: &mut Client, secs: f64) -> f64 {
    let read = |i: u64| Sqe::block_io(io::READ, 0, 1, (i % 64) * 256, 256);
    let t = Instant::now();
    let (mut sent, mut bytes) = (0u64, 0usize);
    for _ in 0..8 {
        q.submit(read(sent), None, 1 << 20).await.unwrap();
        sent += 1;
    }
    let mut done = 0u64;
    while done < sent {
        let c = q.next().await.unwrap();
        assert!(c.cqe.status.is_success(), "{:?}", c.cqe.status);
        bytes += c.data.len();
        done += 1;
        if t.elapsed().as_secs_f64() < secs {
            q.submit(read(sent), None, 1 << 20).await.unwrap();
            sent += 1;
        }
    }
    bytes as f64 / MIB as f64 / t.elapsed().as_secs_f64()
}

/// Before the bound, each queue that never read made maasd hold its 128 reads of 1 MiB (a
/// controller's 64 queues: 8 GiB).
#[test]
fn nvme_queues_that_never_read_hold_bounded_memory_beside_a_healthy_one() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let m = Maasd::builder(MAASD, dir.path())
        .device_size(4 << 30)
        .env("MAAS_NVME_TCP_LISTEN", &format!("127.0.0.1:{port}"))
        .env(
            "MAAS_NVME_TCP_WRITE_STALL_TIMEOUT_MS",
            &STALL.as_millis().to_string(),
        )
        .start();
    let pid = m.pid().unwrap();
    let mut nqns = Vec::new();
    for (name, host) in [("healthy", NVME_HOST), ("hostile", NVME_HOSTILE)] {
        let (st, v) = m.call(
            "POST",
            "/volumes",
            Some(serde_json::json!({"name": name, "size": 256 * MIB, "block_size": 4096})),
        );
        assert_eq!(st, 201, "{v}");
        let e = nvme_export_nqn(&m, v["id"].as_str().unwrap(), host);
        nqns.push(e);
    }
    let portal = format!("127.0.0.1:{port}");
    let rt = runtime();
    rt.block_on(async {
        let mut admin = Client::connect(&portal, &nqns[0], 0, 0xffff, &nvme_opts(NVME_HOST))
            .await
            .unwrap();
        admin.enable().await.unwrap();
        let mut q = Client::connect(&portal, &nqns[0], 1, admin.cntlid, &nvme_opts(NVME_HOST))
            .await
            .unwrap();
        nvme_read_rate(&mut q, 1.0).await;
        let alone = nvme_read_rate(&mut q, 4.0).await;
        let (rss0, hwm0) = (proc_status(pid, "VmRSS"), proc_status(pid, "VmHWM"));

        // One controller, 8 I/O queues, each sending 128 reads of 1 MiB (its whole depth;
        // 1024 in all), and never reading.
        let mut bad = Client::connect(&portal, &nqns[1], 0, 0xffff, &nvme_opts(NVME_HOSTILE))
            .await
            .unwrap();
        bad.enable().await.unwrap();
        let mut queues = Vec::new();
        for qid in 1..=8u16 {
            let mut c =
                Client::connect(&portal, &nqns[1], qid, bad.cntlid, &nvme_opts(NVME_HOSTILE))
                    .await
                    .unwrap();
            for i in 0..128u64 {
                let sqe = Sqe::block_io(io::READ, 0, 1, (i % 64) * 256, 256);
                c.submit(sqe, None, 1 << 20).await.unwrap();
            }
            queues.push(c);
        }
        let stalled = Instant::now();
        tokio::time::sleep(Duration::from_secs(2)).await;
        let beside = nvme_read_rate(&mut q, 4.0).await;
        bounded_beside_a_healthy_one(
            pid,
            (rss0, hwm0),
            (alone, beside),
            "healthy queue",
            "8 queues",
        );
        // And only for so long: the server closes them once they read nothing for STALL
        // (this controller has no keep-alive timeout: nothing else would). Reading now drains
        // what was queued before the close, then finds the connection closed.
        tokio::time::sleep_until((stalled + STALL + Duration::from_secs(2)).into()).await;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        for c in &mut queues {
            loop {
                match tokio::time::timeout_at(deadline, c.next()).await {
                    Ok(Ok(_)) => continue,
                    Ok(Err(_)) => break,
                    Err(_) => panic!(
                        "a queue that never read is still open {STALL:?} after it stopped reading"
                    ),
                }
            }
        }
        // The healthy queue, which reads, is still served.
        assert!(nvme_read_rate(&mut q, 1.0).await > 0.0);
    });
    let log = m.log();
    assert!(
        log.contains("the host read none of our output"),
        "maasd did not log why it closed the queues:\n{log}"
    );
    assert!(!m.log().contains("panicked"), "{}", m.log());
}

fn nvme_export_nqn(m: &Maasd, vol: &str, host: &str) -> String {
    let e = maas_tests::maasd::nvme_export(m, vol, &[host]);
    e["target"].as_str().unwrap().to_string()
}

// ------------------------------------------------------------------ floods of idle connections

/// Lets this process (and the maasd it starts) open `n` more files.
fn raise_open_files_limit(n: u64) {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit(2)/setrlimit(2) on a struct we own.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut r), 0);
        if r.rlim_cur < n {
            assert!(
                r.rlim_max >= n,
                "the hard open files limit ({}) is below the {n} this test needs",
                r.rlim_max
            );
            r.rlim_cur = n;
            assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &r), 0);
        }
    }
}

/// A connection from `src` to 127.0.0.1:`port` (non-blocking).
fn connect_from(rt: &tokio::runtime::Runtime, src: Ipv4Addr, port: u16) -> TcpStream {
    rt.block_on(async {
        let s = tokio::net::TcpSocket::new_v4().unwrap();
        s.bind((src, 0).into()).unwrap();
        s.connect((Ipv4Addr::LOCALHOST, port).into())
            .await
            .unwrap()
            .into_std()
            .unwrap()
    })
}

/// Whether the server still holds the connection (nothing to read, not closed).
fn held(s: &TcpStream) -> bool {
    let mut b = [0u8; 1];
    matches!(s.peek(&mut b), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
}

/// Opens `per_source` connections from each of `sources`, a few at a time (so the server's
/// accept queue never overflows); returns them.
fn flood(
    rt: &tokio::runtime::Runtime,
    port: u16,
    sources: &[Ipv4Addr],
    per_source: usize,
) -> Vec<TcpStream> {
    let mut v = Vec::new();
    for &src in sources {
        for _ in 0..per_source {
            v.push(connect_from(rt, src, port));
            if v.len() % 100 == 0 {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
    v
}

/// Waits until `want` of `conns` are held and the rest closed by the server; returns how many
/// are held then (or after 15 s).
fn settle(conns: &[TcpStream], want: usize) -> usize {
    let t = Instant::now();
    loop {
        let n = conns.iter().filter(|s| held(s)).count();
        if n <= want || t.elapsed() > Duration::from_secs(15) {
            // Refusals are immediate: anything still held a moment later is held.
            std::thread::sleep(Duration::from_millis(300));
            return conns.iter().filter(|s| held(s)).count();
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The REST API's health check answers, within a second each time.
fn api_answers(m: &Maasd) {
    for _ in 0..5 {
        let t = Instant::now();
        let (st, _) = m.call_as(None, "GET", "/health", None);
        let took = t.elapsed();
        assert_eq!(st, 200);
        assert!(took < Duration::from_secs(1), "GET /health took {took:?}");
    }
}

/// One target's flood: `per_source_cap` held out of more from one address, then 3000 from 50
/// addresses of which `cap` held; the API answers meanwhile; everything is dropped after the
/// handshake timeout.
fn flood_target(
    m: &Maasd,
    rt: &tokio::runtime::Runtime,
    port: u16,
    cap: usize,
    per_source_cap: usize,
    timeout: Duration,
) {
    let pid = m.pid().unwrap();
    let one = flood(rt, port, &[Ipv4Addr::LOCALHOST], per_source_cap + 40);
    assert_eq!(settle(&one, per_source_cap), per_source_cap, "per source");
    drop(one);
    std::thread::sleep(Duration::from_millis(500));

    let sources: Vec<Ipv4Addr> = (0..50u8)
        .map(|i| Ipv4Addr::new(127, 0, 1, 10 + i))
        .collect();
    let opened = Instant::now();
    let conns = flood(rt, port, &sources, 60);
    let took = opened.elapsed();
    assert_eq!(conns.len(), 3000);
    let held_now = settle(&conns, cap);
    let fds = open_fds(pid);
    eprintln!(
        "port {port}: 3000 idle connections opened in {took:?}: {held_now} held (cap {cap}), maasd has {fds} open files"
    );
    assert_eq!(held_now, cap, "in total");
    assert!(fds < cap + 300, "maasd has {fds} open files");
    api_answers(m);
    // The idle ones go once the handshake timeout has passed, not before.
    assert!(
        opened.elapsed() < timeout,
        "the test is too slow to see the timeout"
    );
    let t = Instant::now();
    while conns.iter().any(held) {
        assert!(
            t.elapsed() < timeout + Duration::from_secs(10),
            "{} idle connections still held",
            conns.iter().filter(|s| held(s)).count()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let gone = opened.elapsed();
    eprintln!("port {port}: all dropped {gone:?} after the flood began");
    // The first ones were opened when the flood began.
    assert!(
        gone >= timeout - Duration::from_millis(100),
        "dropped after {gone:?}"
    );
}

#[test]
fn floods_of_idle_connections_are_capped_and_timed_out_while_the_api_answers() {
    raise_open_files_limit(8192);
    let dir = tempfile::tempdir().unwrap();
    let nvme_port = free_port();
    let timeout = Duration::from_secs(6);
    let m = Maasd::builder(MAASD, dir.path())
        .env("MAAS_NVME_TCP_LISTEN", &format!("127.0.0.1:{nvme_port}"))
        .env(
            "MAAS_ISCSI_LOGIN_TIMEOUT_MS",
            &timeout.as_millis().to_string(),
        )
        .env(
            "MAAS_NVME_TCP_ICREQ_TIMEOUT_MS",
            &timeout.as_millis().to_string(),
        )
        .start();
    let ini = "iqn.2026-11.test:after-the-flood";
    let vol = volume(&m, "flooded", 64 * MIB, 512);
    let e = export(&m, &vol, &[ini], None);
    let nqn = nvme_export_nqn(&m, &vol, NVME_HOST);
    let rt = runtime();

    // Defaults: 1024 connections per target, 64 per source for iSCSI, 256 for NVMe/TCP.
    flood_target(&m, &rt, m.iscsi_port, 1024, 64, timeout);
    let inq = run_with_timeout(
        Command::new("iscsi-inq").args(["-i", ini, &url(&e, None)]),
        30,
    );
    assert!(inq.status.success(), "{}", text(&inq));

    flood_target(&m, &rt, nvme_port, 1024, 256, timeout);
    rt.block_on(async {
        let portal = format!("127.0.0.1:{nvme_port}");
        let mut a = Client::connect(&portal, &nqn, 0, 0xffff, &nvme_opts(NVME_HOST))
            .await
            .unwrap();
        a.enable().await.unwrap();
        let id = a.identify(0, 1).await.unwrap();
        assert_eq!(
            u64::from_le_bytes(id[..8].try_into().unwrap()),
            64 * MIB / 512
        );
    });

    // Refusals were logged, but not one line each.
    let log = m.log();
    let lines = log.matches("connection refused").count();
    assert!((2..=8).contains(&lines), "{lines} refusal lines:\n{log}");
    assert!(log.contains("no login within"), "{log}");
    assert!(log.contains("no ICReq within"), "{log}");
    assert!(!log.contains("panicked"), "{log}");
}
