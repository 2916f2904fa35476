//! The answers every operation can get from the transport and the key check, added to an
//! OpenAPI document so clients (and schemathesis) find each status documented.

use utoipa::openapi::path::Operation;
use utoipa::openapi::{OpenApi, ResponseBuilder};

fn add(op: &mut Operation, status: &str, description: &str) {
    op.responses
        .responses
        .entry(status.to_owned())
        .or_insert_with(|| ResponseBuilder::new().description(description).build().into());
}

/// Whether an operation takes a key: a requirement that is not the empty one.
fn takes_key(op: &Operation) -> bool {
    op.security.iter().flatten().any(|r| {
        serde_json::to_value(r)
            .ok()
            .and_then(|v| v.as_object().map(|o| !o.is_empty()))
            .unwrap_or(false)
    })
}

/// Documents, on every operation, the statuses the listener and the key check give.
pub fn document_common_answers(api: &mut OpenApi) {
    for item in api.paths.paths.values_mut() {
        for op in [&mut item.get, &mut item.post, &mut item.delete, &mut item.put]
            .into_iter()
            .flatten()
        {
            add(op, "408", "The request took longer than the service's deadline");
            add(
                op,
                "429",
                "Too many requests from this address; Retry-After says when to come back",
            );
            add(
                op,
                "503",
                "Temporarily unable (busy, or a dependency unavailable); Retry-After given",
            );
            if takes_key(op) {
                add(op, "401", "No key, or an unknown one");
                add(op, "403", "The key lacks a role this operation needs");
            }
            let has_parameters = op.parameters.as_ref().is_some_and(|p| !p.is_empty());
            if has_parameters || op.request_body.is_some() {
                add(op, "400", "A parameter or the body is invalid; the answer says which");
            }
            if has_parameters {
                add(op, "404", "No such thing (segment, receipt, report)");
            }
            if op.request_body.is_some() {
                add(op, "413", "The body is larger than the service accepts");
            }
        }
    }
}
