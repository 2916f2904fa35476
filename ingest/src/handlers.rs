//! The ingest routes.

use std::collections::HashMap;
use std::net::SocketAddr;

use axum::Json;
use axum::body::Body;
use axum::extract::{ConnectInfo, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use chrono::Utc;
use marsad_config::Role;
use marsad_config::TlsMode;
use marsad_eventlog::{Error as LogError, Record};
use marsad_net::ConnectionSecurity;
use marsad_privacy::consent::{ConsentDefaults, StatedConsent, decide};
use marsad_privacy::identity::IdentityClaims;
use marsad_privacy::optout::{OptOutRecord, OptOutScope, Purpose};
use marsad_privacy::pseudonym::Subject;
use marsad_schemas::{ENVELOPE_VERSION, Envelope, Event, TOPIC_OPTOUTS, TOPIC_RAW};
use serde_json::{Value, json};

use crate::IngestState;
use crate::body::{read_limited, utf8};
use crate::decode::{batch_items, parse_event, pixel_event};
use crate::error::ApiError;

/// The transparent 1×1 GIF the pixel answers with.
const PIXEL_GIF: &[u8] = &[
    0x47, 0x49, 0x46, 0x38, 0x39, 0x61, 0x01, 0x00, 0x01, 0x00, 0x80, 0x00, 0x00, 0x00, 0x00, 0x00, 0xff, 0xff, 0xff,
    0x21, 0xf9, 0x04, 0x01, 0x00, 0x00, 0x00, 0x00, 0x2c, 0x00, 0x00, 0x00, 0x00, 0x01, 0x00, 0x01, 0x00, 0x00, 0x02,
    0x02, 0x44, 0x01, 0x00, 0x3b,
];

/// The first-party cookie the tracker and the pixel use.
pub const COOKIE_NAME: &str = "_mid";

/// What the server adds to every event of one request.
struct RequestContext {
    client_ip: std::net::IpAddr,
    user_agent: Option<String>,
    accept_language: Option<String>,
    dnt: bool,
    gpc: bool,
}

fn header_text(headers: &HeaderMap, name: &str, max: usize) -> Option<String> {
    let v = headers.get(name)?.to_str().ok()?.trim();
    if v.is_empty() {
        return None;
    }
    Some(v.chars().take(max).collect())
}

fn context(state: &IngestState, peer: SocketAddr, headers: &HeaderMap) -> RequestContext {
    RequestContext {
        client_ip: crate::client_ip(&state.proxies, peer.ip(), headers),
        user_agent: header_text(headers, "user-agent", 512),
        accept_language: header_text(headers, "accept-language", 128),
        dnt: headers.get("dnt").is_some_and(|v| v.as_bytes() == b"1"),
        gpc: headers.get("sec-gpc").is_some_and(|v| v.as_bytes() == b"1"),
    }
}

impl RequestContext {
    /// Wraps a valid event, or `None` when the visitor refused analytics (not collected at all).
    fn envelope(&self, state: &IngestState, mut event: Event) -> Option<Envelope> {
        vouch_identity(state, &mut event);
        let c = event.consent.unwrap_or_default();
        let stated = StatedConsent {
            analytics: c.analytics,
            personalisation: c.personalisation,
            marketing: c.marketing,
        };
        let defaults = ConsentDefaults {
            analytics: state.default_analytics,
            personalisation: state.default_personalisation,
        };
        let decision = decide(stated, self.dnt, self.gpc, defaults);
        if !decision.analytics {
            return None;
        }
        // declared demographics serve personalisation only: without it they are not even logged
        if !decision.personalisation {
            event.demographics = None;
        }
        // an `analytics` (or `all`) opt-out means nothing of this visitor is written
        if state.opt_outs.any_opted_out(
            &state.subject_keys,
            event.cookie_id.as_deref(),
            event.user_id.as_deref(),
            Purpose::Analytics,
        ) {
            return None;
        }
        if event.event_id.is_none() {
            event.event_id = Some(uuid::Uuid::now_v7().to_string());
        }
        Some(Envelope {
            v: ENVELOPE_VERSION,
            event,
            received_at: Utc::now(),
            client_ip: Some(self.client_ip),
            user_agent: self.user_agent.clone(),
            accept_language: self.accept_language.clone(),
            dnt: self.dnt,
            gpc: self.gpc,
        })
    }
}

/// Keeps the `user_id` and demographics only as a valid identity token states them: anything
/// else a client claims about an account is dropped, and the event counts as anonymous.
fn vouch_identity(state: &IngestState, event: &mut Event) {
    let claims = match (&state.identity_key, event.identity.take()) {
        (Some(key), Some(token)) => match marsad_privacy::identity::verify(key, &token, Utc::now()) {
            Ok(claims) => Some(claims),
            Err(e) => {
                state.metrics.identity_refused(&e);
                None
            }
        },
        _ => None,
    };
    match claims {
        // the token, not the body, says who this is: a body `user_id` for someone else is ignored
        Some(IdentityClaims {
            uid, age_band, gender, ..
        }) => {
            event.user_id = Some(uid);
            event.demographics =
                (age_band.is_some() || gender.is_some()).then_some(marsad_schemas::Demographics { age_band, gender });
            // signed is not well-formed: what the token says meets the event contract's id rules
            if event.validate().is_err() {
                state
                    .metrics
                    .identity_refused(&marsad_privacy::identity::IdentityError::Malformed);
                event.user_id = None;
                event.demographics = None;
            }
        }
        None => {
            if event.user_id.is_some() || event.demographics.is_some() {
                state.metrics.unsigned_identity.inc();
            }
            event.user_id = None;
            event.demographics = None;
        }
    }
}

/// Appends to the raw log; only `Ok` may be answered 2xx.
async fn append(state: &IngestState, envelopes: Vec<Envelope>) -> Result<usize, ApiError> {
    let n = envelopes.len();
    if n == 0 {
        return Ok(0);
    }
    let records = envelopes
        .iter()
        .map(|e| Record {
            key: Some(e.partition_key()),
            payload: e.to_bytes(),
        })
        .collect();
    match state.log.append(TOPIC_RAW, records).await {
        Ok(_) => {
            state.metrics.accepted.inc_by(n as u64);
            Ok(n)
        }
        Err(LogError::TooLarge { len, max }) => Err(ApiError::BadRequest(format!(
            "an event encodes to {len} bytes; at most {max} are accepted"
        ))),
        Err(e) => {
            state.metrics.unavailable.inc();
            tracing::warn!(error = %e, events = n, "event log refused an append; answering 503");
            Err(ApiError::Unavailable {
                retry_after: state.retry_after,
            })
        }
    }
}

/// `POST /v1/events`: one event.
#[utoipa::path(post, path = "/v1/events", tag = "ingest",
    request_body(content = serde_json::Value, description = "One event (see the event contract)", content_type = "application/json"),
    responses((status = 202, description = "Durable: {\"accepted\":1}"), (status = 400, description = "Invalid event, with the reason"),
        (status = 413, description = "Body too large"), (status = 503, description = "Log unavailable; Retry-After given")))]
pub async fn post_event(
    State(state): State<IngestState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let bytes = read_limited(&headers, body, state.body_limit).await?;
    let text = utf8(&bytes)?;
    if text.trim().is_empty() {
        state.metrics.reject("empty");
        return Err(ApiError::BadRequest(
            "empty body: send one event as a JSON object".into(),
        ));
    }
    let value: Value = serde_json::from_str(text).map_err(|e| {
        state.metrics.reject("malformed");
        ApiError::BadRequest(format!("malformed JSON: {e}"))
    })?;
    if !value.is_object() {
        state.metrics.reject("malformed");
        return Err(ApiError::BadRequest(
            "an event is a JSON object; send arrays to /v1/batch".into(),
        ));
    }
    let event = parse_event(value).map_err(|e| {
        state.metrics.reject("invalid");
        ApiError::BadRequest(e)
    })?;
    let ctx = context(&state, peer, &headers);
    let Some(envelope) = ctx.envelope(&state, event) else {
        state.metrics.not_collected.inc();
        return Ok((StatusCode::ACCEPTED, Json(json!({"accepted": 0, "not_collected": 1}))).into_response());
    };
    let accepted = append(&state, vec![envelope]).await?;
    Ok((StatusCode::ACCEPTED, Json(json!({"accepted": accepted}))).into_response())
}

/// `POST /v1/batch`: many events; each refused one is reported by index.
#[utoipa::path(post, path = "/v1/batch", tag = "ingest",
    request_body(content = serde_json::Value, description = "{\"events\":[…]}, a JSON array, or NDJSON; gzip accepted"),
    responses((status = 202, description = "{\"accepted\":n,\"rejected\":[{\"index\":i,\"error\":…}]}"),
        (status = 400, description = "Unreadable body"), (status = 413, description = "Body too large"),
        (status = 503, description = "Log unavailable; Retry-After given")))]
pub async fn post_batch(
    State(state): State<IngestState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let bytes = read_limited(&headers, body, state.body_limit).await?;
    let text = utf8(&bytes)?;
    let content_type = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok());
    let items = batch_items(content_type, text).inspect_err(|_| state.metrics.reject("malformed"))?;
    if items.is_empty() {
        state.metrics.reject("empty");
        return Err(ApiError::BadRequest("the batch has no events".into()));
    }
    if items.len() > state.max_batch_events {
        state.metrics.reject("batch_too_large");
        return Err(ApiError::BadRequest(format!(
            "the batch has {} events; at most {} are accepted per request",
            items.len(),
            state.max_batch_events
        )));
    }
    let ctx = context(&state, peer, &headers);
    let mut envelopes = Vec::with_capacity(items.len());
    let mut rejected = Vec::new();
    let mut not_collected = 0usize;
    for (index, item) in items.into_iter().enumerate() {
        match item.and_then(parse_event) {
            Ok(event) => match ctx.envelope(&state, event) {
                Some(env) => envelopes.push(env),
                None => not_collected += 1,
            },
            Err(error) => {
                state.metrics.reject("invalid");
                rejected.push(json!({"index": index, "error": error}));
            }
        }
    }
    state.metrics.not_collected.inc_by(not_collected as u64);
    if envelopes.is_empty() && not_collected == 0 {
        return Err(ApiError::AllRejected(rejected));
    }
    let accepted = append(&state, envelopes).await?;
    let mut answer = json!({"accepted": accepted, "rejected": rejected});
    if not_collected > 0 {
        answer["not_collected"] = not_collected.into();
    }
    Ok((StatusCode::ACCEPTED, Json(answer)).into_response())
}

fn cookie(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.to_owned())
        .filter(|v| !v.is_empty() && v.len() <= 128)
}

/// `GET /v1/p.gif`: a page view (or other type) for pages without JavaScript.
#[utoipa::path(get, path = "/v1/p.gif", tag = "ingest",
    params(("t" = Option<String>, Query, description = "event type"), ("u" = Option<String>, Query, description = "page URL"),
        ("r" = Option<String>, Query, description = "referrer"), ("e" = Option<String>, Query, description = "event id"),
        ("c" = Option<String>, Query, description = "consent flags")),
    responses((status = 200, description = "A 1×1 GIF; sets the `_mid` cookie if missing")))]
pub async fn pixel(
    State(state): State<IngestState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    security: Option<axum::Extension<ConnectionSecurity>>,
    headers: HeaderMap,
    Query(params): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    let parts = RequestTransport {
        peer,
        security: security.map(|s| s.0),
        forwarded_proto: header_text(&headers, "x-forwarded-proto", 16),
    };
    let mut event = pixel_event(&params, header_text(&headers, "referer", 8192)).map_err(|e| {
        state.metrics.reject("invalid");
        ApiError::BadRequest(e)
    })?;
    // the tracker's fallback passes its first-party cookie as `c`; plain pixels rely on `_mid`
    let from_param = params.get("c").filter(|c| !c.is_empty()).cloned();
    let (cookie_id, new_cookie) = match from_param.or_else(|| cookie(&headers, COOKIE_NAME)) {
        Some(c) => (c, false),
        None => (format!("c-{}", uuid::Uuid::new_v4().simple()), true),
    };
    event.cookie_id = Some(cookie_id.clone());
    event.validate().map_err(|e| {
        state.metrics.reject("invalid");
        ApiError::BadRequest(format!("invalid event: {e}"))
    })?;
    let ctx = context(&state, peer, &headers);
    match ctx.envelope(&state, event) {
        Some(env) => {
            append(&state, vec![env]).await?;
        }
        None => {
            state.metrics.not_collected.inc();
        }
    }
    let mut resp = (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "image/gif"), (header::CACHE_CONTROL, "no-store")],
        PIXEL_GIF,
    )
        .into_response();
    if new_cookie {
        let secure = if secure_request(&state, &parts) { "; Secure" } else { "" };
        let value = format!("{COOKIE_NAME}={cookie_id}; Path=/; Max-Age=31536000; SameSite=Lax; HttpOnly{secure}");
        if let Ok(v) = HeaderValue::from_str(&value) {
            resp.headers_mut().insert(header::SET_COOKIE, v);
        }
    }
    Ok(resp)
}

/// How a request reached this process, to decide whether cookies may be marked `Secure`.
struct RequestTransport {
    peer: SocketAddr,
    security: Option<ConnectionSecurity>,
    forwarded_proto: Option<String>,
}

/// Whether the visitor's connection was encrypted: TLS ended here, or (behind a proxy that
/// ends it) a trusted proxy says `X-Forwarded-Proto: https`.
fn secure_request(state: &IngestState, t: &RequestTransport) -> bool {
    match state.tls_mode {
        TlsMode::Builtin => t.security == Some(ConnectionSecurity::Tls),
        TlsMode::TerminatedUpstream => {
            state.proxies.trusts(t.peer.ip())
                && t.forwarded_proto
                    .as_deref()
                    .is_some_and(|p| p.eq_ignore_ascii_case("https"))
        }
    }
}

/// `GET /healthz`: the process is alive.
#[utoipa::path(get, path = "/healthz", tag = "operations", responses((status = 200, description = "Alive")))]
pub async fn healthz() -> &'static str {
    "ok"
}

/// `GET /readyz`: the log can take appends.
#[utoipa::path(get, path = "/readyz", tag = "operations", responses((status = 200, description = "Ready"), (status = 503, description = "Not ready")))]
pub async fn readyz(State(state): State<IngestState>) -> Response {
    if !state.opt_outs.is_caught_up() {
        (StatusCode::SERVICE_UNAVAILABLE, "opt-outs not loaded yet").into_response()
    } else if state.log.is_ready() {
        (StatusCode::OK, "ready").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "event log not ready").into_response()
    }
}

/// `GET /metrics`: Prometheus text.
#[utoipa::path(get, path = "/metrics", tag = "operations", responses((status = 200, description = "Prometheus metrics")))]
pub async fn metrics(State(state): State<IngestState>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.metrics.render(),
    )
        .into_response()
}

/// Unknown routes get JSON too.
pub async fn not_found() -> ApiError {
    ApiError::NotFound
}

/// The body of `POST /v1/opt-outs`.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OptOutRequest {
    /// Ignored: a cookie opt-out applies to the caller's own `_mid` cookie, never to an id
    /// someone typed (accepted so older trackers are not refused).
    #[serde(default)]
    pub cookie_id: Option<String>,
    /// An account id (admin key required).
    #[serde(default)]
    pub user_id: Option<String>,
    /// A token the site's backend signed for the logged-in visitor: opts out that account.
    #[serde(default)]
    pub identity: Option<String>,
    /// `analytics`, `personalisation`, `marketing` or `all`.
    pub scope: String,
}

/// `POST /v1/opt-outs`: records an opt-out in the opt-out log; in force here at once.
#[utoipa::path(post, path = "/v1/opt-outs", tag = "privacy", security((), ("api_key" = ["admin"])),
    request_body(content = serde_json::Value, description = "{\"scope\": \"analytics\"|\"personalisation\"|\"marketing\"|\"all\"} for the caller's own `_mid` cookie; with \"identity\": a signed token, for that account; with \"user_id\" and the admin key, for any account"),
    responses((status = 202, description = "Recorded"), (status = 400, description = "Bad scope, no cookie, or an invalid token"),
        (status = 401, description = "A user id needs the admin key"), (status = 429, description = "Too many opt-outs from this address")))]
pub async fn post_opt_out(
    State(state): State<IngestState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let client = context(&state, peer, &headers).client_ip;
    if let Err(wait) = state.opt_out_limit.check(client) {
        return Err(ApiError::TooMany { retry_after: wait });
    }
    let bytes = read_limited(&headers, body, 16 * 1024).await?;
    let req: OptOutRequest =
        serde_json::from_slice(&bytes).map_err(|e| ApiError::BadRequest(format!("invalid opt-out: {e}")))?;
    let scope = OptOutScope::parse(&req.scope).ok_or_else(|| {
        ApiError::BadRequest("unknown scope; use analytics, personalisation, marketing or all".into())
    })?;
    let own_cookie = cookie(&headers, COOKIE_NAME);
    let vouched;
    let (subject, kind) = match (&req.user_id, &req.identity) {
        (Some(u), None) if !u.is_empty() => {
            let auth = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok());
            state.keys.authorize(auth, Role::Admin)?;
            (Subject::User(u), "user")
        }
        (None, Some(token)) => {
            let key = state.identity_key.as_ref().ok_or_else(|| {
                ApiError::BadRequest("this site signs no identity tokens; opt out with the `_mid` cookie".into())
            })?;
            vouched = marsad_privacy::identity::verify(key, token, Utc::now())
                .map_err(|e| ApiError::BadRequest(format!("{e}: nothing recorded")))?;
            (Subject::User(&vouched.uid), "user")
        }
        (None, None) => match &own_cookie {
            Some(c) => (Subject::Cookie(c), "cookie"),
            None => {
                return Err(ApiError::BadRequest(
                    "no `_mid` cookie came with this request: an opt-out applies to the caller's own cookie \
                     (send it with credentials) or to a signed identity token"
                        .into(),
                ));
            }
        },
        _ => {
            return Err(ApiError::BadRequest(
                "send at most one of `user_id` (admin key) or `identity`".into(),
            ));
        }
    };
    let record = OptOutRecord::new(
        &state.subject_keys.optout,
        &state.subject_keys.targeting,
        subject,
        scope,
    );
    // the log keeps one record per opt-out in force (what compaction by key would keep): a
    // repeat is answered, not appended, so replaying the log at start stays bounded by the
    // number of distinct opt-outs however often one is sent
    let already = state.opt_outs.is_recorded(&record);
    if !already
        && let Err(e) = state
            .log
            .append(
                TOPIC_OPTOUTS,
                vec![Record {
                    key: Some(record.log_key()),
                    payload: record.to_bytes(),
                }],
            )
            .await
    {
        state.metrics.unavailable.inc();
        tracing::warn!(error = %e, "event log refused an opt-out; answering 503");
        return Err(ApiError::Unavailable {
            retry_after: state.retry_after,
        });
    }
    state.opt_outs.apply(&record);
    let mut answer = json!({"recorded": true, "scope": req.scope, "subject": kind, "already_in_force": already});
    if req.cookie_id.is_some() && (kind != "cookie" || req.cookie_id != own_cookie) {
        // say so: a caller who meant another cookie must not believe it opted out
        answer["ignored"] = json!(["cookie_id"]);
    }
    Ok((StatusCode::ACCEPTED, Json(answer)).into_response())
}

/// `GET /s.js`: the tracker snippet.
#[utoipa::path(get, path = "/s.js", tag = "ingest", responses((status = 200, description = "The tracker snippet (JavaScript)")))]
pub async fn tracker() -> Response {
    (
        [
            (header::CONTENT_TYPE, "application/javascript; charset=utf-8"),
            (header::CACHE_CONTROL, "public, max-age=3600"),
        ],
        include_str!("tracker.js"),
    )
        .into_response()
}

/// `GET /demo`: a page of the site with the tracker, to see it work (and to test it in a browser).
#[utoipa::path(get, path = "/demo", tag = "ingest", responses((status = 200, description = "A demo page using the tracker")))]
pub async fn demo() -> Response {
    (
        [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
        include_str!("demo.html"),
    )
        .into_response()
}
