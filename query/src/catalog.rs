//! The tables a query can see: every Delta table at the tables' location (a
//! directory or object storage), registered in each query's session at the
//! latest version the catalog knows.
//!
//! Each table has its own slot holding the snapshot served (and its DataFusion
//! provider, built once per version), checked against storage at most every
//! `query.table_refresh_ms`. A query reads the slots without a lock while they
//! are fresh; when one is stale, one query refreshes it (object-store I/O)
//! while the queries needing that table wait for that one refresh. No lock is
//! held across the I/O of more than one table. A table is never served from
//! an older check than a table derived from it (see `current_tables`), so no
//! query sees rollup rows whose events are not there yet.
//!
//! A session is built once per scope and set of table versions and shared by the queries
//! that read those versions (a DataFusion session takes longer to build, with its hundreds
//! of functions, than a small query takes to run); the SQL interfaces refuse every statement
//! that would change a session (DDL, `SET`, `PREPARE`), so sharing one changes no answer.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use datafusion::catalog::TableProvider;
use datafusion::execution::disk_manager::{DiskManagerBuilder, DiskManagerMode};
use datafusion::execution::memory_pool::{GreedyMemoryPool, MemoryPool, TrackConsumersPool};
use datafusion::execution::object_store::{DefaultObjectStoreRegistry, ObjectStoreRegistry};
use datafusion::execution::runtime_env::RuntimeEnvBuilder;
use datafusion::prelude::{SessionConfig, SessionContext};
use deltalake::DeltaTable;
use marsad_config::TablesLocation;
use marsad_schemas::TableName;

use crate::active_files::{ActiveFiles, FooterCache};
use crate::answers::SessionAnswers;

/// Why a table could not be made queryable.
#[derive(Debug, thiserror::Error)]
#[error("table {table}: {reason}")]
pub struct CatalogError {
    /// Which table.
    pub table: &'static str,
    /// What failed.
    pub reason: String,
}

/// On object storage, how long a table found missing is taken as missing before it is
/// looked for again (a listing per query and table would be paid by every query).
const ABSENT_RECHECK: Duration = Duration::from_secs(5);

/// At most this much of parsed Parquet footers is kept per table (a footer is tens of KiB):
/// enough for a few hundred files each. It is held outside the queries' memory pool
/// (`query.memory_limit_mb`): nine tables, at most 144 MiB, in practice the footers of the files
/// the tables hold.
const FOOTERS_KEPT_BYTES: usize = 16 << 20;

/// Which tables a session sees: analysts see only the rollups.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TableScope {
    /// Every table (engineers, batch jobs).
    All,
    /// The aggregate tables whose every row counts many visitors.
    Rollups,
}

impl TableScope {
    fn includes(self, table: &str) -> bool {
        match self {
            TableScope::All => true,
            TableScope::Rollups => TableName::ROLLUPS.iter().any(|t| t.as_str() == table),
        }
    }
}

/// One version of a table as queries read it.
struct Served {
    version: u64,
    provider: Arc<dyn TableProvider>,
    /// When the check that found this version began: it holds every commit made before.
    checked: Instant,
    /// When that check ended: it may hold commits made up to then.
    seen_until: Instant,
    /// The catalog's count of invalidations when that check began: what a check that began
    /// before an invalidation found is served to no query that asks after it.
    invalidations: u64,
}

/// What the refresher of a table keeps between refreshes.
#[derive(Default)]
struct Refresher {
    table: Option<DeltaTable>,
    absent_since: Option<Instant>,
}

/// One table's place in the catalog.
struct TableSlot {
    name: &'static str,
    /// What queries read now (`None`: not loaded yet, missing, or invalidated).
    served: RwLock<Option<Arc<Served>>>,
    /// Held by the one query refreshing this table.
    refresher: tokio::sync::Mutex<Refresher>,
    /// Its data files' footers, kept across its versions.
    footers: FooterCache,
}

/// The Delta tables at a location, refreshed per table at most every `refresh` interval.
pub struct TableCatalog {
    location: TablesLocation,
    slots: HashMap<&'static str, TableSlot>,
    /// One memory pool for every session: the cap holds for all queries together, not each.
    memory_pool: Option<Arc<dyn MemoryPool>>,
    refresh: Duration,
    /// One object-store registry for every session, so a table's store is registered once.
    stores: Arc<dyn ObjectStoreRegistry>,
    /// The last session built for each scope, with what its tables were built from.
    sessions: Mutex<HashMap<TableScope, SharedSession>>,
    /// How many times [`TableCatalog::invalidate`] was called.
    invalidations: AtomicU64,
}

/// A session over the tables of a scope, reused while none of them changes.
struct SharedSession {
    tables: Vec<Arc<Served>>,
    ctx: SessionContext,
}

impl SharedSession {
    /// Whether this session reads exactly `tables` (the same providers, in order).
    fn reads(&self, tables: &[Arc<Served>]) -> bool {
        self.tables.len() == tables.len()
            && self
                .tables
                .iter()
                .zip(tables)
                .all(|(a, b)| Arc::ptr_eq(&a.provider, &b.provider))
    }
}

impl TableCatalog {
    /// Tables at `location`, checked for new commits by every query (see
    /// [`with_refresh_interval`](Self::with_refresh_interval)).
    pub fn new(location: TablesLocation) -> Self {
        let slots = TableName::ALL
            .iter()
            .map(|t| {
                (
                    t.as_str(),
                    TableSlot {
                        name: t.as_str(),
                        served: RwLock::new(None),
                        refresher: tokio::sync::Mutex::new(Refresher::default()),
                        footers: FooterCache::new(FOOTERS_KEPT_BYTES),
                    },
                )
            })
            .collect();
        TableCatalog {
            location,
            slots,
            memory_pool: None,
            // a batch job or a test reads what was just written; the service sets its interval
            refresh: Duration::ZERO,
            stores: Arc::new(DefaultObjectStoreRegistry::new()),
            sessions: Mutex::new(HashMap::new()),
            invalidations: AtomicU64::new(0),
        }
    }

    /// Caps the memory of all queries together; a query needing more than is left fails
    /// instead of spilling to disk (and the process stays within the cap).
    pub fn with_memory_limit(mut self, bytes: usize) -> Self {
        let pool = GreedyMemoryPool::new(bytes);
        let tracked = TrackConsumersPool::new(
            pool,
            std::num::NonZeroUsize::new(3).unwrap_or(std::num::NonZeroUsize::MIN),
        );
        self.memory_pool = Some(Arc::new(tracked));
        self
    }

    /// Checks each table for new commits at most this often (zero: on every query).
    pub fn with_refresh_interval(mut self, every: Duration) -> Self {
        self.refresh = every;
        self
    }

    /// Where the tables live.
    pub fn location(&self) -> &TablesLocation {
        &self.location
    }

    /// Forgets what every table was: the next query of each reads it from storage again
    /// (after this process rewrote tables, e.g. an erasure).
    pub fn invalidate(&self) {
        // first: a refresh still running publishes what it found, but no later query is served it
        self.invalidations.fetch_add(1, Ordering::SeqCst);
        for slot in self.slots.values() {
            if let Ok(mut served) = slot.served.write() {
                *served = None;
            }
            // nothing of a rewritten file's statistics stays behind
            slot.footers.clear();
        }
        if let Ok(mut sessions) = self.sessions.lock() {
            sessions.clear();
        }
    }

    fn invalidations(&self) -> u64 {
        self.invalidations.load(Ordering::SeqCst)
    }

    /// The names of the tables that exist now.
    pub async fn existing(&self) -> Vec<&'static str> {
        let mut out = Vec::new();
        for name in TableName::ALL.iter().map(|t| t.as_str()) {
            match self.current(name, None).await {
                Ok(Some(_)) => out.push(name),
                Ok(None) => {}
                Err(e) => tracing::warn!(table = name, error = %e, "table not readable"),
            }
        }
        out
    }

    /// The shared DataFusion session with every existing table registered at its latest version.
    pub async fn session(&self) -> Result<SessionContext, CatalogError> {
        self.session_with(TableScope::All).await
    }

    /// A DataFusion session with the existing tables of `scope` registered at their latest
    /// versions: the one the previous query of `scope` used while no table changed since.
    pub async fn session_with(&self, scope: TableScope) -> Result<SessionContext, CatalogError> {
        let tables = self.current_tables(scope).await?;
        let served: Vec<Arc<Served>> = tables.iter().map(|(_, s)| s.clone()).collect();
        if let Ok(sessions) = self.sessions.lock()
            && let Some(shared) = sessions.get(&scope)
            && shared.reads(&served)
        {
            return Ok(shared.ctx.clone());
        }
        // its answers go with it: a new version of any table is a new session, with none
        let ctx = self.new_session(Some(Arc::default()))?;
        for (name, table) in &tables {
            ctx.register_table(*name, table.provider.clone())
                .map_err(|e| CatalogError {
                    table: name,
                    reason: e.to_string(),
                })?;
        }
        if let Ok(mut sessions) = self.sessions.lock() {
            sessions.insert(
                scope,
                SharedSession {
                    tables: served,
                    ctx: ctx.clone(),
                },
            );
        }
        Ok(ctx)
    }

    /// A DataFusion session with Marsad's functions and the memory cap, and no table yet.
    pub fn empty_session(&self) -> Result<SessionContext, CatalogError> {
        // its caller may register other tables in it later: it keeps no answers
        self.new_session(None)
    }

    fn new_session(&self, answers: Option<Arc<SessionAnswers>>) -> Result<SessionContext, CatalogError> {
        let mut config = SessionConfig::new()
            .with_information_schema(true)
            .with_default_catalog_and_schema("marsad", "public");
        if let Some(answers) = answers {
            config = config.with_extension(answers);
        }
        let mut runtime = RuntimeEnvBuilder::new().with_object_store_registry(self.stores.clone());
        if let Some(pool) = &self.memory_pool {
            runtime = runtime
                .with_memory_pool(pool.clone())
                .with_disk_manager_builder(DiskManagerBuilder::default().with_mode(DiskManagerMode::Disabled));
        }
        let runtime = runtime.build_arc().map_err(|e| CatalogError {
            table: "*",
            reason: e.to_string(),
        })?;
        let ctx = SessionContext::new_with_config_rt(config, runtime);
        crate::sketches::register(&ctx);
        Ok(ctx)
    }

    /// Registers the tables of `scope` in `ctx` at their latest known versions (and adds new
    /// ones), so a long-lived session (a Postgres connection) reads what a fresh one would.
    pub async fn refresh(&self, ctx: &SessionContext, scope: TableScope) -> Result<(), CatalogError> {
        // a table not created yet is not among them, and is looked for again by a later query
        for (name, served) in self.current_tables(scope).await? {
            let err = |reason: String| CatalogError { table: name, reason };
            ctx.deregister_table(name).map_err(|e| err(e.to_string()))?;
            ctx.register_table(name, served.provider.clone())
                .map_err(|e| err(e.to_string()))?;
        }
        Ok(())
    }

    /// The existing tables of `scope` as one query should read them: no table derived from
    /// another is newer than its source.
    ///
    /// The processor commits a batch's events before the rollups made from them, so the
    /// tables are read from the last written back to `events`, each from a check of storage
    /// that began after the checks of the ones read before it had ended. Were `events` served
    /// from an older check than `traffic_hourly`, a reader could see rollup rows whose events
    /// it cannot find (a check still running when the rollups were read counts as older).
    async fn current_tables(&self, scope: TableScope) -> Result<Vec<(&'static str, Arc<Served>)>, CatalogError> {
        let mut tables = Vec::new();
        let mut newest: Option<Instant> = None;
        for name in TableName::ALL
            .iter()
            .rev()
            .map(|t| t.as_str())
            .filter(|t| scope.includes(t))
        {
            if let Some(served) = self.current(name, newest).await? {
                newest = newest.max(Some(served.seen_until));
                tables.push((name, served));
            }
        }
        tables.reverse();
        Ok(tables)
    }

    /// Table `name` as queries should read it now: the served version while it is fresh
    /// (and checked no earlier than `since`), else after one refresh from storage (shared by
    /// every query that asks meanwhile).
    async fn current(&self, name: &'static str, since: Option<Instant>) -> Result<Option<Arc<Served>>, CatalogError> {
        let Some(slot) = self.slots.get(name) else {
            return Ok(None);
        };
        if let Some(served) = slot.fresh(self.refresh, since, self.invalidations()) {
            return Ok(Some(served));
        }
        let mut refresher = slot.refresher.lock().await;
        // another query may have refreshed it while this one waited
        if let Some(served) = slot.fresh(self.refresh, since, self.invalidations()) {
            return Ok(Some(served));
        }
        self.reload(slot, &mut refresher, since).await
    }

    async fn reload(
        &self,
        slot: &TableSlot,
        refresher: &mut Refresher,
        since: Option<Instant>,
    ) -> Result<Option<Arc<Served>>, CatalogError> {
        let name = slot.name;
        let err = |reason: String| CatalogError { table: name, reason };
        // what this check finds holds every commit made before it began (and an erasure's
        // commit precedes its invalidation)
        let invalidations = self.invalidations();
        let began = Instant::now();
        match refresher.table.as_mut() {
            // a local table whose last commit is fresh is asked for the next one by name: a
            // query then pays a lookup, not a listing of the log's hour of entries (a table
            // idle for longer pays the lookup of the commit it holds, then the listing)
            Some(table) if marsad_tables::holds_latest_version(table).await => {}
            Some(table) => table.update_incremental(None).await.map_err(|e| err(e.to_string()))?,
            None => {
                let remote = self.location.local_dir().is_none();
                if remote
                    && refresher
                        .absent_since
                        .is_some_and(|absent| absent.elapsed() < ABSENT_RECHECK && since.is_none_or(|t| absent >= t))
                {
                    return Ok(None);
                }
                match marsad_tables::open_table(&self.location, name)
                    .await
                    .map_err(|e| err(e.to_string()))?
                {
                    Some(table) => {
                        refresher.absent_since = None;
                        refresher.table = Some(table);
                    }
                    None => {
                        refresher.absent_since = Some(began);
                        return Ok(None);
                    }
                }
            }
        }
        let Some(table) = refresher.table.as_ref() else {
            return Ok(None);
        };
        let Some(version) = table.version() else {
            return Ok(None);
        };
        let previous = slot.served.read().ok().and_then(|s| s.clone());
        let provider = match previous {
            Some(p) if p.version == version => p.provider.clone(),
            _ => match ActiveFiles::of(table, name, self.stores.as_ref(), &slot.footers) {
                Ok(plain) => Arc::new(plain) as Arc<dyn TableProvider>,
                Err(why) => {
                    tracing::info!(table = name, reason = %why, "reading the table through delta-rs");
                    // the table's object store (s3://…) is made known to every session at once
                    let probe = self.empty_session()?;
                    table
                        .update_datafusion_session(&probe.state())
                        .map_err(|e| err(e.to_string()))?;
                    table.table_provider().await.map_err(|e| err(e.to_string()))?
                }
            },
        };
        let served = Arc::new(Served {
            version,
            provider,
            checked: began,
            seen_until: Instant::now(),
            invalidations,
        });
        if let Ok(mut slot_served) = slot.served.write() {
            *slot_served = Some(served.clone());
        }
        Ok(Some(served))
    }
}

impl TableSlot {
    /// The served version, if it was checked within `refresh`, no earlier than `since`, and
    /// after the catalog's last invalidation (`invalidations` of them so far).
    fn fresh(&self, refresh: Duration, since: Option<Instant>, invalidations: u64) -> Option<Arc<Served>> {
        let served = self.served.read().ok()?.clone()?;
        (served.checked.elapsed() < refresh
            && since.is_none_or(|t| served.checked >= t)
            && served.invalidations == invalidations)
            .then_some(served)
    }
}

#[cfg(test)]
mod tests {
    use arrow::array::{Int64Array, RecordBatch};
    use arrow::datatypes::{DataType, Field, Schema};
    use deltalake::DeltaTable;
    use deltalake::kernel::StructType;
    use deltalake::kernel::engine::arrow_conversion::TryIntoKernel;
    use deltalake::protocol::SaveMode;

    use super::*;

    fn rows(n: i64) -> RecordBatch {
        let schema = Arc::new(Schema::new(vec![Field::new("events", DataType::Int64, false)]));
        RecordBatch::try_new(schema, vec![Arc::new(Int64Array::from(vec![n]))]).expect("a batch")
    }

    async fn create(dir: &std::path::Path, name: &str) -> DeltaTable {
        let path = dir.join(name);
        std::fs::create_dir_all(&path).expect("a table dir");
        let url = url::Url::from_directory_path(&path).expect("a url");
        let kernel: StructType = rows(0).schema().as_ref().try_into_kernel().expect("a kernel schema");
        DeltaTable::try_from_url(url)
            .await
            .expect("a handle")
            .create()
            .with_columns(kernel.fields().cloned())
            .await
            .expect("created")
    }

    /// A `traffic_hourly` at `dir` of one row counting `events`.
    async fn traffic_of(dir: &std::path::Path, events: i64) -> DeltaTable {
        create(dir, "traffic_hourly")
            .await
            .write(vec![rows(events)])
            .with_save_mode(SaveMode::Append)
            .await
            .expect("rollup appended")
    }

    async fn total(ctx: &SessionContext, sql: &str) -> i64 {
        let batches = ctx.sql(sql).await.expect("plans").collect().await.expect("runs");
        let column = batches[0]
            .column(0)
            .as_any()
            .downcast_ref::<Int64Array>()
            .map(|a| a.value(0));
        column.unwrap_or(0)
    }

    /// An analyst's query refreshes `traffic_hourly` while `events`, read by an engineer's
    /// query a little earlier, is still fresh: the next engineer's query must not see rollup
    /// rows without the events they were made from (the processor commits events first).
    #[tokio::test]
    async fn a_rollup_is_never_served_newer_than_the_events_it_counts() {
        let dir = tempfile::tempdir().expect("a temp dir");
        let events = create(dir.path(), "events").await;
        let traffic = create(dir.path(), "traffic_hourly").await;
        let location = marsad_config::TablesLocation::local(dir.path()).expect("a location");
        let catalog = TableCatalog::new(location).with_refresh_interval(Duration::from_secs(4));

        // traffic_hourly checked at t0, events at t0 + 1.5 s
        catalog.session_with(TableScope::Rollups).await.expect("a session");
        tokio::time::sleep(Duration::from_millis(1500)).await;
        catalog.session_with(TableScope::All).await.expect("a session");
        // at t0 + 4.1 s traffic_hourly is stale and events (2.6 s old) is not
        tokio::time::sleep(Duration::from_millis(2600)).await;
        events
            .write(vec![rows(1)])
            .with_save_mode(SaveMode::Append)
            .await
            .expect("events appended");
        traffic
            .write(vec![rows(1)])
            .with_save_mode(SaveMode::Append)
            .await
            .expect("rollup appended");
        let analyst = catalog.session_with(TableScope::Rollups).await.expect("a session");
        assert_eq!(total(&analyst, "SELECT sum(events) FROM traffic_hourly").await, 1);

        let engineer = catalog.session_with(TableScope::All).await.expect("a session");
        let counted = total(&engineer, "SELECT sum(events) FROM traffic_hourly").await;
        let stored = total(&engineer, "SELECT count(*) FROM events").await;
        assert_eq!(
            (counted, stored),
            (1, 1),
            "rollups counted events the session cannot see"
        );
    }

    /// Hides (or brings back) a table's data files without a commit: a query that reads them
    /// fails while they are hidden, an answer kept from before does not.
    fn hide_data_files(table_dir: &std::path::Path, hide: bool) {
        let (from, to) = if hide {
            ("parquet", "hidden")
        } else {
            ("hidden", "parquet")
        };
        for entry in std::fs::read_dir(table_dir).expect("the table dir") {
            let path = entry.expect("an entry").path();
            if path.extension().is_some_and(|e| e == from) {
                std::fs::rename(&path, path.with_extension(to)).expect("renamed");
            }
        }
    }

    async fn answer(ctx: &SessionContext) -> Result<i64, crate::error::ApiError> {
        let batches = crate::answers::collect(ctx, "SELECT sum(events) FROM traffic_hourly", true).await?;
        let sum = batches[0]
            .column(0)
            .as_any()
            .downcast_ref::<Int64Array>()
            .map(|a| a.value(0));
        Ok(sum.expect("a sum"))
    }

    /// An erasure's invalidation holds against a refresh that began before it and ends after
    /// it: what that refresh found goes to the query that asked for it, and to no query that
    /// asks after the invalidation, however recent its check.
    #[tokio::test]
    async fn a_refresh_that_began_before_an_invalidation_is_not_served_to_a_later_query() {
        let dir = tempfile::tempdir().expect("a temp dir");
        let traffic = traffic_of(dir.path(), 5).await;
        let location = marsad_config::TablesLocation::local(dir.path()).expect("a location");
        let catalog = TableCatalog::new(location).with_refresh_interval(Duration::from_secs(600));
        let sum = "SELECT sum(events) FROM traffic_hourly";
        assert_eq!(total(&catalog.session().await.expect("a session"), sum).await, 5);
        let slot = catalog.slots.get("traffic_hourly").expect("a slot");
        let found_before = slot.served.read().expect("a lock").clone();
        assert!(found_before.is_some());

        // the erasure's rewrite commits, then invalidates; a refresh that had begun before the
        // commit publishes what it found only now
        traffic
            .write(vec![rows(2)])
            .with_save_mode(SaveMode::Append)
            .await
            .expect("rollup appended");
        catalog.invalidate();
        *slot.served.write().expect("a lock") = found_before;

        assert_eq!(
            total(&catalog.session().await.expect("a session"), sum).await,
            7,
            "the version found before the invalidation was served after it"
        );
    }

    /// A report asked again of the same table versions is answered without reading a file,
    /// and never across versions: not after a commit, not after an erasure's invalidation,
    /// and never in a session its caller re-registers tables in (a Postgres connection).
    #[tokio::test]
    async fn a_kept_answer_never_outlives_the_versions_it_was_computed_from() {
        let dir = tempfile::tempdir().expect("a temp dir");
        let table_dir = dir.path().join("traffic_hourly");
        let traffic = traffic_of(dir.path(), 5).await;
        let location = marsad_config::TablesLocation::local(dir.path()).expect("a location");
        let catalog = TableCatalog::new(location);
        let shared = || async { catalog.session_with(TableScope::Rollups).await.expect("a session") };

        assert_eq!(answer(&shared().await).await.expect("an answer"), 5);
        hide_data_files(&table_dir, true);
        assert_eq!(
            answer(&shared().await).await.expect("the kept answer"),
            5,
            "asked again of the same version: no file read"
        );
        let recomputed =
            crate::answers::collect(&shared().await, "SELECT sum(events) FROM traffic_hourly", false).await;
        assert!(recomputed.is_err(), "asked to compute it again, it read the tables");
        hide_data_files(&table_dir, false);

        // a commit: the next question is computed over the new version
        traffic
            .write(vec![rows(2)])
            .with_save_mode(SaveMode::Append)
            .await
            .expect("rollup appended");
        assert_eq!(answer(&shared().await).await.expect("an answer"), 7);
        let footers = |catalog: &TableCatalog| catalog.slots.get("traffic_hourly").map(|s| s.footers.len());
        assert_eq!(footers(&catalog), Some(2), "both files' footers are kept");

        // an erasure rewrote tables and invalidated the catalog: nothing kept is served
        catalog.invalidate();
        assert_eq!(footers(&catalog), Some(0), "nor any footer");
        hide_data_files(&table_dir, true);
        assert!(
            answer(&shared().await).await.is_err(),
            "after an invalidation the answer was not computed again"
        );
        hide_data_files(&table_dir, false);

        // a session its caller refreshes in place keeps no answers
        let connection = catalog.empty_session().expect("a session");
        catalog
            .refresh(&connection, TableScope::Rollups)
            .await
            .expect("refreshed");
        assert_eq!(answer(&connection).await.expect("an answer"), 7);
        hide_data_files(&table_dir, true);
        assert!(
            answer(&connection).await.is_err(),
            "a refreshed session answered from memory"
        );
        hide_data_files(&table_dir, false);
    }
}
