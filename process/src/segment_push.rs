//! Segment changes pushed to the ad system: after each refresh of `segment_members`, every
//! `audience_id` whose segments changed, with the segments it is in now and those it joined
//! and left; after every opt-out, at once, its removal from every segment. Changes go to a
//! compacted Kafka topic keyed by `audience_id` (the last record of a key is its state, and a
//! removal is followed by a tombstone so compaction forgets the id) and/or to an HTTPS webhook
//! signed with HMAC-SHA256, retried with backoff until delivered.
//!
//! Only served segments are ever named: a held-back segment's members are never published, and
//! when a served segment is held back, every member it had leaves it (not only those who left
//! it: the ones still in it must not be singled out by difference). What was published last
//! is kept in `<data_dir>/segment_push/`, so a restart publishes what changed meanwhile.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use arrow::array::{Array, StringArray};
use arrow::datatypes::DataType;
use chrono::{DateTime, Utc};
use marsad_config::TablesLocation;
use marsad_privacy::optout::{OptOutRecord, OptOutRegistry, Purpose};
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// Which served segments each `audience_id` of them is in.
pub type Membership = BTreeMap<String, BTreeSet<String>>;

/// Why a member's segments changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Cause {
    /// A refresh of the segments.
    Refresh,
    /// The visitor opted out of personalisation: out of every segment, at once.
    OptOut,
}

/// One member's change, as the ad system receives it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MembershipChange {
    /// Increases with every change published (gaps possible, never reused): a receiver applies
    /// a change only when it is above the last one it applied for that member, so a replayed
    /// or late request cannot put back a member who left or opted out.
    pub sequence: u64,
    /// The member.
    pub audience_id: String,
    /// Every served segment it is in now (empty: none; drop the id).
    pub segments: Vec<String>,
    /// The segments it joined.
    pub joined: Vec<String>,
    /// The segments it left.
    pub left: Vec<String>,
    /// Why.
    pub cause: Cause,
    /// When Marsad published a refresh's change, or when the opt-out was made (when a refresh
    /// saw it before the opt-out log was read: when that refresh was published).
    pub at: DateTime<Utc>,
}

/// The changes between what was published (`before`) and a refresh's served membership
/// (`after`), by member. A held-back segment is absent from `after`: its members all leave.
pub fn changes(before: &Membership, after: &Membership, at: DateTime<Utc>) -> Vec<MembershipChange> {
    let empty = BTreeSet::new();
    let ids: BTreeSet<&String> = before.keys().chain(after.keys()).collect();
    ids.into_iter()
        .filter_map(|id| {
            let (was, is) = (before.get(id).unwrap_or(&empty), after.get(id).unwrap_or(&empty));
            (was != is).then(|| MembershipChange {
                sequence: 0,
                audience_id: id.clone(),
                segments: is.iter().cloned().collect(),
                joined: is.difference(was).cloned().collect(),
                left: was.difference(is).cloned().collect(),
                cause: Cause::Refresh,
                at,
            })
        })
        .collect()
}

/// The removal of `audience_id` from every segment after its opt-out: `left` names every
/// segment served now, whatever was published of it, so a consumer that missed a change
/// still drops the id everywhere.
pub fn opt_out_change(audience_id: &str, served: &BTreeSet<String>, at: DateTime<Utc>) -> MembershipChange {
    MembershipChange {
        sequence: 0,
        audience_id: audience_id.to_owned(),
        segments: Vec::new(),
        joined: Vec::new(),
        left: served.iter().cloned().collect(),
        cause: Cause::OptOut,
        at,
    }
}

/// Where changes go: a Kafka topic, a webhook.
#[async_trait::async_trait]
pub trait SegmentChannel: Send + Sync {
    /// Delivers `changes` in order; returns only once the receiver has them (retrying
    /// meanwhile), or an error that retrying cannot mend.
    async fn deliver(&self, changes: &[MembershipChange]) -> Result<()>;

    /// For logs.
    fn describe(&self) -> String;
}

fn push_error(what: &'static str, reason: impl std::fmt::Display) -> Error {
    Error::Push {
        what,
        reason: reason.to_string(),
    }
}

/// The signature header of a webhook POST: `t=<unix seconds>,v1=<hex HMAC-SHA256 of
/// "<t>.<body>">`. The time is signed so a captured request cannot be replayed later.
pub const SIGNATURE_HEADER: &str = "x-marsad-signature";

/// The signature of `body` sent at `unix_seconds` under `key`.
pub fn sign(key: &[u8], unix_seconds: i64, body: &[u8]) -> String {
    use hmac::{KeyInit, Mac};
    // HMAC takes a key of any length: `new_from_slice` cannot fail for it
    let mac = <hmac::Hmac<sha2::Sha256> as KeyInit>::new_from_slice(key).map(|mut mac| {
        mac.update(unix_seconds.to_string().as_bytes());
        mac.update(b".");
        mac.update(body);
        hex::encode(mac.finalize().into_bytes())
    });
    format!("t={unix_seconds},v1={}", mac.unwrap_or_default())
}

/// `url` without what may be a secret (user info, query): for logs.
fn redacted(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(u) => format!(
            "{}://{}{}{}",
            u.scheme(),
            u.host_str().unwrap_or("?"),
            u.port().map(|p| format!(":{p}")).unwrap_or_default(),
            u.path()
        ),
        Err(_) => "(an unparsable URL)".into(),
    }
}

/// POSTs changes to an HTTPS endpoint, `{"changes": […]}`, signed (see [`SIGNATURE_HEADER`]).
pub struct Webhook {
    url: String,
    key: zeroize::Zeroizing<Vec<u8>>,
    client: reqwest::Client,
    stop: tokio_util::sync::CancellationToken,
}

/// The first pause between two attempts of a POST; it doubles up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(200);
/// The longest pause between two attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(60);

impl Webhook {
    /// A webhook to `url`, signing with `key`, trusting the authorities of `ca_file` besides
    /// the system's; gives up retrying when `stop` is cancelled.
    pub fn new(
        url: &str,
        key: &[u8],
        ca_file: Option<&Path>,
        timeout: Duration,
        stop: tokio_util::sync::CancellationToken,
    ) -> Result<Self> {
        let mut builder = reqwest::Client::builder()
            .timeout(timeout)
            .https_only(true)
            .redirect(reqwest::redirect::Policy::none());
        if let Some(path) = ca_file {
            let pem =
                std::fs::read(path).map_err(|e| push_error("webhook CA file", format!("{}: {e}", path.display())))?;
            for cert in reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| push_error("webhook CA file", e))? {
                builder = builder.add_root_certificate(cert);
            }
        }
        let client = builder.build().map_err(|e| push_error("webhook client", e))?;
        Ok(Webhook {
            url: url.to_owned(),
            key: zeroize::Zeroizing::new(key.to_vec()),
            client,
            stop,
        })
    }

    async fn post_once(&self, body: &[u8]) -> std::result::Result<(), String> {
        let signature = sign(&self.key, Utc::now().timestamp(), body);
        let resp = self
            .client
            .post(&self.url)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header(SIGNATURE_HEADER, signature)
            .body(body.to_vec())
            .send()
            .await
            .map_err(|e| format!("{e}"))?;
        let status = resp.status();
        if status.is_success() {
            Ok(())
        } else {
            Err(format!("answered {status}"))
        }
    }
}

#[async_trait::async_trait]
impl SegmentChannel for Webhook {
    async fn deliver(&self, changes: &[MembershipChange]) -> Result<()> {
        let body = serde_json::to_vec(&serde_json::json!({ "changes": changes }))
            .map_err(|e| push_error("webhook body", e))?;
        let mut pause = FIRST_BACKOFF;
        let mut attempt = 1u32;
        loop {
            match self.post_once(&body).await {
                Ok(()) => return Ok(()),
                Err(reason) => {
                    // every status is retried: a receiver that refuses (a wrong key, a bug) is
                    // fixed by its operator, and nothing is dropped meanwhile
                    tracing::warn!(url = %redacted(&self.url), attempt, retry_in_ms = pause.as_millis() as u64, %reason,
                        changes = changes.len(), "segment webhook failed; retrying");
                }
            }
            tokio::select! {
                _ = self.stop.cancelled() => return Err(push_error("webhook", "stopped before the receiver took the changes")),
                _ = tokio::time::sleep(pause) => {}
            }
            pause = (pause * 2).min(MAX_BACKOFF);
            attempt += 1;
        }
    }

    fn describe(&self) -> String {
        format!("webhook {}", redacted(&self.url))
    }
}

/// A compacted Kafka topic keyed by `audience_id`: each record is the member's state after the
/// change; a member left with no segment gets a tombstone after it.
pub struct KafkaTopic {
    topic: String,
    producer: rdkafka::producer::FutureProducer,
}

impl KafkaTopic {
    /// A producer for `topic` with the event log's client properties.
    pub fn new(properties: &BTreeMap<String, String>, topic: &str) -> Result<Self> {
        let mut config = rdkafka::ClientConfig::new();
        for (k, v) in properties {
            config.set(k, v);
        }
        config.set("enable.idempotence", "true");
        let producer = config.create().map_err(|e| push_error("segments topic producer", e))?;
        Ok(KafkaTopic {
            topic: topic.to_owned(),
            producer,
        })
    }
}

#[async_trait::async_trait]
impl SegmentChannel for KafkaTopic {
    async fn deliver(&self, changes: &[MembershipChange]) -> Result<()> {
        use rdkafka::producer::FutureRecord;
        let payloads = changes
            .iter()
            .map(serde_json::to_vec)
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(|e| push_error("segments record", e))?;
        let mut pending = Vec::with_capacity(changes.len() * 2);
        for (change, payload) in changes.iter().zip(&payloads) {
            let key = change.audience_id.as_bytes();
            let record: FutureRecord<'_, [u8], [u8]> =
                FutureRecord::to(&self.topic).key(key).payload(payload.as_slice());
            pending.push(self.producer.send(record, Duration::from_secs(30)));
            if change.segments.is_empty() {
                let tombstone: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(&self.topic).key(key);
                pending.push(self.producer.send(tombstone, Duration::from_secs(30)));
            }
        }
        for delivery in futures::future::join_all(pending).await {
            delivery.map_err(|(e, _)| push_error("segments topic", e))?;
        }
        Ok(())
    }

    fn describe(&self) -> String {
        format!("Kafka topic {}", self.topic)
    }
}

/// What has been published, kept on disk between runs.
#[derive(Debug, Default, Clone, Serialize, Deserialize, PartialEq)]
pub struct PublishedState {
    /// The `segment_members` version whose membership was published last.
    pub segments_version: Option<u64>,
    /// The next offset of the opt-out log to publish.
    pub opt_outs_next_offset: u64,
    /// The sequence number the next change gets (reserved before delivery: never reused).
    #[serde(default)]
    pub next_sequence: u64,
    /// The changes numbered since the lower of the two marks below, in order (each names
    /// every segment its member is in now, so applying them again, in order, changes nothing).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub recent: Vec<MembershipChange>,
    /// Every change numbered below this was acknowledged by every channel. Those of `recent`
    /// from it on (a failed delivery, or a crash between a receiver's answer and this file)
    /// are delivered again with the same sequences, before anything else: a receiver that
    /// keeps the last sequence per member drops the repeat.
    #[serde(default)]
    pub delivered_below: u64,
    /// The membership file has every change numbered below this. Those of `recent` from it on
    /// (opt-outs since the last refresh, a crash between the two files) are applied to it when
    /// the state is read, so a member who left is not published leaving again.
    #[serde(default)]
    pub membership_below: u64,
}

impl PublishedState {
    /// The changes recorded and not yet acknowledged.
    fn undelivered(&self) -> &[MembershipChange] {
        let from = self.recent.partition_point(|c| c.sequence < self.delivered_below);
        &self.recent[from..]
    }

    /// Forgets the changes both delivered and in the membership file.
    fn prune(&mut self) {
        let keep_from = self.delivered_below.min(self.membership_below);
        let from = self.recent.partition_point(|c| c.sequence < keep_from);
        self.recent.drain(..from);
    }
}

/// The files of [`PublishedState`] and of the membership published last.
pub struct StateDir {
    dir: PathBuf,
}

impl StateDir {
    /// The state under `dir` (created when missing).
    pub fn open(dir: PathBuf) -> Result<Self> {
        std::fs::create_dir_all(&dir).map_err(|e| push_error("state directory", format!("{}: {e}", dir.display())))?;
        Ok(StateDir { dir })
    }

    fn write_atomically(&self, name: &str, bytes: &[u8]) -> Result<()> {
        use std::io::Write;
        let path = self.dir.join(name);
        let tmp = self.dir.join(format!(".{name}.tmp"));
        let io = |e: std::io::Error| push_error("state file", format!("{}: {e}", path.display()));
        // 0600 from creation: the membership file holds audience_ids, as segment_members does
        let mut f = {
            use std::os::unix::fs::OpenOptionsExt;
            std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)
                .map_err(io)?
        };
        f.write_all(bytes).map_err(io)?;
        f.sync_all().map_err(io)?;
        std::fs::rename(&tmp, &path).map_err(io)?;
        Ok(())
    }

    /// The JSON file `name`, or `T`'s default when none was kept.
    fn read<T: serde::de::DeserializeOwned + Default>(&self, name: &str, what: &'static str) -> Result<T> {
        match std::fs::read(self.dir.join(name)) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| push_error(what, e)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(T::default()),
            Err(e) => Err(push_error(what, e)),
        }
    }

    /// The state, or the default when none was kept.
    pub fn state(&self) -> Result<PublishedState> {
        self.read("state.json", "state file")
    }

    /// Records `state`.
    pub fn save_state(&self, state: &PublishedState) -> Result<()> {
        let bytes = serde_json::to_vec(state).map_err(|e| push_error("state file", e))?;
        self.write_atomically("state.json", &bytes)
    }

    /// The membership published last (empty when none was).
    pub fn membership(&self) -> Result<Membership> {
        self.read("membership.json", "membership file")
    }

    /// Records the membership published.
    pub fn save_membership(&self, membership: &Membership) -> Result<()> {
        let bytes = serde_json::to_vec(membership).map_err(|e| push_error("membership file", e))?;
        self.write_atomically("membership.json", &bytes)
    }
}

/// The served membership of `segment_members` at its latest version, by member, with the
/// version and the served segments; `None` while the table has no commit or when its version
/// is still `known` (a look every second must not scan the table).
pub async fn served_membership(
    tables: &TablesLocation,
    known: Option<u64>,
) -> Result<Option<(u64, Membership, BTreeSet<String>)>> {
    let name = marsad_schemas::TableName::SegmentMembers.as_str();
    let Some(table) = marsad_tables::open_table(tables, name).await? else {
        return Ok(None);
    };
    let Some(version) = table.version() else {
        return Ok(None);
    };
    if known == Some(version) {
        return Ok(None);
    }
    let ctx = datafusion::prelude::SessionContext::new();
    marsad_tables::register(&ctx, name, &table).await?;
    let query = |source| Error::Query {
        table: "segment_members",
        source,
    };
    let batches = ctx
        .sql(&format!("SELECT segment_id, audience_id FROM {name}"))
        .await
        .map_err(query)?
        .collect()
        .await
        .map_err(query)?;
    let mut membership = Membership::new();
    let mut served = BTreeSet::new();
    for b in &batches {
        let segment = arrow::compute::cast(b.column(0), &DataType::Utf8)?;
        let member = arrow::compute::cast(b.column(1), &DataType::Utf8)?;
        let (Some(segment), Some(member)) = (
            segment.as_any().downcast_ref::<StringArray>(),
            member.as_any().downcast_ref::<StringArray>(),
        ) else {
            continue;
        };
        for i in 0..b.num_rows() {
            if segment.is_null(i) || member.is_null(i) {
                continue;
            }
            served.insert(segment.value(i).to_owned());
            membership
                .entry(member.value(i).to_owned())
                .or_default()
                .insert(segment.value(i).to_owned());
        }
    }
    Ok(Some((version, membership, served)))
}

/// What a refresh publishes: the changes from `published` to the refresh's served membership
/// `after` without the members `opt_outs` holds. A member who leaves because the registry
/// heard of an opt-out before the publisher read it from the log leaves as opted out (`left`
/// naming every segment served before or now), so its removal has the same form, an opt-out
/// out of every segment known served, whichever came first.
pub fn refresh_changes(
    published: &Membership,
    mut after: Membership,
    served_before: &BTreeSet<String>,
    served_now: &BTreeSet<String>,
    opt_outs: &OptOutRegistry,
    at: DateTime<Utc>,
) -> Vec<MembershipChange> {
    without_opted_out(&mut after, opt_outs);
    let ever_served: BTreeSet<String> = served_before.union(served_now).cloned().collect();
    changes(published, &after, at)
        .into_iter()
        .map(|c| {
            if opt_outs.is_opted_out(&c.audience_id, Purpose::Personalisation) {
                opt_out_change(&c.audience_id, &ever_served, at)
            } else {
                c
            }
        })
        .collect()
}

/// One change for a member in place of two undelivered ones (`older` numbered before `newer`):
/// the newer's number, state and cause, with joined and left counted from the state the
/// member had before `older`.
fn merged(older: &MembershipChange, newer: MembershipChange) -> MembershipChange {
    let was: BTreeSet<&String> = older
        .segments
        .iter()
        .filter(|s| !older.joined.contains(s))
        .chain(older.left.iter())
        .collect();
    let is: BTreeSet<&String> = newer.segments.iter().collect();
    let mut left: BTreeSet<String> = was.difference(&is).map(|s| (*s).clone()).collect();
    if newer.cause == Cause::OptOut {
        // an opt-out names every segment it leaves, whatever was delivered
        left.extend(newer.left.iter().cloned());
    }
    MembershipChange {
        joined: is.difference(&was).map(|s| (*s).clone()).collect(),
        left: left.into_iter().collect(),
        ..newer
    }
}

/// `membership` after `changes` (each names every segment its member is in now).
fn apply(membership: &mut Membership, changes: &[MembershipChange]) {
    for c in changes {
        if c.segments.is_empty() {
            membership.remove(&c.audience_id);
        } else {
            membership.insert(c.audience_id.clone(), c.segments.iter().cloned().collect());
        }
    }
}

/// `membership` without the members `opt_outs` holds: a refresh that read the opt-outs before
/// one was recorded and committed after it still names that member, who must not join again.
pub fn without_opted_out(membership: &mut Membership, opt_outs: &OptOutRegistry) {
    membership.retain(|id, _| !opt_outs.is_opted_out(id, Purpose::Personalisation));
}

/// The `audience_id` an opt-out record removes from segments, if it covers personalisation.
pub fn opted_out_member(record: &OptOutRecord) -> Option<&str> {
    let covers = marsad_privacy::optout::SubjectOptOuts::from(record.scope).covers(Purpose::Personalisation);
    covers.then_some(record.audience_id.as_deref()).flatten()
}

/// The publisher: what it published, and where it sends changes.
pub struct Publisher {
    channels: Vec<Arc<dyn SegmentChannel>>,
    opt_outs: Arc<OptOutRegistry>,
    state_dir: StateDir,
    state: PublishedState,
    published: Membership,
    served: BTreeSet<String>,
    batch_max: usize,
}

impl Publisher {
    /// A publisher to `channels`, resuming from what `state_dir` says was published (changes
    /// recorded but not acknowledged are delivered first); a member `opt_outs` holds is never
    /// published as joining, whatever a refresh says.
    pub fn open(
        channels: Vec<Arc<dyn SegmentChannel>>,
        opt_outs: Arc<OptOutRegistry>,
        state_dir: StateDir,
        batch_max: usize,
    ) -> Result<Self> {
        let state = state_dir.state()?;
        let mut published = state_dir.membership()?;
        let from = state.recent.partition_point(|c| c.sequence < state.membership_below);
        apply(&mut published, &state.recent[from..]);
        let served = published.values().flatten().cloned().collect();
        Ok(Publisher {
            channels,
            opt_outs,
            state_dir,
            state,
            published,
            served,
            batch_max: batch_max.max(1),
        })
    }

    /// Where the opt-out log is to be published from.
    pub fn opt_outs_next_offset(&self) -> u64 {
        self.state.opt_outs_next_offset
    }

    /// Numbers `changes` and records them, with `update` made to the rest of the state, in one
    /// write (a crash after it delivers them again with the same numbers; a crash before it
    /// leaves a gap at most, never a number used twice), then applies them to the published
    /// membership. Nothing changes here unless the write succeeded. A member keeps at most one
    /// undelivered change, the newest (joined and left counted from what it was delivered
    /// as), so a delivery retried in pieces never puts an older state after a newer one.
    fn record(&mut self, mut changes: Vec<MembershipChange>, update: impl FnOnce(&mut PublishedState)) -> Result<()> {
        let mut next = self.state.clone();
        update(&mut next);
        let first = next.next_sequence;
        next.next_sequence = first + changes.len() as u64;
        for (n, change) in changes.iter_mut().enumerate() {
            change.sequence = first + n as u64;
        }
        let undelivered_from = next.recent.partition_point(|c| c.sequence < next.delivered_below);
        if undelivered_from < next.recent.len() && !changes.is_empty() {
            let mut superseded: BTreeMap<String, MembershipChange> = BTreeMap::new();
            let ids: BTreeSet<&str> = changes.iter().map(|c| c.audience_id.as_str()).collect();
            let mut kept = Vec::with_capacity(next.recent.len());
            for (i, c) in next.recent.drain(..).enumerate() {
                if i >= undelivered_from && ids.contains(c.audience_id.as_str()) {
                    // the first one is the earliest: what the member was delivered as
                    superseded.entry(c.audience_id.clone()).or_insert(c);
                } else {
                    kept.push(c);
                }
            }
            next.recent = kept;
            for change in &mut changes {
                if let Some(older) = superseded.remove(&change.audience_id) {
                    *change = merged(&older, change.clone());
                }
            }
        }
        let from = next.recent.len();
        next.recent.extend(changes);
        self.state_dir.save_state(&next)?;
        apply(&mut self.published, &next.recent[from..]);
        self.state = next;
        Ok(())
    }

    /// Delivers the changes recorded and not yet acknowledged to every channel, in order, and
    /// records that they were; returns whether there were any. On an error they stay to be
    /// delivered, for the next call.
    async fn deliver_pending(&mut self) -> Result<bool> {
        let undelivered = self.state.undelivered();
        let Some(last) = undelivered.last().map(|c| c.sequence) else {
            return Ok(false);
        };
        for chunk in undelivered.chunks(self.batch_max) {
            for channel in &self.channels {
                channel.deliver(chunk).await?;
            }
        }
        self.state.delivered_below = last + 1;
        self.state.prune();
        self.state_dir.save_state(&self.state)?;
        Ok(true)
    }

    /// Publishes what changed since the last publication, if `segment_members` has a newer
    /// version (after what is still pending); returns how many members changed.
    pub async fn publish_refresh(&mut self, tables: &TablesLocation) -> Result<usize> {
        self.deliver_pending().await?;
        let Some((version, after, served)) = served_membership(tables, self.state.segments_version).await? else {
            return Ok(0);
        };
        let changed = refresh_changes(
            &self.published,
            after,
            &self.served,
            &served,
            &self.opt_outs,
            Utc::now(),
        );
        let count = changed.len();
        self.record(changed, |state| state.segments_version = Some(version))?;
        self.served = served;
        // after the state: a crash between the two finds the changes recorded, and applies them
        self.state_dir.save_membership(&self.published)?;
        self.state.membership_below = self.state.next_sequence;
        if !self.deliver_pending().await? {
            // nothing changed: the new version and mark are still to be kept
            self.state.prune();
            self.state_dir.save_state(&self.state)?;
        }
        Ok(count)
    }

    /// Publishes the record at `offset` of the opt-out log if it is an opt-out of
    /// personalisation by a member published in a segment (its removal from every segment),
    /// and forgets the member; records already published (below the kept offset) are skipped,
    /// others (key fingerprints, ids never published) passed over: the ad system is not told of
    /// pseudonyms it was never given. Returns whether a removal was delivered (called again after
    /// an error, the one recorded then). Called again after an error, it delivers what is pending.
    pub async fn publish_opt_out(&mut self, offset: u64, payload: &[u8]) -> Result<bool> {
        if offset >= self.state.opt_outs_next_offset {
            let record = serde_json::from_slice::<OptOutRecord>(payload).ok();
            if let Some(r) = &record {
                // in force here at once, before the registry's own reader gets to it
                self.opt_outs.apply(r);
            }
            let member = record
                .as_ref()
                .and_then(|r| Some((opted_out_member(r)?, r.at)))
                .filter(|(id, _)| self.published.contains_key(*id));
            let change = member.map(|(id, at)| opt_out_change(id, &self.served, at));
            let removal = change.is_some();
            self.record(change.into_iter().collect(), |state| {
                state.opt_outs_next_offset = offset + 1
            })?;
            // the membership file is rewritten at refreshes, not per opt-out: until then the
            // removal is kept in the state and applied to the file after a restart; when
            // refreshes are rare, the file is rewritten here so the state stays small
            let unsaved = self.state.recent.len()
                - self
                    .state
                    .recent
                    .partition_point(|c| c.sequence < self.state.membership_below);
            if unsaved >= OPT_OUTS_BEFORE_MEMBERSHIP_WRITE {
                self.state_dir.save_membership(&self.published)?;
                self.state.membership_below = self.state.next_sequence;
            }
            let delivered = self.deliver_pending().await?;
            return Ok(removal && delivered);
        }
        // a retry after an error: the removal recorded then, if any, is what is pending
        self.deliver_pending().await
    }

    /// The channels, for logs.
    pub fn describe(&self) -> Vec<String> {
        self.channels.iter().map(|c| c.describe()).collect()
    }
}

/// How many changes since the membership file was written make an opt-out rewrite it (the
/// state file, rewritten at each opt-out, holds them until then).
const OPT_OUTS_BEFORE_MEMBERSHIP_WRITE: usize = 1_000;

/// How often the publisher looks for a new version of `segment_members` (a refresh, by this
/// process or by `marsad segments refresh`).
pub const REFRESH_CHECK_EVERY: Duration = Duration::from_secs(1);

/// Publishes until `stop`: every opt-out of the opt-out log from where the last run stopped, as
/// it is recorded, and every new version of `segment_members`. Opt-outs are read by a task of
/// their own into a bounded channel (a read cancelled by the refresh timer could lose records it
/// had taken). A change that cannot be delivered is retried, in order, with a growing pause:
/// nothing is dropped and nothing behind it is published first, and the pipeline keeps running
/// meanwhile (only a log that cannot be read at all ends this).
pub async fn run(
    mut publisher: Publisher,
    tables: TablesLocation,
    log: Arc<dyn marsad_eventlog::EventLog>,
    stop: tokio_util::sync::CancellationToken,
) -> Result<()> {
    let (records, mut opt_outs) = tokio::sync::mpsc::channel::<marsad_eventlog::Delivered>(1024);
    let from = publisher.opt_outs_next_offset();
    let reader_stop = stop.clone();
    let reader = tokio::spawn(async move {
        let mut sub = log.read_all(marsad_schemas::TOPIC_OPTOUTS).await?;
        for partition in sub.assignment() {
            if partition != 0 {
                return Err(push_error(
                    "opt-out log",
                    format!(
                        "{} has partition {partition}: it must have one",
                        marsad_schemas::TOPIC_OPTOUTS
                    ),
                ));
            }
            sub.seek(0, from).await?;
        }
        loop {
            let polled = tokio::select! {
                _ = reader_stop.cancelled() => return Ok(()),
                polled = sub.poll(100, Duration::from_millis(500)) => polled?,
            };
            for record in polled {
                if records.send(record).await.is_err() {
                    return Ok(());
                }
            }
        }
    });
    let mut tick = tokio::time::interval(REFRESH_CHECK_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return Ok(()),
            record = opt_outs.recv() => {
                let Some(record) = record else {
                    // the reader ended: its error, if it had one
                    return match reader.await {
                        Ok(r) => r,
                        Err(e) => Err(push_error("opt-out reader", e)),
                    };
                };
                let started = std::time::Instant::now();
                let mut pause = FIRST_BACKOFF;
                loop {
                    match publisher.publish_opt_out(record.position.offset, &record.payload).await {
                        Ok(true) => {
                            tracing::info!(took_ms = started.elapsed().as_millis() as u64,
                                "opt-out pushed as a removal from every segment");
                            break;
                        }
                        Ok(false) => break,
                        Err(e) => {
                            tracing::error!(error = %e, retry_in_ms = pause.as_millis() as u64,
                                "could not push an opt-out; retrying");
                            tokio::select! {
                                _ = stop.cancelled() => return Ok(()),
                                _ = tokio::time::sleep(pause) => {}
                            }
                            pause = (pause * 2).min(MAX_BACKOFF);
                        }
                    }
                }
            }
            _ = tick.tick() => match publisher.publish_refresh(&tables).await {
                Ok(0) => {}
                Ok(n) => tracing::info!(members = n, to = ?publisher.describe(), "segment changes pushed"),
                // retried at the next tick: the membership published so far stays the baseline
                Err(e) => tracing::warn!(error = %e, "could not push segment changes; trying again"),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn membership(entries: &[(&str, &[&str])]) -> Membership {
        entries
            .iter()
            .map(|(id, segs)| ((*id).to_owned(), segs.iter().map(|s| (*s).to_owned()).collect()))
            .collect()
    }

    #[test]
    fn a_refresh_publishes_who_joined_and_left_and_nothing_of_a_held_back_segment() {
        let at = Utc::now();
        let before = membership(&[("a", &["cars", "jobs"]), ("b", &["cars"]), ("c", &["jobs"])]);
        // `jobs` is held back now (absent), `cars` lost b and gained d
        let after = membership(&[("a", &["cars"]), ("d", &["cars"])]);
        let got = changes(&before, &after, at);
        let by_id: BTreeMap<&str, &MembershipChange> = got.iter().map(|c| (c.audience_id.as_str(), c)).collect();
        assert_eq!(by_id.len(), 4);
        // a is still in cars: it leaves jobs with every other member of it, none singled out
        assert_eq!(by_id["a"].segments, ["cars"]);
        assert_eq!(by_id["a"].left, ["jobs"]);
        assert_eq!(by_id["c"].segments, Vec::<String>::new());
        assert_eq!(by_id["c"].left, ["jobs"]);
        assert_eq!(by_id["b"].left, ["cars"]);
        assert_eq!(by_id["d"].joined, ["cars"]);
        assert!(got.iter().all(|c| c.cause == Cause::Refresh && c.at == at));
        // no change, nothing published
        assert!(changes(&after, &after, at).is_empty());
    }

    #[test]
    fn a_member_opted_out_after_the_refresh_read_the_opt_outs_never_joins_again() {
        use marsad_privacy::optout::OptOutScope;
        let registry = OptOutRegistry::default();
        let mut after = membership(&[("a1b2c3d4e5f60718", &["cars"]), ("0f0e0d0c0b0a0908", &["cars"])]);
        for (id, scope) in [
            ("a1b2c3d4e5f60718", OptOutScope::Personalisation),
            ("0f0e0d0c0b0a0908", OptOutScope::Marketing),
        ] {
            let record = OptOutRecord {
                subject: format!("{id}{id}"),
                audience_id: Some(id.to_owned()),
                scope,
                at: Utc::now(),
            };
            registry.apply(&record);
            // only an opt-out of personalisation takes a member out of segments
            assert_eq!(
                opted_out_member(&record).is_some(),
                scope == OptOutScope::Personalisation
            );
        }
        without_opted_out(&mut after, &registry);
        assert_eq!(after, membership(&[("0f0e0d0c0b0a0908", &["cars"])]));
    }

    #[test]
    fn a_refresh_that_hears_of_an_opt_out_first_publishes_it_as_one() {
        use marsad_privacy::optout::OptOutScope;
        let registry = OptOutRegistry::default();
        registry.apply(&OptOutRecord {
            subject: "q".repeat(32),
            audience_id: Some("q".into()),
            scope: OptOutScope::Personalisation,
            at: Utc::now(),
        });
        let published = membership(&[("q", &["cars"]), ("s", &["cars"])]);
        // the refresh committed before it read the opt-out still names q; jobs is new
        let after = membership(&[("q", &["cars", "jobs"]), ("s", &["cars", "jobs"])]);
        let before: BTreeSet<String> = ["cars".to_owned()].into();
        let now: BTreeSet<String> = ["cars".to_owned(), "jobs".to_owned()].into();
        let got = refresh_changes(&published, after, &before, &now, &registry, Utc::now());
        let by_id: BTreeMap<&str, &MembershipChange> = got.iter().map(|c| (c.audience_id.as_str(), c)).collect();
        assert_eq!(by_id.len(), 2);
        assert_eq!(by_id["q"].cause, Cause::OptOut);
        assert!(by_id["q"].segments.is_empty() && by_id["q"].joined.is_empty());
        assert_eq!(by_id["q"].left, ["cars", "jobs"]);
        assert_eq!(by_id["s"].cause, Cause::Refresh);
        assert_eq!(by_id["s"].joined, ["jobs"]);
    }

    #[test]
    fn an_opt_out_leaves_every_served_segment() {
        let served: BTreeSet<String> = ["cars".to_owned(), "jobs".to_owned()].into();
        let change = opt_out_change("x", &served, Utc::now());
        assert!(change.segments.is_empty() && change.joined.is_empty());
        assert_eq!(change.left, ["cars", "jobs"]);
        assert_eq!(change.cause, Cause::OptOut);
    }

    #[test]
    fn the_signature_covers_the_time_and_the_body() {
        let key = [7u8; 32];
        let a = sign(&key, 1_700_000_000, b"{\"changes\":[]}");
        assert!(a.starts_with("t=1700000000,v1="), "{a}");
        assert_eq!(a.len(), "t=1700000000,v1=".len() + 64);
        assert_ne!(a, sign(&key, 1_700_000_001, b"{\"changes\":[]}"));
        assert_ne!(a, sign(&key, 1_700_000_000, b"{\"changes\":[1]}"));
        assert_ne!(a, sign(&[8u8; 32], 1_700_000_000, b"{\"changes\":[]}"));
    }

    /// A channel that keeps what it is given; `lose_next_answer` makes its next delivery lose
    /// the answer (kept, then an error), `refuse` refuses every delivery (nothing kept), `hang`
    /// makes it keep and never answer (a crash before the publisher hears back).
    #[derive(Default)]
    struct Recorder {
        got: std::sync::Mutex<Vec<MembershipChange>>,
        lose_next_answer: std::sync::atomic::AtomicBool,
        refuse: std::sync::atomic::AtomicBool,
        hang: bool,
    }

    #[async_trait::async_trait]
    impl SegmentChannel for Recorder {
        async fn deliver(&self, changes: &[MembershipChange]) -> Result<()> {
            if self.refuse.load(std::sync::atomic::Ordering::SeqCst) {
                return Err(push_error("recorder", "refused"));
            }
            self.got
                .lock()
                .map_err(|_| push_error("recorder", "poisoned"))?
                .extend_from_slice(changes);
            if self.hang {
                std::future::pending::<()>().await;
            }
            if self.lose_next_answer.swap(false, std::sync::atomic::Ordering::SeqCst) {
                return Err(push_error("recorder", "the answer was lost"));
            }
            Ok(())
        }
        fn describe(&self) -> String {
            "recorder".into()
        }
    }

    impl Recorder {
        fn sequences(&self) -> Vec<(u64, String)> {
            self.got
                .lock()
                .map(|g| g.iter().map(|c| (c.sequence, c.audience_id.clone())).collect())
                .unwrap_or_default()
        }
    }

    fn opt_out_of(id: &str) -> Vec<u8> {
        let record = OptOutRecord {
            subject: format!("{id}{id}"),
            audience_id: Some(id.to_owned()),
            scope: marsad_privacy::optout::OptOutScope::Personalisation,
            at: Utc::now(),
        };
        serde_json::to_vec(&record).unwrap_or_default()
    }

    fn publisher(dir: &Path, channel: Arc<Recorder>) -> Result<Publisher> {
        Publisher::open(
            vec![channel],
            Arc::new(OptOutRegistry::default()),
            StateDir::open(dir.join("push"))?,
            10,
        )
    }

    /// A publisher that published a and b in cars, with a recording channel.
    fn publishing_a_and_b_in_cars() -> Result<(tempfile::TempDir, Arc<Recorder>, Publisher)> {
        let dir = tempfile::tempdir().map_err(|e| push_error("temp", e))?;
        StateDir::open(dir.path().join("push"))?.save_membership(&membership(&[("a", &["cars"]), ("b", &["cars"])]))?;
        let channel = Arc::new(Recorder::default());
        let p = publisher(dir.path(), channel.clone())?;
        Ok((dir, channel, p))
    }

    #[tokio::test]
    async fn a_change_whose_answer_was_lost_is_delivered_again_with_its_number() -> Result<()> {
        let (dir, channel, mut p) = publishing_a_and_b_in_cars()?;
        channel
            .lose_next_answer
            .store(true, std::sync::atomic::Ordering::SeqCst);
        assert!(p.publish_opt_out(0, &opt_out_of("a")).await.is_err());
        // the retry the run loop makes: the same record, the same change, the same number
        assert!(p.publish_opt_out(0, &opt_out_of("a")).await?);
        assert!(p.publish_opt_out(1, &opt_out_of("b")).await?);
        // a record already published, and an id never published: nothing sent
        assert!(!p.publish_opt_out(1, &opt_out_of("b")).await?);
        assert!(!p.publish_opt_out(2, &opt_out_of("z")).await?);
        assert_eq!(
            channel.sequences(),
            [(0, "a".to_owned()), (0, "a".to_owned()), (1, "b".to_owned())]
        );
        // the membership file still names both (it is written at refreshes); after a restart
        // neither is a member, so the next refresh does not publish them leaving again
        drop(p);
        let p = publisher(dir.path(), Arc::new(Recorder::default()))?;
        assert_eq!(p.state_dir.membership()?.len(), 2);
        assert!(p.published.is_empty(), "{:?}", p.published);
        assert_eq!(p.state.next_sequence, 2);
        Ok(())
    }

    #[tokio::test]
    async fn a_crash_between_the_receivers_answer_and_the_state_delivers_the_same_change_again() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|e| push_error("temp", e))?;
        StateDir::open(dir.path().join("push"))?
            .save_membership(&membership(&[("a", &["cars", "jobs"]), ("b", &["cars"])]))?;
        let before = Arc::new(Recorder {
            hang: true,
            ..Recorder::default()
        });
        let mut p = publisher(dir.path(), before.clone())?;
        // the receiver has the change; the publisher dies before it hears so
        let cut = tokio::time::timeout(Duration::from_millis(200), p.publish_opt_out(0, &opt_out_of("a"))).await;
        assert!(cut.is_err(), "the delivery was to hang");
        drop(p);
        let received = before.got.lock().map(|g| g.clone()).unwrap_or_default();
        assert_eq!(received.len(), 1);

        let after = Arc::new(Recorder::default());
        let mut p = publisher(dir.path(), after.clone())?;
        // the record is not read twice, and the removal already counts: a is no member
        assert_eq!(p.opt_outs_next_offset(), 1);
        assert!(!p.published.contains_key("a"));
        assert!(p.deliver_pending().await?);
        let again = after.got.lock().map(|g| g.clone()).unwrap_or_default();
        assert_eq!(again, received, "the same change, with the same number");
        assert_eq!(again[0].left, ["cars", "jobs"]);
        // nothing pending any more; the next change is numbered after it
        assert!(!p.deliver_pending().await?);
        assert!(p.publish_opt_out(1, &opt_out_of("b")).await?);
        assert_eq!(after.sequences(), [(0, "a".to_owned()), (1, "b".to_owned())]);
        let kept = p.state_dir.state()?;
        assert_eq!(kept.delivered_below, 2);
        assert!(kept.undelivered().is_empty());
        Ok(())
    }

    fn change(id: &str, segments: &[&str], joined: &[&str], left: &[&str], cause: Cause) -> MembershipChange {
        let names = |x: &[&str]| x.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
        MembershipChange {
            sequence: 0,
            audience_id: id.to_owned(),
            segments: names(segments),
            joined: names(joined),
            left: names(left),
            cause,
            at: Utc::now(),
        }
    }

    #[test]
    fn two_undelivered_changes_of_a_member_merge_into_the_newer() {
        // cars → cars+jobs, then → jobs+pets: from what was delivered (cars), jobs and pets
        // were joined and cars left
        let older = change("a", &["cars", "jobs"], &["jobs"], &[], Cause::Refresh);
        let newer = change("a", &["jobs", "pets"], &["pets"], &["cars"], Cause::Refresh);
        let m = merged(&older, MembershipChange { sequence: 8, ..newer });
        assert_eq!(
            (m.sequence, m.segments.clone()),
            (8, vec!["jobs".to_owned(), "pets".to_owned()])
        );
        assert_eq!(m.joined, ["jobs", "pets"]);
        assert_eq!(m.left, ["cars"]);
        // a join never delivered, then an opt-out: nothing joined, every segment left
        let older = change("a", &["cars", "jobs"], &["jobs"], &[], Cause::Refresh);
        let newer = change("a", &[], &[], &["cars", "jobs", "pets"], Cause::OptOut);
        let m = merged(&older, newer);
        assert!(m.joined.is_empty() && m.segments.is_empty());
        assert_eq!(
            (m.cause, m.left),
            (Cause::OptOut, vec!["cars".into(), "jobs".into(), "pets".into()])
        );
    }

    #[tokio::test]
    async fn a_retried_delivery_never_puts_an_older_state_after_a_newer_one() -> Result<()> {
        let (dir, channel, mut p) = publishing_a_and_b_in_cars()?;
        channel.refuse.store(true, std::sync::atomic::Ordering::SeqCst);
        // a refresh's change that cannot be delivered, then the member's opt-out behind it
        p.record(
            vec![change("a", &["cars", "jobs"], &["jobs"], &[], Cause::Refresh)],
            |_| {},
        )?;
        p.record(
            vec![change("b", &["cars", "jobs"], &["jobs"], &[], Cause::Refresh)],
            |_| {},
        )?;
        assert!(p.deliver_pending().await.is_err());
        assert!(p.publish_opt_out(0, &opt_out_of("a")).await.is_err());
        let pending: Vec<(u64, &str, Cause)> = p
            .state
            .undelivered()
            .iter()
            .map(|c| (c.sequence, c.audience_id.as_str(), c.cause))
            .collect();
        assert_eq!(pending, [(1, "b", Cause::Refresh), (2, "a", Cause::OptOut)]);
        channel.refuse.store(false, std::sync::atomic::Ordering::SeqCst);
        assert!(p.publish_opt_out(0, &opt_out_of("a")).await?);
        assert_eq!(channel.sequences(), [(1, "b".to_owned()), (2, "a".to_owned())]);
        let got = channel.got.lock().map(|g| g.clone()).unwrap_or_default();
        assert!(got[1].joined.is_empty(), "a never heard it joined jobs: {:?}", got[1]);
        // and after a restart a is still out
        drop(p);
        let p = publisher(dir.path(), Arc::new(Recorder::default()))?;
        assert_eq!(p.published, membership(&[("b", &["cars", "jobs"])]));
        Ok(())
    }

    #[tokio::test]
    async fn a_state_that_cannot_be_written_changes_nothing() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|e| push_error("temp", e))?;
        let push = dir.path().join("push");
        StateDir::open(push.clone())?.save_membership(&membership(&[("a", &["cars"])]))?;
        let channel = Arc::new(Recorder::default());
        let mut p = publisher(dir.path(), channel.clone())?;
        // the directory replaced by a file: every write fails (even as root)
        let aside = dir.path().join("aside");
        std::fs::rename(&push, &aside).map_err(|e| push_error("temp", e))?;
        std::fs::write(&push, b"").map_err(|e| push_error("temp", e))?;
        assert!(p.publish_opt_out(0, &opt_out_of("a")).await.is_err());
        assert!(channel.sequences().is_empty(), "nothing numbered is sent unrecorded");
        assert_eq!((p.state.next_sequence, p.state.opt_outs_next_offset), (0, 0));
        assert_eq!(p.published, membership(&[("a", &["cars"])]));
        std::fs::remove_file(&push).map_err(|e| push_error("temp", e))?;
        std::fs::rename(&aside, &push).map_err(|e| push_error("temp", e))?;
        assert!(p.publish_opt_out(0, &opt_out_of("a")).await?);
        assert_eq!(channel.sequences(), [(0, "a".to_owned())]);
        Ok(())
    }

    #[test]
    fn the_state_survives_a_restart() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|e| push_error("temp", e))?;
        let states = StateDir::open(dir.path().join("push"))?;
        assert_eq!(states.state()?, PublishedState::default());
        let state = PublishedState {
            segments_version: Some(4),
            opt_outs_next_offset: 9,
            next_sequence: 31,
            recent: vec![MembershipChange {
                sequence: 30,
                ..opt_out_change("b", &["cars".to_owned()].into(), Utc::now())
            }],
            delivered_below: 30,
            membership_below: 30,
        };
        states.save_state(&state)?;
        let m = membership(&[("a", &["cars"])]);
        states.save_membership(&m)?;
        let again = StateDir::open(dir.path().join("push"))?;
        assert_eq!(again.state()?, state);
        assert_eq!(again.membership()?, m);
        Ok(())
    }
}
