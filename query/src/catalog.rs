//! The tables a query can see: every Delta table at the tables' location (a
//! directory or object storage), each brought up to its latest version when a
//! query starts, so one query reads one consistent snapshot per table.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use datafusion::execution::disk_manager::{DiskManagerBuilder, DiskManagerMode};
use datafusion::execution::runtime_env::RuntimeEnvBuilder;
use datafusion::prelude::{SessionConfig, SessionContext};
use deltalake::{DeltaTable, DeltaTableBuilder, DeltaTableError};
use marsad_config::TablesLocation;
use marsad_schemas::TableName;
use tokio::sync::Mutex;

/// Why a table could not be made queryable.
#[derive(Debug, thiserror::Error)]
#[error("table {table}: {reason}")]
pub struct CatalogError {
    /// Which table.
    pub table: &'static str,
    /// What failed.
    pub reason: String,
}

/// Table `name` at `tables`, at its latest version, or `None` while it has no commit.
pub async fn open_table(tables: &TablesLocation, name: &str) -> Result<Option<DeltaTable>, DeltaTableError> {
    // probe a local directory first: loading an empty location makes the kernel log an error
    if let Some(dir) = tables.local_dir()
        && !dir.join(name).join("_delta_log").is_dir()
    {
        return Ok(None);
    }
    let mut table = DeltaTableBuilder::from_url(tables.table_url(name))?
        .with_storage_options(tables.storage_options())
        .build()?;
    if !table.verify_deltatable_existence().await? {
        return Ok(None);
    }
    table.load().await?;
    Ok(Some(table))
}

/// Registers `table` in `ctx` as `name`, with its object store (`s3://…`) made known to the session.
pub async fn register_table(ctx: &SessionContext, name: &str, table: &DeltaTable) -> Result<(), String> {
    table
        .update_datafusion_session(&ctx.state())
        .map_err(|e| e.to_string())?;
    let provider = table.table_provider().await.map_err(|e| e.to_string())?;
    ctx.deregister_table(name).map_err(|e| e.to_string())?;
    ctx.register_table(name, provider).map_err(|e| e.to_string())?;
    Ok(())
}

/// On object storage, how long a table found missing is taken as missing before it is
/// looked for again (a listing per query and table would be paid by every query).
const ABSENT_RECHECK: Duration = Duration::from_secs(5);

/// Cached Delta tables, refreshed per query.
pub struct TableCatalog {
    location: TablesLocation,
    known: Mutex<KnownTables>,
    memory_limit: Option<usize>,
}

/// The tables opened so far, and when each missing one was last looked for.
#[derive(Default)]
struct KnownTables {
    open: HashMap<&'static str, DeltaTable>,
    absent_since: HashMap<&'static str, Instant>,
}

/// Which tables a session sees: analysts see only the rollups.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
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

impl TableCatalog {
    /// Tables at `location`.
    pub fn new(location: TablesLocation) -> Self {
        TableCatalog {
            location,
            known: Mutex::new(KnownTables::default()),
            memory_limit: None,
        }
    }

    /// Caps the memory of each query's session; a query needing more fails instead of spilling to disk.
    pub fn with_memory_limit(mut self, bytes: usize) -> Self {
        self.memory_limit = Some(bytes);
        self
    }

    /// Where the tables live.
    pub fn location(&self) -> &TablesLocation {
        &self.location
    }

    /// Whether table `name` exists, opening it on first sight.
    async fn ensure_open(&self, known: &mut KnownTables, name: &'static str) -> Result<bool, DeltaTableError> {
        if known.open.contains_key(name) {
            return Ok(true);
        }
        let remote = self.location.local_dir().is_none();
        if remote
            && known
                .absent_since
                .get(name)
                .is_some_and(|since| since.elapsed() < ABSENT_RECHECK)
        {
            return Ok(false);
        }
        match open_table(&self.location, name).await? {
            Some(table) => {
                known.absent_since.remove(name);
                known.open.insert(name, table);
                Ok(true)
            }
            None => {
                known.absent_since.insert(name, Instant::now());
                Ok(false)
            }
        }
    }

    /// The names of the tables that exist now.
    pub async fn existing(&self) -> Vec<&'static str> {
        let mut known = self.known.lock().await;
        let mut out = Vec::new();
        for name in TableName::ALL.iter().map(|t| t.as_str()) {
            match self.ensure_open(&mut known, name).await {
                Ok(true) => out.push(name),
                Ok(false) => {}
                Err(e) => tracing::warn!(table = name, error = %e, "table not readable"),
            }
        }
        out
    }

    /// A DataFusion session with every existing table registered at its latest version.
    pub async fn session(&self) -> Result<SessionContext, CatalogError> {
        self.session_with(TableScope::All).await
    }

    /// A DataFusion session with the existing tables of `scope` registered at their latest versions.
    pub async fn session_with(&self, scope: TableScope) -> Result<SessionContext, CatalogError> {
        let ctx = self.empty_session()?;
        self.refresh(&ctx, scope).await?;
        Ok(ctx)
    }

    /// A DataFusion session with Marsad's functions and the memory cap, and no table yet.
    pub fn empty_session(&self) -> Result<SessionContext, CatalogError> {
        let config = SessionConfig::new()
            .with_information_schema(true)
            .with_default_catalog_and_schema("marsad", "public");
        let ctx = match self.memory_limit {
            None => SessionContext::new_with_config(config),
            Some(bytes) => {
                let runtime = RuntimeEnvBuilder::new()
                    .with_memory_limit(bytes, 1.0)
                    .with_disk_manager_builder(DiskManagerBuilder::default().with_mode(DiskManagerMode::Disabled))
                    .build_arc()
                    .map_err(|e| CatalogError {
                        table: "*",
                        reason: e.to_string(),
                    })?;
                SessionContext::new_with_config_rt(config, runtime)
            }
        };
        crate::sketches::register(&ctx);
        Ok(ctx)
    }

    /// Brings the tables of `scope` in `ctx` to their latest versions (and adds new ones), so a
    /// long-lived session (a Postgres connection) reads what a fresh one would.
    pub async fn refresh(&self, ctx: &SessionContext, scope: TableScope) -> Result<(), CatalogError> {
        let mut known = self.known.lock().await;
        for name in TableName::ALL.iter().map(|t| t.as_str()).filter(|t| scope.includes(t)) {
            let err = |reason: String| CatalogError { table: name, reason };
            let opened_before = known.open.contains_key(name);
            // a table not created yet is looked for again by a later query
            if !self
                .ensure_open(&mut known, name)
                .await
                .map_err(|e| err(e.to_string()))?
            {
                continue;
            }
            let Some(table) = known.open.get_mut(name) else {
                continue;
            };
            if opened_before {
                table.update_incremental(None).await.map_err(|e| err(e.to_string()))?;
            }
            if table.version().is_none() {
                continue;
            }
            register_table(ctx, name, table).await.map_err(err)?;
        }
        Ok(())
    }
}
