//! Identities the site's backend vouches for: a logged-in visitor's `user_id`
//! and declared demographics count only inside a token the backend signed with
//! the shared identity key, so nobody can claim an account (and with it an
//! `audience_id`, segments and an age) by typing its id into an event.
//!
//! A token is `v1.<payload>.<signature>`: the payload is the base64url (no
//! padding) of a JSON object `{"uid": …, "exp": <unix seconds>, "age_band": …,
//! "gender": …}` (the last two optional), the signature the base64url of
//! HMAC-SHA256(identity key, `v1.` + payload).

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chrono::{DateTime, Utc};
use hmac::{KeyInit, Mac};
use serde::{Deserialize, Serialize};

use crate::keys::SecretKey;

type HmacSha256 = hmac::Hmac<sha2::Sha256>;

/// What a valid token vouches for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
// claims the backend adds that Marsad does not read (`iat`, …) are signed and ignored
pub struct IdentityClaims {
    /// The account id.
    pub uid: String,
    /// Unix seconds after which the token no longer counts.
    pub exp: i64,
    /// The declared age band, if the visitor gave one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub age_band: Option<String>,
    /// The declared gender, if the visitor gave one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gender: Option<String>,
}

/// Why a token does not count (the event is then anonymous, not refused).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    /// Not of the `v1.<payload>.<signature>` shape, or too long.
    #[error("not an identity token")]
    Malformed,
    /// The signature is not the identity key's.
    #[error("identity token signature does not verify")]
    BadSignature,
    /// Past its expiry.
    #[error("identity token expired")]
    Expired,
}

fn signature(key: &SecretKey, payload: &str) -> HmacSha256 {
    // an HMAC takes keys of any length: this cannot fail
    let mut mac = <HmacSha256 as KeyInit>::new_from_slice(key.as_bytes()).unwrap_or_else(|_| unreachable!());
    mac.update(b"v1.");
    mac.update(payload.as_bytes());
    mac
}

/// Signs claims as the site's backend does (for tests, the simulator and the docs' example).
pub fn sign(key: &SecretKey, claims: &IdentityClaims) -> String {
    let json = serde_json::to_vec(claims).unwrap_or_default();
    let payload = URL_SAFE_NO_PAD.encode(json);
    let tag = signature(key, &payload).finalize().into_bytes();
    format!("v1.{payload}.{}", URL_SAFE_NO_PAD.encode(tag))
}

/// Checks a token's signature (in constant time) and expiry at `now`.
pub fn verify(key: &SecretKey, token: &str, now: DateTime<Utc>) -> Result<IdentityClaims, IdentityError> {
    // anything longer than the event contract allows is not one of ours
    if token.len() > marsad_schemas::event::MAX_IDENTITY_LEN {
        return Err(IdentityError::Malformed);
    }
    let rest = token.strip_prefix("v1.").ok_or(IdentityError::Malformed)?;
    let (payload, tag) = rest.split_once('.').ok_or(IdentityError::Malformed)?;
    let tag = URL_SAFE_NO_PAD.decode(tag).map_err(|_| IdentityError::Malformed)?;
    signature(key, payload)
        .verify_slice(&tag)
        .map_err(|_| IdentityError::BadSignature)?;
    let json = URL_SAFE_NO_PAD.decode(payload).map_err(|_| IdentityError::Malformed)?;
    let claims: IdentityClaims = serde_json::from_slice(&json).map_err(|_| IdentityError::Malformed)?;
    if claims.exp <= now.timestamp() {
        return Err(IdentityError::Expired);
    }
    Ok(claims)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claims(exp: i64) -> IdentityClaims {
        IdentityClaims {
            uid: "u-42".into(),
            exp,
            age_band: Some("25-34".into()),
            gender: None,
        }
    }

    #[test]
    fn a_signed_token_verifies_until_it_expires() {
        let key = SecretKey::from_bytes([7; 32]);
        let now = Utc::now();
        let token = sign(&key, &claims(now.timestamp() + 60));
        assert_eq!(verify(&key, &token, now), Ok(claims(now.timestamp() + 60)));
        let later = now + chrono::Duration::seconds(61);
        assert_eq!(verify(&key, &token, later), Err(IdentityError::Expired));
    }

    #[test]
    fn another_key_a_changed_payload_or_garbage_do_not_verify() {
        let key = SecretKey::from_bytes([7; 32]);
        let now = Utc::now();
        let token = sign(&key, &claims(now.timestamp() + 60));
        let other = SecretKey::from_bytes([8; 32]);
        assert_eq!(verify(&other, &token, now), Err(IdentityError::BadSignature));
        // the same signature over claims for another account
        let forged_payload = URL_SAFE_NO_PAD.encode(br#"{"uid":"u-1","exp":99999999999}"#);
        let tag = token.rsplit('.').next().unwrap_or_default();
        let forged = format!("v1.{forged_payload}.{tag}");
        assert_eq!(verify(&key, &forged, now), Err(IdentityError::BadSignature));
        for junk in ["", "v1.", "v1..", "v2.a.b", "v1.a.b.c", "u-42"] {
            assert!(verify(&key, junk, now).is_err(), "{junk}");
        }
    }

    #[test]
    fn the_documented_python_example_signs_the_same_bytes() {
        // the shape of the README's Python example (compact JSON, base64url without padding)
        let key = SecretKey::from_bytes([7; 32]);
        let payload = URL_SAFE_NO_PAD.encode(br#"{"uid":"u-42","exp":4102444800}"#);
        let tag = URL_SAFE_NO_PAD.encode(signature(&key, &payload).finalize().into_bytes());
        let token = format!("v1.{payload}.{tag}");
        let got = verify(&key, &token, Utc::now()).expect("verifies");
        assert_eq!(got.uid, "u-42");
    }
}
