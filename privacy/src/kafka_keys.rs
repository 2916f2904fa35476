//! Daily visitor keys on a compacted Kafka topic, for processors on several
//! machines: every instance must hash a cookie under the same key of the day.
//!
//! A processor that needs a day's key and sees none *proposes* one: a record
//! keyed `<day>/<random id>` holding a fresh random key. The first proposal of
//! the day in the topic's order wins, everywhere: a proposer waits until it
//! has read past its own record, by which point it has read the winner too.
//! Proposal keys are unique, so compaction never replaces a winner with a
//! later proposal. Destroying a day writes a tombstone for each of its
//! proposals; compaction then removes the records themselves (the topic is
//! created with short compaction lags for this, see `marsad topics create`).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use chrono::{DateTime, NaiveDate, Utc};
use rdkafka::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};

use crate::keys::{DailyKeyStore, SecretKey, key_expiry};
use crate::{Error, Result};

/// How long a proposer waits to read its own proposal back.
const READ_BACK: Duration = Duration::from_secs(15);

fn kafka(what: &'static str, e: impl std::fmt::Display) -> Error {
    Error::KeyStore {
        what,
        reason: e.to_string(),
    }
}

/// What the follower thread has read of the topic.
#[derive(Default)]
struct Keys {
    /// The winning key of each day still holding one.
    winners: BTreeMap<NaiveDate, Arc<SecretKey>>,
    /// Every proposal key seen per day (tombstoned on destruction).
    proposals: HashMap<NaiveDate, Vec<String>>,
    /// Days with a tombstone: never again given a key.
    destroyed: std::collections::BTreeSet<NaiveDate>,
    /// The next offset the follower will read.
    next_offset: i64,
    /// Why the follower stopped, if it did.
    failed: Option<String>,
}

impl Keys {
    fn apply(&mut self, key: &str, payload: Option<&[u8]>) {
        let Some(day) = key.split('/').next().and_then(|d| d.parse::<NaiveDate>().ok()) else {
            return;
        };
        match payload {
            None => {
                self.destroyed.insert(day);
                self.winners.remove(&day);
            }
            Some(bytes) => {
                self.proposals.entry(day).or_default().push(key.to_owned());
                let parsed = std::str::from_utf8(bytes)
                    .ok()
                    .and_then(|hex| SecretKey::from_hex("daily key proposal", hex).ok());
                if let Some(secret) = parsed
                    && !self.destroyed.contains(&day)
                {
                    self.winners.entry(day).or_insert(Arc::new(secret));
                }
            }
        }
    }
}

/// Daily keys shared through the compacted topic `topic` of a Kafka cluster.
pub struct KafkaDailyKeyStore {
    topic: String,
    grace: chrono::Duration,
    producer: FutureProducer,
    state: Arc<(Mutex<Keys>, Condvar)>,
    stop: Arc<std::sync::atomic::AtomicBool>,
}

impl KafkaDailyKeyStore {
    /// Connects with `properties` (librdkafka settings, `bootstrap.servers` among them), reads
    /// `topic` from its start and keeps following it; keys past `grace` after their day are refused.
    pub fn connect(properties: &BTreeMap<String, String>, topic: &str, grace: chrono::Duration) -> Result<Self> {
        let mut base = ClientConfig::new();
        for (k, v) in properties {
            base.set(k, v);
        }
        let producer: FutureProducer = base
            .clone()
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("linger.ms", "0")
            .set("message.timeout.ms", "10000")
            .create()
            .map_err(|e| kafka("daily key producer", e))?;
        let consumer: BaseConsumer = base
            .clone()
            .set("group.id", format!("marsad-keys-{}", std::process::id()))
            .set("enable.auto.commit", "false")
            .set("enable.partition.eof", "false")
            .create()
            .map_err(|e| kafka("daily key reader", e))?;
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(topic, 0, Offset::Beginning)
            .map_err(|e| kafka("daily key reader", e))?;
        consumer.assign(&tpl).map_err(|e| kafka("daily key reader", e))?;
        let (_, high) = consumer
            .fetch_watermarks(topic, 0, Duration::from_secs(10))
            .map_err(|e| kafka("daily key topic (create it with `marsad topics create`)", e))?;
        let state = Arc::new((Mutex::new(Keys::default()), Condvar::new()));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        {
            let state = state.clone();
            let stop = stop.clone();
            std::thread::Builder::new()
                .name("daily-keys".into())
                .spawn(move || follow(consumer, state, stop))
                .map_err(|e| kafka("daily key reader thread", e))?;
        }
        let store = KafkaDailyKeyStore {
            topic: topic.to_owned(),
            grace,
            producer,
            state,
            stop,
        };
        // serve nothing before the existing keys are read
        store.wait_read_past(high - 1)?;
        Ok(store)
    }

    /// Blocks until the follower has read the record at `offset` (or failed).
    fn wait_read_past(&self, offset: i64) -> Result<()> {
        let (lock, read) = &*self.state;
        let keys = lock.lock().map_err(|_| kafka("daily keys", "poisoned"))?;
        let (keys, timeout) = read
            .wait_timeout_while(keys, READ_BACK, |k| k.next_offset <= offset && k.failed.is_none())
            .map_err(|_| kafka("daily keys", "poisoned"))?;
        if let Some(why) = &keys.failed {
            return Err(kafka("daily key reader", why));
        }
        if timeout.timed_out() {
            return Err(kafka(
                "daily keys",
                format!("could not read the key topic up to offset {offset} within {READ_BACK:?}"),
            ));
        }
        Ok(())
    }

    /// Writes `payload` (or a tombstone) under `key`, waits for the brokers' acknowledgement and
    /// returns the record's offset.
    fn write(&self, key: &str, payload: Option<&str>) -> Result<i64> {
        let record: FutureRecord<'_, str, str> = match payload {
            Some(p) => FutureRecord::to(&self.topic).key(key).payload(p),
            None => FutureRecord::to(&self.topic).key(key),
        };
        let delivery = self
            .producer
            .send_result(record)
            .map_err(|(e, _)| kafka("daily key write", e))?;
        match futures::executor::block_on(delivery) {
            Ok(Ok(d)) => Ok(d.offset),
            Ok(Err((e, _))) => Err(kafka("daily key write", e)),
            Err(_) => Err(kafka("daily key write", "the producer stopped")),
        }
    }

    fn lookup(&self, day: NaiveDate) -> Result<Option<Arc<SecretKey>>> {
        let keys = self.state.0.lock().map_err(|_| kafka("daily keys", "poisoned"))?;
        if keys.destroyed.contains(&day) {
            return Err(Error::KeyDestroyed { day });
        }
        Ok(keys.winners.get(&day).cloned())
    }
}

impl Drop for KafkaDailyKeyStore {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

fn follow(consumer: BaseConsumer, state: Arc<(Mutex<Keys>, Condvar)>, stop: Arc<std::sync::atomic::AtomicBool>) {
    let (lock, read) = &*state;
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        match consumer.poll(Duration::from_millis(200)) {
            None => {}
            Some(Ok(m)) => {
                let key = m
                    .key()
                    .and_then(|k| std::str::from_utf8(k).ok())
                    .unwrap_or_default()
                    .to_owned();
                if let Ok(mut keys) = lock.lock() {
                    keys.apply(&key, m.payload());
                    keys.next_offset = keys.next_offset.max(m.offset() + 1);
                }
                read.notify_all();
            }
            Some(Err(e)) => {
                tracing::warn!(error = %e, "reading the daily key topic");
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    }
}

impl DailyKeyStore for KafkaDailyKeyStore {
    fn key_for(&self, day: NaiveDate) -> Result<Arc<SecretKey>> {
        if Utc::now() >= key_expiry(day, self.grace) {
            return Err(Error::KeyDestroyed { day });
        }
        if let Some(key) = self.lookup(day)? {
            return Ok(key);
        }
        let proposal = SecretKey::random();
        let id: u64 = rand::random();
        let offset = self.write(&format!("{day}/{id:016x}"), Some(&proposal.to_hex()))?;
        self.wait_read_past(offset)?;
        self.lookup(day)?
            .ok_or_else(|| kafka("daily keys", format!("no key for {day} after proposing one")))
    }

    fn destroy_expired(&self, now: DateTime<Utc>, grace: chrono::Duration) -> Result<Vec<NaiveDate>> {
        let expired: Vec<(NaiveDate, Vec<String>)> = {
            let keys = self.state.0.lock().map_err(|_| kafka("daily keys", "poisoned"))?;
            keys.proposals
                .iter()
                .filter(|(day, _)| now >= key_expiry(**day, grace) && !keys.destroyed.contains(day))
                .map(|(day, p)| (*day, p.clone()))
                .collect()
        };
        let mut destroyed = Vec::new();
        for (day, proposals) in expired {
            for p in &proposals {
                self.write(p, None)?;
            }
            if let Ok(mut keys) = self.state.0.lock() {
                keys.destroyed.insert(day);
                keys.winners.remove(&day);
            }
            destroyed.push(day);
        }
        destroyed.sort();
        Ok(destroyed)
    }

    fn existing(&self) -> Result<Vec<(NaiveDate, Arc<SecretKey>)>> {
        let keys = self.state.0.lock().map_err(|_| kafka("daily keys", "poisoned"))?;
        Ok(keys.winners.iter().map(|(d, k)| (*d, k.clone())).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_proposal_wins_and_a_tombstone_ends_the_day() {
        let day = NaiveDate::from_ymd_opt(2026, 11, 25).unwrap_or_default();
        let (a, b) = (SecretKey::random(), SecretKey::random());
        let mut keys = Keys::default();
        keys.apply(&format!("{day}/01"), Some(a.to_hex().as_bytes()));
        keys.apply(&format!("{day}/02"), Some(b.to_hex().as_bytes()));
        assert_eq!(keys.winners.get(&day).map(|k| k.to_hex()), Some(a.to_hex()));
        keys.apply(&format!("{day}/01"), None);
        assert!(keys.winners.is_empty() && keys.destroyed.contains(&day));
        keys.apply(&format!("{day}/03"), Some(SecretKey::random().to_hex().as_bytes()));
        assert!(keys.winners.is_empty(), "a destroyed day never gets a key again");
    }

    /// Two processors (two stores) on librdkafka's mock cluster agree on each day's key, even
    /// when both propose at once; after the grace period the key is gone for both, for a store
    /// started later too, and re-hashing a known cookie cannot give that day's visitor key.
    #[test]
    fn stores_on_one_topic_agree_and_forget_together() -> Result<()> {
        use crate::pseudonym::visitor_key;
        let cluster = rdkafka::mocking::MockCluster::new(1).map_err(|e| kafka("mock cluster", e))?;
        cluster
            .create_topic("keys", 1, 1)
            .map_err(|e| kafka("mock cluster", e))?;
        let mut properties = BTreeMap::new();
        properties.insert("bootstrap.servers".to_owned(), cluster.bootstrap_servers());
        let grace = chrono::Duration::hours(48);
        let a = Arc::new(KafkaDailyKeyStore::connect(&properties, "keys", grace)?);
        let b = Arc::new(KafkaDailyKeyStore::connect(&properties, "keys", grace)?);
        let today = Utc::now().date_naive();
        let (ka, kb) = std::thread::scope(|s| {
            let ta = s.spawn(|| a.key_for(today));
            let tb = s.spawn(|| b.key_for(today));
            (ta.join(), tb.join())
        });
        let (ka, kb) = (
            ka.map_err(|_| kafka("test", "panicked"))??,
            kb.map_err(|_| kafka("test", "panicked"))??,
        );
        assert_eq!(ka.to_hex(), kb.to_hex(), "one key per day, whoever proposed first");
        let cookie_key = visitor_key(&ka, "c-known");
        let later = KafkaDailyKeyStore::connect(&properties, "keys", grace)?;
        assert_eq!(
            later.key_for(today)?.to_hex(),
            ka.to_hex(),
            "a store started later reads the same key"
        );

        let destroyed = a.destroy_expired(Utc::now() + chrono::Duration::days(4), grace)?;
        assert_eq!(destroyed, vec![today]);
        assert!(matches!(a.key_for(today), Err(Error::KeyDestroyed { .. })));
        let after = KafkaDailyKeyStore::connect(&properties, "keys", grace)?;
        assert!(matches!(after.key_for(today), Err(Error::KeyDestroyed { .. })));
        assert!(after.existing()?.is_empty(), "the key is gone from the store");
        // whatever a store hands out now, it is not that day's key
        let tomorrow = today.succ_opt().unwrap_or(today);
        let other = after.key_for(tomorrow)?;
        assert_ne!(visitor_key(&other, "c-known"), cookie_key);
        Ok(())
    }
}
