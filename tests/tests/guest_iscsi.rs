#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Real Linux hosts over iSCSI: Debian's kernel and the host's own open-iscsi, e2fsprogs and fio
//! in QEMU guests (`scripts/guest-build.sh`, `maas_tests::guest`) against the real `maasd`.
//!
//! - `mount_and_restore_workflow`: a host backs up a file tree onto a MaaS volume, the volume is
//!   sealed, an incremental backup changes it, sealed again; clones of both snapshots restore
//!   exactly their point in time to a fresh host, `fsck.ext4 -n` finds them clean, writes on
//!   the clones touch neither the snapshots nor the original; unlisted initiators and wrong
//!   CHAP secrets are refused at login.
//! - `fio_verify_survives_maasd_sigkill`: fio writes with `O_DSYNC` (every write FUA) and
//!   crc32c verify headers while `maasd` is SIGKILLed and restarted; the session recovers and
//!   every write fio saw complete verifies, then again after a second crash with all writes done.
//!
//! The scenario itself is shared with the NVMe/TCP tests (`maas_tests::guest::workflow`).
//!
//! Run alone with `cargo test -p maas-tests --test guest_iscsi -- --nocapture` (timings on
//! stderr). TCG is slow: guests are for correctness, not speed.

use std::time::Duration;

use maas_tests::TestDir;
use maas_tests::guest::workflow::{
    Clock, Dataset, ISCSI, MIB, mount_and_restore, one_at_a_time, portal, run_ok, target,
};
use maas_tests::guest::{Guest, ISCSI_SH};
use maas_tests::maasd::{Maasd, export, maasd_bin, volume};
use serde_json::{Value, json};

#[test]
fn mount_and_restore_workflow() {
    let _one = one_at_a_time();
    let mut clock = Clock::new("mount_and_restore");
    let tmp = TestDir::new("guest-iscsi-");
    let xchg = tmp.path().join("xchg");
    std::fs::create_dir_all(&xchg).unwrap();
    let m = Maasd::builder(maasd_bin(), &tmp.path().join("maasd"))
        .device_size(4 << 30)
        .guest_portal()
        .start();
    let data = Dataset::create(&xchg);
    clock.lap("data set on the host");
    // Steps 1-5.
    let e = mount_and_restore(
        &m,
        &ISCSI,
        &data,
        &xchg,
        &tmp.path().join("images"),
        &mut clock,
    )
    .export;

    // 6. Access control at login: an initiator that is not listed sees no target and cannot
    // log in; with CHAP, no or a wrong secret fails and the right one works, mutual CHAP too.
    let outsider = ISCSI.guest("outsider", &xchg, 300);
    let chap_vol = volume(&m, "chap", 64 * MIB, 512);
    let (user, secret) = ("backup-host", "s3cret-s3cret-42");
    let (muser, msecret) = ("maas-target", "m-s3cret-m-s3cret");
    let ec = export(
        &m,
        &chap_vol,
        &[outsider.initiator_name()],
        Some(
            json!({"user": user, "secret": secret, "mutual_user": muser, "mutual_secret": msecret}),
        ),
    );
    let run = run_ok(
        &outsider
            .clone()
            .env("PORTAL", portal(&e))
            .env("ORIG", target(&e))
            .env("CHAPT", target(&ec))
            .env("USER_", user)
            .env("SECRET", secret)
            .env("MUSER", muser)
            .env("MSECRET", msecret),
        r#"
set -uo pipefail
iscsi_start
iscsi_discover "$PORTAL" >/tmp/targets 2>&1; cat /tmp/targets
grep -q "$ORIG" /tmp/targets && fail "SendTargets shows an unlisted initiator $ORIG"
grep -q " $CHAPT\$" /tmp/targets || fail "SendTargets hides $CHAPT from a listed initiator"
sessions() { ls /sys/class/iscsi_session | wc -l; }
# refused LABEL TARGET STATUS: the login fails with iscsiadm's STATUS (24: authorization
# failure, from the target; 19: non-retryable, the initiator refused the target) and leaves no
# session.
refused() {
    local rc=0
    iscsi_login "$2" "$PORTAL" || rc=$?
    [ "$rc" != 0 ] || fail "$1: logged in"
    echo "$1: refused (iscsiadm status $rc)"
    [ "$rc" = "$3" ] || fail "$1: iscsiadm status $rc, expected $3"
    [ "$(sessions)" = 0 ] || fail "$1: a session remains"
}
# An initiator missing from the allow-list, with a node record made by hand.
iscsi_node "$ORIG" "$PORTAL"
refused unlisted "$ORIG" 24
refused no-chap "$CHAPT" 24
iscsi_chap "$CHAPT" "$PORTAL" "$USER_" wrong-secret-wrong
refused wrong-secret "$CHAPT" 24
iscsi_chap "$CHAPT" "$PORTAL" "$USER_" "$SECRET"
iscsi_login "$CHAPT" "$PORTAL" || fail "one-way CHAP with the right secret"
dd if="$(iscsi_disk "$CHAPT")" of=/dev/null bs=4k count=16 iflag=direct status=none || fail "read"
iscsi_logout "$CHAPT" "$PORTAL"
echo "one-way CHAP: logged in"
# Mutual CHAP: the initiator refuses a target that does not know the secret it expects.
iscsi_chap "$CHAPT" "$PORTAL" "$USER_" "$SECRET" "$MUSER" not-the-target-secret
refused wrong-mutual-secret "$CHAPT" 19
iscsi_chap "$CHAPT" "$PORTAL" "$USER_" "$SECRET" "$MUSER" "$MSECRET"
iscsi_login "$CHAPT" "$PORTAL" || fail "mutual CHAP with the right secrets"
dd if="$(iscsi_disk "$CHAPT")" of=/dev/null bs=4k count=16 iflag=direct status=none || fail "read"
iscsi_logout "$CHAPT" "$PORTAL"
echo "mutual CHAP: logged in"
"#,
    );
    for label in ["unlisted", "no-chap", "wrong-secret", "wrong-mutual-secret"] {
        assert!(
            run.output.contains(&format!("{label}: refused")),
            "{label}\n{run}"
        );
    }
    let log = m.log();
    assert!(
        log.contains("login refused"),
        "maasd logs refused logins:\n{log}"
    );
    clock.lap("step 6: allow-list and CHAP at login");
    drop(m);
    clock.lap("done");
}

/// The pieces of maasd's log after its `n`th start (0: the first).
fn log_since_start(log: &str, n: usize) -> String {
    let starts: Vec<usize> = log
        .match_indices("iSCSI target listening")
        .map(|(i, _)| i)
        .collect();
    assert!(
        starts.len() > n,
        "maasd started {} times:\n{log}",
        starts.len()
    );
    log[starts[n]..].to_string()
}

#[test]
fn fio_verify_survives_maasd_sigkill() {
    let _one = one_at_a_time();
    let mut clock = Clock::new("fio_sigkill");
    let tmp = TestDir::new("guest-iscsi-");
    let mut m = Maasd::builder(maasd_bin(), &tmp.path().join("maasd"))
        .guest_portal()
        .start();
    let g = Guest::new("fio-host")
        .lib(ISCSI_SH)
        .timeout(Duration::from_secs(600));
    let vol = volume(&m, "fio", 256 * MIB, 4096);
    let e = export(&m, &vol, &[g.initiator_name()], None);
    let size = 48 * MIB;
    let g = g
        .env("PORTAL", portal(&e))
        .env("TARGET", target(&e))
        .env("SIZE", size);
    // Every write is O_DSYNC (FUA): fio counts a write done only once maasd made it durable,
    // so a SIGKILL may lose nothing fio saw complete; verify headers (crc32c, offset, length)
    // catch lost, stale, misplaced or torn blocks.
    let mut running = g.spawn(
        r#"
set -uo pipefail
iscsi_start
iscsi_discover "$PORTAL" >/dev/null
iscsi_login "$TARGET" "$PORTAL" || fail login
dev=$(iscsi_disk "$TARGET")
sectors() { awk '{print $7}' "/sys/block/${dev#/dev/}/stat"; }
recoveries() { grep -c "operational after recovery" "$MAAS_RUN/iscsid.log"; }
JOB=(--name=durable --filename="$dev" --direct=1 --sync=dsync --ioengine=libaio --iodepth=8
     --rw=randwrite --bsrange=4k-64k --size="$SIZE" --randrepeat=1 --verify=crc32c
     --verify_fatal=1 --output-format=json)
fio "${JOB[@]}" --output="$MAAS_RUN/fio.json" &
FIO=$!
until [ "$(sectors)" -ge $((SIZE / 512 / 4)) ]; do
    kill -0 $FIO 2>/dev/null || fail "fio ended early: $(cat "$MAAS_RUN/fio.json")"
    sleep 0.2
done
echo "under way: $(sectors) sectors written"
mark under-way
# The host SIGKILLs maasd and starts it again: the session must recover while fio writes.
until [ "$(recoveries)" -ge 1 ]; do
    kill -0 $FIO 2>/dev/null || fail "fio ended before the session recovered"
    sleep 0.2
done
written=$(sectors)
echo "recovered while fio ran: $written of $((SIZE / 512)) sectors written"
[ "$written" -lt $((SIZE / 512)) ] || fail "the write phase was over before the recovery"
wait $FIO; rc=$?
cat "$MAAS_RUN/fio.json"
[ $rc = 0 ] || fail "fio failed ($rc)"
mark written
# A second crash with every write done: all of it must read back.
for i in $(seq 600); do [ "$(recoveries)" -ge 2 ] && break; sleep 0.2; done
[ "$(recoveries)" -ge 2 ] || fail "no second recovery"
fio "${JOB[@]}" --verify_only --output="$MAAS_RUN/fio-verify.json"; rc=$?
cat "$MAAS_RUN/fio-verify.json"
[ $rc = 0 ] || fail "fio --verify_only failed ($rc)"
iscsi_logout "$TARGET" "$PORTAL"
dmesg | grep -E "connection|session" | tail -20
"#,
    );
    running.wait_for_mark("under-way", Duration::from_secs(300));
    clock.lap("boot, login, first quarter of the writes");
    m.kill9();
    std::thread::sleep(Duration::from_secs(2));
    m.start_again();
    clock.lap("maasd SIGKILLed and restarted mid-run");
    running.wait_for_mark("written", Duration::from_secs(400));
    clock.lap("fio write + verify phases done");
    m.kill9();
    std::thread::sleep(Duration::from_secs(1));
    m.start_again();
    let run = running.wait();
    run.assert_success();
    clock.lap("second SIGKILL, fio --verify_only");

    // fio: no errors; every byte written and read back verified, twice.
    let json_of = |name: &str| -> Value {
        let text = run.file(name);
        serde_json::from_str(&text[text.find('{').unwrap_or(0)..])
            .unwrap_or_else(|e| panic!("{name}: {e}\n{text}\n{run}"))
    };
    let first = json_of("fio.json");
    let job = &first["jobs"][0];
    assert_eq!(job["error"], 0, "{first}");
    assert_eq!(job["write"]["io_bytes"], size, "{first}");
    assert_eq!(
        job["read"]["io_bytes"], size,
        "the verify phase read it all: {first}"
    );
    let second = json_of("fio-verify.json");
    let job = &second["jobs"][0];
    assert_eq!(job["error"], 0, "{second}");
    assert_eq!(job["read"]["io_bytes"], size, "{second}");
    assert_eq!(
        job["read"]["total_ios"], first["jobs"][0]["write"]["total_ios"],
        "every write read back: {second}"
    );
    for l in run
        .output
        .lines()
        .filter(|l| l.starts_with("under way") || l.starts_with("recovered"))
    {
        eprintln!("[fio_sigkill] guest: {l}");
    }
    // The initiator really lost its session twice and came back each time, to a new maasd.
    let iscsid = run.file("iscsid.log");
    assert_eq!(
        iscsid.matches("operational after recovery").count(),
        2,
        "{iscsid}"
    );
    let log = m.log();
    for n in 1..=2 {
        let after = log_since_start(&log, n);
        assert!(
            after
                .lines()
                .any(|l| l.contains("logged in") && l.contains(g.initiator_name())),
            "no login from the guest after restart {n}:\n{after}"
        );
    }
    m.stop();
    clock.lap("done");
}
