//! How a writer of a table on a local file system learns the table's latest version before it
//! commits: by asking for the commits after the version it read by their names, not by listing
//! the log.
//!
//! delta-rs asks its log store for the latest version before every commit (its conflict check
//! starts there). Its own answer lists `_delta_log` from the version read, and on local disk a
//! listing reads every name the directory holds: an hour of a commit a second is thousands.
//! That was one of the two listings of every commit, and the reason, with the other, that
//! commits of an aged table cost more than a young one's (BENCHMARKS.md, "Costs as a table ages").
//!
//! A commit is created once and never overwritten (put-if-absent, one version after another),
//! so the latest version is the last of `read + 1`, `read + 2`, … that exists. That is true
//! only while none of them can be removed by a log cleanup, which removes what is older than
//! the table's log retention. Marsad's own cleanup keeps every entry at least
//! [`CLEANUP_FLOOR`] (twice [`FRESH_COMMIT`]), whatever the retention, and delta-rs's cleanup
//! in every commit is off on Marsad's tables. So the names are asked only when the commit read
//! was written less than [`FRESH_COMMIT`] ago, measured again after the last name was asked: a
//! writer that committed a moment ago, as the processor does every second. For an older read,
//! after [`MAX_PROBES`] commits found, on any answer but "there" and "not there", and on any
//! file system not known to be local to this host, delta-rs's own listing answers.
//!
//! It must not be used where the clock that stamps a file is another host's or where a name
//! not found may be a cached answer (NFS, EFS, SMB, FUSE): [`on_local_file_system`] decides.
//! A table whose log another engine cleans with a retention under [`CLEANUP_FLOOR`], or with
//! delta-rs's cleanup in every commit turned back on and such a retention, breaks the rule.

use std::path::Path as FsPath;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use deltalake::DeltaResult;
use deltalake::kernel::Version;
use deltalake::kernel::transaction::TransactionError;
use deltalake::logstore::object_store::{Error as StoreError, ObjectStore, ObjectStoreExt};
use deltalake::logstore::{CommitOrBytes, LogStore, LogStoreConfig, LogStoreRef, commit_uri_from_version};

/// How recent the commit a writer read must be for the commits after it to be asked by name.
pub const FRESH_COMMIT: Duration = Duration::from_secs(10);

/// The youngest log entry Marsad's cleanup removes, whatever a table's retention: twice
/// [`FRESH_COMMIT`], so a writer slowed down between its names, or a clock stepped, stays clear.
pub const CLEANUP_FLOOR: Duration = Duration::from_secs(20);

// a writer slowed down between its first and its last name keeps a margin as long as the rule
const _: () = assert!(CLEANUP_FLOOR.as_secs() >= 2 * FRESH_COMMIT.as_secs());

/// How many commits after the one read are asked for by name before a listing answers.
const MAX_PROBES: u64 = 64;

/// File systems whose files are stamped by this host's clock and whose "not found" is never a
/// cached answer from elsewhere.
const LOCAL_FILE_SYSTEMS: &[&str] = &[
    "ext2", "ext3", "ext4", "xfs", "btrfs", "tmpfs", "zfs", "f2fs", "overlay",
];

/// Whether `dir` is on a file system of this host ([`LOCAL_FILE_SYSTEMS`]), by the mount that
/// holds it in `/proc/self/mountinfo`; `false` when that cannot be told.
pub(crate) fn on_local_file_system(dir: &FsPath) -> bool {
    // links and `..` resolved first: a mount point is compared with the real path
    let Ok(dir) = std::fs::canonicalize(dir) else {
        return false;
    };
    let Ok(mounts) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    file_system_of(&mounts, &dir).is_some_and(|fs| LOCAL_FILE_SYSTEMS.contains(&fs))
}

/// The file system type of the mount in `mountinfo` that holds `path` (the longest mount point
/// that is a prefix of it).
fn file_system_of<'m>(mountinfo: &'m str, path: &FsPath) -> Option<&'m str> {
    let mut best: Option<(usize, &str)> = None;
    for line in mountinfo.lines() {
        let fields: Vec<&str> = line.split(' ').collect();
        let (Some(mount_point), Some(separator)) = (fields.get(4), fields.iter().position(|f| *f == "-")) else {
            continue;
        };
        let Some(fs) = fields.get(separator + 1) else { continue };
        // mountinfo writes a space in a mount point as \040 (and tab, newline, backslash alike)
        let mount_point = mount_point
            .replace("\\040", " ")
            .replace("\\011", "\t")
            .replace("\\012", "\n")
            .replace("\\134", "\\");
        let depth = FsPath::new(&mount_point).components().count();
        if path.starts_with(&mount_point) && best.is_none_or(|(d, _)| depth >= d) {
            best = Some((depth, fs));
        }
    }
    best.map(|(_, fs)| fs)
}

/// A table's log store on a local file system: delta-rs's own in everything but how the latest
/// version is found (see the module's header). What the trait derives from the stores and the
/// configuration (the kernel's engine, URLs) it derives from the same ones; the name is the
/// inner store's, which delta-rs reads to choose how a commit is written.
#[derive(Debug)]
pub(crate) struct LatestByName {
    inner: LogStoreRef,
}

impl LatestByName {
    /// Wraps delta-rs's log store of a table on a local file system.
    pub(crate) fn new(inner: LogStoreRef) -> Self {
        Self { inner }
    }

    /// The latest version asked by name, or `None` when a listing must answer.
    async fn by_name(&self, read: Version) -> Option<Version> {
        let store = self.inner.object_store(None);
        let written = match store.head(&commit_uri_from_version(Some(read))).await {
            Ok(meta) => meta.last_modified,
            Err(StoreError::NotFound { .. }) => return None,
            Err(e) => {
                tracing::debug!(error = %e, read, "the commit read could not be looked at; listing the log");
                return None;
            }
        };
        // a stamp from the future (a clock set back) says nothing about what a cleanup sees
        let fresh = || {
            let age = chrono::Utc::now().signed_duration_since(written);
            age >= chrono::TimeDelta::zero() && age.to_std().is_ok_and(|age| age < FRESH_COMMIT)
        };
        if !fresh() {
            return None;
        }
        let mut latest = read;
        for _ in 0..MAX_PROBES {
            match store.head(&commit_uri_from_version(Some(latest + 1))).await {
                Ok(_) => latest += 1,
                // still fresh now that every name was asked: no cleanup could remove one meanwhile
                Err(StoreError::NotFound { .. }) => return fresh().then_some(latest),
                Err(e) => {
                    let version = latest + 1;
                    tracing::debug!(error = %e, version, "a commit could not be looked at; listing the log");
                    return None;
                }
            }
        }
        None
    }
}

/// Whether `table` still holds the latest version of its log, when that can be told without
/// listing the log: the table is written through [`LatestByName`] on this host, the commit it
/// holds is fresh, and no commit after it exists. `false` means only "a listing must tell".
/// For a reader that skips its refresh on `true`, the rule's worst case (a clock stepped, a
/// cleanup by another engine below [`CLEANUP_FLOOR`]) hides newer commits until the commit it
/// holds is [`FRESH_COMMIT`] old, when a listing answers again; no conflict check corrects a
/// reader, as one corrects a writer.
pub async fn holds_latest_version(table: &deltalake::DeltaTable) -> bool {
    let Some(read) = table.version() else {
        return false;
    };
    let log_store = table.log_store();
    let Some(by_name) = log_store.any_ref().downcast_ref::<LatestByName>() else {
        return false;
    };
    by_name.by_name(read).await == Some(read)
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

    /// A reader's refresh skips the listing only while nothing was committed after what it holds
    /// and what it holds is fresh; a handle through delta-rs's own log store always lists.
    #[tokio::test]
    async fn a_reader_holds_the_latest_version_only_while_nothing_came_after_it() -> TestResult {
        use deltalake::kernel::{DataType, StructField};
        let dir = tempfile::tempdir()?;
        let location = TablesLocation::local(dir.path())?;
        crate::build(&location, "t")?
            .create()
            .with_columns([StructField::new("n", DataType::LONG, true)])
            .await?;
        let reader = crate::open_table(&location, "t").await?.ok_or("t exists")?;
        assert_eq!(reader.version(), Some(0));
        let log = dir.path().join("t").join("_delta_log");
        let held = std::fs::File::options()
            .write(true)
            .open(log.join(format!("{:020}.json", 0)))?;
        // written now, whatever the time the set-up took on a loaded machine
        held.set_modified(std::time::SystemTime::now())?;
        assert!(holds_latest_version(&reader).await, "nothing committed after it");

        // another writer's commit (its content is not read)
        let next = log.join(format!("{:020}.json", 1));
        std::fs::write(&next, b"{}")?;
        assert!(!holds_latest_version(&reader).await, "version 1 exists");
        std::fs::remove_file(&next)?;
        assert!(holds_latest_version(&reader).await);

        // the commit held is older than the rule allows: a cleanup could have removed the next
        held.set_modified(std::time::SystemTime::now() - 2 * FRESH_COMMIT)?;
        assert!(
            !holds_latest_version(&reader).await,
            "an old commit held is listed after"
        );

        let listed = crate::builder(&location, "t")?.load().await?;
        assert_eq!(listed.version(), Some(0));
        assert!(!holds_latest_version(&listed).await, "delta-rs's own log store lists");
        Ok(())
    }

    #[test]
    fn the_file_system_is_the_longest_mount_holding_the_directory() {
        // optional fields before the lone `-`: none, one or two; `/srv/nfs` mounted twice
        // (the later mount is the one seen)
        let mountinfo = "\
22 1 252:0 / / rw,relatime - ext4 /dev/vda rw
31 22 0:27 / /data rw,relatime shared:2 - nfs4 server:/export rw,vers=4.2
32 31 0:28 / /data/scratch rw,relatime shared:3 master:1 - tmpfs tmpfs rw
33 22 0:29 / /mnt/my\\040disk rw,relatime shared:4 - xfs /dev/vdb rw
34 22 0:30 / /srv/fuse rw,relatime shared:5 - fuse.s3fs s3fs rw
35 22 0:31 / /srv/nfs rw,relatime - ext4 /dev/vdc rw
36 35 0:32 / /srv/nfs rw,relatime shared:6 - nfs server:/other rw
37 22 0:33 / /mnt/back\\134040slash rw,relatime - btrfs /dev/vdd rw";
        let of = |p: &str| file_system_of(mountinfo, FsPath::new(p));
        assert_eq!(of("/home/marsad/tables"), Some("ext4"));
        assert_eq!(of("/data/tables/events"), Some("nfs4"));
        assert_eq!(of("/data/scratch/tables"), Some("tmpfs"));
        assert_eq!(
            of("/data-local/tables"),
            Some("ext4"),
            "a mount point is a whole path component"
        );
        assert_eq!(of("/mnt/my disk/tables"), Some("xfs"));
        assert_eq!(of("/srv/fuse/tables"), Some("fuse.s3fs"));
        assert_eq!(of("/srv/nfs/tables"), Some("nfs"), "the mount on top is the one seen");
        assert_eq!(of("/mnt/back\\040slash/tables"), Some("btrfs"));
        assert_eq!(of("/mnt/back/tables"), Some("ext4"));
        for (dir, local) in [
            ("/home/t", true),
            ("/data/t", false),
            ("/data/scratch/t", true),
            ("/srv/fuse/t", false),
        ] {
            assert_eq!(
                of(dir).is_some_and(|fs| LOCAL_FILE_SYSTEMS.contains(&fs)),
                local,
                "{dir}"
            );
        }
        assert_eq!(file_system_of("", FsPath::new("/t")), None);
    }

    /// The cleanup removes old entries in no particular order: a writer that read an old commit
    /// may find it there and the next one gone, with later ones still there. Asked by name, the
    /// latest would be the one read, and the writer would create that next version again.
    #[tokio::test]
    async fn a_read_commit_older_than_fresh_is_never_answered_by_name() -> TestResult {
        let dir = tempfile::tempdir()?;
        let log = commits(dir.path(), 0..10)?;
        std::fs::remove_file(log.join(format!("{:020}.json", 3)))?;
        let (ours, listing) = stores(dir.path())?;
        // an hour old, and just past FRESH_COMMIT
        for age in [3600, FRESH_COMMIT.as_secs() + 2] {
            let written = std::time::SystemTime::now() - Duration::from_secs(age);
            for version in (0..10).filter(|v| *v != 3) {
                std::fs::File::options()
                    .write(true)
                    .open(log.join(format!("{version:020}.json")))?
                    .set_modified(written)?;
            }
            let (a, b) = both(&ours, &listing, 2).await;
            assert_ne!(a, "Ok(2)", "asked by name over a removed commit {age} s old");
            assert_eq!(a, b);
        }
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
