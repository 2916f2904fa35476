//! Segment changes pushed to the ad system by `marsad up`: an HTTPS webhook the test runs,
//! which checks every request's HMAC signature and refuses the first ones (so delivery must
//! retry). After a refresh it must hear exactly the served segment's members joining and
//! nothing of a held-back segment; after an opt-out, that member's removal from every segment
//! within a second, without a refresh; after a restart, only what is new.

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Result, bail, ensure};
use hmac::{KeyInit, Mac};
use reqwest::blocking::Client;
use serde_json::{Value, json};

use crate::common::{Marsad, TestCertificate, write_fixture_geoip};

/// The webhook's signing key (hex), shared by `marsad up` and the receiver.
const WEBHOOK_KEY: &str = "3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c";
/// The targeting key `marsad up` is given, so the test knows the members' `audience_id`s.
const TARGETING_KEY: &str = "5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e";
const JO: &str = "176.29.4.4";

/// One request the receiver accepted.
#[derive(Debug, Clone)]
struct Delivery {
    at: Instant,
    changes: Vec<Value>,
}

/// What the receiver saw.
#[derive(Default)]
struct Seen {
    accepted: Vec<Delivery>,
    refused_on_purpose: usize,
    bad_signatures: usize,
}

/// An HTTPS endpoint on a free port that verifies each POST's signature, answers 503 to the
/// first `refuse_first` well-signed ones and 200 to the rest, and keeps what it accepted.
struct Receiver {
    url: String,
    seen: Arc<Mutex<Seen>>,
}

fn verify(signature: &str, body: &[u8]) -> bool {
    let Ok(key) = hex::decode(WEBHOOK_KEY) else {
        return false;
    };
    let (mut t, mut v1) = (None, None);
    for part in signature.split(',') {
        match part.split_once('=') {
            Some(("t", x)) => t = x.parse::<i64>().ok(),
            Some(("v1", x)) => v1 = hex::decode(x).ok(),
            _ => {}
        }
    }
    let (Some(t), Some(v1)) = (t, v1) else { return false };
    // a signature older than five minutes is a replay
    if (chrono::Utc::now().timestamp() - t).abs() > 300 {
        return false;
    }
    let Ok(mut mac) = <hmac::Hmac<sha2::Sha256> as KeyInit>::new_from_slice(&key) else {
        return false;
    };
    mac.update(format!("{t}.").as_bytes());
    mac.update(body);
    mac.verify_slice(&v1).is_ok()
}

impl Receiver {
    fn start(tls: &TestCertificate, refuse_first: usize) -> Result<Self> {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let certs = CertificateDer::pem_file_iter(&tls.cert)
            .map_err(|e| anyhow::anyhow!("{e}"))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let key = PrivateKeyDer::from_pem_file(&tls.key).map_err(|e| anyhow::anyhow!("{e}"))?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = Arc::new(
            rustls::ServerConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()?
                .with_no_client_auth()
                .with_single_cert(certs, key)?,
        );
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        let url = format!("https://127.0.0.1:{}/segments", listener.local_addr()?.port());
        let seen = Arc::new(Mutex::new(Seen::default()));
        let kept = seen.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let (config, seen) = (config.clone(), kept.clone());
                std::thread::spawn(move || {
                    let _ = serve_one(stream, config, &seen, refuse_first);
                });
            }
        });
        Ok(Receiver { url, seen })
    }

    fn deliveries(&self) -> Vec<Delivery> {
        self.seen.lock().map(|s| s.accepted.clone()).unwrap_or_default()
    }

    /// Every change accepted so far, in order.
    fn changes(&self) -> Vec<Value> {
        self.deliveries().into_iter().flat_map(|d| d.changes).collect()
    }

    fn wait_for(&self, what: &str, timeout: Duration, done: impl Fn(&[Value]) -> bool) -> Result<Instant> {
        let deadline = Instant::now() + timeout;
        loop {
            let deliveries = self.deliveries();
            let mut so_far = Vec::new();
            for d in &deliveries {
                so_far.extend(d.changes.iter().cloned());
                if done(&so_far) {
                    return Ok(d.at);
                }
            }
            if Instant::now() > deadline {
                bail!("{what}: not seen within {timeout:?}; received {so_far:?}");
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

/// Reads one HTTP/1.1 request over TLS and answers it (the connection is closed after).
fn serve_one(
    stream: std::net::TcpStream,
    config: Arc<rustls::ServerConfig>,
    seen: &Mutex<Seen>,
    refuse_first: usize,
) -> Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let connection = rustls::ServerConnection::new(config)?;
    let mut tls = rustls::StreamOwned::new(connection, stream);
    let mut request = Vec::new();
    let mut buf = [0u8; 8192];
    let head_end = loop {
        let n = tls.read(&mut buf)?;
        ensure!(n > 0, "closed before the head");
        request.extend_from_slice(&buf[..n]);
        if let Some(i) = request.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
    };
    let head = String::from_utf8_lossy(&request[..head_end]).to_string();
    let header = |name: &str| {
        head.lines()
            .find_map(|l| l.split_once(':').filter(|(k, _)| k.trim().eq_ignore_ascii_case(name)))
            .map(|(_, v)| v.trim().to_owned())
    };
    let length: usize = header("content-length").and_then(|l| l.parse().ok()).unwrap_or(0);
    while request.len() < head_end + length {
        let n = tls.read(&mut buf)?;
        ensure!(n > 0, "closed before the body");
        request.extend_from_slice(&buf[..n]);
    }
    let body = &request[head_end..head_end + length];
    let status = {
        let mut seen = seen.lock().map_err(|_| anyhow::anyhow!("poisoned"))?;
        if !head.starts_with("POST /segments ") || !verify(&header("x-marsad-signature").unwrap_or_default(), body) {
            seen.bad_signatures += 1;
            "401 Unauthorized"
        } else if seen.refused_on_purpose < refuse_first {
            seen.refused_on_purpose += 1;
            "503 Service Unavailable"
        } else {
            let parsed: Value = serde_json::from_slice(body)?;
            seen.accepted.push(Delivery {
                at: Instant::now(),
                changes: parsed["changes"].as_array().cloned().unwrap_or_default(),
            });
            "200 OK"
        }
    };
    write!(
        tls,
        "HTTP/1.1 {status}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
    )?;
    tls.flush()?;
    tls.conn.send_close_notify();
    let _ = tls.flush();
    Ok(())
}

fn audience_id(cookie: &str) -> Result<String> {
    let key = marsad_privacy::keys::SecretKey::from_hex("test targeting key", TARGETING_KEY)?;
    Ok(marsad_privacy::pseudonym::audience_id(
        &key,
        marsad_privacy::pseudonym::Subject::Cookie(cookie),
    ))
}

/// `views` car pages and `clicks` clicks of campaign cmp-7 by `cookie`, with consent to personalisation.
fn send(client: &Client, m: &Marsad, cookie: &str, views: usize, clicks: usize) -> Result<usize> {
    let consent = json!({"analytics": true, "personalisation": true, "marketing": true});
    let mut events: Vec<Value> = (0..views)
        .map(|i| {
            json!({"type": "page_view", "url": format!("https://kulshi.example/ar/سيارات/{i}"),
                "cookie_id": cookie, "event_id": format!("{cookie}-car-{i}"), "consent": consent})
        })
        .collect();
    events.extend((0..clicks).map(|i| {
        json!({"type": "ad_click", "url": "https://kulshi.example/",
            "ad": {"ad_id": "ad-1", "campaign_id": "cmp-7", "placement": "top"},
            "cookie_id": cookie, "event_id": format!("{cookie}-click-{i}"), "consent": consent})
    }));
    let resp = client
        .post(format!("{}/v1/batch", m.ingest))
        .header("x-forwarded-for", JO)
        .json(&events)
        .send()?;
    ensure!(resp.status().as_u16() == 202, "{}", resp.status());
    Ok(events.len())
}

fn opt_out(client: &Client, m: &Marsad, cookie: &str) -> Result<Instant> {
    let resp = client
        .post(format!("{}/v1/opt-outs", m.ingest))
        .header("cookie", format!("_mid={cookie}"))
        .json(&json!({"scope": "personalisation"}))
        .send()?;
    let answered = Instant::now();
    ensure!(resp.status().as_u16() == 202, "opt-out: {}", resp.status());
    Ok(answered)
}

fn start(dir: &std::path::Path, config: &std::path::Path) -> Result<Marsad> {
    Marsad::start_with_env(
        &dir.join("data"),
        Some(&dir.join("geo.mmdb")),
        Some(config),
        &[
            ("MARSAD_SECRET_SEGMENT_WEBHOOK_KEY", WEBHOOK_KEY.into()),
            ("MARSAD_SECRET_TARGETING_KEY", TARGETING_KEY.into()),
        ],
    )
}

#[test]
fn a_signed_webhook_hears_joins_and_opt_outs_at_once_and_nothing_of_a_held_back_segment() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    write_fixture_geoip(&tmp.path().join("geo.mmdb"))?;
    let tls = TestCertificate::write(tmp.path())?;
    let ca = tmp.path().join("webhook-ca.pem");
    std::fs::write(&ca, &tls.ca_pem)?;
    // two refusals first: delivery must retry, and lose nothing
    let receiver = Receiver::start(&tls, 2)?;
    let config = tmp.path().join("marsad.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[audience]
min_segment_size = 3
refresh_interval_secs = 2

[audience.push]
webhook_url = "{}"
webhook_ca_file = "{}"

[[audience.segments]]
id = "car-intenders"
window_days = 14
rules = [{{ event_type = "page_view", page_category = "cars", at_least = 2 }}]

[[audience.segments]]
id = "cmp-7-clickers"
window_days = 14
rules = [{{ event_type = "ad_click", campaign_id = "cmp-7", at_least = 1 }}]
"#,
            receiver.url,
            ca.display()
        ),
    )?;
    let mut m = start(tmp.path(), &config)?;
    let client = Client::new();
    let members: Vec<String> = (0..4).map(|i| format!("car-fan-{i}")).collect();
    let mut sent = 0;
    for c in &members {
        sent += send(&client, &m, c, 3, 0)?;
    }
    // two clickers: under min_segment_size, held back; one browser with too few car views
    sent += send(&client, &m, "clicker-0", 0, 1)?;
    sent += send(&client, &m, "clicker-1", 0, 2)?;
    sent += send(&client, &m, "browser-0", 1, 0)?;
    m.wait_for_count("SELECT count(*) FROM events", sent as i64, Duration::from_secs(60))?;

    let expected: BTreeSet<String> = members.iter().map(|c| audience_id(c)).collect::<Result<_>>()?;
    let joined = |changes: &[Value]| -> BTreeSet<String> {
        changes
            .iter()
            .filter(|c| c["cause"] == "refresh" && c["joined"] == json!(["car-intenders"]))
            .filter_map(|c| c["audience_id"].as_str().map(str::to_owned))
            .collect()
    };
    receiver.wait_for("the members joining", Duration::from_secs(60), |c| {
        joined(c) == expected
    })?;
    std::thread::sleep(Duration::from_secs(3)); // a refresh or two more: nothing changed, nothing sent
    let changes = receiver.changes();
    ensure!(
        changes.len() == expected.len(),
        "one change per member, once: {changes:?}"
    );
    for c in &changes {
        ensure!(
            c["segments"] == json!(["car-intenders"]) && c["left"] == json!([]),
            "{c}"
        );
    }
    ensure!(
        !serde_json::to_string(&changes)?.contains("cmp-7-clickers"),
        "a held-back segment publishes nothing: {changes:?}"
    );
    let (refused, forged) = receiver
        .seen
        .lock()
        .map(|s| (s.refused_on_purpose, s.bad_signatures))
        .map_err(|_| anyhow::anyhow!("poisoned"))?;
    ensure!(refused == 2 && forged == 0, "refused {refused}, badly signed {forged}");

    // an opt-out: out of every segment within a second, without waiting for a refresh
    let quitter = audience_id(&members[0])?;
    let answered = opt_out(&client, &m, &members[0])?;
    let is_removal = |id: String| {
        move |c: &[Value]| {
            c.iter().any(|x| {
                x["audience_id"] == id.as_str()
                    && x["cause"] == "opt_out"
                    && x["segments"] == json!([])
                    && x["left"] == json!(["car-intenders"])
            })
        }
    };
    let heard = receiver.wait_for("the opt-out", Duration::from_secs(10), is_removal(quitter.clone()))?;
    let latency = heard.saturating_duration_since(answered);
    eprintln!("opt-out answered → removal received: {} ms", latency.as_millis());
    ensure!(latency <= Duration::from_secs(1), "the removal took {latency:?}");

    // a restart publishes only what is new: no member joins again, no opt-out twice
    let (before_restart, last_request) = {
        let deliveries = receiver.deliveries();
        let count: usize = deliveries.iter().map(|d| d.changes.len()).sum();
        (count, deliveries.last().map(|d| d.changes.clone()).unwrap_or_default())
    };
    m.kill_hard()?;
    drop(m);
    let m = start(tmp.path(), &config)?;
    let second = audience_id(&members[1])?;
    opt_out(&client, &m, &members[1])?;
    receiver.wait_for(
        "the second opt-out",
        Duration::from_secs(30),
        is_removal(second.clone()),
    )?;
    // the refresh after it counts both opt-outs: two members are left, fewer than
    // min_segment_size, so the segment is held back and every member it had leaves it
    let rest: BTreeSet<String> = members[2..].iter().map(|c| audience_id(c)).collect::<Result<_>>()?;
    let withdrawn = |changes: &[Value]| -> BTreeSet<String> {
        changes
            .iter()
            .filter(|c| c["cause"] == "refresh" && c["left"] == json!(["car-intenders"]) && c["segments"] == json!([]))
            .filter_map(|c| c["audience_id"].as_str().map(str::to_owned))
            .collect()
    };
    receiver.wait_for(
        "the held-back segment's members leaving",
        Duration::from_secs(30),
        |c| rest.is_subset(&withdrawn(c)),
    )?;
    // the hard kill may fall between the receiver's answer and the publisher's record of it:
    // then the last request's changes come again, first, the same changes with the same
    // sequences, which a receiver keeping the last sequence per member drops. Anything else
    // is new, and numbered above.
    let all = receiver.changes();
    let (earlier, after) = all.split_at(before_restart);
    // (the repeats come first: a restart delivers what is pending before anything new)
    let repeats = after.iter().take_while(|c| last_request.contains(c)).count();
    let new: Vec<&Value> = after[repeats..].iter().collect();
    for c in &new {
        ensure!(
            earlier.iter().all(|e| e["sequence"] != c["sequence"]),
            "sequence reused, or an old change sent again after new ones: {c}"
        );
    }
    let removals: Vec<&&Value> = new.iter().filter(|c| c["cause"] == "opt_out").collect();
    ensure!(
        removals.len() == 1 && removals[0]["audience_id"] == second.as_str(),
        "after the restart, only the new opt-out: {after:?}"
    );
    ensure!(
        after.iter().all(|c| c["joined"] == json!([])),
        "nobody joins twice: {after:?}"
    );
    // every change numbered, in the order received, none twice, across the restart
    let sequences: Vec<u64> = earlier
        .iter()
        .chain(new.iter().copied())
        .filter_map(|c| c["sequence"].as_u64())
        .collect();
    ensure!(
        sequences.len() == earlier.len() + new.len() && sequences.windows(2).all(|w| w[0] < w[1]),
        "sequences {sequences:?}"
    );
    let held_back = m.sql_count("SELECT count(*) FROM segment_members WHERE segment_id = 'car-intenders'")?;
    ensure!(held_back == 0, "{held_back} members of a held-back segment");
    Ok(())
}
