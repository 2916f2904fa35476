//! The query routes.

use std::collections::HashMap;
use std::time::Duration;

use axum::Json;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use marsad_config::Role;
use serde::Deserialize;
use serde_json::json;

use chrono::Utc;
use marsad_privacy::pseudonym::Subject;

use crate::QueryState;
use crate::catalog::TableScope;
use crate::error::ApiError;
use crate::release::Mechanism;
use crate::sql::{self, Access, Format};

/// The body of `POST /v1/sql`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SqlRequest {
    /// One read-only statement.
    pub sql: String,
}

/// `POST /v1/sql`: read-only SQL; engineers read every table, analysts aggregate the rollups under the k rule.
#[utoipa::path(post, path = "/v1/sql", tag = "sql", security(("api_key" = ["engineer", "analyst"])),
    params(("format" = Option<String>, Query, description = "json (default), ndjson or csv")),
    request_body(content = serde_json::Value, description = "{\"sql\": \"SELECT …\"}"),
    responses((status = 200, description = "Rows"), (status = 400, description = "Bad or non-read-only SQL"),
        (status = 401, description = "No or wrong key"), (status = 403, description = "Neither an engineer nor an analyst key"),
        (status = 408, description = "Timed out")))]
pub async fn post_sql(
    State(state): State<QueryState>,
    headers: HeaderMap,
    Query(params): Query<HashMap<String, String>>,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let (holder, access) = sql_access(&state, authorization(&headers))?;
    let format = Format::parse(params.get("format").map(String::as_str))?;
    let req: SqlRequest =
        serde_json::from_slice(&body).map_err(|e| ApiError::BadRequest(format!("expected {{\"sql\": \"…\"}}: {e}")))?;
    tracing::info!(key = %holder, ?access, "sql query");
    let scope = match access {
        Access::Everything => TableScope::All,
        Access::Released { .. } => TableScope::Rollups,
    };
    let ctx = state.catalog.session_with(scope).await.map_err(|e| {
        tracing::error!(error = %e, "could not open the tables");
        ApiError::Internal
    })?;
    let result = state.run_sql(&ctx, &req.sql, None, &access).await?;
    let bytes = sql::render(&result, format)?;
    Ok((
        [
            (header::CONTENT_TYPE, format.content_type().to_string()),
            (
                header::HeaderName::from_static("x-marsad-truncated"),
                result.truncated.to_string(),
            ),
        ],
        bytes,
    )
        .into_response())
}

/// What a key may do with SQL: engineers everything, analysts released aggregates of the rollups.
pub(crate) fn sql_access(state: &QueryState, authorization: Option<&str>) -> Result<(String, Access), ApiError> {
    match state.keys.authorize(authorization, Role::Engineer) {
        Ok(holder) => Ok((holder.name.clone(), Access::Everything)),
        Err(marsad_privacy::access::AccessError::Forbidden { .. }) => {
            let holder = state
                .keys
                .authorize(authorization, Role::Analyst)
                .map_err(|e| match e {
                    marsad_privacy::access::AccessError::Forbidden { key, .. } => {
                        ApiError::Access(marsad_privacy::access::AccessError::Forbidden {
                            key,
                            role: "engineer or analyst",
                        })
                    }
                    other => ApiError::Access(other),
                })?;
            Ok((
                holder.name.clone(),
                Access::Released {
                    key: holder.name.clone(),
                    mechanism: state.release.for_analysts(),
                },
            ))
        }
        Err(e) => Err(e.into()),
    }
}

/// `GET /v1/reports/{kind}` (analyst, or an advertiser for its campaigns): a report from the
/// rollups, every number released with noise (or exact above the threshold, for analysts when
/// configured so).
#[utoipa::path(get, path = "/v1/reports/{kind}", tag = "reports", security(("api_key" = ["analyst", "advertiser"])),
    params(("kind" = String, Path, description = "traffic, geo, devices, categories, campaigns, demographics, sources, pages, goals or funnels"),
        ("from" = Option<String>, Query, description = "first date, inclusive (default: 29 days before `to`)"),
        ("to" = Option<String>, Query, description = "last date, inclusive (default: today)"),
        ("granularity" = Option<String>, Query, description = "hour, day (default), week or month"),
        ("by" = Option<String>, Query, description = "campaigns: a breakdown of each campaign by day, country or device_type; sources: rows by channel (default), referrer_domain, utm_source, utm_medium or utm_campaign; pages: by page_path (default) or page_category"),
        ("compare" = Option<String>, Query, description = "previous_period or previous_year: the compared period's rows and total, and the change of every measure"),
        ("order" = Option<String>, Query, description = "a measure of the report (or visitors): rows largest first"),
        ("limit" = Option<u32>, Query, description = "at most this many rows (1 to 1000)")),
    responses((status = 200, description = "Released rows and total, each number with its 95% interval"),
        (status = 400, description = "Bad parameter"), (status = 403, description = "Not this key's report or campaign"),
        (status = 404, description = "No such report"), (status = 429, description = "The key's privacy budget for today is spent")))]
pub async fn report(
    State(state): State<QueryState>,
    headers: HeaderMap,
    axum::extract::Path(kind): axum::extract::Path<String>,
    Query(params): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    let reader = report_reader(&state, authorization(&headers))?;
    let Some(kind) = crate::reports::ReportKind::parse(&kind) else {
        return Err(ApiError::NotFoundWhat(format!(
            "no report `{kind}`; there are traffic, geo, devices, categories, campaigns, demographics, sources, pages, goals and funnels"
        )));
    };
    let now = Utc::now();
    let mut req = crate::reports::ReportRequest::parse(kind, &params, now.date_naive())?;
    if asks_no_cache(&headers) {
        req = req.recomputed();
    }
    let mechanism = match &reader {
        Reader::Analyst(_) => state.release.for_analysts(),
        Reader::Advertiser { campaigns, .. } => {
            req = req.for_advertiser(campaigns)?;
            Mechanism::Noise
        }
    };
    let key = reader.key();
    tracing::info!(key, ?kind, ?mechanism, "report");
    // a slot before the budget: a report refused for load spends nothing
    let _slot = state.query_slot().await?;
    if mechanism == Mechanism::Noise {
        // a comparison asks the question twice, a goal's rate the site's visitors too: all
        // paid for, or nothing is
        state.release.charge_all(key, &req.identities(now), now)?;
    }
    // reports read only the rollups: no wait for a refresh of `events`
    let ctx = state.catalog.session_with(TableScope::Rollups).await.map_err(|e| {
        tracing::error!(error = %e, "could not open the tables");
        ApiError::Internal
    })?;
    let run = crate::reports::run(&ctx, &req, &state.release, mechanism, now);
    match tokio::time::timeout(state.timeout, run).await {
        Ok(r) => Ok(Json(r?).into_response()),
        Err(_) => Err(ApiError::Timeout(state.timeout.as_secs())),
    }
}

/// Whether the request says `Cache-Control: no-cache` (or `no-store`): its answer is computed
/// from the tables, not from one the service kept.
fn asks_no_cache(headers: &HeaderMap) -> bool {
    headers
        .get_all(axum::http::header::CACHE_CONTROL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|d| matches!(d.trim().to_ascii_lowercase().as_str(), "no-cache" | "no-store"))
}

/// Who reads a report: staff, or a third party limited to its campaigns.
pub(crate) enum Reader {
    /// An analyst (by key name).
    Analyst(String),
    /// An advertiser and its campaigns.
    Advertiser {
        /// The key's name.
        key: String,
        /// The campaigns it may see.
        campaigns: Vec<String>,
    },
}

impl Reader {
    /// The key's name (whose budget pays).
    pub(crate) fn key(&self) -> &str {
        match self {
            Reader::Analyst(k) | Reader::Advertiser { key: k, .. } => k,
        }
    }
}

/// The reader of reports an `Authorization` header names: an analyst, else an advertiser.
pub(crate) fn report_reader(state: &QueryState, authorization: Option<&str>) -> Result<Reader, ApiError> {
    use marsad_privacy::access::AccessError;
    match state.keys.authorize(authorization, Role::Analyst) {
        Ok(holder) => Ok(Reader::Analyst(holder.name.clone())),
        Err(AccessError::Forbidden { .. }) => match state.keys.authorize(authorization, Role::Advertiser) {
            Ok(holder) => Ok(Reader::Advertiser {
                key: holder.name.clone(),
                campaigns: holder.campaigns.clone(),
            }),
            Err(AccessError::Forbidden { key, .. }) => Err(ApiError::Access(AccessError::Forbidden {
                key,
                role: "analyst or advertiser",
            })),
            Err(e) => Err(e.into()),
        },
        Err(e) => Err(e.into()),
    }
}

/// `GET /v1/privacy/budget` (analyst or advertiser): what the key has left of today's ε.
#[utoipa::path(get, path = "/v1/privacy/budget", tag = "reports", security(("api_key" = ["analyst", "advertiser"])),
    responses((status = 200, description = "ε per day, spent, left, and when it refills"),
        (status = 401, description = "No or wrong key"), (status = 403, description = "Neither an analyst nor an advertiser key")))]
pub async fn privacy_budget(State(state): State<QueryState>, headers: HeaderMap) -> Result<Response, ApiError> {
    let reader = report_reader(&state, authorization(&headers))?;
    let balance = state.release.balance(reader.key(), Utc::now());
    Ok(Json(json!({
        "key": reader.key(),
        "daily_epsilon": balance.daily,
        "spent": balance.spent,
        "remaining": balance.remaining,
        "refills_at": balance.refills_at,
        "epsilon_per_measure": state.release.epsilon(),
    }))
    .into_response())
}

/// `GET /v1/tables`: the tables that exist (engineer role).
#[utoipa::path(get, path = "/v1/tables", tag = "sql", security(("api_key" = ["engineer"])), responses((status = 200, description = "The tables that exist")))]
pub async fn list_tables(State(state): State<QueryState>, headers: HeaderMap) -> Result<Response, ApiError> {
    state.keys.authorize(authorization(&headers), Role::Engineer)?;
    Ok(Json(json!({"tables": state.catalog.existing().await})).into_response())
}

pub(crate) fn authorization(headers: &HeaderMap) -> Option<&str> {
    headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok())
}

/// `DELETE /v1/subjects?cookie_id=…|user_id=…` (admin): records an `all` opt-out, waits
/// until the processor has committed everything logged before it, deletes every row linkable
/// to the subject (and to the cookies the raw log holds sent with a user id) from every table
/// and vacuums. Answers the receipt when that finishes within `query.erasure_wait_ms`, else
/// 202 with a receipt id to poll at `/v1/subjects/erasures/{id}` — never "done" before it is.
#[utoipa::path(delete, path = "/v1/subjects", tag = "privacy", security(("api_key" = ["admin"])),
    params(("cookie_id" = Option<String>, Query, description = "the browser's cookie id"), ("user_id" = Option<String>, Query, description = "the account id")),
    responses((status = 200, description = "Done: the erasure receipt"),
        (status = 202, description = "Still waiting for the processor: {\"receipt_id\", \"status\": \"waiting\", \"status_url\"}"),
        (status = 400, description = "Give exactly one id"),
        (status = 503, description = "Could not finish; safe to repeat")))]
pub async fn erase_subject(
    State(state): State<QueryState>,
    headers: HeaderMap,
    Query(params): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    erase(state, headers, params).await
}

/// The body of the POST forms that name a subject, so its id stays out of URLs and proxy logs.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubjectRequest {
    /// The browser's cookie id.
    #[serde(default)]
    pub cookie_id: Option<String>,
    /// The account id.
    #[serde(default)]
    pub user_id: Option<String>,
}

impl SubjectRequest {
    /// As the query parameters of the GET/DELETE forms.
    pub(crate) fn into_params(self) -> HashMap<String, String> {
        let mut out = HashMap::new();
        if let Some(c) = self.cookie_id {
            out.insert("cookie_id".to_owned(), c);
        }
        if let Some(u) = self.user_id {
            out.insert("user_id".to_owned(), u);
        }
        out
    }
}

/// Reads a [`SubjectRequest`] body.
pub(crate) fn subject_body(body: &[u8]) -> Result<HashMap<String, String>, ApiError> {
    serde_json::from_slice::<SubjectRequest>(body)
        .map(SubjectRequest::into_params)
        .map_err(|e| ApiError::BadRequest(format!("expected {{\"cookie_id\": …}} or {{\"user_id\": …}}: {e}")))
}

/// `POST /v1/subjects/erase`: `DELETE /v1/subjects` with the id in the body, out of URLs.
#[utoipa::path(post, path = "/v1/subjects/erase", tag = "privacy", security(("api_key" = ["admin"])),
    request_body(content = serde_json::Value, description = "{\"cookie_id\": …} or {\"user_id\": …}"),
    responses((status = 200, description = "Done: the erasure receipt"),
        (status = 202, description = "Still waiting for the processor: {\"receipt_id\", \"status\": \"waiting\", \"status_url\"}"),
        (status = 400, description = "Give exactly one id"),
        (status = 503, description = "Could not finish; safe to repeat")))]
pub async fn erase_subject_by_body(
    State(state): State<QueryState>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    state.keys.authorize(authorization(&headers), Role::Admin)?;
    let params = subject_body(&body)?;
    erase(state, headers, params).await
}

async fn erase(state: QueryState, headers: HeaderMap, params: HashMap<String, String>) -> Result<Response, ApiError> {
    let holder = state.keys.authorize(authorization(&headers), Role::Admin)?;
    let (cookie, user) = match (params.get("cookie_id"), params.get("user_id")) {
        (Some(c), None) if !c.is_empty() => (Some(c.clone()), None),
        (None, Some(u)) if !u.is_empty() => (None, Some(u.clone())),
        _ => {
            return Err(ApiError::BadRequest(
                "give exactly one of `cookie_id` or `user_id`".into(),
            ));
        }
    };
    tracing::info!(key = %holder.name, "erasure requested");
    let id = state.erasures.start();
    let task_state = state.clone();
    let task_id = id.clone();
    let mut done = tokio::spawn(async move {
        let privacy = &task_state.privacy;
        let erasure = marsad_admin::erasure::Erasure {
            tables: task_state.catalog.location(),
            log: privacy.log.as_ref(),
            opt_outs: &privacy.opt_outs,
            subject_keys: &privacy.subject_keys,
            daily_keys: privacy.daily_keys.as_ref(),
            poll: Duration::from_millis(100),
        };
        let subject = match (&cookie, &user) {
            (Some(c), _) => Subject::Cookie(c),
            (_, Some(u)) => Subject::User(u),
            _ => unreachable!("one of the two was checked above"),
        };
        let outcome = erasure.erase(subject).await;
        task_state.catalog.invalidate();
        match &outcome {
            Ok(r) => tracing::info!(receipt = %task_id, rows = r.rows_removed, passes = r.passes, "erasure done"),
            Err(e) => tracing::error!(receipt = %task_id, error = %e, "erasure failed"),
        }
        task_state.erasures.finish(&task_id, &outcome);
        outcome
    });
    match tokio::time::timeout(state.erasure_wait, &mut done).await {
        Ok(Ok(Ok(mut receipt))) => {
            receipt.receipt_id = id;
            Ok(Json(receipt).into_response())
        }
        Ok(Ok(Err(e))) => Err(match e {
            marsad_admin::erasure::ErasureError::OptOut(_) => ApiError::Unavailable(e.to_string()),
            _ => ApiError::Unavailable(format!("erasure did not finish ({e}); it is safe to repeat")),
        }),
        Ok(Err(join)) => Err(ApiError::Unavailable(format!(
            "erasure did not finish ({join}); it is safe to repeat"
        ))),
        Err(_) => Ok((
            StatusCode::ACCEPTED,
            Json(json!({
                "receipt_id": id,
                "status": "waiting",
                "reason": "the processor has not yet committed everything logged before the opt-out",
                "status_url": format!("/v1/subjects/erasures/{id}"),
            })),
        )
            .into_response()),
    }
}

/// `GET /v1/subjects/erasures/{id}` (admin): where an erasure answered with 202 stands.
#[utoipa::path(get, path = "/v1/subjects/erasures/{id}", tag = "privacy", security(("api_key" = ["admin"])),
    params(("id" = String, Path, description = "the receipt id")),
    responses((status = 200, description = "{\"status\": \"waiting\"|\"done\"|\"failed\", …}"),
        (status = 404, description = "No such receipt in this process (repeat the erasure: it is safe)")))]
pub async fn erasure_status(
    State(state): State<QueryState>,
    headers: HeaderMap,
    axum::extract::Path(id): axum::extract::Path<String>,
) -> Result<Response, ApiError> {
    state.keys.authorize(authorization(&headers), Role::Admin)?;
    match state.erasures.status(&id) {
        Some(status) => Ok(Json(status).into_response()),
        None => Err(ApiError::NotFoundWhat(format!(
            "no erasure `{id}` in this query process (receipts live in memory); repeating the erasure is safe"
        ))),
    }
}

/// `GET /healthz`.
#[utoipa::path(get, path = "/healthz", tag = "operations", responses((status = 200, description = "Alive")))]
pub async fn healthz() -> &'static str {
    "ok"
}

/// `GET /readyz`: the tables can be opened.
#[utoipa::path(get, path = "/readyz", tag = "operations", responses((status = 200, description = "Ready"), (status = 503, description = "Not ready")))]
pub async fn readyz(State(state): State<QueryState>) -> Response {
    match state.catalog.session().await {
        Ok(_) => (StatusCode::OK, "ready").into_response(),
        Err(e) => {
            // the reason names paths and stores: for the log, not for whoever asks
            tracing::warn!(error = %e, "not ready");
            (StatusCode::SERVICE_UNAVAILABLE, "tables not readable yet").into_response()
        }
    }
}

/// `GET /metrics`: this service's metrics plus any extra sources.
#[utoipa::path(get, path = "/metrics", tag = "operations", responses((status = 200, description = "Prometheus metrics")))]
pub async fn metrics(State(state): State<QueryState>) -> Response {
    let mut text = strip_eof(state.metrics.render());
    for source in &state.extra_metrics {
        text.push_str(&strip_eof(source()));
    }
    text.push_str("# EOF\n");
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        text,
    )
        .into_response()
}

fn strip_eof(mut text: String) -> String {
    if let Some(pos) = text.rfind("# EOF") {
        text.truncate(pos);
    }
    text
}

/// Unknown routes.
pub async fn not_found() -> ApiError {
    ApiError::NotFound
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_cache_is_read_among_the_cache_directives() {
        let asks = |values: &[&str]| {
            let mut headers = HeaderMap::new();
            for v in values {
                headers.append(header::CACHE_CONTROL, v.parse().expect("a header value"));
            }
            asks_no_cache(&headers)
        };
        assert!(asks(&["no-cache"]));
        assert!(asks(&["max-age=0, No-Cache"]));
        assert!(asks(&["max-age=0", "no-store"]));
        assert!(!asks(&[]));
        assert!(!asks(&["max-age=60"]));
        assert!(!asks(&["no-cache-please"]));
    }
}
