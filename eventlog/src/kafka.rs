//! The event log on Kafka (rdkafka / librdkafka): how Marsad outgrows one
//! machine. Appends resolve only on the brokers' acknowledgement (`acks=all`,
//! idempotent producer); a full producer queue or an unreachable broker is
//! [`Error::Busy`] within the append timeout, never an unbounded wait. Group
//! subscriptions follow the group's assignment (cooperative-sticky), and a
//! consumer re-reads its positions whenever the assignment changes.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use rdkafka::ClientConfig;
use rdkafka::ClientContext;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};

use crate::{Delivered, Error, EventLog, Position, Record, Result, Subscription};

/// How long a metadata, watermark or seek request to the brokers may take.
const BROKER_REQUEST: Duration = Duration::from_secs(10);

/// How Marsad talks to Kafka.
#[derive(Debug, Clone)]
pub struct KafkaLogOptions {
    /// `host:port,…` of the bootstrap brokers.
    pub brokers: String,
    /// Names this process in the brokers' logs and quotas.
    pub client_id: String,
    /// An append not acknowledged within this is refused as busy (and librdkafka gives up on it).
    pub append_timeout: Duration,
    /// Messages the producer may hold unacknowledged; beyond, appends are refused as busy.
    pub max_pending_messages: usize,
    /// How long the producer waits to fill a batch.
    pub linger: Duration,
    /// Largest batch the producer sends, in bytes.
    pub batch_bytes: usize,
    /// `lz4`, `zstd`, `gzip`, `snappy` or `none`.
    pub compression: String,
    /// Consumers leave the group when silent this long (shorter: faster takeover after a crash).
    pub session_timeout: Duration,
    /// Any other librdkafka property, passed through as is (`security.protocol`, `sasl.*`, `ssl.*`).
    pub properties: BTreeMap<String, String>,
    /// Seek to the start of the retained partition and skip up to the wanted offset, for brokers
    /// that return nothing when asked to fetch from inside a record batch (tansu 0.6).
    pub seek_from_log_start: bool,
}

impl KafkaLogOptions {
    /// Options for `brokers` with Marsad's defaults.
    pub fn new(brokers: impl Into<String>) -> Self {
        KafkaLogOptions {
            brokers: brokers.into(),
            client_id: "marsad".into(),
            append_timeout: Duration::from_secs(5),
            max_pending_messages: 100_000,
            linger: Duration::from_millis(5),
            batch_bytes: 1 << 20,
            compression: "zstd".into(),
            session_timeout: Duration::from_secs(10),
            properties: BTreeMap::new(),
            seek_from_log_start: false,
        }
    }

    fn base(&self) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &self.brokers)
            .set("client.id", &self.client_id);
        self.overrides(&mut c);
        c
    }

    /// The pass-through properties, applied last so an operator can change any default.
    fn overrides(&self, c: &mut ClientConfig) {
        for (k, v) in &self.properties {
            c.set(k, v);
        }
    }

    fn producer(&self) -> ClientConfig {
        let mut c = self.base();
        let timeout_ms = self.append_timeout.as_millis().max(1).to_string();
        c.set("enable.idempotence", "true")
            .set("acks", "all")
            .set("compression.type", &self.compression)
            .set("linger.ms", self.linger.as_millis().to_string())
            .set("batch.size", self.batch_bytes.to_string())
            .set("queue.buffering.max.messages", self.max_pending_messages.to_string())
            .set("message.timeout.ms", &timeout_ms)
            .set("request.timeout.ms", &timeout_ms);
        self.overrides(&mut c);
        c
    }

    fn consumer(&self, group: &str) -> ClientConfig {
        let mut c = self.base();
        let session = self.session_timeout.as_millis().max(1000);
        c.set("group.id", group)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            .set("partition.assignment.strategy", "cooperative-sticky")
            .set("session.timeout.ms", session.to_string())
            // also the rebalance timeout: a member that left without a word holds a rebalance
            // up at most this long on brokers that wait for it
            .set("max.poll.interval.ms", (session * 6).max(30_000).to_string())
            .set("heartbeat.interval.ms", (session / 10).max(100).to_string())
            .set("enable.partition.eof", "false");
        self.overrides(&mut c);
        c
    }
}

fn kafka_error(what: &str, e: KafkaError) -> Error {
    match e.rdkafka_error_code() {
        Some(
            RDKafkaErrorCode::QueueFull
            | RDKafkaErrorCode::MessageTimedOut
            | RDKafkaErrorCode::RequestTimedOut
            | RDKafkaErrorCode::OperationTimedOut
            | RDKafkaErrorCode::AllBrokersDown
            | RDKafkaErrorCode::BrokerTransportFailure
            | RDKafkaErrorCode::NotEnoughReplicas
            | RDKafkaErrorCode::NotEnoughReplicasAfterAppend
            | RDKafkaErrorCode::LeaderNotAvailable
            | RDKafkaErrorCode::NotLeaderForPartition,
        ) => Error::Busy(format!("{what}: {e}")),
        _ => Error::Closed(format!("{what}: {e}")),
    }
}

/// Remembers whether the brokers answered lately, for `/readyz`.
struct ProducerHealth {
    reachable: AtomicBool,
}

/// Client context of the producer: notes when all brokers are down.
struct HealthContext(Arc<ProducerHealth>);

impl ClientContext for HealthContext {
    fn error(&self, error: KafkaError, reason: &str) {
        if error.rdkafka_error_code() == Some(RDKafkaErrorCode::AllBrokersDown) {
            self.0.reachable.store(false, Ordering::Relaxed);
        }
        tracing::warn!(%error, reason, "kafka client error");
    }
}

/// The event log on a Kafka cluster.
pub struct KafkaLog {
    options: KafkaLogOptions,
    producer: std::sync::RwLock<Arc<FutureProducer<HealthContext>>>,
    health: Arc<ProducerHealth>,
    /// Set when a delivery failed in a way no retry of this producer can fix (fenced epoch).
    producer_unusable: AtomicBool,
}

impl KafkaLog {
    /// Connects a producer (lazily: librdkafka connects in the background).
    pub fn connect(options: KafkaLogOptions) -> Result<Self> {
        let health = Arc::new(ProducerHealth {
            reachable: AtomicBool::new(true),
        });
        let producer = Self::new_producer(&options, &health)?;
        Ok(KafkaLog {
            options,
            producer: std::sync::RwLock::new(Arc::new(producer)),
            health,
            producer_unusable: AtomicBool::new(false),
        })
    }

    fn new_producer(options: &KafkaLogOptions, health: &Arc<ProducerHealth>) -> Result<FutureProducer<HealthContext>> {
        options
            .producer()
            .create_with_context(HealthContext(health.clone()))
            .map_err(|e| Error::Closed(format!("kafka producer: {e}")))
    }

    fn producer(&self) -> Result<Arc<FutureProducer<HealthContext>>> {
        self.producer
            .read()
            .map(|p| p.clone())
            .map_err(|_| Error::Closed("kafka producer lock poisoned".into()))
    }

    /// An idempotent producer can end unusable (a fatal error, or a broker that fences its
    /// epoch bump after an outage, as some Kafka-compatible brokers do): only a new producer
    /// can go on, so one replaces it. What it had not delivered was answered as failed, and
    /// clients retry it (the processor drops the duplicates by `event_id`).
    fn replace_if_fatal(&self, failed: &FutureProducer<HealthContext>) {
        let fenced = self.producer_unusable.swap(false, Ordering::Relaxed);
        let (code, reason) = match failed.client().fatal_error() {
            Some(fatal) => fatal,
            None if fenced => (
                RDKafkaErrorCode::ProducerFenced,
                "the brokers no longer accept its epoch".into(),
            ),
            None => return,
        };
        let Ok(mut current) = self.producer.write() else {
            return;
        };
        if !std::ptr::eq(current.as_ref(), failed) {
            return; // another append replaced it already
        }
        match Self::new_producer(&self.options, &self.health) {
            Ok(fresh) => {
                tracing::warn!(
                    ?code,
                    reason,
                    "kafka producer failed fatally; replaced it with a new one"
                );
                *current = Arc::new(fresh);
            }
            Err(e) => tracing::error!(error = %e, "kafka producer failed fatally and could not be replaced"),
        }
    }

    /// The options it was made with.
    pub fn options(&self) -> &KafkaLogOptions {
        &self.options
    }

    /// How many partitions `topic` has (from the brokers' metadata).
    pub async fn partitions(&self, topic: &str) -> Result<Vec<u32>> {
        let consumer: BaseConsumer = self
            .options
            .consumer("marsad-metadata")
            .create()
            .map_err(|e| Error::Closed(format!("kafka metadata client: {e}")))?;
        let topic = topic.to_owned();
        tokio::task::spawn_blocking(move || {
            let metadata = consumer
                .fetch_metadata(Some(&topic), BROKER_REQUEST)
                .map_err(|e| kafka_error("reading topic metadata", e))?;
            let t = metadata
                .topics()
                .iter()
                .find(|t| t.name() == topic)
                .ok_or_else(|| Error::Closed(format!("topic `{topic}` does not exist")))?;
            if let Some(e) = t.error() {
                return Err(Error::Closed(format!(
                    "topic `{topic}`: {:?} (create it with `marsad topics create`)",
                    RDKafkaErrorCode::from(e)
                )));
            }
            let mut ids: Vec<u32> = t.partitions().iter().map(|p| p.id() as u32).collect();
            ids.sort_unstable();
            if ids.is_empty() {
                return Err(Error::Closed(format!(
                    "topic `{topic}` has no partitions (create it with `marsad topics create`)"
                )));
            }
            Ok(ids)
        })
        .await
        .map_err(|e| Error::Closed(e.to_string()))?
    }

    /// Creates `topics` (name, partitions, replication, settings such as `cleanup.policy`);
    /// returns, per topic, whether it was created now (`false`: it existed).
    pub async fn create_topics(&self, topics: &[TopicSpec]) -> Result<Vec<(String, bool)>> {
        let admin: AdminClient<DefaultClientContext> = self
            .options
            .base()
            .create()
            .map_err(|e| Error::Closed(format!("kafka admin client: {e}")))?;
        let new: Vec<NewTopic<'_>> = topics
            .iter()
            .map(|t| {
                let mut n = NewTopic::new(
                    &t.name,
                    t.partitions as i32,
                    TopicReplication::Fixed(t.replication as i32),
                );
                for (k, v) in &t.config {
                    n = n.set(k, v);
                }
                n
            })
            .collect();
        let options = AdminOptions::new().operation_timeout(Some(BROKER_REQUEST));
        let results = admin
            .create_topics(new.iter(), &options)
            .await
            .map_err(|e| kafka_error("creating topics", e))?;
        let mut out = Vec::new();
        for r in results {
            match r {
                Ok(name) => out.push((name, true)),
                Err((name, RDKafkaErrorCode::TopicAlreadyExists)) => out.push((name, false)),
                Err((name, code)) => return Err(Error::Closed(format!("creating topic `{name}`: {code}"))),
            }
        }
        Ok(out)
    }
}

/// A topic to create.
#[derive(Debug, Clone)]
pub struct TopicSpec {
    /// Its name.
    pub name: String,
    /// Its partitions.
    pub partitions: u32,
    /// Copies of each partition.
    pub replication: u32,
    /// Topic settings (`cleanup.policy`, `retention.ms`, …).
    pub config: Vec<(String, String)>,
}

#[async_trait]
impl EventLog for KafkaLog {
    async fn append(&self, topic: &str, records: Vec<Record>) -> Result<Vec<Position>> {
        let producer = self.producer()?;
        let result = self.append_with(&producer, topic, records).await;
        if result.is_err() {
            self.replace_if_fatal(&producer);
        }
        result
    }

    async fn subscribe(&self, topic: &str, group: &str) -> Result<Box<dyn Subscription>> {
        let sub = self.subscription(topic, group)?;
        sub.consumer
            .subscribe(&[topic])
            .map_err(|e| kafka_error("subscribing", e))?;
        Ok(Box::new(sub))
    }

    async fn read_all(&self, topic: &str) -> Result<Box<dyn Subscription>> {
        let partitions = self.partitions(topic).await?;
        let sub = self.subscription_with(topic, &format!("marsad-reader-{}", std::process::id()), |c| {
            // a table-like topic (the opt-outs) is idle nearly always: the brokers' default wait
            // of 500 ms for more data took half of the second in which an opt-out must count
            // everywhere (and be pushed to the ad system)
            c.set("fetch.wait.max.ms", "50");
        })?;
        let mut tpl = TopicPartitionList::new();
        for &p in &partitions {
            tpl.add_partition_offset(topic, p as i32, Offset::Beginning)
                .map_err(|e| kafka_error("assigning", e))?;
        }
        sub.consumer.assign(&tpl).map_err(|e| kafka_error("assigning", e))?;
        if let Ok(mut a) = sub.assignment.partitions.lock() {
            a.extend(partitions.iter().copied());
        }
        Ok(Box::new(sub))
    }

    fn is_ready(&self) -> bool {
        self.health.reachable.load(Ordering::Relaxed)
    }
}

impl KafkaLog {
    /// A consumer of `topic` as `group`, not yet subscribed or assigned.
    fn subscription(&self, topic: &str, group: &str) -> Result<KafkaSubscription> {
        self.subscription_with(topic, group, |_| {})
    }

    /// [`Self::subscription`], with `tweak` applied to the consumer's settings.
    fn subscription_with(
        &self,
        topic: &str,
        group: &str,
        tweak: impl FnOnce(&mut ClientConfig),
    ) -> Result<KafkaSubscription> {
        let assignment = Arc::new(Assignment::default());
        let mut config = self.options.consumer(group);
        tweak(&mut config);
        let consumer: StreamConsumer<GroupContext> = config
            .create_with_context(GroupContext {
                assignment: assignment.clone(),
            })
            .map_err(|e| Error::Closed(format!("kafka consumer: {e}")))?;
        Ok(KafkaSubscription {
            consumer: Arc::new(consumer),
            topic: topic.to_owned(),
            assignment,
            wanted: BTreeMap::new(),
            seek_from_log_start: self.options.seek_from_log_start,
            pending_seeks: BTreeSet::new(),
        })
    }

    async fn append_with(
        &self,
        producer: &FutureProducer<HealthContext>,
        topic: &str,
        records: Vec<Record>,
    ) -> Result<Vec<Position>> {
        let mut deliveries = Vec::with_capacity(records.len());
        for r in &records {
            let mut message: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(topic).payload(&r.payload);
            if let Some(k) = &r.key {
                message = message.key(k.as_slice());
            }
            match producer.send_result(message) {
                Ok(delivery) => deliveries.push(delivery),
                Err((e, _)) => return Err(kafka_error("queueing for the brokers", e)),
            }
        }
        self.await_acknowledgements(deliveries).await
    }

    async fn await_acknowledgements(
        &self,
        deliveries: Vec<rdkafka::producer::DeliveryFuture>,
    ) -> Result<Vec<Position>> {
        let acknowledged = tokio::time::timeout(
            self.options.append_timeout + Duration::from_millis(500),
            futures::future::join_all(deliveries),
        )
        .await
        .map_err(|_| {
            Error::Busy(format!(
                "not acknowledged by the brokers within {:?}",
                self.options.append_timeout
            ))
        })?;
        let mut positions = Vec::with_capacity(acknowledged.len());
        for a in acknowledged {
            match a {
                Ok(Ok(d)) => {
                    self.health.reachable.store(true, Ordering::Relaxed);
                    positions.push(Position {
                        partition: d.partition as u32,
                        offset: d.offset as u64,
                    });
                }
                Ok(Err((e, _))) => {
                    if matches!(
                        e.rdkafka_error_code(),
                        Some(
                            RDKafkaErrorCode::ProducerFenced
                                | RDKafkaErrorCode::InvalidProducerEpoch
                                | RDKafkaErrorCode::OutOfOrderSequenceNumber
                                | RDKafkaErrorCode::UnknownProducerId
                        )
                    ) {
                        self.producer_unusable.store(true, Ordering::Relaxed);
                    }
                    return Err(kafka_error("delivering to the brokers", e));
                }
                Err(_) => return Err(Error::Closed("the producer was shut down".into())),
            }
        }
        Ok(positions)
    }
}

/// The partitions a group consumer owns now, and how often that changed.
#[derive(Default)]
struct Assignment {
    partitions: Mutex<BTreeSet<u32>>,
    generation: AtomicU64,
}

/// Consumer context: follows the group's assignment as librdkafka reports it.
struct GroupContext {
    assignment: Arc<Assignment>,
}

impl ClientContext for GroupContext {}

impl ConsumerContext for GroupContext {
    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let Ok(mut owned) = self.assignment.partitions.lock() else {
            return;
        };
        match rebalance {
            Rebalance::Assign(tpl) => {
                owned.extend(tpl.elements().iter().map(|e| e.partition() as u32));
                tracing::info!(partitions = ?*owned, "kafka partitions assigned");
            }
            Rebalance::Revoke(tpl) => {
                for e in tpl.elements() {
                    owned.remove(&(e.partition() as u32));
                }
                tracing::info!(partitions = ?*owned, "kafka partitions revoked; now owning these");
            }
            Rebalance::Error(e) => {
                tracing::warn!(error = %e, "kafka rebalance error");
                return;
            }
        }
        self.assignment.generation.fetch_add(1, Ordering::SeqCst);
    }
}

/// A consumer of one topic: in a group (following its assignment) or of every partition.
struct KafkaSubscription {
    consumer: Arc<StreamConsumer<GroupContext>>,
    topic: String,
    assignment: Arc<Assignment>,
    /// The next offset the caller asked for per partition: records before it are not delivered.
    wanted: BTreeMap<u32, u64>,
    /// See [`KafkaLogOptions::seek_from_log_start`].
    seek_from_log_start: bool,
    /// Partitions whose seek librdkafka refused (its fetcher had not started yet): their records
    /// are dropped, and the seek tried again on every poll until it is taken.
    pending_seeks: BTreeSet<u32>,
}

impl KafkaSubscription {
    fn deliver(&mut self, partition: u32, offset: u64, payload: Option<&[u8]>, out: &mut Vec<Delivered>) {
        // fetched from wherever the consumer started, before our seek took effect: the records
        // between the wanted offset and this one would never be delivered
        if self.pending_seeks.contains(&partition) {
            return;
        }
        if self.wanted.get(&partition).is_some_and(|w| offset < *w) {
            return;
        }

        self.wanted.insert(partition, offset + 1);
        // tombstones (compacted topics) carry no payload: nothing to hand over
        if let Some(payload) = payload {
            out.push(Delivered {
                position: Position { partition, offset },
                payload: payload.to_vec(),
            });
        }
    }
}

#[async_trait]
impl Subscription for KafkaSubscription {
    fn assignment(&self) -> Vec<u32> {
        self.assignment
            .partitions
            .lock()
            .map(|p| p.iter().copied().collect())
            .unwrap_or_default()
    }

    fn assignment_generation(&self) -> u64 {
        self.assignment.generation.load(Ordering::SeqCst)
    }

    async fn seek(&mut self, partition: u32, offset: u64) -> Result<()> {
        self.wanted.insert(partition, offset);
        self.pending_seeks.insert(partition);
        self.retry_seek(partition).await
    }

    async fn poll(&mut self, max: usize, timeout: Duration) -> Result<Vec<Delivered>> {
        let pending: Vec<u32> = self.pending_seeks.iter().copied().collect();
        for partition in pending {
            self.retry_seek(partition).await?;
        }
        let mut out = Vec::new();
        let deadline = tokio::time::Instant::now() + timeout;
        while out.len() < max {
            // wait for the first record up to the deadline, then take what is already there
            let wait = if out.is_empty() {
                deadline.saturating_duration_since(tokio::time::Instant::now())
            } else {
                Duration::from_millis(1)
            };
            if wait.is_zero() {
                break;
            }
            let consumer = self.consumer.clone();
            let received = tokio::time::timeout(wait, async move {
                consumer
                    .recv()
                    .await
                    .map(|m| (m.partition() as u32, m.offset() as u64, m.payload().map(<[u8]>::to_vec)))
            })
            .await;
            match received {
                Err(_) => break,
                Ok(Ok((partition, offset, payload))) => {
                    self.deliver(partition, offset, payload.as_deref(), &mut out);
                }
                // consumer errors are the brokers' or the network's trouble of the moment (librdkafka
                // reconnects and refetches by itself): say so and go on, never stop the processor
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, topic = %self.topic, "kafka read failed; retrying");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    break;
                }
            }
        }
        Ok(out)
    }

    async fn commit(&mut self, partition: u32, next_offset: u64) -> Result<()> {
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(&self.topic, partition as i32, Offset::Offset(next_offset as i64))
            .map_err(|e| kafka_error("committing", e))?;
        self.consumer
            .commit(&tpl, CommitMode::Async)
            .map_err(|e| kafka_error("committing", e))
    }

    async fn retained_from(&mut self, partition: u32) -> Result<u64> {
        let (low, _) = self.watermarks(partition).await?;
        Ok(low)
    }

    async fn end_offset(&mut self, partition: u32) -> Result<Option<u64>> {
        let (_, high) = self.watermarks(partition).await?;
        Ok(Some(high))
    }
}

impl KafkaSubscription {
    /// Seeks `partition` to the wanted offset (or to the log start, see
    /// [`KafkaLogOptions::seek_from_log_start`]); keeps it pending while librdkafka refuses.
    ///
    /// A consumer whose seek came before its fetcher started reads from wherever the group's
    /// committed offset, the reset policy or its previous fetch position says: possibly past
    /// the wanted offset (records lost if delivered), possibly inside a record batch (tansu
    /// then serves nothing). So records of a partition are only delivered once its seek was
    /// taken; after that librdkafka hands out nothing fetched before it.
    async fn retry_seek(&mut self, partition: u32) -> Result<()> {
        if !self.assignment().contains(&partition) {
            self.pending_seeks.remove(&partition);
            return Ok(());
        }
        let wanted = self.wanted.get(&partition).copied().unwrap_or(0);
        let target = if self.seek_from_log_start {
            Offset::Beginning
        } else {
            Offset::Offset(wanted as i64)
        };
        let consumer = self.consumer.clone();
        let topic = self.topic.clone();
        let sought =
            tokio::task::spawn_blocking(move || consumer.seek(&topic, partition as i32, target, BROKER_REQUEST))
                .await
                .map_err(|e| Error::Closed(e.to_string()))?;
        match sought {
            Ok(()) => {
                self.pending_seeks.remove(&partition);
            }
            Err(e) => {
                tracing::debug!(partition, wanted, error = %e, "kafka seek deferred until the fetcher starts");
            }
        }
        Ok(())
    }

    async fn watermarks(&self, partition: u32) -> Result<(u64, u64)> {
        let consumer = self.consumer.clone();
        let topic = self.topic.clone();
        let (low, high) =
            tokio::task::spawn_blocking(move || consumer.fetch_watermarks(&topic, partition as i32, BROKER_REQUEST))
                .await
                .map_err(|e| Error::Closed(e.to_string()))?
                .map_err(|e| kafka_error("reading watermarks", e))?;
        Ok((low.max(0) as u64, high.max(0) as u64))
    }
}
