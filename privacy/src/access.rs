//! API keys and their roles, shared by every service. Keys are kept only as
//! SHA-256 hashes; the generated admin key is written once to
//! `<data_dir>/admin.key` (0600).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use marsad_config::{ApiKeyConfig, Role};
use rand::RngCore;
use sha2::{Digest, Sha256};

/// Why a key file or configured key cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// A key file could not be read or written.
    #[error("API key {path}: {source}")]
    KeyFile {
        /// The file.
        path: PathBuf,
        /// What failed.
        source: std::io::Error,
    },
    /// A configured key is malformed.
    #[error("API key `{name}`: {reason}")]
    BadKey {
        /// The key's name.
        name: String,
        /// What is wrong.
        reason: String,
    },
}

/// Why a request is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AccessError {
    /// No key, or an unknown one.
    #[error("missing or unknown API key: send `Authorization: Bearer KEY`")]
    Unauthorized,
    /// The key lacks the role.
    #[error("the key `{key}` lacks the `{role}` role this call needs")]
    Forbidden {
        /// The key's name.
        key: String,
        /// The role needed.
        role: &'static str,
    },
}

/// The key in an `Authorization: Bearer KEY` header value.
pub fn bearer(authorization: Option<&str>) -> Option<&str> {
    let v = authorization?;
    v.strip_prefix("Bearer ")
        .or_else(|| v.strip_prefix("bearer "))
        .map(str::trim)
        .filter(|k| !k.is_empty())
}

/// A known key: who holds it and what it may do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyHolder {
    /// The key's name.
    pub name: String,
    /// Its roles.
    pub roles: Vec<Role>,
    /// For an advertiser: the only campaigns it may see.
    pub campaigns: Vec<String>,
}

/// Every key the service accepts, by hash.
#[derive(Debug, Default, Clone)]
pub struct ApiKeys {
    by_hash: HashMap<[u8; 32], KeyHolder>,
    /// SCRAM-SHA-256 verifiers by key name, for the keys whose text this process read (key
    /// files, the admin key): Postgres clients prove the key without sending it.
    scram: HashMap<String, ScramVerifier>,
}

/// The iterations of SCRAM-SHA-256's key derivation (RFC 7677's minimum, Postgres' default).
pub const SCRAM_ITERATIONS: u32 = 4096;

/// What a SCRAM-SHA-256 server keeps of a password: a salt and `Hi(password, salt, i)`.
#[derive(Clone)]
pub struct ScramVerifier {
    /// Random per key and process.
    pub salt: [u8; 16],
    /// PBKDF2-HMAC-SHA256 of the key with the salt, [`SCRAM_ITERATIONS`] rounds.
    pub salted_password: [u8; 32],
}

impl std::fmt::Debug for ScramVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ScramVerifier(..)")
    }
}

impl ScramVerifier {
    /// The verifier of `key` under a fresh salt.
    pub fn of(key: &str) -> Self {
        let mut salt = [0u8; 16];
        rand::rng().fill_bytes(&mut salt);
        ScramVerifier {
            salt,
            salted_password: pbkdf2_sha256(key.as_bytes(), &salt, SCRAM_ITERATIONS),
        }
    }
}

/// PBKDF2-HMAC-SHA256 with one block of output (RFC 5802's `Hi`).
fn pbkdf2_sha256(password: &[u8], salt: &[u8], iterations: u32) -> [u8; 32] {
    use hmac::{KeyInit, Mac};
    type H = hmac::Hmac<Sha256>;
    let mac = |data: &[&[u8]]| -> [u8; 32] {
        // an HMAC takes keys of any length: this cannot fail
        let mut m = <H as KeyInit>::new_from_slice(password).unwrap_or_else(|_| unreachable!());
        for d in data {
            m.update(d);
        }
        m.finalize().into_bytes().into()
    };
    let mut u = mac(&[salt, &1u32.to_be_bytes()]);
    let mut out = u;
    for _ in 1..iterations {
        u = mac(&[&u]);
        for (o, b) in out.iter_mut().zip(u) {
            *o ^= b;
        }
    }
    out
}

fn hash(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

fn role_name(role: Role) -> &'static str {
    match role {
        Role::Analyst => "analyst",
        Role::Adserver => "adserver",
        Role::Engineer => "engineer",
        Role::Admin => "admin",
        Role::Advertiser => "advertiser",
    }
}

impl ApiKeys {
    /// Loads the configured keys (hashes, or files holding keys).
    pub fn from_config(keys: &[ApiKeyConfig]) -> Result<Self, KeyError> {
        let mut out = ApiKeys::default();
        for k in keys {
            let digest = match (&k.sha256, &k.file) {
                (Some(h), _) => {
                    let bytes = hex::decode(h).map_err(|e| KeyError::BadKey {
                        name: k.name.clone(),
                        reason: e.to_string(),
                    })?;
                    bytes.try_into().map_err(|_| KeyError::BadKey {
                        name: k.name.clone(),
                        reason: "sha256 must be 32 bytes".into(),
                    })?
                }
                (None, Some(path)) => {
                    let text = std::fs::read_to_string(path).map_err(|e| KeyError::KeyFile {
                        path: path.clone(),
                        source: e,
                    })?;
                    out.scram.insert(k.name.clone(), ScramVerifier::of(text.trim()));
                    hash(text.trim())
                }
                (None, None) => {
                    return Err(KeyError::BadKey {
                        name: k.name.clone(),
                        reason: "needs `sha256` or `file`".into(),
                    });
                }
            };
            out.by_hash.insert(
                digest,
                KeyHolder {
                    name: k.name.clone(),
                    roles: k.roles.clone(),
                    campaigns: k.campaigns.clone(),
                },
            );
        }
        Ok(out)
    }

    /// Adds a key by its plain text.
    pub fn insert(&mut self, key: &str, holder: KeyHolder) {
        self.scram.insert(holder.name.clone(), ScramVerifier::of(key));
        self.by_hash.insert(hash(key), holder);
    }

    /// The SCRAM verifier of the key called `name`, when this process read its text.
    pub fn scram_verifier(&self, name: &str) -> Option<&ScramVerifier> {
        self.scram.get(name)
    }

    /// Checks that the key from an `Authorization` header value has `role`.
    pub fn authorize(&self, authorization: Option<&str>, role: Role) -> Result<&KeyHolder, AccessError> {
        let key = bearer(authorization).ok_or(AccessError::Unauthorized)?;
        let holder = self.by_hash.get(&hash(key)).ok_or(AccessError::Unauthorized)?;
        if holder.roles.contains(&role) {
            Ok(holder)
        } else {
            Err(AccessError::Forbidden {
                key: holder.name.clone(),
                role: role_name(role),
            })
        }
    }

    /// The holder of the key called `name` (once its key was proven another way, e.g. SCRAM).
    pub fn holder_named(&self, name: &str) -> Option<&KeyHolder> {
        self.by_hash.values().find(|h| h.name == name)
    }

    /// The holder of a plain key, for protocols that carry it as a password (Postgres: user = key name).
    pub fn holder_of(&self, key: &str) -> Option<&KeyHolder> {
        self.by_hash.get(&hash(key))
    }

    /// Configured keys plus the data dir's admin key (created on first start).
    pub fn load(configured: &[ApiKeyConfig], data_dir: &Path) -> Result<(Self, AdminKey), KeyError> {
        let admin = ensure_admin_key(data_dir)?;
        let mut keys = Self::from_config(configured)?;
        keys.insert(&admin.key, AdminKey::holder());
        Ok((keys, admin))
    }
}

/// The generated admin key and where it is.
#[derive(Debug, Clone)]
pub struct AdminKey {
    /// The key.
    pub key: String,
    /// `<data_dir>/admin.key`.
    pub path: PathBuf,
    /// Whether it was made just now (print it once).
    pub created: bool,
}

/// Reads `<data_dir>/admin.key`, creating it (mode 0600) with a fresh key on first start.
pub fn ensure_admin_key(data_dir: &Path) -> Result<AdminKey, KeyError> {
    let path = data_dir.join("admin.key");
    std::fs::create_dir_all(data_dir).map_err(|e| KeyError::KeyFile {
        path: data_dir.into(),
        source: e,
    })?;
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            return Ok(AdminKey {
                key: text.trim().to_owned(),
                path,
                created: false,
            });
        }
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(KeyError::KeyFile { path, source: e }),
        Err(_) => {}
    }
    let mut bytes = [0u8; 24];
    rand::rng().fill_bytes(&mut bytes);
    let key = format!("mk_{}", hex::encode(bytes));
    let created = crate::keys::create_secret_file(&path, &format!("{key}\n")).map_err(|e| KeyError::KeyFile {
        path: path.clone(),
        source: e,
    })?;
    if !created {
        // another stage started beside this one wrote it first
        let text = std::fs::read_to_string(&path).map_err(|e| KeyError::KeyFile {
            path: path.clone(),
            source: e,
        })?;
        return Ok(AdminKey {
            key: text.trim().to_owned(),
            path,
            created: false,
        });
    }
    Ok(AdminKey {
        key,
        path,
        created: true,
    })
}

impl AdminKey {
    /// The key holder with every role.
    pub fn holder() -> KeyHolder {
        KeyHolder {
            name: "admin".into(),
            roles: Role::ALL.to_vec(),
            campaigns: Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(key: &str) -> String {
        format!("Bearer {key}")
    }

    #[test]
    fn roles_are_checked() {
        let mut keys = ApiKeys::from_config(&[ApiKeyConfig {
            name: "ana".into(),
            roles: vec![Role::Analyst],
            sha256: Some(hex::encode(hash("analyst-secret"))),
            file: None,
            campaigns: Vec::new(),
            daily_epsilon: None,
        }])
        .expect("keys");
        keys.insert("root", AdminKey::holder());
        assert!(keys.authorize(Some(&*header("analyst-secret")), Role::Analyst).is_ok());
        assert!(matches!(
            keys.authorize(Some(&*header("analyst-secret")), Role::Engineer),
            Err(AccessError::Forbidden { .. })
        ));
        assert!(matches!(
            keys.authorize(Some(&*header("nope")), Role::Analyst),
            Err(AccessError::Unauthorized)
        ));
        assert!(matches!(
            keys.authorize(None, Role::Analyst),
            Err(AccessError::Unauthorized)
        ));
        assert!(keys.authorize(Some(&*header("root")), Role::Admin).is_ok());
    }

    #[test]
    fn admin_key_is_created_once_and_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tmp");
        let first = ensure_admin_key(dir.path()).expect("created");
        assert!(first.created && first.key.starts_with("mk_"));
        let mode = std::fs::metadata(&first.path).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let again = ensure_admin_key(dir.path()).expect("read");
        assert!(!again.created);
        assert_eq!(again.key, first.key);
    }
}

#[cfg(test)]
mod scram_tests {
    use super::*;

    #[test]
    fn pbkdf2_matches_rfc_7914_test_vector() {
        // RFC 7914 §11: PBKDF2-HMAC-SHA256("passwd", "salt", 1), first 32 bytes
        let got = pbkdf2_sha256(b"passwd", b"salt", 1);
        assert_eq!(
            hex::encode(got),
            "55ac046e56e3089fec1691c22544b605f94185216dde0465e68b9d57c20dacbc"
        );
    }
}
