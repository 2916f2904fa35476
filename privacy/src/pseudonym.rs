//! Keyed hashes that stand in for cookie and user ids in tables. Without the
//! key nobody can compute them from an id, and once a daily key is destroyed
//! nobody can link that day's `visitor_key`s to anything.

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

use crate::keys::SecretKey;

pub(crate) fn keyed_hash(key: &SecretKey, domain: &[u8], id: &str) -> String {
    PreparedKey::new(key).hash(domain, id)
}

/// A key made ready to hash many ids: the HMAC state after the key, computed once instead
/// of for every id (two of the four SHA-256 blocks of each hash). It stands for the key, so
/// it is overwritten when dropped, as the key is, and never shown by `Debug`.
#[derive(Clone)]
pub struct PreparedKey(Hmac<Sha256>);

impl std::fmt::Debug for PreparedKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PreparedKey(…)")
    }
}

/// `bytes` as lowercase hex by a plain loop into a sized string (an event needs up to four).
pub fn lower_hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut text = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        text.push(char::from(DIGITS[usize::from(b >> 4)]));
        text.push(char::from(DIGITS[usize::from(b & 0x0f)]));
    }
    text
}

impl PreparedKey {
    /// The ready state of `key`.
    pub fn new(key: &SecretKey) -> Self {
        // HMAC accepts keys of any length, so this cannot fail for a 32-byte key
        PreparedKey(
            <Hmac<Sha256> as KeyInit>::new_from_slice(key.as_bytes())
                .unwrap_or_else(|_| unreachable!("any key length")),
        )
    }

    pub(crate) fn hash(&self, domain: &[u8], id: &str) -> String {
        let mut mac = self.0.clone();
        mac.update(domain);
        mac.update(id.as_bytes());
        let tag = mac.finalize().into_bytes();
        lower_hex(&tag[..16])
    }

    /// [`visitor_key`] under this (daily) key.
    pub fn visitor_key(&self, cookie_id: &str) -> String {
        self.hash(VISITOR_DOMAIN, cookie_id)
    }

    /// [`audience_id`] under this (targeting) key.
    pub fn audience_id(&self, subject: Subject<'_>) -> String {
        match subject {
            Subject::User(id) => self.hash(b"marsad/audience/user/v1\0", id),
            Subject::Cookie(id) => self.hash(b"marsad/audience/cookie/v1\0", id),
        }
    }
}

const VISITOR_DOMAIN: &[u8] = b"marsad/visitor/v1\0";

/// The `visitor_key` of a cookie under a day's key: counts unique visitors within that day only.
pub fn visitor_key(daily_key: &SecretKey, cookie_id: &str) -> String {
    keyed_hash(daily_key, VISITOR_DOMAIN, cookie_id)
}

/// Who an `audience_id` stands for: an account when logged in, else the cookie.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Subject<'a> {
    /// A logged-in account.
    User(&'a str),
    /// A browser's first-party cookie.
    Cookie(&'a str),
}

/// The `audience_id` of a subject under the targeting key: stable, for segments.
pub fn audience_id(targeting_key: &SecretKey, subject: Subject<'_>) -> String {
    PreparedKey::new(targeting_key).audience_id(subject)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lower_hex_is_the_hex_crates_encoding() {
        let bytes: Vec<u8> = (0..=255).collect();
        assert_eq!(lower_hex(&bytes), hex::encode(&bytes));
        assert_eq!(lower_hex(&[]), "");
    }

    #[test]
    fn keyed_and_domain_separated() {
        let a = SecretKey::from_bytes([1; 32]);
        let b = SecretKey::from_bytes([2; 32]);
        assert_eq!(visitor_key(&a, "c-1"), visitor_key(&a, "c-1"));
        assert_ne!(visitor_key(&a, "c-1"), visitor_key(&b, "c-1"));
        assert_ne!(visitor_key(&a, "c-1"), audience_id(&a, Subject::Cookie("c-1")));
        assert_ne!(
            audience_id(&a, Subject::User("x")),
            audience_id(&a, Subject::Cookie("x"))
        );
        assert_eq!(visitor_key(&a, "c-1").len(), 32);
        assert!(!visitor_key(&a, "c-1").contains("c-1"));
    }

    /// The ready state hashes exactly as the key does (these ids are already in tables).
    /// HMAC-SHA256 of `marsad/visitor/v1\0c-1` under 32 bytes of 9, by Python's `hmac`.
    const KNOWN_VISITOR_KEY: &str = "df98cdb7c4013dc73e037cf6c695f079";

    #[test]
    fn a_prepared_key_hashes_as_its_key() {
        let k = SecretKey::from_bytes([9; 32]);
        let p = PreparedKey::new(&k);
        for id in ["", "c-1", "u-ابراهيم", &"x".repeat(200)] {
            assert_eq!(p.visitor_key(id), visitor_key(&k, id));
            assert_eq!(p.audience_id(Subject::User(id)), audience_id(&k, Subject::User(id)));
            assert_eq!(p.audience_id(Subject::Cookie(id)), audience_id(&k, Subject::Cookie(id)));
        }
        // a known answer: HMAC-SHA256 of the domain and id, first 16 bytes in hex
        assert_eq!(visitor_key(&k, "c-1"), KNOWN_VISITOR_KEY);
        assert_eq!(format!("{p:?}"), "PreparedKey(…)");
    }
}
