//! Reports for marketing (analyst role), read from the rollups only, with
//! small-cell suppression: a cell with fewer than k unique visitors is
//! withheld, and more cells are withheld until what is hidden cannot be
//! recovered by subtracting the shown cells from the total (at least two
//! hidden cells, together at least k visitors). A total under k hides everything.

use std::collections::HashMap;

use arrow::array::{Array, ArrayRef, Float64Array, Int64Array, StringArray};
use arrow::datatypes::DataType;
use chrono::NaiveDate;
use datafusion::prelude::SessionContext;
use serde_json::{Map, Value, json};

use crate::error::ApiError;

/// The reports there are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReportKind {
    /// Events, page views, sessions, bounces and visitors over time.
    Traffic,
    /// By country, or by region within a `country` filter.
    Geo,
    /// By device type, OS and browser.
    Devices,
    /// By page category.
    Categories,
    /// Ad impressions, clicks and CTR by campaign.
    Campaigns,
    /// By declared age band and gender.
    Demographics,
}

impl ReportKind {
    /// Parses the path segment.
    pub fn parse(name: &str) -> Option<Self> {
        Some(match name {
            "traffic" => ReportKind::Traffic,
            "geo" => ReportKind::Geo,
            "devices" => ReportKind::Devices,
            "categories" => ReportKind::Categories,
            "campaigns" => ReportKind::Campaigns,
            "demographics" => ReportKind::Demographics,
            _ => return None,
        })
    }

    fn table(self) -> &'static str {
        match self {
            ReportKind::Campaigns => "ad_performance_hourly",
            ReportKind::Demographics => "demographics_daily",
            _ => "traffic_hourly",
        }
    }

    fn filters(self) -> &'static [&'static str] {
        match self {
            ReportKind::Campaigns => &["campaign_id", "ad_id", "placement", "country", "device_type"],
            ReportKind::Demographics => &["country", "region", "age_band", "gender", "page_category"],
            _ => &[
                "country",
                "region",
                "device_type",
                "os",
                "browser",
                "language",
                "page_category",
                "referrer_domain",
                "event_type",
            ],
        }
    }

    /// (SQL expression, output name) of each measure; `visitors` is always last.
    fn measures(self) -> &'static [(&'static str, &'static str)] {
        match self {
            ReportKind::Campaigns => &[("sum(impressions)", "impressions"), ("sum(clicks)", "clicks")],
            ReportKind::Demographics => &[("sum(events)", "events")],
            ReportKind::Traffic => &[
                ("sum(events)", "events"),
                (
                    "sum(CASE WHEN event_type = 'page_view' THEN events ELSE 0 END)",
                    "page_views",
                ),
                ("sum(sessions)", "sessions"),
                ("sum(bounces)", "bounces"),
                ("sum(session_seconds)", "session_seconds"),
            ],
            _ => &[
                ("sum(events)", "events"),
                (
                    "sum(CASE WHEN event_type = 'page_view' THEN events ELSE 0 END)",
                    "page_views",
                ),
            ],
        }
    }
}

/// Time buckets of the traffic report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Granularity {
    /// Hours.
    Hour,
    /// Days.
    Day,
    /// Weeks (starting Monday).
    Week,
    /// Months.
    Month,
}

impl Granularity {
    fn parse(name: &str) -> Result<Self, ApiError> {
        Ok(match name {
            "hour" => Granularity::Hour,
            "day" => Granularity::Day,
            "week" => Granularity::Week,
            "month" => Granularity::Month,
            other => {
                return Err(ApiError::BadRequest(format!(
                    "unknown granularity `{other}`; use hour, day, week or month"
                )));
            }
        })
    }

    fn unit(self) -> &'static str {
        match self {
            Granularity::Hour => "hour",
            Granularity::Day => "day",
            Granularity::Week => "week",
            Granularity::Month => "month",
        }
    }
}

/// A report request, checked.
#[derive(Debug, Clone)]
pub struct ReportRequest {
    kind: ReportKind,
    from: NaiveDate,
    to: NaiveDate,
    granularity: Granularity,
    filters: Vec<(&'static str, String)>,
}

impl ReportRequest {
    /// Checks the query parameters: `from`, `to` (dates, inclusive; default the last 30 days),
    /// `granularity`, and filters on the report's dimensions.
    pub fn parse(kind: ReportKind, params: &HashMap<String, String>, today: NaiveDate) -> Result<Self, ApiError> {
        let date = |name: &str, default: NaiveDate| -> Result<NaiveDate, ApiError> {
            match params.get(name) {
                None => Ok(default),
                Some(v) => NaiveDate::parse_from_str(v, "%Y-%m-%d")
                    .map_err(|_| ApiError::BadRequest(format!("`{name}` must be a date like 2026-11-24, not `{v}`"))),
            }
        };
        let to = date("to", today)?;
        let from = date("from", to - chrono::Duration::days(29))?;
        if from > to {
            return Err(ApiError::BadRequest("`from` is after `to`".into()));
        }
        if (to - from).num_days() > 3 * 366 {
            return Err(ApiError::BadRequest("a report covers at most three years".into()));
        }
        let granularity = Granularity::parse(params.get("granularity").map_or("day", String::as_str))?;
        let mut filters = Vec::new();
        for (key, value) in params {
            if ["from", "to", "granularity"].contains(&key.as_str()) {
                continue;
            }
            match kind.filters().iter().find(|f| **f == key) {
                Some(f) => filters.push((*f, value.clone())),
                None => {
                    return Err(ApiError::BadRequest(format!(
                        "unknown parameter `{key}`; this report filters on {}",
                        kind.filters().join(", ")
                    )));
                }
            }
        }
        filters.sort();
        Ok(ReportRequest {
            kind,
            from,
            to,
            granularity,
            filters,
        })
    }

    /// The dimensions rows are grouped by.
    fn dimensions(&self) -> Vec<(String, &'static str)> {
        match self.kind {
            ReportKind::Traffic => vec![(format!("date_trunc('{}', hour)", self.granularity.unit()), "period")],
            ReportKind::Geo if self.filters.iter().any(|(f, _)| *f == "country") => {
                vec![("country".into(), "country"), ("region".into(), "region")]
            }
            ReportKind::Geo => vec![("country".into(), "country")],
            ReportKind::Devices => vec![
                ("device_type".into(), "device_type"),
                ("os".into(), "os"),
                ("browser".into(), "browser"),
            ],
            ReportKind::Categories => vec![("page_category".into(), "page_category")],
            ReportKind::Campaigns => vec![("campaign_id".into(), "campaign_id")],
            ReportKind::Demographics => vec![("age_band".into(), "age_band"), ("gender".into(), "gender")],
        }
    }

    fn sql(&self, grouped: bool) -> String {
        let quote = |v: &str| format!("'{}'", v.replace('\'', "''"));
        let mut conditions = vec![
            format!("date >= DATE {}", quote(&self.from.to_string())),
            format!("date <= DATE {}", quote(&self.to.to_string())),
        ];
        conditions.extend(self.filters.iter().map(|(f, v)| format!("{f} = {}", quote(v))));
        let mut select: Vec<String> = Vec::new();
        let dims = self.dimensions();
        if grouped {
            select.extend(dims.iter().map(|(expr, name)| format!("{expr} AS {name}")));
        }
        select.extend(
            self.kind
                .measures()
                .iter()
                .map(|(expr, name)| format!("{expr} AS {name}")),
        );
        select.push("hll_estimate(hll_merge(visitors)) AS visitors".into());
        let mut sql = format!(
            "SELECT {} FROM {} WHERE {}",
            select.join(", "),
            self.kind.table(),
            conditions.join(" AND ")
        );
        if grouped {
            let names: Vec<&str> = dims.iter().map(|(_, n)| *n).collect();
            sql.push_str(&format!(" GROUP BY {0} ORDER BY {0}", names.join(", ")));
        }
        sql
    }
}

/// One cell of a report before suppression.
#[derive(Debug, Clone)]
struct Cell {
    values: Map<String, Value>,
    visitors: f64,
}

fn cells(batches: &[arrow::record_batch::RecordBatch]) -> Result<Vec<Cell>, ApiError> {
    let mut out = Vec::new();
    for b in batches {
        let schema = b.schema();
        for row in 0..b.num_rows() {
            let mut values = Map::new();
            let mut visitors = 0.0;
            for (i, field) in schema.fields().iter().enumerate() {
                let value = cell_value(b.column(i), row)?;
                if field.name() == "visitors" {
                    visitors = value.as_f64().unwrap_or(0.0);
                    values.insert("visitors".into(), json!(visitors.round() as i64));
                } else {
                    values.insert(field.name().clone(), value);
                }
            }
            out.push(Cell { values, visitors });
        }
    }
    Ok(out)
}

fn cell_value(column: &ArrayRef, row: usize) -> Result<Value, ApiError> {
    if column.is_null(row) {
        return Ok(Value::Null);
    }
    let fail = |e: arrow::error::ArrowError| {
        tracing::error!(error = %e, "report cell");
        ApiError::Internal
    };
    Ok(match column.data_type() {
        DataType::Float64 => json!(column.as_any().downcast_ref::<Float64Array>().map(|a| a.value(row))),
        DataType::Int64 => json!(column.as_any().downcast_ref::<Int64Array>().map(|a| a.value(row))),
        DataType::Timestamp(..) => {
            let text = arrow::compute::cast(column, &DataType::Utf8).map_err(fail)?;
            json!(text.as_any().downcast_ref::<StringArray>().map(|a| a.value(row)))
        }
        _ => {
            let text = arrow::compute::cast(column, &DataType::Utf8).map_err(fail)?;
            json!(text.as_any().downcast_ref::<StringArray>().map(|a| a.value(row)))
        }
    })
}

/// Which cells to withhold so that no group under `k` visitors can be seen or derived.
pub fn suppress(visitors: &[f64], total: f64, k: f64) -> Vec<bool> {
    if total < k {
        return vec![true; visitors.len()];
    }
    let mut hidden: Vec<bool> = visitors.iter().map(|v| *v < k).collect();
    loop {
        let count = hidden.iter().filter(|h| **h).count();
        let sum: f64 = visitors.iter().zip(&hidden).filter(|(_, h)| **h).map(|(v, _)| v).sum();
        if count == 0 || (count >= 2 && sum >= k) {
            return hidden;
        }
        // complementary suppression: also hide the smallest cell still shown
        let next = visitors
            .iter()
            .enumerate()
            .filter(|(i, _)| !hidden[*i])
            .min_by(|a, b| a.1.total_cmp(b.1))
            .map(|(i, _)| i);
        match next {
            Some(i) => hidden[i] = true,
            None => return hidden,
        }
    }
}

/// Runs a report and withholds small cells.
pub async fn run(ctx: &SessionContext, req: &ReportRequest, k: usize) -> Result<Value, ApiError> {
    let table = req.kind.table();
    if ctx.table_exist(table).unwrap_or(false) {
        // fall through
    } else {
        return Err(ApiError::Unavailable(format!(
            "no `{table}` yet: the processor writes it with the first events"
        )));
    }
    let query = |sql: String| async move {
        let df = ctx.sql(&sql).await.map_err(|e| {
            tracing::error!(error = %e, sql, "report query failed");
            ApiError::Internal
        })?;
        df.collect().await.map_err(|e| {
            tracing::error!(error = %e, "report query failed");
            ApiError::Internal
        })
    };
    let rows = cells(&query(req.sql(true)).await?)?;
    let total = cells(&query(req.sql(false)).await?)?
        .into_iter()
        .next()
        .unwrap_or(Cell {
            values: Map::new(),
            visitors: 0.0,
        });
    let k = k as f64;
    let hidden = suppress(&rows.iter().map(|c| c.visitors).collect::<Vec<_>>(), total.visitors, k);
    let dims: Vec<&str> = req.dimensions().iter().map(|(_, n)| *n).collect();
    let mut shown = Vec::new();
    for (cell, hide) in rows.into_iter().zip(&hidden) {
        let mut out = Map::new();
        for (name, value) in cell.values {
            let is_dim = dims.contains(&name.as_str());
            out.insert(name, if *hide && !is_dim { Value::Null } else { value });
        }
        if req.kind == ReportKind::Campaigns && !*hide {
            let (i, c) = (out["impressions"].as_f64(), out["clicks"].as_f64());
            if let (Some(i), Some(c)) = (i, c) {
                out.insert("ctr".into(), json!(if i > 0.0 { c / i } else { 0.0 }));
            }
        }
        out.insert("suppressed".into(), json!(hide));
        shown.push(Value::Object(out));
    }
    let total_hidden = total.visitors < k;
    let mut total_out = total.values;
    if total_hidden {
        total_out.values_mut().for_each(|v| *v = Value::Null);
    }
    total_out.insert("suppressed".into(), json!(total_hidden));
    Ok(json!({
        "from": req.from,
        "to": req.to,
        "granularity": req.granularity.unit(),
        "filters": req.filters.iter().map(|(f, v)| (f.to_string(), json!(v))).collect::<Map<_, _>>(),
        "dimensions": dims,
        "min_visitors": k as u64,
        "rows": shown,
        "total": total_out,
        "suppressed_cells": hidden.iter().filter(|h| **h).count(),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_single_small_cell_takes_a_complement_with_it() {
        // EG alone is under k; hiding only EG would let total - shown reveal it
        let hidden = suppress(&[40.0, 12.0, 1.0, 30.0], 83.0, 10.0);
        assert_eq!(hidden, vec![false, true, true, false]);
    }

    #[test]
    fn small_cells_together_must_reach_k() {
        let hidden = suppress(&[50.0, 3.0, 2.0, 20.0, 25.0], 100.0, 10.0);
        // 3 + 2 < 10: the next smallest (20) is hidden too
        assert_eq!(hidden, vec![false, true, true, true, false]);
        assert_eq!(suppress(&[50.0, 60.0], 110.0, 10.0), vec![false, false]);
    }

    #[test]
    fn a_small_total_hides_everything() {
        assert_eq!(suppress(&[4.0, 3.0], 7.0, 10.0), vec![true, true]);
    }

    #[test]
    fn unknown_filters_and_bad_dates_are_refused() {
        let today = NaiveDate::from_ymd_opt(2026, 11, 24).unwrap_or_default();
        let params = |pairs: &[(&str, &str)]| pairs.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect();
        assert!(ReportRequest::parse(ReportKind::Geo, &params(&[("colour", "red")]), today).is_err());
        assert!(ReportRequest::parse(ReportKind::Geo, &params(&[("from", "yesterday")]), today).is_err());
        assert!(ReportRequest::parse(ReportKind::Traffic, &params(&[("granularity", "minute")]), today).is_err());
        let ok = ReportRequest::parse(ReportKind::Geo, &params(&[("country", "JO'; DROP")]), today);
        let sql = ok.map(|r| r.sql(true)).unwrap_or_default();
        assert!(sql.contains("country = 'JO''; DROP'"), "{sql}");
    }
}
