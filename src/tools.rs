//! Operator commands: `marsad audit`, `marsad erase`, `marsad opt-out`, `marsad segments refresh`.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, ValueEnum};
use marsad_admin::audit::{OldestRecord, RawLogContents};
use marsad_eventlog::Followed;
use marsad_schemas::{TOPIC_DEAD, TOPIC_RAW};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use crate::cli::StageArgs;

/// `marsad audit` flags.
#[derive(Debug, Clone, Args)]
pub struct AuditArgs {
    /// Data dir and config.
    #[command(flatten)]
    pub stage: StageArgs,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

/// Scans every table file for personal data and holds the raw log's oldest records against
/// the retention promise; fails on any finding and on any record kept past the promise.
pub async fn audit(args: AuditArgs) -> anyhow::Result<()> {
    let config = args.stage.config()?;
    let raw = raw_log_contents(&config).await?;
    let report = marsad_admin::audit::audit(&config.tables()?, raw.identifiers).await?;
    let now = chrono::Utc::now();
    let retention = retention_promises(&config);
    let mut kept_too_long = Vec::new();
    let ages: Vec<Value> = raw
        .oldest
        .iter()
        .map(|o| {
            let (promise, deleted_within) = retention
                .iter()
                .find(|(t, ..)| *t == o.topic)
                .map(|(_, p, w)| (*p, *w))
                .unwrap_or_default();
            let age = o.written_at.map(|at| (now - at).to_std().unwrap_or_default());
            if age.is_some_and(|a| a > deleted_within) {
                kept_too_long.push(o.topic.clone());
            }
            json!({
                "topic": o.topic,
                "records": o.records,
                "oldest_written_at": o.written_at,
                "oldest_age_s": age.map(|a| a.as_secs_f64()),
                "retention_s": promise.as_secs_f64(),
                "deleted_within_s": deleted_within.as_secs_f64(),
            })
        })
        .collect();
    if args.json {
        let mut value = serde_json::to_value(&report)?;
        value["raw_log"] = Value::Array(ages);
        println!("{}", serde_json::to_string_pretty(&value)?);
    } else {
        for hit in &report.hits {
            println!(
                "{:<10} table {} column {} value {} in {}",
                hit.kind, hit.table, hit.column, hit.redacted, hit.file
            );
        }
        for o in &raw.oldest {
            let (_, promise, within) = retention
                .iter()
                .find(|(t, ..)| *t == o.topic)
                .copied()
                .unwrap_or_default();
            match o.written_at {
                Some(at) => println!(
                    "{:<24} {} records, the oldest {} old (retention {}, deleted within {}){}",
                    o.topic,
                    o.records,
                    human((now - at).to_std().unwrap_or_default()),
                    human(promise),
                    human(within),
                    if kept_too_long.contains(&o.topic) {
                        ": KEPT PAST THE PROMISE"
                    } else {
                        ""
                    }
                ),
                None => println!("{:<24} empty", o.topic),
            }
        }
        println!(
            "audited {} values in {} files against {} identifiers from the raw log: {} findings",
            report.values,
            report.files,
            report.known_identifiers,
            report.hits.len()
        );
    }
    if !report.hits.is_empty() {
        bail!("personal data found in {} places", report.hits.len());
    }
    if !kept_too_long.is_empty() {
        bail!(
            "raw records kept past the retention promise in {}: is retention running (marsad up or \
             marsad ingest) and is every consumer processing?",
            kept_too_long.join(", ")
        );
    }
    Ok(())
}

/// Per raw topic: its retention and how long after arrival a record is gone at the latest.
fn retention_promises(config: &marsad_config::Config) -> Vec<(&'static str, Duration, Duration)> {
    let e = &config.eventlog;
    [(TOPIC_RAW, e.raw_retention()), (TOPIC_DEAD, e.dead_letter_retention())]
        .into_iter()
        .map(|(topic, retention)| {
            let slack = match e.kind {
                marsad_config::EventLogKind::Local => crate::stages::local_log_options(config).retention_slack(),
                // segment.ms is a quarter of retention; brokers check retention every 5 minutes
                marsad_config::EventLogKind::Kafka => retention / 4 + Duration::from_secs(300),
            };
            (topic, retention, retention + slack)
        })
        .collect()
}

fn human(d: Duration) -> String {
    let s = d.as_secs_f64();
    if s < 120.0 {
        format!("{s:.1} s")
    } else if s < 7200.0 {
        format!("{:.1} min", s / 60.0)
    } else {
        format!("{:.1} h", s / 3600.0)
    }
}

/// What the raw log still holds: on the local log from its segments (raw events and dead
/// letters), on Kafka by reading `marsad.events.raw` to its end.
async fn raw_log_contents(config: &marsad_config::Config) -> anyhow::Result<RawLogContents> {
    if config.eventlog.kind == marsad_config::EventLogKind::Local {
        let log_dir = config.log_dir();
        return Ok(tokio::task::spawn_blocking(move || marsad_admin::audit::raw_log_contents(&log_dir)).await??);
    }
    let logs = crate::stages::open_log(config, "audit")?;
    let mut contents = RawLogContents::default();
    let mut oldest = OldestRecord {
        topic: TOPIC_RAW.to_owned(),
        records: 0,
        written_at: None,
    };
    let caught_up = CancellationToken::new();
    let done = caught_up.clone();
    let apply = |f: Followed<'_>| match f {
        Followed::Record(r) => {
            oldest.records += 1;
            if oldest.records.is_multiple_of(100_000) {
                eprintln!("audit: {} raw events read from Kafka", oldest.records);
            }
            let at = marsad_admin::audit::record_time(&r.payload).unwrap_or(chrono::DateTime::UNIX_EPOCH);
            oldest.written_at = Some(oldest.written_at.map_or(at, |o| o.min(at)));
            marsad_admin::audit::add_identifiers(&r.payload, &mut contents.identifiers);
        }
        Followed::CaughtUp => done.cancel(),
    };
    marsad_eventlog::follow(logs.log.as_ref(), TOPIC_RAW, apply, caught_up.cancelled())
        .await
        .context("reading the raw events from Kafka")?;
    contents.oldest.push(oldest);
    Ok(contents)
}

/// Who a request is about.
#[derive(Debug, Clone, Args)]
#[group(required = true, multiple = false)]
pub struct SubjectArgs {
    /// The browser's `_mid` cookie id.
    #[arg(long)]
    pub cookie_id: Option<String>,
    /// The account id.
    #[arg(long)]
    pub user_id: Option<String>,
}

impl SubjectArgs {
    fn pair(&self) -> (&'static str, &str) {
        match (&self.cookie_id, &self.user_id) {
            (Some(c), _) => ("cookie_id", c),
            (None, Some(u)) => ("user_id", u),
            (None, None) => ("cookie_id", ""),
        }
    }
}

fn admin_key(key_file: &Option<PathBuf>, data_dir: &Option<PathBuf>) -> anyhow::Result<String> {
    let path = key_file.clone().unwrap_or_else(|| {
        data_dir
            .clone()
            .unwrap_or_else(|| "./marsad-data".into())
            .join("admin.key")
    });
    Ok(std::fs::read_to_string(&path)
        .with_context(|| format!("reading the admin key from {}", path.display()))?
        .trim()
        .to_owned())
}

/// `marsad erase` flags.
#[derive(Debug, Clone, Args)]
pub struct EraseArgs {
    /// Whose data.
    #[command(flatten)]
    pub subject: SubjectArgs,
    /// The query service.
    #[arg(long, default_value = "http://127.0.0.1:8081")]
    pub url: String,
    /// File holding an admin key [default: <data-dir>/admin.key].
    #[arg(long)]
    pub key_file: Option<PathBuf>,
    /// Data dir holding admin.key.
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
}

/// Erases a subject through the query service and prints the receipt.
pub async fn erase(args: EraseArgs) -> anyhow::Result<()> {
    let key = admin_key(&args.key_file, &args.data_dir)?;
    let (kind, id) = args.subject.pair();
    eprintln!("erasing every row linkable to the {kind}; this records an `all` opt-out first…");
    let resp = reqwest::Client::new()
        .delete(format!("{}/v1/subjects", args.url.trim_end_matches('/')))
        .query(&[(kind, id)])
        .bearer_auth(&key)
        .send()
        .await
        .with_context(|| format!("calling {}", args.url))?;
    let status = resp.status();
    let mut body: Value = resp.json().await.unwrap_or(Value::Null);
    if !status.is_success() {
        bail!(
            "erasure refused ({status}): {}",
            body["error"].as_str().unwrap_or("no reason given")
        );
    }
    if status == reqwest::StatusCode::ACCEPTED {
        // still waiting for the processor: follow the receipt until it says how it ended
        let url = format!(
            "{}{}",
            args.url.trim_end_matches('/'),
            body["status_url"].as_str().context("a 202 without a status_url")?
        );
        eprintln!(
            "waiting for the processor to commit past the opt-out (receipt {})…",
            body["receipt_id"]
        );
        loop {
            tokio::time::sleep(std::time::Duration::from_secs(2)).await;
            let resp = reqwest::Client::new()
                .get(&url)
                .bearer_auth(&key)
                .send()
                .await
                .with_context(|| format!("polling {url}"))?;
            let status = resp.status();
            let polled: Value = resp.json().await.unwrap_or(Value::Null);
            if !status.is_success() {
                bail!(
                    "erasure status ({status}): {}",
                    polled["error"].as_str().unwrap_or("none")
                );
            }
            match polled["status"].as_str() {
                Some("waiting") => continue,
                Some("done") => {
                    body = polled["receipt"].clone();
                    break;
                }
                _ => bail!(
                    "erasure failed: {}",
                    polled["error"].as_str().unwrap_or("no reason given")
                ),
            }
        }
    }
    println!("{}", serde_json::to_string_pretty(&body)?);
    Ok(())
}

/// Opt-out scopes.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum Scope {
    /// No collection at all.
    Analytics,
    /// No audience id, no segments.
    Personalisation,
    /// No marketing exports.
    Marketing,
    /// Everything.
    All,
}

/// `marsad opt-out` flags.
#[derive(Debug, Clone, Args)]
pub struct OptOutArgs {
    /// Whose choice.
    #[command(flatten)]
    pub subject: SubjectArgs,
    /// What it covers.
    #[arg(long, value_enum)]
    pub scope: Scope,
    /// The ingest service.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    pub url: String,
    /// File holding an admin key (needed for user ids) [default: <data-dir>/admin.key].
    #[arg(long)]
    pub key_file: Option<PathBuf>,
    /// Data dir holding admin.key.
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
}

/// Records an opt-out through the ingest service.
pub async fn opt_out(args: OptOutArgs) -> anyhow::Result<()> {
    let (kind, id) = args.subject.pair();
    let scope = format!("{:?}", args.scope).to_lowercase();
    let mut req = reqwest::Client::new()
        .post(format!("{}/v1/opt-outs", args.url.trim_end_matches('/')))
        .json(&json!({ kind: id, "scope": scope }));
    if kind == "user_id" {
        req = req.bearer_auth(admin_key(&args.key_file, &args.data_dir)?);
    }
    let resp = req.send().await.with_context(|| format!("calling {}", args.url))?;
    let status = resp.status();
    let body: Value = resp.json().await.unwrap_or(Value::Null);
    if !status.is_success() {
        bail!(
            "opt-out refused ({status}): {}",
            body["error"].as_str().unwrap_or("no reason given")
        );
    }
    println!("opt-out recorded: {kind} out of {scope}");
    Ok(())
}

/// `marsad segments refresh`: materializes every segment now, on the data dir, honouring every
/// opt-out recorded so far; a running query service picks the new members up within seconds.
pub async fn refresh_segments(args: StageArgs) -> anyhow::Result<()> {
    let config = args.config()?;
    if config.audience.segments.is_empty() {
        bail!("no segments are configured: add [[audience.segments]] to the config file");
    }
    let log = crate::stages::open_log(&config, "segments")?.log;
    let opt_outs = opt_outs_recorded(log.as_ref()).await?;
    let bar = indicatif::ProgressBar::new(config.audience.segments.len() as u64).with_style(
        indicatif::ProgressStyle::with_template("{spinner} [{bar:30}] {pos}/{len} segments {msg}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar.set_message("querying events…");
    let started = std::time::Instant::now();
    let summary = marsad_process::segments::refresh(&config.tables()?, &config.audience, &opt_outs, |n, _, s| {
        bar.set_position(n as u64);
        bar.set_message(format!("{}: {}", s.id, if s.served { "served" } else { "held back" }));
    })
    .await?;
    bar.finish_and_clear();
    for s in &summary.segments {
        let status = if s.served {
            format!("served, {} members", s.members)
        } else {
            format!("held back (fewer than {} members)", summary.min_segment_size)
        };
        println!("{:<32} {status}", s.id);
    }
    println!(
        "refreshed {} segments ({} served) in {:.1} s",
        summary.segments.len(),
        summary.segments.iter().filter(|s| s.served).count(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Every opt-out recorded so far in `log`, for a one-off job (a service follows the log instead).
pub async fn opt_outs_recorded(
    log: &dyn marsad_eventlog::EventLog,
) -> anyhow::Result<std::sync::Arc<marsad_privacy::optout::OptOutRegistry>> {
    use marsad_eventlog::Followed;
    let opt_outs = std::sync::Arc::new(marsad_privacy::optout::OptOutRegistry::default());
    let stop = tokio_util::sync::CancellationToken::new();
    let registry = opt_outs.clone();
    let done = stop.clone();
    marsad_eventlog::follow(
        log,
        marsad_schemas::TOPIC_OPTOUTS,
        |f: Followed<'_>| match f {
            Followed::Record(r) => {
                if let Err(e) = registry.apply_bytes(&r.payload) {
                    tracing::error!(error = %e, "undecodable opt-out record");
                }
            }
            Followed::CaughtUp => done.cancel(),
        },
        stop.cancelled(),
    )
    .await
    .context("reading the opt-outs")?;
    Ok(opt_outs)
}

/// `marsad topics create`: the event log's topics on Kafka, with their partitions, replication
/// and retention (the raw and dead-letter topics hold IPs and ids: they keep them only for
/// `retention_hours`; the opt-out log is compacted and kept for good; the daily key topic is
/// compacted promptly so destroyed keys leave the brokers' disks).
pub async fn create_topics(args: crate::cli::TopicsCreateArgs) -> anyhow::Result<()> {
    use marsad_eventlog::{KafkaLog, TopicSpec};
    use marsad_schemas::TOPIC_OPTOUTS;
    let config = args.stage.config()?;
    if config.eventlog.kind != marsad_config::EventLogKind::Kafka {
        bail!("the event log is local, which needs no topics; set [eventlog] kind = \"kafka\" and brokers");
    }
    let partitions = args.partitions.unwrap_or(config.eventlog.partitions);
    let replication = args.replication.unwrap_or(config.eventlog.replication_factor);
    let given = match args.retention_hours {
        Some(h) if h.is_finite() && h > 0.0 => Some(
            Duration::try_from_secs_f64(h * 3600.0)
                .with_context(|| format!("--retention-hours {h} is longer than a topic can keep"))?,
        ),
        Some(h) => bail!("--retention-hours must be a number of hours greater than 0, not {h}"),
        None => None,
    };
    let raw_retention = given.unwrap_or(config.eventlog.raw_retention());
    let dead_retention = given.unwrap_or(config.eventlog.dead_letter_retention());
    // a record is deleted once its segment is closed and older than retention: closing
    // segments at a quarter of retention keeps every record at most 1.25 × retention
    let deleted_after = |retention: Duration| {
        let ms = retention.as_millis().max(1);
        vec![
            ("cleanup.policy".to_owned(), "delete".to_owned()),
            ("retention.ms".to_owned(), ms.to_string()),
            ("segment.ms".to_owned(), (ms / 4).max(1).to_string()),
        ]
    };
    // a compacted topic whose tombstoned keys must leave the brokers' disks soon: the segment
    // holding one closes within 10 minutes and the cleaner must compact it within 10 more; the
    // tombstone itself goes 10 minutes later (README: Data lifecycle)
    let compacted_forgetting_tombstoned_keys = || {
        vec![
            ("cleanup.policy".to_owned(), "compact".to_owned()),
            ("retention.ms".to_owned(), "-1".to_owned()),
            ("segment.ms".to_owned(), "600000".to_owned()),
            ("max.compaction.lag.ms".to_owned(), "600000".to_owned()),
            ("delete.retention.ms".to_owned(), "600000".to_owned()),
            ("min.cleanable.dirty.ratio".to_owned(), "0.01".to_owned()),
        ]
    };
    let topics = [
        TopicSpec {
            name: TOPIC_RAW.into(),
            partitions,
            replication,
            config: deleted_after(raw_retention),
        },
        TopicSpec {
            name: TOPIC_DEAD.into(),
            partitions,
            replication,
            config: deleted_after(dead_retention),
        },
        // a destroyed day's key must leave the brokers' disks soon after its tombstone
        TopicSpec {
            name: marsad_schemas::TOPIC_DAILY_KEYS.into(),
            partitions: 1,
            replication,
            config: compacted_forgetting_tombstoned_keys(),
        },
        TopicSpec {
            name: TOPIC_OPTOUTS.into(),
            partitions: 1,
            replication,
            config: vec![
                ("cleanup.policy".to_owned(), "compact".to_owned()),
                ("retention.ms".to_owned(), "-1".to_owned()),
            ],
        },
        // segment changes for the ad system, keyed by audience_id: the last record of a key is
        // the member's state; an opted-out member's tombstone must take its id off the
        // brokers' disks, as the daily keys' do
        TopicSpec {
            name: config.audience.push.kafka_topic.clone(),
            partitions,
            replication,
            config: compacted_forgetting_tombstoned_keys(),
        },
    ];
    let topics: Vec<TopicSpec> = topics.into_iter().filter(|t| !t.name.is_empty()).collect();
    let log = KafkaLog::connect(crate::stages::kafka_options(&config, "admin"))?;
    let created = log
        .create_topics(&topics)
        .await
        .with_context(|| format!("creating topics on {}", config.eventlog.brokers))?;
    for (name, new) in &created {
        let spec = topics.iter().find(|t| &t.name == name);
        println!(
            "{name:<24} {} ({} partitions, replication {})",
            if *new { "created" } else { "exists" },
            spec.map(|t| t.partitions).unwrap_or(0),
            replication
        );
        if !new && let Some(spec) = spec {
            // an existing topic keeps its settings: say what the retention promise needs
            let settings: Vec<String> = spec.config.iter().map(|(k, v)| format!("{k}={v}")).collect();
            println!(
                "    left as it is; for the retention promise apply: kafka-configs.sh --alter --entity-type topics \
                 --entity-name {name} --add-config {}",
                settings.join(",")
            );
        }
    }
    println!(
        "{} topics created, {} existed, on {}",
        created.iter().filter(|c| c.1).count(),
        created.iter().filter(|c| !c.1).count(),
        config.eventlog.brokers
    );
    Ok(())
}
