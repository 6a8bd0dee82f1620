#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Power loss under the real maasd: the server runs with its pool under the power-loss
//! simulation (`MAAS_TEST_POWERLOSS_JOURNAL`), QEMU writes through iSCSI, maasd is SIGKILLed
//! in the middle of a second write, and the power is then cut over the journal (every write
//! no completed sync covered may be lost, reordered or torn). After the restart, what QEMU
//! wrote and flushed reads back exactly, the interrupted region holds only old or new
//! sectors, and the pool reports no damage.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::iscsi::*;
use common::*;
use maas_tests::maasd::verify_pool;

const REGION: u64 = 32 << 20;

fn random_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = vec![0u8; len];
    for c in out.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        c.copy_from_slice(&x.to_le_bytes()[..c.len()]);
    }
    out
}

/// `--image-opts` of a window [offset, offset+REGION) of the export (QEMU's raw driver).
fn window(e: &serde_json::Value, offset: u64) -> String {
    format!(
        "driver=raw,offset={offset},size={REGION},file.driver=iscsi,file.transport=tcp,\
         file.portal={},file.target={},file.lun={},file.initiator-name={QEMU_INITIATOR}",
        e["portal"].as_str().unwrap(),
        e["target"].as_str().unwrap(),
        e["lun"].as_u64().unwrap(),
    )
}

fn convert_to(src: &std::path::Path, opts: &str) -> Command {
    let mut c = Command::new(qemu_img());
    // writeback: QEMU flushes the target (SYNCHRONIZE CACHE) before it exits successfully;
    // convert's default for its target is cache=unsafe, which never flushes.
    c.args(["convert", "-n", "-t", "writeback", "-f", "raw"])
        .arg(src)
        .args(["--target-image-opts", opts]);
    c
}

fn read_window(e: &serde_json::Value, offset: u64, dst: &std::path::Path) -> Vec<u8> {
    let out = run_with_timeout(
        Command::new(qemu_img())
            .args(["convert", "-O", "raw", "--image-opts", &window(e, offset)])
            .arg(dst),
        300,
    );
    assert!(out.status.success(), "qemu-img read: {}", text(&out));
    std::fs::read(dst).unwrap()
}

#[test]
fn maasd_power_cut_keeps_what_qemu_flushed() {
    let dir = tempfile::tempdir().unwrap();
    let journal = dir.path().join("powerloss.journal");
    let mut m = Maasd::builder(MAASD, dir.path())
        .device_size(512 << 20)
        .env("MAAS_TEST_POWERLOSS_JOURNAL", journal.to_str().unwrap())
        // No write buffer: QEMU's unflushed writes reach the device at once, so the cut has
        // unsynced writes to tear (with the buffer they would simply vanish with the process).
        .env("MAAS_POOL_WRITE_BUFFER_BYTES", "0")
        .start();
    assert!(
        m.log()
            .contains("TEST MODE: the pool runs under the power-loss simulation"),
        "{}",
        m.log()
    );
    let vol = volume(&m, "pl", 4 * REGION, 512);
    let e = export(&m, &vol, &[QEMU_INITIATOR], None);
    let mut rolled_back = 0;
    for round in 0..3u64 {
        // Region A: written and flushed (qemu-img flushes before it exits successfully).
        let a = random_bytes(round * 2 + 1, REGION as usize);
        let src_a = dir.path().join("a.img");
        std::fs::write(&src_a, &a).unwrap();
        let out = run_with_timeout(&mut convert_to(&src_a, &window(&e, 0)), 300);
        assert!(out.status.success(), "round {round}: {}", text(&out));

        // Region B: being written when the server dies.
        let b = random_bytes(round * 2 + 2, REGION as usize);
        let src_b = dir.path().join("b.img");
        std::fs::write(&src_b, &b).unwrap();
        let before_b = read_window(&e, 2 * REGION, &dir.path().join("before-b.img"));
        let mut writer = convert_to(&src_b, &window(&e, 2 * REGION))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(100 + 100 * round));
        m.kill9();
        let _ = writer.kill();
        let _ = writer.wait();
        let cut = maas_pool::powerloss::power_cut_journal(&journal, 0xC0DE + round).unwrap();
        rolled_back += cut.rolled_back;
        std::fs::remove_file(&journal).unwrap();

        m.start_again();
        let got_a = read_window(&e, 0, &dir.path().join("got-a.img"));
        assert!(
            got_a == a,
            "round {round}: flushed region A differs after the power cut"
        );
        let got_b = read_window(&e, 2 * REGION, &dir.path().join("got-b.img"));
        for (s, got) in got_b.chunks(512).enumerate() {
            let r = s * 512..(s + 1) * 512;
            assert!(
                got == &b[r.clone()] || got == &before_b[r],
                "round {round}: sector {s} of the interrupted region is neither old nor new"
            );
        }
        let rep = verify_pool(&m);
        assert!(
            rep["damaged"].as_array().is_some_and(|d| d.is_empty())
                && rep["damaged_blocks"]
                    .as_array()
                    .is_some_and(|d| d.is_empty())
                && rep["log_damage"].as_array().is_some_and(|d| d.is_empty()),
            "round {round}: a power cut reported as damage: {rep}"
        );
    }
    eprintln!("{rolled_back} unsynced sectors rolled back over 3 cuts");
    assert!(
        rolled_back > 0,
        "the cuts found nothing unsynced: the test did not test"
    );
    m.stop();
}
