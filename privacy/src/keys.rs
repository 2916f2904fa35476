//! Keys that forget. Each UTC day has its own random visitor key, the same
//! for every processor (they share a [`DailyKeyStore`]), destroyed a grace
//! period after the day ends. The targeting key is long-lived and comes from
//! the environment or a secret file, never from the repository.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use chrono::{DateTime, Duration, NaiveDate, Utc};
use rand::RngCore;

use crate::{Error, Result};

/// The environment variable holding the targeting key (64 hex characters).
pub const TARGETING_KEY_ENV: &str = "MARSAD_SECRET_TARGETING_KEY";

/// A 32-byte secret; its `Debug` never shows the bytes.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretKey([u8; 32]);

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
        let bytes = hex::decode(text.trim()).map_err(|e| Error::BadKey {
            what,
            reason: format!("not hex: {e}"),
        })?;
        let arr: [u8; 32] = bytes.try_into().map_err(|b: Vec<u8>| Error::BadKey {
            what,
            reason: format!("{} bytes; 32 expected", b.len()),
        })?;
        Ok(SecretKey(arr))
    }

    /// The key's bytes, for the HMAC.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    pub(crate) fn to_hex(&self) -> String {
        hex::encode(self.0)
    }
}

/// Where the daily visitor keys live; shared by every processor instance.
pub trait DailyKeyStore: Send + Sync {
    /// The key of `day`, created if the day has none yet; refused once destroyed.
    fn key_for(&self, day: NaiveDate) -> Result<SecretKey>;

    /// Destroys the keys of days that ended more than `grace` before `now`; returns those days.
    fn destroy_expired(&self, now: DateTime<Utc>, grace: Duration) -> Result<Vec<NaiveDate>>;

    /// The keys that still exist, by day (erasure recomputes a cookie's `visitor_key`s with them).
    fn existing(&self) -> Result<Vec<(NaiveDate, SecretKey)>>;
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

/// The end of `day`'s grace period: after it, its key is gone.
pub fn key_expiry(day: NaiveDate, grace: Duration) -> DateTime<Utc> {
    let next_midnight = day
        .succ_opt()
        .unwrap_or(day)
        .and_hms_opt(0, 0, 0)
        .unwrap_or_default()
        .and_utc();
    next_midnight + grace
}

/// Daily keys as files in a directory (the embedded default), created atomically so
/// concurrent processors agree on one key per day.
pub struct LocalDailyKeyStore {
    dir: PathBuf,
    grace: Duration,
    cache: Mutex<HashMap<NaiveDate, SecretKey>>,
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
        let text = std::fs::read_to_string(path).map_err(|e| Error::Io {
            what: "daily key",
            path: path.into(),
            source: e,
        })?;
        SecretKey::from_hex("daily key", &text)
    }
}

impl DailyKeyStore for LocalDailyKeyStore {
    fn key_for(&self, day: NaiveDate) -> Result<SecretKey> {
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
        destroyed.sort();
        Ok(destroyed)
    }

    fn existing(&self) -> Result<Vec<(NaiveDate, SecretKey)>> {
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
                keys.push((day, self.read(&entry.path())?));
            }
        }
        keys.sort_by_key(|(d, _)| *d);
        Ok(keys)
    }
}

/// Loads the targeting key: `MARSAD_SECRET_TARGETING_KEY`, else `file`, else one generated
/// once in `keys_dir` (mode 0600) for the embedded default.
pub fn load_targeting_key(file: Option<&Path>, keys_dir: &Path) -> Result<SecretKey> {
    load_secret_key(&TARGETING_KEY, file, keys_dir)
}

/// The environment variable holding the noise key of released numbers (64 hex characters).
pub const NOISE_KEY_ENV: &str = "MARSAD_SECRET_NOISE_KEY";

/// Loads the noise key: `MARSAD_SECRET_NOISE_KEY`, else `file`, else one generated once in
/// `keys_dir` (mode 0600) for the embedded default. Every query process must share it, or
/// the same cell would get different noise from different processes.
pub fn load_noise_key(file: Option<&Path>, keys_dir: &Path) -> Result<SecretKey> {
    load_secret_key(&NOISE_KEY, file, keys_dir)
}

/// A long-lived secret: where it comes from and what it is called in messages.
struct LongLivedKey {
    env: &'static str,
    file_name: &'static str,
    from_env: &'static str,
    from_file: &'static str,
    generated: &'static str,
}

const TARGETING_KEY: LongLivedKey = LongLivedKey {
    env: TARGETING_KEY_ENV,
    file_name: "targeting.key",
    from_env: "targeting key (MARSAD_SECRET_TARGETING_KEY)",
    from_file: "targeting key file",
    generated: "generated targeting key",
};

const NOISE_KEY: LongLivedKey = LongLivedKey {
    env: NOISE_KEY_ENV,
    file_name: "noise.key",
    from_env: "noise key (MARSAD_SECRET_NOISE_KEY)",
    from_file: "noise key file",
    generated: "generated noise key",
};

fn load_secret_key(which: &LongLivedKey, file: Option<&Path>, keys_dir: &Path) -> Result<SecretKey> {
    if let Ok(hex) = std::env::var(which.env) {
        return SecretKey::from_hex(which.from_env, &hex);
    }
    let read = |path: &Path, what: &'static str| -> Result<SecretKey> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::Io {
            what,
            path: path.into(),
            source: e,
        })?;
        SecretKey::from_hex(what, &text)
    };
    if let Some(path) = file {
        return read(path, which.from_file);
    }
    std::fs::create_dir_all(keys_dir).map_err(|e| Error::Io {
        what: "key directory",
        path: keys_dir.into(),
        source: e,
    })?;
    let path = keys_dir.join(which.file_name);
    match std::fs::read_to_string(&path) {
        Ok(text) => SecretKey::from_hex(which.generated, &text),
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

    #[test]
    fn one_key_per_day_shared_between_stores() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|e| Error::Io {
            what: "tmp",
            path: "tmp".into(),
            source: e,
        })?;
        let today = Utc::now().date_naive();
        let a = LocalDailyKeyStore::open(dir.path(), Duration::hours(48))?;
        let b = LocalDailyKeyStore::open(dir.path(), Duration::hours(48))?;
        assert_eq!(a.key_for(today)?, b.key_for(today)?);
        let yesterday = today.pred_opt().unwrap_or(today);
        assert_ne!(a.key_for(today)?, a.key_for(yesterday)?);
        Ok(())
    }

    #[test]
    fn destroyed_keys_cannot_be_recreated() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|e| Error::Io {
            what: "tmp",
            path: "tmp".into(),
            source: e,
        })?;
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
