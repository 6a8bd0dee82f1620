#![allow(clippy::unwrap_used, clippy::expect_used)]

use super::*;
use proptest::prelude::*;

const HOSTNQN: &str = "nqn.2014-08.org.nvmexpress:uuid:host";
const SUBNQN: &str = "nqn.2026-11.io.maas:exp-1";

fn key(start: u8) -> Vec<u8> {
    (start..start + 32).collect()
}

fn unhex(s: &str) -> Vec<u8> {
    hex::decode(s).unwrap()
}

/// Secrets as nvme-cli 2.4 prints them (`nvme gen-dhchap-key --secret=000102...1f --hmac=H`
/// `[--nqn=...]`): with --hmac 1 libnvme stores HMAC-SHA256(secret, NQN || "NVMe-over-Fabrics")
/// as the key, which is exactly our key transformation.
#[test]
fn parses_secrets_as_nvme_cli_prints_them() {
    let s = Secret::parse("DHHC-1:00:AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh+KfiaR:").unwrap();
    assert_eq!(s, Secret::from_key(None, &key(0)).unwrap());
    assert_eq!(s.transformed("anything").as_slice(), key(0).as_slice());
    assert_eq!(
        s.encode().as_str(),
        "DHHC-1:00:AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh+KfiaR:"
    );
    let cli = Secret::parse("DHHC-1:01:0Gv+QW0t6B3VzMr9Aryn9o/m2e1Qxzk/o3RxM1lZzfcioglN:").unwrap();
    let ours = Secret::from_key(Some(HashId::Sha256), &key(0)).unwrap();
    assert_eq!(
        cli,
        Secret::from_key(Some(HashId::Sha256), &ours.transformed(HOSTNQN)).unwrap()
    );
    let s384 = Secret::parse(
        "DHHC-1:02:ft0ZHq/zbCatvWDd94VbVCnkWkLSlCtV8b4TzNu3XOm/OYL6OQl+odAeqoy8PpPCLq7E5g==:",
    )
    .unwrap();
    assert_eq!(s384.transformed(HOSTNQN).len(), 48);
    // Without the trailing colon, as Linux also accepts.
    assert!(Secret::parse("DHHC-1:00:AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh+KfiaR").is_ok());
    // A generated secret round-trips.
    for t in [
        None,
        Some(HashId::Sha256),
        Some(HashId::Sha384),
        Some(HashId::Sha512),
    ] {
        let g = Secret::generate(t);
        assert_eq!(Secret::parse(&g.encode()).unwrap(), g);
    }
}

#[test]
fn malformed_secrets_are_refused_and_never_printed() {
    use SecretError::*;
    for (s, e) in [
        ("", Prefix),
        ("DHHC-2:00:AAAA:", Prefix),
        ("DHHC-1:04:AAAA:", Transform),
        ("DHHC-1:0:AAAA:", Transform),
        ("DHHC-1:00:!!!!:", Base64),
        ("DHHC-1:00:AAAA:", Length),
        // One character of the key changed: the CRC no longer matches.
        (
            "DHHC-1:00:AQECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh+KfiaR:",
            Crc,
        ),
    ] {
        assert_eq!(Secret::parse(s).unwrap_err(), e, "{s}");
    }
    // A 32-byte key labelled SHA-384: nvme-cli refuses to make one ("Invalid key length").
    let k = Secret::from_key(None, &key(0)).unwrap().encode();
    let relabelled = k.replace("DHHC-1:00:", "DHHC-1:02:");
    assert_eq!(Secret::parse(&relabelled).unwrap_err(), TransformLength);
    let s = Secret::parse(&k).unwrap();
    let shown = format!("{s:?} {:?}", DhchapConfig::new(s.clone(), Some(s.clone())));
    assert!(
        !shown.contains("AAEC") && shown.contains("redacted"),
        "{shown}"
    );
}

#[test]
fn hash_and_group_names_follow_nvmet() {
    assert_eq!(HashId::parse("hmac(sha384)"), Some(HashId::Sha384));
    assert_eq!(HashId::parse("SHA-512"), Some(HashId::Sha512));
    assert_eq!(HashId::parse("md5"), None);
    assert_eq!(DhGroup::parse("ffdhe3072"), Some(DhGroup::Ffdhe3072));
    assert_eq!(DhGroup::parse("null"), Some(DhGroup::Null));
    for g in DhGroup::ALL {
        assert_eq!(DhGroup::from_id(g.id()), Some(g));
        assert_eq!(DhGroup::parse(g.name()), Some(g));
    }
}

/// The RFC 7919 primes: 2^b - 1 in their top and bottom 64 bits, and safe primes in which 2
/// generates the subgroup of order q = (p-1)/2 (so 2^q = 1 mod p, which a typo would break).
#[test]
fn ffdhe_primes_have_the_rfc_7919_shape() {
    let ones = BigUint::from(u64::MAX);
    for g in &DhGroup::ALL[1..] {
        let p = g.prime().unwrap();
        let bits = g.value_len() as u64 * 8;
        assert_eq!(p.bits(), bits, "{g:?}");
        assert_eq!(p >> (bits - 64), ones, "{g:?}");
        assert_eq!(p % (BigUint::from(1u8) << 64u32), ones, "{g:?}");
        if g.value_len() <= 384 {
            let q = (p - 1u8) >> 1u32;
            assert_eq!(
                BigUint::from(2u8).modpow(&q, p),
                BigUint::from(1u8),
                "{g:?}"
            );
        }
    }
}

/// Responses against values computed independently (Python's hmac/hashlib and pow() from the
/// formulas of NVMe Base 2.0 8.13.5), for the null group and for ffdhe2048.
#[test]
fn responses_match_independently_computed_vectors() {
    let c1: Vec<u8> = (0x40..0x60).collect();
    let c2: Vec<u8> = (0x60..0x80).collect();
    let r1 = host_response(
        HashId::Sha256,
        &key(0),
        &augmented_challenge(HashId::Sha256, None, &c1),
        0x0102_0304,
        7,
        HOSTNQN,
        SUBNQN,
    );
    assert_eq!(
        r1.as_slice(),
        unhex("fb852d782d1159da420b8dd27e780cd439350a422227cc8ee03a1fa36bb1a630")
    );
    let kc = Secret::from_key(Some(HashId::Sha256), &key(100))
        .unwrap()
        .transformed(SUBNQN);
    let r2 = ctrl_response(HashId::Sha256, &kc, &c2, 0x0a0b_0c0d, 7, SUBNQN, HOSTNQN);
    assert_eq!(
        r2.as_slice(),
        unhex("aa4a89f3f98427bf1054755185c50eb4db973d67b0d3b751ae4cb5aa1a53f370")
    );
    // ffdhe2048 with fixed exponents x = a5..a5 and y = 3c..3c (64 bytes each).
    let x = DhKey::with_exponent(DhGroup::Ffdhe2048, &[0xa5; 64]).unwrap();
    let y = DhKey::with_exponent(DhGroup::Ffdhe2048, &[0x3c; 64]).unwrap();
    assert_eq!(x.public.len(), 256);
    assert_eq!(
        &x.public[..32],
        unhex("489bec9e520a21fdc71352ab9e9ba7cd214c5571718be25f99c3ba32b98f65c6").as_slice()
    );
    let ks = x.shared(&y.public).unwrap();
    assert_eq!(ks, y.shared(&x.public).unwrap());
    let kh = Secret::from_key(Some(HashId::Sha256), &key(0))
        .unwrap()
        .transformed(HOSTNQN);
    let r1 = host_response(
        HashId::Sha256,
        &kh,
        &augmented_challenge(HashId::Sha256, Some(&ks), &c1),
        0x0102_0304,
        7,
        HOSTNQN,
        SUBNQN,
    );
    assert_eq!(
        r1.as_slice(),
        unhex("a41e88f4d2dc677d33cf688dc72f4e619cd35750fb923b517e37490c1152ce2b")
    );
    // Degenerate public values are refused.
    let p = DhGroup::Ffdhe2048.prime().unwrap();
    for bad in [BigUint::from(0u8), BigUint::from(1u8), p - 1u8, p.clone()] {
        assert!(x.shared(&be_padded(&bad, 256)).is_none());
    }
    assert!(x.shared(&[7; 255]).is_none());
}

fn config(ctrl: bool) -> Arc<DhchapConfig> {
    Arc::new(DhchapConfig::new(
        Secret::from_key(Some(HashId::Sha256), &key(0)).unwrap(),
        ctrl.then(|| Secret::from_key(None, &key(100)).unwrap()),
    ))
}

fn host(ctrl: bool) -> HostAuth {
    HostAuth::new(
        Secret::from_key(Some(HashId::Sha256), &key(0)).unwrap(),
        ctrl.then(|| Secret::from_key(None, &key(100)).unwrap()),
        HOSTNQN,
        SUBNQN,
        3,
    )
}

/// Runs a whole transaction; the controller's final state.
fn run(cfg: Arc<DhchapConfig>, mut h: HostAuth) -> (AuthState, Result<(), u8>) {
    let mut q = QueueAuth::new(cfg, HOSTNQN, SUBNQN);
    q.send(&h.negotiate());
    let challenge = q.receive();
    let reply = match h.on_challenge(&challenge) {
        Ok(r) => r,
        Err(e) => {
            q.send(&h.failure2(e));
            return (q.state(), Err(e));
        }
    };
    assert!(q.state() == AuthState::Pending);
    q.send(&reply);
    let s1 = q.receive();
    match h.on_success1(&s1) {
        Ok(Some(s2)) => {
            assert_eq!(q.state(), AuthState::Pending, "not before Success2");
            q.send(&s2);
            (q.state(), Ok(()))
        }
        Ok(None) => (q.state(), Ok(())),
        Err(e) => {
            if s1[1] != msg::FAILURE1 {
                q.send(&h.failure2(e));
            }
            (q.state(), Err(e))
        }
    }
}

#[test]
fn host_and_controller_agree_for_every_hash_and_group() {
    for hash in HashId::ALL {
        for group in [DhGroup::Null, DhGroup::Ffdhe2048, DhGroup::Ffdhe3072] {
            for bidi in [false, true] {
                let mut cfg = (*config(bidi)).clone();
                cfg.hashes = vec![hash];
                cfg.dhgroups = vec![group];
                let r = run(Arc::new(cfg), host(bidi));
                assert_eq!(
                    r,
                    (AuthState::Authenticated, Ok(())),
                    "{hash:?} {group:?} {bidi}"
                );
            }
        }
    }
}

#[test]
fn wrong_or_missing_secrets_fail_closed() {
    // Wrong host secret: the controller answers Failure1 (authentication failed).
    let mut h = host(false);
    h.host_secret = Secret::from_key(Some(HashId::Sha256), &key(1)).unwrap();
    assert_eq!(
        run(config(false), h),
        (AuthState::Failed(reason::FAILED), Err(reason::FAILED))
    );
    // Wrong controller secret on the host: the host refuses the controller (Failure2), and
    // the controller's queue is not authenticated either.
    let mut h = host(true);
    h.ctrl_secret = Some(Secret::from_key(None, &key(101)).unwrap());
    assert_eq!(
        run(config(true), h),
        (AuthState::Failed(reason::FAILED), Err(reason::FAILED))
    );
    // The host asks to authenticate a controller that has no controller secret.
    assert_eq!(
        run(config(false), host(true)),
        (AuthState::Failed(reason::FAILED), Err(reason::FAILED))
    );
    // No common hash or group.
    let mut h = host(false);
    h.dhgroups = vec![DhGroup::Ffdhe8192];
    let mut cfg = (*config(false)).clone();
    cfg.dhgroups = vec![DhGroup::Null];
    assert_eq!(
        run(Arc::new(cfg), h),
        (
            AuthState::Failed(reason::DHGROUP_UNUSABLE),
            Err(reason::DHGROUP_UNUSABLE)
        )
    );
    // A controller secret set, but the host does not ask for it: one-way succeeds.
    assert_eq!(
        run(config(true), host(false)),
        (AuthState::Authenticated, Ok(()))
    );
}

#[test]
fn out_of_order_messages_and_replays_fail() {
    let h = host(false);
    // Reply before Negotiate; Success2 out of the blue; receive before anything.
    for first in [
        {
            let mut m = vec![0u8; 16 + 64];
            m[0] = TYPE_DHCHAP;
            m[1] = msg::REPLY;
            m
        },
        {
            let mut m = vec![0u8; 16];
            m[0] = TYPE_DHCHAP;
            m[1] = msg::SUCCESS2;
            m
        },
    ] {
        let mut q = QueueAuth::new(config(false), HOSTNQN, SUBNQN);
        q.send(&first);
        assert!(matches!(q.state(), AuthState::Failed(_)));
        assert_eq!(q.receive()[1], msg::FAILURE1);
        // Dead: even a proper Negotiate cannot revive the queue.
        q.send(&h.negotiate());
        assert_eq!(q.receive()[1], msg::FAILURE1);
        assert!(matches!(q.state(), AuthState::Failed(_)));
    }
    let mut q = QueueAuth::new(config(false), HOSTNQN, SUBNQN);
    assert_eq!(q.receive()[1], msg::FAILURE1);
    // A Reply with another transaction id.
    let mut q = QueueAuth::new(config(false), HOSTNQN, SUBNQN);
    let mut h = host(false);
    q.send(&h.negotiate());
    let mut reply = h.on_challenge(&q.receive()).unwrap();
    reply[4] ^= 1;
    q.send(&reply);
    assert_eq!(q.state(), AuthState::Failed(reason::INCORRECT_PAYLOAD));
    // A replayed Reply from an earlier transaction (fresh challenge and sequence number).
    let mut h = host(false);
    let mut q = QueueAuth::new(config(false), HOSTNQN, SUBNQN);
    q.send(&h.negotiate());
    let old = h.on_challenge(&q.receive()).unwrap();
    let mut q = QueueAuth::new(config(false), HOSTNQN, SUBNQN);
    q.send(&h.negotiate());
    let _ = q.receive();
    q.send(&old);
    assert_eq!(q.state(), AuthState::Failed(reason::FAILED));
    // Re-authentication after a success works like the first time.
    let mut q = QueueAuth::new(config(true), HOSTNQN, SUBNQN);
    for _ in 0..2 {
        let mut h = host(true);
        q.send(&h.negotiate());
        let r = h.on_challenge(&q.receive()).unwrap();
        q.send(&r);
        let s2 = h.on_success1(&q.receive()).unwrap().unwrap();
        q.send(&s2);
        assert_eq!(q.state(), AuthState::Authenticated);
    }
}

fn arb_message() -> impl Strategy<Value = Vec<u8>> {
    let h = host(true);
    let negotiate = h.negotiate();
    prop_oneof![
        // Arbitrary bytes.
        prop::collection::vec(any::<u8>(), 0..300),
        // A proper Negotiate with random corruption.
        (Just(negotiate), any::<usize>(), any::<u8>()).prop_map(|(mut m, at, v)| {
            let i = at % m.len();
            m[i] = v;
            m
        }),
        // DH-HMAC-CHAP-typed messages with random fields and lengths (huge dhvlen, hl...).
        (
            0u8..6,
            any::<u16>(),
            any::<u8>(),
            any::<u8>(),
            any::<u16>(),
            prop::collection::vec(any::<u8>(), 0..1200)
        )
            .prop_map(|(id, tid, hl, cvalid, dhvlen, body)| {
                let mut m = vec![TYPE_DHCHAP, id, 0, 0];
                m.extend_from_slice(&tid.to_le_bytes());
                m.extend_from_slice(&[hl, 0, cvalid, 0]);
                m.extend_from_slice(&dhvlen.to_le_bytes());
                m.extend_from_slice(&[1, 2, 3, 4]);
                m.extend_from_slice(&body);
                m
            }),
        (any::<u8>(), any::<u16>()).prop_map(|(e, tid)| failure_message(msg::FAILURE2, tid, e)),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: std::env::var("MAAS_PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(256),
        ..ProptestConfig::default()
    })]

    /// Hostile AUTH messages, in any order, interleaved with receives: no panic, answers stay
    /// small, and the queue never becomes authenticated without the secret.
    #[test]
    fn hostile_auth_messages_never_authenticate(
        steps in prop::collection::vec((arb_message(), any::<bool>()), 1..12)
    ) {
        let mut cfg = (*config(true)).clone();
        // The null group keeps the cases fast; ffdhe parsing is covered by the fields above.
        cfg.dhgroups = vec![DhGroup::Null];
        let mut q = QueueAuth::new(Arc::new(cfg), HOSTNQN, SUBNQN);
        for (m, then_receive) in steps {
            q.send(&m);
            if then_receive {
                let out = q.receive();
                prop_assert!(out.len() <= 16 + 64 + 1024);
            }
            prop_assert_ne!(q.state(), AuthState::Authenticated);
        }
    }

    /// Malformed secret strings are refused without panicking.
    #[test]
    fn hostile_secret_strings_never_panic(s in "DHHC-1:0[0-4]:[A-Za-z0-9+/=:]{0,120}") {
        let _ = Secret::parse(&s);
    }
}
