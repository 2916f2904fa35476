//! The OpenAPI documents at `/v1/openapi.json` match the routes the services
//! actually serve: every documented path and method answers (not the
//! fallback), and the design's contract routes are all documented.

use anyhow::{Context, Result};
use reqwest::blocking::Client;
use serde_json::Value;

use crate::common::Marsad;

const FALLBACK: &str = "no such endpoint";

fn check(client: &Client, base: &str, key: &str, must_have: &[(&str, &str)]) -> Result<usize> {
    let doc: Value = client.get(format!("{base}/v1/openapi.json")).send()?.json()?;
    assert!(doc["openapi"].as_str().is_some_and(|v| v.starts_with('3')), "{doc}");
    let paths = doc["paths"].as_object().context("paths")?;
    for (method, path) in must_have {
        assert!(
            paths.get(*path).and_then(|p| p.get(*method)).is_some(),
            "{method} {path} is not documented"
        );
    }
    let mut checked = 0;
    for (path, item) in paths {
        let concrete = path.replace("{kind}", "geo").replace("{id}", "no-such-segment");
        for method in item.as_object().context("path item")?.keys() {
            let url = format!("{base}{concrete}");
            let req = match method.as_str() {
                "get" => client.get(&url),
                "post" => client.post(&url).body("{}"),
                "delete" => client.delete(&url),
                other => panic!("undocumented method {other}"),
            };
            let resp = req.bearer_auth(key).send()?;
            let status = resp.status();
            let body = resp.text().unwrap_or_default();
            assert!(
                !(status.as_u16() == 404 && body.contains(FALLBACK)),
                "{method} {path} is documented but not served"
            );
            assert!(status.as_u16() != 405, "{method} {path}: method not allowed");
            checked += 1;
        }
    }
    // and an undocumented path is the fallback
    let resp = client.get(format!("{base}/v1/nothing-here")).send()?;
    assert_eq!(resp.status().as_u16(), 404);
    assert!(resp.text()?.contains(FALLBACK));
    Ok(checked)
}

#[test]
fn the_openapi_documents_match_the_served_routes() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let m = Marsad::start(&tmp.path().join("data"), None)?;
    let client = Client::new();
    let key = m.admin_key()?;
    let ingest = check(
        &client,
        &m.ingest,
        &key,
        &[
            ("post", "/v1/events"),
            ("post", "/v1/batch"),
            ("get", "/v1/p.gif"),
            ("post", "/v1/opt-outs"),
            ("get", "/s.js"),
            ("get", "/healthz"),
            ("get", "/readyz"),
            ("get", "/metrics"),
        ],
    )?;
    let query = check(
        &client,
        &m.query,
        &key,
        &[
            ("post", "/v1/sql"),
            ("get", "/v1/reports/{kind}"),
            ("get", "/v1/audience"),
            ("get", "/v1/segments"),
            ("get", "/v1/segments/{id}/members"),
            ("get", "/v1/segments/overlap"),
            ("delete", "/v1/subjects"),
            ("get", "/healthz"),
        ],
    )?;
    assert!(
        ingest >= 8 && query >= 11,
        "{ingest} ingest and {query} query operations"
    );
    Ok(())
}
