//! The ad system's routes (adserver role): audience lookups, segment
//! definitions and status, member exports, and overlap estimates.

use std::collections::HashMap;

use axum::Json;
use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, header};
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use marsad_config::Role;
use marsad_privacy::optout::Purpose;
use marsad_privacy::pseudonym::Subject;
use marsad_privacy::pseudonym::audience_id;
use serde_json::json;

use crate::QueryState;
use crate::error::ApiError;

fn authorization(headers: &HeaderMap) -> Option<&str> {
    headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok())
}

fn subject(params: &HashMap<String, String>) -> Result<Subject<'_>, ApiError> {
    match (params.get("cookie_id"), params.get("user_id")) {
        (Some(c), None) if !c.is_empty() => Ok(Subject::Cookie(c)),
        (None, Some(u)) if !u.is_empty() => Ok(Subject::User(u)),
        _ => Err(ApiError::BadRequest(
            "give exactly one of `cookie_id` or `user_id`".into(),
        )),
    }
}

/// `GET /v1/audience?cookie_id=…|user_id=…`: the served segments of a visitor; empty for
/// anyone who opted out of personalisation, checked on every call.
#[utoipa::path(get, path = "/v1/audience", tag = "audiences", security(("api_key" = ["adserver"])),
    params(("cookie_id" = Option<String>, Query, description = "the browser's cookie id"), ("user_id" = Option<String>, Query, description = "the account id")),
    responses((status = 200, description = "{\"segments\":[…]}; empty for anyone opted out"), (status = 400, description = "Give exactly one id")))]
pub async fn audience(
    State(state): State<QueryState>,
    headers: HeaderMap,
    Query(params): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    state.keys.authorize(authorization(&headers), Role::Adserver)?;
    audience_of(&state, &params)
}

/// `POST /v1/audience`: the lookup with the id in the body, out of URLs and proxy logs.
#[utoipa::path(post, path = "/v1/audience", tag = "audiences", security(("api_key" = ["adserver"])),
    request_body(content = serde_json::Value, description = "{\"cookie_id\": …} or {\"user_id\": …}"),
    responses((status = 200, description = "{\"segments\":[…]}; empty for anyone opted out"), (status = 400, description = "Give exactly one id")))]
pub async fn audience_by_body(
    State(state): State<QueryState>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    state.keys.authorize(authorization(&headers), Role::Adserver)?;
    let params = crate::routes::subject_body(&body)?;
    audience_of(&state, &params)
}

fn audience_of(state: &QueryState, params: &HashMap<String, String>) -> Result<Response, ApiError> {
    let subject = subject(params)?;
    let privacy = &state.privacy;
    let audience_id = audience_id(&privacy.subject_keys.targeting, subject);
    // by the identifier under the opt-out key (whatever the targeting key is now), and by the
    // audience_id (an opt-out made before this was recorded under it)
    let (cookie, user) = match subject {
        Subject::Cookie(c) => (Some(c), None),
        Subject::User(u) => (None, Some(u)),
    };
    let opted_out = privacy
        .opt_outs
        .of_identifiers(&privacy.subject_keys, cookie, user)
        .covers(Purpose::Personalisation)
        || privacy.opt_outs.is_opted_out(&audience_id, Purpose::Personalisation);
    let segments = if opted_out {
        state.metrics.audience("opted_out");
        Vec::new()
    } else {
        let found = state.audiences.current().segments_of(&audience_id);
        state.metrics.audience(if found.is_empty() { "none" } else { "found" });
        found
    };
    Ok(Json(json!({ "segments": segments })).into_response())
}

/// `GET /v1/segments`: every configured segment with its rules and its last refresh.
#[utoipa::path(get, path = "/v1/segments", tag = "audiences", security(("api_key" = ["adserver"])), responses((status = 200, description = "Definitions with status and size")))]
pub async fn list_segments(State(state): State<QueryState>, headers: HeaderMap) -> Result<Response, ApiError> {
    state.keys.authorize(authorization(&headers), Role::Adserver)?;
    let index = state.audiences.current();
    let summary = index.summary();
    let segments: Vec<_> = state
        .audience
        .segments
        .iter()
        .map(|def| {
            let outcome = summary.and_then(|s| s.segments.iter().find(|o| o.id == def.id));
            let (status, members) = match outcome {
                None => ("not_refreshed", None),
                Some(o) if o.served && index.segment(&def.id).is_some() => ("served", Some(o.members)),
                // the count of a held-back segment is not shown: it is small enough to matter
                Some(_) => ("held_back", None),
            };
            json!({
                "id": def.id,
                "description": def.description,
                "definition": def,
                "status": status,
                "members": members,
            })
        })
        .collect();
    Ok(Json(json!({
        "segments": segments,
        "min_segment_size": state.audience.min_segment_size,
        "refresh_interval_secs": state.audience.refresh_interval_secs,
        "refreshed_at": summary.map(|s| s.refreshed_at),
    }))
    .into_response())
}

fn served<'a>(
    state: &QueryState,
    index: &'a crate::audience::AudienceIndex,
    id: &str,
) -> Result<&'a crate::audience::ServedSegment, ApiError> {
    if let Some(s) = index.segment(id) {
        return Ok(s);
    }
    if state.audience.segments.iter().any(|d| d.id == id) {
        return Err(ApiError::Conflict(format!(
            "segment `{id}` is held back or not refreshed yet: it is served once it has at least {} members",
            state.audience.min_segment_size
        )));
    }
    Err(ApiError::NotFoundWhat(format!("no segment `{id}`")))
}

/// `GET /v1/segments/{id}/members?format=ndjson|csv`: the members of a served segment,
/// streamed; anyone opted out of personalisation or marketing since the refresh is left out.
#[utoipa::path(get, path = "/v1/segments/{id}/members", tag = "audiences", security(("api_key" = ["adserver"])),
    params(("id" = String, Path, description = "segment id"), ("format" = Option<String>, Query, description = "ndjson (default) or csv")),
    responses((status = 200, description = "Streamed audience_ids"), (status = 404, description = "No such segment"),
        (status = 409, description = "Held back or not refreshed yet")))]
pub async fn segment_members(
    State(state): State<QueryState>,
    headers: HeaderMap,
    Path(id): Path<String>,
    Query(params): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    let holder = state.keys.authorize(authorization(&headers), Role::Adserver)?;
    let csv = match params.get("format").map(String::as_str) {
        None | Some("ndjson") => false,
        Some("csv") => true,
        Some(other) => {
            return Err(ApiError::BadRequest(format!(
                "unknown format `{other}`: use ndjson or csv"
            )));
        }
    };
    let index = state.audiences.current();
    // only members with marketing consent leave in an export
    let members = served(&state, &index, &id)?.marketing_consent.clone();
    tracing::info!(key = %holder.name, segment = %id, members = members.len(), "segment export");
    let opt_outs = state.privacy.opt_outs.clone();
    let header_line = csv.then(|| bytes::Bytes::from_static(b"audience_id\n"));
    let chunks = members.chunks(10_000).map(|c| c.to_vec()).collect::<Vec<_>>();
    let body = futures::stream::iter(header_line.into_iter().map(Ok::<_, std::io::Error>)).chain(
        futures::stream::iter(chunks).map(move |chunk| {
            let mut out = Vec::with_capacity(chunk.len() * 72);
            for m in chunk {
                let out_of = opt_outs.lookup([&*m]);
                if out_of.covers(Purpose::Personalisation) || out_of.covers(Purpose::Marketing) {
                    continue;
                }
                if csv {
                    out.extend_from_slice(m.as_bytes());
                    out.push(b'\n');
                } else {
                    out.extend_from_slice(b"{\"audience_id\":\"");
                    out.extend_from_slice(m.as_bytes());
                    out.extend_from_slice(b"\"}\n");
                }
            }
            Ok(bytes::Bytes::from(out))
        }),
    );
    let content_type = if csv {
        "text/csv; charset=utf-8"
    } else {
        "application/x-ndjson"
    };
    Ok(([(header::CONTENT_TYPE, content_type)], Body::from_stream(body)).into_response())
}

/// `GET /v1/segments/overlap?a=…&b=…`: estimated reach and overlap of two served segments.
#[utoipa::path(get, path = "/v1/segments/overlap", tag = "audiences", security(("api_key" = ["adserver"])),
    params(("a" = String, Query, description = "segment id"), ("b" = String, Query, description = "segment id")),
    responses((status = 200, description = "Estimated union and intersection (theta sketches)")))]
pub async fn overlap(
    State(state): State<QueryState>,
    headers: HeaderMap,
    Query(params): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    state.keys.authorize(authorization(&headers), Role::Adserver)?;
    let (Some(a), Some(b)) = (params.get("a"), params.get("b")) else {
        return Err(ApiError::BadRequest("give two segment ids as `a` and `b`".into()));
    };
    let index = state.audiences.current();
    let (sa, sb) = (served(&state, &index, a)?, served(&state, &index, b)?);
    let overlap = sa.overlap(sb).map_err(|e| {
        tracing::error!(error = %e, "overlap estimate failed");
        ApiError::Internal
    })?;
    Ok(Json(json!({
        "a": {"id": a, "members": sa.members.len()},
        "b": {"id": b, "members": sb.members.len()},
        "union_estimate": overlap.union_estimate.round(),
        "intersection_estimate": overlap.intersection_estimate.round(),
        "jaccard": overlap.jaccard,
    }))
    .into_response())
}
