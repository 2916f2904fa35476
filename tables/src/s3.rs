//! Tables in an S3 bucket (or a store that speaks S3) through object_store's own S3 client.
//!
//! delta-rs's S3 support (`deltalake-aws`) builds the same client, but resolves credentials
//! through the AWS SDK: 34 more packages in every build of Marsad (BENCHMARKS.md, "Build"). Its
//! log store is delta-rs's default one, as here: a commit is a conditional put
//! (`If-None-Match: *`), so two writers never both commit one version.
//!
//! Credentials come from object_store's chain: the environment's keys (`AWS_ACCESS_KEY_ID`,
//! `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`), a web identity (`AWS_WEB_IDENTITY_TOKEN_FILE`
//! and `AWS_ROLE_ARN`, as on EKS), an EKS pod identity or ECS task role, then the instance's
//! role. `~/.aws` profiles and SSO logins are not read: a server is given keys or a role.
//! Settings are the location's `tables.storage` keys and the environment's `AWS_*`, the former
//! winning; a key that is neither an S3 setting nor a retry setting is refused, and so is a key
//! delta-rs parses but only its own S3 support applied (a certificate, an IO runtime, a
//! concurrency limit), so a setting is either used or an error, never silently dropped.

use std::collections::HashMap;
use std::str::FromStr;
use std::sync::{Arc, Once};

use deltalake::DeltaTableError;
use deltalake::logstore::{
    LogStore, LogStoreFactory, ObjectStoreFactory, ObjectStoreRef, StorageConfig, default_logstore, logstore_factories,
    object_store_factories,
};
use object_store::ObjectStoreScheme;
use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey};
use object_store::path::Path;
use url::Url;

/// The URL schemes of tables in S3 (`s3a` as Spark and Hadoop write it).
const SCHEMES: [&str; 2] = ["s3", "s3a"];

/// Makes `s3://` and `s3a://` table locations known to delta-rs, once per process (and says
/// once if the environment names an AWS profile, which is not read).
pub(crate) fn register() {
    static REGISTERED: Once = Once::new();
    REGISTERED.call_once(|| {
        if let Some(profile) = ["AWS_PROFILE", "AWS_SHARED_CREDENTIALS_FILE", "AWS_CONFIG_FILE"]
            .into_iter()
            .find(|name| std::env::var_os(name).is_some())
        {
            tracing::warn!(
                variable = profile,
                "AWS profiles are not read: credentials come from AWS_ACCESS_KEY_ID and \
                 AWS_SECRET_ACCESS_KEY, a web identity, or the machine's role"
            );
        }
        let stores: Arc<dyn ObjectStoreFactory> = Arc::new(S3Stores);
        let logs: Arc<dyn LogStoreFactory> = Arc::new(S3Logs);
        for scheme in SCHEMES {
            let Ok(url) = Url::parse(&format!("{scheme}://")) else {
                continue;
            };
            object_store_factories().insert(url.clone(), stores.clone());
            logstore_factories().insert(url, logs.clone());
        }
    });
}

/// Builds the S3 client of a table location.
struct S3Stores;

impl ObjectStoreFactory for S3Stores {
    fn parse_url_opts(&self, url: &Url, config: &StorageConfig) -> deltalake::DeltaResult<(ObjectStoreRef, Path)> {
        let builder = s3_builder(url, config)?;
        let (_, path) =
            ObjectStoreScheme::parse(url).map_err(|e| DeltaTableError::GenericError { source: Box::new(e) })?;
        let store = builder.build()?;
        Ok((Arc::new(store), path))
    }
}

/// The client's settings for `url`: the environment's `AWS_*`, then the location's own
/// settings, then the bucket of the URL; delta-rs's retry settings.
fn s3_builder(url: &Url, config: &StorageConfig) -> deltalake::DeltaResult<AmazonS3Builder> {
    // delta-rs takes these keys as its own, but only its S3 support applied them
    let unsupported = [
        (
            config.certificate.is_some(),
            "certificate_path (trust a private CA in the system's store)",
        ),
        (
            config.runtime.is_some(),
            "an IO runtime (multi_threaded, worker_threads, …)",
        ),
        (config.limit.is_some(), "a concurrency limit"),
    ];
    if let Some((_, what)) = unsupported.iter().find(|(set, _)| *set) {
        return Err(DeltaTableError::Generic(format!(
            "object storage setting not supported for tables in S3: {what}"
        )));
    }
    // the keys delta-rs left (S3 settings, or typos), each once: `AWS_REGION` and `aws_region`
    // are one setting, and two values for it are refused
    let mut settings: HashMap<AmazonS3ConfigKey, &String> = HashMap::new();
    for (key, value) in &config.unknown_properties {
        let Ok(s3_key) = AmazonS3ConfigKey::from_str(&key.to_ascii_lowercase()) else {
            return Err(DeltaTableError::Generic(format!(
                "unknown object storage setting `{key}`: not an S3 setting of object_store \
                 (aws_endpoint, aws_region, aws_allow_http, …) nor a retry setting (max_retries, \
                 retry_timeout, backoff_config.*, lower case)"
            )));
        };
        if settings.insert(s3_key, value).is_some_and(|other| other != value) {
            return Err(DeltaTableError::Generic(format!(
                "object storage setting `{}` is given twice with different values",
                s3_key.as_ref()
            )));
        }
    }
    let mut builder = AmazonS3Builder::from_env();
    for (key, value) in settings {
        builder = builder.with_config(key, value.clone());
    }
    Ok(builder.with_url(url.as_str()).with_retry(config.retry.clone()))
}

/// The log of a table in S3: delta-rs's default log store (commits by conditional put).
struct S3Logs;

impl LogStoreFactory for S3Logs {
    fn with_options(
        &self,
        prefixed_store: ObjectStoreRef,
        root_store: ObjectStoreRef,
        location: &Url,
        options: &StorageConfig,
    ) -> deltalake::DeltaResult<Arc<dyn LogStore>> {
        Ok(default_logstore(prefixed_store, root_store, location, options))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type TestResult = Result<(), Box<dyn std::error::Error>>;

    fn config(options: &[(&str, &str)]) -> StorageConfig {
        let raw: HashMap<String, String> = options.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        StorageConfig::parse_options(raw).expect("options parse")
    }

    #[test]
    fn the_locations_settings_and_bucket_make_the_client() -> TestResult {
        let url = Url::parse("s3://marsad-bucket/tables/events")?;
        let settings = config(&[
            ("AWS_ENDPOINT", "http://127.0.0.1:9"),
            ("aws_region", "eu-south-1"),
            ("aws_allow_http", "true"),
            ("max_retries", "2"),
        ]);
        let builder = s3_builder(&url, &settings)?;
        assert_eq!(
            builder.get_config_value(&AmazonS3ConfigKey::Endpoint).as_deref(),
            Some("http://127.0.0.1:9")
        );
        assert_eq!(
            builder.get_config_value(&AmazonS3ConfigKey::Region).as_deref(),
            Some("eu-south-1")
        );
        // object_store's default, unless this host's environment chose otherwise (then a
        // commit uses that, or fails where the store cannot put if absent: never overwrites)
        let chosen = std::env::var("AWS_CONDITIONAL_PUT").unwrap_or_else(|_| "etag".to_owned());
        assert_eq!(
            builder.get_config_value(&AmazonS3ConfigKey::ConditionalPut),
            Some(chosen),
            "commits are conditional puts"
        );
        let (store, path) = S3Stores.parse_url_opts(&url, &settings)?;
        assert_eq!(store.to_string(), "AmazonS3(marsad-bucket)");
        assert_eq!(path.as_ref(), "tables/events");
        Ok(())
    }

    #[test]
    fn a_misspelt_setting_is_refused() {
        let url = Url::parse("s3://marsad-bucket/tables").expect("a url");
        let Err(e) = s3_builder(&url, &config(&[("aws_endpiont", "http://127.0.0.1:9")])) else {
            panic!("a misspelt key was taken");
        };
        assert!(e.to_string().contains("aws_endpiont"), "{e}");
    }

    /// Keys delta-rs parses as its own but only its S3 support applied: refused, not dropped.
    #[test]
    fn a_setting_this_client_would_not_apply_is_refused() {
        let url = Url::parse("s3://marsad-bucket/tables").expect("a url");
        for (key, value) in [
            ("certificate_path", "/etc/ssl/private-ca.pem"),
            ("multi_threaded", "true"),
            ("concurrency_limit", "4"),
        ] {
            let settings = config(&[(key, value)]);
            let Err(e) = s3_builder(&url, &settings) else {
                panic!("{key} was taken and would be ignored");
            };
            assert!(e.to_string().contains("not supported"), "{key}: {e}");
        }
    }

    #[test]
    fn one_setting_given_twice_must_agree() -> TestResult {
        let url = Url::parse("s3://marsad-bucket/tables")?;
        let Err(e) = s3_builder(
            &url,
            &config(&[("AWS_REGION", "eu-south-1"), ("aws_region", "us-east-1")]),
        ) else {
            panic!("two regions were taken");
        };
        assert!(e.to_string().contains("twice"), "{e}");
        let builder = s3_builder(
            &url,
            &config(&[("AWS_REGION", "eu-south-1"), ("aws_region", "eu-south-1")]),
        )?;
        assert_eq!(
            builder.get_config_value(&AmazonS3ConfigKey::Region).as_deref(),
            Some("eu-south-1")
        );
        Ok(())
    }

    #[test]
    fn both_schemes_are_known_to_delta_rs() {
        register();
        for scheme in SCHEMES {
            let url = Url::parse(&format!("{scheme}://")).expect("a url");
            assert!(object_store_factories().contains_key(&url), "{scheme}");
            assert!(logstore_factories().contains_key(&url), "{scheme}");
        }
    }
}
