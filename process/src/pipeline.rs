//! The processor loop: a reader task fills a bounded channel from the log;
//! the main task anonymizes, batches and commits. A slow commit stops the
//! reader once the channel is full (backpressure), never buffers without bound.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use marsad_config::{Config, TablesLocation};
use marsad_eventlog::{Delivered, EventLog, Subscription};
use marsad_privacy::consent::ConsentDefaults;
use marsad_privacy::geoip::GeoIp;
use marsad_privacy::keys::{DailyKeyStore, SubjectKeys};
use marsad_privacy::optout::OptOutRegistry;
use marsad_privacy::scrub::QueryAllowList;
use marsad_schemas::{Envelope, TOPIC_RAW};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::Result;
use crate::anonymize::{Anonymizer, NotAnonymized};
use crate::dead_letters::{self, DeadLetter};
use crate::dedup::RecentEventIds;
use crate::events_batch::EventsBatchBuilder;
use crate::metrics::ProcessMetrics;
use crate::offsets::{app_id, resume_from};
use crate::rollup::{CrashPoint, Rollups};
use crate::table::EventsTable;

/// The consumer group of the processors.
pub const CONSUMER_GROUP: &str = "marsad-process";
/// Records asked of the log per poll.
const POLL_MAX: usize = 5_000;
/// Chunks of records buffered between reader and writer.
const CHANNEL_CHUNKS: usize = 8;

/// Retried duplicates are recognised this many days back after a restart.
const DEDUP_DAYS: i64 = 2;

/// A configured processor, ready to [`run`](Processor::run).
pub struct Processor {
    log: Arc<dyn EventLog>,
    table: EventsTable,
    anonymizer: Anonymizer,
    daily_keys: Arc<dyn DailyKeyStore>,
    key_grace: chrono::Duration,
    dedup: RecentEventIds,
    /// How many of the ids in `dedup` belong to rows buffered but not yet committed.
    uncommitted_ids: usize,
    metrics: Arc<ProcessMetrics>,
    batch_max_events: usize,
    batch_interval: Duration,
    tables: TablesLocation,
    rollups: Option<Rollups>,
    /// The rollups commit at most this often (zero: with every `events` commit).
    rollup_interval: Duration,
    /// When the rollups added since their last commit must be committed (`None`: nothing added).
    rollups_due: Option<Instant>,
    /// The positions of the `events` commits added to the rollups since their last commit.
    rollup_positions: BTreeMap<String, i64>,
    /// The clamp and channel grouping the rollups count under.
    rollup_rules: crate::rollup::RollupRules,
    /// How often expired daily keys are destroyed and idle sessions closed.
    maintenance_interval: Duration,
    crash: Option<(usize, CrashPoint)>,
    /// Cancelled when the processor is asked to stop (ends a wait for the key store).
    stopping: CancellationToken,
    /// Visitors and pages of the last half hour, for the live view.
    live: crate::rollup::LiveWindow,
}

impl Processor {
    /// Opens the table and the privacy mechanisms, and loads recent event ids.
    pub async fn new(
        config: &Config,
        log: Arc<dyn EventLog>,
        opt_outs: Arc<OptOutRegistry>,
        metrics: Arc<ProcessMetrics>,
    ) -> Result<Self> {
        let key_grace = chrono::Duration::hours(config.privacy.daily_key_grace_hours as i64);
        let (anonymizer, daily_keys) = anonymizer_from_config(config, opt_outs)?;
        let tables = config.tables()?;
        let table = EventsTable::open_or_create(&tables).await?;
        let mut dedup = RecentEventIds::new(config.process.dedup_capacity);
        let since = Utc::now().date_naive() - chrono::Duration::days(DEDUP_DAYS);
        table.remember_events_since(since, &mut dedup).await?;
        let mut anonymizer = anonymizer;
        let sessions = table.recent_sessions().await?;
        for (visitor, session, last) in &sessions {
            anonymizer.resume_session(visitor, session, *last);
        }
        tracing::info!(
            table_version = ?table.version(),
            remembered_event_ids = dedup.len(),
            resumed_sessions = sessions.len(),
            "processor ready"
        );
        Ok(Processor {
            log,
            table,
            anonymizer,
            daily_keys,
            key_grace,
            dedup,
            uncommitted_ids: 0,
            metrics,
            batch_max_events: config.process.batch_max_events,
            batch_interval: Duration::from_millis(config.process.batch_max_interval_ms),
            tables,
            rollups: None,
            rollup_interval: Duration::from_millis(config.process.rollup_commit_interval_ms),
            rollups_due: None,
            rollup_positions: BTreeMap::new(),
            rollup_rules: crate::rollup::RollupRules::of(&config.process),
            maintenance_interval: Duration::from_millis(config.privacy.key_destruction_interval_ms),
            crash: None,
            stopping: CancellationToken::new(),
            live: crate::rollup::LiveWindow::new(config.process.max_events_per_visitor_day),
        })
    }

    /// Makes the `n`th commit stop at `point` as if the process died there (crash tests only;
    /// with `process.rollup_commit_interval_ms = 0`, so every commit reaches the rollups).
    #[cfg(feature = "test-support")]
    pub fn crash_at(mut self, n: usize, point: CrashPoint) -> Self {
        self.crash = Some((n, point));
        self
    }

    /// The live window this processor counts into, for a query service in the same process.
    pub fn live(&self) -> crate::rollup::LiveWindow {
        self.live.clone()
    }

    /// Processes until `shutdown`, committing what is buffered before returning.
    pub async fn run(mut self, shutdown: CancellationToken) -> Result<()> {
        self.stopping = shutdown.clone();
        let sub = self.log.subscribe(TOPIC_RAW, CONSUMER_GROUP).await?;
        let (chunks_tx, mut chunks) = mpsc::channel(CHANNEL_CHUNKS);
        let (commands_tx, commands_rx) = mpsc::unbounded_channel();
        let reader_stop = shutdown.child_token();
        let reader = tokio::spawn(read_log(sub, chunks_tx, commands_rx, reader_stop.clone()));

        let mut builder = EventsBatchBuilder::new();
        let mut pending: BTreeMap<u32, u64> = BTreeMap::new();
        // the next offset expected per owned partition; records of other partitions are not ours
        let mut expected: BTreeMap<u32, u64> = BTreeMap::new();
        let mut flush_at: Option<Instant> = None;
        // expired daily keys are destroyed on this timer, whether or not events arrive
        // (not at once: sessions resumed at start stay open until a period has passed)
        let mut maintenance =
            tokio::time::interval_at(Instant::now() + self.maintenance_interval, self.maintenance_interval);
        maintenance.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let result = loop {
            let deadline = flush_at.unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
            let rollups_due = self
                .rollups_due
                .unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
            let outcome = tokio::select! {
                _ = shutdown.cancelled() => break Ok(()),
                _ = maintenance.tick() => {
                    // (a key store on Kafka answers over the network)
                    tokio::task::block_in_place(|| self.maintain());
                    Ok(())
                }
                _ = tokio::time::sleep_until(deadline), if flush_at.is_some() => {
                    flush_at = None;
                    self.flush(&mut builder, &mut pending, &commands_tx).await
                }
                // a quiet moment: what the rollups hold is committed anyway
                _ = tokio::time::sleep_until(rollups_due), if self.rollups_due.is_some() => {
                    self.commit_rollups(None).await
                }
                chunk = chunks.recv() => match chunk {
                    None => break Ok(()),
                    Some(FromLog::Failed(e)) => break Err(e.into()),
                    Some(FromLog::Assigned(partitions)) => {
                        // whatever was buffered may now be another processor's: drop it, re-read
                        self.drop_buffered(&mut builder, &mut pending);
                        flush_at = None;
                        // the rollups of `events` commits made: committed while the positions
                        // are still ours (a partition gone already fails the commit as a
                        // conflict), else the catch-up of whoever owns it adds them
                        if let Err(e) = self.commit_rollups(None).await {
                            tracing::warn!(error = %e, "rollups not committed before the handover; the catch-up adds them");
                        }
                        match self.take_over(&partitions).await {
                            Ok(from) => {
                                expected = from.clone();
                                let _ = commands_tx.send(ToLog::Resume(from.into_iter().collect()));
                                Ok(())
                            }
                            Err(e) => Err(e),
                        }
                    }
                    Some(FromLog::Records(records)) => {
                        let records: Vec<Delivered> = records
                            .into_iter()
                            .filter(|r| match expected.get_mut(&r.position.partition) {
                                Some(next) if r.position.offset >= *next => {
                                    *next = r.position.offset + 1;
                                    true
                                }
                                _ => false,
                            })
                            .collect();
                        match self.handle(records, &mut builder, &mut pending).await {
                            Err(e) => Err(e),
                            Ok(()) if builder.is_empty() && pending.is_empty() => Ok(()),
                            Ok(()) => {
                                flush_at.get_or_insert_with(|| Instant::now() + self.batch_interval);
                                if builder.len() >= self.batch_max_events {
                                    flush_at = None;
                                    self.flush(&mut builder, &mut pending, &commands_tx).await
                                } else {
                                    Ok(())
                                }
                            }
                        }
                    }
                },
            };
            match outcome {
                Ok(()) => {}
                Err(e) if e.is_lost_ownership() => {
                    // another processor committed positions of our partitions: it owns them now
                    tracing::warn!(error = %e, "a partition moved to another processor; re-reading positions");
                    self.drop_buffered(&mut builder, &mut pending);
                    // the rollups are opened and caught up again with the next assignment
                    self.drop_rollups();
                    expected.clear();
                    flush_at = None;
                    let _ = commands_tx.send(ToLog::Resync);
                }
                Err(e) => break Err(e),
            }
        };
        // commit what is buffered: it is all read from the log and decided (not after a crash)
        let flushed = match &result {
            Err(crate::Error::SimulatedCrash) => Ok(()),
            _ => match self.flush(&mut builder, &mut pending, &commands_tx).await {
                Ok(()) => self.commit_rollups(None).await,
                Err(e) => Err(e),
            },
        };
        reader_stop.cancel();
        let _ = reader.await;
        // stopped while waiting for the key store: what was handled is committed above
        let result = match result {
            Err(crate::Error::Interrupted) => Ok(()),
            other => other,
        };
        result.and(flushed)
    }

    /// Forgets the rollups and what they added since their last commit: the next take-over
    /// opens them again and catches them up from `events`, which holds every row they lose.
    fn drop_rollups(&mut self) {
        self.rollups = None;
        self.rollups_due = None;
        self.rollup_positions.clear();
    }

    /// Drops the rows buffered since the last commit, and their event ids from the duplicate
    /// filter: their records will be read again (here or by another processor) and must then
    /// count, not be taken for retries of themselves.
    fn drop_buffered(&mut self, builder: &mut EventsBatchBuilder, pending: &mut BTreeMap<u32, u64>) {
        *builder = EventsBatchBuilder::new();
        pending.clear();
        self.dedup.forget_newest(self.uncommitted_ids);
        self.uncommitted_ids = 0;
    }

    /// Takes over `partitions`: reads the positions the tables recorded, catches the rollups up
    /// with `events`, continues the open sessions; returns where to read each partition from.
    async fn take_over(&mut self, partitions: &[u32]) -> Result<BTreeMap<u32, u64>> {
        let app_ids: Vec<String> = partitions.iter().map(|&p| app_id(TOPIC_RAW, p)).collect();
        let mut events_positions = self.table.committed_offsets(&app_ids).await?;
        // what the rollups added since their last commit is in `events`: the catch-up adds it
        self.drop_rollups();
        let mut vanished = 0;
        let (rollups, caught_up) = loop {
            let mut rollups = Rollups::open(&self.tables, &app_ids, self.rollup_rules.clone()).await?;
            match rollups.catch_up(self.table.sink(), &events_positions).await {
                Ok(caught_up) => break (rollups, caught_up),
                // a compaction replaced, and an erasure's vacuum removed, a file of the version
                // read: read the positions (and so the table) again and start over
                Err(e) if e.is_vanished_file() && vanished < 5 => {
                    vanished += 1;
                    tracing::warn!(error = %e, "a file of events went away during the catch-up; again");
                    events_positions = self.table.committed_offsets(&app_ids).await?;
                }
                Err(e) => return Err(e),
            }
        };
        if caught_up.events > 0 {
            tracing::info!(
                events = caught_up.events,
                commits = caught_up.commits,
                "rollups caught up with events committed before a crash or a handover"
            );
        }
        // where to resume, from the positions the catch-up last read (a retry reads them again)
        let mut from = BTreeMap::new();
        for (&partition, app) in partitions.iter().zip(&app_ids) {
            let committed = events_positions.get(app).copied();
            let next = resume_from(committed);
            tracing::info!(
                partition,
                from = next,
                "resuming from the offset recorded in the events table"
            );
            self.metrics.position.set(next as i64);
            from.insert(partition, next);
        }
        self.rollups = Some(rollups);
        for (visitor, session, last) in &self.table.recent_sessions().await? {
            self.anonymizer.resume_session(visitor, session, *last);
        }
        Ok(from)
    }

    fn maintain(&mut self) {
        let now = Utc::now();
        self.anonymizer.expire_sessions(now);
        match self.daily_keys.destroy_expired(now, self.key_grace) {
            Ok(days) if !days.is_empty() => {
                tracing::info!(?days, "destroyed daily visitor keys past their grace period")
            }
            Ok(_) => {}
            Err(e) => tracing::error!(error = %e, "could not destroy expired daily keys"),
        }
        // the keys made ready stand for the keys: none outlives this pass after its key's
        // destruction, even on a quiet site where no event comes to drop it
        self.anonymizer.forget_prepared_keys();
    }

    async fn handle(
        &mut self,
        records: Vec<Delivered>,
        builder: &mut EventsBatchBuilder,
        pending: &mut BTreeMap<u32, u64>,
    ) -> Result<()> {
        let mut dead = Vec::new();
        let handled = tokio::task::block_in_place(|| {
            for rec in records {
                let row = match Envelope::from_bytes(&rec.payload) {
                    Err(e) => Err(e.to_string()),
                    Ok(env) => {
                        let mut waited = 0u32;
                        loop {
                            match self.anonymizer.anonymize(&env) {
                                // hold the event (and what follows) until the keys are back
                                Err(NotAnonymized::KeysUnavailable(why)) => {
                                    if self.stopping.is_cancelled() {
                                        return Err(crate::Error::Interrupted);
                                    }
                                    if waited.is_multiple_of(10) {
                                        tracing::warn!(reason = %why, waited_s = waited, "daily key store unavailable; holding events until it is back");
                                    }
                                    waited += 1;
                                    std::thread::sleep(Duration::from_secs(1));
                                }
                                Err(NotAnonymized::Unprocessable(u)) => break Err(u.0),
                                Ok(row) => break Ok(row),
                            }
                        }
                    }
                };
                // decided: its position may now be committed
                pending.insert(rec.position.partition, rec.position.offset);
                match row {
                    Ok(None) => {
                        self.metrics.not_collected.inc();
                    }
                    Ok(Some(row)) => {
                        if self.dedup.insert(row.visitor_key.as_deref(), &row.event_id) {
                            self.uncommitted_ids += 1;
                            builder.push(&row);
                        } else {
                            self.metrics.duplicates_dropped.inc();
                        }
                    }
                    Err(reason) => dead.push(DeadLetter {
                        position: rec.position,
                        reason,
                        payload: rec.payload,
                    }),
                }
            }
            Ok(())
        });
        let linked_opt_outs = self.anonymizer.take_linked_opt_outs();
        if !linked_opt_outs.is_empty() {
            // in force here already; recorded so every stage and every restart honours them
            let records = linked_opt_outs
                .iter()
                .map(|r| marsad_eventlog::Record {
                    key: Some(r.log_key()),
                    payload: r.to_bytes(),
                })
                .collect();
            self.log.append(marsad_schemas::TOPIC_OPTOUTS, records).await?;
            tracing::info!(
                count = linked_opt_outs.len(),
                "opted out the cookies sent with opted-out user ids"
            );
        }
        if !dead.is_empty() {
            tracing::warn!(count = dead.len(), first_reason = %dead[0].reason, "sending unprocessable events to the dead-letter topic");
            dead_letters::send(self.log.as_ref(), &dead).await?;
            self.metrics.dead_letters.inc_by(dead.len() as u64);
        }
        handled
    }

    async fn flush(
        &mut self,
        builder: &mut EventsBatchBuilder,
        pending: &mut BTreeMap<u32, u64>,
        commands: &mpsc::UnboundedSender<ToLog>,
    ) -> Result<()> {
        if builder.is_empty() && pending.is_empty() {
            return Ok(());
        }
        // positions of events that made no row (duplicates, opt-outs, dead letters) are
        // committed too, in a commit without rows: an erasure waits for the processor to pass
        // the opt-out's position, and must not wait for the next event that makes a row
        let rows = builder.len();
        let batch = builder.finish()?;
        let positions: Vec<(String, u64)> = pending.iter().map(|(p, o)| (app_id(TOPIC_RAW, *p), *o)).collect();
        let crash = match &mut self.crash {
            Some((0, point)) => Some(*point),
            Some((n, _)) => {
                *n -= 1;
                None
            }
            None => None,
        };
        let mut attempt = 0;
        while let Err(e) = self.table.append(batch.clone(), &positions).await {
            pause_before_retry(&mut attempt, "delta commit", e).await?;
        }
        self.uncommitted_ids = 0;
        // counted as landed, whatever becomes of the rollup commit after it
        self.metrics.events_written.inc_by(rows as u64);
        self.metrics.commits.inc();
        if crash == Some(CrashPoint::AfterEvents) {
            return Err(crate::Error::SimulatedCrash);
        }
        // read once for the live window and the rollups: the rows they count (no bots)
        let read = match crate::rollup::EventRows::new(&batch) {
            Ok(read) => Some(read),
            Err(e) if self.rollups.is_some() => return Err(e),
            Err(e) => {
                tracing::warn!(error = %e, "the live view could not read a committed batch");
                None
            }
        };
        let counted: Vec<usize> = read
            .as_ref()
            .map(|r| (0..r.len()).filter(|&i| r.counted(i)).collect())
            .unwrap_or_default();
        if let Some(read) = &read {
            self.live.add(read, &counted, || Utc::now().timestamp());
        }
        if let (Some(rollups), Some(read)) = (&mut self.rollups, &read) {
            let positions: Vec<(String, i64)> = positions.iter().map(|(a, o)| (a.clone(), *o as i64)).collect();
            rollups.add_rows(read, &counted, &positions);
            for (app, offset) in positions {
                let at = self.rollup_positions.entry(app).or_insert(offset);
                *at = (*at).max(offset);
            }
            let due = *self
                .rollups_due
                .get_or_insert_with(|| Instant::now() + self.rollup_interval);
            if due <= Instant::now() {
                self.commit_rollups(crash).await?;
            }
        }
        for (p, o) in std::mem::take(pending) {
            self.metrics.position.set(o as i64 + 1);
            let _ = commands.send(ToLog::Commit(p, o + 1));
        }
        tracing::debug!(rows, "committed a batch to events");
        Ok(())
    }

    /// Commits what the rollups added since their last commit, recording the positions of
    /// the `events` commits it came from.
    async fn commit_rollups(&mut self, crash: Option<CrashPoint>) -> Result<()> {
        let Some(rollups) = &mut self.rollups else {
            return Ok(());
        };
        if self.rollups_due.is_none() {
            return Ok(());
        }
        let positions: Vec<(String, i64)> = self.rollup_positions.iter().map(|(a, o)| (a.clone(), *o)).collect();
        let mut attempt = 0;
        while let Err(e) = rollups.commit(&positions, crash).await {
            pause_before_retry(&mut attempt, "rollup commit", e).await?;
        }
        self.rollups_due = None;
        self.rollup_positions.clear();
        Ok(())
    }
}

/// After a failed commit, the pause before the next try (five tries more at most, each
/// pausing longer); `Err` when it is not to be retried: out of tries, or the partitions went
/// to another processor (or a simulated crash).
async fn pause_before_retry(attempt: &mut u64, what: &str, e: crate::Error) -> Result<()> {
    if e.is_lost_ownership() || matches!(e, crate::Error::SimulatedCrash) || *attempt >= 5 {
        return Err(e);
    }
    *attempt += 1;
    tracing::warn!(error = %e, attempt = *attempt, "{what} failed; retrying");
    tokio::time::sleep(Duration::from_millis(200 * *attempt)).await;
    Ok(())
}

/// The anonymizer as `config` sets it up (GeoIP, keys, allow-list, consent defaults,
/// categories), and the daily key store it hashes visitors with.
pub(crate) fn anonymizer_from_config(
    config: &Config,
    opt_outs: Arc<OptOutRegistry>,
) -> Result<(Anonymizer, Arc<dyn DailyKeyStore>)> {
    let geoip = Arc::new(GeoIp::from_config(&config.geoip.databases)?);
    tracing::info!(database = geoip.source(), "GeoIP database loaded");
    let daily_keys = marsad_privacy::keys::open_daily_key_store(config)?;
    let subject_keys = SubjectKeys::load(config)?;
    let anonymizer = Anonymizer::new(
        geoip,
        daily_keys.clone(),
        subject_keys,
        QueryAllowList::new(&config.privacy.query_allowlist),
        ConsentDefaults {
            analytics: config.ingest.default_analytics_consent,
            personalisation: config.privacy.default_personalisation_consent,
        },
        opt_outs,
    )
    .with_truncated_ips(config.privacy.truncate_ip)
    .with_categories(crate::category::PageCategories::new(&config.process.page_categories));
    Ok((anonymizer, daily_keys))
}

/// What the reader stage hands the processor.
enum FromLog {
    /// The partitions this processor owns now (first at start, again after each rebalance):
    /// the processor answers with [`ToLog::Resume`] before any record of them is read.
    Assigned(Vec<u32>),
    /// Records, in log order per partition.
    Records(Vec<Delivered>),
    /// The log failed.
    Failed(marsad_eventlog::Error),
}

/// What the processor tells the reader stage.
enum ToLog {
    /// Everything before this offset of the partition is in the tables (allows retention, lag).
    Commit(u32, u64),
    /// Read the owned partitions from these offsets.
    Resume(Vec<(u32, u64)>),
    /// Announce the assignment again (the processor lost track after a commit conflict).
    Resync,
}

/// The reader stage: announces the assignment whenever it changes and waits for the positions
/// to read from, then polls the log into the bounded channel; records commits for retention.
async fn read_log(
    mut sub: Box<dyn Subscription>,
    chunks: mpsc::Sender<FromLog>,
    mut commands: mpsc::UnboundedReceiver<ToLog>,
    stop: CancellationToken,
) {
    let mut announced: Option<u64> = None;
    let mut waiting = false;
    loop {
        loop {
            let command = if waiting {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    c = commands.recv() => match c { Some(c) => c, None => return },
                }
            } else {
                match commands.try_recv() {
                    Ok(c) => c,
                    Err(_) => break,
                }
            };
            match command {
                ToLog::Commit(p, next) => {
                    if let Err(e) = sub.commit(p, next).await {
                        tracing::warn!(error = %e, "could not record the consumer position (retention waits)");
                    }
                }
                ToLog::Resume(from) => {
                    for (p, offset) in from {
                        if let Err(e) = sub.seek(p, offset).await {
                            let _ = chunks.send(FromLog::Failed(e)).await;
                            return;
                        }
                    }
                    waiting = false;
                }
                ToLog::Resync => announced = None,
            }
        }
        let generation = sub.assignment_generation();
        if announced != Some(generation) {
            announced = Some(generation);
            waiting = true;
            let sent = tokio::select! {
                _ = stop.cancelled() => return,
                s = chunks.send(FromLog::Assigned(sub.assignment())) => s,
            };
            if sent.is_err() {
                return;
            }
            continue;
        }
        let polled = tokio::select! {
            _ = stop.cancelled() => return,
            r = sub.poll(POLL_MAX, Duration::from_millis(200)) => r,
        };
        match polled {
            Ok(records) if records.is_empty() => {}
            Ok(records) => {
                let sent = tokio::select! {
                    _ = stop.cancelled() => return,
                    s = chunks.send(FromLog::Records(records)) => s,
                };
                if sent.is_err() {
                    return;
                }
            }
            Err(e) => {
                let _ = chunks.send(FromLog::Failed(e)).await;
                return;
            }
        }
    }
}

/// Runs a processor until `shutdown`.
pub async fn run(
    config: &Config,
    log: Arc<dyn EventLog>,
    opt_outs: Arc<OptOutRegistry>,
    metrics: Arc<ProcessMetrics>,
    shutdown: CancellationToken,
) -> Result<()> {
    Processor::new(config, log, opt_outs, metrics)
        .await?
        .run(shutdown)
        .await
}
