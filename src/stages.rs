//! Running the stages, alone or together, with a clean shutdown on Ctrl-C / SIGTERM.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::Context;
use marsad_config::Config;
use marsad_config::EventLogKind;
use marsad_eventlog::Followed;
use marsad_eventlog::{EventLog, KafkaLog, KafkaLogOptions, LocalLog, LocalLogOptions};
use marsad_privacy::access::{AdminKey, ApiKeys};
use marsad_privacy::keys::{DailyKeyStore, SubjectKeys};
use marsad_privacy::optout::OptOutRegistry;
use marsad_privacy::optout::{KeyFingerprintRecord, SharedKey};
use marsad_process::{ProcessMetrics, Processor};
use marsad_query::{QueryPrivacy, QueryState};
use marsad_schemas::{TOPIC_DEAD, TOPIC_OPTOUTS, TOPIC_RAW};
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::cli::{StageArgs, UpArgs};

/// The event log the config names; `local` is set when it is the embedded one (whose
/// retention this process runs).
pub(crate) struct Logs {
    /// The log every stage uses.
    pub log: Arc<dyn EventLog>,
    /// The same log when it is local.
    pub local: Option<Arc<LocalLog>>,
}

/// Opens the event log of `config` for the stage `role` (named in the brokers' logs on Kafka).
pub(crate) fn open_log(config: &Config, role: &str) -> anyhow::Result<Logs> {
    match config.eventlog.kind {
        EventLogKind::Local => {
            let options = local_log_options(config);
            let dir = config.log_dir();
            let local = LocalLog::open(&dir, options)
                .map(Arc::new)
                .with_context(|| format!("opening the event log at {}", dir.display()))?;
            Ok(Logs {
                log: local.clone(),
                local: Some(local),
            })
        }
        EventLogKind::Kafka => {
            let log = KafkaLog::connect(kafka_options(config, role))
                .with_context(|| format!("connecting to Kafka at {}", config.eventlog.brokers))?;
            Ok(Logs {
                log: Arc::new(log),
                local: None,
            })
        }
    }
}

/// The local log's tuning from `[eventlog]`.
pub(crate) fn local_log_options(config: &Config) -> LocalLogOptions {
    LocalLogOptions {
        segment_bytes: config.eventlog.segment_bytes,
        max_pending_appends: config.eventlog.max_pending_appends,
        append_timeout: Duration::from_millis(config.ingest.append_timeout_ms),
        retention: config.eventlog.raw_retention(),
        topic_retention: vec![(TOPIC_DEAD.to_owned(), config.eventlog.dead_letter_retention())],
        retention_bytes: config.eventlog.retention_bytes,
    }
}

/// librdkafka settings from `[eventlog]`, with passwords from the environment only.
pub(crate) fn kafka_options(config: &Config, role: &str) -> KafkaLogOptions {
    let e = &config.eventlog;
    let mut options = KafkaLogOptions::new(e.brokers.clone());
    options.client_id = format!("marsad-{role}");
    options.append_timeout = Duration::from_millis(config.ingest.append_timeout_ms);
    options.max_pending_messages = e.max_pending_messages;
    options.linger = Duration::from_millis(e.linger_ms);
    options.batch_bytes = e.batch_bytes;
    options.compression = e.compression.clone();
    options.session_timeout = Duration::from_millis(e.session_timeout_ms);
    options.properties = e.kafka_client_properties();
    options.seek_from_log_start = e.seek_from_log_start;
    options
}

async fn bind(addr: std::net::SocketAddr, what: &str) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("{what} cannot listen on {addr} (in use? pass --{what}-addr)"))
}

fn shutdown_on_signal() -> CancellationToken {
    let token = CancellationToken::new();
    let t = token.clone();
    tokio::spawn(async move {
        let ctrl_c = tokio::signal::ctrl_c();
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        let term = async {
            match term.as_mut() {
                Some(s) => {
                    s.recv().await;
                }
                None => std::future::pending().await,
            }
        };
        tokio::select! { _ = ctrl_c => {}, _ = term => {} }
        tracing::info!("shutting down: finishing requests in flight and committing buffered events");
        t.cancel();
    });
    token
}

/// The certificate of a listener, re-read when its files change, when it has one.
fn tls_files(
    pair: Option<(&std::path::PathBuf, &std::path::PathBuf)>,
    shutdown: &CancellationToken,
) -> anyhow::Result<Option<Arc<marsad_net::TlsFiles>>> {
    let Some((cert, key)) = pair else { return Ok(None) };
    let files = marsad_net::TlsFiles::load(cert, key)?;
    files.watch(shutdown.clone());
    Ok(Some(files))
}

/// The scheme a listener serves, for the addresses printed at start.
fn scheme(tls: &Option<Arc<marsad_net::TlsFiles>>) -> &'static str {
    if tls.is_some() { "https" } else { "http" }
}

/// Serves the Postgres wire protocol beside the query service, when enabled.
async fn spawn_pg(
    set: &mut JoinSet<anyhow::Result<()>>,
    config: &Config,
    state: QueryState,
    shutdown: CancellationToken,
) -> anyhow::Result<Option<std::net::SocketAddr>> {
    if !config.query.pg_enabled {
        return Ok(None);
    }
    let tls = tls_files(config.query.pg_tls(), &shutdown).context("query.pg_tls_cert")?;
    let listener = bind(config.query.pg_addr, "pg").await?;
    let addr = listener.local_addr()?;
    let max = config.query.pg_max_connections;
    let idle = Duration::from_secs(config.query.pg_idle_timeout_secs);
    set.spawn(async move {
        marsad_query::pg::serve_pg(listener, state, tls, max, idle, shutdown).await;
        Ok(())
    });
    Ok(Some(addr))
}

/// Serves Arrow Flight SQL when `query.flight_addr` is set; returns the address bound.
async fn spawn_flight(
    set: &mut JoinSet<anyhow::Result<()>>,
    config: &Config,
    state: QueryState,
    shutdown: CancellationToken,
) -> anyhow::Result<Option<std::net::SocketAddr>> {
    let Some(addr) = config.query.flight_addr else {
        return Ok(None);
    };
    let tls = match config.query.pg_tls() {
        Some((cert, key)) => Some((
            std::fs::read(cert).with_context(|| format!("reading {}", cert.display()))?,
            std::fs::read(key).with_context(|| format!("reading {}", key.display()))?,
        )),
        None => None,
    };
    let listener = bind(addr, "flight").await?;
    let bound = listener.local_addr()?;
    set.spawn(async move {
        marsad_query::flight::serve_flight(listener, state, tls, shutdown)
            .await
            .context("flight sql")
    });
    Ok(Some(bound))
}

/// Deletes processed raw-log and dead-letter segments past their retention, checking every
/// quarter of the roll age (at most a minute).
fn spawn_retention(set: &mut JoinSet<anyhow::Result<()>>, log: Option<Arc<LocalLog>>, shutdown: CancellationToken) {
    // on Kafka the brokers apply the topics' retention
    let Some(log) = log else { return };
    set.spawn(async move {
        // often enough that no record outlives retention by more than the stated slack
        let mut tick = tokio::time::interval(log.options().retention_check_interval());
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                _ = tick.tick() => {
                    for topic in [TOPIC_RAW, TOPIC_DEAD] {
                        if let Err(e) = log.enforce_retention(topic, SystemTime::now()) {
                            tracing::warn!(topic, error = %e, "log retention failed");
                        }
                    }
                }
            }
        }
    });
}

/// The privacy mechanisms one process shares between its stages.
struct Privacy {
    keys: Arc<ApiKeys>,
    admin: AdminKey,
    subject_keys: SubjectKeys,
    opt_outs: Arc<OptOutRegistry>,
    /// Only in stages that hash visitors or erase them (never ingest, which faces the internet).
    daily_keys: Option<Arc<dyn DailyKeyStore>>,
}

/// Which of the privacy mechanisms a stage holds.
#[derive(Clone, Copy, PartialEq, Eq)]
enum DailyKeys {
    /// The stage computes visitor keys (erasure): it opens the daily key store.
    Held,
    /// It never hashes a visitor (ingest): the daily keys stay out of its memory.
    NotHeld,
}

impl Privacy {
    fn load(config: &Config, daily: DailyKeys) -> anyhow::Result<Self> {
        let (keys, admin) = ApiKeys::load(&config.query.keys, &config.data_dir).context("loading API keys")?;
        let subject_keys = SubjectKeys::load(config).context("loading the targeting and opt-out keys")?;
        let daily_keys = match daily {
            DailyKeys::Held => {
                Some(marsad_privacy::keys::open_daily_key_store(config).context("opening the daily key store")?)
            }
            DailyKeys::NotHeld => None,
        };
        Ok(Privacy {
            keys: Arc::new(keys),
            admin,
            subject_keys,
            opt_outs: Arc::default(),
            daily_keys,
        })
    }

    fn ingest(&self, config: &Config) -> anyhow::Result<marsad_ingest::IngestPrivacy> {
        let identity_key = marsad_privacy::keys::load_identity_key(config)
            .context("loading the identity key (MARSAD_SECRET_IDENTITY_KEY)")?
            .map(Arc::new);
        Ok(marsad_ingest::IngestPrivacy {
            keys: self.keys.clone(),
            opt_outs: self.opt_outs.clone(),
            subject_keys: self.subject_keys.clone(),
            identity_key,
        })
    }

    fn query(&self, config: &Config, log: Arc<dyn EventLog>) -> anyhow::Result<QueryPrivacy> {
        let noise_key =
            marsad_privacy::keys::load_noise_key(config).context("loading the noise key of released numbers")?;
        let daily_keys = self
            .daily_keys
            .clone()
            .context("the query service needs the daily key store (erasure)")?;
        Ok(QueryPrivacy {
            opt_outs: self.opt_outs.clone(),
            subject_keys: self.subject_keys.clone(),
            daily_keys,
            log,
            noise_key: Arc::new(noise_key),
        })
    }

    /// Checks that this stage's targeting and opt-out keys are the ones the other stages
    /// recorded in the opt-out log (recording them if none did): a stage with another key
    /// would compute other `audience_id`s and miss every opt-out. Call once the log is loaded.
    async fn check_key_fingerprints(&self, log: &dyn EventLog) -> anyhow::Result<()> {
        check_fingerprint(
            log,
            &self.opt_outs,
            SharedKey::Targeting,
            &self.subject_keys.targeting,
            "Give every stage the same MARSAD_SECRET_TARGETING_KEY (or privacy.targeting_key_file); \
             after rotating it on purpose, run `marsad keys adopt-targeting` with the new key once.",
        )
        .await?;
        check_fingerprint(
            log,
            &self.opt_outs,
            SharedKey::Optout,
            &self.subject_keys.optout,
            "Give every stage the same MARSAD_SECRET_OPTOUT_KEY (or privacy.optout_key_file); it is \
             never rotated: every recorded opt-out is under it.",
        )
        .await
    }

    /// Waits until every opt-out recorded so far is loaded: nothing is served before.
    async fn opt_outs_loaded(&self) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        while !self.opt_outs.is_caught_up() {
            anyhow::ensure!(
                tokio::time::Instant::now() < deadline,
                "the opt-out log could not be read within 60 s"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Ok(())
    }

    /// Keeps the opt-out registry in step with the opt-out log.
    fn follow_opt_outs(
        &self,
        set: &mut JoinSet<anyhow::Result<()>>,
        log: Arc<dyn EventLog>,
        shutdown: CancellationToken,
    ) {
        let registry = self.opt_outs.clone();
        set.spawn(async move {
            let apply = |f: Followed<'_>| match f {
                Followed::Record(r) => {
                    if let Err(e) = registry.apply_bytes(&r.payload) {
                        tracing::error!(offset = r.position.offset, error = %e, "undecodable opt-out record");
                    }
                }
                Followed::CaughtUp => {
                    registry.set_caught_up();
                    tracing::info!(subjects = registry.len(), "opt-outs loaded");
                }
            };
            marsad_eventlog::follow(log.as_ref(), TOPIC_OPTOUTS, apply, shutdown.cancelled())
                .await
                .context("following opt-outs")
        });
    }
}

/// Refuses to go on when `key` is not the `which` key recorded in the opt-out log; records it
/// when none is.
async fn check_fingerprint(
    log: &dyn EventLog,
    opt_outs: &OptOutRegistry,
    which: SharedKey,
    key: &marsad_privacy::keys::SecretKey,
    advice: &'static str,
) -> anyhow::Result<()> {
    let ours = key.fingerprint();
    match opt_outs.recorded_fingerprint(which) {
        Some(recorded) if recorded == ours => Ok(()),
        Some(recorded) => Err(marsad_privacy::Error::KeyMismatch {
            what: which.describe(),
            ours,
            recorded,
            advice,
        }
        .into()),
        None => record_fingerprint(log, opt_outs, which, ours).await,
    }
}

/// Every query process must draw the same noise for a cell, or asking two of them would
/// average it away: their noise keys must agree.
async fn check_noise_key(log: &dyn EventLog, privacy: &Privacy, query: &QueryPrivacy) -> anyhow::Result<()> {
    check_fingerprint(
        log,
        &privacy.opt_outs,
        SharedKey::Noise,
        &query.noise_key,
        "Give every query process the same MARSAD_SECRET_NOISE_KEY (or release.noise_key_file).",
    )
    .await
}

/// Refuses an ingest process whose identity key differs from the one the other ingest
/// processes recorded: it would count every signed-in visitor as anonymous, silently.
async fn check_identity_key(
    log: &dyn EventLog,
    privacy: &Privacy,
    ingest: &marsad_ingest::IngestPrivacy,
) -> anyhow::Result<()> {
    let Some(key) = &ingest.identity_key else { return Ok(()) };
    check_fingerprint(
        log,
        &privacy.opt_outs,
        SharedKey::Identity,
        key,
        "Give every ingest process the same MARSAD_SECRET_IDENTITY_KEY (or privacy.identity_key_file), the one the site's backend signs with.",
    )
    .await
}

/// Records in the opt-out log that `which` has the fingerprint `fingerprint` from now on.
pub(crate) async fn record_fingerprint(
    log: &dyn EventLog,
    opt_outs: &OptOutRegistry,
    which: SharedKey,
    fingerprint: String,
) -> anyhow::Result<()> {
    let record = KeyFingerprintRecord {
        key_fingerprint: which,
        fingerprint,
        at: chrono::Utc::now(),
    };
    log.append(
        TOPIC_OPTOUTS,
        vec![marsad_eventlog::Record {
            key: Some(record.log_key()),
            payload: record.to_bytes(),
        }],
    )
    .await
    .with_context(|| format!("recording the {}'s fingerprint in the opt-out log", which.describe()))?;
    opt_outs.apply_fingerprint(&record);
    Ok(())
}

/// Destroys the daily keys past their grace every `privacy.key_destruction_interval_ms`,
/// whether or not events arrive (and forgets this process's copies of them).
fn spawn_key_destruction(
    set: &mut JoinSet<anyhow::Result<()>>,
    config: &Config,
    daily_keys: Option<Arc<dyn DailyKeyStore>>,
    shutdown: CancellationToken,
) {
    let Some(store) = daily_keys else { return };
    let grace = chrono::Duration::hours(config.privacy.daily_key_grace_hours as i64);
    let every = Duration::from_millis(config.privacy.key_destruction_interval_ms);
    set.spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                _ = tick.tick() => {
                    let store = store.clone();
                    match tokio::task::spawn_blocking(move || store.destroy_expired(chrono::Utc::now(), grace)).await? {
                        Ok(days) if !days.is_empty() => tracing::info!(?days, "destroyed daily visitor keys past their grace period"),
                        Ok(_) => {}
                        Err(e) => tracing::error!(error = %e, "could not destroy expired daily keys; retrying"),
                    }
                }
            }
        }
    });
}

/// The webhook's signing key: `MARSAD_SECRET_SEGMENT_WEBHOOK_KEY`, else `audience.push.webhook_key_file` (hex).
fn segment_webhook_key(config: &Config) -> anyhow::Result<zeroize::Zeroizing<Vec<u8>>> {
    const ENV: &str = "MARSAD_SECRET_SEGMENT_WEBHOOK_KEY";
    let text = match (std::env::var(ENV), &config.audience.push.webhook_key_file) {
        (Ok(text), _) if !text.trim().is_empty() => zeroize::Zeroizing::new(text),
        (_, Some(path)) => zeroize::Zeroizing::new(
            std::fs::read_to_string(path)
                .with_context(|| format!("reading audience.push.webhook_key_file {}", path.display()))?,
        ),
        (_, None) => anyhow::bail!(
            "audience.push.webhook_url is set but no signing key is: set {ENV} (hex, 32 bytes or more, shared with \
             the receiver) or audience.push.webhook_key_file"
        ),
    };
    let key = zeroize::Zeroizing::new(hex::decode(text.trim()).context("the segment webhook key must be hex")?);
    anyhow::ensure!(
        key.len() >= 32,
        "the segment webhook key must be at least 32 bytes (64 hex digits)"
    );
    Ok(key)
}

/// Pushes segment changes and opt-outs to the ad system (`[audience.push]`) when segments are
/// configured and a channel is: the Kafka topic when the log is Kafka, the webhook when set.
fn spawn_segment_push(
    set: &mut JoinSet<anyhow::Result<()>>,
    config: &Config,
    log: Arc<dyn EventLog>,
    opt_outs: Arc<OptOutRegistry>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    use marsad_process::segment_push::{KafkaTopic, Publisher, SegmentChannel, StateDir, Webhook};
    let push = &config.audience.push;
    if config.audience.segments.is_empty() || !push.enabled {
        return Ok(());
    }
    let mut channels: Vec<Arc<dyn SegmentChannel>> = Vec::new();
    if config.eventlog.kind == EventLogKind::Kafka && !push.kafka_topic.is_empty() {
        channels.push(Arc::new(KafkaTopic::new(
            &config.eventlog.kafka_client_properties(),
            &push.kafka_topic,
        )?));
    }
    if let Some(url) = &push.webhook_url {
        let key = segment_webhook_key(config)?;
        channels.push(Arc::new(Webhook::new(
            url,
            &key,
            push.webhook_ca_file.as_deref(),
            Duration::from_millis(push.webhook_timeout_ms),
            shutdown.clone(),
        )?));
    }
    if channels.is_empty() {
        return Ok(());
    }
    let publisher = Publisher::open(
        channels,
        opt_outs,
        StateDir::open(config.data_dir.join("segment_push"))?,
        push.batch_max,
    )?;
    tracing::info!(to = ?publisher.describe(), "pushing segment changes and opt-outs");
    let tables = config.tables()?;
    set.spawn(async move {
        marsad_process::segment_push::run(publisher, tables, log, shutdown)
            .await
            .context("segment push")
    });
    Ok(())
}

/// Re-materializes the audience segments every `audience.refresh_interval_secs` (first soon after
/// start); a failed refresh is logged and the previous membership stays served.
fn spawn_segment_refresh(
    set: &mut JoinSet<anyhow::Result<()>>,
    config: &Config,
    opt_outs: Arc<OptOutRegistry>,
    shutdown: CancellationToken,
) {
    if config.audience.segments.is_empty() {
        return;
    }
    let (tables, audience) = (config.tables(), config.audience.clone());
    let every = Duration::from_secs(audience.refresh_interval_secs);
    set.spawn(async move {
        let tables = tables?;
        let mut next = tokio::time::Instant::now() + Duration::from_secs(30).min(every);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                _ = tokio::time::sleep_until(next) => {}
            }
            next = tokio::time::Instant::now() + every;
            let started = std::time::Instant::now();
            match marsad_process::segments::refresh(&tables, &audience, &opt_outs, |_, _, _| {}).await {
                Ok(summary) => tracing::info!(
                    segments = summary.segments.len(),
                    served = summary.segments.iter().filter(|s| s.served).count(),
                    took_ms = started.elapsed().as_millis() as u64,
                    "audience segments refreshed"
                ),
                Err(e) => tracing::error!(error = %e, "segment refresh failed; the previous members stay served"),
            }
        }
    });
}

/// Merges the rollups' partial rows every `process.rollup_compaction_interval_secs`, so a
/// report reads about one row per key and hour at any moment, and rewrites the dates of
/// `events` that gathered `process.events_compaction_min_files` small files into files of the
/// target size; a failed or conflicting run is logged and retried next time. At its first
/// run and then every `ABANDONED_AFTER` it also removes what rewrites that died left behind.
fn spawn_compaction(set: &mut JoinSet<anyhow::Result<()>>, config: &Config, shutdown: CancellationToken) {
    /// Dates with at least this many files are compacted.
    const MIN_FILES: usize = 4;
    /// The size `events` files are rewritten to (as `marsad compact`'s default).
    const EVENTS_FILE_BYTES: u64 = 128 << 20;
    let tables = config.tables();
    let every = Duration::from_secs(config.process.rollup_compaction_interval_secs);
    let events_min_files = config.process.events_compaction_min_files;
    set.spawn(async move {
        let tables = tables?;
        let mut next_sweep = std::time::Instant::now();
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                _ = tokio::time::sleep(every) => {}
            }
            if std::time::Instant::now() >= next_sweep {
                sweep_abandoned_rewrites(&tables).await;
                next_sweep = std::time::Instant::now() + marsad_tables::rewrites::ABANDONED_AFTER;
            }
            let started = std::time::Instant::now();
            match marsad_process::rollup::compact(&tables, MIN_FILES).await {
                Ok(done) if !done.is_empty() => tracing::info!(
                    dates = done.len(),
                    rows_before = done.iter().map(|d| d.rows_before).sum::<usize>(),
                    rows_after = done.iter().map(|d| d.rows_after).sum::<usize>(),
                    took_ms = started.elapsed().as_millis() as u64,
                    "rollups compacted"
                ),
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "rollup compaction failed; retrying next time"),
            }
            if events_min_files == 0 {
                continue;
            }
            let started = std::time::Instant::now();
            let events = marsad_schemas::TableName::Events;
            match marsad_process::maintenance::compact_busy_dates(&tables, events, EVENTS_FILE_BYTES, events_min_files)
                .await
            {
                Ok(done) if !done.is_empty() => tracing::info!(
                    dates = done.len(),
                    files_removed = done.iter().map(|d| d.files_removed).sum::<u64>(),
                    files_added = done.iter().map(|d| d.files_added).sum::<u64>(),
                    took_ms = started.elapsed().as_millis() as u64,
                    "events files compacted"
                ),
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "events compaction failed; retrying next time"),
            }
        }
    });
}

/// Every `LOG_AND_FILES_MAINTENANCE_EVERY`, on its own timer (however long compactions
/// take, a replaced file must be removed before the log forgets it): removes the files
/// commits replaced over `REPLACED_FILES_KEPT` ago and the expired log entries.
fn spawn_log_and_files_maintenance(
    set: &mut JoinSet<anyhow::Result<()>>,
    config: &Config,
    shutdown: CancellationToken,
) {
    let tables = config.tables();
    set.spawn(async move {
        let tables = tables?;
        loop {
            match marsad_process::maintenance::remove_replaced_files(&tables).await {
                Ok(0) => {}
                Ok(removed) => tracing::info!(removed, "files replaced over 30 minutes ago removed from storage"),
                Err(e) => tracing::warn!(error = %e, "removing replaced files failed; again later"),
            }
            match marsad_process::maintenance::remove_expired_log_entries(&tables, None).await {
                Ok(0) => {}
                Ok(removed) => tracing::info!(removed, "expired Delta log entries removed"),
                Err(e) => tracing::warn!(error = %e, "removing expired log entries failed; again later"),
            }
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                _ = tokio::time::sleep(marsad_process::maintenance::LOG_AND_FILES_MAINTENANCE_EVERY) => {}
            }
        }
    });
}

/// Removes the files of compactions and erasure deletes that died before their commit (see
/// `marsad_tables::rewrites`): they may hold rows an erasure removed since.
async fn sweep_abandoned_rewrites(tables: &marsad_config::TablesLocation) {
    for table in marsad_schemas::TableName::ALL {
        let abandoned = marsad_tables::Unreferenced::Abandoned;
        match marsad_tables::remove_unreferenced_rewrites(tables, table.as_str(), None, abandoned).await {
            Ok(0) => {}
            Ok(removed) => tracing::info!(
                table = table.as_str(),
                removed,
                "data files no version references removed"
            ),
            Err(e) => {
                tracing::warn!(table = table.as_str(), error = %e, "sweeping abandoned rewrites failed; again later")
            }
        }
    }
}

/// Waits for every task; the first failure stops the others.
async fn supervise(mut set: JoinSet<anyhow::Result<()>>, shutdown: CancellationToken) -> anyhow::Result<()> {
    let mut first_error = None;
    while let Some(joined) = set.join_next().await {
        let result = joined.map_err(anyhow::Error::from).and_then(|r| r);
        if let Err(e) = result {
            tracing::error!(error = format!("{e:#}"), "a stage failed; stopping the others");
            shutdown.cancel();
            first_error.get_or_insert(e);
        }
    }
    first_error.map_or(Ok(()), Err)
}

/// `marsad keys adopt-targeting`: records the (rotated) targeting key's fingerprint in the
/// opt-out log, so stages restarted with it start, and stages still holding the old key
/// refuse to.
pub async fn adopt_targeting_key(args: StageArgs) -> anyhow::Result<()> {
    let config = args.config()?;
    let Logs { log, .. } = open_log(&config, "keys")?;
    let keys = SubjectKeys::load(&config).context("loading the new targeting key")?;
    let opt_outs = Arc::new(OptOutRegistry::default());
    let caught_up = CancellationToken::new();
    let done = caught_up.clone();
    let registry = opt_outs.clone();
    marsad_eventlog::follow(
        log.as_ref(),
        TOPIC_OPTOUTS,
        |f| match f {
            Followed::Record(r) => {
                let _ = registry.apply_bytes(&r.payload);
            }
            Followed::CaughtUp => done.cancel(),
        },
        caught_up.cancelled(),
    )
    .await
    .context("reading the opt-out log")?;
    let new = keys.targeting.fingerprint();
    let old = opt_outs.recorded_fingerprint(SharedKey::Targeting);
    if old.as_deref() == Some(new.as_str()) {
        println!("the targeting key {new} is already the recorded one; nothing to do");
        return Ok(());
    }
    record_fingerprint(log.as_ref(), &opt_outs, SharedKey::Targeting, new.clone()).await?;
    println!(
        "recorded targeting key {new} (was {}). Restart every stage with it; stages holding the old key \
         now refuse to start. Opt-outs stay in force ({} subjects, recorded under the opt-out key). \
         audience_ids change with the key: segments are re-materialized under it at their next refresh.",
        old.as_deref().unwrap_or("none"),
        opt_outs.len()
    );
    Ok(())
}

/// `marsad up`: the three stages on one data dir.
pub async fn up(args: UpArgs) -> anyhow::Result<()> {
    let mut config = args.stage.config()?;
    if args.simulate.is_some() {
        config.ingest.trusted_proxies.push("127.0.0.1/32".parse()?);
    }
    let Logs { log, local } = open_log(&config, "up")?;
    let privacy = Privacy::load(&config, DailyKeys::Held)?;
    let ingest_listener = bind(config.ingest.addr, "ingest").await?;
    let query_listener = bind(config.query.addr, "query").await?;
    let ingest_addr = ingest_listener.local_addr()?;
    let query_addr = query_listener.local_addr()?;
    let process_metrics = Arc::new(ProcessMetrics::new());
    let processor = Processor::new(&config, log.clone(), privacy.opt_outs.clone(), process_metrics.clone())
        .await
        .context("starting the processor")?;

    let shutdown = shutdown_on_signal();
    let mut set = JoinSet::new();
    privacy.follow_opt_outs(&mut set, log.clone(), shutdown.clone());
    privacy.opt_outs_loaded().await?;
    privacy.check_key_fingerprints(log.as_ref()).await?;
    spawn_key_destruction(&mut set, &config, privacy.daily_keys.clone(), shutdown.clone());
    let ingest_privacy = privacy.ingest(&config)?;
    check_identity_key(log.as_ref(), &privacy, &ingest_privacy).await?;
    let simulate_identity = ingest_privacy.identity_key.clone();
    let ingest_state = marsad_ingest::IngestState::new(&config, log.clone(), ingest_privacy);
    let ingest_tls = tls_files(config.ingest.tls_files(), &shutdown).context("ingest.tls_cert")?;
    let query_tls = tls_files(config.query.tls_files(), &shutdown).context("query.tls_cert")?;
    let (ingest_scheme, query_scheme) = (scheme(&ingest_tls), scheme(&query_tls));
    let s = shutdown.clone();
    set.spawn(async move {
        marsad_ingest::serve(ingest_listener, ingest_state, ingest_tls, s)
            .await
            .context("ingest")
    });
    let s = shutdown.clone();
    let live = processor.live();
    set.spawn(async move { processor.run(s).await.context("processor") });
    spawn_segment_refresh(&mut set, &config, privacy.opt_outs.clone(), shutdown.clone());
    spawn_segment_push(
        &mut set,
        &config,
        log.clone(),
        privacy.opt_outs.clone(),
        shutdown.clone(),
    )?;
    spawn_compaction(&mut set, &config, shutdown.clone());
    spawn_log_and_files_maintenance(&mut set, &config, shutdown.clone());
    let pm = process_metrics.clone();
    let query_privacy = privacy.query(&config, log.clone())?;
    check_noise_key(log.as_ref(), &privacy, &query_privacy).await?;
    let query_state = QueryState::new(&config, (*privacy.keys).clone(), query_privacy)?
        .with_metrics_source(Arc::new(move || pm.render()))
        .with_live_source(Arc::new(live));
    spawn_email_reports(&mut set, &config, query_state.noise_key(), shutdown.clone())?;
    let pg_addr = spawn_pg(&mut set, &config, query_state.clone(), shutdown.clone()).await?;
    spawn_flight(&mut set, &config, query_state.clone(), shutdown.clone()).await?;
    let s = shutdown.clone();
    set.spawn(async move {
        marsad_query::serve(query_listener, query_state, query_tls, s)
            .await
            .context("query")
    });
    spawn_retention(&mut set, local, shutdown.clone());

    println!("Marsad is up (data dir {})", config.data_dir.display());
    println!(
        "  ingest  {ingest_scheme}://{ingest_addr}   POST /v1/events, POST /v1/batch, GET /v1/p.gif, POST /v1/opt-outs"
    );
    println!(
        "  query   {query_scheme}://{query_addr}   POST /v1/sql, GET /v1/audience, GET /v1/segments, DELETE /v1/subjects"
    );
    println!("          (Authorization: Bearer <key>)");
    if let Some(pg) = pg_addr {
        println!("  pg      postgres://<key name>@{pg}/marsad   psql, Metabase, Grafana, Superset (password: the key)");
    }
    let admin = &privacy.admin;
    if admin.created {
        println!(
            "  admin key (shown once, also in {}): {}",
            admin.path.display(),
            admin.key
        );
    } else {
        println!("  admin key: in {}", admin.path.display());
    }
    if let Some(rate) = args.simulate {
        println!("  simulating {rate} events/s of classified-ads traffic");
        let url = format!("http://{ingest_addr}");
        let s = shutdown.clone();
        set.spawn(async move {
            tokio::select! {
                _ = s.cancelled() => Ok(()),
                r = crate::simulate::run(crate::simulate::SimulateArgs {
                    identity_key: simulate_identity,
                    ..crate::simulate::SimulateArgs::background(url, rate)
                }) => r.map(|_| ()),
            }
        });
    }
    supervise(set, shutdown).await
}

/// Sends the scheduled e-mail reports, when any are configured and this process is the one
/// that sends them (`reports.send_scheduled`).
fn spawn_email_reports(
    set: &mut JoinSet<anyhow::Result<()>>,
    config: &Config,
    noise_key: Arc<marsad_privacy::keys::SecretKey>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    if !config.reports.send_scheduled {
        return Ok(());
    }
    let catalog = Arc::new(marsad_query::TableCatalog::new(config.tables()?));
    if let Some(reports) = marsad_query::email::EmailReports::new(config, noise_key, catalog) {
        tracing::info!(reports = reports.reports().len(), "e-mail reports scheduled");
        set.spawn(async move {
            reports.run(shutdown).await;
            Ok(())
        });
    }
    Ok(())
}

/// `marsad report send [--now]`: the e-mail reports, from the data dir, with the noise key every
/// query process uses.
pub async fn send_reports(args: crate::cli::ReportSendArgs) -> anyhow::Result<()> {
    let config = args.stage.config()?;
    if config.reports.email.is_empty() {
        anyhow::bail!("no e-mail reports are configured: add [[reports.email]] and [reports.smtp] to the config file");
    }
    let log = open_log(&config, "report")?.log;
    let opt_outs = crate::tools::opt_outs_recorded(log.as_ref()).await?;
    let noise_key =
        Arc::new(marsad_privacy::keys::load_noise_key(&config).context("loading the noise key of released numbers")?);
    check_fingerprint(
        log.as_ref(),
        &opt_outs,
        SharedKey::Noise,
        &noise_key,
        "Give `marsad report` the MARSAD_SECRET_NOISE_KEY (or release.noise_key_file) the query processes use.",
    )
    .await?;
    let catalog = Arc::new(marsad_query::TableCatalog::new(config.tables()?));
    let reports = marsad_query::email::EmailReports::new(&config, noise_key, catalog)
        .context("no e-mail reports are configured")?;
    let now = chrono::Utc::now();
    let outcome = if args.now {
        marsad_query::email::Outcome {
            sent: reports.send_now(args.id.as_deref(), now).await?,
            failed: Vec::new(),
        }
    } else {
        reports
            .send_due(now, args.id.as_deref(), &mut Default::default())
            .await?
    };
    if outcome.sent.is_empty() && outcome.failed.is_empty() {
        println!("nothing due: every report's latest period was sent (--now sends anyway)");
    }
    for s in &outcome.sent {
        println!(
            "sent {} ({} to {}) to {} recipient{}",
            s.id,
            s.period.from,
            s.period.to,
            s.recipients,
            if s.recipients == 1 { "" } else { "s" }
        );
    }
    if let Some((id, e)) = outcome.failed.first() {
        anyhow::bail!("{} report(s) not sent; {id}: {e}", outcome.failed.len());
    }
    Ok(())
}

/// `marsad ingest`.
pub async fn ingest(args: StageArgs) -> anyhow::Result<()> {
    let config = args.config()?;
    let Logs { log, local } = open_log(&config, "ingest")?;
    let privacy = Privacy::load(&config, DailyKeys::NotHeld)?;
    let listener = bind(config.ingest.addr, "ingest").await?;
    let shutdown = shutdown_on_signal();
    let mut set = JoinSet::new();
    privacy.follow_opt_outs(&mut set, log.clone(), shutdown.clone());
    privacy.opt_outs_loaded().await?;
    privacy.check_key_fingerprints(log.as_ref()).await?;
    let ingest_privacy = privacy.ingest(&config)?;
    check_identity_key(log.as_ref(), &privacy, &ingest_privacy).await?;
    let state = marsad_ingest::IngestState::new(&config, log.clone(), ingest_privacy);
    let tls = tls_files(config.ingest.tls_files(), &shutdown).context("ingest.tls_cert")?;
    let s = shutdown.clone();
    set.spawn(async move { marsad_ingest::serve(listener, state, tls, s).await.context("ingest") });
    spawn_retention(&mut set, local, shutdown.clone());
    supervise(set, shutdown).await
}

/// `marsad process`, with its metrics on `process.metrics_addr`.
pub async fn process(args: StageArgs) -> anyhow::Result<()> {
    let config = args.config()?;
    let Logs { log, .. } = open_log(&config, "process")?;
    // the processor holds its own daily key store, and destroys expired keys on its own timer
    let privacy = Privacy::load(&config, DailyKeys::NotHeld)?;
    let metrics = Arc::new(ProcessMetrics::new());
    let processor = Processor::new(&config, log.clone(), privacy.opt_outs.clone(), metrics.clone())
        .await
        .context("starting the processor")?;
    let listener = bind(config.process.metrics_addr, "process-metrics").await?;
    let shutdown = shutdown_on_signal();
    let mut set = JoinSet::new();
    privacy.follow_opt_outs(&mut set, log.clone(), shutdown.clone());
    privacy.opt_outs_loaded().await?;
    privacy.check_key_fingerprints(log.as_ref()).await?;
    let s = shutdown.clone();
    set.spawn(async move { processor.run(s).await.context("processor") });
    spawn_segment_refresh(&mut set, &config, privacy.opt_outs.clone(), shutdown.clone());
    spawn_segment_push(
        &mut set,
        &config,
        log.clone(),
        privacy.opt_outs.clone(),
        shutdown.clone(),
    )?;
    spawn_compaction(&mut set, &config, shutdown.clone());
    spawn_log_and_files_maintenance(&mut set, &config, shutdown.clone());
    let s = shutdown.clone();
    set.spawn(async move {
        let app = axum::Router::new()
            .route("/healthz", axum::routing::get(|| async { "ok" }))
            .route("/readyz", axum::routing::get(|| async { "ready" }))
            .route(
                "/metrics",
                axum::routing::get(move || {
                    let m = metrics.clone();
                    async move { m.render() }
                }),
            );
        axum::serve(listener, app)
            .with_graceful_shutdown(async move { s.cancelled().await })
            .await
            .context("process metrics")
    });
    supervise(set, shutdown).await
}

/// `marsad query`.
pub async fn query(args: StageArgs) -> anyhow::Result<()> {
    let config = args.config()?;
    let Logs { log, .. } = open_log(&config, "query")?;
    let privacy = Privacy::load(&config, DailyKeys::Held)?;
    if privacy.admin.created {
        println!(
            "admin key (shown once, also in {}): {}",
            privacy.admin.path.display(),
            privacy.admin.key
        );
    }
    let listener = bind(config.query.addr, "query").await?;
    let shutdown = shutdown_on_signal();
    let mut set = JoinSet::new();
    privacy.follow_opt_outs(&mut set, log.clone(), shutdown.clone());
    privacy.opt_outs_loaded().await?;
    privacy.check_key_fingerprints(log.as_ref()).await?;
    spawn_key_destruction(&mut set, &config, privacy.daily_keys.clone(), shutdown.clone());
    let query_privacy = privacy.query(&config, log.clone())?;
    check_noise_key(log.as_ref(), &privacy, &query_privacy).await?;
    let state = QueryState::new(&config, (*privacy.keys).clone(), query_privacy)?;
    spawn_email_reports(&mut set, &config, state.noise_key(), shutdown.clone())?;
    spawn_pg(&mut set, &config, state.clone(), shutdown.clone()).await?;
    spawn_flight(&mut set, &config, state.clone(), shutdown.clone()).await?;
    let tls = tls_files(config.query.tls_files(), &shutdown).context("query.tls_cert")?;
    let s = shutdown.clone();
    set.spawn(async move { marsad_query::serve(listener, state, tls, s).await.context("query") });
    supervise(set, shutdown).await
}
