//! Marsad's query service: read-only SQL over the Delta tables with
//! DataFusion, behind API keys with roles (`analyst`, `adserver`,
//! `engineer`, `admin`).
//!
//! It owns reading, never writing: it must not change a table, and every call
//! but `/healthz`, `/readyz` and `/metrics` needs a key with the right role.

#![deny(missing_docs)]

mod api;
pub mod catalog;
pub mod keys;
mod metrics;
mod routes;
pub mod sql;

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::routing::{get, post};
use marsad_config::Config;
use tokio_util::sync::CancellationToken;

pub use api::ApiError;
pub use catalog::TableCatalog;
pub use keys::{AdminKey, ApiKeys, ensure_admin_key};
pub use metrics::QueryMetrics;

/// Why the query service could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The listen address could not be bound.
    #[error("cannot listen: {0}")]
    Bind(std::io::Error),
    /// The server failed while running.
    #[error("query server: {0}")]
    Serve(std::io::Error),
    /// A key file could not be read or written.
    #[error("API key {path}: {source}")]
    KeyFile {
        /// The file.
        path: std::path::PathBuf,
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

/// Renders extra metrics (e.g. the processor's, when run in one process with `marsad up`).
pub type MetricsSource = Arc<dyn Fn() -> String + Send + Sync>;

/// Everything a query handler needs; cheap to clone.
#[derive(Clone)]
pub struct QueryState {
    pub(crate) keys: Arc<ApiKeys>,
    pub(crate) catalog: Arc<TableCatalog>,
    pub(crate) max_rows: usize,
    pub(crate) timeout: Duration,
    pub(crate) metrics: Arc<QueryMetrics>,
    pub(crate) extra_metrics: Vec<MetricsSource>,
}

impl QueryState {
    /// Builds the state: keys from config plus the admin key, tables under the data dir.
    pub fn new(config: &Config, keys: ApiKeys) -> Self {
        QueryState {
            keys: Arc::new(keys),
            catalog: Arc::new(TableCatalog::new(config.tables_dir())),
            max_rows: config.query.max_result_rows,
            timeout: Duration::from_secs(60),
            metrics: Arc::new(QueryMetrics::new()),
            extra_metrics: Vec::new(),
        }
    }

    /// Adds another metrics source to `/metrics`.
    pub fn with_metrics_source(mut self, source: MetricsSource) -> Self {
        self.extra_metrics.push(source);
        self
    }
}

/// The query routes, testable without a socket.
pub fn app(state: QueryState) -> Router {
    Router::new()
        .route("/v1/sql", post(routes::post_sql))
        .route("/v1/tables", get(routes::list_tables))
        .route("/healthz", get(routes::healthz))
        .route("/readyz", get(routes::readyz))
        .route("/metrics", get(routes::metrics))
        .fallback(routes::not_found)
        .with_state(state)
}

/// Serves until `shutdown` is cancelled.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: QueryState,
    shutdown: CancellationToken,
) -> Result<(), Error> {
    let addr = listener.local_addr().map_err(Error::Bind)?;
    tracing::info!(%addr, "query listening");
    axum::serve(listener, app(state))
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
        .map_err(Error::Serve)
}
