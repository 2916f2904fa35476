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
use marsad_privacy::identity::{IdentityClaims, sign};
use marsad_privacy::keys::{SecretKey, SubjectKeys};
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

fn without_gpc(mut req: Request<Body>) -> Request<Body> {
    req.headers_mut().remove("sec-gpc");
    req
}

async fn logged(log: &LocalLog) -> Result<Vec<Envelope>> {
    let mut sub = log.subscribe(TOPIC_RAW, "test").await?;
    let records = sub.poll(100, Duration::from_millis(100)).await?;
    Ok(records
        .iter()
        .map(|r| Envelope::from_bytes(&r.payload))
        .collect::<std::result::Result<_, _>>()?)
}

const IDENTITY_KEY: [u8; 32] = [0x5a; 32];

fn setup(options: LocalLogOptions) -> Result<(tempfile::TempDir, Arc<LocalLog>, axum::Router)> {
    setup_with(options, |_| {})
}

fn setup_with(
    options: LocalLogOptions,
    adjust: impl FnOnce(&mut Config),
) -> Result<(tempfile::TempDir, Arc<LocalLog>, axum::Router)> {
    let dir = tempfile::tempdir()?;
    let mut config = Config {
        data_dir: dir.path().to_owned(),
        ..Config::default()
    };
    config.ingest.trusted_proxies = vec!["10.0.0.0/8".parse()?];
    config.ingest.limits.rate_per_second = 0;
    adjust(&mut config);
    let log = Arc::new(LocalLog::open(config.log_dir(), options)?);
    let privacy = IngestPrivacy {
        keys: Arc::default(),
        opt_outs: Arc::default(),
        subject_keys: SubjectKeys::from_seed(9),
        identity_key: Some(Arc::new(SecretKey::from_bytes(IDENTITY_KEY))),
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
    let error = answer["error"].as_str().unwrap_or_default();
    assert!(error.contains("retry later"), "{answer}");
    // the caller is anonymous: no path, lock or log detail in what it is told
    for detail in ["lock", "/", "raw", "writer", "errno"] {
        assert!(!error.contains(detail), "`{detail}` leaked: {answer}");
    }
    drop(lock);
    assert!(logged(&log).await?.is_empty(), "nothing was written");
    Ok(())
}

fn token(uid: &str, exp_in_secs: i64, key: [u8; 32]) -> String {
    let claims = IdentityClaims {
        uid: uid.to_owned(),
        exp: chrono::Utc::now().timestamp() + exp_in_secs,
        age_band: Some("25-34".into()),
        gender: Some("female".into()),
    };
    sign(&SecretKey::from_bytes(key), &claims)
}

/// An account, and an age and gender with it, count only inside a token the site signed.
#[tokio::test(flavor = "multi_thread")]
async fn forged_identities_are_anonymous_and_signed_ones_count() -> Result {
    let (_dir, log, router) = setup(LocalLogOptions::default())?;
    let valid = token("u-real", 3600, IDENTITY_KEY);
    let expired = token("u-real", -10, IDENTITY_KEY);
    let other_key = token("u-real", 3600, [0x11; 32]);
    // the valid token's payload with another account's claims, under the valid signature
    let valid_signature = valid.rsplit_once('.').map(|(_, s)| s).unwrap_or_default();
    let forged_payload = token("u-victim", 3600, [0x11; 32]);
    let tampered = format!(
        "{}.{valid_signature}",
        forged_payload.rsplit_once('.').map(|(p, _)| p).unwrap_or_default()
    );
    let cases = [
        (
            "forged",
            serde_json::json!({"user_id": "u-victim", "demographics": {"age_band": "55-64", "gender": "male"}}),
        ),
        ("signed", serde_json::json!({"identity": valid})),
        (
            "signed-other-body-user",
            serde_json::json!({"identity": valid, "user_id": "u-victim"}),
        ),
        ("expired", serde_json::json!({"identity": expired, "user_id": "u-real"})),
        ("other-key", serde_json::json!({"identity": other_key})),
        ("tampered", serde_json::json!({"identity": tampered})),
        ("garbage", serde_json::json!({"identity": "v1.bm90.aGk"})),
    ];
    for (id, extra) in &cases {
        // with personalisation consent and no GPC: declared demographics are kept only then
        let mut event = serde_json::json!({"type": "page_view", "url": "https://kulshi.example/en/cars",
            "event_id": id, "consent": {"personalisation": true}});
        if let (Some(e), Some(x)) = (event.as_object_mut(), extra.as_object()) {
            e.extend(x.clone());
        }
        let resp = router
            .clone()
            .oneshot(without_gpc(request("127.0.0.1:1", None, &event.to_string())?))
            .await?;
        assert_eq!(
            resp.status(),
            StatusCode::ACCEPTED,
            "{id}: sent as anonymous, not refused"
        );
    }
    // a signed visitor whose browser sends GPC: the account counts, the demographics are not logged
    let gpc = serde_json::json!({"type": "page_view", "url": "https://kulshi.example/", "event_id": "signed-gpc",
        "identity": token("u-real", 3600, IDENTITY_KEY), "consent": {"personalisation": true}});
    router
        .clone()
        .oneshot(request("127.0.0.1:1", None, &gpc.to_string())?)
        .await?;
    let envs = logged(&log).await?;
    assert_eq!(envs.len(), cases.len() + 1);
    for env in &envs {
        let id = env.event.event_id.as_deref().unwrap_or_default();
        assert!(env.event.identity.is_none(), "{id}: the token itself is not kept");
        if id == "signed-gpc" {
            assert_eq!(env.event.user_id.as_deref(), Some("u-real"));
            assert_eq!(env.event.demographics, None, "GPC: no demographics even in the raw log");
        } else if id.starts_with("signed") {
            assert_eq!(env.event.user_id.as_deref(), Some("u-real"), "{id}");
            let d = env.event.demographics.clone().unwrap_or_default();
            assert_eq!(
                (d.age_band.as_deref(), d.gender.as_deref()),
                (Some("25-34"), Some("female")),
                "{id}"
            );
        } else {
            assert_eq!(env.event.user_id, None, "{id}: no account without a valid token");
            assert_eq!(
                env.event.demographics, None,
                "{id}: no demographics without a valid token"
            );
        }
    }
    Ok(())
}

/// One address past its rate gets 429 with `Retry-After`; another address is served meanwhile.
#[tokio::test(flavor = "multi_thread")]
async fn a_burst_past_the_rate_gets_429_while_others_are_served() -> Result {
    let (_dir, _log, router) = setup_with(LocalLogOptions::default(), |c| {
        c.ingest.limits.rate_per_second = 2;
        c.ingest.limits.rate_burst = 5;
    })?;
    let mut statuses = Vec::new();
    let mut retry_after = None;
    for _ in 0..20 {
        let resp = router.clone().oneshot(request("198.51.100.7:1", None, EVENT)?).await?;
        if resp.status() == StatusCode::TOO_MANY_REQUESTS {
            retry_after = resp
                .headers()
                .get("retry-after")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
        }
        statuses.push(resp.status().as_u16());
    }
    let served = statuses.iter().filter(|s| **s == 202).count();
    assert!((5..=7).contains(&served), "the burst and no more: {statuses:?}");
    assert!(statuses.contains(&429), "{statuses:?}");
    let secs: u64 = retry_after.as_deref().unwrap_or("").parse()?;
    assert!((1..=60).contains(&secs), "Retry-After {secs}");
    // behind a trusted proxy, each visitor has its own allowance
    let other = router
        .clone()
        .oneshot(request("10.0.0.1:1", Some("176.29.1.2"), EVENT)?)
        .await?;
    assert_eq!(other.status(), StatusCode::ACCEPTED);
    let other = router.clone().oneshot(request("203.0.113.9:1", None, EVENT)?).await?;
    assert_eq!(other.status(), StatusCode::ACCEPTED);
    Ok(())
}

/// An opt-out sent again and again is recorded once: the opt-out log every stage replays at
/// start grows with distinct opt-outs only, however often a client repeats one.
#[tokio::test(flavor = "multi_thread")]
async fn a_repeated_opt_out_is_recorded_once() -> Result {
    let (_dir, log, router) = setup_with(LocalLogOptions::default(), |c| c.ingest.opt_out_rate_per_minute = 1000)?;
    let opt_out = |scope: &str| -> Result<Request<Body>> {
        let mut req = Request::post("/v1/opt-outs")
            .header("cookie", "_mid=c-repeater")
            .body(Body::from(format!("{{\"scope\":\"{scope}\"}}")))?;
        req.extensions_mut()
            .insert(ConnectInfo("198.51.100.20:1".parse::<SocketAddr>()?));
        Ok(req)
    };
    for i in 0..50 {
        let resp = router.clone().oneshot(opt_out("personalisation")?).await?;
        assert_eq!(resp.status(), StatusCode::ACCEPTED);
        let answer: serde_json::Value = serde_json::from_slice(&resp.into_body().collect().await?.to_bytes())?;
        assert_eq!(answer["already_in_force"], i > 0, "{answer}");
    }
    assert_eq!(
        log.end_offset(marsad_schemas::TOPIC_OPTOUTS)?,
        1,
        "one record for fifty requests"
    );
    // another scope is another opt-out
    router.clone().oneshot(opt_out("all")?).await?;
    assert_eq!(log.end_offset(marsad_schemas::TOPIC_OPTOUTS)?, 2);
    Ok(())
}
