//! The ingest router without a socket, on a real local log: what gets appended,
//! with which client address, and what happens when the log cannot keep up.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::http::{Request, StatusCode};
use http_body_util::BodyExt;
use marsad_config::Config;
use marsad_eventlog::{EventLog, LocalLog, LocalLogOptions};
use marsad_ingest::{IngestPrivacy, IngestState, app};
use marsad_privacy::keys::SubjectKeys;
use marsad_schemas::{Envelope, TOPIC_RAW};
use tower::ServiceExt;

type Result<T = ()> = std::result::Result<T, Box<dyn std::error::Error + Send + Sync>>;

fn request(peer: &str, xff: Option<&str>, body: &str) -> Result<Request<Body>> {
    let mut builder = Request::post("/v1/events")
        .header("content-type", "application/json")
        .header("sec-gpc", "1");
    if let Some(x) = xff {
        builder = builder.header("x-forwarded-for", x);
    }
    let mut req = builder.body(Body::from(body.to_owned()))?;
    req.extensions_mut().insert(ConnectInfo(peer.parse::<SocketAddr>()?));
    Ok(req)
}

async fn logged(log: &LocalLog) -> Result<Vec<Envelope>> {
    let mut sub = log.subscribe(TOPIC_RAW, "test").await?;
    let records = sub.poll(100, Duration::from_millis(100)).await?;
    Ok(records
        .iter()
        .map(|r| Envelope::from_bytes(&r.payload))
        .collect::<std::result::Result<_, _>>()?)
}

fn setup(options: LocalLogOptions) -> Result<(tempfile::TempDir, Arc<LocalLog>, axum::Router)> {
    let dir = tempfile::tempdir()?;
    let mut config = Config {
        data_dir: dir.path().to_owned(),
        ..Config::default()
    };
    config.ingest.trusted_proxies = vec!["10.0.0.0/8".parse()?];
    let log = Arc::new(LocalLog::open(config.log_dir(), options)?);
    let privacy = IngestPrivacy {
        keys: Arc::default(),
        opt_outs: Arc::default(),
        subject_keys: SubjectKeys::from_seed(9),
    };
    let router = app(IngestState::new(&config, log.clone() as Arc<dyn EventLog>, privacy));
    Ok((dir, log, router))
}

const EVENT: &str = r#"{"type":"page_view","url":"https://kulshi.example/en/cars","cookie_id":"c-1"}"#;

#[tokio::test(flavor = "multi_thread")]
async fn forwarded_addresses_are_believed_only_from_trusted_proxies() -> Result {
    let (_dir, log, router) = setup(LocalLogOptions::default())?;
    let resp = router
        .clone()
        .oneshot(request("10.1.2.3:5000", Some("6.6.6.6, 176.29.1.2"), EVENT)?)
        .await?;
    assert_eq!(resp.status(), StatusCode::ACCEPTED);
    let resp = router
        .oneshot(request("203.0.113.7:5000", Some("176.29.1.2"), EVENT)?)
        .await?;
    assert_eq!(resp.status(), StatusCode::ACCEPTED);
    let envs = logged(&log).await?;
    let ips: Vec<String> = envs.iter().filter_map(|e| e.client_ip.map(|i| i.to_string())).collect();
    assert_eq!(ips, ["176.29.1.2", "203.0.113.7"]);
    assert!(
        envs.iter().all(|e| e.gpc && e.event.event_id.is_some()),
        "GPC recorded, ids assigned"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn refused_analytics_is_not_collected() -> Result {
    let (_dir, log, router) = setup(LocalLogOptions::default())?;
    let body = r#"{"type":"page_view","url":"https://kulshi.example/","consent":{"analytics":false}}"#;
    let resp = router.oneshot(request("127.0.0.1:1", None, body)?).await?;
    assert_eq!(resp.status(), StatusCode::ACCEPTED);
    let answer: serde_json::Value = serde_json::from_slice(&resp.into_body().collect().await?.to_bytes())?;
    assert_eq!(answer, serde_json::json!({"accepted": 0, "not_collected": 1}));
    assert!(logged(&log).await?.is_empty());
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_log_that_cannot_write_means_503_with_retry_after() -> Result {
    let (dir, log, router) = setup(LocalLogOptions::default())?;
    // another process holds the topic's writer lock: appends cannot be made durable here
    let topic_dir = dir.path().join("log").join(TOPIC_RAW);
    std::fs::create_dir_all(&topic_dir)?;
    let lock = std::fs::File::create(topic_dir.join("writer.lock"))?;
    lock.try_lock()?;
    let resp = router.oneshot(request("127.0.0.1:1", None, EVENT)?).await?;
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        resp.headers().get("retry-after").and_then(|v| v.to_str().ok()),
        Some("1")
    );
    let answer: serde_json::Value = serde_json::from_slice(&resp.into_body().collect().await?.to_bytes())?;
    assert!(
        answer["error"].as_str().unwrap_or_default().contains("retry later"),
        "{answer}"
    );
    drop(lock);
    assert!(logged(&log).await?.is_empty(), "nothing was written");
    Ok(())
}
