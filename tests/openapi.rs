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

/// Operations anyone may call; any other operation must declare its roles in its document.
const PUBLIC: &[(&str, &str)] = &[
    ("post", "/v1/events"),
    ("post", "/v1/batch"),
    ("get", "/v1/p.gif"),
    ("post", "/v1/opt-outs"),
    ("get", "/s.js"),
    ("get", "/demo"),
    ("get", "/healthz"),
    ("get", "/readyz"),
    ("get", "/metrics"),
];

/// The roles an operation's document grants (`None`: open to anyone).
fn granted(op: &Value) -> Option<Vec<String>> {
    let requirements = op.get("security")?.as_array()?;
    // an empty requirement (`{}`) means the operation also runs without a key
    if requirements.iter().any(|r| r.as_object().is_some_and(|o| o.is_empty())) {
        return None;
    }
    Some(
        requirements
            .iter()
            .filter_map(|r| r.get("api_key")?.as_array().cloned())
            .flatten()
            .filter_map(|v| v.as_str().map(str::to_owned))
            .collect(),
    )
}

/// Every operation of both documents × no key, a wrong key and a key of each single role gets
/// the status its declared roles imply: a new route without a role check, or documented with
/// roles it does not check, fails here.
#[test]
fn every_operation_answers_each_role_as_its_document_says() -> Result<()> {
    use crate::common::key_entry;
    const ROLES: [&str; 5] = ["analyst", "adserver", "engineer", "admin", "advertiser"];
    let tmp = tempfile::tempdir()?;
    let mut config = String::new();
    for role in ROLES {
        let entry = key_entry(&format!("only-{role}"), role, &format!("key-of-{role}-0123456789"));
        config.push_str(&entry);
        if role == "advertiser" {
            config.push_str("campaigns = [\"cmp-1\"]\n");
        }
    }
    let config_path = tmp.path().join("marsad.toml");
    std::fs::write(&config_path, config)?;
    let m = Marsad::start_with_config(&tmp.path().join("data"), None, Some(&config_path))?;
    let client = Client::new();
    let mut cases = 0;
    for base in [&m.ingest, &m.query] {
        let doc: Value = client.get(format!("{base}/v1/openapi.json")).send()?.json()?;
        for (path, item) in doc["paths"].as_object().context("paths")? {
            // an advertiser's own report; ids nobody has
            let concrete = path.replace("{kind}", "campaigns").replace("{id}", "no-such-id");
            for (method, op) in item.as_object().context("path item")? {
                let send = |key: Option<&str>| -> Result<u16> {
                    let url = format!("{base}{concrete}");
                    let req = match method.as_str() {
                        "get" => client.get(&url),
                        "post" => client.post(&url).body("{}"),
                        "delete" => client.delete(&url),
                        other => anyhow::bail!("undocumented method {other}"),
                    };
                    let req = match key {
                        Some(k) => req.bearer_auth(k),
                        None => req,
                    };
                    Ok(req.send()?.status().as_u16())
                };
                let Some(roles) = granted(op) else {
                    assert!(
                        PUBLIC.contains(&(method.as_str(), path.as_str())),
                        "{method} {path} declares no role: say which roles may call it"
                    );
                    let status = send(None)?;
                    assert!(![401, 403].contains(&status), "{method} {path} is public, got {status}");
                    cases += 1;
                    continue;
                };
                assert!(!roles.is_empty(), "{method} {path}: a key, but no role named");
                assert_eq!(send(None)?, 401, "{method} {path} without a key");
                assert_eq!(send(Some("not-a-key"))?, 401, "{method} {path} with a wrong key");
                for role in ROLES {
                    let status = send(Some(&format!("key-of-{role}-0123456789")))?;
                    if roles.iter().any(|r| r == role) {
                        assert!(
                            ![401, 403].contains(&status),
                            "{method} {path}: {role} may call it, got {status}"
                        );
                    } else {
                        assert_eq!(status, 403, "{method} {path}: {role} may not call it");
                    }
                }
                cases += 2 + ROLES.len();
            }
        }
    }
    println!("authorization matrix: {cases} cases");
    assert!(cases > 80, "{cases}");
    Ok(())
}

/// schemathesis against both documents, for a bounded number of examples per operation: no
/// answer is a 5xx other than a documented 503, every status is documented, every answer
/// matches its documented content type and headers.
#[test]
fn schemathesis_finds_no_server_error_and_no_undocumented_answer() -> Result<()> {
    use crate::common::{Tool, tools_for};
    if !tools_for(
        "schemathesis_finds_no_server_error_and_no_undocumented_answer",
        &[Tool::Schemathesis],
    )? {
        return Ok(());
    }
    let tmp = tempfile::tempdir()?;
    let m = Marsad::start(&tmp.path().join("data"), None)?;
    let key = m.admin_key()?;
    for base in [&m.ingest, &m.query] {
        let out = std::process::Command::new("python3")
            .args([
                "-c",
                "import sys; from schemathesis.cli import schemathesis; sys.argv[0] = 'st'; schemathesis()",
                "run",
                &format!("{base}/v1/openapi.json"),
                "--checks",
                "not_a_server_error,status_code_conformance,content_type_conformance,response_headers_conformance,response_schema_conformance",
                "--max-examples",
                "25",
                "--seed",
                "20261128",
                "--header",
                &format!("Authorization: Bearer {key}"),
                "--no-color",
            ])
            .output()
            .context("running schemathesis")?;
        let text = String::from_utf8_lossy(&out.stdout);
        let summary: Vec<&str> = text.lines().filter(|l| l.contains("generated,")).collect();
        println!("{base}: {}", summary.join(" "));
        assert!(
            out.status.success(),
            "schemathesis found failures at {base}:\n{text}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}
