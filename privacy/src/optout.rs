//! Opt-outs. Each is recorded in the opt-out log as a keyed hash of the
//! identifier under the opt-out key — a key that is never rotated, so an
//! opt-out outlives any rotation of the targeting key — with the subject's
//! `audience_id` of the time (to find the rows and segment memberships stored
//! under it), a scope and a time. Every service holds an [`OptOutRegistry`]
//! that follows that log. The log also records the fingerprints of the keys
//! the stages share, so a stage started with another key refuses to start.

use std::collections::HashMap;
use std::sync::RwLock;
use std::sync::atomic::{AtomicBool, Ordering};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::keys::{SecretKey, SubjectKeys};
use crate::pseudonym::{PreparedKey, Subject, audience_id};

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

/// An opt-out as stored in the opt-out log: no identifier, only its keyed hashes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OptOutRecord {
    /// Keyed hash of the identifier under the opt-out key (see [`subject_key`]).
    pub subject: String,
    /// The subject's `audience_id` under the targeting key in force when the opt-out was made:
    /// rows and segment memberships stored under it stay covered after a rotation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub audience_id: Option<String>,
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

    /// Its key in the (compacted) opt-out log: one record is kept per subject, scope and
    /// targeting key.
    pub fn log_key(&self) -> Vec<u8> {
        let scope = serde_json::to_value(self.scope)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default();
        // with the audience_id of the time: an opt-out repeated after a rotation of the targeting
        // key must not let compaction drop the record that covers the rows under the old one
        match &self.audience_id {
            Some(aid) => format!("{}/{scope}/{}", self.subject, &aid[..aid.len().min(16)]).into_bytes(),
            None => format!("{}/{scope}", self.subject).into_bytes(),
        }
    }
}

/// The keyed hash an opt-out is recorded under: the identifier under the opt-out key.
pub fn subject_key(optout_key: &SecretKey, subject: Subject<'_>) -> String {
    subject_key_prepared(&PreparedKey::new(optout_key), subject)
}

/// [`subject_key`] under the opt-out key made ready once (the processor hashes every event's
/// identifiers when anyone has opted out).
pub fn subject_key_prepared(optout_key: &PreparedKey, subject: Subject<'_>) -> String {
    match subject {
        Subject::User(id) => optout_key.hash(b"marsad/optout/user/v1\0", id),
        Subject::Cookie(id) => optout_key.hash(b"marsad/optout/cookie/v1\0", id),
    }
}

impl OptOutRecord {
    /// The opt-out of `subject` for `scope`, made now.
    pub fn new(optout_key: &SecretKey, targeting_key: &SecretKey, subject: Subject<'_>, scope: OptOutScope) -> Self {
        OptOutRecord {
            subject: subject_key(optout_key, subject),
            audience_id: Some(audience_id(targeting_key, subject)),
            scope,
            at: Utc::now(),
        }
    }
}

/// Which shared key a fingerprint is of.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SharedKey {
    /// The targeting key (`audience_id`s).
    Targeting,
    /// The opt-out key.
    Optout,
    /// The noise key of released numbers (query processes).
    Noise,
    /// The key identity tokens are signed with (ingest processes).
    Identity,
}

impl SharedKey {
    /// How messages name it.
    pub fn describe(self) -> &'static str {
        match self {
            SharedKey::Targeting => "targeting key",
            SharedKey::Optout => "opt-out key",
            SharedKey::Noise => "noise key",
            SharedKey::Identity => "identity key",
        }
    }
}

/// The fingerprint of a key every stage must share, as recorded in the opt-out log (the
/// latest record of a key is the one in force).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyFingerprintRecord {
    /// Which key.
    pub key_fingerprint: SharedKey,
    /// [`SecretKey::fingerprint`] of it.
    pub fingerprint: String,
    /// When it was recorded.
    pub at: DateTime<Utc>,
}

impl KeyFingerprintRecord {
    /// Encodes for the log.
    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Its key in the compacted opt-out log: one per shared key.
    pub fn log_key(&self) -> Vec<u8> {
        match self.key_fingerprint {
            SharedKey::Targeting => b"fingerprint/targeting".to_vec(),
            SharedKey::Optout => b"fingerprint/optout".to_vec(),
            SharedKey::Noise => b"fingerprint/noise".to_vec(),
            SharedKey::Identity => b"fingerprint/identity".to_vec(),
        }
    }
}

/// The opt-outs of one event's subjects, looked up once and asked per purpose.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SubjectOptOuts(u8);

impl From<OptOutScope> for SubjectOptOuts {
    /// One opt-out's scope, asked per purpose as a subject's are.
    fn from(scope: OptOutScope) -> Self {
        SubjectOptOuts(scope.bit())
    }
}

impl SubjectOptOuts {
    /// These opt-outs and `other`'s.
    pub fn union(self, other: SubjectOptOuts) -> SubjectOptOuts {
        SubjectOptOuts(self.0 | other.0)
    }

    /// The scopes these opt-outs hold that `other` lacks.
    pub fn scopes_missing_from(self, other: SubjectOptOuts) -> Vec<OptOutScope> {
        [
            OptOutScope::Analytics,
            OptOutScope::Personalisation,
            OptOutScope::Marketing,
            OptOutScope::All,
        ]
        .into_iter()
        .filter(|s| self.0 & s.bit() != 0 && other.0 & s.bit() == 0)
        .collect()
    }

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

/// Hashes a print by its own bytes: they are already a keyed hash, uniform and unknown to
/// anyone without the keys, so hashing them again (SipHash) buys nothing but time.
#[derive(Default)]
struct PrintHasher(u64);

impl std::hash::Hasher for PrintHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        // a print is 8 bytes; anything else (never, by the type) still mixes in
        for chunk in bytes.chunks(8) {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            self.0 = self.0.rotate_left(29) ^ u64::from_le_bytes(word);
        }
    }
}

type BuildPrintHasher = std::hash::BuildHasherDefault<PrintHasher>;

/// The opt-outs in force, as far as this process has read the log: about 10 bytes per
/// subject (a fixed-size print and the scopes), never the identifiers' text.
#[derive(Debug, Default)]
pub struct OptOutRegistry {
    entries: RwLock<HashMap<SubjectPrint, u8, BuildPrintHasher>>,
    caught_up: AtomicBool,
    /// The latest recorded fingerprint of each shared key.
    fingerprints: RwLock<HashMap<&'static str, String>>,
}

impl OptOutRegistry {
    /// Adds a record of the opt-out log (an opt-out or a key fingerprint); undecodable bytes
    /// are reported, not applied.
    pub fn apply_bytes(&self, bytes: &[u8]) -> Result<(), serde_json::Error> {
        // opt-outs are nearly every record: tried first (a fingerprint record fails at its
        // first field name)
        match serde_json::from_slice::<OptOutRecord>(bytes) {
            Ok(rec) => {
                self.apply(&rec);
                Ok(())
            }
            Err(e) => match serde_json::from_slice::<KeyFingerprintRecord>(bytes) {
                Ok(fp) => {
                    self.apply_fingerprint(&fp);
                    Ok(())
                }
                Err(_) => Err(e),
            },
        }
    }

    /// Adds an opt-out: under its subject key and under its `audience_id` of the time.
    pub fn apply(&self, rec: &OptOutRecord) {
        if let Ok(mut e) = self.entries.write() {
            for key in std::iter::once(&rec.subject).chain(rec.audience_id.as_ref()) {
                *e.entry(subject_print(key)).or_default() |= rec.scope.bit();
            }
        }
    }

    /// Whether `rec` is already in force, under its subject and its `audience_id` alike: then
    /// recording it again would only lengthen the log every stage replays at start.
    pub fn is_recorded(&self, rec: &OptOutRecord) -> bool {
        let Ok(e) = self.entries.read() else { return false };
        std::iter::once(&rec.subject)
            .chain(rec.audience_id.as_ref())
            .all(|key| {
                e.get(&subject_print(key))
                    .is_some_and(|bits| bits & rec.scope.bit() != 0)
            })
    }

    /// Notes the fingerprint a key was recorded with (the latest wins).
    pub fn apply_fingerprint(&self, rec: &KeyFingerprintRecord) {
        if let Ok(mut f) = self.fingerprints.write() {
            f.insert(rec.key_fingerprint.describe(), rec.fingerprint.clone());
        }
    }

    /// The fingerprint recorded for `key`, if any stage recorded one.
    pub fn recorded_fingerprint(&self, key: SharedKey) -> Option<String> {
        self.fingerprints.read().ok()?.get(key.describe()).cloned()
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

    /// Whether the subject with this keyed hash (a subject key or an `audience_id`) opted out
    /// of `purpose`.
    pub fn is_opted_out(&self, subject: &str, purpose: Purpose) -> bool {
        self.lookup([subject]).covers(purpose)
    }

    /// The opt-outs of an event's identifiers: looked up under the opt-out key, and as
    /// `audience_id`s under the targeting key (opt-outs recorded before the opt-out key existed
    /// were recorded under those).
    pub fn of_identifiers(&self, keys: &SubjectKeys, cookie_id: Option<&str>, user_id: Option<&str>) -> SubjectOptOuts {
        if self.is_empty() {
            return SubjectOptOuts::default();
        }
        let (optout, targeting) = (PreparedKey::new(&keys.optout), PreparedKey::new(&keys.targeting));
        let subjects = cookie_id
            .map(Subject::Cookie)
            .into_iter()
            .chain(user_id.map(Subject::User));
        subjects
            .map(|s| self.of_subject(&optout, &targeting, s).0)
            .fold(SubjectOptOuts::default(), SubjectOptOuts::union)
    }

    /// The opt-outs of one subject, recorded under its subject key or its `audience_id`, and
    /// that `audience_id` (the processor stores it when personalisation is allowed), with the
    /// keys made ready once by the caller.
    pub fn of_subject(
        &self,
        optout_key: &PreparedKey,
        targeting_key: &PreparedKey,
        subject: Subject<'_>,
    ) -> (SubjectOptOuts, String) {
        let audience = targeting_key.audience_id(subject);
        let key = subject_key_prepared(optout_key, subject);
        (self.lookup([key.as_str(), audience.as_str()]), audience)
    }

    /// Whether any of an event's identifiers opted out of `purpose`.
    pub fn any_opted_out(
        &self,
        keys: &SubjectKeys,
        cookie_id: Option<&str>,
        user_id: Option<&str>,
        purpose: Purpose,
    ) -> bool {
        self.of_identifiers(keys, cookie_id, user_id).covers(purpose)
    }

    /// Keyed hashes (subject keys and `audience_id`s) with at least one opt-out.
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
        let keys = SubjectKeys::from_seed(3);
        let r = OptOutRegistry::default();
        let rec = |id: &str, scope| OptOutRecord::new(&keys.optout, &keys.targeting, Subject::Cookie(id), scope);
        r.apply(&rec("p", OptOutScope::Personalisation));
        r.apply(&rec("m", OptOutScope::Marketing));
        r.apply(&rec("a", OptOutScope::Analytics));
        r.apply_bytes(&rec("x", OptOutScope::All).to_bytes()).expect("decodes");
        let out = |id: &str, p| r.any_opted_out(&keys, Some(id), None, p);
        assert!(out("p", Purpose::Personalisation) && !out("p", Purpose::Analytics) && !out("p", Purpose::Marketing));
        assert!(out("m", Purpose::Marketing) && !out("m", Purpose::Personalisation));
        assert!(out("a", Purpose::Analytics) && out("a", Purpose::Personalisation) && out("a", Purpose::Marketing));
        assert!(out("x", Purpose::Analytics) && out("x", Purpose::Marketing));
        assert!(!out("nobody", Purpose::Personalisation));
        assert!(!r.any_opted_out(&keys, Some("nobody"), None, Purpose::Analytics));
        assert!(
            !r.any_opted_out(&keys, None, Some("p"), Purpose::Personalisation),
            "users and cookies are different subjects"
        );
    }
}

#[cfg(test)]
mod rotation_tests {
    use super::*;

    #[test]
    fn an_opt_out_outlives_a_rotation_of_the_targeting_key() {
        let optout_key = SecretKey::from_bytes([1; 32]);
        let (old, new) = (SecretKey::from_bytes([2; 32]), SecretKey::from_bytes([3; 32]));
        let r = OptOutRegistry::default();
        let rec = OptOutRecord::new(&optout_key, &old, Subject::Cookie("c-1"), OptOutScope::Personalisation);
        r.apply_bytes(&rec.to_bytes()).expect("decodes");
        // by identifier: whatever the targeting key
        let rotated = SubjectKeys {
            targeting: std::sync::Arc::new(SecretKey::from_bytes([3; 32])),
            optout: std::sync::Arc::new(SecretKey::from_bytes([1; 32])),
        };
        assert!(r.any_opted_out(&rotated, Some("c-1"), None, Purpose::Personalisation));
        // rows stored under the old audience_id stay covered
        assert!(r.is_opted_out(&audience_id(&old, Subject::Cookie("c-1")), Purpose::Personalisation));
        // the opt-out key is not the targeting key: nothing else is covered
        assert!(!r.is_opted_out(&audience_id(&new, Subject::Cookie("c-2")), Purpose::Personalisation));
        assert_ne!(
            subject_key(&optout_key, Subject::Cookie("c-1")),
            audience_id(&optout_key, Subject::Cookie("c-1"))
        );
    }

    #[test]
    fn an_opt_out_recorded_before_the_opt_out_key_still_counts() {
        let keys = SubjectKeys::from_seed(5);
        let r = OptOutRegistry::default();
        // the old form: the subject is the audience_id under the targeting key
        let legacy = format!(
            r#"{{"subject":"{}","scope":"analytics","at":"2026-11-01T00:00:00Z"}}"#,
            audience_id(&keys.targeting, Subject::Cookie("c-old"))
        );
        r.apply_bytes(legacy.as_bytes()).expect("decodes");
        assert!(r.any_opted_out(&keys, Some("c-old"), None, Purpose::Analytics));
        assert!(!r.any_opted_out(&keys, Some("c-new"), None, Purpose::Analytics));
    }

    #[test]
    fn fingerprints_are_read_from_the_log_and_the_latest_wins() {
        let r = OptOutRegistry::default();
        assert_eq!(r.recorded_fingerprint(SharedKey::Targeting), None);
        for fp in ["aa", "bb"] {
            let rec = KeyFingerprintRecord {
                key_fingerprint: SharedKey::Targeting,
                fingerprint: fp.into(),
                at: Utc::now(),
            };
            r.apply_bytes(&rec.to_bytes()).expect("decodes");
        }
        assert_eq!(r.recorded_fingerprint(SharedKey::Targeting).as_deref(), Some("bb"));
        assert_eq!(r.recorded_fingerprint(SharedKey::Optout), None);
        assert!(r.is_empty(), "a fingerprint is no opt-out");
    }
}
