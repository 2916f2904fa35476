//! Reports for marketing (analysts) and advertisers, read from the rollups
//! only. Every number in them leaves through the release mechanism
//! ([`crate::release`]): each row and the total are cells of a rollup, each
//! measure is released with noise keyed by the cell's identity (so a cell
//! reached by any report, filter or SQL gets the same number), and rows whose
//! noisy visitor count is under the threshold are left out. Nothing says how
//! many rows were left out.

use std::collections::HashMap;

use arrow::array::{Array, ArrayRef, Float64Array, Int64Array, StringArray};
use arrow::datatypes::DataType;
use chrono::{DateTime, NaiveDate, Utc};
use datafusion::prelude::SessionContext;
use datasketches::hll::{HllSketch, HllType, HllUnion};
use marsad_schemas::HLL_LG_K;
use serde_json::{Map, Value, json};

use crate::error::ApiError;
use crate::release::extent::{Extent, Span};
use crate::release::{Cell, Mechanism, Release};

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
    /// Sessions by where they landed from: channel, referrer, UTM tags.
    Sources,
    /// Page views, entries and exits by page.
    Pages,
    /// Conversions, converting visitors and conversion rate by goal.
    Goals,
    /// Sessions reaching each step of each funnel, and the drop-off between steps.
    Funnels,
}

/// The dimensions `by` may name, per report (the first the default).
const SOURCE_BREAKDOWNS: [&str; 5] = ["channel", "referrer_domain", "utm_source", "utm_medium", "utm_campaign"];
const PAGE_BREAKDOWNS: [&str; 2] = ["page_path", "page_category"];
const CAMPAIGN_BREAKDOWNS: [&str; 3] = ["day", "country", "device_type"];

/// What a report is compared with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compare {
    /// The as many days just before.
    PreviousPeriod,
    /// The same dates a year before.
    PreviousYear,
}

impl Compare {
    fn parse(name: &str) -> Result<Self, ApiError> {
        match name {
            "previous_period" => Ok(Compare::PreviousPeriod),
            "previous_year" => Ok(Compare::PreviousYear),
            other => Err(ApiError::BadRequest(format!(
                "unknown comparison `compare={other}`; use previous_period or previous_year"
            ))),
        }
    }

    fn name(self) -> &'static str {
        match self {
            Compare::PreviousPeriod => "previous_period",
            Compare::PreviousYear => "previous_year",
        }
    }

    /// The dates compared with `from..=to`.
    fn shift(self, from: NaiveDate, to: NaiveDate) -> Result<(NaiveDate, NaiveDate), ApiError> {
        let out_of_range = || ApiError::BadRequest("the compared period is out of the calendar".into());
        match self {
            Compare::PreviousPeriod => {
                let to_before = from.pred_opt().ok_or_else(out_of_range)?;
                let from_before = to_before.checked_sub_signed(to - from).ok_or_else(out_of_range)?;
                Ok((from_before, to_before))
            }
            Compare::PreviousYear => {
                let year = chrono::Months::new(12);
                Ok((
                    from.checked_sub_months(year).ok_or_else(out_of_range)?,
                    to.checked_sub_months(year).ok_or_else(out_of_range)?,
                ))
            }
        }
    }
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
            "sources" => ReportKind::Sources,
            "pages" => ReportKind::Pages,
            "goals" => ReportKind::Goals,
            "funnels" => ReportKind::Funnels,
            _ => return None,
        })
    }

    fn table(self) -> &'static str {
        match self {
            ReportKind::Campaigns => "ad_performance_hourly",
            ReportKind::Demographics => "demographics_daily",
            ReportKind::Sources => "sources_hourly",
            ReportKind::Pages => "pages_hourly",
            ReportKind::Goals => "goals_hourly",
            ReportKind::Funnels => "funnels_hourly",
            _ => "traffic_hourly",
        }
    }

    fn filters(self) -> &'static [&'static str] {
        match self {
            ReportKind::Campaigns => &["campaign_id", "ad_id", "placement", "country", "device_type"],
            ReportKind::Demographics => &["country", "region", "age_band", "gender", "page_category"],
            ReportKind::Sources => &[
                "channel",
                "referrer_domain",
                "utm_source",
                "utm_medium",
                "utm_campaign",
                "country",
                "device_type",
            ],
            ReportKind::Pages => &["page_path", "page_category", "country", "device_type"],
            ReportKind::Goals => &["goal_id", "country", "device_type"],
            ReportKind::Funnels => &["funnel_id", "country", "device_type"],
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
            ReportKind::Sources => &[
                ("sum(sessions)", "sessions"),
                ("sum(bounces)", "bounces"),
                ("sum(page_views)", "page_views"),
                ("sum(session_seconds)", "session_seconds"),
            ],
            ReportKind::Pages => &[
                ("sum(page_views)", "page_views"),
                ("sum(entries)", "entries"),
                ("sum(exits)", "exits"),
            ],
            ReportKind::Goals => &[("sum(conversions)", "conversions")],
            ReportKind::Funnels => &[("sum(sessions)", "sessions")],
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

    /// Whether `page_views` is `events` over the rows of page views (the tables by event type).
    fn page_views_by_event_type(self) -> bool {
        self.table() == "traffic_hourly"
    }

    /// The breakdowns `by` may name, the first the default (none for most reports).
    fn breakdowns(self) -> &'static [&'static str] {
        match self {
            ReportKind::Campaigns => &CAMPAIGN_BREAKDOWNS,
            ReportKind::Sources => &SOURCE_BREAKDOWNS,
            ReportKind::Pages => &PAGE_BREAKDOWNS,
            _ => &[],
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
    /// The campaigns report's breakdown of each campaign (`day`, `country`, `device_type`), or
    /// the dimension of the sources and pages reports' rows.
    by: Option<&'static str>,
    /// The period the report is compared with.
    compare: Option<Compare>,
    /// The measure rows are ordered by (largest first), and how many are kept.
    order: Option<&'static str>,
    limit: Option<usize>,
    /// An advertiser's campaigns: rows and total restricted to them.
    campaigns: Option<Vec<String>>,
    /// Computed again from the tables even where the session kept the answer
    /// (`Cache-Control: no-cache`); the released numbers are the same either way.
    recompute: bool,
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
        // (the calendar's first days have fewer than 30 before them)
        let from = date(
            "from",
            to.checked_sub_days(chrono::Days::new(29)).unwrap_or(NaiveDate::MIN),
        )?;
        if from > to {
            return Err(ApiError::BadRequest("`from` is after `to`".into()));
        }
        if (to - from).num_days() > 3 * 366 {
            return Err(ApiError::BadRequest("a report covers at most three years".into()));
        }
        let granularity = Granularity::parse(params.get("granularity").map_or("day", String::as_str))?;
        let breakdowns = kind.breakdowns();
        let by = match params.get("by").map(String::as_str) {
            None if kind == ReportKind::Campaigns => None,
            None => breakdowns.first().copied(),
            Some(_) if breakdowns.is_empty() => {
                return Err(ApiError::BadRequest(
                    "only the campaigns, sources and pages reports take `by`".into(),
                ));
            }
            Some(wanted) => Some(breakdowns.iter().copied().find(|b| *b == wanted).ok_or_else(|| {
                ApiError::BadRequest(format!(
                    "unknown breakdown `by={wanted}`; use {}",
                    breakdowns.join(", ")
                ))
            })?),
        };
        let compare = params.get("compare").map(|c| Compare::parse(c)).transpose()?;
        if let Some(c) = compare {
            c.shift(from, to)?;
        }
        let order = match params.get("order") {
            None => None,
            Some(wanted) => {
                let names: Vec<&'static str> = kind.measures().iter().map(|(_, n)| *n).chain(["visitors"]).collect();
                Some(names.iter().copied().find(|n| n == wanted).ok_or_else(|| {
                    ApiError::BadRequest(format!("unknown `order={wanted}`; use one of {}", names.join(", ")))
                })?)
            }
        };
        let limit = match params.get("limit") {
            None => None,
            Some(v) => match v.parse::<usize>() {
                Ok(n) if (1..=MAX_LIMIT).contains(&n) => Some(n),
                _ => {
                    return Err(ApiError::BadRequest(format!(
                        "`limit` is a number of rows from 1 to {MAX_LIMIT}, not `{v}`"
                    )));
                }
            },
        };
        let mut filters = Vec::new();
        for (key, value) in params {
            if ["from", "to", "granularity", "by", "compare", "order", "limit"].contains(&key.as_str()) {
                continue;
            }
            match kind.filters().iter().find(|f| **f == key) {
                Some(_) if value.len() > MAX_FILTER_VALUE => {
                    return Err(ApiError::BadRequest(format!(
                        "`{key}` is at most {MAX_FILTER_VALUE} bytes long, not {}",
                        value.len()
                    )));
                }
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
            by,
            compare,
            order,
            limit,
            campaigns: None,
            recompute: false,
        })
    }

    /// The same request, computed from the tables rather than from answers kept by the session.
    pub fn recomputed(mut self) -> Self {
        self.recompute = true;
        self
    }

    /// The same question over the period it is compared with, if any.
    fn compared(&self) -> Option<ReportRequest> {
        let compare = self.compare?;
        let (from, to) = compare.shift(self.from, self.to).ok()?;
        Some(ReportRequest {
            from,
            to,
            compare: None,
            ..self.clone()
        })
    }

    /// The questions a report asks at `now`, for the budget: the canonical text of each and
    /// the measures it releases (the report's; the site's visitors a conversion rate is made
    /// of; both again for the period it is compared with).
    pub fn identities(&self, now: DateTime<Utc>) -> Vec<(String, usize)> {
        let one = |r: &ReportRequest| {
            std::iter::once((r.identity(now), r.measures_released()))
                .chain(r.site_visitors().map(|s| (s.identity(now), s.measures_released())))
                .collect::<Vec<_>>()
        };
        let mut out = one(self);
        if let Some(c) = self.compared() {
            out.extend(one(&c));
        }
        out
    }

    /// The traffic total over the same dates, countries and devices: the visitors a goal's
    /// conversion rate divides by.
    fn site_visitors(&self) -> Option<ReportRequest> {
        (self.kind == ReportKind::Goals).then(|| ReportRequest {
            kind: ReportKind::Categories,
            filters: self
                .filters
                .iter()
                .filter(|(f, _)| ["country", "device_type"].contains(f))
                .cloned()
                .collect(),
            by: None,
            compare: None,
            order: None,
            limit: None,
            ..self.clone()
        })
    }

    /// Restricts the request to an advertiser's `campaigns`: refused unless it is the campaigns
    /// report and any campaign it names is one of them.
    pub fn for_advertiser(mut self, campaigns: &[String]) -> Result<Self, ApiError> {
        if self.kind != ReportKind::Campaigns {
            return Err(ApiError::ForbiddenWhat(
                "an advertiser's key sees the campaigns report only".into(),
            ));
        }
        if let Some((_, c)) = self.filters.iter().find(|(f, _)| *f == "campaign_id")
            && !campaigns.contains(c)
        {
            return Err(ApiError::ForbiddenWhat(format!(
                "campaign `{c}` is not one of this advertiser's campaigns"
            )));
        }
        self.campaigns = Some(campaigns.to_vec());
        Ok(self)
    }

    /// The canonical text of the question asked at `now`, for the budget.
    pub fn identity(&self, now: DateTime<Utc>) -> String {
        let question = format!(
            "report|{:?}|{}|{}|{}|{:?}|{:?}|{:?}",
            self.kind,
            self.from,
            self.to,
            self.granularity.unit(),
            self.filters,
            self.by,
            self.campaigns
        );
        crate::release::budget_identity(question, crate::release::day_unsettled(self.to, now), now)
    }

    /// Measures released: the report's and the visitor count, for its rows and its total.
    pub fn measures_released(&self) -> usize {
        2 * (self.kind.measures().len() + 1)
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
            ReportKind::Campaigns => {
                let mut dims = vec![("campaign_id".to_owned(), "campaign_id")];
                match self.by {
                    Some("day") => dims.push(("date_trunc('day', hour)".into(), "day")),
                    Some("country") => dims.push(("country".into(), "country")),
                    Some("device_type") => dims.push(("device_type".into(), "device_type")),
                    _ => {}
                }
                dims
            }
            ReportKind::Demographics => vec![("age_band".into(), "age_band"), ("gender".into(), "gender")],
            ReportKind::Sources | ReportKind::Pages => {
                // (parse gives these reports their default breakdown)
                let by = self.by.unwrap_or(self.kind.breakdowns()[0]);
                vec![(by.to_owned(), by)]
            }
            ReportKind::Goals => vec![("goal_id".into(), "goal_id")],
            ReportKind::Funnels => vec![("funnel_id".into(), "funnel_id"), ("step".into(), "step")],
        }
    }

    fn sql(&self, grouped: bool, extent: &Extent) -> String {
        let quote = |v: &str| format!("'{}'", v.replace('\'', "''"));
        let mut conditions = vec![
            format!("date >= DATE {}", quote(&self.from.to_string())),
            format!("date <= DATE {}", quote(&self.to.to_string())),
        ];
        conditions.extend(self.filters.iter().map(|(f, v)| format!("{f} = {}", quote(v))));
        if let Some(campaigns) = &self.campaigns {
            let list: Vec<String> = campaigns.iter().map(|c| quote(c)).collect();
            conditions.push(format!("campaign_id IN ({})", list.join(", ")));
        }
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
        select.push(format!("hll_merge(visitors) AS {VISITORS_SKETCH}"));
        // what each row's rows hold (and its page views' rows): their canonical cells
        select.extend(extent.sql_items(EXTENT, None));
        if self.kind.page_views_by_event_type() {
            select.extend(extent.sql_items(PAGE_VIEW_EXTENT, Some(PAGE_VIEW)));
        }
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

/// The most rows `limit` keeps.
const MAX_LIMIT: usize = 1000;
/// The longest value a filter takes: a page path (with its kept parameters) is at most a URL's
/// length; longer is no value a rollup holds.
const MAX_FILTER_VALUE: usize = marsad_schemas::event::MAX_URL_LEN;

/// The column of a row's merged visitor sketch (`visitors` is its estimate).
const VISITORS_SKETCH: &str = "__visitors";
/// Prefix of the columns measuring a row's canonical cell.
const EXTENT: &str = "__e_";
/// Prefix of the columns measuring the canonical cell of a row's page views.
const PAGE_VIEW_EXTENT: &str = "__pv_";
/// The rows `page_views` counts.
const PAGE_VIEW: &str = "event_type = 'page_view'";

/// A row of a report as computed: every column as JSON with the true measures, and the
/// canonical cells of its rows (and of its page views' rows).
struct Computed {
    values: Map<String, Value>,
    cell: Cell,
    page_view_cell: Option<Cell>,
}

/// A row as the grouped query answers it, before its cells: what the total is made of.
struct Group {
    values: Map<String, Value>,
    visitors: HllSketch,
    span: Span,
    page_view_span: Option<Span>,
}

fn groups(batches: &[arrow::record_batch::RecordBatch], extent: &Extent) -> Result<Vec<Group>, ApiError> {
    let mut out = Vec::new();
    for b in batches {
        let schema = b.schema();
        let sketches = b
            .column_by_name(VISITORS_SKETCH)
            .and_then(|c| c.as_any().downcast_ref::<arrow::array::BinaryArray>())
            .ok_or_else(|| {
                tracing::error!("report rows without their visitor sketches");
                ApiError::Internal
            })?;
        for row in 0..b.num_rows() {
            let mut values = Map::new();
            let span = extent.span(b, row, EXTENT)?;
            let page_view_span = match b.column_by_name(&format!("{PAGE_VIEW_EXTENT}tmin")) {
                Some(_) => Some(extent.span(b, row, PAGE_VIEW_EXTENT)?),
                None => None,
            };
            for (i, field) in schema.fields().iter().enumerate() {
                if field.name().starts_with("__") {
                    continue;
                }
                values.insert(field.name().clone(), cell_value(b.column(i), row)?);
            }
            let visitors = if sketches.is_null(row) {
                empty_sketch()?
            } else {
                HllSketch::deserialize(sketches.value(row)).map_err(|e| {
                    tracing::error!(error = %e, "report visitor sketch");
                    ApiError::Internal
                })?
            };
            values.insert("visitors".into(), json!(visitors.estimate()));
            out.push(Group {
                values,
                visitors,
                span,
                page_view_span,
            });
        }
    }
    Ok(out)
}

fn empty_sketch() -> Result<HllSketch, ApiError> {
    HllSketch::new(HLL_LG_K, HllType::Hll8).map_err(|e| {
        tracing::error!(error = %e, "HLL sketch");
        ApiError::Internal
    })
}

impl Group {
    fn computed(self, extent: &Extent) -> Computed {
        Computed {
            values: self.values,
            cell: extent.cell_of(&self.span),
            page_view_cell: self.page_view_span.map(|s| extent.cell_of(&s)),
        }
    }
}

/// The total row of `groups` (which split every row the report reads, none twice): the
/// measures summed, the sketches merged and the spans joined, so the total is what one query
/// over all those rows would answer, with none of them read again. `None` without groups.
fn total_of(groups: &[Group], measures: &[(&str, &str)], extent: &Extent) -> Result<Option<Computed>, ApiError> {
    let Some((first, rest)) = groups.split_first() else {
        return Ok(None);
    };
    let mut values = Map::new();
    for (_, name) in measures {
        let parts: Vec<&Value> = groups.iter().filter_map(|g| g.values.get(*name)).collect();
        let sum = match parts.iter().map(|v| v.as_i64()).collect::<Option<Vec<i64>>>() {
            Some(ints) => json!(ints.iter().sum::<i64>()),
            None => json!(parts.iter().filter_map(|v| v.as_f64()).sum::<f64>()),
        };
        values.insert((*name).to_owned(), sum);
    }
    let mut union = HllUnion::new(HLL_LG_K).map_err(|e| {
        tracing::error!(error = %e, "HLL union");
        ApiError::Internal
    })?;
    let (mut span, mut page_view_span) = (first.span.clone(), first.page_view_span.clone());
    union.update(&first.visitors);
    for g in rest {
        union.update(&g.visitors);
        span = span.union(&g.span);
        page_view_span = match (page_view_span, &g.page_view_span) {
            (Some(mine), Some(theirs)) => Some(mine.union(theirs)),
            (mine, _) => mine,
        };
    }
    let merged = union.to_sketch(HllType::Hll8);
    values.insert("visitors".into(), json!(merged.estimate()));
    Ok(Some(Computed {
        values,
        cell: extent.cell_of(&span),
        page_view_cell: page_view_span.map(|s| extent.cell_of(&s)),
    }))
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

/// The identity of one report measure: `page_views` are `events` over the page views' rows.
fn measure_of(name: &str, row: &Computed) -> (String, Cell) {
    match (name, &row.page_view_cell) {
        ("page_views", Some(page_views)) => ("sum(events)".into(), page_views.clone()),
        (other, _) => (format!("sum({other})"), row.cell.clone()),
    }
}

/// The measure name of one report measure (for its noise scale).
fn measure_name(name: &str) -> String {
    match name {
        "page_views" => "sum(events)".into(),
        other => format!("sum({other})"),
    }
}

/// Releases one computed row (or the total): `None` when its noisy visitors are too few.
fn release_row(
    row: Computed,
    kind: ReportKind,
    release: &Release,
    mechanism: Mechanism,
    now: chrono::DateTime<chrono::Utc>,
) -> Option<Value> {
    let truth = |name: &str| row.values.get(name).and_then(Value::as_f64).unwrap_or(0.0);
    let visitors = release.release(mechanism, &row.cell, "visitors", truth("visitors"), now);
    if (visitors.value as u64) < release.min_visitors() {
        return None;
    }
    let mut out = Map::new();
    let mut ci95 = Map::new();
    for (name, value) in &row.values {
        let is_measure = name == "visitors" || kind.measures().iter().any(|(_, m)| m == name);
        if !is_measure {
            out.insert(name.clone(), value.clone());
        }
    }
    for (_, name) in kind.measures() {
        let (measure, measured) = measure_of(name, &row);
        let r = release.release(mechanism, &measured, &measure, truth(name), now);
        out.insert((*name).to_owned(), json!(r.value));
        ci95.insert((*name).to_owned(), json!(r.ci95));
    }
    out.insert("visitors".into(), json!(visitors.value));
    ci95.insert("visitors".into(), json!(visitors.ci95));
    // rates computed from the released numbers (so never above 1)
    let rate = |out: &mut Map<String, Value>, name: &str, part: &str, whole: &str| {
        if let (Some(p), Some(w)) = (out[part].as_f64(), out[whole].as_f64()) {
            out.insert(name.into(), json!(if w > 0.0 { (p / w).clamp(0.0, 1.0) } else { 0.0 }));
        }
    };
    match kind {
        ReportKind::Campaigns => rate(&mut out, "ctr", "clicks", "impressions"),
        ReportKind::Sources => rate(&mut out, "bounce_rate", "bounces", "sessions"),
        ReportKind::Pages => rate(&mut out, "exit_rate", "exits", "page_views"),
        _ => {}
    }
    out.insert("ci95".into(), Value::Object(ci95));
    Some(Value::Object(out))
}

/// Runs a report and releases it by `mechanism`; with a comparison, the compared period too,
/// and the change of every released measure (computed from the released numbers only).
pub async fn run(
    ctx: &SessionContext,
    req: &ReportRequest,
    release: &Release,
    mechanism: Mechanism,
    now: chrono::DateTime<chrono::Utc>,
) -> Result<Value, ApiError> {
    // every row first: rows are matched before any is ordered or cut
    let whole = ReportRequest {
        order: None,
        limit: None,
        ..req.clone()
    };
    let mut current = run_period(ctx, &whole, release, mechanism, now).await?;
    if let (Some(compare), Some(compared)) = (req.compare, whole.compared()) {
        let mut previous = run_period(ctx, &compared, release, mechanism, now).await?;
        let mut measures: Vec<&str> = req.kind.measures().iter().map(|(_, n)| *n).collect();
        measures.push("visitors");
        let dims: Vec<&str> = req.dimensions().iter().map(|(_, n)| *n).collect();
        // a period meets the period as far into the compared range; other values themselves
        let key = |row: &Value, from: NaiveDate| -> Vec<Value> {
            dims.iter()
                .map(|d| match (*d, row[*d].as_str()) {
                    ("period", Some(t)) => json!(period_index(t, from, req.granularity)),
                    ("day", Some(t)) => json!(period_index(t, from, Granularity::Day)),
                    _ => row[*d].clone(),
                })
                .collect()
        };
        let before: Vec<(Vec<Value>, &Value)> = previous["rows"]
            .as_array()
            .map(|rows| rows.iter().map(|r| (key(r, compared.from), r)).collect())
            .unwrap_or_default();
        let changes: Vec<Value> = current["rows"]
            .as_array()
            .map(|rows| {
                rows.iter()
                    .map(|row| {
                        let k = key(row, req.from);
                        change_of(row, before.iter().find(|(b, _)| *b == k).map(|(_, r)| *r), &measures)
                    })
                    .collect()
            })
            .unwrap_or_default();
        if let Some(rows) = current["rows"].as_array_mut() {
            for (row, change) in rows.iter_mut().zip(changes) {
                row["change"] = change;
            }
        }
        current["change"] = change_of(&current["total"], Some(&previous["total"]), &measures);
        order_and_limit(&mut previous["rows"], req);
        current["compare"] = json!({
            "with": compare.name(),
            "from": previous["from"],
            "to": previous["to"],
            "rows": previous["rows"],
            "total": previous["total"],
        });
    }
    order_and_limit(&mut current["rows"], req);
    Ok(current)
}

/// Rows ordered by the asked measure, largest first, and cut to the asked number: post-processing
/// of released numbers, so it costs nothing and tells nothing more.
fn order_and_limit(rows: &mut Value, req: &ReportRequest) {
    let Some(rows) = rows.as_array_mut() else {
        return;
    };
    if let Some(order) = req.order {
        rows.sort_by(|a, b| {
            let n = |v: &Value| v[order].as_f64().unwrap_or(0.0);
            n(b).total_cmp(&n(a))
        });
    }
    if let Some(limit) = req.limit {
        rows.truncate(limit);
    }
}

/// How many `unit`s into the range starting `from` the period starting at `start` (a time as
/// the reports write it, `2026-11-25T00:00:00Z`) is: the same number for a period and the one
/// it is compared with, whatever periods were held back before it.
fn period_index(start: &str, from: NaiveDate, unit: Granularity) -> Option<i64> {
    use chrono::Datelike;
    let at = chrono::NaiveDateTime::parse_from_str(start.get(..19)?, "%Y-%m-%dT%H:%M:%S").ok()?;
    let from_midnight = from.and_hms_opt(0, 0, 0)?;
    Some(match unit {
        Granularity::Hour => (at - from_midnight).num_hours(),
        Granularity::Day => (at.date() - from).num_days(),
        Granularity::Week => {
            // (the calendar's first days may have no Monday before them)
            let monday =
                |d: NaiveDate| d.checked_sub_days(chrono::Days::new(u64::from(d.weekday().num_days_from_monday())));
            (monday(at.date())? - monday(from)?).num_days() / 7
        }
        Granularity::Month => {
            i64::from(at.year() * 12 + at.month() as i32) - i64::from(from.year() * 12 + from.month() as i32)
        }
    })
}

/// The share of each funnel step's sessions that reached it from the step before
/// (`from_previous`, with `drop_off` = 1 - it) and from the first step (`from_start`), from the
/// released numbers; `null` where a step it is made of is not shown.
fn funnel_rates(rows: &mut [Value]) {
    let sessions = |rows: &[Value], funnel: &Value, step: u64| -> Option<f64> {
        rows.iter()
            .find(|r| r["funnel_id"] == *funnel && r["step"].as_str().and_then(|s| s.parse::<u64>().ok()) == Some(step))
            .and_then(|r| r["sessions"].as_f64())
    };
    let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => Some((a / b).clamp(0.0, 1.0)),
        _ => None,
    };
    let snapshot = rows.to_vec();
    for row in rows.iter_mut() {
        let Some(step) = row["step"].as_str().and_then(|s| s.parse::<u64>().ok()) else {
            continue;
        };
        let funnel = row["funnel_id"].clone();
        let here = row["sessions"].as_f64();
        let previous = if step > 1 {
            ratio(here, sessions(&snapshot, &funnel, step - 1))
        } else {
            Some(1.0)
        };
        let start = ratio(here, sessions(&snapshot, &funnel, 1));
        row["from_previous"] = json!(previous);
        row["drop_off"] = json!(previous.map(|p| 1.0 - p));
        row["from_start"] = json!(start);
    }
}

/// Per measure, the released value now and then, the difference, the relative change
/// (`null` when there was nothing before) and its direction; `null` when either row was not
/// released (under the threshold): nothing is said of a row that is not shown.
fn change_of(now: &Value, before: Option<&Value>, measures: &[&str]) -> Value {
    let Some(before) = before.filter(|b| b.is_object()) else {
        return Value::Null;
    };
    if !now.is_object() {
        return Value::Null;
    }
    let mut out = Map::new();
    for m in measures {
        let (Some(a), Some(b)) = (now[*m].as_f64(), before[*m].as_f64()) else {
            continue;
        };
        let direction = match a.partial_cmp(&b) {
            Some(std::cmp::Ordering::Greater) => "up",
            Some(std::cmp::Ordering::Less) => "down",
            _ => "flat",
        };
        out.insert(
            (*m).to_owned(),
            json!({
                "current": now[*m],
                "previous": before[*m],
                "difference": a - b,
                "relative": if b > 0.0 { json!((a - b) / b) } else { Value::Null },
                "direction": direction,
            }),
        );
    }
    Value::Object(out)
}

/// One period of a report, released by `mechanism`.
async fn run_period(
    ctx: &SessionContext,
    req: &ReportRequest,
    release: &Release,
    mechanism: Mechanism,
    now: chrono::DateTime<chrono::Utc>,
) -> Result<Value, ApiError> {
    let table = req.kind.table();
    if !ctx.table_exist(table).unwrap_or(false) {
        return Err(ApiError::Unavailable(format!(
            "no `{table}` yet: the processor writes it with the first events"
        )));
    }
    // read-only like every SQL path; asked again of the same table versions, answered from
    // what the session computed then
    let query = |sql: String| async move { crate::answers::collect(ctx, &sql, !req.recompute).await };
    let schema = ctx
        .table(table)
        .await
        .map_err(|e| {
            tracing::error!(error = %e, "report table");
            ApiError::Internal
        })?
        .schema()
        .as_arrow()
        .clone();
    let extent = Extent::of(table, &schema);
    let dims: Vec<&'static str> = req.dimensions().iter().map(|(_, n)| *n).collect();
    let grouped = groups(&query(req.sql(true, &extent)).await?, &extent)?;
    let total = match total_of(&grouped, req.kind.measures(), &extent)? {
        Some(total) => Some(total),
        // no rows: the total of nothing, as one query answers it
        None => groups(&query(req.sql(false, &extent)).await?, &extent)?
            .into_iter()
            .next()
            .map(|g| g.computed(&extent)),
    };
    let rows: Vec<Computed> = grouped.into_iter().map(|g| g.computed(&extent)).collect();
    let mut shown = Vec::new();
    let mut site_visitors = None;
    for row in rows {
        if let Some(released) = release_row(row, req.kind, release, mechanism, now) {
            shown.push(released);
        }
    }
    match req.kind {
        ReportKind::Goals => {
            // converting visitors over the site's visitors, both released (never above 1)
            let site = match req.site_visitors() {
                Some(s) => Box::pin(run_period(ctx, &s, release, mechanism, now)).await?,
                None => Value::Null,
            };
            let all = site["total"]["visitors"].as_f64();
            for row in shown.iter_mut() {
                let rate = match (row["visitors"].as_f64(), all) {
                    (Some(v), Some(a)) if a > 0.0 => json!((v / a).clamp(0.0, 1.0)),
                    _ => Value::Null,
                };
                row["conversion_rate"] = rate;
            }
            site_visitors = Some(site["total"]["visitors"].clone());
        }
        ReportKind::Funnels => funnel_rates(&mut shown),
        _ => {}
    }
    // a funnel's steps hold the same sessions again: their sum is no total
    let total = total
        .filter(|_| req.kind != ReportKind::Funnels)
        .and_then(|t| release_row(t, req.kind, release, mechanism, now))
        .unwrap_or(Value::Null);
    let mut scale = Map::new();
    for (_, name) in req.kind.measures().iter().chain([&("", "visitors")]) {
        let measure = if *name == "visitors" {
            "visitors".to_owned()
        } else {
            measure_name(name)
        };
        let b = if mechanism == Mechanism::Noise {
            release.distribution(&measure).scale()
        } else {
            0.0
        };
        scale.insert((*name).to_owned(), json!(b));
    }
    Ok(json!({
        "from": req.from,
        "to": req.to,
        "granularity": req.granularity.unit(),
        "filters": req.filters.iter().map(|(f, v)| (f.to_string(), json!(v))).collect::<Map<_, _>>(),
        "dimensions": dims,
        "site_visitors": site_visitors,
        "rows": shown,
        "total": total,
        "release": {
            "mechanism": mechanism,
            "epsilon_per_measure": if mechanism == Mechanism::Noise { release.epsilon() } else { 0.0 },
            "noise_scale": scale,
            "min_visitors": release.min_visitors(),
        },
    }))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    #[test]
    fn unknown_filters_and_bad_dates_are_refused() {
        let today = NaiveDate::from_ymd_opt(2026, 11, 24).unwrap_or_default();
        let params = |pairs: &[(&str, &str)]| pairs.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect();
        assert!(ReportRequest::parse(ReportKind::Geo, &params(&[("colour", "red")]), today).is_err());
        assert!(ReportRequest::parse(ReportKind::Geo, &params(&[("from", "yesterday")]), today).is_err());
        assert!(ReportRequest::parse(ReportKind::Traffic, &params(&[("granularity", "minute")]), today).is_err());
        let ok = ReportRequest::parse(ReportKind::Geo, &params(&[("country", "JO'; DROP")]), today);
        let extent = Extent::of("traffic_hourly", &arrow::datatypes::Schema::empty());
        let sql = ok.map(|r| r.sql(true, &extent)).unwrap_or_default();
        assert!(sql.contains("country = 'JO''; DROP'"), "{sql}");
    }

    fn params(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect()
    }

    /// A week's periods are counted from the Monday before `from`, which the calendar's first
    /// days (it starts on a Thursday) do not have: no index, rather than a panic.
    #[test]
    fn weeks_at_the_calendars_start_have_no_index() {
        for from in (0..7).map(|d| NaiveDate::MIN + chrono::Days::new(d)) {
            for unit in [
                Granularity::Hour,
                Granularity::Day,
                Granularity::Week,
                Granularity::Month,
            ] {
                let _ = period_index("2026-11-24T00:00:00Z", from, unit);
            }
        }
        let first_monday = (0..7)
            .map(|d| NaiveDate::MIN + chrono::Days::new(d))
            .find(|d| chrono::Datelike::weekday(d) == chrono::Weekday::Mon);
        let monday = first_monday.expect("a Monday in the calendar's first week");
        assert_eq!(
            period_index("2026-11-24T00:00:00Z", monday - chrono::Days::new(1), Granularity::Week),
            None
        );
        assert!(period_index("2026-11-24T00:00:00Z", monday, Granularity::Week).is_some());
    }

    /// The first and last days of the calendar are answered as any day: a report over them,
    /// and a 400 for a compared period that would fall off the calendar.
    #[test]
    fn the_calendars_ends_are_reported_and_periods_before_them_refused() {
        let today = NaiveDate::from_ymd_opt(2026, 11, 24).unwrap_or_default();
        let first = NaiveDate::MIN.to_string();
        let near_first = (NaiveDate::MIN + chrono::Days::new(20)).to_string();
        let after_first = (NaiveDate::MIN + chrono::Days::new(3)).to_string();
        let req = ReportRequest::parse(ReportKind::Traffic, &params(&[("to", &first)]), today);
        assert!(
            req.is_ok(),
            "a report ending on the calendar's first day: {:?}",
            req.err()
        );
        for asked in [
            vec![("to", near_first.as_str()), ("compare", "previous_period")],
            vec![("to", first.as_str()), ("compare", "previous_year")],
            vec![
                ("from", after_first.as_str()),
                ("to", near_first.as_str()),
                ("compare", "previous_period"),
            ],
        ] {
            let refused = ReportRequest::parse(ReportKind::Traffic, &params(&asked), today);
            assert!(
                matches!(refused, Err(ApiError::BadRequest(_))),
                "{asked:?}: {:?}",
                refused.map(|_| ())
            );
        }
    }

    /// Dates at the ends of the calendar, alone, with a default beside them, or compared with
    /// another period, are answered (a report or a 400), never a panic of the date arithmetic.
    #[test]
    fn dates_at_the_calendars_ends_are_answered() {
        let today = NaiveDate::from_ymd_opt(2026, 11, 24).unwrap_or_default();
        let ends = [
            NaiveDate::MIN.to_string(),
            NaiveDate::MAX.to_string(),
            (NaiveDate::MIN + chrono::Days::new(3)).to_string(),
            (NaiveDate::MAX - chrono::Days::new(3)).to_string(),
            (NaiveDate::MIN + chrono::Days::new(20)).to_string(),
        ];
        for end in &ends {
            for other in ends.iter().chain([&today.to_string()]) {
                for compare in [None, Some("previous_period"), Some("previous_year")] {
                    for kind in [ReportKind::Traffic, ReportKind::Campaigns] {
                        let mut asked = vec![("to", end.as_str())];
                        let _ = ReportRequest::parse(kind, &params(&asked), today);
                        asked.push(("from", other.as_str()));
                        asked.extend(compare.map(|c| ("compare", c)));
                        if let Ok(req) = ReportRequest::parse(kind, &params(&asked), today) {
                            let _ = req.identity(chrono::Utc::now());
                            let _ = req.compared();
                        }
                        let _ = ReportRequest::parse(kind, &params(&[("from", end.as_str())]), today);
                        let alone = [("to", end.as_str()), ("compare", compare.unwrap_or("previous_year"))];
                        let _ = ReportRequest::parse(kind, &params(&alone), today);
                    }
                }
            }
        }
    }

    /// A rollup whose rows hold every sketch mode (a few visitors to thousands), hours over
    /// three days, NULL dimensions and rows without page views.
    fn rollup() -> datafusion::datasource::MemTable {
        use arrow::array::{BinaryArray, Date32Array, TimestampMicrosecondArray};
        use arrow::datatypes::{Field, Schema, TimeUnit};
        let mut seed: u64 = 0x5eed;
        let mut next = |n: u64| {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (seed >> 33) % n
        };
        let now = Utc::now().timestamp() / 3600 * 3600;
        let (mut hours, mut dates, mut countries, mut devices, mut types, mut events, mut sketches) =
            (vec![], vec![], vec![], vec![], vec![], vec![], vec![]);
        let (mut regions, mut os, mut browsers, mut categories) = (vec![], vec![], vec![], vec![]);
        for _ in 0..600 {
            let hour = now - 3600 * next(72) as i64;
            hours.push(hour * 1_000_000);
            dates.push((hour / 86_400) as i32);
            countries.push(["JO", "SA", "EG", "AE"].get(next(5) as usize).copied());
            devices.push(Some(["mobile", "desktop", "tablet"][next(3) as usize]));
            types.push(Some(["page_view", "ad_impression"][next(2) as usize]));
            regions.push(["Amman", "Irbid"].get(next(3) as usize).copied());
            os.push(Some(["android", "ios", "windows"][next(3) as usize]));
            browsers.push(["chrome", "safari"].get(next(3) as usize).copied());
            categories.push(Some(["cars", "jobs", "real-estate"][next(3) as usize]));
            events.push(1 + next(50) as i64);
            let (start, size) = (next(20_000), [1, 3, 40, 700, 6_000][next(5) as usize]);
            let mut sketch = HllSketch::new(HLL_LG_K, HllType::Hll8).expect("a sketch");
            for v in start..start + size {
                sketch.update(format!("visitor-{v}").as_str());
            }
            sketches.push(sketch.serialize());
        }
        let schema = Arc::new(Schema::new(vec![
            Field::new(
                "hour",
                DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
                false,
            ),
            Field::new("date", DataType::Date32, false),
            Field::new("country", DataType::Utf8, true),
            Field::new("region", DataType::Utf8, true),
            Field::new("device_type", DataType::Utf8, true),
            Field::new("event_type", DataType::Utf8, true),
            Field::new("os", DataType::Utf8, true),
            Field::new("browser", DataType::Utf8, true),
            Field::new("page_category", DataType::Utf8, true),
            Field::new("events", DataType::Int64, false),
            Field::new("sessions", DataType::Int64, false),
            Field::new("bounces", DataType::Int64, false),
            Field::new("session_seconds", DataType::Int64, false),
            Field::new("visitors", DataType::Binary, true),
        ]));
        let sketches: BinaryArray = sketches.iter().map(|s| Some(s.as_slice())).collect();
        let batch = arrow::record_batch::RecordBatch::try_new(
            schema.clone(),
            vec![
                Arc::new(TimestampMicrosecondArray::from(hours).with_timezone("UTC")),
                Arc::new(Date32Array::from(dates)),
                Arc::new(StringArray::from(countries)),
                Arc::new(StringArray::from(regions)),
                Arc::new(StringArray::from(devices)),
                Arc::new(StringArray::from(types)),
                Arc::new(StringArray::from(os)),
                Arc::new(StringArray::from(browsers)),
                Arc::new(StringArray::from(categories)),
                Arc::new(Int64Array::from(events.clone())),
                Arc::new(Int64Array::from(events.iter().map(|e| e / 3).collect::<Vec<_>>())),
                Arc::new(Int64Array::from(events.iter().map(|e| e / 7).collect::<Vec<_>>())),
                Arc::new(Int64Array::from(events.iter().map(|e| e * 41).collect::<Vec<_>>())),
                Arc::new(sketches),
            ],
        )
        .expect("a batch");
        datafusion::datasource::MemTable::try_new(schema, vec![vec![batch]]).expect("a table")
    }

    /// The total made from the groups (no second scan) is the total one query over every row
    /// answers: the same measures, the same visitor estimate, the same cells (so the same noise).
    #[tokio::test]
    async fn the_total_of_the_groups_is_the_total_of_the_rows() {
        let ctx = SessionContext::new();
        crate::sketches::register(&ctx);
        ctx.register_table("traffic_hourly", Arc::new(rollup()))
            .expect("registered");
        let schema = ctx
            .table("traffic_hourly")
            .await
            .expect("t")
            .schema()
            .as_arrow()
            .clone();
        let extent = Extent::of("traffic_hourly", &schema);
        let today = Utc::now().date_naive();
        let params = |pairs: &[(&str, &str)]| pairs.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect();
        let run = |sql: String| {
            let ctx = ctx.clone();
            async move { ctx.sql(&sql).await.expect("plans").collect().await.expect("runs") }
        };
        let yesterday = (today - chrono::Days::new(1)).to_string();
        for (kind, asked) in [
            (ReportKind::Geo, vec![]),
            (ReportKind::Devices, vec![]),
            (ReportKind::Traffic, vec![("granularity", "hour")]),
            (ReportKind::Geo, vec![("country", "JO")]),
            (
                ReportKind::Categories,
                vec![("from", yesterday.as_str()), ("device_type", "tablet")],
            ),
        ] {
            let req = ReportRequest::parse(kind, &params(&asked), today).expect("a request");
            let grouped = groups(&run(req.sql(true, &extent)).await, &extent).expect("groups");
            assert!(grouped.len() > 1, "{kind:?}: {} groups", grouped.len());
            let ours = total_of(&grouped, kind.measures(), &extent)
                .expect("a total")
                .expect("rows");
            let one_query = groups(&run(req.sql(false, &extent)).await, &extent).expect("the total");
            let theirs = one_query.into_iter().next().expect("a row").computed(&extent);
            assert_eq!(ours.values, theirs.values, "{kind:?} {asked:?}");
            assert_eq!(ours.cell.identity("x"), theirs.cell.identity("x"), "{kind:?} {asked:?}");
            let page_views = |c: &Computed| c.page_view_cell.as_ref().map(|c| c.identity("x"));
            assert_eq!(page_views(&ours), page_views(&theirs), "{kind:?} {asked:?}");
        }
    }
}
