//! Flags, checked into a valid [`Config`] before anything starts.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Parser, Subcommand, ValueEnum};
use ipnet::IpNet;
use marsad_config::Config;

/// Marsad: privacy-first analytics and event ingestion.
#[derive(Debug, Parser)]
#[command(name = "marsad", version, about)]
pub struct Cli {
    /// Log format.
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true)]
    pub log_format: LogFormat,
    /// More detail in logs (`-v` debug, `-vv` trace); `RUST_LOG` overrides.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,
    /// What to run.
    #[command(subcommand)]
    pub command: Command,
}

/// Log line format.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// The stages and tools.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run ingest, processor and query in one process on one data dir (the embedded default).
    Up(UpArgs),
    /// Run the collection endpoint alone.
    Ingest(StageArgs),
    /// Run the stream processor alone.
    Process(StageArgs),
    /// Run the query service alone.
    Query(StageArgs),
    /// Send realistic classified-ads traffic to an ingest endpoint.
    Simulate(crate::simulate::SimulateArgs),
    /// Scan every table file for IP addresses, e-mails, phone numbers and raw ids; fails on any.
    Audit(crate::tools::AuditArgs),
    /// Delete every row linkable to a cookie or user id (records an `all` opt-out first).
    Erase(crate::tools::EraseArgs),
    /// Record an opt-out for a cookie or user id.
    OptOut(crate::tools::OptOutArgs),
    /// Run one read-only SQL statement on the data dir (or a query service); table, CSV, NDJSON or Parquet.
    Sql(crate::jobs::SqlArgs),
    /// Merge partial rollup rows and rewrite small table files into large ones.
    Compact(crate::jobs::CompactArgs),
    /// Delete dates older than --keep-days from every table and remove their files.
    Retention(crate::jobs::RetentionArgs),
    /// Rebuild the rows of a range of dates from the retained raw log, with the current rules.
    Backfill(crate::jobs::BackfillArgs),
    /// Audience segments: materialize them now.
    #[command(subcommand)]
    Segments(SegmentsCommand),
    /// Kafka topics of the event log.
    #[command(subcommand)]
    Topics(TopicsCommand),
    /// The long-lived keys the stages share.
    #[command(subcommand)]
    Keys(KeysCommand),
    /// Scheduled e-mail reports (`[[reports.email]]`).
    #[command(subcommand)]
    Report(ReportCommand),
}

/// `marsad report …`.
#[derive(Debug, Subcommand)]
pub enum ReportCommand {
    /// Send the e-mail reports that are due and not sent yet (as `marsad up` does every
    /// minute), or with `--now` send them at once for the period they would cover today
    /// (a test send: the schedule is left as it is).
    Send(ReportSendArgs),
}

/// `marsad report send` flags.
#[derive(Debug, Clone, Args)]
pub struct ReportSendArgs {
    /// Data dir and config.
    #[command(flatten)]
    pub stage: StageArgs,
    /// Send now, whatever the schedule says.
    #[arg(long)]
    pub now: bool,
    /// Only this report [default: every configured one].
    #[arg(long)]
    pub id: Option<String>,
}

/// `marsad keys …`.
#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// After rotating the targeting key on purpose: record the new key (from
    /// MARSAD_SECRET_TARGETING_KEY or privacy.targeting_key_file) as the one every stage must
    /// use. Opt-outs stay in force (they are recorded under the opt-out key).
    AdoptTargeting(StageArgs),
}

/// `marsad topics …`.
#[derive(Debug, Subcommand)]
pub enum TopicsCommand {
    /// Create the raw, dead-letter and opt-out topics (existing ones are left as they are).
    Create(TopicsCreateArgs),
}

/// `marsad topics create` flags.
#[derive(Debug, Clone, Args)]
pub struct TopicsCreateArgs {
    /// Config naming the brokers (`[eventlog] kind = "kafka"`).
    #[command(flatten)]
    pub stage: StageArgs,
    /// Partitions of the raw and dead-letter topics [default: eventlog.partitions].
    #[arg(long)]
    pub partitions: Option<u32>,
    /// Copies of each partition [default: eventlog.replication_factor].
    #[arg(long)]
    pub replication: Option<u32>,
    /// Hours the raw and dead-letter topics keep events [default: eventlog.retention_hours and
    /// eventlog.dead_letter_retention_hours].
    #[arg(long)]
    pub retention_hours: Option<f64>,
}

/// `marsad segments …`.
#[derive(Debug, Subcommand)]
pub enum SegmentsCommand {
    /// Re-materialize every configured segment into `segment_members` now, with progress.
    Refresh(StageArgs),
}

/// Flags every stage shares; each overrides the config file and `MARSAD_*` variables.
#[derive(Debug, Clone, Args)]
pub struct StageArgs {
    /// Configuration file (TOML); `MARSAD_SECTION__KEY` variables override it.
    #[arg(long, env = "MARSAD_CONFIG")]
    pub config: Option<PathBuf>,
    /// Data directory: event log, tables, keys [default: ./marsad-data].
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Ingest listen address [default: 127.0.0.1:8080].
    #[arg(long)]
    pub ingest_addr: Option<SocketAddr>,
    /// Query listen address [default: 127.0.0.1:8081].
    #[arg(long)]
    pub query_addr: Option<SocketAddr>,
    /// Postgres wire protocol listen address [default: 127.0.0.1:5433].
    #[arg(long)]
    pub pg_addr: Option<SocketAddr>,
    /// Arrow Flight SQL listen address [default: off].
    #[arg(long)]
    pub flight_addr: Option<SocketAddr>,
    /// A proxy whose X-Forwarded-For is believed (CIDR; repeatable).
    #[arg(long = "trusted-proxy", value_name = "CIDR")]
    pub trusted_proxies: Vec<IpNet>,
}

/// `marsad up` flags.
#[derive(Debug, Clone, Args)]
pub struct UpArgs {
    /// Stage flags.
    #[command(flatten)]
    pub stage: StageArgs,
    /// Also simulate this many events per second against the own ingest endpoint
    /// (trusts 127.0.0.1 as a proxy so simulated visitors keep their addresses).
    #[arg(long, value_name = "EVENTS_PER_SEC")]
    pub simulate: Option<u32>,
}

impl StageArgs {
    /// Loads the configuration and applies the flags.
    pub fn config(&self) -> anyhow::Result<Config> {
        let mut config = Config::load(self.config.as_deref()).context("loading configuration")?;
        if let Some(d) = &self.data_dir {
            config.data_dir = d.clone();
        }
        if let Some(a) = self.ingest_addr {
            config.ingest.addr = a;
        }
        if let Some(a) = self.query_addr {
            config.query.addr = a;
        }
        if let Some(a) = self.pg_addr {
            config.query.pg_addr = a;
        }
        if let Some(a) = self.flight_addr {
            config.query.flight_addr = Some(a);
        }
        config
            .ingest
            .trusted_proxies
            .extend(self.trusted_proxies.iter().copied());
        config.validate().context("checking configuration")?;
        Ok(config)
    }
}

/// Sets up `tracing`: text or JSON, `RUST_LOG` wins over `-v`.
pub fn init_tracing(format: LogFormat, verbose: u8) {
    let default = match verbose {
        0 => "info",
        1 => "debug",
        _ => "trace",
    };
    // Marsad's own lines at the chosen level; libraries only when something needs attention,
    // and never deltalake's per-file note that binary columns (the visitor sketches) carry
    // no statistics (new rollup tables skip them; older ones would log it on every commit)
    let ours = [
        "marsad",
        "marsad_schemas",
        "marsad_config",
        "marsad_eventlog",
        "marsad_privacy",
        "marsad_tables",
        "marsad_admin",
        "marsad_ingest",
        "marsad_process",
        "marsad_query",
    ]
    .map(|c| format!("{c}={default}"))
    .join(",");
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new(format!("warn,{ours},deltalake_core::writer::stats=error"))
    });
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}
