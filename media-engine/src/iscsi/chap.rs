//! CHAP with MD5 (RFC 1994, as iSCSI uses it in RFC 7143 12.1.3): responses, challenges and the
//! hex / base64 encodings of binary values.

use md5::{Digest, Md5};

/// CHAP algorithm number for MD5 (the only one iSCSI initiators universally implement).
pub const CHAP_MD5: &str = "5";
/// Challenge length we send (RFC 7143 recommends at least the length of the hash output).
pub const CHALLENGE_LEN: usize = 16;
/// Longest binary value we decode (challenges are bounded by the RFC at 1024 bytes).
const MAX_BINARY: usize = 1024;

/// CHAP response: MD5(identifier || secret || challenge).
pub fn response(id: u8, secret: &[u8], challenge: &[u8]) -> [u8; 16] {
    let mut h = Md5::new();
    h.update([id]);
    h.update(secret);
    h.update(challenge);
    h.finalize().into()
}

/// Encodes binary as iSCSI hex (`0x...`).
pub fn encode_hex(b: &[u8]) -> String {
    format!("0x{}", hex::encode(b))
}

/// Decodes an iSCSI binary value: `0x`/`0X` hex or `0b`/`0B` base64 (RFC 7143 6.1).
pub fn decode_binary(v: &str) -> Option<Vec<u8>> {
    let (prefix, body) = (v.get(..2)?, v.get(2..)?);
    let out = match prefix {
        "0x" | "0X" => {
            // An odd number of digits means a leading zero nibble.
            let padded;
            let body = if body.len() % 2 == 1 {
                padded = format!("0{body}");
                padded.as_str()
            } else {
                body
            };
            hex::decode(body).ok()?
        }
        "0b" | "0B" => decode_base64(body)?,
        _ => return None,
    };
    (!out.is_empty() && out.len() <= MAX_BINARY).then_some(out)
}

fn decode_base64(s: &str) -> Option<Vec<u8>> {
    let val = |c: u8| -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32)
    };
    let s = s.trim_end_matches('=').as_bytes();
    if s.len() % 4 == 1 {
        return None;
    }
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    for quad in s.chunks(4) {
        let mut acc = 0u32;
        for (i, c) in quad.iter().enumerate() {
            acc |= val(*c)? << (18 - 6 * i);
        }
        let bytes = acc.to_be_bytes();
        out.extend_from_slice(&bytes[1..quad.len()]);
    }
    Some(out)
}

/// Constant-time comparison, so a wrong response leaks nothing about the right one.
pub fn equal(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc1994_response_shape() {
        // Known value computed with `printf '\x01secretchallenge' | md5sum`.
        let r = response(1, b"secret", b"challenge");
        assert_eq!(hex::encode(r), "46e47770030e2b4e26a0db72a7efec00");
    }

    #[test]
    fn binary_encodings() {
        assert_eq!(decode_binary("0x0102ff"), Some(vec![1, 2, 0xff]));
        assert_eq!(decode_binary("0X102"), Some(vec![1, 2]));
        assert_eq!(decode_binary("0bAQL/"), Some(vec![1, 2, 0xff]));
        assert_eq!(decode_binary("0bAQ=="), Some(vec![1]));
        assert_eq!(decode_binary("0x"), None);
        assert_eq!(decode_binary("0xzz"), None);
        assert_eq!(decode_binary("12"), None);
        assert_eq!(decode_binary("é"), None);
        assert!(equal(b"abc", b"abc") && !equal(b"abc", b"abd") && !equal(b"a", b"ab"));
    }
}
