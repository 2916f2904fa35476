//! The audience index: which served segments each `audience_id` is in, loaded
//! from `segment_members` and swapped whole when the table changes, so a
//! lookup never waits for a refresh and never sees half of one. Opt-outs are
//! checked by the caller on every lookup, not here: the index can be minutes
//! old, an opt-out must count within a second.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use arrow::array::{Array, StringArray};
use arrow::datatypes::DataType;
use datafusion::prelude::SessionContext;
use datasketches::theta::{CompactThetaSketch, ThetaIntersection, ThetaSketchBuilder, ThetaUnionBuilder};
use deltalake::DeltaTable;
use futures::StreamExt;
use marsad_config::TablesLocation;
use marsad_schemas::TableName;
use serde::Deserialize;

/// The commit metadata key under which the processor records each refresh (see `marsad_process::segments`).
const SUMMARY_KEY: &str = "marsad.segments";
/// The DataSketches default update seed (sketches built with it can be merged with anyone's).
const THETA_SEED: u64 = 9001;

/// Why the index could not be loaded (the previous one stays in use).
#[derive(Debug, thiserror::Error)]
#[error("segment_members: {0}")]
pub struct IndexError(String);

/// What the last refresh found for a segment.
#[derive(Debug, Clone, Deserialize, serde::Serialize)]
pub struct SegmentOutcome {
    /// The segment id.
    pub id: String,
    /// Members after removing opt-outs.
    pub members: usize,
    /// Whether it is served.
    pub served: bool,
}

/// The last refresh, as recorded in its commit.
#[derive(Debug, Clone, Deserialize, serde::Serialize)]
pub struct RefreshSummary {
    /// When the refresh read `events`.
    pub refreshed_at: chrono::DateTime<chrono::Utc>,
    /// The smallest segment served.
    pub min_segment_size: usize,
    /// Each configured segment.
    pub segments: Vec<SegmentOutcome>,
}

/// A served segment in memory: its members and a theta sketch for overlap estimates.
pub struct ServedSegment {
    /// The segment id.
    pub id: Arc<str>,
    /// Its members, sorted.
    pub members: Vec<Arc<str>>,
    /// The members whose every event in the window had marketing consent, sorted: the only
    /// ones a marketing export may name.
    pub marketing_consent: Vec<Arc<str>>,
    /// A sketch of the members.
    pub sketch: CompactThetaSketch,
}

/// One consistent view of `segment_members`.
#[derive(Default)]
pub struct AudienceIndex {
    by_audience_id: HashMap<Arc<str>, Vec<u16>>,
    segments: Vec<ServedSegment>,
    summary: Option<RefreshSummary>,
    version: Option<u64>,
}

impl AudienceIndex {
    /// The ids of the served segments `audience_id` is in.
    pub fn segments_of(&self, audience_id: &str) -> Vec<Arc<str>> {
        self.by_audience_id
            .get(audience_id)
            .map(|idx| {
                idx.iter()
                    .filter_map(|&i| self.segments.get(i as usize))
                    .map(|s| s.id.clone())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// A served segment.
    pub fn segment(&self, id: &str) -> Option<&ServedSegment> {
        self.segments.iter().find(|s| &*s.id == id)
    }

    /// What the last refresh recorded, if any ran.
    pub fn summary(&self) -> Option<&RefreshSummary> {
        self.summary.as_ref()
    }

    /// How many distinct `audience_id`s are in some served segment.
    pub fn len(&self) -> usize {
        self.by_audience_id.len()
    }

    /// Whether no one is in any segment.
    pub fn is_empty(&self) -> bool {
        self.by_audience_id.is_empty()
    }
}

/// Estimated reach and overlap of two segments.
#[derive(Debug, serde::Serialize)]
pub struct Overlap {
    /// Estimated members in either.
    pub union_estimate: f64,
    /// Estimated members in both.
    pub intersection_estimate: f64,
    /// Intersection over union.
    pub jaccard: f64,
}

impl ServedSegment {
    fn new(id: Arc<str>, mut listed: Vec<(Arc<str>, bool)>) -> Result<Self, IndexError> {
        listed.sort_unstable();
        listed.dedup_by(|a, b| a.0 == b.0);
        let marketing_consent = listed.iter().filter(|(_, c)| *c).map(|(m, _)| m.clone()).collect();
        let members: Vec<Arc<str>> = listed.into_iter().map(|(m, _)| m).collect();
        let mut sketch = ThetaSketchBuilder::default()
            .lg_k(12)
            .build()
            .map_err(|e| IndexError(format!("theta sketch: {e}")))?;
        for m in &members {
            sketch.update(&**m);
        }
        Ok(ServedSegment {
            id,
            members,
            marketing_consent,
            sketch: sketch.compact(true),
        })
    }

    /// Estimated reach and overlap with another segment.
    pub fn overlap(&self, other: &ServedSegment) -> Result<Overlap, IndexError> {
        let err = |e: datasketches::error::Error| IndexError(format!("theta: {e}"));
        let mut union = ThetaUnionBuilder::default().lg_k(12).build().map_err(err)?;
        union.update(&self.sketch).map_err(err)?;
        union.update(&other.sketch).map_err(err)?;
        let mut both = ThetaIntersection::with_seed(THETA_SEED).map_err(err)?;
        both.update(&self.sketch).map_err(err)?;
        both.update(&other.sketch).map_err(err)?;
        let union_estimate = union.to_sketch(true).estimate();
        let intersection_estimate = both.to_sketch(true).map_or(0.0, |s| s.estimate());
        Ok(Overlap {
            union_estimate,
            intersection_estimate,
            jaccard: if union_estimate > 0.0 {
                intersection_estimate / union_estimate
            } else {
                0.0
            },
        })
    }
}

/// The current index, swapped atomically on each reload.
pub struct Audiences {
    location: TablesLocation,
    current: RwLock<Arc<AudienceIndex>>,
    table: tokio::sync::Mutex<Option<DeltaTable>>,
}

impl Audiences {
    /// Serves from the `segment_members` table at `location`, empty until the first [`reload`](Self::reload).
    pub fn new(location: &TablesLocation) -> Self {
        Audiences {
            location: location.clone(),
            current: RwLock::new(Arc::new(AudienceIndex::default())),
            table: tokio::sync::Mutex::new(None),
        }
    }

    /// The index as of the last reload.
    pub fn current(&self) -> Arc<AudienceIndex> {
        match self.current.read() {
            Ok(g) => g.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Loads `segment_members` if it changed since the last load; returns whether it swapped.
    pub async fn reload(&self) -> Result<bool, IndexError> {
        let mut guard = self.table.lock().await;
        if guard.is_none() {
            let name = TableName::SegmentMembers.as_str();
            match marsad_tables::open_table(&self.location, name).await {
                Ok(Some(table)) => *guard = Some(table),
                Ok(None) => return Ok(false),
                Err(e) => return Err(IndexError(e.to_string())),
            }
        }
        let Some(table) = guard.as_mut() else {
            return Ok(false);
        };
        table
            .update_incremental(None)
            .await
            .map_err(|e| IndexError(e.to_string()))?;
        let version = table.version();
        if version.is_none() || version == self.current().version {
            return Ok(false);
        }
        let index = load(table).await?;
        let index = AudienceIndex { version, ..index };
        tracing::info!(
            version = ?version,
            segments = index.segments.len(),
            audience_ids = index.len(),
            "audience index loaded"
        );
        match self.current.write() {
            Ok(mut g) => *g = Arc::new(index),
            Err(poisoned) => *poisoned.into_inner() = Arc::new(index),
        }
        Ok(true)
    }
}

async fn load(table: &DeltaTable) -> Result<AudienceIndex, IndexError> {
    let err = |e: &dyn std::fmt::Display| IndexError(e.to_string());
    let summary = match table.history(Some(1)).next().await {
        Some(Ok(info)) => info
            .info
            .get(SUMMARY_KEY)
            .and_then(|v| serde_json::from_value::<RefreshSummary>(v.clone()).ok()),
        _ => None,
    };
    let ctx = SessionContext::new();
    marsad_tables::register(&ctx, "segment_members", table)
        .await
        .map_err(|e| err(&e))?;
    // a table written before members carried their marketing consent: nobody has it
    let has_consent = table
        .snapshot()
        .map_err(|e| err(&e))?
        .schema()
        .fields()
        .any(|f| f.name() == "marketing_consent");
    let sql = if has_consent {
        "SELECT segment_id, audience_id, marketing_consent FROM segment_members"
    } else {
        "SELECT segment_id, audience_id, false AS marketing_consent FROM segment_members"
    };
    let batches = ctx
        .sql(sql)
        .await
        .map_err(|e| err(&e))?
        .collect()
        .await
        .map_err(|e| err(&e))?;
    let mut members: HashMap<Arc<str>, Vec<(Arc<str>, bool)>> = HashMap::new();
    let mut interned: HashMap<Arc<str>, ()> = HashMap::new();
    for b in &batches {
        let text = |i: usize| -> Result<StringArray, IndexError> {
            let c = arrow::compute::cast(b.column(i), &DataType::Utf8).map_err(|e| err(&e))?;
            c.as_any()
                .downcast_ref::<StringArray>()
                .cloned()
                .ok_or_else(|| IndexError("expected text columns".into()))
        };
        let (segs, ids) = (text(0)?, text(1)?);
        let consent = arrow::compute::cast(b.column(2), &DataType::Boolean).map_err(|e| err(&e))?;
        let consent = consent
            .as_any()
            .downcast_ref::<arrow::array::BooleanArray>()
            .cloned()
            .ok_or_else(|| IndexError("expected a boolean marketing_consent".into()))?;
        for i in 0..b.num_rows() {
            if segs.is_null(i) || ids.is_null(i) {
                continue;
            }
            let id: Arc<str> = match interned.get_key_value(ids.value(i)) {
                Some((k, _)) => k.clone(),
                None => {
                    let k: Arc<str> = Arc::from(ids.value(i));
                    interned.insert(k.clone(), ());
                    k
                }
            };
            let marketing = !consent.is_null(i) && consent.value(i);
            members
                .entry(Arc::from(segs.value(i)))
                .or_default()
                .push((id, marketing));
        }
    }
    let mut segments = Vec::new();
    let mut by_audience_id: HashMap<Arc<str>, Vec<u16>> = HashMap::new();
    let mut ids: Vec<_> = members.into_iter().collect();
    ids.sort_by(|a, b| a.0.cmp(&b.0));
    for (n, (id, list)) in ids.into_iter().enumerate() {
        let served = ServedSegment::new(id, list)?;
        for m in &served.members {
            by_audience_id.entry(m.clone()).or_default().push(n as u16);
        }
        segments.push(served);
    }
    Ok(AudienceIndex {
        by_audience_id,
        segments,
        summary,
        version: None,
    })
}
