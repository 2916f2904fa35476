//! The local disk as the store a table at a local location is read and written through. It
//! is object_store's local file system in every operation but one: listing a directory from
//! an offset, which is how each commit, each refresh and each open finds the new entries of a
//! table's `_delta_log`.
//!
//! object_store 0.13 turns every entry's path into a URL and back (percent-encoding the whole
//! absolute path) before it compares it with the offset. An hour of one commit a second keeps
//! a few thousand entries in the log, and that cost was paid for each of them on every commit
//! (BENCHMARKS.md, "Costs as a table ages"). Here the directory's names are read and each is
//! compared with the offset as an object path; only a file after the offset, a link or a
//! directory is looked at further. The answer is object_store's own (the tests below compare
//! the two, property tests among them). The temporary files of a write in progress
//! (`name#1`) are left out, as object_store leaves them out. A directory that cannot be read,
//! or that holds any other name that is not plain ASCII letters, digits, `.`, `_` and `-` (a
//! Delta log holds none), is listed by object_store itself, as is every directory nested in it.

use std::fmt;
use std::ops::Range;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::{self, BoxStream, StreamExt, TryStreamExt};
use object_store::local::LocalFileSystem;
use object_store::path::Path;
use object_store::{
    CopyOptions, GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta, ObjectStore, PutMultipartOptions,
    PutOptions, PutPayload, PutResult, RenameOptions, Result,
};

/// The root store of tables on local disk: object_store's local file system, listing from an
/// offset by names (see the module's header).
#[derive(Debug, Clone)]
pub(crate) struct LocalTables {
    files: Arc<LocalFileSystem>,
}

impl LocalTables {
    /// The whole local file system (`/` is the root), as Delta expects of a root store.
    pub(crate) fn new() -> Self {
        Self {
            files: Arc::new(LocalFileSystem::new()),
        }
    }
}

impl fmt::Display for LocalTables {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "LocalTables({})", self.files)
    }
}

/// A listing's answer, as object_store streams it.
type Listing = BoxStream<'static, Result<ObjectMeta>>;

/// What a directory holds after the offset.
enum Listed {
    /// A file (or a link to one), as object_store's listing describes it.
    Object(ObjectMeta),
    /// A directory (or a link to one): listed, recursively, by object_store.
    Directory(Path),
}

/// What reading a directory by its names found.
enum Entries {
    /// The directory's entries after the offset.
    After(Vec<Listed>),
    /// A name that is not plain, or a directory that could not be read: object_store lists
    /// it (and says what is wrong with it).
    Delegate,
}

/// Whether `name` is the same as an object path segment and as a file name: no character
/// that object_store would encode, and no `#`.
fn is_plain(name: &str) -> bool {
    !name.is_empty()
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// Whether `name` is a temporary file of object_store's local writes (`name#digits`), which
/// its listing leaves out.
fn is_write_in_progress(name: &str) -> bool {
    name.split_once('#')
        .is_some_and(|(_, suffix)| !suffix.is_empty() && suffix.bytes().all(|b| b.is_ascii_digit()))
}

/// An entry of the directory that could not be looked at.
#[derive(Debug, thiserror::Error)]
#[error("{path}: {source}")]
struct UnreadableEntry {
    path: std::path::PathBuf,
    #[source]
    source: std::io::Error,
}

fn io_error(path: &std::path::Path, source: std::io::Error) -> object_store::Error {
    object_store::Error::Generic {
        store: "LocalTables",
        source: Box::new(UnreadableEntry {
            path: path.to_owned(),
            source,
        }),
    }
}

/// The same tag object_store's local file system gives an object (inode, modification time
/// in microseconds, size: its private `get_etag` in `local.rs`), so that a listing reads the
/// same from either; the tests compare the two listings' tags.
fn e_tag(metadata: &std::fs::Metadata) -> String {
    use std::os::unix::fs::MetadataExt as _;
    let mtime = metadata
        .modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .unwrap_or_default()
        .as_micros();
    format!("{:x}-{mtime:x}-{:x}", metadata.ino(), metadata.len())
}

fn object(location: Path, metadata: &std::fs::Metadata, path: &std::path::Path) -> Result<ObjectMeta> {
    let modified = metadata.modified().map_err(|e| io_error(path, e))?;
    Ok(ObjectMeta {
        location,
        last_modified: modified.into(),
        size: metadata.len(),
        e_tag: Some(e_tag(metadata)),
        version: None,
    })
}

/// The entries of `dir` (the prefix `prefix`) whose paths sort after `offset`, read by name.
fn entries_after(dir: &std::path::Path, prefix: &Path, offset: &Path) -> Result<Entries> {
    let read = match std::fs::read_dir(dir) {
        Ok(read) => read,
        // as object_store: listing a directory that is not there lists nothing
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Entries::After(Vec::new())),
        // a file, no permission, …: what object_store answers is the answer
        Err(_) => return Ok(Entries::Delegate),
    };
    let mut after = Vec::new();
    for entry in read {
        let entry = match entry {
            Ok(entry) => entry,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(io_error(dir, e)),
        };
        let kind = match entry.file_type() {
            Ok(kind) => kind,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(io_error(&entry.path(), e)),
        };
        let name = entry.file_name();
        let name = match name.to_str() {
            Some(name) if is_plain(name) => name,
            Some(name) if kind.is_file() && is_write_in_progress(name) => continue,
            _ => {
                tracing::debug!(directory = %dir.display(), entry = ?name, "a name that is not plain: the directory is listed by object_store");
                return Ok(Entries::Delegate);
            }
        };
        let location = prefix.clone().join(name);
        // a directory's entries can sort after the offset whatever its own name: listed whole
        if kind.is_dir() {
            after.push(Listed::Directory(location));
            continue;
        }
        if !kind.is_symlink() && location <= *offset {
            continue;
        }
        let path = entry.path();
        // a link is followed, and one that leads nowhere (or an entry gone since) is skipped
        let metadata = if kind.is_symlink() {
            std::fs::metadata(&path)
        } else {
            entry.metadata()
        };
        match metadata {
            Ok(m) if m.is_dir() => after.push(Listed::Directory(location)),
            Ok(m) if m.is_file() && location > *offset => after.push(Listed::Object(object(location, &m, &path)?)),
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_error(&path, e)),
        }
    }
    Ok(Entries::After(after))
}

#[async_trait]
#[deny(clippy::missing_trait_methods)]
impl ObjectStore for LocalTables {
    async fn put_opts(&self, location: &Path, payload: PutPayload, opts: PutOptions) -> Result<PutResult> {
        self.files.put_opts(location, payload, opts).await
    }

    async fn put_multipart_opts(&self, location: &Path, opts: PutMultipartOptions) -> Result<Box<dyn MultipartUpload>> {
        self.files.put_multipart_opts(location, opts).await
    }

    async fn get_opts(&self, location: &Path, options: GetOptions) -> Result<GetResult> {
        self.files.get_opts(location, options).await
    }

    async fn get_ranges(&self, location: &Path, ranges: &[Range<u64>]) -> Result<Vec<Bytes>> {
        self.files.get_ranges(location, ranges).await
    }

    fn delete_stream(&self, locations: BoxStream<'static, Result<Path>>) -> BoxStream<'static, Result<Path>> {
        self.files.delete_stream(locations)
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, Result<ObjectMeta>> {
        self.files.list(prefix)
    }

    fn list_with_offset(&self, prefix: Option<&Path>, offset: &Path) -> Listing {
        let Some(prefix) = prefix else {
            return self.files.list_with_offset(None, offset);
        };
        let dir = match self.files.path_to_filesystem(prefix) {
            Ok(dir) => dir,
            Err(_) => return self.files.list_with_offset(Some(prefix), offset),
        };
        let (files, prefix, offset) = (Arc::clone(&self.files), prefix.clone(), offset.clone());
        stream::once(async move {
            let entries: Entries = {
                let (prefix, offset) = (prefix.clone(), offset.clone());
                let read = move || entries_after(&dir, &prefix, &offset);
                if tokio::runtime::Handle::try_current().is_ok() {
                    tokio::task::spawn_blocking(read).await??
                } else {
                    read()?
                }
            };
            let listed = match entries {
                Entries::After(listed) => listed,
                Entries::Delegate => {
                    return Ok::<Listing, object_store::Error>(files.list_with_offset(Some(&prefix), &offset));
                }
            };
            let mut objects = Vec::with_capacity(listed.len());
            let mut nested = Vec::new();
            for entry in listed {
                match entry {
                    Listed::Object(meta) => objects.push(Ok(meta)),
                    Listed::Directory(dir) => nested.push(files.list_with_offset(Some(&dir), &offset)),
                }
            }
            Ok::<Listing, object_store::Error>(stream::iter(objects).chain(stream::iter(nested).flatten()).boxed())
        })
        .try_flatten()
        .boxed()
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> Result<ListResult> {
        self.files.list_with_delimiter(prefix).await
    }

    async fn copy_opts(&self, from: &Path, to: &Path, options: CopyOptions) -> Result<()> {
        self.files.copy_opts(from, to, options).await
    }

    async fn rename_opts(&self, from: &Path, to: &Path, options: RenameOptions) -> Result<()> {
        self.files.rename_opts(from, to, options).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    type TestResult = std::result::Result<(), Box<dyn std::error::Error>>;

    async fn sorted(listing: BoxStream<'static, Result<ObjectMeta>>) -> Result<Vec<ObjectMeta>> {
        let mut listed: Vec<ObjectMeta> = listing.try_collect().await?;
        listed.sort_by(|a, b| a.location.cmp(&b.location));
        Ok(listed)
    }

    fn store_path(dir: &std::path::Path) -> std::result::Result<Path, Box<dyn std::error::Error>> {
        Ok(Path::from_absolute_path(dir)?)
    }

    /// Both stores' listings of `log` from each offset, which must be the same.
    async fn same_listings(log: &std::path::Path, offsets: &[&str]) -> TestResult {
        let (ours, theirs) = (LocalTables::new(), LocalFileSystem::new());
        let prefix = store_path(log)?;
        for offset in offsets {
            let offset = prefix.clone().join(*offset);
            let fast = sorted(ours.list_with_offset(Some(&prefix), &offset)).await?;
            let walked = sorted(theirs.list_with_offset(Some(&prefix), &offset)).await?;
            assert_eq!(fast, walked, "listing {log:?} from {offset}");
        }
        Ok(())
    }

    fn a_log(dir: &std::path::Path) -> std::io::Result<std::path::PathBuf> {
        let log = dir.join("t").join("_delta_log");
        std::fs::create_dir_all(log.join("_staged_commits"))?;
        for version in 0..250u64 {
            std::fs::write(log.join(format!("{version:020}.json")), b"{}")?;
            if version % 100 == 0 {
                std::fs::write(log.join(format!("{version:020}.checkpoint.parquet")), b"PAR1")?;
            }
        }
        std::fs::write(log.join("_last_checkpoint"), b"{\"version\":200}")?;
        std::fs::write(log.join("00000000000000000249.crc"), b"{}")?;
        std::fs::write(
            log.join("_staged_commits").join("00000000000000000250.uuid.json"),
            b"{}",
        )?;
        std::os::unix::fs::symlink(
            log.join("00000000000000000001.json"),
            log.join("00000000000000000300.json"),
        )?;
        std::os::unix::fs::symlink(log.join("gone"), log.join("00000000000000000301.json"))?;
        // a write in progress, a directory that sorts before the offsets, a link to a directory
        std::fs::write(log.join("00000000000000000250.json#1"), b"{")?;
        std::fs::create_dir_all(log.join("00000000000000000005.d"))?;
        std::fs::write(log.join("00000000000000000005.d").join("x.json"), b"{}")?;
        std::os::unix::fs::symlink(log.join("_staged_commits"), log.join("zlinked"))?;
        Ok(log)
    }

    #[tokio::test]
    async fn a_delta_log_lists_the_same_from_every_offset() -> TestResult {
        let dir = tempfile::tempdir()?;
        let log = a_log(dir.path())?;
        same_listings(
            &log,
            &[
                "",
                "00000000000000000000.json",
                "00000000000000000199.json",
                "00000000000000000200.checkpoint.parquet",
                "00000000000000000248.json",
                "00000000000000000249.json",
                "00000000000000000299.json",
                "_last_checkpoint",
                "zzz",
            ],
        )
        .await?;
        // what a commit's refresh asks: the entries after the last checkpoint, the link to a
        // file listed and the link to nothing skipped, the nested directory's entry listed
        let ours = LocalTables::new();
        let prefix = store_path(&log)?;
        let after =
            sorted(ours.list_with_offset(Some(&prefix), &prefix.clone().join("00000000000000000200.json"))).await?;
        let names: Vec<&str> = after.iter().filter_map(|m| m.location.filename()).collect();
        // 201..=249, the .crc, the link to a file, _last_checkpoint; the staged commit twice
        // (in its directory and through the link to it)
        assert_eq!(names.len(), 49 + 1 + 1 + 1 + 2, "{names:?}");
        assert!(names.contains(&"00000000000000000300.json") && !names.contains(&"00000000000000000301.json"));
        assert!(names.contains(&"00000000000000000250.uuid.json"));
        assert!(!names.iter().any(|n| n.contains('#')), "{names:?}");
        Ok(())
    }

    /// The listing by name is what answers for a Delta log (not object_store's, which the
    /// comparisons above would also pass with): only directories are handed on.
    #[test]
    fn a_delta_log_is_read_by_name() -> TestResult {
        let dir = tempfile::tempdir()?;
        let log = a_log(dir.path())?;
        let prefix = store_path(&log)?;
        let Entries::After(listed) = entries_after(&log, &prefix, &prefix.clone().join("00000000000000000200.json"))?
        else {
            return Err("a Delta log was handed to object_store".into());
        };
        let objects = listed.iter().filter(|e| matches!(e, Listed::Object(_))).count();
        let directories: Vec<&str> = listed
            .iter()
            .filter_map(|e| match e {
                Listed::Directory(d) => d.filename(),
                Listed::Object(_) => None,
            })
            .collect();
        assert_eq!(objects, 49 + 1 + 1 + 1);
        assert_eq!(directories.len(), 3, "{directories:?}");
        // a name object_store would encode hands the directory on
        std::fs::write(log.join("a b.json"), b"{}")?;
        assert!(matches!(entries_after(&log, &prefix, &prefix)?, Entries::Delegate));
        // so does a prefix that is a file
        let file = log.join("00000000000000000001.json");
        let file_prefix = store_path(&file)?;
        assert!(matches!(
            entries_after(&file, &file_prefix, &file_prefix)?,
            Entries::Delegate
        ));
        Ok(())
    }

    #[tokio::test]
    async fn a_prefix_that_is_a_file_lists_as_before() -> TestResult {
        let dir = tempfile::tempdir()?;
        let log = a_log(dir.path())?;
        same_listings(&log.join("00000000000000000001.json"), &["", "zzz"]).await
    }

    #[tokio::test]
    async fn a_missing_directory_lists_nothing_as_before() -> TestResult {
        let dir = tempfile::tempdir()?;
        same_listings(
            &dir.path().join("no").join("_delta_log"),
            &["00000000000000000000.json"],
        )
        .await
    }

    #[test]
    fn without_a_runtime_the_listing_is_the_same() -> TestResult {
        let dir = tempfile::tempdir()?;
        let log = a_log(dir.path())?;
        let prefix = store_path(&log)?;
        let offset = prefix.clone().join("00000000000000000100.json");
        let fast = futures::executor::block_on(sorted(LocalTables::new().list_with_offset(Some(&prefix), &offset)))?;
        let walked =
            futures::executor::block_on(sorted(LocalFileSystem::new().list_with_offset(Some(&prefix), &offset)))?;
        assert_eq!(fast, walked);
        assert!(!fast.is_empty());
        Ok(())
    }

    #[tokio::test]
    async fn reads_and_writes_are_the_local_file_systems() -> TestResult {
        use object_store::ObjectStoreExt as _;
        let dir = tempfile::tempdir()?;
        let store = LocalTables::new();
        let at = store_path(dir.path())?.join("a").join("b.json");
        store.put(&at, PutPayload::from_static(b"{\"x\":1}")).await?;
        assert_eq!(store.get(&at).await?.bytes().await?.as_ref(), b"{\"x\":1}");
        let to = store_path(dir.path())?.join("a").join("c.json");
        store.rename(&at, &to).await?;
        assert!(store.head(&at).await.is_err() && store.head(&to).await?.size == 7);
        Ok(())
    }

    /// A log of `names` (and `nested` in a directory `sub`) lists the same from the offset
    /// `pick` chooses among the names, from none, and from the directory's own name.
    fn lists_as_object_store_does(names: &[String], nested: &[String], pick: usize) -> TestResult {
        let dir = tempfile::tempdir()?;
        let log = dir.path().join("_delta_log");
        std::fs::create_dir_all(log.join("sub"))?;
        for name in names.iter().filter(|n| !matches!(n.as_str(), "." | ".." | "sub")) {
            std::fs::write(log.join(name), name.as_bytes())?;
        }
        for name in nested {
            std::fs::write(log.join("sub").join(name), b"n")?;
        }
        let mut offsets: Vec<&str> = names.iter().map(String::as_str).collect();
        offsets.push("");
        let offset = offsets[pick % offsets.len()];
        let runtime = tokio::runtime::Builder::new_current_thread().build()?;
        runtime.block_on(same_listings(&log, &[offset, "sub", "sub0", "rub"]))
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]
        /// Plain names (what a Delta log holds) take the listing by name.
        #[test]
        fn plain_names_list_the_same(
            names in proptest::collection::vec("[a-z0-9._-]{1,24}", 1..40),
            nested in proptest::collection::vec("[0-9a-z]{1,6}", 0..4),
            pick in 0usize..64,
        ) {
            let checked = lists_as_object_store_does(&names, &nested, pick).map_err(|e| e.to_string());
            prop_assert!(checked.is_ok(), "{:?}", checked);
        }

        /// Names of any kind (encoded characters, `#`, spaces, Arabic) list the same too.
        #[test]
        fn any_names_list_the_same(
            names in proptest::collection::vec("[a-z0-9._#% \u{0627}-\u{064a}-]{1,12}", 1..24),
            nested in proptest::collection::vec("[0-9a-z]{1,6}", 0..4),
            pick in 0usize..32,
        ) {
            let checked = lists_as_object_store_does(&names, &nested, pick).map_err(|e| e.to_string());
            prop_assert!(checked.is_ok(), "{:?}", checked);
        }
    }
}
