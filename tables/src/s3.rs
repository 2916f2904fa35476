//! Tables in an S3 bucket (or a store that speaks S3) through object_store's own S3 client.
//!
//! delta-rs's S3 support (`deltalake-aws`) builds the same client, but resolves credentials
//! through the AWS SDK: 40 more crates in every build of Marsad (BENCHMARKS.md, "Build"). Its
//! log store is delta-rs's default one, as here: a commit is a conditional put
//! (`If-None-Match: *`), so two writers never both commit one version.
//!
//! Credentials come from object_store's chain: the environment's keys (`AWS_ACCESS_KEY_ID`,
//! `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`), a web identity (`AWS_WEB_IDENTITY_TOKEN_FILE`
//! and `AWS_ROLE_ARN`, as on EKS), an EKS pod identity or ECS task role, then the instance's
//! role. `~/.aws` profiles and SSO logins are not read: a server is given keys or a role.
//! Settings are the location's `tables.storage` keys and the environment's `AWS_*`, the former
//! winning; a key that is neither an S3 setting nor one of delta-rs's is refused, so a misspelt
//! setting is an error, not a silently different store.

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

/// Makes `s3://` and `s3a://` table locations known to delta-rs, once per process.
pub(crate) fn register() {
    static REGISTERED: Once = Once::new();
    REGISTERED.call_once(|| {
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
    let mut builder = AmazonS3Builder::from_env();
    // the keys delta-rs did not take as its own (retries, limits, certificates)
    for (key, value) in &config.unknown_properties {
        let Ok(s3_key) = AmazonS3ConfigKey::from_str(&key.to_ascii_lowercase()) else {
            return Err(DeltaTableError::Generic(format!(
                "unknown object storage setting `{key}` for {url}: not an S3 setting \
                 (object_store's AmazonS3ConfigKey, e.g. aws_endpoint, aws_region, aws_allow_http)"
            )));
        };
        builder = builder.with_config(s3_key, value.clone());
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
    use std::collections::HashMap;

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
        assert_eq!(
            builder.get_config_value(&AmazonS3ConfigKey::ConditionalPut).as_deref(),
            Some("etag"),
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
