//! The RAM tier's self-sizing policy, in the manner of the page cache and ZFS's ARC.
//!
//! With [`AutoRamTier`] the parts of the RAM tier it names (the decompressed chunk cache, the
//! log cache and the write buffer) share one *total target*. It starts at up to half of the
//! machine's memory (never above what is available beyond the high-water mark) and a watcher
//! thread re-decides it every [`AutoRamTier::interval`] from `/proc/meminfo` (`MemTotal`,
//! `MemAvailable`) and, where the kernel has it, `/proc/pressure/memory` (`some avg10`):
//!
//! - **Pressure** — `MemAvailable` below [`RamPolicy::low_water_pct`] of `MemTotal`, or PSI
//!   `some avg10` above [`RamPolicy::psi_high`]: the target drops at once below what the tier
//!   holds now (by a quarter of it, or twice the shortfall if that is more, never under the
//!   floor) and the caches evict down to it; the write buffer hands its batches to the device
//!   (never drops them).
//! - **Plenty** — `MemAvailable` above [`RamPolicy::high_water_pct`] and PSI below
//!   [`RamPolicy::psi_low`]: the target grows back by 1/32 of its maximum per tick (never by
//!   more than half of the memory available above the high-water mark).
//! - In between it holds.
//!
//! The total is split by weight: chunk cache 5, log cache 2, write buffer 1 (the write buffer
//! at most [`RamPolicy::write_buffer_cap`]). Parts given a fixed size are not auto-sized.
//!
//! The decisions are pure functions of the numbers read ([`MemSample`]) and the current
//! target, unit-tested below.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

/// `p` percent of `x`.
fn pct(x: u64, p: u64) -> u64 {
    (u128::from(x) * u128::from(p) / 100) as u64
}

/// The numbers the policy decides from.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct MemSample {
    pub total: u64,
    pub available: u64,
    /// PSI `some avg10` (percent of time some task stalled on memory), if the kernel has PSI.
    pub psi_some_avg10: Option<f64>,
}

/// The policy's constants (see the module docs).
#[derive(Clone, Debug, PartialEq)]
pub struct RamPolicy {
    /// Largest total, as a share of MemTotal, in percent.
    pub max_share_pct: u64,
    /// Smallest total the tier is ever shrunk to.
    pub floor: u64,
    /// Largest total whatever the machine.
    pub ceiling: u64,
    /// Below this share of MemTotal available (percent), the tier gives memory back.
    pub low_water_pct: u64,
    /// Above this share of MemTotal available (percent), the tier grows back.
    pub high_water_pct: u64,
    /// PSI `some avg10` above this is pressure.
    pub psi_high: f64,
    /// PSI `some avg10` must be below this to grow.
    pub psi_low: f64,
    /// Largest write buffer the split gives.
    pub write_buffer_cap: u64,
}

impl Default for RamPolicy {
    fn default() -> Self {
        RamPolicy {
            max_share_pct: 50,
            floor: 64 * MIB,
            ceiling: 64 * GIB,
            low_water_pct: 10,
            high_water_pct: 20,
            psi_high: 10.0,
            psi_low: 1.0,
            write_buffer_cap: GIB,
        }
    }
}

/// Byte targets of the three parts (0 for a part that is not auto-sized).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RamTargets {
    pub chunk_cache: u64,
    pub log_cache: u64,
    pub write_buffer: u64,
}

/// What the pool does with the memory situation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Pressure,
    Hold,
    Plenty,
}

impl RamPolicy {
    /// The largest total target on a machine with `mem_total` bytes.
    pub fn max_total(&self, mem_total: u64) -> u64 {
        pct(mem_total, self.max_share_pct)
            .min(self.ceiling)
            .max(self.floor)
    }

    fn low_water(&self, total: u64) -> u64 {
        pct(total, self.low_water_pct)
    }

    fn high_water(&self, total: u64) -> u64 {
        pct(total, self.high_water_pct)
    }

    pub fn verdict(&self, m: &MemSample) -> Verdict {
        let psi = m.psi_some_avg10.unwrap_or(0.0);
        if m.available < self.low_water(m.total) || psi > self.psi_high {
            Verdict::Pressure
        } else if m.available > self.high_water(m.total) && psi < self.psi_low {
            Verdict::Plenty
        } else {
            Verdict::Hold
        }
    }

    /// The total target at open: the maximum, but no more than what is available above the
    /// high-water mark (and at least the floor).
    pub fn initial(&self, m: &MemSample) -> u64 {
        let room = m.available.saturating_sub(self.high_water(m.total));
        room.min(self.max_total(m.total)).max(self.floor)
    }

    /// The next total target from the current one and what the tier holds now (`usage`).
    pub fn decide(&self, m: &MemSample, current: u64, usage: u64) -> u64 {
        let max = self.max_total(m.total);
        let current = current.min(max);
        match self.verdict(m) {
            Verdict::Pressure => {
                let shortfall = self.low_water(m.total).saturating_sub(m.available);
                let held = usage.min(current);
                let cut = (held / 4).max(shortfall.saturating_mul(2));
                held.saturating_sub(cut).max(self.floor).min(current)
            }
            Verdict::Plenty => {
                let room = m.available.saturating_sub(self.high_water(m.total)) / 2;
                let step = (max / 32).min(room);
                current.saturating_add(step).min(max)
            }
            Verdict::Hold => current,
        }
    }

    /// Splits a total target between the auto-sized parts: chunk cache 5, log cache 2, write
    /// buffer 1 (capped); each auto part gets at least 1/16 of the floor.
    pub fn split(&self, total: u64, parts: &AutoParts) -> RamTargets {
        let w = |on: bool, w: u64| if on { w } else { 0 };
        let (wc, wl, wb) = (
            w(parts.chunk_cache, 5),
            w(parts.log_cache, 2),
            w(parts.write_buffer, 1),
        );
        let sum = wc + wl + wb;
        if sum == 0 {
            return RamTargets::default();
        }
        let min_part = (self.floor / 16).max(MIB);
        let part = |wt: u64| {
            if wt == 0 {
                0
            } else {
                ((u128::from(total) * u128::from(wt) / u128::from(sum)) as u64).max(min_part)
            }
        };
        RamTargets {
            chunk_cache: part(wc),
            log_cache: part(wl),
            write_buffer: part(wb).min(self.write_buffer_cap.max(min_part)),
        }
    }
}

/// Which parts of the RAM tier are auto-sized.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AutoParts {
    pub chunk_cache: bool,
    pub log_cache: bool,
    pub write_buffer: bool,
}

/// Self-sizing of the RAM tier (see the module docs). Parts not named here keep the fixed
/// sizes of [`crate::OpenOptions`].
#[derive(Clone, Debug)]
pub struct AutoRamTier {
    pub parts: AutoParts,
    pub policy: RamPolicy,
    /// How often the watcher looks.
    pub interval: Duration,
    /// Where MemTotal and MemAvailable are read: `/proc/meminfo` (tests point it elsewhere).
    pub meminfo_path: PathBuf,
    /// Where PSI is read: `/proc/pressure/memory` (missing is fine: no PSI).
    pub pressure_path: PathBuf,
    /// Where the process's cgroup and the cgroup filesystem are (`/proc/self/cgroup`,
    /// `/sys/fs/cgroup`): a container's memory limit bounds the tier like the machine's memory.
    pub cgroup: CgroupPaths,
}

/// Where to find the memory limit of the cgroup the process runs in.
#[derive(Clone, Debug, PartialEq)]
pub struct CgroupPaths {
    /// `/proc/self/cgroup`.
    pub self_cgroup: PathBuf,
    /// `/sys/fs/cgroup` (cgroup v2 there or under `unified/`, v1's memory controller under
    /// `memory/`).
    pub root: PathBuf,
}

impl Default for CgroupPaths {
    fn default() -> Self {
        CgroupPaths {
            self_cgroup: "/proc/self/cgroup".into(),
            root: "/sys/fs/cgroup".into(),
        }
    }
}

/// The tightest memory limit over the process's cgroup and its ancestors, and what that cgroup
/// uses that it cannot simply drop (usage minus its inactive file cache).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CgroupMem {
    pub limit: u64,
    pub used: u64,
}

/// Limits at or above this are "no limit" (cgroup v1 writes 2^63 rounded down to a page).
const NO_LIMIT: u64 = 1 << 62;

fn read_u64(path: &Path) -> Option<u64> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// `key value` from a cgroup `memory.stat`.
fn stat_field(dir: &Path, key: &str) -> Option<u64> {
    let text = std::fs::read_to_string(dir.join("memory.stat")).ok()?;
    text.lines().find_map(|l| {
        let (k, v) = l.split_once(' ')?;
        (k == key).then(|| v.trim().parse().ok()).flatten()
    })
}

/// One cgroup directory's limit and non-reclaimable usage, cgroup v2 then v1 file names; None
/// without a limit.
fn cgroup_dir_mem(dir: &Path, v1: bool) -> Option<CgroupMem> {
    let (max, current, inactive) = if v1 {
        (
            "memory.limit_in_bytes",
            "memory.usage_in_bytes",
            "total_inactive_file",
        )
    } else {
        ("memory.max", "memory.current", "inactive_file")
    };
    // v2 writes "max" for no limit: it does not parse, which is the same answer.
    let limit = read_u64(&dir.join(max)).filter(|l| *l < NO_LIMIT)?;
    let usage = read_u64(&dir.join(current)).unwrap_or(0);
    let cache = stat_field(dir, inactive)
        .or_else(|| stat_field(dir, "inactive_file"))
        .unwrap_or(0);
    Some(CgroupMem {
        limit,
        used: usage.saturating_sub(cache),
    })
}

/// The memory limit that applies to this process: the tightest over its cgroup and every
/// ancestor up to the hierarchy's root (a container sees its own cgroup as the root), in
/// cgroup v2 or v1's memory controller. None when nothing limits it.
pub fn read_cgroup_mem(paths: &CgroupPaths) -> Option<CgroupMem> {
    let text = std::fs::read_to_string(&paths.self_cgroup).ok()?;
    let mut hierarchies: Vec<(PathBuf, &str, bool)> = Vec::new();
    for line in text.lines() {
        let mut f = line.splitn(3, ':');
        let (Some(id), Some(controllers), Some(path)) = (f.next(), f.next(), f.next()) else {
            continue;
        };
        if id == "0" && controllers.is_empty() {
            hierarchies.push((paths.root.clone(), path, false));
            hierarchies.push((paths.root.join("unified"), path, false));
        } else if controllers.split(',').any(|c| c == "memory") {
            hierarchies.push((paths.root.join("memory"), path, true));
        }
    }
    let mut best: Option<CgroupMem> = None;
    for (root, path, v1) in hierarchies {
        let mut dir = root.join(path.trim_start_matches('/'));
        loop {
            if let Some(m) = cgroup_dir_mem(&dir, v1)
                && best.is_none_or(|b| m.limit < b.limit)
            {
                best = Some(m);
            }
            if dir == root || !dir.pop() || !dir.starts_with(&root) {
                break;
            }
        }
    }
    best
}

pub const PROC_MEMINFO: &str = "/proc/meminfo";
pub const PROC_PRESSURE_MEMORY: &str = "/proc/pressure/memory";

impl Default for AutoRamTier {
    fn default() -> Self {
        AutoRamTier {
            parts: AutoParts {
                chunk_cache: true,
                log_cache: true,
                write_buffer: true,
            },
            policy: RamPolicy::default(),
            interval: Duration::from_secs(1),
            meminfo_path: PROC_MEMINFO.into(),
            pressure_path: PROC_PRESSURE_MEMORY.into(),
            cgroup: CgroupPaths::default(),
        }
    }
}

/// Parses `/proc/meminfo`: (MemTotal, MemAvailable) in bytes.
pub fn parse_meminfo(text: &str) -> Option<(u64, u64)> {
    let field = |name: &str| {
        text.lines().find_map(|l| {
            let rest = l.strip_prefix(name)?.strip_prefix(':')?;
            let kb: u64 = rest.trim().trim_end_matches("kB").trim().parse().ok()?;
            Some(kb.saturating_mul(1024))
        })
    };
    Some((field("MemTotal")?, field("MemAvailable")?))
}

/// Parses `/proc/pressure/memory`: the `some` line's avg10.
pub fn parse_psi(text: &str) -> Option<f64> {
    let line = text.lines().find(|l| l.starts_with("some "))?;
    line.split_whitespace()
        .find_map(|f| f.strip_prefix("avg10="))?
        .parse()
        .ok()
}

/// Reads a memory sample; an error (logged by the caller) if meminfo cannot be read or parsed.
/// Under a cgroup memory limit (a container, `MemoryMax=`), the limit is the machine: total is
/// at most the limit, available at most what the cgroup has left.
pub fn read_sample(auto: &AutoRamTier) -> std::result::Result<MemSample, String> {
    let (meminfo, pressure) = (&auto.meminfo_path, &auto.pressure_path);
    let text = std::fs::read_to_string(meminfo)
        .map_err(|e| format!("reading {}: {e}", meminfo.display()))?;
    let (mut total, mut available) = parse_meminfo(&text)
        .ok_or_else(|| format!("{}: no MemTotal and MemAvailable lines", meminfo.display()))?;
    if let Some(cg) = read_cgroup_mem(&auto.cgroup) {
        total = total.min(cg.limit);
        available = available.min(cg.limit.saturating_sub(cg.used));
    }
    let psi_some_avg10 = std::fs::read_to_string(pressure)
        .ok()
        .and_then(|t| parse_psi(&t));
    Ok(MemSample {
        total,
        available,
        psi_some_avg10,
    })
}

/// The RAM tier's targets and what it holds now, as stats expose them.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct RamTierStats {
    /// Whether any part sizes itself (false: every size is fixed by configuration).
    pub auto: bool,
    /// The auto parts' total target now, and its maximum on this machine.
    pub target_bytes: u64,
    pub max_bytes: u64,
    pub chunk_cache_limit: u64,
    pub chunk_cache_bytes: u64,
    pub log_cache_limit: u64,
    pub log_cache_bytes: u64,
    pub write_buffer_limit: u64,
    pub write_buffer_bytes: u64,
    /// Times the watcher shrank the tier under memory pressure.
    pub shrinks: u64,
    /// The last memory sample (0 if none).
    pub mem_total_bytes: u64,
    pub mem_available_bytes: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: AutoParts = AutoParts {
        chunk_cache: true,
        log_cache: true,
        write_buffer: true,
    };

    fn mem(total_gib: u64, avail_mib: u64, psi: Option<f64>) -> MemSample {
        MemSample {
            total: total_gib * GIB,
            available: avail_mib * MIB,
            psi_some_avg10: psi,
        }
    }

    #[test]
    fn max_is_half_of_memory_within_floor_and_ceiling() {
        let p = RamPolicy::default();
        assert_eq!(p.max_total(24 * GIB), 12 * GIB);
        assert_eq!(p.max_total(64 * MIB), p.floor);
        assert_eq!(p.max_total(1024 * GIB), 64 * GIB);
    }

    #[test]
    fn initial_leaves_room_above_the_high_water_mark() {
        let p = RamPolicy::default();
        // 24 GiB, 20 GiB free: the whole half.
        assert_eq!(p.initial(&mem(24, 20 * 1024, None)), 12 * GIB);
        // 24 GiB, 6 GiB free: 6 GiB - 20% of 24 GiB.
        let t = p.initial(&mem(24, 6 * 1024, None));
        assert_eq!(t, 6 * GIB - pct(24 * GIB, 20));
        // Almost nothing free: the floor.
        assert_eq!(p.initial(&mem(24, 100, None)), p.floor);
    }

    #[test]
    fn pressure_shrinks_below_usage_at_once() {
        let p = RamPolicy::default();
        let cur = 12 * GIB;
        // 1 GiB available of 24 (below 10%): shortfall ~1.4 GiB, cut twice that from usage.
        let m = mem(24, 1024, None);
        assert_eq!(p.verdict(&m), Verdict::Pressure);
        let usage = 8 * GIB;
        let next = p.decide(&m, cur, usage);
        let shortfall = pct(24 * GIB, 10) - GIB;
        assert_eq!(next, usage - 2 * shortfall);
        assert!(next < usage);
        // A small usage: a quarter of it, not below the floor.
        assert_eq!(p.decide(&m, cur, 100 * MIB), p.floor);
        // Never above the current target.
        assert!(p.decide(&m, 2 * GIB, 8 * GIB) <= 2 * GIB);
    }

    #[test]
    fn psi_alone_is_pressure() {
        let p = RamPolicy::default();
        let m = mem(24, 20 * 1024, Some(25.0));
        assert_eq!(p.verdict(&m), Verdict::Pressure);
        assert_eq!(p.decide(&m, 12 * GIB, 8 * GIB), 6 * GIB);
    }

    #[test]
    fn plenty_grows_back_gradually_and_hold_holds() {
        let p = RamPolicy::default();
        let m = mem(24, 20 * 1024, Some(0.0));
        assert_eq!(p.verdict(&m), Verdict::Plenty);
        let next = p.decide(&m, p.floor, 0);
        assert_eq!(next, p.floor + 12 * GIB / 32);
        let mut t = p.floor;
        for _ in 0..64 {
            t = p.decide(&m, t, t);
        }
        assert_eq!(t, 12 * GIB);
        // Between the marks (15% available): hold.
        let between = MemSample {
            total: 24 * GIB,
            available: pct(24 * GIB, 15),
            psi_some_avg10: None,
        };
        assert_eq!(p.verdict(&between), Verdict::Hold);
        assert_eq!(p.decide(&between, 3 * GIB, GIB), 3 * GIB);
        // Growth never takes more than half the room above the high-water mark.
        let tight = MemSample {
            total: 24 * GIB,
            available: pct(24 * GIB, 20) + 64 * MIB,
            psi_some_avg10: None,
        };
        assert_eq!(p.decide(&tight, GIB, GIB), GIB + 32 * MIB);
    }

    #[test]
    fn split_by_weight_with_a_capped_write_buffer() {
        let p = RamPolicy::default();
        let t = p.split(8 * MIB * 100, &ALL);
        assert_eq!(t.chunk_cache, 500 * MIB);
        assert_eq!(t.log_cache, 200 * MIB);
        assert_eq!(t.write_buffer, 100 * MIB);
        let big = p.split(12 * GIB, &ALL);
        assert_eq!(big.write_buffer, GIB);
        let only_chunks = p.split(
            GIB,
            &AutoParts {
                chunk_cache: true,
                log_cache: false,
                write_buffer: false,
            },
        );
        assert_eq!(only_chunks.chunk_cache, GIB);
        assert_eq!(only_chunks.log_cache, 0);
        assert_eq!(only_chunks.write_buffer, 0);
        // Never 0 for an auto part (0 means "off" for the write buffer and caches).
        let tiny = p.split(0, &ALL);
        assert!(tiny.write_buffer > 0 && tiny.log_cache > 0 && tiny.chunk_cache > 0);
    }

    fn write(path: &Path, text: &str) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    }

    #[test]
    fn a_cgroup_v2_limit_bounds_the_machine() {
        let t = tempfile::tempdir().unwrap();
        let paths = CgroupPaths {
            self_cgroup: t.path().join("self-cgroup"),
            root: t.path().join("fs"),
        };
        // No cgroup file at all: no limit.
        assert_eq!(read_cgroup_mem(&paths), None);
        write(&paths.self_cgroup, "0::/kubepods/pod1/c1\n");
        let leaf = paths.root.join("kubepods/pod1/c1");
        write(&leaf.join("memory.max"), "max\n");
        write(&paths.root.join("kubepods/pod1/memory.max"), "2147483648\n");
        write(
            &paths.root.join("kubepods/pod1/memory.current"),
            "1073741824\n",
        );
        write(
            &paths.root.join("kubepods/pod1/memory.stat"),
            "anon 600000000\ninactive_file 268435456\n",
        );
        write(&paths.root.join("kubepods/memory.max"), "8589934592\n");
        // The tightest ancestor wins; its inactive file cache counts as free.
        assert_eq!(
            read_cgroup_mem(&paths),
            Some(CgroupMem {
                limit: 2 << 30,
                used: (1 << 30) - (256 << 20),
            })
        );
        // The sample: a 24 GiB machine with 20 GiB available is a 2 GiB one with 1.25 left.
        let auto = AutoRamTier {
            meminfo_path: t.path().join("meminfo"),
            pressure_path: t.path().join("no-psi"),
            cgroup: paths,
            ..AutoRamTier::default()
        };
        write(
            &auto.meminfo_path,
            "MemTotal: 25165824 kB\nMemAvailable: 20971520 kB\n",
        );
        let m = read_sample(&auto).unwrap();
        assert_eq!((m.total, m.available), (2 << 30, (1 << 30) + (256 << 20)));
        // And the policy sizes the tier from that, not from the host.
        assert!(RamPolicy::default().max_total(m.total) <= 1 << 30);
    }

    #[test]
    fn a_cgroup_v1_memory_limit_counts_and_no_limit_is_none() {
        let t = tempfile::tempdir().unwrap();
        let paths = CgroupPaths {
            self_cgroup: t.path().join("self-cgroup"),
            root: t.path().join("fs"),
        };
        write(
            &paths.self_cgroup,
            "4:memory:/process_api/abc\n0::/\n1:cpu:/\n",
        );
        let dir = paths.root.join("memory/process_api/abc");
        write(&dir.join("memory.limit_in_bytes"), "9223372036854771712\n");
        write(&dir.join("memory.usage_in_bytes"), "7551299584\n");
        assert_eq!(read_cgroup_mem(&paths), None, "v1's huge value is no limit");
        write(&dir.join("memory.limit_in_bytes"), "4294967296\n");
        write(
            &dir.join("memory.stat"),
            "inactive_file 1\ntotal_inactive_file 1073741824\n",
        );
        assert_eq!(
            read_cgroup_mem(&paths),
            Some(CgroupMem {
                limit: 4 << 30,
                used: 7551299584 - (1 << 30),
            })
        );
    }

    #[test]
    fn parses_proc_files() {
        let mi = "MemTotal:       24576000 kB\nMemFree:  100 kB\nMemAvailable:   1024000 kB\n";
        assert_eq!(parse_meminfo(mi), Some((24576000 * 1024, 1024000 * 1024)));
        assert_eq!(parse_meminfo("MemTotal: 5 kB\n"), None);
        let psi = "some avg10=12.50 avg60=3.00 avg300=1.00 total=123\nfull avg10=1.00 avg60=0.00 avg300=0.00 total=1\n";
        assert_eq!(parse_psi(psi), Some(12.5));
        assert_eq!(parse_psi("garbage"), None);
    }
}
