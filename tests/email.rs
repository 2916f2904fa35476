//! Scheduled e-mail reports delivered to a real SMTP server the test starts (Python's
//! aiosmtpd, STARTTLS and AUTH required, under a test certificate authority): a test send
//! with `marsad report send --now` while `marsad up` runs, then the scheduled send `marsad up`
//! makes of a report it has not sent, and no second send of it after a restart. Each message
//! is parsed as a mail client would: subject, figures, an inline chart image, the language.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use serde_json::{Value, json};

use crate::common::{Marsad, TestCertificate, free_port, marsad_bin, write_fixture_geoip};

const SMTP_USER: &str = "marsad-reports";
const SMTP_PASSWORD: &str = "smtp-password-from-the-environment";
const VISITORS: usize = 60;

/// The SMTP server, stopped when dropped.
struct SmtpSink {
    child: Child,
    dir: PathBuf,
}

impl SmtpSink {
    fn start(port: u16, certificate: &TestCertificate, dir: &Path) -> Result<Self> {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/smtp_sink.py");
        let mut child = Command::new("python3")
            .arg(script)
            .arg(port.to_string())
            .arg(&certificate.cert)
            .arg(&certificate.key)
            .arg(dir)
            .args([SMTP_USER, SMTP_PASSWORD])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .context("starting aiosmtpd")?;
        let mut line = String::new();
        BufReader::new(child.stdout.take().context("stdout")?).read_line(&mut line)?;
        ensure!(line.trim() == "ready", "aiosmtpd did not start: {line}");
        Ok(SmtpSink {
            child,
            dir: dir.to_owned(),
        })
    }

    /// The messages received so far, parsed, with what the server saw of each.
    fn messages(&self) -> Result<Vec<(Value, Value)>> {
        let mut emls: Vec<PathBuf> = std::fs::read_dir(&self.dir)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "eml"))
            .collect();
        emls.sort();
        let parser = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/parse_eml.py");
        emls.iter()
            .map(|eml| {
                let out = Command::new("python3").arg(parser).arg(eml).output()?;
                ensure!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
                let parsed: Value = serde_json::from_slice(&out.stdout)?;
                let seen: Value = serde_json::from_slice(&std::fs::read(eml.with_extension("json"))?)?;
                Ok((parsed, seen))
            })
            .collect()
    }

    fn wait_for(&self, n: usize, timeout: Duration) -> Result<Vec<(Value, Value)>> {
        let deadline = Instant::now() + timeout;
        loop {
            let messages = self.messages()?;
            if messages.len() >= n {
                return Ok(messages);
            }
            if Instant::now() > deadline {
                bail!("{} of {n} messages after {timeout:?}", messages.len());
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for SmtpSink {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `VISITORS` visitors of Jordan yesterday, two page views each (one on a page whose path tries
/// to write HTML). `None` in the two minutes before midnight UTC, when it would be today.
fn yesterday(m: &Marsad) -> Result<Option<usize>> {
    let Some(at) = crate::common::late_yesterday() else {
        return Ok(None);
    };
    let mut events = Vec::new();
    for v in 0..VISITORS {
        for (i, url) in [
            "https://kulshi.example/en/cars/kia",
            "https://kulshi.example/en/<b>bold</b>",
        ]
        .iter()
        .enumerate()
        {
            events.push(
                json!({"type": "page_view", "url": url, "cookie_id": format!("c-mail-{v}"),
                "event_id": format!("c-mail-{v}-{i}"), "ts": at.to_rfc3339(),
                "referrer": "https://www.google.com/search?q=cars", "consent": {"analytics": true}}),
            );
        }
    }
    crate::common::post_events_from(m, "JO", None, &events)?;
    Ok(Some(events.len()))
}

/// The figure of `measure` in a message's key figures, as a number.
fn figure(html: &str, measure: &str) -> Option<i64> {
    let at = html.find(&format!("data-measure=\"{measure}\""))?;
    let rest = &html[at..];
    let start = rest.find("class=\"figure\"")?;
    let text = &rest[start..];
    let open = text.find('>')? + 1;
    let close = text.find("</div>")?;
    let digits: String = text[open..close].chars().filter(char::is_ascii_digit).collect();
    digits.parse().ok()
}

/// Checks one delivered report: over TLS, authenticated, to its recipient, the key figures
/// near the truth, a chart inline that the HTML shows, the language and direction.
fn check_message(parsed: &Value, seen: &Value, to: &str, arabic: bool) -> Result<()> {
    ensure!(seen["tls"] == json!(true), "STARTTLS: {seen}");
    ensure!(seen["authenticated"] == json!(true), "AUTH: {seen}");
    ensure!(seen["rcpt_tos"] == json!([to]), "{seen}");
    let subject = parsed["subject"].as_str().context("subject")?;
    let html = parsed["html"].as_str().context("an HTML part")?;
    let text = parsed["text"].as_str().context("a text part")?;
    if arabic {
        ensure!(subject.contains("التقرير الأسبوعي"), "{subject}");
        ensure!(html.contains("lang=\"ar\" dir=\"rtl\""), "{html}");
        ensure!(html.contains("الزوار") && text.contains("الزوار"), "{html}");
    } else {
        ensure!(subject.contains("Daily report"), "{subject}");
        ensure!(html.contains("lang=\"en\" dir=\"ltr\""), "{html}");
        ensure!(html.contains("Visitors"), "{html}");
    }
    let visitors = figure(html, "visitors").context("the visitors figure")?;
    let page_views = figure(html, "page_views").context("the page views figure")?;
    // the noise is tiny at this ε (the test sets it so): within a few of the truth
    ensure!(
        (visitors - VISITORS as i64).abs() <= 3,
        "visitors {visitors}, sent {VISITORS}"
    );
    ensure!((page_views - 2 * VISITORS as i64).abs() <= 6, "page views {page_views}");
    // the path that tried to write HTML is text in the message
    ensure!(!html.contains("<b>bold</b>"), "unescaped HTML from a path: {html}");
    let images = parsed["images"].as_array().context("images")?;
    ensure!(!images.is_empty(), "a chart attached: {parsed}");
    for image in images {
        ensure!(
            image["type"] == json!("image/png") && image["png"] == json!(true),
            "{image}"
        );
        ensure!(image["disposition"] == json!("inline"), "{image}");
        ensure!(image["width"] == json!(640) && image["height"] == json!(220), "{image}");
        let cid = image["cid"].as_str().context("Content-ID")?;
        ensure!(html.contains(&format!("src=\"cid:{cid}\"")), "the HTML shows {cid}");
    }
    Ok(())
}

fn run_report_send(data_dir: &Path, config: &Path, args: &[&str]) -> Result<String> {
    let out = Command::new(marsad_bin())
        .args(["report", "send", "--data-dir"])
        .arg(data_dir)
        .arg("--config")
        .arg(config)
        .args(args)
        .envs(crate::common::test_env())
        .env("MARSAD_SECRET_SMTP_PASSWORD", SMTP_PASSWORD)
        .output()?;
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    ensure!(
        out.status.success(),
        "marsad report send {args:?}: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(stdout)
}

#[test]
fn scheduled_reports_reach_a_local_smtp_server_over_starttls() -> Result<()> {
    if !crate::common::tools_for(
        "scheduled_reports_reach_a_local_smtp_server_over_starttls",
        &[crate::common::Tool::Aiosmtpd],
    )? {
        return Ok(());
    }
    let tmp = tempfile::tempdir()?;
    let certificate = TestCertificate::write(tmp.path())?;
    let ca = tmp.path().join("ca.pem");
    std::fs::write(&ca, &certificate.ca_pem)?;
    let inbox = tmp.path().join("inbox");
    std::fs::create_dir_all(&inbox)?;
    let smtp_port = free_port()?;
    let sink = SmtpSink::start(smtp_port, &certificate, &inbox)?;

    let geoip = tmp.path().join("geo.mmdb");
    write_fixture_geoip(&geoip)?;
    let config = tmp.path().join("marsad.toml");
    std::fs::write(
        &config,
        format!(
            "[release]\nepsilon_per_measure = 400.0\ndaily_epsilon = 1000000.0\nmin_visitors = 5\n\n\
             [reports.smtp]\nhost = \"localhost\"\nport = {smtp_port}\nfrom = \"Marsad <reports@kulshi.example>\"\n\
             username = \"{SMTP_USER}\"\nca_file = \"{}\"\n\n\
             [[reports.email]]\nid = \"weekly-ar\"\nrecipients = [\"marketing@kulshi.example\"]\n\
             schedule = \"weekly\"\nlanguage = \"ar\"\nviews = [\"traffic\", \"sources\", \"pages\"]\n\n\
             [[reports.email]]\nid = \"daily-en\"\nrecipients = [\"ceo@kulshi.example\"]\n\
             schedule = \"daily\"\nlanguage = \"en\"\nviews = [\"traffic\", \"geo\"]\nhour_utc = 0\n",
            ca.display()
        ),
    )?;
    let data_dir = tmp.path().join("data");
    let smtp_env = [("MARSAD_SECRET_SMTP_PASSWORD", SMTP_PASSWORD.to_owned())];
    let mut quiet = smtp_env.to_vec();
    // the first run only collects: nothing is sent on schedule
    quiet.push(("MARSAD_REPORTS__SEND_SCHEDULED", "false".to_owned()));
    let m = Marsad::start_with_env(&data_dir, Some(&geoip), Some(&config), &quiet)?;
    let Some(sent) = yesterday(&m)? else {
        eprintln!("SKIPPED: two minutes before midnight UTC, yesterday is today");
        return Ok(());
    };
    m.wait_for_count(
        "SELECT sum(events) FROM traffic_hourly",
        sent as i64,
        Duration::from_secs(60),
    )?;
    ensure!(sink.messages()?.is_empty(), "nothing sent on schedule when told not to");

    // a test send while the service runs
    let out = run_report_send(&data_dir, &config, &["--now", "--id", "weekly-ar"])?;
    ensure!(out.contains("sent weekly-ar") && out.contains("1 recipient"), "{out}");
    let messages = sink.wait_for(1, Duration::from_secs(10))?;
    ensure!(messages.len() == 1, "one report, one recipient");
    let (parsed, seen) = &messages[0];
    check_message(parsed, seen, "marketing@kulshi.example", true)?;
    let html = parsed["html"].as_str().unwrap_or_default();
    ensure!(
        html.contains("data-view=\"sources\"") && html.contains("data-view=\"pages\""),
        "{html}"
    );
    ensure!(html.contains("بحث مجاني"), "the channel named in Arabic: {html}");
    ensure!(
        html.contains("/en/&lt;b&gt;bold&lt;/b&gt;"),
        "the path, escaped: {html}"
    );
    ensure!(
        parsed["images"].as_array().map(Vec::len) == Some(3),
        "a chart per view: {parsed}"
    );
    drop(m);

    // `marsad up` sends what it finds due and not sent: the daily report of yesterday, and the
    // weekly one of the latest Monday's week (the test send did not count as that)
    let m = Marsad::start_with_env(&data_dir, Some(&geoip), Some(&config), &smtp_env)?;
    let messages = sink.wait_for(3, Duration::from_secs(30))?;
    let to = |who: &str| -> Vec<&(Value, Value)> {
        messages
            .iter()
            .filter(|(_, seen)| seen["rcpt_tos"] == json!([who]))
            .collect()
    };
    let daily = to("ceo@kulshi.example");
    ensure!(daily.len() == 1, "one daily report: {messages:?}");
    check_message(&daily[0].0, &daily[0].1, "ceo@kulshi.example", false)?;
    let weekly = to("marketing@kulshi.example");
    ensure!(
        weekly.len() == 2,
        "the test send and the scheduled weekly report: {messages:?}"
    );
    let subject = weekly[1].0["subject"].as_str().unwrap_or_default();
    ensure!(subject.contains("التقرير الأسبوعي"), "{subject}");
    let record: Value = serde_json::from_slice(&std::fs::read(data_dir.join("reports/sent.json"))?)?;
    let yesterday = crate::common::late_yesterday().context("yesterday")?.date_naive();
    ensure!(record["daily-en"] == json!(yesterday.to_string()), "{record}");
    drop(m);

    // after a restart nothing is sent again
    let m = Marsad::start_with_env(&data_dir, Some(&geoip), Some(&config), &smtp_env)?;
    std::thread::sleep(Duration::from_secs(4));
    let after = sink.messages()?.len();
    drop(m);
    ensure!(after == 3, "sent again after a restart: {after} messages");

    // a wrong password is refused by the server, and the error says where
    let out = Command::new(marsad_bin())
        .args(["report", "send", "--now", "--id", "daily-en", "--data-dir"])
        .arg(&data_dir)
        .arg("--config")
        .arg(&config)
        .envs(crate::common::test_env())
        .env("MARSAD_SECRET_SMTP_PASSWORD", "wrong")
        .output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(
        !out.status.success() && stderr.contains(&format!("localhost:{smtp_port}")),
        "{stderr}"
    );
    ensure!(stderr.contains("535"), "the server's refusal is shown: {stderr}");
    Ok(())
}
