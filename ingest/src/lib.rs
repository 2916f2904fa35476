//! Marsad's collection endpoint: takes page views, ad impressions and clicks
//! over HTTP, validates them, adds what only the server knows (receive time,
//! client IP behind trusted proxies, headers) and answers 2xx only once the
//! event log holds them durably.
//!
//! It must not anonymize or aggregate (the processor does), and never
//! acknowledges an event the log has not made durable: when the log cannot
//! take more it answers 503 with `Retry-After`.
//!
//! ```no_run
//! # use std::sync::Arc;
//! # async fn demo(config: marsad_config::Config, log: Arc<dyn marsad_eventlog::EventLog>) -> Result<(), marsad_ingest::Error> {
//! let privacy = marsad_ingest::IngestPrivacy {
//!     keys: Arc::default(),
//!     opt_outs: Arc::default(),
//!     subject_keys: marsad_privacy::keys::SubjectKeys::from_seed(1),
//!     identity_key: None,
//! };
//! let shutdown = tokio_util::sync::CancellationToken::new();
//! let listener = tokio::net::TcpListener::bind(config.ingest.addr).await.map_err(marsad_ingest::Error::Bind)?;
//! marsad_ingest::serve(listener, marsad_ingest::IngestState::new(&config, log, privacy), None, shutdown).await
//! # }
//! ```

#![deny(missing_docs)]

mod body;
pub mod decode;
mod error;
mod handlers;
mod metrics;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::routing::get;
use marsad_config::{Config, HttpLimits, TlsMode};
use marsad_eventlog::EventLog;
use marsad_net::RateLimit;
use marsad_privacy::access::ApiKeys;
use marsad_privacy::client_ip::TrustedProxies;
use marsad_privacy::keys::{SecretKey, SubjectKeys};
use marsad_privacy::optout::OptOutRegistry;
use tokio_util::sync::CancellationToken;

pub use error::ApiError;
pub use metrics::IngestMetrics;

/// Why the ingest service stopped.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The listen address could not be bound.
    #[error("cannot listen: {0}")]
    Bind(std::io::Error),
    /// The server failed while running.
    #[error("ingest server: {0}")]
    Serve(marsad_net::NetError),
}

/// Everything a request handler needs; cheap to clone.
#[derive(Clone)]
pub struct IngestState {
    pub(crate) log: Arc<dyn EventLog>,
    pub(crate) proxies: Arc<TrustedProxies>,
    pub(crate) body_limit: usize,
    pub(crate) max_batch_events: usize,
    pub(crate) retry_after: Duration,
    pub(crate) default_analytics: bool,
    pub(crate) default_personalisation: bool,
    pub(crate) metrics: Arc<IngestMetrics>,
    pub(crate) keys: Arc<ApiKeys>,
    pub(crate) opt_outs: Arc<OptOutRegistry>,
    pub(crate) subject_keys: SubjectKeys,
    pub(crate) identity_key: Option<Arc<SecretKey>>,
    pub(crate) tls_mode: TlsMode,
    pub(crate) opt_out_limit: Arc<RateLimit>,
    limits: HttpLimits,
}

/// What ingest needs of the privacy mechanisms besides configuration.
pub struct IngestPrivacy {
    /// Keys allowed to record opt-outs by user id (admin role).
    pub keys: Arc<ApiKeys>,
    /// The opt-outs in force, followed from the opt-out log.
    pub opt_outs: Arc<OptOutRegistry>,
    /// Hash identifiers for opt-out records and checks (never a daily key: ingest faces the
    /// internet and hashes no visitor).
    pub subject_keys: SubjectKeys,
    /// Checks the identity tokens the site's backend signs; without it every `user_id` is anonymous.
    pub identity_key: Option<Arc<SecretKey>>,
}

impl IngestState {
    /// Builds the state from configuration, the log to append to, and the privacy mechanisms.
    pub fn new(config: &Config, log: Arc<dyn EventLog>, privacy: IngestPrivacy) -> Self {
        let proxies = Arc::new(TrustedProxies::new(config.ingest.trusted_proxies.clone()));
        // validated positive; an unvalidated 0 still limits rather than panics
        let opt_out_limit = RateLimit::per_minute(
            config.ingest.opt_out_rate_per_minute.max(1),
            "opt-outs",
            client_of(proxies.clone()),
        );
        IngestState {
            identity_key: privacy.identity_key,
            tls_mode: config.ingest.tls,
            opt_out_limit,
            limits: config.ingest.limits.clone(),
            keys: privacy.keys,
            opt_outs: privacy.opt_outs,
            subject_keys: privacy.subject_keys,
            log,
            proxies,
            body_limit: config.ingest.body_limit_bytes,
            max_batch_events: config.ingest.max_batch_events,
            retry_after: Duration::from_secs(config.ingest.retry_after_secs),
            default_analytics: config.ingest.default_analytics_consent,
            default_personalisation: config.privacy.default_personalisation_consent,
            metrics: Arc::new(IngestMetrics::new()),
        }
    }
}

/// Who a request is from: the peer, or the visitor behind trusted proxies.
fn client_of(proxies: Arc<TrustedProxies>) -> marsad_net::limit::ClientOf {
    Arc::new(move |req: &axum::extract::Request| {
        let peer = req
            .extensions()
            .get::<axum::extract::ConnectInfo<SocketAddr>>()
            .map_or(std::net::IpAddr::from([0, 0, 0, 0]), |c| c.0.ip());
        client_ip(&proxies, peer, req.headers())
    })
}

/// The visitor's address: the peer, or the client behind trusted proxies' `X-Forwarded-For`.
pub(crate) fn client_ip(
    proxies: &TrustedProxies,
    peer: std::net::IpAddr,
    headers: &axum::http::HeaderMap,
) -> std::net::IpAddr {
    let forwarded = headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok());
    proxies.client_ip(peer, forwarded)
}

/// The ingest routes, testable without a socket: rate-limited per client and with a
/// deadline per request.
pub fn app(state: IngestState) -> Router {
    let (router, _) = routes().split_for_parts();
    let api = std::sync::Arc::new(openapi());
    let limits = state.limits.clone();
    let rate = RateLimit::new(
        limits.rate_per_second,
        limits.rate_burst,
        "requests",
        client_of(state.proxies.clone()),
    );
    let router = router
        .route(
            "/v1/openapi.json",
            get(move || {
                let api = api.clone();
                async move { axum::Json(api.as_ref().clone()) }
            }),
        )
        .fallback(handlers::not_found)
        .with_state(state);
    let router = match rate {
        Some(rate) => router.layer(axum::middleware::from_fn_with_state(
            rate,
            marsad_net::enforce_rate_limit,
        )),
        None => router,
    };
    router.layer(axum::middleware::from_fn_with_state(
        Duration::from_millis(limits.request_timeout_ms),
        marsad_net::enforce_request_timeout,
    ))
}

/// The documented routes: each handler's `#[utoipa::path]` gives both its route and its OpenAPI entry.
fn routes() -> utoipa_axum::router::OpenApiRouter<IngestState> {
    use utoipa_axum::routes;
    utoipa_axum::router::OpenApiRouter::with_openapi(openapi_info())
        .routes(routes!(handlers::post_event))
        .routes(routes!(handlers::post_batch))
        .routes(routes!(handlers::pixel))
        .routes(routes!(handlers::post_opt_out))
        .routes(routes!(handlers::tracker))
        .routes(routes!(handlers::demo))
        .routes(routes!(handlers::healthz))
        .routes(routes!(handlers::readyz))
        .routes(routes!(handlers::metrics))
}

/// The OpenAPI document of the ingest service, as `/v1/openapi.json` serves it.
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
                .title("Marsad ingest")
                .version(env!("CARGO_PKG_VERSION"))
                .description(Some(
                    "Collects page views, ad impressions and clicks; answers 202 once durable.",
                ))
                .build(),
        )
        .build();
    // only recording an opt-out by user id takes a key (admin)
    let components = api.components.get_or_insert_with(Default::default);
    components.add_security_scheme(
        "api_key",
        SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
    );
    api
}

/// Serves until `shutdown` is cancelled, finishing requests in flight: over TLS when `tls`
/// is given, with the configured connection cap and header deadline.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: IngestState,
    tls: Option<Arc<marsad_net::TlsFiles>>,
    shutdown: CancellationToken,
) -> Result<(), Error> {
    let options = marsad_net::ServeOptions {
        tls,
        max_connections: state.limits.max_connections,
        header_timeout: Duration::from_millis(state.limits.header_timeout_ms),
        drain_timeout: Duration::from_millis(state.limits.request_timeout_ms),
    };
    marsad_net::serve(listener, app(state), options, shutdown)
        .await
        .map_err(Error::Serve)
}
