//! How a writer of a table on local disk learns the table's latest version before it commits:
//! by asking for the commits after the version it read by their names, not by listing the log.
//!
//! delta-rs asks its log store for the latest version before every commit (its conflict check
//! starts there). Its own answer lists `_delta_log` from the version read, and on local disk a
//! listing reads every name the directory holds: an hour of a commit a second is thousands.
//! That was one of the two listings of every commit, and the reason, with the other, that
//! commits of an aged table cost more than a young one's (BENCHMARKS.md, "Costs as a table ages").
//!
//! A commit is created once and never overwritten (put-if-absent, one version after another),
//! so the latest version is the last of `read + 1`, `read + 2`, … that exists. That is true
//! only while none of them can be removed by the log cleanup, which removes what is older than
//! the table's log retention (an hour on Marsad's tables, and never less than a minute by
//! Marsad's own cleanup). So the names are asked only when the commit read was written less
//! than [`FRESH_COMMIT`] ago: a writer that committed a moment ago, as the processor does
//! every second. For an older read, after [`MAX_PROBES`] commits found, or on any answer but
//! "there" and "not there", delta-rs's own listing answers. This crate must not use it for
//! stores other than the local disk, where the clock that stamps a file is not this one's.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use deltalake::DeltaResult;
use deltalake::kernel::Version;
use deltalake::kernel::transaction::TransactionError;
use deltalake::logstore::object_store::{Error as StoreError, ObjectStore, ObjectStoreExt};
use deltalake::logstore::{CommitOrBytes, LogStore, LogStoreConfig, LogStoreRef, commit_uri_from_version};

/// How recent the commit a writer read must be for the commits after it to be asked by name.
/// The log cleanup never removes an entry this young (its retention must be longer).
pub const FRESH_COMMIT: Duration = Duration::from_secs(10);

/// How many commits after the one read are asked for by name before a listing answers.
pub const MAX_PROBES: u64 = 64;

/// A table's log store on local disk: delta-rs's own in everything but how the latest version
/// is found (see the module's header). What the trait derives from the stores and the
/// configuration (the kernel's engine, URLs) it derives from the same ones.
#[derive(Debug)]
pub(crate) struct LatestByName {
    inner: LogStoreRef,
}

impl LatestByName {
    /// Wraps delta-rs's log store of a local table.
    pub(crate) fn new(inner: LogStoreRef) -> Self {
        Self { inner }
    }

    /// The latest version asked by name, or `None` when a listing must answer.
    async fn by_name(&self, read: Version) -> Option<Version> {
        let store = self.inner.object_store(None);
        let written = match store.head(&commit_uri_from_version(Some(read))).await {
            Ok(meta) => meta.last_modified,
            Err(_) => return None,
        };
        let age = chrono::Utc::now().signed_duration_since(written);
        // a stamp from the future (a clock set back) says nothing about what the cleanup sees
        if age < chrono::TimeDelta::zero() || age.to_std().ok()? >= FRESH_COMMIT {
            return None;
        }
        let mut latest = read;
        for _ in 0..MAX_PROBES {
            match store.head(&commit_uri_from_version(Some(latest + 1))).await {
                Ok(_) => latest += 1,
                Err(StoreError::NotFound { .. }) => return Some(latest),
                Err(_) => return None,
            }
        }
        None
    }
}

#[async_trait::async_trait]
impl LogStore for LatestByName {
    fn name(&self) -> String {
        self.inner.name()
    }

    async fn refresh(&self) -> DeltaResult<()> {
        self.inner.refresh().await
    }

    async fn read_commit_entry(&self, version: Version) -> DeltaResult<Option<Bytes>> {
        self.inner.read_commit_entry(version).await
    }

    async fn write_commit_entry(
        &self,
        version: Version,
        commit_or_bytes: CommitOrBytes,
        operation_id: uuid::Uuid,
    ) -> Result<(), TransactionError> {
        self.inner
            .write_commit_entry(version, commit_or_bytes, operation_id)
            .await
    }

    async fn abort_commit_entry(
        &self,
        version: Version,
        commit_or_bytes: CommitOrBytes,
        operation_id: uuid::Uuid,
    ) -> Result<(), TransactionError> {
        self.inner
            .abort_commit_entry(version, commit_or_bytes, operation_id)
            .await
    }

    async fn get_latest_version(&self, start_version: Version) -> DeltaResult<Version> {
        match self.by_name(start_version).await {
            Some(latest) => Ok(latest),
            None => self.inner.get_latest_version(start_version).await,
        }
    }

    fn object_store(&self, operation_id: Option<uuid::Uuid>) -> Arc<dyn ObjectStore> {
        self.inner.object_store(operation_id)
    }

    fn root_object_store(&self, operation_id: Option<uuid::Uuid>) -> Arc<dyn ObjectStore> {
        self.inner.root_object_store(operation_id)
    }

    fn config(&self) -> &LogStoreConfig {
        self.inner.config()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use marsad_config::TablesLocation;

    type TestResult = std::result::Result<(), Box<dyn std::error::Error>>;

    /// Commit entries `versions` of table `t`'s log, written now (their contents are not read).
    fn commits(dir: &std::path::Path, versions: std::ops::Range<u64>) -> std::io::Result<std::path::PathBuf> {
        let log = dir.join("t").join("_delta_log");
        std::fs::create_dir_all(&log)?;
        for version in versions {
            std::fs::write(log.join(format!("{version:020}.json")), b"{}")?;
        }
        Ok(log)
    }

    /// This module's log store of table `t`, and delta-rs's own, which lists the log.
    fn stores(dir: &std::path::Path) -> std::result::Result<(LogStoreRef, LogStoreRef), Box<dyn std::error::Error>> {
        let location = TablesLocation::local(dir)?;
        let ours = crate::build(&location, "t")?.log_store();
        let listing = crate::builder(&location, "t")?.build_storage()?;
        assert!(
            ours.any_ref().downcast_ref::<LatestByName>().is_some(),
            "a local table is written through LatestByName"
        );
        Ok((ours, listing))
    }

    async fn both(ours: &LogStoreRef, listing: &LogStoreRef, read: Version) -> (String, String) {
        (
            format!("{:?}", ours.get_latest_version(read).await),
            format!("{:?}", listing.get_latest_version(read).await),
        )
    }

    #[tokio::test]
    async fn the_latest_version_asked_by_name_is_the_listings() -> TestResult {
        let dir = tempfile::tempdir()?;
        commits(dir.path(), 0..40)?;
        let (ours, listing) = stores(dir.path())?;
        for read in 0..40 {
            assert_eq!(ours.get_latest_version(read).await?, 39, "read {read}");
            assert_eq!(listing.get_latest_version(read).await?, 39);
        }
        // another writer commits after this one read
        commits(dir.path(), 40..45)?;
        for read in [0, 39, 40, 44] {
            assert_eq!(ours.get_latest_version(read).await?, 44, "read {read}");
        }
        Ok(())
    }

    #[tokio::test]
    async fn more_commits_than_are_asked_by_name_are_listed() -> TestResult {
        let dir = tempfile::tempdir()?;
        commits(dir.path(), 0..(MAX_PROBES + 10))?;
        let (ours, listing) = stores(dir.path())?;
        assert_eq!(ours.get_latest_version(0).await?, MAX_PROBES + 9);
        let (a, b) = both(&ours, &listing, 0).await;
        assert_eq!(a, b);
        Ok(())
    }

    #[tokio::test]
    async fn a_read_commit_that_is_gone_is_the_listings_error() -> TestResult {
        let dir = tempfile::tempdir()?;
        let log = commits(dir.path(), 0..10)?;
        std::fs::remove_file(log.join(format!("{:020}.json", 4)))?;
        let (ours, listing) = stores(dir.path())?;
        let (a, b) = both(&ours, &listing, 4).await;
        assert!(a.starts_with("Err"), "{a}");
        assert_eq!(a, b);
        Ok(())
    }

    /// The cleanup removes old entries in no particular order: a writer that read an old commit
    /// may find it there and the next one gone, with later ones still there. Asked by name, the
    /// latest would be the one read, and the writer would create that next version again.
    #[tokio::test]
    async fn a_read_commit_older_than_fresh_is_never_answered_by_name() -> TestResult {
        let dir = tempfile::tempdir()?;
        let log = commits(dir.path(), 0..10)?;
        let an_hour_ago = std::time::SystemTime::now() - Duration::from_secs(3600);
        for version in 0..10 {
            std::fs::File::options()
                .write(true)
                .open(log.join(format!("{version:020}.json")))?
                .set_modified(an_hour_ago)?;
        }
        std::fs::remove_file(log.join(format!("{:020}.json", 3)))?;
        let (ours, listing) = stores(dir.path())?;
        let (a, b) = both(&ours, &listing, 2).await;
        assert_ne!(a, "Ok(2)", "asked by name over a removed commit");
        assert_eq!(a, b);
        // the same log written a moment ago is asked by name (which is why the cleanup keeps
        // every entry younger than FRESH_COMMIT)
        let fresh = tempfile::tempdir()?;
        let log = commits(fresh.path(), 0..10)?;
        std::fs::remove_file(log.join(format!("{:020}.json", 3)))?;
        let (ours, _) = stores(fresh.path())?;
        assert_eq!(ours.get_latest_version(2).await?, 2);
        Ok(())
    }
}
