use anyhow::Result;
use reqwest::blocking::Client;
use serde_json::{Value, json};

use crate::common::Marsad;

fn post(client: &Client, url: &str, content_type: &str, body: Vec<u8>) -> Result<(u16, Value)> {
    let resp = client
        .post(url)
        .header("content-type", content_type)
        .body(body)
        .send()?;
    let status = resp.status().as_u16();
    let body: Value = resp.json().unwrap_or(Value::Null);
    Ok((status, body))
}

fn error_of(body: &Value) -> String {
    body["error"].as_str().unwrap_or_default().to_owned()
}

#[test]
fn bad_input_gets_a_clear_4xx_and_the_server_keeps_serving() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let m = Marsad::start(&tmp.path().join("data"), None)?;
    let client = Client::new();
    let events = format!("{}/v1/events", m.ingest);
    let batch = format!("{}/v1/batch", m.ingest);
    let json_ct = "application/json";

    let cases: Vec<(&str, &str, Vec<u8>, u16, &str)> = vec![
        (
            "malformed JSON",
            &events,
            br#"{"type": "page_view", "url": "#.to_vec(),
            400,
            "malformed JSON",
        ),
        (
            "unknown field",
            &events,
            br#"{"type":"page_view","url":"https://kulshi.example/","colour":"red"}"#.to_vec(),
            400,
            "unknown field `colour`",
        ),
        (
            "wrong type",
            &events,
            br#"{"type":"page_view","url":42}"#.to_vec(),
            400,
            "invalid type",
        ),
        (
            "unknown event type",
            &events,
            br#"{"type":"page_vue","url":"https://kulshi.example/"}"#.to_vec(),
            400,
            "unknown variant `page_vue`",
        ),
        (
            "invalid UTF-8",
            &events,
            b"{\"type\":\"page_view\",\"url\":\"https://kulshi.example/\xff\xfe\"}".to_vec(),
            400,
            "not valid UTF-8",
        ),
        ("empty body", &events, Vec::new(), 400, "empty body"),
        (
            "empty batch object",
            &batch,
            br#"{"events":[]}"#.to_vec(),
            400,
            "no events",
        ),
        ("empty batch array", &batch, b"[]".to_vec(), 400, "no events"),
        (
            "array to /v1/events",
            &events,
            b"[]".to_vec(),
            400,
            "send arrays to /v1/batch",
        ),
        (
            "missing url",
            &events,
            br#"{"type":"page_view"}"#.to_vec(),
            400,
            "missing field `url`",
        ),
    ];
    for (what, url, body, want_status, want_msg) in cases {
        let (status, answer) = post(&client, url, json_ct, body)?;
        assert_eq!(status, want_status, "{what}: {answer}");
        assert!(error_of(&answer).contains(want_msg), "{what}: {answer}");
    }

    // 2 MiB: over the 1 MiB default limit
    let big = format!(
        r#"{{"type":"page_view","url":"https://kulshi.example/","props":{{"x":"{}"}}}}"#,
        "a".repeat(2 << 20)
    );
    let (status, answer) = post(&client, &events, json_ct, big.into_bytes())?;
    assert_eq!(status, 413, "{answer}");
    assert!(error_of(&answer).contains("exceeds the limit"), "{answer}");

    // a gzip bomb is cut at the limit too
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    std::io::Write::write_all(&mut gz, &vec![b' '; 3 << 20])?;
    let resp = client
        .post(&batch)
        .header("content-encoding", "gzip")
        .body(gz.finish()?)
        .send()?;
    assert_eq!(resp.status().as_u16(), 413);

    // not gzip although it says so
    let resp = client
        .post(&batch)
        .header("content-encoding", "gzip")
        .body("plain")
        .send()?;
    assert_eq!(resp.status().as_u16(), 400);

    // one bad event in a batch is reported by index; the others are kept
    let mixed = json!([
        {"type":"page_view","url":"https://kulshi.example/a","event_id":"ok-1"},
        {"type":"page_view","url":"https://kulshi.example/b","size":3},
        {"type":"search","event_id":"ok-2"}
    ]);
    let (status, answer) = post(&client, &batch, json_ct, serde_json::to_vec(&mixed)?)?;
    assert_eq!(status, 202, "{answer}");
    assert_eq!(answer["accepted"], 2);
    assert_eq!(answer["rejected"][0]["index"], 1);
    assert!(
        answer["rejected"][0]["error"]
            .as_str()
            .unwrap_or_default()
            .contains("unknown field `size`"),
        "{answer}"
    );

    // a bad pixel type
    let resp = client.get(format!("{}/v1/p.gif?t=nonsense", m.ingest)).send()?;
    assert_eq!(resp.status().as_u16(), 400);

    // still serving: a good event is accepted and stored
    let (status, answer) = post(
        &client,
        &events,
        json_ct,
        br#"{"type":"page_view","url":"https://kulshi.example/after","event_id":"ok-3"}"#.to_vec(),
    )?;
    assert_eq!((status, answer["accepted"].as_u64()), (202, Some(1)));
    m.wait_for_count("SELECT count(*) FROM events", 3, std::time::Duration::from_secs(60))?;
    let health = client.get(format!("{}/healthz", m.ingest)).send()?;
    assert!(health.status().is_success());
    Ok(())
}
