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

    #[test]
    fn refuses_newer_versions() {
        let mut env: serde_json::Value = serde_json::from_slice(
            &Envelope {
                v: ENVELOPE_VERSION,
                event: serde_json::from_str(r#"{"type":"search"}"#).expect("event"),
                received_at: Utc::now(),
                client_ip: None,
                user_agent: None,
                accept_language: None,
                dnt: false,
                gpc: false,
            }
            .to_bytes(),
        )
        .expect("json");
        env["v"] = 99.into();
        let bytes = serde_json::to_vec(&env).expect("json");
        assert!(matches!(
            Envelope::from_bytes(&bytes),
            Err(DecodeError::Version { found: 99 })
        ));
    }
}
