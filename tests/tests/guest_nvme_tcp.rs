#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Real Linux hosts over NVMe/TCP: Debian's kernel (nvme-tcp) and the host's own nvme-cli,
//! e2fsprogs and fio in QEMU guests (`scripts/guest-build.sh`, `maas_tests::guest`).
//!
//! - `reference_linux_nvmet`: the checks (`nvme_target_checks` in `tests/src/guest/nvme.sh`)
//!   against Linux's own target, nvmet, set up in the guest — so that a failure against maasd is
//!   maasd's, not the checks'. Discovery shows each host only its subsystems, at the advertised
//!   address; an unlisted host's Connect is refused (Connect Invalid Host); without and with
//!   header and data digests: `nvme list`, Identify Controller and Namespace (serial, model,
//!   SGLs, ONCS with Dataset Management and Write Zeroes, volatile write cache, size, NGUID and
//!   UUID descriptors), Flush, deallocate and Write Zeroes, fio with crc32c verify, ext4 with
//!   checksummed files across a reconnection, fsck clean.
//! - `maasd_passes_the_reference_checks`: the same checks against maasd's target, plus a
//!   read-only export, and a Connect to an unknown subsystem answered exactly as an unlisted
//!   host's (Connect Invalid Host: subsystem names cannot be probed).
//! - `mount_and_restore_workflow`: the backup-and-restore scenario of the iSCSI tests
//!   (`maas_tests::guest::workflow`) with the guests on NVMe/TCP.
//! - `keep_alive_expiry_and_reconnect`: the guest reaches maasd through a relay in this process;
//!   idle, keep-alives keep its controller; frozen (silent both ways, nothing closed), maasd
//!   removes the controller within its KATO and closes its connections; thawed, the host
//!   reconnects on its own and the I/O queued meanwhile completes and verifies.
//!
//! - `dh_hmac_chap_against_nvmet_and_maasd`: NVMe in-band authentication with the kernel's
//!   nvme-auth (6.12) and nvme-cli's `--dhchap-secret/--dhchap-ctrl-secret`, first against Linux
//!   nvmet (the reference), then against maasd: the right host secret connects and does I/O,
//!   one-way and bidirectional; wrong and missing host secrets and a wrong controller secret are
//!   refused; maasd negotiates SHA-256/384/512 with the null, ffdhe2048 and ffdhe3072 groups.
//!
//! Run alone with `cargo test -p maas-tests --test guest_nvme_tcp -- --nocapture` (timings on
//! stderr). TCG is slow: guests are for correctness, not speed.

use std::time::{Duration, Instant};

use maas_engine::nvme::auth::{HashId, Secret};
use maas_tests::TestDir;
use maas_tests::guest::workflow::{
    Clock, Dataset, MIB, NVME_TCP, mount_and_restore, one_at_a_time, portal, run_ok, target,
};
use maas_tests::guest::{Guest, GuestRun, NVME_SH, TREE_SH};
use maas_tests::maasd::{GUEST_HOST, Maasd, create_export, maasd_bin, nvme_export, volume};
use maas_tests::relay::Relay;
use serde_json::json;

/// The namespace the checks run on (scratch).
const SIZE: u64 = 256 * MIB;

/// A host NQN no guest uses: the only host allowed on the checks' second subsystem.
const OTHER_HOST: &str = "nqn.2026-11.io.maas.test:other-host";

/// The host's keep-alive timeout in the keep-alive test, seconds.
const KATO: u64 = 5;

/// How much later than its KATO after the last command maasd may notice that keep-alives
/// stopped: one more KATO period (Linux nvmet checks for traffic once per KATO, so it expires a
/// silent controller between one and two KATOs after its last command) and 2 s of slack.
const KATO_MARGIN: Duration = Duration::from_secs(KATO + 2);

/// The guest script of the checks: `$ADDR:$PORT` serves subsystem `$NQN` to this guest and
/// `$HIDDEN` to [`OTHER_HOST`].
const CHECKS: &str = r#"
set -uo pipefail
nvme_start
nvme_target_checks "$ADDR" "$PORT" "$NQN" "$HIDDEN" "$OTHER" "$SIZE"
"#;

/// A guest for [`CHECKS`].
fn checks_guest(name: &str) -> Guest {
    Guest::new(name)
        .lib(NVME_SH)
        .lib(TREE_SH)
        .timeout(Duration::from_secs(420))
}

/// [`CHECKS`]' parameters.
fn checks_env(g: Guest, addr: &str, port: u16, nqn: &str, hidden: &str) -> Guest {
    g.env("ADDR", addr)
        .env("PORT", port)
        .env("NQN", nqn)
        .env("HIDDEN", hidden)
        .env("OTHER", OTHER_HOST)
        .env("SIZE", SIZE)
}

/// Every step of the checks ran (each ends with a mark).
fn assert_checks_done(run: &GuestRun) {
    assert_eq!(
        run.marks().get(..3),
        Some(&["refusals-checked", "plain-checked", "digests-checked"][..]),
        "{run}"
    );
    for l in run.output.lines().filter(|l| {
        [
            "refused:",
            "id-ctrl:",
            "id-ns:",
            "ns-descs:",
            "fio:",
            "discard",
            "deallocated",
            "checks:",
            "read-only",
        ]
        .iter()
        .any(|p| l.starts_with(p))
    }) {
        eprintln!("  guest: {l}");
    }
}

/// The lines of `log` after its first `skip` bytes that contain `what`.
fn lines_with<'a>(log: &'a str, skip: usize, what: &str) -> Vec<&'a str> {
    log.get(skip..)
        .unwrap_or("")
        .lines()
        .filter(|l| l.contains(what))
        .collect()
}

/// Whether a log line, past its timestamp, holds `n` as a number of its own (not inside a
/// longer one).
fn mentions_number(line: &str, n: u32) -> bool {
    line.split_once(' ')
        .map_or("", |(_, rest)| rest)
        .split(|c: char| !c.is_ascii_digit())
        .any(|w| w.parse() == Ok(n))
}

#[test]
fn reference_linux_nvmet() {
    let _one = one_at_a_time();
    let mut clock = Clock::new("reference_nvmet");
    let g = checks_env(
        checks_guest("nvmet-reference"),
        "127.0.0.1",
        4420,
        "nqn.2026-11.io.maas.test:reference",
        "nqn.2026-11.io.maas.test:reference-hidden",
    );
    let run = run_ok(
        &g,
        &format!(
            r#"
nvmet_reference "$ADDR" "$PORT" "$NQN" "$HIDDEN" "$OTHER" "$SIZE"
{CHECKS}"#
        ),
    );
    assert_checks_done(&run);
    clock.lap("Linux nvmet in the guest passed the checks");
}

#[test]
fn maasd_passes_the_reference_checks() {
    let _one = one_at_a_time();
    let mut clock = Clock::new("maasd_checks");
    let tmp = TestDir::new("guest-nvme-");
    let m = Maasd::builder(maasd_bin(), &tmp.path().join("maasd"))
        .nvme_tcp()
        .start();
    let port = m.nvme_port.unwrap();
    assert_eq!(m.nvme_advertise, format!("{GUEST_HOST}:{port}"));
    let g = checks_guest("nvme-checks");
    let vol = volume(&m, "checks", SIZE, 512);
    let e = nvme_export(&m, &vol, &[g.host_nqn()]);
    assert_eq!(e["protocol"], "nvme-tcp", "{e}");
    assert!(
        target(&e).starts_with("nqn.2026-11.io.maas:exp-"),
        "subsystem NQN {e}"
    );
    assert_eq!(portal(&e), m.nvme_advertise, "{e}");
    assert_eq!(e["nsid"], 1, "{e}");
    let hidden_vol = volume(&m, "hidden", 64 * MIB, 512);
    let hidden = nvme_export(&m, &hidden_vol, &[OTHER_HOST]);
    // The same volume, read-only, for this host too.
    let ro = create_export(
        &m,
        &vol,
        json!({"protocol": "nvme-tcp", "initiators": [g.host_nqn()], "read_only": true}),
    );
    clock.lap("maasd up, exports made");
    let g =
        checks_env(g, GUEST_HOST, port, &target(&e), &target(&hidden)).env("RO_NQN", target(&ro));
    let run = g.run(&format!(
        r#"{CHECKS}
# An unknown subsystem gets the same answer as a subsystem this host may not use (Linux nvmet
# answers Connect Invalid Parameters there, which tells names that exist from names that don't).
nvme_refused "$ADDR" "$PORT" "$NQN-no-such-subsystem" "$MAAS_HOST_NQN"
mark unknown-subsystem-checked
# The read-only export of the same volume: the files are there, writes are refused.
ctrl=$(nvme_connect "$ADDR" "$PORT" "$RO_NQN") || fail "nvme connect $RO_NQN"
dev=$(nvme_ns "$RO_NQN")
echo "read-only export: $dev, ro=$(blockdev --getro "$dev")"
head -c 1M /dev/urandom >/run/junk
before=$(dd if="$dev" bs=1M count=1 iflag=direct status=none | md5sum)
if dd if=/run/junk of="$dev" bs=1M count=1 oflag=direct conv=fsync status=none; then
    fail "a write to the read-only export succeeded"
fi
[ "$(dd if="$dev" bs=1M count=1 iflag=direct status=none | md5sum)" = "$before" ] \
    || fail "the read-only export changed"
mount -o ro,noload "$dev" /mnt/nvme || fail "mount the read-only export"
manifest /mnt/nvme | grep -v ' ./fio.dat$' | diff -u /run/tree.md5 - || fail "the read-only export's files differ"
umount /mnt/nvme
nvme_disconnect "$RO_NQN"
mark read-only-checked
"#
    ));
    run.assert_success();
    assert_checks_done(&run);
    assert_eq!(run.marks().last(), Some(&"read-only-checked"), "{run}");
    // maasd logged the controllers it made: two on the read-write subsystem (without and with
    // digests), one on the read-only one, none for the refused hosts.
    let log = m.log();
    let created = |subsystem: &str, host: &str| {
        lines_with(&log, 0, "NVMe controller created")
            .iter()
            .filter(|l| l.contains(subsystem) && l.contains(host))
            .count()
    };
    assert!(created(&target(&e), g.host_nqn()) >= 2, "{log}");
    assert!(created(&target(&ro), g.host_nqn()) >= 1, "{log}");
    assert_eq!(created(&target(&hidden), g.host_nqn()), 0, "{log}");
    assert_eq!(created(&target(&e), OTHER_HOST), 0, "{log}");
    // The log tells the operator what the host was not told.
    assert!(
        !lines_with(&log, 0, "no subsystem with this NQN is exported here").is_empty(),
        "{log}"
    );
    clock.lap("maasd passed the checks in a guest");
    drop(m);
}

#[test]
fn mount_and_restore_workflow() {
    let _one = one_at_a_time();
    let mut clock = Clock::new("nvme_mount_and_restore");
    let tmp = TestDir::new("guest-nvme-");
    let xchg = tmp.path().join("xchg");
    std::fs::create_dir_all(&xchg).unwrap();
    let m = Maasd::builder(maasd_bin(), &tmp.path().join("maasd"))
        .device_size(4 << 30)
        .nvme_tcp()
        .start();
    let data = Dataset::create(&xchg);
    clock.lap("data set on the host");
    let images = tmp.path().join("images");
    mount_and_restore(&m, &NVME_TCP, &data, &xchg, &images, &mut clock);
    drop(m);
    clock.lap("done");
}

#[test]
fn keep_alive_expiry_and_reconnect() {
    let _one = one_at_a_time();
    let mut clock = Clock::new("keep_alive");
    let tmp = TestDir::new("guest-nvme-");
    let mut relay = Relay::listen();
    let m = Maasd::builder(maasd_bin(), &tmp.path().join("maasd"))
        .nvme_tcp_advertise(&format!("{GUEST_HOST}:{}", relay.port()))
        .start();
    relay.forward_to(m.nvme_port.unwrap());
    let g = Guest::new("keep-alive-host")
        .lib(NVME_SH)
        .timeout(Duration::from_secs(300));
    let vol = volume(&m, "keep-alive", 64 * MIB, 512);
    let e = nvme_export(&m, &vol, &[g.host_nqn()]);
    assert_eq!(portal(&e), format!("{GUEST_HOST}:{}", relay.port()));
    let g = g
        .env("PORTAL", portal(&e))
        .env("TARGET", target(&e))
        .env("KATO", KATO);
    let mut running = g.spawn(
        r#"
set -uo pipefail
nvme_start
ctrl=$(nvme_connect "${PORTAL%:*}" "${PORTAL##*:}" "$TARGET" --keep-alive-tmo="$KATO" \
    --reconnect-delay=1 --ctrl-loss-tmo=120) || fail "nvme connect"
dev=$(nvme_ns "$TARGET")
c=/sys/class/nvme/$ctrl
cntlid=$(cat "$c/cntlid")
echo "controller: $ctrl cntlid $cntlid kato $(cat "$c/kato")"
[ "$(cat "$c/kato")" = "$KATO" ] || fail "kato $(cat "$c/kato")"
head -c 4M /dev/urandom >/run/a
dd if=/run/a of="$dev" bs=1M oflag=direct conv=fsync status=none || fail "write"
# Idle for three keep-alive timeouts: keep-alives alone keep the controller.
sleep $((KATO * 3))
[ "$(cat "$c/state")" = live ] && [ "$(cat "$c/cntlid")" = "$cntlid" ] \
    || fail "the controller did not live through an idle period: $(cat "$c/state")"
mark idle
# The host freezes the relay: the keep-alives go unanswered and the controller fails...
for i in $(seq 600); do [ "$(cat "$c/state")" != live ] && break; sleep 0.1; done
[ "$(cat "$c/state")" != live ] || fail "the controller stayed live behind the frozen relay"
echo "controller $(cat "$c/state") behind the frozen relay"
# ...a write meanwhile waits for a path...
head -c 4M /dev/urandom >/run/b
dd if=/run/b of="$dev" bs=1M seek=4 oflag=direct conv=fsync status=none &
DD=$!
mark lost
# ...and once the relay is thawed the host reconnects on its own.
for i in $(seq 1200); do [ "$(cat "$c/state")" = live ] && break; sleep 0.1; done
[ "$(cat "$c/state")" = live ] || fail "no reconnection: $(cat "$c/state")"
wait $DD || fail "the write queued while the controller was down failed"
echo "reconnected: $ctrl cntlid $(cat "$c/cntlid")"
mark reconnected
cmp /run/a <(dd if="$dev" bs=1M count=4 iflag=direct status=none) || fail "the first write"
cmp /run/b <(dd if="$dev" bs=1M skip=4 count=4 iflag=direct status=none) || fail "the queued write"
nvme_fio "$dev" 8M
nvme_disconnect "$TARGET"
dmesg | grep -E 'nvme|keep' | tail -20
"#,
    );
    running.wait_for_mark("idle", Duration::from_secs(180));
    clock.lap("boot, connect, idle for three KATOs");
    let out = running.output();
    let cntlid: u32 = out
        .lines()
        .find_map(|l| {
            l.strip_prefix("controller: ")?
                .split(' ')
                .nth(2)?
                .parse()
                .ok()
        })
        .unwrap_or_else(|| panic!("no cntlid in the guest's output:\n{out}"));
    let before = m.log();
    assert!(
        lines_with(&before, 0, "keep-alive expired").is_empty(),
        "maasd expired a controller that was sending keep-alives:\n{before}"
    );
    assert!(
        !lines_with(&before, 0, "NVMe controller created").is_empty(),
        "{before}"
    );
    let live: Vec<usize> = relay
        .connections()
        .iter()
        .filter(|c| c.server_closed.is_none() && c.client_closed.is_none())
        .map(|c| c.id)
        .collect();
    assert!(
        live.len() >= 2,
        "the controller's admin and I/O queues: {:?}",
        relay.connections()
    );

    // Silence both ways, nothing closed: only the keep-alive timer can notice.
    relay.freeze();
    let frozen = Instant::now();
    let expired = loop {
        let log = m.log();
        if let Some(l) = lines_with(&log, before.len(), "keep-alive expired").first() {
            break l.to_string();
        }
        assert!(
            frozen.elapsed() < Duration::from_secs(KATO) + KATO_MARGIN,
            "maasd did not expire controller {cntlid} within {KATO} s + {KATO_MARGIN:?} of silence:\n{log}"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let after = frozen.elapsed();
    clock.note(&format!(
        "maasd expired the controller {:.1} s after the freeze: {expired}",
        after.as_secs_f64()
    ));
    assert!(
        mentions_number(&expired, cntlid),
        "the expiry line names controller {cntlid}: {expired}"
    );
    // Removing the controller closed its queues' connections (the relay still held them).
    let t = Instant::now();
    loop {
        let conns = relay.connections();
        let open: Vec<_> = conns
            .iter()
            .filter(|c| live.contains(&c.id) && c.server_closed.is_none())
            .collect();
        if open.is_empty() {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(3),
            "maasd kept connections of the expired controller open: {open:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    running.wait_for_mark("lost", Duration::from_secs(60));
    clock.lap("frozen: maasd expired the controller, the host lost it");
    let before_thaw = m.log().len();
    relay.thaw();
    running.wait_for_mark("reconnected", Duration::from_secs(120));
    clock.lap("thawed: the host reconnected");
    let run = running.wait();
    run.assert_success();
    clock.lap("queued write and fio verified after the reconnection");
    for l in run.output.lines().filter(|l| {
        l.starts_with("controller") || l.starts_with("reconnected") || l.starts_with("fio:")
    }) {
        clock.note(&format!("guest: {l}"));
    }
    let log = m.log();
    assert!(
        !lines_with(&log, before_thaw, "NVMe controller created").is_empty(),
        "no new controller after the thaw:\n{log}"
    );
    assert!(
        relay.connections().iter().any(|c| c.generation == 1),
        "the host did not reconnect through the relay"
    );
}

#[test]
fn dh_hmac_chap_against_nvmet_and_maasd() {
    let _one = one_at_a_time();
    let mut clock = Clock::new("dhchap");
    let tmp = TestDir::new("guest-nvme-");
    let m = Maasd::builder(maasd_bin(), &tmp.path().join("maasd"))
        .nvme_tcp()
        .start();
    let port = m.nvme_port.unwrap();
    let g = Guest::new("dhchap-host")
        .lib(NVME_SH)
        .timeout(Duration::from_secs(600));
    // Secrets as `nvme gen-dhchap-key` makes them (one transformed with SHA-256, one not).
    let hk = Secret::generate(Some(HashId::Sha256)).encode().to_string();
    let ck = Secret::generate(None).encode().to_string();
    let export = |name: &str, dhchap: serde_json::Value| {
        let vol = volume(&m, name, 64 * MIB, 512);
        create_export(
            &m,
            &vol,
            json!({"protocol": "nvme-tcp", "initiators": [g.host_nqn()], "dhchap": dhchap}),
        )
    };
    let e = export("auth", json!({"host_secret": hk, "ctrl_secret": ck}));
    assert_eq!(e["dhchap"], json!({"ctrl_secret": true}), "{e}");
    let e_null = export(
        "auth-null",
        json!({"host_secret": hk, "hash": "sha384", "dhgroup": "null"}),
    );
    let e_3072 = export(
        "auth-3072",
        json!({"host_secret": hk, "hash": "sha512", "dhgroup": "ffdhe3072"}),
    );
    // Secrets never come back.
    let (st, listed) = m.call(
        "GET",
        &format!("/exports/{}", e["id"].as_str().unwrap()),
        None,
    );
    assert_eq!(st, 200);
    for shown in [&e, &e_null, &e_3072, &listed] {
        let text = shown.to_string();
        assert!(
            !text.contains(&hk[10..40]) && !text.contains(&ck[10..40]),
            "{text}"
        );
    }
    // Malformed secrets are refused.
    let vol = volume(&m, "auth-bad", 64 * MIB, 512);
    for bad in [
        json!({"host_secret": "secret"}),
        json!({"host_secret": hk, "ctrl_secret": hk}),
        json!({"host_secret": hk, "dhgroup": "ffdhe1024"}),
    ] {
        let (st, r) = m.call(
            "POST",
            &format!("/volumes/{vol}/exports"),
            Some(json!({"protocol": "nvme-tcp", "initiators": [g.host_nqn()], "dhchap": bad})),
        );
        assert_eq!(st, 400, "{r}");
    }
    clock.lap("maasd up, exports made");
    let g = g
        .env("PORT", port)
        .env("HK", &hk)
        .env("CK", &ck)
        .env("NQN", target(&e))
        .env("NQN_NULL", target(&e_null))
        .env("NQN_3072", target(&e_3072))
        .env("REF_NQN", "nqn.2026-11.io.maas.test:auth-reference");
    let run = g.run(
        r#"
set -uo pipefail
nvme_start
echo "== Linux nvmet (reference)"
nvmet_auth_reference 127.0.0.1 4420 "$REF_NQN" "$HK" "$CK"
nvme_auth_checks 127.0.0.1 4420 "$REF_NQN" "$HK" "$CK"
mark reference-passed
echo "== maasd"
nvme_auth_checks "$MAAS_HOST" "$PORT" "$NQN" "$HK" "$CK"
mark maasd-passed
nvme_auth_connect "$MAAS_HOST" "$PORT" "$NQN_NULL" "sha384, null group" --dhchap-secret="$HK"
nvme_auth_connect "$MAAS_HOST" "$PORT" "$NQN_3072" "sha512, ffdhe3072" --dhchap-secret="$HK"
mark groups-passed
"#,
    );
    run.assert_success();
    for l in run
        .output
        .lines()
        .filter(|l| l.starts_with("auth:") || l.starts_with("=="))
    {
        eprintln!("  guest: {l}");
    }
    let steps = ["auth-one-way", "auth-bidirectional", "auth-refusals"];
    let want: Vec<&str> = steps
        .iter()
        .chain(&["reference-passed"])
        .chain(&steps)
        .chain(&["maasd-passed", "groups-passed"])
        .copied()
        .collect();
    assert_eq!(run.marks(), want, "{run}");
    // What the kernel negotiated with maasd: its default, then the exports' single choices.
    let maasd_part = run.output.split("== maasd").nth(1).unwrap_or("");
    for negotiated in [
        "hash hmac(sha256) dhgroup ffdhe2048",
        "hash hmac(sha384) dhgroup null",
        "hash hmac(sha512) dhgroup ffdhe3072",
    ] {
        assert!(maasd_part.contains(negotiated), "{negotiated}: {run}");
    }
    // maasd's side: authenticated controllers (one of them bidirectional), and the two failed
    // transactions (wrong host secret; the host's Failure2 for a wrong controller secret).
    let log = m.log();
    let ok = lines_with(&log, 0, "NVMe host authenticated (DH-HMAC-CHAP)");
    assert!(ok.len() >= 4, "{log}");
    assert!(ok.iter().any(|l| l.contains("bidirectional=true")), "{log}");
    assert!(
        lines_with(&log, 0, "NVMe authentication failed").len() >= 2,
        "{log}"
    );
    clock.lap("DH-HMAC-CHAP with nvmet and maasd in a guest");
    drop(m);
}
