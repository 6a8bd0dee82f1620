//! Text key=value pairs (RFC 7143 section 6.1): NUL-terminated, UTF-8, in login and text PDUs.

use thiserror::Error;

/// Longest key name (RFC 7143 6.1: 63 bytes).
const MAX_KEY: usize = 63;
/// Longest value we accept (RFC 7143 6.1: 8192 bytes for any value).
const MAX_VALUE: usize = 8192;
/// Most pairs one negotiation may carry.
const MAX_PAIRS: usize = 256;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum TextError {
    #[error("text is not UTF-8")]
    NotUtf8,
    #[error("a pair has no '='")]
    NoEquals,
    #[error("key {0:?} is empty, too long or has invalid characters")]
    BadKey(String),
    #[error("value of {0} is too long")]
    ValueTooLong(String),
    #[error("key {0} appears twice")]
    Duplicate(String),
    #[error("too many keys")]
    TooMany,
}

/// Parses a complete text (all continuation PDUs joined). Trailing padding NULs are ignored.
pub fn parse(data: &[u8]) -> Result<Vec<(String, String)>, TextError> {
    let mut out: Vec<(String, String)> = Vec::new();
    for raw in data.split(|b| *b == 0) {
        if raw.is_empty() {
            continue;
        }
        let s = std::str::from_utf8(raw).map_err(|_| TextError::NotUtf8)?;
        let (k, v) = s.split_once('=').ok_or(TextError::NoEquals)?;
        let key_ok = !k.is_empty()
            && k.len() <= MAX_KEY
            && k.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '+' | '@' | '_'));
        if !key_ok {
            return Err(TextError::BadKey(k.chars().take(MAX_KEY).collect()));
        }
        if v.len() > MAX_VALUE {
            return Err(TextError::ValueTooLong(k.to_string()));
        }
        if out.iter().any(|(ok, _)| ok == k) {
            return Err(TextError::Duplicate(k.to_string()));
        }
        if out.len() == MAX_PAIRS {
            return Err(TextError::TooMany);
        }
        out.push((k.to_string(), v.to_string()));
    }
    Ok(out)
}

/// Serialises pairs, each terminated by a NUL.
pub fn serialise(pairs: &[(String, String)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (k, v) in pairs {
        out.extend_from_slice(k.as_bytes());
        out.push(b'=');
        out.extend_from_slice(v.as_bytes());
        out.push(0);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_serialise() {
        let pairs = parse(b"InitiatorName=iqn.x\0SessionType=Normal\0\0\0").unwrap();
        assert_eq!(pairs.len(), 2);
        assert_eq!(pairs[0], ("InitiatorName".into(), "iqn.x".into()));
        assert_eq!(parse(&serialise(&pairs)).unwrap(), pairs);
    }

    #[test]
    fn rejects_bad_text() {
        assert_eq!(parse(b"novalue\0"), Err(TextError::NoEquals));
        assert_eq!(parse(b"A=1\0A=2\0"), Err(TextError::Duplicate("A".into())));
        assert!(matches!(parse(b"=x\0"), Err(TextError::BadKey(_))));
        assert_eq!(parse(&[0xff, b'=', b'1']), Err(TextError::NotUtf8));
        let long = format!("K={}\0", "v".repeat(9000));
        assert!(matches!(
            parse(long.as_bytes()),
            Err(TextError::ValueTooLong(_))
        ));
    }

    proptest::proptest! {
        #[test]
        fn never_panics(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..300)) {
            let _ = parse(&bytes);
        }
    }
}
