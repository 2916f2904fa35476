//! Opt-outs. Each is recorded as a keyed hash of the identifier (the same
//! keyed hash as the subject's `audience_id`, so stored rows can be matched)
//! with a scope and a time, in the opt-out log; every service holds an
//! [`OptOutRegistry`] that follows that log.

use std::collections::HashMap;
use std::sync::RwLock;
use std::sync::atomic::{AtomicBool, Ordering};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::keys::SecretKey;
use crate::pseudonym::{Subject, audience_id};

/// What an opt-out covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OptOutScope {
    /// No collection at all (and so nothing else either).
    Analytics,
    /// No `audience_id`, out of every segment.
    Personalisation,
    /// Out of marketing exports and email audiences.
    Marketing,
    /// Everything.
    All,
}

/// A purpose an event may be used for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    /// Counting at all.
    Analytics,
    /// Personalised ads and segments.
    Personalisation,
    /// Marketing exports.
    Marketing,
}

impl OptOutScope {
    fn bit(self) -> u8 {
        match self {
            OptOutScope::Analytics => 1,
            OptOutScope::Personalisation => 2,
            OptOutScope::Marketing => 4,
            OptOutScope::All => 8,
        }
    }

    /// Parses the contract's scope names.
    pub fn parse(name: &str) -> Option<Self> {
        Some(match name {
            "analytics" => OptOutScope::Analytics,
            "personalisation" => OptOutScope::Personalisation,
            "marketing" => OptOutScope::Marketing,
            "all" => OptOutScope::All,
            _ => return None,
        })
    }
}

/// An opt-out as stored in the opt-out log: no identifier, only its keyed hash.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OptOutRecord {
    /// Keyed hash of the identifier (see [`subject_key`]).
    pub subject: String,
    /// What it covers.
    pub scope: OptOutScope,
    /// When it was made.
    pub at: DateTime<Utc>,
}

impl OptOutRecord {
    /// Encodes for the log.
    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Its key in the (compacted) opt-out log: one record is kept per subject and scope.
    pub fn log_key(&self) -> Vec<u8> {
        let scope = serde_json::to_value(self.scope)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default();
        format!("{}/{scope}", self.subject).into_bytes()
    }
}

/// The keyed hash an opt-out is recorded under: the subject's `audience_id`.
pub fn subject_key(targeting_key: &SecretKey, subject: Subject<'_>) -> String {
    audience_id(targeting_key, subject)
}

/// The opt-outs of one event's subjects, looked up once and asked per purpose.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SubjectOptOuts(u8);

impl SubjectOptOuts {
    /// Whether these opt-outs rule out `purpose` (`analytics` and `all` rule out everything).
    pub fn covers(self, purpose: Purpose) -> bool {
        let everything = OptOutScope::All.bit() | OptOutScope::Analytics.bit();
        let wanted = match purpose {
            Purpose::Analytics => 0,
            Purpose::Personalisation => OptOutScope::Personalisation.bit(),
            Purpose::Marketing => OptOutScope::Marketing.bit(),
        };
        self.0 & (everything | wanted) != 0
    }
}

/// A subject as the registry keeps it: 8 bytes of its keyed hash instead of the hash's text.
///
/// The keyed hashes are uniformly random, so 64 bits tell apart every subject the site will
/// ever have but for a chance of about one in 2^64 / opt-outs per lookup; and a collision
/// can only take an opt-out for someone who made none (collect less), never the reverse.
type SubjectPrint = [u8; 8];

fn subject_print(subject: &str) -> SubjectPrint {
    let mut out = [0u8; 8];
    if subject.len() >= 16 && hex::decode_to_slice(&subject[..16], &mut out).is_ok() {
        return out;
    }
    // not a keyed hash of ours: hash it, so any text still gets a fixed-size key
    use sha2::Digest;
    let digest = sha2::Sha256::digest(subject.as_bytes());
    out.copy_from_slice(&digest[..8]);
    out
}

/// The opt-outs in force, as far as this process has read the log: about 10 bytes per
/// subject (a fixed-size print and the scopes), never the identifiers' text.
#[derive(Debug, Default)]
pub struct OptOutRegistry {
    entries: RwLock<HashMap<SubjectPrint, u8>>,
    caught_up: AtomicBool,
}

impl OptOutRegistry {
    /// Adds a record; undecodable bytes are reported, not applied.
    pub fn apply_bytes(&self, bytes: &[u8]) -> Result<(), serde_json::Error> {
        let rec: OptOutRecord = serde_json::from_slice(bytes)?;
        self.apply(&rec);
        Ok(())
    }

    /// Adds a record.
    pub fn apply(&self, rec: &OptOutRecord) {
        if let Ok(mut e) = self.entries.write() {
            *e.entry(subject_print(&rec.subject)).or_default() |= rec.scope.bit();
        }
    }

    /// Marks the registry as having read the whole log once (for `/readyz`).
    pub fn set_caught_up(&self) {
        self.caught_up.store(true, Ordering::Release);
    }

    /// Whether the log has been read to its end once.
    pub fn is_caught_up(&self) -> bool {
        self.caught_up.load(Ordering::Acquire)
    }

    /// The opt-outs of the subjects with these keyed hashes, under one read of the registry.
    pub fn lookup<'a>(&self, subjects: impl IntoIterator<Item = &'a str>) -> SubjectOptOuts {
        let Ok(e) = self.entries.read() else {
            // a poisoned registry cannot tell: treat everyone as opted out rather than collect
            return SubjectOptOuts(OptOutScope::All.bit());
        };
        SubjectOptOuts(
            subjects
                .into_iter()
                .filter_map(|s| e.get(&subject_print(s)).copied())
                .fold(0, |acc, b| acc | b),
        )
    }

    /// Whether the subject with this keyed hash opted out of `purpose`.
    pub fn is_opted_out(&self, subject: &str, purpose: Purpose) -> bool {
        self.lookup([subject]).covers(purpose)
    }

    /// Whether any of an event's identifiers opted out of `purpose`.
    pub fn any_opted_out(
        &self,
        key: &SecretKey,
        cookie_id: Option<&str>,
        user_id: Option<&str>,
        purpose: Purpose,
    ) -> bool {
        if self.is_empty() {
            return false;
        }
        let cookie = cookie_id.map(|c| subject_key(key, Subject::Cookie(c)));
        let user = user_id.map(|u| subject_key(key, Subject::User(u)));
        self.lookup(cookie.iter().chain(user.iter()).map(String::as_str))
            .covers(purpose)
    }

    /// Subjects with at least one opt-out.
    pub fn len(&self) -> usize {
        self.entries.read().map(|e| e.len()).unwrap_or(0)
    }

    /// Whether nobody opted out.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scopes_cover_their_purposes() {
        let key = SecretKey::from_bytes([3; 32]);
        let r = OptOutRegistry::default();
        let rec = |id: &str, scope| OptOutRecord {
            subject: subject_key(&key, Subject::Cookie(id)),
            scope,
            at: Utc::now(),
        };
        r.apply(&rec("p", OptOutScope::Personalisation));
        r.apply(&rec("m", OptOutScope::Marketing));
        r.apply(&rec("a", OptOutScope::Analytics));
        r.apply_bytes(&rec("x", OptOutScope::All).to_bytes()).expect("decodes");
        let out = |id: &str, p| r.any_opted_out(&key, Some(id), None, p);
        assert!(out("p", Purpose::Personalisation) && !out("p", Purpose::Analytics) && !out("p", Purpose::Marketing));
        assert!(out("m", Purpose::Marketing) && !out("m", Purpose::Personalisation));
        assert!(out("a", Purpose::Analytics) && out("a", Purpose::Personalisation) && out("a", Purpose::Marketing));
        assert!(out("x", Purpose::Analytics) && out("x", Purpose::Marketing));
        assert!(!out("nobody", Purpose::Personalisation));
        assert!(!r.any_opted_out(&key, Some("nobody"), None, Purpose::Analytics));
        assert!(
            !r.any_opted_out(&key, None, Some("p"), Purpose::Personalisation),
            "users and cookies are different subjects"
        );
    }
}
