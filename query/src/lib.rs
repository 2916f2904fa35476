//! Marsad's query service: read-only SQL over the Delta tables with
//! DataFusion, behind API keys with roles (`analyst`, `adserver`,
//! `engineer`, `admin`).
//!
//! It owns reading, never writing: it must not change a table, and every call
//! but `/healthz`, `/readyz`, `/metrics` and the dashboard's static page and
//! assets at `/` needs a key with the right role.

#![deny(missing_docs)]

mod active_files;
mod answers;
pub mod audience;
mod audience_routes;
pub mod bounded_dialect;
pub mod catalog;
pub mod dashboard;
pub mod email;
mod erasures;
mod error;
pub mod flight;
pub mod live;
mod metrics;
pub mod pg;
mod pg_compat;
pub mod release;
pub mod reports;
mod routes;
pub mod sketches;
pub mod sql;

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::routing::get;
use marsad_config::Config;
use marsad_eventlog::EventLog;
use marsad_privacy::access::ApiKeys;
use marsad_privacy::keys::{DailyKeyStore, SecretKey, SubjectKeys};
use marsad_privacy::optout::OptOutRegistry;
use tokio_util::sync::CancellationToken;

pub use catalog::TableCatalog;
pub use error::ApiError;
pub use metrics::QueryMetrics;

/// Why the query service could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The listen address could not be bound.
    #[error("cannot listen: {0}")]
    Bind(std::io::Error),
    /// The server failed while running.
    #[error("query server: {0}")]
    Serve(marsad_net::NetError),
    /// The tables' location in the configuration is unusable.
    #[error("{0}")]
    Location(#[from] marsad_config::ConfigError),
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
    pub(crate) privacy: Arc<QueryPrivacy>,
    pub(crate) erasure_wait: Duration,
    pub(crate) erasures: Arc<erasures::ErasureReceipts>,
    pub(crate) audiences: Arc<audience::Audiences>,
    pub(crate) audience: Arc<marsad_config::AudienceConfig>,
    pub(crate) release: Arc<release::Release>,
    pub(crate) geoip_attribution: Arc<str>,
    /// Queries running at once, across HTTP and Postgres.
    pub(crate) query_slots: Arc<tokio::sync::Semaphore>,
    pub(crate) query_queue: Duration,
    pub(crate) limits: marsad_config::HttpLimits,
    pub(crate) audience_rate: u32,
    /// The processor's live window, when the processor runs in this process.
    pub(crate) live: Option<live::SharedLiveSource>,
}

/// What the query service needs of the privacy mechanisms: opt-outs to honour at serving
/// time, and for erasure the keys to find a subject's rows and the log to record its opt-out.
pub struct QueryPrivacy {
    /// The opt-outs in force, followed from the opt-out log.
    pub opt_outs: Arc<OptOutRegistry>,
    /// Hash identifiers into `audience_id`s and opt-out subjects.
    pub subject_keys: SubjectKeys,
    /// The daily visitor keys that still exist.
    pub daily_keys: Arc<dyn DailyKeyStore>,
    /// Where opt-outs are recorded.
    pub log: Arc<dyn EventLog>,
    /// Keys the noise of released numbers (the same in every query process).
    pub noise_key: Arc<SecretKey>,
}

impl QueryState {
    /// Builds the state: keys, the tables at their configured location, privacy mechanisms.
    pub fn new(config: &Config, keys: ApiKeys, privacy: QueryPrivacy) -> Result<Self, Error> {
        let tables = config.tables()?;
        Ok(QueryState {
            erasure_wait: Duration::from_millis(config.query.erasure_wait_ms),
            erasures: Arc::default(),
            keys: Arc::new(keys),
            catalog: Arc::new(
                TableCatalog::new(tables.clone())
                    .with_memory_limit((config.query.memory_limit_mb as usize).saturating_mul(1 << 20))
                    .with_refresh_interval(Duration::from_millis(config.query.table_refresh_ms)),
            ),
            max_rows: config.query.max_result_rows,
            timeout: Duration::from_secs(config.query.timeout_secs),
            metrics: Arc::new(QueryMetrics::new()),
            extra_metrics: Vec::new(),
            audiences: Arc::new(audience::Audiences::new(&tables)),
            audience: Arc::new(config.audience.clone()),
            release: Arc::new(release::Release::new(
                config,
                privacy.noise_key.clone(),
                Some(config.data_dir.join("release")),
            )),
            geoip_attribution: dashboard::geoip_attribution(&config.geoip.databases).into(),
            privacy: Arc::new(privacy),
            query_slots: Arc::new(tokio::sync::Semaphore::new(config.query.query_slots())),
            query_queue: Duration::from_millis(config.query.query_queue_ms),
            limits: config.query.limits.clone(),
            audience_rate: config.query.audience_rate_per_second,
            live: None,
        })
    }

    /// A slot to run one query in: waits up to `query.query_queue_ms` for one to free up,
    /// then refuses with 503, so a flood of queries queues briefly instead of exhausting memory.
    pub(crate) async fn query_slot(&self) -> Result<tokio::sync::OwnedSemaphorePermit, error::ApiError> {
        match tokio::time::timeout(self.query_queue, self.query_slots.clone().acquire_owned()).await {
            Ok(Ok(slot)) => Ok(slot),
            _ => {
                self.metrics.count("busy");
                Err(error::ApiError::Busy)
            }
        }
    }

    /// Runs one read-only statement as `access` allows, within the service's time limit and row
    /// cap, counting the outcome: how every SQL interface (HTTP, Postgres) runs a query.
    pub(crate) async fn run_sql(
        &self,
        ctx: &datafusion::prelude::SessionContext,
        statement: &str,
        params: Option<datafusion::common::ParamValues>,
        access: &sql::Access,
    ) -> Result<sql::QueryResult, error::ApiError> {
        let _slot = self.query_slot().await?;
        let run = sql::run_with_params(ctx, statement, params, self.max_rows, access, Some(&self.release));
        match tokio::time::timeout(self.timeout, run).await {
            Ok(Ok(r)) => {
                self.metrics.count("ok");
                Ok(r)
            }
            Ok(Err(e)) => {
                self.metrics.count(if matches!(e, error::ApiError::BadRequest(_)) {
                    "refused"
                } else {
                    "error"
                });
                Err(e)
            }
            Err(_) => {
                self.metrics.count("timeout");
                Err(error::ApiError::Timeout(self.timeout.as_secs()))
            }
        }
    }

    /// The audience index this service answers from.
    pub fn audiences(&self) -> Arc<audience::Audiences> {
        self.audiences.clone()
    }

    /// The noise key of released numbers (the same in every query process).
    pub fn noise_key(&self) -> Arc<SecretKey> {
        self.privacy.noise_key.clone()
    }

    /// Serves the live view from `source` (the processor's window in this process).
    pub fn with_live_source(mut self, source: live::SharedLiveSource) -> Self {
        self.live = Some(source);
        self
    }

    /// Adds another metrics source to `/metrics`.
    pub fn with_metrics_source(mut self, source: MetricsSource) -> Self {
        self.extra_metrics.push(source);
        self
    }
}

/// The per-address rates of the API: audience lookups (the ad system asks often) and the rest.
struct QueryRates {
    audience: Option<Arc<marsad_net::RateLimit>>,
    rest: Option<Arc<marsad_net::RateLimit>>,
}

/// The peer's address (the query service trusts no forwarding header).
fn peer_of(req: &axum::extract::Request) -> std::net::IpAddr {
    req.extensions()
        .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
        .map_or(std::net::IpAddr::from([0, 0, 0, 0]), |c| c.0.ip())
}

async fn enforce_rates(
    axum::extract::State(rates): axum::extract::State<Arc<QueryRates>>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let limit = if request.uri().path() == "/v1/audience" {
        &rates.audience
    } else {
        &rates.rest
    };
    match limit {
        Some(limit) => marsad_net::enforce_rate_limit(axum::extract::State(limit.clone()), request, next).await,
        None => next.run(request).await,
    }
}

/// The query routes, testable without a socket: rate-limited per address, with a deadline
/// per request.
pub fn app(state: QueryState) -> Router {
    let (router, _) = routes().split_for_parts();
    let api = Arc::new(openapi());
    let limits = state.limits.clone();
    let peer: marsad_net::limit::ClientOf = Arc::new(peer_of);
    let rates = Arc::new(QueryRates {
        audience: marsad_net::RateLimit::new(
            state.audience_rate,
            state.audience_rate.saturating_mul(2),
            "audience lookups",
            peer.clone(),
        ),
        rest: marsad_net::RateLimit::new(limits.rate_per_second, limits.rate_burst, "requests", peer),
    });
    let router = router
        .route(
            "/v1/openapi.json",
            get(move || {
                let api = api.clone();
                async move { axum::Json(api.as_ref().clone()) }
            }),
        )
        .route("/", get(dashboard::page))
        .route("/assets/dashboard.js", get(dashboard::script))
        .route("/assets/dashboard.css", get(dashboard::style))
        .route("/assets/chart.umd.min.js", get(dashboard::chart_js))
        .route("/assets/chart.js-LICENSE.md", get(dashboard::chart_js_license))
        .route("/assets/countries-50m.json", get(dashboard::country_shapes))
        .route("/assets/world-atlas-LICENSE", get(dashboard::country_shapes_license))
        .route("/assets/country-codes.json", get(dashboard::country_codes))
        .fallback(routes::not_found)
        .with_state(state)
        .layer(axum::middleware::from_fn_with_state(rates, enforce_rates));
    router.layer(axum::middleware::from_fn_with_state(
        Duration::from_millis(limits.request_timeout_ms),
        marsad_net::enforce_request_timeout,
    ))
}

/// The documented routes: each handler's `#[utoipa::path]` gives both its route and its OpenAPI entry.
fn routes() -> utoipa_axum::router::OpenApiRouter<QueryState> {
    use utoipa_axum::routes;
    utoipa_axum::router::OpenApiRouter::with_openapi(openapi_info())
        .routes(routes!(routes::post_sql))
        .routes(routes!(routes::list_tables))
        .routes(routes!(routes::report))
        .routes(routes!(routes::erase_subject))
        .routes(routes!(routes::erasure_status))
        .routes(routes!(routes::privacy_budget))
        .routes(routes!(live::live))
        .routes(routes!(audience_routes::audience))
        .routes(routes!(audience_routes::audience_by_body))
        .routes(routes!(routes::erase_subject_by_body))
        .routes(routes!(audience_routes::list_segments))
        .routes(routes!(audience_routes::overlap))
        .routes(routes!(audience_routes::segment_members))
        .routes(routes!(routes::healthz))
        .routes(routes!(routes::readyz))
        .routes(routes!(routes::metrics))
}

/// The OpenAPI document of the query service, as `/v1/openapi.json` serves it.
pub fn openapi() -> utoipa::openapi::OpenApi {
    let mut api = routes().split_for_parts().1;
    marsad_net::openapi::document_common_answers(&mut api);
    api
}

fn openapi_info() -> utoipa::openapi::OpenApi {
    use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
    let mut api = utoipa::openapi::OpenApiBuilder::new()
        .info(
            utoipa::openapi::InfoBuilder::new()
                .title("Marsad query")
                .version(env!("CARGO_PKG_VERSION"))
                .description(Some(
                    "SQL, reports, audiences and erasure; every call but /healthz, /readyz and /metrics needs \
                     `Authorization: Bearer KEY` with the right role",
                ))
                .build(),
        )
        .build();
    let components = api.components.get_or_insert_with(Default::default);
    components.add_security_scheme(
        "api_key",
        SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
    );
    api
}

/// How often the query service looks for a new `segment_members` version.
const AUDIENCE_RELOAD: Duration = Duration::from_secs(2);

/// Swaps in each new `segment_members` version as the processor refreshes the segments.
async fn follow_segment_members(audiences: Arc<audience::Audiences>, shutdown: CancellationToken) {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(AUDIENCE_RELOAD) => {}
        }
        if let Err(e) = audiences.reload().await {
            tracing::warn!(error = %e, "could not reload the audience index; serving the previous one");
        }
    }
}

/// Serves until `shutdown` is cancelled: over TLS when `tls` is given, with the configured
/// connection cap and header deadline.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: QueryState,
    tls: Option<Arc<marsad_net::TlsFiles>>,
    shutdown: CancellationToken,
) -> Result<(), Error> {
    let audiences = state.audiences();
    if let Err(e) = audiences.reload().await {
        tracing::warn!(error = %e, "no audience index yet; segments are served once it loads");
    }
    tokio::spawn(follow_segment_members(audiences, shutdown.clone()));
    let options = marsad_net::ServeOptions {
        tls,
        max_connections: state.limits.max_connections,
        header_timeout: Duration::from_millis(state.limits.header_timeout_ms),
        drain_timeout: Duration::from_secs(10),
    };
    marsad_net::serve(listener, app(state), options, shutdown)
        .await
        .map_err(Error::Serve)
}
