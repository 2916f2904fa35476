//! The record the ingest stage appends to the event log: the event plus what
//! only the server knows. It holds the IP and identifiers, so it lives in the
//! raw log only and never reaches a table.

use std::net::IpAddr;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::event::Event;

/// Bumped when the envelope changes shape, so an old processor refuses a new log.
pub const ENVELOPE_VERSION: u32 = 1;

/// An event with its server-side context, as stored in the raw log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Envelope {
    /// Envelope format version ([`ENVELOPE_VERSION`]).
    pub v: u32,
    /// The event as the client sent it (validated).
    pub event: Event,
    /// When ingest received it.
    pub received_at: DateTime<Utc>,
    /// The client address (socket peer, or right-most untrusted `X-Forwarded-For` hop).
    pub client_ip: Option<IpAddr>,
    /// `User-Agent` header.
    #[serde(default)]
    pub user_agent: Option<String>,
    /// `Accept-Language` header.
    #[serde(default)]
    pub accept_language: Option<String>,
    /// `DNT: 1` was sent.
    #[serde(default)]
    pub dnt: bool,
    /// `Sec-GPC: 1` was sent.
    #[serde(default)]
    pub gpc: bool,
}

/// Why a log record could not be read back as an envelope.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// Not JSON of the envelope's shape.
    #[error("undecodable envelope: {0}")]
    Json(#[from] serde_json::Error),
    /// Written by a newer Marsad.
    #[error("envelope version {found} is newer than this processor understands ({ENVELOPE_VERSION})")]
    Version {
        /// The version found.
        found: u32,
    },
}

impl Envelope {
    /// The key the raw log partitions by: a stable hash (FNV-1a) of the cookie id, else the user
    /// id, else the event id, so one visitor's events stay on one partition (and one processor,
    /// which keeps their sessions and drops their retried duplicates) without the id itself
    /// becoming a log key.
    pub fn partition_key(&self) -> Vec<u8> {
        let (kind, id) = match (&self.event.cookie_id, &self.event.user_id, &self.event.event_id) {
            (Some(c), _, _) => (b'c', c.as_str()),
            (None, Some(u), _) => (b'u', u.as_str()),
            (None, None, Some(e)) => (b'e', e.as_str()),
            (None, None, None) => (b'-', ""),
        };
        let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
        for b in std::iter::once(kind).chain(id.bytes()) {
            hash ^= u64::from(b);
            hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
        }
        hash.to_be_bytes().to_vec()
    }

    /// Encodes for the log.
    pub fn to_bytes(&self) -> Vec<u8> {
        // serializing plain data to a Vec cannot fail
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Decodes a log record, refusing versions this build does not know.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, DecodeError> {
        let env: Envelope = serde_json::from_slice(bytes)?;
        if env.v > ENVELOPE_VERSION {
            return Err(DecodeError::Version { found: env.v });
        }
        Ok(env)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::EventType;

    #[test]
    fn round_trips() {
        let env = Envelope {
            v: ENVELOPE_VERSION,
            event: serde_json::from_str(r#"{"type":"search","cookie_id":"c1"}"#).expect("event"),
            received_at: Utc::now(),
            client_ip: Some("2001:db8::1".parse().expect("ip")),
            user_agent: Some("Mozilla/5.0".into()),
            accept_language: None,
            dnt: false,
            gpc: true,
        };
        let back = Envelope::from_bytes(&env.to_bytes()).expect("decodes");
        assert_eq!(back, env);
        assert_eq!(back.event.event_type, EventType::Search);
    }

    /// An envelope of `json` (an event) with nothing else.
    fn bare(json: &str) -> Envelope {
        Envelope {
            v: ENVELOPE_VERSION,
            event: serde_json::from_str(json).expect("event"),
            received_at: Utc::now(),
            client_ip: None,
            user_agent: None,
            accept_language: None,
            dnt: false,
            gpc: false,
        }
    }

    #[test]
    fn one_visitor_one_partition_key_without_the_id() {
        let a = bare(r#"{"type":"search","cookie_id":"c-1","event_id":"e1"}"#).partition_key();
        let b = bare(r#"{"type":"page_view","cookie_id":"c-1","user_id":"u-9","event_id":"e2"}"#).partition_key();
        let other = bare(r#"{"type":"search","cookie_id":"c-2"}"#).partition_key();
        assert_eq!(a, b, "the cookie decides, whatever else the event carries");
        assert_ne!(a, other);
        assert_eq!(a.len(), 8);
        assert!(!a.windows(3).any(|w| w == b"c-1"), "the key is a hash, not the id");
        // stable across releases: the partition of a visitor must not move on upgrade
        assert_eq!(hex_of(&a), "a3f6db90de9794c1");
    }

    fn hex_of(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    #[test]
    fn refuses_newer_versions() {
        let mut env: serde_json::Value =
            serde_json::from_slice(&bare(r#"{"type":"search"}"#).to_bytes()).expect("json");
        env["v"] = 99.into();
        let bytes = serde_json::to_vec(&env).expect("json");
        assert!(matches!(
            Envelope::from_bytes(&bytes),
            Err(DecodeError::Version { found: 99 })
        ));
    }
}
