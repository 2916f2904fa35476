//! `[tables]`: where the Delta tables live, and the resolved [`TablesLocation`].

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::{ConfigError, Result, settings_as_text};

/// Where the Delta tables live (`[tables]`): under the data dir by default, or on object
/// storage when ingest, process and query run on separate machines.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields, default)]
pub struct TablesConfig {
    /// A directory or an object-store URL (`s3://bucket/prefix`); empty: `<data_dir>/tables`.
    pub location: String,
    /// object_store settings for that location (`aws_region`, `aws_endpoint`,
    /// `aws_allow_http`, …). Credentials come from the environment (`AWS_ACCESS_KEY_ID`,
    /// `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`) or the machine's role, never from this file.
    #[serde(deserialize_with = "settings_as_text")]
    pub storage: std::collections::BTreeMap<String, String>,
}

/// The object-store schemes tables can live on (`file` is a local directory).
pub const TABLE_SCHEMES: [&str; 3] = ["file", "s3", "s3a"];

/// Where the tables are, resolved: the URL every table sits under and the settings to
/// reach it, so every stage (and every batch job) opens the same tables the same way.
#[derive(Debug, Clone, PartialEq)]
pub struct TablesLocation {
    root: url::Url,
    storage: std::collections::BTreeMap<String, String>,
}

impl TablesLocation {
    /// Tables in the local directory `dir`.
    pub fn local(dir: &Path) -> Result<Self> {
        let bad = |reason: String| ConfigError::Invalid {
            key: "tables.location",
            reason,
        };
        let abs = std::path::absolute(dir).map_err(|e| bad(format!("{}: {e}", dir.display())))?;
        let root = url::Url::from_directory_path(&abs)
            .map_err(|_| bad(format!("{}: not a usable directory path", abs.display())))?;
        Ok(TablesLocation {
            root,
            storage: Default::default(),
        })
    }

    /// Tables at `location`: an object-store URL, or else a directory.
    pub fn parse(location: &str, storage: &std::collections::BTreeMap<String, String>) -> Result<Self> {
        let bad = |reason: String| ConfigError::Invalid {
            key: "tables.location",
            reason,
        };
        let url = match url::Url::parse(location) {
            // `C:\…` parses as a URL with scheme `c`; a one-letter scheme is a drive
            Ok(url) if url.scheme().len() > 1 => url,
            // not a directory either (`s3://KEY:SE/CRET@bucket` fails to parse at the `/` in the
            // secret): refused, the location not quoted, since it may hold a secret
            Err(e) if location.contains("://") => {
                return Err(bad(format!(
                    "not a valid URL ({e}); credentials do not go in the URL, and a directory is \
                     given as a path"
                )));
            }
            _ => return Self::local(Path::new(location)),
        };
        // checked before any message quotes the location: it would quote the secret
        if !url.username().is_empty() || url.password().is_some() {
            return Err(bad(format!(
                "{}://…: credentials do not go in the URL; give them in the environment \
                 (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY) or use the machine's role",
                url.scheme()
            )));
        }
        if !TABLE_SCHEMES.contains(&url.scheme()) {
            return Err(bad(format!(
                "`{location}`: tables can live in a directory or on {} (this build has no `{}` support)",
                TABLE_SCHEMES[1..]
                    .iter()
                    .map(|s| format!("{s}://"))
                    .collect::<Vec<_>>()
                    .join(", "),
                url.scheme()
            )));
        }
        if url.scheme() == "file" {
            let dir = url
                .to_file_path()
                .map_err(|_| bad(format!("`{location}`: not a local path")))?;
            return Self::local(&dir);
        }
        if url.host_str().is_none_or(str::is_empty) {
            return Err(bad(format!("`{location}`: no bucket (expected s3://bucket/prefix)")));
        }
        if url.query().is_some() || url.fragment().is_some() {
            return Err(bad(format!(
                "`{location}`: settings go in [tables.storage], not in the URL"
            )));
        }
        let mut root = url;
        if !root.path().ends_with('/') {
            let path = format!("{}/", root.path());
            root.set_path(&path);
        }
        Ok(TablesLocation {
            root,
            storage: storage.clone(),
        })
    }

    /// The URL of table `name` (a directory URL, ending in `/`).
    pub fn table_url(&self, name: &str) -> url::Url {
        let mut url = self.root.clone();
        let path = format!("{}{name}/", self.root.path());
        url.set_path(&path);
        url
    }

    /// The URL all tables sit under.
    pub fn url(&self) -> &url::Url {
        &self.root
    }

    /// The local directory, when the tables are on this machine's file system.
    pub fn local_dir(&self) -> Option<PathBuf> {
        (self.root.scheme() == "file")
            .then(|| self.root.to_file_path().ok())
            .flatten()
    }

    /// The object_store settings (credentials are added from the environment by the store).
    pub fn storage_options(&self) -> std::collections::HashMap<String, String> {
        self.storage.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
    }
}

impl std::fmt::Display for TablesLocation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.local_dir() {
            Some(dir) => write!(f, "{}", dir.display()),
            None => write!(f, "{}", self.root),
        }
    }
}

impl TablesConfig {
    pub(crate) fn validate(&self) -> Result<()> {
        if let Some(k) = self.storage.keys().find(|k| {
            ["secret", "token", "password"]
                .iter()
                .any(|s| k.to_ascii_lowercase().contains(s))
        }) {
            return Err(ConfigError::Invalid {
                key: "tables.storage",
                reason: format!(
                    "`{k}` is a secret: set it in the environment (AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN) \
                     or use the machine's role, never the config file"
                ),
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_in_the_url_are_refused_without_being_repeated() {
        for location in [
            "s3://AKIDEXAMPLE:s3cr3t-value@bucket/tables",
            "s3://AKIDEXAMPLE@bucket/tables",
            // a secret with a `/` (AWS secrets often hold one) makes the URL fail to parse
            "s3://AKIDEXAMPLE:s3cr3t/value@bucket/tables",
            // a scheme Marsad does not take, and a file URL, are refused before their checks
            "gs://AKIDEXAMPLE:s3cr3t-value@bucket/tables",
            "file://AKIDEXAMPLE:s3cr3t-value@host/tables",
        ] {
            let Err(e) = TablesLocation::parse(location, &Default::default()) else {
                panic!("{location} was taken");
            };
            let message = e.to_string();
            assert!(message.contains("credentials"), "{location}: {message}");
            assert!(
                !message.contains("AKIDEXAMPLE") && !message.contains("s3cr3t"),
                "{message}"
            );
        }
        assert!(TablesLocation::parse("s3://bucket/tables", &Default::default()).is_ok());
    }
}
