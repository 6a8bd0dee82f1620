#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Power loss through a real kernel: the pool runs in a Linux guest on ext4 over Linux's
//! `dm-log-writes`, which records every write, discard and flush the kernel sends to the device
//! (io_uring, O_DIRECT, fdatasync, ext4's journal, the block layer: the real stack), in the order
//! they became durable. Several writer threads write, write atomically, write with FUA, write
//! zeroes, discard and flush while the pool folds and cleans its log; every acknowledged flush
//! or FUA write drops a mark into the log (`tests/src/bin/kernel-powerloss.rs`).
//!
//! On the host, the log is replayed to many cut points. At each, the device holds everything up
//! to the last flush before the cut plus a random subset of the writes logged after it (in the
//! device's volatile cache at the cut; one of them possibly torn mid-request). That image is
//! mounted (ext4 replays its own journal), the pool opened (it replays its log) and checked:
//! every write acknowledged before the cut reads back (or a later write), atomic writes are all
//! or nothing, and `verify` reports no damage.
//!
//! `MAAS_KERNEL_POWERLOSS_POINTS` sets the number of cut points (default 40).

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use maas_tests::TestDir;
use maas_tests::dmlog::Log;
use maas_tests::guest::Guest;
use maas_tests::guest::workflow::one_at_a_time;
use rand::distributions::{Distribution, WeightedIndex};
use rand::{Rng, SeedableRng};

const WORKLOAD: &str = env!("CARGO_BIN_EXE_kernel-powerloss");

const GUEST_SCRIPT: &str = r#"
set -e
export DM_DISABLE_UDEV=1
modprobe brd rd_nr=2 rd_size=393216
modprobe dm-log-writes
dmsetup create lw --table "0 $(blockdev --getsz /dev/ram0) log-writes /dev/ram0 /dev/ram1"
[ -b /dev/mapper/lw ] || fail "dmsetup made no /dev/mapper/lw"
mkfs.ext4 -q -E nodiscard,lazy_itable_init=0,lazy_journal_init=0 /dev/mapper/lw
mkdir -p /mnt/t
mount /dev/mapper/lw /mnt/t
mark workload
"$WORKLOAD" run --pool /mnt/t/pool --journal /xchg/journal --dm-name lw \
    --ops-per-thread "$OPS" --seed "$SEED"
umount /mnt/t
dmsetup remove lw
blockdev --getsize64 /dev/ram0 > /xchg/data-bytes
"$WORKLOAD" extract-log --device /dev/ram1 --out /xchg/log.bin
"#;

/// Unmounts (and detaches the loop device) when dropped, even when a check panics.
struct Mounted(PathBuf);

impl Mounted {
    fn new(image: &Path, at: &Path) -> Mounted {
        std::fs::create_dir_all(at).unwrap();
        let out = Command::new("mount")
            .arg("-o")
            .arg("loop")
            .arg(image)
            .arg(at)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "mount -o loop {}: {}",
            image.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        Mounted(at.to_path_buf())
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-d").arg(&self.0).status();
    }
}

/// The device as a cut just before entry `cut` leaves it, given `durable` (a replay of every
/// entry up to the last flush before the cut): each write logged after that flush landed or
/// not, at random (a FUA write always: it completed before the cut), one of them maybe torn.
fn cut_image(
    log: &Log,
    durable: &Path,
    last_flush: usize,
    cut: usize,
    out: &Path,
    rng: &mut impl Rng,
) -> (usize, usize) {
    let st = Command::new("cp")
        .args(["--sparse=always", "--reflink=auto"])
        .arg(durable)
        .arg(out)
        .status()
        .unwrap();
    assert!(st.success());
    let img = std::fs::OpenOptions::new().write(true).open(out).unwrap();
    let (mut landed, mut lost) = (0, 0);
    for i in last_flush..cut {
        let e = &log.entries[i];
        if !e.changes_data() {
            continue;
        }
        // The flush itself is durable; the data it carries (a pre-flushed write) is not,
        // unless written with FUA.
        if e.is_fua() || rng.gen_bool(0.5) {
            let torn = (!e.is_fua() && e.nr_sectors > 1 && rng.gen_range(0..4) == 0)
                .then(|| rng.gen_range(0..e.nr_sectors));
            log.apply(i, &img, torn).unwrap();
            landed += 1;
        } else {
            lost += 1;
        }
    }
    img.sync_all().unwrap();
    (landed, lost)
}

#[test]
fn pool_survives_power_cuts_replayed_from_a_real_kernel_write_log() {
    let _one = one_at_a_time();
    let points: usize = std::env::var("MAAS_KERNEL_POWERLOSS_POINTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(40);
    let seed: u64 = 0x9047_1055_0000_0001;
    let tmp = TestDir::new("guest-powerloss-");
    let xchg = tmp.path().join("xchg");
    std::fs::create_dir_all(&xchg).unwrap();

    let started = Instant::now();
    let run = Guest::new("powerloss")
        .exchange(&xchg)
        .memory_mib(3072)
        .timeout(Duration::from_secs(1200))
        .env("WORKLOAD", WORKLOAD)
        .env("OPS", 250)
        .env("SEED", seed)
        .run(GUEST_SCRIPT);
    run.assert_success();
    eprintln!("guest workload: {:.1?}", started.elapsed());

    let log = Log::open(&xchg.join("log.bin")).unwrap();
    let data_bytes: u64 = std::fs::read_to_string(xchg.join("data-bytes"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let created = log.mark("created").expect("no `created` mark in the log");
    let done = log.mark("done").expect("no `done` mark in the log");
    let acks: Vec<usize> = (created..done)
        .filter(|&i| {
            log.entries[i]
                .mark
                .as_deref()
                .is_some_and(|m| m.starts_with("ack-"))
        })
        .collect();
    let flushes: Vec<usize> = (created..done)
        .filter(|&i| log.entries[i].is_flush())
        .collect();
    eprintln!(
        "log: {} entries, {} flushes and {} acknowledgements during the workload",
        log.entries.len(),
        flushes.len(),
        acks.len()
    );
    assert!(
        acks.len() > 100 && flushes.len() > acks.len() / 2,
        "the workload acknowledged too little to test ({} acks, {} flushes)",
        acks.len(),
        flushes.len()
    );

    // Cut points: right before a flush (the most in flight), right after an acknowledgement
    // (the least slack), anywhere, and the end of the run. The cuts before a flush are drawn in
    // proportion to the writes that flush would have made durable: a cut there decides the fate
    // of the most cached writes, and the guard at the end needs cuts that drop some.
    let at_risk: Vec<usize> = flushes
        .iter()
        .map(|&f| {
            let prev = (0..f)
                .rev()
                .find(|&i| log.entries[i].is_flush())
                .unwrap_or(0);
            (prev..f)
                .filter(|&i| log.entries[i].changes_data() && !log.entries[i].is_fua())
                .count()
        })
        .collect();
    eprintln!(
        "flushes with cached writes before them: {} of {} ({} writes at risk)",
        at_risk.iter().filter(|&&n| n > 0).count(),
        flushes.len(),
        at_risk.iter().sum::<usize>()
    );
    let before_flush = WeightedIndex::new(&at_risk).ok();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut cuts: Vec<usize> = (0..points)
        .map(|k| match k % 3 {
            0 => match &before_flush {
                Some(w) => flushes[w.sample(&mut rng)],
                None => flushes[rng.gen_range(0..flushes.len())],
            },
            1 => acks[rng.gen_range(0..acks.len())] + 1,
            _ => rng.gen_range(created + 1..=done),
        })
        .collect();
    cuts.push(done);
    cuts.sort_unstable();
    cuts.dedup();

    let durable_path = tmp.path().join("durable.img");
    let durable = File::create(&durable_path).unwrap();
    durable.set_len(data_bytes).unwrap();
    let mut replayed = 0; // entries [0, replayed) are in `durable`
    let (mut landed_total, mut lost_total, mut acked_max) = (0, 0, 0);
    for (n, &cut) in cuts.iter().enumerate() {
        let last_flush = (0..cut)
            .rev()
            .find(|&i| log.entries[i].is_flush())
            .unwrap_or(0);
        // Everything before the last flush is on the medium; the flush's own data is not.
        for i in replayed..last_flush {
            log.apply(i, &durable, None).unwrap();
        }
        replayed = replayed.max(last_flush);
        let image = tmp.path().join("cut.img");
        let (landed, lost) = cut_image(&log, &durable_path, last_flush, cut, &image, &mut rng);
        landed_total += landed;
        lost_total += lost;
        let acked: Vec<&str> = log.entries[..cut]
            .iter()
            .filter_map(|e| e.mark.as_deref()?.strip_prefix("ack-"))
            .collect();
        acked_max = acked_max.max(acked.len());

        let mnt = tmp.path().join("mnt");
        let mounted = Mounted::new(&image, &mnt);
        let out = Command::new(WORKLOAD)
            .arg("check")
            .arg("--pool")
            .arg(mnt.join("pool"))
            .arg("--journal")
            .arg(xchg.join("journal"))
            .arg("--acked")
            .arg(acked.join(","))
            .output()
            .unwrap();
        let listing = if out.status.success() {
            String::new()
        } else {
            let ls = Command::new("ls").arg("-laR").arg(&mnt).output().unwrap();
            String::from_utf8_lossy(&ls.stdout).into_owned()
        };
        drop(mounted);
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            out.status.success(),
            "cut {n} at log entry {cut} (last flush {last_flush}, {landed} cached writes \
             landed, {lost} lost, {} acknowledgements before it): {text}\nthe filesystem:\n{listing}",
            acked.len()
        );
        eprintln!(
            "cut {n} at entry {cut}: {landed} cached writes landed, {lost} lost; {}",
            text.trim()
        );
    }
    eprintln!(
        "{} cuts checked in {:.1?}: {landed_total} cached writes landed, {lost_total} lost",
        cuts.len(),
        started.elapsed()
    );
    assert!(
        lost_total > cuts.len() && acked_max > 100,
        "the cuts dropped too little ({lost_total} writes) or came before the \
         acknowledgements ({acked_max}): the test did not test"
    );
}
