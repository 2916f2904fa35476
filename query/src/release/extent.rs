//! The canonical cell of a released number: not the question as asked, but the rows it
//! summed, described by what they hold — per dimension the set of values present among them,
//! and the first and last hour present. Questions phrased differently over the same rows
//! (`IN` lists padded with values that match nothing, ranges that start before the data,
//! filters on values present elsewhere but not here) get one identity and so one noise; and
//! different rows never share one: filters are products of per-dimension sets and a time
//! range, so the rows a filter matches are exactly the rows of the product of what they
//! hold.

use std::collections::BTreeSet;

use arrow::array::{Array, ArrayRef, AsArray, StringArray};
use arrow::datatypes::{DataType, Schema};
use arrow::record_batch::RecordBatch;
use chrono::{DateTime, Utc};
use datafusion::functions_aggregate::expr_fn::{array_agg, max, min};
use datafusion::logical_expr::{Expr, ExprFunctionExt, col};

use super::cell::{Cell, Constraint, Hours};
use crate::error::ApiError;

/// The time column of a rollup: hours, or whole days.
#[derive(Debug, Clone, PartialEq, Eq)]
enum TimeColumn {
    Hour(String),
    Date(String),
}

/// How to measure the extent of a group of a rollup's rows.
#[derive(Debug, Clone)]
pub struct Extent {
    table: String,
    dimensions: Vec<String>,
    time: Option<TimeColumn>,
}

/// The text a NULL dimension value stands for (as [`Cell::with_value`] writes it).
const NULL_VALUE: &str = "\u{0}NULL";

impl Extent {
    /// The extent of rows of `table` with `schema`: its text dimensions and its time column.
    pub fn of(table: &str, schema: &Schema) -> Self {
        let mut dimensions = Vec::new();
        let mut hour = None;
        let mut date = None;
        for f in schema.fields() {
            match (f.name().as_str(), f.data_type()) {
                ("hour", _) => hour = Some(TimeColumn::Hour("hour".into())),
                ("date", _) => date = Some(TimeColumn::Date("date".into())),
                (_, DataType::Int64 | DataType::Binary | DataType::LargeBinary | DataType::BinaryView) => {}
                (name, _) => dimensions.push(name.to_owned()),
            }
        }
        dimensions.sort();
        Extent {
            table: table.to_owned(),
            dimensions,
            time: hour.or(date),
        }
    }

    fn time_name(&self) -> Option<&str> {
        match &self.time {
            Some(TimeColumn::Hour(c) | TimeColumn::Date(c)) => Some(c),
            None => None,
        }
    }

    /// SQL select items measuring the extent (over the rows meeting `filter`, a SQL
    /// condition, when given), their names starting with `prefix`.
    pub fn sql_items(&self, prefix: &str, filter: Option<&str>) -> Vec<String> {
        let filter = filter.map(|f| format!(" FILTER (WHERE {f})")).unwrap_or_default();
        let mut items: Vec<String> = self
            .dimensions
            .iter()
            .map(|d| format!("array_agg(DISTINCT {d}){filter} AS {prefix}x_{d}"))
            .collect();
        if let Some(t) = self.time_name() {
            items.push(format!("min({t}){filter} AS {prefix}tmin"));
            items.push(format!("max({t}){filter} AS {prefix}tmax"));
        }
        items
    }

    /// The same as aggregate expressions.
    pub fn exprs(&self, prefix: &str) -> Result<Vec<Expr>, ApiError> {
        let mut exprs = Vec::new();
        for d in &self.dimensions {
            let agg = array_agg(col(d.as_str())).distinct().build().map_err(|e| {
                tracing::error!(error = %e, "extent aggregate");
                ApiError::Internal
            })?;
            exprs.push(agg.alias(format!("{prefix}x_{d}")));
        }
        if let Some(t) = self.time_name() {
            exprs.push(min(col(t)).alias(format!("{prefix}tmin")));
            exprs.push(max(col(t)).alias(format!("{prefix}tmax")));
        }
        Ok(exprs)
    }

    /// The canonical cell of row `row` of `batch`, from the columns [`Extent::sql_items`] or
    /// [`Extent::exprs`] named with `prefix`.
    pub fn cell(&self, batch: &RecordBatch, row: usize, prefix: &str) -> Result<Cell, ApiError> {
        Ok(self.cell_of(&self.span(batch, row, prefix)?))
    }

    /// What row `row` of `batch` holds (the columns named with `prefix`), before it is a cell:
    /// the spans of groups that split some rows combine into the span of those rows.
    pub fn span(&self, batch: &RecordBatch, row: usize, prefix: &str) -> Result<Span, ApiError> {
        let column = |name: String| {
            batch.column_by_name(&name).cloned().ok_or_else(|| {
                tracing::error!(column = name, "extent column missing");
                ApiError::Internal
            })
        };
        let mut values = Vec::with_capacity(self.dimensions.len());
        for d in &self.dimensions {
            values.push(present_values(&column(format!("{prefix}x_{d}"))?, row)?);
        }
        let (first, last) = match &self.time {
            Some(_) => (
                instant(&column(format!("{prefix}tmin"))?, row),
                instant(&column(format!("{prefix}tmax"))?, row),
            ),
            None => (None, None),
        };
        Ok(Span { values, first, last })
    }

    /// The canonical cell of the rows `span` describes.
    pub fn cell_of(&self, span: &Span) -> Cell {
        let mut cell = Cell::of(&self.table);
        for (d, values) in self.dimensions.iter().zip(&span.values) {
            cell = cell.with(
                d,
                if values.is_empty() {
                    Constraint::Nothing
                } else {
                    Constraint::OneOf(values.clone())
                },
            );
        }
        if let Some(time) = &self.time {
            let hours = match (span.first, span.last) {
                (Some(first), Some(last)) => {
                    let step = match time {
                        TimeColumn::Hour(_) => 1,
                        TimeColumn::Date(_) => 24,
                    };
                    Hours {
                        start: first.timestamp().div_euclid(3600),
                        end: last.timestamp().div_euclid(3600) + step,
                    }
                }
                // no rows: every empty group is the same (empty) set of rows
                _ => Hours { start: 0, end: 0 },
            };
            cell = cell.within(hours);
        }
        cell
    }
}

/// What a group of rows holds: per dimension the values present, and the first and last
/// time. The span of rows split into groups is the union of the groups' spans.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Span {
    values: Vec<BTreeSet<String>>,
    first: Option<DateTime<Utc>>,
    last: Option<DateTime<Utc>>,
}

impl Span {
    /// The span of this group's rows and `other`'s together.
    pub fn union(mut self, other: &Span) -> Span {
        for (mine, theirs) in self.values.iter_mut().zip(&other.values) {
            mine.extend(theirs.iter().cloned());
        }
        self.first = [self.first, other.first].into_iter().flatten().min();
        self.last = [self.last, other.last].into_iter().flatten().max();
        self
    }
}

/// The distinct values of one group's list, as text (NULL as its own value).
fn present_values(list: &ArrayRef, row: usize) -> Result<BTreeSet<String>, ApiError> {
    let mut out = BTreeSet::new();
    if list.is_null(row) {
        return Ok(out);
    }
    let values = match list.data_type() {
        DataType::List(_) => list.as_list::<i32>().value(row),
        DataType::LargeList(_) => list.as_list::<i64>().value(row),
        other => {
            tracing::error!(?other, "extent: not a list");
            return Err(ApiError::Internal);
        }
    };
    let text = arrow::compute::cast(&values, &DataType::Utf8).map_err(|e| {
        tracing::error!(error = %e, "extent values");
        ApiError::Internal
    })?;
    let text = text.as_any().downcast_ref::<StringArray>().ok_or(ApiError::Internal)?;
    for i in 0..text.len() {
        out.insert(if text.is_null(i) {
            NULL_VALUE.to_owned()
        } else {
            text.value(i).to_owned()
        });
    }
    Ok(out)
}

fn instant(column: &ArrayRef, row: usize) -> Option<DateTime<Utc>> {
    if column.is_null(row) {
        return None;
    }
    let cast = arrow::compute::cast(
        column,
        &DataType::Timestamp(arrow::datatypes::TimeUnit::Microsecond, None),
    )
    .ok()?;
    let a = cast
        .as_any()
        .downcast_ref::<arrow::array::TimestampMicrosecondArray>()?;
    DateTime::from_timestamp_micros(a.value(row))
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::prelude::SessionContext;

    async fn cell_of(ctx: &SessionContext, extent: &Extent, filter: &str) -> Cell {
        let sql = format!(
            "SELECT {} FROM t WHERE {filter}",
            extent.sql_items("__", None).join(", ")
        );
        let batches = ctx.sql(&sql).await.expect("plan").collect().await.expect("run");
        extent.cell(&batches[0], 0, "__").expect("cell")
    }

    #[tokio::test]
    async fn the_same_rows_asked_differently_are_one_cell_and_other_rows_are_not() {
        let ctx = SessionContext::new();
        ctx.sql(
            "CREATE TABLE t AS SELECT * FROM (VALUES \
             ('IQ', 'Baghdad', TIMESTAMP '2026-11-10 05:00:00', 3), \
             ('JO', 'Amman', TIMESTAMP '2026-11-10 06:00:00', 40), \
             ('JO', 'Irbid', TIMESTAMP '2026-11-11 07:00:00', 50)) \
             AS v(country, city, hour, events)",
        )
        .await
        .expect("table")
        .collect()
        .await
        .expect("created");
        let schema = ctx.table("t").await.expect("t").schema().as_arrow().clone();
        let extent = Extent::of("traffic_hourly", &schema);
        let iq = cell_of(&ctx, &extent, "country = 'IQ'").await;
        let padded = cell_of(
            &ctx,
            &extent,
            "country IN ('IQ', 'XX') AND city IN ('Baghdad', 'Amman') AND hour >= TIMESTAMP '2020-01-01 00:00:00'",
        )
        .await;
        assert_eq!(iq.identity("sum(events)"), padded.identity("sum(events)"));
        let both = cell_of(&ctx, &extent, "country IN ('IQ', 'JO')").await;
        assert_ne!(iq.identity("sum(events)"), both.identity("sum(events)"));
        let nothing = cell_of(&ctx, &extent, "country = 'XX'").await;
        let nothing_else = cell_of(&ctx, &extent, "city = 'Nowhere'").await;
        assert_eq!(nothing.identity("sum(events)"), nothing_else.identity("sum(events)"));
    }
}
