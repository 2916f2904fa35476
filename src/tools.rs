//! Operator commands: `marsad audit`, `marsad erase`, `marsad opt-out`, `marsad segments refresh`.

use std::collections::HashSet;
use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::{Args, ValueEnum};
use marsad_eventlog::Followed;
use marsad_schemas::TOPIC_RAW;
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

/// Scans every table file for personal data; fails on any finding.
pub async fn audit(args: AuditArgs) -> anyhow::Result<()> {
    let config = args.stage.config()?;
    let known = raw_identifiers(&config).await?;
    let report = marsad_admin::audit::audit(&config.tables()?, known).await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        for hit in &report.hits {
            println!(
                "{:<10} table {} column {} value {} in {}",
                hit.kind, hit.table, hit.column, hit.redacted, hit.file
            );
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
    Ok(())
}

/// The cookie ids, user ids and IPs of every event the raw log still holds: on the local log
/// from its segments, on Kafka by reading `marsad.events.raw` to its end.
async fn raw_identifiers(config: &marsad_config::Config) -> anyhow::Result<HashSet<String>> {
    if config.eventlog.kind == marsad_config::EventLogKind::Local {
        let log_dir = config.log_dir();
        return Ok(tokio::task::spawn_blocking(move || marsad_admin::audit::raw_log_identifiers(&log_dir)).await??);
    }
    let logs = crate::stages::open_log(config, "audit")?;
    let mut ids = HashSet::new();
    let caught_up = CancellationToken::new();
    let done = caught_up.clone();
    let mut records = 0u64;
    let apply = |f: Followed<'_>| match f {
        Followed::Record(r) => {
            records += 1;
            if records.is_multiple_of(100_000) {
                eprintln!("audit: {records} raw events read from Kafka");
            }
            marsad_admin::audit::add_identifiers(&r.payload, &mut ids);
        }
        Followed::CaughtUp => done.cancel(),
    };
    marsad_eventlog::follow(logs.log.as_ref(), TOPIC_RAW, apply, caught_up.cancelled())
        .await
        .context("reading the raw events from Kafka")?;
    Ok(ids)
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
        .bearer_auth(key)
        .send()
        .await
        .with_context(|| format!("calling {}", args.url))?;
    let status = resp.status();
    let body: Value = resp.json().await.unwrap_or(Value::Null);
    if !status.is_success() {
        bail!(
            "erasure refused ({status}): {}",
            body["error"].as_str().unwrap_or("no reason given")
        );
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
    use marsad_schemas::{TOPIC_DEAD, TOPIC_OPTOUTS, TOPIC_RAW};
    let config = args.stage.config()?;
    if config.eventlog.kind != marsad_config::EventLogKind::Kafka {
        bail!("the event log is local, which needs no topics; set [eventlog] kind = \"kafka\" and brokers");
    }
    let partitions = args.partitions.unwrap_or(config.eventlog.partitions);
    let replication = args.replication.unwrap_or(config.eventlog.replication_factor);
    let retention_ms = (args.retention_hours.unwrap_or(config.eventlog.retention_hours) * 3_600_000).to_string();
    let deleted_after = |ms: &str| {
        vec![
            ("cleanup.policy".to_owned(), "delete".to_owned()),
            ("retention.ms".to_owned(), ms.to_owned()),
        ]
    };
    let topics = [
        TopicSpec {
            name: TOPIC_RAW.into(),
            partitions,
            replication,
            config: deleted_after(&retention_ms),
        },
        TopicSpec {
            name: TOPIC_DEAD.into(),
            partitions,
            replication,
            config: deleted_after(&retention_ms),
        },
        // a day's key must really be gone soon after its tombstones: compact promptly
        TopicSpec {
            name: marsad_schemas::TOPIC_DAILY_KEYS.into(),
            partitions: 1,
            replication,
            config: vec![
                ("cleanup.policy".to_owned(), "compact".to_owned()),
                ("retention.ms".to_owned(), "-1".to_owned()),
                ("segment.ms".to_owned(), "3600000".to_owned()),
                ("delete.retention.ms".to_owned(), "3600000".to_owned()),
                ("min.cleanable.dirty.ratio".to_owned(), "0.01".to_owned()),
            ],
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
    ];
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
    }
    println!(
        "{} topics created, {} existed, on {}",
        created.iter().filter(|c| c.1).count(),
        created.iter().filter(|c| !c.1).count(),
        config.eventlog.brokers
    );
    Ok(())
}
