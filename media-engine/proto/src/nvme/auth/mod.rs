//! NVMe in-band authentication: DH-HMAC-CHAP (NVMe Base 2.0 section 8.13, from TP 8006), as
//! `nvme connect --dhchap-secret/--dhchap-ctrl-secret` and Linux nvmet speak it. Sans-IO: the
//! secrets ("DHHC-1:xx:base64(key || crc32):", with the key transformed by the hash it names),
//! the hash functions (HMAC SHA-256/384/512), the RFC 7919 Diffie-Hellman groups (null and
//! ffdhe2048 to ffdhe8192), the messages carried by Authentication Send/Receive, and the two
//! state machines: [`QueueAuth`] (the controller side of one queue's transaction) and
//! [`HostAuth`] (the host side, for our host code and tests).
//!
//! One transaction, per queue (Linux authenticates the admin queue and then every I/O queue):
//! 1. host: AUTH_Send(Negotiate: the hashes and DH groups it offers);
//! 2. host: AUTH_Receive -> Challenge (hash, group, sequence number S1, challenge C1, the
//!    controller's DH public value);
//! 3. host: AUTH_Send(Reply: its response R1, its DH public value, and for bidirectional
//!    authentication a challenge C2 with sequence number S2);
//! 4. host: AUTH_Receive -> Success1 (with the controller's response R2 if asked for), or
//!    Failure1;
//! 5. host (bidirectional only): AUTH_Send(Success2), or Failure2 if R2 was wrong.
//!
//! R1 = HMAC(Kh, C1' || S1 || T_ID || 00h || "HostHost" || NQNh || 00h || NQNc) and
//! R2 = HMAC(Kc, C2' || S2 || T_ID || 00h || "Controller" || NQNc || 00h || NQNh), where Kh and
//! Kc are the transformed host and controller secrets (HMAC(key, NQN || "NVMe-over-Fabrics")
//! with the secret's own hash, its NQN being the host's for Kh and the subsystem's for Kc) and
//! C' is C itself with the null group, else HMAC(H(g^xy mod p), C).

use std::sync::{Arc, OnceLock};

use hmac::{Hmac, Mac};
use num_bigint::BigUint;
use rand::RngCore;
use sha2::{Digest, Sha256, Sha384, Sha512};
use subtle::ConstantTimeEq;
use zeroize::Zeroizing;

mod ffdhe;

/// Security protocol of DH-HMAC-CHAP (Authentication Send/Receive SECP).
pub const SECP_DHCHAP: u8 = 0xE9;
/// AUTH-Type: messages common to every protocol (Negotiate, Failure1/2) and DH-HMAC-CHAP's.
pub const TYPE_COMMON: u8 = 0x00;
pub const TYPE_DHCHAP: u8 = 0x01;
/// Authentication protocol identifier of DH-HMAC-CHAP in a Negotiate descriptor.
pub const AUTHID_DHCHAP: u8 = 0x01;

/// Message identifiers (AUTH-Id).
pub mod msg {
    pub const NEGOTIATE: u8 = 0x00;
    pub const CHALLENGE: u8 = 0x01;
    pub const REPLY: u8 = 0x02;
    pub const SUCCESS1: u8 = 0x03;
    pub const SUCCESS2: u8 = 0x04;
    pub const FAILURE2: u8 = 0xF0;
    pub const FAILURE1: u8 = 0xF1;
}

/// Failure reason code explanations (the reason code itself is always 01h, "failed").
pub mod reason {
    pub const FAILED: u8 = 0x01;
    pub const NOT_USABLE: u8 = 0x02;
    pub const CONCAT_MISMATCH: u8 = 0x03;
    pub const HASH_UNUSABLE: u8 = 0x04;
    pub const DHGROUP_UNUSABLE: u8 = 0x05;
    pub const INCORRECT_PAYLOAD: u8 = 0x06;
    pub const INCORRECT_MESSAGE: u8 = 0x07;

    pub fn describe(code: u8) -> &'static str {
        match code {
            FAILED => "authentication failed",
            NOT_USABLE => "protocol not usable",
            CONCAT_MISMATCH => "secure channel concatenation mismatch",
            HASH_UNUSABLE => "no usable hash function",
            DHGROUP_UNUSABLE => "no usable Diffie-Hellman group",
            INCORRECT_PAYLOAD => "incorrect payload",
            INCORRECT_MESSAGE => "incorrect message",
            _ => "unknown reason",
        }
    }
}

/// Largest Authentication Receive allocation length we fill (Linux asks for 4 KiB; an
/// ffdhe8192 challenge is 1104 bytes).
pub const MAX_RECEIVE: usize = 64 << 10;
/// Largest Authentication Send transfer we take.
pub const MAX_SEND: usize = 8 << 10;
/// Bits of the ephemeral DH private exponents (at least twice the groups' security strength).
const EXPONENT_BITS: usize = 512;

// ------------------------------------------------------------------ hash functions

/// The hash functions of DH-HMAC-CHAP (hash identifiers 1 to 3).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum HashId {
    Sha256,
    Sha384,
    Sha512,
}

impl HashId {
    pub const ALL: [HashId; 3] = [HashId::Sha256, HashId::Sha384, HashId::Sha512];

    pub fn id(self) -> u8 {
        match self {
            HashId::Sha256 => 1,
            HashId::Sha384 => 2,
            HashId::Sha512 => 3,
        }
    }
    pub fn from_id(id: u8) -> Option<HashId> {
        match id {
            1 => Some(HashId::Sha256),
            2 => Some(HashId::Sha384),
            3 => Some(HashId::Sha512),
            _ => None,
        }
    }
    /// Digest length in bytes.
    pub fn digest_len(self) -> usize {
        match self {
            HashId::Sha256 => 32,
            HashId::Sha384 => 48,
            HashId::Sha512 => 64,
        }
    }
    /// The name nvmet's configfs uses (`dhchap_hash`).
    pub fn name(self) -> &'static str {
        match self {
            HashId::Sha256 => "hmac(sha256)",
            HashId::Sha384 => "hmac(sha384)",
            HashId::Sha512 => "hmac(sha512)",
        }
    }
    /// `sha256`, `hmac(sha256)`, `sha-256` (any case), likewise 384 and 512.
    pub fn parse(s: &str) -> Option<HashId> {
        let s = s.trim().to_ascii_lowercase();
        let s = s
            .strip_prefix("hmac(")
            .and_then(|r| r.strip_suffix(')'))
            .unwrap_or(&s);
        match s.replace('-', "").as_str() {
            "sha256" => Some(HashId::Sha256),
            "sha384" => Some(HashId::Sha384),
            "sha512" => Some(HashId::Sha512),
            _ => None,
        }
    }

    pub fn hash(self, data: &[u8]) -> Zeroizing<Vec<u8>> {
        Zeroizing::new(match self {
            HashId::Sha256 => Sha256::digest(data).to_vec(),
            HashId::Sha384 => Sha384::digest(data).to_vec(),
            HashId::Sha512 => Sha512::digest(data).to_vec(),
        })
    }

    /// HMAC over the concatenation of `parts`.
    pub fn hmac(self, key: &[u8], parts: &[&[u8]]) -> Zeroizing<Vec<u8>> {
        fn run<M: Mac + hmac::digest::KeyInit>(key: &[u8], parts: &[&[u8]]) -> Vec<u8> {
            // HMAC takes keys of any length: new_from_slice cannot fail for it.
            match <M as hmac::digest::KeyInit>::new_from_slice(key) {
                Ok(mut m) => {
                    for p in parts {
                        m.update(p);
                    }
                    m.finalize().into_bytes().to_vec()
                }
                Err(_) => Vec::new(),
            }
        }
        Zeroizing::new(match self {
            HashId::Sha256 => run::<Hmac<Sha256>>(key, parts),
            HashId::Sha384 => run::<Hmac<Sha384>>(key, parts),
            HashId::Sha512 => run::<Hmac<Sha512>>(key, parts),
        })
    }
}

// ------------------------------------------------------------------ DH groups

/// The Diffie-Hellman groups of DH-HMAC-CHAP (DH group identifiers 0 to 5).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DhGroup {
    Null,
    Ffdhe2048,
    Ffdhe3072,
    Ffdhe4096,
    Ffdhe6144,
    Ffdhe8192,
}

impl DhGroup {
    pub const ALL: [DhGroup; 6] = [
        DhGroup::Null,
        DhGroup::Ffdhe2048,
        DhGroup::Ffdhe3072,
        DhGroup::Ffdhe4096,
        DhGroup::Ffdhe6144,
        DhGroup::Ffdhe8192,
    ];

    pub fn id(self) -> u8 {
        match self {
            DhGroup::Null => 0,
            DhGroup::Ffdhe2048 => 1,
            DhGroup::Ffdhe3072 => 2,
            DhGroup::Ffdhe4096 => 3,
            DhGroup::Ffdhe6144 => 4,
            DhGroup::Ffdhe8192 => 5,
        }
    }
    pub fn from_id(id: u8) -> Option<DhGroup> {
        DhGroup::ALL.into_iter().find(|g| g.id() == id)
    }
    /// The name nvmet's configfs uses (`dhchap_dhgroup`).
    pub fn name(self) -> &'static str {
        match self {
            DhGroup::Null => "null",
            DhGroup::Ffdhe2048 => "ffdhe2048",
            DhGroup::Ffdhe3072 => "ffdhe3072",
            DhGroup::Ffdhe4096 => "ffdhe4096",
            DhGroup::Ffdhe6144 => "ffdhe6144",
            DhGroup::Ffdhe8192 => "ffdhe8192",
        }
    }
    pub fn parse(s: &str) -> Option<DhGroup> {
        let s = s.trim().to_ascii_lowercase();
        DhGroup::ALL.into_iter().find(|g| g.name() == s)
    }
    /// Bytes of a public value or shared secret (the prime's length); 0 for the null group.
    pub fn value_len(self) -> usize {
        match self {
            DhGroup::Null => 0,
            DhGroup::Ffdhe2048 => 256,
            DhGroup::Ffdhe3072 => 384,
            DhGroup::Ffdhe4096 => 512,
            DhGroup::Ffdhe6144 => 768,
            DhGroup::Ffdhe8192 => 1024,
        }
    }
    /// The group's prime (None for the null group).
    pub fn prime(self) -> Option<&'static BigUint> {
        static P: [OnceLock<BigUint>; 5] = [const { OnceLock::new() }; 5];
        let (i, hex) = match self {
            DhGroup::Null => return None,
            DhGroup::Ffdhe2048 => (0, ffdhe::FFDHE2048),
            DhGroup::Ffdhe3072 => (1, ffdhe::FFDHE3072),
            DhGroup::Ffdhe4096 => (2, ffdhe::FFDHE4096),
            DhGroup::Ffdhe6144 => (3, ffdhe::FFDHE6144),
            DhGroup::Ffdhe8192 => (4, ffdhe::FFDHE8192),
        };
        Some(P[i].get_or_init(|| {
            BigUint::parse_bytes(hex.as_bytes(), 16).unwrap_or_else(|| BigUint::from(0u8))
        }))
    }
}

/// An ephemeral Diffie-Hellman key pair.
pub struct DhKey {
    group: DhGroup,
    x: Zeroizing<Vec<u8>>,
    /// g^x mod p, big-endian, padded to the prime's length.
    pub public: Vec<u8>,
}

impl std::fmt::Debug for DhKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DhKey").field("group", &self.group).finish()
    }
}

fn be_padded(v: &BigUint, len: usize) -> Vec<u8> {
    let b = v.to_bytes_be();
    let mut out = vec![0u8; len.saturating_sub(b.len())];
    out.extend_from_slice(&b);
    out
}

impl DhKey {
    /// A fresh key pair (None for the null group).
    pub fn generate(group: DhGroup) -> Option<DhKey> {
        let mut x = Zeroizing::new(vec![0u8; EXPONENT_BITS / 8]);
        rand::rngs::OsRng.fill_bytes(&mut x);
        x[0] |= 0x80;
        DhKey::with_exponent(group, &x)
    }

    /// The key pair of private exponent `x` (big-endian).
    pub(crate) fn with_exponent(group: DhGroup, x: &[u8]) -> Option<DhKey> {
        let p = group.prime()?;
        let public = BigUint::from(2u8).modpow(&BigUint::from_bytes_be(x), p);
        Some(DhKey {
            group,
            x: Zeroizing::new(x.to_vec()),
            public: be_padded(&public, group.value_len()),
        })
    }

    /// The shared secret g^xy mod p with the peer's public value (padded to the prime's
    /// length), or None if that value is malformed: the wrong length, or outside 2..p-2 (the
    /// degenerate values 0, 1 and p-1 would give a predictable secret).
    pub fn shared(&self, peer: &[u8]) -> Option<Zeroizing<Vec<u8>>> {
        let p = self.group.prime()?;
        if peer.len() != self.group.value_len() {
            return None;
        }
        let y = BigUint::from_bytes_be(peer);
        let one = BigUint::from(1u8);
        if y <= one || y >= p - &one {
            return None;
        }
        let s = y.modpow(&BigUint::from_bytes_be(&self.x), p);
        Some(Zeroizing::new(be_padded(&s, self.group.value_len())))
    }
}

// ------------------------------------------------------------------ secrets

/// A DH-HMAC-CHAP secret, as `nvme gen-dhchap-key` prints it and `nvme connect --dhchap-secret`
/// takes it: `DHHC-1:xx:<base64 of key || crc32(key) little-endian>:`, where xx names the hash
/// that transforms the key before use (00: none, 01: SHA-256, 02: SHA-384, 03: SHA-512) and the
/// key is 32, 48 or 64 bytes. Never printed: its Debug shows only the transform.
#[derive(Clone)]
pub struct Secret {
    transform: Option<HashId>,
    key: Zeroizing<Vec<u8>>,
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Secret")
            .field("transform", &self.transform.map(HashId::name))
            .field("key", &"<redacted>")
            .finish()
    }
}

impl PartialEq for Secret {
    fn eq(&self, o: &Secret) -> bool {
        self.transform == o.transform && bool::from(self.key.as_slice().ct_eq(o.key.as_slice()))
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SecretError {
    #[error("a DH-HMAC-CHAP secret starts with DHHC-1:")]
    Prefix,
    #[error("the key transformation must be 00, 01, 02 or 03")]
    Transform,
    #[error("the key is not valid base64")]
    Base64,
    #[error("the key must be 32, 48 or 64 bytes (with its CRC: 36, 52 or 68)")]
    Length,
    #[error("the key's CRC-32 does not match")]
    Crc,
    #[error("a key transformed with SHA-256/384/512 must be 32/48/64 bytes")]
    TransformLength,
}

/// CRC-32 (IEEE 802.3, reflected, as zlib computes it).
fn crc32(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

impl Secret {
    pub fn parse(s: &str) -> Result<Secret, SecretError> {
        use base64::Engine;
        let rest = s
            .trim()
            .strip_prefix("DHHC-1:")
            .ok_or(SecretError::Prefix)?;
        let (t, rest) = rest.split_once(':').ok_or(SecretError::Transform)?;
        let transform = match t {
            "00" => None,
            "01" | "02" | "03" => HashId::from_id(t.as_bytes()[1] - b'0'),
            _ => return Err(SecretError::Transform),
        };
        let b64 = rest.strip_suffix(':').unwrap_or(rest);
        if b64.len() > 128 {
            return Err(SecretError::Length);
        }
        let raw = Zeroizing::new(
            base64::engine::general_purpose::STANDARD
                .decode(b64)
                .map_err(|_| SecretError::Base64)?,
        );
        if ![36, 52, 68].contains(&raw.len()) {
            return Err(SecretError::Length);
        }
        let (key, crc) = raw.split_at(raw.len() - 4);
        if crc32(key).to_le_bytes() != crc {
            return Err(SecretError::Crc);
        }
        if transform.is_some_and(|h| h.digest_len() != key.len()) {
            return Err(SecretError::TransformLength);
        }
        Ok(Secret {
            transform,
            key: Zeroizing::new(key.to_vec()),
        })
    }

    /// A random secret (key length = the transform's digest length, 32 bytes untransformed).
    pub fn generate(transform: Option<HashId>) -> Secret {
        let mut key = Zeroizing::new(vec![0u8; transform.map_or(32, HashId::digest_len)]);
        rand::rngs::OsRng.fill_bytes(&mut key);
        Secret { transform, key }
    }

    /// From raw key bytes (tests, and hosts that keep keys elsewhere).
    pub fn from_key(transform: Option<HashId>, key: &[u8]) -> Result<Secret, SecretError> {
        if ![32, 48, 64].contains(&key.len()) {
            return Err(SecretError::Length);
        }
        if transform.is_some_and(|h| h.digest_len() != key.len()) {
            return Err(SecretError::TransformLength);
        }
        Ok(Secret {
            transform,
            key: Zeroizing::new(key.to_vec()),
        })
    }

    /// The `DHHC-1:xx:...:` form (a secret: for the host's side of a test or its key file).
    pub fn encode(&self) -> Zeroizing<String> {
        use base64::Engine;
        let mut raw = Zeroizing::new(self.key.to_vec());
        raw.extend_from_slice(&crc32(&self.key).to_le_bytes());
        Zeroizing::new(format!(
            "DHHC-1:{:02}:{}:",
            self.transform.map_or(0, HashId::id),
            base64::engine::general_purpose::STANDARD.encode(raw.as_slice())
        ))
    }

    /// The key as used in responses: HMAC(key, NQN || "NVMe-over-Fabrics") with the secret's
    /// own transformation hash, or the key itself when it names none.
    pub fn transformed(&self, nqn: &str) -> Zeroizing<Vec<u8>> {
        match self.transform {
            None => self.key.clone(),
            Some(h) => h.hmac(&self.key, &[nqn.as_bytes(), b"NVMe-over-Fabrics"]),
        }
    }
}

// ------------------------------------------------------------------ responses

/// C' of the responses: the challenge itself with the null group, else HMAC(H(Ks), C).
pub fn augmented_challenge(
    hash: HashId,
    session_key: Option<&[u8]>,
    challenge: &[u8],
) -> Zeroizing<Vec<u8>> {
    match session_key {
        None => Zeroizing::new(challenge.to_vec()),
        Some(ks) => hash.hmac(&hash.hash(ks), &[challenge]),
    }
}

/// R1, the host's response.
pub fn host_response(
    hash: HashId,
    host_key: &[u8],
    challenge: &[u8],
    s1: u32,
    tid: u16,
    hostnqn: &str,
    subnqn: &str,
) -> Zeroizing<Vec<u8>> {
    hash.hmac(
        host_key,
        &[
            challenge,
            &s1.to_le_bytes(),
            &tid.to_le_bytes(),
            &[0],
            b"HostHost",
            hostnqn.as_bytes(),
            &[0],
            subnqn.as_bytes(),
        ],
    )
}

/// R2, the controller's response.
pub fn ctrl_response(
    hash: HashId,
    ctrl_key: &[u8],
    challenge: &[u8],
    s2: u32,
    tid: u16,
    subnqn: &str,
    hostnqn: &str,
) -> Zeroizing<Vec<u8>> {
    hash.hmac(
        ctrl_key,
        &[
            challenge,
            &s2.to_le_bytes(),
            &tid.to_le_bytes(),
            &[0],
            b"Controller",
            subnqn.as_bytes(),
            &[0],
            hostnqn.as_bytes(),
        ],
    )
}

fn le16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}
fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// A nonzero sequence number.
fn seqnum() -> u32 {
    loop {
        let s = rand::rngs::OsRng.next_u32();
        if s != 0 {
            return s;
        }
    }
}

fn random(len: usize) -> Zeroizing<Vec<u8>> {
    let mut v = Zeroizing::new(vec![0u8; len]);
    rand::rngs::OsRng.fill_bytes(&mut v);
    v
}

/// A Failure1 or Failure2 message.
pub fn failure_message(id: u8, tid: u16, explanation: u8) -> Vec<u8> {
    let mut m = vec![0u8; 8];
    m[0] = TYPE_COMMON;
    m[1] = id;
    m[4..6].copy_from_slice(&tid.to_le_bytes());
    m[6] = reason::FAILED;
    m[7] = explanation;
    m
}

// ------------------------------------------------------------------ controller side

/// What an export demands: the host secret (required), the controller secret (for hosts that
/// ask to authenticate the controller), and the hashes and groups the controller accepts, most
/// preferred first.
#[derive(Clone, Debug)]
pub struct DhchapConfig {
    pub host_secret: Secret,
    pub ctrl_secret: Option<Secret>,
    pub hashes: Vec<HashId>,
    pub dhgroups: Vec<DhGroup>,
}

impl DhchapConfig {
    /// Every hash (SHA-256 first) and every group (ffdhe2048 first, null last).
    pub fn new(host_secret: Secret, ctrl_secret: Option<Secret>) -> DhchapConfig {
        DhchapConfig {
            host_secret,
            ctrl_secret,
            hashes: HashId::ALL.to_vec(),
            dhgroups: vec![
                DhGroup::Ffdhe2048,
                DhGroup::Ffdhe3072,
                DhGroup::Ffdhe4096,
                DhGroup::Ffdhe6144,
                DhGroup::Ffdhe8192,
                DhGroup::Null,
            ],
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Step {
    /// Waiting for a Negotiate (also after a success: the host may re-authenticate).
    Negotiate,
    /// Negotiated: the host's next AUTH_Receive gets the Challenge.
    Challenge,
    /// Waiting for the Reply.
    Reply,
    /// Replied: the host's next AUTH_Receive gets Success1.
    Success1,
    /// Bidirectional: waiting for Success2 (or Failure2).
    Success2,
    /// Failed: the host's next AUTH_Receive gets Failure1 with this explanation.
    Failure1(u8),
    /// Failed and told; nothing more on this queue.
    Dead,
}

/// Where a queue's authentication stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AuthState {
    /// Not (yet) authenticated: only Authentication Send/Receive (and Disconnect) pass.
    Pending,
    Authenticated,
    /// The transaction failed (explanation code): the queue never authenticates.
    Failed(u8),
}

/// The controller's side of one queue's DH-HMAC-CHAP transaction.
pub struct QueueAuth {
    cfg: Arc<DhchapConfig>,
    hostnqn: String,
    subnqn: String,
    step: Step,
    state: AuthState,
    tid: u16,
    hash: HashId,
    group: DhGroup,
    s1: u32,
    c1: Zeroizing<Vec<u8>>,
    dh: Option<DhKey>,
    /// Set once the host asked for bidirectional authentication: (S2, C2').
    ctrl_challenge: Option<(u32, Zeroizing<Vec<u8>>)>,
    /// Bidirectional transactions seen (for the log).
    pub bidirectional: bool,
}

impl std::fmt::Debug for QueueAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QueueAuth")
            .field("step", &self.step)
            .field("state", &self.state)
            .field("hash", &self.hash)
            .field("group", &self.group)
            .finish()
    }
}

impl QueueAuth {
    pub fn new(cfg: Arc<DhchapConfig>, hostnqn: &str, subnqn: &str) -> QueueAuth {
        QueueAuth {
            cfg,
            hostnqn: hostnqn.to_string(),
            subnqn: subnqn.to_string(),
            step: Step::Negotiate,
            state: AuthState::Pending,
            tid: 0,
            hash: HashId::Sha256,
            group: DhGroup::Null,
            s1: 0,
            c1: Zeroizing::new(Vec::new()),
            dh: None,
            ctrl_challenge: None,
            bidirectional: false,
        }
    }

    pub fn state(&self) -> AuthState {
        self.state
    }

    /// The hash and group of the last negotiation.
    pub fn negotiated(&self) -> (HashId, DhGroup) {
        (self.hash, self.group)
    }

    /// Whether the next AUTH_Receive computes a DH key (the slow part: worth a thread).
    pub fn receive_is_costly(&self) -> bool {
        self.step == Step::Challenge && self.group != DhGroup::Null
    }

    /// Whether an AUTH_Send of this payload computes a DH shared secret.
    pub fn send_is_costly(&self, data: &[u8]) -> bool {
        self.step == Step::Reply
            && self.group != DhGroup::Null
            && data.get(..2) == Some(&[TYPE_DHCHAP, msg::REPLY][..])
    }

    /// Whether the transaction failed and the host has been told (Failure1 sent, or the host
    /// sent Failure2): the queue will never authenticate.
    pub fn finished(&self) -> bool {
        self.step == Step::Dead
    }

    /// Ends the transaction as failed without telling the host.
    pub fn abort(&mut self, explanation: u8) {
        self.fail(explanation);
        self.step = Step::Dead;
    }

    fn fail(&mut self, explanation: u8) {
        self.step = Step::Failure1(explanation);
        self.state = AuthState::Failed(explanation);
        self.dh = None;
        self.ctrl_challenge = None;
    }

    /// An Authentication Send payload (the command's own fields were checked by the caller).
    /// Protocol failures are not command errors: they are answered with Failure1 at the next
    /// Authentication Receive, and the queue's state becomes [`AuthState::Failed`].
    pub fn send(&mut self, data: &[u8]) {
        if matches!(self.step, Step::Dead | Step::Failure1(_)) || data.len() < 8 {
            if !matches!(self.step, Step::Dead | Step::Failure1(_)) {
                self.fail(reason::INCORRECT_PAYLOAD);
            }
            return;
        }
        let (ty, id, tid) = (data[0], data[1], le16(data, 4));
        match (ty, id) {
            (TYPE_COMMON, msg::NEGOTIATE) => {
                // A new transaction: first ever, or re-authentication after a success.
                if !(self.step == Step::Negotiate || (self.state == AuthState::Authenticated)) {
                    return self.fail(reason::INCORRECT_MESSAGE);
                }
                self.tid = tid;
                match self.negotiate(data) {
                    Ok(()) => self.step = Step::Challenge,
                    Err(r) => self.fail(r),
                }
            }
            (TYPE_COMMON, msg::FAILURE2) => {
                // The host gives up (typically: the controller's response was wrong).
                self.fail(data[7]);
                self.step = Step::Dead;
            }
            _ if tid != self.tid => self.fail(reason::INCORRECT_PAYLOAD),
            (TYPE_DHCHAP, msg::REPLY) if self.step == Step::Reply => match self.reply(data) {
                Ok(()) => self.step = Step::Success1,
                Err(r) => self.fail(r),
            },
            (TYPE_DHCHAP, msg::SUCCESS2) if self.step == Step::Success2 => {
                self.state = AuthState::Authenticated;
                self.step = Step::Negotiate;
            }
            _ => self.fail(reason::INCORRECT_MESSAGE),
        }
    }

    fn negotiate(&mut self, d: &[u8]) -> Result<(), u8> {
        // Header (8 bytes) and one 64-byte protocol descriptor.
        if d.len() < 8 + 64 {
            return Err(reason::INCORRECT_PAYLOAD);
        }
        if d[6] != 0 {
            // Secure channel concatenation (TLS) is not offered here.
            return Err(reason::CONCAT_MISMATCH);
        }
        let napd = usize::from(d[7]);
        if napd == 0 || d.len() < 8 + 64 * napd {
            return Err(reason::INCORRECT_PAYLOAD);
        }
        let desc = (0..napd)
            .map(|i| &d[8 + 64 * i..8 + 64 * (i + 1)])
            .find(|p| p[0] == AUTHID_DHCHAP)
            .ok_or(reason::NOT_USABLE)?;
        let (halen, dhlen) = (usize::from(desc[2]), usize::from(desc[3]));
        if halen > 30 || dhlen > 30 {
            return Err(reason::INCORRECT_PAYLOAD);
        }
        let ids = &desc[4..64];
        let hashes = &ids[..halen];
        let groups = &ids[30..30 + dhlen];
        self.hash = *self
            .cfg
            .hashes
            .iter()
            .find(|h| hashes.contains(&h.id()))
            .ok_or(reason::HASH_UNUSABLE)?;
        self.group = *self
            .cfg
            .dhgroups
            .iter()
            .find(|g| groups.contains(&g.id()))
            .ok_or(reason::DHGROUP_UNUSABLE)?;
        Ok(())
    }

    fn reply(&mut self, d: &[u8]) -> Result<(), u8> {
        let hl = self.hash.digest_len();
        if d.len() < 16 || usize::from(d[6]) != hl {
            return Err(reason::INCORRECT_PAYLOAD);
        }
        let cvalid = d[8] & 1 != 0;
        let dhvlen = usize::from(le16(d, 10));
        let s2 = le32(d, 12);
        if d.len() < 16 + 2 * hl + dhvlen {
            return Err(reason::INCORRECT_PAYLOAD);
        }
        let rval = &d[16..16 + hl];
        let c2 = &d[16 + hl..16 + 2 * hl];
        let dhv = &d[16 + 2 * hl..16 + 2 * hl + dhvlen];
        let session = match (&self.dh, dhvlen) {
            (None, 0) => None,
            (Some(k), _) => Some(k.shared(dhv).ok_or(reason::INCORRECT_PAYLOAD)?),
            (None, _) => return Err(reason::INCORRECT_PAYLOAD),
        };
        self.dh = None;
        let key = self.cfg.host_secret.transformed(&self.hostnqn);
        let challenge =
            augmented_challenge(self.hash, session.as_deref().map(|v| &v[..]), &self.c1);
        let want = host_response(
            self.hash,
            &key,
            &challenge,
            self.s1,
            self.tid,
            &self.hostnqn,
            &self.subnqn,
        );
        if !bool::from(rval.ct_eq(want.as_slice())) {
            return Err(reason::FAILED);
        }
        // Bidirectional when the host sent a challenge with a nonzero sequence number.
        self.ctrl_challenge = if cvalid && s2 != 0 {
            if self.cfg.ctrl_secret.is_none() {
                return Err(reason::FAILED);
            }
            self.bidirectional = true;
            Some((
                s2,
                augmented_challenge(self.hash, session.as_deref().map(|v| &v[..]), c2),
            ))
        } else {
            None
        };
        Ok(())
    }

    /// The message an Authentication Receive returns (the caller pads it to the allocation
    /// length).
    pub fn receive(&mut self) -> Vec<u8> {
        match self.step {
            Step::Challenge => {
                let hl = self.hash.digest_len();
                self.s1 = seqnum();
                self.c1 = random(hl);
                self.dh = DhKey::generate(self.group);
                let dhv: &[u8] = self.dh.as_ref().map_or(&[], |k| &k.public);
                let mut m = vec![0u8; 16];
                m[0] = TYPE_DHCHAP;
                m[1] = msg::CHALLENGE;
                m[4..6].copy_from_slice(&self.tid.to_le_bytes());
                m[6] = hl as u8;
                m[8] = self.hash.id();
                m[9] = self.group.id();
                m[10..12].copy_from_slice(&(dhv.len() as u16).to_le_bytes());
                m[12..16].copy_from_slice(&self.s1.to_le_bytes());
                m.extend_from_slice(&self.c1);
                m.extend_from_slice(dhv);
                self.step = Step::Reply;
                m
            }
            Step::Success1 => {
                let hl = self.hash.digest_len();
                let mut m = vec![0u8; 16];
                m[0] = TYPE_DHCHAP;
                m[1] = msg::SUCCESS1;
                m[4..6].copy_from_slice(&self.tid.to_le_bytes());
                m[6] = hl as u8;
                match (self.ctrl_challenge.take(), &self.cfg.ctrl_secret) {
                    (Some((s2, c2)), Some(secret)) => {
                        let key = secret.transformed(&self.subnqn);
                        let r2 = ctrl_response(
                            self.hash,
                            &key,
                            &c2,
                            s2,
                            self.tid,
                            &self.subnqn,
                            &self.hostnqn,
                        );
                        m[8] = 1;
                        m.extend_from_slice(&r2);
                        self.step = Step::Success2;
                    }
                    _ => {
                        self.state = AuthState::Authenticated;
                        self.step = Step::Negotiate;
                    }
                }
                m
            }
            Step::Failure1(why) => {
                self.step = Step::Dead;
                failure_message(msg::FAILURE1, self.tid, why)
            }
            Step::Dead => failure_message(msg::FAILURE1, self.tid, reason::INCORRECT_MESSAGE),
            Step::Negotiate | Step::Reply | Step::Success2 => {
                self.fail(reason::INCORRECT_MESSAGE);
                self.step = Step::Dead;
                failure_message(msg::FAILURE1, self.tid, reason::INCORRECT_MESSAGE)
            }
        }
    }
}

// ------------------------------------------------------------------ host side

/// The host's side of one queue's transaction (what Linux's nvme-auth does), for our host
/// code and for tests of the controller side.
pub struct HostAuth {
    host_secret: Secret,
    ctrl_secret: Option<Secret>,
    hostnqn: String,
    subnqn: String,
    pub hashes: Vec<HashId>,
    pub dhgroups: Vec<DhGroup>,
    pub tid: u16,
    hash: HashId,
    s2: u32,
    c2: Zeroizing<Vec<u8>>,
    session: Option<Zeroizing<Vec<u8>>>,
}

impl std::fmt::Debug for HostAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostAuth")
            .field("hostnqn", &self.hostnqn)
            .field("subnqn", &self.subnqn)
            .finish()
    }
}

impl HostAuth {
    /// Offers every hash and group, as Linux does.
    pub fn new(
        host_secret: Secret,
        ctrl_secret: Option<Secret>,
        hostnqn: &str,
        subnqn: &str,
        tid: u16,
    ) -> HostAuth {
        HostAuth {
            host_secret,
            ctrl_secret,
            hostnqn: hostnqn.to_string(),
            subnqn: subnqn.to_string(),
            hashes: HashId::ALL.to_vec(),
            dhgroups: DhGroup::ALL.to_vec(),
            tid,
            hash: HashId::Sha256,
            s2: 0,
            c2: Zeroizing::new(Vec::new()),
            session: None,
        }
    }

    pub fn negotiate(&self) -> Vec<u8> {
        let mut m = vec![0u8; 8 + 64];
        m[0] = TYPE_COMMON;
        m[1] = msg::NEGOTIATE;
        m[4..6].copy_from_slice(&self.tid.to_le_bytes());
        m[7] = 1;
        m[8] = AUTHID_DHCHAP;
        m[10] = self.hashes.len().min(30) as u8;
        m[11] = self.dhgroups.len().min(30) as u8;
        for (i, h) in self.hashes.iter().take(30).enumerate() {
            m[12 + i] = h.id();
        }
        for (i, g) in self.dhgroups.iter().take(30).enumerate() {
            m[12 + 30 + i] = g.id();
        }
        m
    }

    fn check(&self, d: &[u8], id: u8) -> Result<(), u8> {
        if d.len() >= 8 && d[0] == TYPE_COMMON && d[1] == msg::FAILURE1 {
            return Err(d[7]);
        }
        if d.len() < 16 || d[0] != TYPE_DHCHAP || d[1] != id || le16(d, 4) != self.tid {
            return Err(reason::INCORRECT_MESSAGE);
        }
        Ok(())
    }

    /// The Challenge in, the Reply out; Err(explanation) to answer with Failure2 (or the
    /// controller's Failure1 explanation).
    pub fn on_challenge(&mut self, d: &[u8]) -> Result<Vec<u8>, u8> {
        self.check(d, msg::CHALLENGE)?;
        let hash = HashId::from_id(d[8]).ok_or(reason::HASH_UNUSABLE)?;
        let hl = hash.digest_len();
        if usize::from(d[6]) != hl {
            return Err(reason::HASH_UNUSABLE);
        }
        let group = DhGroup::from_id(d[9]).ok_or(reason::DHGROUP_UNUSABLE)?;
        let dhvlen = usize::from(le16(d, 10));
        let s1 = le32(d, 12);
        if d.len() < 16 + hl + dhvlen || dhvlen != group.value_len() {
            return Err(reason::INCORRECT_PAYLOAD);
        }
        self.hash = hash;
        let c1 = &d[16..16 + hl];
        let ours = DhKey::generate(group);
        self.session = match &ours {
            Some(k) => Some(
                k.shared(&d[16 + hl..16 + hl + dhvlen])
                    .ok_or(reason::INCORRECT_PAYLOAD)?,
            ),
            None => None,
        };
        let key = self.host_secret.transformed(&self.hostnqn);
        let challenge = augmented_challenge(hash, self.session.as_deref().map(|v| &v[..]), c1);
        let r1 = host_response(
            hash,
            &key,
            &challenge,
            s1,
            self.tid,
            &self.hostnqn,
            &self.subnqn,
        );
        let dhv: &[u8] = ours.as_ref().map_or(&[], |k| &k.public);
        let mut m = vec![0u8; 16];
        m[0] = TYPE_DHCHAP;
        m[1] = msg::REPLY;
        m[4..6].copy_from_slice(&self.tid.to_le_bytes());
        m[6] = hl as u8;
        m[10..12].copy_from_slice(&(dhv.len() as u16).to_le_bytes());
        m.extend_from_slice(&r1);
        if self.ctrl_secret.is_some() {
            self.s2 = seqnum();
            self.c2 = random(hl);
            m[8] = 1;
        } else {
            self.s2 = 0;
            self.c2 = Zeroizing::new(vec![0; hl]);
        }
        m[12..16].copy_from_slice(&self.s2.to_le_bytes());
        m.extend_from_slice(&self.c2);
        m.extend_from_slice(dhv);
        Ok(m)
    }

    /// Success1 in; Ok(Some(Success2)) to send when authenticating the controller, Ok(None)
    /// when done, Err(explanation) to answer with Failure2 (the controller's response was
    /// wrong) or the controller's Failure1 explanation.
    pub fn on_success1(&mut self, d: &[u8]) -> Result<Option<Vec<u8>>, u8> {
        self.check(d, msg::SUCCESS1)?;
        let hl = self.hash.digest_len();
        if usize::from(d[6]) != hl {
            return Err(reason::HASH_UNUSABLE);
        }
        let Some(secret) = &self.ctrl_secret else {
            return Ok(None);
        };
        if d[8] & 1 == 0 || d.len() < 16 + hl {
            return Err(reason::FAILED);
        }
        let key = secret.transformed(&self.subnqn);
        let challenge =
            augmented_challenge(self.hash, self.session.as_deref().map(|v| &v[..]), &self.c2);
        let want = ctrl_response(
            self.hash,
            &key,
            &challenge,
            self.s2,
            self.tid,
            &self.subnqn,
            &self.hostnqn,
        );
        if !bool::from(d[16..16 + hl].ct_eq(want.as_slice())) {
            return Err(reason::FAILED);
        }
        let mut m = vec![0u8; 16];
        m[0] = TYPE_DHCHAP;
        m[1] = msg::SUCCESS2;
        m[4..6].copy_from_slice(&self.tid.to_le_bytes());
        Ok(Some(m))
    }

    pub fn failure2(&self, explanation: u8) -> Vec<u8> {
        failure_message(msg::FAILURE2, self.tid, explanation)
    }
}

#[cfg(test)]
mod tests;
