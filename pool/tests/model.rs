#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Model-based property test: random sequences of write / zero / flush / seal / clone / delete
//! / checkpoint / reopen / read over several volumes, checked against a plain in-memory model.
//! At the end everything is deleted and the pool must be empty again (reference counts exact).

mod common;

use std::collections::BTreeMap;

use common::*;
use maas_pool::{BlockDevice, Pool, SnapshotId, VolumeId};
use proptest::prelude::*;

#[derive(Clone, Debug)]
enum Op {
    Create {
        size_chunks: u8,
        bs4k: bool,
    },
    Write {
        vol: u8,
        at: u16,
        len: u16,
        seed: u64,
    },
    Zero {
        vol: u8,
        at: u16,
        len: u16,
    },
    Read {
        vol: u8,
        at: u16,
        len: u16,
    },
    Flush,
    Seal {
        vol: u8,
    },
    Clone {
        snap: u8,
    },
    DeleteSnapshot {
        snap: u8,
    },
    DeleteVolume {
        vol: u8,
    },
    Grow {
        vol: u8,
        by_chunks: u8,
    },
    Checkpoint,
    Reopen,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        1 => (1u8..6, any::<bool>()).prop_map(|(size_chunks, bs4k)| Op::Create { size_chunks, bs4k }),
        8 => (any::<u8>(), any::<u16>(), 1u16..400, any::<u64>()).prop_map(|(vol, at, len, seed)| Op::Write { vol, at, len, seed }),
        2 => (any::<u8>(), any::<u16>(), 1u16..600).prop_map(|(vol, at, len)| Op::Zero { vol, at, len }),
        4 => (any::<u8>(), any::<u16>(), 1u16..600).prop_map(|(vol, at, len)| Op::Read { vol, at, len }),
        1 => Just(Op::Flush),
        3 => any::<u8>().prop_map(|vol| Op::Seal { vol }),
        2 => any::<u8>().prop_map(|snap| Op::Clone { snap }),
        1 => any::<u8>().prop_map(|snap| Op::DeleteSnapshot { snap }),
        1 => any::<u8>().prop_map(|vol| Op::DeleteVolume { vol }),
        1 => (any::<u8>(), 1u8..3).prop_map(|(vol, by_chunks)| Op::Grow { vol, by_chunks }),
        1 => Just(Op::Checkpoint),
        1 => Just(Op::Reopen),
    ]
}

const CHUNK: u64 = 64 << 10;

struct Model {
    vols: BTreeMap<VolumeId, (u32, Vec<u8>)>,
    snaps: BTreeMap<SnapshotId, Vec<u8>>,
    names: u32,
}

fn pick<K: Copy + Ord, V>(m: &BTreeMap<K, V>, i: u8) -> Option<K> {
    if m.is_empty() {
        None
    } else {
        m.keys().nth(i as usize % m.len()).copied()
    }
}

/// Clamps a (start, len) in units of the volume's block size to the volume.
fn span(bs: u32, size: usize, at: u16, len: u16) -> (usize, usize) {
    let units = size / bs as usize;
    let a = at as usize % units;
    let l = (len as usize).min(units - a).max(1);
    (a * bs as usize, l * bs as usize)
}

fn run(ops: Vec<Op>) {
    let dir = tempfile::tempdir().unwrap();
    let mut pool = create_pool(dir.path(), 256 * MIB, CHUNK);
    let mut m = Model {
        vols: BTreeMap::new(),
        snaps: BTreeMap::new(),
        names: 0,
    };
    for op in ops {
        match op {
            Op::Create { size_chunks, bs4k } => {
                m.names += 1;
                let size = size_chunks as u64 * CHUNK - if bs4k { 0 } else { 4096 };
                let bs = if bs4k { 4096 } else { 512 };
                let v = pool
                    .create_volume(&format!("v{}", m.names), size, bs)
                    .unwrap();
                m.vols.insert(v.id, (bs, vec![0u8; size as usize]));
            }
            Op::Write { vol, at, len, seed } => {
                let Some(id) = pick(&m.vols, vol) else {
                    continue;
                };
                let (bs, data) = m.vols.get_mut(&id).unwrap();
                let (off, l) = span(*bs, data.len(), at, len);
                let bytes = pattern(seed, l);
                pool.open_volume(id)
                    .unwrap()
                    .write(off as u64, &bytes, seed % 7 == 0)
                    .unwrap();
                data[off..off + l].copy_from_slice(&bytes);
            }
            Op::Zero { vol, at, len } => {
                let Some(id) = pick(&m.vols, vol) else {
                    continue;
                };
                let (bs, data) = m.vols.get_mut(&id).unwrap();
                let (off, l) = span(*bs, data.len(), at, len);
                let v = pool.open_volume(id).unwrap();
                if at % 2 == 0 {
                    v.discard(off as u64, l as u64).unwrap()
                } else {
                    v.write_zeroes(off as u64, l as u64, false).unwrap()
                }
                data[off..off + l].fill(0);
            }
            Op::Read { vol, at, len } => {
                let Some(id) = pick(&m.vols, vol) else {
                    continue;
                };
                let (bs, data) = &m.vols[&id];
                let (off, l) = span(*bs, data.len(), at, len);
                let got = read_all(&pool.open_volume(id).unwrap(), off as u64, l);
                assert!(
                    got == data[off..off + l],
                    "read mismatch on {id} at {off}+{l}"
                );
            }
            Op::Flush => pool.flush().unwrap(),
            Op::Seal { vol } => {
                let Some(id) = pick(&m.vols, vol) else {
                    continue;
                };
                let s = pool.seal(id).unwrap();
                m.snaps.insert(s.id, m.vols[&id].1.clone());
            }
            Op::Clone { snap } => {
                let Some(sid) = pick(&m.snaps, snap) else {
                    continue;
                };
                m.names += 1;
                let v = pool.clone_snapshot(sid, &format!("v{}", m.names)).unwrap();
                m.vols.insert(v.id, (v.block_size, m.snaps[&sid].clone()));
            }
            Op::DeleteSnapshot { snap } => {
                let Some(sid) = pick(&m.snaps, snap) else {
                    continue;
                };
                pool.delete_snapshot(sid).unwrap();
                m.snaps.remove(&sid);
            }
            Op::DeleteVolume { vol } => {
                let Some(id) = pick(&m.vols, vol) else {
                    continue;
                };
                pool.delete_volume(id).unwrap();
                m.vols.remove(&id);
            }
            Op::Grow { vol, by_chunks } => {
                let Some(id) = pick(&m.vols, vol) else {
                    continue;
                };
                let (_, data) = m.vols.get_mut(&id).unwrap();
                let new = data.len() + by_chunks as usize * CHUNK as usize;
                pool.resize_volume(id, new as u64).unwrap();
                data.resize(new, 0);
            }
            Op::Checkpoint => pool.checkpoint().unwrap(),
            Op::Reopen => {
                pool.close().unwrap();
                drop(pool);
                pool = Pool::open(dir.path(), test_open_opts()).unwrap();
            }
        }
    }
    // Everything reads back, live and through clones of every snapshot.
    for (id, (_, data)) in &m.vols {
        assert!(
            read_all(&pool.open_volume(*id).unwrap(), 0, data.len()) == *data,
            "final state of {id}"
        );
    }
    for (sid, data) in &m.snaps {
        let c = pool
            .clone_snapshot(*sid, &format!("check-{}", sid.0))
            .unwrap();
        assert!(
            read_all(&pool.open_volume(c.id).unwrap(), 0, data.len()) == *data,
            "snapshot {sid}"
        );
        pool.delete_volume(c.id).unwrap();
    }
    let rep = pool.verify().unwrap();
    assert!(rep.damaged.is_empty(), "{rep:?}");
    // Delete everything: every object must be released.
    for id in m.vols.keys() {
        pool.delete_volume(*id).unwrap();
    }
    for sid in m.snaps.keys() {
        pool.delete_snapshot(*sid).unwrap();
    }
    pool.reclaim().unwrap();
    let st = pool.stats().unwrap();
    assert_eq!(
        (st.chunks, st.index_nodes),
        (0, 0),
        "leaked objects: {st:?}"
    );
    assert_eq!(
        st.used_bytes, st.wal_bytes,
        "only WAL segments may remain in use: {st:?}"
    );
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: std::env::var("MAAS_PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(48),
        max_shrink_iters: 200,
        .. ProptestConfig::default()
    })]
    #[test]
    fn pool_matches_model(ops in proptest::collection::vec(op(), 1..60)) {
        run(ops);
    }
}
