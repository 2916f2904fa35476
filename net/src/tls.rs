//! Certificates from PEM files, re-read when the files change, so a renewed
//! certificate takes effect without a restart.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::ServerConfig;
use tokio_util::sync::CancellationToken;

use crate::NetError;

/// How often the certificate files are checked for a change.
pub const RELOAD_CHECK: Duration = Duration::from_secs(5);

/// A certificate and key from PEM files, with the TLS settings built from them.
pub struct TlsFiles {
    cert: PathBuf,
    key: PathBuf,
    current: RwLock<(Arc<ServerConfig>, Option<SystemTime>)>,
}

fn modified(cert: &Path, key: &Path) -> Option<SystemTime> {
    let c = std::fs::metadata(cert).and_then(|m| m.modified()).ok()?;
    let k = std::fs::metadata(key).and_then(|m| m.modified()).ok()?;
    Some(c.max(k))
}

/// Builds the server's TLS settings from a PEM certificate chain and private key.
pub fn server_config(cert: &Path, key: &Path) -> Result<ServerConfig, NetError> {
    let bad = |path: &Path, reason: String| NetError::Tls {
        path: path.to_owned(),
        reason,
    };
    let certs = CertificateDer::pem_file_iter(cert)
        .and_then(|i| i.collect::<Result<Vec<_>, _>>())
        .map_err(|e| bad(cert, e.to_string()))?;
    if certs.is_empty() {
        return Err(bad(cert, "no certificate in the file".into()));
    }
    let private = PrivateKeyDer::from_pem_file(key).map_err(|e| bad(key, e.to_string()))?;
    let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| bad(cert, e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs, private)
        .map_err(|e| bad(cert, e.to_string()))?;
    // HTTP/1.1 only: its header deadline also ends idle keep-alives (HTTP/2 has no such bound)
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

impl TlsFiles {
    /// Loads the files now: a bad certificate stops the start, not the first visitor.
    pub fn load(cert: &Path, key: &Path) -> Result<Arc<Self>, NetError> {
        let config = server_config(cert, key)?;
        Ok(Arc::new(TlsFiles {
            cert: cert.to_owned(),
            key: key.to_owned(),
            current: RwLock::new((Arc::new(config), modified(cert, key))),
        }))
    }

    /// The settings for the next connection.
    pub fn acceptor(&self) -> TlsAcceptor {
        let config = match self.current.read() {
            Ok(c) => c.0.clone(),
            Err(poisoned) => poisoned.into_inner().0.clone(),
        };
        TlsAcceptor::from(config)
    }

    /// The settings for the next connection, for servers that take rustls' own.
    pub fn server_config(&self) -> Arc<ServerConfig> {
        match self.current.read() {
            Ok(c) => c.0.clone(),
            Err(poisoned) => poisoned.into_inner().0.clone(),
        }
    }

    /// Re-reads the files if they changed; a broken new pair keeps the old one in service.
    /// Returns whether new settings took effect.
    pub fn reload_if_changed(&self) -> bool {
        let now = modified(&self.cert, &self.key);
        let known = self.current.read().map(|c| c.1).unwrap_or(None);
        if now.is_none() || now == known {
            return false;
        }
        match server_config(&self.cert, &self.key) {
            Ok(config) => {
                if let Ok(mut c) = self.current.write() {
                    *c = (Arc::new(config), now);
                }
                tracing::info!(cert = %self.cert.display(), "TLS certificate reloaded");
                true
            }
            Err(e) => {
                tracing::warn!(error = %e, "TLS certificate changed but cannot be used; keeping the previous one");
                false
            }
        }
    }

    /// Checks the files every [`RELOAD_CHECK`] until `shutdown`.
    pub fn watch(self: &Arc<Self>, shutdown: CancellationToken) {
        let files = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(RELOAD_CHECK);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tick.tick() => { files.reload_if_changed(); }
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_pair(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
        let pair = rcgen::generate_simple_self_signed(vec![name.to_owned()]).expect("rcgen");
        let cert = dir.join("cert.pem");
        let key = dir.join("key.pem");
        std::fs::write(&cert, pair.cert.pem()).expect("write cert");
        std::fs::write(&key, pair.signing_key.serialize_pem()).expect("write key");
        (cert, key)
    }

    #[test]
    fn a_changed_pair_is_reloaded_and_a_broken_one_keeps_the_old() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (cert, key) = write_pair(dir.path(), "one.test");
        let files = TlsFiles::load(&cert, &key).expect("load");
        let first = files.server_config();
        assert!(!files.reload_if_changed(), "nothing changed");
        std::thread::sleep(Duration::from_millis(20));
        std::fs::write(&cert, "not a certificate").expect("write");
        assert!(!files.reload_if_changed(), "a broken file is not taken");
        assert!(Arc::ptr_eq(&first, &files.server_config()));
        std::thread::sleep(Duration::from_millis(20));
        write_pair(dir.path(), "two.test");
        assert!(files.reload_if_changed(), "a renewed pair is taken");
        assert!(!Arc::ptr_eq(&first, &files.server_config()));
    }

    #[test]
    fn a_missing_or_mismatched_file_is_named() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (cert, _) = write_pair(dir.path(), "one.test");
        let other = tempfile::tempdir().expect("tempdir");
        let (_, key) = write_pair(other.path(), "two.test");
        let err = TlsFiles::load(&cert, &dir.path().join("absent.pem"))
            .err()
            .expect("refused");
        assert!(err.to_string().contains("absent.pem"), "{err}");
        let err = TlsFiles::load(&cert, &key).err().expect("mismatched pair refused");
        assert!(err.to_string().contains("cert.pem"), "{err}");
    }
}
