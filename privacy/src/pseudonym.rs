//! Keyed hashes that stand in for cookie and user ids in tables. Without the
//! key nobody can compute them from an id, and once a daily key is destroyed
//! nobody can link that day's `visitor_key`s to anything.

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

use crate::keys::SecretKey;

pub(crate) fn keyed_hash(key: &SecretKey, domain: &[u8], id: &str) -> String {
    // HMAC accepts keys of any length, so this cannot fail for a 32-byte key
    let mut mac = match Hmac::<Sha256>::new_from_slice(key.as_bytes()) {
        Ok(m) => m,
        Err(_) => return String::new(),
    };
    mac.update(domain);
    mac.update(id.as_bytes());
    let tag = mac.finalize().into_bytes();
    hex::encode(&tag[..16])
}

/// The `visitor_key` of a cookie under a day's key: counts unique visitors within that day only.
pub fn visitor_key(daily_key: &SecretKey, cookie_id: &str) -> String {
    keyed_hash(daily_key, b"marsad/visitor/v1\0", cookie_id)
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
    match subject {
        Subject::User(id) => keyed_hash(targeting_key, b"marsad/audience/user/v1\0", id),
        Subject::Cookie(id) => keyed_hash(targeting_key, b"marsad/audience/cookie/v1\0", id),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
