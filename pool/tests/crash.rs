#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Crash test: a child process writes randomly with periodic flushes and seals and is SIGKILLed
//! at a random moment; after reopening, every write acknowledged before the last completed flush
//! reads back exactly (sector by sector: the flushed value or a later, unflushed write's value),
//! every atomic write is there entirely or not at all, and the newest completed snapshot holds
//! exactly its writes. `MAAS_CRASH_CYCLES` sets the number of cycles (default 50; raise it for a
//! soak).

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use maas_pool::{BlockDevice, OpenOptions, Pool, SnapshotId};

#[path = "../src/bin/pool-crash-child.rs"]
#[allow(dead_code)]
mod child;

const VOL: u64 = 16 << 20;
const SECTOR: usize = 512;

fn journal(path: &Path) -> (u64, Option<(u64, u64)>) {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let mut flushed = 0;
    let mut snap = None;
    for line in text.lines() {
        let parts: Vec<&str> = line.split_whitespace().collect();
        match parts.as_slice() {
            ["F", n] => flushed = n.parse().unwrap(),
            ["S", id, n] => snap = Some((id.parse().unwrap(), n.parse().unwrap())),
            _ => {} // a torn last line
        }
    }
    (flushed, snap)
}

fn apply(img: &mut [u8], seed: u64, i: u64) {
    let (off, len, dseed) = child::write_op(seed, i, VOL);
    img[off as usize..(off + len) as usize].copy_from_slice(&child::pattern(dseed, len as usize));
}

#[test]
fn sigkill_never_loses_flushed_writes() {
    let cycles: u64 = std::env::var("MAAS_CRASH_CYCLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(50);
    let dir = tempfile::tempdir().unwrap();
    let pool_dir = dir.path().join("pool");
    let mut base = vec![0u8; VOL as usize]; // verified content at the start of each cycle
    let mut rng = rand::thread_rng();
    let mut total_writes = 0;
    for cycle in 0..cycles {
        let seed = 0xC0FFEE ^ (cycle << 20);
        let jpath = dir.path().join(format!("journal-{cycle}"));
        let mut child = Command::new(env!("CARGO_BIN_EXE_pool-crash-child"))
            .args([
                "--pool",
                pool_dir.to_str().unwrap(),
                "--journal",
                jpath.to_str().unwrap(),
            ])
            .args([
                "--seed",
                &seed.to_string(),
                "--volume-size",
                &VOL.to_string(),
            ])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(
            line.trim(),
            "ready",
            "child failed to start (cycle {cycle})"
        );
        let ms = rand::Rng::gen_range(&mut rng, 20..400);
        std::thread::sleep(Duration::from_millis(ms));
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();

        let (flushed, snap) = journal(&jpath);
        let pool = Pool::open(
            &pool_dir,
            OpenOptions {
                background: false,
                ..OpenOptions::default()
            },
        )
        .unwrap_or_else(|e| panic!("cycle {cycle}: reopen failed: {e}"));
        let vol = pool.volume_by_name("crash").unwrap();
        let v = pool.open_volume(vol.id).unwrap();
        let mut got = vec![0u8; VOL as usize];
        v.read(0, &mut got).unwrap();
        // A crash tears only what was in flight: nothing durable may look damaged.
        let rep = pool.verify().unwrap();
        assert!(
            rep.is_clean(),
            "cycle {cycle}: a crash reported as damage: {rep:?}"
        );

        // Expected: base + writes [0, flushed); any sector may instead hold a later write's data.
        let mut expect = base.clone();
        for i in 0..flushed {
            apply(&mut expect, seed, i);
        }
        let mut later: Vec<(u64, u64, Vec<u8>)> = Vec::new();
        let mut later_atomic: Vec<(u64, u64, Vec<u8>)> = Vec::new();
        // The child flushes (and journals) every 5 writes: it cannot be more than 10 past `flushed`.
        for i in flushed..flushed + 30 {
            let (off, len, dseed) = child::write_op(seed, i, VOL);
            let w = (off, len, child::pattern(dseed, len as usize));
            if child::is_atomic(i) {
                later_atomic.push(w);
            } else {
                later.push(w);
            }
        }
        // Atomic region: each later atomic write is either absent or there entirely. One that
        // shows anywhere (random data: it cannot be mistaken for another) must have been
        // applied whole, so the region must equal the flushed state plus exactly the visible
        // later atomic writes, in order.
        let region = (VOL - child::ATOMIC_REGION) as usize..VOL as usize;
        let mut atomic_expect = expect.clone();
        let mut visible = 0;
        for (off, len, data) in &later_atomic {
            let (off, len) = (*off as usize, *len as usize);
            let shows = (0..len / SECTOR).any(|k| {
                let r = off + k * SECTOR..off + (k + 1) * SECTOR;
                got[r.clone()] == data[k * SECTOR..(k + 1) * SECTOR] && got[r.clone()] != expect[r]
            });
            if shows {
                atomic_expect[off..off + len].copy_from_slice(data);
                visible += 1;
            }
        }
        if got[region.clone()] != atomic_expect[region.clone()] {
            let s = (region.start..region.end)
                .step_by(SECTOR)
                .find(|&p| got[p..p + SECTOR] != atomic_expect[p..p + SECTOR])
                .unwrap_or(0);
            panic!(
                "cycle {cycle}: atomic region differs at byte {s}: an atomic write is torn or a \
                 flushed one lost (flushed {flushed}, {visible} later atomic writes visible)"
            );
        }
        for s in 0..(region.start / SECTOR) {
            let r = s * SECTOR..(s + 1) * SECTOR;
            if got[r.clone()] == expect[r.clone()] {
                continue;
            }
            let pos = (s * SECTOR) as u64;
            let ok = later.iter().any(|(off, len, data)| {
                pos >= *off
                    && pos < off + len
                    && data[(pos - off) as usize..(pos - off) as usize + SECTOR] == got[r.clone()]
            });
            assert!(
                ok,
                "cycle {cycle}: sector {s} lost a flushed write (flushed {flushed})"
            );
        }
        // The newest sealed snapshot of this cycle holds exactly its writes.
        if let Some((sid, n)) = snap {
            let mut sexp = base.clone();
            for i in 0..n {
                apply(&mut sexp, seed, i);
            }
            let c = pool
                .clone_snapshot(SnapshotId(sid), &format!("check-{cycle}"))
                .unwrap();
            let cv = pool.open_volume(c.id).unwrap();
            let mut sgot = vec![0u8; VOL as usize];
            cv.read(0, &mut sgot).unwrap();
            assert!(
                sgot == sexp,
                "cycle {cycle}: snapshot {sid} differs from its {n} writes"
            );
            pool.delete_volume(c.id).unwrap();
        }
        total_writes += flushed;
        base = got;
        pool.close().unwrap();
    }
    assert!(
        total_writes > cycles * 5,
        "the child barely wrote anything: {total_writes} flushed writes"
    );
    // A final integrity pass over everything stored.
    let pool = Pool::open(
        &pool_dir,
        OpenOptions {
            background: false,
            ..OpenOptions::default()
        },
    )
    .unwrap();
    let rep = pool.verify().unwrap();
    assert!(rep.is_clean(), "{rep:?}");
}
