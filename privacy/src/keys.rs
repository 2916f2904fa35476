//! Keys that forget. Each UTC day has its own random visitor key, the same
//! for every processor (they share a [`DailyKeyStore`]), destroyed a grace
//! period after the day ends. The targeting key is long-lived and comes from
//! the environment or a secret file, never from the repository.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use chrono::{DateTime, Duration, NaiveDate, Utc};
use rand::RngCore;

use crate::{Error, Result};

/// The environment variable holding the targeting key (64 hex characters).
pub const TARGETING_KEY_ENV: &str = "MARSAD_SECRET_TARGETING_KEY";

/// A 32-byte secret; its `Debug` never shows the bytes, it cannot be copied (share it behind
/// an `Arc`), and its bytes are overwritten when it is dropped, so a destroyed day's key does
/// not linger in freed memory.
#[derive(PartialEq, Eq)]
pub struct SecretKey([u8; 32]);

impl Drop for SecretKey {
    fn drop(&mut self) {
        use zeroize::Zeroize;
        self.0.zeroize();
    }
}

impl std::fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SecretKey(…)")
    }
}

impl SecretKey {
    /// Wraps raw bytes.
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        SecretKey(bytes)
    }

    /// A fresh random key.
    pub fn random() -> Self {
        let mut b = [0u8; 32];
        rand::rng().fill_bytes(&mut b);
        SecretKey(b)
    }

    /// Parses 64 hex characters.
    pub fn from_hex(what: &'static str, text: &str) -> Result<Self> {
        let mut key = SecretKey([0; 32]);
        let text = text.trim();
        if text.len() != 64 {
            return Err(Error::BadKey {
                what,
                reason: format!("{} hex characters; 64 expected", text.len()),
            });
        }
        hex::decode_to_slice(text, &mut key.0).map_err(|e| Error::BadKey {
            what,
            reason: format!("not hex: {e}"),
        })?;
        Ok(key)
    }

    /// The key's bytes, for the HMAC.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    pub(crate) fn to_hex(&self) -> zeroize::Zeroizing<String> {
        zeroize::Zeroizing::new(hex::encode(self.0))
    }

    /// A short public fingerprint: tells keys apart (stages compare it at start) without
    /// revealing anything usable about the key.
    pub fn fingerprint(&self) -> String {
        use hmac::{Hmac, KeyInit, Mac};
        let Ok(mut mac) = Hmac::<sha2::Sha256>::new_from_slice(&self.0) else {
            return String::new();
        };
        mac.update(b"marsad/key-fingerprint/v1");
        hex::encode(&mac.finalize().into_bytes()[..8])
    }
}

/// Where the daily visitor keys live; shared by every processor instance.
pub trait DailyKeyStore: Send + Sync {
    /// The key of `day`, created if the day has none yet; refused once destroyed.
    fn key_for(&self, day: NaiveDate) -> Result<Arc<SecretKey>>;

    /// Destroys the keys of days that ended more than `grace` before `now`; returns those days.
    fn destroy_expired(&self, now: DateTime<Utc>, grace: Duration) -> Result<Vec<NaiveDate>>;

    /// The keys that still exist, by day (erasure recomputes a cookie's `visitor_key`s with them).
    fn existing(&self) -> Result<Vec<(NaiveDate, Arc<SecretKey>)>>;
}

/// The daily key store `config` calls for: a directory of the data dir with the local log, the
/// compacted key topic with Kafka (so processors on several machines share each day's key).
pub fn open_daily_key_store(config: &marsad_config::Config) -> Result<std::sync::Arc<dyn DailyKeyStore>> {
    let grace = Duration::hours(config.privacy.daily_key_grace_hours as i64);
    Ok(match config.eventlog.kind {
        marsad_config::EventLogKind::Local => {
            std::sync::Arc::new(LocalDailyKeyStore::open(config.keys_dir().join("daily"), grace)?)
        }
        marsad_config::EventLogKind::Kafka => std::sync::Arc::new(crate::kafka_keys::KafkaDailyKeyStore::connect(
            &config.eventlog.kafka_client_properties(),
            marsad_schemas::TOPIC_DAILY_KEYS,
            grace,
        )?),
    })
}

/// The end of `day`'s grace period: after it, its key is gone. (A day at the calendar's end,
/// as a crafted key file or key record could name, ends with the calendar, not in a panic.)
pub fn key_expiry(day: NaiveDate, grace: Duration) -> DateTime<Utc> {
    let next_midnight = day
        .succ_opt()
        .unwrap_or(day)
        .and_hms_opt(0, 0, 0)
        .unwrap_or_default()
        .and_utc();
    next_midnight
        .checked_add_signed(grace)
        .unwrap_or(DateTime::<Utc>::MAX_UTC)
}

/// Daily keys as files in a directory (the embedded default), created atomically so
/// concurrent processors agree on one key per day.
pub struct LocalDailyKeyStore {
    dir: PathBuf,
    grace: Duration,
    cache: Mutex<HashMap<NaiveDate, Arc<SecretKey>>>,
}

fn write_secret_file(path: &Path, contents: &str) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(contents.as_bytes())?;
    f.sync_all()
}

/// Creates `path` (mode 0600) holding `contents` unless it exists: written under a private name,
/// then linked, so a concurrent reader (another stage starting beside this one) never sees it
/// half-written and exactly one writer wins. `Ok(false)`: it existed; read it.
pub(crate) fn create_secret_file(path: &Path, contents: &str) -> std::io::Result<bool> {
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("secret");
    let tmp = path.with_file_name(format!(
        ".{name}.{}.{}.tmp",
        std::process::id(),
        COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    ));
    let _ = std::fs::remove_file(&tmp);
    write_secret_file(&tmp, contents)?;
    let linked = std::fs::hard_link(&tmp, path);
    let _ = std::fs::remove_file(&tmp);
    match linked {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(false),
        Err(e) => Err(e),
    }
}

impl LocalDailyKeyStore {
    /// Opens (creating) the directory; keys past `grace` after their day are refused.
    pub fn open(dir: impl Into<PathBuf>, grace: Duration) -> Result<Self> {
        let dir = dir.into();
        std::fs::create_dir_all(&dir).map_err(|e| Error::Io {
            what: "daily key directory",
            path: dir.clone(),
            source: e,
        })?;
        Ok(LocalDailyKeyStore {
            dir,
            grace,
            cache: Mutex::new(HashMap::new()),
        })
    }

    fn path(&self, day: NaiveDate) -> PathBuf {
        self.dir.join(format!("{day}.key"))
    }

    fn read(&self, path: &Path) -> Result<SecretKey> {
        let text = zeroize::Zeroizing::new(std::fs::read_to_string(path).map_err(|e| Error::Io {
            what: "daily key",
            path: path.into(),
            source: e,
        })?);
        SecretKey::from_hex("daily key", &text)
    }
}

impl DailyKeyStore for LocalDailyKeyStore {
    fn key_for(&self, day: NaiveDate) -> Result<Arc<SecretKey>> {
        if let Some(k) = self.cache.lock().ok().and_then(|c| c.get(&day).cloned()) {
            return Ok(k);
        }
        if Utc::now() >= key_expiry(day, self.grace) {
            return Err(Error::KeyDestroyed { day });
        }
        let path = self.path(day);
        let key = match self.read(&path) {
            Ok(k) => k,
            Err(Error::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
                // exactly one key per day wins, whichever processor writes first
                let fresh = SecretKey::random();
                match create_secret_file(&path, &fresh.to_hex()) {
                    Ok(true) => fresh,
                    Ok(false) => self.read(&path)?,
                    Err(e) => {
                        return Err(Error::Io {
                            what: "daily key",
                            path,
                            source: e,
                        });
                    }
                }
            }
            Err(e) => return Err(e),
        };
        let key = Arc::new(key);
        if let Ok(mut c) = self.cache.lock() {
            c.insert(day, key.clone());
        }
        Ok(key)
    }

    fn destroy_expired(&self, now: DateTime<Utc>, grace: Duration) -> Result<Vec<NaiveDate>> {
        let mut destroyed = Vec::new();
        let entries = std::fs::read_dir(&self.dir).map_err(|e| Error::Io {
            what: "daily key directory",
            path: self.dir.clone(),
            source: e,
        })?;
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(day) = name
                .to_str()
                .and_then(|n| n.strip_suffix(".key"))
                .and_then(|d| d.parse::<NaiveDate>().ok())
            else {
                continue;
            };
            if now >= key_expiry(day, grace) {
                std::fs::remove_file(entry.path()).map_err(|e| Error::Io {
                    what: "daily key",
                    path: entry.path(),
                    source: e,
                })?;
                if let Ok(mut c) = self.cache.lock() {
                    c.remove(&day);
                }
                destroyed.push(day);
            }
        }
        // another process may have deleted the file first: forget this process's copy too
        if let Ok(mut c) = self.cache.lock() {
            c.retain(|day, _| now < key_expiry(*day, grace));
        }
        destroyed.sort();
        Ok(destroyed)
    }

    fn existing(&self) -> Result<Vec<(NaiveDate, Arc<SecretKey>)>> {
        let entries = std::fs::read_dir(&self.dir).map_err(|e| Error::Io {
            what: "daily key directory",
            path: self.dir.clone(),
            source: e,
        })?;
        let mut keys = Vec::new();
        for entry in entries.flatten() {
            let name = entry.file_name();
            if let Some(day) = name
                .to_str()
                .and_then(|n| n.strip_suffix(".key"))
                .and_then(|d| d.parse::<NaiveDate>().ok())
            {
                keys.push((day, Arc::new(self.read(&entry.path())?)));
            }
        }
        keys.sort_by_key(|(d, _)| *d);
        Ok(keys)
    }
}

/// Loads the targeting key (behind `audience_id`s): `MARSAD_SECRET_TARGETING_KEY`, else
/// `privacy.targeting_key_file`, else — on the local log only — one generated once in the
/// keys dir (mode 0600). On Kafka the stages run on several machines and must share the key,
/// so one generated by a single stage would silently disagree with the others: refused.
pub fn load_targeting_key(config: &marsad_config::Config) -> Result<SecretKey> {
    load_secret_key(&TARGETING_KEY, config.privacy.targeting_key_file.as_deref(), config)
}

/// The two long-lived keys that turn a subject's identifiers into keyed hashes: the
/// targeting key (`audience_id`s; may be rotated) and the opt-out key (opt-outs; never).
#[derive(Debug, Clone)]
pub struct SubjectKeys {
    /// Behind every `audience_id`.
    pub targeting: Arc<SecretKey>,
    /// Behind every recorded opt-out.
    pub optout: Arc<SecretKey>,
}

impl SubjectKeys {
    /// Loads both (see [`load_targeting_key`] and [`load_optout_key`]).
    pub fn load(config: &marsad_config::Config) -> Result<Self> {
        Ok(SubjectKeys {
            targeting: Arc::new(load_targeting_key(config)?),
            optout: Arc::new(load_optout_key(config)?),
        })
    }

    /// Fixed keys made from `seed` (tests and benches).
    pub fn from_seed(seed: u8) -> Self {
        SubjectKeys {
            targeting: Arc::new(SecretKey::from_bytes([seed; 32])),
            optout: Arc::new(SecretKey::from_bytes([seed.wrapping_add(1); 32])),
        }
    }
}

/// The environment variable holding the opt-out key (64 hex characters).
pub const OPTOUT_KEY_ENV: &str = "MARSAD_SECRET_OPTOUT_KEY";

/// Loads the opt-out key, under which opt-outs are recorded: never rotated (rotating the
/// targeting key must not void an opt-out). Found like the targeting key.
pub fn load_optout_key(config: &marsad_config::Config) -> Result<SecretKey> {
    load_secret_key(&OPTOUT_KEY, config.privacy.optout_key_file.as_deref(), config)
}

/// The environment variable holding the noise key of released numbers (64 hex characters).
pub const NOISE_KEY_ENV: &str = "MARSAD_SECRET_NOISE_KEY";

/// Loads the noise key: found like the targeting key. Every query process must share it, or
/// the same cell would get different noise from different processes.
pub fn load_noise_key(config: &marsad_config::Config) -> Result<SecretKey> {
    load_secret_key(&NOISE_KEY, config.release.noise_key_file.as_deref(), config)
}

/// The environment variable holding the key the site's backend signs identity tokens with.
pub const IDENTITY_KEY_ENV: &str = "MARSAD_SECRET_IDENTITY_KEY";

/// Loads the identity key (see [`crate::identity`]): found like the targeting key, but on
/// Kafka none given is no error: every `user_id` then counts as anonymous.
pub fn load_identity_key(config: &marsad_config::Config) -> Result<Option<SecretKey>> {
    match load_secret_key(&IDENTITY_KEY, config.privacy.identity_key_file.as_deref(), config) {
        Ok(key) => Ok(Some(key)),
        Err(Error::KeyNotGiven { .. }) => {
            tracing::warn!(
                env = IDENTITY_KEY_ENV,
                "no identity key: every user_id counts as anonymous until the site's backend signs tokens"
            );
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

/// A long-lived secret: where it comes from and what it is called in messages.
struct LongLivedKey {
    env: &'static str,
    file_key: &'static str,
    file_name: &'static str,
    from_env: &'static str,
    from_file: &'static str,
    generated: &'static str,
}

const TARGETING_KEY: LongLivedKey = LongLivedKey {
    env: TARGETING_KEY_ENV,
    file_key: "privacy.targeting_key_file",
    file_name: "targeting.key",
    from_env: "targeting key (MARSAD_SECRET_TARGETING_KEY)",
    from_file: "targeting key file",
    generated: "generated targeting key",
};

const OPTOUT_KEY: LongLivedKey = LongLivedKey {
    env: OPTOUT_KEY_ENV,
    file_key: "privacy.optout_key_file",
    file_name: "optout.key",
    from_env: "opt-out key (MARSAD_SECRET_OPTOUT_KEY)",
    from_file: "opt-out key file",
    generated: "generated opt-out key",
};

const IDENTITY_KEY: LongLivedKey = LongLivedKey {
    env: IDENTITY_KEY_ENV,
    file_key: "privacy.identity_key_file",
    file_name: "identity.key",
    from_env: "identity key (MARSAD_SECRET_IDENTITY_KEY)",
    from_file: "identity key file",
    generated: "generated identity key",
};

const NOISE_KEY: LongLivedKey = LongLivedKey {
    env: NOISE_KEY_ENV,
    file_key: "release.noise_key_file",
    file_name: "noise.key",
    from_env: "noise key (MARSAD_SECRET_NOISE_KEY)",
    from_file: "noise key file",
    generated: "generated noise key",
};

fn load_secret_key(which: &LongLivedKey, file: Option<&Path>, config: &marsad_config::Config) -> Result<SecretKey> {
    if let Ok(hex) = std::env::var(which.env) {
        return SecretKey::from_hex(which.from_env, &zeroize::Zeroizing::new(hex));
    }
    let read = |path: &Path, what: &'static str| -> Result<SecretKey> {
        let text = zeroize::Zeroizing::new(std::fs::read_to_string(path).map_err(|e| Error::Io {
            what,
            path: path.into(),
            source: e,
        })?);
        SecretKey::from_hex(what, &text)
    };
    if let Some(path) = file {
        return read(path, which.from_file);
    }
    if config.eventlog.kind == marsad_config::EventLogKind::Kafka {
        return Err(Error::KeyNotGiven {
            env: which.env,
            file_key: which.file_key,
        });
    }
    let keys_dir = &config.keys_dir();
    std::fs::create_dir_all(keys_dir).map_err(|e| Error::Io {
        what: "key directory",
        path: keys_dir.into(),
        source: e,
    })?;
    let path = keys_dir.join(which.file_name);
    match std::fs::read_to_string(&path) {
        Ok(text) => SecretKey::from_hex(which.generated, &zeroize::Zeroizing::new(text)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let key = SecretKey::random();
            match create_secret_file(&path, &key.to_hex()) {
                Ok(true) => {
                    tracing::info!(path = %path.display(), env = which.env, "generated a key for this data dir; set the variable to share one between machines");
                    Ok(key)
                }
                // another stage (of this process or another) created it first
                Ok(false) => read(&path, which.generated),
                Err(e) => Err(Error::Io {
                    what: which.generated,
                    path,
                    source: e,
                }),
            }
        }
        Err(e) => Err(Error::Io {
            what: which.generated,
            path,
            source: e,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pseudonym::visitor_key;

    fn temp_dir() -> Result<tempfile::TempDir> {
        tempfile::tempdir().map_err(|e| Error::Io {
            what: "tmp",
            path: "tmp".into(),
            source: e,
        })
    }

    #[test]
    fn one_key_per_day_shared_between_stores() -> Result<()> {
        let dir = temp_dir()?;
        let today = Utc::now().date_naive();
        let a = LocalDailyKeyStore::open(dir.path(), Duration::hours(48))?;
        let b = LocalDailyKeyStore::open(dir.path(), Duration::hours(48))?;
        assert_eq!(a.key_for(today)?, b.key_for(today)?);
        let yesterday = today.pred_opt().unwrap_or(today);
        assert_ne!(a.key_for(today)?, a.key_for(yesterday)?);
        Ok(())
    }

    /// A key file named for the calendar's last day (planted in the keys directory, or a
    /// record of the key topic) neither panics the destruction every stage runs nor expires
    /// before its day.
    #[test]
    fn a_key_of_the_calendars_last_day_is_handled() -> Result<()> {
        let dir = temp_dir()?;
        let store = LocalDailyKeyStore::open(dir.path(), Duration::hours(48))?;
        assert_eq!(
            key_expiry(NaiveDate::MAX, Duration::hours(48)),
            DateTime::<Utc>::MAX_UTC
        );
        let last = store.key_for(NaiveDate::MAX)?;
        assert_eq!(
            store.destroy_expired(Utc::now(), Duration::hours(48))?,
            Vec::<NaiveDate>::new()
        );
        assert!(
            store
                .existing()?
                .iter()
                .any(|(day, key)| *day == NaiveDate::MAX && **key == *last)
        );
        Ok(())
    }

    #[test]
    fn destroyed_keys_cannot_be_recreated() -> Result<()> {
        let dir = temp_dir()?;
        let store = LocalDailyKeyStore::open(dir.path(), Duration::hours(48))?;
        let today = Utc::now().date_naive();
        let key = store.key_for(today)?;
        let before = visitor_key(&key, "c-known");
        let later = key_expiry(today, Duration::hours(48)) + Duration::seconds(1);
        assert_eq!(store.destroy_expired(later, Duration::hours(48))?, vec![today]);
        assert!(std::fs::read_dir(dir.path()).map(|d| d.count()).unwrap_or(1) == 0);
        // a store whose clock is past the grace refuses the day; a fresh key would not match anyway
        let strict = LocalDailyKeyStore::open(dir.path(), Duration::zero())?;
        let old_day = today - Duration::days(3);
        assert!(matches!(strict.key_for(old_day), Err(Error::KeyDestroyed { .. })));
        let again = store.key_for(today)?;
        assert_ne!(visitor_key(&again, "c-known"), before);
        Ok(())
    }
}
