//! Audience segments: each definition from the config compiled to a DataFusion
//! plan over `events`, and the results materialized into `segment_members` in
//! one commit that replaces the previous membership.
//!
//! Only `audience_id`s enter, and the processor writes one only with
//! personalisation consent and no GPC/DNT; opt-outs recorded since are checked
//! again here. A segment smaller than `min_segment_size` is held back: none of
//! its members are written, so it can never single out a person.

use std::sync::Arc;

use arrow::array::{
    Array, ArrayRef, BooleanArray, BooleanBuilder, StringArray, StringBuilder, TimestampMicrosecondBuilder,
};
use arrow::datatypes::DataType;
use arrow::record_batch::RecordBatch;
use chrono::{DateTime, NaiveDate, Utc};
use datafusion::common::ScalarValue;
use datafusion::dataframe::DataFrame;
use datafusion::functions_aggregate::expr_fn::{bool_and, sum};
use datafusion::logical_expr::{Expr, col, lit, not, when};
use marsad_config::{AudienceConfig, SegmentDefinition};
use marsad_privacy::optout::{OptOutRegistry, Purpose};
use marsad_schemas::{TableName, segment_members_schema};
use serde::Serialize;

use crate::table::{DeltaSink, TableSpec, events_spec};
use crate::{Error, Result};

/// The commit metadata key under which each refresh records its summary.
pub const SUMMARY_KEY: &str = "marsad.segments";

/// The `segment_members` table spec.
pub fn segment_members_spec() -> TableSpec {
    TableSpec {
        name: TableName::SegmentMembers,
        schema: segment_members_schema(),
        partitions: &["segment_id"],
        comment: "Members (audience_id) of each served segment as of its last refresh",
    }
}

/// What a refresh found for one segment.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct SegmentOutcome {
    /// The segment id.
    pub id: String,
    /// Members after removing opt-outs.
    pub members: usize,
    /// Whether it is served (at least the minimum size).
    pub served: bool,
}

/// What a refresh did, as recorded in the `segment_members` commit.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct RefreshSummary {
    /// When the refresh read `events`.
    pub refreshed_at: DateTime<Utc>,
    /// The smallest segment served.
    pub min_segment_size: usize,
    /// Each configured segment.
    pub segments: Vec<SegmentOutcome>,
}

fn filter_in(column: &str, values: &[String]) -> Option<Expr> {
    (!values.is_empty()).then(|| col(column).in_list(values.iter().map(|v| lit(v.as_str())).collect(), false))
}

fn days_since_epoch(d: NaiveDate) -> i32 {
    d.signed_duration_since(NaiveDate::default()).num_days() as i32
}

/// The plan of one segment over `events`: the `audience_id`s that meet every rule.
pub fn plan(events: DataFrame, def: &SegmentDefinition, now: DateTime<Utc>) -> Result<DataFrame> {
    let df_err = |source| Error::Query {
        table: "events",
        source,
    };
    let since = now - chrono::Duration::days(i64::from(def.window_days));
    let mut filter = col("audience_id")
        .is_not_null()
        .and(not(col("is_bot")))
        .and(col("date").gt_eq(lit(ScalarValue::Date32(Some(days_since_epoch(since.date_naive()))))))
        .and(col("ts").gt_eq(lit(ScalarValue::TimestampMicrosecond(
            Some(since.timestamp_micros()),
            Some("UTC".into()),
        ))));
    for (column, values) in [
        ("country", &def.country),
        ("region", &def.region),
        ("device_type", &def.device_type),
        ("age_band", &def.age_band),
        ("gender", &def.gender),
    ] {
        if let Some(f) = filter_in(column, values) {
            filter = filter.and(f);
        }
    }
    let mut counts = vec![bool_and(col("consent_marketing")).alias("marketing_consent")];
    let mut having: Option<Expr> = None;
    for (i, rule) in def.rules.iter().enumerate() {
        let mut matches = lit(true);
        for (column, value) in [
            ("event_type", &rule.event_type),
            ("page_category", &rule.page_category),
            ("campaign_id", &rule.campaign_id),
        ] {
            if let Some(v) = value {
                matches = matches.and(col(column).eq(lit(v.as_str())));
            }
        }
        let name = format!("rule_{i}");
        let one = when(matches, lit(1i64)).otherwise(lit(0i64)).map_err(df_err)?;
        counts.push(sum(one).alias(&name));
        let holds = col(&name).gt_eq(lit(i64::from(rule.at_least)));
        having = Some(match having {
            Some(h) => h.and(holds),
            None => holds,
        });
    }
    let mut df = events
        .filter(filter)
        .map_err(df_err)?
        .aggregate(vec![col("audience_id")], counts)
        .map_err(df_err)?;
    if let Some(h) = having {
        df = df.filter(h).map_err(df_err)?;
    }
    df.select(vec![col("audience_id"), col("marketing_consent")])
        .map_err(df_err)
}

fn audience_ids(batches: &[RecordBatch]) -> Result<Vec<(String, bool)>> {
    let mut out = Vec::new();
    for b in batches {
        let ids = arrow::compute::cast(b.column(0), &DataType::Utf8)?;
        let consent = arrow::compute::cast(b.column(1), &DataType::Boolean)?;
        if let (Some(ids), Some(consent)) = (
            ids.as_any().downcast_ref::<StringArray>(),
            consent.as_any().downcast_ref::<BooleanArray>(),
        ) {
            for i in 0..ids.len() {
                if !ids.is_null(i) {
                    out.push((ids.value(i).to_owned(), !consent.is_null(i) && consent.value(i)));
                }
            }
        }
    }
    Ok(out)
}

/// Re-materializes every configured segment; `progress` hears of each as it is done.
pub async fn refresh(
    tables: &marsad_config::TablesLocation,
    audience: &AudienceConfig,
    opt_outs: &OptOutRegistry,
    mut progress: impl FnMut(usize, usize, &SegmentOutcome),
) -> Result<RefreshSummary> {
    let now = Utc::now();
    let events = DeltaSink::open_or_create(tables, &events_spec()).await?;
    let mut members_table = DeltaSink::open_or_create(tables, &segment_members_spec()).await?;
    let ctx = events.session(None).await?;
    let mut segment_id = StringBuilder::new();
    let mut audience_id = StringBuilder::new();
    let mut refreshed_at = TimestampMicrosecondBuilder::new().with_timezone("UTC");
    let mut marketing_consent = BooleanBuilder::new();
    let mut outcomes = Vec::new();
    let total = audience.segments.len();
    for (n, def) in audience.segments.iter().enumerate() {
        let query = |source| Error::Query {
            table: "events",
            source,
        };
        let df = ctx.table("events").await.map_err(query)?;
        let batches = plan(df, def, now)?.collect().await.map_err(query)?;
        let mut ids = audience_ids(&batches)?;
        ids.retain(|(id, _)| !opt_outs.is_opted_out(id, Purpose::Personalisation));
        ids.sort_unstable();
        ids.dedup_by(|a, b| a.0 == b.0);
        let outcome = SegmentOutcome {
            id: def.id.clone(),
            members: ids.len(),
            served: ids.len() >= audience.min_segment_size,
        };
        if outcome.served {
            for (id, consent) in &ids {
                segment_id.append_value(&def.id);
                audience_id.append_value(id);
                refreshed_at.append_value(now.timestamp_micros());
                marketing_consent.append_value(*consent && !opt_outs.is_opted_out(id, Purpose::Marketing));
            }
        }
        progress(n + 1, total, &outcome);
        outcomes.push(outcome);
    }
    let columns: Vec<ArrayRef> = vec![
        Arc::new(segment_id.finish()),
        Arc::new(audience_id.finish()),
        Arc::new(refreshed_at.finish()),
        Arc::new(marketing_consent.finish()),
    ];
    let batch = RecordBatch::try_new(segment_members_schema(), columns)?;
    let summary = RefreshSummary {
        refreshed_at: now,
        min_segment_size: audience.min_segment_size,
        segments: outcomes,
    };
    let meta = serde_json::to_value(&summary).map_err(|e| Error::Delta {
        table: "segment_members",
        source: deltalake::DeltaTableError::Generic(e.to_string()),
    })?;
    members_table
        .overwrite(batch, vec![(SUMMARY_KEY.to_owned(), meta)])
        .await?;
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;
    use marsad_config::SegmentRule;

    #[tokio::test]
    async fn a_plan_counts_rules_per_audience_id() {
        let ctx = datafusion::prelude::SessionContext::new();
        let now = Utc::now();
        let ts = now.timestamp_micros();
        let day = days_since_epoch(now.date_naive());
        let sql = "SELECT * FROM (VALUES \
             ('a', 'page_view', 'cars', 'JO', false), ('a', 'page_view', 'cars', 'JO', false), \
             ('a', 'page_view', 'cars', 'JO', false), ('b', 'page_view', 'cars', 'JO', false), \
             ('b', 'page_view', 'cars', 'JO', false), ('c', 'page_view', 'cars', 'SA', false), \
             ('c', 'page_view', 'cars', 'SA', false), ('c', 'page_view', 'cars', 'SA', false), \
             ('d', 'page_view', 'cars', 'JO', true), ('d', 'page_view', 'cars', 'JO', true), \
             ('d', 'page_view', 'cars', 'JO', true)) \
             AS t(audience_id, event_type, page_category, country, is_bot)";
        let base = ctx.sql(sql).await.expect("values");
        let events = base
            .with_column(
                "ts",
                lit(ScalarValue::TimestampMicrosecond(Some(ts), Some("UTC".into()))),
            )
            .and_then(|d| d.with_column("date", lit(ScalarValue::Date32(Some(day)))))
            .and_then(|d| d.with_column("campaign_id", lit(ScalarValue::Utf8(None))))
            .and_then(|d| d.with_column("consent_marketing", lit(true)))
            .expect("columns");
        let def = SegmentDefinition {
            id: "car-intenders-jo".into(),
            description: String::new(),
            window_days: 14,
            country: vec!["JO".into()],
            region: vec![],
            device_type: vec![],
            age_band: vec![],
            gender: vec![],
            rules: vec![SegmentRule {
                event_type: Some("page_view".into()),
                page_category: Some("cars".into()),
                campaign_id: None,
                at_least: 3,
            }],
        };
        let out = plan(events, &def, now).expect("plan").collect().await.expect("run");
        // b has too few views, c is not in JO, d is a bot
        assert_eq!(audience_ids(&out).expect("ids"), vec![("a".to_owned(), true)]);
    }
}
